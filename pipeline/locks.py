"""One writer per stage folder (and per run): a lock file next to the folder, held while the stage runs.

    with locks.hold(run_dir / "sft.lock", "stage sft"):   # PipelineError at once if another process holds it
        ...

The lock is a POSIX record lock (`fcntl.lockf`) on `<run>/<stage>.lock`, taken without waiting. The file also
holds who took it (pid, host, start time, command) so that the process refused can say whom it met. What it
guarantees:
- on one machine, the kernel holds the lock for the process and drops it when the process ends in any way (kill
  -9 included): a lock left by a killed process is free at once, and the next run takes it over (it says so);
- across machines (Slurm nodes sharing a filesystem), the same lock works where the filesystem implements POSIX
  locks between clients: NFSv4, NFSv3 with lockd, Lustre mounted with `flock` (or `localflock`: then per node
  only), GPFS, BeeGFS with client locking. On a filesystem that refuses record locks the lock falls back to
  creating the file exclusively (`O_EXCL`); such a lock left by a killed process on this host is taken over
  (its pid is gone), one left on another host is reported with the holder and must be removed by hand.
The lock file is removed when released; a process that finds the file replaced while it waited retries.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from pipeline import log
from pipeline.cli import PipelineError

NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def describe(holder: dict | None) -> str:
    if not holder:
        return "another process (no holder recorded yet)"
    return (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}"
            + (f" ({holder['what']})" if holder.get("what") else ""))


def _parse(data: bytes) -> dict | None:
    try:
        holder = json.loads(data.decode())
        return holder if isinstance(holder, dict) else None
    except ValueError:
        return None


def read_holder(path: Path) -> dict | None:
    """Who holds (or last held) the lock. Never call it in the process holding the lock: see is_held."""
    try:
        return _parse(Path(path).read_bytes())
    except OSError:
        return None


def is_held(path: Path) -> dict | None:
    """The holder of the lock at `path` if a live process holds it (without taking it), else None."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EAGAIN):
            return read_holder(path) or {}
        return _excl_holder(path)
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN, 1, 0)
        return None
    finally:
        os.close(fd)  # closing drops any POSIX lock this process holds on the file: never call on our own lock


def _excl_holder(path: Path) -> dict | None:
    holder = read_holder(path)
    if holder and holder.get("host") == socket.gethostname() and not _alive(holder.get("pid")):
        return None
    return holder


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True
    return True


class Lock:
    def __init__(self, path: Path, what: str, target: str | None = None):
        self.path, self.what = Path(path), what
        self.target = target or str(self.path.with_suffix(""))  # what the lock protects, for the message
        self.fd: int | None = None
        self.exclusive_file = False

    def info(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join(sys.argv)[:500]}

    def acquire(self, wait: float | None = None) -> "Lock":
        """Take the lock or raise PipelineError naming the holder. `wait`: seconds to keep trying (default
        PIPELINE_LOCK_WAIT, else 0; a requeued Slurm job waits 120 s, for the lease of a lock held by a node that
        died to expire on the shared filesystem)."""
        if wait is None:
            requeued = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0
            wait = float(os.environ.get("PIPELINE_LOCK_WAIT", 120 if requeued else 0))
        deadline = time.time() + wait
        for _ in range(100000):  # retried when the file was replaced under us (a release in between), or waiting
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.EACCES, errno.EAGAIN) and time.time() < deadline:
                    time.sleep(1.0)
                    continue
                if err.errno in (errno.EACCES, errno.EAGAIN):
                    raise PipelineError(f"{self.target} is being written by {describe(read_holder(self.path))}: "
                                        f"wait for it to finish or stop it (lock {self.path})") from None
                if err.errno in NO_LOCKS:
                    return self._acquire_exclusive_file()
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            # read through our own descriptor: closing any other descriptor of this file would drop our lock
            old = _parse(os.pread(fd, 65536, 0))
            if old and old.get("pid") != os.getpid():
                log.info("taking over the lock %s left by %s (that process is gone)", self.path, describe(old))
            self.fd = fd
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(self.info()) + "\n").encode(), 0)
            return self
        raise PipelineError(f"{self.path}: could not take the lock (the file keeps being replaced)")

    def _acquire_exclusive_file(self) -> "Lock":
        """Filesystems without record locks: whoever creates the file holds the lock."""
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _excl_holder(self.path)
                if holder is None and read_holder(self.path) is not None:  # a dead process on this host
                    log.info("taking over the lock %s left by %s", self.path, describe(read_holder(self.path)))
                    self.path.unlink(missing_ok=True)
                    continue
                raise PipelineError(f"{self.target} is being written by {describe(holder)}: wait "
                                    f"for it to finish or stop it; if that process is gone, remove {self.path} "
                                    f"(this filesystem has no record locks)") from None
            os.write(fd, (json.dumps(self.info()) + "\n").encode())
            os.close(fd)
            self.exclusive_file = True
            return self
        raise PipelineError(f"{self.path}: could not take the lock")

    def release(self) -> None:
        if self.fd is None and not self.exclusive_file:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()  # unlink first, then unlock: a waiter that opened the old file sees it replaced
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
        self.fd, self.exclusive_file = None, False


@contextlib.contextmanager
def hold(path: Path, what: str, target: str | None = None):
    lock = Lock(path, what, target).acquire()
    try:
        yield lock
    finally:
        lock.release()


def wait_gone(path: Path, timeout: float = 10.0) -> bool:
    """For tests and tools: wait until nobody holds the lock at `path`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if is_held(path) is None:
            return True
        time.sleep(0.05)
    return False
