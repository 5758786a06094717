"""How many CPU threads a stage process uses: its share of the CPUs it was given.

Torch (OpenMP) starts one thread per core it sees in every process. Two processes on the same cores then fight
for them, and OpenMP threads that spin while they wait for each other make that about ten times slower than
taking turns (benchmarks/threads.py, benchmarks/README.md). So every stage process calls `configure()` at start:

- `OMP_NUM_THREADS` set: that wins (it is logged as the choice);
- else the CPUs it may run on (its affinity mask, which Slurm's task binding and `taskset` set; at most Slurm's
  `SLURM_CPUS_PER_TASK`) are shared evenly between the pipeline processes running on this machine on any of
  those CPUs: the other processes of the same launch (`LOCAL_WORLD_SIZE`) and other stages started side by side.

The processes find each other through a small registry in the temp folder (`/dev/shm` when there is one): one
file per live process, held with a lock that the kernel drops when the process ends, however it ends. `rebalance()`
(called between training steps; at most every few seconds) recounts, so a stage that started alone gives up
threads when another one starts next to it, and takes them back when that one ends. It gives them up at once (two
processes with too many threads slow each other tenfold) but takes more only once the lower count has held for
GROW_AFTER_S: the next stage of a chain takes ~10 s to start after the last one ends, and a neighbour that grabbed
the freed CPUs for those seconds fought the starting stage for them and changed its own numerics for nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import tempfile
import time
from pathlib import Path

from pipeline import log

REGISTRY = Path("/dev/shm" if Path("/dev/shm").is_dir() else tempfile.gettempdir()) / "alignment-pipeline-threads"
RECHECK_S = 5.0
GROW_AFTER_S = 30.0


class _State:
    fd: int | None = None
    cpus: set[int] = set()
    threads: int | None = None
    fixed: bool = False          # OMP_NUM_THREADS given: never changed
    source: str = "affinity mask"  # where the number of CPUs comes from (cpus_given), for the log line
    checked: float = 0.0
    more_since: float | None = None  # when a recount first offered more threads than we have (None: it did not)


STATE = _State()


def cpus_given() -> tuple[set[int], str]:
    """The CPUs this process may run on, and where that number comes from."""
    try:
        cpus = set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = set(range(os.cpu_count() or 1))
    source = "affinity mask"
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    if slurm and slurm.isdigit() and 0 < int(slurm) < len(cpus):
        cpus, source = set(sorted(cpus)[:int(slurm)]), "SLURM_CPUS_PER_TASK"
    return cpus, source


def _register(cpus: set[int]) -> None:
    with contextlib.suppress(OSError):
        REGISTRY.mkdir(mode=0o1777, exist_ok=True)
        fd = os.open(REGISTRY / str(os.getpid()), os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(sorted(cpus)).encode())
        STATE.fd = fd
        atexit.register(_unregister)  # a process killed outright leaves its file; the next count removes it


def _unregister() -> None:
    with contextlib.suppress(OSError):
        (REGISTRY / str(os.getpid())).unlink()


def sharing(cpus: set[int]) -> int:
    """Live pipeline processes on this machine (this one included) that run on any of `cpus`."""
    count = 0
    for entry in (REGISTRY.iterdir() if REGISTRY.is_dir() else ()):
        if entry.name == str(os.getpid()):
            count += 1
            continue
        try:
            fd = os.open(entry, os.O_RDWR)
        except OSError:
            continue
        try:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # held: a live process
                theirs = set(json.loads(entry.read_text() or "[]"))
                count += bool(theirs & cpus) or not theirs
            else:  # nobody holds it: left by a process that is gone
                fcntl.lockf(fd, fcntl.LOCK_UN)
                with contextlib.suppress(OSError):
                    entry.unlink()
        except (OSError, ValueError):
            pass
        finally:
            os.close(fd)
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    return max(count, local, 1)


def _set(n: int, why: str) -> None:
    import torch

    if n != STATE.threads:
        torch.set_num_threads(n)
        STATE.threads = n
        log.info("CPU threads: %d (%s)", n, why)


def configure() -> int:
    """Set this process's torch threads (see the module docstring); returns the number."""
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    if os.environ.get("PIPELINE_THREADS") == "torch-default":  # benchmarks/threads.py: the behaviour before
        STATE.fixed = True
        return STATE.threads or 0
    if given.isdigit() and int(given) > 0:
        STATE.fixed = True
        _set(int(given), "OMP_NUM_THREADS")
        return int(given)
    cpus, source = cpus_given()
    STATE.cpus, STATE.source = cpus, source
    if STATE.fd is None:
        _register(cpus)
    return rebalance(force=True, wait_to_grow=False)


def rebalance(force: bool = False, wait_to_grow: bool = True) -> int | None:
    """Recount the processes sharing our CPUs and take our share (cheap; does real work every RECHECK_S)."""
    if STATE.fixed or not STATE.cpus or (not force and time.time() - STATE.checked < RECHECK_S):
        return STATE.threads
    STATE.checked = now = time.time()
    n_procs = sharing(STATE.cpus)
    n = max(1, len(STATE.cpus) // n_procs)
    if wait_to_grow and STATE.threads is not None and n > STATE.threads:
        STATE.more_since = STATE.more_since or now
        if now - STATE.more_since < GROW_AFTER_S:  # a neighbour may just be between two stages of its chain
            return STATE.threads
    STATE.more_since = None
    procs = f"{n_procs} pipeline process{'es' if n_procs > 1 else ''}"
    _set(n, f"{len(STATE.cpus)} CPUs ({STATE.source}) shared by {procs} on this machine; OMP_NUM_THREADS overrides")
    return n
