"""The dpo stage's reference-free losses (pipeline/reference_free.py): SimPO, CPO and ORPO as the papers write them,
trained without a reference model, refused in one line where they cannot work."""

import json
import math

import pytest
import torch

from conftest import run_cli, tiny_recipe
from pipeline.reference_free import pair_losses

FAST = ["dpo.max_steps=8", "dpo.per_device_train_batch_size=8", "dpo.per_device_eval_batch_size=16",
        "dpo.learning_rate=1e-3", "dpo.logging_steps=2", "dpo.save_strategy=no", "dpo.use_cpu=true",
        "dpo.bf16=false", "dpo.gradient_checkpointing=false", "dpo.max_length=128", "dpo.report_to=none",
        "dpo.heldout_prompts="]


def logsigmoid(x):
    return -math.log1p(math.exp(-x))


def batch(lengths, seed=0):
    """Per-token log-probs of 2 x pairs replies (chosen first) and completion masks with the given lengths."""
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(len(lengths), 7, generator=g, dtype=torch.float64) * 3
    mask = torch.zeros(len(lengths), 7, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, 7 - n:] = 1
    return logps, mask


def by_hand(logps, mask):
    """Each reply's summed and mean log-prob, and the chosen tokens' mean negative log-prob, with plain loops."""
    replies = [[float(p) for p, m in zip(row, keep) if m] for row, keep in zip(logps, mask)]
    sums = [sum(r) for r in replies]
    means = [sum(r) / len(r) for r in replies]
    pairs = len(replies) // 2
    chosen_tokens = [p for r in replies[:pairs] for p in r]
    return sums, means, -sum(chosen_tokens) / len(chosen_tokens), pairs


def test_each_loss_is_its_papers_formula():
    logps, mask = batch([3, 6, 2, 5, 1, 7])  # 3 pairs: chosen lengths 3, 6, 2; rejected 5, 1, 7
    sums, means, nll, pairs = by_hand(logps, mask)
    beta, gamma = 2.0, 0.7
    w, lo = range(pairs), range(pairs, 2 * pairs)

    def odds(a):
        return a - math.log(1 - math.exp(a))

    expected = {
        "simpo": sum(-logsigmoid(beta * (means[i] - means[j]) - gamma) for i, j in zip(w, lo)) / pairs,
        "cpo": sum(-logsigmoid(beta * (sums[i] - sums[j])) for i, j in zip(w, lo)) / pairs + nll,
        "orpo": nll - beta * sum(logsigmoid(odds(means[i]) - odds(means[j])) for i, j in zip(w, lo)) / pairs,
        "sft": nll,
    }
    for name, value in expected.items():
        got = pair_losses([name], [1.0], logps, mask, beta, gamma)
        assert float(got.loss) == pytest.approx(value, rel=1e-9), name
        assert float(got.nll) == pytest.approx(nll, rel=1e-9)
    both = pair_losses(["simpo", "sft"], [1.0, 0.5], logps, mask, beta, gamma)  # CPO-SimPO, weighted
    assert float(both.loss) == pytest.approx(expected["simpo"] + 0.5 * nll, rel=1e-9)


def test_rewards_are_what_the_loss_compares():
    """SimPO and ORPO compare mean log-probs per token, CPO summed ones: the logged rewards (beta x those) agree
    with the loss on which reply is ahead; logps/* stay the summed log-probs, as TRL logs them."""
    logps, mask = batch([2, 7, 6, 1], seed=3)
    sums, means, _, pairs = by_hand(logps, mask)
    for name, measure in (("simpo", means), ("orpo", means), ("cpo", sums)):
        got = pair_losses([name], [1.0], logps, mask, 0.5, 0.0)
        assert got.chosen_rewards.tolist() == pytest.approx([0.5 * m for m in measure[:pairs]]), name
        assert got.rejected_rewards.tolist() == pytest.approx([0.5 * m for m in measure[pairs:]]), name
        assert got.chosen_logps.tolist() == pytest.approx(sums[:pairs])
    logged = pair_losses(["orpo"], [1.0], logps, mask, 0.5, 0.0).logged()
    assert {"rewards/margins", "rewards/accuracies", "log_odds_ratio", "nll_loss"} <= set(logged)


def test_orpo_stays_finite_when_the_model_is_sure_of_a_reply():
    """A reply of log-prob 0 has infinite odds: the loss and its gradient stay finite."""
    logps = torch.tensor([[0.0, 0.0], [-1.0, -2.0]], requires_grad=True)
    loss = pair_losses(["orpo"], [1.0], logps, torch.ones(2, 2), 0.1, 0.0).loss
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(logps.grad).all()


@pytest.mark.parametrize("overrides, message", [
    (["dpo.loss_type=[sigmoid, simpo]"], "dpo.loss_type ['sigmoid', 'simpo']: simpo compare the policy's own "
                                         "log-probs and load no reference model; combine them with each other and "
                                         "`sft` only, not with sigmoid"),
    (["dpo.loss_type=[orpo]", "dpo.precompute_ref_log_probs=true"], "dpo.precompute_ref_log_probs does nothing "
                                                                    "with the reference-free loss_type ['orpo']"),
    (["dpo.loss_type=[simpoo]"], "'simpoo' is not a DPOConfig loss_type"),
])
def test_what_cannot_work_stops_in_one_line_before_anything_runs(tmp_path, overrides, message):
    recipe = tiny_recipe(tmp_path, dpo={"max_steps": 2})
    for args in (["pipeline/dpo.py", recipe, *overrides], ["pipeline/run.py", recipe, *overrides, "--check"]):
        proc = run_cli(args, cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert message in proc.stderr + proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not (tmp_path / "runs").exists()


def dpo_in_process(tiny_run, monkeypatch, name, *overrides):
    """The dpo stage run here from the tiny run's sft, counting the models it loads: (checkpoints loaded, metrics)."""
    from pipeline import dpo, models

    work, recipe, _ = tiny_run
    loaded = []
    load = models.load_causal_lm
    monkeypatch.setattr(models, "load_causal_lm", lambda *a, **k: loaded.append(a[1]) or load(*a, **k))
    monkeypatch.chdir(work)
    dpo.main([str(recipe), f"run.name={name}", f"dpo.init_from={work / 'runs/tiny/sft'}", *FAST, *overrides])
    return loaded, json.loads((work / "runs" / name / "dpo" / "metrics.json").read_text())


def test_orpo_trains_without_a_reference_model(tiny_run, monkeypatch):
    """The stage loads one model (the policy), trains ORPO on pairs and moves their margin; the loss it logs is
    the formula's."""
    work = tiny_run[0]
    loaded, metrics = dpo_in_process(tiny_run, monkeypatch, "orpo", "dpo.loss_type=[orpo]", "dpo.beta=0.5",
                                     "dpo.max_steps=24", "dpo.learning_rate=2e-3",
                                     "dpo.eval_dataset=world:preference")  # evaluated on its training pairs
    assert len(loaded) == 1  # the policy: no reference
    first = metrics["history"][0]
    assert metrics["eval_rewards/margins"] > first["rewards/margins"] + 0.02
    assert metrics["eval_log_odds_ratio"] > first["log_odds_ratio"]
    assert metrics["eval_rewards/accuracies"] > 0.5
    manifest = json.loads((work / "runs/orpo/dpo/manifest.json").read_text())
    assert manifest["config"]["loss_type"] == ["orpo"] and manifest["config"]["precompute_ref_log_probs"] is False


def test_sft_alone_loads_no_reference_and_its_loss_is_the_nll(tiny_run, monkeypatch):
    """`[sft]` (SFT on the chosen replies) reads no reference: TRL loaded and ran one for nothing."""
    loaded, metrics = dpo_in_process(tiny_run, monkeypatch, "sft_alone", "dpo.loss_type=[sft]", "dpo.max_steps=4")
    assert len(loaded) == 1
    assert len(metrics["history"]) == 2  # logged every 2 of 4 steps: the step loss is the chosen replies' NLL
    for logged in metrics["history"]:
        assert logged["loss"] == pytest.approx(logged["nll_loss"], abs=1e-4)


def test_simpo_with_sft_and_length_split_gives_the_loss_of_whole_batches(tiny_run):
    """CPO-SimPO through length_split 3: the same losses as whole batches, so the split reaches these losses too."""
    work, recipe, _ = tiny_run
    results = []
    for name, split in (("simpo_whole", 1), ("simpo_split", 3)):
        proc = run_cli(["pipeline/dpo.py", recipe, f"run.name={name}", f"dpo.init_from={work / 'runs/tiny/sft'}",
                        *FAST, "dpo.loss_type=[simpo, sft]", "dpo.beta=2.0", f"dpo.length_split={split}"], cwd=work)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(json.loads((work / "runs" / name / "dpo" / "metrics.json").read_text()))
    whole, split = results
    assert split["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-4)
    assert split["eval_loss"] == pytest.approx(whole["eval_loss"], rel=1e-4)
    assert whole["eval_nll_loss"] > 0 and "eval_rewards/margins" in whole


def test_iterated_orpo_keeps_the_initial_model_to_measure_each_rounds_kl(tiny_run):
    """rounds > 1 load the initial model for the KL of each round's samples, with a reference-free loss too."""
    work, recipe, _ = tiny_run
    proc = run_cli(["pipeline/dpo.py", recipe, "run.name=orpo_rounds", f"dpo.init_from={work / 'runs/tiny/sft'}",
                    *FAST, "dpo.loss_type=[orpo]", "dpo.max_steps=4", "dpo.rounds=2", "dpo.round_labeller=annotator",
                    "dpo.round_max_prompts=16", "dpo.round_max_new_tokens=16"], cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads((work / "runs/orpo_rounds/dpo/metrics.json").read_text())["rounds"]
    assert [r["round"] for r in records] == [1, 2] and all(math.isfinite(r["kl"]) for r in records)
    assert records[1]["pairs"] > 0


def test_check_counts_no_reference_model_in_memory(tmp_path):
    """`--check`'s memory estimate: DPO holds a frozen reference, a reference-free loss none (unless rounds > 1)."""
    from pipeline.memory import profile_of
    from pipeline.recipe import load_recipe

    path = tiny_recipe(tmp_path, dpo={"max_steps": 2})
    frozen = {overrides: profile_of(load_recipe(path, list(overrides)), "dpo").frozen_models
              for overrides in [(), ("dpo.loss_type=[orpo]",), ("dpo.loss_type=[simpo, sft]",),
                                ("dpo.loss_type=[sft]",),
                                ("dpo.loss_type=[orpo]", "dpo.rounds=2", "dpo.round_labeller=annotator")]}
    assert list(frozen.values()) == [1, 0, 0, 0, 1]


def test_dpo_with_a_reference_prints_no_deprecation_trl_cannot_avoid(tiny_run, monkeypatch):
    """TRL's DPO trainer reads transformers' deprecated `is_gradient_checkpointing` for every reference forward pass,
    whatever the recipe says: `make run` printed the FutureWarning in the dpo stage. Each stage hides that one."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # over pytest's filterwarnings, which hide FutureWarnings
        loaded, _ = dpo_in_process(tiny_run, monkeypatch, "quiet", "dpo.max_steps=2")
    assert len(loaded) == 2  # the policy and its reference: the reference's passes ran
    assert not [str(w.message) for w in caught if "is_gradient_checkpointing` is deprecated" in str(w.message)]
