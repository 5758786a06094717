"""Tool calls in the policy's own format (pipeline/tool_formats.py): a hub chat template's calls parsed by its
response schema (TRL's registry, or one saved in tokenizer_config.json) into the ToolCalls our toolbox validates;
a malformed call is an error ToolCall; our own `<tool_call>` format reads as it always did. Tokenizers are ours
(trained offline) with the hub templates TRL ships put on them."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer
from trl import chat_template_utils as ctu

from pipeline.tokenizer import RESPONSE_TEMPLATE
from pipeline.tool_formats import renders_tools, schema_calls, to_call, tool_parser_problem, turn_reader
from pipeline.tool_rollout import generate_with_tools
from pipeline.tools import Tool, ToolBox, parse_tool_calls
from test_tool_rollout import add_call_tokenizer

ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers",
                                        "parameters": {"type": "object", "properties": {
                                            "a": {"type": "integer"}, "b": {"type": "integer"}},
                                            "required": ["a", "b"]}}}
LLAMA_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|python_tag|>",
                "<|eom_id|>"]
# A Mistral-like template with its schema, as a hub model would save it: `[TOOL_CALLS]` then a JSON list of calls.
MISTRAL_TEMPLATE = (
    "{%- if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' %}[INST]{{ m.content }}[/INST]"
    "{%- elif m.role == 'assistant' %}{% if m.tool_calls %}[TOOL_CALLS]"
    "{{ m.tool_calls | map(attribute='function') | list | tojson }}{% else %}{{ m.content }}{% endif %}<|im_end|>"
    "{%- elif m.role == 'tool' %}[TOOL_RESULTS]{{ m.content }}[/TOOL_RESULTS]{% endif %}"
    "{%- endfor %}")
MISTRAL_SCHEMA = {
    "defaults": {"role": "assistant"},
    "start_anchor_pattern": r"\[/INST\]|\[/TOOL_RESULTS\]",
    "fields": {
        "tool_calls": {"open": "[TOOL_CALLS]", "close_pattern": r"<\|im_end\|>\s*", "content": "json",
                       "transform_each": True,
                       "transform": {"type": "function", "function": {"name": "{name}", "arguments": "{arguments}"}}},
        "content": {"close_pattern": r"<\|im_end\|>\s*", "content": "text"},
    },
}


def base_tokenizer():
    return add_call_tokenizer("the answer is what plus add two three five seven number", 200)


@pytest.fixture(scope="module")
def ours():
    return base_tokenizer()


def hub_like(template: str, extra=(), eos=None):
    """Our tokenizer with a hub chat template and no response schema (as a hub model without one loads)."""
    tok = base_tokenizer()
    if extra:
        tok.add_special_tokens({"additional_special_tokens": list(extra)})
    tok.chat_template, tok.response_template = template, None
    if eos:
        tok.eos_token = eos
    return tok


@pytest.fixture(scope="module")
def llama():
    tok = hub_like(ctu.llama3_1_chat_template, LLAMA_TOKENS, eos="<|eot_id|>")
    tok.bos_token = "<|begin_of_text|>"
    return tok


@pytest.fixture(scope="module")
def qwen3():
    return hub_like(ctu.qwen3_chat_template)


def add_box():
    return ToolBox([Tool("add", ADD, lambda args: str(args["a"] + args["b"]))])


def prompt_ids(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "2 plus 3?"}], tools=[ADD], tokenize=False,
                                   add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def read_turn(tok, text: str):
    turn = tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return turn_reader(tok)(turn, prompt_ids(tok), [ADD])


@pytest.mark.parametrize("marker", ["", "<|python_tag|>"])
def test_llama_calls_parse_and_validate(llama, marker):
    content, calls = read_turn(llama, marker + '{"name": "add", "parameters": {"a": 2, "b": 3}}')
    assert content == "" and [(c.name, c.arguments, c.error) for c in calls] == [("add", {"a": 2, "b": 3}, None)]
    assert add_box().call(calls[0]).content == "5"
    assert llama.response_template is not None  # attached from TRL's registry
    assert read_turn(llama, "The answer is 5.") == ("The answer is 5.", [])


def test_llama_malformed_call_is_an_error_call(llama):
    _, calls = read_turn(llama, '{"name": "add", "parameters": {"a": 2, "b": }}')
    assert len(calls) == 1 and calls[0].name == "add" and calls[0].arguments is None
    assert calls[0].error == "bad JSON (Expecting value at char 14)"
    result = add_box().call(calls[0])
    assert not result.valid and result.content == "invalid: bad JSON (Expecting value at char 14)"
    _, calls = read_turn(llama, '{"name": "add", "parameters": {"a": 2, "b": "x"}}')  # parses; the schema refuses
    assert calls[0].error is None and add_box().call(calls[0]).content.startswith("invalid: b: 'x' is not of type")


def test_qwen3_calls_after_thinking(qwen3):
    text = '<think>\nadd them\n</think>\n\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    content, calls = read_turn(qwen3, text)
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("add", {"a": 2, "b": 3})]
    assert read_turn(qwen3, "<think>\nok\n</think>\n\nfive") == ("five", [])
    bad = ('<tool_call>\n{"name": "add", "arguments": {"a": 2,}}\n</tool_call>\n'
           '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 1}}\n</tool_call>')
    _, calls = read_turn(qwen3, bad)  # one bad call does not lose the good one
    assert calls[0].error.startswith("bad JSON (") and calls[1].arguments == {"a": 1, "b": 1}


def test_saved_response_template_is_used(tmp_path):
    tok = hub_like(MISTRAL_TEMPLATE)
    tok.response_template = MISTRAL_SCHEMA
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = '[TOOL_CALLS][{"name": "add", "arguments": {"a": 2, "b": 3}}, {"name": "add", "arguments": {"a": 1}}]'
    _, calls = read_turn(loaded, text)
    box = add_box()
    assert [(c.name, c.arguments) for c in calls] == [("add", {"a": 2, "b": 3}), ("add", {"a": 1})]
    assert box.call(calls[0]).content == "5" and box.call(calls[1]).content == "invalid: 'b' is a required property"
    assert tool_parser_problem(loaded) is None


def test_our_format_reads_as_before(ours):
    """Our template keeps parse_tool_calls (its errors included); on well-formed calls the schema path agrees."""
    texts = ["The answer is 5.",
             'Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>',
             '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>\n'
             '<tool_call>\n{"name": "draw", "arguments": {"prompt": "a 7", "n": [1, 2]}}\n</tool_call>',
             '<tool_call>\n{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}\n</tool_call>',
             '<tool_call>{"name": "add", "parameters": {}}</tool_call>',
             '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": }}\n</tool_call>',
             '<tool_call>\n{"name": "add", "arguments": {"a": 2}}']
    prefix = ours.decode(prompt_ids(ours))
    for text in texts:
        assert read_turn(ours, text) == parse_tool_calls(text)
        expect = parse_tool_calls(text)
        if not any(c.error for c in expect[1]):
            got = schema_calls(ours, RESPONSE_TEMPLATE, text + ours.eos_token, prefix)
            assert [(c.name, c.arguments) for c in got[1]] == [(c.name, c.arguments) for c in expect[1]], text
            assert got[0] == expect[0]


class Scripted(torch.nn.Module):
    """Generates its scripted turns in order (one row), whatever the input."""

    def __init__(self, turns):
        super().__init__()
        self.turns = list(turns)

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        return torch.cat([input_ids, torch.tensor([self.turns.pop(0)[:max_new_tokens]])], 1)


def test_rollout_runs_a_llama_call(llama):
    prompt = prompt_ids(llama)
    call = llama('{"name": "add", "parameters": {"a": 2, "b": 3}}', add_special_tokens=False)["input_ids"]
    answer = llama("five", add_special_tokens=False)["input_ids"]
    eos = llama.eos_token_id
    batch = generate_with_tools(Scripted([call + [eos], answer + [eos]]), llama, [prompt],
                                [[{"role": "user", "content": "2 plus 3?"}]], add_box(), max_new_tokens=64,
                                max_tool_calls=3, max_total_tokens=400, do_sample=False)
    assert [(r.name, r.valid, r.content) for r in batch.calls[0]] == [("add", True, "5")]
    assert batch.ended[0] and batch.final[0] == "five"


def test_template_without_a_schema_is_a_problem(ours, llama):
    tok = hub_like(MISTRAL_TEMPLATE)  # renders tools; no schema saved; TRL does not know it
    problem = tool_parser_problem(tok)
    assert problem and "response_template" in problem and "\n" not in problem
    assert tool_parser_problem(ours) is None and tool_parser_problem(llama) is None
    assert tool_parser_problem(hub_like("{% for m in messages %}{{ m.content }}{% endfor %}")) is None  # no tools


USERTOOLS = '''
def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first
        b: the second
    """
    return a + b
'''


def test_stages_and_check_stop_on_a_template_they_cannot_parse(tmp_path, monkeypatch):
    """A hub model whose template renders tools, with no schema: eval with tool prompts and --check say so in one
    line (exit 2) before anything is written, instead of reading every call as a final answer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import run_cli, tiny_recipe, write_jsonl
    from pipeline import evaluate
    from pipeline.cli import PipelineError

    tok = hub_like(MISTRAL_TEMPLATE)
    user = tmp_path / "user"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(user)
    tok.save_pretrained(user)
    (tmp_path / "usertools.py").write_text(USERTOOLS)
    prompts = write_jsonl(tmp_path / "tool_prompts.jsonl", [{"prompt": "Add 2 and 3.", "tools": [ADD]}])
    recipe = tiny_recipe(tmp_path, tokenizer={"chat_template": "own"},
                         tools={"allow_code": True, "tools": [{"name": "add", "backend": "python",
                                                               "function": "usertools:add"}]},
                         eval={"checkpoints": [str(user)], "tool_prompts": prompts, "max_prompts": 2})
    check = run_cli(["pipeline/run.py", recipe, "--check", "--only", "eval"], cwd=tmp_path,
                    env={"OMP_NUM_THREADS": "1"})
    errors = [line.strip() for line in check.stdout.splitlines() if "error: " in line]
    assert check.returncode == 2 and len(errors) == 1, check.stdout[-2000:] + check.stderr[-2000:]
    assert "renders tools but no response schema" in errors[0] and str(user) in errors[0]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match=r"tool_prompts\.jsonl: \S*user: the tokenizer of .*`response_template`") \
            as err:
        evaluate.main([str(recipe)])
    assert "\n" not in str(err.value) and not (tmp_path / "runs").exists()


def test_dpo_round_pairs_keep_a_llama_call_structured(llama):
    """dpo rounds 2+ pair a sampled call as a structured tool call: in Llama's format it was kept as text."""
    from pipeline.dpo_rounds import pair_reply
    from pipeline.generation import Reply

    ids = llama('{"name": "add", "parameters": {"a": 2, "b": 3}}', add_special_tokens=False)["input_ids"]
    row = {"prompt": [{"role": "user", "content": "2 plus 3?"}], "tools": [ADD]}
    reply = Reply(llama.decode(ids, skip_special_tokens=True), True, len(ids), ids)
    assert pair_reply(row, reply, llama) == [{"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}]}]


# A reply per format whose good calls need typing by the tool's schema: XML formats write every argument as text, and
# a JSON one may quote a number. TRL's registry schemas, and the saved Mistral-like one (a list of calls in one region).
TYPED_REPLIES = {
    "qwen3": (ctu.qwen3_template, '<tool_call>\n{"name": "add", "arguments": {"a": "25", "b": 3}}\n</tool_call>\n'
                                  '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": "2"}}\n</tool_call>'
                                  '<|im_end|>'),
    "llama3": (ctu.llama3_template, '{"name": "add", "parameters": {"a": "25", "b": 3}}<|eot_id|>'),
    "qwen3_5": (ctu.qwen3_5_template, "<tool_call>\n<function=add>\n<parameter=a>\n25\n</parameter>\n<parameter=b>\n3\n"
                                      "</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=add>\n"
                                      "<parameter=a>\n1\n</parameter>\n<parameter=b>\n2\n</parameter>\n</function>\n"
                                      "</tool_call><|im_end|>"),
    "nemotron_3": (ctu.nemotron_3_template, "<tool_call>\n<function=add>\n<parameter=a>\n25\n</parameter>\n"
                                            "<parameter=b>\n3\n</parameter>\n</function>\n</tool_call>\n<|im_end|>"),
    "glm4moe": (ctu.glm4moe_template, "<tool_call>add\n<arg_key>a</arg_key>\n<arg_value>25</arg_value>\n<arg_key>b"
                                      "</arg_key>\n<arg_value>3</arg_value>\n</tool_call><tool_call>add\n<arg_key>a"
                                      "</arg_key>\n<arg_value>1</arg_value>\n<arg_key>b</arg_key>\n<arg_value>2"
                                      "</arg_value>\n</tool_call>"),
    "gptoss": (ctu.gptoss_template,
               ' to=functions.add<|channel|>commentary json<|message|>{"a": "25", "b": 3}<|call|>'),
    "gemma4": (ctu.gemma4_template, '<|tool_call>call:add{a:<|"|>25<|"|>,b:3}<tool_call|>'
                                    '<|tool_call>call:add{a:1,b:<|"|>2<|"|>}<tool_call|>'),
    "lfm2_5": (ctu.lfm2_2_5_template, "<|tool_call_start|>[add(a='25', b=3), add(a=1, b='2')]<|tool_call_end|>"
                                      "<|im_end|>"),
    "mistral": (MISTRAL_SCHEMA, '[TOOL_CALLS][{"name": "add", "arguments": {"a": "25", "b": 3}}, '
                                '{"name": "add", "arguments": {"a": 1, "b": "2"}}]<|im_end|>'),
}
MIX = {"type": "function", "function": {"name": "mix", "description": "every JSON Schema type", "parameters": {
    "type": "object", "properties": {
        "n": {"type": "integer"}, "whole": {"type": "integer"}, "x": {"type": "number"}, "flag": {"type": "boolean"},
        "none": {"type": "null"}, "tags": {"type": "array"}, "opts": {"type": "object"}, "s": {"type": "string"},
        "either": {"type": ["integer", "string"]}, "maybe": {"anyOf": [{"type": "number"}, {"type": "null"}]},
        "word": {"type": "integer"}}}}}
MIX_REPLY = "<tool_call>\n<function=mix>\n" + "".join(
    f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in [
        ("n", "7"), ("whole", "3.0"), ("x", "2.5"), ("flag", "true"), ("none", "null"), ("tags", '[1, "b"]'),
        ("opts", '{"k": 1}'), ("s", "42"), ("either", "9"), ("maybe", "null"), ("word", "seven")]) + \
    "</function>\n</tool_call><|im_end|>"


@pytest.mark.parametrize("name", sorted(TYPED_REPLIES) + ["qwen3_5 every type"])
def test_arguments_are_typed_as_transformers_types_a_whole_reply(ours, name, monkeypatch):
    """Each call is typed by itself (argument_caster, transformers' own cast) to what transformers' public
    parse_response(tools=...) gives for the whole reply, on every format and every JSON Schema type."""
    from transformers.utils.chat_parsing import ResponseParser, parse_response

    schema, text = TYPED_REPLIES.get(name, (ctu.qwen3_5_template, MIX_REPLY))
    tools = [ADD, MIX]
    whole = [to_call(item, "") for item in parse_response(text, schema, prefix="", tools=tools)["tool_calls"]]
    _, calls = schema_calls(ours, schema, text, "", tools)
    assert [(c.name, c.arguments, c.error) for c in calls] == [(c.name, c.arguments, c.error) for c in whole]
    if name == "qwen3_5 every type":
        assert calls[0].arguments == {"n": 7, "whole": 3, "x": 2.5, "flag": True, "none": None, "tags": [1, "b"],
                                      "opts": {"k": 1}, "s": "42", "either": 9, "maybe": None, "word": "seven"}
    else:
        assert calls[0].arguments == {"a": 25, "b": 3}  # typed, not "25"
        assert schema_calls(ours, schema, text)[1][0].arguments["a"] == "25"  # no tools: as the format wrote it
    monkeypatch.delattr(ResponseParser, "_coerce_tool_calls")  # a transformers without the cast stops, naming it
    with pytest.raises(RuntimeError, match="no ResponseParser._coerce_tool_calls"):
        schema_calls(ours, schema, text, "", tools)


MALFORMED = {  # (a call that does not parse, a good call whose "25" its tool's schema types)
    "qwen3": (ctu.qwen3_template, '<tool_call>\n{"name": "add", "arguments": {"a": 2,}}\n</tool_call>\n',
              '<tool_call>\n{"name": "add", "arguments": {"a": "25", "b": 3}}\n</tool_call>\n', "<|im_end|>"),
    "gptoss": (ctu.gptoss_template, ' to=functions.add<|channel|>commentary json<|message|>{"a": 2,}<|call|>',
               ' to=functions.add<|channel|>commentary json<|message|>{"a": "25", "b": 3}<|call|>', ""),
    "gemma4": (ctu.gemma4_template, "<|tool_call>call:add{a:2,,}<tool_call|>",
               '<|tool_call>call:add{a:<|"|>25<|"|>,b:3}<tool_call|>', ""),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_a_malformed_call_leaves_the_good_calls_typed(ours, name):
    """A good call's arguments are typed the same whether or not another call in the reply is malformed (transformers
    fails the whole typed parse on one bad call: the good ones were left as text and failed their schema).
    TRL's XML formats (Qwen3.5, GLM, Nemotron) cannot hold a malformed call: their values are text."""
    schema, bad, good, end = MALFORMED[name]
    alone = schema_calls(ours, schema, good + end, "", [ADD])[1]
    assert [(c.name, c.arguments, c.error) for c in alone] == [("add", {"a": 25, "b": 3}, None)]
    for text in (bad + good + end, good + bad + end):
        _, calls = schema_calls(ours, schema, text, "", [ADD])
        assert [c.error is None for c in calls] == ([False, True] if text.startswith(bad) else [True, False])
        good_call = next(c for c in calls if c.error is None)
        assert good_call.arguments == {"a": 25, "b": 3} and add_box().call(good_call).content == "28"


def test_a_turn_is_parsed_once(qwen3, monkeypatch):
    """One parse_response per tool turn (the text-only schema); the calls are parsed and typed from its regions."""
    parses = []
    parse = qwen3.parse_response
    monkeypatch.setattr(qwen3, "parse_response", lambda *a, **kw: parses.append(1) or parse(*a, **kw))
    text = ('<tool_call>\n{"name": "add", "arguments": {"a": "25", "b": 3}}\n</tool_call>\n'
            '<tool_call>\n{"name": "add", "arguments": {"a": 1,}}\n</tool_call>')
    _, calls = read_turn(qwen3, text)
    assert len(parses) == 1 and calls[0].arguments == {"a": 25, "b": 3} and calls[1].error.startswith("bad JSON")


def test_renders_tools_catches_only_a_template_failing_on_tools(monkeypatch):
    """A template that fails on tools (raise_exception, a Python error on the tool dicts) renders none; any other
    fault (a broken tokenizer) surfaces instead of reading as "renders no tools"."""
    chat = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert not renders_tools(hub_like("{% if tools %}{{ raise_exception('no tools') }}{% endif %}" + chat))
    assert not renders_tools(hub_like("{% if tools %}{{ tools + 1 }}{% endif %}" + chat))
    assert renders_tools(hub_like(MISTRAL_TEMPLATE))
    tok = hub_like(MISTRAL_TEMPLATE)

    def broken(*args, **kwargs):
        raise RuntimeError("broken tokenizer")

    monkeypatch.setattr(tok, "apply_chat_template", broken)
    with pytest.raises(RuntimeError, match="broken tokenizer"):
        renders_tools(tok)


def test_a_call_nested_past_pythons_stack_is_an_error_call(llama, qwen3):
    """json.loads raises RecursionError on ~1,000 nested brackets (a sampled reply can hold them): the call is an
    error call for the policy to read, as bad JSON is, never an exception out of the rollout."""
    deep = "[" * 5000 + "]" * 5000
    for tok, text in ((qwen3, f'<tool_call>\n{{"name": "add", "arguments": {deep}}}\n</tool_call>'),
                      (qwen3, f"<tool_call>\n{deep}\n</tool_call>"),
                      (llama, f'{{"name": "add", "parameters": {deep}}}')):
        _, calls = read_turn(tok, text)
        assert len(calls) == 1 and calls[0].error == "bad JSON (nested too deeply)", (tok.name_or_path, calls)
        assert not add_box().call(calls[0]).valid
