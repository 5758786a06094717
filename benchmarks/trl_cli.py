"""Our sft / reward / dpo stages against TRL's own CLI (`trl sft`, `trl reward`, `trl dpo`) with its defaults.

    python benchmarks/trl_cli.py [--steps 50] [--stages sft,reward,dpo] [--run-dir runs/small]

Per stage, one after the other on this machine (never at once): the training rows our stage reads for
recipes/small.yaml are written to one local JSONL file; our stage (`python pipeline/<stage>.py`) trains on it from the
run folder's input model (sft: `pretrain`, reward and dpo: `sft`) into a fresh folder under --out, then
`trl <stage>` trains on the same file from the same model. Both get the same batch size, max_length, learning rate
and --steps; TRL additionally gets only what makes it run here: `--use_cpu`, `--bf16 false` (our recipe trains in
fp32), `--report_to none`, `--save_strategy no` and its logging. Everything else is TRL's default (e.g.
`gradient_checkpointing: true`, seed 42, no assistant-only loss, no LM regulariser on the reward model), and ours is
the recipe's (lm_loss_coefficient, RPO loss, warmup, cosine schedule; heldout_prompts switched off, since they only
add generation after training).

Tokens/s is real (non-padding) tokens trained per second of training loop: the `num_tokens` TRL's trainers log (the
attention mask summed over the batches the loss saw: sft the conversations, reward and dpo chosen plus rejected
sequences; dpo's reference forward not counted), over the `train_runtime` the trainer prints at the end, both read
from each run's output (printed to 4 significant digits). The two sides draw different batches (seed 0 against
TRL's 42), so each divides its own count. The rows are the same, in one order for both: tool rows first (the `json`
loader types a column by its first rows). Wall s is the whole subprocess: imports, data, model loading, our
end-of-stage evaluation, saving. Logs and outputs go under --out; a run that fails prints one line and `-`.
"""

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RECIPE = "recipes/small.yaml"
INIT = {"sft": "pretrain", "reward": "sft", "dpo": "sft"}
OFF = {"sft": ["sft.heldout_prompts=null"], "reward": [], "dpo": ["dpo.heldout_prompts=null"]}


def training_rows(stage, recipe):
    """The rows our stage hands its trainer (its data, the columns it keeps), as a Dataset."""
    from pipeline import data, dpo, preferences, reward, sft

    keys = recipe.keys(stage)
    if stage == "sft":
        ds, columns = data.load_with_info(keys.dataset, "chat", recipe, columns=keys.columns)[0], sft.TRAIN_COLUMNS
    else:
        ds = preferences.load_preference_splits(keys.dataset, keys.eval_dataset, keys.eval_fraction, recipe,
                                                keys.columns)[0]
        columns = reward.TRAIN_COLUMNS if stage == "reward" else dpo.PAIR_COLUMNS
    return ds.select_columns([c for c in columns if c in ds.column_names])


def export(stage, recipe, path: Path):
    """`training_rows` as a JSONL file; returns them as a Dataset."""
    ds = training_rows(stage, recipe)
    if "tools" in ds.column_names:  # tool rows first: the `json` loader types a column (tools, tool_calls) by its
        tools = ds["tools"]         # first block of rows, and a column of nulls there cannot take later values
        ds = ds.select([i for i, t in enumerate(tools) if t] + [i for i, t in enumerate(tools) if not t])
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.to_json(str(path), lines=True)
    return ds


def offline_env() -> dict:
    """This process's environment for a stage or TRL subprocess: hub and datasets offline, no tokenizer threads."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(name, cmd, log: Path, env, logs_tokens=True):
    """Runs cmd with output to log; returns (wall s, train_runtime s, real tokens trained) as the trainer printed
    (tokens None when the trainer does not log them: `logs_tokens` False, e.g. transformers' Trainer in pretrain)."""
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    text = log.read_text()
    runtime, tokens = (re.findall(rf"'{key}': '([0-9.e+-]+)'", text) for key in ("train_runtime", "num_tokens"))
    if code or not runtime or (logs_tokens and not tokens):
        lines = [line for line in text.splitlines() if line.strip() and "CalledProcessError" not in line]
        why = ([line for line in lines if re.match(r"\w*(Error|error)\b", line)] or lines or [""])[-1]
        print(f"  {name}: FAILED (exit {code}, see {log}): {why[:200]}", flush=True)
        return wall, None, None
    return wall, float(runtime[-1]), float(tokens[-1]) if tokens else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--stages", default="sft,reward,dpo")
    parser.add_argument("--run-dir", default="runs/small", help="a run folder with finished pretrain and sft stages")
    parser.add_argument("--out", default="/tmp/trlcli-bench", help="data, logs and both sides' outputs")
    parser.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting of our stage's section on our side only, e.g. "
                             "train_sampling_strategy=group_by_length (a lever not in the recipe); repeatable")
    args = parser.parse_args()

    from pipeline.recipe import load_recipe

    recipe = load_recipe(str(ROOT / RECIPE), [])
    out, run_dir = Path(args.out), Path(args.run_dir).resolve()
    env = offline_env()
    env.setdefault("OMP_NUM_THREADS", "1")
    bin_dir = Path(sys.executable).parent
    rows = []
    for stage in args.stages.split(","):
        section = recipe.section(stage)
        batch, max_length, lr = (section["per_device_train_batch_size"], section["max_length"],
                                 section["learning_rate"])
        init = run_dir / INIT[stage]
        data_file = out / "data" / stage / "train.jsonl"  # the folder is TRL's --dataset_name: split "train"
        ds = export(stage, recipe, data_file)
        print(f"{stage}: {len(ds)} rows in {data_file}, from {init}", flush=True)

        ours = [sys.executable, f"pipeline/{stage}.py", RECIPE, f"run.output_dir={out / 'ours'}",
                f"{stage}.init_from={init}", f"{stage}.dataset={data_file}", f"{stage}.max_steps={args.steps}",
                f"{stage}.report_to=none", f"{stage}.logging_steps={args.steps}", *OFF[stage],
                *(f"{stage}.{setting}" for setting in args.ours_set)]
        trl = [str(bin_dir / "trl"), stage, "--model_name_or_path", str(init), "--dataset_name", str(data_file.parent),
               "--output_dir", str(out / "trl" / stage), "--per_device_train_batch_size", str(batch),
               "--max_length", str(max_length), "--max_steps", str(args.steps), "--learning_rate", str(lr),
               "--use_cpu", "--bf16", "false", "--report_to", "none", "--save_strategy", "no",
               "--logging_steps", str(args.steps)]
        (out / "logs").mkdir(parents=True, exist_ok=True)
        results = []
        for name, cmd in (("ours", ours), (f"trl {stage}", trl)):
            wall, runtime, tokens = run(name, cmd, out / "logs" / f"{name.split()[0]}-{stage}.txt", env)
            if runtime:
                print(f"  {name}: {tokens:,.0f} real tokens in train_runtime {runtime:.1f} s, wall {wall:.0f} s",
                      flush=True)
            results.append((tokens / runtime if runtime else None, wall))
        rows.append((stage, *results[0], *results[1]))

    ours_set = f" (ours with {', '.join(args.ours_set)})" if args.ours_set else ""
    print(f"\nrecipes/small.yaml stages{ours_set} against TRL's CLI defaults, {args.steps} steps each, "
          f"{os.cpu_count()} CPUs, OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| stage  | ours tokens/s | TRL CLI tokens/s | ours / TRL | ours wall s | TRL CLI wall s |")
    print("|--------|---------------|------------------|------------|-------------|----------------|")
    for stage, ours_tps, ours_wall, trl_tps, trl_wall in rows:
        ratio = f"{ours_tps / trl_tps:.2f}x" if ours_tps and trl_tps else "-"
        print(f"| {stage:6} | {f'{ours_tps:,.0f}' if ours_tps else '-':>13} | {f'{trl_tps:,.0f}' if trl_tps else '-':>16} "
              f"| {ratio:>10} | {ours_wall:11.0f} | {trl_wall:14.0f} |")


if __name__ == "__main__":
    main()
