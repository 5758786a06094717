"""Runs a Trainer stage script as it is, printing one line per optimizer step: when it ended and the tokens so far.

    python benchmarks/step_timer.py pipeline/sft.py recipes/small.yaml sft.logging_steps=1 ...

Each line on stderr: `[step_timer] STEP SECONDS TOKENS`: the global step, seconds since training began (the end of
that step) and, where the trainer logs it (TRL's `num_tokens`, at every step with logging_steps=1), the real tokens
trained so far, else `-`. mfu.py reads them to time the steps after the first few (compilation, allocator warm-up)
apart from the run's whole `train_runtime`. With STEP_TIMER_EXIT=1 the process leaves right after training, without
the stage's final evaluation and save: for stages whose output no later benchmark step reads.
"""

import os
import runpy
import sys
import time

import transformers
from transformers import TrainerCallback


class StepTimer(TrainerCallback):
    def __init__(self):
        self.start = None
        self.tokens = "-"

    def on_train_begin(self, args, state, control, **kw):
        self.start = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "num_tokens" in logs:
            self.tokens = f"{float(logs['num_tokens']):.0f}"
            print(f"[step_timer] {state.global_step} {self.elapsed:.3f} {self.tokens}", file=sys.stderr, flush=True)

    def on_step_end(self, args, state, control, **kw):
        self.elapsed = time.perf_counter() - self.start
        if self.tokens == "-":  # no token counts logged (plain Trainer): print each step here
            print(f"[step_timer] {state.global_step} {self.elapsed:.3f} -", file=sys.stderr, flush=True)

    def on_train_end(self, args, state, control, **kw):
        if os.environ.get("STEP_TIMER_EXIT") == "1":
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


_init = transformers.Trainer.__init__


def _init_with_timer(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.add_callback(StepTimer())


if __name__ == "__main__":
    transformers.Trainer.__init__ = _init_with_timer
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
