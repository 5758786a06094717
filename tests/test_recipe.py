import re

import pytest
import yaml
from trl import SFTConfig

from pipeline.cli import PipelineError
from pipeline.recipe import load_recipe
from conftest import REPO, TINY, run_cli, tiny_recipe

SMALL = REPO / "recipes" / "small.yaml"


def test_small_recipe_loads_with_stage_order_and_defaults():
    recipe = load_recipe(SMALL)
    assert list(recipe.stages)[:2] == ["pretrain", "sft"]
    assert recipe.run.name == "small"
    assert recipe.keys("sft").init_from == "pretrain"
    assert recipe.keys("sft").dataset == ["world:sft", "world:tool_sft"]  # text and tool conversations


def test_overrides_are_coerced_to_the_field_type():
    recipe = load_recipe(SMALL, ["sft.learning_rate=1e-4", "sft.max_steps=20", "sft.dataset=my_chats.jsonl",
                                 "model.config.hidden_size=64", "sft.bf16=true"])
    section = recipe.section("sft")
    assert section["learning_rate"] == pytest.approx(1e-4) and isinstance(section["learning_rate"], float)
    assert section["max_steps"] == 20
    assert recipe.keys("sft").dataset == "my_chats.jsonl"
    assert recipe.model.config["hidden_size"] == 64
    config = recipe.trainer_config("sft", output_dir="/tmp/x")
    assert isinstance(config, SFTConfig)
    assert config.learning_rate == pytest.approx(1e-4) and config.max_steps == 20 and config.bf16 is True
    assert config.seed == recipe.run.seed  # run seed flows into every stage


def test_model_attn_implementation_applies_to_a_model_built_from_its_config(tmp_path):
    # pretrain builds its model from model.config: the key must reach it, not only the stages that load a checkpoint
    from pipeline import models

    class Vocab:  # what build_causal_lm reads of a tokenizer
        pad_token_id, eos_token_id, bos_token_id = 0, 1, None

        def __len__(self):
            return 96

    for key, expected in ((None, "sdpa"), ("eager", "eager")):
        overrides = [f"model.attn_implementation={key}"] if key else []
        model = models.build_causal_lm(load_recipe(tiny_recipe(tmp_path), overrides), Vocab())
        assert model.config._attn_implementation == expected
        assert model.config.vocab_size == 96


def test_unknown_key_names_key_section_and_closest(tmp_path):
    with pytest.raises(PipelineError) as err:
        load_recipe(SMALL, ["sft.learning_rte=1"])
    msg = str(err.value)
    assert "learning_rte" in msg and "'sft'" in msg and "learning_rate" in msg
    assert "\n" not in msg

    path = tiny_recipe(tmp_path, pretrain={"lerning_rate": 1e-3})
    with pytest.raises(PipelineError) as err:
        load_recipe(path)
    assert str(path) in str(err.value) and "lerning_rate" in str(err.value) and "learning_rate" in str(err.value)


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(PipelineError) as err:
        load_recipe(SMALL, ["sft.max_steps=many"])
    assert "sft.max_steps" in str(err.value) and "int" in str(err.value)
    with pytest.raises(PipelineError) as err:
        load_recipe(SMALL, ["run.seed=[1, 2]"])
    assert "run.seed" in str(err.value)
    with pytest.raises(PipelineError) as err:
        load_recipe(SMALL, ["sft.learning_rate=fast"])
    assert "float" in str(err.value)


def test_unknown_section_and_bad_world_skill():
    with pytest.raises(PipelineError, match="unknown section 'sfft'.*sft"):
        load_recipe(SMALL, ["sfft.max_steps=1"])
    with pytest.raises(PipelineError, match="unknown skill 'divide'"):
        load_recipe(SMALL, ["world.skills=[add, divide]"])


def test_yaml_syntax_error_and_missing_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  name: x\n  seed: [1, 2\nsft:\n  max_steps: 3\n")
    with pytest.raises(PipelineError) as err:
        load_recipe(bad)
    assert str(bad) in str(err.value) and "YAML" in str(err.value) and "line" in str(err.value)
    with pytest.raises(PipelineError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_a_section_or_key_given_twice_is_an_error_not_a_silent_replacement(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("run:\n  name: x\nsft:\n  max_steps: 3\ndpo:\n  beta: 0.1\nsft:\n  max_steps: 5\n")
    with pytest.raises(PipelineError, match=r"twice.yaml: line 7: .*duplicate key 'sft'"):
        load_recipe(path)
    path.write_text("run:\n  name: x\nsft:\n  max_steps: 3\n  max_steps: 5\n")
    with pytest.raises(PipelineError, match=r"line 5: .*duplicate key 'max_steps'"):
        load_recipe(path)
    path.write_text("base: &base {max_steps: 3}\nrun: {name: x}\nsft:\n  <<: *base\n  learning_rate: 0.1\n")
    with pytest.raises(PipelineError, match="unknown section 'base'"):  # merge keys still work; `base` is unknown
        load_recipe(path)


def test_malformed_override_and_non_mapping_section(tmp_path):
    with pytest.raises(PipelineError, match="section.key=value"):
        load_recipe(SMALL, ["learning_rate=1"])
    path = tmp_path / "r.yaml"
    path.write_text("sft: [1, 2]\n")
    with pytest.raises(PipelineError, match="mapping"):
        load_recipe(path)


def test_one_value_for_a_list_key_is_a_list_of_one_as_trl_takes_it():
    # TRL's configs and CLI take `loss_type: sigmoid` and `lora_target_modules: all-linear`; they stopped the recipe
    recipe = load_recipe(SMALL, ["dpo.loss_type=sigmoid", "sft.use_peft=true", "sft.lora_target_modules=all-linear",
                                 "eval.best_of_n=4"])
    assert recipe.section("dpo")["loss_type"] == ["sigmoid"]
    assert recipe.trainer_config("dpo", output_dir="/tmp/x").loss_type == ["sigmoid"]
    assert recipe.section("eval")["best_of_n"] == [4]
    from pipeline.models import peft_config

    assert peft_config(recipe.peft_values("sft")).target_modules == "all-linear"
    assert recipe.keys("sft").dataset == ["world:sft", "world:tool_sft"]  # a key that takes a string keeps it:
    assert load_recipe(SMALL, ["sft.dataset=my.jsonl"]).keys("sft").dataset == "my.jsonl"
    with pytest.raises(PipelineError, match="eval.best_of_n must be list, got 'x'"):
        load_recipe(SMALL, ["eval.best_of_n=x"])  # the one value must still be of the list's type


def test_invalid_combination_is_reported_by_the_config_class():
    recipe = load_recipe(SMALL, ["sft.lr_scheduler_type=not_a_scheduler"])
    with pytest.raises(PipelineError, match="sft"):
        recipe.trainer_config("sft", output_dir="/tmp/x")


def test_peft_keys_route_to_model_config():
    recipe = load_recipe(SMALL, ["sft.use_peft=true", "sft.lora_r=8", "sft.load_in_4bit=true"])
    assert recipe.peft_values("sft") == {"use_peft": True, "lora_r": 8, "load_in_4bit": True}
    assert "use_peft" not in recipe.trainer_config("sft", output_dir="/tmp/x").to_dict()


@pytest.mark.parametrize("overrides,culprit,message", [
    (["sft.use_peft=true", "sft.lora_r=0"], "sft.lora_r=0", "sft.lora_r must be at least 1, got 0"),
    (["dpo.use_peft=true", "dpo.lora_dropout=1.5"], "dpo.lora_dropout=1.5",
     r"dpo.lora_dropout must be in \[0, 1\), got 1.5"),
    (["reward.load_in_4bit=true"], "reward.load_in_4bit=true", "reward.load_in_4bit needs reward.use_peft: true"),
    (["sft.use_peft=true", "sft.load_in_4bit=true", "sft.load_in_8bit=true"], "sft.load_in_8bit=true",
     "sft.load_in_4bit and sft.load_in_8bit are both set"),
    (["sft.use_peft=true", "sft.lora_task_type=bogus"], "sft.lora_task_type=bogus",
     "sft.lora_task_type: LoRA settings: Invalid task type: 'bogus'"),
])
def test_bad_lora_and_quantization_values_stop_when_the_recipe_loads(tmp_path, overrides, culprit, message):
    """peft, TRL and transformers raised these inside the stage, after the run folder was made, with a traceback.
    Set on the command line, the override is named (the recipe file was, which does not hold the value)."""
    with pytest.raises(PipelineError, match=rf"^override '{re.escape(culprit)}': {message}"):
        load_recipe(SMALL, overrides)
    sections = {}
    for override in overrides:
        dotted, _, value = override.partition("=")
        section, key = dotted.split(".")
        sections.setdefault(section, {})[key] = yaml.safe_load(value)
    in_file = tiny_recipe(tmp_path, **sections)
    with pytest.raises(PipelineError, match=rf"^{re.escape(str(in_file))}: {message}"):
        load_recipe(in_file)


def test_a_new_image_models_lora_set_by_an_override_names_the_override(tmp_path):
    # the refusal named the recipe file, which says use_lora: false
    from pipeline.image_check import components
    from test_diffusion import TINY_DIFFUSION, image_recipe

    (tmp_path / "in_file").mkdir()
    in_file = image_recipe(tmp_path / "in_file", diffusion={**TINY_DIFFUSION, "use_lora": True})
    off = image_recipe(tmp_path, diffusion={**TINY_DIFFUSION, "use_lora": False})
    for path, overrides, source in ((in_file, [], str(in_file)),
                                    (off, ["diffusion.use_lora=true"], "override 'diffusion.use_lora=true'")):
        recipe = load_recipe(path, overrides)
        with pytest.raises(PipelineError, match=rf"^{re.escape(source)}: diffusion.use_lora: a new model"):
            components(recipe, None, recipe.section("diffusion"), 16, stage="diffusion")


def test_keys_refused_together_name_the_override_that_set_one(tmp_path):
    # either of diffusion's use_lora and train_text_encoder alone builds: the refusal named the file, which set neither
    from test_diffusion import TINY_DIFFUSION, image_recipe

    path = image_recipe(tmp_path, diffusion={**TINY_DIFFUSION, "use_lora": False, "train_text_encoder": False})
    recipe = load_recipe(path, ["diffusion.use_lora=true", "diffusion.train_text_encoder=true"])
    with pytest.raises(PipelineError, match=r"^override 'diffusion.train_text_encoder=true': section 'diffusion': "
                                            r"train_text_encoder: true cannot train with use_lora: true"):
        recipe.check_config("diffusion")
    in_file = image_recipe(tmp_path, diffusion={**TINY_DIFFUSION, "use_lora": True, "train_text_encoder": True})
    with pytest.raises(PipelineError, match=rf"^{re.escape(str(in_file))}: section 'diffusion': train_text_encoder"):
        load_recipe(in_file).check_config("diffusion")


def test_yaml_1_2_booleans_keep_no_a_string():
    # YAML 1.1 would make `no` false; TrainingArguments' save_strategy wants the string "no"
    recipe = load_recipe(SMALL, ["sft.save_strategy=no", "sft.bf16=false"])
    assert recipe.section("sft")["save_strategy"] == "no" and recipe.section("sft")["bf16"] is False
    assert recipe.trainer_config("sft", output_dir="/tmp/x").save_strategy == "no"


def test_stage_help_names_every_section_that_takes_overrides():
    # `--help` ends by naming the other sections a command line may override: all of them (tools.tools=[...] and
    # generation.backend=vllm are README commands), not a list that stopped growing with the recipe
    from pipeline.recipe import GLOBAL_SECTIONS, stage_help

    last = stage_help("ppo").splitlines()[-1]
    assert all(f"{section}.KEY" in last for section in GLOBAL_SECTIONS), last


@pytest.mark.parametrize("override, expected", [
    ("sft.eval_dataset", "expected section.key=value"),  # no `=`: the runner read it as null (eval data off)
    ("sft.dataset=[a,b", "not valid YAML"),  # an unclosed list was kept as the text '[a,b'
    ("sft.columns={prompt: q", "not valid YAML"),
])
def test_override_without_value_or_with_unclosed_brackets_is_refused_naming_it(tmp_path, override, expected):
    with pytest.raises(PipelineError) as err:
        load_recipe(tiny_recipe(tmp_path), [override])
    assert f"override '{override}'" in str(err.value) and expected in str(err.value) and "\n" not in str(err.value)
    proc = run_cli(["pipeline/run.py", tiny_recipe(tmp_path), override, "--dry-run"], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"error: {err.value}"]


@pytest.mark.parametrize("model, expected", [
    ({"dtype": "float64"}, "model.dtype must be one of"),  # --check passed it; the stage's line named no file
    ({"attn_implementation": "flash"}, "model.attn_implementation: 'flash' is not"),  # a traceback at model build
    ({"config": {**TINY["model"]["config"], "hidden_size": "big"}}, "model.config: .*'hidden_size'"),  # traceback
    ({"config": {**TINY["model"]["config"], "hiden_size": 96}}, r"model.config: unknown key 'hiden_size' .*\(closest: "
                                                                r"hidden_size\)"),  # built the default 4096 wide
    ({"config": {**TINY["model"]["config"], "model_type": "lama"}}, r"model.config.model_type: unknown 'lama' "
                                                                    r"\(closest: .*llama"),
    ({"config": {**TINY["model"]["config"], "num_hidden_layers": -2}},  # built and trained a model with no layers
     r"model.config.num_hidden_layers must be 0 or more, got -2"),
    # found by mutating recipes at random: TypeError, ZeroDivisionError or a hang where the model is built (--check too)
    ({"config": {**TINY["model"]["config"], "model_type": ["llama"]}},
     r"model.config.model_type: unknown '\['llama'\]'"),
    ({"config": {**TINY["model"]["config"], 7: 1}}, "model.config: key 7 is not a name"),
    ({"config": {**TINY["model"]["config"], "num_key_value_heads": 0}},
     "model.config.num_key_value_heads must be 1 or more, got 0"),
    ({"config": {**TINY["model"]["config"], "hidden_size": 0}}, "model.config.hidden_size must be 1 or more, got 0"),
    ({"config": {**TINY["model"]["config"], "num_hidden_layers": 10**30}},
     r"model.config.num_hidden_layers must be below 2\*\*31"),
])
def test_model_section_values_are_checked_when_the_recipe_loads(tmp_path, model, expected):
    path = tiny_recipe(tmp_path, model=model)
    with pytest.raises(PipelineError, match=expected) as err:
        load_recipe(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value) and len(str(err.value)) < 400


LONG = "x" * 300  # a name longer than a file system takes: os.stat raised OSError where a stage or --check looked


@pytest.mark.parametrize("override, expected", [  # found by mutating recipe values at random (each was a traceback)
    ("sft.save_strategy={}", "sft.save_strategy must be SaveStrategy or str, got {}"),  # TypeError: unhashable
    ("tools.tools=[{name: d, backend: [diffusion], source: diffusion}]",
     r"tools.tools\[0\].backend: \['diffusion'\] is not one of"),  # TypeError: unhashable
    ("sft.logging_steps=.inf", "sft.logging_steps must be a finite number, got inf"),  # OverflowError in SFTConfig
    ("sft.learning_rate=1e999", "sft.learning_rate must be a finite number, got inf"),  # taken without a word
    ("tools.timeout_s=.nan", "tools.timeout_s must be a finite number, got nan"),
    ("tokenizer.vocab_size=1000000000000000000000000000000", "tokenizer.vocab_size must fit in 64 bits"),
    ("tokenizer.vocab_size=-1", "tokenizer.vocab_size must be at least 1, got -1"),  # RuntimeError in --check
    ("ppo.num_minibatches=0", "ppo.num_minibatches must be at least 1, got 0"),  # ZeroDivisionError in PPOConfig
    ("sft.dataset=[world:sft, 1]", "sft.dataset: dataset spec 1: expected a string"),  # AttributeError in --check
    ("sft.eval_dataset={datasets: {id: world:sft_eval}}",  # AttributeError where the stage or --check read it
     "sft.eval_dataset: dataset mixture: `datasets` must be a list"),
    ("sft.dataset={datasets: [{id: a/b, wieght: 0.5}]}",  # a typo took every row without a word
     "sft.dataset: dataset mixture: 'a/b': unknown key 'wieght' \\(keys: id, path, config, split"),
    ("sft.dataset={datasets: [{id: a/b}], test_split_size: 0.1}",  # no test split came of it, without a word
     "sft.dataset: dataset mixture: test_split_size is not read here: name the stage's eval_dataset"),
    ("sft.dataset={datasets: [{id: a/b, config: [main]}]}", "dataset mixture: 'a/b': config must be a name"),
    ("sft.dataset={datasets: [{id: 'a/b:test', config: main}]}", "config names a hub dataset's configuration"),
    (f"run.output_dir={LONG}", r"run.output_dir: 'x{20}\.\.\.' is 300 bytes, longer than a file or folder name"),
    (f"sft.dataset=[world:sft, data/{LONG}.jsonl]", r"sft.dataset: 'x{20}\.\.\.' is 306 bytes"),
    (f"dpo.init_from={LONG}", r"dpo.init_from: 'x{20}\.\.\.' is 300 bytes"),
    (f"tools.tools=[{{name: d, backend: diffusion, source: {LONG}}}]",
     r"tools.tools\[0\].source: 'x{20}\.\.\.' is 300"),
])
def test_a_value_of_the_wrong_type_or_range_stops_in_one_line_naming_the_key(tmp_path, monkeypatch, override,
                                                                              expected):
    from pipeline.check import check_stage_config

    monkeypatch.chdir(tmp_path)  # the run folder (runs/ or LONG) is looked for here
    with pytest.raises(PipelineError, match=expected) as err:
        recipe = load_recipe(SMALL, [override])
        for stage in recipe.stages:  # the config classes' own checks, as the runner and --check make them
            check_stage_config(recipe, stage)
    assert str(err.value).startswith((f"override '{override}': ", f"{SMALL}: ")) and "\n" not in str(err.value)
    assert len(str(err.value)) < 400 + len(override)


def test_a_bad_value_on_the_command_line_is_one_line_and_exit_2(tmp_path):
    proc = run_cli(["pipeline/run.py", SMALL, "sft.save_strategy={}", "--check"], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]  # was a TypeError traceback
    assert proc.stderr.strip().splitlines() == ["error: override 'sft.save_strategy={}': sft.save_strategy must be "
                                                "SaveStrategy or str, got {}"]
    assert not list(tmp_path.iterdir())


def test_bad_model_section_stops_stage_and_check_in_one_line_leaving_nothing(tmp_path):
    recipe = tiny_recipe(tmp_path, model={"attn_implementation": "flash"}, sft=None)
    for args in (["pipeline/pretrain.py", recipe], ["pipeline/run.py", recipe, "--check"]):
        proc = run_cli(args, cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert "model.attn_implementation" in proc.stderr.strip().splitlines()[-1]
        assert not (tmp_path / "runs").exists()


def test_recipe_that_is_not_utf8_is_one_line_naming_the_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"run:\n  name: caf\xe9\n")  # saved by an editor in Latin-1: was a UnicodeDecodeError traceback
    with pytest.raises(PipelineError, match=rf"^{path}: line 2: invalid UTF-8 \(byte 0xe9\)"):
        load_recipe(path)


@pytest.mark.parametrize("override, expected", [
    ("world.label_noise=3", r"world.label_noise must be in \[0, 1\], got 3.0"),  # a ValueError traceback in the stage
    ("world.n_sft=-5", "world.n_sft must be 0 or more, got -5"),  # was "world:sft: no rows"
    ("world.skills=[]", "world.skills is empty"),
])
def test_world_settings_are_checked_when_the_recipe_loads(tmp_path, override, expected):
    path = tiny_recipe(tmp_path)
    with pytest.raises(PipelineError, match=rf"^override '{re.escape(override)}': {expected}"):
        load_recipe(path, [override])


def test_a_bad_world_setting_stops_the_stage_in_one_line(tmp_path):
    # every stage script loads its recipe first (load_recipe above refuses every case): one case through the script
    path = tiny_recipe(tmp_path)
    proc = run_cli(["pipeline/sft.py", path, "world.label_noise=3"], cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert "world.label_noise must be in [0, 1], got 3.0" in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_negative_dpo_beta_is_refused():
    # beta < 0 trained without a word: DPO then pushes the rejected replies up
    with pytest.raises(PipelineError, match="dpo.beta must be 0 or more, got -0.1"):
        load_recipe(SMALL, ["dpo.beta=-0.1"])


@pytest.mark.parametrize("override", ["dpo.eval_fraction=0", "reward.eval_fraction=1", "pretrain.eval_fraction=1.5"])
def test_eval_fraction_outside_zero_to_one_is_refused_naming_the_key(override):
    # dpo/reward: the stage stopped after loading its data with a line naming neither file nor key; pretrain held out
    # every block and then said the text was too short for one block
    section = override.split(".")[0]
    with pytest.raises(PipelineError, match=rf"^override '{override}': {section}.eval_fraction must be between 0 and "
                                            r"1 \(exclusive\)"):
        load_recipe(SMALL, [override])


@pytest.mark.parametrize("override, expected", [
    # TRL took any loss name and raised "Unknown loss type" at the first step: a traceback mid-stage
    ("dpo.loss_type=[sigmoid, sigmoidd]", r"dpo.loss_type: 'sigmoidd' is not a DPOConfig loss_type \(one of: sigmoid, "
                                          r"hinge, ipo, .*sigmoid_norm, simpo, cpo, orpo\) \(closest: sigmoid"),
    ("sft.loss_type=nlll", r"sft.loss_type: 'nlll' is not a SFTConfig loss_type \(one of: nll, dft"),  # trainer start
    ("sft.packing_strategy=bdf", r"sft.packing_strategy: 'bdf' is not a SFTConfig packing_strategy"),
    ("reward.train_sampling_strategy=shuffle", r"reward.train_sampling_strategy: 'shuffle' is not a RewardConfig"),
])
def test_a_trl_value_outside_its_list_is_refused_when_the_recipe_loads(tmp_path, override, expected):
    path = tiny_recipe(tmp_path)
    with pytest.raises(PipelineError, match=rf"^override '{re.escape(override)}': {expected}"):
        load_recipe(path, [override])


def test_a_trl_value_outside_its_list_stops_the_stage_and_check_in_one_line(tmp_path):
    # the stage script and --check both load the recipe first (every case above is refused there): one case
    # through both; before, TRL took the loss name and raised "Unknown loss type" at the first step
    path, override = tiny_recipe(tmp_path), "dpo.loss_type=[sigmoid, sigmoidd]"
    for args in (["pipeline/dpo.py", path, override], ["pipeline/run.py", path, override, "--check"]):
        proc = run_cli(args, cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert "dpo.loss_type: 'sigmoidd' is not a DPOConfig loss_type" in proc.stderr.strip().splitlines()[-1]
        assert not (tmp_path / "runs").exists()


def test_dpo_loss_types_read_from_trl_are_those_its_trainer_computes():
    # the list comes from DPOConfig's help text; the trainer's own "Unknown loss type" list is the truth (the
    # pipeline adds its reference-free losses after it)
    import ast
    import inspect

    from trl import DPOConfig
    from trl.trainer import dpo_trainer
    from pipeline.key_checks import listed_values
    from pipeline.reference_free import LOSSES

    trainer_list = re.search(r"Unknown loss type: \{loss_type\}\. Should be one of (\[[^\]]*\])",
                             inspect.getsource(dpo_trainer).replace('"\n', "").replace('  "', ""))
    assert trainer_list, "TRL's DPOTrainer no longer lists its loss types: check pipeline/key_checks.HELP_LISTED"
    assert listed_values(DPOConfig, "loss_type") == ast.literal_eval(trainer_list.group(1)) + list(LOSSES)


@pytest.mark.parametrize("override, hint", [
    # every other stage starts from `init_from`: the image stage's refusal named no replacement
    ("diffusion.init_from=sd", "the diffusion stage starts from `pretrained` (a diffusers pipeline"),
    ("diffusion.pretrained_model_name_or_path=sd", "write `pretrained`"),  # diffusers' training scripts' name
    ("diffusion_dpo.pretrained=diffusion", "diffusion_dpo starts from `init_from`"),
])
def test_an_image_stage_key_written_as_other_stages_write_it_names_the_right_one(override, hint):
    key = override.split("=")[0].split(".")[1]
    with pytest.raises(PipelineError, match=rf"^override '{override}': unknown key '{key}' in section .*: "
                                            rf"{re.escape(hint)}"):
        load_recipe(SMALL, [override])


def test_an_image_stage_key_written_as_other_stages_write_it_stops_the_stage_in_one_line(tmp_path):
    # the image stage scripts load their recipe first, as above: one case through a script
    proc = run_cli(["pipeline/diffusion.py", SMALL, "diffusion.init_from=sd"], cwd=tmp_path)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert "the diffusion stage starts from `pretrained` (a diffusers pipeline" in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster_diffusion.yaml"])
def test_the_cluster_recipes_load_and_check_finds_nothing_but_the_missing_hub(name, tmp_path):
    """The shipped cluster recipes cannot run here (they read the hub), so nothing else would notice a key they use
    being renamed or mistyped: each loads, and `run.py --check` for 8 GPUs, offline, plans every stage with no error
    but the hub being out of reach (its models and datasets, and the placeholder folders of your own data)."""
    recipe = load_recipe(REPO / "recipes" / name)
    sections = list(recipe.stages)
    proc = run_cli(["pipeline/run.py", REPO / "recipes" / name, "--check", "--config",
                    REPO / "launch/accelerate/zero2.yaml", "--gpus-per-node", "8", "--device-memory", "80GiB",
                    f"run.output_dir={tmp_path}"], cwd=tmp_path, timeout=300, env={"HF_HUB_OFFLINE": "1"})
    planned = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ") and line.split()
               and line.split()[0] in sections]
    errors = [line.strip() for line in proc.stdout.splitlines() if line.strip().startswith("error:")]
    assert planned == sections, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert all("the hub cannot be reached (HF_HUB_OFFLINE is set)" in e for e in errors), errors
    # our PPO (ppo_models.py) and the image stages (diffusion_train.py) run under ZeRO-2 too, not data-parallel
    assert "runs data-parallel" not in proc.stdout


def test_a_lora_refusal_names_the_key_at_fault_not_the_last_lora_override(tmp_path, monkeypatch):
    """peft's refusal of the LoRA settings named the last override of any LoRA key (here lora_r=4, which is fine) as
    if it held the value peft refused; where the key at fault cannot be told, every LoRA key and where each was set."""
    from pipeline import models

    refused = "sft.lora_task_type: LoRA settings: Invalid task type: 'bogus'"
    with pytest.raises(PipelineError, match=rf"^override 'sft.lora_task_type=bogus': {refused}"):
        load_recipe(SMALL, ["sft.use_peft=true", "sft.lora_task_type=bogus", "sft.lora_r=4"])
    in_file = tiny_recipe(tmp_path, sft={"use_peft": True, "lora_task_type": "bogus"})
    with pytest.raises(PipelineError, match=rf"^{re.escape(str(in_file))}: {refused}"):
        load_recipe(in_file, ["sft.lora_r=4"])

    def refuse(values, *args, **kw):
        raise ValueError("settings that exclude each other")

    monkeypatch.setattr(models, "peft_config", refuse)  # no one key is at fault
    with pytest.raises(PipelineError) as err:
        load_recipe(tiny_recipe(tmp_path, sft={"use_peft": True, "lora_alpha": 8}), ["sft.lora_r=4"])
    assert str(err.value) == (f"{tmp_path / 'recipe.yaml'} and override 'sft.lora_r=4': sft: LoRA settings "
                              f"(lora_alpha, lora_r): settings that exclude each other")


def test_peft_config_checks_a_model_without_a_recipe():
    """Called with a model and no recipe (an AttributeError before, looking for the recipe's overrides), a key that
    names no module of the model is still one line naming the key, and the section when one is given."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.models import peft_config

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    values = {"use_peft": True, "lora_target_modules": ["q_proj", "nope_proj"]}
    with pytest.raises(PipelineError, match=r"^lora_target_modules: nope_proj names no module of the model"):
        peft_config(values, model=model)
    with pytest.raises(PipelineError, match=r"^dpo.lora_target_modules: nope_proj names no module of the model"):
        peft_config(values, model=model, stage="dpo")


def test_load_recipe_records_once_which_key_each_override_set(tmp_path):
    """key_checks.source_of and trl_refusals parsed the override strings again, each in its own way; load_recipe
    records which key each override set (a key inside one too, trl_args' keys apart from the section's), and they
    read that record."""
    from pipeline.key_checks import source_of

    path = tiny_recipe(tmp_path, ppo={"algorithm": "grpo"})
    overrides = ["ppo.trl_args={num_iterations: 2}", "sft.max_steps=3", "ppo.trl_args.beta=0.1",
                 "sft.learning_rate=0.01"]
    recipe = load_recipe(path, overrides)
    assert recipe.set_by == {("ppo", "trl_args"): overrides[2], ("ppo", "trl_args.num_iterations"): overrides[0],
                             ("sft", "max_steps"): overrides[1], ("ppo", "trl_args.beta"): overrides[2],
                             ("sft", "learning_rate"): overrides[3]}
    assert source_of(recipe, "ppo", "trl_args.num_iterations") == f"override '{overrides[0]}'"
    assert source_of(recipe, "ppo", "trl_args") == f"override '{overrides[2]}'"  # the last to set a key inside
    assert source_of(recipe, "sft", "max_steps", "learning_rate") == f"override '{overrides[3]}'"
    assert source_of(recipe, "ppo", "beta") == source_of(recipe, "sft", "max_length") == str(path)


def test_the_record_of_what_an_override_set_holds_its_text(tmp_path):
    """Recipe.set_by held positions in Recipe.overrides: a Recipe made with other overrides (dataclasses.replace, a
    test or benchmark building one) named another override, or none (IndexError). It holds the override's text."""
    import dataclasses

    from pipeline.key_checks import source_of

    recipe = load_recipe(tiny_recipe(tmp_path), ["sft.max_steps=3", "sft.learning_rate=0.01"])
    for overrides in (["sft.learning_rate=0.01", "sft.max_steps=3"], ["sft.learning_rate=0.01"], []):
        other = dataclasses.replace(recipe, overrides=overrides)
        assert source_of(other, "sft", "max_steps") == "override 'sft.max_steps=3'", overrides
        assert source_of(other, "sft", "max_steps", "learning_rate") == "override 'sft.learning_rate=0.01'"


def test_an_override_that_replaces_a_mapping_takes_the_credit_of_the_keys_inside_it(tmp_path):
    """`ppo.trl_args={scale_rewards: batch}` replaces trl_args whole (it does not merge): a num_iterations an earlier
    `ppo.trl_args.num_iterations=2` set is gone, yet that override was still named for it. A later key inside the
    mapping merges into it, and the mapping's override keeps its keys."""
    from trl import GRPOConfig

    from pipeline.key_checks import source_of
    from pipeline.trl_refusals import source_of_named

    path = tiny_recipe(tmp_path, ppo={"algorithm": "grpo"})
    recipe = load_recipe(path, ["ppo.trl_args.num_iterations=2", "ppo.trl_args={scale_rewards: batch}"])
    assert recipe.section("ppo")["trl_args"] == {"scale_rewards": "batch"}  # replaced, not merged
    assert source_of(recipe, "ppo", "trl_args.num_iterations") == str(path)  # TRL's default now
    assert source_of_named(recipe, "ppo", "num_iterations (1) is wrong", GRPOConfig) == str(path)
    assert source_of(recipe, "ppo", "trl_args") == "override 'ppo.trl_args={scale_rewards: batch}'"
    recipe = load_recipe(path, ["ppo.trl_args={num_iterations: 2}", "ppo.trl_args.scale_rewards=batch"])
    assert recipe.section("ppo")["trl_args"] == {"num_iterations": 2, "scale_rewards": "batch"}  # merged
    assert source_of(recipe, "ppo", "trl_args.num_iterations") == "override 'ppo.trl_args={num_iterations: 2}'"
    assert source_of(recipe, "ppo", "trl_args.scale_rewards", "trl_args") == \
        "override 'ppo.trl_args.scale_rewards=batch'"


def test_what_a_trl_trainer_refuses_names_the_override_that_set_the_key(tmp_path):
    """SFTTrainer's refusals (raised when it is built, after the config class took every value) named the recipe file
    even when an override set the key the message names; the one line names that override, else the file."""
    from trl import SFTConfig

    from pipeline.trl_refusals import trl_refusal

    refused = ValueError("You set `assistant_only_loss=True`, but the dataset is not conversational.\nMore text.")
    line = "section 'sft' (SFTTrainer): You set `assistant_only_loss=True`, but the dataset is not conversational."
    path = tiny_recipe(tmp_path, sft={"assistant_only_loss": False})
    recipe = load_recipe(path, ["sft.assistant_only_loss=true", "sft.max_steps=3"])
    assert trl_refusal(recipe, "sft", "SFTTrainer", refused, SFTConfig) == \
        f"override 'sft.assistant_only_loss=true': {line}"
    # a later override of a key whose name is a word of the message (sft.dataset: "the dataset is") is no TRL argument
    recipe = load_recipe(path, ["sft.assistant_only_loss=true", f"sft.dataset={tmp_path / 'x.jsonl'}"])
    assert trl_refusal(recipe, "sft", "SFTTrainer", refused, SFTConfig) == \
        f"override 'sft.assistant_only_loss=true': {line}"
    assert trl_refusal(load_recipe(tiny_recipe(tmp_path, sft={"assistant_only_loss": True}), ["sft.max_steps=3"]),
                       "sft", "SFTTrainer", refused, SFTConfig) == f"{path}: {line}"  # the file set it: the file
    other_section = load_recipe(path, ["dpo.max_length=64"])
    too_short = ValueError("max_length is too short")
    assert trl_refusal(other_section, "sft", "SFTTrainer", too_short, SFTConfig).startswith(f"{path}: ")  # dpo's


@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward", "dpo"])
def test_checkpointing_by_either_name_builds_a_config_without_transformers_deprecation_warning(stage):
    """transformers 5 renamed gradient_checkpointing to activation_checkpointing: the old name (the small recipe's,
    TRL's users', and TRL's own default of true) warned a FutureWarning in every stage. Both names set it, the new
    one winning, and a section naming neither gets the config class's default."""
    import dataclasses
    import warnings

    def built(overrides, unset=False):
        recipe = load_recipe(SMALL, overrides)
        if unset:
            recipe.section(stage).pop("gradient_checkpointing", None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            config = recipe.trainer_config(stage, num_processes=0)
        assert not [str(w.message) for w in caught if "checkpointing` is deprecated" in str(w.message)]
        assert config.gradient_checkpointing == config.activation_checkpointing
        return config

    assert built([]).activation_checkpointing is False  # the small recipe's sft, reward, dpo: false; pretrain unset
    assert built([f"{stage}.gradient_checkpointing=true"]).activation_checkpointing is True
    assert built([f"{stage}.gradient_checkpointing=true",
                  f"{stage}.activation_checkpointing=false"]).activation_checkpointing is False
    config = built([], unset=True)
    default = next(f.default for f in dataclasses.fields(config) if f.name == "gradient_checkpointing")
    assert config.activation_checkpointing is bool(default)  # TRL's configs: true; TrainingArguments: none, so off


def _refused(path, overrides, check) -> str:
    """The one-line refusal of a recipe (with overrides) by `check`, as the stage or runner that makes it runs it."""
    from types import SimpleNamespace

    from pipeline import evaluate, models, references, runs, vllm_engine

    with pytest.raises(PipelineError) as err:
        recipe = load_recipe(path, overrides)
        if check == "eval":
            evaluate.check_keys(recipe, recipe.keys("eval"))
        elif check == "eval_baseline":
            evaluate.check_model(recipe, runs.resolve_checkpoint(recipe, "model", must_exist=False), "baseline")
        elif check == "vllm":
            vllm_engine.check(recipe)
        elif check == "tokenizer":
            models.load_tokenizer(recipe, SimpleNamespace(path=None))
        elif check == "reference":
            references.reference_kind(recipe, recipe.keys("dpo").init_from, "dpo.init_from")
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("overrides, check", [
    (["eval.bootstrap=50"], "eval"), (["eval.tool_max_new_tokens=5000"], "eval"),  # its bound's override
    (["eval.baseline=model"], "eval_baseline"),
    (["model.attn_implementation=eagr"], "load"), (["model.config={hiden_size: 4}"], "load"),
    (["model.config.num_hidden_layers=-2"], "load"), (["tokenizer.train=false"], "tokenizer"),
    (["generation.vllm_mode=serv"], "load"), (["generation.backend=vllm", "generation.vllm_mode=server"], "vllm"),
    (["world.label_noise=1.5"], "load"), (["world.skills=[add, mul]"], "load"), (["tools.timeout_s=0"], "load"),
    (["dpo.init_from=runs/missing/sft"], "reference"), (["dpo.init_from=rewrd"], "reference")])
def test_a_bad_value_is_named_by_the_override_that_set_it_else_by_the_recipe_file(tmp_path, overrides, check):
    """README: a bad value stops in one line naming the recipe file (or the override) and the key. The same values
    written in the recipe file name the file, in the same words."""
    by_override = _refused(SMALL, overrides, check)
    assert by_override.startswith(f"override '{overrides[-1]}': "), by_override
    data = yaml.safe_load(SMALL.read_text())
    for text in overrides:
        dotted, _, value = text.partition("=")
        *sections, key = dotted.split(".")
        node = data
        for name in sections:
            node = node.setdefault(name, {})
        node[key] = yaml.safe_load(value)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    in_file = _refused(path, [], check)
    assert in_file == f"{path}: " + by_override.removeprefix(f"override '{overrides[-1]}': ")
