"""The KTO stage and its unpaired-preference loader: every format read as TRL's unpaired rows, the stage trains
from labelled replies, LoRA reloads, length_split changes no loss, bad rows stop in one line."""

import json

import pytest

from conftest import run_cli
from pipeline.cli import PipelineError
from pipeline.unpaired import normalize_unpaired

FAST = ["kto.max_steps=8", "kto.per_device_train_batch_size=8", "kto.per_device_eval_batch_size=16",
        "kto.learning_rate=1e-3", "kto.logging_steps=2", "kto.save_strategy=no", "kto.use_cpu=true",
        "kto.bf16=false", "kto.gradient_checkpointing=false", "kto.max_length=128", "kto.report_to=none"]


def kto(work, recipe, name, *extra):
    proc = run_cli(["pipeline/kto.py", recipe, f"run.name={name}", f"kto.init_from={work / 'runs/tiny/sft'}",
                    *FAST, *extra], cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((work / "runs" / name / "kto" / "metrics.json").read_text())


def normalize(rows):
    return normalize_unpaired(rows, [f"row {i}" for i in range(1, len(rows) + 1)], "f.jsonl")[:2]


# ---------------------------------------------------------------------------------------------- formats


def test_trl_unpaired_rows_keep_prompt_completion_and_label():
    rows, info = normalize([{"prompt": "2+3=", "completion": " 5", "label": True, "skill": "add"},
                            {"prompt": "2+3=", "completion": " 6", "label": False, "skill": "add"}])
    assert rows == [{"skill": "add", "prompt": "2+3=", "completion": " 5", "label": True},
                    {"skill": "add", "prompt": "2+3=", "completion": " 6", "label": False}]
    assert (info["format"], info["conversational"], info["desirable"], info["undesirable"]) == \
        ("unpaired", False, 1, 1)


def test_a_conversational_completion_makes_a_text_prompt_a_user_message():
    rows, info = normalize([{"prompt": "hi", "completion": [{"role": "assistant", "content": "hello"}], "label": 1}])
    assert rows[0]["prompt"] == [{"role": "user", "content": "hi"}] and rows[0]["label"] is True
    assert info["conversational"]


def test_llamafactory_kto_tag_conversations_split_before_the_last_reply():
    """LLaMA-Factory's KTO rows: ShareGPT turns and `kto_tag`; the trailing assistant turn is the completion."""
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                             {"from": "human", "value": "2+3?"}, {"from": "gpt", "value": "5"}],
           "kto_tag": False, "system": "be brief"}
    rows, info = normalize([row])
    assert rows[0]["prompt"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+3?"}]
    assert rows[0]["completion"] == [{"role": "assistant", "content": "5"}]
    assert rows[0]["label"] is False and info["format"] == "conversation"
    assert set(rows[0]) == {"prompt", "completion", "label"}


def test_alpaca_and_messages_rows_with_labels():
    alpaca, _ = normalize([{"instruction": "Add", "input": "2 3", "output": "5", "kto_tag": "true"}])
    assert alpaca[0]["prompt"] == [{"role": "user", "content": "Add\n2 3"}]
    assert alpaca[0]["completion"] == [{"role": "assistant", "content": "5"}] and alpaca[0]["label"] is True
    msgs, _ = normalize([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                          "label": "False"}])
    assert msgs[0]["completion"] == [{"role": "assistant", "content": "a"}] and msgs[0]["label"] is False


def test_tool_calls_are_checked_against_the_row_tools():
    tools = [{"name": "add", "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}]
    call = {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "add", "arguments": {"a": 1}}}]}
    rows, _ = normalize([{"prompt": [{"role": "user", "content": "q"}], "completion": [call], "label": True,
                          "tools": tools}])
    assert json.loads(rows[0]["tools"]) == tools
    assert rows[0]["completion"][0]["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'
    bad = {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "add", "arguments": {"a": "x"}}}]}
    with pytest.raises(PipelineError, match=r"f.jsonl: row 1: .*argument 'a' must be integer"):
        normalize([{"prompt": [{"role": "user", "content": "q"}], "completion": [bad], "label": True,
                    "tools": tools}])


def test_pairs_become_a_desirable_and_an_undesirable_row():
    rows, info = normalize([{"prompt": "p", "chosen": " a", "rejected": " b", "score_chosen": 2, "score_rejected": 1,
                             "skill": "s"}])
    assert [(r["completion"], r["label"]) for r in rows] == [(" a", True), (" b", False)]
    assert all(r["prompt"] == "p" and r["skill"] == "s" and "margin" not in r for r in rows)
    # a pair's own `label` column (another meaning) gives way to the split's
    rows, _ = normalize([{"prompt": "p", "chosen": " a", "rejected": " b", "label": "spam"}])
    assert [r["label"] for r in rows] == [True, False]
    assert (info["format"], info["rows"], info["examples"]) == ("pairs", 1, 2)


@pytest.mark.parametrize("rows, message", [
    ([{"prompt": "p", "completion": "c", "label": "maybe"}], "row 1: the label must be true or false, got 'maybe'"),
    ([{"prompt": "p", "completion": "c", "label": True}, {"prompt": "p", "completion": "c"}],
     "row 2: missing column 'label'"),
    ([{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}], "label": True}],
     r"row 1: the conversation must end with the assistant reply \(the completion\)"),
    ([{"messages": [{"role": "assistant", "content": "a"}], "label": True}], "row 1: the conversation has no prompt"),
    ([{"prompt": "p", "label": True}], "no unpaired preference format matches the columns"),
    ([{"text": "x"}], r"no unpaired preference format matches the columns \(text\)"),
    ([{"prompt": "p", "completion": "c", "label": True},
      {"prompt": [{"role": "user", "content": "p"}], "completion": [{"role": "assistant", "content": "c"}],
       "label": True}], "row 2: mixes text and conversation rows"),
])
def test_bad_rows_stop_with_the_file_and_row(rows, message):
    with pytest.raises(PipelineError, match=message):
        normalize(rows)


# ---------------------------------------------------------------------------------------------- the stage


def test_kto_trains_on_labelled_replies_and_records_them(tiny_run):
    work, recipe, _ = tiny_run
    lines = []
    for i in range(40):
        a, b = i % 7, i % 5
        lines += [{"prompt": f"What is {a} + {b}?", "completion": f"The answer is {a + b}.", "label": True},
                  {"prompt": f"What is {a} + {b}?", "completion": f"The answer is {a + b + 1}.", "label": False}]
    (work / "kto.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    # the held-out rows are the training rows: before training policy == reference, so every reward is 0
    metrics = kto(work, recipe, "kto_own", f"kto.dataset={work / 'kto.jsonl'}",
                  f"kto.eval_dataset={work / 'kto.jsonl'}", "kto.max_steps=24", "kto.learning_rate=2e-3",
                  "kto.beta=0.5", "kto.heldout_max_prompts=8", "kto.heldout_max_new_tokens=16")
    assert metrics["eval_rewards/margins"] > 0.05  # the good replies gained on the bad ones against the reference
    assert metrics["data"]["format"] == "unpaired" and metrics["data"]["desirable"] == 40
    assert metrics["history"] and "kl" in metrics["history"][0]
    assert 0 <= metrics["heldout_accuracy_kto"] <= 1 and "heldout_accuracy_input" in metrics
    manifest = json.loads((work / "runs/kto_own/kto/manifest.json").read_text())
    assert manifest["data"]["dataset"]["examples"] == 80


def test_kto_on_world_pairs_with_lora_saves_an_adapter_and_length_split_keeps_the_loss(tiny_run):
    """The default data (the world's pairs, each split in two); LoRA saves an adapter and a merged model that
    reload; length_split 3 gives the loss of 1."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    work, recipe, _ = tiny_run
    whole = kto(work, recipe, "kto_lora", "kto.use_peft=true", "kto.lora_r=8", "kto.merge_adapter=true",
                "kto.heldout_prompts=")
    split = kto(work, recipe, "kto_lora_split", "kto.use_peft=true", "kto.lora_r=8", "kto.heldout_prompts=",
                "kto.length_split=3")
    assert whole["data"]["format"] == "pairs" and whole["data"]["desirable"] == whole["data"]["undesirable"]
    assert split["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-4)
    assert split["eval_loss"] == pytest.approx(whole["eval_loss"], rel=1e-4)
    out = work / "runs/kto_lora/kto"
    adapter = AutoPeftModelForCausalLM.from_pretrained(out).merge_and_unload()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    for (name, a), (_, b) in zip(adapter.state_dict().items(), merged.state_dict().items()):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-5, name


def test_bad_kto_data_is_one_line_and_leaves_no_stage_output(tiny_run):
    work, recipe, _ = tiny_run
    (work / "kto_bad.jsonl").write_text(json.dumps({"prompt": "p", "completion": "c", "label": "maybe"}) + "\n")
    proc = run_cli(["pipeline/kto.py", recipe, "run.name=kto_bad", f"kto.dataset={work / 'kto_bad.jsonl'}",
                    f"kto.init_from={work / 'runs/tiny/sft'}", *FAST], cwd=work)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "kto_bad.jsonl: line 1: the label must be true or false" in proc.stderr
    assert not (work / "runs/kto_bad/kto").exists()


def test_a_llamafactory_kto_entry_reads_as_its_kto_stage_reads_it(tmp_path):
    """LLaMA-Factory's kto_en_demo layout: ShareGPT `messages` renamed by `columns`, with `kto_tag`."""
    from conftest import tiny_recipe
    from pipeline.recipe import load_recipe
    from pipeline.unpaired import load_unpaired

    rows = [{"messages": [{"from": "human", "value": "2+3?"}, {"from": "gpt", "value": v}], "label": tag}
            for v, tag in (("5", True), ("6", False))]
    (tmp_path / "kto.json").write_text(json.dumps(rows))
    (tmp_path / "dataset_info.json").write_text(json.dumps({"kto_demo": {
        "file_name": "kto.json", "formatting": "sharegpt", "columns": {"messages": "messages", "kto_tag": "label"}}}))
    ds, info = load_unpaired(f"{tmp_path}:kto_demo", load_recipe(tiny_recipe(tmp_path)))
    assert info["format"] == "conversation" and (info["desirable"], info["undesirable"]) == (1, 1)
    assert ds[1]["prompt"] == [{"role": "user", "content": "2+3?"}]
    assert ds[1]["completion"] == [{"role": "assistant", "content": "6"}] and ds[1]["label"] is False


def test_the_runner_orders_kto_after_sft_and_eval_scores_it(tmp_path):
    """A `kto` section plugs into a recipe: planned after the sft it starts from, and among eval's checkpoints."""
    from conftest import tiny_recipe
    from pipeline.recipe import load_recipe

    path = tiny_recipe(tmp_path, kto={"max_steps": 4}, eval={"max_prompts": 8})
    proc = run_cli(["pipeline/run.py", path, "--dry-run"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    planned = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ") and
               line.split()[0] in ("pretrain", "sft", "kto", "eval")]
    assert planned == ["pretrain", "sft", "kto", "eval"]
    recipe = load_recipe(path)
    assert recipe.keys("kto").init_from == "sft" and recipe.keys("eval").checkpoints == ["pretrain", "sft", "kto"]


@pytest.mark.parametrize("override, message", [
    ("kto.per_device_train_batch_size=1", "kto.per_device_train_batch_size must be 2 or more"),
    ("kto.train_sampling_strategy=random", "kto.train_sampling_strategy must be sequential"),
])
def test_batches_the_kl_term_cannot_use_stop_before_anything_loads(tmp_path, override, message):
    """KTOTrainer raises these after the model has loaded (a traceback, a staging folder left): one line first."""
    from conftest import tiny_recipe

    proc = run_cli(["pipeline/kto.py", tiny_recipe(tmp_path), override], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and message in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_check_runs_kto_rows_through_the_unpaired_loader(tmp_path):
    """`run.py --check` reads a sample of kto's rows as the stage does: a bad label is found before any stage runs."""
    from conftest import tiny_recipe, write_jsonl

    rows = [{"prompt": "What is 2 + 3?", "completion": " 5", "label": True},
            {"prompt": "What is 2 + 3?", "completion": " 6", "label": "sometimes"}]
    spec = write_jsonl(tmp_path / "feedback.jsonl", rows)
    recipe = tiny_recipe(tmp_path, kto={"dataset": str(spec), "eval_dataset": str(spec)})
    check = run_cli(["pipeline/run.py", recipe, "--check"], cwd=tmp_path)
    assert check.returncode == 2, check.stdout[-2000:] + check.stderr[-2000:]
    assert f"{spec}: line 2: the label must be true or false, got 'sometimes'" in check.stdout
    write_jsonl(spec, rows[:1] + [{**rows[1], "label": False}])
    assert run_cli(["pipeline/run.py", recipe, "--check"], cwd=tmp_path).returncode == 0


def test_precomputed_reference_log_probs_match_on_the_fly(tiny_run):
    """precompute_ref_log_probs scores the reference once (its KL rows too) before training: the same losses."""
    work, recipe, _ = tiny_run
    on_the_fly = kto(work, recipe, "kto_fly", "kto.heldout_prompts=")
    precomputed = kto(work, recipe, "kto_pre", "kto.heldout_prompts=", "kto.precompute_ref_log_probs=true")
    assert precomputed["train_loss"] == pytest.approx(on_the_fly["train_loss"], rel=1e-3)
    assert precomputed["eval_loss"] == pytest.approx(on_the_fly["eval_loss"], rel=1e-3)
