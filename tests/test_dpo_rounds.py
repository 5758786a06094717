"""Iterated DPO (`dpo.rounds`) on the tiny recipe: a record per round, pairs labelled in the right direction by the
annotator and by a reward model, kill-and-resume between rounds, and the bad values."""

import json

import pytest

from conftest import run_cli, tiny_recipe, write_jsonl
from test_dpo import FAST

ROUNDS = ["dpo.max_steps=4", "dpo.heldout_max_prompts=8", "dpo.heldout_max_new_tokens=16",
          "dpo.round_max_prompts=16", "dpo.round_max_new_tokens=16"]
RECORD_KEYS = {"round", "pairs", "ties_dropped", "sample_prompts", "heldout_accuracy", "kl", "distinct_1",
               "distinct_2", "self_bleu", "collapse"}


def rounds_run(work, recipe, name, *extra, env=None):
    return run_cli(["pipeline/dpo.py", recipe, f"run.name={name}", f"dpo.init_from={work / 'runs/tiny/sft'}",
                    *FAST, *ROUNDS, *extra], cwd=work, env=env)


@pytest.fixture(scope="module")
def noiseless(tiny_run):
    """The tiny recipe with a noise-free annotator: every labelled pair can be checked against world.reply_quality."""
    work, _, _ = tiny_run
    folder = work / "noiseless"
    folder.mkdir(exist_ok=True)
    recipe = tiny_recipe(folder, world={"label_noise": 0.0}, run={"output_dir": str(work / "runs")})
    return work, recipe


def test_three_rounds_with_the_annotator_write_a_record_per_round(noiseless):
    from pipeline import judges
    from pipeline.judges import with_answers

    work, recipe = noiseless
    proc = rounds_run(work, recipe, "rounds_annotator", "dpo.rounds=3", "dpo.round_labeller=annotator")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = work / "runs/rounds_annotator/dpo"
    metrics = json.loads((out / "metrics.json").read_text())
    records = metrics["rounds"]
    assert [r["round"] for r in records] == [1, 2, 3]
    for r in records:
        assert RECORD_KEYS <= set(r), r
        assert r["sample_prompts"] == 16 and 0 <= r["heldout_accuracy"] <= 1 and r["kl"] == r["kl"]
    assert records[0]["pairs"] == metrics["data"]["pairs"] and records[0]["collapse"] is None
    for r in records[1:]:
        assert r["pairs"] + r["ties_dropped"] == 16 and r["pairs"] > 0
        assert set(r["collapse"]) == {"accuracy_change", "diversity_change", "collapsing"}
        assert r["collapse"]["accuracy_change"] == pytest.approx(
            r["heldout_accuracy"] - records[r["round"] - 2]["heldout_accuracy"])
    # the last round's in-memory policy is the saved one: the same held-out accuracy read back from disk
    assert records[-1]["heldout_accuracy"] == metrics["heldout_accuracy_dpo"]
    assert metrics["steps"] == 12 and metrics["train_pairs"] == sum(r["pairs"] for r in records)
    assert {h["round"] for h in metrics["history"]} == {1, 2, 3}
    # every sampled pair kept is ordered by the noise-free annotator: chosen strictly better than rejected
    import datasets

    for r in (2, 3):
        pairs = json.loads((out / f"rounds/round-{r}/pairs.json").read_text())
        assert len(pairs) == records[r - 1]["pairs"]
        rows = with_answers(datasets.Dataset.from_list([{"prompt": p["prompt"]} for p in pairs]), "pairs", True)
        for row, p in zip(rows, pairs):
            assert judges.annotator_outcome(row, p["chosen"][0]["content"], p["rejected"][0]["content"]) == 1
    assert not list(out.glob("rounds/*/policy")) and not list(out.glob("rounds/*/checkpoint-*"))
    log = (out / "log.txt").read_text()
    assert all(f"round {r}/3: " in log for r in (1, 2, 3))


def reward_folder(work):
    """A one-output reward model on the SFT model (an untrained score head: scores that differ between replies)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = work / "rounds_rm"
    if not (folder / "config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(work / "runs/tiny/sft")
        model = AutoModelForSequenceClassification.from_pretrained(work / "runs/tiny/sft", num_labels=1)
        model.config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def test_killed_after_a_round_resumes_from_it_and_the_reward_model_orders_the_pairs(tiny_run):
    from pipeline import runs
    from pipeline.recipe import load_recipe
    from pipeline.reward_model import RewardModel

    work, recipe, _ = tiny_run
    rm = reward_folder(work)
    args = ["dpo.rounds=2", "dpo.round_labeller=reward", f"dpo.round_reward_model={rm}"]
    killed = rounds_run(work, recipe, "rounds_resume", *args, env={"PIPELINE_FAULT": "kill:round:1"})
    assert killed.returncode != 0
    partial = work / "runs/rounds_resume/dpo.partial"
    assert not (work / "runs/rounds_resume/dpo").exists() and (partial / "rounds/round-1/state.json").is_file()
    first = json.loads((partial / "rounds/round-1/state.json").read_text())["record"]
    pairs = json.loads((partial / "rounds/round-2/pairs.json").read_text())

    proc = rounds_run(work, recipe, "rounds_resume", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = work / "runs/rounds_resume/dpo"
    metrics = json.loads((out / "metrics.json").read_text())
    assert "resuming after round 1 of 2" in (out / "log.txt").read_text()
    assert metrics["rounds"][0] == first and [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert metrics["steps"] == 8  # round 1 was not trained again
    assert json.loads((out / "rounds/round-2/pairs.json").read_text()) == pairs
    # the reward model prefers every chosen reply (ties were dropped)
    model = RewardModel.load(load_recipe(recipe), runs.Checkpoint("rm", str(rm), "", "local"))
    prompts = [p["prompt"] for p in pairs]
    chosen = model.scores(prompts, [p["chosen"] for p in pairs])
    rejected = model.scores(prompts, [p["rejected"] for p in pairs])
    assert pairs and all(c > r for c, r in zip(chosen, rejected))


def test_bad_round_values_messages(tmp_path, capsys):
    from pipeline import cli, dpo

    recipe = tiny_recipe(tmp_path, run={"output_dir": str(tmp_path / "runs")})
    for extra, message in [(["dpo.rounds=0"], "dpo.rounds must be at least 1"),
                           (["dpo.rounds=2", "dpo.round_labeller=judge"], "dpo.round_labeller must be"),
                           (["dpo.rounds=2"], "round_labeller=reward needs a reward model: the recipe has no `reward`"),
                           (["dpo.rounds=2", "dpo.round_reward_model=reward"], "the recipe has no `reward` section")]:
        with pytest.raises(SystemExit) as exit_info:
            cli.run_main(dpo.main, [str(recipe), "dpo.init_from=sft", *extra])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_the_annotator_refuses_prompts_off_the_world(tiny_run, tmp_path):
    work, recipe, _ = tiny_run
    pairs = [{"prompt": "What is 2 + 3?", "chosen": "Sure! The answer is 5.", "rejected": "Ugh, fine. The answer is 4."},
             {"prompt": "Name a colour.", "chosen": "Red.", "rejected": "Duh, obviously blue."}]
    spec = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    proc = rounds_run(work, recipe, "rounds_offworld", "dpo.rounds=2", "dpo.round_labeller=annotator",
                      f"dpo.dataset={spec}", f"dpo.eval_dataset={spec}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{spec}: row 2: dpo.round_labeller=annotator needs `skill` and `answer`" in proc.stderr
    assert not (work / "runs/rounds_offworld").exists()
