"""Tool calls in the policy's own format: the tokenizer's response schema (transformers' `response_template`, read
by `tokenizer.parse_response`) says how its chat template writes them (Llama 3.1 JSON, Qwen3 with <think>, gpt-oss,
Qwen3.5/GLM XML, Gemma 4, ...).

    read = turn_reader(tokenizer)  # None: the template renders tools but nothing can parse its calls
    content, calls = read(turn_ids, context_ids, schemas)

Where the schema comes from: the one the tokenizer carries (ours, or a hub model's `response_template` saved in its
tokenizer_config.json), else TRL's registry (trl.chat_template_utils.add_response_schema) when the chat template is
one it knows. Our own format (the pipeline's ChatML template, Hermes `<tool_call>` JSON) keeps
pipeline.tool_calls.parse_tool_calls: its error messages (no </tool_call>, bad JSON at char N) are what the small
recipe's policy has always read, and its results on our format are the schema's (tests/test_tool_formats.py).
"""

from __future__ import annotations

import copy
import json
import re

from jinja2 import TemplateError

from pipeline.tool_calls import ToolCall, call_from_object, json_error, parse_tool_calls

CALLS = "tool_calls"  # the response schema's field for calls, as transformers and TRL name it


def response_schema(tokenizer) -> dict | None:
    """The tokenizer's response schema: its own, else TRL's for a chat template TRL knows (attached to it), else
    None."""
    schema = getattr(tokenizer, "response_template", None)
    if schema is None and getattr(tokenizer, "chat_template", None):
        from trl.chat_template_utils import add_response_schema

        try:
            add_response_schema(tokenizer)
        except ValueError:  # a template TRL does not know
            return None
        schema = getattr(tokenizer, "response_template", None)
    return schema


def own_format(tokenizer) -> bool:
    """The pipeline's chat format: parsed by parse_tool_calls (a checkpoint saved before tokenizers carried the
    schema has our template alone)."""
    from pipeline.tokenizer import CHAT_TEMPLATE, RESPONSE_TEMPLATE

    schema = getattr(tokenizer, "response_template", None)
    return schema == RESPONSE_TEMPLATE or (schema is None and tokenizer.chat_template == CHAT_TEMPLATE)


def turn_reader(tokenizer):
    """read(turn_ids, context_ids, schemas) -> (content, [ToolCall]) for one assistant turn ending with its end-of-turn
    token (`context_ids`: the ids before it), or None when no schema is to be had (see `tool_parser_problem`)."""
    if own_format(tokenizer):
        return text_reader(tokenizer, parse_tool_calls)
    schema = response_schema(tokenizer)
    if schema is None or CALLS not in schema.get("fields", {}):
        return None

    # the schema's delimiters include special tokens (<|eot_id|>, <|im_end|>, <|call|>): decoded with them
    return lambda turn, context, schemas: schema_calls(tokenizer, schema, tokenizer.decode(turn),
                                                       tokenizer.decode(context), schemas)


def call_reader(tokenizer, parse=None):
    """`turn_reader`, or `parse(text)` on the turn's text when given, or parse_tool_calls when there is no schema
    (a template that renders no tools: the stages refuse one that does, see `tool_parser_problem`)."""
    read = turn_reader(tokenizer) if parse is None else None
    return read or text_reader(tokenizer, parse or parse_tool_calls)


def text_reader(tokenizer, parse):
    """`parse(text)` on the turn's text without its end-of-turn and special tokens."""
    return lambda turn, context, schemas: parse(tokenizer.decode(turn[:-1], skip_special_tokens=True))


def schema_calls(tokenizer, schema: dict, text: str, prefix: str = "", tools=None) -> tuple[str, list[ToolCall]]:
    """(the reply's content, its calls) as the response schema reads `text` after the prompt `prefix`, each call's
    arguments typed by its tool's JSON schema in `tools`. A call whose body does not parse (bad JSON) is a ToolCall
    with the error, never an exception: transformers' parser fails the whole reply on one bad call, so the reply is
    read once with a text-only copy of the schema, then each call's body is parsed and typed by itself."""
    from transformers.utils.chat_parsing.response_templates import load_response_template

    raw_schema, keys = raw_copy(schema)
    try:
        raw = tokenizer.parse_response(text, schema=raw_schema, prefix=prefix)
    except (ValueError, KeyError):  # the delimiters themselves did not parse: the reply is text
        return text, []
    bodies = raw.get(CALLS) or []
    bodies = bodies if isinstance(bodies, list) else [bodies]  # a field without `repeats`: one region
    content = raw.get("content") or ""
    for token in tokenizer.all_special_tokens:  # markers such as Llama's <|python_tag|> are no content
        content = content.replace(token, "")
    template = load_response_template(schema)
    typed = argument_caster(template, tools)
    calls = [call for body in bodies for call in calls_alone(template.fields[CALLS], body, keys, typed)]
    return content.strip(), calls


def argument_caster(template, tools):
    """item -> the parsed call item with its arguments typed by its tool's JSON schema ("25" is 25 for an integer
    parameter: XML formats give every argument as text), exactly as transformers' parse_response(tools=...) types a
    reply's calls. That cast has no public entry for one call: this uses transformers' own
    (ResponseParser._coerce_tool_calls) rather than a copy that could drift from it; tests/test_tool_formats.py checks
    it against parse_response on every format, and a transformers without it stops here, naming it."""
    if not tools:
        return lambda item: item
    import transformers
    from transformers.utils.chat_parsing import ResponseParser

    cast = getattr(ResponseParser(template, prefix="", tools=tools), "_coerce_tool_calls", None)
    if cast is None:
        raise RuntimeError(f"transformers {transformers.__version__} has no ResponseParser._coerce_tool_calls, which "
                           f"pipeline/tool_formats.py uses to type tool-call arguments by their tools' schemas")
    return cast


def raw_copy(schema: dict) -> tuple[dict, list[str]]:
    """The schema with its calls read as text: each call is {"body": its text, <capture>: ...} with the named groups
    of its delimiters (a name written before the arguments, as Llama and gpt-oss do)."""
    raw = copy.deepcopy(schema)
    field = raw["fields"][CALLS]
    patterns = [field.get(k) for k in ("open_pattern", "close_pattern")]
    keys = [g for p in patterns if isinstance(p, str) for g in re.findall(r"\(\?P<(\w+)>", p) if g != "body"]
    for key in ("content_args", "transform_each"):
        field.pop(key, None)
    field["content"] = "text"
    field["transform"] = {"body": "{content}", **{k: "{" + k + "}" for k in keys}}
    return raw, keys


def raw_text(body: dict, keys: list[str]) -> str:
    return " ".join([body[k] for k in keys if isinstance(body.get(k), str)] + [body.get("body") or ""])


def calls_alone(field, body: dict, keys: list[str], typed) -> list[ToolCall]:
    """The calls of one region (one, or a list with `transform_each`), parsed by the schema's own content parser
    (`field`: the loaded schema's calls field) and typed by `typed` (see argument_caster); one call with the error
    when it does not parse."""
    from transformers.utils.chat_parsing.content_parsers import process_field

    text, raw = body.get("body") or "", raw_text(body, keys)
    try:
        value = process_field(text, field, {k: body[k] for k in keys if k in body})
    except (ValueError, KeyError, TypeError, RecursionError) as err:  # RecursionError: brackets nested too deep
        name = body.get("name") if isinstance(body.get("name"), str) else None
        return [ToolCall(name, None, raw, bad_body(text, field.content, err))]
    return [to_call(typed(item), raw) for item in (value if isinstance(value, list) else [value])]


def bad_body(text: str, content: str, err: Exception) -> str:
    if content == "json":
        try:
            json.loads(text)
        except (json.JSONDecodeError, RecursionError) as json_err:
            return json_error(json_err)
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"unparsable tool call ({lines[-1] if lines else type(err).__name__})"


def to_call(item, raw: str) -> ToolCall:
    """A parsed {"type": "function", "function": {"name", "arguments"}} as a ToolCall (checked as ours are)."""
    function = item.get("function", item) if isinstance(item, dict) else item
    return call_from_object(function, raw)


def renders_tools(tokenizer) -> bool:
    """Whether the chat template writes a tool list into the prompt (a template that ignores `tools` cannot offer
    them, whatever parses the replies)."""
    probe = {"type": "function", "function": {"name": "zq_probe_tool", "description": "probe",
                                              "parameters": {"type": "object", "properties": {}}}}
    messages = [{"role": "user", "content": "hi"}]
    try:
        return "zq_probe_tool" in tokenizer.apply_chat_template(messages, tools=[probe], tokenize=False,
                                                                add_generation_prompt=True)
    # a template that fails on tools renders none: its raise_exception() or a jinja fault (TemplateError), a Python
    # operation on the tool dicts (TypeError), or transformers refusing the call (ValueError, e.g. no template)
    except (TemplateError, TypeError, ValueError):
        return False


def tool_parser_problem(tokenizer) -> str | None:
    """Why the policy's tool calls could not be parsed (one line), or None: a chat template that renders tools
    but has no response schema, saved or from TRL's registry."""
    if turn_reader(tokenizer) is not None or not renders_tools(tokenizer):
        return None
    return (f"the tokenizer of {tokenizer.name_or_path} has a chat template that renders tools but no response "
            f"schema to parse its tool calls (and TRL's registry does not know the template): save one as "
            f"`response_template` in its tokenizer_config.json (transformers' response parsing), or set "
            f"tokenizer.chat_template: pipeline to use the pipeline's ChatML template and its <tool_call> format")
