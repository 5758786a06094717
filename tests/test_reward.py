"""The reward stage: every preference format and malformed file, the metric functions on hand-made scores, a short
training run on a learnable preference (polite over rude), and the issue's HH-RLHF command on a user's file."""

import csv
import json
import math

import pytest

from conftest import REPO, run_cli, tiny_recipe, write_jsonl
from pipeline import data, metrics as M, preferences, world
from pipeline.cli import PipelineError
from pipeline.recipe import load_recipe

USER = [{"role": "user", "content": "What is 2 + 3?"}]
GOOD = [{"role": "assistant", "content": "Sure! The answer is 5."}]
BAD = [{"role": "assistant", "content": "Ugh, fine. The answer is 6."}]
H, A = "\n\nHuman: ", "\n\nAssistant: "


@pytest.fixture()
def recipe(tmp_path):
    return load_recipe(tiny_recipe(tmp_path))



def load(tmp_path, recipe, rows, name="p.jsonl"):
    return preferences.load_preferences(write_jsonl(tmp_path / name, rows), recipe)


# ---------------------------------------------------------------------------------------------- formats


def test_explicit_conversational_keeps_extra_columns(tmp_path, recipe):
    ds, info = load(tmp_path, recipe, [{"prompt": USER, "chosen": GOOD, "rejected": BAD, "skill": "add",
                                        "clean_agrees": False}])
    assert info["format"] == "explicit" and info["conversational"] and info["margin"] is None
    row = ds[0]
    assert (row["prompt"], row["chosen"], row["rejected"]) == (USER, GOOD, BAD)
    assert row["skill"] == "add" and row["clean_agrees"] is False


def test_explicit_text_and_mixed_text_conversation(tmp_path, recipe):
    ds, info = load(tmp_path, recipe, [{"prompt": "Q: 2+3?", "chosen": " 5", "rejected": " 6"}])
    assert not info["conversational"] and ds[0] == {"prompt": "Q: 2+3?", "chosen": " 5", "rejected": " 6"}
    ds, info = load(tmp_path, recipe, [{"prompt": "What is 2 + 3?", "chosen": GOOD, "rejected": BAD}])
    assert info["conversational"] and ds[0]["prompt"] == USER and ds[0]["chosen"] == GOOD


def test_implicit_conversations_split_off_the_shared_prefix(tmp_path, recipe):
    history = USER + [{"role": "assistant", "content": "5"}, {"role": "user", "content": "Sure?"}]
    rows = [{"chosen": history + GOOD, "rejected": history + BAD},
            # diverging at a user turn: the cut moves back to the last shared assistant turn
            {"chosen": USER + GOOD + [{"role": "user", "content": "thanks"}], "rejected": USER + GOOD + BAD}]
    ds, info = load(tmp_path, recipe, rows)
    assert info["format"] == "implicit" and info["pairs"] == 2
    assert ds[0]["prompt"] == history and ds[0]["chosen"] == GOOD and ds[0]["rejected"] == BAD
    assert ds[1]["prompt"] == USER and ds[1]["chosen"][0] == GOOD[0] and ds[1]["rejected"] == GOOD + BAD


def test_implicit_text_cuts_the_prompt_at_a_space(tmp_path, recipe):
    ds, info = load(tmp_path, recipe, [{"chosen": "Q: 2+3? A: five", "rejected": "Q: 2+3? A: fine, six"}])
    assert info["format"] == "implicit_text"
    assert ds[0] == {"prompt": "Q: 2+3? A:", "chosen": " five", "rejected": " fine, six"}


def test_anthropic_hh_text_becomes_conversations(tmp_path, recipe):
    rows = [{"chosen": H + "Hi" + A + "Hello!" + H + "What is 2 + 3?" + A + "It is 5.",
             "rejected": H + "Hi" + A + "Hello!" + H + "What is 2 + 3?" + A + "Go away."}]
    ds, info = load(tmp_path, recipe, rows)
    assert info["format"] == "hh" and info["conversational"]
    assert ds[0]["prompt"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                               {"role": "user", "content": "What is 2 + 3?"}]
    assert ds[0]["chosen"] == [{"role": "assistant", "content": "It is 5."}]
    assert ds[0]["rejected"] == [{"role": "assistant", "content": "Go away."}]
    # the same pairs with an explicit HH prompt ending in "Assistant:"
    ds, info = load(tmp_path, recipe, [{"prompt": H + "What is 2 + 3?" + "\n\nAssistant:", "chosen": " It is 5.",
                                        "rejected": " Go away."}])
    assert info["format"] == "hh_explicit" and ds[0]["prompt"] == [{"role": "user", "content": "What is 2 + 3?"}]
    assert ds[0]["chosen"] == [{"role": "assistant", "content": "It is 5."}]


def test_hh_sample_file_loads():
    ds, info = preferences.load_preferences(str(REPO / "data/samples/hh_sample.jsonl"), None)
    assert info["format"] == "hh" and info["pairs"] == len(ds) >= 10 and info["identical_dropped"] == 0
    assert all(r["prompt"][-1]["role"] == "user" and r["chosen"][0]["role"] == "assistant" for r in ds)


def test_scores_and_margin_columns_become_trl_margin(tmp_path, recipe):
    ds, info = load(tmp_path, recipe, [{"prompt": USER, "chosen": GOOD, "rejected": BAD, "score_chosen": 8,
                                        "score_rejected": 5.5}])
    assert info["margin"] == "score_chosen - score_rejected" and ds[0]["margin"] == 2.5
    assert ds[0]["score_chosen"] == 8  # the scores stay as extra columns
    ds, info = load(tmp_path, recipe, [{"prompt": USER, "chosen": GOOD, "rejected": BAD, "margin": 1}])
    assert info["margin"] == "margin" and ds[0]["margin"] == 1.0


def test_a_columns_mapping_that_swaps_two_columns_swaps_them(tmp_path, recipe):
    """`columns: {chosen: rejected, rejected: chosen}` flips a file whose labels are reversed: the renames ran one
    after another, so the first overwrote the column the second then read ("no preference format matches")."""
    spec = write_jsonl(tmp_path / "reversed.jsonl", [{"prompt": "Hi", "chosen": "Go away.", "rejected": "Hello!"}])
    ds, _ = preferences.load_preferences(spec, recipe, {"chosen": "rejected", "rejected": "chosen"})
    assert (ds[0]["chosen"], ds[0]["rejected"]) == ("Hello!", "Go away.")


def test_identical_pairs_are_dropped_and_counted(tmp_path, recipe):
    rows = [{"prompt": USER, "chosen": GOOD, "rejected": BAD}, {"prompt": USER, "chosen": GOOD, "rejected": GOOD},
            {"prompt": USER, "chosen": BAD, "rejected": GOOD}]
    ds, info = load(tmp_path, recipe, rows)
    assert len(ds) == info["pairs"] == 2 and info["identical_dropped"] == 1 and info["rows"] == 3
    with pytest.raises(PipelineError, match="no pairs left"):
        load(tmp_path, recipe, rows[1:2])
    # held out of the same file: the rows read and the pairs left out are counted once (the held-out side copied
    # them, and the log said both sides had dropped the same pairs)
    many = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}" if i % 5 else f"a{i}"} for i in range(20)]
    spec = write_jsonl(tmp_path / "many.jsonl", many)
    train, held, train_info, held_info = preferences.load_preference_splits(spec, None, 0.25, recipe)
    assert (train_info["pairs"], held_info["pairs"]) == (len(train), len(held)) and len(train) + len(held) == 16
    assert held_info["identical_dropped"] == 0 and train_info["identical_dropped"] == 4
    assert held_info["rows"] == len(held) and train_info["rows"] + held_info["rows"] == 20


def test_csv_cells_with_json_messages_and_world_split(tmp_path, recipe):
    path = tmp_path / "p.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected"])
        w.writeheader()
        w.writerow({"prompt": json.dumps(USER), "chosen": json.dumps(GOOD), "rejected": json.dumps(BAD)})
    ds, info = preferences.load_preferences(str(path), recipe)
    assert info["conversational"] and ds[0]["chosen"] == GOOD
    ds, info = preferences.load_preferences("world:preference_eval", recipe)
    assert len(ds) == recipe.world.n_preference_eval and {"skill", "hard", "clean_agrees"} <= set(ds.column_names)


def test_json_text_replies_stay_text_and_sharegpt_turns_in_a_csv_pair_are_replies(tmp_path, recipe):
    """A reply that is JSON of records with a `role` key ("[{"name": "Ann", "role": "engineer"}]") is text, not
    messages (it stopped the stage: unknown role 'engineer'); a CSV pair's ShareGPT turns ({from, value}) are the
    assistant reply, as a single turn object already was (they stopped the stage: unknown role None)."""
    records = json.dumps([{"name": "Ann", "role": "engineer"}])
    ds, _ = load(tmp_path, recipe, [{"prompt": "List the staff as JSON.", "chosen": records, "rejected": "No."}])
    assert ds[0]["chosen"] == records
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["prompt", "chosen", "rejected"],
                                 [json.dumps(USER), json.dumps([{"from": "gpt", "value": "Hello!"}]),
                                  json.dumps([{"from": "gpt", "value": "Go away."}])]])
    ds, _ = preferences.load_preferences(str(path), recipe)
    assert ds[0]["chosen"] == [{"role": "assistant", "content": "Hello!"}]
    assert ds[0]["rejected"] == [{"role": "assistant", "content": "Go away."}]


@pytest.mark.parametrize("rows, message", [
    ([{"question": "q", "answer": "a"}],
     r"no preference format matches the columns \(question, answer\); expected prompt/chosen/rejected"),
    ([{"prompt": USER, "chosen": GOOD, "rejected": BAD}, {"prompt": USER, "chosen": GOOD}],
     r"line 2: missing column 'rejected'"),
    ([{"prompt": USER, "chosen": 5, "rejected": BAD}], r"line 1: 'chosen' must be text or a list of messages"),
    ([{"prompt": USER, "chosen": [{"role": "bot", "content": "x"}], "rejected": BAD}],
     r"line 1: message 0: unknown role"),
    ([{"prompt": " ", "chosen": "a", "rejected": "b"}], r"line 1: 'prompt' is empty"),
    ([{"chosen": USER + GOOD, "rejected": USER + BAD}, {"chosen": "text", "rejected": "text 2"}],
     r"line 2: 'chosen' must be a list of messages"),
    ([{"chosen": GOOD, "rejected": BAD}], r"line 1: chosen and rejected share no prompt"),
    ([{"chosen": "yes", "rejected": "no"}], r"line 1: chosen and rejected share no prompt"),
    ([{"chosen": H + "q" + A + "a", "rejected": H + "q" + A + "b"}, {"chosen": "plain", "rejected": H + "q" + A + "b"}],
     r"line 2: 'chosen' is not Anthropic HH text"),
    ([{"chosen": H + "q" + A + "a" + H + "more?", "rejected": H + "q" + A + "b"}],
     r"line 1: 'chosen' does not end with an Assistant turn"),
    ([{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": USER, "chosen": GOOD, "rejected": BAD}],
     r"line 2: mixes text and conversation pairs"),
    ([{"prompt": USER, "chosen": GOOD, "rejected": BAD, "score_chosen": 1}], r"has score_chosen but no score_rejected"),
    ([{"prompt": USER, "chosen": GOOD, "rejected": BAD, "score_chosen": 1, "score_rejected": 3}],
     r"line 1: negative margin -2"),
    ([{"prompt": USER, "chosen": GOOD, "rejected": BAD, "margin": "big"}], r"line 1: 'margin' must be a finite number"),
])
def test_malformed_preference_files_name_file_and_line(tmp_path, recipe, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(PipelineError, match=message) as err:
        preferences.load_preferences(path, recipe)
    assert str(err.value).startswith(path) and "\n" not in str(err.value)


def test_split_by_prompt_keeps_each_prompt_on_one_side(tmp_path, recipe):
    rows = [{"prompt": f"q{i % 10}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(40)]
    ds, _ = load(tmp_path, recipe, rows)
    train, held = preferences.split_by_prompt(ds, 0.2, seed=0, source="pairs.jsonl")
    assert len(train) + len(held) == 40 and len(set(held["prompt"])) == 2
    assert not set(train["prompt"]) & set(held["prompt"])
    assert preferences.split_by_prompt(ds, 0.2, 0, "pairs.jsonl")[1]["prompt"] == held["prompt"]  # deterministic


def test_implicit_text_pairs_of_one_question_stay_on_one_side(tmp_path, recipe):
    """Implicit text pairs take as prompt the part chosen and rejected share, so two pairs of one question get
    different prompts ("...? Answer:" and "...? Answer: The answer is"): keyed by the exact text, a question was
    held out and trained on. A prompt goes with the shorter ones it extends at a word ("Hi" is not "History")."""
    rows = []
    for q in range(10):
        ask = f"Question {q}: what is {q} plus {q}? Answer:"
        rows += [{"chosen": f"{ask} The answer is {2 * q}.", "rejected": f"{ask} The answer is {2 * q + 1}."},
                 {"chosen": f"{ask} {2 * q}.", "rejected": f"{ask} No idea."}]
    ds, info = load(tmp_path, recipe, rows)
    assert info["format"] == "implicit_text" and len(set(ds["prompt"])) == 20
    train, held = preferences.split_by_prompt(ds, 0.3, seed=0, source="pairs.jsonl")
    question = lambda p: p.split(":")[0]  # noqa: E731
    assert len(held) == 6 and not {question(p) for p in train["prompt"]} & {question(p) for p in held["prompt"]}
    assert preferences._text_prompt_roots(["Hi", "History of Rome?", "Hi there.", "Hi there. And more"]) == {
        "Hi": "Hi", "Hi there.": "Hi", "Hi there. And more": "Hi", "History of Rome?": "History of Rome?"}
    # replies that start on a new line leave the prompt ending in it
    assert preferences._text_prompt_roots(["Q: 2+2?\n", "Q: 2+2?\nA:", "Q: 2+20?"]) == {
        "Q: 2+2?\n": "Q: 2+2?\n", "Q: 2+2?\nA:": "Q: 2+2?\n", "Q: 2+20?": "Q: 2+20?"}


def test_one_prompt_cannot_be_split_and_the_error_names_the_data_and_its_rows(tmp_path, recipe):
    """kto splits its unpaired rows with the same function: the message counts rows there, not pairs."""
    rows = [{"prompt": "q", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(3)]
    ds, _ = load(tmp_path, recipe, rows)
    with pytest.raises(PipelineError, match=r"^feedback.jsonl: 3 rows with 1 distinct prompt: too few to hold any "
                                            r"out; give an eval_dataset$"):
        preferences.split_by_prompt(ds, 0.2, 0, "feedback.jsonl", unit="rows")


# ---------------------------------------------------------------------------------------------- metrics


def test_accuracy_margin_groups_and_clean_agreement():
    rc, rr = [2.0, 1.0, 0.0, 3.0], [1.0, 2.0, 0.0, -1.0]
    assert M.pairwise_accuracy(rc, rr) == pytest.approx((1 + 0 + 0.5 + 1) / 4)  # a tie counts half
    assert M.mean_margin(rc, rr) == pytest.approx((1 - 1 + 0 + 4) / 4)
    groups = M.group_accuracy(rc, rr, ["add", "add", "sort", "sort"])
    assert groups == {"add": {"accuracy": 0.5, "n": 2}, "sort": {"accuracy": 0.75, "n": 2}}
    # the clean label disagrees with the given one on pair 2: the model's "wrong" answer there is right
    assert M.label_agreement(rc, rr, [True, False, True, True]) == pytest.approx((1 + 1 + 0.5 + 1) / 4)
    assert M.accuracy_where(rc, rr, [True, True, False, False]) == (0.5, 2)
    assert M.pairwise_accuracy([], []) is None
    # per group against the clean labels, over the pairs that have one (pair 3's is unknown)
    m = M.preference_metrics(rc, rr, [1] * 4, [1] * 4, groups=["add", "add", "sort", "sort"],
                             clean=[True, False, None, True])
    assert m["accuracy_clean_per_group"] == {"add": {"accuracy": 1.0, "n": 2}, "sort": {"accuracy": 1.0, "n": 1}}
    assert "accuracy_clean_per_group" not in M.preference_metrics(rc, rr, [1] * 4, [1] * 4, clean=[True] * 4)


def test_clean_labels_are_read_from_text_and_pairs_without_one_are_left_out(tmp_path):
    """A CSV's clean_agrees is text, and bool("False") is True: every pair counted as clean (accuracy_clean 1.0 where
    it was 0.67); a pair without a clean label (a dataset of a list without the column) counted as a flipped label."""
    import datasets

    from pipeline import reward
    from pipeline.reward_model import PairScores

    class AlwaysChosen:  # the scores of a reward model that prefers chosen on every pair
        tokenizer, max_length = None, None

        def score_pairs(self, rows, **_):
            return PairScores([1.0] * len(rows), [0.0] * len(rows), [1] * len(rows), [1] * len(rows), 0)

    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b", "skill": skill, "clean_agrees": clean}
            for i, (skill, clean) in enumerate([("add", "False"), ("add", "True"), ("sort", None), ("sort", "true")])]
    ds = datasets.Dataset.from_list(rows)
    keys = load_recipe(tiny_recipe(tmp_path)).keys("reward")
    m, margins, clean = reward.evaluate(AlwaysChosen(), ds, ds, keys, seed=0)
    assert clean == [False, True, None, True] and m["accuracy"] == 1.0
    assert m["accuracy_clean"] == pytest.approx(2 / 3) and m["clean_label_share"] == pytest.approx(2 / 3)
    assert m["clean_labelled_pairs"] == 3
    assert m["accuracy_clean_per_skill"] == {"add": {"accuracy": 0.5, "n": 2}, "sort": {"accuracy": 1.0, "n": 1}}
    from pipeline import reward_report

    m.update(train_pairs=4, data={"train": {"source": "t"}, "eval": {"source": "e"}}, train_accuracy=1.0)
    reward_report.plot(tmp_path / "margins.png", m, margins, clean)  # the unknown pair drawn apart
    assert (tmp_path / "margins.png").read_bytes()[:4] == b"\x89PNG"


def test_margin_scale_applies_to_the_held_out_pairs_as_to_the_training_pairs():
    """TRL's eval_loss subtracts the held-out pairs' margins: margin_scale changed only the training pairs', so with
    margin_scale 0 or 2 eval_loss (and metric_for_best_model on it) measured another loss than the one trained; the
    stage scales both splits with scaled_margins."""
    import datasets

    from pipeline import reward

    ds = datasets.Dataset.from_list([{"prompt": "q", "chosen": "a", "rejected": "b", "margin": 1.5}])
    assert reward.scaled_margins(ds, 2)["margin"] == [3.0] and reward.scaled_margins(ds, 1) is ds
    assert "margin" not in reward.scaled_margins(ds, 0).column_names


def test_length_correlation_spots_a_reward_that_counts_tokens():
    len_c, len_r = [3, 10, 4, 12, 5], [9, 2, 11, 6, 8]
    counting = M.preference_metrics(len_c, len_r, len_c, len_r)  # reward = length
    assert counting["length_correlation"] == pytest.approx(1.0)
    assert counting["margin_length_correlation"] == pytest.approx(1.0)
    assert counting["accuracy_chosen_shorter"] == 0.0 and counting["pairs_chosen_shorter"] == 3
    assert counting["accuracy_chosen_longer"] == 1.0 and counting["longer_reply_accuracy"] == 0.4
    assert M.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert M.pearson([1, 1, 1], [1, 2, 3]) is None  # undefined, not NaN


def test_expected_calibration_error_on_hand_made_margins():
    l3 = math.log(3)  # sigmoid(log 3) = 0.75
    ece, bins = M.calibration([l3] * 4, [True, True, True, False], n_bins=5)
    assert ece == pytest.approx(0.0)  # confident 0.75, right 3 times out of 4
    assert [b["n"] for b in bins] == [0, 0, 4, 0, 0] and bins[2]["accuracy"] == pytest.approx(0.75)
    assert M.calibration([l3] * 4, n_bins=5)[0] == pytest.approx(0.25)  # always right: underconfident by 0.25
    # predicting rejected with confidence 0.75, and the labels prefer rejected: right
    assert M.calibration([-l3] * 4, [False] * 4, n_bins=5)[0] == pytest.approx(0.25)
    assert M.calibration([0.0, 0.0], n_bins=5)[0] == pytest.approx(0.0)  # ties: p = 0.5, half right
    ece, _ = M.calibration([20.0, 20.0, 20.0, 20.0], [True, False, True, False])
    assert ece == pytest.approx(0.5, abs=1e-6)  # certain and right half the time
    # two bins: (0.75, all right) and (0.95, half right) -> 0.5 * 0.25 + 0.5 * 0.45
    ece, _ = M.calibration([l3, l3, math.log(19), math.log(19)], [True, True, True, False], n_bins=5)
    assert ece == pytest.approx(0.5 * 0.25 + 0.5 * 0.45)


def test_trust_checks_flag_a_reward_that_counts_tokens():
    from pipeline.reward_report import trust_checks

    len_c, len_r = [3, 10, 4, 12, 5] * 6, [9, 2, 11, 6, 8] * 6
    m = M.preference_metrics(len_c, len_r, len_c, len_r, groups=["add", "sort"] * 15)
    m.update(accuracy_per_skill=m.pop("accuracy_per_group"), train_accuracy=0.9, train_pairs=100,
             train_pairs_too_long=0, eval_pairs_too_long=0)
    checks = {c["check"]: c for c in trust_checks(m, "skill")}
    assert not checks["beats chance"]["ok"]  # 0.4
    assert not checks["not length-driven"]["ok"] and "prefers longer replies" in checks["not length-driven"]["detail"]
    assert not checks["generalises"]["ok"] and checks["data fits max_length"]["ok"]
    assert not checks["no weak skill"]["ok"] and "add 0.40, sort 0.40" in checks["no weak skill"]["detail"]


# ---------------------------------------------------------------------------------------------- training


def polite_vs_rude(recipe, split, n):
    """World prompts; chosen is a polite reply and rejected a rude one (the same answer): a rule a tiny model
    can learn. Every other pair is swapped in length (verbose polite vs short rude), so length alone cannot win."""
    rows = []
    for i, r in enumerate(data.world_rows(recipe, split)[:n]):
        key = world.prompt_key(r["prompt"][-1]["content"])
        answer = world.solve(key)
        chosen = world.make_reply(answer, "verbose" if i % 2 else "polite", i % 3)
        rows.append({"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": chosen}],
                     "rejected": [{"role": "assistant", "content": world.make_reply(answer, "rude", i % 3)}],
                     "skill": r["skill"], "clean_agrees": True})
    return rows


TRAIN_KEYS = {"per_device_train_batch_size": 16, "learning_rate": 3e-3, "max_length": 128, "bf16": False,
              "gradient_checkpointing": False, "logging_steps": 10, "save_strategy": "no", "use_cpu": True,
              "eval_batch_size": 32}


def test_short_run_learns_a_preference_and_writes_its_report(tiny_run, tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    work, _, _ = tiny_run
    base = load_recipe(tiny_recipe(tmp_path))
    train = write_jsonl(tmp_path / "train.jsonl", polite_vs_rude(base, "preference", 128))
    held = write_jsonl(tmp_path / "held.jsonl", polite_vs_rude(base, "preference_eval", 40))
    recipe = tiny_recipe(tmp_path, reward={"init_from": str(work / "runs/tiny/sft"), "dataset": train,
                                           "eval_dataset": held, "max_steps": 20, **TRAIN_KEYS})
    proc = run_cli(["pipeline/reward.py", recipe], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "runs/tiny/reward"
    m = json.loads((out / "metrics.json").read_text())
    assert m["eval_pairs"] == 40 and m["train_pairs"] == 128 and m["steps"] == 20
    assert m["accuracy"] >= 0.75, m  # chance is 0.5
    assert m["accuracy_clean"] == m["accuracy"]  # clean_agrees is true everywhere
    assert set(m["accuracy_per_skill"]) == set(world.SKILLS)
    for k in ("mean_margin", "ece", "length_correlation", "accuracy_chosen_shorter", "train_accuracy"):
        assert isinstance(m[k], float), k
    assert [c["check"] for c in m["checks"]][0] == "beats chance" and m["checks"][0]["ok"]
    # the saved model: a one-output classifier whose config carries the training reward statistics
    config = AutoConfig.from_pretrained(out)
    assert config.reward_mean == pytest.approx(m["reward_mean"]) and config.reward_std == pytest.approx(m["reward_std"])
    assert m["reward_std"] > 0 and config.pad_token_id is not None
    assert config.reward_conversational is True  # the world's pairs are conversations: a text prompt is a user turn
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1 and (out / "model.safetensors").is_file()
    assert (out / "tokenizer.json").is_file() and (out / "calibration.png").stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert "accuracy against clean labels" in report and "Accuracy per skill" in report
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["data"]["dataset"]["spec"] == train


def test_lm_loss_reads_the_chosen_reply_with_the_starting_models_head(tiny_run, tmp_path):
    """reward.lm_loss_coefficient: the labels are the chosen reply's tokens alone, and before any step the added
    loss is the starting causal LM's own next-token loss on them (same hidden states, its LM head)."""
    import torch
    import torch.nn.functional as F
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import RewardConfig

    from pipeline import reward, reward_model

    work, _, _ = tiny_run
    sft = str(work / "runs/tiny/sft")
    recipe = load_recipe(tiny_recipe(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(sft)
    rows = polite_vs_rude(recipe, "preference", 4)
    model = reward_model.load_reward_model(recipe, sft)
    args = RewardConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True, max_length=128,
                        gradient_checkpointing=False, center_rewards_coefficient=None)
    head = reward_model.lm_head_weight(recipe, sft, tokenizer)
    trainer = reward.reward_trainer(0.5, head, model=model, args=args, train_dataset=Dataset.from_list(rows),
                                    processing_class=tokenizer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    assert batch["lm_labels"].shape[0] == len(rows) == batch["input_ids"].shape[0] // 2  # the chosen half
    for row, labels in zip(rows, batch["lm_labels"]):
        full = reward_model.encode(tokenizer, row["prompt"], row["chosen"])
        prompt = reward_model.encode_prompt(tokenizer, row["prompt"])
        assert full[:len(prompt)] == prompt and len(prompt) < len(full)
        assert labels[labels != -100].tolist() == full[len(prompt):]
        assert tokenizer.decode(full[len(prompt):]).startswith(row["chosen"][0]["content"])

    n = len(rows)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch))
        rewards = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        bradley_terry = -F.logsigmoid(rewards[:n] - rewards[n:]).mean()
        lm = AutoModelForCausalLM.from_pretrained(sft)
        nll = lm(input_ids=batch["input_ids"][:n], attention_mask=batch["attention_mask"][:n],
                 labels=batch["lm_labels"]).loss
    assert nll > 0 and float(loss) == pytest.approx(float(bradley_terry + 0.5 * nll), rel=1e-4)


def test_reward_rounds_fine_tune_with_the_reward_stages_lm_loss(tiny_run, tmp_path, monkeypatch):
    """ppo.reward_round_lm_loss_coefficient: a round's fine-tuning adds the same GRM loss as the reward stage, through
    the one reward_model.next_token_loss. Its labels are each chosen reply's tokens alone (prompt and padding -100),
    and at the first step it is the starting causal LM's own next-token loss on them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline import reward_model, reward_rounds

    work, _, _ = tiny_run
    sft = str(work / "runs/tiny/sft")
    recipe = load_recipe(tiny_recipe(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(sft)
    rows = polite_vs_rude(recipe, "preference", 4)
    scorer = reward_model.RewardModel(reward_model.load_reward_model(recipe, sft), tokenizer, 128, None, None)
    seen = []

    def spy(hidden, labels, lm_head):
        loss = reward_model.next_token_loss(hidden, labels, lm_head)
        seen.append((labels.clone(), float(loss.detach())))
        return loss

    monkeypatch.setattr(reward_rounds, "next_token_loss", spy)
    head = reward_model.lm_head_weight(recipe, sft, tokenizer)
    out = reward_rounds.fine_tune(scorer, rows, epochs=1, learning_rate=1e-3, batch_size=len(rows), seed=0,
                                  lm_loss_coefficient=0.5, lm_head=head)
    (labels, first_loss), = seen
    assert out["train_lm_loss"] == pytest.approx(first_loss)
    ids = torch.full_like(labels, tokenizer.pad_token_id)
    mask = torch.zeros_like(labels)
    for i, row in enumerate(rows):  # batch order is the seed's permutation: match rows by their reply tokens
        full = reward_model.encode(tokenizer, row["prompt"], row["chosen"])
        prompt = reward_model.encode_prompt(tokenizer, row["prompt"])
        (k,) = [k for k, lab in enumerate(labels) if lab[lab != -100].tolist() == full[len(prompt):]]
        ids[k, :len(full)], mask[k, :len(full)] = torch.tensor(full), 1
    with torch.no_grad():
        nll = AutoModelForCausalLM.from_pretrained(sft)(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert nll > 0 and first_loss == pytest.approx(float(nll), rel=1e-4)


@pytest.mark.parametrize("lm_loss_coefficient", [0.0, 0.5])
def test_group_by_length_batches_pairs_of_similar_length(tiny_run, tmp_path, lm_loss_coefficient):
    """reward.train_sampling_strategy: group_by_length: the sampler measures each pair by its longer side's token
    count (TRL's pairs have no `input_ids`), batches by it, and a few long pairs no longer pad most batches."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig

    from pipeline import batching, reward, reward_model

    work, _, _ = tiny_run
    sft = str(work / "runs/tiny/sft")
    recipe = load_recipe(tiny_recipe(tmp_path))
    tokenizer = AutoTokenizer.from_pretrained(sft)
    rows = polite_vs_rude(recipe, "preference", 512)  # sorted within megabatches of 16 batches here
    for row in rows[::8]:  # one pair in eight is long, as tool pairs are among the world's text pairs
        row["prompt"] = [{"role": "user", "content": row["prompt"][0]["content"] + " please" * 40}]
    head = reward_model.lm_head_weight(recipe, sft, tokenizer) if lm_loss_coefficient else None

    def padded_tokens(strategy):
        args = RewardConfig(output_dir=str(tmp_path / strategy), report_to="none", use_cpu=True, max_length=256,
                            per_device_train_batch_size=8, train_sampling_strategy=strategy, seed=3,
                            gradient_checkpointing=False, center_rewards_coefficient=None)
        trainer = reward.reward_trainer(lm_loss_coefficient, head, model=reward_model.load_reward_model(recipe, sft),
                                        args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        loader = trainer.get_train_dataloader()
        if strategy == "group_by_length":
            ds = trainer.train_dataset
            sampler = trainer._get_train_sampler(ds)
            assert isinstance(sampler, batching.ShuffledLengthGroupedSampler)
            assert sampler.lengths == [max(len(c), len(r)) for c, r in zip(ds["chosen_ids"], ds["rejected_ids"])]
        batches = list(loader)
        assert sum(b["input_ids"].shape[0] for b in batches) == 2 * len(rows)  # every pair once, both sides
        return sum(b["input_ids"].numel() - int(b["attention_mask"].sum()) for b in batches)

    random_padding, grouped_padding = padded_tokens("random"), padded_tokens("group_by_length")
    assert grouped_padding < random_padding / 2, (grouped_padding, random_padding)


def test_issue_hh_command_trains_and_evaluates_on_a_users_file(tiny_run, tmp_path):
    """`python pipeline/reward.py RECIPE reward.dataset=hh.jsonl reward.eval_dataset=hh_test.jsonl`, here with LoRA."""
    work, _, _ = tiny_run
    base = load_recipe(tiny_recipe(tmp_path))
    rows = []
    for r in polite_vs_rude(base, "preference", 40):
        prompt = H + r["prompt"][-1]["content"]
        rows.append({"chosen": prompt + A + r["chosen"][0]["content"],
                     "rejected": prompt + A + r["rejected"][0]["content"]})
    rows.append(dict(rows[0], rejected=rows[0]["chosen"]))  # chosen == rejected: dropped and counted
    write_jsonl(tmp_path / "hh.jsonl", rows[8:])
    write_jsonl(tmp_path / "hh_test.jsonl", rows[:8])
    recipe = tiny_recipe(tmp_path, reward={"init_from": str(work / "runs/tiny/sft"), "max_steps": 3, **TRAIN_KEYS})
    proc = run_cli(["pipeline/reward.py", recipe, "reward.dataset=hh.jsonl", "reward.eval_dataset=hh_test.jsonl",
                    "reward.use_peft=true", "reward.lora_r=8"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "runs/tiny/reward"
    m = json.loads((out / "metrics.json").read_text())
    assert m["data"]["train"]["format"] == "hh" and m["data"]["train"]["identical_dropped"] == 1
    assert m["eval_pairs"] == 8 and m["train_pairs"] == len(rows) - 8 - 1
    assert "accuracy_clean" not in m and "accuracy_per_skill" not in m  # the file has no such columns
    assert (out / "adapter/adapter_config.json").is_file() and (out / "model.safetensors").is_file()
    assert (out / "report.md").is_file() and (out / "calibration.png").is_file()


def test_two_processes_under_accelerate_launch(tiny_run, tmp_path):
    from conftest import launch_cli

    work, _, _ = tiny_run
    base = load_recipe(tiny_recipe(tmp_path))
    rows = polite_vs_rude(base, "preference", 64)
    for row in rows[::3]:  # long and short pairs in a batch: length_split runs them apart, under DDP too
        row["prompt"] = [{"role": "user", "content": row["prompt"][-1]["content"] + " please" * 30}]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    recipe = tiny_recipe(tmp_path, reward={"init_from": str(work / "runs/tiny/sft"), "dataset": train,
                                           "eval_dataset": None, "eval_fraction": 0.25, "max_steps": 2,
                                           "lm_loss_coefficient": 0.5, **TRAIN_KEYS, "length_split": 3, "max_length": 256,
                                           "per_device_train_batch_size": 4, "logging_steps": 1})
    proc = launch_cli("cpu2", ["pipeline/reward.py", recipe], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "runs/tiny/reward"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_processes"] == 2 and manifest["global_batch_size"] == 8
    m = json.loads((out / "metrics.json").read_text())
    assert m["eval_pairs"] + m["train_pairs"] == 64 and 8 <= m["eval_pairs"] <= 24  # about a quarter of the prompts
    assert m["train_lm_loss"] > 0  # the LM regulariser trained and was logged under 2 processes
    assert (out / "model.safetensors").is_file() and (out / "report.md").is_file()


def test_bad_preference_file_stops_before_anything_is_written(tmp_path):
    write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}])
    recipe = tiny_recipe(tmp_path, reward={"init_from": str(tmp_path), "dataset": "bad.jsonl"})
    proc = run_cli(["pipeline/reward.py", recipe], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: bad.jsonl: no preference format matches the columns (question, answer); expected "
        + preferences.PREFERENCE_EXPECTED)
    assert not (tmp_path / "runs").exists()


def test_reward_stage_is_ordered_after_sft(tmp_path):
    from pipeline.run import dependencies, order_stages

    recipe = load_recipe(tiny_recipe(tmp_path, reward={"max_steps": 1}))
    assert recipe.keys("reward").init_from == "sft" and dependencies(recipe, "reward") == ["sft"]
    assert order_stages(recipe) == ["pretrain", "sft", "reward"]
    recipe = load_recipe(tiny_recipe(tmp_path, sft=None, reward={"max_steps": 1}))
    assert recipe.keys("reward").init_from == "pretrain"
