"""Tool calls: the `<tool_call>` blocks a policy writes, parsed; checked against the tool's JSON schema (jsonschema);
run with a timeout. `pipeline.tools` re-exports all of it with the backends a recipe attaches: import from there.

A call runs only if it parsed and its arguments pass the tool's schema; otherwise its ToolResult has valid=False and
the reason, which the policy sees as the tool message. A tool that raises or runs past the timeout gives ok=False
with the error; the caller never crashes.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Callable

import jsonschema

from pipeline.tokenizer import TOOL_CALL_END, TOOL_CALL_START


@dataclass
class ToolCall:
    name: str | None
    arguments: dict | None
    text: str            # the raw text between <tool_call> and </tool_call>
    error: str | None    # why it did not parse; None when it parsed


@dataclass
class ToolResult:
    name: str | None
    arguments: dict | None
    valid: bool          # parsed and passed the tool's schema; False: it was never executed
    ok: bool             # valid and ran without error or timeout
    content: str         # the tool message: the observation, or the error shown to the policy
    error: str | None
    image: str | None    # id of the image the tool produced or read
    seconds: float


@dataclass
class ToolOutput:
    content: str
    image: str | None = None


class ToolError(Exception):
    """An expected failure, shown to the policy as is (e.g. "no image 12")."""


class ToolTimeout(Exception):
    """A call ran past its time."""


@dataclass
class Tool:
    name: str
    schema: dict  # Hugging Face tools= format: {"type": "function", "function": {name, description, parameters}}
    run: Callable[[dict], ToolOutput | str]                # gets validated arguments
    setup: Callable[[], object] | None = None              # loads what run needs: once, untimed, before a first run
    run_batch: Callable[[list[dict]], list] | None = None  # several calls at once (one generate batch)
    restart: Callable[[int], None] | None = None           # number the next call k (a tool seeding call k by k)
    # Runs on the caller's thread and keeps to its time by calling check_deadline() as it goes (the draw: after every
    # sampler step). A worker thread would cost a model tool more than the call itself: its second OpenMP team puts
    # more threads than CPUs under libgomp, which then stops spin-waiting between small parallel regions (the 16x16
    # draw ran 2.7x slower with 2 threads: benchmarks/README.md, ppo_phases.py).
    on_calling_thread: bool = False


_DEADLINE = threading.local()  # (monotonic time, limit) of the call running on this thread, for check_deadline


def check_deadline() -> None:
    """Raise ToolTimeout once the call running on this thread (a tool with `on_calling_thread`) is past its time."""
    deadline = getattr(_DEADLINE, "at", None)
    if deadline is not None and time.monotonic() > deadline[0]:
        raise ToolTimeout(f"timeout after {deadline[1]:g} s")


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """(the text without its calls, stripped; the calls in order) in the Hermes/Qwen format our chat template
    writes: <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>."""
    pieces = text.split(TOOL_CALL_START)
    outside, calls = [pieces[0]], []
    for piece in pieces[1:]:
        body, closed, rest = piece.partition(TOOL_CALL_END)
        calls.append(_parse_call(body.strip(), bool(closed)))
        outside.append(rest)
    return "".join(outside).strip(), calls


def _parse_call(raw: str, closed: bool) -> ToolCall:
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as err:  # a sampled reply can nest brackets past Python's stack
        call = ToolCall(None, None, raw, json_error(err))
    else:
        call = call_from_object(obj, raw)
    if not closed:
        call.error = "no </tool_call>" + (f"; {call.error}" if call.error else "")
    return call


def json_error(err: json.JSONDecodeError | RecursionError) -> str:
    if isinstance(err, RecursionError):
        return "bad JSON (nested too deeply)"
    return f"bad JSON ({err.msg} at char {err.pos})"


def call_from_object(obj, raw: str) -> ToolCall:
    """The call a parsed {"name": ..., "arguments": {...}} object stands for (also `parameters`, Llama's key, and
    arguments written as a JSON string), with why it cannot run when it names no tool or its arguments are no
    object. Shared with pipeline.tool_formats (calls parsed by a tokenizer's response schema)."""
    call = ToolCall(None, None, raw, None)
    if isinstance(obj, dict):
        name, args = obj.get("name"), obj.get("arguments", obj.get("parameters"))
        try:  # some models write the arguments as a JSON string
            args = (json.loads(args) if args.strip() else None) if isinstance(args, str) else args
        except (json.JSONDecodeError, RecursionError):
            pass
        call.name = name if isinstance(name, str) and name else None
        call.arguments = {} if args is None else args if isinstance(args, dict) else None
        what = "a string that is not JSON" if isinstance(args, str) else type(args).__name__
        call.error = ("no tool name" if call.name is None else
                      f"arguments must be a JSON object, got {what}" if call.arguments is None else None)
    elif obj is not None:  # JSON null: no error here, "unknown tool None" at the toolbox (as before)
        call.error = f"expected a JSON object {{\"name\": ..., \"arguments\": {{...}}}}, got {type(obj).__name__}"
    return call


def _validator(tool: Tool):
    params = dict(tool.schema["function"].get("parameters") or {"type": "object", "properties": {}})
    # An argument the schema does not name is refused unless the schema allows it, as strict function calling does:
    # a misspelt or invented argument (`text` for `prompt`) would otherwise be dropped silently or crash the function.
    params.setdefault("additionalProperties", False)
    cls = jsonschema.validators.validator_for(params, default=jsonschema.Draft202012Validator)
    cls.check_schema(params)
    return cls(params)


class ToolBox:
    def __init__(self, tools: list[Tool], timeout_s: float = 30.0, max_chars: int = 500):
        self.tools: dict[str, Tool] = {t.name: t for t in tools}
        if len(self.tools) < len(tools):
            raise ValueError(f"two tools share a name: {[t.name for t in tools]}")
        self.timeout_s, self.max_chars = timeout_s, max_chars
        self._validators = {t.name: _validator(t) for t in tools}
        self._locks = {t.name: threading.Lock() for t in tools}
        self._ready: set[str] = set()

    def schemas(self) -> list[dict]:
        return [t.schema for t in self.tools.values()]

    def setup(self, *names: str) -> None:
        """Load what the tools (all, or those named) need now, else before their first call. Failures propagate: a
        model that does not load is the recipe's problem, not the policy's."""
        for name in [n for n in names or self.tools if n not in self._ready]:
            if self.tools[name].setup is not None:
                self.tools[name].setup()
            self._ready.add(name)

    def restart(self, first_call: int) -> None:
        """Number the next call of every tool `first_call` (draw_image seeds call k with seed + k): online RL restarts
        the numbering before each step, so a step's draws depend on the step alone and a resumed run repeats them."""
        for tool in self.tools.values():
            if tool.restart is not None:
                tool.restart(first_call)

    def check(self, call: ToolCall) -> str | None:
        """Why the call may not run (it did not parse, names no tool, or breaks the schema), or None."""
        if call.error or call.name not in self.tools:
            return call.error or f"unknown tool {call.name!r} (tools: {', '.join(self.tools)})"
        err = jsonschema.exceptions.best_match(self._validators[call.name].iter_errors(call.arguments))
        path = "/".join(str(p) for p in err.absolute_path) if err else ""
        return None if err is None else f"{path}: {err.message}" if path else err.message

    def call(self, call: ToolCall) -> ToolResult:
        start, problem = time.monotonic(), self.check(call)
        if problem:
            return self._result(call, start, valid=False, error=f"invalid: {problem}")
        tool = self.tools[call.name]
        self.setup(tool.name)
        try:
            return self._result(call, start, out=self._timed(tool, lambda: tool.run(call.arguments), self.timeout_s))
        except Exception as err:
            return self._result(call, start, error=describe_error(err))

    def call_many(self, calls: list[ToolCall]) -> list[ToolResult]:
        """`call` for each, in order, except that the valid calls of a tool with `run_batch` (draw_image) run as one
        batch when the first of them comes, with `timeout_s` per call. An image depends on its seed only, so a
        batch draws what one-by-one calls would."""
        results: list[ToolResult | None] = [None] * len(calls)
        for i, call in enumerate(calls):
            if results[i] is not None:  # ran in an earlier batch
                continue
            tool = None if self.check(call) else self.tools[call.name]
            if tool is None or tool.run_batch is None:
                results[i] = self.call(call)
                continue
            batch = [j for j in range(i, len(calls)) if calls[j].name == tool.name and not self.check(calls[j])]
            start = time.monotonic()
            self.setup(tool.name)
            try:
                outs = self._timed(tool, lambda: tool.run_batch([calls[j].arguments for j in batch]),
                                   self.timeout_s * len(batch))
                done = {j: self._result(calls[j], start, out=out) for j, out in zip(batch, outs)}
            except Exception as err:
                done = {j: self._result(calls[j], start, error=describe_error(err)) for j in batch}
            for j, result in done.items():
                results[j] = result
        return results

    def run_text(self, text: str) -> tuple[str, list[ToolResult]]:
        rest, calls = parse_tool_calls(text)
        return rest, [self.call(c) for c in calls]

    def _timed(self, tool: Tool, fn, limit: float):
        """fn() in a worker thread, waited on for `limit` seconds. A Python thread cannot be killed: a timed-out call
        runs on in the background, holding the tool's lock, so the next call of that tool waits for it instead of
        running beside it on a shared model. That is why user code (`python` tools) runs in a subprocess. A tool
        `on_calling_thread` runs here instead and stops itself at the deadline (check_deadline); a result that
        comes after it is a timeout all the same."""
        start, lock, box = time.monotonic(), self._locks[tool.name], {}
        if not lock.acquire(timeout=limit):
            raise ToolTimeout(f"timeout after {limit:g} s (its previous call is still running)")
        if tool.on_calling_thread:
            _DEADLINE.at = (start + limit, limit)
            try:
                out = fn()
            finally:
                _DEADLINE.at = None
                lock.release()
            if time.monotonic() - start > limit:
                raise ToolTimeout(f"timeout after {limit:g} s")
            return out

        def work():
            try:
                box["out"] = fn()
            except BaseException as err:  # noqa: BLE001 (raised in the caller)
                box["err"] = err
            finally:
                lock.release()

        worker = threading.Thread(target=work, name=f"tool {tool.name}", daemon=True)
        worker.start()
        worker.join(max(0.0, limit - (time.monotonic() - start)))
        if worker.is_alive():
            raise ToolTimeout(f"timeout after {limit:g} s")
        if "err" in box:
            raise box["err"]
        return box["out"]

    def _result(self, call: ToolCall, start: float, *, valid=True, out=None, error=None) -> ToolResult:
        out = out if isinstance(out, ToolOutput) or out is None else ToolOutput(str(out))
        content = error if error is not None else out.content
        if len(content) > self.max_chars:
            content = content[:self.max_chars - 1] + "…"
        return ToolResult(call.name, call.arguments, valid, valid and error is None, content, error,
                          out.image if out else None, time.monotonic() - start)


def describe_error(err: BaseException) -> str:
    if isinstance(err, (ToolError, ToolTimeout)):
        return str(err)
    lines = str(err).strip().splitlines()
    return f"error: {type(err).__name__}" + (f": {lines[0]}" if lines else "")
