"""Eval after one checkpoint is added: with the earlier checkpoints' records (`eval.reuse: true`, the default)
against generating every checkpoint again (`eval.reuse=false`), side by side.

    python benchmarks/eval_reuse.py --run-dir runs/small [--recipe recipes/small.yaml] [--workdir /tmp/reuse-bench] \
        [--set eval.max_prompts=100 ...]

Copies the run folder's finished stages (not its eval) twice into WORKDIR. In the first copy the eval stage
evaluates the recipe's checkpoints but the last (`eval.checkpoints=[...]`): that writes their records. Then, side by
side with one thread each, the first copy evaluates every checkpoint (the earlier ones read from their records) and
the second copy every checkpoint with `eval.reuse=false`. Prints each evaluation's wall time, the ratio, and whether
the two metrics.json agree (every metric but each checkpoint's `seconds`; paths with the copy's folder as RUN).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def evaluation(recipe: Path, out: Path, overrides: list[str]) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "pipeline/evaluate.py"), str(recipe), f"run.output_dir={out}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finished(proc: subprocess.Popen, started: float) -> float:
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"evaluate.py failed ({' '.join(proc.args)}):\n{err[-3000:]}")
    return time.time() - started


def metrics(folder: Path) -> dict:
    """metrics.json with the copy's folder written as RUN (checkpoint paths) and without each checkpoint's seconds."""
    out = json.loads((folder / "eval/metrics.json").read_text().replace(str(folder), "RUN"))
    for m in out["checkpoints"].values():
        m.pop("seconds")
    return out


def main():
    from pipeline.recipe import load_recipe

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a finished run folder, e.g. runs/small")
    parser.add_argument("--recipe", type=Path, default=REPO / "recipes/small.yaml")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="for every eval")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe.resolve(), args.set)
    names = list(recipe.keys("eval").checkpoints)  # default: the recipe's model stages
    work = args.workdir or Path(tempfile.mkdtemp(prefix="reuse-bench-"))
    copies = {}
    for label in ("reuse", "all"):
        copies[label] = work / label
        shutil.copytree(args.run_dir, copies[label] / recipe.run.name, ignore=shutil.ignore_patterns("eval*"))

    earlier = [*args.set, f"eval.checkpoints=[{','.join(names[:-1])}]"]
    started = time.time()
    first = finished(evaluation(args.recipe.resolve(), copies["reuse"], earlier), started)
    every = [*args.set, f"eval.checkpoints=[{','.join(names)}]"]
    started = time.time()
    procs = {"reuse": evaluation(args.recipe.resolve(), copies["reuse"], every),
             "all": evaluation(args.recipe.resolve(), copies["all"], [*every, "eval.reuse=false"])}
    walls = {label: finished(proc, started) for label, proc in procs.items()}
    same = metrics(copies["reuse"] / recipe.run.name) == metrics(copies["all"] / recipe.run.name)

    print(f"{args.recipe.name}, {args.run_dir}: {', '.join(names)}; {' '.join(args.set) or 'no overrides'}; "
          f"one thread each, side by side")
    print("| eval | checkpoints generated | wall s | ratio |")
    print("|---|---|---|---|")
    print(f"| first: {', '.join(names[:-1])} | {len(names) - 1} | {first:.0f} | |")
    print(f"| then all, reuse (default) | 1 | {walls['reuse']:.0f} | {walls['reuse'] / walls['all']:.2f} |")
    print(f"| then all, reuse=false | {len(names)} | {walls['all']:.0f} | 1.00 |")
    print(f"metrics.json the same both ways (but `seconds`): {same}")


if __name__ == "__main__":
    main()
