"""The `ppo` section's training keys: our PPO's settings, and the GRPO/RLOO keys mapped onto TRL's configs.

Kept apart from the stage script so the recipe loader can validate a `ppo` section without importing the stage
(pipeline/stages.py names this class). The pipeline keys of the section (init_from, reward_model, prompts, ...) are
PPOKeys in pipeline/stages.py.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from pipeline.cli import PipelineError
from pipeline.key_checks import source_of, where_set
from pipeline.stages import STAGES


TOOL_TURN_TOKENS = 64  # room for one tool turn in the default max_total_tokens
# our PPO's advantages without a critic that take a baseline from the other replies to the same prompt (rl.py)
GROUP_ESTIMATORS = ("rloo", "reinforce_baseline", "group_norm")
CRITIC_KEYS = ("critic_init", "critic_learning_rate", "cliprange_value", "lam")  # refused away from their defaults


@dataclass
class PPOConfig:
    """The `ppo` section's training keys (the pipeline keys are PPOKeys in pipeline/stages.py)."""

    algorithm: Literal["ppo", "grpo", "rloo"] = "ppo"   # ppo: ours below; grpo / rloo: TRL's trainers
    advantage_estimator: Literal["gae", "reinforce", "reinforce_baseline", "rloo", "group_norm"] = "gae"  # ppo:
                                         # gae with a critic; the others without one (pipeline/rl.py)
    max_steps: int = 100                 # rollout batches (grpo/rloo: optimizer steps)
    batch_size: int = 32                 # replies per step per process, num_generations to a prompt
    num_minibatches: int = 2             # minibatches per PPO epoch (one optimizer step each)
    ppo_epochs: int = 4                  # passes over each rollout batch
    gradient_accumulation_steps: int = 1  # micro-batches per minibatch
    learning_rate: float = 1e-5          # policy
    critic_learning_rate: float | None = None  # critic; empty: learning_rate
    lr_scheduler_type: str = "constant"  # transformers scheduler name: constant, linear, cosine, ...
    warmup_steps: int = 0                # optimizer steps of linear warmup
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0           # gradient clipping, policy and critic separately (DeepSpeed: as one)
    gamma: float = 1.0                   # discount
    lam: float = 0.95                    # GAE lambda
    cliprange: float = 0.2               # policy ratio clip (grpo/rloo: epsilon)
    cliprange_value: float = 0.2         # value clip around the rollout's values
    whiten_advantages: bool | None = None  # normalise advantages per batch; empty: true, false with rloo, group_norm
    kl_coef: float = 0.05                # initial KL coefficient beta (grpo/rloo: beta)
    kl_estimator: Literal["k1", "k3"] = "k1"  # per-token KL estimate in the penalty
    use_kl_loss: bool = False            # ppo: kl_coef x KL in the policy loss, not in the reward (GRPO's; k3 advised)
    adaptive_kl: bool = False            # adapt beta towards target_kl (Ziegler et al.)
    target_kl: float = 6.0               # target KL per reply (nats) for adaptive_kl
    kl_horizon: int = 10000              # adaptive_kl horizon, in replies
    missing_eos_penalty: float | None = 1.0  # subtracted from the score of replies without end-of-turn
    reward_clip: float | None = None     # clamp the normalised reward-model score to [-reward_clip, reward_clip]
    ensemble_objective: Literal["mean", "worst_case", "uncertainty_weighted"] = "mean"  # with reward_ensemble: how
                                         # the members' normalised scores make one (reward_model.combine)
    uncertainty_penalty: float = 1.0     # uncertainty_weighted: mean - this x the members' variance
    implicit_reward_beta: float = 0.1    # with ppo.implicit_reward: the beta of its per-token reward (DPO's beta)
    verifier_weight: float = 0.0         # add this times the world's verifier (1 correct, 0 not) to the score
    image_verifier_weight: float = 0.0   # tools: add this times tool_world.verify's verdict on tool tasks to the score
    max_tool_calls: int = 2              # tools: calls run per reply; a call past them gets an error and ends the reply
    max_total_tokens: int | None = None  # tools: a whole reply's tokens (turns and tool results); empty: see below
    max_new_tokens: int = 32             # reply budget
    max_prompt_length: int = 128         # longer prompts (in tokens) are skipped
    temperature: float = 1.0             # sampling temperature (log-probabilities use the same)
    top_p: float = 1.0                   # nucleus sampling
    num_generations: int | None = None   # replies per prompt (the group); empty: grpo/rloo 4, ppo 1
    critic_init: Literal["reward", "policy"] = "reward"  # value head on a copy of the reward model or the policy
    reward_rounds: int = 1               # ppo: >1 splits the steps into rounds; before each round after the first the
                                         # reward model is fine-tuned on fresh policy samples the annotator labelled
    reward_round_prompts: int = 2000     # prompts answered twice per round (pipeline/reward_rounds.py)
    reward_round_epochs: int = 1         # passes over the pairs of every round so far
    reward_round_learning_rate: float = 1e-4
    reward_round_batch_size: int = 32    # pairs per step of the reward model's fine-tuning
    reward_round_lm_loss_coefficient: float = 0.0  # GRM's next-token loss on chosen replies in that fine-tuning, read
                                         # by the starting policy's LM head (the reward stage's lm_loss_coefficient)
    reward_round_replay: int = 0         # pairs of the prompt data's own chosen/rejected mixed into each round
    logging_steps: int = 1               # print a line every this many steps (every step goes into metrics.json)
    save_steps: int = 20                 # checkpoint every this many steps; 0: only at the end of training
    save_total_limit: int = 1            # checkpoints kept
    seed: int = 0                        # default: run.seed
    use_cpu: bool = False                # train on CPU even if a GPU is present (automatic without one)
    report_to: str | list[str] = "none"  # trackers for the per-step statistics: tensorboard, wandb, mlflow, trackio
    trl_args: dict = field(default_factory=dict)  # grpo/rloo: more GRPOConfig/RLOOConfig fields, verbatim

    def __post_init__(self):  # ValueError: the recipe loader reports it as one line naming the section
        self.check_estimator()
        minibatch = self.batch_size // self.num_minibatches  # our PPO's split; TRL checks grpo/rloo's batch itself
        if self.algorithm == "ppo" and (self.batch_size % self.num_minibatches
                                        or minibatch % self.gradient_accumulation_steps):
            raise ValueError(f"batch_size ({self.batch_size}) must split into num_minibatches "
                             f"({self.num_minibatches}) x gradient_accumulation_steps "
                             f"({self.gradient_accumulation_steps}) equal parts")
        for name in ("max_steps", "batch_size", "ppo_epochs", "max_new_tokens", "temperature", "target_kl",
                     "kl_horizon"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.implicit_reward_beta <= 0:
            raise ValueError(f"implicit_reward_beta must be positive, got {self.implicit_reward_beta}")
        if self.uncertainty_penalty < 0:
            raise ValueError(f"uncertainty_penalty must be >= 0, got {self.uncertainty_penalty}")
        if self.reward_clip is not None and self.reward_clip <= 0:
            raise ValueError(f"reward_clip must be positive (or empty: no clipping), got {self.reward_clip}")
        if not 1 <= self.reward_rounds <= self.max_steps:
            raise ValueError(f"reward_rounds must be between 1 and max_steps ({self.max_steps}), got "
                             f"{self.reward_rounds}")
        if self.reward_rounds > 1 and self.algorithm != "ppo":
            raise ValueError(f"reward_rounds > 1 runs in algorithm: ppo, not {self.algorithm}")
        for name in ("reward_round_prompts", "reward_round_epochs", "reward_round_learning_rate",
                     "reward_round_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("reward_round_lm_loss_coefficient", "reward_round_replay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.trl_args and self.algorithm == "ppo":
            raise ValueError("trl_args apply to algorithm grpo or rloo, not ppo")
        if self.max_tool_calls < 0 or (self.max_total_tokens is not None and self.max_total_tokens <= 0):
            raise ValueError(f"max_tool_calls must be >= 0 and max_total_tokens positive, got {self.max_tool_calls} "
                             f"and {self.max_total_tokens}")

    def check_estimator(self) -> None:
        """Fill the estimator's defaults (num_generations, whiten_advantages) and refuse what it cannot run."""
        ours, group = self.algorithm == "ppo", self.advantage_estimator in GROUP_ESTIMATORS
        if self.num_generations is None:
            self.num_generations = 1 if ours else 4
        if self.whiten_advantages is None:
            self.whiten_advantages = self.advantage_estimator not in ("rloo", "group_norm")  # as OpenRLHF
        if not ours and self.use_kl_loss:
            raise ValueError(f"use_kl_loss applies to algorithm ppo (ours); {self.algorithm} puts beta x KL in its "
                             f"loss already")
        if not ours and self.advantage_estimator != "gae":
            raise ValueError(f"advantage_estimator applies to algorithm ppo (ours); {self.algorithm} computes TRL's "
                             f"own advantages")
        if group and self.num_generations < 2:
            raise ValueError(f"advantage_estimator {self.advantage_estimator} compares the replies to one prompt: "
                             f"set num_generations to 2 or more")
        if ours and self.batch_size % self.num_generations:
            raise ValueError(f"batch_size ({self.batch_size}) must be whole groups of num_generations "
                             f"({self.num_generations}) replies")
        if group and self.gamma != 1.0:
            raise ValueError(f"advantage_estimator {self.advantage_estimator} subtracts its baseline from whole "
                             f"replies' scores: gamma must be 1.0, got {self.gamma}")
        for key in CRITIC_KEYS:
            if not self.trains_critic and getattr(self, key) != self.__dataclass_fields__[key].default:
                without = (f"advantage_estimator {self.advantage_estimator}" if ours else
                           f"algorithm {self.algorithm} (TRL's)")
                raise ValueError(f"{key} concerns the critic, which {without} does not have; remove it")

    @property
    def trains_critic(self) -> bool:
        """Our PPO with GAE trains a critic; our other estimators and TRL's grpo / rloo take their baseline from the
        rewards. The trainer, the memory estimate and the checks above all ask this."""
        return self.algorithm == "ppo" and self.advantage_estimator == "gae"

    def total_tokens(self) -> int:
        """A reply's budget with tools: `max_total_tokens`, else max_new_tokens per assistant turn (max_tool_calls
        + 1 of them) and TOOL_TURN_TOKENS per tool turn (the world's tool turns, template headers included, take
        35-55 tokens with the tiny recipes' 400-token vocabulary)."""
        if self.max_total_tokens is not None:
            return self.max_total_tokens
        return self.max_new_tokens * (self.max_tool_calls + 1) + TOOL_TURN_TOKENS * self.max_tool_calls

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_key_conflicts(recipe, cfg: PPOConfig, keys) -> None:
    """The section's keys that cannot run together, told from the recipe alone (no data, no model): the stage checks
    them at its start, and the runner and --check before any stage starts (check.check_stage_config), so a plan
    stops before the stages upstream of ppo train. One line each, naming the override that set a key, else the
    recipe file."""
    if cfg.algorithm != "ppo" and keys.length_split > 1:
        raise PipelineError(f"{source_of(recipe, 'ppo', 'algorithm', 'length_split')}: ppo.length_split splits the "
                            f"forward passes of our PPO (algorithm: ppo), not of {cfg.algorithm}")
    if cfg.algorithm != "ppo" and keys.implicit_reward:
        raise PipelineError(f"{source_of(recipe, 'ppo', 'algorithm', 'implicit_reward')}: ppo.implicit_reward is a "
                            f"per-token reward of our PPO (algorithm: ppo), not of {cfg.algorithm}")
    if cfg.reward_rounds > 1 and keys.reward_ensemble:
        raise PipelineError(f"{source_of(recipe, 'ppo', 'reward_rounds', 'reward_ensemble')}: ppo.reward_rounds "
                            f"fine-tunes one reward model; it does not run with ppo.reward_ensemble")
    if keys.reward_model in STAGES and keys.reward_model not in recipe.stages:
        raise PipelineError(f"{source_of(recipe, 'ppo', 'reward_model')}: ppo.reward_model is the "
                            f"`{keys.reward_model}` stage, but the recipe has no `{keys.reward_model}` section: add "
                            f"one, or name a saved reward model folder")
    if cfg.image_verifier_weight and not recipe.tools.tools:
        raise PipelineError(f"{where_set(recipe, [('ppo', 'image_verifier_weight'), ('tools', 'tools')])}: "
                            f"ppo.image_verifier_weight rewards tool tasks: it needs a `tools` section")


def prompts_that_fit(lengths: list[int], replies: list[int], cfg: PPOConfig, context: int | None) -> tuple[list, str]:
    """The prompts our PPO and TRL's trainers train on (their indices): at most max_prompt_length tokens, and short
    enough that a reply of its budget (`replies`, per prompt) ends within the policy's `context` positions (past
    them a reply runs where the model never trained, and a model with a table of positions fails). Also the rule, as
    the lines that count prompts say it."""
    keep = [i for i, (n, reply) in enumerate(zip(lengths, replies))
            if n <= cfg.max_prompt_length and (context is None or n + reply <= context)]
    rule = f"max_prompt_length={cfg.max_prompt_length} tokens"
    if context is not None and replies and cfg.max_prompt_length + max(replies) > context:
        rule += f" and room for a reply of up to {max(replies)} tokens in the policy's {context} positions"
    return keep, rule
