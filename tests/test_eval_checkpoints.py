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
