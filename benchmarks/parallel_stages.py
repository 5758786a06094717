"""The runner with `run.parallel_stages: 1` against 2: the same stages one after the other (each with every CPU) or
side by side (each with its share).

    python benchmarks/parallel_stages.py [--recipe recipes/small.yaml] [--stages pretrain,diffusion] \
        [--set pretrain.max_steps=300 --set diffusion.max_steps=600 ...] [--workdir /tmp/parallel-bench]

Runs `pipeline/run.py RECIPE --only STAGES` twice into fresh run folders, first with `run.parallel_stages=1`, then
with 2, and prints a table: the runner's wall time and each stage's own wall time (its manifest). The stages must
not need each other's output (the default pair does not: pretrain and the diffusion stage). `--set` overrides go to
both runs; the defaults shorten the small recipe's stages to a few minutes and skip the image stage's evaluation.
OMP_NUM_THREADS is removed from the environment: with it every stage would take that many threads, both ways.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHORT = ["pretrain.max_steps=300", "pretrain.save_steps=0", "diffusion.max_steps=600", "diffusion.save_steps=0",
         "diffusion.judge_epochs=0"]


def run(recipe: Path, stages: str, overrides: list[str], parallel: int, work: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    name = f"parallel{parallel}"
    cmd = [sys.executable, str(REPO / "pipeline/run.py"), str(recipe), "--only", stages, f"run.name={name}",
           f"run.output_dir={work}", f"run.parallel_stages={parallel}", *overrides]
    started = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - started
    if proc.returncode != 0:
        raise SystemExit(f"run.py failed ({' '.join(cmd)}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    walls = {}
    for stage in stages.split(","):
        manifest = json.loads((work / name / stage / "manifest.json").read_text())
        walls[stage] = manifest["wall_time_s"]
    return {"wall": wall, "stages": walls}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes/small.yaml")
    parser.add_argument("--stages", default="pretrain,diffusion")
    parser.add_argument("--set", action="append", default=None, metavar="SECTION.KEY=VALUE",
                        help="overrides for both runs (default: shortened stages, see the module docstring)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    overrides = SHORT if args.set is None else args.set
    work = args.workdir or Path(tempfile.mkdtemp(prefix="parallel-bench-"))
    results = {n: run(args.recipe.resolve(), args.stages, overrides, n, work) for n in (1, 2)}

    stages = args.stages.split(",")
    print(f"{args.recipe.name} --only {args.stages}, {' '.join(overrides)}; {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| run.parallel_stages | runner wall s | " + " | ".join(f"{s} s" for s in stages) + " | wall / one at a time |")
    print("|---|---|" + "---|" * len(stages) + "---|")
    for n, r in results.items():
        print(f"| {n} | {r['wall']:.0f} | " + " | ".join(f"{r['stages'][s]:.0f}" for s in stages)
              + f" | {r['wall'] / results[1]['wall']:.2f} |")


if __name__ == "__main__":
    main()
