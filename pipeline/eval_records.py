"""Eval's per-checkpoint records: what one checkpoint answered, kept so that it is not generated twice.

Generating is most of eval's time, and it depends on the checkpoint and on little else: the prompts, the chat
template, the generation settings and seed, how the model loads, the KL reference, the library versions and the
pipeline's own code. Each checkpoint's replies (greedy and sampled, with their token ids), their verifier verdicts,
the samples' log-probs under the checkpoint and the reference, and the perplexity are saved as
`checkpoints/<key>.json` in eval's folder, the key a hash of all of those inputs. A later evaluation (a checkpoint
added to `checkpoints`, the baseline or the reward model changed, or the same one killed and started again) reads a
checkpoint's record instead of generating when its key matches, from the folder being written or the finished
`eval/` before it. The tool prompts' rollouts have records of their own (`checkpoints/<key>.json` and the images
drawn in `checkpoints/<key>/`), keyed also by the tools, the folders they load and the tool settings. What depends
on the other checkpoints or on the reward model (win rates, reward scores, best-of-n) is computed again.
`eval.reuse: false` generates everything afresh.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np

from pipeline import log, runs
from pipeline.eval_tools import ToolRun
from pipeline.fingerprints import hash_obj
from pipeline.generation import Reply
from pipeline.tool_calls import ToolResult

FOLDER = "checkpoints"
REPLY_LISTS = ("greedy",)                   # one Reply per prompt
SAMPLE_LISTS = ("samples",)                 # a list of Replies per prompt
ARRAYS = ("sample_logprobs", "log_ratios")  # (prompts, samples) floats
PLAIN = ("correct", "sample_correct", "perplexity", "perplexity_tokens", "seconds")


def fingerprint(cp) -> dict | None:
    """A checkpoint as a key holds it: by content, so a moved run folder keeps its records."""
    return None if cp is None else {"fingerprint": cp.fingerprint, "source": cp.source}


def common(recipe, target, seed: int) -> dict:
    """What every record of `target` depends on: the checkpoint, how it loads, its chat template, how it samples."""
    return {"checkpoint": fingerprint(target.checkpoint), "chat_template": target.tokenizer.chat_template,
            "model": dataclasses.asdict(recipe.model),  # dtype, attention, revision, trust_remote_code
            "backend": dataclasses.asdict(recipe.generation), "seed": seed, "versions": runs.library_versions(),
            "code": runs.stage_code("eval")}


def record_key(recipe, keys, target, rows, ppl_rows, reference, own_samples: bool, seed: int) -> str:
    """The hash of everything a checkpoint's record depends on (`reference`: the KL reference's Checkpoint, or
    None when no KL is measured)."""
    return hash_obj({
        **common(recipe, target, seed),
        "generation": {name: getattr(keys, name) for name in
                       ("max_new_tokens", "num_samples", "temperature", "top_p", "batch_size")},
        "own_samples": own_samples,
        "reference": fingerprint(reference),
        "prompts": rows,
        "perplexity_rows": ppl_rows,
    })


def tool_key(recipe, keys, target, tool_rows, tool_inputs: dict, reference, seed: int) -> str:
    """The hash of everything a checkpoint's tool rollouts depend on (`tool_inputs`: the stage's recorded inputs of
    the tools' folders; `reference`: the KL reference's Checkpoint when the tool prompts' KL is measured)."""
    return hash_obj({
        **common(recipe, target, seed),
        "tools": dataclasses.asdict(recipe.tools),
        "tool_inputs": {name: {k: v for k, v in cp.items() if k in ("fingerprint", "source")}
                        for name, cp in tool_inputs.items()},
        "settings": {name: getattr(keys, name) for name in
                     ("max_tool_calls", "tool_max_new_tokens", "tool_max_total_tokens", "tool_samples", "batch_size")},
        "reference": fingerprint(reference),
        "prompts": tool_rows,
    })


def find(recipe, keys, targets, rows, ppl_rows, reference, own_samples: bool, seed: int, earlier: list[Path],
         tools, inputs: dict, tool_reference) -> None:
    """Key every target's records and read those `earlier` holds: replies into the target (`target.record`: from
    where), tool rollouts into `tools.runs` with their images in `tools.images` (`target.tool_record`). `reference`
    / `tool_reference`: the KL reference of the prompts / the tool prompts, or None; `inputs`: the stage's recorded
    checkpoints (the tools' folders among them)."""
    tool_inputs = {name: cp for name, cp in inputs.items() if name.startswith("tools.") or name == "image_judge"}
    for t in targets:
        t.record_key = record_key(recipe, keys, t, rows, ppl_rows, reference, own_samples, seed)
        t.record = load(earlier, t.record_key, t)
        if tools is not None:
            t.tool_key = tool_key(recipe, keys, t, tools.rows, tool_inputs, tool_reference, seed)
            if (found := load_tools(earlier, t.tool_key, tools.images / t.name)) is not None:
                tools.runs[t.name], t.tool_seconds, t.tool_record = found


def save(folder: Path, key: str, target) -> None:
    """Write `target`'s record under `folder`/checkpoints (atomically: a kill leaves no half record)."""
    record = {"name": target.name, "checkpoint": target.checkpoint.path, "key": key}
    for name in REPLY_LISTS:
        record[name] = [dataclasses.asdict(r) for r in getattr(target, name)]
    for name in SAMPLE_LISTS:
        value = getattr(target, name)
        record[name] = None if value is None else [[dataclasses.asdict(r) for r in replies] for replies in value]
    for name in ARRAYS:
        value = getattr(target, name)
        record[name] = None if value is None else np.asarray(value, dtype=float).tolist()
    for name in PLAIN:
        record[name] = getattr(target, name)
    (folder / FOLDER).mkdir(exist_ok=True)
    runs.write_json(folder / FOLDER / f"{key}.json", record)


def keep(folder: Path, path: Path) -> None:
    """A record read from elsewhere (the last eval's folder), with its images, copied as it is into `folder`'s
    records, so the folder published next keeps it; one read from `folder` itself stays where it is."""
    records = folder / FOLDER
    if path.parent.resolve() == records.resolve():
        return
    records.mkdir(exist_ok=True)
    if path.with_suffix("").is_dir():  # a tool record's images: checkpoints/<key>/
        shutil.rmtree(records / path.stem, ignore_errors=True)
        shutil.copytree(path.with_suffix(""), records / path.stem)
    tmp = records / f"{path.name}.tmp"
    shutil.copyfile(path, tmp)
    tmp.replace(records / path.name)  # last, and whole: a record is never without its images


def read(folders: list[Path], key: str) -> tuple[dict, Path] | None:
    """(the record with this key, its path) from the first of `folders` that has it, or None. A damaged record (cut
    short by a full disk, edited) is warned about and passed over: what it held is made again."""
    for folder in folders:
        path = folder / FOLDER / f"{key}.json"
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (OSError, json.JSONDecodeError) as err:
            log.warning(f"{path}: unreadable ({err}): made again instead")
            continue
        if record.get("key") == key:
            return record, path
    return None


def load(folders: list[Path], key: str, target) -> Path | None:
    """Fill `target` from the first of `folders` holding a record with this key; the record's path, or None."""
    if (found := read(folders, key)) is None:
        return None
    record, path = found
    for name in REPLY_LISTS:
        setattr(target, name, [Reply(**r) for r in record[name]])
    for name in SAMPLE_LISTS:
        value = record[name]
        setattr(target, name, None if value is None else [[Reply(**r) for r in replies] for replies in value])
    for name in ARRAYS:
        value = record[name]
        setattr(target, name, None if value is None else np.asarray(value, dtype=float))
    for name in PLAIN:
        setattr(target, name, record[name])
    return path


def rollout_record(rollout: dict) -> dict:
    return {**rollout, "calls": [dataclasses.asdict(c) for c in rollout["calls"]]}


def rollout_from(record: dict) -> dict:
    return {**record, "calls": [ToolResult(**c) for c in record["calls"]]}


def save_tools(folder: Path, key: str, run: ToolRun, seconds: float, images: Path) -> None:
    """Write a checkpoint's tool rollouts (`images`: the folder its drawn images are in) as a record."""
    record = {"key": key, "seconds": seconds, "kl_note": run.kl_note,
              "greedy": [rollout_record(r) for r in run.greedy], "verdicts": run.verdicts,
              "samples": None if run.samples is None else [[rollout_record(r) for r in rs] for rs in run.samples],
              "log_ratios": None if run.log_ratios is None else np.asarray(run.log_ratios, dtype=float).tolist(),
              "images": sorted(run.images or {})}
    path, drawn = folder / FOLDER / f"{key}.json", folder / FOLDER / key
    (folder / FOLDER).mkdir(exist_ok=True)
    path.unlink(missing_ok=True)  # a record is never without its images: gone while they are replaced
    shutil.rmtree(drawn, ignore_errors=True)
    if images.is_dir():
        shutil.copytree(images, drawn)
    runs.write_json(path, record)


def load_tools(folders: list[Path], key: str, images: Path) -> tuple[ToolRun, float, Path] | None:
    """(the tool rollouts, the seconds they took, the record) from the first of `folders` with this key, their
    drawn images copied into `images`; None when there is none."""
    import torch
    from PIL import Image

    if (found := read(folders, key)) is None:
        return None
    record, path = found
    loaded = {}
    try:
        if record["images"]:
            shutil.rmtree(images, ignore_errors=True)
            shutil.copytree(path.with_suffix(""), images)  # checkpoints/<key>/
        for image_id in record["images"]:  # as the image store holds them: C x H x W in [0, 1]
            pixels = torch.from_numpy(np.array(Image.open(images / f"{image_id}.png"))).float() / 255
            loaded[image_id] = pixels[None] if pixels.dim() == 2 else pixels.permute(2, 0, 1)
    except OSError as err:  # its images deleted or damaged: roll out again
        log.warning(f"{path}: the images drawn are not all there ({err}): rolling out instead")
        shutil.rmtree(images, ignore_errors=True)
        return None
    run = ToolRun([rollout_from(r) for r in record["greedy"]], record["verdicts"],
                  None if record["log_ratios"] is None else np.asarray(record["log_ratios"], dtype=float),
                  None if record["samples"] is None else [[rollout_from(r) for r in rs] for rs in record["samples"]],
                  record["kl_note"], loaded)
    return run, record["seconds"], path
