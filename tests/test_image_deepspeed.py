"""The image stages under a DeepSpeed launch (2 CPU processes, gloo): ZeRO-1/2 train the UNet (and a new model's text
encoder) as one DeepSpeed module, as DDP trains them, and resume after a kill from DeepSpeed's optimizer shards;
ZeRO-3 and fp16 keep DDP and say why (pipeline/diffusion_train.py, cluster.data_parallel_under_deepspeed)."""

import json
import socket

import pytest
import torch

from conftest import REPO, launch_cli, run_cli
from pipeline import check, cluster
from pipeline.cli import PipelineError
from test_diffusion import TINY_DIFFUSION, TINY_DPO, _tiny_stable_diffusion, image_recipe
from test_image_pairs import chosen_rejected
from test_tools import save_tiny_image_stage

ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def unet_weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def history(run_dir) -> list[dict]:
    return json.loads((run_dir / "diffusion/metrics.json").read_text())["history"]


def one_process_launch(**accelerate_env) -> dict:
    """The environment `accelerate launch` gives a single process (a process group of one, on a free port), plus
    `accelerate_env`: run without the launcher, which would report its child's exit 2 as its own traceback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {**ONE_THREAD, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), **accelerate_env}


ZERO2_ALONE = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}


def unreadable_optimizer_state(ckpt, saved: str, launch: str) -> str:
    """diffusion_launch.check_optimizer_format's refusal: checkpoint `ckpt`'s optimizer state, saved under the launch
    `saved`, cannot be read by this one (`launch`)."""
    return (f"{ckpt}: its optimizer state was saved under {saved}, which this launch ({launch}) cannot read: "
            f"relaunch as that one was, or remove {ckpt.parent} to start over")


def test_diffusion_under_zero2_trains_with_deepspeed_as_ddp_does_and_resumes_after_a_kill(tmp_path):
    """Under zero2.yaml the diffusion stage hands its UNet and text encoder to one DeepSpeed engine (until 2026-12-07
    it left DeepSpeed and ran as DDP, so a full fine-tune had to fit one device): the manifest records the DeepSpeed
    launch, the saved UNet and the logged gradient norms are DDP's (accumulation and clipping included), and a run
    killed after a checkpoint, which holds DeepSpeed's optimizer shards, resumes to the uninterrupted run's weights
    and losses when launched as before, and otherwise stops in one line keeping the checkpoint (until 2026-12-07 a
    traceback from DeepSpeed or the loop, on every rerun)."""
    section = {**TINY_DIFFUSION, "max_steps": 8, "save_steps": 4, "judge_epochs": 0, "logging_steps": 2,
               "gradient_accumulation_steps": 2, "max_grad_norm": 2.5}  # clips some steps, not all
    recipe = image_recipe(tmp_path, diffusion=section)
    runs = tmp_path / "runs"

    ddp = launch_cli("ddp", ["pipeline/diffusion.py", recipe, "run.name=ddp"], cwd=tmp_path, num_processes=2,
                     env=ONE_THREAD)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    whole = launch_cli("zero2", ["pipeline/diffusion.py", recipe, "run.name=whole"], cwd=tmp_path, num_processes=2,
                       env=ONE_THREAD)
    assert whole.returncode == 0, whole.stderr[-3000:]
    said = whole.stdout + whole.stderr
    assert "data-parallel" not in said
    assert said.count("DeepSpeed ZeRO-2: unet, text_encoder trained by one DeepSpeedEngine over 2 process(es)") == 1
    launch = json.loads((runs / "whole/diffusion/manifest.json").read_text())["launch"]
    assert (launch["distributed_type"], launch["zero_stage"], launch["num_processes"]) == ("DEEPSPEED", 2, 2)
    # the norms before clipping (HF Trainer's grad_norm): a gradient scaled otherwise than DDP's shows here, where
    # AdamW's near scale-invariance and the clipping may hide it from the weights
    norms = {name: [h["grad_norm"] for h in history(runs / name)] for name in ("ddp", "whole")}
    assert norms["whole"] == pytest.approx(norms["ddp"], rel=1e-4) and len(norms["ddp"]) == 4
    assert min(norms["ddp"]) < section["max_grad_norm"] < max(norms["ddp"])
    assert max_diff(unet_weights(runs / "whole/diffusion"), unet_weights(runs / "ddp/diffusion")) < 1e-5
    killed = launch_cli("zero2", ["pipeline/diffusion.py", recipe], cwd=tmp_path, num_processes=2,
                        env={**ONE_THREAD, "PIPELINE_FAULT": "kill:training:6"})
    assert killed.returncode != 0
    ckpt = runs / "tiny/diffusion.partial/checkpoint-4"
    assert {p.name for p in (ckpt / "deepspeed").iterdir()} >= {"zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                                                 "zero_pp_rank_1_mp_rank_00_optim_states.pt"}
    assert (ckpt / "unet.safetensors").is_file() and not (ckpt / "optimizer.safetensors").exists()
    # its shards fit ZeRO-2 over 2 processes only: a plain process and ZeRO-2 alone say so, and keep it
    for launch, env in (("a launch without DeepSpeed (DDP or one process)", ONE_THREAD),
                        ("DeepSpeed ZeRO-2 over 1 process(es)", one_process_launch(**ZERO2_ALONE))):
        refused = run_cli(["pipeline/diffusion.py", recipe], cwd=tmp_path, env=env, fork=False)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
        assert refused.stderr.strip().splitlines()[-1] == "error: " + unreadable_optimizer_state(
            ckpt.relative_to(tmp_path), "DeepSpeed ZeRO-2 over 2 process(es)", launch)
    assert (ckpt / "deepspeed").is_dir() and (ckpt / "loop_state.json").is_file()
    resumed = launch_cli("zero2", ["pipeline/diffusion.py", recipe], cwd=tmp_path, num_processes=2, env=ONE_THREAD)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step 4" in resumed.stdout + resumed.stderr
    a, b = unet_weights(runs / "tiny/diffusion"), unet_weights(runs / "whole/diffusion")
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [[h["loss"] for h in history(runs / name)] for name in ("tiny", "whole")]
    assert losses[0] == losses[1] and len(losses[0]) == 4


def test_only_a_launch_that_can_read_a_checkpoints_optimizer_state_resumes_from_it(tmp_path, monkeypatch):
    """torch's whole optimizer state (also a checkpoint from before loop_state.json said so) resumes under any launch
    without DeepSpeed; DeepSpeed's shards only under their ZeRO stage and process count. Any other launch stops in one
    line before DeepSpeed reads a file (until 2026-12-07: DeepSpeed's bare AssertionError or ZeRORuntimeException, or
    KeyError 'optimizer', on every rerun)."""
    from pipeline import diffusion_launch

    def here(zero: int | None, processes: int = 1) -> dict:  # what this launch saves, from its environment
        monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true" if zero else "false")
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", str(zero or 0))
        monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
        monkeypatch.setenv("WORLD_SIZE", str(processes))
        return diffusion_launch.optimizer_format()

    ckpt = tmp_path / "diffusion.partial/checkpoint-4"
    torch_state, zero2 = {"step": 4}, {"optimizer_format": "deepspeed", "zero_stage": 2, "processes": 2}
    diffusion_launch.check_optimizer_format(ckpt, torch_state, here(None, 2))
    diffusion_launch.check_optimizer_format(ckpt, {**torch_state, "optimizer_format": "torch"}, here(None))
    diffusion_launch.check_optimizer_format(ckpt, zero2, here(2, 2))
    for state, launch, saved, said in [
            (torch_state, here(2, 2), "a launch without DeepSpeed (DDP or one process)",
             "DeepSpeed ZeRO-2 over 2 process(es)"),
            (zero2, here(1, 2), "DeepSpeed ZeRO-2 over 2 process(es)", "DeepSpeed ZeRO-1 over 2 process(es)"),
            (zero2, here(2, 4), "DeepSpeed ZeRO-2 over 2 process(es)", "DeepSpeed ZeRO-2 over 4 process(es)")]:
        with pytest.raises(PipelineError) as refused:
            diffusion_launch.check_optimizer_format(ckpt, state, launch)
        assert str(refused.value) == unreadable_optimizer_state(ckpt, saved, said)


def test_a_checkpoint_this_launch_cannot_read_stops_the_stage_before_any_model_loads(tmp_path):
    """A DeepSpeed checkpoint (ZeRO-2, one process, accumulating) relaunched without DeepSpeed stops in one line
    before the stage loads anything (the fault at `loading` never fires; until 2026-12-07 the line came after the
    models were built), and relaunched under ZeRO-3 (run as DDP) in a process where nothing imports deepspeed with
    that line too (until 2026-12-07 safe_resume judged DeepSpeed's torch files first and named one unsafe). The
    DeepSpeed launch gives Accelerate the accumulation its config has: no "Gradient accumulation steps mismatch"
    warning (until 2026-12-07 on every DeepSpeed launch that accumulated)."""
    recipe = image_recipe(tmp_path, diffusion={**TINY_DIFFUSION, "max_steps": 3, "save_steps": 1, "judge_epochs": 0,
                                               "logging_steps": 1, "gradient_accumulation_steps": 2})
    killed = run_cli(["pipeline/diffusion.py", recipe], cwd=tmp_path, fork=False,
                     env={**one_process_launch(**ZERO2_ALONE), "PIPELINE_FAULT": "kill:training:2"})
    assert killed.returncode != 0
    ckpt = tmp_path / "runs/tiny/diffusion.partial/checkpoint-1"
    assert (ckpt / "deepspeed").is_dir()
    # a process in which nothing imports deepspeed (here accelerate's unwrap_model would, before the loop resumes)
    hidden = tmp_path / "no_deepspeed"
    hidden.mkdir()
    (hidden / "sitecustomize.py").write_text("import sys\nsys.modules['deepspeed'] = None\n")
    zero3 = one_process_launch(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE="3",
                               ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL="true", PYTHONPATH=str(hidden))
    for env in (zero3, {**ONE_THREAD, "PIPELINE_FAULT": "kill:loading:1"}):
        refused = run_cli(["pipeline/diffusion.py", recipe], cwd=tmp_path, env=env, fork=False)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
        assert refused.stderr.strip().splitlines()[-1] == "error: " + unreadable_optimizer_state(
            ckpt.relative_to(tmp_path), "DeepSpeed ZeRO-2 over 1 process(es)",
            "a launch without DeepSpeed (DDP or one process)")
        assert (ckpt / "deepspeed").is_dir() and (ckpt / "loop_state.json").is_file()
    assert "accumulation steps mismatch" not in killed.stdout + killed.stderr, killed.stderr[-3000:]


def test_a_lora_under_zero2_checkpoints_without_its_frozen_base_and_resumes(tmp_path):
    """DeepSpeed's own checkpoint of a LoRA holds the adapters, not the frozen base UNet (until 2026-12-07 the whole
    UNet, ~3.4 GB per checkpoint for SD-1.5), and a killed run resumes from it to the uninterrupted run's UNet. One
    process under ZeRO-2, in the environment `accelerate launch` gives it."""
    base = _tiny_stable_diffusion(tmp_path / "tiny-sd")
    recipe = image_recipe(tmp_path, diffusion={"pretrained": str(base), "use_lora": True, "lora_rank": 4,
                                               "train_text_encoder": False, "max_steps": 2, "batch_size": 4,
                                               "ema_decay": 0.0, "judge_epochs": 0, "save_steps": 1,
                                               "logging_steps": 1, "learning_rate": 1e-2})
    runs = tmp_path / "runs"
    killed = run_cli(["pipeline/diffusion.py", recipe], cwd=tmp_path, fork=False,
                     env={**one_process_launch(**ZERO2_ALONE), "PIPELINE_FAULT": "kill:training:2"})
    assert killed.returncode != 0
    saved = torch.load(runs / "tiny/diffusion.partial/checkpoint-1/deepspeed/mp_rank_00_model_states.pt",
                       weights_only=False)
    assert saved["module"] and all("lora_" in k for k in saved["module"]), sorted(saved["module"])[:3]
    assert saved.get("frozen_param_fragments") is None
    resumed, whole = (run_cli(["pipeline/diffusion.py", recipe, f"run.name={name}"], cwd=tmp_path, fork=False,
                              env=one_process_launch(**ZERO2_ALONE)) for name in ("tiny", "whole"))
    assert resumed.returncode == whole.returncode == 0, resumed.stderr[-3000:] + whole.stderr[-3000:]
    assert "resumed at step 1" in resumed.stdout + resumed.stderr
    a, b = unet_weights(runs / "tiny/diffusion"), unet_weights(runs / "whole/diffusion")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_diffusion_dpo_under_zero2_trains_with_deepspeed_as_ddp_does(tmp_path):
    """diffusion_dpo hands DeepSpeed its UNet (the frozen reference stays outside) and tunes it as DDP does."""
    start = tmp_path / "start"
    save_tiny_image_stage(start)
    pairs = chosen_rejected(tmp_path / "pairs", "white.png", "black.png")
    section = {**TINY_DPO, "init_from": str(start), "dataset": str(pairs), "heldout_captions": None,
               "rounds": 1, "gradient_accumulation_steps": 2}
    recipe = image_recipe(tmp_path, diffusion_dpo=section)
    tuned = {}
    for config in ("ddp", "zero2"):
        proc = launch_cli(config, ["pipeline/diffusion_dpo.py", recipe, f"run.name={config}"], cwd=tmp_path,
                          num_processes=2, env=ONE_THREAD)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        tuned[config] = unet_weights(tmp_path / f"runs/{config}/diffusion_dpo")
    assert "DeepSpeed ZeRO-2: unet trained by one DeepSpeedEngine" in proc.stdout + proc.stderr
    assert max_diff(tuned["ddp"], tuned["zero2"]) < 1e-5 < max_diff(unet_weights(start), tuned["zero2"])


@pytest.mark.parametrize("zero, precision, why", [(2, "bf16", None), (1, "no", None), (3, "no", "ZeRO-3"),
                                                  (2, "fp16", "and fp16 mixed precision")])
def test_only_zero3_and_fp16_send_the_image_stages_to_ddp_and_check_plans_the_same(zero, precision, why, tmp_path,
                                                                                   monkeypatch):
    """The stage (leave_deepspeed, before its process group) and `--check` decide alike: ZeRO-1/2 keep DeepSpeed
    (--check then plans ZeRO's sharded optimizer state), ZeRO-3 and fp16 run as DDP with a line naming why."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", str(zero))
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    line = cluster.leave_deepspeed("diffusion", precision)
    assert cluster.launched_with_deepspeed() == (why is None)
    assert (line is None) == (why is None)
    if why:
        assert line.startswith(f"launched with DeepSpeed {why}: diffusion runs data-parallel (DDP)")
    assert cluster.leave_deepspeed("sft", precision) is None  # the other stages' trainers run DeepSpeed themselves

    from pipeline.recipe import load_recipe

    recipe = load_recipe(image_recipe(tmp_path, diffusion={**TINY_DIFFUSION, "mixed_precision": precision}))
    launch = cluster.read_launch(REPO / "launch/accelerate/zero2.yaml", num_processes=8)
    launch.zero_stage = zero
    planned = check.check_stage(recipe, "diffusion", launch, None)
    text = "\n".join(planned.lines)
    assert (f"launched with DeepSpeed {why}" in text) == bool(why)
    planned_launch = next(line for line in planned.lines if line.startswith("launch: "))
    assert planned_launch.startswith("launch: DDP" if why else f"launch: DeepSpeed ZeRO-{zero}"), planned_launch


def hf_style_launch(tmp_path, name: str, **overrides) -> str:
    """An accelerate yaml naming a DeepSpeed JSON in Hugging Face's style: `auto` everywhere, its own optimizer
    (torch's AdamW: nothing to build) and scheduler sections, ZeRO-2; `overrides` set top-level keys."""
    ds = {"bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
          "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                    "weight_decay": "auto", "torch_adam": True}},
          "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                            "warmup_num_steps": "auto", "total_num_steps": "auto"}},
          "zero_optimization": {"stage": 2, "contiguous_gradients": True, "reduce_bucket_size": "auto"},
          "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
          "train_micro_batch_size_per_gpu": "auto", **overrides}
    ds_json = tmp_path / f"{name}.json"
    ds_json.write_text(json.dumps(ds))
    launch = tmp_path / f"{name}.yaml"
    launch.write_text((REPO / "launch/accelerate/zero3_offload.yaml").read_text().replace(
        "launch/accelerate/zero3_offload.json", str(ds_json)))
    return str(launch)


def test_diffusion_under_a_hugging_face_style_deepspeed_json_trains_as_under_zero2_yaml(tmp_path):
    """A DeepSpeed JSON as Hugging Face's trainers take it (`auto` batch, accumulation, clipping, precision and
    buckets; its own optimizer and scheduler sections) takes the recipe's values, as our PPO's does
    (pipeline/deepspeed_config.py): the UNet comes out as under zero2.yaml (learning rate, warmup, weight decay,
    accumulation and clipping all the recipe's). Until 2026-12-07 Accelerate stopped the stage with a traceback (no
    model.config to size the buckets from; an optimizer in both the config and the code), and under zero2.yaml (as
    under DDP) the learning-rate schedule ran once per process per step."""
    section = {**TINY_DIFFUSION, "max_steps": 4, "judge_epochs": 0, "logging_steps": 2, "warmup_steps": 2,
               "gradient_accumulation_steps": 2, "max_grad_norm": 0.01, "weight_decay": 0.1}
    recipe = image_recipe(tmp_path, diffusion=section)
    runs = tmp_path / "runs"
    for config, name in (("zero2", "yaml"), (hf_style_launch(tmp_path, "hf"), "json")):
        proc = launch_cli(config, ["pipeline/diffusion.py", recipe, f"run.name={name}"], cwd=tmp_path,
                          num_processes=2, env=ONE_THREAD)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "DeepSpeed ZeRO-2: unet, text_encoder trained by one DeepSpeedEngine" in proc.stdout + proc.stderr
    assert max_diff(unet_weights(runs / "json/diffusion"), unet_weights(runs / "yaml/diffusion")) < 1e-5
    history = [json.loads((runs / f"{name}/diffusion/metrics.json").read_text())["history"]
               for name in ("yaml", "json")]
    assert [h["loss"] for h in history[0]] == pytest.approx([h["loss"] for h in history[1]], abs=1e-6)
    # the recipe's schedule over optimizer steps in both (Accelerate's default stepped it once per process, DeepSpeed's
    # optimizer once): the warmup's 2 steps done, then cosine from learning_rate to 0
    assert [h["lr"] for h in history[0]] == [h["lr"] for h in history[1]] == [pytest.approx(1e-3), 0.0]


@pytest.mark.parametrize("overrides, said", [
    ({"gradient_clipping": 5.0}, "sets gradient_clipping 5.0 (the recipe's diffusion keys give 0.01): set it to auto, "
                                 "or change the recipe's diffusion.batch_size / gradient_accumulation_steps / "
                                 "max_grad_norm / learning_rate / weight_decay"),
    ({"bf16": {"enabled": True}}, "sets bf16.enabled true, which would train and save the image stages' weights in "
                                  "bf16: set it to auto (they autocast over fp32 weights to the recipe's "
                                  "mixed_precision)")])
def test_a_deepspeed_json_contradicting_the_recipe_stops_the_image_stage_in_one_line(overrides, said, tmp_path):
    """A value the JSON sets otherwise than the recipe (the clipping; bf16, which would make the weights, the EMA and
    the saved model bf16: the stage autocasts itself) stops the stage with one line naming the file, exit 2, before
    any model loads (the fault at `loading` never fires), and nothing is written; `--check` under that launch says
    the same line (before 2026-12-07 the clipping was overwritten silently and bf16 trained in bf16; until
    2026-12-07 the line came after the models were built, and --check passed). One process, in the environment
    `accelerate launch` gives it."""
    recipe = image_recipe(tmp_path, diffusion={**TINY_DIFFUSION, "max_steps": 2, "judge_epochs": 0,
                                               "max_grad_norm": 0.01})
    launch = hf_style_launch(tmp_path, "bad", **overrides)
    ds_json = tmp_path / "bad.json"
    env = one_process_launch(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_CONFIG_FILE=str(ds_json),
                             PIPELINE_FAULT="kill:loading:1")
    proc = run_cli(["pipeline/diffusion.py", recipe], cwd=tmp_path, env=env, fork=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: {ds_json}: {said}"
    assert not (tmp_path / "runs").exists()
    check = run_cli(["pipeline/run.py", recipe, "--check", "--config", launch], cwd=tmp_path, env=ONE_THREAD)
    assert check.returncode == 2 and "Traceback" not in check.stderr, check.stderr[-2000:]
    assert f"{ds_json}: {said}" in check.stdout, check.stdout[-3000:]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("overrides, said", [
    ({"bf16": True}, "sets bf16.enabled true, which would train and save the image stages' weights in bf16"),
    ({"fp16": False, "scheduler": None}, None),
    ({"scheduler": "WarmupLR"}, "scheduler must be an object whose params are an object, got 'WarmupLR'"),
    ({"gradient_accumulation_steps": None}, "has no gradient_accumulation_steps (Accelerate reads 1): set it to auto, "
                                            "or change the recipe's diffusion.gradient_accumulation_steps to 1")],
    ids=["bf16-true", "scheduler-null", "scheduler-name", "no-accumulation"])
def test_a_deepspeed_json_in_short_forms_gets_one_line_or_none(overrides, said, tmp_path):
    """`"bf16": true` (DeepSpeed's short form of enabled true) and `"scheduler": null` (no scheduler) made the image
    stages' check and `--check` stop with an AttributeError's traceback; they read as enabled and as none now. A file
    without gradient_accumulation_steps (Accelerate reads 1) under a recipe accumulating 2 was said to set it to 1.
    (None in `overrides`: the key left out of the file, or null where the key is kept.)"""
    from types import SimpleNamespace

    from pipeline import diffusion_launch

    ds = {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": "auto", **overrides}
    ds = {k: v for k, v in ds.items() if v is not None or k == "scheduler"}
    ds_json = tmp_path / "short.json"
    ds_json.write_text(json.dumps(ds))
    cfg = SimpleNamespace(batch_size=2, gradient_accumulation_steps=2, max_grad_norm=1.0, learning_rate=1e-4,
                          weight_decay=0.0)
    problem = diffusion_launch.config_problem(str(ds_json), cfg, "diffusion", 1)
    assert problem is None if said is None else problem.startswith(f"{ds_json}: {said}")


def test_check_answers_a_deepspeed_json_with_bf16_true_in_one_line(tmp_path):
    """`--check` under a launch whose DeepSpeed JSON says `"bf16": true` printed an AttributeError's traceback; it
    says the line the stage would (config_problem)."""
    recipe = image_recipe(tmp_path, diffusion={**TINY_DIFFUSION, "max_steps": 2, "judge_epochs": 0})
    launch = hf_style_launch(tmp_path, "short", bf16=True)
    check = run_cli(["pipeline/run.py", recipe, "--check", "--config", launch], cwd=tmp_path, env=ONE_THREAD)
    assert check.returncode == 2 and "Traceback" not in check.stderr, check.stderr[-2000:]
    assert f"{tmp_path / 'short.json'}: sets bf16.enabled true" in check.stdout, check.stdout[-3000:]
