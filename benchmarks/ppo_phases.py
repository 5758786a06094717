"""Where our PPO stage's step time goes: generation, the tools (drawing, reading), scoring and the update.

    python benchmarks/ppo_phases.py recipes/small.yaml --from-run runs/small [--steps 4] [--flops] [ppo.KEY=VALUE ...]

Copies the stages the ppo stage reads (its init_from, reward model, the tools' stages) from `--from-run` into a
temporary run folder, runs the ppo stage there for `--steps` steps under cProfile (in this process; the run folder
you name is never written) and prints the seconds each phase took and its share of the training loop.

`--flops`: the ppo stage's share of the matmul peak, as mfu.py gives the other stages'. Two more runs of the same
steps (the same work: a step's sampling and draws depend on the seed and the step alone): one without cProfile, timing
each phase's calls with a clock, and one under torch's FlopCounterMode, adding up each phase's FLOPs (matmuls,
convolutions and attention's bmm as they ran, padding included, unlike mfu.py's real tokens; CPU SDPA, elementwise
work and the optimizer are not counted). The table gives each phase's GFLOP/s and its share of the fp32 peak (ppo
trains in fp32; matmul_peak.py's best square matmul with the same threads, measured first).

`--model WIDTHxLAYERS`: the same on mfu.py's wider benchmark model instead of `--from-run`'s. Its pretrain, sft, reward
and dpo (the policy, the reward model and critic, the implicit reward's model) are trained `--model-steps` steps each
into a temporary run folder, with `--from-run`'s tokenizer, beside copies of `--from-run`'s other stages (the tools'
image models); ppo starts from them. Their throughput, not their quality, is measured: an untrained policy's replies
(their lengths, their tool calls) differ from the trained one's, so its steps hold other work than the recipe's.
"""

import argparse
import atexit
import contextlib
import cProfile
import functools
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PHASES = [  # (phase, file, function): cumulative time of the function in the profile
    ("training loop", "ppo_trainer.py", "train"),
    ("rollouts (generation + tools)", "ppo_trainer.py", "rollout"),
    ("  tool calls", "tool_calls.py", "call_many"),
    ("scoring (reward, reference, values)", "ppo_trainer.py", "score"),
    ("update (PPO epochs)", "ppo_trainer.py", "update"),
]


def run_ppo_copy(recipe_path: str, overrides: list[str], from_run: str, runner=None) -> None:
    """Run the ppo stage (in this process, through `runner(function, argv)` if given) in a temporary run folder
    holding copies of `from_run`'s stages it reads; the folder is deleted after."""
    from pipeline import ppo
    from pipeline.recipe import load_recipe
    from pipeline.run import dependencies

    recipe = load_recipe(recipe_path, overrides)
    work = Path(tempfile.mkdtemp(prefix="ppo-profile-"))
    try:
        for stage in dict.fromkeys(dependencies(recipe, "ppo")):  # a stage can be named twice (tool and judge)
            shutil.copytree(Path(from_run) / stage, work / recipe.run.name / stage)
        try:
            (runner or (lambda f, argv: f(argv)))(ppo.main, [recipe_path, *overrides, f"run.output_dir={work}"])
        except SystemExit as exit_:
            if exit_.code:
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def wide_model_run(recipe_path: str, overrides: list[str], from_run: str, steps: int) -> Path:
    """A temporary run folder holding pretrain, sft, reward and dpo of the model `overrides` widen (mfu.py's
    model_overrides among them), trained `steps` steps each by the stage scripts, and copies of `from_run`'s other
    stages ppo reads; returns the folder."""
    from mfu import short_stage_overrides
    from pipeline.recipe import load_recipe
    from pipeline.run import dependencies
    from trl_cli import offline_env

    language = ("pretrain", "sft", "reward", "dpo")
    recipe = load_recipe(recipe_path, overrides)
    work = Path(tempfile.mkdtemp(prefix="ppo-wide-"))
    atexit.register(shutil.rmtree, work, True)
    for stage in dict.fromkeys(dependencies(recipe, "ppo")):
        if stage not in language:
            shutil.copytree(Path(from_run) / stage, work / recipe.run.name / stage)
    base = [recipe_path, *overrides, f"run.output_dir={work}"]
    for stage in language:
        settings = short_stage_overrides(from_run, stage, steps)
        print(f"wider model: {stage}, {steps} steps", flush=True)
        proc = subprocess.run([sys.executable, str(ROOT / "pipeline" / f"{stage}.py"), *base, *settings], cwd=ROOT,
                              env=offline_env(), capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{stage} of the wider model failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return work / recipe.run.name


def profile_ppo(recipe_path: str, overrides: list[str], from_run: str, phases: dict) -> dict:
    """Run the ppo stage under cProfile (in this process) in a temporary run folder holding copies of `from_run`'s
    stages it reads; {phase: cumulative seconds of its (file, function)}. Also used by ppo_grpo.py."""
    profile = cProfile.Profile()
    run_ppo_copy(recipe_path, overrides, from_run, profile.runcall)
    stats = pstats.Stats(profile).stats
    return {phase: sum(v[3] for (path, _, name), v in stats.items() if path.endswith(file) and name == fn)
            for phase, (file, fn) in phases.items()}


def measure_phases(recipe_path: str, overrides: list[str], from_run: str, count_flops: bool) -> dict:
    """{phase: seconds} of a run without cProfile, each phase's calls timed by a clock; with count_flops, under
    torch's FlopCounterMode, {phase: FLOPs} instead."""
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline import ppo_trainer, tool_calls

    methods = {"training loop": (ppo_trainer.PPOTrainer, "train"),
               "rollouts (generation + tools)": (ppo_trainer.PPOTrainer, "rollout"),
               "  tool calls": (tool_calls.ToolBox, "call_many"),
               "scoring (reward, reference, values)": (ppo_trainer.PPOTrainer, "score"),
               "update (PPO epochs)": (ppo_trainer.PPOTrainer, "update")}
    counter = FlopCounterMode(display=False)
    measure = counter.get_total_flops if count_flops else time.perf_counter
    totals = dict.fromkeys(methods, 0.0)

    def measured(phase, original):
        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            before = measure()
            try:
                return original(*args, **kwargs)
            finally:
                totals[phase] += measure() - before
        return wrapper

    originals = {phase: getattr(cls, name) for phase, (cls, name) in methods.items()}
    try:
        for phase, (cls, name) in methods.items():
            setattr(cls, name, measured(phase, originals[phase]))
        with counter if count_flops else contextlib.nullcontext():
            run_ppo_copy(recipe_path, overrides, from_run)
    finally:
        for phase, (cls, name) in methods.items():
            setattr(cls, name, originals[phase])
    return totals


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--from-run", required=True, help="a run folder holding the stages ppo reads")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--flops", action="store_true", help="also each phase's GFLOP/s and share of the fp32 peak")
    parser.add_argument("--model", default=None, help="WIDTHxLAYERS: measure on mfu.py's wider model (see above)")
    parser.add_argument("--model-steps", type=int, default=2, help="training steps of each --model stage")
    args = parser.parse_intermixed_args()
    if args.model:
        from mfu import model_overrides

        args.overrides = [*args.overrides, *model_overrides(args.model)]
        args.from_run = str(wide_model_run(args.recipe, args.overrides, args.from_run, args.model_steps))

    overrides = [*args.overrides, f"ppo.max_steps={args.steps}", "ppo.logging_steps=1", "ppo.heldout_prompts=",
                 "ppo.report_to=none"]
    if args.flops:
        import torch

        from matmul_peak import gflops
        from pipeline import threads

        n_threads = threads.configure()
        peak = max(gflops(n, torch.float32, 2.0) for n in (256, 512, 1024, 2048))
        print(f"matmul peak, {n_threads} thread(s): fp32 {peak:.1f} GFLOP/s", flush=True)
    seconds = profile_ppo(args.recipe, overrides, args.from_run, {phase: (file, fn) for phase, file, fn in PHASES})
    loop = seconds["training loop"]
    print(f"\nppo stage of {args.recipe}, {args.steps} steps ({' '.join(args.overrides) or 'recipe settings'})")
    print("| phase                                | seconds | per step | share of loop |")
    print("|--------------------------------------|---------|----------|---------------|")
    for phase, _, _ in PHASES:
        s = seconds[phase]
        print(f"| {phase:36} | {s:7.1f} | {s / args.steps:8.2f} | {s / loop:13.2f} |")
    if not args.flops:
        return
    clock = measure_phases(args.recipe, overrides, args.from_run, count_flops=False)
    flops = measure_phases(args.recipe, overrides, args.from_run, count_flops=True)
    print(f"\nthe same {args.steps} steps without cProfile, {n_threads} thread(s); "
          "FLOPs from a run under FlopCounterMode")
    print("| phase | seconds | GFLOP | GFLOP/s | share of the fp32 peak |")
    print("|---|---|---|---|---|")
    for phase in clock:
        achieved = flops[phase] / clock[phase] / 1e9
        print(f"| {phase.strip()} | {clock[phase]:.1f} | {flops[phase] / 1e9:.1f} | {achieved:.1f} | "
              f"{achieved / peak:.1%} |")


if __name__ == "__main__":
    main()
