"""GRPO and RLOO through TRL's GRPOTrainer / RLOOTrainer, for the ppo stage's `algorithm: grpo | rloo`.

The same prompts and the same reward as our PPO (pipeline/ppo_trainer.py): the reward model scored through
pipeline/reward_model.py and normalised with its stage's statistics, the missing-eos penalty, and optionally the
world's verifier as a second reward function with `verifier_weight`. Returns the per-step history in ppo's names.
"""

from __future__ import annotations

import torch

from pipeline import cli, models
from pipeline.reward_model import RewardModel


# TRL's logged names -> ours ("reward" is TRL's weighted sum of the reward functions: our `score`; TRL's "kl" is a
# mean per token, ours a mean per reply)
TRL_NAMES = {"reward": "score", "reward_raw": "reward_raw", "reward_normalised": "reward", "ended": "ended",
             "rewards/verifier/mean": "verifier", "kl": "kl_per_token", "entropy": "entropy",
             "completions/mean_length": "reply_length", "clip_ratio/region_mean": "clipfrac", "loss": "policy_loss",
             "learning_rate": "lr"}


def reply_texts(completions) -> list[str]:
    return [c[-1]["content"] if isinstance(c, list) else c for c in completions]


def reward_function(reward_model: RewardModel, eos_token_id: int, missing_eos_penalty: float | None):
    """The reward model as a TRL reward function: the same score as our PPO gives a reply (RewardModel.policy_scores),
    and its raw and normalised means logged."""

    def reward_model_score(prompts, completions, completion_ids, log_metric, **_):
        ended = torch.tensor([len(ids) > 0 and ids[-1] == eos_token_id for ids in completion_ids])
        raw, normalised, scores = reward_model.policy_scores(prompts, reply_texts(completions), ended,
                                                             missing_eos_penalty)
        log_metric("reward_raw", raw.mean().item())
        log_metric("reward_normalised", normalised.mean().item())
        log_metric("ended", ended.float().mean().item())
        return scores.tolist()

    return reward_model_score


def train_trl(recipe, run, cfg, keys, peft_values, prompts, init, reward_checkpoint) -> list[dict]:
    """TRL's GRPOTrainer or RLOOTrainer on the same prompts, with the same reward (the normalised reward model,
    the missing-eos penalty, optionally the verifier). Returns the per-step history in ppo's names.

    Mapped keys: max_steps, batch_size (per_device_train_batch_size: replies per process, a multiple of
    num_generations across processes), num_generations, gradient_accumulation_steps, learning_rate,
    lr_scheduler_type, warmup_steps, weight_decay, max_grad_norm, kl_coef (beta), cliprange (epsilon),
    max_new_tokens (max_completion_length), temperature, top_p, logging_steps, save_steps, save_total_limit, seed.
    Anything else of GRPOConfig / RLOOConfig goes in `trl_args` (e.g. {num_iterations: 2, scale_rewards: batch}).
    """
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from pipeline import world

    config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if cfg.algorithm == "grpo" else (RLOOConfig, RLOOTrainer)
    mapped = dict(
        output_dir=str(run.out), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
        num_generations=cfg.num_generations, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler_type, warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, beta=cfg.kl_coef, epsilon=cfg.cliprange,
        max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
        logging_steps=cfg.logging_steps, save_strategy="steps" if cfg.save_steps else "no",
        save_steps=cfg.save_steps or 500, save_total_limit=cfg.save_total_limit, seed=cfg.seed,
        use_cpu=cfg.use_cpu or not torch.cuda.is_available(), use_vllm=False, report_to=cfg.report_to, bf16=False,
        gradient_checkpointing=False,
    )
    funcs, weights = ["reward_model"], [1.0]
    if cfg.verifier_weight:
        funcs, weights = funcs + ["verifier"], weights + [cfg.verifier_weight]
    try:
        args = config_cls(**{**mapped, "reward_weights": weights, **cfg.trl_args})
    except (ValueError, TypeError) as err:
        raise cli.PipelineError(f"{recipe.path}: section 'ppo' ({config_cls.__name__}): "
                                f"{str(err).splitlines()[0]}") from None

    tokenizer = models.load_tokenizer(recipe, init)
    model = models.load_causal_lm(recipe, init.path, peft_values=peft_values, revision=recipe.model.revision)
    models.configure_generation(model, tokenizer)
    reward_model = RewardModel.load(recipe, reward_checkpoint, "cpu")
    eos = tokenizer.eos_token_id

    def verifier(prompts, completions, skill, answer, **_):
        return [float(world.verify(s, r, a)) for s, r, a in zip(skill, reply_texts(completions), answer)]

    reward_funcs = {"reward_model": reward_function(reward_model, eos, cfg.missing_eos_penalty), "verifier": verifier}
    columns = ["prompt"] + (["skill", "answer"] if cfg.verifier_weight else [])
    trainer = trainer_cls(model=model, args=args, train_dataset=prompts.select_columns(columns),
                          reward_funcs=[reward_funcs[f] for f in funcs],
                          processing_class=tokenizer, peft_config=models.peft_config(peft_values))
    reward_model.model.to(trainer.accelerator.device)
    trainer.train(resume_from_checkpoint=run.last_checkpoint())
    models.save_trained(trainer, tokenizer, run.out, merge_adapter=keys.merge_adapter)

    history = []
    for entry in trainer.state.log_history:
        if "reward" in entry:  # a step that generated (with num_iterations > 1 the others reuse its replies)
            history.append({"step": entry["step"],
                            **{ours: entry[theirs] for theirs, ours in TRL_NAMES.items() if theirs in entry}})
    return history
