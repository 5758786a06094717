"""Resuming a killed stage: which checkpoint, whether it is whole, whether it is safe, and what the run's numbers are.

`find_checkpoint(out)` picks the newest checkpoint in a `.partial` folder that is complete and intact:
- complete: the trainer's `trainer_state.json` (written last by a Trainer) or our loops' `loop_state.json` (written
  before the folder is renamed into place) parses; a save cut short by a kill, or by a full disk, lacks it;
- intact: every file passes `integrity.file_problem` (safetensors sizes, JSON, torch files loadable with
  `weights_only=True`). A damaged checkpoint is skipped with a warning and the one before it used;
- safe: a file that could run code when loaded (a pickle naming globals, a file of unknown type) stops the stage
  with a one-line error naming it (`integrity.UnsafeFile`, exit 2): nothing of it has been executed.
- not finished: a Trainer checkpoint at the last step is skipped (see `preemption.PreemptionCallback`, which does not
  save one): resuming from it made transformers train one step past `max_steps`.
- whole state: a Trainer checkpoint without an RNG state file holds weights only (`save_only_model: true`: transformers
  then writes no optimizer, scheduler or RNG state) and is skipped: resumed, it trained on with a fresh optimizer.
`training_args.bin`, the pickle transformers writes into every checkpoint and never reads back, is removed unread.

`train_loss(log_history)` is the mean training loss over the whole run, resumed or not: the step-weighted mean of
the logged windows (every checkpoint is taken at a logging step, so the windows before a resume are all there).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from pipeline import integrity, log

TRAINER_STATE = "trainer_state.json"
LOOP_STATE = "loop_state.json"
NEVER_LOADED = ("training_args.bin",)
# Trainer._save_checkpoint writes rng_state.pth (rng_state_<rank>.pth when distributed) in every checkpoint but those
# of save_only_model, plain, DeepSpeed and FSDP alike; the optimizer's files are named differently in each
RNG_STATE = "rng_state*.pth"


def step_of(path: Path) -> int:
    try:
        return int(path.name.split("-")[-1])
    except ValueError:
        return -1


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def checkpoint_problem(ckpt: Path, plan: bool = False) -> str | None:
    """Why this checkpoint cannot be resumed from (None: it can). Raises integrity.UnsafeFile for unsafe files.
    plan: asked before the stage runs (find_checkpoint's `plan`): its state files only, nothing removed; reading every
    file (an optimizer's state can be GBs) is the stage's, which then may take an older checkpoint and say why."""
    trainer_state, loop_state = read_json(ckpt / TRAINER_STATE), read_json(ckpt / LOOP_STATE)
    if trainer_state is None and loop_state is None:
        return "incomplete (cut short while saving)"
    if trainer_state is not None and trainer_state.get("max_steps") and \
            trainer_state.get("global_step", 0) >= trainer_state["max_steps"]:
        return "taken at the last step (resuming from it would train a step past max_steps)"
    if not plan:
        for name in NEVER_LOADED:
            (ckpt / name).unlink(missing_ok=True)
        for path in sorted(p for p in ckpt.rglob("*") if p.is_file()):
            if (problem := integrity.file_problem(path)):
                return f"{path.name}: {problem}"
    # after the scan: an unsafe file stops the stage here too, as in any checkpoint looked at
    if trainer_state is not None and not any(ckpt.glob(RNG_STATE)):
        return ("holds weights only, no optimizer or RNG state (saved with save_only_model: true): resuming from it "
                "would not match an unbroken run")
    return None


def find_checkpoint(out: Path, plan: bool = False) -> Path | None:
    """The newest checkpoint-N in `out` that is complete, intact and safe (see the module docstring). plan: what the
    stage will resume from, told before it runs (the runner's plan): nothing removed, the skipped ones not logged."""
    for ckpt in sorted(Path(out).glob("checkpoint-*"), key=step_of, reverse=True):
        if not ckpt.is_dir():
            continue
        problem = checkpoint_problem(ckpt, plan)
        if problem is None:
            return ckpt
        if not plan:
            log.warning("not resuming from %s: %s", ckpt, problem)
    return None


def keeps(out: Path, fingerprint: str) -> bool:
    """Whether a stage of inputs `fingerprint` keeps the `.partial` folder `out` to resume from: a killed attempt of
    the same inputs wrote it (its `.fingerprint`); runs.StageRun wipes any other."""
    marker = Path(out) / ".fingerprint"
    return marker.is_file() and marker.read_text() == fingerprint


def newest_loop_state(out: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint-N in `out` whose loop_state.json parses, and that state, before any of its other files is
    read: what our loops check of their launch first (diffusion_launch.check_resume)."""
    for ckpt in sorted(Path(out).glob("checkpoint-*"), key=step_of, reverse=True):
        if ckpt.is_dir() and isinstance(state := read_json(ckpt / LOOP_STATE), dict):
            return ckpt, state
    return None


def train_loss(log_history: list[dict]) -> float:
    """Mean of the per-step training loss over every logged step of the run (also the steps before a resume)."""
    total, last = 0.0, 0
    for entry in log_history:
        if "loss" in entry and "step" in entry and entry["step"] > last:
            total += entry["loss"] * (entry["step"] - last)
            last = entry["step"]
    return total / last if last else math.nan
