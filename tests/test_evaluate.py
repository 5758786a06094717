"""The eval stage: metric functions on hand-made inputs, and pipeline/evaluate.py through its real command lines."""

import json
import math

import numpy as np
import pytest
import torch

from pipeline import cli, evaluate, judges, metrics as M, runs
from pipeline.cli import PipelineError
from pipeline.recipe import load_recipe
from conftest import run_cli, tiny_recipe

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models on a shared CPU: one thread is faster than two that wait
SMALL_EVAL = {"max_prompts": 16, "num_samples": 2, "perplexity_max_rows": 8, "bootstrap": 200}


# ---------------------------------------------------------------------------------------------- metric functions


def test_win_rate_counts_ties_half():
    outcomes = M.pairwise_outcomes([1.0, 0.2, 3, True, 0], [0.5, 0.2, 4, False, 0])
    assert outcomes.tolist() == [1, 0, -1, 1, 0]
    assert M.win_rate(outcomes) == pytest.approx((2 + 2 / 2) / 5)
    summary = M.win_rate_summary(outcomes, n_boot=500)
    assert (summary["wins"], summary["ties"], summary["losses"], summary["n"]) == (2, 2, 1, 5)
    assert summary["ci"][0] <= summary["win_rate"] <= summary["ci"][1]
    assert M.win_rate([0, 0, 0]) == 0.5 and M.win_rate([-1, -1]) == 0.0
    assert M.win_rate([]) is None and M.win_rate_summary([]) is None


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small, large = rng.random(50) < 0.3, rng.random(2000) < 0.3
    lo, hi = M.bootstrap_ci(small, n_boot=2000, seed=0)
    assert lo < small.mean() < hi
    assert M.bootstrap_ci(small, n_boot=2000, seed=0) == (lo, hi)  # seeded: reproducible
    lo_l, hi_l = M.bootstrap_ci(large, n_boot=2000, seed=0)
    # the normal approximation of a proportion's 95% interval: 2 * 1.96 * sqrt(p (1 - p) / n)
    assert hi_l - lo_l == pytest.approx(2 * 1.96 * math.sqrt(0.3 * 0.7 / 2000), rel=0.15)
    assert hi_l - lo_l < (hi - lo) / 4
    assert M.bootstrap_ci([0.7, 0.7, 0.7]) == pytest.approx((0.7, 0.7))
    assert M.bootstrap_ci([]) is None and M.mean_ci([]) is None
    assert M.mean_ci([1, 0, 1, 1])["mean"] == 0.75 and M.mean_ci([1, 0, 1, 1])["n"] == 4


def test_sequence_kl_sums_token_log_prob_differences():
    policy = [[-0.5, -0.25], [-1.0], [-2.0, -1.0, -0.5]]
    reference = [[-1.5, -0.25], [-0.5], [-3.0, -1.5]]  # the reference may tokenize the same text differently
    assert M.sequence_log_ratios(policy, reference).tolist() == pytest.approx([1.0, -0.5, 1.0])
    assert M.sequence_kl(policy, reference) == pytest.approx(0.5)
    assert M.sequence_kl(policy, policy) == 0.0
    assert M.sequence_kl([], []) is None
    with pytest.raises(ValueError):
        M.sequence_kl(policy, reference[:2])


def test_distinct_n_counts_unique_ngrams_over_all_texts():
    texts = ["a b a b", "A b c"]
    assert M.distinct_n(texts, 1) == pytest.approx(3 / 7)  # a b a b a b c
    assert M.distinct_n(texts, 2) == pytest.approx(3 / 5)  # ab ba ab | ab bc
    assert M.distinct_n(["same reply", "same reply"], 2) == 0.5
    assert M.distinct_n(["one"], 2) is None
    with pytest.raises(ValueError):
        M.distinct_n(texts, 0)


def test_exact_match_and_perplexity():
    assert M.exact_match(" The  Cat. ", "the cat") and not M.exact_match("the cat", "the dog")
    assert not M.exact_match(None, "x")
    assert M.perplexity([[math.log(0.5), math.log(0.5)], [math.log(0.25)]]) == pytest.approx(2 ** (4 / 3))
    assert M.perplexity([]) is None and M.perplexity([[]]) is None


def test_reference_answers_without_a_world_skill_are_checked_by_exact_match():
    is_correct, annotator_outcome = judges.is_correct, judges.annotator_outcome

    assert is_correct({"prompt": "capital of France?", "answer": "Paris"}, "Sure! The answer is paris.") is True
    assert is_correct({"prompt": "capital of France?", "answer": "Paris"}, "Paris") is True
    assert is_correct({"prompt": "capital of France?", "answer": "Paris"}, "Lyon") is False
    assert is_correct({"prompt": "hi"}, "hello") is None  # no reference: no verifier
    assert is_correct({"prompt": "2 + 9?", "skill": "add", "answer": "11"}, "The answer is 11.") is True
    world_row = {"prompt": "2 + 9?", "skill": "add", "answer": "11"}
    assert annotator_outcome(world_row, "Sure! The answer is 11.", "Ugh, fine. The answer is 11.") == 1
    assert annotator_outcome(world_row, "Sure! The answer is 1.", "Sure! The answer is 11.") == -1
    assert annotator_outcome(world_row, "Sure! The answer is 11.", "Sure! The answer is 11.") == 0
    assert annotator_outcome({"prompt": "hi", "answer": "x"}, "a", "b") is None


def test_checkpoints_go_by_stage_name_or_the_shortest_distinct_tail_of_their_path():
    cps = [runs.Checkpoint("sft", "/w/runs/small/sft", "f", "stage"),
           runs.Checkpoint("runs/small/pretrain", "/w/runs/small/pretrain", "f", "local"),
           runs.Checkpoint("a/x/lora", "/w/a/x/lora", "f", "local"),
           runs.Checkpoint("b/x/lora", "/w/b/x/lora", "f", "local"),
           runs.Checkpoint("org/model", "org/model", "f", "hub")]
    names = evaluate.display_names(None, cps)
    assert [names[cp.path] for cp in cps] == ["sft", "small/pretrain", "a/x/lora", "b/x/lora", "org/model"]


# ---------------------------------------------------------------------------------------------- recipe and models


def test_eval_defaults_to_every_model_stage_and_runs_after_them(tmp_path):
    from pipeline.run import order_stages

    recipe = load_recipe(tiny_recipe(tmp_path, eval={}))
    keys = recipe.keys("eval")
    assert keys.checkpoints == ["pretrain", "sft"] and keys.baseline == "pretrain"
    assert keys.reference == "pretrain" and keys.reward_model is None
    path = tiny_recipe(tmp_path, reward={"max_steps": 1})
    text = path.read_text()  # the eval section first: the runner still runs it last
    path.write_text("eval: {baseline: sft}\n" + text)
    recipe = load_recipe(path)
    keys = recipe.keys("eval")
    assert keys.checkpoints == ["pretrain", "sft"] and keys.baseline == "sft" and keys.reward_model == "reward"
    assert order_stages(recipe)[-1] == "eval"


def test_sample_log_probs_are_those_the_samples_were_drawn_with(tiny_run):
    """The KL needs log pi(y|x) of the policy's own samples: re-scoring the sampled ids in right-padded batches must
    give the log-probabilities generate drew them with (no hidden top-k, no padding or position shift)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.generation import prompt_ids, token_logprobs

    work, _, _ = tiny_run
    path = work / "runs/tiny/pretrain"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    prompts = ["What is 2 + 3?", "Sort these words alphabetically: cat bee dog.", "Hi"]
    enc = tokenizer([tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True) for p in prompts],
                    return_tensors="pt", padding=True, add_special_tokens=False)
    torch.manual_seed(0)
    out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=None, max_new_tokens=12,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    new = out.sequences[:, enc["input_ids"].shape[1]:]
    drawn = torch.stack(out.logits, 1).log_softmax(-1).gather(2, new.unsqueeze(-1)).squeeze(-1)
    seqs, starts, expected = [], [], []
    for i, p in enumerate(prompts):
        row = new[i].tolist()
        n = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
        head = prompt_ids(tokenizer, p)
        seqs.append(head + row[:n])
        starts.append(len(head))
        expected.append(drawn[i, :n].sum().item())
    got = [sum(lp[s - 1:]) for lp, s in zip(token_logprobs(model, seqs, batch_size=2, progress=False), starts)]
    assert got == pytest.approx(expected, abs=1e-4)


# ---------------------------------------------------------------------------------------------- the stage


@pytest.fixture(scope="module")
def ranked(tiny_run, tmp_path_factory):
    """The runner on a recipe whose SFT (from the tiny pretrain) trains long enough to learn the reply format,
    followed by the eval stage comparing it with its base."""
    tiny_work, _, _ = tiny_run
    base = str(tiny_work / "runs/tiny/pretrain")
    work = tmp_path_factory.mktemp("ranked")
    recipe = tiny_recipe(work, run={"name": "ranked"}, pretrain=None,
                         sft={"init_from": base, "max_steps": 150, "learning_rate": 3e-3,
                              "per_device_train_batch_size": 16, "heldout_prompts": "", "eval_dataset": ""},
                         eval={"checkpoints": [base, "sft"], "num_samples": 2, "perplexity_max_rows": 20})
    proc = run_cli(["pipeline/run.py", recipe], cwd=work, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return work, recipe, base, proc


def test_runner_evaluation_ranks_sft_above_its_base(ranked, monkeypatch):
    work, recipe, base, proc = ranked
    plan = proc.stdout[:proc.stdout.index("===")]
    assert plan.index("sft        run") < plan.index("eval       run")
    out = work / "runs/ranked/eval"
    metrics = json.loads((out / "metrics.json").read_text())
    # a folder goes by the tail of its path, a stage by its name
    assert metrics["baseline"] == "tiny/pretrain" and list(metrics["checkpoints"]) == ["tiny/pretrain", "sft"]
    sft, pre = metrics["checkpoints"]["sft"], metrics["checkpoints"]["tiny/pretrain"]
    assert pre["path"] == base and pre["ref"] == base
    # the world's annotator (correct, then polite, then concise) prefers SFT's replies, beyond the interval
    win = sft["win_rate"]["annotator"]
    assert win["n"] == 40 and win["ci"][0] > 0.5, win
    assert metrics["win_rates"]["annotator"]["tiny/pretrain"]["sft"]["win_rate"] == pytest.approx(1 - win["win_rate"])
    assert sft["win_rate"]["verifier"]["win_rate"] >= 0.5 and sft["accuracy"] >= pre["accuracy"]
    assert sft["ended"] > pre["ended"] and sft["perplexity"] < pre["perplexity"]
    assert sft["kl"] > 0 and pre["kl"] == 0.0 and "win_rate" not in pre
    assert pre["accuracy_ci"][0] <= pre["accuracy"] <= pre["accuracy_ci"][1]
    assert set(sft["accuracy_per_skill"]) == {"add", "compare", "reverse", "sort", "count"}
    assert "reward" not in sft and "reward" not in metrics["win_rates"]  # no reward model: absent, not zero

    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 40 and all(set(s["replies"]) == {"tiny/pretrain", "sft"} for s in samples)
    reply = samples[0]["replies"]["sft"]
    assert isinstance(reply["correct"], bool) and len(reply["samples"]) == 2 and "vs_baseline" in reply
    report = (out / "report.md").read_text()
    assert "| `tiny/pretrain` |" in report and "| `sft` |" in report and "### annotator" in report
    assert "![accuracy](accuracy.png)" in report and "## Example replies" in report
    for plot in ("accuracy.png", "win_rate.png"):
        assert (out / plot).read_bytes()[:4] == b"\x89PNG"
    assert not (out / "reward.png").exists()

    monkeypatch.chdir(work)  # the runner would skip eval now: nothing it reads has changed
    assert runs.up_to_date(load_recipe(recipe), "eval") == (True, "up to date")


def test_a_stages_heldout_accuracy_is_the_eval_stages_on_the_same_checkpoint(ranked, monkeypatch):
    """sft/dpo/ppo score their held-out prompts with pipeline/heldout.py; the eval stage judges with the same
    replies and verdicts, so the two report the same accuracy for one checkpoint, prompts and budget."""
    from pipeline import data, heldout

    work, recipe_path, _, _ = ranked
    monkeypatch.chdir(work)
    recipe = load_recipe(recipe_path)
    keys = recipe.keys("eval")
    evaluated = json.loads((work / "runs/ranked/eval/metrics.json").read_text())["checkpoints"]["sft"]
    rows = data.load(keys.prompts, "prompts", recipe).to_list()
    stage = heldout.score_checkpoint(recipe, str(work / "runs/ranked/sft"), rows, max_new_tokens=keys.max_new_tokens,
                                     batch_size=keys.batch_size, label="sft")
    assert stage["n"] == evaluated["verified"] == 40 and evaluated["accuracy"] > 0
    assert stage["accuracy"] == evaluated["accuracy"]
    assert stage["per_skill"] == {s: v["mean"] for s, v in evaluated["accuracy_per_skill"].items()}


def test_user_prompt_file_without_verifiers_has_no_verifier_metrics(tiny_run, tmp_path):
    """The issue's command on a file that is not from the world; a reward model still judges."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    work, _, _ = tiny_run
    pre, sft = work / "runs/tiny/pretrain", work / "runs/tiny/sft"
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(pre, num_labels=1)
    rm.config.reward_mean, rm.config.reward_std = 0.5, 2.0
    rm.save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(pre).save_pretrained(tmp_path / "rm")
    prompts = tmp_path / "my_prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Tell me about the sea."}) + "\n"
                       + json.dumps({"prompt": [{"role": "system", "content": "Be brief."},
                                                {"role": "user", "content": "Name a color."}]}) + "\n"
                       + json.dumps({"prompt": "Say hello.", "skill": "greeting"}) + "\n")
    recipe = tiny_recipe(tmp_path)
    proc = run_cli(["pipeline/evaluate.py", recipe, f"eval.checkpoints=[{sft},{pre}]", f"eval.prompts={prompts}",
                    f"eval.reward_model={tmp_path / 'rm'}", "eval.num_samples=2", "eval.perplexity_max_rows=8"],
                   cwd=tmp_path, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "runs/tiny/eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["prompts"]["n"] == 3 and metrics["prompts"]["verified"] == 0
    assert metrics["baseline"] == "tiny/sft"  # default: the first checkpoint
    for m in metrics["checkpoints"].values():
        for absent in ("accuracy", "accuracy_ci", "accuracy_per_skill", "sample_accuracy", "pass_at_n"):
            assert absent not in m
        assert isinstance(m["reward"], float) and m["ended"] >= 0 and "perplexity" in m
    assert list(metrics["win_rates"]) == ["reward"]
    assert set(metrics["checkpoints"]["tiny/pretrain"]["win_rate"]) == {"reward"}
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [s["prompt"] for s in samples][0] == "Tell me about the sea."
    assert all("correct" not in r and "reward" in r for s in samples for r in s["replies"].values())
    report = (out / "report.md").read_text()
    assert "| accuracy" not in report and "## Accuracy" not in report and "✓" not in report
    assert ": verifier" not in report and "### verifier" not in report and "### annotator" not in report
    assert "### reward model" in report and "win vs" in report
    assert not (out / "accuracy.png").exists()
    assert (out / "reward.png").is_file() and (out / "win_rate.png").is_file()
    assert "standardised" in report  # with the rm's reward_mean / reward_std


def test_lora_adapter_folder_evaluates_reproducibly(tiny_run, tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    work, _, _ = tiny_run
    pre = work / "runs/tiny/pretrain"
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(pre),
                           LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"],
                                      init_lora_weights=False, task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "adapter")  # the adapter alone: its base is the pretrain folder
    assert (tmp_path / "adapter/adapter_config.json").is_file()
    assert not (tmp_path / "adapter/config.json").exists()
    recipe = tiny_recipe(tmp_path, eval={**SMALL_EVAL, "checkpoints": [str(tmp_path / "adapter")],
                                         "baseline": str(pre)})
    monkeypatch.chdir(tmp_path)
    evaluate.main([str(recipe)])
    metrics = json.loads((tmp_path / "runs/tiny/eval/metrics.json").read_text())
    adapter_name = f"{tmp_path.name}/adapter"
    assert list(metrics["checkpoints"]) == ["tiny/pretrain", adapter_name]  # the baseline comes first
    adapter = metrics["checkpoints"][adapter_name]
    assert adapter["verified"] == 16 and 0 <= adapter["accuracy"] <= 1
    assert adapter["kl"] > 0  # its samples score differently under the base: the adapter was applied
    assert set(adapter["win_rate"]) == {"verifier", "annotator"}
    evaluate.main([str(recipe), "run.name=again"])  # seeded: the same command gives the same replies
    assert (tmp_path / "runs/again/eval/samples.jsonl").read_text() == \
        (tmp_path / "runs/tiny/eval/samples.jsonl").read_text()


def test_malformed_prompt_file_gets_one_line_naming_the_row(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps({"prompt": "fine", "answer": "1"}) + "\n"
                   + json.dumps({"prompt": [{"role": "robot", "content": "hi"}]}) + "\n")
    recipe = tiny_recipe(tmp_path, pretrain=None, sft=None, eval={"checkpoints": [str(tmp_path)]})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:  # what `python pipeline/evaluate.py ...` runs
        cli.run_main(evaluate.main, [str(recipe), f"eval.prompts={bad}"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {bad}: line 3: message 0: unknown role 'robot'"), lines
    assert not (tmp_path / "runs").exists()


def test_bad_eval_settings_stop_before_anything_is_written(tiny_run, tmp_path, monkeypatch):
    work, _, _ = tiny_run
    monkeypatch.chdir(tmp_path)
    recipe = tiny_recipe(tmp_path, eval={"checkpoints": [str(work / "runs/tiny/pretrain")]})
    cases = [("eval.top_p=1.5", "eval.top_p must be in (0, 1]"),
             (f"eval.checkpoints=[{tmp_path}]", "not a saved model"),
             (f"eval.reward_model={work / 'runs/tiny/sft'}", "not a reward model"),
             ("eval.checkpoints=[model]", "nothing trained to evaluate")]
    for override, message in cases:
        with pytest.raises(PipelineError, match=message.replace("(", r"\(").replace("]", r"\]")):
            evaluate.main([str(recipe), override])
    assert not (tmp_path / "runs").exists()
