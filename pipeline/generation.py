"""Batched generation with a checkpoint's chat template, and log-probabilities of token sequences under a model
(the samples' log-ratios to a reference, perplexity on held-out text)."""

from __future__ import annotations

import json
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from pipeline import log, metrics as M, rl
from pipeline.cli import PipelineError
from pipeline.fingerprints import hash_file, hash_obj
from pipeline.formats import as_messages


# What a model's own generation_config.json may set to shape its samples away from the model's distribution (Qwen2.5's:
# repetition_penalty 1.05-1.1; others min_p, num_beams, suppress_tokens, min_length, bad_words_ids, forced tokens, ...):
# generate() applies each one it is not given. This is every field that adds a logits processor besides temperature,
# top_k and top_p (which each call sets itself), at the value that adds none. Eval's samples (and the KL read from
# them), PPO's rollouts (whose log-probabilities are the policy's own) and greedy replies need exactly that: every
# generate call here passes them, and TRL's rollouts run inside `unshaped` (its GenerationConfig is filled from the
# model's for every field it leaves unset).
UNSHAPED = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_p": None, "typical_p": 1.0,
            "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "num_beams": 1, "min_new_tokens": None, "min_length": 0,
            "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
            "forced_eos_token_id": None, "sequence_bias": None, "exponential_decay_length_penalty": None,
            "renormalize_logits": False, "remove_invalid_values": False, "encoder_no_repeat_ngram_size": 0,
            "encoder_repetition_penalty": 1.0, "guidance_scale": None, "top_h": None, "watermarking_config": None}


@contextmanager
def unshaped(model):
    """`model`'s generation_config without what shapes samples (UNSHAPED) for the duration: for generate calls made
    by others (TRL's trainers). Restored after, so a saved model keeps the user's settings; yields a copy of them,
    for what is saved meanwhile (TRL's checkpoints)."""
    import copy

    gen = model.generation_config
    users = copy.deepcopy(gen)
    kept = {k: getattr(gen, k, None) for k in UNSHAPED}
    for k, v in UNSHAPED.items():
        setattr(gen, k, v)
    try:
        yield users
    finally:
        for k, v in kept.items():
            setattr(gen, k, v)


@dataclass
class Reply:
    text: str
    ended: bool      # stopped with end-of-turn rather than running out of tokens
    n_tokens: int
    token_ids: list[int] | None = None  # the tokens as generated, up to (without) the end-of-turn token
    end_id: int | None = None  # the end-of-turn token it stopped with (one of stop_ids); None: the tokenizer's eos


_TURN_ENDS = weakref.WeakKeyDictionary()  # tokenizer -> (what turn_end_id read of it, its answer)


def turn_end_id(tokenizer) -> int:
    """The token the chat template closes an assistant turn with, where it is a special token (ChatML's <|im_end|>,
    Gemma's <end_of_turn>, Phi-3's <|end|>: not their eos, which ends the text); else the tokenizer's eos. Rendered
    once per tokenizer (stop_ids runs on every generate call and rollout step), again when its template, eos or
    vocabulary changed."""
    try:
        read = (getattr(tokenizer, "chat_template", None), tokenizer.eos_token_id, len(tokenizer))
        seen = _TURN_ENDS.get(tokenizer)
    except TypeError:  # a stand-in without a length or weak references to it: rendered each time
        return _rendered_turn_end(tokenizer)
    if seen is None or seen[0] != read:
        seen = _TURN_ENDS[tokenizer] = read, _rendered_turn_end(tokenizer)
    return seen[1]


def _rendered_turn_end(tokenizer) -> int:
    try:
        marker = "\x00reply\x00"
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": marker}], tokenize=False)
        after = tokenizer(text.split(marker, 1)[1], add_special_tokens=False)["input_ids"]
        if after and after[0] in set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder):
            return after[0]
    except Exception:  # no template, or one that refuses this conversation
        pass
    return tokenizer.eos_token_id


def stop_ids(tokenizer, model=None) -> list[int]:
    """The tokens that end a reply: the tokenizer's eos first, then the template's end of turn where that is another
    (turn_end_id: a model trained on the template stops with it), and the model's generation_config eos ids (a hub
    chat model ships them as a list for this). Never the pad token, unless it is the eos: padding follows a reply."""
    ids = [tokenizer.eos_token_id, turn_end_id(tokenizer)]
    own = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += own if isinstance(own, list) else [] if own is None else [own]
    return list(dict.fromkeys(i for i in ids if i is not None and (i == ids[0] or i != tokenizer.pad_token_id)))


def render_prompt(tokenizer, prompt, tools=None) -> str:
    """A conversational prompt goes through the chat template (with the tools it offers, if any); plain text becomes
    one user turn."""
    messages = as_messages(prompt)
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate(model, tokenizer, prompts, *, max_new_tokens=64, batch_size=32, do_sample=False, temperature=1.0,
             top_p=1.0, num_samples=1, seed=0, desc="generating", progress=True, engine=None,
             tools=None) -> list[list[Reply]]:
    """Replies for each prompt (num_samples each), batched with left padding and the KV cache. `tools`: the tool
    schemas each prompt offers (a list per prompt, None where it offers none), rendered by the chat template; the
    replies are one turn each (a tool call is sampled, never run: read it with pipeline.tool_formats.call_reader).

    Prompts are generated longest-first, so each batch pads little; results come back in the input order. With
    `engine` (pipeline/vllm_engine.py, holding `model`'s weights) vLLM samples them instead, all at once.
    """
    texts = [render_prompt(tokenizer, p, t) for p, t in zip(prompts, tools or [None] * len(prompts))]
    eos, pad = stop_ids(tokenizer, model), tokenizer.pad_token_id
    pad = eos[0] if pad is None else pad
    if engine is not None:
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        rows = engine.sample(ids, stops=eos, max_new_tokens=max_new_tokens, do_sample=do_sample,
                             temperature=temperature, top_p=top_p, n=num_samples)
        return [[_reply(tokenizer, row, eos, pad) for row in rows[i * num_samples:(i + 1) * num_samples]]
                for i in range(len(texts))]
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training, use_cache = model.training, model.config.use_cache
    model.eval()
    model.config.use_cache = True
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    out: list[list[Reply] | None] = [None] * len(texts)
    try:
        bar = tqdm(total=len(texts), desc=desc, disable=not progress, leave=False)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                 temperature=temperature if do_sample else None,
                                 top_p=top_p if do_sample else None, top_k=None,
                                 num_return_sequences=num_samples, eos_token_id=eos, pad_token_id=pad,
                                 use_cache=True, **UNSHAPED)
            new = gen[:, enc["input_ids"].shape[1]:]
            for j, i in enumerate(idx):
                rows = new[j * num_samples:(j + 1) * num_samples].tolist()
                out[i] = [_reply(tokenizer, row, eos, pad) for row in rows]
            bar.update(len(idx))
        bar.close()
    finally:
        tokenizer.padding_side = side
        model.config.use_cache = use_cache
        model.train(was_training)
    return out


def _reply(tokenizer, row: list[int], stops: list[int], pad: int) -> Reply:
    """A generated row (its new tokens; after an end-of-turn, one of `stops`, only padding, or nothing) as a Reply."""
    end = next((k for k, t in enumerate(row) if t in stops), None)
    sampled = row if end is None else row[:end]  # pads only ever follow the end-of-turn
    tokens = [t for t in sampled if t != pad]
    end_id = None if end is None or row[end] == tokenizer.eos_token_id else row[end]
    return Reply(tokenizer.decode(tokens, skip_special_tokens=True).strip(), end is not None, len(tokens), sampled,
                 end_id)


def prompt_ids(tokenizer, prompt, tools=None) -> list[int]:
    """The token ids `generate` feeds for a prompt (chat template with the generation prompt and the prompt's tools,
    no extra specials)."""
    return tokenizer(render_prompt(tokenizer, prompt, tools), add_special_tokens=False)["input_ids"]


def tokenizer_identity(tokenizer) -> str:
    """What prompt_ids of a prompt depend on, so that tokenizers alike measure prompts once: the class, the settings
    it was read with (less the folder), the chat template it renders with, its size, and the vocabulary files it was
    read from by their content (each stage of a run saves the same; an adapter without its own: its base's), or the
    hub id it was read by."""
    folder = Path(tokenizer.name_or_path)
    read = [(n, hash_file(folder / n)) for n in sorted(set(tokenizer.vocab_files_names.values()))
            if (folder / n).is_file()] if folder.is_dir() else str(folder)
    settings = {k: v for k, v in tokenizer.init_kwargs.items() if k != "name_or_path"}
    return hash_obj([type(tokenizer).__qualname__, settings, tokenizer.chat_template, len(tokenizer), read])


@torch.no_grad()
def token_logprobs(model, sequences, *, batch_size=32, desc="scoring", progress=True) -> list[list[float]]:
    """log p(token_t | tokens before it) for t = 1 .. len-1 of each token-id sequence (teacher forcing).

    Batches are right-padded (positions start at 0 for every row) and formed longest-first; log-softmax in float32.
    With prompt + reply sequences, the reply's log-probs are the last len(reply) entries.
    """
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[list[float] | None] = [None] * len(sequences)
    bar = tqdm(total=len(sequences), desc=desc, disable=not progress, leave=False)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = max(len(sequences[i]) for i in idx)
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, :len(sequences[i])] = torch.tensor(sequences[i], dtype=torch.long)
                mask[row, :len(sequences[i])] = 1
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            logps = rl.logprobs_of(logits, ids[:, 1:])
            for row, i in enumerate(idx):
                out[i] = logps[row, :len(sequences[i]) - 1].tolist()
            bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------- sequence scores


def same_tokenizer(a, b) -> bool:
    return a.get_vocab() == b.get_vocab() and a.chat_template == b.chat_template and a.eos_token_id == b.eos_token_id


def sample_sequences(tokenizer, prompts, samples, policy_tokenizer=None,
                     tools=None) -> tuple[list[list[int]], list[int]]:
    """prompt + sampled reply (+ end-of-turn if it ended) token ids, and each prompt's length. With the policy's own
    tokenizer the reply keeps its sampled ids; another tokenizer re-encodes the reply text. `tools`: as `generate`'s."""
    reuse = policy_tokenizer is None or same_tokenizer(tokenizer, policy_tokenizer)
    seqs, starts = [], []
    for prompt, replies, offered in zip(prompts, samples, tools or [None] * len(prompts)):
        head = prompt_ids(tokenizer, prompt, offered)
        for r in replies:
            body = r.token_ids if reuse else tokenizer(r.text, add_special_tokens=False)["input_ids"]
            end = (r.end_id if r.end_id is not None else tokenizer.eos_token_id) if reuse else turn_end_id(tokenizer)
            seqs.append(head + list(body) + ([end] if r.ended else []))
            starts.append(len(head))
    return seqs, starts


def reply_logprob_sums(model, tokenizer, prompts, samples, batch_size, desc, policy_tokenizer=None,
                       tools=None) -> np.ndarray:
    """log p(reply | prompt) of every sample under `model`, shaped (prompts, samples); `tools` as `generate`'s."""
    seqs, starts = sample_sequences(tokenizer, prompts, samples, policy_tokenizer, tools)
    lps = token_logprobs(model, seqs, batch_size=batch_size, desc=desc)
    sums = [float(np.sum(lp[s - 1:])) for lp, s in zip(lps, starts)]
    return np.array(sums).reshape(len(prompts), -1)


def perplexity_sequences(tokenizer, rows, max_len: int | None) -> list[tuple[list[int], list[bool]]]:
    """Token ids of each held-out row and which of them are scored: every token of `text`, the assistant turns
    of a conversation (the chat template's generation block), the completion of a prompt/completion row."""
    out = []
    for row in rows:
        if "text" in row:
            ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
            scored = [True] * len(ids)
        elif "messages" in row or isinstance(row.get("prompt"), list):
            if "messages" in row:
                messages = row["messages"]
            else:
                completion = row["completion"]
                messages = row["prompt"] + (as_messages(completion) if isinstance(completion, list)
                                            else [{"role": "assistant", "content": completion}])
            tools = row.get("tools")
            enc = tokenizer.apply_chat_template(messages, tools=json.loads(tools) if isinstance(tools, str) else tools,
                                                tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
            ids, scored = list(enc["input_ids"]), [bool(m) for m in enc["assistant_masks"]]
        else:
            head = len(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
            ids = tokenizer(row["prompt"] + row["completion"], add_special_tokens=False)["input_ids"]
            scored = [i >= head for i in range(len(ids))]
        out.append((ids[:max_len], scored[:max_len]))
    return out


def context_length(model, tokenizer=None) -> int | None:
    """config_context of a loaded model."""
    return config_context(model.config, tokenizer)


def config_context(config, tokenizer=None) -> int | None:
    """The positions a language model was built for (its config's, else the tokenizer's model_max_length where that
    says one); None where neither does."""
    if n := config_positions(config):
        return n
    n = getattr(tokenizer, "model_max_length", None)  # a tokenizer that says none has 1e30
    return n if isinstance(n, int) and 0 < n < 10**9 else None


def text_config(config):
    """A model config's language-model part (a multimodal config's text config), or the config itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def config_positions(config) -> int | None:
    """The positions a model config says a row can use; None where it says none. A table whose position ids start
    past the pad token's (positions_skipped: RoBERTa's 514) holds that many fewer."""
    text = text_config(config)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(n := getattr(text, name, None), int) and n > 0:
            return n - positions_skipped(text)
    return None


# Model types whose position ids start at padding_idx + 1 (fairseq's RoBERTa and the types built on it: transformers'
# create_position_ids_from_input_ids), so a table's first pad_token_id + 1 rows are no row's positions. A list:
# transformers says this only in its modeling code, in no config field, and a pattern match on that code at run time
# would go quiet when it is restyled; tests/test_byod.py checks the list against that code both ways.
POSITIONS_PAST_PAD = frozenset({"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text",
                                "roberta-prelayernorm", "xmod", "longformer", "ibert", "luke", "mpnet", "esm", "lilt",
                                "markuplm", "layoutlmv3", "altclip_text_model", "bridgetower_text_model",
                                "clap_text_model"})
# Model types whose positions come from a table indexed by position id (learned; GPT-J's, CodeGen's and CTRL's fixed
# sinusoids): a row longer than the table stops the first step (each checked past its positions). XGLM grows its
# table; RoPE, ALiBi and state-space models have none. ESM has a table only with position_embedding_type absolute
# (ESM-1b; ESM-2 rotates), which has_position_table reads.
POSITION_TABLES = frozenset({"gpt2", "gpt-sw3", "gpt_bigcode", "openai-gpt", "ctrl", "gpt_neo", "opt", "biogpt", "gptj",
                             "codegen", "bart", "bert"}) | (POSITIONS_PAST_PAD - {"esm"})


def positions_skipped(config) -> int:
    """How many rows of a model's position table come before its first position id: pad_token_id + 1 for a type in
    POSITIONS_PAST_PAD (RoBERTa's 514 hold 512 positions), else 0."""
    text = text_config(config)
    model_type = getattr(text, "model_type", None)
    if model_type not in POSITIONS_PAST_PAD:
        return 0
    pad = 1 if model_type == "mpnet" else getattr(text, "pad_token_id", None)  # MPNet's padding_idx is always 1
    return pad + 1 if isinstance(pad, int) else 0


def has_position_table(config) -> bool:
    """Whether a config says positively that its model reads positions from a table (POSITION_TABLES, or BERT-style
    `position_embedding_type`: absolute positions, or relative ones from a table of distances as long). False where
    it cannot tell: a remote-code config names its rotary settings its own way (ChatGLM's rope_ratio, Qwen-1's
    rotary_emb_base), not as `rope_parameters`."""
    text = text_config(config)
    return (getattr(text, "model_type", None) in POSITION_TABLES
            or getattr(text, "position_embedding_type", None) in ("absolute", "relative_key", "relative_key_query"))


def learned_positions_problem(config, max_length: int | None, key: str) -> str | None:
    """Why a training stage cannot give this model rows of up to `max_length` tokens (`key`: TRL cuts rows there,
    None cuts none): a model with a table of positions (has_position_table: GPT-2, OPT, GPT-J) stops the first step on
    a longer row. Any other model, or one whose config does not say, runs on."""
    positions = config_positions(config)
    if positions is None or not has_position_table(config) or (max_length and max_length <= positions):
        return None
    skipped = positions_skipped(config)
    table = (f"{positions} positions (a table of {positions + skipped} whose position ids start at {skipped})"
             if skipped else f"table of {positions} positions")
    over = (f"({max_length}) is over the model's {table}" if max_length else
            f"is unset, so rows are not cut to the model's {table}")
    return f"{key} {over}: a longer row stops training with an index out of range; set {key} to {positions} or less"


def refuse_past_positions(recipe, config, max_length: int | None, key: str) -> None:
    """A training stage's form of learned_positions_problem: one line naming the recipe, before any training."""
    if problem := learned_positions_problem(config, max_length, key):
        raise PipelineError(f"{recipe.path}: {problem}")


def warn_past_context(config, tokenizer, lengths: list[int], reply_tokens: int, what: str) -> None:
    """Warn when prompts of `lengths` tokens with a reply of up to reply_tokens run past the positions of the model
    `config` describes: those replies go where it never trained (a model with a table of positions fails there). eval
    keeps such prompts: every checkpoint answers the same ones."""
    context = config_context(config, tokenizer)
    over = [n for n in lengths if context is not None and n + reply_tokens > context]
    if over:
        log.warning(f"{what}: {len(over)} of {len(lengths)} prompts (up to {max(over)} tokens) with a reply of up to "
                    f"{reply_tokens} tokens run past the model's {context} positions, where it never trained: lower "
                    f"the reply's tokens or shorten the prompts")


def past_position_table(config, tokenizer, lengths: list[int], reply_tokens: int) -> list[int]:
    """The indices of the prompts (of `lengths` tokens) whose reply of up to `reply_tokens` runs past the positions of
    the model `config` describes, where it reads them from a table (GPT-2, OPT: has_position_table): generating there
    stops with an index out of range. Empty for any other model (it answers, where it never trained:
    warn_past_context)."""
    context = config_context(config, tokenizer)
    if context is None or not has_position_table(config):
        return []
    return [i for i, n in enumerate(lengths) if n + reply_tokens > context]


def refuse_past_position_table(config, tokenizer, lengths: list[int], reply_tokens: int, *, prompts: str,
                               budget: str, name: str, path) -> None:
    """Where warn_past_context only warns, a model that reads positions from a table would stop with an index out of
    range mid-generation: one line instead (eval's checkpoints answer the same prompts, so none is left out), read
    off its `config` before any checkpoint generates. `prompts`: the file, `budget`: the key giving reply_tokens,
    `name` / `path`: the checkpoint."""
    if over := past_position_table(config, tokenizer, lengths, reply_tokens):
        raise PipelineError(
            f"{prompts}: prompt {over[0] + 1} ({lengths[over[0]]} tokens; {len(over)} of {len(lengths)} prompts "
            f"run past) with a reply of up to {budget}={reply_tokens} tokens does not fit {name}'s table of "
            f"{config_context(config, tokenizer)} positions ({path}): shorten those prompts, lower {budget}, or leave "
            f"the checkpoint out")


def held_out_perplexity(model, tokenizer, rows, batch_size, desc) -> tuple[float, int] | None:
    """exp of the mean NLL of the scored tokens of `rows` (see perplexity_sequences), and how many were scored."""
    max_len = context_length(model, tokenizer)
    pairs = [(ids, scored) for ids, scored in perplexity_sequences(tokenizer, rows, max_len) if len(ids) > 1]
    lps = token_logprobs(model, [ids for ids, _ in pairs], batch_size=batch_size, desc=desc)
    picked = [[lp[t - 1] for t in range(1, len(ids)) if scored[t]] for (ids, scored), lp in zip(pairs, lps)]
    n = sum(len(p) for p in picked)
    return (M.perplexity(picked), n) if n else None
