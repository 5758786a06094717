"""Tests for pipeline.tokenizer (byte-level BPE training + ChatML template with {% generation %} markers)."""

from __future__ import annotations

import json
import random

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pipeline.tokenizer import (
    rendered_chats,
    CHAT_TEMPLATE,
    DOC_SEP,
    EOS,
    IM_START,
    PAD,
    RESPONSE_TEMPLATE,
    SPECIAL_TOKENS,
    TOOL_TOKENS,
    apply_chat_format,
    doc_sep_id,
    has_generation_block,
    load_tokenizer,
    train_tokenizer,
)

WORDS = (
    "the a cat dog sat on mat quick brown fox jumps over lazy hello world python code function weather city "
    "temperature is what how please tell me about Paris London today sunny rain degrees answer question "
    "assistant user system tool call result name arguments value number one two three four five"
).split()

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "City name"}},
                "required": ["city"],
            },
        },
    }
]


def make_corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        sent = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15)))
        sent = sent[0].upper() + sent[1:] + rng.choice([".", "?", "!", ":"])
        if i % 10 == 0:
            sent += ' {"city": "Paris", "degrees": %d}' % rng.randint(0, 40)
        if i % 7 == 0:
            sent += "\n" + sent.lower()
        out.append(sent)
    return out


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return train_tokenizer(make_corpus(), vocab_size=512)


def masked_runs(input_ids, mask) -> list[list[int]]:
    """Consecutive runs of token ids whose mask is 1."""
    runs, cur = [], []
    for i, m in zip(input_ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


# --------------------------------------------------------------------------------------------------------------------
# training / special tokens


def test_special_tokens_single_ids(tok):
    assert 300 <= len(tok) <= 512 + len(TOOL_TOKENS)
    vocab = tok.get_vocab()
    for t in SPECIAL_TOKENS + TOOL_TOKENS:
        assert t in vocab
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert ids == [vocab[t]], t
        # also when glued to text
        ids = tok("hello" + t + "world", add_special_tokens=False)["input_ids"]
        assert vocab[t] in ids
    assert [vocab[t] for t in SPECIAL_TOKENS] == [0, 1, 2, 3]


def test_eos_pad_bos(tok):
    assert tok.eos_token == EOS
    assert tok.eos_token_id == tok.convert_tokens_to_ids(EOS)
    assert tok.pad_token == PAD
    assert tok.pad_token_id == tok.convert_tokens_to_ids(PAD)
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.bos_token is None
    assert doc_sep_id(tok) == tok.convert_tokens_to_ids(DOC_SEP)
    # nothing is added automatically
    assert tok("hello world")["input_ids"] == tok("hello world", add_special_tokens=False)["input_ids"]
    assert tok.model_max_length == 2048
    assert tok.chat_template == CHAT_TEMPLATE and has_generation_block(tok.chat_template)


def test_round_trip(tok):
    texts = [
        "Hello world, how is the weather in Paris today?",
        "  leading spaces and\ttabs\nnew lines\n\n",
        "unicode: café naïve — 日本語 🙂 ∑x²",
        '{"name": "get_weather", "arguments": {"city": "Paris"}}',
        "",
    ]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text
    # special tokens decode back, and are skipped with skip_special_tokens (tool tags are kept)
    text = f"{IM_START}assistant\n<tool_call>\nhi\n</tool_call>{EOS}{PAD}{DOC_SEP}"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<tool_call>\nhi\n</tool_call>"


# --------------------------------------------------------------------------------------------------------------------
# chat template


def test_render_basic_and_generation_prompt(tok):
    msgs = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
    )
    # no default system prompt
    assert tok.apply_chat_template(msgs[1:2], tokenize=False) == "<|im_start|>user\nHi there<|im_end|>\n"

    prompt = tok.apply_chat_template(msgs[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith(prompt)
    # token level: prompt ids are a prefix of the full conversation ids (prompt/completion split is clean)
    p_ids = tok.apply_chat_template(msgs[:2], add_generation_prompt=True, return_dict=False)
    f_ids = tok.apply_chat_template(msgs, return_dict=False)
    assert f_ids[: len(p_ids)] == p_ids
    # the completion = assistant content + eos (+ the newline after it)
    assert tok.decode(f_ids[len(p_ids) :]) == "Hello! How can I help?<|im_end|>\n"
    # the assistant turn ends with eos
    assert f_ids[-2] == tok.eos_token_id


def test_assistant_mask_multi_turn(tok):
    msgs = [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "What is two plus two?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "And three plus three?"},
        {"role": "assistant", "content": "Six, the answer is six."},
    ]
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(ids) == len(mask)
    runs = masked_runs(ids, mask)
    assert [tok.decode(r) for r in runs] == ["Four.<|im_end|>", "Six, the answer is six.<|im_end|>"]
    # exact token count: content tokens (tokenised standalone) + 1 eos per assistant turn
    n_expected = sum(len(tok(m["content"])["input_ids"]) + 1 for m in msgs if m["role"] == "assistant")
    assert sum(mask) == n_expected
    for r in runs:
        assert r[-1] == tok.eos_token_id
    # nothing from system / user turns or headers is masked
    unmasked = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "Four" not in unmasked and "Six" not in unmasked
    assert "What is two plus two?" in unmasked and "concise" in unmasked
    # the im_end closing system/user turns is not masked: 5 turns -> 5 im_end, only the 2 assistant ones masked
    assert sum(1 for i in ids if i == tok.eos_token_id) == 5
    assert sum(1 for i, m in zip(ids, mask) if m and i == tok.eos_token_id) == 2


def test_assistant_mask_batched_and_tensors(tok):
    conv = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    out = tok.apply_chat_template(
        [conv, conv[:1] + [{"role": "assistant", "content": "the cat sat"}]],
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    assert len(out["assistant_masks"]) == 2
    runs = [masked_runs(i, m) for i, m in zip(out["input_ids"], out["assistant_masks"])]
    assert [tok.decode(r[0]) for r in runs] == ["world<|im_end|>", "the cat sat<|im_end|>"]


def test_tools_rendering(tok):
    msgs = [
        {"role": "system", "content": "You can use tools."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "name": "get_weather", "content": '{"degrees": 21}'},
        {"role": "assistant", "content": "It is 21 degrees in Paris."},
    ]
    text = tok.apply_chat_template(msgs, tools=TOOLS, tokenize=False)
    sys_turn = text.split("<|im_end|>\n")[0]
    assert sys_turn.startswith("<|im_start|>system\nYou can use tools.\n\n# Tools")
    assert "<tools>\n" + json.dumps(TOOLS[0]) + "\n</tools>" in sys_turn
    assert "<tool_call></tool_call>" in sys_turn  # the calling instruction
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>\n"
    ) in text
    assert '<|im_start|>tool\n<tool_response>\n{"degrees": 21}\n</tool_response><|im_end|>\n' in text
    assert text.endswith("<|im_start|>assistant\nIt is 21 degrees in Paris.<|im_end|>\n")
    assert "None" not in text

    # tools without a system message -> own system turn
    text2 = tok.apply_chat_template(msgs[1:], tools=TOOLS, tokenize=False)
    assert text2.startswith("<|im_start|>system\n# Tools\n")
    assert text2.count("<|im_start|>system") == 1

    # mask: tool call + eos and final answer + eos; tool response / tools block never masked
    out = tok.apply_chat_template(msgs, tools=TOOLS, return_dict=True, return_assistant_tokens_mask=True)
    runs = masked_runs(out["input_ids"], out["assistant_masks"])
    assert [tok.decode(r) for r in runs] == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is 21 degrees in Paris.<|im_end|>",
    ]


def test_tool_call_variants(tok):
    msgs = [
        {"role": "user", "content": "Weather in Paris and London?"},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"function": {"name": "get_weather", "arguments": {"city": "London"}}},
            ],
        },
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": [{"type": "text", "text": "rain"}]},
    ]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert (
        "<|im_start|>assistant\nLet me check.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "London"}}\n</tool_call><|im_end|>\n'
    ) in text
    # one turn per tool message
    assert text.count("<|im_start|>tool\n<tool_response>\n") == 2
    assert "<tool_response>\nsunny\n</tool_response>" in text
    assert "<tool_response>\nrain\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")
    # every tool call in the rendered text parses as JSON
    blocks = text.split("<tool_call>\n")[1:]  # no tools -> no instruction block, only the two calls
    assert len(blocks) == 2
    for block in blocks:
        call = json.loads(block.split("\n</tool_call>")[0])
        assert set(call) == {"name", "arguments"}


def test_prefix_preserving_with_tools(tok):
    """Rendering then appending a tool response never changes the earlier tokens (needed by TRL multi-turn)."""
    base = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]},
    ]
    ids1 = tok.apply_chat_template(base, return_dict=False)
    ids2 = tok.apply_chat_template(
        base + [{"role": "tool", "content": "x"}, {"role": "tool", "content": "y"}],
        return_dict=False,
        add_generation_prompt=True,
    )
    assert ids2[: len(ids1)] == ids1
    assert '"arguments": {}' in tok.decode(ids1)


def test_parse_response_round_trip(tok):
    """tokenizer.parse_response (used by TRL GRPO with tools) recovers the assistant message from a completion."""
    prompt_msgs = [{"role": "user", "content": "Weather in Paris?"}]
    replies = [
        {"role": "assistant", "content": "It is sunny."},
        {
            "role": "assistant",
            "content": "Let me check.",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                {"type": "function", "function": {"name": "get_time", "arguments": {}}},
            ],
        },
        {
            "role": "assistant",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
    ]
    prompt_ids = tok.apply_chat_template(prompt_msgs, add_generation_prompt=True, return_dict=False)
    for reply in replies:
        full = tok.apply_chat_template(prompt_msgs + [reply], return_dict=False)
        completion = full[len(prompt_ids) : -1]  # what the model generates: up to and including <|im_end|>
        assert completion[-1] == tok.eos_token_id
        parsed = tok.parse_response(completion, prefix=prompt_ids)
        assert parsed.get("content", "") == reply.get("content", "")
        assert parsed.get("tool_calls") == reply.get("tool_calls")


def test_trl_checks(tok):
    chat_utils = pytest.importorskip("trl.chat_template_utils")
    assert chat_utils.has_generation_markers(tok.chat_template)
    assert chat_utils.is_chat_template_stop_token_trained(tok)
    assert chat_utils.is_chat_template_prefix_preserving(tok)
    assert chat_utils.supports_tool_calling(tok)


def test_sft_trainer_assistant_only_loss(tok, tmp_path):
    """TRL SFTTrainer(assistant_only_loss=True) keeps labels only on assistant content + eos."""
    pytest.importorskip("trl")
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(cfg)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    ds = Dataset.from_list([{"messages": msgs}, {"messages": msgs[:2] + [{"role": "assistant", "content": "Sunny."}]}])
    args = SFTConfig(
        output_dir=str(tmp_path),
        assistant_only_loss=True,
        max_steps=1,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        max_length=256,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    assert trainer.chat_template is None  # our template is used as is (not swapped by TRL)
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    labels = batch["labels"]
    assert tok.decode(labels[0][labels[0] != -100]) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
        "It is sunny.<|im_end|>"
    )
    assert tok.decode(labels[1][labels[1] != -100]) == "Sunny.<|im_end|>"
    trainer.train()


# --------------------------------------------------------------------------------------------------------------------
# save / load, apply_chat_format


def test_save_load_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.chat_template == CHAT_TEMPLATE
    assert loaded.eos_token == EOS and loaded.eos_token_id == tok.eos_token_id
    assert loaded.pad_token == PAD and loaded.pad_token_id == tok.pad_token_id
    assert loaded.bos_token is None
    assert loaded.response_template == RESPONSE_TEMPLATE
    assert len(loaded) == len(tok)
    assert set(loaded.all_special_tokens) == set(tok.all_special_tokens)
    text = "Hello world <tool_call> the cat</tool_call>"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    a = loaded.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    b = tok.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    assert a["input_ids"] == b["input_ids"] and a["assistant_masks"] == b["assistant_masks"]

    via_loader = load_tokenizer(str(tmp_path))
    assert via_loader.pad_token == PAD and via_loader.chat_template == CHAT_TEMPLATE


def _plain_bpe(texts) -> PreTrainedTokenizerFast:
    """A GPT-2-like tokenizer: byte-level BPE, eos = <|endoftext|>, no pad, no chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def test_apply_chat_format_plain_bpe(tmp_path):
    plain = _plain_bpe(make_corpus(200, seed=1))
    assert plain.chat_template is None and plain.pad_token is None
    n_before = len(plain)
    plain.save_pretrained(tmp_path / "plain")

    loaded = load_tokenizer(str(tmp_path / "plain"))
    assert loaded.pad_token == "<|endoftext|>"  # pad falls back to eos

    fmt, n_added = apply_chat_format(_plain_bpe(make_corpus(200, seed=1)))
    # <|im_start|>, <|im_end|>, 4 tool tags, <|pad|>
    assert n_added == 7
    assert len(fmt) == n_before + n_added
    assert fmt.eos_token == EOS and fmt.eos_token_id == fmt.convert_tokens_to_ids(EOS)
    assert fmt.pad_token == PAD and fmt.pad_token_id != fmt.eos_token_id
    assert fmt.chat_template == CHAT_TEMPLATE
    assert "<|endoftext|>" in fmt.all_special_tokens  # old eos still skipped when decoding
    for t in [IM_START, EOS, PAD] + TOOL_TOKENS:
        assert len(fmt(t)["input_ids"]) == 1
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "the cat sat"}]
    out = fmt.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    assert [fmt.decode(r) for r in masked_runs(out["input_ids"], out["assistant_masks"])] == ["the cat sat<|im_end|>"]

    # idempotent: a second call adds nothing and keeps the template
    fmt2, n2 = apply_chat_format(fmt)
    assert n2 == 0 and fmt2.chat_template == CHAT_TEMPLATE
    # force=True with everything present also adds nothing
    assert apply_chat_format(fmt, force=True)[1] == 0


def test_apply_chat_format_replaces_template_without_generation(tok, tmp_path):
    """A ChatML tokenizer whose template lacks {% generation %} (like Qwen2.5's): tokens exist -> 0 added."""
    tok.save_pretrained(tmp_path)
    other = AutoTokenizer.from_pretrained(tmp_path)
    other.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    )
    other.eos_token = DOC_SEP
    fmt, n_added = apply_chat_format(other)
    assert n_added == 0
    assert fmt.chat_template == CHAT_TEMPLATE and fmt.eos_token == EOS and fmt.pad_token == PAD


def test_chat_dataset_puts_tool_conversations_into_the_tokenizer_corpus(tmp_path):
    """`tokenizer.chat_dataset: world:tool_sft` adds the rendered tool conversations to the tokenizer's corpus: the
    template's tool header and the schemas' JSON get merges, so a tool conversation takes far fewer tokens; the
    key enters the new model's fingerprint only when set."""
    from pipeline import data, models, runs
    from pipeline.recipe import load_recipe

    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("world: {n_pretrain_docs: 300, n_tool_sft: 200}\n"
                           "tokenizer: {train: true, vocab_size: 600}\nmodel: {config: {model_type: llama}}\n")
    plain, with_chats = load_recipe(recipe_file), load_recipe(recipe_file, ["tokenizer.chat_dataset=world:tool_sft"])
    corpus = data.load("world:pretrain", "text", plain)["text"]
    base = runs.Checkpoint("model", None, "", "config")
    tok_plain = models.load_tokenizer(plain, base, corpus=corpus)
    tok_chats = models.load_tokenizer(with_chats, base, corpus=corpus)
    row = data.load("world:tool_sft", "chat", plain)[0]
    text = rendered_chats([row])[0]
    assert text.startswith("<|im_start|>system\n# Tools") and "<tool_call>" in text and "<tool_response>" in text
    n_plain, n_chats = len(tok_plain(text)["input_ids"]), len(tok_chats(text)["input_ids"])
    assert n_chats < 0.6 * n_plain, (n_plain, n_chats)
    assert tok_chats.decode(tok_chats(text)["input_ids"]) == text
    fp = lambda r: runs.resolve_checkpoint(r, "model").fingerprint
    assert fp(plain) != fp(with_chats) and fp(plain) == fp(load_recipe(recipe_file))


def test_chat_template_problem_names_what_a_users_template_cannot_do(tok, tmp_path):
    """A template without tool support would train on tool rows with their calls left out; a base model's tokenizer
    has none; the pipeline's own template renders every row."""
    from pipeline.tokenizer import chat_template_problem

    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    rows = [{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]},
            {"messages": [{"role": "user", "content": "Weather in Paris?"},
                          {"role": "assistant", "content": None, "tool_calls": [call]}],
             "tools": json.dumps(TOOLS)}]
    assert chat_template_problem(tok, rows, assistant_only=True) is None
    tok.save_pretrained(tmp_path)
    other = AutoTokenizer.from_pretrained(tmp_path)
    other.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + (m['content'] or '') "
                           "+ '<|im_end|>\\n' }}{% endfor %}")
    assert chat_template_problem(other, rows) == ("row 2: its chat template leaves out the row's tools or tool calls "
                                                  "(get_weather): it has no tool support")
    other.chat_template = None
    assert chat_template_problem(other, rows) == "it has no chat template (a base model)"


def test_chat_template_modes_on_a_users_model(tmp_path):
    """`pipeline` puts our ChatML over any template, one with assistant markers too; `auto` keeps a template that
    assistant-only loss trains on as is (markers, or a training version in TRL: Llama 3's) and replaces others
    (a template that merely mentions add_generation_prompt); an unknown mode is refused when the recipe loads."""
    from trl.chat_template_utils import llama3_chat_template

    from pipeline import models, runs
    from pipeline.cli import PipelineError
    from pipeline.recipe import load_recipe
    from test_byod import MISTRAL_TEMPLATE, user_model

    marked = CHAT_TEMPLATE.replace("<|im_start|>assistant", "<|im_start|>bot")  # has {% generation %} markers
    unknown = MISTRAL_TEMPLATE + "{% if add_generation_prompt %}{% endif %}"
    recipe_file = tmp_path / "r.yaml"
    for name, template, auto_keeps in (("llama3", llama3_chat_template, True), ("marked", marked, True),
                                       ("unknown", unknown, False)):
        folder = user_model(tmp_path / name, template=template)
        recipe_file.write_text(f"model: {{name_or_path: {folder}}}\n")
        cp = runs.Checkpoint("model", folder, "", "local")
        for mode, kept in (("pipeline", False), ("auto", auto_keeps), ("own", True)):
            tok = models.load_tokenizer(load_recipe(recipe_file, [f"tokenizer.chat_template={mode}"]), cp)
            assert tok.chat_template == (template if kept else CHAT_TEMPLATE), (name, mode)
            assert kept or (tok.eos_token == EOS and tok.pad_token != EOS)
    with pytest.raises(PipelineError, match="tokenizer.chat_template must be"):
        load_recipe(recipe_file, ["tokenizer.chat_template=chatml"])


def test_documents_are_packed_with_the_end_of_text_token_not_the_chat_turn_end(tmp_path):
    """A Llama-3 style tokenizer (eos `<|eot_id|>`, the chat turn end; `<|end_of_text|>` beside it) joined
    pretraining documents with its eos: `<|eot_id|>`, or `<|im_end|>` once the pipeline's template is put over it.
    Gemma's (eos `<end_of_turn>`) has `<eos>`; a tokenizer with neither falls back to its bos."""
    from tokenizers import Tokenizer, models as bpe_models

    from pipeline import models, runs
    from pipeline.pretrain import pack
    from pipeline.recipe import load_recipe
    from test_byod import user_model

    folder = user_model(tmp_path / "llama3")
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(f"model: {{name_or_path: {folder}}}\n")
    for mode in ("own", "pipeline"):
        tok = models.load_tokenizer(load_recipe(recipe_file, [f"tokenizer.chat_template={mode}"]),
                                    runs.Checkpoint("model", folder, "", "local"))
        assert tok.eos_token == ("<|eot_id|>" if mode == "own" else EOS)
        blocks = pack(["What is 1 + 1?", "Sure! The answer is 2."], tok, block_size=4)
        stream = tok.convert_ids_to_tokens([i for block in blocks for i in block])
        assert "<|end_of_text|>" in stream and tok.eos_token not in stream, mode
    specials = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
    gemma = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(bpe_models.BPE()), bos_token="<bos>",
                                    eos_token="<end_of_turn>", pad_token="<pad>", extra_special_tokens=specials[1:])
    assert doc_sep_id(gemma) == gemma.convert_tokens_to_ids("<eos>")
    turns_only = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(bpe_models.BPE()), bos_token="<bos>",
                                         eos_token="<end_of_turn>")
    turns_only.chat_template = "{% for m in messages %}{{ m.content }}<end_of_turn>{% endfor %}"
    assert doc_sep_id(turns_only) == turns_only.bos_token_id
    # a base model's tokenizer (no chat template) ends text with its eos, whatever it is called
    base = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(bpe_models.BPE()), bos_token="<s>", eos_token="<|eos|>")
    assert doc_sep_id(base) == base.eos_token_id
