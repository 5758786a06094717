"""Command-line plumbing shared by every stage: argument parsing and the bad-input contract.

Bad input (recipe, overrides, data) raises PipelineError; `run_main` turns it into one line on stderr and
exit code 2, with no traceback. Anything else is a bug or a crash and keeps its traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path


class PipelineError(Exception):
    """Bad user input: reported as one line, exit code 2."""


def first_line(err: BaseException, limit: int | None = None) -> str:
    """A library's error as part of one line: its message's first non-blank line (at most `limit` characters), or
    its type's name when the message is empty (`str(err).splitlines()[0]` raised IndexError there: a traceback)."""
    return _message_line(err, limit) or type(err).__name__


def typed_line(err: BaseException, limit: int | None = None) -> str:
    """`ValueError: its first line`, or the type's name alone when the message is empty."""
    line = _message_line(err, limit)
    return f"{type(err).__name__}: {line}" if line else type(err).__name__


def _message_line(err: BaseException, limit: int | None) -> str:
    return (str(err).strip().splitlines() or [""])[0][:limit]


def run_main(main, argv=None) -> None:
    try:
        main(sys.argv[1:] if argv is None else argv)
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except PermissionError as err:  # a file or folder of the user's this user may not read or write: no traceback
        print(f"error: {err.filename}: {(err.strerror or 'permission denied').lower()}", file=sys.stderr, flush=True)
        sys.exit(2)
    end_process_group()


def end_process_group() -> None:
    """After a stage that ran under `accelerate launch` finished, its process group ends here: left to the
    interpreter's exit, gloo's worker threads can abort a process whose work is saved (SIGABRT, "terminate called
    without an active exception"; pytorch/pytorch#190489). Only on success: after an error the other processes may be
    inside a collective, and destroying the group then can hang them. With several processes the process then leaves
    once Python's exit handlers have run, without the interpreter's teardown: DeepSpeed and accelerate keep the
    groups' objects alive past destroy_process_group, and their teardown still aborted a ZeRO-3 process after its
    stage had finished (2 full suites of 2 on 2026-12-05, the two-process test_distributed run beside other tests)."""
    torch = sys.modules.get("torch")  # a stage that never imported torch has no process group
    if torch is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return
    several = torch.distributed.get_world_size() > 1
    torch.distributed.destroy_process_group()
    if several:
        import atexit
        import logging
        import os

        atexit._run_exitfuncs()  # trackers' and loggers' own exit work (wandb, codecarbon, ...), as a normal exit
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def built_from_config(build, what: str):
    """build(), or one line naming `what` (the recipe and the key) when the config it builds from is bad."""
    try:
        return build()
    except Exception as err:  # ValueError, TypeError, huggingface_hub's strict-dataclass validation errors
        why = " ".join(line.strip() for line in str(err).splitlines()[:2])
        raise PipelineError(f"{what}: {why[:300]}") from None


def split_stage_args(argv: list[str], usage: str, help_text=None) -> tuple[Path, list[str]]:
    """`RECIPE [section.key=value ...]`; the deepspeed launcher's `--local_rank=N` is accepted and ignored. `--help`
    prints the usage and `help_text()` (the section's keys)."""
    args = [a for a in argv if not a.startswith("--local_rank") and not a.startswith("--local-rank")]
    if any(a in ("-h", "--help") for a in args):
        print(usage)
        if help_text is not None:
            print("\n" + help_text())
        sys.exit(0)
    if not args:
        raise PipelineError(f"missing recipe path\n{usage}")
    recipe_path, overrides = Path(args[0]), args[1:]
    for ov in overrides:
        if "=" not in ov or ov.startswith("-"):
            raise PipelineError(f"bad argument '{ov}': overrides look like section.key=value")
    return recipe_path, overrides
