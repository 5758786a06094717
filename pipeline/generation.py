"""Batched generation with the checkpoint's chat template, and verifier accuracy on the world's held-out prompts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from pipeline import rl


@dataclass
class Reply:
    text: str
    ended: bool      # stopped with end-of-turn rather than running out of tokens
    n_tokens: int
    token_ids: list[int] | None = None  # the tokens as generated, up to (without) the end-of-turn token


def render_prompt(tokenizer, prompt) -> str:
    """A conversational prompt goes through the chat template; plain text becomes one user turn."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def generate(model, tokenizer, prompts, *, max_new_tokens=64, batch_size=32, do_sample=False, temperature=1.0,
             top_p=1.0, num_samples=1, seed=0, desc="generating", progress=True) -> list[list[Reply]]:
    """Replies for each prompt (num_samples each), batched with left padding and the KV cache.

    Prompts are generated longest-first, so each batch pads little; results come back in the input order.
    """
    texts = [render_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pad = eos if pad is None else pad
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
                                 use_cache=True)
            new = gen[:, enc["input_ids"].shape[1]:]
            for j, i in enumerate(idx):
                replies = []
                for row in new[j * num_samples:(j + 1) * num_samples].tolist():
                    ended = eos in row
                    sampled = row[:row.index(eos)] if ended else row  # pads only ever follow the eos
                    tokens = [t for t in sampled if t != pad]
                    replies.append(Reply(tokenizer.decode(tokens, skip_special_tokens=True).strip(), ended,
                                         len(tokens), sampled))
                out[i] = replies
            bar.update(len(idx))
        bar.close()
    finally:
        tokenizer.padding_side = side
        model.config.use_cache = use_cache
        model.train(was_training)
    return out


def prompt_ids(tokenizer, prompt) -> list[int]:
    """The token ids `generate` feeds for a prompt (chat template with the generation prompt, no extra specials)."""
    return tokenizer(render_prompt(tokenizer, prompt), add_special_tokens=False)["input_ids"]


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


def verifier_accuracy(model, tokenizer, rows, *, max_new_tokens=48, batch_size=64, desc="scoring") -> dict:
    """Greedy replies to world prompts scored by each skill's verifier: overall and per-skill accuracy."""
    from pipeline import world

    replies = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens,
                       batch_size=batch_size, desc=desc)
    per_skill: dict[str, list[bool]] = {}
    for row, (reply,) in zip(rows, replies):
        per_skill.setdefault(row["skill"], []).append(world.verify(row["skill"], reply.text, row["answer"]))
    scores = [ok for oks in per_skill.values() for ok in oks]
    return {
        "accuracy": sum(scores) / len(scores),
        "per_skill": {s: sum(v) / len(v) for s, v in sorted(per_skill.items())},
        "n": len(scores),
        "ended": sum(r[0].ended for r in replies) / len(replies),
    }


def score_checkpoint(recipe, path: str, rows, *, max_new_tokens=48, batch_size=64, label="model") -> dict:
    """Verifier accuracy of the model saved at `path`, read back from disk as later stages will read it."""
    from pipeline import models, runs

    # Called on the main process only, while the others wait: no ZeRO-3 partitioned loading or synced generation.
    with models.single_process():
        model = models.load_causal_lm(recipe, path)
        tokenizer = models.load_tokenizer(recipe, runs.Checkpoint(label, path, "", "local"))
        models.configure_generation(model, tokenizer)
        result = verifier_accuracy(model, tokenizer, rows, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   desc=f"scoring {label}")
    print(f"held-out verifier accuracy of {label}: {result['accuracy']:.3f} (n={result['n']}, "
          f"{', '.join(f'{s} {a:.2f}' for s, a in result['per_skill'].items())})", flush=True)
    return result


def heldout_rows(recipe, keys, stage: str) -> list[dict] | None:
    """The stage's held-out prompts (HeldoutKeys) if they carry verifiers (`skill`, `answer`), else None."""
    from pipeline import data

    if not keys.heldout_prompts:
        return None
    ds = data.load(keys.heldout_prompts, "prompts", recipe)
    if not {"skill", "answer"} <= set(ds.column_names):
        print(f"[{stage}] {keys.heldout_prompts} has no skill/answer columns: held-out scoring skipped")
        return None
    return ds.select(range(min(len(ds), keys.heldout_max_prompts))).to_list()


def heldout_comparison(recipe, keys, rows, before: tuple[str, str], after: tuple[str, str]) -> dict:
    """Verifier accuracy of two saved models, `(name, path)` each, as metrics.json entries."""
    result = {"heldout": {"prompts": keys.heldout_prompts}}
    for name, path in (before, after):
        scored = score_checkpoint(recipe, path, rows, max_new_tokens=keys.heldout_max_new_tokens,
                                  batch_size=keys.heldout_batch_size, label=name)
        result["heldout"][name] = scored
        result["heldout"]["n"] = scored["n"]
        result[f"heldout_accuracy_{name}"] = scored["accuracy"]
    return result
