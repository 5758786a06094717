"""Kill-and-resume soak: SIGKILL every training stage at random times, rerun it, and compare with an uninterrupted run.

    python benchmarks/soak.py --trials 20 [--stages pretrain,sft,reward,dpo,ppo] [--seed 0] [--workdir DIR]

Not part of `make test` (about a minute per trial on a 2-core machine). A short recipe (below: the test suite's tiny
model, with checkpoints every few steps) is first run uninterrupted, stage by stage. Then, for each stage and trial,
the finished upstream stages are copied into a fresh run folder (run folders are relocatable), the stage is started
and SIGKILLed once or twice at a random time: half the kills uniformly within its measured duration after its
imports (loading, training, checkpoint saves and the final save are hit in proportion to their length), half
uniformly within half that duration after its first checkpoint appears (so that resumes are exercised); then it is
run to the end.

Checked after every kill: a stage folder without `.partial` exists only if the stage had finished (manifest and an
intact model: pipeline/integrity.py), and the runner's plan (`runs.up_to_date`) says "run" exactly when it has not.
After the rerun: it exits 0, has the step count of the uninterrupted run and the same weights (max |difference|
<= 1e-5 over every tensor of model.safetensors). Any failed check is a violation; the table counts them per stage.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STAGE_ORDER = ("pretrain", "sft", "reward", "dpo", "ppo")
TRAIN = {"per_device_train_batch_size": 8, "use_cpu": True, "bf16": False, "gradient_checkpointing": False,
         "logging_steps": 2, "save_steps": 4}
RECIPE = {
    "run": {"name": "ref", "output_dir": "runs", "seed": 0},
    "world": {"seed": 0, "n_pretrain_docs": 300, "n_sft": 200, "n_sft_eval": 20, "n_preference": 200,
              "n_preference_eval": 40, "n_eval": 40},
    "tokenizer": {"train": True, "vocab_size": 400},
    "model": {"config": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                         "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 256}},
    # pretrain trains 48 steps (12 took about a second: kills after its first checkpoint mostly missed training)
    "pretrain": {"block_size": 64, "max_steps": 48, "per_device_train_batch_size": 8, "learning_rate": 3e-3,
                 "logging_steps": 4, "save_steps": 8, "use_cpu": True},
    "sft": {**TRAIN, "max_steps": 12, "learning_rate": 1e-3, "max_length": 128, "heldout_prompts": None},
    "reward": {**TRAIN, "max_steps": 12, "learning_rate": 1e-3, "max_length": 128, "norm_max_pairs": 64},
    "dpo": {**TRAIN, "max_steps": 8, "learning_rate": 1e-3, "max_length": 128, "heldout_prompts": None},
    "ppo": {"batch_size": 8, "num_minibatches": 2, "ppo_epochs": 1, "max_new_tokens": 8, "max_steps": 6,
            "save_steps": 2, "learning_rate": 1e-3, "heldout_prompts": None, "logging_steps": 2},
}


def command(work: Path, stage: str, name: str) -> list[str]:
    return [sys.executable, str(REPO / "pipeline" / f"{stage}.py"), str(work / "recipe.yaml"), f"run.name={name}"]


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(REPO)}


def weights_differ(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    if x.keys() != y.keys():
        return float("inf")
    return max((x[k].float() - y[k].float()).abs().max().item() for k in x)


def steps_of(folder: Path):
    try:
        return json.loads((folder / "metrics.json").read_text()).get("steps")
    except (OSError, ValueError):
        return None


def planned_to_run(work: Path, name: str, stage: str) -> bool:
    from pipeline import runs
    from pipeline.recipe import load_recipe

    recipe = load_recipe(work / "recipe.yaml", [f"run.name={name}", f"run.output_dir={work / 'runs'}"])
    return not runs.up_to_date(recipe, stage)[0]


def trial(work: Path, stage: str, index: int, duration: float, rng: random.Random) -> dict:
    from pipeline import integrity

    name = f"{stage}-{index}"
    run_dir, ref = work / "runs" / name, work / "runs" / "ref"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    for upstream in STAGE_ORDER[:STAGE_ORDER.index(stage)]:
        shutil.copytree(ref / upstream, run_dir / upstream)
    final, violations, kills = run_dir / stage, [], 0
    for _ in range(rng.choice((1, 2))):
        proc = subprocess.Popen(command(work, stage, name), cwd=work, env=environment(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # after the interpreter and libraries are loaded (the stage's lock appears), so that kills spread over the
        # stage's own work: loading data and models, training, checkpoint saves, the final save, publishing
        lock = run_dir / f"{stage}.lock"
        while not lock.exists() and proc.poll() is None:
            time.sleep(0.05)
        at = rng.uniform(0.0, duration * 1.05)
        if rng.random() < 0.5:  # half the kills land after the first checkpoint: training, saves, the end
            partial = run_dir / f"{stage}.partial"
            while proc.poll() is None and not any(partial.glob("checkpoint-*")):
                time.sleep(0.05)
            at = rng.uniform(0.0, duration * 0.5)
        try:
            proc.wait(timeout=at)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        finished = (final / "manifest.json").is_file()
        if final.exists() and (not finished or integrity.model_folder_problem(final, need_tokenizer=True)):
            violations.append("a stage folder that looks finished but is not")
        if planned_to_run(work, name, stage) == finished:
            violations.append(f"plan says {'run' if finished else 'skip'} after the kill")
        if finished:
            break
    resumed_from = None
    if not (final / "manifest.json").is_file():
        done = subprocess.run(command(work, stage, name), cwd=work, env=environment(), capture_output=True, text=True)
        if done.returncode != 0:
            violations.append(f"rerun exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
            return {"kills": kills, "resumed": False, "same_steps": False, "same_weights": False,
                    "violations": violations}
    manifest = json.loads((final / "manifest.json").read_text())
    resumed_from = manifest.get("resumed_from")
    same_steps = steps_of(final) == steps_of(ref / stage)
    diff = weights_differ(final / "model.safetensors", ref / stage / "model.safetensors")
    if not same_steps:
        violations.append(f"steps {steps_of(final)} != {steps_of(ref / stage)}")
    if diff > 1e-5:
        violations.append(f"weights differ by {diff:.2e}")
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"kills": kills, "resumed": resumed_from is not None, "same_steps": same_steps, "same_weights": diff <= 1e-5,
            "violations": violations}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20, help="trials per stage")
    parser.add_argument("--stages", default=",".join(STAGE_ORDER))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    stages = [s for s in args.stages.split(",") if s]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="soak-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "recipe.yaml").write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    rng = random.Random(args.seed)

    saved = work / "reference.json"  # a reference already run in this workdir is reused
    durations = json.loads(saved.read_text()) if saved.is_file() else {}
    for stage in STAGE_ORDER[:max(STAGE_ORDER.index(s) for s in stages) + 1]:  # the uninterrupted reference
        if stage in durations and (work / "runs/ref" / stage / "manifest.json").is_file():
            continue
        started = time.time()
        proc = subprocess.run(command(work, stage, "ref"), cwd=work, env=environment(), capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"reference {stage} failed:\n{proc.stderr[-3000:]}")
        durations[stage] = json.loads((work / "runs/ref" / stage / "manifest.json").read_text())["wall_time_s"]
        saved.write_text(json.dumps(durations))
        print(f"reference {stage}: {time.time() - started:.0f} s ({durations[stage]:.0f} s after imports), "
              f"{steps_of(work / 'runs/ref' / stage)} steps", flush=True)

    table = {}
    for stage in stages:
        rows = []
        for i in range(args.trials):
            row = trial(work, stage, i, durations[stage], rng)
            rows.append(row)
            print(f"  {stage} trial {i + 1}/{args.trials}: {row}", flush=True)
        table[stage] = rows
    print(f"\nsoak: {args.trials} trials per stage, seed {args.seed}, {len(os.sched_getaffinity(0))} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| stage    | trials | kills | resumed | same steps | same weights | violations |")
    print("|----------|--------|-------|---------|------------|--------------|------------|")
    total = 0
    for stage, rows in table.items():
        violations = sum(len(r["violations"]) for r in rows)
        total += violations
        print(f"| {stage:<8} | {len(rows):>6} | {sum(r['kills'] for r in rows):>5} | "
              f"{sum(r['resumed'] for r in rows):>7} | {sum(r['same_steps'] for r in rows):>10} | "
              f"{sum(r['same_weights'] for r in rows):>12} | {violations:>10} |")
    for stage, rows in table.items():
        for i, r in enumerate(rows):
            for v in r["violations"]:
                print(f"violation: {stage} trial {i + 1}: {v}")
    sys.exit(1 if total else 0)


if __name__ == "__main__":
    main()
