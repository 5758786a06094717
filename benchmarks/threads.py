"""Two stages side by side on one machine, with torch's default threads and with the pipeline's share.

    python benchmarks/threads.py [--steps 40] [--workdir /tmp/threads-bench]

Runs the pretrain stage of a small model (the small recipe's model size, 128-token blocks) three ways and prints a
table of seconds per training step: alone (the pipeline's setting), two at once with torch's default threads
(`PIPELINE_THREADS=torch-default`: every process takes every core, the behaviour before pipeline/threads.py), and
two at once with the pipeline's setting (each takes its share of the cores). OMP_NUM_THREADS is removed from the
environment of the stages, since it would override both.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RECIPE = {
    "run": {"name": "bench", "output_dir": "runs", "seed": 0},
    "world": {"seed": 0, "n_pretrain_docs": 2000},
    "tokenizer": {"train": True, "vocab_size": 1024},
    "model": {"config": {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}},
    "pretrain": {"block_size": 128, "per_device_train_batch_size": 16, "learning_rate": 1e-3, "logging_steps": 10,
                 "save_strategy": "no", "use_cpu": True},
}


def start(work: Path, name: str, steps: int, mode: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["TOKENIZERS_PARALLELISM"] = "false"
    if mode == "torch-default":
        env["PIPELINE_THREADS"] = "torch-default"
    cmd = [sys.executable, str(REPO / "pipeline/pretrain.py"), str(work / "recipe.yaml"), f"run.name={name}",
           f"pretrain.max_steps={steps}"]
    return subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def seconds_per_step(proc: subprocess.Popen, steps: int) -> tuple[float, str]:
    out = proc.communicate()[0]
    if proc.returncode != 0:
        raise SystemExit(f"stage failed:\n{out[-3000:]}")
    runtime = float(re.search(r"'train_runtime': '?([\d.]+)", out).group(1))
    threads = re.findall(r"CPU threads: (\d+)", out)
    return runtime / steps, "->".join(threads) or "torch default"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="threads-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "recipe.yaml").write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    rows = []
    for label, mode, n in (("alone", "pipeline", 1), ("two side by side", "torch-default", 2),
                           ("two side by side", "pipeline", 2)):
        started = time.time()
        procs = [start(work, f"{mode}-{n}-{i}-{int(started)}", args.steps, mode) for i in range(n)]
        results = [seconds_per_step(p, args.steps) for p in procs]
        rows.append((label, mode, [f"{s:.3f}" for s, _ in results], [t for _, t in results],
                     time.time() - started))
    cpus = len(os.sched_getaffinity(0))
    print(f"pretrain, {args.steps} steps of 16 x 128 tokens, {cpus} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"| {'run':<18} | {'threads setting':<15} | {'s/step (each stage)':<22} | {'threads (each)':<16} | wall s |")
    print(f"|{'-' * 20}|{'-' * 17}|{'-' * 24}|{'-' * 18}|--------|")
    for label, mode, secs, threads, wall in rows:
        print(f"| {label:<18} | {mode:<15} | {', '.join(secs):<22} | {', '.join(threads):<16} | {wall:6.0f} |")


if __name__ == "__main__":
    main()
