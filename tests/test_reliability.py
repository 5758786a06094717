"""Reliability and safety as tested properties (README "Kills, signals and locks"): a stage killed anywhere resumes to the
step count and weights of an uninterrupted run; signals sent to run.py reach the stage; nothing unpickles code; one
writer per stage folder; damage and unusable output folders are found before work, as one line and exit 2.

Kills land at named points (pipeline/faults.py: PIPELINE_FAULT) rather than after sleeps, so every run is the same;
benchmarks/soak.py kills at random times instead."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import REPO, max_weight_diff, run_cli, tiny_recipe
from pipeline import integrity, locks, safe_resume, threads

ENV = {"OMP_NUM_THREADS": "1"}
CKPT = ["pretrain.save_steps=4"]  # the recipe says save_strategy: "no"; save_steps alone turns checkpointing on
PICKLE_FILES = ("*.bin", "*.pkl", "*.pt", "*.pth")


def stage(args, cwd, fault=None, **kw):
    return run_cli(args, cwd=cwd, env={**ENV, **({"PIPELINE_FAULT": fault} if fault else {})}, **kw)


def one_line_error(proc, *expected):
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def signal_runner(recipe, cwd, signum, after_steps: int, name: str):
    """Start run.py; once its stage has trained `after_steps` steps (it then waits at faults.point("training")),
    send run.py `signum`. Returns (exit code, output)."""
    return signal_after(["pipeline/run.py", str(recipe), f"run.name={name}", *CKPT], cwd, signum, after_steps, name)


def signal_after(args, cwd, signum, after_steps: int, name: str):
    """Start `args` (a script of the repository and its arguments); once its stage has trained `after_steps` steps,
    send it `signum`. Returns (exit code, output)."""
    marker = Path(cwd) / f"paused-{name}"
    marker.unlink(missing_ok=True)
    cmd = [sys.executable, str(REPO / args[0]), *args[1:]]
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **ENV, "TOKENIZERS_PARALLELISM": "false",
                                 "PIPELINE_FAULT": f"pause:training:{after_steps}",
                                 "PIPELINE_FAULT_MARKER": str(marker)})
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signum)
    out = proc.communicate(timeout=300)[0]
    return proc.returncode, out


def plan_line(recipe, cwd, name, stage_name="pretrain"):
    proc = run_cli(["pipeline/run.py", recipe, f"run.name={name}", *CKPT, "--dry-run"], cwd=cwd, env=ENV)
    return next(line for line in proc.stdout.splitlines() if line.strip().startswith(stage_name))


def checkpoints(partial: Path) -> list[str]:
    return [p.name for p in sorted(partial.glob("checkpoint-*"), key=safe_resume.step_of)]


def rng_state(ckpt: Path, name: str = "rng_state.pth") -> None:
    """The RNG state file transformers writes into every Trainer checkpoint not saved with save_only_model."""
    torch.save({"cpu": torch.random.get_rng_state()}, ckpt / name)


def malicious_pickle(path: Path, marker: Path) -> None:
    """A torch-format file whose unpickling would create `marker` (code execution) if it were loaded unsafely."""

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {shlex.quote(str(marker))}",))

    torch.save({"state": Payload()}, path)


# ---------------------------------------------------------------------------------------------- kill anywhere


def test_pretrain_killed_in_every_phase_and_signalled_through_the_runner_ends_like_an_uninterrupted_run(tiny_run):
    """One run of pretrain (12 steps, a checkpoint every 4) is interrupted eight times, each way once: SIGKILL while
    loading, SIGTERM and SIGINT sent to run.py while training, a full disk and a SIGKILL inside a checkpoint save,
    a SIGKILL during the final save and one just before the finished folder's rename, and a planted pickle in the
    checkpoint it would resume from. After each, the
    stage folder does not look finished; at the end the stage has exactly 12 steps, the weights and the whole-run
    train_loss of the uninterrupted run (tiny_run), and no pickle."""
    work, recipe, _ = tiny_run
    name, base = "chain", ["pipeline/pretrain.py", recipe, "run.name=chain", *CKPT]
    partial, final = work / "runs/chain/pretrain.partial", work / "runs/chain/pretrain"

    killed = stage(base, work, fault="kill:loading")
    assert killed.returncode == -signal.SIGKILL and partial.is_dir() and not final.exists()

    for signum, steps, expected in ((signal.SIGTERM, 2, "checkpoint-2"), (signal.SIGINT, 1, "checkpoint-3")):
        code, out = signal_runner(recipe, work, signum, steps, name)
        assert code == 75, out[-3000:]  # the stage's "stopped after saving a checkpoint", passed on by the runner
        assert f"stopped on {signal.Signals(signum).name}" in out and not final.exists()
        assert checkpoints(partial)[-1] == expected
    stopped_at, following = 3, 4

    full = stage(base, work, fault="enospc:checkpoint")  # the next checkpoint hits a full disk
    assert full.returncode not in (0, 2) and "No space left" in full.stderr
    assert not (partial / f"checkpoint-{following}/trainer_state.json").exists()
    assert safe_resume.find_checkpoint(partial).name == f"checkpoint-{stopped_at}"  # the previous one is usable

    killed = stage(base, work, fault="kill:checkpoint")  # killed inside the same save
    assert killed.returncode == -signal.SIGKILL
    assert not (partial / f"checkpoint-{following}/trainer_state.json").exists()

    killed = stage(base, work, fault="kill:final-save")  # trained to the end, killed while saving the model
    assert killed.returncode == -signal.SIGKILL and (partial / "model.safetensors").exists() and not final.exists()
    assert checkpoints(partial)[-1] == "checkpoint-8"  # no checkpoint at the last step (it made resumes train one more)
    assert "(resumes from checkpoint-8 of 12 steps in chain/pretrain.partial)" in plan_line(recipe, work, name)

    killed = stage(base, work, fault="kill:publish")  # everything written, killed before the folder's rename
    assert killed.returncode == -signal.SIGKILL and (partial / "manifest.json").exists() and not final.exists()
    assert checkpoints(partial)[-1] == "checkpoint-8"  # kept for the rerun (it resumed from step 0 when they went)
    assert "(resumes from checkpoint-8 of 12 steps in chain/pretrain.partial)" in plan_line(recipe, work, name)

    marker = work / "pwned"
    malicious_pickle(partial / "checkpoint-8/custom_checkpoint_0.pkl", marker)
    refused = stage(base, work)
    one_line_error(refused, "custom_checkpoint_0.pkl", "refusing")
    assert not marker.exists() and partial.is_dir()  # not run, and the evidence is kept
    (partial / "checkpoint-8/custom_checkpoint_0.pkl").unlink()

    done = stage(base, work)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from runs/chain/pretrain.partial/checkpoint-8" in done.stdout
    ours, reference = (json.loads((d / "metrics.json").read_text()) for d in (final, work / "runs/tiny/pretrain"))
    assert ours["steps"] == reference["steps"] == 12
    assert ours["train_loss"] == pytest.approx(reference["train_loss"], rel=1e-5)  # the whole run, not the last 4
    a, b = load_file(final / "model.safetensors"), load_file(work / "runs/tiny/pretrain/model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["resumed_from"] == "checkpoint-8"
    # the cost is every attempt's that could say what it spent: SIGTERM, SIGINT and the full disk did (SIGKILLs
    # cannot, a refused pickle is bad input), then the finished one
    attempts = manifest["cost"]["attempts"]
    assert len(attempts) == 4 and all(a["wall_s"] > 0 for a in attempts)
    assert manifest["cost"]["wall_s"] == pytest.approx(sum(a["wall_s"] for a in attempts), abs=0.2)
    assert not (final / "cost_attempts.json").exists()
    assert not partial.exists() and not [p for pat in PICKLE_FILES for p in final.rglob(pat)]
    assert sorted(p.name for p in (work / "runs/chain").iterdir()) == ["pretrain"]  # lock files gone too


@pytest.mark.parametrize("stage_name", ["sft", "reward", "dpo", "kto"])
def test_killed_during_the_final_save_resumes_to_the_exact_step_count(tiny_run, stage_name):
    work, recipe, _ = tiny_run
    common = [f"{stage_name}.max_steps=6", f"{stage_name}.save_steps=4", f"{stage_name}.init_from="
              f"{work / 'runs/tiny/sft'}", f"{stage_name}.per_device_train_batch_size=8", f"{stage_name}.use_cpu=true",
              f"{stage_name}.bf16=false", f"{stage_name}.gradient_checkpointing=false",
              f"{stage_name}.max_length=128", f"run.name=final_{stage_name}"]
    if stage_name != "reward":
        common.append(f"{stage_name}.heldout_prompts=")
    else:
        common += ["reward.norm_max_pairs=32", "reward.eval_dataset=world:preference_eval"]
    args = [f"pipeline/{stage_name}.py", recipe, *common]
    killed = stage(args, work, fault="kill:final-save")
    out = work / f"runs/final_{stage_name}/{stage_name}"
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not out.exists() and checkpoints(out.with_name(f"{stage_name}.partial")) == ["checkpoint-4"]
    done = stage(args, work)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 6
    assert not [p for pat in PICKLE_FILES for p in out.rglob(pat)]


# ---------------------------------------------------------------------------------------------- no pickle


@pytest.mark.parametrize("planted, complete", [
    ("optimizer.pt", "trainer_state.json"), ("rng_state.pth", "trainer_state.json"),
    ("custom_checkpoint_0.pkl", "loop_state.json"), ("random_states_0.pkl", "loop_state.json")])
def test_a_planted_pickle_is_refused_without_running_it(tmp_path, planted, complete):
    ckpt = tmp_path / "checkpoint-4"
    ckpt.mkdir()
    (ckpt / complete).write_text(json.dumps({"global_step": 4, "max_steps": 12}))
    torch.save({"tensor": torch.zeros(2), "step": 4}, ckpt / "scheduler.pt")  # a genuine, safe torch file
    marker = tmp_path / "pwned"
    malicious_pickle(ckpt / planted, marker)
    with pytest.raises(integrity.UnsafeFile, match=planted):
        safe_resume.find_checkpoint(tmp_path)
    assert not marker.exists()


def test_unknown_files_are_refused_and_training_args_removed_unread(tmp_path):
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 2, "max_steps": 12}))
    rng_state(ckpt)
    marker = tmp_path / "pwned"
    malicious_pickle(ckpt / "training_args.bin", marker)  # transformers writes it and never reads it
    assert safe_resume.find_checkpoint(tmp_path) == ckpt
    assert not (ckpt / "training_args.bin").exists() and not marker.exists()
    (ckpt / "hook.py").write_text("import os")
    with pytest.raises(integrity.UnsafeFile, match="hook.py"):
        safe_resume.find_checkpoint(tmp_path)


def test_damaged_or_last_step_checkpoints_are_skipped_for_the_previous_one(tmp_path):
    for step in (4, 8, 12):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}/trainer_state.json").write_text(json.dumps({"global_step": step,
                                                                                   "max_steps": 12}))
        rng_state(tmp_path / f"checkpoint-{step}")
    (tmp_path / "checkpoint-8/model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")  # truncated
    assert safe_resume.find_checkpoint(tmp_path).name == "checkpoint-4"


def test_weights_only_trainer_checkpoints_are_skipped_with_a_warning(tmp_path, capsys):
    """A Trainer checkpoint saved with save_only_model: true has no optimizer, scheduler or RNG state; resumed, it
    trained on with a fresh optimizer and ended elsewhere than an unbroken run, without a word. Now it is skipped,
    said in the log, for the newest whole one; our loops' checkpoints (loop_state.json) keep no RNG file and resume."""
    for step in (2, 4, 6):
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 12}))
        save_file({"w": torch.zeros(2)}, ckpt / "model.safetensors")
    rng_state(tmp_path / "checkpoint-2", "rng_state_1.pth")  # whole, taken by the process of rank 1
    torch.save({"state": {}, "param_groups": []}, tmp_path / "checkpoint-2/optimizer.pt")
    assert safe_resume.find_checkpoint(tmp_path).name == "checkpoint-2"
    out = capsys.readouterr().out
    for step in (4, 6):
        assert f"not resuming from {tmp_path}/checkpoint-{step}: holds weights only" in out
    assert "saved with save_only_model: true" in out and "checkpoint-2:" not in out
    shutil.rmtree(tmp_path / "checkpoint-2")
    assert safe_resume.find_checkpoint(tmp_path) is None  # nothing whole: the stage starts over
    loop = tmp_path / "checkpoint-8"
    loop.mkdir()
    (loop / "loop_state.json").write_text(json.dumps({"step": 8}))
    assert safe_resume.find_checkpoint(tmp_path) == loop


def weights_only_sft(work, recipe, name: str) -> list:
    """The tiny run's sft as run `name`: 6 steps, a checkpoint every 2 holding weights only (save_only_model)."""
    return ["pipeline/sft.py", recipe, "sft.max_steps=6", "sft.save_steps=2", "sft.save_only_model=true",
            "sft.heldout_prompts=", f"sft.init_from={work / 'runs/tiny/pretrain'}", f"run.name={name}"]


def unbroken_weights_only_sft(work, recipe) -> Path:
    """weights_only_sft run without a break (once for the tests that compare against it)."""
    final = work / "runs/whole_weights_only/sft"
    if not final.is_dir():
        whole = stage(weights_only_sft(work, recipe, "whole_weights_only"), work)
        assert whole.returncode == 0, whole.stderr[-3000:]
    return final


def test_a_stage_saved_with_save_only_model_and_killed_ends_like_an_unbroken_run(tiny_run):
    """sft with save_only_model: true killed after two checkpoints: the rerun of the same command starts over
    (before, it resumed from the weights with a fresh optimizer: weights 2e-3 away from the unbroken run's) and ends
    with the unbroken run's steps and weights."""
    work, recipe, _ = tiny_run
    unbroken = unbroken_weights_only_sft(work, recipe)
    args = weights_only_sft(work, recipe, "cut_weights_only")
    killed = stage(args, work, fault="kill:training:5")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert checkpoints(work / "runs/cut_weights_only/sft.partial") == ["checkpoint-2", "checkpoint-4"]
    done = stage(args, work)
    assert done.returncode == 0, done.stderr[-3000:]
    ours = work / "runs/cut_weights_only/sft"
    assert json.loads((ours / "metrics.json").read_text())["steps"] == 6
    assert max_weight_diff(ours, unbroken) < 1e-6
    assert "holds weights only" in done.stdout and "[sft] resuming from" not in done.stdout
    assert "save_only_model: true: checkpoints hold weights only, and a stage killed without a stop signal starts " \
           "over" in done.stdout  # said at the start of training, each attempt


def test_a_stage_saved_with_save_only_model_and_preempted_resumes_from_its_stop_checkpoint(tiny_run):
    """With save_only_model: true the checkpoint a stop signal saves still holds the optimizer and RNG state (before,
    it held weights only: the rerun started over, and a job preempted again and again never finished): the rerun
    resumes from it and ends with the unbroken run's weights. The periodic checkpoints stay weights only."""
    work, recipe, _ = tiny_run
    unbroken = unbroken_weights_only_sft(work, recipe)
    args = weights_only_sft(work, recipe, "stopped_weights_only")
    code, out = signal_after(args, work, signal.SIGTERM, 3, "stopped_weights_only")
    assert code == 75, out[-3000:]
    partial = work / "runs/stopped_weights_only/sft.partial"
    assert checkpoints(partial) == ["checkpoint-2", "checkpoint-3"]
    assert not list((partial / "checkpoint-2").glob(safe_resume.RNG_STATE))
    assert list((partial / "checkpoint-3").glob(safe_resume.RNG_STATE))
    done = stage(args, work)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = [line for line in done.stdout.splitlines() if line.startswith("[sft] resuming from")]
    assert len(resumed) == 1 and resumed[0].endswith("sft.partial/checkpoint-3"), done.stdout[-3000:]
    ours = work / "runs/stopped_weights_only/sft"
    assert json.loads((ours / "metrics.json").read_text())["steps"] == 6
    assert max_weight_diff(ours, unbroken) < 1e-6


def test_the_plan_says_a_killed_stage_resumes_and_from_which_checkpoint(tmp_path, monkeypatch):
    """--dry-run and --check said "runs (not run yet)" of a stage whose killed attempt left checkpoints the rerun
    resumes from. Now the line says from which: the one safe_resume takes (a newer weights-only one skipped), looked
    at without removing anything; also with --force, which keeps the folder too. Checkpoints of other inputs (the
    stage wipes them) and a stage whose input stage reruns get no word."""
    from pipeline import runs
    from pipeline.fingerprints import hash_obj
    from pipeline.recipe import load_recipe
    from pipeline.run import plan

    monkeypatch.chdir(tmp_path)
    path = tiny_recipe(tmp_path)
    recipe = load_recipe(path)
    partial = recipe.run_dir / "pretrain.partial"
    for step in (4, 8):
        ckpt = partial / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 12}))
        save_file({"w": torch.zeros(2)}, ckpt / "model.safetensors")
    rng_state(partial / "checkpoint-4")  # checkpoint-8 holds weights only: the stage skips it
    marker = tmp_path / "pwned"
    malicious_pickle(partial / "checkpoint-4/training_args.bin", marker)  # the stage removes it unread
    (partial / ".fingerprint").write_text(hash_obj(runs.stage_inputs(recipe, "pretrain")))  # as StageRun writes it
    resumes = "resumes from checkpoint-4 of 12 steps in tiny/pretrain.partial"
    steps = {stage: (will_run, why) for stage, will_run, why in plan(recipe)}
    assert steps == {"pretrain": (True, resumes), "sft": (True, "input stage pretrain reruns")}
    assert plan(recipe, force=True)[0] == ("pretrain", True, f"--force; {resumes}")
    assert (partial / "checkpoint-4/training_args.bin").is_file() and not marker.exists()  # the plan changes nothing
    dry = run_cli(["pipeline/run.py", path, "--dry-run"], cwd=tmp_path, env=ENV)
    assert re.search(rf"pretrain\s+run\s+\({re.escape(resumes)}\)", dry.stdout), dry.stdout + dry.stderr
    checked = run_cli(["pipeline/run.py", path, "--check", "--only", "pretrain"], cwd=tmp_path, env=ENV)
    assert f"pretrain   runs ({resumes})" in checked.stdout, checked.stdout + checked.stderr
    shutil.rmtree(partial / "checkpoint-4")
    assert plan(recipe)[0] == ("pretrain", True, "starts over: no checkpoint in tiny/pretrain.partial it can resume "
                                                 "from")
    (partial / ".fingerprint").write_text("other inputs")
    assert plan(recipe)[0] == ("pretrain", True, "not run yet")


def test_trust_remote_code_is_off_unless_the_recipe_says_so(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from pipeline import models
    from pipeline.recipe import load_recipe

    seen = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **kw: seen.append(kw) or object())
    path = tiny_recipe(tmp_path)
    models.load_causal_lm(load_recipe(path), str(tmp_path))
    models.load_causal_lm(load_recipe(path, ["model.trust_remote_code=true"]), str(tmp_path))
    assert [kw["trust_remote_code"] for kw in seen] == [False, True]


def test_no_unsafe_load_in_the_package():
    pattern = re.compile(r"weights_only=False|pickle\.load|torch\.load\(")
    hits = [(f"{p.name}:{i}", line) for p in (REPO / "pipeline").glob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    # what `grep -rn "weights_only=False\|pickle.load\|torch.load(" pipeline/` finds: the weights_only=True check
    assert hits and all("weights_only=True" in line for _, line in hits), hits
    assert "register_for_checkpointing(" not in (REPO / "pipeline/ppo_trainer.py").read_text()


# ---------------------------------------------------------------------------------------------- one run per folder


def test_a_second_process_on_a_stage_folder_stops_at_once_naming_the_holder(tmp_path):
    recipe = tiny_recipe(tmp_path)
    marker = tmp_path / "loading"  # the first one waits there (idle, holding the folder) until it is killed
    first = subprocess.Popen([sys.executable, str(REPO / "pipeline/pretrain.py"), str(recipe)], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, **ENV, "PIPELINE_FAULT": "pause:loading", "PIPELINE_FAULT_WAIT": "600",
                                  "PIPELINE_FAULT_MARKER": str(marker)})
    partial, lock = tmp_path / "runs/tiny/pretrain.partial", tmp_path / "runs/tiny/pretrain.lock"
    try:
        deadline = time.time() + 300
        while not marker.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert locks.is_held(lock)["pid"] == first.pid
        before = sorted(p.name for p in partial.iterdir())
        # the same run, and a run with other settings (which used to wipe the first one's folder)
        for extra in ([], ["pretrain.learning_rate=1e-3"]):
            second = stage(["pipeline/pretrain.py", recipe, *extra], tmp_path)
            one_line_error(second, "runs/tiny/pretrain", f"pid {first.pid}", "lock")
            assert set(before) <= {p.name for p in partial.iterdir()}
        plan = run_cli(["pipeline/run.py", recipe, "--dry-run"], cwd=tmp_path, env=ENV)
        assert f"pretrain   run   (being written now by pid {first.pid}" in plan.stdout
        check = run_cli(["pipeline/run.py", recipe, "--check", "--only", "pretrain"], cwd=tmp_path, env=ENV)
        assert check.returncode == 1, check.stdout[-2000:] + check.stderr[-2000:]  # said ok (exit 0)
        assert f"warning: pretrain: being written now by pid {first.pid}" in check.stdout
    finally:
        first.kill()
        first.wait()
    assert locks.is_held(lock) is None  # the kernel dropped it with the process: the next run takes it over


def test_a_stale_lock_is_taken_over_and_a_live_one_is_not(tmp_path):
    lock = tmp_path / "x.lock"
    code = (f"import sys, time; sys.path.insert(0, {str(REPO)!r}); from pipeline import locks; "
            f"locks.Lock({str(lock)!r}, 'test').acquire(); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(Exception, match=f"pid {holder.pid}"):
        locks.Lock(lock, "me").acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert lock.exists() and locks.read_holder(lock)["pid"] == holder.pid  # left behind by the killed process
    taken = locks.Lock(lock, "me").acquire()
    assert locks.read_holder(lock)["pid"] == os.getpid()
    taken.release()
    assert not lock.exists()


# ---------------------------------------------------------------------------------------------- damage, output folders


def test_unwritable_output_folder_and_output_under_a_file_are_one_line_errors(tmp_path):
    recipe = tiny_recipe(tmp_path)
    (tmp_path / "afile").write_text("")
    under_file = stage(["pipeline/pretrain.py", recipe, f"run.output_dir={tmp_path / 'afile/runs'}"], tmp_path)
    one_line_error(under_file, "afile")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs",
                                                    str(readonly)], capture_output=True).returncode == 0
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("root without mount: a read-only folder cannot be made")
        readonly.chmod(0o555)
    try:
        proc = stage(["pipeline/pretrain.py", recipe, f"run.output_dir={readonly}"], tmp_path)
        one_line_error(proc, str(readonly))
    finally:
        if mounted:
            subprocess.run(["umount", str(readonly)])
        readonly.chmod(0o755)


def test_a_moved_run_is_up_to_date_and_a_damaged_stage_is_planned_and_refused(tiny_run, tmp_path):
    work, recipe, _ = tiny_run
    moved = tmp_path / "elsewhere"
    shutil.copytree(work / "runs/tiny", moved / "tiny")
    out = ["run.output_dir=" + str(moved)]
    plan = run_cli(["pipeline/run.py", recipe, *out, "--dry-run"], cwd=work, env=ENV)
    assert "pretrain   skip" in plan.stdout and "sft        skip" in plan.stdout, plan.stdout

    weights = moved / "tiny/pretrain/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated
    plan = run_cli(["pipeline/run.py", recipe, *out, "--dry-run"], cwd=work, env=ENV)
    assert "pretrain   run   (damaged:" in plan.stdout and "truncated" in plan.stdout
    assert "sft        run   (input stage pretrain reruns)" in plan.stdout
    proc = stage(["pipeline/sft.py", recipe, *out], work)  # fails before loading anything
    one_line_error(proc, "stage 'pretrain' is damaged", "model.safetensors")


@pytest.mark.parametrize("damage, expected", [
    (lambda d: (d / "config.json").write_text("{garbage"), "config.json: not valid JSON"),
    (lambda d: (d / "tokenizer.json").unlink(), "tokenizer files missing"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 4), "shorter than a safetensors header"),
])
def test_damage_of_a_model_folder_is_named(tiny_run, tmp_path, damage, expected):
    folder = tmp_path / "sft"
    shutil.copytree(tiny_run[0] / "runs/tiny/sft", folder)
    assert integrity.model_folder_problem(folder, need_tokenizer=True) is None
    damage(folder)
    assert expected in integrity.model_folder_problem(folder, need_tokenizer=True)


# ---------------------------------------------------------------------------------------------- threads


def test_threads_are_shared_given_up_at_once_taken_back_after_a_wait_and_omp_num_threads_wins(tmp_path, monkeypatch,
                                                                                             capsys):
    monkeypatch.setattr(threads, "REGISTRY", tmp_path / "registry")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "STATE", threads._State())
    monkeypatch.setattr(threads, "cpus_given", lambda: ({0, 1, 2, 3}, "test"))
    old = torch.get_num_threads()
    try:
        assert threads.configure() == 4
        code = (f"import sys, time, os; sys.path.insert(0, {str(REPO)!r}); from pipeline import threads; "
                f"from pathlib import Path; threads.REGISTRY = Path({str(tmp_path / 'registry')!r}); "
                f"threads.cpus_given = lambda: ({{2, 3}}, 'test'); threads.configure(); print('on', flush=True); "
                f"time.sleep(60)")

        def neighbour():  # another pipeline process on CPUs 2-3, registered once it returns
            proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                                    env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"})
            while proc.stdout.readline().strip() != "on":  # after its "CPU threads" line
                pass
            return proc

        def end(proc):
            proc.kill()
            proc.wait()

        other = neighbour()
        assert threads.rebalance(force=True) == 2 and torch.get_num_threads() == 2  # given up at once
        monkeypatch.setattr(threads, "GROW_AFTER_S", 1.0)
        end(other)
        assert threads.rebalance(force=True) == 2  # held: the neighbour may be between two stages of its chain
        time.sleep(1.0)
        other = neighbour()                         # ... and here it is back
        assert threads.rebalance(force=True) == 2
        end(other)
        assert threads.rebalance(force=True) == 2  # the wait starts again from its end
        time.sleep(1.0)
        capsys.readouterr()
        assert threads.rebalance(force=True) == 4 and torch.get_num_threads() == 4
        assert "CPU threads: 4 (4 CPUs (test) shared by 1 pipeline process" in capsys.readouterr().out  # its source
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert threads.configure() == 3 and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("content", [b"\xff\xfe not text", b"[1, 2]", b'"finished"', b"{\"stage\": "])
def test_a_damaged_manifest_is_no_finished_stage_and_check_says_it_runs(tmp_path, content):
    # bytes that are not UTF-8 (UnicodeDecodeError) and JSON that is no object (`.get` on a list) were tracebacks
    from pipeline import runs

    recipe = tiny_recipe(tmp_path)
    folder = tmp_path / "runs" / "tiny" / "pretrain"
    folder.mkdir(parents=True)
    (folder / runs.MANIFEST).write_bytes(content)
    assert runs.read_manifest(folder) is None
    if content.startswith(b"["):  # the runner too: --check plans the stage, no traceback
        proc = run_cli(["pipeline/run.py", recipe, "--check", "--only", "pretrain"], cwd=tmp_path)
        assert "Traceback" not in proc.stderr and re.search(r"pretrain\s+runs \(not run yet\)", proc.stdout), \
            proc.stdout + proc.stderr


def test_a_killed_stages_checkpoints_survive_a_resume_that_stops_on_bad_input(tmp_path, monkeypatch):
    """Resuming a killed stage while an input is away (a drive not mounted, the hub offline) deleted its checkpoints:
    a missing local dataset was fingerprinted as a hub id (another fingerprint: the folder was wiped as another
    run's), and any one-line error removed the staging folder. Now the dataset is refused by name, and a resumed
    attempt's folder stays, so the same command resumes once the input is back."""
    from pipeline import data, runs
    from pipeline.cli import PipelineError
    from pipeline.recipe import load_recipe

    with pytest.raises(PipelineError, match=r"dataset '.*corpus\.jsonl': file not found"):
        data.fingerprint(str(tmp_path / "away/corpus.jsonl"), None)
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(tiny_recipe(tmp_path))
    away = load_recipe(tiny_recipe(tmp_path), [f"sft.dataset={tmp_path / 'away/chats.jsonl'}"])
    with pytest.raises(PipelineError, match=r"^override 'sft\.dataset=.*chats\.jsonl': sft\.dataset: dataset "
                                            r"'.*chats\.jsonl': file not found"):
        runs.stage_inputs(away, "sft", must_exist=False)  # the runner's plan names the key and its override
    with pytest.raises(PipelineError):  # a first attempt that stops on bad input leaves nothing
        with runs.StageRun(recipe, "pretrain") as run:
            run.out.mkdir(parents=True)
            raise PipelineError("bad row")
    assert not (recipe.run_dir / "pretrain.partial").exists()
    run = runs.StageRun(recipe, "pretrain")
    (run.out / "checkpoint-4").mkdir(parents=True)  # a killed attempt of the same inputs
    (run.out / ".fingerprint").write_text(run.fingerprint)
    with pytest.raises(PipelineError):
        with run:
            raise PipelineError("the hub cannot be reached")
    assert (run.out / "checkpoint-4").is_dir()
