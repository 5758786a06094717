"""Model FLOP utilisation of each training stage (pretrain, sft, reward, dpo, kto) on a larger benchmark model, per
dtype.

    python benchmarks/mfu.py [--steps 10] [--dtypes fp32,bf16] [--model 512x8] [--run-dir runs/small] \
        [--set sft.train_sampling_strategy=group_by_length ...]

The small recipe's 0.7M-parameter model (hidden size 128) is too narrow for any matmul to reach the machine's peak
(benchmarks/README: 6-18% of it). This script measures our own stages on a wider model of the same family: the small
recipe with `model.config` widened (`--model WIDTHxLAYERS`: hidden WIDTH, intermediate 3 x WIDTH, WIDTH/64 heads, half
as many key-value heads) and the run folder's trained tokenizer. Per dtype, one after the other:
`pipeline/pretrain.py` builds and trains it from the config for --steps steps, then `pipeline/sft.py`,
`pipeline/reward.py`, `pipeline/dpo.py` and `pipeline/kto.py` train --steps steps each from that checkpoint (bf16:
`<stage>.bf16=true`, autocast on CPU), on the recipe's data, batch sizes and max_length (kto, which the small recipe
has no section for: dpo's data, batch, max_length and length_split, each pair two rows).

Achieved FLOP/s = FLOPs per real (non-padding) token x real tokens / the `train_runtime` the trainer prints; FLOPs
per token: 6 x N for a forward and backward pass over the N weights a token goes through (pretrain and sft: the
whole causal LM, its tied LM head counted once; reward: without the LM head, its score head is one column), dpo
8 x N (its frozen reference's forward pass too), kto 12 x N (TRL counts the rows' tokens; each row also goes through
the policy and the reference as the KL row, the batch's completions under other prompts: as many tokens, forward
passes only, 2 x N each, and the reference's forward pass of the row itself, 2 x N). Attention score FLOPs, the reward stage's LM regulariser and
padding are not counted, so the share is a lower bound. Real tokens: pretrain steps x batch x block size (blocks
are full), the others the `num_tokens` TRL logs. The peak is matmul_peak.py's best square matmul in that dtype, with
the same threads, measured first. Stage logs and outputs go under --out.

Each stage runs --warmup steps more than --steps, through step_timer.py (one log line per step), so the table has two
rates: over the whole `train_runtime` (warm-up steps included, as a run pays them), and over the last --steps steps
alone, the steady state a longer run converges to (with `torch_compile`, the first step compiles for tens of seconds).
Stages after pretrain leave right after training (their final evaluation and save are not timed and not needed).
"""

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))
RECIPE = "recipes/small.yaml"
STAGES = ("pretrain", "sft", "reward", "dpo", "kto")
KTO_FROM_DPO = ("dataset", "per_device_train_batch_size", "max_length", "length_split", "gradient_checkpointing",
                "use_cpu")  # the small recipe has no kto section: dpo's settings (KTOConfig's: batch 8, 1,024 tokens)


def model_overrides(spec: str) -> list[str]:
    """`WIDTHxLAYERS` as the recipe's model.config keys."""
    width, layers = (int(v) for v in spec.lower().split("x"))
    heads = width // 64
    return [f"model.config.hidden_size={width}", f"model.config.intermediate_size={3 * width}",
            f"model.config.num_hidden_layers={layers}", f"model.config.num_attention_heads={heads}",
            f"model.config.num_key_value_heads={max(1, heads // 2)}"]


def short_stage_overrides(run_dir: str, stage: str, steps: int) -> list[str]:
    """What a benchmark's short run of a language-model stage of a widened model sets (mfu.py, ppo_phases.py
    --model): `run_dir`'s trained tokenizer (a new model cannot train its own in a few steps), `steps` steps, no
    report, and no held-out generation after training."""
    tokenizer = Path(run_dir).resolve() / "pretrain"
    settings = ["tokenizer.train=false", f"tokenizer.name_or_path={tokenizer}", f"{stage}.max_steps={steps}",
                f"{stage}.report_to=none"]
    return settings + ([f"{stage}.heldout_prompts=null"] if stage in ("sft", "dpo", "kto") else [])


def weights_per_token(folder: Path) -> tuple[int, int]:
    """(parameters of the causal LM, parameters of its LM head) of a saved checkpoint."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # tied LM head and embedding counted once
    return total, config.vocab_size * config.hidden_size


def step_times(log_text: str) -> dict[int, tuple[float, float | None]]:
    """{step: (seconds since training began, real tokens so far or None)} from step_timer.py's lines; a step printed
    twice (before and after its token count was logged) keeps its last line."""
    steps = {}
    for step, seconds, tokens in re.findall(r"\[step_timer\] (\d+) ([0-9.]+) (\S+)", log_text):
        steps[int(step)] = (float(seconds), None if tokens == "-" else float(tokens))
    return steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="the steady-state steps timed after the warm-up")
    parser.add_argument("--warmup", type=int, default=2, help="steps before the steady-state window")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--model", default="512x8", help="WIDTHxLAYERS of the benchmark model")
    parser.add_argument("--run-dir", default="runs/small", help="a run folder whose pretrain holds the tokenizer")
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "mfu-bench"))
    parser.add_argument("--stages", default=",".join(STAGES), help="a comma list of " + ", ".join(STAGES))
    parser.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                        help="a recipe override for every run, e.g. sft.train_sampling_strategy=group_by_length")
    args = parser.parse_args()

    import torch

    from matmul_peak import gflops
    from pipeline import threads
    from pipeline.recipe import load_recipe
    from trl_cli import offline_env, run

    n_threads = threads.configure()
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    peaks = {name: max(gflops(n, dtypes[name], 2.0) for n in (256, 512, 1024, 2048))
             for name in args.dtypes.split(",")}
    print(f"matmul peak, {n_threads} thread(s): " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peaks.items()),
          flush=True)

    recipe = load_recipe(str(ROOT / RECIPE), args.set)
    out = Path(args.out)
    env = offline_env()
    rows, params = [], 0
    for dtype in peaks:
        name = f"mfu-{args.model}-{dtype}"
        base = [RECIPE, f"run.output_dir={out}", f"run.name={name}", *model_overrides(args.model), *args.set]
        pretrained = out / name / "pretrain"
        (out / "logs").mkdir(parents=True, exist_ok=True)
        for stage in [s for s in STAGES if s in args.stages.split(",")]:
            settings = short_stage_overrides(args.run_dir, stage, args.warmup + args.steps)
            settings += [f"{stage}.logging_steps=1", f"{stage}.bf16={'true' if dtype == 'bf16' else 'false'}"]
            settings += ["pretrain.save_strategy=no"] if stage == "pretrain" else [f"{stage}.init_from={pretrained}"]
            if stage == "kto" and "kto" not in recipe.stages:
                settings += [f"kto.{k}={json.dumps(recipe.section('dpo')[k])}" for k in KTO_FROM_DPO
                             if k in recipe.section("dpo")]
            cmd = [sys.executable, str(BENCH / "step_timer.py"), f"pipeline/{stage}.py", *base, *settings]
            log = out / "logs" / f"{name}-{stage}.txt"
            stage_env = {**env, "STEP_TIMER_EXIT": "0" if stage == "pretrain" else "1"}
            wall, runtime, tokens = run(stage, cmd, log, stage_env, logs_tokens=stage != "pretrain")
            steps = step_times(log.read_text())
            if stage == "pretrain" and runtime and steps:
                section = recipe.section("pretrain")
                per_step = section["per_device_train_batch_size"] * section["block_size"]  # full blocks
                steps = {step: (seconds, step * per_step) for step, (seconds, _) in steps.items()}
                tokens = steps[max(steps)][1]
            if not runtime or args.warmup not in steps or args.warmup + args.steps not in steps:
                rows.append((stage, dtype, None, None, None, None, None, None, wall))
                if stage == "pretrain":
                    break
                continue
            total, head = weights_per_token(pretrained)
            params = total
            flops_per_token = {"pretrain": 6 * total, "sft": 6 * total, "reward": 6 * (total - head),
                               "dpo": 8 * total, "kto": 12 * total}[stage]
            achieved = flops_per_token * tokens / runtime / 1e9
            (t0, tok0), (t1, tok1) = steps[args.warmup], steps[args.warmup + args.steps]
            steady = flops_per_token * (tok1 - tok0) / (t1 - t0) / 1e9
            rows.append((stage, dtype, tokens, runtime, achieved, achieved / peaks[dtype], (tok1 - tok0) / (t1 - t0),
                         steady / peaks[dtype], wall))
            print(f"  {stage} {dtype}: {tokens:,.0f} real tokens in {runtime:.1f} s, {achieved:.1f} GFLOP/s, "
                  f"{achieved / peaks[dtype]:.1%} of the {dtype} peak; the last {args.steps} steps "
                  f"{steady:.1f} GFLOP/s, {steady / peaks[dtype]:.1%} (wall {wall:.0f} s)", flush=True)

    extra = f", {' '.join(args.set)}" if args.set else ""
    print(f"\nrecipes/small.yaml stages on a {args.model} model ({params / 1e6:.1f}M parameters){extra}, "
          f"{args.warmup} + {args.steps} steps each, {n_threads} thread(s), "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| stage | dtype | real tokens | train s | tokens/s | GFLOP/s | peak GFLOP/s | share of peak | "
          f"last {args.steps} steps: tokens/s | share of peak | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for stage, dtype, tokens, runtime, achieved, share, steady_tokens, steady_share, wall in rows:
        if runtime is None:
            print(f"| {stage} | {dtype} | - | - | - | - | {peaks[dtype]:.1f} | failed | - | - | {wall:.0f} |")
            continue
        print(f"| {stage} | {dtype} | {tokens:,.0f} | {runtime:.1f} | {tokens / runtime:,.0f} | {achieved:.1f} | "
              f"{peaks[dtype]:.1f} | {share:.1%} | {steady_tokens:,.0f} | {steady_share:.1%} | {wall:.0f} |")
    (out / "mfu.json").write_text(json.dumps({"model": args.model, "parameters": params, "peaks": peaks,
                                              "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
