"""pretrain and sft through their real command lines and the runner, on the tiny recipe."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import REPO, run_cli, tiny_recipe


def test_pretrain_and_sft_write_finished_stage_folders(tiny_run):
    work, _, proc = tiny_run
    run_dir = work / "runs" / "tiny"
    assert sorted(p.name for p in run_dir.iterdir()) == ["cost.md", "pretrain", "sft"]  # no .partial left
    for stage in ("pretrain", "sft"):
        out = run_dir / stage
        assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["stage"] == stage and manifest["num_processes"] == 1
        assert manifest["global_batch_size"] == 8
        assert manifest["versions"]["trl"] and manifest["wall_time_s"] > 0
        assert manifest["inputs"]["data"]["dataset"]["fingerprint"]
        model = AutoModelForCausalLM.from_pretrained(out)
        tokenizer = AutoTokenizer.from_pretrained(out)
        assert tokenizer.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == tokenizer.eos_token_id
    sft_manifest = json.loads((run_dir / "sft" / "manifest.json").read_text())
    assert sft_manifest["inputs"]["checkpoints"]["init_from"]["ref"] == "pretrain"
    metrics = json.loads((run_dir / "sft" / "metrics.json").read_text())
    assert metrics["heldout"]["n"] == 8
    assert 0 <= metrics["heldout_accuracy_base"] <= 1 and 0 <= metrics["heldout_accuracy_sft"] <= 1
    pretrain_metrics = json.loads((run_dir / "pretrain" / "metrics.json").read_text())
    assert pretrain_metrics["steps"] == 12 and pretrain_metrics["eval_perplexity"] > 1


def test_runner_skips_finished_stages_and_reruns_on_change(tiny_run):
    work, recipe, _ = tiny_run
    plan = run_cli(["pipeline/run.py", recipe, "--dry-run"], cwd=work)
    assert plan.returncode == 0
    assert "pretrain   skip" in plan.stdout and "sft        skip" in plan.stdout

    changed = run_cli(["pipeline/run.py", recipe, "sft.learning_rate=5e-4", "--dry-run"], cwd=work)
    assert "pretrain   skip" in changed.stdout and "sft        run   (settings changed)" in changed.stdout

    forced = run_cli(["pipeline/run.py", recipe, "--force", "--dry-run"], cwd=work)
    assert "pretrain   run" in forced.stdout and "sft        run" in forced.stdout
    from_sft = run_cli(["pipeline/run.py", recipe, "--from", "sft", "--dry-run"], cwd=work)
    assert "pretrain   skip" in from_sft.stdout and "sft        run   (--from sft)" in from_sft.stdout

    again = run_cli(["pipeline/run.py", recipe], cwd=work)  # nothing to do: no stage starts
    assert again.returncode == 0 and "=== " not in again.stdout


def test_force_reruns_only_the_selected_stage(tiny_run, tmp_path):
    import shutil

    # on a copy: the shared run's sft (and cost.md) stay as the other tests of this worker read them (test_cost)
    shutil.copytree(tiny_run[0] / "runs", tmp_path / "runs")
    work, recipe = tmp_path, shutil.copy(tiny_run[1], tmp_path / "recipe.yaml")
    sft_manifest = work / "runs" / "tiny" / "sft" / "manifest.json"
    pretrain_manifest = work / "runs" / "tiny" / "pretrain" / "manifest.json"
    before_sft, before_pre = sft_manifest.read_text(), pretrain_manifest.read_text()
    proc = run_cli(["pipeline/run.py", recipe, "--only", "sft", "--force"], cwd=work)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "=== sft" in proc.stdout and "=== pretrain" not in proc.stdout
    assert sft_manifest.read_text() != before_sft and pretrain_manifest.read_text() == before_pre


def test_accelerate_launch_sft_after_pretrain(tiny_run):
    work, recipe, _ = tiny_run
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(REPO / "pipeline/sft.py"), str(recipe),
           "sft.max_steps=5", "run.name=accel", f"sft.init_from={work / 'runs/tiny/pretrain'}"]
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((work / "runs/accel/sft/metrics.json").read_text())["steps"] == 5


def test_bad_recipe_key_exits_2_with_one_line_and_writes_nothing(tmp_path):
    recipe = tiny_recipe(tmp_path)
    proc = run_cli(["pipeline/sft.py", recipe, "sft.learning_rte=1"], cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "learning_rte" in lines[0] and "learning_rate" in lines[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("launcher, expected", [
    ("no-such-launcher --x", "run.launcher: 'no-such-launcher' is not a program on PATH"),  # was a traceback
    ("accelerate launch --config_file 'my config.yaml", "run.launcher: No closing quotation"),  # traceback, --check too
])
def test_bad_launcher_is_one_line_in_the_runner_and_check_leaving_nothing(tmp_path, launcher, expected):
    recipe = tiny_recipe(tmp_path, run={"launcher": launcher}, sft=None)
    run = run_cli(["pipeline/run.py", recipe], cwd=tmp_path)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert len(run.stderr.strip().splitlines()) == 1 and expected in run.stderr and str(recipe) in run.stderr
    check = run_cli(["pipeline/run.py", recipe, "--check"], cwd=tmp_path)
    assert check.returncode == 2 and "Traceback" not in check.stderr and expected in check.stdout + check.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script, override, expected", [
    ("pipeline/dpo.py", "dpo.init_from=rewrd",  # was: "rewrd: the hub cannot be reached" (no key, no file)
     "dpo.init_from: 'rewrd' is not a stage of this recipe, a folder or a hub id (closest: reward"),
    ("pipeline/ppo.py", "ppo.reward_model=rewards", "ppo.reward_model: 'rewards' is not a stage"),  # after the policy
])
def test_misspelt_stage_name_is_not_taken_for_a_hub_id(tmp_path, script, override, expected):
    recipe = tiny_recipe(tmp_path, dpo={}, ppo={"init_from": "model"})
    for args in ([script, recipe, override], ["pipeline/run.py", recipe, override, "--dry-run"]):
        proc = run_cli(args, cwd=tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith(f"error: override '{override}': ") and expected in line  # not the recipe file
    assert not (tmp_path / "runs").exists()


def _reward_model(tmp_path) -> None:
    """A tiny sequence-classification model (what ppo.reward_model reads) in `tmp_path`/rm."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=400, num_labels=1, pad_token_id=0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")


def _tool_folders(tmp_path) -> None:
    """As the tools find them (nothing is read before a tool is called): a diffusers pipeline with its image judge
    (`diffusion`) and one without (`pipe`); and draw tasks alone (no read task: no image_judge tool needed)."""
    for name in ("diffusion/model_index.json", "diffusion/judge/config.json", "diffusion/judge/model.safetensors",
                 "pipe/model_index.json"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    (tmp_path / "draws.jsonl").write_text(json.dumps({"prompt": "Draw a 3.", "kind": "draw", "expect": {"digit": 3}}))


def _ppo_start(recipe, overrides, tmp_path):
    from pipeline import ppo

    _reward_model(tmp_path)
    return ppo.main([str(recipe.path), *overrides])


def _implicit_reward(recipe, overrides, tmp_path):
    from pipeline import ppo, runs

    dpo = tmp_path / "dpo_elsewhere"  # a stage folder whose manifest says it started from another model
    dpo.mkdir()
    (dpo / runs.MANIFEST).write_text(json.dumps({"inputs": {"checkpoints": {"init_from": {
        "path": str(tmp_path / "other"), "source": "local"}}}}))
    init = runs.Checkpoint("start", str(tmp_path / "start"), "fp", "local")
    return ppo.check_implicit_reward(recipe, init, runs.Checkpoint(str(dpo), str(dpo), "fp", "local"))


def _model_checkpoint(recipe, overrides, tmp_path):
    from pipeline import runs

    return runs.resolve_checkpoint(recipe, "model")


def _sft_inputs(recipe, overrides, tmp_path):
    from pipeline import runs

    return runs.stage_inputs(recipe, "sft", must_exist=False)


def _eval_tool_plan(recipe, overrides, tmp_path):
    from pipeline import eval_tools

    return eval_tools.plan(recipe, recipe.keys("eval"))


def _stage_toolbox(recipe, overrides, tmp_path):
    from pipeline.tool_rollout import stage_toolbox

    return stage_toolbox(recipe, tmp_path / "stage")


def _check_python_tools(recipe, overrides, tmp_path):
    from pipeline import check

    return check.python_tool_problems(recipe)[0]


def _check_image_judge(recipe, overrides, tmp_path):
    from pipeline import check

    return check._judge_described(recipe, recipe.keys("ppo").image_judge, set(), "ppo.image_judge")


NO_FOLDER_TOOL = "tools.tools=[{name: d, backend: diffusion, source: nowhere}]"
OVERRIDE_SITES = {  # a line about a value, by the code that makes it: (the call, the overrides: the last one named)
    "ppo.py: init_from": (_ppo_start, ["ppo.reward_model={tmp}/rm", "ppo.init_from=model"]),
    "ppo.py: implicit_reward": (_implicit_reward, ["ppo.implicit_reward={tmp}/dpo_elsewhere"]),
    "runs.py: model.name_or_path": (_model_checkpoint, ["model.name_or_path=./no_model"]),
    "runs.py: model section": (_model_checkpoint, ["model.config="]),
    "runs.py: tokenizer.chat_dataset": (_model_checkpoint, ["tokenizer.chat_dataset=no_chat.jsonl"]),
    "runs.py: sft.dataset": (_sft_inputs, ["sft.dataset=no_data.jsonl"]),
    "eval_tools.py: no tools": (_eval_tool_plan, ["eval.tool_prompts=world:tool_eval"]),
    "eval_tools.py: tool folder": (_eval_tool_plan, ["eval.tool_prompts=world:tool_eval", NO_FOLDER_TOOL]),
    "eval_tools.py: world_gallery": (_eval_tool_plan, [
        "tools.tools=[{name: draw_image, backend: diffusion, source: {tmp}/diffusion}, {name: read_image, backend: "
        "image_judge, source: {tmp}/diffusion}]", "eval.tool_prompts=world:tool_eval", "tools.world_gallery=false"]),
    "eval_tools.py: image judge": (_eval_tool_plan, ["eval.tool_prompts={tmp}/draws.jsonl",
                                                     "tools.tools=[{name: draw_image, backend: diffusion, source: "
                                                     "{tmp}/pipe}]"]),
    "tool_rollout.py: stage tools": (_stage_toolbox, [NO_FOLDER_TOOL]),
    "check.py: python tools": (_check_python_tools, ["tools.allow_code=true", "tools.tools=[{name: f, backend: "
                                                     "python, function: no_such_module_h11:f}]"]),
    "check.py: image judge": (_check_image_judge, [NO_FOLDER_TOOL, "ppo.image_judge=no_judge"]),
}


@pytest.mark.parametrize("site", OVERRIDE_SITES)
def test_a_line_about_a_value_an_override_set_names_the_override(tmp_path, monkeypatch, site):
    """README: a bad value stops "in one line naming the recipe file (or the override) and the key". These lines
    named the recipe file, which had not set the value."""
    from pipeline.cli import PipelineError
    from pipeline.recipe import load_recipe

    monkeypatch.chdir(tmp_path)
    _tool_folders(tmp_path)
    call, overrides = OVERRIDE_SITES[site]
    overrides = [o.replace("{tmp}", str(tmp_path)) for o in overrides]
    recipe = tiny_recipe(tmp_path, world={"n_tool_eval": 9}, ppo={}, eval={"checkpoints": ["pretrain"]})
    try:
        line = call(load_recipe(recipe, overrides), overrides, tmp_path)  # a check that returns its problems
    except PipelineError as err:
        line = str(err)
    assert line.startswith(f"override '{overrides[-1]}': ") and "\n" not in line, line


@pytest.mark.parametrize("content", ["", "run:\n", "run: {name: x}\n"])
def test_a_recipe_without_stages_is_one_line_not_an_empty_plan(tmp_path, content):
    """An empty file (a typo'd or truncated recipe) planned nothing and exited 0."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(content)
    proc = run_cli(["pipeline/run.py", recipe], cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith(f"error: {recipe}: no stage sections, nothing to run")
    assert not (tmp_path / "runs").exists()
    usage = run_cli(["pipeline/run.py"], cwd=tmp_path)  # the overrides are optional: the usage says the recipe
    assert usage.returncode == 2 and usage.stderr.strip().endswith("the following arguments are required: recipe")


def test_runner_stops_at_a_later_stages_missing_checkpoint_folder_before_the_first_stage_trains(tmp_path):
    """A folder named in a later stage's init_from that is not there stopped that stage only after the stages
    before it had trained (the plan looked only at stages that had finished before)."""
    missing = tmp_path / "nope"
    recipe = tiny_recipe(tmp_path, sft={"init_from": str(missing)})
    proc = run_cli(["pipeline/run.py", recipe], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: {recipe}: sft.init_from: checkpoint '{missing}' not found (not a stage, a folder or a hub id)")
    assert not (tmp_path / "runs").exists()


def test_runner_whose_first_stage_refuses_its_input_leaves_no_run_folder(tmp_path):
    recipe = tiny_recipe(tmp_path, pretrain=None, sft={"dataset": str(tmp_path / "missing.jsonl")})
    proc = run_cli(["pipeline/run.py", recipe], cwd=tmp_path)
    assert proc.returncode == 2 and "missing.jsonl': file not found" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "runs").exists()  # the runner made runs/tiny/ for its lock and left it empty


@pytest.mark.parametrize("content, expected", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}\n{oops\n', "line 2"),
    ('{"messages": [{"role": "narrator", "content": "hi"}]}\n', "unknown role 'narrator'"),
])
def test_bad_data_row_exits_2_naming_file_and_row(tiny_run, content, expected):
    work, recipe, _ = tiny_run
    bad = work / "bad.jsonl"
    bad.write_text(content)
    before = sorted(p.name for p in (work / "runs").rglob("*"))
    proc = run_cli(["pipeline/sft.py", recipe, f"sft.dataset={bad}", "run.name=bad",
                    f"sft.init_from={work / 'runs/tiny/pretrain'}"], cwd=work)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert str(bad) in line and expected in line
    assert sorted(p.name for p in (work / "runs").rglob("*")) == before


def test_killed_stage_never_looks_finished(tmp_path):
    recipe = tiny_recipe(tmp_path, pretrain={"max_steps": 100000})
    proc = subprocess.Popen([sys.executable, str(REPO / "pipeline/pretrain.py"), str(recipe)], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / "runs/tiny/pretrain.partial"
    deadline = time.time() + 120
    while not partial.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    time.sleep(3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert partial.exists() and not (tmp_path / "runs/tiny/pretrain").exists()
    plan = run_cli(["pipeline/run.py", recipe, "--dry-run"], cwd=tmp_path)
    assert "pretrain   run   (not run yet)" in plan.stdout


@pytest.mark.parametrize("extra", [["sft.merge_adapter=true"], ["sft.load_in_4bit=true"]], ids=["lora", "qlora"])
def test_lora_and_qlora_sft_save_loadable_adapters(tiny_run, extra):
    work, recipe, _ = tiny_run
    name = "qlora" if "load_in_4bit" in extra[0] else "lora"
    proc = run_cli(["pipeline/sft.py", recipe, "sft.use_peft=true", "sft.lora_r=8", "sft.max_steps=4",
                    f"run.name={name}", f"sft.init_from={work / 'runs/tiny/pretrain'}", *extra], cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = work / "runs" / name / "sft"
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    from peft import AutoPeftModelForCausalLM

    assert AutoPeftModelForCausalLM.from_pretrained(out) is not None
    if name == "lora":
        assert AutoModelForCausalLM.from_pretrained(out / "merged") is not None
    assert "heldout_accuracy_sft" in json.loads((out / "metrics.json").read_text())


def test_an_adapter_trained_on_an_unmerged_adapter_stage_reloads_with_both(tmp_path):
    """sft (LoRA, not merged) -> dpo/reward/ppo (LoRA): the later adapter was trained on the base with the sft adapter
    merged in, so that is what it must load onto, and the sft adapter must read into a reward model's body too."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline import models
    from pipeline.recipe import load_recipe
    from pipeline.reward_model import load_reward_model

    recipe = load_recipe(tiny_recipe(tmp_path))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "base")

    def lora():
        return LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")

    def trained_on(path, name):  # a stage's LoRA run: the loaded start model, a fresh adapter, saved
        model = get_peft_model(models.load_causal_lm(recipe, str(path)), lora())
        model.save_pretrained(tmp_path / name)
        return model.merge_and_unload()

    sft = trained_on(tmp_path / "base", "sft")
    dpo = trained_on(tmp_path / "sft", "dpo")
    x = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        for name, expected in (("sft", sft), ("dpo", dpo)):
            got = models.load_causal_lm(recipe, str(tmp_path / name))
            assert torch.allclose(got(x).logits, expected(x).logits, atol=1e-5), name
        reward = load_reward_model(recipe, str(tmp_path / "sft"))
        assert torch.allclose(reward.model(x).last_hidden_state, sft.model(x).last_hidden_state, atol=1e-5)

    # merge_adapter: the stage's merged/ is read from its saved adapter, over the same chain (peft's AutoPeftModel
    # took the adapter folder below for a model)
    from types import SimpleNamespace

    tokenizer = SimpleNamespace(eos_token_id=1, pad_token_id=0, save_pretrained=lambda path: None)
    saved = get_peft_model(models.load_causal_lm(recipe, str(tmp_path / "sft")), lora())  # a dpo run's trainer
    trainer = SimpleNamespace(model=saved, save_model=saved.save_pretrained, accelerator=SimpleNamespace(
        unwrap_model=lambda m: m, is_main_process=True, wait_for_everyone=lambda: None))
    models.save_trained(trainer, tokenizer, tmp_path / "dpo2", merge_adapter=True)
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "dpo2" / "merged")
        assert torch.allclose(merged(x).logits, saved.merge_and_unload()(x).logits, atol=1e-5)

    # a moved run folder: peft's recorded base is gone; the stages' manifests say where they started, in the run folder
    for name, start in (("sft", "base"), ("dpo", "sft")):
        (tmp_path / name / "manifest.json").write_text(json.dumps({"inputs": {"checkpoints": {"init_from": {
            "ref": start, "path": start, "source": "stage", "in_run_dir": True}}}}))
    moved = tmp_path / "moved"
    for name in ("base", "sft", "dpo"):
        shutil.move(tmp_path / name, moved / name)
    with torch.no_grad():
        assert torch.allclose(models.load_causal_lm(recipe, str(moved / "dpo"))(x).logits, dpo(x).logits, atol=1e-5)


def test_an_adapter_trained_with_chat_tokens_added_to_its_base_tokenizer_reloads(tmp_path):
    """A LoRA stage on a base whose tokenizer lacks the chat tokens grows the embeddings first (peft then saves them
    in the adapter); reading it back must grow the base the same way (it stopped on a size mismatch)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, models as tok_models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from pipeline import models
    from pipeline.recipe import load_recipe

    recipe = load_recipe(tiny_recipe(tmp_path))
    vocab = {f"t{i}": i for i in range(60)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tok_models.WordLevel(vocab, unk_token="t0")))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    model = models.load_causal_lm(recipe, str(tmp_path / "base"))
    models.fit_embeddings(model, tokenizer)  # as sft does before training
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "sft")
    tokenizer.save_pretrained(tmp_path / "sft")
    x = torch.tensor([[1, 2, 60, 61, 3]])
    with torch.no_grad():
        assert torch.allclose(models.load_causal_lm(recipe, str(tmp_path / "sft"))(x).logits, model(x).logits,
                              atol=1e-5)


def test_lora_names_that_match_no_module_stop_in_one_line(tiny_run, tmp_path):
    import torch
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    from pipeline import models
    from pipeline.cli import PipelineError
    from pipeline.recipe import load_recipe

    work, recipe, _ = tiny_run
    proc = run_cli(["pipeline/sft.py", recipe, "run.name=bad_lora", f"sft.init_from={work / 'runs/tiny/pretrain'}",
                    "sft.use_peft=true", "sft.lora_target_modules=[nope_proj]"], cwd=work)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: override 'sft.lora_target_modules=[nope_proj]': "
                                                           "sft.lora_target_modules: nope_proj ")
    assert not (work / "runs/bad_lora").exists()

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    for values, message in (({"lora_target_modules": ["q_proj", "v_prj"]}, "lora_target_modules: v_prj names no"),
                            ({"lora_modules_to_save": ["lm_heads"]}, "lora_modules_to_save: 'lm_heads' names no")):
        with pytest.raises(PipelineError, match=f"^{recipe}: dpo.{message}"):
            models.peft_config({"use_peft": True, **values}, model=model, recipe=load_recipe(recipe), stage="dpo")
    assert models.peft_config({"use_peft": True, "lora_target_modules": ["all-linear"]}, model=model)
    from peft import get_peft_model  # one target (TRL turned [q_proj] into the regex 'q_proj', which matched nothing)

    one = get_peft_model(model, models.peft_config({"use_peft": True, "lora_target_modules": ["q_proj"]}, model=model))
    assert {n.split(".")[-4] for n, _ in one.named_parameters() if "lora_A" in n} == {"q_proj"}
    model = one.unload()

    from bitsandbytes.functional import has_avx512bf16  # bitsandbytes' own test for its packed CPU kernel

    if torch.cuda.is_available() or not has_avx512bf16():
        return
    model.config.hidden_size, model.config.intermediate_size = 48, 96  # 48 outputs: not a block of 32
    LlamaForCausalLM(model.config).save_pretrained(tmp_path / "odd")
    odd = LlamaForCausalLM.from_pretrained(tmp_path / "odd", quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    with pytest.raises(PipelineError, match="sft.load_in_4bit: .* multiple of 32, and model.layers.0.* has 48"):
        models.peft_config({"use_peft": True, "load_in_4bit": True}, model=odd, recipe=load_recipe(recipe),
                           stage="sft")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the failure is in bitsandbytes' CPU path")
def test_dora_on_an_8bit_model_is_refused_on_cpu_where_its_second_step_fails(tmp_path):
    """peft's DoRA on a bitsandbytes 8-bit layer loses the layer's int8 scales after the first forward pass on a CPU,
    so the second training step raises inside bitsandbytes: the stage says so in one line before training."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    from pipeline import models
    from pipeline.cli import PipelineError
    from pipeline.recipe import load_recipe

    recipe = load_recipe(tiny_recipe(tmp_path))
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(tmp_path / "m")

    def load():
        return LlamaForCausalLM.from_pretrained(tmp_path / "m", quantization_config=BitsAndBytesConfig(load_in_8bit=True))

    values = {"use_peft": True, "use_dora": True, "load_in_8bit": True, "lora_target_modules": ["q_proj"]}
    with pytest.raises(PipelineError, match="recipe.yaml: sft.use_dora with load_in_8bit does not train on a CPU"):
        models.peft_config(values, model=load(), recipe=recipe, stage="sft")
    # Why: the libraries' own failure (if a peft/bitsandbytes release fixes it, this fails and the refusal can go) ...
    dora = get_peft_model(load(), LoraConfig(r=4, use_dora=True, target_modules=["q_proj"])).train()
    ids = torch.randint(0, 64, (2, 8))
    dora(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(AttributeError, match="unsqueeze"):
        dora(input_ids=ids, labels=ids)
    # ... and plain LoRA on the same 8-bit model passes the check and trains on.
    assert models.peft_config({**values, "use_dora": False}, model=load(), recipe=recipe, stage="sft") is not None


# ---------------------------------------------------------------------------------- stages side by side

def _span(run_dir, stage):
    """(start, end) of a finished stage in seconds since the epoch, from its manifest (start to the seconds)."""
    from datetime import datetime

    manifest = json.loads((run_dir / stage / "manifest.json").read_text())
    start = datetime.fromisoformat(manifest["started"]).timestamp()
    return start, start + manifest["wall_time_s"]


def test_parallel_stages_run_what_does_not_depend_on_each_other_side_by_side(tmp_path):
    from test_diffusion import TINY_DIFFUSION

    recipe = tiny_recipe(tmp_path, run={"parallel_stages": 2}, diffusion=TINY_DIFFUSION)
    proc = run_cli(["pipeline/run.py", recipe], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "up to 2 stages side by side" in proc.stdout and "=== diffusion (beside pretrain)" in proc.stdout
    run_dir = tmp_path / "runs" / "tiny"
    # both processes were alive at once: diffusion started before the runner saw pretrain end (the manifests'
    # training spans need not overlap: on a loaded machine one stage's imports can outlast the other's training)
    assert proc.stdout.index("=== diffusion (beside pretrain)") < proc.stdout.index("=== pretrain done")
    pretrain, sft = (_span(run_dir, s) for s in ("pretrain", "sft"))
    assert sft[0] >= pretrain[1] - 1  # sft starts from pretrain's model: only once it is finished
    # every line of a stage's own output (a trainer's loss dict too) names its stage; progress bars come as lines
    assert "[pretrain] {'loss'" in proc.stdout and "[diffusion] step 3 loss" in proc.stdout
    assert "\r" not in proc.stdout
    cost_md = (run_dir / "cost.md").read_text()
    assert "this run: 3 stage(s) in" in cost_md and "up to 2 side by side" in cost_md


def test_a_failed_stage_stops_what_needs_it_while_the_stage_beside_it_finishes(tmp_path):
    from test_diffusion import TINY_DIFFUSION

    bad = tmp_path / "corpus.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    recipe = tiny_recipe(tmp_path, run={"parallel_stages": 2}, pretrain={"dataset": str(bad)},
                         diffusion=TINY_DIFFUSION)
    proc = run_cli(["pipeline/run.py", recipe], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "corpus.jsonl" in proc.stdout and "stage pretrain failed (exit code 2)" in proc.stderr
    assert "waiting for diffusion to end" in proc.stdout
    run_dir = tmp_path / "runs" / "tiny"
    assert (run_dir / "diffusion" / "manifest.json").is_file()  # finished, not killed
    assert not (run_dir / "pretrain").exists() and not (run_dir / "sft").exists() and "=== sft" not in proc.stdout
    plan = run_cli(["pipeline/run.py", recipe, "--dry-run"], cwd=tmp_path)
    assert "diffusion  skip" in plan.stdout and "pretrain   run" in plan.stdout


def test_a_signal_to_the_runner_stops_every_stage_side_by_side_with_a_checkpoint_and_the_rerun_resumes(tmp_path):
    """SIGTERM to run.py while pretrain and diffusion train side by side: both save a checkpoint and exit 75, sft
    (it waits for pretrain) never starts, the runner exits 75; the same command resumes both and runs sft."""
    from test_diffusion import TINY_DIFFUSION

    recipe = tiny_recipe(tmp_path, run={"parallel_stages": 2}, pretrain={"save_steps": 4},
                         diffusion={**TINY_DIFFUSION, "save_steps": 2, "judge_epochs": 0})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PIPELINE_FAULT": "pause:training:2", "PIPELINE_FAULT_MARKER": str(tmp_path / "paused-{pid}"),
           "PIPELINE_FAULT_WAIT": "240"}
    proc = subprocess.Popen([sys.executable, str(REPO / "pipeline/run.py"), str(recipe)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300  # each stage writes paused-<its pid> when it waits at its step 2
    while len(list(tmp_path.glob("paused-*"))) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert len(list(tmp_path.glob("paused-*"))) == 2
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 75, out[-3000:]
    run_dir = tmp_path / "runs" / "tiny"
    for stage in ("pretrain", "diffusion"):
        assert f"[{stage}]" in out and not (run_dir / stage).exists()
        assert list((run_dir / f"{stage}.partial").glob("checkpoint-*")), stage
    assert "=== sft" not in out and not (run_dir / "sft").exists()

    again = run_cli(["pipeline/run.py", recipe], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "[pretrain] resumed from" in again.stdout or "[pretrain] resuming from" in again.stdout, again.stdout[-3000:]
    assert json.loads((run_dir / "pretrain" / "metrics.json").read_text())["steps"] == 12
    assert json.loads((run_dir / "diffusion" / "metrics.json").read_text())["steps"] == 6
    assert (run_dir / "sft" / "manifest.json").is_file()


def test_how_a_stage_loads_its_model_is_in_its_fingerprint(tmp_path):
    """A stage from a user's folder reruns when `tokenizer.chat_template`, `model.dtype` or
    `model.attn_implementation` change (the runner called it up to date); at their defaults nothing changes."""
    from pipeline import runs
    from pipeline.fingerprints import hash_obj
    from pipeline.recipe import load_recipe
    from test_byod import user_model

    folder = user_model(tmp_path / "llama3")
    recipe = tiny_recipe(tmp_path, pretrain=None, tokenizer=None, model={"config": None, "name_or_path": folder})

    def fingerprint(*overrides):
        return hash_obj(runs.stage_inputs(load_recipe(recipe, list(overrides)), "sft"))

    plain = fingerprint()
    assert plain == fingerprint("tokenizer.chat_template=pipeline", "model.dtype=float32")
    changed = [fingerprint(o) for o in ("tokenizer.chat_template=own", "tokenizer.chat_template=auto",
                                        "model.dtype=bfloat16", "model.attn_implementation=eager")]
    assert len({plain, *changed}) == 5


def test_runner_checks_every_stages_config_before_the_first_stage_starts(tmp_path):
    """README: the config classes' own checks stop the recipe before any stage looks at models or data; the runner
    ran them only as each stage started, so a bad value of a later stage stopped it after the stages before had
    trained."""
    recipe = tiny_recipe(tmp_path, reward={"eval_strategy": "bogus", "use_cpu": True})
    proc = run_cli(["pipeline/run.py", recipe], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: {recipe}: reward.eval_strategy: bogus is not a valid IntervalStrategy, please select one of "
        f"['no', 'steps', 'epoch']")
    assert not (tmp_path / "runs").exists()


def _reads(recipe, stage: str, source: str) -> bool:
    """Whether `stage` reads `source`, directly or through other stages (the test's own walk of the graph)."""
    from pipeline import run

    deps = run.dependencies(recipe, stage)
    return source in deps or any(_reads(recipe, d, source) for d in deps)


def test_from_reruns_the_stage_and_the_stages_that_read_it_not_every_later_one(monkeypatch, tmp_path):
    from pipeline import run, runs
    from pipeline.recipe import load_recipe

    # was: --from sft reran every stage after sft in the plan, the image stages (which never read sft) too
    monkeypatch.chdir(REPO)
    recipe = load_recipe(REPO / "recipes/small.yaml", [f"run.output_dir={tmp_path}"])
    finished = {s for s in recipe.stages if s != "diffusion"}  # diffusion has not run: it runs, as without --from
    status = lambda recipe, stage: (True, "up to date") if stage in finished else (False, "not run yet")
    monkeypatch.setattr(runs, "up_to_date", status)
    steps = {stage: (will_run, why) for stage, will_run, why in run.plan(recipe, start="sft")}
    from_sft = [stage for stage, (_, why) in steps.items() if why == "--from sft"]
    assert from_sft == [s for s in run.order_stages(recipe) if s == "sft" or _reads(recipe, s, "sft")]
    assert {"sft", "reward", "dpo", "ppo", "eval"} <= set(from_sft)
    assert steps["pretrain"] == (False, "up to date") and steps["diffusion"] == (True, "not run yet")
    assert steps["diffusion_dpo"] == (True, "input stage diffusion reruns")  # reads diffusion, not sft
    finished.add("diffusion")
    rerun = [stage for stage, will_run, _ in run.plan(recipe, start="sft") if will_run]
    assert rerun == from_sft  # every stage finished: only sft and the stages that read it
    # --only keeps the stages it names: of them, those that read sft rerun
    assert run.plan(recipe, only=["diffusion", "eval"], start="sft") == [("diffusion", False, "up to date"),
                                                                          ("eval", True, "--from sft")]


@pytest.mark.parametrize("check", [[], ["--check"]])
def test_a_missing_launcher_set_by_an_override_names_the_override(tmp_path, check):
    recipe = tiny_recipe(tmp_path, sft=None)  # was: the recipe file, which has no run.launcher
    proc = run_cli(["pipeline/run.py", recipe, "run.launcher=nosuchprog", *check], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert ("override 'run.launcher=nosuchprog': run.launcher: 'nosuchprog' is not a program on PATH"
            in proc.stdout + proc.stderr)
    assert not (tmp_path / "runs").exists()
