"""Stages under several processes (gloo on the CPU): the launch configs, 2 processes against 1 with the same global
batch, DeepSpeed ZeRO-3 saving full models, preemption (checkpoint on a signal, resume), rendezvous timeouts,
`run.py --check` and its memory estimate."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from conftest import REPO, launch_cli, max_weight_diff, run_cli, tiny_recipe
from pipeline import check, cluster, memory, preemption
from pipeline.cli import PipelineError

CONFIGS = REPO / "launch" / "accelerate"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # what accelerate gives each CPU process; the same for the 1-process runs
# the same global batch of 8 either way: 1 process x 4 x 2 accumulation, or 2 processes x 4 (accumulation derived)
BATCH = ["pretrain.per_device_train_batch_size=4", "pretrain.global_batch_size=8"]


# ---------------------------------------------------------------------------------------------- launch configs


def test_launch_configs_parse_and_describe_their_sharding():
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {  # config: (distributed_type, ZeRO stage, FSDP version, offload optimizer, offload weights)
        "single": ("NO", 0, 0, False, False), "ddp": ("MULTI_GPU", 0, 0, False, False),
        "fsdp2": ("FSDP", 0, 2, False, False), "zero2": ("DEEPSPEED", 2, 0, False, False),
        "zero3": ("DEEPSPEED", 3, 0, False, False), "zero3_offload": ("DEEPSPEED", 3, 0, True, True),
        "cpu2": ("MULTI_GPU", 0, 0, False, False),
    }
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == set(expected)
    for name, (dist, zero, fsdp, off_opt, off_par) in expected.items():
        accel = load_config_from_file(str(CONFIGS / f"{name}.yaml"))  # Accelerate's own reader accepts it
        assert str(accel.distributed_type).split(".")[-1] == dist, name
        launch = cluster.read_launch(CONFIGS / f"{name}.yaml")
        assert (launch.distributed_type, launch.zero_stage, launch.fsdp_version, launch.offload_optimizer,
                launch.offload_params) == expected[name], name
        assert launch.save_full_model, f"{name} must save a model from_pretrained can load"
        raw = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        if dist == "DEEPSPEED":  # many nodes: torchrun on each node, not pdsh/ssh
            assert raw["deepspeed_config"]["deepspeed_multinode_launcher"] == "standard"
    assert cluster.read_launch(CONFIGS / "cpu2.yaml").num_processes == 2
    offload = json.loads((CONFIGS / "zero3_offload.json").read_text())
    assert offload["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    # ZeRO-2/3 without an optimizer section use the trainer's optimizer: no fused_adam build
    assert "deepspeed_config_file" not in yaml.safe_load((CONFIGS / "zero3.yaml").read_text())["deepspeed_config"]
    # a launcher command line: flags win over the file
    launch = cluster.launch_from_command("accelerate launch --config_file launch/accelerate/zero3.yaml "
                                         "--num_processes 16 --num_machines 2")
    assert (launch.num_processes, launch.num_machines, launch.zero_stage) == (16, 2, 3)
    assert cluster.launch_from_command(None).num_processes == 1
    assert cluster.launch_from_command("torchrun --nproc_per_node 4 --nnodes 2").num_processes == 8


def test_zero3_without_gathering_weights_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "false")
    with pytest.raises(PipelineError, match="zero3_save_16bit_model"):
        cluster.check_environment()
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "true")
    cluster.check_environment()
    bad = tmp_path / "zero3_shards.yaml"
    bad.write_text("distributed_type: DEEPSPEED\ndeepspeed_config: {zero_stage: 3}\n")
    assert not cluster.read_launch(bad).save_full_model


def test_a_launch_config_with_a_deepspeed_file_sets_nothing_accelerate_refuses_beside_it(monkeypatch):
    """With a deepspeed_config_file, Accelerate refuses a launch file that also sets mixed_precision or a ZeRO setting:
    the fields `accelerate launch` passes on (as its launch_command lists them), checked by Accelerate's own
    DeepSpeedPlugin. zero3_offload.yaml set `mixed_precision: "no"`, and every stage stopped at its start under it
    until 2026-12-06."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin

    checked = []
    for path in sorted(CONFIGS.glob("*.yaml")):
        accel = load_config_from_file(str(path))
        ds = accel.deepspeed_config or {}
        if "deepspeed_config_file" in ds:
            fields = list(ds) + (["mixed_precision"] if accel.mixed_precision is not None else [])
            monkeypatch.setenv("ACCELERATE_CONFIG_DS_FIELDS", ",".join(fields))
            DeepSpeedPlugin(hf_ds_config=str(cluster.resolve_path(ds["deepspeed_config_file"])))
            checked.append(path.stem)
    assert checked == ["zero3_offload"]
    monkeypatch.setenv("ACCELERATE_CONFIG_DS_FIELDS", "deepspeed_config_file,mixed_precision")
    with pytest.raises(ValueError, match="will be ignored"):  # what the check catches
        DeepSpeedPlugin(hf_ds_config=str(CONFIGS / "zero3_offload.json"))


def test_a_stage_finds_the_launchs_relative_deepspeed_file_from_any_directory(tmp_path, monkeypatch):
    """`launch/accelerate/zero3_offload.json`, as zero3_offload.yaml names it, is found from the repository when the
    stage runs elsewhere, before the stage's config reads it (a trainer stage stopped with "Expected a string path to
    an existing deepspeed config" until 2026-12-06: its config was built before the path was fixed)."""
    from pipeline.recipe import load_recipe

    recipe = load_recipe(tiny_recipe(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "launch/accelerate/zero3_offload.json")
    recipe.trainer_config("pretrain", num_processes=0)
    assert os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == str(CONFIGS / "zero3_offload.json")


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe", "cannot read the DeepSpeed config"),
    (b"[1, 2]", "not a DeepSpeed config"),
    (b'{"zero_optimization": 3}', "not a DeepSpeed config"),
    (b'{"zero_optimization": {"stage": "three"}}', "zero_optimization.stage must be 0, 1, 2 or 3, got 'three'"),
    (b'{"zero_optimization": {"stage": 2, "offload_optimizer": "cpu"}}', "zero_optimization.offload_optimizer must "
                                                                          "be an object"),
    (b'{"zero_optimization": {"stage": 3,}}', "invalid JSON"),
])
def test_a_bad_deepspeed_config_file_is_one_line_naming_it_from_the_launch_and_the_environment(
        tmp_path, monkeypatch, content, message):
    # the runner reads it from an accelerate config (read_launch), a stage from accelerate's environment
    # (check_environment): one reader for both; a list, bytes that are not UTF-8 or a bad stage were tracebacks
    ds_file = tmp_path / "ds.json"
    ds_file.write_bytes(content)
    launch = tmp_path / "zero.yaml"
    launch.write_text(f"distributed_type: DEEPSPEED\ndeepspeed_config: {{deepspeed_config_file: {ds_file}}}\n")
    with pytest.raises(PipelineError, match=f"^{ds_file}: ") as err:
        cluster.read_launch(launch)
    assert message in str(err.value)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", str(ds_file))
    with pytest.raises(PipelineError, match=f"^{ds_file}: ") as err:
        cluster.check_environment()
    assert message in str(err.value)


@pytest.mark.parametrize("config, message", [
    ("distributed_type: MULTI_GPU\nnum_processes: eight\n", "num_processes must be a whole number of 1 or more, "
                                                           "got 'eight'"),
    ("distributed_type: MULTI_GPU\nnum_machines: [2]\n", "num_machines must be a whole number of 1 or more"),
    ("distributed_type: MULTI_GUP\n", "distributed_type: 'MULTI_GUP' is not one of Accelerate's (NO, "),
    ("distributed_type: DEEPSPEED\ndeepspeed_config: true\n", "deepspeed_config must be a mapping of keys"),
    ("distributed_type: DEEPSPEED\ndeepspeed_config: {zero_stage: none}\n", "deepspeed_config.zero_stage must be "
                                                                            "one of 0, 1, 2, 3, got 'none'"),
    ("distributed_type: FSDP\nfsdp_config: {fsdp_version: x}\n", "fsdp_config.fsdp_version must be one of 1, 2"),
    ("distributed_type: FSDP\nfsdp_config: full\n", "fsdp_config must be a mapping of keys, got 'full'"),
])
def test_a_bad_accelerate_config_is_one_line_naming_the_file_and_key(tmp_path, config, message):
    # found by mutating launch/accelerate/*.yaml at random: 228 of 2,000 configs were tracebacks (int('eight'),
    # .get on a bool); the runner reads this file for --check and run.launcher before any stage starts
    path = tmp_path / "launch.yaml"
    path.write_text(config)
    with pytest.raises(PipelineError, match=f"^{path}: ") as err:
        cluster.launch_from_command(f"accelerate launch --config_file {path}")
    assert message in str(err.value)
    good = tmp_path / "good.yaml"  # a number written as text reads as the number
    good.write_text("distributed_type: multi_gpu\nnum_processes: '4'\n")
    assert cluster.read_launch(good).num_processes == 4


# ---------------------------------------------------------------------------------------------- global batch


def test_batch_plan_derives_accumulation_or_names_the_mismatch():
    plan = cluster.batch_plan("sft", per_device=4, accumulation=None, num_processes=2, expected=64)
    assert (plan.accumulation, plan.global_batch, plan.derived) == (8, 64, True)
    assert cluster.batch_plan("sft", 4, 2, 8, 64).global_batch == 64
    assert cluster.batch_plan("sft", 4, None, 3, None).global_batch == 12  # nothing expected: 1 accumulation
    with pytest.raises(PipelineError, match=r"sft.global_batch_size is 64, but 2 processes x 4 per device x 3"):
        cluster.batch_plan("sft", 4, 3, 2, 64)
    with pytest.raises(PipelineError, match="not a multiple of 3 process"):
        cluster.batch_plan("sft", 4, None, 3, 64)


# ---------------------------------------------------------------------------------------------- several processes


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The tiny pretrain in one process (global batch 8 = 4 x 2 accumulation): the reference for 2 processes."""
    work = tmp_path_factory.mktemp("dist")
    recipe = tiny_recipe(work)
    proc = run_cli(["pipeline/pretrain.py", recipe, *BATCH], cwd=work, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, recipe


@pytest.fixture(scope="module")
def two_processes(one_process):
    """The same pretrain in 2 processes (2 x 4, accumulation 1 derived from global_batch_size 8)."""
    work, recipe = one_process
    proc = launch_cli("cpu2", ["pipeline/pretrain.py", recipe, *BATCH, "run.name=two"], cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, recipe, proc


def test_two_processes_reach_the_same_loss_as_one_with_the_same_global_batch(two_processes):
    work, recipe, proc = two_processes
    one, two = work / "runs/tiny/pretrain", work / "runs/two/pretrain"
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (one, two))
    assert (m1["num_processes"], m2["num_processes"]) == (1, 2)
    assert m1["global_batch_size"] == m2["global_batch_size"] == 8
    assert m1["config"]["gradient_accumulation_steps"] == 2 and m2["config"]["gradient_accumulation_steps"] == 1
    assert m2["launch"]["distributed_type"] == "MULTI_CPU" and m2["launch"]["backend"] == "gloo"
    r1, r2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    # each process read its own half of every global batch: together the same examples as the single process
    assert r2["steps"] == r1["steps"] == 12
    assert r2["train_loss"] == pytest.approx(r1["train_loss"], rel=2e-3)
    assert r2["eval_loss"] == pytest.approx(r1["eval_loss"], rel=1e-2)
    assert max_weight_diff(one, two) < 2e-3
    # only the main process writes and reports
    assert proc.stdout.count("[pretrain] eval loss") == 1
    assert len(re.findall(r"\[pretrain\] [\d.]+M parameters", proc.stdout)) == 1
    assert sorted(p.name for p in (work / "runs/two").iterdir()) == ["pretrain"]


@pytest.mark.skipif(torch.accelerator.is_available(), reason="this machine has a GPU: the processes train there")
@pytest.mark.parametrize("config", ["ddp", "zero2"])
def test_several_processes_without_a_gpu_train_on_the_cpu_even_with_use_cpu_false(two_processes, config):
    """A GPU launch config on a machine without one, and the recipe's use_cpu false: the processes join one group
    on the CPU (gloo) and train as cpu2.yaml's do. Before 2026-12-06 TrainingArguments left each process alone,
    all writing as the main one: the second stopped at the stage lock the first held."""
    work, recipe, _ = two_processes
    proc = launch_cli(config, ["pipeline/pretrain.py", recipe, *BATCH, "pretrain.use_cpu=false",
                               f"run.name={config}-cpu"], cwd=work, num_processes=2, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stdout[-1000:] + proc.stderr[-3000:]
    out = work / f"runs/{config}-cpu/pretrain"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_processes"] == 2 and manifest["launch"]["backend"] == "gloo"
    assert manifest["launch"]["distributed_type"] == {"ddp": "MULTI_CPU", "zero2": "DEEPSPEED"}[config]
    assert manifest["config"]["use_cpu"] is True
    assert proc.stdout.count("[pretrain] eval loss") == 1  # the main process alone reports
    assert max_weight_diff(out, work / "runs/two/pretrain") < 1e-5
    # said once (a GPU config that found no GPU: a broken driver would otherwise go unnoticed), in the log too
    said = "2 processes and no GPU here: they train on the CPU, over gloo"
    assert (proc.stdout + proc.stderr).count(said) == 1 and said in (out / "log.txt").read_text()


def test_sft_dpo_and_eval_under_zero3_with_two_processes_save_full_models_and_one_report(one_process):
    work, recipe = one_process
    zero3 = f"{sys.executable} -m accelerate.commands.launch --config_file {CONFIGS / 'zero3.yaml'} --num_processes 2"
    # through the runner with run.launcher, as a cluster recipe would; DPO starts from the ZeRO-3 SFT model.
    # DPO under ZeRO-3 also shards its frozen reference model.
    proc = run_cli(["pipeline/run.py", recipe, "--only", "sft,dpo", f"run.launcher={zero3}",
                    f"sft.init_from={work / 'runs/tiny/pretrain'}", "sft.max_steps=4", "sft.heldout_max_prompts=4",
                    "sft.heldout_max_new_tokens=8", "sft.per_device_train_batch_size=4",
                    "dpo.max_steps=3", "dpo.per_device_train_batch_size=4", "dpo.per_device_eval_batch_size=8",
                    "dpo.use_cpu=true", "dpo.bf16=false", "dpo.gradient_checkpointing=false", "dpo.max_length=128",
                    "dpo.save_strategy=no", "dpo.heldout_prompts=", "dpo.init_from=sft"], cwd=work)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    pretrained = AutoModelForCausalLM.from_pretrained(work / "runs/tiny/pretrain")
    count = sum(p.numel() for p in pretrained.parameters()) / 1e6
    for stage in ("sft", "dpo"):
        out = work / "runs/tiny" / stage
        # the whole model's count, not a rank's ZeRO-3 shard (0.05M of 0.13M before models.param_count read ds_numel)
        assert f"{count:.2f}M parameters ({count:.2f}M trainable)" in (out / "log.txt").read_text()
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["num_processes"] == 2 and manifest["launch"]["zero_stage"] == 3
        assert manifest["global_batch_size"] == 8
        model = AutoModelForCausalLM.from_pretrained(out)  # one full model, not ZeRO shards
        assert not list(out.glob("global_step*")) and not list(out.glob("*.pt"))
        for (name, a), (_, b) in zip(model.state_dict().items(), pretrained.state_dict().items()):
            assert a.shape == b.shape and a.numel() > 0, name
        assert any((a - b).abs().max() > 0 for a, b in zip(model.parameters(), pretrained.parameters()))
    # the held-out scoring ran on the main process alone, on the model read back from disk
    metrics = json.loads((work / "runs/tiny/sft/metrics.json").read_text())
    assert metrics["heldout"]["n"] == 4 and 0 <= metrics["heldout_accuracy_sft"] <= 1
    # DPO hook: the same as SFT, plus a sharded frozen reference (see pipeline/dpo.py)

    # eval (no trainer) under the same launch: 2 processes counted, the main one alone generates and writes
    proc = launch_cli("zero3", ["pipeline/evaluate.py", recipe, "eval.max_prompts=8", "eval.max_new_tokens=8",
                                "eval.num_samples=1", "eval.batch_size=8"], cwd=work, num_processes=2, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = work / "runs/tiny/eval"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_processes"] == 2 and manifest["launch"]["zero_stage"] == 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["checkpoints"]) == {"pretrain", "sft"}, metrics.keys()  # the recipe's model stages
    assert (out / "report.md").is_file() and not (work / "runs/tiny/eval.partial").exists()


# ---------------------------------------------------------------------------------------------- preemption


def wait_for(path: Path, text: str, proc, timeout=180, count=1):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.is_file() and path.read_text(errors="replace").count(text) >= count:
            return True
        time.sleep(0.2)
    return False


def test_a_signal_to_one_process_checkpoints_all_and_the_rerun_resumes_to_the_same_model(two_processes):
    """SIGUSR1 (Slurm's warning before the time limit; SIGTERM while training does the same) to ONE of two
    processes: they agree to stop after the same step, save one trainer checkpoint together into the .partial
    folder and exit; the same command then resumes from it and ends with the model of the run that was never
    stopped (restored optimizer, scheduler, RNG and data position of both processes)."""
    import psutil

    work, recipe, _ = two_processes
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu2.yaml"),
           str(REPO / "pipeline/pretrain.py"), str(recipe), *BATCH, "run.name=stopped"]
    log = work / "stopped.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=work, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        # once the stage is up (handlers installed) and before it trains: it stops after its first step
        assert wait_for(log, "M parameters", proc), log.read_text()[-2000:]
        workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                   if "pretrain.py" in " ".join(c.cmdline())]
        rank1 = [w for w in workers if w.environ().get("RANK") == "1"]
        assert len(workers) == 2 and len(rank1) == 1, [w.cmdline() for w in workers]
        rank1[0].send_signal(signal.SIGUSR1)
        assert proc.wait(timeout=300) != 0, log.read_text()[-3000:]
    text = log.read_text()
    partial = work / "runs/stopped/pretrain.partial"
    assert [c.name for c in partial.glob("checkpoint-*")] == ["checkpoint-1"], text[-2000:]
    ckpt = partial / "checkpoint-1"
    assert (ckpt / "trainer_state.json").is_file() and (ckpt / "rng_state_0.pth").is_file()
    assert (ckpt / "rng_state_1.pth").is_file() and "preempted: stopped on" in text
    assert f"exitcode  : {preemption.PREEMPTED_EXIT}" in text  # the processes left with "stopped, resume me"
    assert "SIGABRT" not in text  # ... and none crashed on the way out (process-group teardown)
    plan = run_cli(["pipeline/run.py", recipe, *BATCH, "run.name=stopped", "--dry-run"], cwd=work)
    # a stopped stage never looks finished, and the plan says it resumes
    assert "pretrain   run   (resumes from checkpoint-1 of 12 steps in stopped/pretrain.partial)" in plan.stdout

    resumed = launch_cli("cpu2", ["pipeline/pretrain.py", recipe, *BATCH, "run.name=stopped"], cwd=work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from runs/stopped/pretrain.partial/checkpoint-1" in resumed.stdout
    out = work / "runs/stopped/pretrain"
    assert json.loads((out / "manifest.json").read_text())["resumed_from"] == "checkpoint-1"
    assert json.loads((out / "metrics.json").read_text())["steps"] == 12
    assert not list(out.glob("checkpoint-*")) and not partial.exists()
    assert max_weight_diff(out, work / "runs/two/pretrain") < 1e-5


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_a_stage_killed_under_deepspeed_resumes_from_its_checkpoint_to_the_uninterrupted_model(one_process, zero):
    """Killed (SIGKILL, as a lost node) after a checkpoint under ZeRO-2 / ZeRO-3 with 2 processes, the same command
    resumes from DeepSpeed's checkpoint files and ends with the model of the run that was never killed. Those files
    name DeepSpeed's own data classes (its ZeRO stage, loss scaler, fragment addresses): they pass the weights_only
    check by name, and before the stage's trainer has imported DeepSpeed (refused as "a pickle that names code",
    exit 2, until 2026-12-05: no stage under DeepSpeed could resume)."""
    work, recipe = one_process
    args = ["pipeline/pretrain.py", recipe, *BATCH, "pretrain.save_strategy=steps", "pretrain.save_steps=4"]
    whole = launch_cli(zero, [*args, f"run.name={zero}-whole"], cwd=work, num_processes=2, env=ONE_THREAD)
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = launch_cli(zero, [*args, f"run.name={zero}-killed"], cwd=work, num_processes=2,
                        env={**ONE_THREAD, "PIPELINE_FAULT": "kill:training:6"})
    assert killed.returncode != 0
    ckpt = work / f"runs/{zero}-killed/pretrain.partial/checkpoint-4"
    assert sorted(p.name for p in (ckpt / "global_step4").glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    resumed = launch_cli(zero, [*args, f"run.name={zero}-killed"], cwd=work, num_processes=2, env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stdout[-1000:] + resumed.stderr[-3000:]
    assert f"resuming from runs/{zero}-killed/pretrain.partial/checkpoint-4" in resumed.stdout
    out = work / f"runs/{zero}-killed/pretrain"
    assert json.loads((out / "manifest.json").read_text())["resumed_from"] == "checkpoint-4"
    assert max_weight_diff(out, work / f"runs/{zero}-whole/pretrain") == 0.0


def test_rendezvous_timeout_fails_a_missing_node_instead_of_hanging(tmp_path):
    """The flags launch/slurm/stage.sbatch passes: machine 0 of 2 waits `timeout` seconds, then fails."""
    recipe = tiny_recipe(tmp_path)
    started = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "cpu2.yaml"),
         "--num_machines", "2", "--num_processes", "2", "--machine_rank", "0", "--main_process_ip", "127.0.0.1",
         "--main_process_port", "0", "--rdzv_backend", "static", "--rdzv_conf", "timeout=5", "--max_restarts", "0",
         str(REPO / "pipeline/pretrain.py"), str(recipe)],
        cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0 and time.time() - started < 120
    assert "1/2 clients joined" in proc.stderr or "Timed out" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------- --check


def test_check_reports_launch_batch_and_memory_and_submits_nothing(tmp_path):
    recipe = tiny_recipe(tmp_path, sft={"global_batch_size": 32})
    ok = run_cli(["pipeline/run.py", recipe, "--check", "--slurm", "--nodes", "2", "--procs-per-node", "2",
                  "--config", "launch/accelerate/zero3.yaml", "--device-memory", "80GiB"], cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "DeepSpeed ZeRO-3, 4 processes on 2 machines" in ok.stdout
    assert "4 processes x 8 per device x 1 accumulation (derived) = 32 per optimizer step" in ok.stdout
    assert "init_from: pretrain (stage not trained yet, llama 0.1" in ok.stdout
    assert "memory per device: weights" in ok.stdout and "optimizer" in ok.stdout and "activations" in ok.stdout
    assert "ok: no problems found" in ok.stdout and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("how, line", [
    (["slurm.nodes=0"], "error: override 'slurm.nodes=0': slurm.nodes must be at least 1, got 0"),
    (["slurm.signal_seconds=-5"], "error: override 'slurm.signal_seconds=-5': slurm.signal_seconds must be 0 or more, "
                                  "got -5"),
    (["--nodes", "-2"], "error: --nodes: slurm.nodes must be at least 1, got -2"),
    (["--cpus-per-task", "0"], "error: --cpus-per-task: slurm.cpus_per_task must be at least 1, got 0"),
    (["slurm.stages={sft: {rdzv_timeout: 0}}"], "error: override 'slurm.stages={sft: {rdzv_timeout: 0}}': "
                                               "slurm.stages.sft.rdzv_timeout must be at least 1, got 0"),
    # a misspelt stage or key under slurm.stages was ignored (the stage was submitted with the defaults)
    (["slurm.stages={sfft: {nodes: 4}}"], "error: override 'slurm.stages={sfft: {nodes: 4}}': slurm.stages: unknown "
                                          "stage 'sfft' (closest: sft)"),
    (["slurm.stages={sft: {nodez: 3}}"], "unknown key 'nodez' in slurm.stages.sft (closest: nodes)"),
    (["--sbatch=--comment=\"x"], "error: --sbatch '--comment=\"x': No closing quotation"),  # was a traceback
    (["--no-slurm", "--config", "launch/accelerate/ddp.yaml", "--gpus-per-node", "-2"],  # --check planned -2
     "error: --gpus-per-node: slurm.gpus_per_node must be 0 or more, got -2"),
])
def test_slurm_counts_below_their_floor_stop_before_anything_is_submitted(tmp_path, how, line):
    """sbatch took --nodes=0 and --signal=B:USR1@-5 (and --check planned 8 processes): a count below its floor,
    from the recipe, a stage's slurm override or a flag, is one line naming it, exit 2, nothing submitted."""
    recipe = tiny_recipe(tmp_path)
    slurm = [] if "--no-slurm" in how else ["--slurm"]
    proc = run_cli(["pipeline/run.py", recipe, "--check", *slurm, *[h for h in how if h != "--no-slurm"]],
                   cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    assert line.replace("{recipe}", str(recipe)) in proc.stdout + proc.stderr
    assert not (tmp_path / "runs").exists()


def check_output(capsys, recipe_path, overrides, only=(), memory=None, launch=None):
    from pipeline.recipe import load_recipe
    from pipeline.run import plan

    recipe = load_recipe(recipe_path, overrides)
    result = check.run_check(recipe, plan(recipe, only=list(only)), lambda stage: launch or cluster.Launch(),
                             memory)
    return result, capsys.readouterr().out


def test_check_warns_over_the_device_memory_and_names_every_error(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, sft={"global_batch_size": 32})
    (errors, warnings), out = check_output(capsys, recipe, [], memory=memory.parse_size("64MiB"))
    assert (errors, warnings) == (0, 2) and "warning: pretrain: needs about" in out

    (errors, _), out = check_output(capsys, recipe, ["sft.gradient_accumulation_steps=3",
                                                     "sft.dataset=missing.jsonl"], only=["sft"])
    assert errors == 3, out
    assert "error: sft.global_batch_size is 32, but 1 process x 8 per device x 3 accumulation" in out
    assert "error: sft.dataset: dataset 'missing.jsonl': file not found" in out
    assert "error: sft.init_from: reads pretrain, which has not finished and is not planned to run" in out

    single = cluster.read_launch(CONFIGS / "single.yaml", num_processes=4)
    (errors, _), out = check_output(capsys, recipe, ["sft.global_batch_size=null"], launch=single)
    assert errors == 2 and "runs a single process (distributed_type NO) but 4 were asked for" in out


def test_ppo_counts_a_frozen_model_per_ensemble_member_and_for_the_implicit_reward_policy():
    from pipeline.recipe import load_recipe

    small = REPO / "recipes" / "small.yaml"

    def frozen(*overrides):
        profile = memory.profile_of(load_recipe(small, list(overrides)), "ppo")
        return profile.frozen_models, profile.frozen_with_peft

    assert frozen("ppo.implicit_reward=null") == (2, 1)  # the reference and the reward model (LoRA: no reference)
    assert frozen("ppo.implicit_reward=dpo") == (3, 2)
    assert frozen("ppo.implicit_reward=null", "ppo.reward_ensemble=[a, b]") == (4, 3)
    assert memory.profile_of(load_recipe(small), "reward").lm_head  # its LM regulariser reads the vocabulary


def test_memory_estimate_follows_the_sharding():
    shape = memory.ModelShape("test", "llama", params=8_000_000_000, hidden=4096, intermediate=14336, layers=32,
                             heads=32, kv_dim=1024, vocab=128256, max_positions=8192, linear_params=7_000_000_000,
                             lora_params_per_rank={"q_proj": 32 * 8192, "v_proj": 32 * 5120})
    common = dict(profile=memory.StageProfile(), per_device=1, seq_len=4096, mixed=True, weight_bytes=2,
                  grad_ckpt=True, peft={}, attn=None)

    def est(config, n, **kw):
        return memory.estimate_memory(shape, cluster.read_launch(CONFIGS / f"{config}.yaml", num_processes=n),
                                     **{**common, **kw}).parts

    ddp, z2, z3, off = est("ddp", 8), est("zero2", 8), est("zero3", 8), est("zero3_offload", 8)
    assert ddp["weights"] == pytest.approx(16e9)        # bf16 weights, replicated
    assert z2["optimizer"] == pytest.approx(12 * 8e9 / 8)  # fp32 master + 2 moments, sharded over 8
    assert z2["weights"] == pytest.approx(16e9) and z2["gradients"] == pytest.approx(2 * 8e9 / 8)
    assert z3["weights"] < z2["weights"] / 4            # ZeRO-3 shards the weights too (plus gathered layers)
    assert est("zero3", 16)["optimizer"] == pytest.approx(z3["optimizer"] / 2)
    assert off["optimizer"] == 0 and off["weights"] < z3["weights"]
    assert est("zero3", 8, grad_ckpt=False)["activations"] > 3 * z3["activations"]
    lora = est("ddp", 8, peft={"use_peft": True, "lora_r": 16})
    assert lora["optimizer"] < ddp["optimizer"] / 100
    dpo = memory.estimate_memory(shape, cluster.read_launch(CONFIGS / "zero2.yaml", num_processes=8),
                                **{**common, "profile": memory.PROFILES["dpo"]}).parts
    assert dpo["frozen models"] == pytest.approx(16e9)  # the reference, in 16-bit
    ppo = {config: memory.estimate_memory(shape, cluster.read_launch(CONFIGS / f"{config}.yaml", num_processes=8),
                                          **{**common, "profile": memory.PROFILES["ppo"]}).parts
           for config in ("zero2", "zero3")}
    assert ppo["zero3"]["frozen models"] == ppo["zero2"]["frozen models"] == pytest.approx(2 * 16e9)  # whole
    assert ppo["zero3"]["optimizer"] == pytest.approx(2 * 12 * 8e9 / 8)  # policy and critic, sharded over 8
    assert ppo["zero3"]["gathered for generation"] == pytest.approx(2 * 16e9)  # rollouts: whole weights
    assert "gathered for generation" not in ppo["zero2"]
    assert memory.parse_size("80GiB") == 80 << 30 and memory.parse_size("24 GB") == 24e9
    with pytest.raises(PipelineError, match="memory size"):
        memory.parse_size("lots")


def test_a_finished_stage_of_several_processes_leaves_after_its_exit_handlers(tmp_path):
    """With several processes, a finished stage's process runs Python's exit handlers (trackers finish their runs)
    and leaves with code 0 without the interpreter's teardown, where DeepSpeed's and accelerate's leftover group
    objects aborted a ZeRO-3 process whose work was saved."""
    script = tmp_path / "stage.py"
    script.write_text(f"""
import atexit, sys
sys.path.insert(0, {str(REPO)!r})
import torch.distributed as dist
from pipeline import cli
rank = int(sys.argv[1])
dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=rank, world_size=2)
atexit.register(lambda: open("{tmp_path}/exit-%d" % rank, "w").write("ran"))
cli.run_main(lambda argv: dist.barrier(), [])
open("{tmp_path}/after-%d" % rank, "w").write("ran")  # not reached: the process has left
""")
    procs = [subprocess.Popen([sys.executable, str(script), str(rank)]) for rank in (0, 1)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert all((tmp_path / f"exit-{rank}").read_text() == "ran" for rank in (0, 1))
    assert not list(tmp_path.glob("after-*"))


def test_a_finished_stage_ends_its_process_group_and_a_failed_one_leaves_it(tmp_path):
    """A process that exits with its gloo group alive can abort after its work is saved (SIGABRT, "terminate called
    without an active exception": pytorch/pytorch#190489; test_reward's two-process test once failed so in a full
    suite). `run_main` ends the group after a stage that finished, and leaves it after a bad-input error, when the
    other processes may still be inside a collective."""
    import torch.distributed as dist

    from pipeline import cli

    def bad_input(argv):
        raise PipelineError("bad input")

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(SystemExit):
            cli.run_main(bad_input, [])
        assert dist.is_initialized()
        cli.run_main(lambda argv: None, [])
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_processes_rejoin_on_the_cpu_for_use_cpu_whichever_comes_late(tmp_path):
    """cluster.process_group(cpu=True) makes a state made on the accelerator anew on the CPU: every process leaves
    the launch's group and joins a new gloo one. Under torchrun the new group used the old one's keys in the launch's
    store: a process that came first could read the late one's old address, and the launch failed or hung (whether
    it did depends on which side of a pair connects: most rounds). Two processes under torchrun, each late in turn
    over 4 rounds; the launch's group is gloo here (NCCL on a GPU), the accelerator pretended."""
    script = tmp_path / "rejoin.py"
    script.write_text(f"""
import faulthandler, os, sys, time
sys.path.insert(0, {str(REPO)!r})
faulthandler.dump_traceback_later(60, exit=True)  # a hang fails the test, not the suite
import accelerate, torch, torch.distributed as dist
from accelerate.state import AcceleratorState
from pipeline import cluster
dist.init_process_group("gloo")
accelerate.state.PartialState.default_device = property(lambda _: torch.device("cuda"))
cluster.accelerator_here = lambda: True
rank = int(os.environ["RANK"])
for late in (0, 1, 0, 1):
    AcceleratorState._reset_state(reset_partial_state=True)
    assert cluster.process_group().device.type == "cuda"
    if rank == late:
        time.sleep(2)  # processes reach a stage's StageRun at different times
    state = cluster.process_group(cpu=True)
    total = torch.ones(1)
    dist.all_reduce(total)
    with open("{tmp_path}/rank-%d" % rank, "a") as out:
        out.write(f"{{state.num_processes}} {{state.backend}} {{total.item():g}}\\n")
dist.destroy_process_group()
""")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script)], env={**os.environ, **ONE_THREAD}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
    assert proc.returncode == 0, out[-3000:]
    assert [(tmp_path / f"rank-{rank}").read_text() for rank in (0, 1)] == ["2 gloo 2\n" * 4] * 2


# ------------------------------------------------------------------------------ whether there is an accelerator


def stub_devices(monkeypatch, *present):
    """torch and Accelerate (its checks, and the names its PartialState reads them by) answer as on a machine whose
    accelerators are `present` alone ("xccl": an XPU's collectives)."""
    from accelerate import state
    from accelerate.utils import imports

    monkeypatch.setattr(torch.cuda, "is_available", lambda: "cuda" in present)
    for device in (*cluster.ACCELERATOR_ORDER, "xccl"):
        for module in (imports, state):
            if device != "cuda" and hasattr(module, f"is_{device}_available"):
                monkeypatch.setattr(module, f"is_{device}_available", lambda *_, d=device, **__: d in present)


@pytest.mark.parametrize("present, device, several", [
    ((), "cpu", "cpu"), (("cuda",), "cuda", "cuda"), (("xpu", "xccl"), "xpu", "xpu"), (("npu", "cuda"), "npu", "npu"),
    (("mps",), "mps", "cpu"), (("xpu",), "xpu", "cpu")])  # several processes: MPS, and an XPU without XCCL, no group
def test_every_stage_trains_on_the_accelerator_that_accelerate_picks(tmp_path, monkeypatch, present, device, several):
    """Our PPO, GRPO/RLOO, the image stages, their draw_image tool and the process group asked torch.cuda alone: on
    an XPU, NPU or MPS machine they trained on the CPU while the trainer stages used it. One process trains on the
    device Accelerate's PartialState picks; a launch of several on one Accelerate joins them over (its backends),
    else on the CPU as one gloo group (on MPS each process had been alone, all writing as the main one)."""
    import accelerate
    import trl

    from pipeline import diffusion_config, images, ppo_models, tools, trl_online
    from pipeline.recipe import load_recipe

    stub_devices(monkeypatch, *present)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("PYTORCH_ENABLE_MPS_FALLBACK", "0")  # PartialState's MPS answer sets it: undone after the test
    assert cluster.training_device() == device
    if device != "npu":  # torch names an NPU only with torch_npu installed
        assert accelerate.PartialState.default_device.fget(None).type == device
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    on_cpu = several == "cpu"
    assert cluster.training_device() == several and cluster.accelerator_here() is not on_cpu
    assert cluster.processes_without_accelerator() == (2 if on_cpu else 0)
    made = []
    monkeypatch.setattr(accelerate, "PartialState", type("State", (), {"_shared_state": {},
                                                                        "__init__": lambda _, **kw: made.append(kw)}))
    cluster.process_group()
    assert made == [{"cpu": on_cpu}]
    monkeypatch.delenv("WORLD_SIZE")
    on_cpu = device == "cpu"

    recipe = load_recipe(tiny_recipe(tmp_path, ppo={"algorithm": "grpo"}), [])
    cfg = recipe.trainer_config("ppo")
    assert ppo_models.on_cpu(cfg) is on_cpu
    monkeypatch.setattr(trl, "GRPOConfig", lambda **kw: kw)
    assert trl_online.trl_config(recipe, cfg, str(tmp_path / "out"))[0]["use_cpu"] is on_cpu

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *_, **__: True)
    monkeypatch.setattr(cluster, "cpu_bf16_native", lambda: False)  # auto: bf16 only on the GPU of these three
    assert diffusion_config.mixed_precision_here("auto", "diffusion") == ("bf16" if device == "cuda" else "no")

    class Pipe:
        def set_progress_bar_config(self, **_):
            pass

        def to(self, where):
            self.device = where
            return self

        def __call__(self, prompt, callback_on_step_end=None):
            pass

    monkeypatch.setattr(images, "load_pipeline", lambda _: Pipe())
    assert tools.diffusion_tool("draw_image", "pipe", store=None).setup().device == device


def test_only_questions_about_cuda_itself_ask_torch_cuda():
    """Whether to train on the CPU is cluster.accelerator_here's question alone (the test above; cluster asks torch.cuda
    as one of Accelerate's devices); these ask about a CUDA GPU as such: its memory (check), vLLM's device
    (vllm_engine). A question about the device a model is on asks that device (pipeline/devices.py). Found in the
    syntax tree, however torch.cuda's availability and device questions are spelt or imported."""
    import ast

    questions = {f"torch.cuda.{name}" for name in ("is_available", "current_device", "device_count")}

    def asks_cuda(source: str) -> bool:
        tree, names, imported = ast.parse(source), {}, set()  # names: a name an import binds -> what it stands for
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names.update({a.asname: a.name for a in node.names if a.asname}
                             | {a.name.split(".")[0]: a.name.split(".")[0] for a in node.names if not a.asname})
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
                imported |= {f"{node.module}.{a.name}" for a in node.names}

        def dotted(node) -> str | None:
            if isinstance(node, ast.Name):
                return names.get(node.id)
            if isinstance(node, ast.Attribute) and (base := dotted(node.value)):
                return f"{base}.{node.attr}"
            return None

        return bool(imported & questions) or any(dotted(node) in questions for node in ast.walk(tree))

    spellings = ["import torch\nif torch.cuda.is_available(): pass", "import torch as t\nn = t.cuda.device_count()",
                 "from torch import cuda\nask = cuda.is_available", "import torch.cuda as tc\ntc.current_device()",
                 "from torch.cuda import is_available as here\n"]
    assert all(asks_cuda(text) for text in spellings)
    assert [text for text in spellings if "cuda.is_available()" in text] == spellings[:1]  # the old text search's
    assert not asks_cuda("import torch\ntorch.cuda.max_memory_allocated()\ncuda = 'is_available'")
    asking = {p.stem for p in (REPO / "pipeline").glob("*.py") if asks_cuda(p.read_text())}
    assert asking == {"check", "cluster", "vllm_engine"}
