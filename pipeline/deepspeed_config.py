"""A launch's DeepSpeed config made to agree with the recipe, for the stages that hand DeepSpeed their own models (our
PPO: ppo_models.py; the image stages: diffusion_train.py), so that a config in Hugging Face's style works for them as
for the trainers that fill it themselves.

    fill(accelerator, {"gradient_clipping": 1.0, **ADAMW}, "ppo", "max_grad_norm")   # before accelerator.prepare
    optimizer, scheduler = optimizer_and_scheduler(accelerator, groups, lr, weight_decay, schedule)

A key set to `auto` (or absent) takes the recipe's value; a value set otherwise stops the stage with one line naming the
file. A config with an `optimizer` section builds that optimizer (Accelerate's DummyOptim); the learning-rate schedule
is always the recipe's, so a `scheduler` section must leave its params `auto` and the recipe's runs in its place.
"""

from __future__ import annotations

import os

from pipeline import cli

ADAMW = {"optimizer.params.betas": [0.9, 0.999], "optimizer.params.eps": 1e-8}  # torch's AdamW, which ours are


def launched(accelerator) -> dict | None:
    """The launch's DeepSpeed config (the dict the engine will read), None without DeepSpeed."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return accelerator.state.deepspeed_plugin.deepspeed_config


def source() -> str:
    """What to name in an error about the config: its file, or the accelerate yaml's keys."""
    return os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE") or "the launch's deepspeed_config"


def _node(config: dict, key: str) -> tuple[dict | None, str]:
    """The section holding a dotted key (e.g. "optimizer.params.eps") and its last part; None where a section is
    absent."""
    *sections, last = key.split(".")
    for name in sections:
        config = config.get(name)
        if not isinstance(config, dict):
            return None, last
    return config, last


def contradictions(config: dict, ours: dict, section: str, keys: str, where: str) -> str | None:
    """Why the DeepSpeed `config` (from `where`) cannot take the recipe's values `ours` (dotted keys; one in a section
    the config lacks is left out): one line naming it, or None. A key set to `auto` (or absent) would take ours; a
    `scheduler` section must leave its params `auto` (the recipe's schedule runs in its place). `keys`: the recipe's
    `section` keys that give ours. fill asks it of the launched config; the image stages also of the file, before any
    model loads, and `--check` of the launch's (diffusion_launch.config_problem)."""
    mismatches = []
    for key, value in ours.items():
        node, last = _node(config, key)
        if node is not None and node.get(last, "auto") not in ("auto", value):
            mismatches.append(f"{key} {node[last]} (the recipe's {section} keys give {value})")
    if mismatches:
        return f"{where}: sets {'; '.join(mismatches)}: set it to auto, or change the recipe's {section}.{keys}"
    scheduler = config.get("scheduler") or {}  # null: no scheduler
    params = scheduler.get("params") if isinstance(scheduler, dict) else None
    if not isinstance(scheduler, dict) or not isinstance(params or {}, dict):
        return f"{where}: scheduler must be an object whose params are an object, got {scheduler!r}"
    scheduled = [f"{key} {value}" for key, value in (params or {}).items() if value != "auto"]
    if scheduled:
        return (f"{where}: sets scheduler.params {', '.join(scheduled)}: set them to auto (the recipe's "
                f"{section}.lr_scheduler_type, warmup_steps and steps schedule the rate)")
    return None


def fill(accelerator, ours: dict, section: str, keys: str) -> None:
    """Fill the config's `auto` (or absent) values of `ours` (dotted keys, e.g. "optimizer.params.eps"; one in a
    section the config lacks is left out) with ours, and give a `scheduler` section's place to the recipe's schedule.
    A value the config sets otherwise stops the stage with one line naming it (contradictions); `keys`: the recipe's
    `section` keys that give ours."""
    config = launched(accelerator)
    if config is None:
        return
    if problem := contradictions(config, ours, section, keys, source()):
        raise cli.PipelineError(problem)
    for key, value in ours.items():
        node, last = _node(config, key)
        if node is not None and node.get(last, "auto") == "auto":
            node[last] = value
    # all `auto`: the recipe's schedule runs in its place (Accelerate takes no scheduler beside a config's one)
    config.pop("scheduler", None)


def optimizer_and_scheduler(accelerator, groups: list, lr: float, weight_decay: float, schedule):
    """AdamW over the parameter `groups` and `schedule(optimizer)` (the recipe's learning-rate schedule). A DeepSpeed
    config with an `optimizer` section (launch/accelerate/zero3_offload.json) builds that optimizer over the same
    groups instead, and the schedule over it."""
    import torch

    config = launched(accelerator)
    if config is not None and "optimizer" in config:
        from accelerate.utils import DummyOptim, DummyScheduler

        optimizer = DummyOptim(groups, lr=lr, weight_decay=weight_decay)
        return optimizer, DummyScheduler(optimizer, lr_scheduler_callable=schedule)
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    return optimizer, schedule(optimizer)
