"""The math of PPO for language models, on plain tensors: no models, no I/O (tested by hand in tests/test_rl.py).

Shapes: a batch of B replies of at most T tokens. `mask` (B, T) is 1 on the tokens the policy chose (up to and
including the end-of-turn token) and 0 on the padding after them. With tool calls (pipeline/tool_rollout.py) a reply
also holds tokens the policy did not choose (tool results, the template's turn headers): `mask` is 0 there too, so it
may have zeros inside a row. Those positions are not actions: they get no reward, no advantage and no loss, and GAE
steps over them (see `gae`). Token t with mask 1 is one action; `values[:, t]` is the critic's estimate before that
token was chosen.

    per-token KL      kl_penalty(logprobs, ref_logprobs, "k1" | "k3")        Schulman, "Approximating KL divergence"
    rewards           penalised_rewards(scores, kl, mask, kl_coef[, token_rewards]): -kl_coef * kl (+ a dense reward)
                      on every token, score on the last
    advantages        gae(rewards, values, mask, gamma, lam), then masked_whiten over all processes; without a critic
                      returns_to_go(rewards, mask, gamma) (REINFORCE++), the scores first less
                      group_baseline(scores, group_size, "rloo" | "reinforce_baseline" | "group_norm")
    losses            policy_loss (clipped surrogate), value_loss (clipped), both masked means
    KL coefficient    KLController: fixed, or adaptive towards a target KL (Ziegler et al. 2019)
"""

from __future__ import annotations

import torch

KL_ESTIMATORS = ("k1", "k3")


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, sum_over_processes=None
                  ) -> torch.Tensor:
    """(x - mean) / std over the masked entries; with shift_mean=False the mean is kept (only scaled).

    sum_over_processes (a function summing a tensor over the data-parallel processes, or None for one process):
    the mean and variance of every process's entries, so N processes whiten as one process with their whole batch
    would (OpenRLHF's global normalisation), not each against its own share.
    """
    if sum_over_processes is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        weights = mask.to(x.dtype)
        total, count = sum_over_processes(torch.stack([(x * weights).sum(), weights.sum()])).unbind()
        mean = total / count.clamp(min=1)
        squares = sum_over_processes(((x - mean) ** 2 * weights).sum())
        var = squares / (count - 1).clamp(min=1)  # unbiased, as masked_var
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under each row of logits: (B, T, V), (B, T) -> (B, T)."""
    return torch.gather(logits.log_softmax(-1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each categorical distribution: (B, T, V) -> (B, T)."""
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probabilities.

    k1 = log(p/q): unbiased, can be negative per token. k3 = (q/p - 1) - log(q/p): unbiased and never negative,
    lower variance when the two are close.
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r} (expected one of {', '.join(KL_ESTIMATORS)})")


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last position where mask is 1, i.e. the last action (0 for an empty reply). For a mask
    that is a prefix of the row this is mask.sum - 1; with interior zeros (tool tokens) the sum would fall short."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return ((mask > 0).long() * positions).amax(1)


def penalised_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float,
                      token_rewards: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token rewards: -kl_coef * kl on every action (mask 1), plus the sequence score on the last action, plus
    token_rewards (B, T) on every action when given (a dense reward, e.g. DPO's implicit one)."""
    rewards = -kl_coef * kl * mask
    if token_rewards is not None:
        rewards = rewards + token_rewards * mask
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, last_index(mask)] += scores
    return rewards


def score_with_eos_penalty(scores: torch.Tensor, ended: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """Subtract `penalty` from the score of every reply that ran out of tokens before its end-of-turn token."""
    if not penalty:
        return scores
    return scores - penalty * (~ended).to(scores.dtype)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float):
    """Generalised advantage estimation (Schulman et al. 2016). Returns (advantages, returns), both (B, T).

    delta_t = r_t + gamma * V_{t'} - V_t, A_t = delta_t + gamma * lam * A_{t'}, where t' is the next action after t
    (the next position with mask 1), with V and A zero after the reply's last action; returns = A + V are the
    critic's targets. Positions with mask 0 are transparent: an action before a tool result bootstraps from the value
    of the first action after it (one step, one discount: the tool's tokens are the environment's reply, not steps of
    the policy), and they get advantage and return 0. For a mask that is a prefix of each row this is the usual
    recursion over consecutive tokens.
    """
    rewards, values = rewards * mask, values * mask
    action = mask > 0
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros_like(values[:, 0])
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage
        # carried past positions that are not actions, so the action before them sees the next action's V and A
        next_value = torch.where(action[:, t], values[:, t], next_value)
        next_advantage = torch.where(action[:, t], advantage, next_advantage)
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """REINFORCE's return from each action on, G_t = r_t + gamma * G_t' (t' the next action), the advantage of the
    critic-free estimators (REINFORCE++, Hu 2025; OpenRLHF's get_cumulative_returns). It is GAE with every value 0
    and lam 1, so tool tokens (mask 0) are stepped over the same way."""
    return gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)[0]


def group_baseline(scores: torch.Tensor, group_size: int, estimator: str) -> torch.Tensor:
    """Each reply's score less a baseline from the other replies to its prompt: rows come in consecutive groups of
    `group_size` replies to one prompt. (B,) -> (B,).

        rloo                the mean of the group's other replies (Ahmadian et al. 2024)
        reinforce_baseline  the group's mean (REINFORCE++-baseline, Hu 2025)
        group_norm          the group's mean, then divided by its standard deviation + 1e-9 (GRPO, Shao et al. 2024)
    """
    groups = scores.view(-1, group_size)
    total, mean = groups.sum(1, keepdim=True), groups.mean(1, keepdim=True)
    if estimator == "rloo":
        return (groups - (total - groups) / (group_size - 1)).view(-1)
    if estimator == "reinforce_baseline":
        return (groups - mean).view(-1)
    if estimator == "group_norm":
        return ((groups - mean) / (groups.std(1, keepdim=True) + 1e-9)).view(-1)
    raise ValueError(f"unknown group estimator {estimator!r} (expected rloo, reinforce_baseline or group_norm)")


def policy_loss(logprobs, old_logprobs, advantages, mask, cliprange: float):
    """PPO's clipped surrogate: mean of max(-A * ratio, -A * clip(ratio, 1 - c, 1 + c)).

    Returns (loss, clip fraction, approximate KL(old || new) = mean of 0.5 * (log ratio)^2).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = 0.5 * masked_mean(log_ratio ** 2, mask)
    return loss, clipfrac.detach(), approx_kl.detach()


def value_loss(values, old_values, returns, mask, cliprange_value: float):
    """Clipped value loss: 0.5 * mean of max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2).

    Returns (loss, fraction of tokens where the clipped term was larger).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_err, clipped_err = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_err, clipped_err), mask)
    clipfrac = masked_mean((clipped_err > unclipped_err).float(), mask)
    return loss, clipfrac.detach()


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns): 1 is a perfect critic, 0 no better than a constant."""
    var_returns = masked_var(returns, mask, unbiased=False)
    if var_returns <= 0:
        return float("nan")
    return float(1 - masked_var(returns - values, mask, unbiased=False) / var_returns)


class KLController:
    """The KL coefficient beta: fixed, or adapted after each batch towards `target` (Ziegler et al. 2019):

        error = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + error * n / horizon)

    where KL is the batch's mean per-reply KL and n the number of replies in the batch.
    """

    def __init__(self, init: float, target: float | None = None, horizon: int = 10000, adaptive: bool = False):
        self.value, self.target, self.horizon, self.adaptive = float(init), target, horizon, adaptive

    def update(self, current_kl: float, n_replies: int) -> float:
        if self.adaptive:
            error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_replies / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])

