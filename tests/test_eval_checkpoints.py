"""Eval of a user's own checkpoints (pipeline/evaluate.py): models tuned elsewhere, in their own chat format."""

import json

from conftest import run_cli, tiny_recipe
from pipeline import models, runs
from pipeline.recipe import load_recipe

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}")


def test_a_checkpoint_with_its_own_chat_template_is_said_to_be_evaluated_in_the_pipelines(tmp_path):
    """The default tokenizer.chat_template (pipeline) puts ChatML over a user's model's own template: it answered
    in a format it never saw (fresh embedding rows for the markers), without a word. Now a warning names it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    recipe = load_recipe(tiny_recipe(tmp_path, pretrain=None, sft=None))
    tokenizer = models.load_tokenizer(recipe, runs.resolve_checkpoint(recipe, "model"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128)
    for name, template in (("ours", tokenizer.chat_template), ("theirs", TEMPLATE)):
        LlamaForCausalLM(config).save_pretrained(tmp_path / name)
        tokenizer.chat_template = template
        tokenizer.save_pretrained(tmp_path / name)
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "What is 2 + 3?", "answer": "5"}) + "\n")
    section = {"checkpoints": [str(tmp_path / "ours"), str(tmp_path / "theirs")], "prompts": str(tmp_path / "p.jsonl"),
               "perplexity_data": None, "num_samples": 0, "max_new_tokens": 4, "bootstrap": 100}
    proc = run_cli(["pipeline/evaluate.py", tiny_recipe(tmp_path, pretrain=None, sft=None, eval=section)],
                   cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    warned = [line for line in (proc.stdout + proc.stderr).splitlines() if "over its own" in line]
    assert len(warned) == 1 and f"{tmp_path.name}/theirs: evaluated with the pipeline's chat template" in warned[0]


def test_a_lora_adapter_whose_base_moved_stops_in_one_line_naming_it(tmp_path):
    """peft records the base by its absolute path; once that folder moved, the path was taken for a hub id ("the hub
    cannot be reached ..."): now the adapter and its missing base are named."""
    from peft import LoraConfig, get_peft_model

    recipe = load_recipe(tiny_recipe(tmp_path, pretrain=None, sft=None))
    tokenizer = models.load_tokenizer(recipe, runs.resolve_checkpoint(recipe, "model"))
    get_peft_model(models.build_causal_lm(recipe, tokenizer), LoraConfig(r=2, target_modules=["q_proj"])) \
        .save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    gone = str(tmp_path / "moved_away")
    (tmp_path / "adapter/adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": gone}))
    proc = run_cli(["pipeline/evaluate.py", tiny_recipe(tmp_path, pretrain=None, sft=None,
                                                        eval={"checkpoints": [str(tmp_path / "adapter")]})],
                   cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'adapter'}: the LoRA adapter's base model {gone} (base_model_name_or_path in its "
        f"adapter_config.json) does not exist: point it at the base model's folder")
    assert not (tmp_path / "runs").exists()
