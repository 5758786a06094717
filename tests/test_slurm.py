"""`run.py --slurm` and launch/slurm/stage.sbatch against a real Slurm (munged, slurmctld, slurmd on localhost).

Each stage job here runs two launchers on the one host (`--ntasks-per-node=2`), standing in for two nodes: two
`accelerate launch` processes with machine ranks 0 and 1 that meet at the first host of the allocation.
"""

import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from conftest import run_cli, tiny_recipe
from slurm_cluster import LocalSlurm

ONE_PROCESS = ["--nodes", "1", "--procs-per-node", "1", "--config", "launch/accelerate/cpu2.yaml", "--time", "30:00"]


@pytest.fixture(scope="module")
def slurm():
    why = LocalSlurm.unavailable()
    if why:
        pytest.skip(f"no Slurm test cluster: {why}")
    root = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))  # short: unix socket paths have a length limit
    try:
        with LocalSlurm(root) as cluster:
            yield cluster
    finally:
        shutil.rmtree(root, ignore_errors=True)


def submitted(stdout: str) -> dict:
    """{stage: job id} from run.py --slurm's output lines `  <stage>  job <id> ...`."""
    return dict(re.findall(r"^\s+(\w+)\s+job (\d+)", stdout, flags=re.M))


def job_log(work: Path, stage: str, job: str) -> str:
    path = work / "runs/tiny/slurm" / f"{stage}-{job}.out"
    return path.read_text(errors="replace") if path.is_file() else ""


def wait_until(condition, what: str, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.3)
    raise TimeoutError(f"timed out waiting for {what}")


def test_whole_pipeline_as_chained_jobs_each_stage_on_two_launchers(slurm, tmp_path):
    recipe = tiny_recipe(tmp_path, sft={"max_steps": 6, "heldout_max_prompts": 4, "heldout_max_new_tokens": 8})
    # submitted held, so the jobs are still queued when the same command runs again (a tiny pretrain job can
    # finish within the seconds the second command takes to start); released below
    args = ["pipeline/run.py", recipe, "--slurm", *ONE_PROCESS, "--sbatch=--ntasks-per-node=2 --hold"]
    proc = run_cli(args, cwd=tmp_path, env=slurm.env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    jobs = submitted(proc.stdout)
    assert list(jobs) == ["pretrain", "sft"], proc.stdout
    assert "(after pretrain)" in proc.stdout

    # submitting again while the jobs are queued or running submits nothing new
    again = run_cli(args, cwd=tmp_path, env=slurm.env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert submitted(again.stdout) == jobs and again.stdout.count("not resubmitted") == 2

    released = slurm.run("scontrol", "release", ",".join(jobs.values()))
    assert released.returncode == 0, released.stdout + released.stderr
    states = slurm.wait_for_jobs(list(jobs.values()))
    logs = {s: job_log(tmp_path, s, j) for s, j in jobs.items()}
    assert set(states.values()) == {"COMPLETED"}, f"{states}\n" + "\n".join(v[-3000:] for v in logs.values())

    # order: sft was submitted to wait for pretrain (afterok) and started after pretrain ended
    recorded = json.loads((tmp_path / "runs/tiny/slurm/jobs.json").read_text())
    assert f"--dependency=afterok:{jobs['pretrain']}" in recorded["sft"]["command"]
    assert not any(a.startswith("--dependency") for a in recorded["pretrain"]["command"])
    pre, sft = slurm.job(jobs["pretrain"]), slurm.job(jobs["sft"])
    assert pre["EndTime"] <= sft["StartTime"]

    for stage, job in jobs.items():
        assert "2 launcher(s) x 1 process(es)" in logs[stage] and "[slurm] stage finished" in logs[stage]
        out = tmp_path / "runs/tiny" / stage
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["num_processes"] == 2 and manifest["launch"]["slurm"]["job_id"] == job
        assert manifest["launch"]["distributed_type"] == "MULTI_CPU"
        assert AutoModelForCausalLM.from_pretrained(out) is not None
    assert json.loads((tmp_path / "runs/tiny/pretrain/manifest.json").read_text())["global_batch_size"] == 16
    assert json.loads((tmp_path / "runs/tiny/sft/metrics.json").read_text())["heldout"]["n"] == 4

    # everything finished: nothing to submit
    done = run_cli(args, cwd=tmp_path, env=slurm.env)
    assert done.returncode == 0 and submitted(done.stdout) == {}, done.stdout + done.stderr
    assert "pretrain   skip" in done.stdout and "sft        skip" in done.stdout


def test_requeued_stage_job_resumes_from_its_checkpoint(slurm, tmp_path):
    # one process (two processes agreeing to stop together: tests/test_distributed.py)
    recipe = tiny_recipe(tmp_path, pretrain={"max_steps": 150, "logging_steps": 1})
    proc = run_cli(["pipeline/run.py", recipe, "--slurm", "--only", "pretrain", *ONE_PROCESS], cwd=tmp_path,
                   env=slurm.env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = submitted(proc.stdout)["pretrain"]

    def log():
        return job_log(tmp_path, "pretrain", job)

    def training(after: str):
        return lambda: after in log() and "'loss'" in log().rsplit(after, 1)[1]

    # 1. the warning before the time limit (what --signal=B:USR1@T delivers): checkpoint, requeue itself, resume.
    # Sent once the stage has started (its handlers are in place): it stops after its first optimizer step.
    wait_until(lambda: re.search(r"\[pretrain\] [\d.]+M parameters", log()), "the stage to start")
    assert slurm.run("scancel", "--signal=USR1", "--batch", job).returncode == 0
    wait_until(training("resuming from"), "the requeued job to resume and train")
    # 2. preemption or an operator's requeue (SIGTERM): checkpoint, Slurm requeues, resume again
    assert slurm.run("scontrol", "requeue", job).returncode == 0
    states = slurm.wait_for_jobs([job])
    text = log()
    assert states[job] == "COMPLETED", text[-4000:]

    saved = [int(n) for n in re.findall(r"\[\w+\] preempted: stopped on SIG\w+; saved \S+/checkpoint-(\d+)", text)]
    assert "stopped on SIGUSR1" in text and "stopped on SIGTERM" in text and len(saved) == 2, text[-4000:]
    assert 0 < saved[0] < saved[1] < 150
    assert "requeueing job" in text and text.count("resuming from") == 2
    assert slurm.job(job)["Restarts"] == "2"
    out = tmp_path / "runs/tiny/pretrain"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resumed_from"] == f"checkpoint-{saved[1]}"  # resumed, not restarted
    assert manifest["launch"]["slurm"]["restart_count"] == "2"
    assert json.loads((out / "metrics.json").read_text())["steps"] == 150
    assert not list(out.glob("checkpoint-*")) and not (tmp_path / "runs/tiny/pretrain.partial").exists()


def test_from_submits_the_stages_the_local_plan_runs(monkeypatch, tmp_path, capsys):
    from conftest import REPO
    from pipeline import check, run, runs
    from pipeline.recipe import load_recipe

    # every stage finished (no Slurm needed: a dry run submits nothing; the check of the stages is not what is tested)
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(runs, "up_to_date", lambda recipe, stage: (True, "up to date"))
    monkeypatch.setattr(check, "run_check", lambda *args: ([], []))
    argv = [str(REPO / "recipes/small.yaml"), f"run.output_dir={tmp_path}", "--from", "sft"]
    recipe = load_recipe(argv[0], argv[1:2])
    for stage in recipe.stages:  # what a submission checks of a finished stage it does not resubmit
        recipe.stage_dir(stage).mkdir(parents=True)
        (recipe.stage_dir(stage) / "manifest.json").write_text("{}")
    planned = [stage for stage, will_run, _ in run.plan(recipe, start="sft") if will_run]
    run.main([*argv, "--slurm", "--dry-run"])
    submitted = re.findall(r"^\s+(\w+)\s+would submit", capsys.readouterr().out, flags=re.M)
    assert submitted == planned and "sft" in submitted and "diffusion" not in submitted
