"""Stopping a stage cleanly when it is preempted.

Every stage run (runs.StageRun) calls `watch_for_preemption()`: SIGUSR1 (Slurm's warning before the time limit, see
launch/slurm/stage.sbatch), and SIGTERM or SIGINT while a trainer is training (preemption, `scontrol requeue`,
`scancel`, a plain `kill`, Ctrl-C, or any of them sent to pipeline/run.py, which passes them on), ask the stage to
stop. Every transformers/TRL Trainer the stage builds gets `PreemptionCallback`: at the end of each optimizer step the
processes agree (one all-reduce) whether any of them was asked to stop; if so they save a trainer checkpoint into the
stage's `.partial` folder together and exit with `PREEMPTED_EXIT`. The next run of the same inputs resumes from that
checkpoint (`run.last_checkpoint()`). Stages with their own training loop call `stop_requested()` at the same point
of every step and `exit_preempted()` after saving.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path

from pipeline import faults, log, threads

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped on request after saving a checkpoint; run again to resume


class _StopState:
    requested: int | None = None   # the signal that asked this process to stop
    training: bool = False         # a trainer is inside its training loop (SIGTERM then means: save and stop)
    installed: bool = False

    def signalled(self) -> bool:
        """A stop signal reached this process: what ends a test's pause inside a training loop."""
        return self.requested is not None


STOP = _StopState()
BEFORE_PREEMPTED_EXIT: list = []  # called on the main process before exit_preempted leaves (the stage's cost so far)
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)  # SIGINT: Ctrl-C, or passed on by pipeline/run.py


def _on_signal(signum, frame):
    if signum == signal.SIGINT and not STOP.training:
        signal.default_int_handler(signum, frame)  # KeyboardInterrupt, as without a handler
    if signum == signal.SIGTERM and not STOP.training:
        # nothing to checkpoint right now: behave as if we had no handler
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    STOP.requested = signum


def watch_for_preemption() -> None:
    """Install the signal handlers and give every Trainer built from now on a PreemptionCallback."""
    import threading

    if STOP.installed or threading.current_thread() is not threading.main_thread():
        return
    STOP.installed = True
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_signal)
    import transformers.trainer as hf_trainer

    # Trainer.__init__ starts from this module-level list; TRL's trainers subclass Trainer. Registering here gives
    # every trainer of every stage the callback without each stage having to remember it.
    if _callback_class() not in hf_trainer.DEFAULT_CALLBACKS:
        hf_trainer.DEFAULT_CALLBACKS.append(_callback_class())


def stop_requested(device=None) -> bool:
    """Collective: True on every process when any process was asked to stop. Call at the same point of each step on
    every process (stages with their own training loop; Trainer stages get it from PreemptionCallback)."""
    import torch
    import torch.distributed as dist

    local = STOP.requested is not None
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([1.0 if local else 0.0], device=device if device is not None else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)
    return local


def exit_preempted(checkpoint: str | Path | None, is_main: bool = True) -> None:
    """Leave the stage after a checkpoint was saved on request: every process waits for the others, then exits
    with PREEMPTED_EXIT (the `.partial` folder stays; the next run with the same inputs resumes)."""
    import torch.distributed as dist

    if is_main:
        name = signal.Signals(STOP.requested).name if STOP.requested else "a signal to another process"
        log.info(f"preempted: stopped on {name}; saved {checkpoint}; run the stage again to resume from it")
        for hook in list(BEFORE_PREEMPTED_EXIT):
            hook()
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        raise SystemExit(PREEMPTED_EXIT)
    dist.barrier()  # no process leaves (and gets the others killed by the launcher) before all have saved
    # Leave at once, skipping interpreter shutdown: there the process group's destructor can abort (SIGABRT) when
    # a peer has already closed its sockets, and the launcher would report a crash instead of "stopped, resume".
    # Everything the next run needs is on disk already.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(PREEMPTED_EXIT)


@functools.lru_cache(maxsize=None)
def _callback_class():
    from transformers import TrainerCallback

    class PreemptionCallback(TrainerCallback):
        """Saves a checkpoint and stops every process together once any of them was asked to stop."""

        stopping = False

        def on_train_begin(self, args, state, control, **kw):
            STOP.training = True
            if args.save_only_model and args.save_strategy != "no" and state.is_world_process_zero:
                log.warning("save_only_model: true: checkpoints hold weights only, and a stage killed without a stop "
                            "signal starts over (the checkpoint a signal saves holds the whole state, until "
                            "save_total_limit rotates it out)")

        def on_train_end(self, args, state, control, **kw):
            STOP.training = False

        def on_step_begin(self, args, state, control, **kw):
            threads.rebalance()  # another stage started or ended next to this one: take our share of the CPUs

        def on_step_end(self, args, state, control, **kw):
            faults.point("training", until=STOP.signalled)
            last = state.global_step >= state.max_steps
            if stop_requested(args.device) and not last:  # at the last step, finishing is the quickest way out
                self.stopping = True
                control.should_save = True
                control.should_training_stop = True
                # this checkpoint is for resuming: with its optimizer and RNG state, whatever save_only_model keeps
                # out of the periodic ones (a weights-only one is not resumed from, and a job preempted again and
                # again would start over each time)
                args.save_only_model = False
            if last:
                # No checkpoint of a finished run: a kill during the final save resumes from the one before and
                # trains exactly the missing steps (transformers resumed from a last-step checkpoint trains one
                # step past max_steps). Log at every checkpoint and at the end, so that the logged loss windows
                # cover the whole run after any resume (safe_resume.train_loss).
                control.should_save = False
            if control.should_save or last:
                control.should_log = True
            return control

        def on_save(self, args, state, control, **kw):
            if state.is_world_process_zero:  # a pickle of the arguments, never read back (manifest.json has them)
                (Path(args.output_dir) / f"checkpoint-{state.global_step}" / "training_args.bin").unlink(
                    missing_ok=True)
            if self.stopping:
                STOP.training = False
                exit_preempted(Path(args.output_dir) / f"checkpoint-{state.global_step}",
                               state.is_world_process_zero)
            return control

    return PreemptionCallback
