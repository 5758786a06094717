"""LLaMA-Factory's dataset registry: the `dataset_info.json` in its data folder names each dataset (a file or folder
beside it, or a hub dataset), its format (`formatting`: alpaca, sharegpt or openai), whether it holds preference
pairs (`ranking`), its column names (`columns`) and its messages' keys and role names (`tags`).

A dataset spec `path/to/data:NAME` (the folder holding dataset_info.json: LLaMA-Factory's `dataset_dir`) or
`path/to/data/dataset_info.json:NAME` reads the dataset as LLaMA-Factory does and hands its rows on under the
standard names, which pipeline/formats.py converts as it converts any such file: alpaca's instruction, input, output,
system, history, tools, chosen, rejected, kto_tag; ShareGPT's `conversations` of from/value turns (human, gpt,
observation, function_call, system); OpenAI's `messages` of role/content (user, assistant, tool, system; tool_calls
kept), with a pair's prompt, chosen and rejected as TRL's conversational pairs. An alpaca row with a prompt and nothing
to learn from (no response, chosen, rejected or kto_tag: LLaMA-Factory's pre-training layout) is a document, `text`
(a .txt file: a document per line).
As in LLaMA-Factory, a `columns` mapping names every column read (a column it leaves out is not read), and
`num_samples` takes that many rows (each row once, in a shuffled order, then drawn again at random; seeded by
run.seed). Refused in one line: `script_url` (no code that comes with a dataset runs here), `ms_hub_url`,
`om_hub_url` or `cloud_file_name` without an `hf_hub_url` (only the Hugging Face hub and local files are read), and
image, video or audio columns (the language-model stages read text).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from pipeline.cli import PipelineError
from pipeline.files import folder_fingerprint
from pipeline.formats import tool_call_message
from pipeline.fingerprints import hash_file, hash_obj
from pipeline.values import closest

REGISTRY = "dataset_info.json"
SOURCES = ("file_name", "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")  # where it is
ALPACA = {"prompt": "instruction", "query": "input", "response": "output", "history": "history"}  # theirs: ours
SHAREGPT = {"messages": "conversations"}
OPENAI = {"messages": "messages"}
COMMON = {"system": "system", "tools": "tools", "chosen": "chosen", "rejected": "rejected", "kto_tag": "kto_tag"}
DEFAULTS = {"prompt": "instruction", "query": "input", "response": "output", "messages": "conversations"}
MEDIA = ("images", "videos", "audios")
TAGS = {"role_tag": "from", "content_tag": "value"}  # the keys of a message
ROLES = {"user_tag": "human", "assistant_tag": "gpt", "observation_tag": "observation",
         "function_tag": "function_call", "system_tag": "system"}  # the role names: LLaMA-Factory's, ShareGPT's
OPENAI_ROLES = {"user_tag": "user", "assistant_tag": "assistant", "observation_tag": "tool",
                "function_tag": "assistant", "system_tag": "system"}  # the same roles in OpenAI's messages


@dataclass(frozen=True)
class Entry:
    registry: Path  # the dataset_info.json
    name: str
    info: dict  # the entry as written

    def where(self) -> str:
        return f"{self.registry}: dataset '{self.name}'"


def is_registry(obj) -> bool:
    """Whether parsed JSON is LLaMA-Factory's registry (objects, one at least saying where its data is), not the
    dataset_info.json that `datasets.save_to_disk` writes beside its data (text and objects: features, splits)."""
    return isinstance(obj, dict) and bool(obj) and all(isinstance(entry, dict) for entry in obj.values()) and any(
        key in entry for entry in obj.values() for key in SOURCES)


def read_registry(path: Path) -> dict | None:
    """The registry in `path` (a dataset_info.json), or None when the file is no LLaMA-Factory registry; a file
    that does not read as JSON is one line."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8-sig"))  # as a data file: a byte order mark is no error
    except json.JSONDecodeError as err:
        raise PipelineError(f"{path}: invalid JSON ({err.msg}, line {err.lineno})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PipelineError(f"{path}: cannot read it ({err})") from None
    return obj if is_registry(obj) else None


def folder_registry(folder: Path) -> dict | None:
    """The registry of a LLaMA-Factory data folder, or None for any other folder."""
    return read_registry(folder / REGISTRY) if (folder / REGISTRY).is_file() else None


def entry_of(spec: str) -> Entry | None:
    """The registry entry `folder:NAME` or `dataset_info.json:NAME` names, or None for any other spec; a name the
    registry lacks is one line listing the names it has."""
    head, sep, name = spec.rpartition(":")
    if not sep or not head or not name:
        return None
    path = Path(head).expanduser()
    registry_file = path / REGISTRY if path.is_dir() else path
    if registry_file.name != REGISTRY or not registry_file.is_file():
        return None
    registry = read_registry(registry_file)
    if registry is None:
        return None
    if name not in registry:
        names = sorted(registry)
        listed = ", ".join(names) if len(names) <= 12 else f"{len(names)} datasets{closest(name, names)}"
        raise PipelineError(f"{registry_file}: no dataset '{name}' (it names {listed})")
    return Entry(registry_file, name, registry[name])


def source(entry: Entry) -> tuple[str, Path | str]:
    """("file", the local file or folder) or ("hub", the dataset id), as LLaMA-Factory picks it (hf_hub_url first);
    what this pipeline does not read is one line."""
    info = entry.info
    if info.get("hf_hub_url"):
        return "hub", _text(entry, "hf_hub_url")
    for key, store in (("ms_hub_url", "ModelScope"), ("om_hub_url", "Modelers (OpenMind)"),
                       ("cloud_file_name", "S3 or GCS")):
        if info.get(key):
            raise PipelineError(f"{entry.where()}: {key} ({store}) is not read here; download the dataset and name "
                                f"it with file_name")
    if info.get("script_url"):
        raise PipelineError(f"{entry.where()}: script_url names a loading script, and no dataset code runs here; "
                            f"save the data as a file and name it with file_name")
    if "file_name" not in info:
        raise PipelineError(f"{entry.where()}: says nowhere where its data is (file_name or hf_hub_url)")
    return "file", entry.registry.parent / _text(entry, "file_name")


def source_problem(entry: Entry) -> str | None:
    """Why the entry's data cannot be read (its file or folder missing), or None."""
    kind, where = source(entry)
    if kind == "file" and not Path(where).exists():
        return f"{entry.where()}: file_name '{entry.info['file_name']}' not found in {entry.registry.parent}"
    return None


def is_local(entry: Entry | None) -> bool:
    """Whether a spec's entry (entry_of's) reads a local file or folder."""
    return entry is not None and source(entry)[0] == "file"


def fingerprint(entry: Entry) -> str:
    """The entry and its data's fingerprint (a file that is not there: none; the stage names it)."""
    kind, where = source(entry)
    data = {"hub": where} if kind == "hub" else folder_fingerprint(Path(where)) if Path(where).is_dir() else \
        hash_file(where) if Path(where).is_file() else None
    return hash_obj({"llamafactory": entry.info, "data": data})


def read(entry: Entry, seed: int) -> tuple[list[dict], list[str]]:
    """The entry's rows under the standard names (module docstring) and where each came from. Plain text is a
    document per line, as LLaMA-Factory reads it (datasets' text builder), whatever the stage's `text_split`."""
    from pipeline import files, hub

    kind, where = source(entry)
    plan, n = layout(entry), num_samples(entry)
    if kind == "hub":
        ds = hub.load_dataset(hub.dataset_spec(where, entry.info.get("subset"), entry.info.get("split")),
                              data_dir=entry.info.get("folder"), revision=entry.info.get("revision"))
        rows, labels = files.arrow_rows(ds), [f"row {i}" for i in range(1, len(ds) + 1)]
    elif Path(where).is_dir():
        rows, labels = files.read_folder(Path(where), "line")
    elif Path(where).is_file():
        rows, labels = files.read_file(Path(where), "line")
    else:
        raise PipelineError(source_problem(entry))
    labels = labels if kind == "hub" else [f"{entry.info['file_name']} {w}" for w in labels]
    _check_named_columns(entry, plan, rows)
    standard = [standard_row(entry, plan, row, w) for row, w in zip(rows, labels)]
    _check_tools_read(entry, plan, rows, standard)
    return (standard, labels) if n is None else sample(standard, labels, n, seed)


@dataclass(frozen=True)
class Layout:
    """How an entry's rows read, checked once: their format, LLaMA-Factory's column names with the file's (None: not
    read) and ours, the message tags (sharegpt, openai), and whether the rows are documents (pre-training)."""
    formatting: str
    columns: dict
    ours: dict
    tags: dict | None  # role_tag, content_tag: the keys of a message
    roles: dict  # their role names: ours
    documents: bool
    function_role: str | None = None  # their name of a tool-call turn (function_tag)


def layout(entry: Entry) -> Layout:
    info = entry.info
    formatting = info.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt", "openai"):
        raise PipelineError(f"{entry.where()}: formatting must be alpaca, sharegpt or openai, got {formatting!r}")
    ours = {**COMMON, **{"alpaca": ALPACA, "sharegpt": SHAREGPT, "openai": OPENAI}[formatting]}
    given = info.get("columns")
    if given is not None and not _names(given):
        raise PipelineError(f"{entry.where()}: columns must be an object of column names, got {given!r}")
    media = [key for key in MEDIA if (given or {}).get(key)]
    if media:
        raise PipelineError(f"{entry.where()}: columns.{media[0]}: {media[0]} are not read by the language-model "
                            f"stages (text only)")
    # with `columns`, LLaMA-Factory reads the columns it names and no other (a missing default is None)
    columns = {theirs: given.get(theirs) for theirs in ours} if given is not None else \
        {theirs: column for theirs, column in DEFAULTS.items() if theirs in ours}
    tags, roles, function_role = None, {}, None
    if formatting != "alpaca":
        given = info.get("tags") or {}
        if not _names(given):
            raise PipelineError(f"{entry.where()}: tags must be an object of names, got {given!r}")
        tags = {key: given.get(key, default) for key, default in TAGS.items()}
        standard = OPENAI_ROLES if formatting == "openai" else ROLES
        roles = {theirs: standard[key] for key in ROLES if (theirs := given.get(key, ROLES[key]))}
        function_role = given.get("function_tag", ROLES["function_tag"])
    learnt = ("response", "chosen", "rejected", "kto_tag")  # without one, an alpaca entry's prompts are documents
    documents = formatting == "alpaca" and not any(columns.get(k) for k in learnt)
    return Layout(formatting, columns, ours, tags, roles, documents, function_role)


def num_samples(entry: Entry) -> int | None:
    n = entry.info.get("num_samples")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n < 2**31):
        raise PipelineError(f"{entry.where()}: num_samples must be a whole number from 1 to 2**31 - 1, got {n!r}")
    return n


def standard_row(entry: Entry, plan: Layout, row: dict, where: str) -> dict:
    """One row under the standard names, read as the entry's layout says."""
    out = {plan.ours[theirs]: row[column] for theirs, column in plan.columns.items()
           if column is not None and row.get(column) is not None}
    if plan.tags is not None:
        for key in ("conversations", "messages", "chosen", "rejected"):
            value = out.get(key)
            if isinstance(value, list):
                out[key] = [_message(m, plan, entry, where) for m in value]
            elif isinstance(value, dict):
                out[key] = _message(value, plan, entry, where)
        messages = out.get("messages")
        if plan.formatting == "openai" and out.get("system") and isinstance(messages, list) \
                and not (messages and isinstance(messages[0], dict) and messages[0].get("role") == "system"):
            out["messages"] = [{"role": "system", "content": out.pop("system")}] + messages  # as LLaMA-Factory reads it
        if plan.formatting == "openai" and ("chosen" in out or "rejected" in out):
            # TRL's conversational pairs: prompt, chosen, rejected
            if "messages" in out:
                out["prompt"] = out.pop("messages")
            for key in ("chosen", "rejected"):
                if isinstance(out.get(key), dict):
                    out[key] = [out[key]]
    elif plan.documents:
        out = {"text": out["instruction"]} if "instruction" in out else {}  # pre-training: the prompt is the document
    if not out:
        raise PipelineError(f"{entry.where()}: {where}: none of the columns it names "
                            f"({', '.join(c for c in plan.columns.values() if c)}) "
                            f"(columns: {', '.join(row) or 'none'})")
    return out


def _check_named_columns(entry: Entry, plan: Layout, rows: list) -> None:
    """A column `columns` names that no row has (LLaMA-Factory stops there with a KeyError): one line naming it,
    rather than rows read without it that no format matches."""
    if entry.info.get("columns") is None:
        return
    present = set().union(*(row for row in rows if isinstance(row, dict)))
    missing = [(theirs, column) for theirs, column in plan.columns.items() if column and column not in present]
    if rows and missing:
        theirs, column = missing[0]
        raise PipelineError(f"{entry.where()}: columns.{theirs} names '{column}', a column none of its rows has "
                            f"(its columns: {', '.join(sorted(present)) or 'none'})")


def _check_tools_read(entry: Entry, plan: Layout, rows: list, standard: list) -> None:
    """Rows that call tools beside a `tools` column the entry does not name: LLaMA-Factory reads only the columns
    `columns` names (tools: none unless named), so every call would be to an unknown tool: one line saying what to
    add to the entry, rather than each call refused as one to no tool."""
    if plan.columns.get("tools") or not any(isinstance(row, dict) and row.get("tools") not in (None, "", "[]", [])
                                            for row in rows):
        return
    if any(isinstance(m, dict) and (m.get("from") == ROLES["function_tag"] or m.get("tool_calls"))
           for row in standard for key in ("conversations", "messages", "prompt", "chosen", "rejected")
           for m in (row.get(key) if isinstance(row.get(key), list) else [row.get(key)])):
        add = '"tools": "tools" to its columns' if entry.info.get("columns") is not None else \
            f'"columns": {json.dumps({**{k: v for k, v in plan.columns.items() if v}, "tools": "tools"})} to it'
        raise PipelineError(f"{entry.where()}: its rows call tools, offered in a 'tools' column it does not name "
                            f"(as in LLaMA-Factory, only the columns an entry names are read): add {add}")


def sample(rows: list, where: list, n: int, seed: int) -> tuple[list, list]:
    """`num_samples` rows as LLaMA-Factory takes them: every row once in a shuffled order, then drawn at random."""
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    order = order[:n] + rng.choices(range(len(rows)), k=max(0, n - len(rows)))
    return [rows[i] for i in order], [where[i] for i in order]


def _names(obj) -> bool:
    """An object of names (None: a column or role that is not there)."""
    return isinstance(obj, dict) and all(isinstance(v, str) or v is None for v in obj.values())


def _message(message, plan: Layout, entry: Entry, where: str):
    """A message with the standard keys and role names: ShareGPT's from/value, or (openai) role/content with its
    other keys (tool_calls) kept, a function_tag message as the assistant tool call its content holds. A role the
    tags do not name is left for the format's reader to name."""
    if not isinstance(message, dict):
        return message  # the format's reader names what is wrong with it
    role_key, content_key = plan.tags["role_tag"], plan.tags["content_tag"]
    role, content = message.get(role_key), message.get(content_key)
    if plan.formatting == "openai" and role is not None and role == plan.function_role \
            and not message.get("tool_calls"):
        return tool_call_message(content, entry.where(), where, f"a {role} message")
    role = plan.roles.get(role, role) if isinstance(role, str) else role
    if plan.formatting != "openai":
        return {"from": role, "value": content}
    rest = {k: v for k, v in message.items() if k not in (role_key, content_key)}
    return {"role": role, "content": content, **rest}


def _text(entry: Entry, key: str) -> str:
    value = entry.info.get(key)
    if not isinstance(value, str) or not value:
        raise PipelineError(f"{entry.where()}: {key} must be a name, got {value!r}")
    return value
