"""Rollouts with tool calls (pipeline/tool_rollout.py): which tokens are the policy's, that sampled ids are never
re-tokenised, that tool tokens get no gradient, budgets. The policy is scripted (a stand-in whose `generate` appends
predetermined ids) where the test needs exact turns, and a tiny random Llama where it needs real generation and
real logits. The toolbox and the tool-call parser are small fakes with pipeline/tools.py's interface."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

from pipeline import ppo_rollout, rl, tool_rollout
from pipeline.tokenizer import train_tokenizer
from pipeline.tool_rollout import BUDGET_MESSAGE, generate_with_tools, tool_turn_text

ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers",
                                        "parameters": {"type": "object", "properties": {
                                            "a": {"type": "integer"}, "b": {"type": "integer"}},
                                            "required": ["a", "b"]}}}


@dataclass
class ToolCall:
    name: str | None
    arguments: dict | None
    text: str
    error: str | None = None


@dataclass
class ToolResult:
    name: str | None
    arguments: dict | None
    valid: bool
    ok: bool
    content: str
    error: str | None
    image: str | None
    seconds: float


CALL_RE = re.compile(r"<tool_call>\n(.*?)\n</tool_call>", re.S)


def parse(text: str) -> tuple[str, list[ToolCall]]:
    calls = []
    for m in CALL_RE.finditer(text):
        try:
            obj = json.loads(m.group(1))
            calls.append(ToolCall(obj["name"], obj.get("arguments", {}), m.group(0)))
        except (ValueError, KeyError) as err:
            calls.append(ToolCall(None, None, m.group(0), f"invalid tool call: {err}"))
    return CALL_RE.sub("", text).strip(), calls


class ToolBox:
    """`add` only; anything else is an invalid call (valid=False) with an error."""

    def __init__(self):
        self.executed = []

    def schemas(self):
        return [ADD]

    def call(self, call):
        self.executed.append(call)
        if call.error or call.name != "add":
            why = call.error or f"unknown tool {call.name!r}"
            return ToolResult(call.name, call.arguments, False, False, "", why, None, 0.0)
        return ToolResult("add", call.arguments, True, True, str(call.arguments["a"] + call.arguments["b"]), None,
                          None, 0.0)


def add_call_tokenizer(words: str, rows: int):
    """A byte-level BPE tokenizer (vocabulary 400) trained on `rows` random 12-word sentences of `words`, each
    followed by an `add` call's JSON."""
    rng = random.Random(0)
    words = words.split()
    corpus = [" ".join(rng.choice(words) for _ in range(12)) + ' {"name": "add", "arguments": {"a": 2, "b": 3}}'
              for _ in range(rows)]
    return train_tokenizer(corpus, vocab_size=400)


@pytest.fixture(scope="module")
def tok():
    return add_call_tokenizer("the answer is what plus add two three five seven number call tool result please sum of",
                              300)


def call_text(name="add", **arguments):
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


def ids(tok, text, eos=True, split=False):
    """Token ids of `text` (+ end-of-turn): canonical, or one token per character (as a sampler may well emit:
    decodes to the same text, is not what tokenising that text gives)."""
    pieces = list(text) if split else [text]
    out = [i for p in pieces for i in tok(p, add_special_tokens=False)["input_ids"]]
    return out + ([tok.eos_token_id] if eos else [])


def prompt(tok, question):
    messages = [{"role": "user", "content": question}]
    text = tok.apply_chat_template(messages, tools=[ADD], tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"], messages


def delta_text(*contents, role="tool"):
    return "\n" + "".join(f"<|im_start|>{role}\n<tool_response>\n{c}\n</tool_response><|im_end|>\n"
                          for c in contents) + "<|im_start|>assistant\n"


class Scripted(torch.nn.Module):
    """Stands in for the policy: each row (found by its prompt) 'generates' its next scripted turn, cut at
    max_new_tokens, padded after it like generate() pads finished rows. Records what it was given."""

    def __init__(self, prompts, scripts):
        super().__init__()
        self.prompts, self.scripts = [list(p) for p in prompts], scripts
        self.count = [0] * len(prompts)
        self.seen = []  # (row, unpadded input ids) per row per call

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, use_cache, **kw):
        assert use_cache
        new = []
        for seq, att in zip(input_ids, attention_mask):
            real = seq[att.bool()].tolist()
            assert att[:len(att) - len(real)].sum() == 0  # left padding only
            row = next(i for i, p in enumerate(self.prompts) if real[:len(p)] == p)
            self.seen.append((row, real))
            new.append(self.scripts[row][self.count[row]][:max_new_tokens])
            self.count[row] += 1
        width = max(len(n) for n in new)
        pad = torch.tensor([n + [pad_token_id] * (width - len(n)) for n in new], dtype=torch.long)
        return torch.cat([input_ids, pad], 1)


class ScriptedEngine:
    """The same script behind vllm_engine.Engine's interface: `sample` gets the unpadded contexts and returns each
    row's next turn, unpadded (`generation.backend: vllm`'s path through generate_with_tools)."""

    def __init__(self, scripted: Scripted):
        self.scripted = scripted

    def sample(self, prompt_ids, *, stops, max_new_tokens, do_sample, temperature=1.0, top_p=1.0, n=1):
        out = []
        for real in prompt_ids:
            policy = self.scripted
            row = next(i for i, p in enumerate(policy.prompts) if real[:len(p)] == p)
            policy.seen.append((row, list(real)))
            out.append(policy.scripts[row][policy.count[row]][:max_new_tokens])
            policy.count[row] += 1
        return out


def run(tok, questions, scripts, engine=False, **kw):
    prompts, messages = zip(*[prompt(tok, q) for q in questions])
    policy, box = Scripted(prompts, scripts), ToolBox()
    args = {"max_new_tokens": 200, "max_tool_calls": 3, "max_total_tokens": 1000, "do_sample": True, **kw}
    batch = generate_with_tools(policy, tok, list(prompts), list(messages), box, parse=parse,
                                engine=ScriptedEngine(policy) if engine else None, **args)
    return batch, policy, box, prompts, messages


def unpadded(batch, i):
    return batch.sequences[i][batch.attention_mask[i].bool()].tolist()


# ---------------------------------------------------------------------------------------------- masks and ids


def test_masks_and_ids_of_a_rollout_with_a_tool_call(tok):
    eos = tok.eos_token_id
    call, answer = ids(tok, call_text(a=2, b=3)), ids(tok, "The answer is 5.")
    split_call, split_answer = ids(tok, call_text(a=2, b=3), split=True), ids(tok, "The answer is 5.", split=True)
    direct = ids(tok, "five", split=True)
    scripts = [[call, answer], [direct], [split_call, split_answer]]
    batch, policy, box, prompts, messages = run(tok, ["what is 2 plus 3?", "say five", "add 2 and 3"], scripts)

    delta = tok(delta_text("5"), add_special_tokens=False)["input_ids"]
    assert tool_turn_text(tok, messages[0] + batch.turns[0][:1], batch.turns[0][1:2], [ADD]) == delta_text("5")
    replies = [call + delta + answer, direct, split_call + delta + split_answer]
    R, P = max(map(len, replies)), max(map(len, prompts))
    assert batch.context_length == P and batch.sequences.shape == batch.attention_mask.shape == (3, P + R)
    assert batch.replies.shape == batch.mask.shape == batch.tool_mask.shape == (3, R) and batch.ended.shape == (3,)
    for i, (reply, turns) in enumerate(zip(replies, scripts)):
        pad = [tok.pad_token_id] * (R - len(reply))
        assert batch.replies[i].tolist() == reply + pad  # the sampled ids, exactly
        policy_mask = [1] * len(turns[0]) + ([0] * len(delta) + [1] * len(turns[1]) if len(turns) > 1 else [])
        assert batch.mask[i].tolist() == policy_mask + [0] * len(pad)
        tool_mask = [1 - m for m in policy_mask] + [0] * len(pad)
        assert batch.tool_mask[i].tolist() == tool_mask
        assert batch.attention_mask[i, P:].tolist() == [1] * len(reply) + [0] * len(pad)
        assert unpadded(batch, i) == list(prompts[i]) + reply
    assert batch.mask.dtype == torch.float32 and batch.ended.tolist() == [True, True, True]
    is_eos = batch.replies == eos  # each assistant turn's end-of-turn is an action; the tool turn's is not
    assert ((is_eos & (batch.mask > 0)).sum(1).tolist() == [2, 1, 2]
            and (is_eos & (batch.tool_mask > 0)).sum(1).tolist() == [1, 0, 1])

    # the second turn was generated from the first turn's ids as sampled, then the tool turn: nothing re-tokenised
    second = [seen for row, seen in policy.seen if row == 2][1]
    assert second == list(prompts[2]) + split_call + delta
    assert split_call != ids(tok, call_text(a=2, b=3))  # (it would have changed on re-tokenising)

    # the sequence is the conversation the template renders from the recorded turns; canonical turns: same ids
    for i in range(3):
        text = tok.apply_chat_template(messages[i] + batch.turns[i], tools=[ADD], tokenize=False)
        assert tok.decode(unpadded(batch, i)) + "\n" == text  # the template's "\n" after the last end-of-turn
    canonical = tok.apply_chat_template(messages[0] + batch.turns[0], tools=[ADD], tokenize=False)
    assert unpadded(batch, 0) + tok("\n", add_special_tokens=False)["input_ids"] == \
        tok(canonical, add_special_tokens=False)["input_ids"]
    assert tok(tok.decode(unpadded(batch, 2)), add_special_tokens=False)["input_ids"] != unpadded(batch, 2)

    assert batch.turns[0] == [
        {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
            "name": "add", "arguments": {"a": 2, "b": 3}}}]},
        {"role": "tool", "name": "add", "content": "5"},
        {"role": "assistant", "content": "The answer is 5."}]
    assert [[r.content for r in c] for c in batch.calls] == [["5"], [], ["5"]] and len(box.executed) == 2
    assert batch.final == ["The answer is 5.", "five", "The answer is 5."]
    assert "<tool_response>\n5\n</tool_response>" in batch.texts[0] and batch.texts[0].endswith("The answer is 5.")
    assert batch.texts[1] == "five"


def test_an_engine_gives_the_rollouts_of_generate(tok):
    """generation.backend: vllm: the engine returns each turn unpadded; the rollout is the one generate() gives."""
    call, answer = ids(tok, call_text(a=2, b=3)), ids(tok, "The answer is 5.")
    two_calls = ids(tok, call_text(a=1, b=2) + "\n" + call_text(a=3, b=4))
    cases = [(["what is 2 plus 3?", "say five", "add 2 and 3"],
              [[call, answer], [ids(tok, "five", split=True)], [ids(tok, call_text(a=2, b=3), split=True), answer]],
              {}),
             (["one", "two"], [[call, call, answer], [two_calls, answer]], {"max_tool_calls": 1}),
             (["q"], [[call, answer]], {"max_total_tokens": len(call) + 30}),
             (["q"], [[call, answer]], {"max_new_tokens": len(call) - 1})]
    for questions, scripts, kw in cases:
        plain, policy, _, _, _ = run(tok, questions, scripts, **kw)
        routed, engine_policy, _, _, _ = run(tok, questions, scripts, engine=True, **kw)
        assert engine_policy.seen == policy.seen  # the same contexts, turn by turn
        for name in ("sequences", "attention_mask", "replies", "mask", "tool_mask", "ended"):
            assert torch.equal(getattr(routed, name), getattr(plain, name)), (questions, name)
        assert (routed.context_length, routed.texts, routed.turns, routed.final) == \
            (plain.context_length, plain.texts, plain.turns, plain.final)
        assert [[r.content for r in c] for c in routed.calls] == [[r.content for r in c] for c in plain.calls]


def test_the_tool_turn_comes_from_the_template(tok):
    """The delta is what the template renders, not a hard-coded ChatML turn: a template that puts tool results in a
    `user` turn (as Qwen2.5's does) gets a user turn; one that is not prefix-preserving falls back and warns once."""
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]
    results = [{"role": "tool", "name": "add", "content": "5"}, {"role": "tool", "name": "add", "content": "6"}]
    assert tool_turn_text(tok, conversation, results, [ADD]) == delta_text("5", "6")
    user_style = tok.chat_template.replace("'<|im_start|>tool\\n<tool_response>\\n'",
                                           "'<|im_start|>user\\n<tool_response>\\n'")
    assert user_style != tok.chat_template
    saved = tok.chat_template
    try:
        tok.chat_template = user_style
        assert tool_turn_text(tok, conversation, results[:1], [ADD]) == delta_text("5", role="user")
        warnings = []
        tool_rollout._warned.clear()
        original = tool_rollout.log.warning
        tool_rollout.log.warning = lambda msg, *a: warnings.append(msg)
        try:  # a template that marks the last message: the earlier text changes when tool messages follow
            tok.chat_template = saved + "{%- if messages[-1].role == 'assistant' -%}LAST{%- endif -%}"
            assert tool_turn_text(tok, conversation, results[:1], [ADD]) == delta_text("5")
            assert tool_turn_text(tok, conversation, results[:1], [ADD]) == delta_text("5")
        finally:
            tool_rollout.log.warning = original
        assert len(warnings) == 1 and "prefix" in warnings[0]
    finally:
        tok.chat_template = saved


# ---------------------------------------------------------------------------------------------- budgets


def test_tool_call_budget_stops_the_row(tok):
    call, two_calls = ids(tok, call_text(a=1, b=1)), ids(tok, call_text(a=1, b=2) + "\n" + call_text(a=3, b=4))
    answer = ids(tok, "done")
    scripts = [[call, call, answer], [two_calls, answer], [call, answer]]
    batch, policy, box, _, _ = run(tok, ["one", "two", "three"], scripts, max_tool_calls=1)
    assert batch.ended.tolist() == [False, False, True]
    assert [r.content for r in batch.calls[0]] == ["2", BUDGET_MESSAGE] and batch.calls[0][1].valid is False
    assert [r.content for r in batch.calls[1]] == ["3", BUDGET_MESSAGE]
    assert len(box.executed) == 3  # the calls past the budget never ran
    assert batch.turns[0][-1] == {"role": "tool", "name": "add", "content": BUDGET_MESSAGE}
    assert [row for row, _ in policy.seen].count(0) == 2 and [row for row, _ in policy.seen].count(1) == 1
    delta = tok(delta_text("2"), add_special_tokens=False)["input_ids"]
    n = len(call + delta + call)  # the row ends on its last sampled token: no tool tokens after it
    assert batch.replies[0, :n].tolist() == call + delta + call and batch.mask[0, n - 1] == 1
    assert batch.attention_mask[0, batch.context_length + n:].sum() == 0 and batch.tool_mask[0, n:].sum() == 0
    assert batch.mask[1].sum() == len(two_calls) and batch.tool_mask[1].sum() == 0


def test_token_budgets_stop_rows(tok):
    call, answer = ids(tok, call_text(a=2, b=3)), ids(tok, "The answer is 5.")
    delta = tok(delta_text("5"), add_special_tokens=False)["input_ids"]
    # the tool turn would leave no room for a policy token: the row stops after its call
    batch, policy, _, _, _ = run(tok, ["q"], [[call, answer]], max_total_tokens=len(call) + len(delta))
    assert batch.replies.shape[1] == len(call) and batch.ended.tolist() == [False] and len(policy.seen) == 1
    assert batch.calls[0][0].content == "5" and batch.turns[0][-1]["role"] == "tool"
    # the second turn is cut at the reply's budget
    budget = len(call) + len(delta) + 3
    batch, _, _, _, _ = run(tok, ["q"], [[call, answer]], max_total_tokens=budget)
    assert batch.replies[0].tolist() == call + delta + answer[:3] and batch.ended.tolist() == [False]
    assert batch.mask[0].sum() == len(call) + 3
    # a turn that runs out of max_new_tokens stops the row, even if it has started a call
    batch, _, box, _, _ = run(tok, ["q"], [[call, answer]], max_new_tokens=len(call) - 1)
    assert batch.ended.tolist() == [False] and batch.calls == [[]] and not box.executed
    assert batch.mask[0].tolist() == [1.0] * (len(call) - 1) and batch.final[0].startswith("<tool_call>")


def test_an_invalid_call_gets_an_error_and_the_loop_continues(tok):
    bad = ids(tok, call_text("mul", a=2, b=3))
    broken = ids(tok, '<tool_call>\n{"name": "add", "arguments": \n</tool_call>')
    answer = ids(tok, "no tool then")
    batch, _, box, _, _ = run(tok, ["a", "b"], [[bad, answer], [broken, answer]])
    assert batch.ended.tolist() == [True, True] and len(box.executed) == 2
    assert [r.valid for c in batch.calls for r in c] == [False, False]
    assert batch.turns[0][1] == {"role": "tool", "name": "mul", "content": "error: unknown tool 'mul'"}
    assert batch.turns[1][1]["content"].startswith("error: invalid tool call")
    assert batch.final == ["no tool then", "no tool then"]
    assert "error: unknown tool" in batch.texts[0]


# ---------------------------------------------------------------------------------------------- a real model


class ForceEndOfTurn(LogitsProcessor):
    """Forces end-of-turn after `k` new tokens (so that a random model's turns end); the others are greedy."""

    def __init__(self, start, k, eos):
        self.start, self.k, self.eos = start, k, eos

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.start >= self.k:
            scores = torch.full_like(scores, float("-inf"))
            scores[:, self.eos] = 0.0
        return scores


class Forced(torch.nn.Module):
    def __init__(self, model, k, eos):
        super().__init__()
        self.model, self.k, self.eos = model, k, eos

    def generate(self, **kw):
        force = ForceEndOfTurn(kw["input_ids"].shape[1], self.k, self.eos)
        return self.model.generate(**kw, logits_processor=LogitsProcessorList([force]))


@pytest.fixture(scope="module")
def real_batch(tok):
    """A tiny random Llama, greedy, every turn calls `add` (the parser says so); max_tool_calls=1 stops each row
    after its second turn: assistant, tool, assistant, with prompts of different lengths (re-padded per turn)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(config).eval()
    prompts, messages = zip(*[prompt(tok, q) for q in ["what is two plus three", "add", "the sum of five and seven"]])

    def always_call(text):
        return text, [ToolCall("add", {"a": 2, "b": 3}, text)]

    batch = generate_with_tools(Forced(model, 5, tok.eos_token_id), tok, list(prompts), list(messages), ToolBox(),
                                max_new_tokens=20, max_tool_calls=1, max_total_tokens=500, do_sample=False,
                                parse=always_call)
    return model, batch


def test_real_generation_across_turns_matches_one_forward_pass(tok, real_batch):
    model, batch = real_batch
    assert (batch.mask.sum(1) == 12).all() and (batch.tool_mask.sum(1) > 0).all()  # two turns of 5 + eos each
    assert batch.ended.tolist() == [False] * 3 and [len(c) for c in batch.calls] == [2, 2, 2]
    with torch.no_grad():
        logits = ppo_rollout.reply_logits(model, batch.sequences, batch.attention_mask, batch.context_length, 1.0)
    chosen = logits.gather(2, batch.replies.unsqueeze(-1)).squeeze(-1)
    greedy = (batch.mask > 0) & (batch.replies != tok.eos_token_id)  # end-of-turn was forced
    # each greedy token is the argmax of the one forward pass over the final sequences the update will run
    assert ((chosen >= logits.amax(-1) - 1e-4) | ~greedy).all()


def test_tool_positions_get_no_gradient(tok, real_batch):
    model, batch = real_batch
    seq, att, ctx, mask = batch.sequences, batch.attention_mask, batch.context_length, batch.mask
    action, tool = mask > 0, batch.tool_mask > 0
    gen = torch.Generator().manual_seed(0)

    def reply_logits():
        logits = ppo_rollout.reply_logits(model, seq, att, ctx, 1.0)
        logits.retain_grad()
        return logits

    # the policy loss
    logits = reply_logits()
    logprobs = rl.logprobs_of(logits, batch.replies)
    old = logprobs.detach()  # ratio 1: nothing clipped, so every action has a gradient
    advantages = torch.randn(logprobs.shape, generator=gen)
    loss, _, _ = rl.policy_loss(logprobs, old, advantages, mask, cliprange=0.2)
    loss.backward()
    per_position = logits.grad.abs().sum(-1)
    assert (per_position[~action] == 0).all() and (per_position[action] > 0).all()

    # the value loss, values from a head on the model's hidden states
    head = torch.nn.Linear(32, 1)
    hidden = model.model(input_ids=seq, attention_mask=att, position_ids=ppo_rollout.positions(att)).last_hidden_state
    values = head(hidden).squeeze(-1)[:, ctx - 1:-1]
    values.retain_grad()
    returns = torch.randn(values.shape, generator=gen)
    loss, _ = rl.value_loss(values, values.detach() + 0.1, returns, mask, cliprange_value=0.2)
    loss.backward()
    assert (values.grad[~action] == 0).all() and (values.grad[action] != 0).all()

    # the KL penalty enters the rewards only at actions: the rewards' gradient, and what changing the reference
    # at tool positions does to the advantages
    logits = reply_logits()
    logprobs = rl.logprobs_of(logits, batch.replies)
    ref = logprobs.detach() + torch.randn(logprobs.shape, generator=gen)
    scores = torch.randn(len(seq), generator=gen)
    kl = rl.kl_penalty(logprobs, ref, "k1") * mask
    rewards = rl.penalised_rewards(scores, kl, mask, kl_coef=0.5)
    assert (rewards[tool] == 0).all()
    rewards.sum().backward()
    per_position = logits.grad.abs().sum(-1)
    assert (per_position[~action] == 0).all() and (per_position[action] > 0).all()
    values = torch.randn(mask.shape, generator=gen)
    before = rl.gae(rewards.detach(), values, mask, 1.0, 0.95)
    moved = ref + 10.0 * tool
    rewards2 = rl.penalised_rewards(scores, rl.kl_penalty(logprobs.detach(), moved, "k1") * mask, mask, 0.5)
    after = rl.gae(rewards2, values + 10.0 * tool, mask, 1.0, 0.95)  # tool positions' values play no part either
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_the_calls_of_one_round_run_as_one_batch(tok):
    """All rows' calls of a round go to toolbox.call_many together (the image tool draws them in one batch), in
    row order, and each row gets its own results back."""
    class Batching(ToolBox):
        def __init__(self):
            super().__init__()
            self.batches = []

        def call_many(self, calls):
            self.batches.append([c.arguments for c in calls])
            return [self.call(c) for c in calls]

    scripts = [[ids(tok, call_text(a=1, b=1)), ids(tok, "done")],
               [ids(tok, call_text(a=2, b=2) + "\n" + call_text(a=3, b=3)), ids(tok, "done")],
               [ids(tok, "no call")]]
    prompts, messages = zip(*[prompt(tok, q) for q in ["one", "two", "three"]])
    box = Batching()
    batch = generate_with_tools(Scripted(prompts, scripts), tok, list(prompts), list(messages), box, parse=parse,
                                max_new_tokens=200, max_tool_calls=3, max_total_tokens=1000)
    assert box.batches == [[{"a": 1, "b": 1}, {"a": 2, "b": 2}, {"a": 3, "b": 3}]]
    assert [[r.content for r in c] for c in batch.calls] == [["2"], ["4", "6"], []]
    assert batch.ended.tolist() == [True, True, True]
