"""Run a whole recipe: every stage in dependency order, each in its own process.

    python pipeline/run.py recipes/small.yaml [section.key=value ...] [--dry-run] [--force] [--only S[,S]] [--from S]
    python pipeline/run.py RECIPE --check [--device-memory 80GiB] [--gpu-tflops T --gpu-watts W --mfu M]
                                          [--slurm --nodes N --gpus-per-node G ...]
    python pipeline/run.py RECIPE --slurm [--partition P] [--account A] [--nodes N] [--gpus-per-node G] [--time T]

A stage whose manifest matches its current inputs and settings is skipped (see pipeline/runs.py). `--force` reruns
the selected stages, `--from S` reruns S and every stage that reads it (directly or through another stage), `--only`
restricts the plan. Each stage is started as `python pipeline/<stage>.py RECIPE OVERRIDES`, or behind `run.launcher`
(e.g. `accelerate launch ...`).
`--check` validates models, data, global batch and per-device memory without running anything (pipeline/check.py)
and projects each stage's GPU time, energy and CO2e (pipeline/cost_check.py); after a run the summary prints the
cost table of the stages' manifests and writes it to `<run>/cost.md` (pipeline/cost.py);
`--slurm` submits the planned stages as chained Slurm jobs instead of running them here (pipeline/slurm.py).
"""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the package, never shadow libraries with our modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time

from pipeline import (check, cli, cluster, cost, cost_check, locks, memory, preemption, references, runs, safe_resume,
                      slurm)
from pipeline.fingerprints import hash_obj
from pipeline.key_checks import source_of
from pipeline.recipe import load_recipe
from pipeline.stages import STAGES, tool_sources

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
COST_FILE = "cost.md"  # the run's cost table, written by the runner into the run folder


def dependencies(recipe, stage: str, planned=None) -> list[str]:
    """Stages of this recipe that `stage` reads a checkpoint from (or its tools load), and those of `planned` (None:
    of the recipe) it reads only once finished (its keys' `waits_for`: eval's `reward_model: auto`)."""
    keys = recipe.keys(stage)
    deps = []
    for f in dataclasses.fields(keys):
        ref, value = f.metadata.get("ref"), getattr(keys, f.name)
        values = value if isinstance(value, list) else [value]
        if ref in ("checkpoint", "checkpoints"):
            for v in [v for v in values if v]:  # a misspelt stage name: one line now, not after the other stages
                references.misspelt_stage(recipe, v, f"{stage}.{f.name}")
            deps += [v for v in values if v in recipe.stages and v != stage]
    deps += [v for v in tool_sources(recipe, stage).values() if v in recipe.stages and v != stage]
    if hasattr(keys, "waits_for"):
        deps += [v for v in keys.waits_for(recipe) if v != stage and (planned is None or v in planned)]
    return deps


def order_stages(recipe) -> list[str]:
    """Recipe order, moved where needed so every stage comes after the stages it starts from."""
    done, order, visiting = set(), [], set()

    def visit(stage):
        if stage in done:
            return
        if stage in visiting:
            raise cli.PipelineError(f"{recipe.path}: stages depend on each other in a cycle through '{stage}'")
        visiting.add(stage)
        for dep in dependencies(recipe, stage):
            visit(dep)
        visiting.discard(stage)
        done.add(stage)
        order.append(stage)

    for stage in recipe.stages:
        visit(stage)
    return order


def check_references(recipe, stage: str) -> None:
    """The checkpoints a stage names, before the runner starts anything: a missing folder stops the run then, not
    after the stages before this one have trained (told as runs.resolve_checkpoint tells them; nothing is hashed or
    loaded here)."""
    keys = recipe.keys(stage)
    for f in dataclasses.fields(keys):
        value, ref = getattr(keys, f.name), f.metadata.get("ref")
        refs = (value or []) if ref == "checkpoints" else [value] if ref == "checkpoint" and value else []
        for r in refs:
            references.reference_kind(recipe, r, f"{stage}.{f.name}")


def plan(recipe, only=(), start=None, force=False) -> list[tuple[str, bool, str]]:
    """(stage, run it?, why) for each stage in order."""
    order = order_stages(recipe)
    if not order:  # an empty file, or `run:` alone: a typo'd path is likelier than a recipe meant to do nothing
        raise cli.PipelineError(f"{recipe.path}: no stage sections, nothing to run (stages: {', '.join(STAGES)})")
    for name in [*only, *([start] if start else [])]:
        if name not in order:
            raise cli.PipelineError(f"{recipe.path}: no stage '{name}' in this recipe (stages: {', '.join(order)})")
    rerun: set[str] = set()
    steps = []
    from_start = set()  # --from's: `start` and every stage that reads it, also through a stage --only leaves out
    for stage in order:
        if stage == start or any(d in from_start for d in dependencies(recipe, stage)):
            from_start.add(stage)
    for stage in order:
        if only and stage not in only:
            continue
        check_references(recipe, stage)
        upstream = [d for d in dependencies(recipe, stage) if d in rerun]
        holder = locks.is_held(recipe.run_dir / f"{stage}.lock")
        if holder is not None:
            run, why = True, f"being written now by {locks.describe(holder)}"
        elif force:
            run, why = True, "--force"
        elif stage in from_start:
            run, why = True, f"--from {start}"
        elif upstream:
            run, why = True, f"input stage {upstream[0]} reruns"
        else:
            fresh, why = runs.up_to_date(recipe, stage)
            run = not fresh
        # a stage whose input stage reruns gets other inputs: its killed attempt's folder is wiped, not resumed
        if run and holder is None and not upstream and (note := resume_note(recipe, stage)):
            why = note if why == "not run yet" else f"{why}; {note}"
        if run:
            rerun.add(stage)
        steps.append((stage, run, why))
    return steps


def resume_note(recipe, stage: str) -> str | None:
    """What `stage` does with the checkpoints a killed attempt of the same inputs left in its `.partial` folder: resume
    from the one safe_resume takes (looked at, not changed), or start over. None: no such checkpoints, or iterated
    DPO's finished rounds, which it resumes after (pipeline/dpo_rounds.py)."""
    partial = recipe.run_dir / f"{stage}.partial"
    where = f"{recipe.run_dir.name}/{partial.name}"
    if not any(partial.glob("checkpoint-*")) or (partial / "rounds").is_dir():
        return None
    if not safe_resume.keeps(partial, hash_obj(runs.stage_inputs(recipe, stage, must_exist=False))):
        return None  # written for other inputs: the stage wipes it and starts from nothing
    ckpt = safe_resume.find_checkpoint(partial, plan=True)  # by its state files: the stage reads the rest
    if ckpt is None:
        return f"starts over: no checkpoint in {where} it can resume from"
    total = (safe_resume.read_json(ckpt / safe_resume.TRAINER_STATE) or {}).get("max_steps")
    return f"resumes from {ckpt.name}{f' of {total} steps' if total else ''} in {where}"


def launcher_prefix(recipe) -> list[str]:
    """What each stage's command starts with: `run.launcher`'s words, its program found on PATH, else python."""
    if not recipe.run.launcher:
        return [sys.executable]
    prefix = shlex.split(recipe.run.launcher)  # checked when the recipe loads
    if not prefix or shutil.which(prefix[0]) is None:
        raise cli.PipelineError(f"{source_of(recipe, 'run', 'launcher')}: run.launcher: "
                                f"'{prefix[0] if prefix else ''}' is not a program on PATH (install it, e.g. "
                                f"accelerate, or leave run.launcher empty for plain python)")
    return prefix


def stage_command(recipe, stage: str, overrides: list[str]) -> list[str]:
    return [*launcher_prefix(recipe), str(STAGES[stage].script), str(recipe.path), *overrides]


def _die_with_parent() -> None:
    """In the stage process, before exec: get SIGTERM (checkpoint and stop) if the runner dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


class StageProcess:
    """One stage's process. Side by side with others, its output comes through the runner, each line prefixed
    with `[stage]` and its progress bars redrawn at most every BAR_EVERY_S seconds, so two stages stay readable."""

    BAR_EVERY_S = 30.0
    _print_lock = threading.Lock()

    def __init__(self, stage: str, cmd: list[str], prefixed: bool):
        self.stage, self.started = stage, time.time()
        pipe = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT,
                "env": {**os.environ, "PYTHONUNBUFFERED": "1"}} if prefixed else {}
        self.proc = subprocess.Popen(cmd, process_group=0, preexec_fn=_die_with_parent, **pipe)  # own group:
        self.relay = None                                                                    # Ctrl-C arrives once
        if prefixed:
            self.relay = threading.Thread(target=self._relay, daemon=True)
            self.relay.start()

    def _relay(self) -> None:
        tag, pending, last_bar = f"[{self.stage}]", b"", 0.0
        for chunk in iter(lambda: self.proc.stdout.read1(65536), b""):
            pending += chunk
            *pieces, pending = re.split(rb"(\r\n|\n|\r)", pending)  # text, end, text, end, ..., unfinished
            for text, end in zip(pieces[::2], pieces[1::2]):
                line = ANSI_ESCAPE.sub("", text.decode(errors="replace")).rstrip()  # nested bars move the cursor
                if not line:
                    continue
                if end == b"\r":  # a progress bar redrawn in place
                    if time.time() - last_bar < self.BAR_EVERY_S:
                        continue
                    last_bar = time.time()
                self.say(line if line.startswith(tag) else f"{tag} {line}")
        if pending.strip():
            self.say(f"{tag} {pending.decode(errors='replace').rstrip()}")

    @classmethod
    def say(cls, line: str) -> None:
        with cls._print_lock:
            print(line, flush=True)

    def poll(self) -> int | None:
        """The exit code once the stage has ended (128 + N for a stage killed by signal N), else None."""
        code = self.proc.poll()
        if code is None:
            return None
        if self.relay is not None:
            self.relay.join()
        return 128 - code if code < 0 else code


def run_stages(recipe, todo: list[str], overrides: list[str]) -> tuple[str, int] | None:
    """Run the stages `todo` (in plan order), up to `run.parallel_stages` at a time: a stage starts once every stage
    of `todo` it needs has finished. SIGTERM, SIGUSR1 and SIGINT sent to the runner are passed on to the running
    stages (they checkpoint and exit). After a stage fails or a signal arrives no stage starts; the running ones are
    waited for. Returns (stage, exit code) of the first stage that did not finish, (the first stage not started, None)
    when a signal came just as the running stages finished, or None when all finished."""
    slots = recipe.run.parallel_stages
    prefixed = slots > 1 and len(todo) > 1
    needs = {stage: [d for d in dependencies(recipe, stage) if d in todo] for stage in todo}
    waiting, running, finished = list(todo), {}, set()
    failed: tuple[str, int] | None = None
    stopping = False

    def pass_on(signum, frame):
        nonlocal stopping
        stopping = True
        for stage in list(running.values()):
            if stage.proc.poll() is None:
                stage.proc.send_signal(signum)

    previous = {s: signal.signal(s, pass_on) for s in preemption.STOP_SIGNALS}
    try:
        while waiting or running:
            ready = [s for s in waiting if all(d in finished for d in needs[s])]
            while ready and len(running) < slots and failed is None and not stopping:
                stage = ready.pop(0)
                waiting.remove(stage)
                cmd = stage_command(recipe, stage, overrides)
                side = f" (beside {', '.join(running)})" if running else ""
                StageProcess.say(f"\n=== {stage}{side}: {shlex.join(cmd)}")
                running[stage] = StageProcess(stage, cmd, prefixed)
            if not running:
                break  # a stage failed or a signal came: what is still waiting does not start
            time.sleep(0.2)
            for stage, proc in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[stage]
                if code == 0:
                    finished.add(stage)
                    StageProcess.say(f"=== {stage} done in {time.time() - proc.started:.0f}s")
                    continue
                failed = failed or (stage, code)
                if running:
                    StageProcess.say(f"=== {stage} stopped (exit code {code}); no further stage starts; waiting for "
                                     f"{', '.join(running)} to end (Ctrl-C stops it with a checkpoint)")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if failed is None and stopping and waiting:  # the signal came as the running stages finished
        return waiting[0], None
    return failed


def headline(metrics: dict) -> str:
    flat = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return ", ".join(f"{k} {v:.4g}" for k, v in list(flat.items())[:6])


def main(argv):
    parser = argparse.ArgumentParser(prog="pipeline/run.py", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("overrides", nargs="*", default=[], help="section.key=value, passed to every stage")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--force", action="store_true", help="rerun the selected stages even if up to date")
    parser.add_argument("--only", default="", help="comma-separated stages to consider")
    parser.add_argument("--from", dest="start", default=None, help="rerun this stage and every stage that reads "
                                                                "it, directly or through another stage")
    group = parser.add_argument_group("GPUs and clusters (README: Running on GPUs and clusters)")
    group.add_argument("--check", action="store_true", help="check models, data, global batch and per-device "
                                                             "memory of the planned stages; run nothing")
    group.add_argument("--device-memory", default=None, help="memory of one device, e.g. 80GiB: --check warns "
                                                             "above it (default: this machine's GPU, if any)")
    group.add_argument("--gpu-tflops", type=float, default=cost_check.DEFAULT_TFLOPS,
                       help="--check's cost projection: peak TFLOPS of one GPU (default %(default)g: an A100's "
                            "dense BF16)")
    group.add_argument("--gpu-watts", type=float, default=cost_check.DEFAULT_WATTS,
                       help="--check's cost projection: watts per GPU under load (default %(default)g: an A100 SXM)")
    group.add_argument("--mfu", type=float, default=cost_check.DEFAULT_MFU,
                       help="--check's cost projection: model FLOPs utilisation, 0-1 (default %(default)g)")
    group.add_argument("--slurm", action="store_true", help="submit the stages as Slurm jobs chained with "
                                                             "--dependency=afterok instead of running them here")
    group.add_argument("--config", default=None, help="Accelerate config of the jobs (launch/accelerate/*.yaml)")
    group.add_argument("--nodes", type=int, default=None, help="nodes per stage job")
    group.add_argument("--gpus-per-node", type=int, default=None, help="GPUs per node, one process each")
    group.add_argument("--procs-per-node", type=int, default=None, help="processes per node (CPU jobs)")
    group.add_argument("--cpus-per-task", type=int, default=None, help="CPUs for each node's launcher")
    group.add_argument("--partition", default=None)
    group.add_argument("--account", default=None)
    group.add_argument("--time", default=None, help="time limit per stage job, e.g. 24:00:00")
    group.add_argument("--signal-seconds", type=int, default=None, help="checkpoint and requeue this long "
                                                                        "before the time limit (300)")
    group.add_argument("--sbatch", default=None, help="more sbatch options for every job, e.g. --sbatch='--qos=high --mem=0'")
    args = parser.parse_intermixed_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    only = [s for s in args.only.split(",") if s]
    steps = plan(recipe, only=only, start=args.start, force=args.force)

    flags = {"partition": args.partition, "account": args.account, "nodes": args.nodes,
             "gpus_per_node": args.gpus_per_node, "procs_per_node": args.procs_per_node,
             "cpus_per_task": args.cpus_per_task, "time": args.time, "config": args.config,
             "signal_seconds": args.signal_seconds}
    if args.sbatch:
        try:
            flags["sbatch_args"] = [*recipe.slurm.sbatch_args, *shlex.split(args.sbatch)]
        except ValueError as err:  # an unclosed quote
            raise cli.PipelineError(f"--sbatch {args.sbatch!r}: {err}") from None
    if args.check or args.slurm:
        slurm.settings(recipe, flags)  # the flags' values (--nodes 0, --gpus-per-node -2): one line, also with --check
        def launch_for(stage):
            if args.slurm:
                return slurm.settings(recipe, flags).for_stage(stage, str(recipe.path)).launch()
            if args.config:
                n = (args.nodes or 1) * (args.gpus_per_node or args.procs_per_node or 1)
                return cluster.read_launch(args.config, num_processes=n, num_machines=args.nodes)
            launcher_prefix(recipe)  # a launcher that is not there: an error of every stage
            return cluster.launch_from_command(recipe.run.launcher)

        device_memory = (memory.parse_size(args.device_memory) if args.device_memory
                         else check.local_device_memory())
        throughput = cost_check.Throughput(args.gpu_tflops, args.gpu_watts, args.mfu)
        errors, warnings = check.run_check(recipe, steps, launch_for, device_memory, throughput)
        if errors:
            sys.exit(2)
        if args.check:
            sys.exit(1 if warnings else 0)
        planned = [stage for stage, run, _ in steps if run]  # eval waits for a reward job only when it is submitted
        slurm.submit(recipe, steps, args.overrides, flags, lambda s: dependencies(recipe, s, planned),
                     dry_run=args.dry_run)
        return

    for stage in [stage for stage, run, _ in steps if run]:  # each stage's config checks before any stage starts
        check.check_stage_config(recipe, stage)
    side = recipe.run.parallel_stages
    print(f"plan for {recipe.path} -> {recipe.run_dir}/" + (f" (up to {side} stages side by side: run.parallel_stages)"
                                                           if side > 1 else ""))
    for stage, run, why in steps:
        print(f"  {stage:<10} {'run ' if run else 'skip'}  ({why})")
    if args.dry_run or not any(run for _, run, _ in steps):
        return
    launcher_prefix(recipe)  # before anything is written
    made = [d for d in (recipe.run_dir, recipe.run_dir.parent) if not d.exists()]
    runs.ensure_writable(recipe.run_dir)
    try:
        with locks.hold(recipe.run_dir / "run.lock", "pipeline/run.py", target=f"run folder {recipe.run_dir}"):
            run_steps(recipe, steps, args.overrides)
    finally:  # a first stage that refused its input: the folders made for the lock go again, as a stage's do
        for folder in made:
            try:
                folder.rmdir()  # only when empty: another process's files keep it
            except OSError:
                break


def run_steps(recipe, steps, overrides) -> None:
    started = time.time()
    todo = [stage for stage, run, _ in steps if run]
    failed = run_stages(recipe, todo, overrides)
    if failed:
        stage, code = failed
        if code is None:
            print(f"\nstopped on a signal before stage {stage} started; run the same command again to go on",
                  file=sys.stderr)
            sys.exit(preemption.PREEMPTED_EXIT)
        if code == preemption.PREEMPTED_EXIT:
            print(f"\nstage {stage} stopped on a signal after saving a checkpoint; run the same command again to "
                  f"resume it", file=sys.stderr)
        else:
            print(f"\nstage {stage} failed (exit code {code}); later stages not run", file=sys.stderr)
        sys.exit(code)

    print("\nsummary:")
    for stage, _, _ in steps:
        metrics_path = recipe.stage_dir(stage) / runs.METRICS
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        print(f"  {stage:<10} {headline(metrics)}")
    elapsed = (f"this run: {len(todo)} stage(s) in {cost.human_time(time.time() - started)} of wall time, up to "
               f"{recipe.run.parallel_stages} side by side (run.parallel_stages)")
    write_cost(recipe, order_stages(recipe), elapsed)  # every stage of the recipe, also those skipped


def write_cost(recipe, stages: list[str], elapsed: str) -> None:
    """The cost table of the run's stages (their manifests' `cost` blocks), printed and written to cost.md."""
    manifests = {stage: runs.read_manifest(recipe.stage_dir(stage)) for stage in stages}
    lines = cost.run_report(stages, manifests, recipe.run_dir, lead=elapsed)  # the total sums overlapping stages
    print("\ncost (README: Cost per stage):")
    print("\n".join(lines[2:]))
    (recipe.run_dir / COST_FILE).write_text("\n".join(lines) + "\n")
    print(f"written to {recipe.run_dir / COST_FILE}", flush=True)


if __name__ == "__main__":
    cli.run_main(main)
