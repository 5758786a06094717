"""The image stages' launch (diffusion_train.py's loop runs in it): their Accelerator, the DeepSpeed config made to
agree with the recipe, and which launch can read a checkpoint's optimizer state.

Under DeepSpeed ZeRO-1/2 the trainable modules go to one engine that keeps whole fp32 weights (the EMA and the saved
model read them as without it) and mixed precision is torch's autocast over them, so the config's bf16 / fp16 must be
`auto`; its other `auto` values take the recipe's (pipeline/deepspeed_config.py). ZeRO-3 and fp16 run as DDP
(cluster.leave_deepspeed, called first). The stage asks check_launch before its run folder and check_resume before
any model loads; `--check` asks config_problem of the launch it plans (image_check.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline import cli, cluster, deepspeed_config, safe_resume

RECIPE_KEYS = "batch_size / gradient_accumulation_steps / max_grad_norm / learning_rate / weight_decay"


def deepspeed_values(cfg, processes: int) -> dict:
    """The DeepSpeed config values the image section `cfg` gives over `processes` (deepspeed_config's dotted keys):
    no dataloader passes through prepare, so the batch, the clipping and the AdamW come from us."""
    accumulation = cfg.gradient_accumulation_steps
    return {"train_micro_batch_size_per_gpu": cfg.batch_size, "gradient_accumulation_steps": accumulation,
            "train_batch_size": cfg.batch_size * accumulation * processes,
            "gradient_clipping": float(cfg.max_grad_norm or 0), "optimizer.params.lr": cfg.learning_rate,
            "optimizer.params.weight_decay": cfg.weight_decay, **deepspeed_config.ADAMW}


def config_problem(ds_file: str, cfg, stage: str, processes: int) -> str | None:
    """Why the DeepSpeed config file `ds_file` cannot run the image `stage` (section `cfg`) over `processes`: one line
    naming it, or None. bf16 / fp16 on would train and save the weights in it (the stage autocasts instead); any
    other value set otherwise than the recipe's: deepspeed_config.contradictions."""
    config = json.loads(cluster.resolve_path(ds_file).read_text())  # valid JSON: cluster.deepspeed_zero read it
    for half in ("bf16", "fp16"):
        section = config.get(half)  # an object, or `"bf16": true` for short
        if str(section.get("enabled") if isinstance(section, dict) else section).lower() == "true":
            return (f"{ds_file}: sets {half}.enabled true, which would train and save the image stages' weights in "
                    f"{half}: set it to auto (they autocast over fp32 weights to the recipe's mixed_precision)")
    if "gradient_accumulation_steps" not in config and cfg.gradient_accumulation_steps != 1:
        return (f"{ds_file}: has no gradient_accumulation_steps (Accelerate reads 1): set it to auto, or change the "
                f"recipe's {stage}.gradient_accumulation_steps to 1")
    return deepspeed_config.contradictions(config, deepspeed_values(cfg, processes), stage, RECIPE_KEYS, ds_file)


def check_launch(stage: str, cfg) -> None:
    """Stop in one line, before the stage's run folder and models, where this launch's DeepSpeed config file
    contradicts the recipe (config_problem). After cluster.leave_deepspeed: a launch run as DDP reads no config."""
    ds_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if cluster.launched_with_deepspeed() and ds_file and ds_file != "none":
        if problem := config_problem(ds_file, cfg, stage, int(os.environ.get("WORLD_SIZE", "1"))):
            raise cli.PipelineError(problem)


def optimizer_format() -> dict:
    """How this launch saves the optimizer state: torch's whole, or DeepSpeed's shards (one per process), which only
    the same ZeRO stage over as many processes reads. After cluster.leave_deepspeed, as the engine is made."""
    if not cluster.launched_with_deepspeed():
        return {"optimizer_format": "torch"}
    return {"optimizer_format": "deepspeed", "zero_stage": cluster.launched_zero()[0],
            "processes": int(os.environ.get("WORLD_SIZE", "1"))}


def check_optimizer_format(ckpt: Path, state: dict, here: dict) -> None:
    """Stop in one line where a launch saving as `here` (optimizer_format) cannot read the optimizer state of `ckpt`
    (its loop_state.json: `state`); runs.StageRun keeps the checkpoint."""
    saved = {"optimizer_format": state.get("optimizer_format", "torch"),  # no key: written before it was, as torch
             **{k: state[k] for k in ("zero_stage", "processes") if k in state}}
    said = [f"DeepSpeed ZeRO-{f['zero_stage']} over {f['processes']} process(es)" if "zero_stage" in f
            else "a launch without DeepSpeed (DDP or one process)" for f in (saved, here)]
    if saved != here:
        raise cli.PipelineError(f"{ckpt}: its optimizer state was saved under {said[0]}, which this launch "
                                f"({said[1]}) cannot read: relaunch as that one was, or remove {ckpt.parent} to "
                                f"start over")


def check_resume(out: Path) -> None:
    """check_optimizer_format of the newest complete checkpoint in `out`, before any model loads and before
    safe_resume checks its files: a process that never imported deepspeed (ZeRO-3, run as DDP) cannot tell
    DeepSpeed's torch files safe, and would name one unsafe instead of the launch."""
    if found := safe_resume.newest_loop_state(out):
        check_optimizer_format(*found, optimizer_format())


def make_accelerator(precision: str, accumulation: int):
    """The image stages' Accelerator, in `precision`. Under DeepSpeed its engine stays fp32 (DeepSpeed's bf16 would
    make the weights, hence the EMA and the saved model, bf16): autocast, below, instead."""
    from accelerate import Accelerator

    # the schedule steps once per optimizer step, as a DeepSpeed config's optimizer steps it (Accelerate's default
    # steps it once per process: warmup_steps and max_steps count optimizer steps)
    once = {"step_scheduler_with_optimizer": False}
    if not cluster.launched_with_deepspeed():
        return Accelerator(mixed_precision=precision, cpu=not cluster.accelerator_here(), **once)
    # DeepSpeed places the models (on the CPU without a GPU). The accumulation is the one deepspeed_values gives the
    # config: with Accelerate's default of 1, prepare warns of a mismatch and takes DeepSpeed's value
    accelerator = Accelerator(mixed_precision="no", gradient_accumulation_steps=accumulation, **once)
    # Accelerate sizes an `auto` reduce bucket from model.config.hidden_size, which the ModuleDict of our modules
    # lacks: DeepSpeed's own default (the key left out) serves the UNet as well
    zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    if zero.get("reduce_bucket_size") == "auto":
        del zero["reduce_bucket_size"]
    return accelerator


def autocast(accelerator, engine, precision: str):
    """Accelerate's autocast, or under DeepSpeed (`engine`, fp32 as make_accelerator builds it) torch's in bf16."""
    import torch

    if engine is None:
        return accelerator.autocast()
    return torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
