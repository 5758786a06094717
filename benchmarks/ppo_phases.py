"""Where our PPO stage's step time goes: generation, the tools (drawing, reading), scoring and the update.

    python benchmarks/ppo_phases.py recipes/small.yaml --from-run runs/small [--steps 4] [ppo.KEY=VALUE ...]

Copies the stages the ppo stage reads (its init_from, reward model, the tools' stages) from `--from-run` into a
temporary run folder, runs the ppo stage there for `--steps` steps under cProfile (in this process; the run folder
you name is never written) and prints the seconds each phase took and its share of the training loop. Tool calls
run in a worker thread (the timeout), so their time is what the main thread waited for them.
"""

import argparse
import cProfile
import pstats
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PHASES = [  # (phase, file, function): cumulative time of the function in the profile
    ("training loop", "ppo_trainer.py", "train"),
    ("rollouts (generation + tools)", "ppo_trainer.py", "rollout"),
    ("  tool calls", "tool_calls.py", "call_many"),
    ("scoring (reward, reference, values)", "ppo_trainer.py", "score"),
    ("update (PPO epochs)", "ppo_trainer.py", "update"),
]


def profile_ppo(recipe_path: str, overrides: list[str], from_run: str, phases: dict) -> dict:
    """Run the ppo stage under cProfile (in this process) in a temporary run folder holding copies of `from_run`'s
    stages it reads; {phase: cumulative seconds of its (file, function)}. Also used by ppo_grpo.py."""
    from pipeline import ppo
    from pipeline.recipe import load_recipe
    from pipeline.run import dependencies

    recipe = load_recipe(recipe_path, overrides)
    work = Path(tempfile.mkdtemp(prefix="ppo-profile-"))
    try:
        for stage in dict.fromkeys(dependencies(recipe, "ppo")):  # a stage can be named twice (tool and judge)
            shutil.copytree(Path(from_run) / stage, work / recipe.run.name / stage)
        profile = cProfile.Profile()
        try:
            profile.runcall(ppo.main, [recipe_path, *overrides, f"run.output_dir={work}"])
        except SystemExit as exit_:
            if exit_.code:
                raise
        stats = pstats.Stats(profile).stats
        return {phase: sum(v[3] for (path, _, name), v in stats.items() if path.endswith(file) and name == fn)
                for phase, (file, fn) in phases.items()}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--from-run", required=True, help="a run folder holding the stages ppo reads")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_intermixed_args()

    seconds = profile_ppo(args.recipe, [*args.overrides, f"ppo.max_steps={args.steps}", "ppo.logging_steps=1",
                                        "ppo.heldout_prompts=", "ppo.report_to=none"],
                          args.from_run, {phase: (file, fn) for phase, file, fn in PHASES})
    loop = seconds["training loop"]
    print(f"\nppo stage of {args.recipe}, {args.steps} steps ({' '.join(args.overrides) or 'recipe settings'})")
    print("| phase                                | seconds | per step | share of loop |")
    print("|--------------------------------------|---------|----------|---------------|")
    for phase, _, _ in PHASES:
        s = seconds[phase]
        print(f"| {phase:36} | {s:7.1f} | {s / args.steps:8.2f} | {s / loop:13.2f} |")


if __name__ == "__main__":
    main()
