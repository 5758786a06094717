"""Eval's per-checkpoint records: what one checkpoint answered, kept so that it is not generated twice.

Generating is most of eval's time, and it depends on the checkpoint and on little else: the prompts, the chat
template, the generation settings and seed, how the model loads, the KL reference and the library versions. Each
checkpoint's replies (greedy and sampled, with their token ids), their verifier verdicts, the samples' log-probs
under the checkpoint and the reference, and the perplexity are saved as `checkpoints/<key>.json` in eval's folder,
the key a hash of all of those inputs. A later evaluation (a checkpoint added to `checkpoints`, the baseline or the
reward model changed, or the same one killed and started again) reads a checkpoint's record instead of generating
when its key matches, from the folder being written or the finished `eval/` before it. What depends on the other
checkpoints or on other models (win rates, reward scores, best-of-n, the tool prompts' rollouts) is computed again.
`eval.reuse: false` generates everything afresh.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from pipeline import log, runs
from pipeline.fingerprints import hash_obj
from pipeline.generation import Reply

FOLDER = "checkpoints"
REPLY_LISTS = ("greedy",)                   # one Reply per prompt
SAMPLE_LISTS = ("samples",)                 # a list of Replies per prompt
ARRAYS = ("sample_logprobs", "log_ratios")  # (prompts, samples) floats
PLAIN = ("correct", "sample_correct", "perplexity", "perplexity_tokens", "seconds")


def record_key(recipe, keys, target, rows, ppl_rows, reference, own_samples: bool, seed: int) -> str:
    """The hash of everything a checkpoint's record depends on (`reference`: the KL reference's Checkpoint, or
    None when no KL is measured). Checkpoints by fingerprint, so a moved run folder keeps its records."""
    def checkpoint(cp):
        return None if cp is None else {"fingerprint": cp.fingerprint, "source": cp.source}

    return hash_obj({
        "checkpoint": checkpoint(target.checkpoint),
        "chat_template": target.tokenizer.chat_template,
        "model": dataclasses.asdict(recipe.model),  # dtype, attention, revision, trust_remote_code: how it loads
        "generation": {name: getattr(keys, name) for name in
                       ("max_new_tokens", "num_samples", "temperature", "top_p", "batch_size")},
        "backend": dataclasses.asdict(recipe.generation),
        "seed": seed,
        "own_samples": own_samples,
        "reference": checkpoint(reference),
        "prompts": rows,
        "perplexity_rows": ppl_rows,
        "versions": runs.library_versions(),
    })


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


def load(folders: list[Path], key: str, target) -> Path | None:
    """Fill `target` from the first of `folders` holding a record with this key; the record's path, or None."""
    for folder in folders:
        path = folder / FOLDER / f"{key}.json"
        try:
            record = json.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (OSError, json.JSONDecodeError) as err:
            log.warning(f"{path}: unreadable ({err}): generating instead")
            continue
        if record.get("key") != key:
            continue
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
    return None
