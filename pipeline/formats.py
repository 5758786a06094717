"""Conversation formats users bring, detected from the columns and converted to one: TRL's `messages` (or
prompt/completion), with tool calls checked against the row's tool schemas.

    messages            OpenAI / Hugging Face: {"messages": [{"role", "content", "tool_calls"?}], "tools"?}
    prompt_completion   {"prompt": text or messages, "completion": text or messages}
    sharegpt            ShareGPT / Vicuna / LLaMA-Factory: {"conversations": [{"from", "value"}], "system"?, "tools"?}
                        from: human/user, gpt/assistant, system, function_call (an assistant tool call: `value` is
                        JSON {"name", "arguments"} or a list of them), observation (a tool result)
    alpaca              Alpaca / LLaMA-Factory: {"instruction", "input"?, "output", "system"?, "history"?}
                        (history: [[user, assistant], ...] turns before this one)

Rows come out Arrow-friendly: `tools` as a JSON string (TRL reads both), tool-call `arguments` as a JSON string
(the chat template keeps a string as is), so rows whose tools or arguments have different keys share one schema.
"""

from __future__ import annotations

import json
import re

from pipeline.cli import PipelineError

ROLES = ("system", "user", "assistant", "tool")
# a cell of JSON text that is a list of objects: how a CSV holds messages ("[{", or "[\n  {" written with indent=2)
JSON_OBJECTS = re.compile(r"\s*\[\s*\{")
SFT_FORMATS = {
    "messages": "messages (role/content)",
    "prompt_completion": "prompt + completion",
    "sharegpt": "conversations (ShareGPT: from/value)",
    "alpaca": "instruction + output (Alpaca)",
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "observation": "tool", "tool": "tool", "function_call": "assistant", "function": "tool"}
JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list, "object": dict,
              "null": type(None)}


def detect_sft_format(row: dict) -> str | None:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "sharegpt"
    if "instruction" in row and "output" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    return None


LABEL_TRUE, LABEL_FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


def as_bool(value) -> bool | None:
    """A boolean cell (a KTO label, a clean label, the world's `hard`) as a bool: true/false, 1/0, or their text
    (a CSV cell: "False", "yes"); None when `value` is no such value."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in LABEL_TRUE | LABEL_FALSE:
        return value.strip().lower() in LABEL_TRUE
    return None


def finite_number(value) -> float | None:
    """A number, or the text of one (a CSV cell), as a float; None for anything else (a bool, NaN, infinity, other
    text)."""
    import math

    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def answer_text(answer) -> str | None:
    """A reference answer as the text replies are checked against: a JSON or Parquet number 3.0 is "3" (None stays
    None); text as given (a CSV's "3.0" stays "3.0")."""
    if answer is None:
        return None
    return str(int(answer)) if isinstance(answer, float) and answer.is_integer() else str(answer)


def as_messages(prompt) -> list[dict]:
    """A prompt as messages: text is one user turn (how a chat template renders a text prompt)."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def json_messages(value):
    """A string holding a JSON list of messages (objects with `role` and `content` or `tool_calls`, or ShareGPT's
    `from` and `value`: how a CSV cell holds them) is that list; anything else is returned unchanged, so a text that
    is JSON of other objects (a reply listing records, even with a `role` key) stays text."""
    if isinstance(value, str) and JSON_OBJECTS.match(value):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        if isinstance(parsed, list) and all(isinstance(m, dict) and (
                ("role" in m and ("content" in m or "tool_calls" in m)) or {"from", "value"} <= m.keys())
                for m in parsed):
            return parsed
    return value


def is_unpaired_preference(row: dict) -> bool:
    """TRL's unpaired preference (KTO: a completion with a true/false `label`, which the kto stage also reads as 1/0
    or text) or LLaMA-Factory's KTO rows (`kto_tag`): a completion labelled false is one the model must not learn,
    so these are no demonstrations."""
    return "kto_tag" in row or as_bool(row.get("label")) is not None


def expected_sft_columns() -> str:
    return "; ".join(SFT_FORMATS.values())


def rename_columns(rows: list[dict], columns: dict | None, source, where) -> list[dict]:
    """Apply a recipe's column mapping ({our name: the file's name}) to every row."""
    if not columns:
        return rows
    out, renamed = [], set(columns.values())
    for row, w in zip(rows, where):
        for ours, theirs in columns.items():
            if theirs not in row:
                bad_row(source, w, f"column '{theirs}' (mapped to '{ours}' by `columns`) is missing "
                                   f"(columns: {', '.join(row) or 'none'})")
        # every name from the row as read, at once: {chosen: rejected, rejected: chosen} swaps the two
        out.append({**{k: v for k, v in row.items() if k not in renamed},
                    **{ours: row[theirs] for ours, theirs in columns.items()}})
    return out


# ---------------------------------------------------------------------------------------------- converting


def bad_row(source, where, msg):
    """Stop with one line naming the source and the row."""
    raise PipelineError(f"{source}: {where}: {msg}")


def check_messages(messages, source, where, need_assistant=True):
    if isinstance(messages, str):  # CSV cells hold JSON text
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            bad_row(source, where, "'messages' is a string that is not a JSON list of messages")
    if not isinstance(messages, list) or not messages:
        bad_row(source, where, "'messages' must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            bad_row(source, where, f"message {i} is not an object")
        role = m.get("role")
        if role not in ROLES:
            bad_row(source, where, f"message {i}: unknown role {role!r} (expected one of: {', '.join(ROLES)})")
        if isinstance(m.get("content"), list):  # OpenAI's content parts: [{"type": "text", "text": ...}, ...]
            messages[i] = m = {**m, "content": _text_parts(m["content"], source, where, i)}
        content, calls = m.get("content"), m.get("tool_calls")
        if calls is not None:
            if role != "assistant" or not isinstance(calls, list):
                bad_row(source, where, f"message {i}: tool_calls must be a list on an assistant message")
            for call in calls:
                fn = call.get("function", call) if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    bad_row(source, where, f"message {i}: a tool call needs a function name")
        if not isinstance(content, str) and not (content is None and calls):
            bad_row(source, where, f"message {i}: 'content' must be a string")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        bad_row(source, where, "no assistant message to learn from")
    return messages



def _text_parts(parts: list, source, where, i: int) -> str:
    """Content given as OpenAI's parts, as the one text they make (a text-only model reads no other part)."""
    for part in parts:
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            bad_row(source, where, f"message {i}: a content part of type {kind!r}: the language-model stages read "
                                   f"text parts only ({{\"type\": \"text\", \"text\": ...}})")
    return "".join(part["text"] for part in parts)


def json_cell(value, source, where, what):
    """A cell's value, parsed when it is JSON text (a CSV cell holds an object or list so); one line if it is no
    JSON."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            bad_row(source, where, f"{what} is a string that is not JSON")
    return value


def prompt_cells(row: dict, source, where) -> dict:
    """A prompt row's cells that replies are checked against, read one way for ppo and eval (`row`, changed in
    place): a number `answer` as its text (answer_text), a tool task's CSV `expect` cell (JSON text; a row with a
    `kind` or `tools`) as its object. Other rows' `expect` is not ours: it stays as it is."""
    if row.get("answer") is not None:
        row["answer"] = answer_text(row["answer"])
    if isinstance(row.get("expect"), str) and (row.get("kind") or row.get("tools")):
        row["expect"] = json_cell(row["expect"], source, where, "'expect'")
    return row


def tools_of(row: dict, source, where) -> list[dict] | None:
    """The row's tool schemas (a list, or a JSON string of one), each {name, parameters} or HF's
    {type: function, function: {...}}."""
    tools = row.get("tools")
    if tools is None or tools == "" or tools == []:
        return None
    tools = json_cell(tools, source, where, "'tools'") if isinstance(tools, str) else tools
    if tools == []:  # "[]": LLaMA-Factory's rows without tools
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        bad_row(source, where, "'tools' must be a list of tool schemas (JSON objects)")
    for t in tools:
        fn = t.get("function") or t
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            bad_row(source, where, "a tool schema in 'tools' has no 'name'")
        if problem := schema_problem(fn.get("parameters")):
            bad_row(source, where, f"tool {fn['name']!r}: 'parameters' {problem}")
    return tools


def schema_problem(params) -> str | None:
    """Why a tool's `parameters` is not a JSON Schema object (jsonschema's own check of the schema), or None."""
    import jsonschema

    if params is None:
        return None
    if not isinstance(params, dict):
        return f"must be a JSON Schema object, got {type(params).__name__}"
    try:
        jsonschema.validators.validator_for(params, default=jsonschema.Draft202012Validator).check_schema(params)
    except jsonschema.exceptions.SchemaError as err:
        path = "/".join(str(p) for p in err.absolute_path)
        return f"is not a valid JSON Schema ({f'{path}: ' if path else ''}{err.message})"
    return None


def tools_json(cell, tools: list[dict] | None) -> str | None:
    """A row's tools as JSON text: `tools` (the cell's schemas, as tools_of parsed them) None for none, else the cell
    as written when it was text, else the schemas dumped: one Arrow type whatever the schemas."""
    return None if tools is None else cell if isinstance(cell, str) else json.dumps(tools)


def sharegpt_messages(row: dict, source, where, column: str = "conversations") -> list[dict]:
    """The row's ShareGPT turns in `column` (a pair's replies: chosen, rejected) as messages."""
    turns = json_cell(row[column], source, where, f"'{column}'")
    if not isinstance(turns, list) or not turns:
        bad_row(source, where, f"'{column}' must be a non-empty list of {{from, value}} turns")
    first = turns[0].get("from") if isinstance(turns[0], dict) else None  # a system turn overrides the column
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") and first != "system" else []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            lacks = " and ".join(repr(k) for k in ("from", "value") if not isinstance(turn, dict) or k not in turn)
            bad_row(source, where, f"turn {i} of '{column}' has no {lacks} (a turn needs 'from' and 'value')")
        who = SHAREGPT_ROLES.get(turn["from"]) if isinstance(turn["from"], str) else None
        if who is None:
            bad_row(source, where, f"turn {i}: unknown 'from' {turn['from']!r} (expected one of: "
                                   f"{', '.join(SHAREGPT_ROLES)})")
        if turn["from"] == "function_call":
            messages.append(tool_call_message(turn["value"], source, where, f"turn {i}"))
        else:
            messages.append({"role": who, "content": turn["value"]})
    return messages


def tool_call_message(value, source, where, what: str) -> dict:
    """An assistant tool-call message from calls written as JSON {"name", "arguments"} or a list of them: ShareGPT's
    function_call turn, LLaMA-Factory's function_tag message."""
    calls = json_cell(value, source, where, f"{what} (function_call)")
    calls = calls if isinstance(calls, list) else [calls]
    if not all(isinstance(c, dict) and "name" in c for c in calls):
        bad_row(source, where, f"{what}: a function_call is JSON {{\"name\": ..., \"arguments\": ...}}")
    return {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}} for c in calls]}


def alpaca_messages(row: dict, source, where) -> list[dict]:
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    history = json_cell(row.get("history") or [], source, where, "'history'")  # a CSV cell holds JSON text
    if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 for h in history):
        bad_row(source, where, "'history' must be a list of [user, assistant] pairs")
    for user, assistant in history:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    for col in ("instruction", "input"):
        if row.get(col) is not None and not isinstance(row[col], str):
            bad_row(source, where, f"'{col}' must be text, got {type(row[col]).__name__}")
    prompt = "\n".join(x for x in (row["instruction"], row.get("input")) if x)  # as LLaMA-Factory joins them
    if not prompt.strip():
        bad_row(source, where, "'instruction' is empty")
    if not isinstance(row["output"], str):
        bad_row(source, where, "'output' must be text")
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]


def to_sft_row(row: dict, fmt: str, source, where) -> dict:
    """One row in `messages` or prompt/completion form, tools and tool calls checked and serialised."""
    tools = tools_of(row, source, where)
    if fmt == "prompt_completion":
        out = {"prompt": json_messages(row["prompt"]), "completion": json_messages(row["completion"])}  # CSV cells
        if isinstance(out["prompt"], list) != isinstance(out["completion"], list):  # TRL joins prompt + completion
            for col, role in (("prompt", "user"), ("completion", "assistant")):
                if isinstance(out[col], str):
                    out[col] = [{"role": role, "content": out[col]}]
        for col in ("prompt", "completion"):
            if isinstance(out[col], list):
                out[col] = check_messages(out[col], source, where, need_assistant=(col == "completion"))
                check_tool_calls(out[col], tools, source, where)
            elif not isinstance(out[col], str):
                bad_row(source, where, f"'{col}' must be text or a list of messages")
    else:
        messages = {"messages": lambda: row["messages"], "sharegpt": lambda: sharegpt_messages(row, source, where),
                    "alpaca": lambda: alpaca_messages(row, source, where)}[fmt]()
        messages = check_messages(messages, source, where)
        check_tool_calls(messages, tools, source, where)
        out = {"messages": messages}
    if tools is not None:
        out["tools"] = json.dumps(tools)
    return out


def is_text_completion(row: dict) -> bool:
    """Whether an SFT row (as to_sft_row writes it: prompt and completion both text, or both messages) is a text
    prompt/completion row: trained on its plain text, not through the chat template as conversations are."""
    return isinstance(row.get("completion"), str)


# ---------------------------------------------------------------------------------------------- tool calls


class ObjectArguments:
    """A tokenizer's apply_chat_template given tool calls' `arguments` as objects (arguments_as_objects): set on every
    stage's tokenizer (models.load_tokenizer), so every render, ours and TRL's, gets them."""

    def __init__(self, render):
        self.render = render

    def __call__(self, conversation, *args, **kwargs):
        return self.render(arguments_as_objects(conversation), *args, **kwargs)


def arguments_as_objects(conversation):
    """The messages (or a batch of them) with every tool call's `arguments` that is JSON text (how rows hold them,
    one Arrow type) parsed into its object, for a chat template: Qwen2.5's and Llama 3.1's own write
    `arguments | tojson`, which quoted the text, so a model trained on them learnt to call with a string. Python's
    json reads floats exactly (datasets.Json's ujson did not: 0.009 became 0.009000000000000001)."""
    def parsed(call):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
            return call
        try:
            fn = {**fn, "arguments": json.loads(fn["arguments"]) if fn["arguments"].strip() else {}}
        except json.JSONDecodeError:
            return call
        return {**call, "function": fn} if "function" in call else fn

    if not isinstance(conversation, list):
        return conversation
    if conversation and isinstance(conversation[0], list):
        return [arguments_as_objects(c) for c in conversation]
    return [{**m, "tool_calls": [parsed(c) for c in m["tool_calls"]]}
            if isinstance(m, dict) and isinstance(m.get("tool_calls"), list) else m for m in conversation]


def _schema(tool: dict) -> dict:
    return tool.get("function") or tool


def _type_ok(value, spec) -> bool:
    kinds = spec.get("type")
    if kinds is None:
        return True
    for kind in (kinds if isinstance(kinds, list) else [kinds]):
        py = JSON_TYPES.get(kind)
        if py is None or (isinstance(value, py) and not (kind in ("integer", "number") and isinstance(value, bool))):
            return True
    return False


def call_problem(name, arguments, tools: list[dict] | None) -> str | None:
    """Why a tool call does not fit the tools' schemas (unknown tool, arguments not an object, a required key
    missing, a value of the wrong type, an undeclared key where additionalProperties is false), or None."""
    schemas = {_schema(t)["name"]: _schema(t) for t in tools or []}
    if name not in schemas:
        return f"unknown tool {name!r} (tools: {', '.join(schemas) or 'none'})"
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return f"tool {name!r}: arguments are not JSON"
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        return f"tool {name!r}: arguments must be a JSON object, got {type(arguments).__name__}"
    params = schemas[name].get("parameters") or {}
    props = params.get("properties") or {}
    missing = [k for k in params.get("required") or [] if k not in arguments]
    if missing:
        return f"tool {name!r}: required argument {missing[0]!r} is missing"
    for key, value in arguments.items():
        if key not in props:
            if params.get("additionalProperties") is False:
                return f"tool {name!r}: argument {key!r} is not in its schema"
            continue
        if not isinstance(props[key], dict):  # a boolean schema (true: anything)
            continue
        if not _type_ok(value, props[key]):
            return f"tool {name!r}: argument {key!r} must be {props[key].get('type')}, got {type(value).__name__}"
        if "enum" in props[key] and value not in props[key]["enum"]:
            return f"tool {name!r}: argument {key!r} must be one of {props[key]['enum']}, got {value!r}"
    return None


def check_tool_calls(messages: list[dict], tools: list[dict] | None, source, where) -> None:
    """Every assistant tool call fits the row's tools; its arguments become a JSON string (arguments_as_json)."""
    for i, m in enumerate(messages):
        for call in m.get("tool_calls") or []:
            fn = call.get("function", call)
            if problem := call_problem(fn.get("name"), fn.get("arguments"), tools):
                bad_row(source, where, f"message {i}: {problem}")
    arguments_as_json(messages)


def arguments_as_json(messages: list[dict]) -> None:
    """Every tool call's arguments as a JSON string: one Arrow type for calls whose arguments have different keys."""
    for m in messages:
        for call in m.get("tool_calls") or []:
            fn = call.get("function", call)
            if not isinstance(fn.get("arguments"), str):
                fn["arguments"] = json.dumps(fn.get("arguments") or {})
