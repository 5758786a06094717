"""The eval stage: metric functions on hand-made inputs, and pipeline/evaluate.py through its real command lines."""

import itertools
import json
import math
import re
import shutil

import numpy as np
import pytest
import torch

from pipeline import cli, data, eval_report, evaluate, judges, metrics as M, models, runs
from pipeline.cli import PipelineError
from pipeline.recipe import load_recipe
from conftest import run_cli, tiny_recipe, write_jsonl
from test_byod import one_error_line_of

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


def test_prompts_whose_reply_runs_past_the_models_positions_are_named_in_a_warning(capsys):
    """eval answered prompts whose reply ran past the model's positions without a word; it keeps them (every
    checkpoint answers the same prompts) and warns how many."""
    from types import SimpleNamespace

    from pipeline.generation import context_length, warn_past_context

    config = SimpleNamespace(max_position_embeddings=256)
    warn_past_context(config, None, [20, 200, 210, 224], 48, "sft")
    assert capsys.readouterr().out.rstrip().endswith(
        "WARNING: sft: 2 of 4 prompts (up to 224 tokens) with a reply of up to 48 tokens run past the model's 256 "
        "positions, where it never trained: lower the reply's tokens or shorten the prompts")
    warn_past_context(config, None, [20, 208], 48, "sft")
    assert capsys.readouterr().out == ""
    # GPT-2's name for it; a config without one: the tokenizer's, unless it says none (1e30)
    assert context_length(SimpleNamespace(config=SimpleNamespace(n_positions=1024))) == 1024
    bare = SimpleNamespace(config=SimpleNamespace())
    assert context_length(bare, SimpleNamespace(model_max_length=2048)) == 2048
    assert context_length(bare, SimpleNamespace(model_max_length=int(1e30))) is None


def test_a_prompt_past_a_position_tables_end_stops_in_one_line_naming_it(tmp_path, monkeypatch, capsys):
    """A GPT-2-like checkpoint (a table of positions) answering a prompt past its positions stopped mid-generation
    with an IndexError traceback and left eval.partial behind; a rotary model answers there with the warning above.
    Now the stage stops in one line naming the prompt and the checkpoint, and leaves nothing."""
    from transformers import GPT2Config, GPT2LMHeadModel

    recipe = load_recipe(tiny_recipe(tmp_path, pretrain=None, sft=None))
    tokenizer = models.load_tokenizer(recipe, runs.resolve_checkpoint(recipe, "model"))
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)) \
        .save_pretrained(tmp_path / "gpt")
    tokenizer.save_pretrained(tmp_path / "gpt")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 2 + 3?", "answer": "5"},
                                                 {"prompt": "word " * 100, "answer": "5"}])
    section = {"checkpoints": [str(tmp_path / "gpt")], "prompts": prompts, "perplexity_data": None,
               "num_samples": 0, "max_new_tokens": 4, "bootstrap": 100}
    monkeypatch.chdir(tmp_path)
    line = one_error_line_of(evaluate.main, [str(tiny_recipe(tmp_path, pretrain=None, sft=None, eval=section))], capsys)
    assert re.fullmatch(rf"error: {re.escape(prompts)}: prompt 2 \(\d+ tokens; 1 of 2 prompts run past\) with a reply "
                        rf"of up to eval.max_new_tokens=4 tokens does not fit {tmp_path.name}/gpt's table of 64 "
                        rf"positions \({tmp_path / 'gpt'}\): .*", line), line
    assert not (tmp_path / "runs").exists()


def test_a_later_checkpoints_position_table_stops_eval_before_any_checkpoint_generates(tmp_path, monkeypatch,
                                                                                      capsys):
    """Each checkpoint's table of positions was checked when its turn came, so a first checkpoint that fits had
    generated (its work lost) before a second one's table stopped the stage. Now every checkpoint is checked, from
    its config, before any generates."""
    from transformers import GPT2Config, GPT2LMHeadModel

    recipe = load_recipe(tiny_recipe(tmp_path, pretrain=None, sft=None))
    tokenizer = models.load_tokenizer(recipe, runs.resolve_checkpoint(recipe, "model"))
    for name, positions in (("long", 512), ("short", 64)):
        GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2,
                                   n_positions=positions)).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "word " * 100, "answer": "5"}])
    section = {"checkpoints": [str(tmp_path / "long"), str(tmp_path / "short")], "prompts": prompts,
               "perplexity_data": None, "num_samples": 0, "max_new_tokens": 4, "bootstrap": 100}
    generated = []
    monkeypatch.setattr(evaluate, "generate", lambda *a, **kw: generated.append(kw["desc"]) or [])
    monkeypatch.chdir(tmp_path)
    line = one_error_line_of(evaluate.main, [str(tiny_recipe(tmp_path, pretrain=None, sft=None, eval=section))], capsys)
    assert re.fullmatch(rf"error: {re.escape(prompts)}: prompt 1 .* does not fit {tmp_path.name}/short's table of 64 "
                        rf"positions \({tmp_path / 'short'}\): .*", line), line
    assert generated == []


def test_position_checks_skip_records_read_and_measure_each_tokenizer_once(tmp_path, monkeypatch):
    """check_positions tokenized every prompt and tool prompt for every checkpoint, those whose replies eval reads
    from their records (nothing of them generates) too, and again for each checkpoint of the same tokenizer. Now a
    record read is not checked, and checkpoints with the same tokenizer files measure the prompts once; a checkpoint
    that generates past its table of positions is still refused."""
    from types import SimpleNamespace

    from transformers import GPT2Config, GPT2LMHeadModel

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "word " * 100, "answer": "5"}])
    recipe = load_recipe(tiny_recipe(tmp_path, pretrain=None, sft=None),
                         [f"eval.prompts={prompts}", "eval.max_new_tokens=4", "eval.tool_max_total_tokens=100"])
    keys, rows = recipe.keys("eval"), [{"prompt": "word " * 100, "answer": "5"}, {"prompt": "What is 2 + 3?"}]
    tokenizer = models.load_tokenizer(recipe, runs.resolve_checkpoint(recipe, "model"))

    def target(name, positions, record=None, tool_record=None):  # a tokenizer of its own, from its own folder
        GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2,
                                   n_positions=positions)).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        cp = runs.Checkpoint(name, str(tmp_path / name), None, "local")
        return evaluate.Target(name, cp, tokenizer=models.load_tokenizer(recipe, cp), record=record,
                               tool_record=tool_record)

    measured = []
    monkeypatch.setattr(evaluate, "prompt_ids", lambda tok, prompt, tools=None: measured.append(prompt) or [0] * 90)
    read = tmp_path / "record.json"  # where a checkpoint's replies were read from
    reused, long, also_long = target("reused", 64, read), target("long", 512), target("also_long", 512)
    evaluate.check_positions(recipe, keys, [reused, long, also_long], rows, None)
    assert measured == [r["prompt"] for r in rows]  # once: reused not checked, long and also_long share them
    measured.clear()
    with pytest.raises(PipelineError, match=rf"^{re.escape(prompts)}: prompt 1 \(90 tokens; 2 of 2 prompts run past\) "
                                            rf"with a reply of up to eval.max_new_tokens=4 tokens does not fit short's "
                                            rf"table of 64 positions"):
        evaluate.check_positions(recipe, keys, [reused, long, target("short", 64)], rows, None)
    assert measured == [r["prompt"] for r in rows]
    # tool rollouts are checked apart: replies read from a record, tool rollouts to make, are checked for the latter
    tools, measured[:] = SimpleNamespace(rows=rows, schemas=[None, None]), []
    evaluate.check_positions(recipe, keys, [target("rolled", 64, read, read)], rows, tools)
    assert measured == []
    with pytest.raises(PipelineError, match="up to eval.tool_max_total_tokens=100 tokens does not fit to_roll's"):
        evaluate.check_positions(recipe, keys, [target("to_roll", 64, read)], rows, tools)
    assert measured == [r["prompt"] for r in rows]  # the tool prompts only


def test_temperature_zero_points_to_evals_greedy_replies(tmp_path):
    """`temperature: 0` (lm-eval's greedy) was refused with only "must be positive"."""
    recipe = load_recipe(tiny_recipe(tmp_path, pretrain=None, sft=None), ["eval.temperature=0"])
    with pytest.raises(PipelineError, match=re.escape(
            "eval.temperature must be positive (each prompt's greedy reply is made anyway; for greedy replies only, "
            "set eval.num_samples: 0 instead), got 0.0")):
        evaluate.check_keys(recipe, recipe.keys("eval"))


def test_prompt_completion_rows_are_told_completion_is_no_reference(tmp_path, capsys):
    """TRL's prompt/completion rows had their `completion` silently unread as a reference (no accuracy), in eval's
    prompts and in a policy stage's held-out prompts; a line now says so, once for the file, and names the column
    they read."""
    from pipeline import heldout

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 2 + 3?", "completion": "5"},
                                                 {"prompt": "What is 1 + 1?", "completion": "2", "answer": "2"},
                                                 {"prompt": "What is 2 + 2?", "completion": None}])  # none: not said
    recipe = load_recipe(tiny_recipe(tmp_path, pretrain=None, sft=None),
                         [f"eval.prompts={prompts}", f"sft.heldout_prompts={prompts}"])
    expected = (f"WARNING: {prompts}: 1 of 3 rows have a `completion` and no `answer`: `completion` is not read as a "
                f"reference answer; name the reference column `answer`")
    for read in (lambda: evaluate.load_prompts(recipe, recipe.keys("eval"))[0],
                 lambda: heldout.heldout_rows(recipe, recipe.keys("sft"))):
        rows = read()
        assert [r.get("answer") for r in rows] == [None, "2", None]
        warnings = [line for line in capsys.readouterr().out.splitlines() if "WARNING" in line]
        assert len(warnings) == 1 and warnings[0].endswith(expected), warnings


def test_held_out_scoring_leaves_out_prompts_past_a_position_tables_end(tmp_path, capsys):
    """sft with a GPT-2-like model and a held-out prompt past its table of positions trained, then stopped with an
    IndexError traceback in held-out scoring (the trained model left in sft.partial). Now such prompts are left out
    of the score, with a warning: the stage has trained by then."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline import heldout

    recipe = load_recipe(tiny_recipe(tmp_path, pretrain=None, sft=None))
    tokenizer = models.load_tokenizer(recipe, runs.resolve_checkpoint(recipe, "model"))
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64))
    models.configure_generation(model, tokenizer)
    rows = [{"prompt": "word " * 100, "answer": "5"}, {"prompt": "What is 2 + 3?", "answer": "5"}]
    result = heldout.verifier_accuracy(model, tokenizer, rows, max_new_tokens=4, desc="scoring sft")
    assert result["n"] == 1 and result["accuracy"] in (0.0, 1.0)
    assert re.search(r"WARNING: scoring sft: 1 of 2 held-out prompts \(row 1 first: \d+ tokens\) with a reply of up "
                     r"to 4 tokens run past the model's table of 64 positions: left out", capsys.readouterr().out)
    assert heldout.verifier_accuracy(model, tokenizer, rows[:1], max_new_tokens=4) == \
        {"accuracy": None, "per_skill": {}, "n": 0, "ended": None}


def test_held_out_scoring_renders_each_prompt_once_for_a_model_without_a_position_table(tmp_path, monkeypatch):
    """Only a model with a table of positions needs the prompts' lengths (past_position_table): measuring them for any
    other model rendered every prompt before generate rendered it again. Llama (the small recipe's) renders once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline import generation, heldout

    recipe = load_recipe(tiny_recipe(tmp_path, pretrain=None, sft=None))
    tokenizer = models.load_tokenizer(recipe, runs.resolve_checkpoint(recipe, "model"))
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    models.configure_generation(model, tokenizer)
    rendered, render = [], generation.render_prompt
    monkeypatch.setattr(generation, "render_prompt", lambda tok, prompt, tools=None: rendered.append(prompt)
                        or render(tok, prompt, tools))
    rows = [{"prompt": "What is 2 + 3?", "answer": "5"}, {"prompt": "What is 1 + 1?", "answer": "2"}]
    assert heldout.verifier_accuracy(model, tokenizer, rows, max_new_tokens=2)["n"] == 2
    assert rendered == [r["prompt"] for r in rows]


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


def brute_force_best_of_n(rewards, values, n):
    """Every n-subset in turn; its highest reward picked, a tie shared equally among the tied replies."""
    picks = []
    for subset in itertools.combinations(range(len(rewards)), n):
        top = max(rewards[i] for i in subset)
        tied = [values[i] for i in subset if rewards[i] == top]
        picks.append(sum(tied) / len(tied))
    return sum(picks) / len(picks)


def test_best_of_n_is_the_reward_models_pick_over_every_subset():
    # by hand: values 0, 1, 0 at rewards 1, 3, 2; of the pairs {1,3} {1,2} {3,2} two contain the best reply
    assert M.best_of_n_expected([1, 3, 2], [0, 1, 0], 1) == pytest.approx(1 / 3)
    assert M.best_of_n_expected([1, 3, 2], [0, 1, 0], 2) == pytest.approx(2 / 3)
    assert M.best_of_n_expected([1, 3, 2], [0, 1, 0], 3) == pytest.approx(1.0)
    # ties: the two replies at reward 2 split the pick; {a,b}: 0.5, {a,c}: 1, {b,c}: 0
    assert M.best_of_n_expected([2, 2, 0], [1, 0, 1], 2) == pytest.approx(0.5)
    assert M.best_of_n_expected([5, 5, 5, 5], [1, 0, 0, 0], 3) == pytest.approx(0.25)  # constant reward: random pick
    rng = np.random.default_rng(0)
    for _ in range(30):
        size = int(rng.integers(1, 8))
        rewards, values = rng.integers(0, 3, size).tolist(), rng.random(size).tolist()  # many ties
        for n in range(1, size + 1):
            assert M.best_of_n_expected(rewards, values, n) == pytest.approx(brute_force_best_of_n(rewards, values, n))
    assert M.best_of_n_expected([1, 2], [0, 1], 3) is None  # more than the samples there are
    assert M.best_of_n_expected([1, 2], [None, None], 1) is None  # a prompt without a verifier
    with pytest.raises(ValueError):
        M.best_of_n_expected([1, 2], [0, 1, 1], 1)


def test_best_of_n_curve_averages_prompts_with_a_verifier_and_caps_n():
    rewards = [[1, 3, 2], [0, 0, 1], [4, 5, 6]]
    values = [[0, 1, 0], [1, 1, 0], [None, None, None]]  # the third prompt has no verifier
    curve = M.best_of_n_curve(rewards, values, [1, 2, 4], n_boot=200)
    assert [p["n"] for p in curve] == [1, 2]  # 4 > the 3 samples
    assert [p["prompts"] for p in curve] == [2, 2]
    assert curve[0]["mean"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert curve[1]["mean"] == pytest.approx((2 / 3 + 1 / 3) / 2)  # second prompt: the best of 2 holds c 2/3 of the time
    assert all(p["ci"][0] <= p["mean"] <= p["ci"][1] for p in curve)


def test_self_bleu_measures_how_alike_samples_are():
    assert M.self_bleu(["Sure! The answer is 8."] * 3) == pytest.approx(1.0)
    assert M.self_bleu(["a b c", "d e f"]) == 0.0  # no shared word
    # "a b" against "a c": unigram precision 1/2, bigram (0 + 1) / (1 + 1); geometric mean 0.5; same lengths
    assert M.self_bleu(["a b", "a c"], max_n=2) == pytest.approx(0.5)
    assert M.bleu("a", ["a b c"], max_n=1) == pytest.approx(math.exp(1 - 3))  # brevity penalty, precision 1
    alike, varied = (M.self_bleu(t) for t in (["the answer is 8", "the answer is 9", "the answer is 8"],
                                              ["the answer is 8", "I think it is 12", "no idea"]))
    assert 0 < varied < alike < 1
    assert M.self_bleu(["one"]) is None


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
    names = eval_report.display_names(None, cps)
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


@pytest.mark.parametrize("header", ["prompt,skill,answer", "prompt,answer"])
def test_held_out_prompts_are_read_as_the_eval_stage_reads_them(tmp_path, header):
    """A stage's held-out prompts are read as eval reads its prompts: a CSV answer column with a blank cell (floats
    to pandas) gives the answers 8 and 3, not 8.0 and 3.0 that no reply matched (held-out accuracy 0 where eval
    said 1); prompts with answers and no skill column are scored, as eval scores them, not skipped."""
    from pipeline import data, heldout

    path = tmp_path / "p.csv"
    skills = ["math,", "chat,", "math,"] if "skill" in header else ["", "", ""]
    path.write_text(f"{header}\nWhat is 4 + 4?,{skills[0]}8\nSay hi.,{skills[1]}\nWhat is 1 + 2?,{skills[2]}3\n")
    recipe = load_recipe(tiny_recipe(tmp_path), [f"sft.heldout_prompts={path}"])
    rows = heldout.heldout_rows(recipe, recipe.keys("sft"))
    assert rows == data.load(str(path), "eval_prompts", recipe).to_list()
    assert [r["answer"] for r in rows] == ["8", None, "3"]
    assert judges.accuracy(rows, ["The answer is 8.", "Hi!", "The answer is 3."])["accuracy"] == 1.0


def test_heldout_scores_a_start_model_whose_tokenizer_gains_the_chat_tokens(tmp_path):
    """sft from a base model without ChatML tokens: the tokenizer gains them (sft grows the embeddings), and the
    held-out check of the start model at the end of sft stopped on an index error after training."""
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from pipeline import data, heldout

    recipe = load_recipe(tiny_recipe(tmp_path))
    rows = data.load("world:eval", "prompts", recipe).to_list()[:2]
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator([r["prompt"][-1]["content"] for r in rows], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    scored = heldout.score_checkpoint(recipe, str(tmp_path / "base"), rows, max_new_tokens=4, label="base")
    assert scored["n"] == 2 and 0 <= scored["accuracy"] <= 1


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


def test_prompts_offering_tools_are_rendered_with_them_in_eval_and_held_out_scoring(tiny_run, tmp_path, monkeypatch):
    """A `tools` column in eval.prompts (or a policy stage's heldout_prompts) was read and checked, and the reward
    model scored each reply with the tools, but the policy answered a prompt rendered without them (ppo renders the
    same rows with theirs)."""
    from pipeline import generation, heldout

    work, _, _ = tiny_run
    schema = {"type": "function", "function": {"name": "multiply", "description": "a times b", "parameters": {
        "type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}}, "required": ["a", "b"]}}}
    rows = [{"prompt": [{"role": "user", "content": "What is 12 times 7?"}], "answer": "84", "tools": [schema]},
            {"prompt": [{"role": "user", "content": "What is 2 plus 2?"}], "answer": "4"}]
    prompts = tmp_path / "tool_prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rendered, render = [], generation.render_prompt

    def spy(tokenizer, prompt, tools=None):
        text = render(tokenizer, prompt, tools)
        rendered.append(text)
        return text

    monkeypatch.setattr(generation, "render_prompt", spy)
    monkeypatch.chdir(tmp_path)
    recipe = tiny_recipe(tmp_path, eval={**SMALL_EVAL, "num_samples": 0, "prompts": str(prompts),
                                         "checkpoints": [str(work / "runs/tiny/sft")], "perplexity_data": None})
    evaluate.main([str(recipe)])
    asked = {text: "multiply" in text for text in rendered}
    assert {ok for text, ok in asked.items() if "12 times 7" in text} == {True}
    assert {ok for text, ok in asked.items() if "2 plus 2" in text} == {False}  # a row without tools offers none
    rendered.clear()
    tokenizer = models.load_tokenizer(load_recipe(recipe), runs.Checkpoint("sft", str(work / "runs/tiny/sft"), "",
                                                                           "local"))
    model = models.load_causal_lm(load_recipe(recipe), str(work / "runs/tiny/sft"), tokenizer=tokenizer)
    checked = data.load(str(prompts), "eval_prompts", load_recipe(recipe)).to_list()
    heldout.verifier_accuracy(model, tokenizer, checked, max_new_tokens=4)
    assert ["multiply" in text for text in rendered] == [True, False]


def test_a_checkpoint_added_to_the_list_is_the_only_one_generated_again(ranked, tmp_path, monkeypatch):
    """Each checkpoint's replies are kept as a record keyed by everything they depend on: a later evaluation with one
    more checkpoint generates for that one only, and comes out as an evaluation that generated everything; a changed
    generation setting, a change of the pipeline's code, or eval.reuse=false, generates every checkpoint again."""
    work, _, base, _ = ranked
    sft = str(work / "runs/ranked/sft")
    recipe = tiny_recipe(tmp_path, eval={**SMALL_EVAL, "checkpoints": [base]})
    generated = []
    original = evaluate.generate_replies

    def counting(keys, target, *args, **kwargs):
        generated.append(target.name)
        return original(keys, target, *args, **kwargs)

    monkeypatch.setattr(evaluate, "generate_replies", counting)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs/tiny/eval"

    def evaluation(*overrides):
        generated.clear()
        evaluate.main([str(recipe), *overrides])
        metrics = json.loads((out / "metrics.json").read_text())
        for m in metrics["checkpoints"].values():
            m.pop("seconds")
        return metrics, (out / "samples.jsonl").read_text(), list(generated)

    alone, _, made = evaluation()
    assert made == ["tiny/pretrain"] and len(list((out / "checkpoints").glob("*.json"))) == 1
    both = [f"eval.checkpoints=[{base},{sft}]"]
    reused, reused_samples, made = evaluation(*both)
    assert made == ["ranked/sft"]  # the base's replies were read from the first evaluation's record
    assert reused["checkpoints"]["tiny/pretrain"] == alone["checkpoints"]["tiny/pretrain"]
    assert len(list((out / "checkpoints").glob("*.json"))) == 2  # the published folder keeps both records
    fresh, fresh_samples, made = evaluation(*both, "eval.reuse=false")
    assert made == ["tiny/pretrain", "ranked/sft"]
    assert fresh == reused and fresh_samples == reused_samples
    _, _, made = evaluation(*both)
    assert made == []  # every record matches
    with monkeypatch.context() as edited:  # the pipeline's own code changed (an upgrade, an edit): its hash did
        edited.setattr(runs, "stage_code", lambda stage: "another version of the eval stage's code")
        _, _, made = evaluation(*both)
    assert made == ["tiny/pretrain", "ranked/sft"]
    _, _, made = evaluation(*both, "eval.max_new_tokens=12")
    assert made == ["tiny/pretrain", "ranked/sft"]  # other replies: no record matches

    def failing(keys, target, *args, **kwargs):  # the stage stops (a crash, a lost node) on the second checkpoint
        generated.append(target.name)
        if target.name == "ranked/sft":
            raise RuntimeError("stopped")
        return original(keys, target, *args, **kwargs)

    monkeypatch.setattr(evaluate, "generate_replies", failing)
    with pytest.raises(RuntimeError, match="stopped"):
        evaluation(*both, "eval.max_new_tokens=16")
    monkeypatch.setattr(evaluate, "generate_replies", counting)
    _, _, made = evaluation(*both, "eval.max_new_tokens=16")
    assert made == ["ranked/sft"]  # the base's record from the stopped attempt, in eval.partial


def test_eval_checks_the_positions_of_the_checkpoints_it_generates_measuring_each_tokenizer_once(ranked, tmp_path,
                                                                                                monkeypatch):
    """Through the stage: a checkpoint whose replies are read from its record is not measured against its positions
    (it generates nothing), and checkpoints saved with the same tokenizer files (a run's stages) measure the prompts
    once."""
    work, _, base, _ = ranked
    sft = str(work / "runs/ranked/sft")
    recipe = tiny_recipe(tmp_path, eval={**SMALL_EVAL, "num_samples": 0, "checkpoints": [base]})
    measured, measure = [], evaluate.prompt_ids
    monkeypatch.setattr(evaluate, "prompt_ids", lambda tok, prompt, tools=None: measured.append(prompt)
                        or measure(tok, prompt, tools))
    monkeypatch.chdir(tmp_path)

    def evaluation(*overrides):
        measured.clear()
        evaluate.main([str(recipe), *overrides])
        return len(measured)

    assert evaluation() == SMALL_EVAL["max_prompts"]
    both = f"eval.checkpoints=[{base},{sft}]"
    assert evaluation(both) == SMALL_EVAL["max_prompts"]  # sft's only: the base's replies are read from its record
    assert evaluation(both) == 0  # every record matches
    assert evaluation(both, "eval.reuse=false") == SMALL_EVAL["max_prompts"]  # one tokenizer: measured once


def test_a_tool_record_reads_back_and_a_damaged_one_is_made_again(tmp_path):
    """A checkpoint's tool rollouts read back as they were saved, with the images drawn; a record whose images are
    gone, or whose file was cut short, is no record (the rollouts are made again) rather than an error."""
    from PIL import Image

    from pipeline import eval_records
    from pipeline.eval_tools import ToolRun
    from pipeline.tool_calls import ToolResult

    folder, drawn = tmp_path / "eval", tmp_path / "eval/images/sft"
    drawn.mkdir(parents=True)
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(drawn / "1.png")
    call = ToolResult(name="draw_image", arguments={"prompt": "a 3"}, valid=True, ok=True, content="image 1",
                      error=None, image="1", seconds=0.5)
    run = ToolRun([{"calls": [call], "turns": [], "final": "3", "ended": True, "text": "3"}], [{"correct": True}],
                  log_ratios=np.array([[0.25]]), images={"1": torch.ones(1, 4, 4)})
    eval_records.save_tools(folder, "k", run, 1.5, drawn)
    got, seconds, path = eval_records.load_tools([folder], "k", tmp_path / "restored")
    assert got.greedy == run.greedy and got.verdicts == run.verdicts and seconds == 1.5
    assert got.log_ratios.tolist() == [[0.25]] and torch.equal(got.images["1"], torch.ones(1, 4, 4))
    assert (tmp_path / "restored/1.png").read_bytes() == (drawn / "1.png").read_bytes()
    shutil.rmtree(folder / "checkpoints/k")  # its images deleted
    assert eval_records.load_tools([folder], "k", tmp_path / "again") is None
    (folder / "checkpoints/k.json").write_text('{"key": "k", "greedy": [')  # cut short
    assert eval_records.read([folder], "k") is None


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
             (f"eval.checkpoints=[{tmp_path}]",
              f"override 'eval.checkpoints=[{tmp_path}]': eval.checkpoints: {tmp_path} is not a saved model"),
             (f"eval.reward_model={work / 'runs/tiny/sft'}", "not a reward model"),
             ("eval.checkpoints=[model]", "nothing trained to evaluate"),
             ("eval.best_of_n=[1,0]", "eval.best_of_n must be a list of sample counts, each at least 1")]
    for override, message in cases:
        with pytest.raises(PipelineError, match=re.escape(message)):
            evaluate.main([str(recipe), override])
    assert not (tmp_path / "runs").exists()


def test_best_of_n_diversity_and_collapse_check_through_the_stage(ranked, tmp_path, monkeypatch):
    """With a reward model (random here: what it prefers does not matter) the stage scores every sample, and the
    best-of-n curve in metrics.json is what samples.jsonl's rewards and verdicts give; n above num_samples is left
    out. The SFT model was trained from the base (its manifest says so): the two get a collapse check."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    work, _, base, _ = ranked
    sft = work / "runs/ranked/sft"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(base, num_labels=1).save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp_path / "rm")
    recipe = tiny_recipe(tmp_path, eval={**SMALL_EVAL, "num_samples": 4, "checkpoints": [base, str(sft)],
                                         "reward_model": str(tmp_path / "rm"), "best_of_n": [1, 2, 4, 8]})
    monkeypatch.chdir(tmp_path)
    evaluate.main([str(recipe)])
    out = tmp_path / "runs/tiny/eval"
    metrics = json.loads((out / "metrics.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert metrics["checkpoints"]["ranked/sft"]["sample_accuracy"] > 0  # else the accuracy check below is 0 == 0
    for name, m in metrics["checkpoints"].items():
        curve = m["best_of_n"]
        assert [p["n"] for p in curve] == [1, 2, 4]
        assert set(curve[0]) == {"n", "accuracy", "annotator_win_rate_vs_greedy", "reward"}
        assert curve[0]["accuracy"]["mean"] == pytest.approx(m["sample_accuracy"])  # n = 1: a random sample
        picked, best = [], []  # n = 4 = all samples: the highest-reward sample (a tie shared)
        for s in samples:
            replies = s["replies"][name]["samples"]
            best.append(max(r["reward"] for r in replies))
            picked.append(np.mean([r["correct"] for r in replies if r["reward"] == best[-1]]))
        assert curve[-1]["accuracy"]["mean"] == pytest.approx(np.mean(picked), abs=1e-6)
        assert curve[-1]["reward"]["mean"] == pytest.approx(np.mean(best), abs=1e-3)  # samples.jsonl rounds to 1e-4
        assert 0 <= m["self_bleu"] <= 1 and m["sample_entropy"] > 0
    [check] = metrics["collapse_checks"]
    assert (check["from"], check["to"]) == ("tiny/pretrain", "ranked/sft")
    before, after = metrics["checkpoints"]["tiny/pretrain"], metrics["checkpoints"]["ranked/sft"]
    assert check["diversity_change"] == pytest.approx(after["distinct_2"] - before["distinct_2"])
    assert check["accuracy_change"] == pytest.approx(after["sample_accuracy"] - before["sample_accuracy"])
    report = (out / "report.md").read_text()
    assert "## Best-of-n" in report and "| n = 1 | n = 2 | n = 4 |" in report and "n = 8" not in report
    assert "## Collapse checks" in report and "self-BLEU" in report
    assert (out / "best_of_n.png").read_bytes()[:4] == b"\x89PNG" and "![best_of_n](best_of_n.png)" in report


# ---------------------------------------------------------------------------------------------- tool use


def tool_result(name, valid=True, ok=True, error=None, image=None, **arguments):
    from pipeline.tools import ToolResult

    return ToolResult(name, arguments, valid, ok, error or f"ran {name}", error, image, 0.0)


def test_tool_metrics_on_hand_made_rollouts():
    """Rates over calls, errors among valid calls, correctness per kind with intervals, KL per prompt; a call past
    the budget is never run and is counted apart, not as a call."""
    from pipeline.eval_tools import tool_metrics
    from pipeline.tool_rollout import budget_result

    rows = [{"kind": "draw"}, {"kind": "read"}, {"kind": "draw_sum"}, {"prompt": "a user's prompt"}]
    greedy = [{"calls": [tool_result("draw_image", image="201", prompt="a 7")], "ended": True},
              {"calls": [tool_result("read_image", valid=False, ok=False, error="invalid: 'image_id' is required"),
                         tool_result("read_image", ok=False, error="no image 999", image_id="999")], "ended": True},
              {"calls": [], "ended": False},
              {"calls": [tool_result("draw_image", image="202", prompt="a cat"),
                         budget_result(tool_result("draw_image", prompt="again"))], "ended": False}]
    verdicts = [{"correct": True}, {"correct": False, "looked": False}, {"correct": False}, None]
    log_ratios = np.array([[1.0, 3.0], [0.0, 0.0], [2.0, 2.0], [-1.0, 1.0]])
    m = tool_metrics(rows, greedy, verdicts, log_ratios, {"n_boot": 200, "seed": 0})
    assert m["call_rate"] == 0.75 and m["calls"] == 4 and m["calls_per_prompt"] == 1.0
    assert m["valid_calls"] == 3 and m["valid_rate"] == 0.75 and m["execution_errors"] == 1
    assert m["over_budget"] == 1 and m["ended"] == 0.5
    assert m["verified"] == 3 and m["correct"] == pytest.approx(1 / 3)
    assert m["correct_ci"][0] <= m["correct"] <= m["correct_ci"][1]
    assert {k: v["mean"] for k, v in m["correct_per_kind"].items()} == {"draw": 1.0, "draw_sum": 0.0, "read": 0.0}
    assert m["read_looked"] == 0.0
    assert m["kl"] == pytest.approx(1.0) and m["kl_samples"] == 2  # per prompt 2, 0, 2, 0
    # a model that never calls: rates 0, no valid rate (nothing to divide), correctness from the outcome alone
    silent = tool_metrics(rows[:2], [{"calls": [], "ended": True}] * 2, [{"correct": False}, {"correct": True}],
                          None, {"n_boot": 200, "seed": 0})
    assert (silent["call_rate"], silent["calls"], silent["execution_errors"]) == (0.0, 0, 0)
    assert "valid_rate" not in silent and "kl" not in silent and silent["correct"] == 0.5


def hand_rollout():
    """Two rows: prompts of 3 and 2 tokens (the second left-padded), replies policy (P) and tool (T) tokens:
    P P T T P P and P T P (right-padded)."""
    from pipeline.tool_rollout import ToolRollout

    pad = 0
    prompts = torch.tensor([[11, 12, 13], [pad, 21, 22]])
    replies = torch.tensor([[31, 32, 41, 42, 33, 34], [51, 61, 52, pad, pad, pad]])
    kinds = torch.tensor([[1, 1, 2, 2, 1, 1], [1, 2, 1, 0, 0, 0]])
    return ToolRollout(sequences=torch.cat([prompts, replies], 1),
                       attention_mask=torch.cat([(prompts != pad).long(), (kinds > 0).long()], 1),
                       context_length=3, replies=replies, mask=(kinds == 1).float(), tool_mask=(kinds == 2).float(),
                       ended=torch.tensor([True, True]))


def test_tool_kl_counts_the_policys_tokens_only():
    from pipeline.eval_tools import policy_token_sums, rollout_sequences

    seqs, scored = rollout_sequences(hand_rollout())
    assert seqs == [[11, 12, 13, 31, 32, 41, 42, 33, 34], [21, 22, 51, 61, 52]]
    assert scored == [[False] * 3 + [True, True, False, False, True, True], [False] * 2 + [True, False, True]]
    rng = np.random.default_rng(0)
    policy = [(-rng.random(len(s) - 1)).tolist() for s in seqs]  # token t's log-prob at index t - 1
    reference = [(-rng.random(len(s) - 1)).tolist() for s in seqs]
    ratios = policy_token_sums(policy, scored) - policy_token_sums(reference, scored)
    by_hand = [sum(policy[0][t - 1] - reference[0][t - 1] for t in (3, 4, 7, 8)),
               sum(policy[1][t - 1] - reference[1][t - 1] for t in (2, 4))]
    assert ratios == pytest.approx(by_hand)
    # the reference (or the policy) saying anything at all about tool tokens and the prompt changes nothing
    moved = [list(lp) for lp in reference]
    for row, s in enumerate(scored):
        for t in range(1, len(s)):
            if not s[t]:
                moved[row][t - 1] -= 50.0
    assert policy_token_sums(moved, scored) == pytest.approx(policy_token_sums(reference, scored))
    moved[1][3] -= 1.0  # token 4 of row 2: the policy's
    assert policy_token_sums(moved, scored)[1] == pytest.approx(policy_token_sums(reference, scored)[1] - 1.0)


class ScriptedToolUser(torch.nn.Module):
    """A real checkpoint whose `generate` is scripted: it calls the right tool for a world tool task (draw_image with
    the task's caption, read_image on the image asked about) and then answers from the tool's result; scoring
    (forward) is the real model's. It stands in for a policy trained to call tools."""

    def __init__(self, model, tokenizer):
        super().__init__()
        self.inner, self.tokenizer = model, tokenizer

    @property
    def config(self):
        return self.inner.config

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)

    @staticmethod
    def task(text: str):
        from pipeline import tool_world

        return tool_world.task_key(text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0])

    def turn(self, text: str) -> str:
        import re

        from pipeline import tool_world

        key = self.task(text)
        responses = re.findall(r"<tool_response>\n(.*?)\n</tool_response>", text, re.S)
        if not responses:
            name, args = (("read_image", {"image_id": key[1]}) if key[0] == "read"
                          else ("draw_image", {"prompt": tool_world.answer(key)}))
            return f'<tool_call>\n{json.dumps({"name": name, "arguments": args})}\n</tool_call>'
        if key[0] == "read":
            digit = re.search(r"(\d) on the", responses[-1]).group(1)
            return f"The answer is {digit}."
        return f"Here is image {responses[-1].split()[-1].rstrip('.')}."

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, eos_token_id, **kwargs):
        texts = [self.tokenizer.decode(ids[att.bool()].tolist(), skip_special_tokens=False)
                 for ids, att in zip(input_ids, attention_mask)]
        if not any(self.task(text) for text in texts):  # the text prompts: the real model answers
            return self.inner.generate(input_ids=input_ids, attention_mask=attention_mask, pad_token_id=pad_token_id,
                                       max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, **kwargs)
        new, end = [], eos_token_id[0] if isinstance(eos_token_id, list) else eos_token_id  # stop_ids: the eos first
        for text in texts:
            turn = self.tokenizer(self.turn(text), add_special_tokens=False)["input_ids"] + [end]
            new.append(turn[:max_new_tokens])
        width = max(len(n) for n in new)
        new = torch.tensor([n + [pad_token_id] * (width - len(n)) for n in new], dtype=torch.long)
        return torch.cat([input_ids, new.to(input_ids.device)], 1)


TOOLS = {"world_gallery": True, "timeout_s": 120, "tools": [
    {"name": "draw_image", "backend": "diffusion", "source": "diffusion", "steps": 2},
    {"name": "read_image", "backend": "image_judge", "source": "diffusion"}]}


def script_tool_use(monkeypatch, paths: list[str]) -> None:
    """The eval stage loads the checkpoints at `paths` as ScriptedToolUser, the others as they are."""
    load_lm = evaluate.load_lm

    def scripted(recipe, cp, device, tokenizer=None):
        lm = load_lm(recipe, cp, device, tokenizer)
        if cp.path in paths:
            lm.model = ScriptedToolUser(lm.model, lm.tokenizer)
        return lm

    monkeypatch.setattr(evaluate, "load_lm", scripted)


@pytest.fixture(scope="module")
def tool_work(tmp_path_factory):
    """A folder with runs/tiny/diffusion: a tiny untrained text-to-image pipeline and an untrained image judge."""
    from test_tools import save_tiny_image_stage

    work = tmp_path_factory.mktemp("tools")
    save_tiny_image_stage(work / "runs/tiny/diffusion")
    return work


def test_eval_with_tools_reports_tool_use_per_checkpoint(tiny_run, tool_work, monkeypatch):
    """The base never calls a tool (rates 0; the read tasks judged on its answer alone); the SFT checkpoint, scripted
    to call the right tool, draws images that land in eval/images/, the report's table and the grid."""
    work, _, _ = tiny_run
    pre, sft = str(work / "runs/tiny/pretrain"), str(work / "runs/tiny/sft")
    script_tool_use(monkeypatch, [sft])
    monkeypatch.chdir(tool_work)
    recipe = tiny_recipe(tool_work, world={"n_tool_eval": 9}, tools=TOOLS,
                         eval={**SMALL_EVAL, "max_prompts": 4, "num_samples": 0, "perplexity_data": "",
                               "checkpoints": [pre, sft], "batch_size": 8})
    evaluate.main([str(recipe)])
    out = tool_work / "runs/tiny/eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tool_prompts"]["spec"] == "world:tool_eval" and metrics["tool_prompts"]["n"] == 9
    assert metrics["tool_prompts"]["kinds"] == {"draw": 3, "draw_sum": 3, "read": 3}
    base, tuned = (metrics["checkpoints"][n]["tools"] for n in ("tiny/pretrain", "tiny/sft"))
    assert (base["call_rate"], base["calls"], base["execution_errors"]) == (0.0, 0, 0) and "valid_rate" not in base
    assert base["correct_per_kind"]["draw"]["mean"] == 0.0 and base["kl"] == 0.0  # the reference itself
    assert (tuned["call_rate"], tuned["valid_rate"], tuned["calls_per_prompt"]) == (1.0, 1.0, 1.0)
    assert tuned["execution_errors"] == 0 and tuned["read_looked"] == 1.0
    assert tuned["correct_ci"][0] <= tuned["correct"] <= tuned["correct_ci"][1] and "kl" in tuned

    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    tool_lines = [s for s in lines if s.get("task") == "tool"]
    assert len(lines) == 4 + 9 and len(tool_lines) == 9
    verdicts = {n: [s["replies"][n]["verdict"]["correct"] for s in tool_lines] for n in ("tiny/pretrain", "tiny/sft")}
    assert np.mean(verdicts["tiny/sft"]) == pytest.approx(tuned["correct"])
    assert np.mean(verdicts["tiny/pretrain"]) == pytest.approx(base["correct"])
    # the gain over the reference, paired by prompt
    differences = np.array(verdicts["tiny/sft"], float) - np.array(verdicts["tiny/pretrain"], float)
    assert tuned["gain_vs"] == "tiny/pretrain" and "gain" not in base
    assert tuned["gain"] == pytest.approx(differences.mean()) and tuned["gain_ci"][0] <= tuned["gain"]
    drawn = 0
    for s in tool_lines:
        reply = s["replies"]["tiny/sft"]
        (call,) = reply["calls"]
        assert call["valid"] and call["ok"] and call["error"] is None and call["content"]
        assert reply["turns"][0]["tool_calls"][0]["function"]["name"] == call["name"]
        folder = "eval/images/" if s["kind"] == "read" else "eval/images/tiny/sft/"  # the gallery; what sft drew
        assert reply["image_paths"] == [f"{folder}{i}.png" for i in reply["images"]]
        assert all((tool_work / "runs/tiny" / p).read_bytes()[:4] == b"\x89PNG" for p in reply["image_paths"])
        if s["kind"] != "read":
            assert reply["verdict"]["image"] == call["image"] == reply["images"][0]
            drawn += 1
        else:
            assert call["image"] == s["expect"]["image_id"]  # a gallery image, in eval/images/ too
        log_ratios = [x["log_ratio"] for x in reply["samples"]]
        assert len(log_ratios) == 1
        assert s["replies"]["tiny/pretrain"]["calls"] == []
    assert drawn == 6
    kl = np.mean([s["replies"]["tiny/sft"]["samples"][0]["log_ratio"] for s in tool_lines])
    assert tuned["kl"] == pytest.approx(kl, abs=1e-3)

    report = (out / "report.md").read_text()
    assert "## Tool use" in report and "![tool_images](tool_images.png)" in report
    assert "| `tiny/pretrain` | 0.00 | — | 0 of 0 | 0.00 |" in report
    assert "| `tiny/sft` | 1.00 | 1.00 | 0 of 9 | 1.00 |" in report and "KL to `tiny/pretrain`" in report
    assert f"| {tuned['gain']:+.2f} [{tuned['gain_ci'][0]:+.2f}, {tuned['gain_ci'][1]:+.2f}] |" in report
    from PIL import Image

    grid = Image.open(out / "tool_images.png")
    assert grid.size[1] == 22 + 6 * (64 + 10) and grid.size[0] == 250 + 2 * (110 + 8)  # 6 draw prompts, 2 columns

    # evaluated again (another bootstrap): every checkpoint's replies and tool rollouts are read from their records,
    # with the images drawn, and come out as before
    generated, rolled = [], []
    before = {f: (out / f).read_bytes() for f in ("samples.jsonl", "tool_images.png")}
    drawn = {p.relative_to(out): p.read_bytes() for p in (out / "images").rglob("*.png")}
    monkeypatch.setattr(evaluate, "generate_replies", lambda keys, target, *args: generated.append(target.name))
    original = evaluate.eval_tools.ToolEval.rollouts
    monkeypatch.setattr(evaluate.eval_tools.ToolEval, "rollouts",
                        lambda self, lm, *args, **kw: rolled.append(lm.path) or original(self, lm, *args, **kw))
    evaluate.main([str(recipe), "eval.bootstrap=150"])
    assert generated == [] and rolled == []
    assert {f: (out / f).read_bytes() for f in before} == before
    assert {p.relative_to(out): p.read_bytes() for p in (out / "images").rglob("*.png")} == drawn
    evaluate.main([str(recipe), "eval.tool_max_new_tokens=80"])  # the tool rollouts depend on it, the replies not
    assert generated == [] and sorted(set(rolled)) == sorted([pre, sft])


def test_a_checkpoint_draws_the_same_images_whatever_was_evaluated_before_it(tiny_run, tool_work, monkeypatch):
    """Two copies of one scripted checkpoint, evaluated one after the other, draw the same images under the same ids,
    each in its own folder: the drawing tool's seeds and the image ids restart per checkpoint (before, the second
    copy's seeds went on from the first's calls, so its images depended on what was evaluated before it)."""
    work, _, _ = tiny_run
    sft, copy = work / "runs/tiny/sft", tool_work / "copies/sft"
    if not copy.exists():
        shutil.copytree(sft, copy)
    script_tool_use(monkeypatch, [str(sft), str(copy)])
    monkeypatch.chdir(tool_work)
    recipe = tiny_recipe(tool_work, world={"n_tool_eval": 6}, tools=TOOLS,
                         eval={**SMALL_EVAL, "max_prompts": 2, "num_samples": 0, "perplexity_data": "",
                               "checkpoints": [str(sft), str(copy)], "batch_size": 8, "tool_samples": 0})
    evaluate.main([str(recipe)])
    lines = [json.loads(line) for line in (tool_work / "runs/tiny/eval/samples.jsonl").read_text().splitlines()]
    drawn = [s for s in lines if s.get("task") == "tool" and s["kind"] != "read"]
    assert len(drawn) == 4
    for s in drawn:
        first, second = s["replies"].values()
        assert first["images"] == second["images"] and len(first["images"]) == 1
        assert first["image_paths"] != second["image_paths"]  # images/<checkpoint>/<id>.png
        pngs = [(tool_work / "runs/tiny" / r["image_paths"][0]).read_bytes() for r in (first, second)]
        assert pngs[0][:4] == b"\x89PNG" and pngs[0] == pngs[1]
        assert first["verdict"] == second["verdict"]


def test_tool_prompts_bad_setups_stop_before_anything_is_written(tiny_run, tool_work, monkeypatch):
    work, _, _ = tiny_run
    monkeypatch.chdir(tool_work)
    bad = tool_work / "bad_tools.jsonl"
    bad.write_text(json.dumps({"prompt": "Draw a 3.", "kind": "draw", "expect": {"digit": 3}}) + "\n"
                   + json.dumps({"prompt": "Search the web.", "tools": [{"type": "function", "function": {
                       "name": "search", "parameters": {"type": "object", "properties": {}}}}]}) + "\n")
    tools = {**TOOLS, "tools": [{**t, "source": str(tool_work / "runs/tiny/diffusion")} for t in TOOLS["tools"]]}
    cases = [({"tools": {**tools, "world_gallery": False}}, [], r"tools\.world_gallery: world:tool_eval has \d+ "
                                                               r"read tasks"),
             ({}, ["eval.tool_prompts=world:tool_eval"], r"eval\.tool_prompts: the recipe has no tools"),
             ({"tools": tools}, [f"eval.tool_prompts={bad}"], r"bad_tools\.jsonl: line 2: tool 'search' is not among "
                                                              r"the recipe's tools \(draw_image, read_image\)"),
             ({"tools": tools}, ["eval.max_tool_calls=0"], r"eval\.max_tool_calls must be at least 1")]
    for sections, overrides, message in cases:
        recipe = tiny_recipe(tool_work, run={"name": "bad"}, world={"n_tool_eval": 9}, **sections,
                             eval={"checkpoints": [str(work / "runs/tiny/pretrain")]})
        with pytest.raises(PipelineError, match=message) as err:
            evaluate.main([str(recipe), *overrides])
        named = str(bad) if "line" in message else f"override '{overrides[-1]}'" if overrides else str(recipe)
        assert "\n" not in str(err.value) and str(err.value).startswith(f"{named}: ")  # what set the value
        assert not (tool_work / "runs/bad").exists()
    # a user's file: a world task (`kind` / `expect`) is verified, a prompt without them only counted
    from pipeline import eval_tools

    mine = tool_work / "my_tools.jsonl"
    mine.write_text(json.dumps({"prompt": "Which digit is in image 7?", "kind": "read",
                                "expect": {"image_id": 7, "answer": 3}}) + "\n"
                    + json.dumps({"prompt": [{"role": "user", "content": "Draw me a cat."}],
                                  "tools": json.dumps([{"type": "function", "function": {"name": "draw_image"}}])})
                    + "\n" + json.dumps({"prompt": "Say hi.", "tools": "[]"}) + "\n")
    recipe = load_recipe(tiny_recipe(tool_work, run={"name": "bad"}, tools=tools), [f"eval.tool_prompts={mine}"])
    plan = eval_tools.plan(recipe, recipe.keys("eval"))
    assert [eval_tools.is_verified(r) for r in plan.rows] == [True, False, False] and plan.judge is None  # no draw
    assert plan.rows[0]["expect"] == {"image_id": "7", "answer": "3"} and plan.tools == ["draw_image", "read_image"]
    # in a CSV the object is a cell's JSON text (every such row stopped: "'expect' must be a JSON object, got str")
    import pandas as pd

    pd.DataFrame([{"prompt": "Which digit is in image 7?", "kind": "read",
                   "expect": json.dumps({"image_id": 7, "answer": 3})}]).to_csv(tool_work / "my_tools.csv", index=False)
    csv_recipe = load_recipe(tiny_recipe(tool_work, run={"name": "bad"}, tools=tools),
                             [f"eval.tool_prompts={tool_work / 'my_tools.csv'}"])
    assert eval_tools.plan(csv_recipe, csv_recipe.keys("eval")).rows[0]["expect"] == {"image_id": "7", "answer": "3"}
    # each row is offered its own tools, as ppo offers them (every row was offered all of the recipe's, and a row
    # offering draw_image alone could read images); a row without `tools` gets the recipe's, a row whose `tools` is
    # empty ("[]", LLaMA-Factory's rows without tools) none, as in ppo (it was offered all of them)
    import dataclasses
    from pathlib import Path

    from pipeline import evaluate as evaluate_stage, runs
    from pipeline.tools import ToolCall

    tool_eval = eval_tools.ToolEval(recipe, recipe.keys("eval"), plan, tool_work / "offers", Path("offers"), 0, "cpu")
    assert [view and view.names for view in tool_eval.offers] == [["draw_image", "read_image"], ["draw_image"], None]
    refused = tool_eval.offers[1].call(ToolCall("read_image", {"image_id": "7"}, "", None))
    assert not refused.valid and "unknown tool 'read_image' (tools: draw_image)" in refused.content
    lm = evaluate_stage.load_lm(recipe, runs.Checkpoint("pretrain", str(work / "runs/tiny/pretrain"), None, "local"),
                                "cpu")
    tool_eval.keys = dataclasses.replace(tool_eval.keys, tool_max_new_tokens=4)
    (rollout,) = tool_eval.rollouts(lm, [2], False, "a row offering no tools")
    assert rollout["calls"] == [] and [t["role"] for t in rollout["turns"]] == ["assistant"]  # one turn, unparsed


def test_eval_keys_are_checked_by_check_and_before_the_runner_starts_any_stage(tmp_path):
    """eval has no config class: its key rules ran only when the eval stage started, after every stage before it had
    trained, and `--check` called such a recipe ok."""
    from pipeline import check, cluster
    from pipeline.recipe import load_recipe

    recipe = tiny_recipe(tmp_path, eval={"bootstrap": 50})
    stage = check.check_stage(load_recipe(recipe), "eval", cluster.launch_from_command(None), None, {"pretrain", "sft"})
    assert stage.errors == [f"{recipe}: eval.bootstrap must be at least 100, got 50"]
    proc = run_cli(["pipeline/run.py", recipe], cwd=tmp_path, env=ONE_THREAD)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {recipe}: eval.bootstrap must be at least 100, got 50"
    assert not (tmp_path / "runs").exists()


def test_a_models_own_sampling_defaults_do_not_shape_its_replies(tmp_path):
    """A user's generation_config.json (Qwen2.5's sets repetition_penalty and top_k) applied to every generate call:
    greedy replies were not greedy and samples (eval's KL, PPO's rollouts) not from the model's own distribution."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.generation import generate
    from test_byod import user_model

    folder = user_model(tmp_path / "user")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.eos_token
    prompts = ["What is 2 + 2?", "Say hi.", "What is 7 + 1?"]

    def replies():
        return [[r.token_ids for r in rows] for rows in (
            generate(model, tokenizer, prompts, max_new_tokens=16, progress=False) +
            generate(model, tokenizer, prompts, max_new_tokens=16, do_sample=True, num_samples=2, progress=False))]

    own = replies()
    model.generation_config.update(repetition_penalty=3.0, no_repeat_ngram_size=1, top_k=2, min_new_tokens=16)
    assert replies() == own


def test_a_chat_template_that_refuses_an_eval_prompt_stops_in_one_line(tmp_path, monkeypatch):
    """A user's own template (`tokenizer.chat_template: own`) that raises on a prompt (Mistral's on a system
    message): one line naming the prompt file and line before anything is written (a traceback mid-stage before);
    ppo checks its prompts the same way."""
    from test_byod import MISTRAL_TEMPLATE, user_model

    folder = user_model(tmp_path / "mistral", template=MISTRAL_TEMPLATE)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 2 + 2?", "answer": "4"},
                                                 {"prompt": [{"role": "system", "content": "Be brief."},
                                                             {"role": "user", "content": "What is 1 + 1?"}]}])
    recipe = tiny_recipe(tmp_path, pretrain=None, sft=None, tokenizer={"train": False, "chat_template": "own"},
                         model={"config": None, "name_or_path": folder},
                         eval={**SMALL_EVAL, "checkpoints": [folder], "prompts": prompts, "perplexity_data": ""})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PipelineError, match=f"^{prompts}: the tokenizer of {folder}: line 2: its chat template "
                                            f"refuses the row: Conversation roles must alternate"):
        evaluate.main([str(recipe)])
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("setting", ["suppress_tokens", "begin_suppress_tokens", "bad_words_ids", "sequence_bias",
                                     "min_length", "exponential_decay_length_penalty", "forced_eos_token_id"])
def test_a_models_token_rules_do_not_shape_its_replies_nor_trls_rollouts(tmp_path, setting):
    """generation_config.json fields that suppress, ban, bias or force tokens (suppress_tokens, min_length, ...)
    reached every generate call: greedy replies and samples (eval's KL, PPO's log-probs) were no longer the model's
    own. Here each is set to change the replies the model gives, and must not; inside `unshaped` (what TRL's
    rollouts run in) the model's config holds none of them, and keeps them after."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.generation import UNSHAPED, generate, unshaped
    from test_byod import user_model

    folder = user_model(tmp_path / "user")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.eos_token
    prompts = ["What is 2 + 2?", "Say hi.", "What is 7 + 1?"]

    if setting == "min_length":  # a random model never ends a reply: make it end them (min_length holds the eos)
        model.lm_head.register_forward_hook(lambda mod, args, out: out.index_add(
            -1, torch.tensor([tokenizer.eos_token_id]), torch.full((*out.shape[:-1], 1), 6.0)))

    def replies():
        return [[r.token_ids for r in rows] for rows in (
            generate(model, tokenizer, prompts, max_new_tokens=8, progress=False) +
            generate(model, tokenizer, prompts, max_new_tokens=8, do_sample=True, num_samples=2, progress=False))]

    own = replies()
    seen = sorted({t for rows in own for row in rows for t in row})
    first = sorted({row[0] for rows in own for row in rows if row})
    eos = tokenizer.eos_token_id
    value = {"suppress_tokens": seen, "begin_suppress_tokens": first, "bad_words_ids": [[t] for t in first],
             "sequence_bias": [[[t], -50.0] for t in first], "min_length": 200,
             "exponential_decay_length_penalty": (0, 50.0), "forced_eos_token_id": eos}[setting]
    model.generation_config.update(**{setting: value})
    assert replies() == own
    with unshaped(model) as users:
        assert all(getattr(model.generation_config, k) == v for k, v in UNSHAPED.items())
        assert getattr(users, setting) == value  # the user's, for what is saved meanwhile
    assert getattr(model.generation_config, setting) == value


def gemma_like(eos_list: bool):
    """A tiny model with a Gemma-style template: a turn ends with <end_of_turn> (id 0), the tokenizer's eos is <eos>
    (id 1). It says <end_of_turn> first, greedy or sampled. `eos_list`: its generation_config lists both, as
    Gemma-2-it ships it; else only the eos, as a base model's does."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<end_of_turn>": 0, "<eos>": 1, "<bos>": 2, "<pad>": 3, "<start_of_turn>": 4, "user": 5, "model": 6,
             "[UNK]": 7, "What": 8, "is": 9, "2": 10, "+": 11, "3": 12, "?": 13}
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                  unk_token="[UNK]", additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    tok.chat_template = ("{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == "
                         "'assistant' else message['role'] %}{{ '<start_of_turn>' + role + '\n' + message['content'] "
                         "| trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
                         "{{ '<start_of_turn>model\n' }}{% endif %}")
    eos = [1, 0] if eos_list else 1
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=14, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                                         bos_token_id=2, eos_token_id=eos, pad_token_id=3))
    model.lm_head = torch.nn.Linear(32, 14, bias=True)  # whatever the context: <end_of_turn> (id 0), sampled too
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()[0] = 50.0
    model.generation_config = GenerationConfig(bos_token_id=2, eos_token_id=eos, pad_token_id=3)
    return model, tok


def test_the_end_of_turn_is_read_from_the_template_once_per_tokenizer_until_the_template_changes(monkeypatch):
    """stop_ids runs on every generate call and every rollout step: it rendered the chat template each time."""
    from pipeline.generation import stop_ids

    model, tok = gemma_like(eos_list=False)
    renders, render = [], type(tok).apply_chat_template
    monkeypatch.setattr(type(tok), "apply_chat_template", lambda *a, **kw: renders.append(1) or render(*a, **kw))
    assert [stop_ids(tok, model) for _ in range(3)] == [[1, 0]] * 3 and len(renders) == 1
    tok.chat_template = tok.chat_template.replace("<end_of_turn>", "<eos>")  # a turn now ends with the eos
    assert stop_ids(tok, model) == [1] and len(renders) == 2


@pytest.mark.parametrize("eos_list", [True, False])
def test_replies_stop_at_the_templates_end_of_turn_when_it_is_not_the_eos(eos_list):
    """Gemma's and Phi-3's turns end with a token that is not their tokenizer's eos. Generation stopped at the eos
    alone: replies ran on to max_new_tokens into made-up turns (ended 0, lengths inflated), in eval, held-out
    scoring and PPO's rollouts; a saved model's generation_config lost the list."""
    import types

    from pipeline.generation import generate, prompt_ids, sample_sequences, stop_ids
    from pipeline.ppo_rollout import sample_replies

    model, tok = gemma_like(eos_list)
    assert stop_ids(tok, model) == [1, 0]  # from the template even when the model's config names the eos alone
    prompt = [{"role": "user", "content": "What is 2 + 3 ?"}]
    (reply,), = generate(model, tok, [prompt], max_new_tokens=8, progress=False)
    assert reply.ended and reply.n_tokens == 0 and reply.end_id == 0
    (seq,), _ = sample_sequences(tok, [prompt], [[reply]])
    assert seq[-1] == 0  # the log-prob of the reply ends with the token it stopped with
    cfg = types.SimpleNamespace(max_new_tokens=8, temperature=1e-4, top_p=1.0)
    batch = sample_replies(model, tok, [prompt_ids(tok, prompt)], [0], cfg, "cpu")
    assert batch.ended.tolist() == [True] and batch.mask.sum().item() == 1  # the end-of-turn token, then padding
    models.configure_generation(model, tok)
    assert model.generation_config.eos_token_id == [1, 0]
    # GRPO/RLOO: TRL stops at that list; its reward function counted only the eos as an end (every reply penalised)
    from pipeline import trl_online
    from pipeline.tool_rollout import tool_turn_text

    class EndedOnly:
        def policy_scores(self, prompts, replies, ended, missing_eos_penalty, tools=None, clip=None):
            return ended.float(), ended.float(), ended.float()

    score = trl_online.reward_function(EndedOnly(), stop_ids(tok, model), 1.0)
    assert score(prompts=[prompt], completions=["5"], completion_ids=[[12, 0]], log_metric=lambda k, v: None) == [1]
    # a tool turn follows the template's end of turn (it fell back to ChatML's, with a warning)
    turn = tool_turn_text(tok, [*prompt, {"role": "assistant", "content": "x"}], [{"role": "tool", "content": "4"}])
    assert turn == "\n<start_of_turn>tool\n4<end_of_turn>\n<start_of_turn>model\n"


def test_tool_prompts_past_a_position_tables_end_stop_in_one_line(tiny_run, tool_work, monkeypatch, capsys):
    """eval's tool prompts only warned past a model's positions, so a GPT-2-like checkpoint (a table of positions)
    stopped mid-rollout with an IndexError traceback. They now stop in one line naming the prompts, the budget key
    and the checkpoint, as eval's plain prompts do, and leave nothing behind."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    work, _, _ = tiny_run
    gpt = tool_work / "gpt"
    tokenizer = AutoTokenizer.from_pretrained(work / "runs/tiny/sft")
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64)) \
        .save_pretrained(gpt)
    tokenizer.save_pretrained(gpt)
    monkeypatch.chdir(tool_work)
    tools = {**TOOLS, "tools": [{**t, "source": str(tool_work / "runs/tiny/diffusion")} for t in TOOLS["tools"]]}
    recipe = tiny_recipe(tool_work, run={"name": "positions"}, world={"n_tool_eval": 3}, tools=tools,
                         eval={**SMALL_EVAL, "max_prompts": 2, "num_samples": 0, "perplexity_data": "",
                               "max_new_tokens": 4, "checkpoints": [str(gpt)], "tool_max_total_tokens": 100,
                               "tool_samples": 0})
    line = one_error_line_of(evaluate.main, [str(recipe)], capsys)
    assert re.fullmatch(rf"error: world:tool_eval: prompt 1 \(\d+ tokens; 3 of 3 prompts run past\) with a reply of up "
                        rf"to eval.tool_max_total_tokens=100 tokens does not fit .*'s table of 64 positions \({gpt}\): "
                        rf".*", line), line
    assert not (tool_work / "runs/positions").exists()
