"""PPO's math (pipeline/rl.py) against values worked out by hand on tiny tensors."""

import math
from pathlib import Path

import pytest
import torch

from pipeline import rl

T = torch.tensor


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


def test_gae_without_padding():
    # gamma 1, lambda 0.5; deltas: 1 + 0 - 0.7 = 0.3, 0.7 - 0.6 = 0.1, 0.6 - 0.5 = 0.1
    # A2 = 0.3, A1 = 0.1 + 0.5 * 0.3 = 0.25, A0 = 0.1 + 0.5 * 0.25 = 0.225; returns = A + V
    adv, ret = rl.gae(T([[0.0, 0.0, 1.0]]), T([[0.5, 0.6, 0.7]]), T([[1.0, 1.0, 1.0]]), gamma=1.0, lam=0.5)
    assert close(adv, [[0.225, 0.25, 0.3]]) and close(ret, [[0.725, 0.85, 1.0]])


def test_gae_ignores_padding_after_the_reply():
    # the padded token's reward 9 and value 5 must not leak in; gamma 0.9, lambda 0.8
    # A1 = 2 + 0.9 * 0 - 1 = 1, A0 = (0 + 0.9 * 1 - 1) + 0.72 * 1 = 0.62
    adv, ret = rl.gae(T([[0.0, 2.0, 9.0]]), T([[1.0, 1.0, 5.0]]), T([[1.0, 1.0, 0.0]]), gamma=0.9, lam=0.8)
    assert close(adv, [[0.62, 1.0, 0.0]]) and close(ret, [[1.62, 2.0, 0.0]])


def test_gae_with_lambda_one_is_discounted_return_minus_value():
    rewards, values, mask = T([[0.5, -1.0, 2.0]]), T([[0.3, 0.2, 0.1]]), T([[1.0, 1.0, 1.0]])
    adv, ret = rl.gae(rewards, values, mask, gamma=0.5, lam=1.0)
    returns = [0.5 - 0.5 + 0.25 * 2, -1.0 + 0.5 * 2, 2.0]  # sum_k gamma^k r_{t+k}
    assert close(ret, [returns]) and close(adv, [[r - v for r, v in zip(returns, [0.3, 0.2, 0.1])]])


def test_masked_whiten():
    x, mask = T([[1.0, 2.0, 3.0, 100.0]]), T([[1.0, 1.0, 1.0, 0.0]])
    # mean 2, unbiased variance ((1 + 0 + 1) / 2) = 1: the masked 100 plays no part
    assert close(rl.masked_whiten(x, mask)[:, :3], [[-1.0, 0.0, 1.0]])
    assert close(rl.masked_whiten(x, mask, shift_mean=False)[:, :3], [[1.0, 2.0, 3.0]])


def _whiten_share(rank: int, folder: str) -> None:
    """One of two gloo processes: whiten this process's share of the batch over both processes."""
    import json
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)

    def sum_over_processes(t):
        t = t.clone()
        dist.all_reduce(t)
        return t

    shares = [(T([[1.0, 2.0], [3.0, 50.0]]), T([[1.0, 1.0], [1.0, 0.0]])), (T([[10.0, 7.0]]), T([[1.0, 0.0]]))]
    x, mask = shares[rank]
    out = rl.masked_whiten(x, mask, sum_over_processes=sum_over_processes)
    Path(folder, f"rank{rank}.json").write_text(json.dumps((out * mask).tolist()))
    dist.destroy_process_group()


def test_masked_whiten_over_processes(tmp_path):
    """Two processes whiten their shares with the mean and variance of the whole batch, as one process with it would:
    entries 1, 2, 3 on one process and 10 on the other: mean 4, unbiased variance (9 + 4 + 1 + 36) / 3."""
    import json

    torch.multiprocessing.spawn(_whiten_share, args=(str(tmp_path),), nprocs=2)
    first, second = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    std = math.sqrt(50 / 3)
    assert close(first, [[-3 / std, -2 / std], [-1 / std, 0.0]]) and close(second, [[6 / std, 0.0]])
    whole = rl.masked_whiten(T([[1.0, 2.0, 3.0, 10.0]]), T([[1.0, 1.0, 1.0, 1.0]]))
    assert close([first[0] + first[1][:1] + second[0][:1]], whole)
    # each process alone would have centred its own share: the other process's 10 to 0
    assert close(rl.masked_whiten(T([[10.0, 7.0]]), T([[1.0, 0.0]])) * T([[1.0, 0.0]]), [[0.0, 0.0]])


def test_kl_estimators():
    logp, ref = torch.log(T([0.5, 0.25])), torch.log(T([0.25, 0.5]))
    ln2 = math.log(2)
    assert close(rl.kl_penalty(logp, ref, "k1"), [ln2, -ln2])
    # k3 = (q/p - 1) - log(q/p): q/p = 0.5 -> -0.5 + ln2; q/p = 2 -> 1 - ln2
    assert close(rl.kl_penalty(logp, ref, "k3"), [ln2 - 0.5, 1 - ln2])
    assert close(rl.kl_penalty(logp, logp, "k3"), [0.0, 0.0])
    with pytest.raises(ValueError, match="k2"):
        rl.kl_penalty(logp, ref, "k2")


def test_penalised_rewards_put_the_score_on_the_last_reply_token():
    scores = T([1.0, -2.0])
    kl = T([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]])
    mask = T([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    rewards = rl.penalised_rewards(scores, kl, mask, kl_coef=0.5)
    assert close(rewards, [[-0.05, -0.1, -0.15 + 1.0], [-0.25 - 2.0, 0.0, 0.0]])
    dense = T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # a per-token reward lands on the actions only
    rewards = rl.penalised_rewards(scores, kl, mask, kl_coef=0.5, token_rewards=dense)
    assert close(rewards, [[0.95, 1.9, 2.85 + 1.0], [3.75 - 2.0, 0.0, 0.0]])


def test_missing_eos_penalty():
    scores, ended = T([1.0, 1.0]), T([True, False])
    assert close(rl.score_with_eos_penalty(scores, ended, 2.0), [1.0, -1.0])
    assert close(rl.score_with_eos_penalty(scores, ended, None), [1.0, 1.0])


def test_policy_loss_clips_both_ways():
    new, old = torch.log(T([[0.6, 0.3, 0.55]])), torch.log(T([[0.4, 0.5, 0.5]]))  # ratios 1.5, 0.6, 1.1
    adv, mask = T([[1.0, -1.0, 2.0]]), T([[1.0, 1.0, 1.0]])
    loss, clipfrac, approx_kl = rl.policy_loss(new, old, adv, mask, cliprange=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(0.6, 0.8) = 0.8 (clipped); token 2: -2.2 (inside)
    assert close(loss, (-1.2 + 0.8 - 2.2) / 3) and close(clipfrac, 2 / 3)
    assert close(approx_kl, 0.5 * (math.log(1.5) ** 2 + math.log(0.6) ** 2 + math.log(1.1) ** 2) / 3)
    masked_loss, _, _ = rl.policy_loss(new, old, adv, T([[1.0, 1.0, 0.0]]), cliprange=0.2)
    assert close(masked_loss, (-1.2 + 0.8) / 2)


def test_policy_loss_gradient_raises_logprob_of_positive_advantage():
    logp = torch.log(T([[0.5, 0.5]])).requires_grad_()
    loss, _, _ = rl.policy_loss(logp, logp.detach(), T([[1.0, -1.0]]), T([[1.0, 1.0]]), cliprange=0.2)
    loss.backward()
    assert logp.grad[0, 0] < 0 < logp.grad[0, 1]  # descent raises token 0 and lowers token 1


def test_value_loss_clips():
    values, old, returns, mask = T([[1.0, 0.0]]), T([[0.5, 0.5]]), T([[2.0, 0.3]]), T([[1.0, 1.0]])
    loss, clipfrac = rl.value_loss(values, old, returns, mask, cliprange_value=0.2)
    # token 0: clipped value 0.7, max((1-2)^2, (0.7-2)^2) = 1.69; token 1: clipped 0.3, max(0.09, 0) = 0.09
    assert close(loss, 0.5 * (1.69 + 0.09) / 2) and close(clipfrac, 0.5)


def test_entropy_and_logprobs():
    logits = T([[[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, 0.0]]])
    assert close(rl.entropy_of(logits)[0, 0], math.log(4))
    assert rl.entropy_of(logits)[0, 1] < 0.01
    assert close(rl.logprobs_of(logits, T([[2, 0]])), [[math.log(0.25), -math.log1p(3 * math.exp(-10))]])


def test_explained_variance():
    returns, mask = T([[1.0, 2.0, 3.0, 7.0]]), T([[1.0, 1.0, 1.0, 0.0]])
    assert close(rl.explained_variance(T([[1.0, 2.0, 3.0, 0.0]]), returns, mask), 1.0)
    assert close(rl.explained_variance(T([[2.0, 2.0, 2.0, 0.0]]), returns, mask), 0.0)
    # residuals (0.5, 0, -0.5): variance 1/6 against 2/3
    assert close(rl.explained_variance(T([[0.5, 2.0, 3.5, 0.0]]), returns, mask), 1 - (1 / 6) / (2 / 3))


def test_kl_controller_fixed_and_adaptive():
    fixed = rl.KLController(0.1)
    assert fixed.update(100.0, 256) == 0.1
    # KL 9 against target 6: error 0.5 clipped to 0.2; beta * (1 + 0.2 * 256 / 10000)
    ctl = rl.KLController(0.1, target=6.0, horizon=10000, adaptive=True)
    assert math.isclose(ctl.update(9.0, 256), 0.1 * 1.00512)
    # KL 3: error -0.5 clipped to -0.2
    assert math.isclose(ctl.update(3.0, 256), 0.1 * 1.00512 * 0.99488)
    # KL 6.6: error 0.1, not clipped
    before = ctl.value
    assert math.isclose(ctl.update(6.6, 1000), before * (1 + 0.1 * 1000 / 10000))
    restored = rl.KLController(0.5, target=6.0, adaptive=True)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


# ---------------------------------------------------------------------------------------------- interior masks
# A reply with tool calls has positions the policy did not choose (tool results) inside it: mask 0 there.


def old_gae(rewards, values, mask, gamma, lam):
    """gae as it was before interior masks (a mask that is a prefix of each row), kept to compare against."""
    rewards, values = rewards * mask, values * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = next_advantage
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def test_gae_is_unchanged_for_prefix_masks():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        B, T = 5, 12
        lengths = torch.randint(0, T + 1, (B,), generator=gen)
        mask = (torch.arange(T)[None] < lengths[:, None]).float()
        rewards, values = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
        for gamma, lam in ((1.0, 0.95), (0.9, 0.8), (0.5, 1.0)):
            new, old = rl.gae(rewards, values, mask, gamma, lam), old_gae(rewards, values, mask, gamma, lam)
            assert torch.equal(new[0], old[0]) and torch.equal(new[1], old[1])


def test_gae_steps_over_tool_tokens():
    # actions at 0 and 3, tool tokens at 1, 2 (their reward 5 and value 9 must play no part); gamma 0.9, lambda 0.8
    # A3 = 1 + 0 - 0.7 = 0.3; A0 = (0 + 0.9 * 0.7 - 0.5) + 0.72 * 0.3 = 0.13 + 0.216 = 0.346: one discount, not three
    rewards, values, mask = T([[0.0, 5.0, 5.0, 1.0, 7.0]]), T([[0.5, 9.0, 9.0, 0.7, 3.0]]), T([[1.0, 0, 0, 1.0, 0]])
    adv, ret = rl.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert close(adv, [[0.346, 0.0, 0.0, 0.3, 0.0]]) and close(ret, [[0.846, 0.0, 0.0, 1.0, 0.0]])


def test_gae_with_interior_zeros_equals_gae_of_the_actions_alone():
    gen = torch.Generator().manual_seed(1)
    B, T = 6, 15
    mask = (torch.rand(B, T, generator=gen) < 0.6).float()
    mask[0] = 0.0  # an empty reply
    rewards, values = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)
    adv, ret = rl.gae(rewards, values, mask, gamma=0.95, lam=0.9)
    for b in range(B):
        keep = mask[b] > 0
        assert not adv[b, ~keep].any() and not ret[b, ~keep].any()
        if not keep.any():
            continue
        a_alone, r_alone = rl.gae(rewards[b:b + 1, keep], values[b:b + 1, keep], mask[b:b + 1, keep], 0.95, 0.9)
        assert close(adv[b, keep], a_alone[0]) and close(ret[b, keep], r_alone[0])


def test_last_index_and_rewards_with_interior_zeros():
    mask = T([[1.0, 1.0, 0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0, 0.0, 0.0], [0.0] * 6])
    assert rl.last_index(mask).tolist() == [4, 2, 0]
    assert rl.last_index(T([[1.0, 1.0, 1.0]])).tolist() == [2]
    rewards = rl.penalised_rewards(T([1.0, 2.0, 3.0]), torch.ones(3, 6), mask, kl_coef=0.1)
    assert close(rewards[0], [-0.1, -0.1, 0.0, 0.0, 0.9, 0.0])  # the score on the last action, none on tool tokens
    assert close(rewards[1], [-0.1, -0.1, 1.9, 0.0, 0.0, 0.0])
