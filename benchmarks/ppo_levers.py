"""Which settings move PPO against the reward model alone: held-out verifier accuracy and KL per variant.

    python benchmarks/ppo_levers.py recipes/small.yaml --run-dir runs/small [--variants base,kl1,rounds3_kl1]
        [--jobs 2] [--seeds 0] [--work /tmp/ppo-levers] [--members 3]

Every variant is the recipe's ppo stage from the run's finished `sft` and `reward` stages (and `dpo`, for the
implicit_* variants), on the text prompts only (`ppo.prompts=world:preference`), with no rule reward
(`verifier_weight: 0`), from the study's pinned starting point (LEVER_BASE: `kl_coef` 0.2, 120 steps, no implicit
reward), plus the variant's overrides (VARIANTS below). Each runs in its own run folder under --work (the run's upstream stages linked in), `--jobs` at a time with
one thread each. The held-out figures are the stage's own (`metrics.json` → `heldout`: greedy replies to the
recipe's held-out prompts, judged by the world's verifier). The ensemble_* variants first train the reward stage
again with seeds 1..--members-1 from the run's sft (under --work/members; about half an hour each here).

Prints one row per variant and seed: held-out accuracy at the start (the sft model) and after, the gain, per skill,
the mean per-reply KL over the last tenth of the steps, the gold score of the rollouts (verifier accuracy of the
sampled replies) at the start and the end, and with reward rounds the reward model's accuracy on each round's fresh
pairs before it was fine-tuned.
"""

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT_ONLY = ["ppo.prompts=world:preference", "ppo.verifier_weight=0.0", "ppo.save_steps=0"]
# the study's starting point, pinned (the recipe's ppo section before it took the implicit reward): every variant is
# these plus its own overrides
LEVER_BASE = ["ppo.kl_coef=0.2", "ppo.max_steps=120", "ppo.implicit_reward=null", "ppo.implicit_reward_beta=0.1"]
ROUNDS3 = ["ppo.reward_rounds=3", "ppo.reward_round_prompts=4000"]
IMPLICIT = ["ppo.implicit_reward=dpo"]
ENSEMBLE, UWO = ["ppo.reward_ensemble={ensemble}"], ["ppo.ensemble_objective=uncertainty_weighted"]
VARIANTS = {  # name: overrides on top of the recipe's ppo section
    "base": [],
    "kl_k3": ["ppo.kl_estimator=k3"],
    "kl0.5": ["ppo.kl_coef=0.5"],
    "kl1": ["ppo.kl_coef=1.0"],
    "kl2": ["ppo.kl_coef=2.0"],
    "critic_policy": ["ppo.critic_init=policy"],
    "lr3e-5": ["ppo.learning_rate=3e-5"],
    "batch64": ["ppo.batch_size=64"],
    "steps240": ["ppo.max_steps=240"],
    "clip1": ["ppo.reward_clip=1.0"],
    "kl1_clip1": ["ppo.kl_coef=1.0", "ppo.reward_clip=1.0"],
    "rounds3": ROUNDS3,
    "rounds3_kl0.5": [*ROUNDS3, "ppo.kl_coef=0.5"],
    "rounds3_kl1": [*ROUNDS3, "ppo.kl_coef=1.0"],
    "rounds3_kl0.5_lm": [*ROUNDS3, "ppo.kl_coef=0.5", "ppo.reward_round_lm_loss_coefficient=1.0"],
    "rounds3_kl0.5_replay": [*ROUNDS3, "ppo.kl_coef=0.5", "ppo.reward_round_replay=2000"],
    "rounds3_kl0.5_lm_replay": [*ROUNDS3, "ppo.kl_coef=0.5", "ppo.reward_round_lm_loss_coefficient=1.0",
                                "ppo.reward_round_replay=2000"],
    # reward-model ensembles: the run's reward stage and the members --members trains ({ensemble}); the first of
    # those alone, to tell the ensemble from a better reward model
    "member1": ["ppo.reward_model={member1}"],
    "ensemble_mean": [*ENSEMBLE, "ppo.ensemble_objective=mean"],
    "ensemble_worst": [*ENSEMBLE, "ppo.ensemble_objective=worst_case"],
    "ensemble_uwo": [*ENSEMBLE, *UWO, "ppo.uncertainty_penalty=1.0"],
    "ensemble_worst_kl0.5": [*ENSEMBLE, "ppo.ensemble_objective=worst_case", "ppo.kl_coef=0.5"],
    "ensemble_uwo4_kl0.5": [*ENSEMBLE, *UWO, "ppo.uncertainty_penalty=4.0", "ppo.kl_coef=0.5"],
    "ensemble_uwo_kl0.5": [*ENSEMBLE, *UWO, "ppo.uncertainty_penalty=1.0", "ppo.kl_coef=0.5"],
    # DPO's implicit reward as a dense per-token reward beside the reward model's (RTO), from the run's dpo stage
    "implicit_b0.2": [*IMPLICIT, "ppo.implicit_reward_beta=0.2"],
    "implicit_b0.5_kl0.5": [*IMPLICIT, "ppo.implicit_reward_beta=0.5", "ppo.kl_coef=0.5"],
    "implicit_b1_kl1": [*IMPLICIT, "ppo.implicit_reward_beta=1.0", "ppo.kl_coef=1.0"],
    "implicit_b2_kl2": [*IMPLICIT, "ppo.implicit_reward_beta=2.0", "ppo.kl_coef=2.0"],
    "implicit_b1_kl1_steps240": [*IMPLICIT, "ppo.implicit_reward_beta=1.0", "ppo.kl_coef=1.0", "ppo.max_steps=240"],
    "implicit_only_b1_kl1_steps240": [*IMPLICIT, "ppo.implicit_reward_beta=1.0", "ppo.kl_coef=1.0", "ppo.max_steps=240",
                                      "ppo.reward_clip=1e-6"],  # the reward model's score clipped to nothing
    "kl1_steps240": ["ppo.kl_coef=1.0", "ppo.max_steps=240"],
    "implicit_b1_kl0.5": [*IMPLICIT, "ppo.implicit_reward_beta=1.0", "ppo.kl_coef=0.5"],
    "implicit_b0.5_kl0.5_steps240": [*IMPLICIT, "ppo.implicit_reward_beta=0.5", "ppo.kl_coef=0.5", "ppo.max_steps=240"],
    "implicit_b0.5_kl0.5_lr3e-4": [*IMPLICIT, "ppo.implicit_reward_beta=0.5", "ppo.kl_coef=0.5",
                                   "ppo.learning_rate=3e-4"],
    "rounds4_kl1_steps240": ["ppo.max_steps=240", "ppo.reward_rounds=4", "ppo.reward_round_prompts=4000",
                             "ppo.kl_coef=1.0"],
}
UPSTREAM = ("pretrain", "sft", "reward", "dpo", "diffusion", "diffusion_dpo")


def train_members(recipe: str, run_dir: Path, work: Path, count: int) -> list[Path]:
    """The reward stage trained again with seeds 1..count-1 (the same data and settings, another score-head
    initialisation and pair order) under work/members/seed-k, from the run's sft; finished ones are reused."""
    folders = []
    for seed in range(1, count):
        folder = work / "members" / f"seed-{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        for stage in ("pretrain", "sft"):
            if (run_dir / stage).exists() and not (folder / stage).exists():
                (folder / stage).symlink_to((run_dir / stage).resolve())
        if not (folder / "reward" / "manifest.json").exists():
            cmd = [sys.executable, str(REPO / "pipeline/reward.py"), recipe, f"run.output_dir={work / 'members'}",
                   f"run.name=seed-{seed}", f"reward.seed={seed}"]
            with open(work / "members" / f"seed-{seed}.log", "w") as log:
                subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
        folders.append(folder / "reward")
    return folders


def run_variant(recipe: str, run_dir: Path, work: Path, name: str, seed: int, overrides: list[str]) -> dict:
    run_name = f"{name}-seed{seed}"
    folder = work / run_name
    folder.mkdir(parents=True, exist_ok=True)
    for stage in UPSTREAM:
        if (run_dir / stage).exists() and not (folder / stage).exists():
            (folder / stage).symlink_to((run_dir / stage).resolve())
    metrics = folder / "ppo" / "metrics.json"
    if not metrics.exists():
        cmd = [sys.executable, str(REPO / "pipeline/ppo.py"), recipe, f"run.output_dir={work}",
               f"run.name={run_name}", f"ppo.seed={seed}", *TEXT_ONLY, *LEVER_BASE, *overrides]
        with open(work / f"{run_name}.log", "w") as log:
            done = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode != 0:
            return {"name": name, "seed": seed, "error": f"exit {done.returncode}: see {work / run_name}.log"}
    return {"name": name, "seed": seed, **json.loads(metrics.read_text())}


def row(m: dict) -> str:
    if "error" in m:
        return f"| {m['name']} | {m['seed']} | {m['error']} |"
    start, end = m["heldout"]["start"], m["heldout"]["ppo"]
    skills = " ".join(f"{k[:3]} {v:.2f}" for k, v in end["per_skill"].items())
    rounds = ", ".join(f"{r['accuracy_before']:.2f}" for r in m.get("reward_rounds", [])) or "—"
    return (f"| {m['name']} | {m['seed']} | {start['accuracy']:.3f} | {end['accuracy']:.3f} | "
            f"{end['accuracy'] - start['accuracy']:+.3f} | {skills} | {m['kl_end']:.2f} | "
            f"{m['verifier_start']:.2f} → {m['verifier_end']:.2f} | {rounds} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--run-dir", required=True, help="a run folder with finished sft and reward stages")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--work", default="/tmp/ppo-levers")
    parser.add_argument("--members", type=int, default=3,
                        help="ensemble_* variants: reward models in the ensemble, the run's and members-1 more")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    run_dir, work = Path(args.run_dir).resolve(), Path(args.work).resolve()
    jobs = [(n, int(s)) for n in names for s in args.seeds.split(",")]
    members = []
    if any("{ensemble}" in o or "{member1}" in o for n in names for o in VARIANTS[n]):
        members = train_members(str(Path(args.recipe).resolve()), run_dir, work, args.members)
    ensemble, member1 = "[" + ",".join(str(m) for m in members) + "]", members[0] if members else None
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda job: run_variant(str(Path(args.recipe).resolve()), run_dir, work, job[0],
                                                        job[1], [o.format(ensemble=ensemble, member1=member1)
                                                                 for o in VARIANTS[job[0]]]), jobs))
    print(f"\nppo from {run_dir}/sft against {run_dir}/reward, text prompts, verifier_weight 0 "
          f"(held-out: greedy, the stage's heldout_prompts)")
    print("| variant | seed | held-out start | held-out end | gain | per skill (end) | KL (last tenth) | "
          "gold of rollouts | reward model on fresh pairs, per round |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in results:
        print(row(m))


if __name__ == "__main__":
    main()
