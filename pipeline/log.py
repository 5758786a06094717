"""Logging for stages: `[stage] message` lines from the main process only, on stdout and in the stage folder.

    from pipeline import log
    log.info("held-out accuracy %.3f", accuracy)

One process runs one stage, so the package has one logger (`pipeline`) whose prefix is the stage `StageRun` set up.
Other processes of a multi-process launch log errors only (every process would otherwise repeat every line). Lines
logged before the stage folder exists are kept and written first into `log.txt` once `attach_file` names it; a
resumed stage appends to the same file. Lines go through tqdm, so a progress bar on the terminal stays whole.
Outside a stage (tests, library use) lines carry the prefix `[pipeline]` and go to stdout.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

LOGGER = logging.getLogger("pipeline")
LOG_FILE = "log.txt"


class _Prefix(logging.Formatter):
    stage = "pipeline"

    def format(self, record):
        text = super().format(record)
        level = "" if record.levelno < logging.WARNING else f"{record.levelname}: "
        return f"[{self.stage}] {level}{text}"


class _Console(logging.Handler):
    """Writes through tqdm.write: a line printed while a progress bar is drawn does not break the bar."""

    def emit(self, record):
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=sys.stdout)
            sys.stdout.flush()
        except Exception:  # pragma: no cover - logging must never take a stage down
            self.handleError(record)


class _Pending(logging.Handler):
    """Keeps the records logged before the stage folder exists, to replay into log.txt."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


_FORMAT = _Prefix("%(message)s")
_console = _Console()
_console.setFormatter(_FORMAT)
_pending: _Pending | None = None
_file: logging.FileHandler | None = None
LOGGER.addHandler(_console)
LOGGER.setLevel(logging.INFO)
LOGGER.propagate = False


def setup(stage: str, is_main_process: bool = True) -> None:
    """Prefix every line with `[stage]`; on processes other than the main one, log errors only."""
    global _pending
    _FORMAT.stage = stage
    # TRL 1.16's DPO and KTO trainers (reference log-probs) and GRPO/RLOO (every rollout) read transformers' deprecated
    # `is_gradient_checkpointing` whatever the recipe says: a FutureWarning no setting avoids, once per stage
    warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
    LOGGER.setLevel(logging.INFO if is_main_process else logging.ERROR)
    close()
    if is_main_process:
        _pending = _Pending()
        LOGGER.addHandler(_pending)


def attach_file(folder: Path) -> None:
    """From now on also append to `folder/log.txt`, starting with the lines logged since `setup`."""
    global _pending, _file
    if LOGGER.level > logging.INFO:  # not the main process
        return
    _file = logging.FileHandler(Path(folder) / LOG_FILE, mode="a", encoding="utf-8")
    _file.setFormatter(logging.Formatter("%(asctime)s " + "[" + _FORMAT.stage + "] %(levelname)s %(message)s"))
    if _pending is not None:
        LOGGER.removeHandler(_pending)
        for record in _pending.records:
            _file.handle(record)
        _pending = None
    LOGGER.addHandler(_file)


def close() -> None:
    """Stop writing to the stage folder (before it is renamed or removed)."""
    global _pending, _file
    for handler in (_pending, _file):
        if handler is not None:
            LOGGER.removeHandler(handler)
            handler.close()
    _pending = _file = None


def info(msg: str, *args) -> None:
    LOGGER.info(msg, *args)


def warning(msg: str, *args) -> None:
    LOGGER.warning(msg, *args)


def error(msg: str, *args) -> None:
    LOGGER.error(msg, *args)
