"""Shared test helpers: a tiny recipe (seconds per stage on CPU) and a way to run the real command lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import forked_cli

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "run": {"name": "tiny", "output_dir": "runs", "seed": 0},
    "world": {"seed": 0, "n_pretrain_docs": 300, "n_sft": 200, "n_sft_eval": 20, "n_preference": 200,
              "n_preference_eval": 40, "n_eval": 40},
    "tokenizer": {"train": True, "vocab_size": 400},
    # multiples of 64 (hidden, intermediate, k/v) so 4-bit quantization works on CPU
    "model": {"config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                         "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                         "max_position_embeddings": 256}},
    "pretrain": {"block_size": 64, "max_steps": 12, "per_device_train_batch_size": 8, "learning_rate": 3e-3,
                 "logging_steps": 4, "save_strategy": "no", "use_cpu": True},
    "sft": {"max_steps": 12, "per_device_train_batch_size": 8, "learning_rate": 1e-3, "max_length": 128,
            "gradient_checkpointing": False, "bf16": False, "logging_steps": 4, "save_strategy": "no",
            "use_cpu": True, "heldout_max_prompts": 8, "heldout_max_new_tokens": 16},
}


def pytest_configure(config):
    """`make test` runs the suite in one pytest-xdist worker per core (tests of a file stay together). Each worker
    and what it starts then take their share of the cores: two torch processes with the default threads each on the
    same two cores run about ten times slower (pipeline/threads.py). Tests that check the thread logic unset it."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if workers > 1 and not os.environ.get("OMP_NUM_THREADS"):
        import torch

        from pipeline import threads

        share = max(1, len(threads.cpus_given()[0]) // workers)
        os.environ["OMP_NUM_THREADS"] = str(share)
        torch.set_num_threads(share)


def pytest_unconfigure(config):
    forked_cli.stop_servers()


@pytest.fixture(autouse=True)
def environment_restored():
    """Pipeline code a test runs in this process may change os.environ (hub.reachable() switches the process
    offline); the next test in this worker, and what it starts, gets the environment this one started with."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def tiny_recipe(directory: Path, **sections) -> Path:
    """Write the tiny recipe (sections replaced or extended by keyword) into `directory`."""
    recipe = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    for name, values in sections.items():
        if values is None:
            recipe.pop(name, None)
        else:
            recipe[name] = {**recipe.get(name, {}), **values}
    path = Path(directory) / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def write_jsonl(path: str | Path, rows: list[dict]) -> str:
    """Write `rows` as JSON Lines to `path`; returns the path as a data spec."""
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_cli(args: list[str], cwd: Path, timeout: int = 600, env: dict | None = None,
            fork: bool | None = None) -> subprocess.CompletedProcess:
    """Run `python <args>` the way a user would, in `cwd`, with the repo's scripts (a process forked from one that
    has imported the libraries already where that pays: tests/forked_cli.py; fork=True/False: always/never)."""
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    script_args = [str(REPO / a) if str(a).startswith("pipeline/") else str(a) for a in args]
    return forked_cli.run(script_args, cwd=cwd, timeout=timeout, env=full_env, fork=fork)


def max_weight_diff(a, b) -> float:
    """The largest difference between two saved models' weights (folders with model.safetensors, same keys)."""
    from safetensors.torch import load_file

    wa, wb = (load_file(str(Path(folder) / "model.safetensors")) for folder in (a, b))
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


def launch_cli(config: str, args: list, cwd: Path, num_processes: int | None = None, timeout: int = 600,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file launch/accelerate/<config>.yaml [--num_processes N] pipeline/x.py ...`;
    `config` may also be the path of a .yaml file."""
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    config_file = Path(config) if str(config).endswith(".yaml") else REPO / "launch" / "accelerate" / f"{config}.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file)]
    if num_processes:
        cmd += ["--num_processes", str(num_processes)]
    cmd += ["--main_process_port", "0"]  # a free port: another test may be launching beside this one
    cmd += [str(REPO / a) if str(a).startswith("pipeline/") else str(a) for a in args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """pretrain + sft of the tiny recipe through the runner, once per test session."""
    work = tmp_path_factory.mktemp("tiny")
    recipe = tiny_recipe(work)
    proc = run_cli(["pipeline/run.py", recipe], cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, recipe, proc
