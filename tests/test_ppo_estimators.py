"""Our PPO without a critic (`ppo.advantage_estimator`): the return-to-go and the group baselines against loops
written out by hand, the section's checks, and real runs on the tiny policy and reward model of tests/test_ppo.py
(REINFORCE++ trains the policy alone and resumes after a kill; group_norm answers each prompt num_generations
times and puts the group-normalised score into the rewards)."""

import os
import signal
import statistics
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, run_cli, tiny_recipe
from pipeline import memory, rl
from pipeline.ppo_config import PPOConfig
from pipeline.recipe import load_recipe
from test_ppo import ENV, assert_same_as_uninterrupted, inputs, mean_reward, ppo_recipe, read  # noqa: F401


def hand_returns(rewards, mask, gamma):
    """G_t = r_t + gamma * G_next over the positions with mask 1, walking back; 0 where mask is 0."""
    out = []
    for r_row, m_row in zip(rewards.tolist(), mask.tolist()):
        row, running = [0.0] * len(r_row), 0.0
        for t in reversed(range(len(r_row))):
            if m_row[t]:
                running = r_row[t] + gamma * running
                row[t] = running
        out.append(row)
    return torch.tensor(out)


def test_returns_to_go_discounts_over_actions_and_steps_over_tool_tokens():
    rewards = torch.tensor([[0.1, -0.2, 0.3, 0.0, 1.0], [0.5, 0.0, -0.1, 0.2, 7.0]])
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 0, 1, 0]]).float()  # zeros inside: a tool result; at the end: padding
    for gamma in (1.0, 0.9):
        got = rl.returns_to_go(rewards, mask, gamma)
        assert torch.allclose(got, hand_returns(rewards, mask, gamma)), gamma
    assert rl.returns_to_go(rewards, mask, 0.9)[0, 1].item() == pytest.approx(-0.2 + 0.9 * (0.0 + 0.9 * 1.0))


def test_group_baselines_match_their_definitions():
    scores = torch.tensor([1.0, 2.0, 4.0, 9.0, 3.0, 3.0, 3.0, 3.0])  # two prompts, four replies each
    groups = [scores[:4].tolist(), scores[4:].tolist()]
    expected = {
        "rloo": [s - (sum(g) - s) / 3 for g in groups for s in g],
        "reinforce_baseline": [s - statistics.mean(g) for g in groups for s in g],
        "group_norm": [(s - statistics.mean(g)) / (statistics.stdev(g) + 1e-9) for g in groups for s in g],
    }
    for estimator, values in expected.items():
        got = rl.group_baseline(scores, 4, estimator)
        assert torch.allclose(got, torch.tensor(values), atol=1e-6), estimator
        assert got[4:].abs().max() == 0  # a group scored alike teaches nothing
    with pytest.raises(ValueError, match="unknown group estimator"):
        rl.group_baseline(scores, 4, "grpo")


def test_the_estimators_defaults_follow_openrlhf():
    assert (PPOConfig().num_generations, PPOConfig().whiten_advantages) == (1, True)
    assert PPOConfig(algorithm="grpo").num_generations == 4  # TRL's group, as before
    assert PPOConfig(advantage_estimator="reinforce").whiten_advantages is True  # REINFORCE++: batch-normalised
    assert PPOConfig(advantage_estimator="group_norm", num_generations=4).whiten_advantages is False
    assert PPOConfig(advantage_estimator="rloo", num_generations=4, whiten_advantages=True).whiten_advantages


@pytest.mark.parametrize("keys, expected", [
    ({"advantage_estimator": "rloo"}, "compares the replies to one prompt: set num_generations to 2 or more"),
    ({"advantage_estimator": "group_norm", "num_generations": 4, "gamma": 0.9}, "gamma must be 1.0"),
    ({"advantage_estimator": "reinforce", "critic_init": "policy"}, "critic_init concerns the critic"),
    ({"advantage_estimator": "reinforce", "lam": 0.9}, "lam concerns the critic"),
    ({"advantage_estimator": "reinforce", "critic_learning_rate": 1e-4}, "critic_learning_rate concerns the critic"),
    ({"algorithm": "grpo", "cliprange_value": 0.5}, "cliprange_value concerns the critic, which algorithm grpo"),
    ({"algorithm": "grpo", "advantage_estimator": "reinforce"}, "applies to algorithm ppo"),
    ({"num_generations": 3}, "must be whole groups of num_generations (3)"),
    ({"algorithm": "grpo", "use_kl_loss": True}, "use_kl_loss applies to algorithm ppo"),
])
def test_what_an_estimator_cannot_run_is_refused(keys, expected):
    with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        PPOConfig(**keys)


def test_a_refused_estimator_stops_the_stage_in_one_line_and_writes_nothing(inputs):
    work = inputs[0]
    before = sorted(p.name for p in work.rglob("*"))
    proc = run_cli(["pipeline/ppo.py", ppo_recipe(work), "run.name=bad", "ppo.advantage_estimator=group_norm"],
                   cwd=work, env=ENV)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "ppo" in line and "set num_generations to 2 or more" in line
    assert not (work / "runs/bad").exists() and sorted(p.name for p in work.rglob("*")) == before


def test_the_memory_estimate_counts_no_critic_without_gae(tmp_path):
    def trained(**section):
        recipe = load_recipe(tiny_recipe(tmp_path, ppo={"init_from": "sft", **section}))
        return memory.profile_of(recipe, "ppo").trained_models

    assert trained() == 2  # policy and critic
    assert trained(advantage_estimator="reinforce") == 1
    assert trained(advantage_estimator="rloo", num_generations=4) == 1
    assert trained(algorithm="grpo") == 1


REINFORCE = ["ppo.advantage_estimator=reinforce"]


@pytest.fixture(scope="module")
def reinforce_run(inputs):
    work = inputs[0]
    proc = run_cli(["pipeline/ppo.py", ppo_recipe(work), "run.name=reinforce", *REINFORCE], cwd=work, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no critic (advantage_estimator reinforce, 1 replies per prompt)" in proc.stdout + proc.stderr
    return work


def test_reinforce_pp_trains_the_policy_alone(inputs, reinforce_run):
    work, recipe, policy, tokenizer = inputs
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(work / "runs/reinforce/ppo")
    before, after = (mean_reward(recipe, work / "rm", m, tokenizer).mean().item() for m in (policy, trained))
    assert after > before + 0.5, (before, after)  # in reward standard deviations, as the critic's run in test_ppo
    metrics = read(work, "reinforce")
    history = metrics["history"]
    assert len(history) == 12 and history[-1]["kl"] > 0
    assert all("value_loss" not in h and "explained_variance" not in h and "group_score_std" not in h
               for h in history)
    assert all(isinstance(h["policy_loss"], float) and isinstance(h["clipfrac"], float) for h in history)
    assert read(work, "reinforce", "manifest.json")["config"]["advantage_estimator"] == "reinforce"


def test_a_killed_reinforce_run_resumes_from_its_policy_only_checkpoint(reinforce_run):
    work = reinforce_run
    cmd = [sys.executable, str(REPO / "pipeline/ppo.py"), str(ppo_recipe(work)), "run.name=killed_reinforce",
           *REINFORCE]
    proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **ENV})
    checkpoint = work / "runs/killed_reinforce/ppo.partial/checkpoint-4"
    deadline = time.time() + 300
    while not checkpoint.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = {p.name for p in checkpoint.iterdir()}
    assert "model.safetensors" in saved and not any(name.startswith("model_1") for name in saved), saved  # no critic

    resumed = run_cli(["pipeline/ppo.py", ppo_recipe(work), "run.name=killed_reinforce", *REINFORCE], cwd=work,
                      env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert_same_as_uninterrupted(work, "killed_reinforce", reference="reinforce")


def ppo_in_process(work, monkeypatch, name, *overrides):
    """The ppo stage run here on the tiny inputs, with a look at each step's batch after the advantage phase:
    (batches, kl coefficients, history)."""
    from pipeline import ppo, ppo_trainer

    seen = []
    advantages = ppo_trainer.PPOTrainer.advantages

    def look(self, batch):
        advantages(self, batch)
        seen.append((batch, self.kl_ctl.value))

    monkeypatch.setattr(ppo_trainer.PPOTrainer, "advantages", look)
    monkeypatch.chdir(work)
    ppo.main([str(ppo_recipe(work)), f"run.name={name}", "ppo.heldout_prompts=null", "ppo.adaptive_kl=false",
              *overrides])
    return seen, read(work, name)["history"]


def test_group_norm_answers_each_prompt_num_generations_times_and_rewards_the_normalised_score(inputs, monkeypatch):
    """Run in this process with a look at each step's batch after the advantage phase: 8 replies = 2 prompts x 4,
    each prompt's replies consecutive; the score on each reply's last token is rl.group_baseline's (before the KL
    penalty); the advantages are the return-to-go, not whitened (group_norm's default)."""
    work = inputs[0]
    seen, history = ppo_in_process(work, monkeypatch, "group_norm", "ppo.advantage_estimator=group_norm",
                                   "ppo.num_generations=4", "ppo.max_steps=3")
    assert len(seen) == 3
    prompts = []
    for batch, kl_coef in seen:
        rows = batch.rows
        groups = [rows[i:i + 4] for i in range(0, 8, 4)]
        assert all(len(set(g)) == 1 for g in groups) and groups[0][0] != groups[1][0], rows
        prompts += [g[0] for g in groups]
        last = rl.last_index(batch.mask)
        on_last = (batch.rewards + kl_coef * batch.kl)[torch.arange(8), last]
        assert torch.allclose(on_last, rl.group_baseline(batch.scores, 4, "group_norm"), atol=1e-5)
        assert torch.equal(batch.advantages, rl.returns_to_go(batch.rewards, batch.mask, 1.0))
        assert batch.values is None
    assert len(set(prompts)) == 6  # the sampler moves on by 2 prompts a step, not 8
    assert all(h["group_score_std"] >= 0 and "value_loss" not in h for h in history)


def test_use_kl_loss_moves_the_kl_from_the_reward_into_the_loss(inputs, monkeypatch):
    """With use_kl_loss the rewards hold the score alone (no -beta x KL per token), the update logs kl_loss, and a
    large beta holds the policy nearer the reference than beta 0 does over the same steps."""
    work = inputs[0]
    runs = {}
    for beta in (0.0, 20.0):
        runs[beta] = ppo_in_process(work, monkeypatch, f"kl_loss_{beta:g}", *REINFORCE, "ppo.use_kl_loss=true",
                                    "ppo.kl_estimator=k3", f"ppo.kl_coef={beta}", "ppo.max_steps=6")
    for batch, _ in runs[20.0][0]:
        assert torch.equal(batch.rewards, rl.penalised_rewards(batch.scores, batch.kl, batch.mask, 0.0))
    held, free = (runs[beta][1] for beta in (20.0, 0.0))
    assert all(isinstance(h["kl_loss"], float) for h in held) and held[-1]["kl_loss"] > 0
    assert all(h["non_score_reward"] == 0 for h in held)  # the rewards hold no KL penalty
    assert sum(h["kl"] for h in held[3:]) < 0.5 * sum(h["kl"] for h in free[3:]), ([h["kl"] for h in held],
                                                                                   [h["kl"] for h in free])
