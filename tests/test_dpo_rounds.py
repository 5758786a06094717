"""Iterated DPO (`dpo.rounds`) on the tiny recipe: a record per round, pairs labelled in the right direction by the
annotator and by a reward model, kill-and-resume between rounds, and the bad values."""

import json
from pathlib import Path

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

    out = work / "runs/rounds_resume/dpo"
    # round 2 trained and everything written, killed before the folder's rename: the rounds' policies are still
    # there, so the rerun trains no round again
    killed = rounds_run(work, recipe, "rounds_resume", *args, env={"PIPELINE_FAULT": "kill:publish"})
    assert killed.returncode != 0 and (partial / "manifest.json").is_file() and not out.exists()
    assert "resuming after round 1 of 2" in killed.stdout + killed.stderr
    proc = rounds_run(work, recipe, "rounds_resume", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming after round 2 of 2" in proc.stdout + proc.stderr
    assert not list(out.glob("rounds/round-*/policy")) and not list(out.rglob("checkpoint-*"))
    metrics = json.loads((out / "metrics.json").read_text())
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
    spec = str(tmp_path / "pairs.jsonl")  # a blank line first: the row off the world is the file's line 3
    Path(spec).write_text(json.dumps(pairs[0]) + "\n\n" + json.dumps(pairs[1]) + "\n")
    proc = rounds_run(work, recipe, "rounds_offworld", "dpo.rounds=2", "dpo.round_labeller=annotator",
                      f"dpo.dataset={spec}", f"dpo.eval_dataset={spec}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{spec}: line 3: dpo.round_labeller=annotator needs `skill` and `answer`" in proc.stderr
    assert not (work / "runs/rounds_offworld").exists()


class ScriptedPolicy:
    """A tiny random Llama whose `generate` writes scripted replies (real logits for the rounds' KL, a real DPO
    step) and records every prompt it was given, as text: a tool prompt's first sample is a read_image call."""

    CALL = '<tool_call>\n{"name": "read_image", "arguments": {"image_id": "12"}}\n</tool_call>'

    @classmethod
    def make(cls, tokenizer):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        class Scripted(LlamaForCausalLM):
            seen: list = []

            def generate(self, input_ids, attention_mask, num_return_sequences, pad_token_id, **kw):
                rows = []
                for seq, att in zip(input_ids, attention_mask):
                    text = tokenizer.decode(seq[att.bool()])
                    self.seen.append(text)
                    replies = [cls.CALL, "The answer is 4."] if "<tools>" in text else ["The answer is 5.", "No."]
                    rows += [seq.tolist() + tokenizer(r, add_special_tokens=False)["input_ids"]
                             + [tokenizer.eos_token_id] for r in replies[:num_return_sequences]]
                width = max(len(r) for r in rows)
                return torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        return Scripted(config), LlamaForCausalLM(config).eval().requires_grad_(False), config


def test_tool_prompts_are_sampled_with_their_tools_and_their_pairs_keep_tools_and_structured_calls(tmp_path):
    """Round 2 renders each tool prompt with its schemas, the reward model scores with them, a sampled call becomes
    a structured tool call, and round-2/pairs.json keeps `tools` (text prompts stay as they were)."""
    import copy
    from types import SimpleNamespace

    import torch
    from transformers import LlamaForSequenceClassification
    from trl import DPOConfig, DPOTrainer

    from pipeline import dpo, dpo_rounds, preferences
    from pipeline.generation import render_prompt
    from pipeline.recipe import load_recipe
    from pipeline.reward_model import RewardModel
    from pipeline.tokenizer import train_tokenizer
    from pipeline.tool_world import TOOLS_JSON, call_message

    def user(text):
        return [{"role": "user", "content": text}]

    def said(text):
        return [{"role": "assistant", "content": text}]

    rows = [{"prompt": user(f"Which digit is in image {i}?"), "chosen": [call_message("read_image", image_id=str(i))],
             "rejected": said("The answer is 3."), "tools": json.loads(TOOLS_JSON)} for i in (12, 13)]
    rows += [{"prompt": user(f"What is {i} + 3?"), "chosen": said(f"The answer is {i + 3}."),
              "rejected": said("The answer is 1."), "tools": None} for i in (2, 3)]
    recipe = load_recipe(tiny_recipe(tmp_path, run={"output_dir": str(tmp_path / "runs")}))
    train_ds, _ = preferences.load_preferences(write_jsonl(tmp_path / "pairs.jsonl", rows), recipe)
    tokenizer = train_tokenizer([TOOLS_JSON, ScriptedPolicy.CALL, *(json.dumps(r) for r in rows)] * 20,
                                vocab_size=400)
    policy, reference, config = ScriptedPolicy.make(tokenizer)
    rm_config = copy.deepcopy(config)
    rm_config.num_labels = 1
    rm = LlamaForSequenceClassification(rm_config)
    seen_by_rm = []

    class Recording(RewardModel):
        def scores(self, prompts, replies, tools=None, **kw):
            seen_by_rm.append((replies, tools))
            return super().scores(prompts, replies, tools, **kw)

    keys = SimpleNamespace(rounds=2, round_labeller="reward", dataset=str(tmp_path / "pairs.jsonl"),
                           round_max_prompts=None, round_max_new_tokens=32, heldout_batch_size=8)
    prompts = dpo.round_prompts(keys, train_ds)
    assert [bool(p.get("tools")) for p in prompts] == [True, True, False, False]
    args = DPOConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, use_cpu=True,
                     report_to=[], save_strategy="no", logging_steps=1, bf16=False, max_length=1024)
    out = tmp_path / "out"
    state = SimpleNamespace(is_main_process=True, num_processes=1, wait_for_everyone=lambda: None)
    run = SimpleNamespace(out=out, state=state, last_checkpoint=lambda: None)
    trained_on = []

    def trainer_for(model, pairs, output_dir, dataset_pairs):
        trained_on.append(pairs)
        assert dataset_pairs == (len(trained_on) == 1)  # the dataset's pairs train round 1 only
        return DPOTrainer(model=model, ref_model=reference, args=dpo_rounds.with_output_dir(args, output_dir),
                          train_dataset=dpo.pairs_only(pairs), processing_class=tokenizer)

    setup = dpo_rounds.Rounds(recipe, keys, run, tokenizer, reference, trainer_for, prompts, None,
                              Recording(rm.eval(), tokenizer, None, None, None))
    with torch.no_grad():
        rm.score.weight.normal_()  # scores that differ between the two replies: no tie is dropped
    _, _, summary = dpo_rounds.run_rounds(setup, policy, train_ds)

    # round 2's samples: each tool prompt rendered with its tools, a text prompt as before
    schemas = json.loads(TOOLS_JSON)
    for p in prompts:
        rendered = render_prompt(tokenizer, p["prompt"], schemas if p.get("tools") else None)
        assert rendered in policy.seen, rendered
    assert sum("<tools>" in t for t in policy.seen) == 4  # 2 tool prompts x (samples for round 2, round 2's record)
    # the reward model scored the structured call with the row's tools
    replies, tools = seen_by_rm[0]
    assert tools == [schemas, schemas, None, None]
    call = [{"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "read_image", "arguments": '{"image_id": "12"}'}}]}]
    assert replies[0] == call and replies[2] == said("The answer is 5.")
    # the pairs round 2 trained on keep tools and the structured call
    pairs = json.loads((out / "rounds/round-2/pairs.json").read_text())
    assert len(pairs) == 4 and summary["rounds"][1]["pairs"] == 4
    for p in pairs[:2]:
        assert p["tools"] == TOOLS_JSON and call in (p["chosen"], p["rejected"])
        assert said("The answer is 4.") in (p["chosen"], p["rejected"])
    assert all("tools" not in p for p in pairs[2:])
    assert trained_on[1]["tools"] == [TOOLS_JSON, TOOLS_JSON, None, None]
    assert [m.get("tool_calls") is not None for p in trained_on[1] for m in p["chosen"] + p["rejected"]].count(True) == 2


def test_the_annotator_leaves_tool_prompts_out_of_later_rounds(tmp_path, capsys):
    from types import SimpleNamespace

    from pipeline import dpo, preferences
    from pipeline.cli import PipelineError
    from pipeline.recipe import load_recipe
    from pipeline.tool_world import TOOLS_JSON, call_message

    tool = {"prompt": [{"role": "user", "content": "Which digit is in image 12?"}],
            "chosen": [call_message("read_image", image_id="12")],
            "rejected": [{"role": "assistant", "content": "The answer is 3."}], "tools": TOOLS_JSON}
    text = {"prompt": [{"role": "user", "content": "Add 2 and 3."}],
            "chosen": [{"role": "assistant", "content": "The answer is 5."}],
            "rejected": [{"role": "assistant", "content": "The answer is 4."}]}
    recipe = load_recipe(tiny_recipe(tmp_path))
    keys = SimpleNamespace(round_labeller="annotator", dataset="pairs")
    mixed, _ = preferences.load_preferences(write_jsonl(tmp_path / "mixed.jsonl", [tool, text]), recipe)
    prompts = dpo.round_prompts(keys, mixed)
    assert [p["prompt"][0]["content"] for p in prompts] == ["Add 2 and 3."] and prompts[0]["answer"] == "5"
    logged = capsys.readouterr()
    assert "pairs: 1 of 2 prompts offer tools: rounds 2+ leave them out" in logged.out + logged.err
    only, _ = preferences.load_preferences(write_jsonl(tmp_path / "tools.jsonl", [tool]), recipe)
    with pytest.raises(PipelineError, match="every prompt offers tools, and dpo.round_labeller=annotator cannot"):
        dpo.round_prompts(keys, only)
