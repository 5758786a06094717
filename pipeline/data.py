"""Datasets for every stage: the task world's splits, the user's local files and folders, or hub datasets.

A dataset spec is one string:
  world:<split>             a split of the offline task world (pipeline/world_splits.py), e.g. world:sft
  path/to/file.jsonl        a local JSON Lines, JSON, Parquet or CSV file
  path/to/folder            a folder saved with `datasets.save_to_disk`, or a folder of such files
  org/name[:split]          a hub dataset (default split: train)

Rows are checked against what the stage needs (`kind`) before any model is loaded; a bad row is reported as
one line naming the file and the row (JSONL: the line number).
"""

from __future__ import annotations

import dataclasses
import json
from functools import lru_cache
from pathlib import Path

from pipeline.cli import PipelineError
from pipeline.fingerprints import hash_file, hash_folder, hash_obj

ROLES = ("system", "user", "assistant", "tool")
FILE_TYPES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


# ---------------------------------------------------------------------------------------------- reading


@lru_cache(maxsize=16)
def _world_rows(world_json: str, split: str) -> tuple:
    from pipeline import world, world_splits

    cfg = world.WorldConfig(**json.loads(world_json))
    return tuple(world_splits.build_split(cfg, split))


def world_rows(recipe, split: str) -> list[dict]:
    from pipeline.world import SPLITS

    if split not in SPLITS:
        raise PipelineError(f"{recipe.path}: unknown world split 'world:{split}' (splits: {', '.join(SPLITS)})")
    return list(_world_rows(json.dumps(dataclasses.asdict(recipe.world), sort_keys=True), split))


def _read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    rows, where = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise PipelineError(f"{path}: line {lineno}: invalid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise PipelineError(f"{path}: line {lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
            where.append(f"line {lineno}")
    return rows, where


def _read_file(path: Path) -> tuple[list[dict], list[str]]:
    kind = FILE_TYPES.get(path.suffix.lower())
    if kind is None:
        raise PipelineError(f"{path}: unsupported file type '{path.suffix}' (use {', '.join(FILE_TYPES)})")
    if path.stat().st_size == 0:
        raise PipelineError(f"{path}: empty file")
    if kind == "jsonl":
        return _read_jsonl(path)
    if kind == "json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            try:  # JSON Lines saved with a .json name
                return _read_jsonl(path)
            except PipelineError:
                raise PipelineError(f"{path}: line {err.lineno}: invalid JSON ({err.msg})") from None
        if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), list):
            obj = next(iter(obj.values()))  # {"data": [...]}
        if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
            raise PipelineError(f"{path}: expected a list of JSON objects")
        return obj, [f"row {i}" for i in range(1, len(obj) + 1)]
    import datasets

    try:
        ds = datasets.Dataset.from_parquet(str(path)) if kind == "parquet" else datasets.Dataset.from_csv(str(path))
    except Exception as err:  # pyarrow/pandas parse errors
        raise PipelineError(f"{path}: cannot read {kind}: {str(err).splitlines()[0]}") from None
    rows = ds.to_list()
    offset = 2 if kind == "csv" else 1  # CSV: line 1 is the header
    return rows, [f"line {i + offset}" if kind == "csv" else f"row {i + 1}" for i in range(len(rows))]


def _read_folder(path: Path) -> tuple[list[dict], list[str]]:
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise PipelineError(f"{path}: a saved DatasetDict without a 'train' split (has {list(ds)})")
            ds = ds["train"]
        rows = ds.to_list()
        return rows, [f"row {i}" for i in range(1, len(rows) + 1)]
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in FILE_TYPES)
    if not files:
        raise PipelineError(f"{path}: folder holds no saved dataset and no {'/'.join(FILE_TYPES)} files")
    rows, where = [], []
    for f in files:
        r, w = _read_file(f)
        rows += r
        where += [f"{f.name} {x}" for x in w]
    return rows, where


def _read_hub(spec: str) -> tuple[list[dict], list[str]]:
    import datasets

    name, _, split = spec.partition(":")
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as err:
        raise PipelineError(f"dataset '{spec}': not a local file or folder, and loading it from the hub failed: "
                            f"{str(err).splitlines()[0]}") from None
    rows = ds.to_list()
    return rows, [f"row {i}" for i in range(1, len(rows) + 1)]


def read_rows(spec: str, recipe) -> tuple[list[dict], list[str], str]:
    """Rows, where each row came from (for error messages), and a name for the source."""
    if spec.startswith("world:"):
        rows = world_rows(recipe, spec.split(":", 1)[1])
        return rows, [f"row {i}" for i in range(1, len(rows) + 1)], spec
    path = Path(spec).expanduser()
    if path.is_file():
        rows, where = _read_file(path)
    elif path.is_dir():
        rows, where = _read_folder(path)
    elif spec.startswith((".", "/", "~")) or Path(spec).suffix.lower() in FILE_TYPES or spec.count("/") != 1:
        raise PipelineError(f"dataset '{spec}': file not found")
    else:
        rows, where = _read_hub(spec)
    if not rows:
        raise PipelineError(f"{spec}: no rows")
    return rows, where, str(spec)


def fingerprint(spec: str, recipe) -> str:
    if spec.startswith("world:"):
        return hash_obj({"world": dataclasses.asdict(recipe.world), "split": spec})
    path = Path(spec).expanduser()
    if path.is_file():
        return hash_file(path)
    if path.is_dir():
        return hash_folder(path)
    return hash_obj({"hub": spec})


# ---------------------------------------------------------------------------------------------- checking


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


def _check_text(rows, where, source, column="text"):
    for row, w in zip(rows, where):
        if column not in row:
            bad_row(source, w, f"missing column '{column}' (columns: {', '.join(row) or 'none'})")
        if not isinstance(row[column], str):
            bad_row(source, w, f"'{column}' must be a string")
    return rows


def _check_chat(rows, where, source):
    for row, w in zip(rows, where):
        if "messages" in row:
            row["messages"] = check_messages(row["messages"], source, w)
        elif "prompt" in row and "completion" in row:
            for col in ("prompt", "completion"):
                if isinstance(row[col], list):
                    check_messages(row[col], source, w, need_assistant=(col == "completion"))
                elif not isinstance(row[col], str):
                    bad_row(source, w, f"'{col}' must be text or a list of messages")
        else:
            bad_row(source, w, f"expected a 'messages' column or 'prompt' and 'completion' "
                            f"(columns: {', '.join(row) or 'none'})")
    return rows


def _check_prompts(rows, where, source):
    for row, w in zip(rows, where):
        if "prompt" not in row:
            bad_row(source, w, f"missing column 'prompt' (columns: {', '.join(row) or 'none'})")
        if isinstance(row["prompt"], list):
            check_messages(row["prompt"], source, w, need_assistant=False)
        elif not isinstance(row["prompt"], str) or not row["prompt"].strip():
            bad_row(source, w, "'prompt' must be non-empty text or a list of messages")
    return rows


CHECKS = {"text": _check_text, "chat": _check_chat, "prompts": _check_prompts}


def load(spec: str, kind: str, recipe, **kw):
    """Read a dataset spec, check every row for `kind`, and return a `datasets.Dataset`."""
    import datasets

    rows, where, source = read_rows(spec, recipe)
    rows = CHECKS[kind](rows, where, source, **kw)
    try:
        return datasets.Dataset.from_list(rows)
    except Exception as err:  # mixed types across rows that Arrow cannot unify
        raise PipelineError(f"{source}: rows do not share one schema: {str(err).splitlines()[0]}") from None


def _check_eval_prompts(rows, where, source):
    """Evaluation prompts: `prompt` (text or messages; in CSV a JSON list of messages), optional `answer` (a
    reference: text or a number) and `skill` (text: a world skill names its verifier, anything else a category)."""
    for row, w in zip(rows, where):
        prompt = row.get("prompt")
        if isinstance(prompt, str) and prompt.lstrip().startswith("[{"):  # CSV cells hold JSON text
            try:
                row["prompt"] = json.loads(prompt)
            except json.JSONDecodeError:
                pass
        _check_prompts([row], [w], source)
        for col in ("answer", "skill"):
            if isinstance(row.get(col), float) and row[col] != row[col]:  # an empty CSV/Parquet cell: NaN
                row[col] = None
        answer, skill = row.get("answer"), row.get("skill")
        if answer is not None:
            if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
                bad_row(source, w, f"'answer' must be non-empty text or a number, got {answer!r}")
            row["answer"] = str(int(answer)) if isinstance(answer, float) and answer.is_integer() else str(answer)
        if skill is not None and not isinstance(skill, str):
            bad_row(source, w, f"'skill' must be text, got {skill!r}")
    return rows


CHECKS["eval_prompts"] = _check_eval_prompts
