"""The tests' stage command lines, forked from an interpreter that has already imported the libraries.

A stage process spends about 6 s importing torch, transformers, TRL and peft before it reads its recipe, and the
suite starts hundreds of them. `run` forks each command from a server process that imported those libraries once,
and the child then runs the script as `python SCRIPT ARGS` would: its own process, working directory, environment,
argv, `__main__`, stdout and stderr (files, not a terminal, as with `capture_output`; an uncaught exception's
traceback starts at the script, not in this module), exit code or -signal, and the interpreter's normal exit
(threads joined, exit handlers run, modules torn down). The pipeline's own modules are imported afresh in each child.

A fork cannot redo what the libraries read from the environment when they were imported (OpenMP's thread count,
huggingface_hub's settings), so there is a server per environment: all variables but PIPELINE_*, which only the
pipeline's modules read, and PYTEST_*. `PIPELINE_TEST_FORK=0` runs every command in a fresh interpreter instead.
tests/test_forked_cli.py checks that both give the same exit code, output and files.
"""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

# What stage processes import from the libraries (a lazy module imports its parts on first attribute access),
# and what they would each ask a subprocess for
PREIMPORT = """
import numpy, torch, transformers, datasets, accelerate, peft, trl, diffusers, safetensors.torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, Trainer,
                          PreTrainedTokenizerFast, T5EncoderModel)
from accelerate import Accelerator
from peft import LoraConfig, PeftModel, get_peft_model
from trl import (DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, KTOConfig, KTOTrainer, ModelConfig, RewardConfig,
                 RewardTrainer, RLOOConfig, RLOOTrainer, SFTConfig, SFTTrainer)
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
try:  # the CPU model, cached for the children: each stage's cost tracker asked a py-cpuinfo subprocess (about 1 s)
    from codecarbon.core.util import detect_cpu_model
    detect_cpu_model()
except Exception:  # another codecarbon: the children ask it themselves
    pass
"""

RUNTIME_ONLY = ("PIPELINE_", "PYTEST_")  # read after imports only: pipeline/faults.py, pytest's current test
MAX_SERVERS = 3  # per test process; each holds the libraries in memory (about 0.6 GB)
_servers: dict[tuple, subprocess.Popen] = {}  # environment -> its server, least recently used first
_seen: set[tuple] = set()  # environments asked for once: a server pays off from the second command


def enabled() -> bool:
    return os.environ.get("PIPELINE_TEST_FORK", "1") != "0" and hasattr(os, "fork")


def _server(env: dict, first_too: bool) -> subprocess.Popen | None:
    """The server for this environment; None the first time it is asked for unless first_too (a one-off
    environment, such as one naming a test's temporary folder, would pay for the server's imports and gain nothing)."""
    key = tuple(sorted((k, v) for k, v in env.items() if not k.startswith(RUNTIME_ONLY)))
    if key not in _servers and key not in _seen and not first_too:
        _seen.add(key)
        return None
    server = _servers.pop(key, None)
    if server is None or server.poll() is not None:
        if len(_servers) >= MAX_SERVERS:
            _stop(_servers.pop(next(iter(_servers))))
        server = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, env=dict(key), bufsize=0)
    _servers[key] = server
    return server


def _reply(server: subprocess.Popen, timeout: float | None) -> dict | None:
    """The server's next line, or None after `timeout` seconds. Read a byte at a time and unbuffered, so that a line
    that has arrived is never held in a buffer where select() cannot see it."""
    line = b""
    while not line.endswith(b"\n"):
        if timeout is not None and not select.select([server.stdout], [], [], timeout)[0]:
            return None
        byte = os.read(server.stdout.fileno(), 1)
        if not byte:
            raise RuntimeError(f"the forking server stopped (exit code {server.poll()})")
        line += byte
    return json.loads(line)


def run(args: list[str], cwd, env: dict, timeout: float | None = None,
        fork: bool | None = None) -> subprocess.CompletedProcess:
    """subprocess.run([sys.executable, *args], cwd, env, capture_output=True, text=True, timeout), by a fork where
    it pays (fork=None), always (True) or never (False)."""
    cmd = [sys.executable, *map(str, args)]
    script = cmd[1]  # a script path: `python -m` or `-c` starts a fresh interpreter
    server = _server(env, bool(fork)) if script.endswith(".py") and (fork or fork is None and enabled()) else None
    if server is None:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
        server.stdin.write(json.dumps({"args": cmd[1:], "cwd": str(cwd), "env": env, "stdout": str(out),
                                       "stderr": str(err)}).encode() + b"\n")
        pid = _reply(server, None)["pid"]
        done = _reply(server, timeout)
        if done is None:
            os.kill(pid, signal.SIGKILL)
            _reply(server, None)
            raise subprocess.TimeoutExpired(cmd, timeout, out.read_text(), err.read_text())
        return subprocess.CompletedProcess(cmd, done["returncode"], out.read_text(), err.read_text())


def _stop(server: subprocess.Popen) -> None:
    server.stdin.close()  # the server leaves at the end of its input
    server.wait(timeout=30)


def stop_servers() -> None:
    for server in _servers.values():
        _stop(server)
    _servers.clear()


def _serve() -> None:
    """Read one request a line; fork; the child becomes the command, the server answers its pid and exit code."""
    control_in, control_out = os.fdopen(os.dup(0), "r"), os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)  # what the libraries print while importing must not reach the control channel
    exec(PREIMPORT, {})
    gc.collect()  # what the imports left over goes first; then the libraries' objects out of the collector's sight:
    gc.freeze()  # a child's collections and its exit walked them all, copying their pages on write (2-3 s a command)
    sys.stdout.flush()
    for line in control_in:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            control_in.close()
            control_out.close()
            _become(request)  # raises SystemExit past this loop: the interpreter then exits as a script's would
        print(json.dumps({"pid": pid}), file=control_out)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), file=control_out)


def _become(request: dict) -> None:
    import runpy

    import numpy

    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    numpy.random.seed()  # a fresh interpreter's global generator is seeded anew; a fork's would repeat the server's
    script, *argv = request["args"]
    sys.argv = [script, *argv]
    sys.path[0] = str(Path(script).resolve().parent)  # as `python SCRIPT` has it
    sys.excepthook = partial(_from_script, Path(script).resolve())
    runpy.run_path(script, run_name="__main__")
    sys.exit(0)


def _from_script(script: Path, kind, exc, tb) -> None:
    """An uncaught exception's traceback from the script's first frame, as `python SCRIPT` prints it (without the
    server's and runpy's frames above it)."""
    start = tb
    while start is not None and Path(start.tb_frame.f_code.co_filename).resolve() != script:
        start = start.tb_next
    sys.__excepthook__(kind, exc.with_traceback(start or tb), start or tb)  # printed from exc.__traceback__


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
