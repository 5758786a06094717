"""Datasets for every stage: the task world's splits, the user's local files and folders, or hub datasets.

A dataset spec is a string:
  world:<split>             a split of the offline task world (pipeline/world_splits.py), e.g. world:sft
  path/to/file.jsonl        a local JSON Lines, JSON, CSV or plain-text file (each optionally .gz), Parquet or Arrow
  path/to/folder            a folder saved with `datasets.save_to_disk`, or a folder of such files
  path/to/data:NAME         a dataset LLaMA-Factory's data/dataset_info.json names (pipeline/llamafactory.py)
  data/*.txt                a glob: every file it matches
  org/name[:split]          a hub dataset (default split: train); org/name:config:split with its configuration
or several: a list of specs (all their rows), or a mixture with a fraction of each, as alignment-handbook recipes
write them: {spec: fraction, ...} or {datasets: [{id, config, split, columns, weight}, ...], seed: N}.

Rows are checked against what the stage needs (`kind`) before any model is loaded; a bad row is reported as
one line naming the file and the row (JSONL: the line number).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import random
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

from pipeline import hub, llamafactory
from pipeline.cli import PipelineError
from pipeline.files import (arrow_rows, file_kind, folder_fingerprint, names_a_local_file, read_file, read_files,
                            read_folder)
from pipeline.fingerprints import hash_file, hash_folder, hash_obj
from pipeline.formats import (arguments_as_json, as_bool, bad_row, check_messages, check_tool_calls,
                              detect_sft_format, expected_sft_columns, is_text_completion, is_unpaired_preference,
                              json_messages, prompt_cells, to_sft_row, tools_json, tools_of)
from pipeline.rows_dataset import dataset_of

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


def _read_hub(spec: str) -> tuple[list[dict], list[str]]:
    rows = arrow_rows(hub.load_dataset(spec))
    return rows, [f"row {i}" for i in range(1, len(rows) + 1)]


def _read_one(spec: str, recipe, text_split: str) -> tuple[list[dict], list[str]]:
    if spec.startswith("world:"):
        rows = world_rows(recipe, spec.split(":", 1)[1])
        return rows, [f"row {i}" for i in range(1, len(rows) + 1)]
    path = Path(spec).expanduser()
    if path.is_file():
        return read_file(path, text_split)
    if path.is_dir():
        if registry := llamafactory.folder_registry(path):
            names = ", ".join(sorted(registry)[:12]) + (", ..." if len(registry) > 12 else "")
            raise PipelineError(f"{path}: a LLaMA-Factory data folder (its {llamafactory.REGISTRY} names datasets): "
                                f"name one as {spec}:NAME ({names})")
        return read_folder(path, text_split)
    if entry := llamafactory.entry_of(spec):
        return llamafactory.read(entry, recipe.run.seed)
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise PipelineError(f"dataset '{spec}': no file matches")
        return read_files(files, text_split, str)
    if names_a_local_file(spec):
        raise PipelineError(f"dataset '{spec}': file not found")
    return _read_hub(spec)


class Part(NamedTuple):
    """One dataset of a spec: its name (a world split, a path, a glob, a LLaMA-Factory entry or a hub id[:config]:
    split), the fraction of its rows a mixture takes (None: all), and the columns to keep (a list) or rename (a
    mapping)."""
    name: str
    fraction: float | None = None
    columns: object = None


MIXTURE_KEYS = ("datasets", "seed")
ENTRY_KEYS = ("id", "path", "config", "split", "columns", "weight", "fraction")


def mixture_parts(spec) -> tuple[list[Part], int | None]:
    """A spec as its parts and the mixture's seed: a string (one dataset or a glob), a list of specs (all rows of
    each), {spec: fraction} (alignment-handbook's dataset_mixer), or {datasets: [{id or path, config, split, columns,
    weight}], seed} (its dataset_mixture)."""
    if isinstance(spec, str):
        return [Part(spec)], None
    if isinstance(spec, dict) and "datasets" in spec:
        if not isinstance(spec["datasets"], list):
            raise PipelineError(f"dataset mixture: `datasets` must be a list of {{id or path, split, weight}}, got "
                                f"{spec['datasets']!r}")
        if "test_split_size" in spec:
            raise PipelineError("dataset mixture: test_split_size is not read here: name the stage's eval_dataset "
                                "(pretrain, reward, dpo and kto can hold out eval_fraction of their dataset instead)")
        if unknown := [k for k in spec if k not in MIXTURE_KEYS]:
            raise PipelineError(f"dataset mixture: unknown key '{unknown[0]}' (keys: {', '.join(MIXTURE_KEYS)})")
        parts = []
        for d in spec["datasets"]:
            name = (d.get("path") or d.get("id")) if isinstance(d, dict) else None
            if not isinstance(name, str):
                raise PipelineError(f"dataset mixture: each entry of `datasets` needs an `id` or `path`, got {d!r}")
            if unknown := [k for k in d if k not in ENTRY_KEYS]:
                raise PipelineError(f"dataset mixture: '{name}': unknown key '{unknown[0]}' (keys: "
                                    f"{', '.join(ENTRY_KEYS)})")
            if (config := d.get("config")) is not None:
                if not isinstance(config, str) or not config or ":" in config:
                    raise PipelineError(f"dataset mixture: '{name}': config must be a name, got {config!r}")
                if ":" in name or Path(name).exists():
                    raise PipelineError(f"dataset mixture: '{name}': config names a hub dataset's configuration (an "
                                        f"`id` without a split in it)")
                name = hub.dataset_spec(name, config, d.get("split"))
            elif d.get("split") and ":" not in name and not Path(name).exists():
                name = hub.dataset_spec(name, split=d["split"])
            parts.append(Part(name, d.get("weight", d.get("fraction")), d.get("columns")))
        return parts, spec.get("seed")
    if isinstance(spec, (list, dict)):
        parts = [Part(s) for s in spec] if isinstance(spec, list) else [Part(k, v) for k, v in spec.items()]
        bad = [part.name for part in parts if not isinstance(part.name, str)]  # a number or a list among the specs
        if bad:
            raise PipelineError(f"dataset spec {bad[0]!r}: expected a string")
        return parts, None
    raise PipelineError(f"dataset spec {spec!r}: expected a string, a list of specs or a mapping of spec: fraction")


def spec_name(spec) -> str:
    return spec if isinstance(spec, str) else " + ".join(part.name for part in mixture_parts(spec)[0])


def read_rows(spec, recipe, text_split: str = "paragraph") -> tuple[list[dict], list[str], str]:
    """Rows, where each row came from (for error messages), and a name for the source. A mixture takes
    `fraction` of each dataset's rows (shuffled with the mixture's seed, else run.seed) and shuffles the union."""
    return read_rows_by_part(spec, recipe, text_split)[:3]


def read_rows_by_part(spec, recipe, text_split: str = "paragraph"):
    """read_rows' rows, places and source, and which dataset of a list or mixture each row is from (its index):
    each dataset of a list may have a format of its own."""
    parts, seed = mixture_parts(spec)
    rows, where, part_of = [], [], []
    for index, (name, fraction, columns) in enumerate(parts):
        r, w = _read_one(name, recipe, text_split)
        if fraction is not None:
            if not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
                raise PipelineError(f"dataset mixture: the fraction of '{name}' must be in (0, 1], got {fraction!r}")
            order = list(range(len(r)))
            random.Random(recipe.run.seed if seed is None else seed).shuffle(order)
            keep = order[:max(1, round(fraction * len(r)))]
            r, w = [r[i] for i in keep], [w[i] for i in keep]
        if isinstance(columns, list):  # the handbook's `columns`: the ones to keep
            r = [{k: v for k, v in row.items() if k in columns} for row in r]
        elif isinstance(columns, dict):
            from pipeline.formats import rename_columns

            r = rename_columns(r, columns, name, w)
        rows += r
        where += [f"{name} {x}" if len(parts) > 1 else x for x in w]
        part_of += [index] * len(r)
    if len(parts) > 1 and any(part.fraction is not None for part in parts):
        order = list(range(len(rows)))
        random.Random(recipe.run.seed if seed is None else seed).shuffle(order)
        rows, where, part_of = [rows[i] for i in order], [where[i] for i in order], [part_of[i] for i in order]
    if not rows:
        raise PipelineError(f"{spec_name(spec)}: no rows")
    return rows, where, spec_name(spec), part_of


def plans_by_dataset(rows: list[dict], where: list[str], source, part_of: list[int] | None, plan_of) -> tuple:
    """({dataset index: plan_of(its first row, where to name it)}, each row's dataset index): a list's datasets each
    read in the format of its own first row (part_of None: one dataset)."""
    part_of = part_of or [0] * len(rows)
    several, plans = len(set(part_of)) > 1, {}
    for i, part in enumerate(part_of):
        if part not in plans:
            plans[part] = plan_of(rows[i], f"{source}: {where[i]}" if several else source)
    return plans, part_of


def fingerprint(spec, recipe, images: bool = False, key: str | None = None) -> str:
    """`images`: a metadata file's fingerprint also covers the image files it names (a folder's covers them all)."""
    if not isinstance(spec, str):  # a list or mixture: its parts' fingerprints and the mixing settings
        parts, seed = mixture_parts(spec)
        return hash_obj({"parts": [(fingerprint(p.name, recipe, key=key), p.fraction, p.columns) for p in parts],
                         "seed": seed, "run_seed": recipe.run.seed})
    if spec.startswith("world:"):  # the settings this split's rows are built from
        from pipeline.world_splits import split_settings

        return hash_obj({"world": split_settings(recipe.world, spec[6:]), "split": spec})
    path = Path(spec).expanduser()
    if path.is_file():
        if images:
            from pipeline.image_files import named_files

            return hash_obj({"metadata": hash_file(path), "images": named_files(path)})
        return hash_file(path)
    if path.is_dir():  # an image folder's images may sit in subfolders: all of it
        return hash_folder(path) if images else folder_fingerprint(path)
    if entry := llamafactory.entry_of(spec):
        return llamafactory.fingerprint(entry)
    if glob.has_magic(spec):
        return hash_obj([(p, hash_file(Path(p))) for p in sorted(glob.glob(str(path), recursive=True))
                         if Path(p).is_file()])
    if names_a_local_file(spec):  # away (unmounted): as a hub id, .partial goes
        raise PipelineError(f"{key + ': ' if key else ''}dataset '{spec}': file not found")
    return hash_obj({"hub": spec})


# ---------------------------------------------------------------------------------------------- checking


def _check_text(rows, where, source, column="text"):
    for row, w in zip(rows, where):
        if column not in row:
            bad_row(source, w, f"missing column '{column}' (columns: {', '.join(row) or 'none'})")
        if not isinstance(row[column], str):
            bad_row(source, w, f"'{column}' must be a string")
    return rows


def _check_chat(rows, where, source):
    """Conversations in any format of pipeline/formats.py, each row's detected from its columns (a list of datasets
    may mix formats, as LLaMA-Factory's `dataset: alpaca_x,sharegpt_y` does), as messages or prompt/completion rows.
    Rows that are no demonstrations (labelled replies, preference pairs) stop the stage wherever they are."""
    out, conversational, shape = [], None, None
    for row, w in zip(rows, where):
        fmt = detect_sft_format(row)
        if is_unpaired_preference(row):
            _not_demonstrations(source, w, not out, f"unpaired preference rows (a completion with a true/false label, "
                                f"TRL's KTO format) are not demonstrations (columns: {', '.join(row)}); train on "
                                f"them with the kto stage, or keep the rows labelled true and drop the label column")
        if fmt == "sharegpt" and {"chosen", "rejected"} <= set(row):  # LLaMA-Factory's ranking rows
            _not_demonstrations(source, w, not out, f"ShareGPT preference pairs (the replies in chosen/rejected) are "
                                f"not demonstrations (columns: {', '.join(row)}); use them as reward.dataset or "
                                f"dpo.dataset")
        if fmt is None:
            _not_demonstrations(source, w, not out, f"no conversation format matches the columns "
                                f"({', '.join(row) or 'none'}); expected {expected_sft_columns()}")
        out.append({**{k: v for k, v in row.items() if k not in FORMAT_COLUMNS}, **to_sft_row(row, fmt, source, w)})
        is_conv = not is_text_completion(out[-1])  # messages, or prompt/completion as messages
        if conversational is not None and is_conv != conversational:
            bad_row(source, w, f"mixes text and conversation rows (earlier rows are "
                               f"{'conversations' if conversational else 'text'})")
        conversational = is_conv
        row_shape = "prompt/completion" if "completion" in out[-1] else "messages"
        if shape is not None and row_shape != shape:  # TRL takes a dataset with `prompt` for prompt/completion
            bad_row(source, w, f"mixes {row_shape} rows with {shape} rows before it: TRL's SFTTrainer trains one "
                               f"of the two per dataset; write the prompt/completion rows as messages (prompt + "
                               f"completion) or the others as prompt/completion")
        shape = row_shape
    return out


def _not_demonstrations(source, where, first: bool, why: str):
    """The first row speaks for its file (no row named); a later one is named."""
    if first:
        raise PipelineError(f"{source}: {why}")
    bad_row(source, where, why)


def _check_prompts(rows, where, source):
    """Prompts: `prompt` as text or messages (in a CSV, a JSON list of messages), with the `tools` it offers."""
    for row, w in zip(rows, where):
        if "prompt" not in row:
            bad_row(source, w, f"missing column 'prompt' (columns: {', '.join(row) or 'none'})")
        row["prompt"] = json_messages(row["prompt"])  # CSV cells hold JSON text
        tools = tools_of(row, source, w)
        if isinstance(row["prompt"], list):
            check_messages(row["prompt"], source, w, need_assistant=False)
            # earlier calls fit the row's tools; a row without tools is not checked (eval offers it every tool of
            # the recipe, ppo none). Arguments become JSON text either way (one Arrow type, as for sft and dpo)
            if tools is None:
                arguments_as_json(row["prompt"])
            else:
                check_tool_calls(row["prompt"], tools, source, w)
            users = [m for m in row["prompt"] if m["role"] == "user"]
            if not users or not str(users[-1].get("content") or "").strip():
                bad_row(source, w, "'prompt' needs a user turn with text (the last user turn is what is asked)")
        elif not isinstance(row["prompt"], str) or not row["prompt"].strip():
            bad_row(source, w, "'prompt' must be non-empty text or a list of messages")
        if row.get("tools") is not None:  # a list of schemas as JSON text; [] or "[]": None
            row["tools"] = tools_json(row["tools"], tools)
    return rows


FORMAT_COLUMNS = {"messages", "conversations", "instruction", "input", "output", "history", "system", "prompt",
                  "completion", "tools"}
CHECKS = {"text": _check_text, "chat": _check_chat, "prompts": _check_prompts}


def load_with_info(spec, kind: str, recipe, columns: dict | None = None, text_split="paragraph", places=False, **kw):
    """Read a dataset spec, map its columns (`columns`: {our name: the file's name}), check every row for `kind`,
    and return a `datasets.Dataset` with what was read: {source, rows, format} (`places`: and where each row is
    from, for a check after loading: a list's files and their own rows)."""
    from pipeline.formats import rename_columns

    rows, where, source = read_rows(spec, recipe, text_split=text_split)
    rows = rename_columns(rows, columns, source, where)
    plain = any(file_kind(Path(p)) == "txt" for part in mixture_parts(spec)[0]
                for p in (glob.glob(str(Path(part.name).expanduser())) if glob.has_magic(part.name) else [part.name]))
    fmt = {"chat": lambda: " + ".join(dict.fromkeys(str(detect_sft_format(row)) for row in rows)),  # each row's
           "text": lambda: f"txt, a document per {text_split}" if plain else "text", "prompts": lambda: "prompts",
           "eval_prompts": lambda: "prompts"}[kind]()
    rows = CHECKS[kind](rows, where, source, **kw)
    ds = dataset_of(rows, source, where)
    return (ds, {"source": source, "rows": len(ds), "format": fmt}) + ((where,) if places else ())


def load(spec, kind: str, recipe, **kw):
    """`load_with_info` without the info."""
    return load_with_info(spec, kind, recipe, **kw)[0]


def _check_eval_prompts(rows, where, source):
    """Evaluation prompts: `prompt` (text or messages; in CSV a JSON list of messages), optional `answer` (a
    reference: text or a number) and `skill` (text: a world skill names its verifier, anything else a category)."""
    for row, w in zip(rows, where):
        _check_prompts([row], [w], source)
        for col in ("answer", "skill"):
            if isinstance(row.get(col), float) and row[col] != row[col]:  # an empty CSV/Parquet cell: NaN
                row[col] = None
        answer, skill = row.get("answer"), row.get("skill")
        if answer is not None:
            if isinstance(answer, bool) or not isinstance(answer, (str, int, float)) or not str(answer).strip():
                bad_row(source, w, f"'answer' must be non-empty text or a number, got {answer!r}")
        if skill is not None and not isinstance(skill, str):
            bad_row(source, w, f"'skill' must be text, got {skill!r}")
        if isinstance(row.get("hard"), str):  # the world's difficulty, in a CSV as text
            row["hard"] = as_bool(row["hard"])
        prompt_cells(row, source, w)
    return rows


CHECKS["eval_prompts"] = _check_eval_prompts


def warn_unread_completions(rows, source) -> None:
    """TRL's prompt-completion rows read as prompts to score: their `completion` is no reference answer, say so."""
    from pipeline import log

    if unread := sum(r.get("completion") is not None and r.get("answer") is None for r in rows):
        log.warning(f"{source}: {unread} of {len(rows)} rows have a `completion` and no `answer`: `completion` is not "
                    f"read as a reference answer; name the reference column `answer`")


# ---------------------------------------------------------------------------------------------- warnings

TRAINING_KEYS = ("dataset", "prompts")
EVAL_KEYS = ("eval_dataset", "heldout_prompts", "perplexity_data")


def warn_world_eval(recipe, stage: str, keys) -> None:
    """A user's training data measured on the task world's held-out splits says little about that data: say so."""
    from pipeline import log

    user = [getattr(keys, k) for k in TRAINING_KEYS if getattr(keys, k, None)]
    if stage == "eval":
        user = [keys.prompts]
    # a list or mixture of world splits (the small recipe's sft data) is the world's too
    if not user or all(part.name.startswith("world:") for u in user for part in mixture_parts(u)[0]):
        return
    world = [f"{stage}.{k}={getattr(keys, k)}" for k in EVAL_KEYS
             if isinstance(getattr(keys, k, None), str) and getattr(keys, k).startswith("world:")]
    if world:
        log.warning(f"your data is paired with the task world's held-out data ({', '.join(world)}): those figures "
                    f"measure the world's tasks, not yours; set them to your own held-out data or empty")


def left_out(kept_rows, given: int, source, unit: str, why: str) -> int:
    """How many of the `given` rows (pairs) the trainer left out (TRL drops those its max_length leaves nothing to
    learn from, without a word); all of them stop the stage in one line, before it trains: `{source}: all {given}
    {unit} {why}`. `kept_rows`: the trainer's dataset."""
    kept = len(kept_rows)
    if given and not kept:
        raise PipelineError(f"{source}: all {given} {unit} {why}")
    return given - kept


def warn_many_epochs(args, rows: int, num_processes: int) -> None:
    """max_steps that loops a small dataset many times: say how many epochs that is."""
    from pipeline import log

    if getattr(args, "max_steps", -1) > 0 and rows:
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * num_processes
        epochs = args.max_steps * per_step / rows
        if epochs > 3:
            log.warning(f"max_steps={args.max_steps} at {per_step} examples per step is {epochs:.1f} epochs of the "
                        f"{rows} training rows: the model may memorise them")

