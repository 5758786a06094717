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


def fill(accelerator, ours: dict, section: str, keys: str) -> None:
    """Fill the config's `auto` (or absent) values of `ours` (dotted keys, e.g. "optimizer.params.eps"; one in a
    section the config lacks is left out) with ours, and give a `scheduler` section's place to the recipe's schedule.
    A value the config sets otherwise stops the stage with one line naming it; `keys`: the recipe's `section` keys
    that give ours."""
    config = launched(accelerator)
    if config is None:
        return
    mismatches, hf_config = [], accelerator.state.deepspeed_plugin.hf_ds_config  # Accelerate's view of `config`
    for key, value in ours.items():
        node, last = hf_config.find_config_node(key)
        if node is None:  # no such section (a config without an optimizer): nothing to fill
            continue
        if node.get(last, "auto") == "auto":
            node[last] = value
        elif node[last] != value:
            mismatches.append(f"{key} {node[last]} (the recipe's {section} keys give {value})")
    if mismatches:
        raise cli.PipelineError(f"{source()}: sets {'; '.join(mismatches)}: set it to auto, or change the recipe's "
                                f"{section}.{keys}")
    scheduled = [f"{key} {value}" for key, value in config.get("scheduler", {}).get("params", {}).items()
                 if value != "auto"]
    if scheduled:
        raise cli.PipelineError(f"{source()}: sets scheduler.params {', '.join(scheduled)}: set them to auto (the "
                                f"recipe's {section}.lr_scheduler_type, warmup_steps and steps schedule the rate)")
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
