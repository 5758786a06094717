"""The DPO stage on the tiny recipe: margins move, LoRA saves/merges/reloads, precomputed reference log-probs."""

import json

import pytest
from transformers import AutoModelForCausalLM

from conftest import run_cli

FAST = ["dpo.max_steps=8", "dpo.per_device_train_batch_size=8", "dpo.per_device_eval_batch_size=16",
        "dpo.learning_rate=1e-3", "dpo.logging_steps=2", "dpo.save_strategy=no", "dpo.use_cpu=true",
        "dpo.bf16=false", "dpo.gradient_checkpointing=false", "dpo.max_length=128", "dpo.report_to=none"]


def dpo(work, recipe, name, *extra):
    proc = run_cli(["pipeline/dpo.py", recipe, f"run.name={name}", f"dpo.init_from={work / 'runs/tiny/sft'}",
                    *FAST, *extra], cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((work / "runs" / name / "dpo" / "metrics.json").read_text())


def test_dpo_moves_the_implicit_reward_margin_up_on_training_pairs(tiny_run):
    work, recipe, _ = tiny_run
    # evaluate on the training pairs themselves: before training policy == reference, so every margin is 0
    metrics = dpo(work, recipe, "dpo_margin", "dpo.eval_dataset=world:preference", "dpo.heldout_max_prompts=8",
                  "dpo.heldout_max_new_tokens=16", "dpo.max_steps=24", "dpo.learning_rate=2e-3")
    assert metrics["eval_rewards/margins"] > 0.05
    assert metrics["eval_rewards/accuracies"] > 0.5
    assert metrics["history"] and "rewards/chosen" in metrics["history"][0]
    assert 0 <= metrics["heldout_accuracy_dpo"] <= 1 and "heldout_accuracy_input" in metrics
    # rounds: 1 (the default) is offline DPO with the metrics it always had: no per-round records or folders
    assert "rounds" not in metrics and metrics["train_pairs"] == metrics["data"]["pairs"]
    assert not (work / "runs/dpo_margin/dpo/rounds").exists()


def test_dpo_lora_saves_adapter_and_merged_model_that_reload(tiny_run):
    work, recipe, _ = tiny_run
    dpo(work, recipe, "dpo_lora", "dpo.use_peft=true", "dpo.lora_r=8", "dpo.merge_adapter=true",
        "dpo.heldout_prompts=")
    out = work / "runs/dpo_lora/dpo"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    from peft import AutoPeftModelForCausalLM

    adapter = AutoPeftModelForCausalLM.from_pretrained(out).merge_and_unload()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    for (name, a), (_, b) in zip(adapter.state_dict().items(), merged.state_dict().items()):
        assert a.shape == b.shape and (a - b).abs().max() < 1e-5, name


def test_precomputed_reference_log_probs_match_on_the_fly(tiny_run):
    work, recipe, _ = tiny_run
    on_the_fly = dpo(work, recipe, "dpo_fly", "dpo.heldout_prompts=")
    precomputed = dpo(work, recipe, "dpo_pre", "dpo.heldout_prompts=", "dpo.precompute_ref_log_probs=true")
    assert precomputed["train_loss"] == pytest.approx(on_the_fly["train_loss"], rel=1e-3)
    assert precomputed["eval_loss"] == pytest.approx(on_the_fly["eval_loss"], rel=1e-3)


def test_tool_pairs_are_rendered_with_their_tool_schemas(tiny_run):
    """The stage hands DPOTrainer the `tools` column: a tool pair's prompt is tokenized with the schemas in it, as
    the eval stage and PPO render tool prompts, and a text pair's without."""
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from pipeline import data, tool_world
    from pipeline.dpo import pairs_only
    from pipeline.recipe import load_recipe

    work, recipe_path, _ = tiny_run
    sft = str(work / "runs/tiny/sft")
    tokenizer = AutoTokenizer.from_pretrained(sft)
    text_pair = {"prompt": [{"role": "user", "content": "What is 2 + 3?"}],
                 "chosen": [{"role": "assistant", "content": "The answer is 5."}],
                 "rejected": [{"role": "assistant", "content": "The answer is 6."}]}
    tool_pair = data.read_rows("world:tool_preference", load_recipe(recipe_path))[0][0]
    pairs = data.dataset_of([text_pair, {k: tool_pair[k] for k in ("prompt", "chosen", "rejected", "tools", "kind")}],
                            "pairs")
    assert set(pairs_only(pairs).column_names) == {"prompt", "chosen", "rejected", "tools"}
    args = DPOConfig(output_dir=str(work / "dpo-tools"), report_to="none", use_cpu=True, max_length=None,
                     gradient_checkpointing=False)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(sft), args=args,
                         train_dataset=pairs_only(pairs), processing_class=tokenizer)
    text, tool = (tokenizer.decode(row["prompt_ids"]) for row in trainer.train_dataset)
    name = tool_world.TOOL_SCHEMAS[0]["function"]["name"]
    assert name in tool and name not in text


def test_group_by_length_batches_pairs_of_similar_length(tiny_run):
    """dpo.train_sampling_strategy: group_by_length: the sampler measures each pair by its padded width (prompt plus
    the longer reply), batches by it, a few long pairs no longer pad most batches, and the stage trains with it
    (TRL's DPOTrainer alone stops: its rows have no `input_ids` for transformers' sampler to measure)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from pipeline import batching, data
    from pipeline.recipe import load_recipe

    work, recipe_path, _ = tiny_run
    sft = str(work / "runs/tiny/sft")
    tokenizer = AutoTokenizer.from_pretrained(sft)
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")}
            for r in data.read_rows("world:preference", load_recipe(recipe_path))[0][:256]]
    for row in rows[::8]:  # one pair in eight is long, as tool pairs are among the world's text pairs
        row["prompt"] = [{"role": "user", "content": row["prompt"][-1]["content"] + " please" * 40}]

    def padded_tokens(strategy, trainer_class):
        args = DPOConfig(output_dir=str(work / f"dpo-{strategy}"), report_to="none", use_cpu=True, max_length=256,
                         per_device_train_batch_size=8, train_sampling_strategy=strategy, seed=3,
                         gradient_checkpointing=False)
        trainer = trainer_class(
            model=AutoModelForCausalLM.from_pretrained(sft), ref_model=AutoModelForCausalLM.from_pretrained(sft),
            args=args, train_dataset=Dataset.from_list(rows), eval_dataset=Dataset.from_list(rows[:32]),
            processing_class=tokenizer)
        if strategy == "group_by_length":
            ds = trainer.train_dataset
            sampler = trainer._get_train_sampler(ds)
            assert isinstance(sampler, batching.ShuffledLengthGroupedSampler)
            assert sampler.lengths == [len(p) + max(len(c), len(r))
                                       for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"])]
            assert trainer.evaluate()["eval_loss"] > 0  # the eval sampler measures the pairs too
        batches = list(trainer.get_train_dataloader())
        assert sum(b["input_ids"].shape[0] for b in batches) == 2 * len(rows)  # every pair once, both sides
        return sum(b["input_ids"].numel() - int(b["attention_mask"].sum()) for b in batches)

    with pytest.raises(ValueError, match="infer lengths"):
        padded_tokens("group_by_length", DPOTrainer)
    grouped = batching.length_grouped(DPOTrainer)
    random_padding, grouped_padding = padded_tokens("random", grouped), padded_tokens("group_by_length", grouped)
    assert grouped_padding < random_padding / 2, (grouped_padding, random_padding)
    metrics = dpo(work, recipe_path, "dpo_grouped", "dpo.heldout_prompts=", "dpo.length_split=3",
                  "dpo.train_sampling_strategy=group_by_length")
    assert metrics["steps"] == 8 and metrics["train_loss"] > 0
