"""Fault injection for the reliability tests and the soak (tests/test_reliability.py, benchmarks/soak.py): never set
in normal use, and then nothing here does anything.

    PIPELINE_FAULT=kill:final-save python pipeline/sft.py recipe.yaml      # SIGKILL itself while saving the model
    PIPELINE_FAULT=kill:training:5 ...                                       # at the end of the 5th training step
    PIPELINE_FAULT=enospc:checkpoint:2 ...                                   # "No space left" in the 2nd checkpoint
    PIPELINE_FAULT=pause:training:2 PIPELINE_FAULT_MARKER=/tmp/m ...         # write /tmp/m, wait for a signal
                                                          # (a `{pid}` in the marker: one file per process)

Points: `loading` (the stage folder exists, models and data are being loaded), `training` (after an optimizer
step), `checkpoint` (inside a checkpoint save: weights and optimizer written, the rest not), `round` (iterated DPO:
a round finished and its state written), `reward-round` (PPO's reward rounds: the round's reward model and pairs
written, its state and the rename not), `final-save` (the model's weights written, the tokenizer and everything after
not yet), `publish` (the stage folder complete, metrics and manifest written, not yet renamed to its final name).
Actions: `kill` (SIGKILL: nothing runs after it, as with a lost node or the OOM killer) and `enospc` (the write fails
as on a full disk).
"""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

ENV = "PIPELINE_FAULT"
_counts: dict[str, int] = {}


def point(name: str, until=None) -> None:
    """`until`: for `pause`, a callable that says the wait is over (e.g. a stop signal arrived)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    action, _, rest = spec.partition(":")
    where, _, nth = rest.partition(":")
    if where != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] != int(nth or 1):
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"(injected at {name})")
    elif action == "pause":  # tell the test where we are (PIPELINE_FAULT_MARKER), wait for its signal
        Path(os.environ[ENV + "_MARKER"].replace("{pid}", str(os.getpid()))).write_text(str(os.getpid()))
        deadline = time.time() + float(os.environ.get(ENV + "_WAIT", 60))
        while time.time() < deadline and not (until and until()):
            time.sleep(0.05)


def install_trainer_hooks() -> None:
    """The `checkpoint` point inside transformers' Trainer._save_checkpoint: after the weights and the optimizer
    are written, before the RNG state and trainer_state.json (what makes a checkpoint complete)."""
    if not os.environ.get(ENV, "").split(":")[1:2] == ["checkpoint"]:
        return
    from transformers import Trainer

    original = Trainer._save_rng_state

    def save_rng_state(self, output_dir):
        point("checkpoint")
        return original(self, output_dir)

    Trainer._save_rng_state = save_rng_state
