"""Our PPO's replies/s against `ppo.algorithm=grpo` (TRL's GRPOTrainer) at equal replies per step, and the share of
each step spent generating.

    python benchmarks/ppo_grpo.py recipes/small.yaml --from-run runs/small [--steps 8] [ppo.KEY=VALUE ...]
    python benchmarks/ppo_grpo.py ... --algorithms ppo,ppo:group_norm,grpo   # also ours with GRPO's advantages

Both run the recipe's ppo stage from `--from-run`'s stages (copied into a temporary run folder per run: the folder
you name is never written), one after the other, for `--steps` steps, in a subprocess each under cProfile, with the
same prompts, sft policy, reward model, `batch_size` (replies per step: ours samples one reply to each of
`batch_size` prompts, GRPO `batch_size / num_generations` prompts `num_generations` times), `max_new_tokens`,
temperature and learning rate. What only one of them computes is switched off for both: `implicit_reward` (ours
only: one more model's forward pass), the held-out check and logging to trackers; both log the last step only (ours
samples the starting policy's replies on a logged step, for its annotator score). Everything else is each side's
own: ours keeps the recipe's `length_split` (GRPO refuses it: it gets 1) and trains `ppo_epochs` x
`num_minibatches` updates per step with a critic, GRPO one update per step (TRL's defaults: `num_iterations` 1,
`steps_per_generation` 1). `ppo:ESTIMATOR` in `--algorithms` runs ours with
`ppo.advantage_estimator=ESTIMATOR` (no critic) and, for the group estimators, GRPO's `num_generations` replies per
prompt: `ppo:group_norm` is GRPO's advantage in our loop. Pass overrides (e.g. `ppo.prompts=world:preference`
and `"tools.tools=[]"` for text prompts only, from a run without the image stages) after the recipe.

The table: the training loop's seconds (ours: `PPOTrainer.train`; GRPO: transformers' `Trainer.train`), replies/s
(steps x batch_size over that), generation's seconds (ours: `PPOTrainer.rollout`, which samples every turn and runs
the tools; GRPO: `GRPOTrainer._generate`, the same for TRL) and its share of the loop, and of it the tool calls'
seconds (`ToolBox._timed`, where either side's tool runs: the drawing and reading of the image tools).
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # ppo_phases.py
from ppo_phases import profile_ppo  # noqa: E402  (its own path setup puts the repository on sys.path)

PHASES = {  # algorithm -> {phase: (file, function)}: cumulative time of the function in the profile
    "ppo": {"loop": ("ppo_trainer.py", "train"), "generation": ("ppo_trainer.py", "rollout"),
            "tools": ("tool_calls.py", "_timed")},
    "grpo": {"loop": ("transformers/trainer.py", "train"), "generation": ("grpo_trainer.py", "_generate"),
             "tools": ("tool_calls.py", "_timed")},
}
EQUAL = ["ppo.implicit_reward=", "ppo.heldout_prompts=", "ppo.report_to=none", "ppo.save_steps=0"]
OWN = {"ppo": [], "grpo": ["ppo.length_split=1"]}  # GRPO refuses our length_split (ours keeps the recipe's)


def profile_one(name: str, recipe_path: str, overrides: list[str], from_run: str, steps: int) -> dict:
    """Run the ppo stage once under cProfile (in this process); the phases' seconds. `name`: ppo, grpo, or
    ppo:ESTIMATOR (ours with that advantage_estimator; a group estimator gets GRPO's num_generations)."""
    from pipeline.ppo_config import GROUP_ESTIMATORS
    from pipeline.recipe import load_recipe

    algorithm, _, estimator = name.partition(":")
    argv_overrides = [*overrides, *EQUAL, *OWN[algorithm], f"ppo.algorithm={algorithm}", f"ppo.max_steps={steps}",
                      f"ppo.logging_steps={steps}"]  # one logged step: ours samples the start policy's replies there
    if estimator:
        argv_overrides.append(f"ppo.advantage_estimator={estimator}")
    if estimator in GROUP_ESTIMATORS:
        group = load_recipe(recipe_path, [*overrides, "ppo.algorithm=grpo"]).trainer_config("ppo").num_generations
        argv_overrides.append(f"ppo.num_generations={group}")
    seconds = profile_ppo(recipe_path, argv_overrides, from_run, PHASES[algorithm])
    cfg = load_recipe(recipe_path, argv_overrides).trainer_config("ppo")
    return {**seconds, "steps": steps, "batch_size": cfg.batch_size, "num_generations": cfg.num_generations}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--from-run", required=True, help="a run folder holding the stages ppo reads")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--algorithms", default="ppo,grpo")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: profile this algorithm, print JSON
    args = parser.parse_intermixed_args()

    if args.one:
        out = profile_one(args.one, args.recipe, args.overrides, args.from_run, args.steps)
        print("RESULT " + json.dumps(out), flush=True)
        return

    rows = {}
    for algorithm in args.algorithms.split(","):
        cmd = [sys.executable, __file__, args.recipe, *args.overrides, "--from-run", args.from_run,
               "--steps", str(args.steps), "--one", algorithm]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"{algorithm}: failed (exit code {proc.returncode}): {tail}", file=sys.stderr)
            continue
        rows[algorithm] = json.loads(line[len("RESULT "):])

    print(f"\nppo stage of {args.recipe}, {args.steps} steps, {' '.join(args.overrides) or 'recipe settings'}; "
          f"both: {' '.join(EQUAL)}")
    print("| algorithm | replies/step | loop s | replies/s | generation s | share of loop | of it tool calls s | "
          "x ours |")
    print("|---|---|---|---|---|---|---|---|")
    ours = rows["ppo"]["steps"] * rows["ppo"]["batch_size"] / rows["ppo"]["loop"] if "ppo" in rows else None
    for algorithm, r in rows.items():
        rate = r["steps"] * r["batch_size"] / r["loop"]
        per_prompt = f"{r['num_generations']} per prompt"
        name = ("ours (ppo)" if algorithm == "ppo" else f"ours ({algorithm[4:]}, {per_prompt})"
                if algorithm.startswith("ppo:") else f"TRL {algorithm} ({per_prompt})")
        print(f"| {name} | {r['batch_size']} | {r['loop']:.1f} | {rate:.2f} | {r['generation']:.1f} | "
              f"{r['generation'] / r['loop']:.2f} | {r['tools']:.1f} | {f'{rate / ours:.2f}' if ours else '-'} |")

if __name__ == "__main__":
    main()
