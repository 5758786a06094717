"""`run.py --check` (pipeline/check.py) and its memory estimate (pipeline/memory.py): the values it reads as the
stages read them, and one line per problem."""

import json
import warnings

import pytest

from conftest import REPO, run_cli, tiny_recipe
from pipeline import check, memory
from pipeline.cli import PipelineError
from pipeline.recipe import load_recipe

SMALL = REPO / "recipes" / "small.yaml"
ENV = {"OMP_NUM_THREADS": "1"}


CHECKPOINTING_CASES = [
    ([], False, False),  # the small recipe's gradient_checkpointing: false (pretrain: unset, TrainingArguments: off)
    (["{stage}.gradient_checkpointing=true"], False, True),
    (["{stage}.gradient_checkpointing=true", "{stage}.activation_checkpointing=false"], False, False),  # new wins
    (["{stage}.activation_checkpointing=true"], False, True),
    ([], True, True),  # neither name: the config class's default (TRL's: true; TrainingArguments: none, so off)
]


@pytest.mark.parametrize("stage, overrides, unset, expected", [
    (stage, *case) for stage in ("pretrain", "sft", "reward", "dpo", "ppo") for case in CHECKPOINTING_CASES
    if stage != "ppo" or not case[0]])  # our PPOConfig has neither name: no override of them to read
def test_memory_estimate_reads_checkpointing_by_either_name_as_the_stage_config_does(stage, overrides, unset,
                                                                                     expected):
    """--check's memory estimate took activation checkpointing by its own copy of transformers' rename rule; it reads
    it as the stage's config is built (values.by_new_names), so either name and the default give the same answer."""
    recipe = load_recipe(SMALL, [o.format(stage=stage) for o in overrides])
    if unset:
        recipe.section(stage).pop("gradient_checkpointing", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = recipe.trainer_config(stage, num_processes=0)
    if stage in ("pretrain", "ppo") and unset:
        expected = False
    assert check._checkpointing(recipe, stage) is expected is bool(getattr(config, "activation_checkpointing", False))


def _saved_config(folder, hidden: int):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, vocab_size=128).save_pretrained(folder)
    return str(folder)


def _adapter(folder, base: str):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base, "peft_type": "LORA"}))
    return str(folder)


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the run folder, runs/tiny/
    return load_recipe(tiny_recipe(tmp_path))


def test_memory_sizes_folders_adapters_and_refuses_a_folder_without_config(tmp_path, tiny):
    base = _saved_config(tmp_path / "base", 32)
    assert (memory.model_shape(tiny, base).source, memory.model_shape(tiny, base).hidden) == ("local", 32)
    adapter = _adapter(tmp_path / "lora", base)
    assert (memory.model_shape(tiny, adapter).source, memory.model_shape(tiny, adapter).hidden) == \
        (f"adapter on {base}", 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match=r"checkpoint '.*empty': no config.json \(not a saved model\)"):
        memory.model_shape(tiny, str(tmp_path / "empty"))


def test_memory_sizes_a_finished_stage_by_its_merged_model(tmp_path, tiny):
    """--check's model shape read a stage folder by its own rules: a finished LoRA stage with merge_adapter (its
    adapter, merged/ beside it) read as not trained yet and was sized as its upstream model. It reads it as the
    stages load it (model_configs: merged/ first)."""
    sft = tiny.stage_dir("sft")
    _adapter(sft, _saved_config(tmp_path / "base", 32))
    _saved_config(sft / "merged", 96)
    (sft / "manifest.json").write_text(json.dumps({"stage": "sft"}))
    shape = memory.model_shape(tiny, "sft")
    assert (shape.source, shape.hidden) == ("finished stage", 96)  # not the tiny recipe's new model (64)


def test_memory_sizes_an_adapter_of_a_moved_run_folder_by_its_manifests_base(tmp_path, tiny):
    """An adapter whose recorded base moved with its run folder could not be sized (peft's absolute path is gone);
    the stages load its base from the stage's manifest (models.adapter_base), and --check now does too."""
    moved = tmp_path / "elsewhere"
    stage = _adapter(moved / "dpo", str(tmp_path / "gone" / "sft"))
    (moved / "dpo" / "manifest.json").write_text(json.dumps(
        {"inputs": {"checkpoints": {"init_from": {"path": "sft", "in_run_dir": True, "source": "stage"}}}}))
    _saved_config(moved / "sft", 48)
    shape = memory.model_shape(tiny, stage)
    assert (shape.source, shape.hidden) == (f"adapter on {moved / 'sft'}", 48)


@pytest.mark.parametrize("entry", ["check", "check_only", "runner", "stage"])
def test_ppo_reading_a_stage_the_recipe_lacks_is_one_line(tmp_path, entry):
    """A recipe whose ppo.reward_model is the `reward` stage without a reward section: --check said it twice, the
    key rule's line (ppo_config.check_key_conflicts) and "reads reward, which has not finished and is not planned to
    run". It says the first only; the runner and the stage stop on it too, exit 2, one line, nothing started."""
    recipe = tiny_recipe(tmp_path, sft=None, ppo={"init_from": "pretrain", "reward_model": "reward", "max_steps": 2})
    args = {"check": ["pipeline/run.py", recipe, "--check"],
            "check_only": ["pipeline/run.py", recipe, "--check", "--only", "ppo"],
            "runner": ["pipeline/run.py", recipe], "stage": ["pipeline/ppo.py", recipe]}[entry]
    proc = run_cli(args, cwd=tmp_path, env=ENV)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
    expected = (f"error: {recipe}: ppo.reward_model is the `reward` stage, but the recipe has no `reward` section: "
                f"add one, or name a saved reward model folder")
    if entry.startswith("check"):
        reward_lines = [line.strip() for line in proc.stdout.splitlines() if "error:" in line and "reward" in line]
        assert reward_lines == [expected], proc.stdout
    else:
        assert proc.stderr.strip().splitlines() == [expected], proc.stderr
    assert not (tmp_path / "runs").exists()


def _check_lines(tmp_path, recipe, *args) -> list[str]:
    """--check's error lines (it exits 2 on them)."""
    proc = run_cli(["pipeline/run.py", recipe, "--check", *args], cwd=tmp_path, env=ENV)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
    return [line.strip() for line in proc.stdout.splitlines() if line.strip().startswith("error:")]


def test_check_runs_the_eval_stages_tool_prompt_checks(tmp_path):
    """A recipe whose tools are draw_image alone: eval's default tool prompts (world:tool_eval) have read tasks, and
    the stage stopped on their first row (eval_tools.plan) after --check said "ok". --check runs the same row checks
    (eval_tools.checked_rows) and says the stage's line."""
    (diffusion := tmp_path / "lora" / "diffusion").mkdir(parents=True)
    (diffusion / "model_index.json").write_text("{}")
    recipe = tiny_recipe(tmp_path, world={"n_tool_eval": 9}, eval={"max_new_tokens": 8},
                         tools={"tools": [{"name": "draw_image", "backend": "diffusion", "source": str(diffusion)}]})
    with pytest.raises(PipelineError) as stage:
        from pipeline import eval_tools

        eval_tools.plan(loaded := load_recipe(recipe), loaded.keys("eval"))
    assert "is not among the recipe's tools (draw_image)" in str(stage.value)
    assert f"error: {stage.value}" in _check_lines(tmp_path, recipe)


def test_check_of_eval_tool_prompts_needs_no_folder_of_a_stage_planned_first(tmp_path, monkeypatch):
    """The row checks go by the tools' names: the tools' stage (and its image judge) need not exist yet. Prompts on
    the hub are not read (--check downloads nothing)."""
    tools = [{"name": "draw_image", "backend": "diffusion", "source": "diffusion"},
             {"name": "read_image", "backend": "image_judge", "source": "diffusion"}]
    recipe = load_recipe(tiny_recipe(tmp_path, world={"n_tool_eval": 9}, eval={"max_new_tokens": 8},
                                     tools={"tools": tools, "world_gallery": True}))
    assert check._tool_rows_problem(recipe, "eval", "tool_prompts", recipe.keys("eval")) is None
    recipe.tools.tools = tools[:1]
    assert "tool 'read_image' is not among the recipe's tools (draw_image)" in \
        check._tool_rows_problem(recipe, "eval", "tool_prompts", recipe.keys("eval"))
    from pipeline import data

    monkeypatch.setattr(data, "read_rows", lambda *a, **k: pytest.fail("a hub dataset was read"))
    hub = load_recipe(recipe.path, ["eval.tool_prompts=someone/tool_prompts"])
    assert check._tool_rows_problem(hub, "eval", "tool_prompts", hub.keys("eval")) is None


def test_check_runs_ppos_tool_offer_check_and_names_the_image_judge_once(tmp_path):
    """ppo's prompts offering a tool the recipe lacks stop the stage (ppo_tools.check_offers); --check says it now.
    And a missing image judge was `ppo.image_judge: <recipe>: ppo.image_judge: ...`: its line has the key once."""
    recipe = tiny_recipe(tmp_path, tools={"tools": [{"name": "draw_image", "backend": "diffusion",
                                                     "source": "diffusion"}]},
                         ppo={"init_from": "sft", "reward_model": "sft", "prompts": "world:tool_preference",
                              "max_steps": 2})
    lines = _check_lines(tmp_path, recipe)
    judge = [line for line in lines if "image_judge" in line]
    assert judge == [f"error: {recipe}: ppo.image_judge: 'diffusion' is not a stage folder "
                     f"(runs/tiny/diffusion is missing: run that stage first) or a local "
                     f"folder"], lines
    assert any(line.startswith("error: world:tool_preference: row ") and
               "offers the tool 'read_image', which the recipe's `tools` section does not have (tools: draw_image)"
               in line for line in lines), lines
