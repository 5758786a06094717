"""Our PPO's trained models as one module, so that any Accelerate launch can train them, DeepSpeed ZeRO included.

    load_whole(accelerator)                            # before loading any model
    model = PolicyAndCritic(policy, critic)           # critic None without GAE
    optimizer, scheduler = optimizer_and_scheduler(accelerator, model, cfg, total_updates)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    logits, values = model(sequences, attention_mask, context_length, temperature)
    with gathered(accelerator, model): ...             # ZeRO-3: whole weights for generation and scoring
    policy_weights = policy_state_dict(accelerator, model)

Accelerate hands DeepSpeed one model per Accelerator, so the policy and its critic are one module with one AdamW (a
parameter group each, each with its own learning rate) and one scheduler: one engine shards both (TRL's PPOTrainer
wrapped its policy and value model the same way). Under ZeRO-3 the rollout and the scoring gather the trained weights
on every process, as TRL's `unwrap_model_for_generation` does, and the saved policy is gathered from the shards. The
frozen models (reference, reward model, DPO policy of `implicit_reward`) are loaded whole on every process.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch

from pipeline import cli, cluster, deepspeed_config
from pipeline.ppo_rollout import positions, reply_logits


class PolicyAndCritic(torch.nn.Module):
    """The policy and its critic (None without one); one forward pass gives the reply logits and values."""

    def __init__(self, policy, critic=None):
        super().__init__()
        self.policy, self.critic = policy, critic

    @property
    def config(self):  # the policy's: Accelerate sizes a DeepSpeed config's `auto` buckets from its hidden size
        return self.policy.config

    def forward(self, input_ids, attention_mask, context_length: int, temperature: float):
        """(logits of the distributions each reply token was drawn from, the critic's value of each reply token)."""
        logits = reply_logits(self.policy, input_ids, attention_mask, context_length, temperature)
        if self.critic is None:
            return logits, None
        values = self.critic(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask))
        return logits, values[:, context_length - 1:-1]


def on_cpu(cfg) -> bool:
    """The Accelerator's `cpu`: `ppo.use_cpu`, or no accelerator here (cluster.accelerator_here); never under a
    DeepSpeed launch, whose own accelerator places the models (its CPU one on a machine without a GPU). Checked before
    the stage writes anything."""
    if cluster.launched_with_deepspeed():
        if cfg.use_cpu:
            raise cli.PipelineError("ppo.use_cpu is true under a DeepSpeed launch, which places the models itself (on "
                                    "the CPU where there is no GPU): set it to false, or launch without DeepSpeed")
        return False
    return cfg.use_cpu or not cluster.accelerator_here()


def is_zero3(accelerator) -> bool:
    config = deepspeed_config.launched(accelerator)
    return config is not None and config.get("zero_optimization", {}).get("stage") == 3


def load_whole(accelerator) -> None:
    """Called before the stage loads its models. Under a ZeRO-3 launch transformers builds every model already
    sharded (deepspeed.zero.Init), and the frozen ones would then have no engine to gather their weights: every model
    is built whole, and DeepSpeed shards the trained ones when it builds their engine. (It also keeps `generate` from
    syncing the processes token by token: within `gathered` each process generates alone.)"""
    if is_zero3(accelerator):
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()


def configure_deepspeed(accelerator, cfg) -> None:
    """Fill the DeepSpeed config's `auto` values (or absent ones) with the recipe's: the micro-batch, the gradient
    clipping (one norm over policy and critic: they are one engine) and the AdamW betas and eps of a config that
    builds its own optimizer. A value the config sets otherwise stops the stage with one line naming both."""
    micro = cfg.batch_size // cfg.num_minibatches // cfg.gradient_accumulation_steps
    deepspeed_config.fill(accelerator, {"train_micro_batch_size_per_gpu": micro,
                                        "gradient_clipping": float(cfg.max_grad_norm), **deepspeed_config.ADAMW,
                                        "optimizer.params.weight_decay": cfg.weight_decay},
                          "ppo", "batch_size / num_minibatches / gradient_accumulation_steps / max_grad_norm / "
                                 "weight_decay")


def optimizer_and_scheduler(accelerator, model: PolicyAndCritic, cfg, total_updates: int):
    """One AdamW over the policy's and the critic's trainable parameters, a group each with its learning rate, and
    the recipe's schedule over `total_updates` optimizer steps (or the DeepSpeed config's optimizer over the same
    groups: deepspeed_config.optimizer_and_scheduler)."""
    from transformers import get_scheduler

    groups = [{"params": [p for p in model.policy.parameters() if p.requires_grad], "lr": cfg.learning_rate}]
    if model.critic is not None:
        groups.append({"params": [p for p in model.critic.parameters() if p.requires_grad],
                       "lr": cfg.critic_learning_rate or cfg.learning_rate})
    schedule = partial(get_scheduler, cfg.lr_scheduler_type, num_warmup_steps=cfg.warmup_steps,
                       num_training_steps=total_updates)
    return deepspeed_config.optimizer_and_scheduler(accelerator, groups, cfg.learning_rate, cfg.weight_decay, schedule)


@contextlib.contextmanager
def gathered(accelerator, model):
    """Under ZeRO-3: every trained weight whole on every process (and the engine's hooks off) for generation and
    the no-grad scoring passes, which would otherwise gather each layer again at every generated token. Elsewhere
    nothing to do."""
    if not is_zero3(accelerator):
        yield
        return
    import deepspeed
    from trl.models.utils import add_hooks, remove_hooks

    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        remove_hooks(model)
        try:
            yield
        finally:
            add_hooks(model)


def policy_state_dict(accelerator, model) -> dict:
    """The policy's whole weights (gathered from ZeRO-3's shards on the main process), keys as the policy names them.
    Every process must call it."""
    state = accelerator.get_state_dict(model)
    return {k.removeprefix("policy."): v for k, v in (state or {}).items() if k.startswith("policy.")}
