"""The suite's command lines run forked from a warm interpreter (tests/forked_cli.py): what they do must be what
`python SCRIPT ARGS` does in a fresh one."""

import os
import re
import signal
import subprocess

import pytest

import forked_cli
from conftest import run_cli, tiny_recipe
from pipeline.stages import STAGES


@pytest.mark.parametrize("args, env, code", [
    *[([f"pipeline/{spec.script.name}", "{recipe}", f"{stage}.no_such_key=1"], {}, 2)  # bad input, every stage
      for stage, spec in STAGES.items()],
    (["pipeline/run.py", "{recipe}", "sft.learning_rte=1", "--dry-run"], {}, 2),
    (["pipeline/sft.py", "--help"], {}, 0),  # stdout
    (["pipeline/pretrain.py", "{recipe}"], {"PIPELINE_FAULT": "kill:training:2"}, -signal.SIGKILL),  # mid-stage
    (["pipeline/pretrain.py", "{recipe}", "pretrain.max_steps=2"], {"PIPELINE_FAULT": "enospc:final-save",
                                                                    "OMP_NUM_THREADS": "1"}, 1),  # a traceback
    (["pipeline/pretrain.py", "{recipe}", "pretrain.max_steps=2"], {"OMP_NUM_THREADS": "1"}, 0),  # a finished stage
])
def test_forked_commands_do_what_a_fresh_interpreter_does(tmp_path, args, env, code):
    """The suite forks its command lines from a warm interpreter (tests/forked_cli.py): the exit code, stdout and
    stderr (numbers and spacing aside), the files written and the weights to the byte are those of `python SCRIPT
    ARGS` in a fresh interpreter."""

    def normal(text):  # timings, sizes, temporary folders and progress bars differ from run to run
        text = "\n".join(line for line in text.splitlines() if "%|" not in line)
        return re.sub(r"\s+", " ", re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?|fresh|forked", "#", text))

    results = {}
    for way in ("fresh", "forked"):
        (tmp_path / way).mkdir()
        recipe = tiny_recipe(tmp_path / way)
        proc = run_cli([str(recipe) if a == "{recipe}" else a for a in args], cwd=tmp_path / way, env=env,
                       timeout=300, fork=way == "forked")
        files = {str(p.relative_to(tmp_path / way)): p.read_bytes() if p.suffix == ".safetensors" else None
                 for p in (tmp_path / way).rglob("*") if "log" not in p.name}  # the weights to the byte
        results[way] = (proc.returncode, normal(proc.stdout), normal(proc.stderr), files)
    assert results["fresh"][0] == code, results["fresh"][2][-2000:]
    assert results["forked"] == results["fresh"]


def test_a_forked_command_past_its_timeout_is_killed_and_the_next_one_runs(tmp_path):
    """As subprocess.run: TimeoutExpired with what the command printed; the server then forks the next command, and
    a command that ends at once is answered at once (not after its timeout)."""
    slow = tmp_path / "slow.py"
    slow.write_text("import time\nprint('started', flush=True)\ntime.sleep(600)\n")
    quick = tmp_path / "quick.py"
    quick.write_text("import sys\nprint('hi')\nsys.exit(3)\n")
    with pytest.raises(subprocess.TimeoutExpired) as timed_out:
        forked_cli.run([str(slow)], cwd=tmp_path, env=dict(os.environ), timeout=2, fork=True)
    assert timed_out.value.output == "started\n"
    for _ in range(3):
        proc = forked_cli.run([str(quick)], cwd=tmp_path, env=dict(os.environ), timeout=60, fork=True)
        assert (proc.returncode, proc.stdout, proc.stderr) == (3, "hi\n", "")
