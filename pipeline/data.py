"""Datasets for every stage: the task world's splits, the user's local files and folders, or hub datasets.

A dataset spec is one string:
  world:<split>             a split of the offline task world (pipeline/world.py), e.g. world:sft
  path/to/file.jsonl        a local JSON Lines, JSON, Parquet or CSV file
  path/to/folder            a folder saved with `datasets.save_to_disk`, or a folder of such files
  org/name[:split]          a hub dataset (default split: train)

Rows are checked against what the stage needs (`kind`) before any model is loaded; a bad row is reported as
one line naming the file and the row (JSONL: the line number).
"""

from __future__ import annotations

import dataclasses
import json
import re
from functools import lru_cache
from pathlib import Path

from pipeline.cli import PipelineError

ROLES = ("system", "user", "assistant", "tool")
FILE_TYPES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


# ---------------------------------------------------------------------------------------------- reading


@lru_cache(maxsize=16)
def _world_rows(world_json: str, split: str) -> tuple:
    from pipeline import world

    cfg = world.WorldConfig(**json.loads(world_json))
    return tuple(world.build_split(cfg, split))


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
    from pipeline.runs import hash_file, hash_folder, hash_obj

    if spec.startswith("world:"):
        return hash_obj({"world": dataclasses.asdict(recipe.world), "split": spec})
    path = Path(spec).expanduser()
    if path.is_file():
        return hash_file(path)
    if path.is_dir():
        return hash_folder(path)
    return hash_obj({"hub": spec})


# ---------------------------------------------------------------------------------------------- checking


def _bad(source, where, msg):
    raise PipelineError(f"{source}: {where}: {msg}")


def check_messages(messages, source, where, need_assistant=True):
    if isinstance(messages, str):  # CSV cells hold JSON text
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            _bad(source, where, "'messages' is a string that is not a JSON list of messages")
    if not isinstance(messages, list) or not messages:
        _bad(source, where, "'messages' must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            _bad(source, where, f"message {i} is not an object")
        role = m.get("role")
        if role not in ROLES:
            _bad(source, where, f"message {i}: unknown role {role!r} (expected one of: {', '.join(ROLES)})")
        content, calls = m.get("content"), m.get("tool_calls")
        if calls is not None:
            if role != "assistant" or not isinstance(calls, list):
                _bad(source, where, f"message {i}: tool_calls must be a list on an assistant message")
            for call in calls:
                fn = call.get("function", call) if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    _bad(source, where, f"message {i}: a tool call needs a function name")
        if not isinstance(content, str) and not (content is None and calls):
            _bad(source, where, f"message {i}: 'content' must be a string")
    if need_assistant and not any(m["role"] == "assistant" for m in messages):
        _bad(source, where, "no assistant message to learn from")
    return messages


def _check_text(rows, where, source, column="text"):
    for row, w in zip(rows, where):
        if column not in row:
            _bad(source, w, f"missing column '{column}' (columns: {', '.join(row) or 'none'})")
        if not isinstance(row[column], str):
            _bad(source, w, f"'{column}' must be a string")
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
                    _bad(source, w, f"'{col}' must be text or a list of messages")
        else:
            _bad(source, w, f"expected a 'messages' column or 'prompt' and 'completion' "
                            f"(columns: {', '.join(row) or 'none'})")
    return rows


def _check_prompts(rows, where, source):
    for row, w in zip(rows, where):
        if "prompt" not in row:
            _bad(source, w, f"missing column 'prompt' (columns: {', '.join(row) or 'none'})")
        if isinstance(row["prompt"], list):
            check_messages(row["prompt"], source, w, need_assistant=False)
        elif not isinstance(row["prompt"], str) or not row["prompt"].strip():
            _bad(source, w, "'prompt' must be non-empty text or a list of messages")
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


# ---------------------------------------------------------------------------------------------- preference pairs
#
# One loader for the reward, DPO and PPO stages. Whatever the input format, rows come out in ONE normalized TRL
# format: explicit `prompt`, `chosen`, `rejected` (lists of messages when the input was conversational or Anthropic
# HH text, plain strings otherwise), an optional float `margin` (TRL's RewardTrainer subtracts it inside the loss),
# and every other column of the input kept as it was (e.g. the world's skill, hard, clean_agrees).

PREFERENCE_FORMATS = {
    "explicit": "prompt + chosen + rejected (text or lists of messages)",
    "implicit": "chosen + rejected full conversations (the shared beginning is the prompt)",
    "implicit_text": "chosen + rejected full texts (the shared beginning, cut at a space, is the prompt)",
    "hh": "chosen + rejected Anthropic HH-RLHF text (\\n\\nHuman: ... \\n\\nAssistant: ...)",
    "hh_explicit": "prompt (HH text ending in 'Assistant:') + chosen + rejected replies",
}
PREFERENCE_EXPECTED = ("prompt/chosen/rejected, or chosen/rejected (full conversations or Anthropic HH text); "
                       "optionally score_chosen/score_rejected or margin")
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


def parse_hh(text: str) -> list[dict] | None:
    """Anthropic HH-RLHF text as messages (Human -> user, Assistant -> assistant); None if not in that form."""
    if not isinstance(text, str) or not re.match(r"\s*Human:", text):
        return None
    parts = _HH_TURN.split(text.lstrip(" \t\n"))  # [before, role, content, role, content, ...]
    if len(parts) < 5 or parts[0].strip():
        return None
    return [{"role": "user" if role == "Human" else "assistant", "content": content.strip()}
            for role, content in zip(parts[1::2], parts[2::2])]


def _as_messages(value):
    """A CSV cell (or any string) holding a JSON list of messages becomes that list; anything else is unchanged."""
    if isinstance(value, str) and value.lstrip().startswith("[{"):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        if isinstance(parsed, list) and all(isinstance(m, dict) and "role" in m for m in parsed):
            return parsed
    return value


def _split_conversations(chosen: list, rejected: list, source, where):
    """Shared leading messages -> prompt; the rest of each side (starting at an assistant turn) -> completions."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n == len(chosen) == len(rejected):
        return chosen, [], []  # identical conversations: the caller drops the pair
    # the completions must start with an assistant turn: move the cut back to one
    k = n
    while k > 0 and not (k < len(chosen) and k < len(rejected)
                         and chosen[k]["role"] == "assistant" and rejected[k]["role"] == "assistant"):
        k -= 1
    if k == 0:
        _bad(source, where, "chosen and rejected share no prompt that ends before an assistant reply")
    return chosen[:k], chosen[k:], rejected[k:]


def _split_text(chosen: str, rejected: str, source, where):
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if chosen == rejected:
        return chosen, "", ""
    cut = max(chosen.rfind(" ", 0, n), chosen.rfind("\n", 0, n)) + 1  # keep whole words in the replies
    if cut == 0:
        _bad(source, where, "chosen and rejected share no prompt (no common beginning ending at a space)")
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _detect_preference_format(first: dict, source) -> str:
    cols = set(first)
    if not {"chosen", "rejected"} <= cols:
        have = ", ".join(first) or "none"
        raise PipelineError(f"{source}: no preference format matches the columns ({have}); expected "
                            f"{PREFERENCE_EXPECTED}")
    chosen = _as_messages(first["chosen"])
    if "prompt" in cols:
        prompt = first["prompt"]
        if isinstance(prompt, str) and not isinstance(chosen, list):
            turns = parse_hh(prompt)
            if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
                return "hh_explicit"
        return "explicit"
    if isinstance(chosen, list):
        return "implicit"
    if parse_hh(chosen) is not None:
        return "hh"
    return "implicit_text"


def _pair_margin(row, margin_from, source, where):
    import math

    if margin_from == "margin":
        values = {"margin": row.get("margin")}
    else:
        values = {c: row.get(c) for c in ("score_chosen", "score_rejected")}
    for col, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            _bad(source, where, f"'{col}' must be a finite number, got {v!r}")
    margin = float(values["margin"]) if margin_from == "margin" else \
        float(values["score_chosen"]) - float(values["score_rejected"])
    if margin < 0:
        _bad(source, where, f"negative margin {margin:g}: the chosen reply must score at least as high as the "
                            f"rejected one")
    return margin


def normalize_preferences(rows, where, source) -> tuple[list[dict], dict]:
    """Rows of any supported preference format -> normalized rows, and what was done (format, drops, margin)."""
    fmt = _detect_preference_format(rows[0], source)
    cols = set(rows[0])
    if "margin" in cols:
        margin_from = "margin"
    elif {"score_chosen", "score_rejected"} & cols:
        missing = {"score_chosen", "score_rejected"} - cols
        if missing:
            raise PipelineError(f"{source}: has {({'score_chosen', 'score_rejected'} - missing).pop()} but no "
                                f"{missing.pop()} column (scores come in pairs)")
        margin_from = "score_chosen - score_rejected"
    else:
        margin_from = None
    needed = ("prompt", "chosen", "rejected") if fmt in ("explicit", "hh_explicit") else ("chosen", "rejected")
    conversational = None
    out, identical = [], 0
    for row, w in zip(rows, where):
        for col in needed:
            if col not in row:
                _bad(source, w, f"missing column '{col}' (columns: {', '.join(row) or 'none'}; format: "
                                f"{PREFERENCE_FORMATS[fmt]})")
        chosen, rejected = _as_messages(row["chosen"]), _as_messages(row["rejected"])
        prompt = _as_messages(row.get("prompt"))
        if fmt == "explicit":
            for col, v in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
                if not isinstance(v, (str, list)):
                    _bad(source, w, f"'{col}' must be text or a list of messages, got {type(v).__name__}")
            if isinstance(prompt, str) and not prompt.strip():
                _bad(source, w, "'prompt' is empty")
            if isinstance(prompt, list) or isinstance(chosen, list) or isinstance(rejected, list):
                prompt = check_messages(prompt, source, w, need_assistant=False) if isinstance(prompt, list) \
                    else [{"role": "user", "content": prompt}]
                chosen, rejected = [check_messages(v, source, w) if isinstance(v, list)
                                    else [{"role": "assistant", "content": v}] for v in (chosen, rejected)]
        elif fmt == "hh_explicit":
            turns = parse_hh(prompt) if isinstance(prompt, str) else None
            if not turns or turns[-1]["role"] != "assistant" or turns[-1]["content"] or len(turns) < 2:
                _bad(source, w, "'prompt' is not Anthropic HH text ending in '\\n\\nAssistant:'")
            for col, v in (("chosen", chosen), ("rejected", rejected)):
                if not isinstance(v, str):
                    _bad(source, w, f"'{col}' must be text, like the first row's")
            prompt = turns[:-1]
            chosen, rejected = [{"role": "assistant", "content": chosen.strip()}], \
                [{"role": "assistant", "content": rejected.strip()}]
        elif fmt == "implicit":
            for col, v in (("chosen", chosen), ("rejected", rejected)):
                if not isinstance(v, list):
                    _bad(source, w, f"'{col}' must be a list of messages, like the first row's")
                check_messages(v, source, w)
            prompt, chosen, rejected = _split_conversations(chosen, rejected, source, w)
        elif fmt == "hh":
            turns_c, turns_r = parse_hh(chosen), parse_hh(rejected)
            for col, turns in (("chosen", turns_c), ("rejected", turns_r)):
                if turns is None:
                    _bad(source, w, f"'{col}' is not Anthropic HH text (\\n\\nHuman: ... \\n\\nAssistant: ...)")
                if turns[-1]["role"] != "assistant":
                    _bad(source, w, f"'{col}' does not end with an Assistant turn")
            prompt, chosen, rejected = _split_conversations(turns_c, turns_r, source, w)
        else:  # implicit_text
            for col, v in (("chosen", chosen), ("rejected", rejected)):
                if not isinstance(v, str):
                    _bad(source, w, f"'{col}' must be text, like the first row's")
            prompt, chosen, rejected = _split_text(chosen, rejected, source, w)
        is_conv = isinstance(chosen, list)
        if conversational is None:
            conversational = is_conv
        elif is_conv != conversational:
            _bad(source, w, "mixes text and conversation pairs (earlier rows are "
                            f"{'conversations' if conversational else 'text'})")
        if chosen == rejected:
            identical += 1
            continue
        pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        if margin_from:
            pair["margin"] = _pair_margin(row, margin_from, source, w)
        pair.update((k, v) for k, v in row.items() if k not in ("prompt", "chosen", "rejected", "margin"))
        out.append(pair)
    info = {"source": str(source), "format": fmt, "conversational": bool(conversational), "rows": len(rows),
            "pairs": len(out), "identical_dropped": identical, "margin": margin_from}
    return out, info


def _check_preference(rows, where, source):
    return normalize_preferences(rows, where, source)[0]


CHECKS["preference"] = _check_preference


def load_preferences(spec: str, recipe):
    """Preference pairs of any supported format (see PREFERENCE_FORMATS), normalized; returns (Dataset, info)."""
    import datasets

    rows, where, source = read_rows(spec, recipe)
    pairs, info = normalize_preferences(rows, where, source)
    if not pairs:
        raise PipelineError(f"{source}: no pairs left: all {info['identical_dropped']} have chosen equal to rejected")
    try:
        return datasets.Dataset.from_list(pairs), info
    except Exception as err:  # mixed types across rows that Arrow cannot unify
        raise PipelineError(f"{source}: rows do not share one schema: {str(err).splitlines()[0]}") from None


def split_by_prompt(ds, fraction: float, seed: int):
    """Hold out `fraction` of the prompts (with all their pairs), so no prompt is on both sides. (train, held-out)"""
    import random

    if not 0 < fraction < 1:
        raise PipelineError(f"eval_fraction must be between 0 and 1, got {fraction}")
    keys = [json.dumps(p, sort_keys=True) for p in ds["prompt"]]
    prompts = sorted(set(keys))
    if len(prompts) < 2:
        raise PipelineError(f"{len(ds)} pairs with {len(prompts)} distinct prompt: too few to hold any out; "
                            f"give an eval_dataset")
    random.Random(seed).shuffle(prompts)
    n_eval = min(len(prompts) - 1, max(1, round(fraction * len(prompts))))
    held = set(prompts[:n_eval])
    train_idx = [i for i, k in enumerate(keys) if k not in held]
    eval_idx = [i for i, k in enumerate(keys) if k in held]
    return ds.select(train_idx), ds.select(eval_idx)


def load_preference_splits(dataset: str, eval_dataset: str | None, eval_fraction: float, recipe):
    """Training and held-out pairs for a preference stage: `eval_dataset`, or `eval_fraction` of the training
    prompts held out. Returns (train, held_out, train_info, held_out_info)."""
    train_ds, train_info = load_preferences(dataset, recipe)
    if eval_dataset:
        eval_ds, eval_info = load_preferences(eval_dataset, recipe)
        return train_ds, eval_ds, train_info, eval_info
    train_ds, eval_ds = split_by_prompt(train_ds, eval_fraction, recipe.run.seed)
    eval_info = {**train_info, "source": f"{dataset} (held-out {eval_fraction:.0%} of prompts)", "pairs": len(eval_ds)}
    return train_ds, eval_ds, {**train_info, "pairs": len(train_ds)}, eval_info


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
                _bad(source, w, f"'answer' must be non-empty text or a number, got {answer!r}")
            row["answer"] = str(int(answer)) if isinstance(answer, float) and answer.is_integer() else str(answer)
        if skill is not None and not isinstance(skill, str):
            _bad(source, w, f"'skill' must be text, got {skill!r}")
    return rows


CHECKS["eval_prompts"] = _check_eval_prompts
