"""recipes/small.yaml itself, end to end through the runner, with every stage cut to a few steps and the world to a
few rows: the recipe's own structure (a mixture of prompt sets, the tools and the image models they load, the
implicit reward, length_split, stages side by side, eval's tool prompts) runs as `make run` runs it. The unit tests
build their own tiny recipes; a stage that broke only on this one (ppo's chat-template check on a mixture of prompt
sets, 625ab5e to 0107503) was first seen in a user's `make run`."""

import json

import pytest
import torch

from conftest import REPO, run_cli

SMALL = REPO / "recipes" / "small.yaml"
SHRUNK = [
    "world.n_pretrain_docs=300", "world.n_sft=64", "world.n_sft_eval=16", "world.n_preference=200",
    "world.n_preference_eval=32", "world.n_eval=16", "world.n_tool_sft=32", "world.n_tool_sft_eval=8",
    "world.n_tool_preference=64", "world.n_tool_preference_eval=16", "world.n_tool_eval=6",
    "pretrain.max_steps=2", "pretrain.per_device_train_batch_size=4", "pretrain.logging_steps=1",
    "sft.max_steps=2", "sft.per_device_train_batch_size=4", "sft.logging_steps=1",
    "reward.max_steps=2", "reward.per_device_train_batch_size=4", "reward.logging_steps=1",
    "dpo.max_steps=2", "dpo.per_device_train_batch_size=4", "dpo.logging_steps=1",
    "diffusion.max_steps=2", "diffusion.batch_size=4", "diffusion.judge_epochs=1", "diffusion.heldout_samples=1",
    "diffusion.sample_steps=2", "diffusion.save_steps=0", "diffusion.logging_steps=1",
    "diffusion_dpo.max_steps=4", "diffusion_dpo.batch_size=2", "diffusion_dpo.candidates_per_caption=2",
    "diffusion_dpo.candidate_steps=2", "diffusion_dpo.pair_filter=any", "diffusion_dpo.heldout_samples=1",
    "diffusion_dpo.sample_steps=2", "diffusion_dpo.save_steps=0", "diffusion_dpo.logging_steps=1",
    "ppo.max_steps=1", "ppo.batch_size=4", "ppo.save_steps=0", "ppo.logging_steps=1", "ppo.max_new_tokens=8",
    "ppo.heldout_max_prompts=4",
    "eval.num_samples=1", "eval.best_of_n=[1]", "eval.max_new_tokens=8", "eval.tool_max_new_tokens=8",
    "eval.max_prompts=8",
]
STAGES = ["pretrain", "sft", "reward", "dpo", "diffusion", "diffusion_dpo", "ppo", "eval"]


def test_the_small_recipe_runs_every_stage_through_the_runner(tmp_path):
    proc = run_cli(["pipeline/run.py", SMALL, f"run.output_dir={tmp_path / 'runs'}", *SHRUNK], cwd=REPO,
                   timeout=900, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "small"
    for stage in STAGES:
        manifest = json.loads((run_dir / stage / "manifest.json").read_text())
        assert manifest["stage"] == stage and (run_dir / stage / "metrics.json").is_file(), stage
    ppo = json.loads((run_dir / "ppo" / "manifest.json").read_text())
    assert ppo["inputs"]["settings"]["section"]["prompts"] == {"world:preference": 0.1, "world:tool_preference": 1.0}
    # what ppo and eval read is in their manifests, as every other stage's data is
    prompts = ppo["data"]["prompts"]
    assert prompts["source"] == "world:preference + world:tool_preference" and prompts["rows"] > 0
    assert prompts["format"] == "the prompts of explicit preference pairs"  # read as the reward and dpo stages do
    eval_data = json.loads((run_dir / "eval" / "manifest.json").read_text())["data"]
    assert eval_data["prompts"] == {"source": "world:eval", "rows": 8, "format": "prompts"}
    assert eval_data["tool_prompts"]["source"] == "world:tool_eval" and eval_data["tool_prompts"]["rows"] > 0
    assert eval_data["perplexity_data"]["rows"] > 0
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert set(metrics["checkpoints"]) == {"pretrain", "sft", "dpo", "ppo"}
    assert all("tools" in m for m in metrics["checkpoints"].values())  # the tool prompts ran for every checkpoint
    assert "cost (README: Cost per stage)" in proc.stdout and (run_dir / "cost.md").is_file()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (this machine has none): the stages' "
                                                           "device placement there (models, frozen parts, rollouts)")
def test_the_small_recipe_runs_every_stage_on_a_cuda_gpu(tmp_path):
    """On a GPU every stage trains there, in bf16 where the recipe says fp32 for the CPU: a module left on the CPU
    beside one on the GPU (diffusion_dpo's frozen text encoder, found on an H200) fails here, not on CI's CPUs."""
    on_gpu = [f"{s}.{k}" for s in ("pretrain", "sft", "reward", "dpo") for k in ("use_cpu=false", "bf16=true")]
    proc = run_cli(["pipeline/run.py", SMALL, f"run.output_dir={tmp_path / 'runs'}", *SHRUNK, *on_gpu], cwd=REPO,
                   timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in STAGES:
        cost = json.loads((tmp_path / "runs" / "small" / stage / "manifest.json").read_text())["cost"]
        assert cost["gpu_hours"] > 0 and cost["peak_gpu_mem_mb"] > 0, (stage, cost)
