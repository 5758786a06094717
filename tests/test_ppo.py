"""The ppo stage (pipeline/ppo.py): one update's direction, rollout masking, and real command lines on a tiny random
policy and reward model (a short run raises the reward, kill-and-resume, two processes with LoRA, GRPO, bad input)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, launch_cli, max_weight_diff, run_cli, tiny_recipe
from pipeline import models, monitors, ppo_trainer, rl, runs
from pipeline.ppo_config import PPOConfig
from pipeline.reward_model import RewardModel
from pipeline.recipe import load_recipe

RUN = {"batch_size": 8, "num_minibatches": 2, "ppo_epochs": 2, "max_new_tokens": 10, "learning_rate": 1e-2,
       "max_steps": 12, "save_steps": 2, "adaptive_kl": True, "target_kl": 0.5, "kl_horizon": 100,
       "heldout_max_prompts": 16, "heldout_max_new_tokens": 8, "report_to": "tensorboard"}
# One thread per process: on a busy 2-core machine, multi-threaded tiny matmuls spend their time waiting for each
# other (a 1-second step took over a minute); accelerate's multi-process launch does the same by default.
ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A random tiny Llama with the tiny recipe's tokenizer as the policy, and a reward model whose score depends
    on the reply in a way PPO can learn (see bag_of_words_reward_model), with reward_mean/reward_std in its config
    measured on the policy's own replies, as a reward stage measures them on its training pairs."""
    work = tmp_path_factory.mktemp("ppo")
    recipe, tokenizer, policy, reward = random_policy_and_reward(work)
    scores = mean_reward(recipe, work / "rm", policy, tokenizer, normalise=False)
    reward.config.reward_mean, reward.config.reward_std = scores.mean().item(), scores.std().item()
    reward.save_pretrained(work / "rm")
    return work, recipe, policy, tokenizer


def random_policy_and_reward(work):
    """(recipe, tokenizer, policy, reward model): the tiny recipe's random policy saved in work/policy, and
    bag_of_words_reward_model on it in work/rm, each folder with the tokenizer."""
    recipe = load_recipe(tiny_recipe(work, pretrain=None, sft=None))
    tokenizer = models.load_tokenizer(recipe, runs.resolve_checkpoint(recipe, "model"))
    policy = models.build_causal_lm(recipe, tokenizer)
    models.configure_generation(policy, tokenizer)
    policy.save_pretrained(work / "policy")
    tokenizer.save_pretrained(work / "policy")
    reward = bag_of_words_reward_model(work / "policy")
    reward.save_pretrained(work / "rm")
    tokenizer.save_pretrained(work / "rm")
    return recipe, tokenizer, policy, reward


def bag_of_words_reward_model(policy_path):
    """A reward model that scores a conversation by the average of per-token values: attention with zero queries
    averages the (normalised) token embeddings of the first layer, every other sublayer adds nothing, and the
    random score head gives each token a value. A reply full of high-value tokens scores high."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_pretrained(policy_path, num_labels=1)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            attn.q_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
            for proj in (attn.v_proj, attn.o_proj):
                proj.weight.copy_(torch.eye(*proj.weight.shape) if i == 0 else torch.zeros_like(proj.weight))
    return model


def mean_reward(recipe, rm_path, policy, tokenizer, normalise=True):
    """Reward-model scores of two sampled replies to each of 64 world prompts (seeded)."""
    from pipeline import data
    from pipeline.generation import generate

    prompts = data.load("world:preference", "prompts", recipe)["prompt"][:64]
    replies = generate(policy, tokenizer, prompts, max_new_tokens=RUN["max_new_tokens"], do_sample=True,
                       num_samples=2, seed=0, progress=False)
    reward_model = RewardModel.load(recipe, runs.Checkpoint("rm", str(rm_path), "", "local"), "cpu")
    raw = torch.tensor(reward_model.scores([p for p in prompts for _ in range(2)],
                                           [r.text for rs in replies for r in rs]))
    return reward_model.normalise(raw) if normalise else raw


def ppo_recipe(work, **extra):
    section = {"init_from": str(work / "policy"), "reward_model": str(work / "rm"), **RUN, **extra}
    return tiny_recipe(work, pretrain=None, sft=None, ppo=section)


def read(work, name, file="metrics.json"):
    return json.loads((work / "runs" / name / "ppo" / file).read_text())


# ---------------------------------------------------------------------------------------------- in process


def test_reply_logits_ignore_left_padding(inputs):
    policy = inputs[2]
    padded = torch.tensor([[2, 2, 40, 41, 50, 51]])
    alone = torch.tensor([[40, 41, 50, 51]])
    with torch.no_grad():
        a = ppo_trainer.reply_logits(policy, padded, torch.tensor([[0, 0, 1, 1, 1, 1]]), 4, 1.0)
        b = ppo_trainer.reply_logits(policy, alone, torch.ones_like(alone), 2, 1.0)
    assert a.shape == b.shape == (1, 2, policy.config.vocab_size) and torch.allclose(a, b, atol=1e-5)


def test_one_ppo_step_moves_the_policy_toward_higher_advantage(inputs):
    policy = inputs[2]
    model = type(policy)(policy.config)
    model.load_state_dict(policy.state_dict())
    seq = torch.tensor([[30, 31, 32, 60, 61, 62], [2, 33, 34, 63, 64, 2]])
    att = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0]])
    replies, mask = seq[:, 3:], att[:, 3:].float()
    advantages = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, 0.0]])

    def reply_logprobs():
        return rl.logprobs_of(ppo_trainer.reply_logits(model, seq, att, 3, 1.0), replies)

    with torch.no_grad():
        old = reply_logprobs()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss, _, _ = rl.policy_loss(reply_logprobs(), old, advantages, mask, cliprange=0.2)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        change = (reply_logprobs() - old) * mask
    assert change[0].sum() > 0 > change[1].sum()  # the positive-advantage reply got likelier, the other less likely


class Scripted(torch.nn.Module):
    """Stands in for the policy in rollout(): 'generates' fixed tokens."""

    def __init__(self, tokens):
        super().__init__()
        self.tokens = tokens

    def generate(self, input_ids, attention_mask, **kw):
        assert kw["do_sample"] and kw["top_k"] == 0 and kw["use_cache"]
        return torch.cat([input_ids, self.tokens], 1)


def test_rollout_masks_everything_after_end_of_turn(inputs):
    tokenizer = inputs[3]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    generated = torch.tensor([[40, eos, 41, 42], [43, 44, 45, 46], [eos, 47, eos, 48]])
    cfg = PPOConfig(max_new_tokens=4)
    batch = ppo_trainer.sample_replies(Scripted(generated), tokenizer, [[30, 31], [32], [33, 34, 35]], [0, 1, 2],
                                       cfg, "cpu")
    assert batch.context_length == 3 and batch.rows == [0, 1, 2]
    assert batch.mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert batch.ended.tolist() == [True, False, True]
    assert batch.replies.tolist() == [[40, eos, pad, pad], [43, 44, 45, 46], [eos, pad, pad, pad]]
    assert batch.sequences[1].tolist() == [pad, pad, 32, 43, 44, 45, 46]  # prompts left-padded
    assert batch.attention_mask[2].tolist() == [1, 1, 1, 1, 0, 0, 0]


def test_the_gold_score_is_logged_but_never_rewarded_without_verifier_weight(inputs, monkeypatch):
    """One rollout scored twice by our PPO: with the gold path on (the prompts have answers; the verifier made to
    answer 1e6, so any share of it in the reward would show) and off (no answer columns). Scores, per-token rewards
    and advantages must be equal; with verifier_weight 1 the same verdicts do enter the score."""
    import copy
    from types import SimpleNamespace

    from pipeline import judges, ppo

    work = inputs[0]
    recipe = load_recipe(ppo_recipe(work, max_steps=1))
    keys, cfg = recipe.keys("ppo"), recipe.trainer_config("ppo")
    prompts = ppo.with_answers(ppo.load_prompts(keys.prompts, recipe), keys.prompts, required=False)
    assert {"skill", "answer"} <= set(prompts.column_names) and cfg.verifier_weight == 0.0
    monkeypatch.setattr(judges, "verifier_scores", lambda skills, answers, texts: [1e6] * len(texts))
    trainer = ppo_trainer.PPOTrainer(recipe, SimpleNamespace(out=work / "in-process"), cfg, keys,
                                     recipe.peft_values("ppo"), prompts,
                                     runs.Checkpoint("policy", str(work / "policy"), "", "local"),
                                     [runs.Checkpoint("rm", str(work / "rm"), "", "local")])
    rollout = trainer.rollout()

    def scored(prompt_rows, verifier_weight=0.0):
        trainer.prompts, trainer.cfg.verifier_weight = prompt_rows, verifier_weight
        batch = copy.deepcopy(rollout)
        trainer.score(batch)
        trainer.advantages(batch)
        return batch

    gold, no_gold = scored(prompts), scored(prompts.remove_columns(["skill", "answer"]))
    assert gold.correct.tolist() == [1e6] * cfg.batch_size and no_gold.correct is None  # the gold path ran
    for name in ("scores", "rewards", "advantages", "returns"):
        assert torch.equal(getattr(gold, name), getattr(no_gold, name)), name
    rewarded = scored(prompts, verifier_weight=1.0)
    assert torch.allclose(rewarded.scores, no_gold.scores + 1e6)


def test_the_implicit_reward_is_beta_times_the_dpo_policys_log_ratio_on_the_policys_tokens(inputs):
    """ppo.implicit_reward (RTO): a 'DPO' policy (the policy with its output layer perturbed) adds
    implicit_reward_beta x (log pi_dpo - log pi_ref) of each chosen token to that token's reward, computed here
    from the two models directly, and nothing on padding. The policy itself as the DPO policy adds exactly zero."""
    from types import SimpleNamespace

    from pipeline import ppo

    work, recipe = inputs[0], inputs[1]
    dpo = work / "dpo-like"
    if not dpo.exists():
        model = models.load_causal_lm(recipe, str(work / "policy"))
        with torch.no_grad():
            model.lm_head.weight.add_(0.5 * torch.randn_like(model.lm_head.weight))
        model.save_pretrained(dpo)
        inputs[3].save_pretrained(dpo)
    # CPU draws on any machine: seed 0's replies there end early, so padding positions exist to check
    recipe = load_recipe(ppo_recipe(work, max_steps=1, implicit_reward_beta=0.3, use_cpu=True))
    keys, cfg = recipe.keys("ppo"), recipe.trainer_config("ppo")
    prompts = ppo.load_prompts(keys.prompts, recipe)
    checkpoint = lambda path: runs.Checkpoint(path.name, str(path), "", "local")  # noqa: E731

    def scored(implicit):
        trainer = ppo_trainer.PPOTrainer(recipe, SimpleNamespace(out=work / "in-process"), cfg, keys, {}, prompts,
                                         checkpoint(work / "policy"), [checkpoint(work / "rm")], implicit)
        torch.manual_seed(0)
        batch = trainer.rollout()
        trainer.score(batch)
        trainer.advantages(batch)
        return trainer, batch

    _, plain = scored(None)
    trainer, batch = scored(checkpoint(dpo))
    assert plain.implicit is None and torch.equal(batch.replies, plain.replies)  # the same replies
    seq, att, ctx = batch.sequences, batch.attention_mask, batch.context_length
    with torch.no_grad():
        lp_dpo = rl.logprobs_of(ppo_trainer.reply_logits(trainer.implicit.model, seq, att, ctx, 1.0), batch.replies)
        lp_ref = rl.logprobs_of(ppo_trainer.reply_logits(trainer.reference, seq, att, ctx, 1.0), batch.replies)
    expected = 0.3 * (lp_dpo - lp_ref) * batch.mask
    assert torch.allclose(batch.implicit, expected, atol=1e-5) and expected.abs().sum() > 0
    assert torch.allclose(batch.rewards, plain.rewards + expected, atol=1e-5)
    assert (batch.implicit[batch.mask == 0] == 0).all() and (batch.mask == 0).any()
    _, itself = scored(checkpoint(work / "policy"))
    assert torch.equal(itself.implicit, torch.zeros_like(itself.implicit))
    assert torch.allclose(itself.rewards, plain.rewards)


def test_an_implicit_reward_from_another_start_or_for_trls_trainers_is_refused(inputs):
    """DPO's implicit reward is measured against the model DPO started from: a DPO folder whose manifest says it
    started elsewhere than ppo.init_from is refused, and so is the key with GRPO (our PPO's per-token reward only)."""
    import shutil

    work = inputs[0]
    elsewhere = work / "dpo-from-elsewhere"
    if not elsewhere.exists():
        shutil.copytree(work / "policy", elsewhere)
        (elsewhere / "manifest.json").write_text(json.dumps({"inputs": {"checkpoints": {"init_from": {
            "ref": "other", "path": str(work / "rm"), "fingerprint": "x", "source": "local"}}}}))
    for name, extra, expected in (
            ("elsewhere", [f"ppo.implicit_reward={elsewhere}"], "was tuned from"),
            ("grpo", [f"ppo.implicit_reward={work / 'policy'}", "ppo.algorithm=grpo"], "not of grpo")):
        proc = run_cli(["pipeline/ppo.py", ppo_recipe(work), f"run.name={name}", *extra], cwd=work, env=ENV)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert expected in proc.stderr.strip().splitlines()[-1] and not (work / "runs" / name).exists()


def test_an_implicit_reward_tuned_from_the_same_hub_model_is_accepted(tmp_path):
    from types import SimpleNamespace

    from pipeline import cli, ppo

    dpo = tmp_path / "dpo"
    dpo.mkdir()
    (dpo / "manifest.json").write_text(json.dumps({"inputs": {"checkpoints": {"init_from": {
        "ref": "org/model", "path": "org/model", "fingerprint": "x", "source": "hub"}}}}))
    recipe = SimpleNamespace(path="r.yaml", set_by={})  # no override set a key
    implicit = runs.Checkpoint("dpo", str(dpo), "x", "local")
    ppo.check_implicit_reward(recipe, runs.Checkpoint("org/model", "org/model", "x", "hub"), implicit)
    with pytest.raises(cli.PipelineError, match="was tuned from org/model"):
        ppo.check_implicit_reward(recipe, runs.Checkpoint("org/other", "org/other", "x", "hub"), implicit)


def test_ensemble_objectives_on_hand_made_scores():
    from pipeline.reward_model import combine

    normalised = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, -2.0]])  # 2 members x 3 replies
    assert combine(normalised, "mean").tolist() == [2.0, 0.0, 0.0]
    assert combine(normalised, "worst_case").tolist() == [1.0, 0.0, -2.0]
    # variances 1, 0, 4: the reply the members disagree on most loses most
    assert combine(normalised, "uncertainty_weighted", 0.5).tolist() == [1.5, 0.0, -2.0]


def test_an_ensemble_normalises_each_member_by_its_own_statistics_and_ppo_trains_on_it(inputs):
    """ppo.reward_ensemble: a second member, the reward model with its stored mean moved up by 10 std, scores each
    reply 10 below the first. The ensemble's score is their mean (5 below), their minimum (10 below), or the mean less
    the penalty times their variance (25); the raw score is the members' mean. Through the CLI, the member is an
    input of the stage and step 1's mean normalised reward is 5 below a run without it (same seed, same replies)."""
    import shutil

    from pipeline.reward_model import load_scorer

    work, recipe = inputs[0], inputs[1]
    shifted = work / "rm-shifted"
    if not shifted.exists():
        shutil.copytree(work / "rm", shifted)
        config = json.loads((shifted / "config.json").read_text())
        config["reward_mean"] += 10 * config["reward_std"]
        (shifted / "config.json").write_text(json.dumps(config))
    members = [runs.Checkpoint(p.name, str(p), "", "local") for p in (work / "rm", shifted)]
    prompts = ["What is 2 plus 3?", "Which is larger, 9 or 4?"]
    replies, ended = ["5", "9 is larger."], torch.tensor([True, True])
    raw, alone, _ = load_scorer(recipe, members[:1]).policy_scores(prompts, replies, ended, None)
    for objective, penalty, shift in (("mean", 0.0, -5.0), ("worst_case", 0.0, -10.0),
                                      ("uncertainty_weighted", 0.1, -5.0 - 0.1 * 25)):
        ensemble = load_scorer(recipe, members, objective=objective, penalty=penalty)
        raw_e, normalised, scores = ensemble.policy_scores(prompts, replies, ended, None)
        assert torch.allclose(raw_e, raw) and torch.allclose(normalised, alone + shift, atol=1e-4)

    common = ["ppo.max_steps=1", "ppo.heldout_prompts=null", "ppo.ensemble_objective=mean"]
    for name, extra in (("single", []), ("ensemble", [f"ppo.reward_ensemble=[{shifted}]"])):
        proc = run_cli(["pipeline/ppo.py", ppo_recipe(work), f"run.name={name}", *common, *extra], cwd=work, env=ENV)
        assert proc.returncode == 0, proc.stderr[-3000:]
    single, ensemble = (read(work, n)["history"][0] for n in ("single", "ensemble"))
    assert ensemble["reward_raw"] == pytest.approx(single["reward_raw"], abs=1e-5)
    assert ensemble["reward"] == pytest.approx(single["reward"] - 5.0, abs=1e-4)
    recorded = read(work, "ensemble", "manifest.json")["inputs"]["checkpoints"]["reward_ensemble"]
    assert [c["path"] for c in recorded] == [str(shifted)]
    rounds = run_cli(["pipeline/ppo.py", ppo_recipe(work), "run.name=ensemble-rounds", *common[:2],
                      f"ppo.reward_ensemble=[{shifted}]", "ppo.max_steps=2", "ppo.reward_rounds=2"], cwd=work, env=ENV)
    assert rounds.returncode == 2 and "does not run with ppo.reward_ensemble" in rounds.stderr
    assert len(rounds.stderr.strip().splitlines()) == 1


def test_trl_reward_function_logs_the_gold_score_and_never_returns_it(monkeypatch):
    """GRPO/RLOO: the reward-model function logs the verifier's accuracy and the replies' diversity; its rewards are
    the same with and without the prompts' answers (the verifier made to answer 1e6)."""
    from pipeline import judges, trl_online

    class StubRewardModel:
        def policy_scores(self, prompts, replies, ended, missing_eos_penalty, tools=None, clip=None):
            raw = torch.arange(len(replies), dtype=torch.float32)
            return raw, raw / 2, raw / 2 - 1.0 * (~ended)

    monkeypatch.setattr(judges, "verifier_scores", lambda skills, answers, texts: [1e6] * len(texts))
    score = trl_online.reward_function(StubRewardModel(), stops=[9], missing_eos_penalty=1.0)
    texts = ["the answer is 3", "the answer is 3", "the answer is 4"]
    call = dict(prompts=["a", "b", "c"], completions=texts, completion_ids=[[5, 9], [5], [9]])
    logged, plain_logged = {}, {}
    with_gold = score(**call, log_metric=logged.__setitem__, skill=["add"] * 3, answer=["3", "3", "3"])
    without = score(**call, log_metric=plain_logged.__setitem__)
    assert with_gold == without == [0.0, -0.5, 1.0]
    assert logged["verifier"] == 1e6 and "verifier" not in plain_logged
    assert logged["distinct_1"] == pytest.approx(5 / 12) and logged["distinct_2"] == pytest.approx(4 / 9)


# ---------------------------------------------------------------------------------------------- command lines


@pytest.fixture(scope="module")
def uninterrupted(inputs):
    work = inputs[0]
    proc = run_cli(["pipeline/ppo.py", ppo_recipe(work), "run.name=full"], cwd=work, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work


def assert_same_as_uninterrupted(work, name, reference="full"):
    """Run `name` ended with the step count, every step's statistics and the exact weights of run `reference`."""
    full, other = read(work, reference), read(work, name)
    assert other["steps"] == full["steps"] == 12
    timeless = [[{k: v for k, v in h.items() if k != "elapsed_s"} for h in m["history"]] for m in (other, full)]
    assert timeless[0] == timeless[1]
    a, b = (load_file(work / f"runs/{n}/ppo/model.safetensors") for n in (reference, name))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_short_run_raises_the_mean_reward(inputs, uninterrupted):
    work, recipe, policy, tokenizer = inputs
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(work / "runs/full/ppo")
    before, after = (mean_reward(recipe, work / "rm", m, tokenizer).mean().item() for m in (policy, trained))
    assert after > before + 0.5, (before, after)  # in reward standard deviations; ~0.1 is noise here
    metrics = read(work, "full")
    history = metrics["history"]
    assert [h["step"] for h in history] == list(range(1, 13)) and metrics["steps"] == 12
    for key in ("reward_raw", "reward", "kl", "kl_coef", "entropy", "clipfrac", "approx_kl", "value_loss",
                "explained_variance", "reply_length", "ended", "verifier", "distinct_1", "distinct_2"):
        assert all(isinstance(h[key], float) for h in history), key  # verifier: world prompts, logged unrewarded
    assert metrics["warnings"] == monitors.online_warnings(history, 10)
    first, last = history[:3], history[-3:]
    assert sum(h["reward"] for h in last) > sum(h["reward"] for h in first)
    assert history[0]["kl"] == 0.0 and history[-1]["kl"] > 0  # the policy starts as the reference, then moves
    assert history[-1]["kl_coef"] != history[0]["kl_coef"]  # adaptive KL controller at work
    assert 0 <= metrics["heldout_accuracy_ppo"] <= 1 and metrics["heldout"]["n"] == 16
    out = work / "runs/full/ppo"
    assert (out / "curves.png").stat().st_size > 0 and (out / "model.safetensors").is_file()
    assert list(out.rglob("events.out.tfevents.*"))  # every step's statistics, for TensorBoard
    assert not list(out.glob("*checkpoint-*"))  # checkpoints are removed once the stage is published
    manifest = read(work, "full", "manifest.json")
    assert manifest["num_processes"] == 1 and manifest["global_batch_size"] == 8
    assert manifest["config"]["critic_init"] == "reward"


def test_length_split_gives_the_same_first_step_with_fewer_tokens(uninterrupted):
    """ppo.length_split: 3 splits the rollouts' forward passes by length: step 1 (the same rollouts: generation is
    not split) scores and updates to the same statistics as the run without it, up to float rounding."""
    work = uninterrupted
    proc = run_cli(["pipeline/ppo.py", ppo_recipe(work), "run.name=split", "ppo.length_split=3", "ppo.max_steps=2"],
                   cwd=work, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = re.search(r"ppo.length_split, the policy: (\d+) of (\d+) forward passes split by length; (\d+)% of",
                      proc.stdout)
    assert saved and int(saved[1]) > 0 and int(saved[3]) < 90, proc.stdout[-2000:]
    full, split = read(work, "full")["history"][0], read(work, "split")["history"][0]
    for key in ("reward_raw", "reward", "kl", "entropy", "value_loss", "policy_loss", "approx_kl", "reply_length"):
        assert split[key] == pytest.approx(full[key], rel=1e-3, abs=1e-5), key


def test_kill_and_resume_ends_like_an_uninterrupted_run(uninterrupted):
    work = uninterrupted
    cmd = [sys.executable, str(REPO / "pipeline/ppo.py"), str(ppo_recipe(work)), "run.name=killed"]
    proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **ENV})
    partial = work / "runs/killed/ppo.partial"
    deadline = time.time() + 300
    while not (partial / "checkpoint-4").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (partial / "checkpoint-4").is_dir() and not (work / "runs/killed/ppo").exists()

    resumed = run_cli(["pipeline/ppo.py", ppo_recipe(work), "run.name=killed"], cwd=work, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert_same_as_uninterrupted(work, "killed")


def test_killed_inside_a_checkpoint_save_and_the_final_save_ends_like_an_uninterrupted_run(uninterrupted):
    """SIGKILL inside the second checkpoint save (accelerate state written, loop_state.json and the rename not), then
    during the final save (weights written, tokenizer not): the rerun resumes from the last whole checkpoint and
    ends with the history and weights of the run that was never killed. Kill points: pipeline/faults.py."""
    work = uninterrupted
    args = ["pipeline/ppo.py", ppo_recipe(work), "run.name=saves"]
    partial = work / "runs/saves/ppo.partial"
    killed = run_cli(args, cwd=work, env={**ENV, "PIPELINE_FAULT": "kill:checkpoint:2"})
    assert killed.returncode == -signal.SIGKILL and (partial / "tmp-checkpoint-4").is_dir()
    assert sorted(p.name for p in partial.glob("checkpoint-*")) == ["checkpoint-2"]
    killed = run_cli(args, cwd=work, env={**ENV, "PIPELINE_FAULT": "kill:final-save"})
    assert killed.returncode == -signal.SIGKILL and (partial / "model.safetensors").is_file()
    assert (partial / "checkpoint-12/loop_state.json").is_file() and not list(partial.rglob("*checkpoint_*.pkl"))
    resumed = run_cli(args, cwd=work, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_as_uninterrupted(work, "saves")


def test_preemption_signal_checkpoints_between_steps_and_the_rerun_finishes(uninterrupted):
    """SIGUSR1 (Slurm's warning before the time limit): the loop saves a checkpoint after the step it is in, exits
    with the "preempted, requeue me" code, and the same command finishes the run like an uninterrupted one."""
    from pipeline import preemption

    work = uninterrupted
    cmd = [sys.executable, str(REPO / "pipeline/ppo.py"), str(ppo_recipe(work)), "run.name=preempted",
           "ppo.save_steps=100"]  # no periodic checkpoints: the one found afterwards is the preemption's
    proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **ENV})
    deadline = time.time() + 300
    for line in proc.stdout:  # the progress bar writes "ppo: ... 1/12" once the first step is done
        if "1/12" in line or "2/12" in line or time.time() > deadline:
            break
    proc.send_signal(signal.SIGUSR1)
    rest = proc.communicate(timeout=300)[0]
    assert proc.returncode == preemption.PREEMPTED_EXIT, rest[-3000:]
    partial = work / "runs/preempted/ppo.partial"
    ckpts = [p.name for p in partial.glob("checkpoint-*")]
    assert len(ckpts) == 1 and "preempted: stopped on SIGUSR1" in rest, (ckpts, rest[-2000:])
    assert not (work / "runs/preempted/ppo").exists()

    resumed = run_cli(["pipeline/ppo.py", ppo_recipe(work), "run.name=preempted", "ppo.save_steps=100"], cwd=work,
                      env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"ppo.partial/{ckpts[0]} at step" in resumed.stdout + resumed.stderr
    assert read(work, "preempted")["steps"] == read(work, "full")["steps"] == 12


def test_reward_rounds_split_the_steps_evenly():
    from pipeline.reward_rounds import round_at, round_starts

    assert round_starts(12, 3) == [4, 8] and round_starts(10, 1) == [] and round_starts(10, 4) == [2, 5, 7]
    assert [round_at(done, 12, 3) for done in range(12)] == [1] * 4 + [2] * 4 + [3] * 4
    assert [round_at(done, 5, 1) for done in range(5)] == [1] * 5


def test_reward_rounds_need_prompts_of_world_skills_and_a_round_of_ties_keeps_the_model(monkeypatch, tmp_path):
    """Rows with a `skill`/`answer` of your own passed the check, but the world's annotator judges world skills only:
    every pair of a round came back unjudged and fine-tuning on none divided by zero, mid-training."""
    import types

    from datasets import Dataset

    from pipeline import reward_rounds

    own = Dataset.from_list([{"prompt": "What is 2 + 3?", "skill": "math", "answer": "5"},
                             {"prompt": "What is 2 + 3?", "skill": "add", "answer": "5"}])
    assert reward_rounds.annotated_rows(own) == [1]

    class Saved(Exception):
        pass

    def refuse(*_, **__):
        raise AssertionError("trained or scored on no pairs")

    def save(*_, **__):
        raise Saved

    # a round whose every fresh pair ties, with nothing from earlier rounds or replayed: the model is kept as it was
    reward = types.SimpleNamespace(mean=0.5, std=2.0, scores=refuse, model=types.SimpleNamespace(save_pretrained=save))
    monkeypatch.setattr(reward_rounds, "generate", lambda *a, **k: [[types.SimpleNamespace(text="5")] * 2])
    monkeypatch.setattr(reward_rounds, "label", lambda *a, **k: ([], [0]))  # a tie: no pair
    monkeypatch.setattr(reward_rounds, "fine_tune", refuse)
    cfg = types.SimpleNamespace(seed=0, reward_round_prompts=1, max_new_tokens=4, temperature=1.0, top_p=1.0,
                                reward_round_replay=0, reward_round_epochs=1, reward_round_learning_rate=1e-4,
                                reward_round_batch_size=2, reward_round_lm_loss_coefficient=0.0)
    with pytest.raises(Saved):
        reward_rounds.build_round(2, out=tmp_path, reward=reward, policy=None, tokenizer=None,
                                  prompts=own.select([1]), rows=[0], cfg=cfg, noise=0.0, step=2, device="cpu")
    assert (reward.mean, reward.std) == (0.5, 2.0)


class RoundSaved(Exception):  # raised where a reward round would save its model: the test's end
    pass


def stubbed_round(monkeypatch, fine_tune):
    """reward_rounds.build_round's inputs, its sampling, labelling and scoring stubbed and `fine_tune` standing for
    the training; it raises RoundSaved where it would save the round's model."""
    import types

    from datasets import Dataset

    from pipeline import reward_rounds

    def save(*_, **__):
        raise RoundSaved

    prompts = Dataset.from_list([{"prompt": "What is 2 + 3?", "skill": "add", "answer": "5"}])
    reward = types.SimpleNamespace(mean=0.0, std=1.0, model=types.SimpleNamespace(save_pretrained=save))
    monkeypatch.setattr(reward_rounds, "generate", lambda *a, **k: [[types.SimpleNamespace(text="5")] * 2])
    monkeypatch.setattr(reward_rounds, "label", lambda *a, **k: ([{"prompt": "p", "chosen": "a", "rejected": "b"}],
                                                                 [1]))
    monkeypatch.setattr(reward_rounds, "clean_accuracy", lambda *a, **k: 1.0)
    monkeypatch.setattr(reward_rounds, "standardise", lambda *a, **k: None)
    monkeypatch.setattr(reward_rounds, "fine_tune", fine_tune)
    cfg = types.SimpleNamespace(seed=0, reward_round_prompts=1, max_new_tokens=4, temperature=1.0, top_p=1.0,
                                reward_round_replay=0, reward_round_epochs=1, reward_round_learning_rate=1e-4,
                                reward_round_batch_size=2, reward_round_lm_loss_coefficient=0.0)
    return dict(reward=reward, policy=None, tokenizer=None, prompts=prompts, rows=[0], cfg=cfg, noise=0.0, step=2)


def test_a_reward_round_leaves_the_global_random_state_as_it_was(monkeypatch, tmp_path):
    """A reward model with dropout draws from torch's global generator while a round fine-tunes it. A run resumed past
    a round it built before it was killed does not build it again, so the round must leave that state as it was, or
    the resumed run's later draws drift from the uninterrupted run's (only the sampling was forked before)."""
    from pipeline import reward_rounds

    def dropout_training(*_, **__):  # what train-mode dropout does to the global generator
        torch.rand(16)
        return {"train_loss": 0.5}

    inputs = stubbed_round(monkeypatch, dropout_training)
    torch.manual_seed(3)
    before = torch.get_rng_state()
    with pytest.raises(RoundSaved):
        reward_rounds.build_round(2, out=tmp_path, device="cpu", **inputs)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_reward_round_forks_the_random_state_of_the_device_it_runs_on(monkeypatch, tmp_path):
    """The round's sampling and dropout draw on the device the policy and reward model are on (PPO's accelerator
    device): that device's random state is the one forked, not CUDA's whatever the device. (No such device here:
    the fork is recorded, not run.)"""
    import contextlib

    from pipeline import reward_rounds

    forks = []

    @contextlib.contextmanager
    def fork_rng(**kw):
        forks.append(kw)
        yield

    inputs = stubbed_round(monkeypatch, lambda *a, **k: {"train_loss": 0.5})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.random, "fork_rng", fork_rng)
    with pytest.raises(RoundSaved):
        reward_rounds.build_round(2, out=tmp_path, device=torch.device("xpu", 0), **inputs)
    assert forks == [{"devices": [torch.device("xpu", 0)], "device_type": "xpu"}]


def test_reward_rounds_fine_tune_the_reward_model_on_fresh_samples_and_resume_after_a_kill(inputs):
    """Iterated RLHF (reward_rounds: 2 of 4 steps): before step 3 the policy's own samples, labelled by the world's
    annotator, with 16 of the prompt data's own pairs replayed and GRM's next-token loss, fine-tune the reward
    model, which scores steps 3-4 and is saved with its pairs and record. A run SIGKILLed while saving that round
    (the model written, its state not) reruns to the uninterrupted run's history and weights; it logs every step
    instead of every second one, which adds the annotator's win rate against the start to every row and changes
    nothing else."""
    work = inputs[0]
    rounds = {"max_steps": 4, "save_steps": 2, "reward_rounds": 2, "reward_round_prompts": 48,
              "reward_round_epochs": 2, "reward_round_learning_rate": 1e-3, "reward_round_lm_loss_coefficient": 1.0,
              "reward_round_replay": 16}
    args = ["pipeline/ppo.py", ppo_recipe(work, **rounds)]
    proc = run_cli([*args, "run.name=rounds", "ppo.logging_steps=2"], cwd=work, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read(work, "rounds")
    assert [h["reward_round"] for h in metrics["history"]] == [1, 1, 2, 2]
    # the annotator's win rate against the start is measured on logged steps only
    assert ["annotator_vs_start" in h for h in metrics["history"]] == [False, True, False, True]
    assert all(0 <= h["annotator_vs_start"] <= 1 for h in metrics["history"][1::2])
    (record,) = metrics["reward_rounds"]
    assert record["round"] == 2 and record["step"] == 2 and record["prompts"] == 48
    assert record["pairs"] + record["ties_dropped"] == 48 and record["pairs"] > 0
    assert record["pairs_replayed"] == 16 and record["pairs_trained"] == record["pairs"] + 16  # the data's own pairs
    assert record["train_lm_loss"] > 0  # GRM's next-token loss, as in the reward stage
    assert 0 <= record["accuracy_before"] <= 1 and record["accuracy_after"] > record["accuracy_before"]
    folder = work / "runs/rounds/ppo/reward-rounds/round-2"
    pairs = json.loads((folder / "pairs.json").read_text())
    assert len(pairs) == record["pairs"] and {"prompt", "chosen", "rejected"} <= set(pairs[0])
    before, after = load_file(work / "rm/model.safetensors"), load_file(folder / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)  # fine-tuned
    config = json.loads((folder / "config.json").read_text())
    assert config["reward_mean"] == pytest.approx(record["reward_mean"]) and config["reward_std"] > 0

    killed = run_cli([*args, "run.name=rounds-killed"], cwd=work, env={**ENV, "PIPELINE_FAULT": "kill:reward-round"})
    partial = work / "runs/rounds-killed/ppo.partial"
    assert killed.returncode == -signal.SIGKILL and (partial / "reward-rounds/round-2.tmp/model.safetensors").is_file()
    assert not (partial / "reward-rounds/round-2").exists()
    resumed = run_cli([*args, "run.name=rounds-killed"], cwd=work, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    other = read(work, "rounds-killed")  # logged every step: logging changes nothing else
    assert all("annotator_vs_start" in h for h in other["history"])
    timeless = [[{k: v for k, v in h.items() if k not in ("elapsed_s", "annotator_vs_start")} for h in m["history"]]
                for m in (other, metrics)]
    assert timeless[0] == timeless[1]
    a, b = (load_file(work / f"runs/{n}/ppo/model.safetensors") for n in ("rounds", "rounds-killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert {k: v for k, v in other["reward_rounds"][0].items() if k != "seconds"} == \
        {k: v for k, v in record.items() if k != "seconds"}


def test_two_processes_with_lora(inputs):
    work = inputs[0]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(REPO / "pipeline/ppo.py"), str(ppo_recipe(work)), "run.name=ddp", "ppo.max_steps=2",
           "ppo.use_peft=true", "ppo.lora_r=4", "ppo.critic_init=policy", "ppo.heldout_prompts=null"]
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=600, env={**os.environ, **ENV})
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = read(work, "ddp", "manifest.json")
    assert manifest["num_processes"] == 2 and manifest["global_batch_size"] == 16
    out = work / "runs/ddp/ppo"
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert read(work, "ddp")["steps"] == 2
    assert proc.stdout.count("[ppo] step 1 ") + proc.stderr.count("[ppo] step 1 ") == 1  # only the main process logs


def test_our_ppo_under_zero2_and_zero3_shards_its_optimizer_trains_as_ddp_and_resumes_a_killed_run(inputs):
    """Launched with ZeRO-2 or ZeRO-3 (two processes), our PPO hands DeepSpeed its policy and critic as one module
    (pipeline/ppo_models.py): the optimizer state is split over the processes (a file per rank), and the policy comes
    out as DDP trains it (clipping off: DeepSpeed clips policy and critic as one norm, DDP each to its own). ZeRO-2 runs
    from a DeepSpeed JSON with its own `optimizer` section (as launch/accelerate/zero3_offload.json has; here torch's
    AdamW, which needs no build), which gets the recipe's learning rates and schedule; ZeRO-3 from zero3.yaml, with the
    rollouts generating from the gathered weights and the saved policy gathered from the shards. A ZeRO-3 run killed
    after a checkpoint resumes to the uninterrupted run's policy. (Until 2026-12-06 our PPO ran as DDP under a
    DeepSpeed launch, each process holding whole models and optimizer state.)"""
    work = inputs[0]
    ds_json = work / "ds_optimizer.json"
    ds_json.write_text(json.dumps({
        "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                  "weight_decay": "auto", "torch_adam": True}},
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto"}))
    zero2 = work / "zero2_optimizer.yaml"
    zero2.write_text((REPO / "launch/accelerate/zero3_offload.yaml").read_text().replace(
        "launch/accelerate/zero3_offload.json", str(ds_json)))
    args = ["pipeline/ppo.py", ppo_recipe(work), "ppo.max_steps=2", "ppo.save_steps=1", "ppo.save_total_limit=2",
            "ppo.max_grad_norm=1000", "ppo.heldout_prompts=null", "ppo.critic_learning_rate=3e-3"]

    def out(name):
        return work / "runs" / name / "ppo"

    def launched(config, name, env=None):
        proc = launch_cli(config, [*args, f"run.name={name}"], cwd=work, num_processes=2, env={**ENV, **(env or {})})
        if env is None:
            assert proc.returncode == 0, proc.stdout[-1000:] + proc.stderr[-3000:]
            assert "data-parallel" not in proc.stdout + proc.stderr
        return proc

    launched("cpu2", "ds-ddp")
    ddp = load_file(out("ds-ddp") / "model.safetensors")
    for config, name in ((str(zero2), "ds-zero2"), ("zero3", "ds-zero3")):
        launched(config, name)
        trained = load_file(out(name) / "model.safetensors")
        assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in ddp.items()}  # whole, not shards
        assert max_weight_diff(out(name), out("ds-ddp")) < 1e-4, name
        assert read(work, name)["steps"] == 2 and read(work, name, "manifest.json")["num_processes"] == 2
        assert [h["lr"] for h in read(work, name)["history"]] == [h["lr"] for h in read(work, "ds-ddp")["history"]]

    killed = launched("zero3", "ds-killed", env={"PIPELINE_FAULT": "kill:training:2"})
    assert killed.returncode != 0
    ckpt = work / "runs/ds-killed/ppo.partial/checkpoint-1"
    assert sorted(p.name for p in ckpt.rglob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    resumed = launched("zero3", "ds-killed")
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert max_weight_diff(out("ds-killed"), out("ds-zero3")) == 0.0


def test_the_deepspeed_config_takes_the_recipes_values_and_a_conflicting_one_stops_in_one_line(inputs, monkeypatch):
    """The launch's DeepSpeed config gets the recipe's micro-batch, clipping and AdamW settings where it says `auto`
    (or nothing); a value it sets otherwise stops the stage with one line naming it and the file. `ppo.use_cpu` under a
    DeepSpeed launch (Accelerate then stopped with "AcceleratorState has no attribute mixed_precision") stops before
    anything is written."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from pipeline import ppo_models
    from pipeline.cli import PipelineError

    cfg = PPOConfig(batch_size=32, num_minibatches=2, gradient_accumulation_steps=4, max_grad_norm=0.5)

    def launch(config):
        from accelerate.utils.deepspeed import HfDeepSpeedConfig

        hf_config = HfDeepSpeedConfig(config)
        hf_config.config = config  # one dict, as Accelerate's plugin holds it (deepspeed_config is hf_ds_config.config)
        plugin = SimpleNamespace(deepspeed_config=config, hf_ds_config=hf_config)
        return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin))

    config = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 3},
              "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto"}}}
    ppo_models.configure_deepspeed(launch(config), cfg)
    assert config["train_micro_batch_size_per_gpu"] == 4 and config["gradient_clipping"] == 0.5
    assert config["optimizer"]["params"] == {"lr": "auto", "betas": [0.9, 0.999], "eps": 1e-8,  # lr: accelerate's
                                             "weight_decay": cfg.weight_decay}
    assert ppo_models.is_zero3(launch(config))
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", "/cluster/ds.json")
    with pytest.raises(PipelineError, match=r"^/cluster/ds.json: sets gradient_clipping 1.0 \(the recipe's ppo keys "
                                            r"give 0.5\)"):
        ppo_models.configure_deepspeed(launch({"gradient_clipping": 1.0}), cfg)
    with pytest.raises(PipelineError, match=r"sets optimizer.params.weight_decay 0.1 \(the recipe's ppo keys give 0.0\)"):
        ppo_models.configure_deepspeed(launch({"optimizer": {"params": {"weight_decay": 0.1}}}), cfg)
    # a scheduler section gives way to the recipe's schedule when its params are auto; set otherwise, it says so
    config = {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}}}
    ppo_models.configure_deepspeed(launch(config), cfg)
    assert "scheduler" not in config
    with pytest.raises(PipelineError, match=r"sets scheduler.params warmup_num_steps 10: set them to auto \(the "
                                            r"recipe's ppo.lr_scheduler_type, warmup_steps"):
        ppo_models.configure_deepspeed(launch({"scheduler": {"params": {"warmup_num_steps": 10}}}), cfg)
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE")

    work = inputs[0]
    proc = run_cli(["pipeline/ppo.py", ppo_recipe(work), "run.name=bad-cpu", "ppo.use_cpu=true"], cwd=work,
                   env={**ENV, "ACCELERATE_USE_DEEPSPEED": "true"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "ppo.use_cpu is true under a DeepSpeed launch" in proc.stderr.strip().splitlines()[-1]
    assert not (work / "runs/bad-cpu").exists()


def test_qlora_merge_adapter_saves_the_full_precision_merge(inputs):
    """merged/ of a QLoRA run: the adapter merged into the unquantized base (as sft and dpo merge it), not into the
    4-bit weights (rounded, and saved as a bitsandbytes model the next stage would load quantized)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    work = inputs[0]
    proc = run_cli(["pipeline/ppo.py", ppo_recipe(work), "run.name=qlora", "ppo.max_steps=1", "ppo.use_peft=true",
                    "ppo.load_in_4bit=true", "ppo.merge_adapter=true", "ppo.critic_init=policy",
                    "ppo.heldout_prompts=null"], cwd=work, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = work / "runs/qlora/ppo"
    assert "quantization_config" not in json.loads((out / "merged/config.json").read_text())
    expected = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(work / "policy"), out).merge_and_unload()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    x = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        assert torch.allclose(merged(x).logits, expected(x).logits, atol=1e-5)


def test_grpo_of_the_whole_model_from_an_unmerged_adapter_stops_in_one_line(inputs):
    """TRL builds GRPO's KL reference from the start model's folder; an adapter folder is no model to it (it
    stopped with a traceback after loading, or, when the adapter recorded its base's base, used that as reference)."""
    from peft import LoraConfig, get_peft_model

    work, _, policy, tokenizer = inputs
    adapter = get_peft_model(type(policy)(policy.config), LoraConfig(r=2, target_modules=["q_proj"]))
    adapter.save_pretrained(work / "policy_lora")
    tokenizer.save_pretrained(work / "policy_lora")
    proc = run_cli(["pipeline/ppo.py", ppo_recipe(work, init_from=str(work / "policy_lora")), "run.name=bad_grpo",
                    "ppo.algorithm=grpo", "ppo.max_steps=1", "ppo.num_generations=4", "ppo.heldout_prompts=null"],
                   cwd=work, env=ENV)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "save that stage with merge_adapter: true" in proc.stderr.strip().splitlines()[-1]
    assert not (work / "runs/bad_grpo").exists()


def test_grpo_through_trl_with_the_verifier_reward(inputs):
    work = inputs[0]
    proc = run_cli(["pipeline/ppo.py", ppo_recipe(work), "run.name=grpo", "ppo.algorithm=grpo", "ppo.max_steps=2",
                    "ppo.num_generations=4", "ppo.verifier_weight=1.0", "ppo.heldout_prompts=null"], cwd=work, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read(work, "grpo")
    assert metrics["algorithm"] == "grpo" and [h["step"] for h in metrics["history"]] == [1, 2]
    for key in ("reward_raw", "reward", "score", "verifier", "distinct_2", "kl_per_token", "entropy", "reply_length",
                "ended"):
        assert key in metrics["history"][0], key
    assert (work / "runs/grpo/ppo/curves.png").is_file() and (work / "runs/grpo/ppo/model.safetensors").is_file()


def test_prompts_given_as_a_mixture_train(inputs):
    """recipes/small.yaml gives ppo its prompts as a mixture ({spec: fraction}): the stage's chat-template check
    used the spec as a dict key and stopped `make run` with "unhashable type: 'dict'"."""
    work = inputs[0]
    recipe = ppo_recipe(work, prompts={"world:preference": 0.5}, max_steps=1, save_steps=0,
                        heldout_prompts=None)
    proc = run_cli(["pipeline/ppo.py", recipe, "run.name=mixture"], cwd=work, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [h["step"] for h in read(work, "mixture")["history"]] == [1]


def test_your_own_prompts_with_answers_train_and_tool_offers_without_tools_are_said_once(inputs):
    """Prompts of your own with an `answer` (no world skill): the annotator, which judges world problems only, is
    not asked (it stopped PPO with a TypeError at the first logged step); the verifier checks them. Prompts that
    offer tools in a recipe without a tools section: one warning, whatever the algorithm (TRL's said nothing)."""
    work = inputs[0]
    rows = [{"prompt": f"What is {i} plus {i + 1}?", "answer": str(2 * i + 1)} for i in range(8)]
    rows += [{"prompt": [{"role": "user", "content": "Draw a 3."}],
              "tools": [{"type": "function", "function": {"name": "draw", "parameters": {"type": "object"}}}]}]
    spec = str(work / "own.jsonl")
    (work / "own.jsonl").write_text("".join(json.dumps({**r, "prompt": r["prompt"] if isinstance(r["prompt"], list)
                                                        else [{"role": "user", "content": r["prompt"]}]}) + "\n"
                                            for r in rows))
    for algorithm in ("ppo", "grpo"):
        extra = {"num_generations": 4} if algorithm == "grpo" else {}
        recipe = ppo_recipe(work, prompts=spec, max_steps=2, save_steps=0, heldout_prompts=None, logging_steps=1,
                            algorithm=algorithm, **extra)
        proc = run_cli(["pipeline/ppo.py", recipe, f"run.name=own_{algorithm}"], cwd=work, env=ENV)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("1 prompts offer tools, but the recipe has no `tools` section") == 1
        history = read(work, f"own_{algorithm}")["history"]
        assert len(history) == 2 and all(h.get("annotator_vs_start") is None for h in history)


def test_num_minibatches_splits_our_ppos_batch_only():
    """GRPO/RLOO batches TRL accepts (8 replies, 8 accumulation steps) were refused by our PPO's minibatch split,
    a key that does not apply to them (num_minibatches had to be set to 1 to run them)."""
    from pipeline.ppo_config import PPOConfig

    for algorithm in ("grpo", "rloo"):
        assert PPOConfig(algorithm=algorithm, batch_size=8, num_generations=4, gradient_accumulation_steps=8)
        assert PPOConfig(algorithm=algorithm, batch_size=3, num_generations=3)
    with pytest.raises(ValueError, match=r"batch_size \(8\) must split into num_minibatches \(2\)"):
        PPOConfig(algorithm="ppo", batch_size=8, gradient_accumulation_steps=8)


@pytest.mark.parametrize("override, expected", [
    ("ppo.reward_model={work}/policy",
     "error: override 'ppo.reward_model={work}/policy': ppo.reward_model: {work}/policy is not a reward model (a"),
    ("ppo.batch_size=7", "batch_size (7) must split into num_minibatches"),
    ("ppo.reward_model=/nowhere/rm", "/nowhere/rm"),
    ("ppo.reward_model=reward", "has no `reward` section"),
    ("ppo.implicit_reward=/nowhere/dpo", "/nowhere/dpo"),
    ("ppo.implicit_reward_beta=0", "implicit_reward_beta must be positive"),
    ("ppo.algorithm=grpo ppo.length_split=3",
     "error: override 'ppo.length_split=3': ppo.length_split splits the forward passes of our PPO"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(inputs, override, expected):
    work = inputs[0]
    before = sorted(p.name for p in work.rglob("*"))
    proc = run_cli(["pipeline/ppo.py", ppo_recipe(work), "run.name=bad", *override.format(work=work).split()],
                   cwd=work, env=ENV)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert expected.format(work=work) in line
    assert not (work / "runs/bad").exists() and sorted(p.name for p in work.rglob("*")) == before


GRPO_CONFLICT = ("error: override 'ppo.algorithm=grpo': ppo.{key} {what} our PPO (algorithm: ppo), not of grpo")


@pytest.mark.parametrize("entry", ["check", "runner", "stage"])
@pytest.mark.parametrize("more, key, what", [
    ([], "length_split", "splits the forward passes of"),
    (["ppo.length_split=1"], "implicit_reward", "is a per-token reward of"),
])
def test_keys_of_our_ppo_stop_grpo_before_any_stage_starts(tmp_path, entry, more, key, what):
    """recipes/small.yaml sets length_split: 3 and implicit_reward: dpo, which GRPO/RLOO do not run: `--check
    ppo.algorithm=grpo` said "ok", and the runner trained every stage before ppo stopped at its start (~40 minutes).
    The runner and --check now stop on the same line as the stage, which names the override that set the key."""
    rm = tmp_path / "rm"
    rm.mkdir()
    recipe = tiny_recipe(tmp_path, sft=None, ppo={"init_from": "pretrain", "reward_model": str(rm), "max_steps": 2,
                                                   "length_split": 3, "implicit_reward": "pretrain"})
    args = {"check": ["pipeline/run.py", recipe, "--check"], "runner": ["pipeline/run.py", recipe],
            "stage": ["pipeline/ppo.py", recipe]}[entry]
    proc = run_cli([*args, "ppo.algorithm=grpo", *more], cwd=tmp_path, env=ENV)
    expected = GRPO_CONFLICT.format(key=key, what=what)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines() if entry == "check" else proc.stderr.strip().splitlines()[-1:]
    assert expected in [line.strip() for line in lines], proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not (tmp_path / "runs").exists()  # no stage started


@pytest.mark.parametrize("overrides, expected", [
    (["ppo.reward_rounds=2", "ppo.reward_ensemble=[pretrain]"], "override 'ppo.reward_ensemble=[pretrain]': "
     "ppo.reward_rounds fine-tunes one reward model; it does not run with ppo.reward_ensemble"),
    (["ppo.reward_model=reward"], "override 'ppo.reward_model=reward': ppo.reward_model is the `reward` stage, but "
     "the recipe has no `reward` section"),
    (["ppo.image_verifier_weight=1.0"], "override 'ppo.image_verifier_weight=1.0': ppo.image_verifier_weight rewards "
     "tool tasks: it needs a `tools` section"),
])
def test_ppo_key_conflicts_are_settings_checks_of_the_runner_and_check(tmp_path, overrides, expected):
    """The other conflicts ppo's keys alone show stopped the stage only at its start, after the stages upstream ran;
    the runner and --check make them too (check.check_stage_config)."""
    from pipeline import check, cli

    recipe = load_recipe(tiny_recipe(tmp_path, sft=None, ppo={"init_from": "pretrain", "reward_model": str(tmp_path),
                                                              "max_steps": 4}), overrides)
    with pytest.raises(cli.PipelineError) as err:
        check.check_stage_config(recipe, "ppo")
    assert str(err.value).startswith(expected)


def test_read_prompts_says_what_it_read_for_the_manifest(tmp_path, monkeypatch):
    """ppo's manifest records its prompts (source, rows, format) as every other stage records its data: a prompt
    file as prompts, pairs without a prompt column as the shared beginnings of their conversations."""
    from conftest import write_jsonl
    from pipeline import data, ppo

    read_rows = data.read_rows_by_part
    recipe = load_recipe(tiny_recipe(tmp_path))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 2 + 3?"}, {"prompt": "Say hi."}])
    turn = [{"role": "user", "content": "What is 2 + 3?"}]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"chosen": turn + [{"role": "assistant", "content": "5"}],
         "rejected": turn + [{"role": "assistant", "content": "6"}]}])
    reads = []
    monkeypatch.setattr(data, "read_rows_by_part",
                        lambda spec, *a, **kw: reads.append(spec) or read_rows(spec, *a, **kw))
    ds, info = ppo.read_prompts(prompts, recipe)
    assert len(ds) == 2 and info == {"source": prompts, "rows": 2, "format": "prompts"}
    ds, info = ppo.read_prompts(pairs, recipe)
    assert ds["prompt"] == [turn] and info == {"source": pairs, "rows": 1,
                                               "format": "the prompts of implicit preference pairs"}
    assert reads == [prompts, pairs]  # each spec read once (a hub dataset or a LLaMA-Factory entry: one conversion)


def test_ppo_prompt_lists_read_each_dataset_as_prompts_or_pairs(tmp_path):
    """Each dataset of ppo.prompts is prompts or preference pairs by its own first row: a list of a prompt file and a
    pair file read both (before, the first row decided for all: the pairs' rows lacked 'prompt'). Pairs are read as
    the preference stages read them: an Anthropic HH prompt is its turns, not its markers as one user message."""
    from conftest import write_jsonl
    from pipeline import ppo

    recipe = load_recipe(tiny_recipe(tmp_path))
    turn = [{"role": "user", "content": "What is 2 + 3?"}]
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": [{"role": "user", "content": "Say hi."}]}])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"chosen": turn + [{"role": "assistant", "content": "5"}],
         "rejected": turn + [{"role": "assistant", "content": "6"}]}])
    hh = write_jsonl(tmp_path / "hh.jsonl", [
        {"prompt": "\n\nHuman: Name a colour.\n\nAssistant: Red.\n\nHuman: Another?\n\nAssistant:",
         "chosen": " Blue.", "rejected": " No."}])
    text = write_jsonl(tmp_path / "text.jsonl", [{"prompt": "Say hi."}])  # text beside messages: a user turn
    for spec in ([prompts, pairs], [pairs, prompts], [text, pairs]):
        ds, info = ppo.read_prompts(spec, recipe)
        assert ds["prompt"] == [[{"role": "user", "content": "Say hi."}], turn]  # the prompts first
        assert info["format"] == "prompts + the prompts of implicit preference pairs"
    # reward rounds replay the pairs' rows only (the prompt rows' chosen is None: encode failed mid-training)
    from pipeline import reward_rounds

    ds, _ = ppo.read_prompts([prompts, pairs], recipe, pairs=True)
    assert reward_rounds.replayable(ds) == [1]
    assert [p["chosen"] for p in reward_rounds.replay_pairs(ds, 4, seed=0)] == [ds[1]["chosen"]]
    # `--check` reads the list as the stage does (it stopped at the pairs' first row: "missing column 'prompt'")
    from pipeline import check, cluster

    listed = load_recipe(tiny_recipe(tmp_path), [f"ppo.prompts=[{prompts},{pairs}]"])
    stage = check.check_stage(listed, "ppo", cluster.launch_from_command(None), None, set())
    assert not [e for e in stage.errors if e.startswith("ppo.prompts")], stage.errors
    ds, info = ppo.read_prompts(hh, recipe, pairs=True)
    assert ds["prompt"] == [[{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."},
                             {"role": "user", "content": "Another?"}]]
    assert ds["chosen"] == [[{"role": "assistant", "content": "Blue."}]]
    assert info["format"] == "the prompts of hh_explicit preference pairs"


def test_ppo_csv_prompts_hold_messages_as_json(tmp_path):
    """A CSV cell holding a JSON list of messages is those messages, in ppo's prompts as in eval's (it was one user
    turn of JSON text), written with indent=2 too (eval took that for text); a bad message stops the stage naming its
    line; a prompt that is JSON of other objects (no role) is a text prompt, as it would be in JSON Lines."""
    import csv

    from pipeline import ppo
    from pipeline.cli import PipelineError

    recipe = load_recipe(tiny_recipe(tmp_path))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 3?"}]
    rows = [["prompt"], [json.dumps(messages)], [json.dumps(messages[1:], indent=2)]]  # "[\n  {": JSON all the same
    path = tmp_path / "p.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows + [['[{"role": "usr", "content": "2 + 3?"}]']])
    line = 4 + rows[2][0].count("\n")  # the line the fourth record starts on
    with pytest.raises(PipelineError, match=rf"^{re.escape(str(path))}: line {line}: message 0: unknown role 'usr'"):
        ppo.read_prompts(str(path), recipe)
    records = '[{"name": "Ada", "born": 1815}]'
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows + [[records]])
    ds, _ = ppo.read_prompts(str(path), recipe)
    assert ds["prompt"] == [messages, messages[1:], [{"role": "user", "content": records}]]


@pytest.mark.parametrize("stage", ["sft", "dpo", "kto", "ppo"])
def test_check_reads_held_out_prompts_as_the_stage_reads_them(tmp_path, stage):
    """A stage's heldout_prompts are read as eval reads its prompts (pipeline/heldout.py): `--check` read sft's as
    conversations and dpo's and kto's as pairs, and stopped a valid file of prompts and answers; a bad row is still
    named."""
    from conftest import write_jsonl
    from pipeline import check, cluster

    good = write_jsonl(tmp_path / "heldout.jsonl", [{"prompt": "What is 2 + 2?", "answer": "4"}, {"prompt": "Hi."}])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "What is 2 + 2?", "answer": ["4"]}])
    for spec, expected in ((good, []), (bad, [f"{stage}.heldout_prompts: {bad}: line 1: 'answer' must be non-empty "
                                               f"text or a number, got ['4']"])):
        recipe = load_recipe(tiny_recipe(tmp_path), [f"{stage}.heldout_prompts={spec}"])
        errors = check.check_stage(recipe, stage, cluster.launch_from_command(None), None, set()).errors
        assert [e for e in errors if "heldout_prompts" in e] == expected
