"""Our PPO's critic (advantage_estimator: gae): a value per reply token, from a copy of the reward model
(`critic_init: reward`, its score head giving the first values) or from the policy's weights with a new one-output
head (`critic_init: policy`). The critic-free estimators (REINFORCE++, RLOO, GRPO's group_norm) build none."""

from __future__ import annotations

import copy

import torch

from pipeline import cli
from pipeline.reward_model import load_reward_model


class Critic(torch.nn.Module):
    """A value per token: a sequence-classification model's backbone and its one-output head, applied at every
    position (the head of a reward model already maps a hidden state to a score)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.head = next((h for h in ("score", "classifier") if hasattr(model, h)), None)
        if self.head is None:
            raise cli.PipelineError(f"{type(model).__name__}: no `score` head to use as a value head")

    def forward(self, input_ids, attention_mask, position_ids):
        backbone = getattr(self.model, self.model.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state
        return getattr(self.model, self.head)(hidden).squeeze(-1).float()


def build_critic(recipe, cfg, init, reward_model, reward_path: str, tokenizer) -> Critic:
    """The critic `cfg.critic_init` names; `reward_model` is the loaded scorer (pipeline/reward_model.py), whose
    model is copied rather than loaded again."""
    if cfg.critic_init == "reward":
        if reward_model.tokenizer.get_vocab() != tokenizer.get_vocab():
            raise cli.PipelineError(f"{reward_path}: critic_init: reward needs the reward model to share the policy's "
                                    f"tokenizer; use critic_init: policy")
        critic = Critic(copy.deepcopy(reward_model.model).requires_grad_(True))  # loaded once, trained copy
    else:
        critic = Critic(load_reward_model(recipe, init.path))
    critic.model.config.pad_token_id = tokenizer.pad_token_id
    return critic
