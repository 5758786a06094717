"""`python pipeline/run.py RECIPE --slurm`: the recipe's stages as Slurm jobs chained with --dependency=afterok.

Each stage that is not up to date becomes one job running launch/slurm/stage.sbatch (one `accelerate launch` per
node). A stage waits for the jobs of the stages it reads (afterok), and is cancelled if one of them fails
(--kill-on-invalid-dep). Finished stages are not resubmitted (the same fingerprint test as the local runner), nor
are stages whose job from an earlier submission is still queued or running: their job id becomes the dependency.
Job ids go to runs/<run>/slurm/jobs.json, logs to runs/<run>/slurm/<stage>-<jobid>.out.

Settings: the recipe's `slurm` section (below), command-line flags over it, and per-stage overrides in
`slurm.stages` (e.g. `{pretrain: {nodes: 8}, dpo: {config: launch/accelerate/zero3.yaml}}`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import cluster, runs
from pipeline.cli import PipelineError
from pipeline.key_checks import check_value
from pipeline.values import Mismatch, closest, coerce, field_types, type_name
from pipeline.stages import STAGES

SBATCH_SCRIPT = cluster.REPO / "launch" / "slurm" / "stage.sbatch"
ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING"}


@dataclass
class SlurmSection:
    partition: str | None = None    # sbatch --partition
    account: str | None = None      # sbatch --account
    nodes: int = 1                  # nodes per stage: one launcher per node
    gpus_per_node: int = 0          # GPUs per node, one process each; 0: a CPU job, `procs_per_node` processes
    procs_per_node: int | None = None  # processes per node; empty: gpus_per_node (1 without GPUs)
    cpus_per_task: int | None = None   # CPUs per node launcher (sbatch --cpus-per-task); empty: the cluster default
    time: str | None = None         # time limit per stage job, e.g. "24:00:00"
    config: str | None = None       # Accelerate config; empty: launch/accelerate/ddp.yaml
    signal_seconds: int = 300       # SIGUSR1 this long before the time limit: checkpoint, requeue, resume
    rdzv_timeout: int = 600         # seconds all nodes have to join before the job fails
    setup: str | None = None        # shell commands each job runs first ("module load cuda; source .venv/bin/activate")
    sbatch_args: list[str] = field(default_factory=list)  # more sbatch options, e.g. ["--qos=high", "--mem=0"]
    stages: dict = field(default_factory=dict)             # per-stage overrides of the keys above

    def for_stage(self, stage: str, where: str) -> "SlurmSection":
        overrides = self.stages.get(stage) or {}
        if not isinstance(overrides, dict):
            raise PipelineError(f"{where}: slurm.stages.{stage} must be a mapping of slurm keys")
        types = {k: v for k, v in field_types(SlurmSection).items() if k != "stages"}
        values = {}
        for k, v in overrides.items():
            if k not in types:
                raise PipelineError(f"{where}: unknown key '{k}' in slurm.stages.{stage}{closest(str(k), types)}")
            try:
                values[k] = coerce(v, types[k])
            except Mismatch:
                raise PipelineError(f"{where}: slurm.stages.{stage}.{k} must be {type_name(types[k])}, "
                                    f"got {v!r}") from None
            check_value(f"slurm.stages.{stage}", k, values[k], where)
        return dataclasses.replace(self, **values, stages={})

    @classmethod
    def check_stages(cls, stages: dict, where: str) -> None:
        """slurm.stages when the recipe loads: each a stage's name (a misspelt one was ignored: the stage got the
        defaults), its keys checked as for_stage checks them when it is submitted."""
        for stage in stages:
            if stage not in STAGES:
                raise PipelineError(f"{where}: slurm.stages: unknown stage '{stage}'{closest(str(stage), STAGES)}")
            cls(stages=stages).for_stage(stage, where)

    @property
    def processes_per_node(self) -> int:
        return self.procs_per_node or self.gpus_per_node or 1

    def launch(self) -> cluster.Launch:
        config = self.config or "launch/accelerate/ddp.yaml"
        return cluster.read_launch(config, num_processes=self.nodes * self.processes_per_node,
                                   num_machines=self.nodes)


def settings(recipe, flags: dict) -> SlurmSection:
    """The recipe's slurm section with the command-line flags (not None) over it."""
    base = recipe.slurm if recipe.slurm is not None else SlurmSection()
    given = {k: v for k, v in flags.items() if v is not None}
    for k, v in given.items():
        check_value("slurm", k, v, f"--{k.replace('_', '-')}")
    return dataclasses.replace(base, **given)


def sbatch_command(recipe, stage: str, s: SlurmSection, overrides: list[str], dependencies: list[str],
                   log_dir: Path) -> list[str]:
    cmd = ["sbatch", "--parsable", f"--job-name={recipe.run.name}-{stage}", f"--chdir={Path.cwd()}",
           f"--output={log_dir.resolve()}/{stage}-%j.out", f"--nodes={s.nodes}", "--ntasks-per-node=1",
           f"--signal=B:USR1@{s.signal_seconds}", "--requeue", "--open-mode=append"]
    if s.gpus_per_node:
        cmd.append(f"--gpus-per-node={s.gpus_per_node}")
    for flag, value in (("partition", s.partition), ("account", s.account), ("time", s.time),
                        ("cpus-per-task", s.cpus_per_task)):
        if value is not None:
            cmd.append(f"--{flag}={value}")
    if dependencies:
        cmd += [f"--dependency=afterok:{':'.join(dependencies)}", "--kill-on-invalid-dep=yes"]
    cmd += list(s.sbatch_args)
    cmd += [str(SBATCH_SCRIPT), str(STAGES[stage].script), str(recipe.path), *overrides]
    return cmd


def job_environment(s: SlurmSection) -> dict:
    env = {"PIPELINE_ACCELERATE_CONFIG": str(s.launch().config),
           "PIPELINE_PROCS_PER_NODE": str(s.processes_per_node),
           "PIPELINE_PYTHON": sys.executable,
           "PIPELINE_RDZV_TIMEOUT": str(s.rdzv_timeout)}
    if s.setup:
        env["PIPELINE_SETUP"] = s.setup
    return env


def job_state(job_id: str) -> str | None:
    """The job's state if Slurm still lists it (pending, running, requeued, ...), else None."""
    proc = subprocess.run(["squeue", "--noheader", "--jobs", job_id, "--format=%T"], capture_output=True, text=True)
    state = proc.stdout.strip().splitlines()[0].strip() if proc.returncode == 0 and proc.stdout.strip() else None
    return state


def submit(recipe, steps, overrides: list[str], flags: dict, dependencies_of, dry_run: bool = False) -> dict:
    """Submit the stages that run; returns {stage: job id}. `steps` is run.plan()'s list, `dependencies_of(stage)`
    the stages of the recipe a stage reads."""
    if not dry_run and shutil.which("sbatch") is None:
        raise PipelineError("--slurm: sbatch not found on PATH (run this on a Slurm login node)")
    base = settings(recipe, flags)
    log_dir = recipe.run_dir / "slurm"
    jobs_file = log_dir / "jobs.json"
    known = json.loads(jobs_file.read_text()) if jobs_file.is_file() else {}
    queued: dict[str, str] = {}       # stage -> job id this submission depends on
    will_run = {stage for stage, run, _ in steps if run}
    print(f"slurm jobs for {recipe.path} -> {recipe.run_dir}/ (logs: {log_dir}/<stage>-<job>.out)")
    for stage, run, why in steps:
        if not run:
            print(f"  {stage:<10} skip  ({why})")
            continue
        s = base.for_stage(stage, str(recipe.path))
        previous = known.get(stage)
        if previous and not dry_run:
            state = job_state(previous["job_id"])
            if state in ACTIVE_STATES:
                if previous.get("overrides") != overrides:
                    raise PipelineError(f"stage {stage} is already {state.lower()} as job {previous['job_id']} with "
                                        f"other overrides ({shlex.join(previous.get('overrides', []))}): "
                                        f"scancel {previous['job_id']} first")
                queued[stage] = previous["job_id"]
                print(f"  {stage:<10} job {previous['job_id']}  (already {state.lower()}; not resubmitted)")
                continue
        deps, inputs = [], list(dict.fromkeys(dependencies_of(stage)))  # in order, once each
        for dep in inputs:
            if dep in queued:
                deps.append(queued[dep])
            elif dep in will_run:
                raise PipelineError(f"stage {dep} was not submitted, so {stage} cannot wait for it")
            elif not (recipe.stage_dir(dep) / "manifest.json").is_file():
                raise PipelineError(f"stage {stage} reads {dep}, which has not finished and is not part of this "
                                    f"submission (drop --only, or add {dep})")
        cmd = sbatch_command(recipe, stage, s, overrides, deps, log_dir)
        after = f"  (after {', '.join(d for d in inputs if d in queued)})" if deps else ""
        if dry_run:
            print(f"  {stage:<10} would submit: {' '.join(f'{k}={shlex.quote(v)}' for k, v in job_environment(s).items())} "
                  f"{shlex.join(cmd)}")
            queued[stage] = f"<{stage}>"
            continue
        log_dir.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **job_environment(s)})
        if proc.returncode != 0:
            raise PipelineError(f"sbatch for stage {stage} failed: {(proc.stderr or proc.stdout).strip()}")
        job_id = proc.stdout.strip().split(";")[0]
        queued[stage] = job_id
        known[stage] = {"job_id": job_id, "overrides": overrides, "command": cmd,
                        "nodes": s.nodes, "processes": s.nodes * s.processes_per_node}
        runs.write_json(jobs_file, known)
        print(f"  {stage:<10} job {job_id}{after}: {s.launch().describe()}", flush=True)
    return queued
