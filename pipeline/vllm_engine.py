"""`generation.backend: vllm`: eval's replies and ppo's rollouts sampled by vLLM instead of `model.generate`.

The engine is TRL's `VLLMGeneration` (the one GRPOTrainer uses), colocated: a vLLM instance inside each process, on
that process's GPU, loaded once from the first model's folder; `use(model)` pushes a model's current weights into it
(TRL gathers DeepSpeed/FSDP shards and merges LoRA adapters on the way). PPO calls `use` before every rollout, eval
before every checkpoint. `sample` is the one primitive the callers need: token ids in, sampled token ids out, each
completion ending with the end-of-turn token when it stopped there, which is what the `hf` paths produce once their
padding is stripped (pipeline/generation.py, ppo_rollout.py, tool_rollout.py build their outputs from it the same way).
Each call names the tokens it stops at (the caller's generation.stop_ids, the ones it reads replies with), and
stops there only: vLLM would also stop at the eos of the tokenizer and generation_config the engine was built from
(the first checkpoint's), and eval loads checkpoints with other tokenizers and templates into it.

The log-probabilities PPO trains on are still computed by the training model (ppo_rollout.reply_logits): vLLM only
chooses the tokens, so its kernels' small numeric differences make the rollout slightly off-policy, as in TRL.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

from pipeline import log
from pipeline.cli import PipelineError
from pipeline.key_checks import key_prefix
from pipeline.values import closest


@dataclass
class GenerationSection:
    """How eval and ppo generate (README, "generation"): transformers' generate, or vLLM on GPU machines."""

    backend: str = "hf"                      # hf: model.generate (KV cache, batches sorted by length); vllm: vLLM
    vllm_mode: str = "colocate"              # colocate: an engine inside each process, on its GPU; server: `trl
                                             # vllm-serve` (GRPO/RLOO only)
    vllm_server_base_url: str | None = None  # server mode: e.g. http://10.0.0.7:8000
    vllm_gpu_memory_utilization: float = 0.3  # colocate: the GPU memory share vLLM takes beside training
    vllm_tensor_parallel_size: int = 1
    vllm_max_model_length: int | None = None  # empty: the model's max_position_embeddings
    vllm_enable_sleep_mode: bool = False     # colocate: free vLLM's memory between generations (slower)


GENERATION_BACKENDS = ("hf", "vllm")
VLLM_MODES = ("colocate", "server")


def check_section(recipe) -> None:
    """The section's values, when the recipe loads."""
    gen = recipe.generation
    for key, value, allowed in (("backend", gen.backend, GENERATION_BACKENDS),
                                ("vllm_mode", gen.vllm_mode, VLLM_MODES)):
        if value not in allowed:
            raise PipelineError(f"{key_prefix(recipe, 'generation', key)}{key}: '{value}' is not one of "
                                f"{', '.join(allowed)}{closest(str(value), allowed)}")
    if not 0 < gen.vllm_gpu_memory_utilization <= 1:
        raise PipelineError(f"{key_prefix(recipe, 'generation', 'vllm_gpu_memory_utilization')}"
                            f"vllm_gpu_memory_utilization must be in (0, 1], got {gen.vllm_gpu_memory_utilization}")


GENERATING_STAGES = ("eval", "ppo")  # the stages `generation` applies to (the end-of-stage held-out checks use hf)


def uses_vllm(recipe, stage: str) -> bool:
    """Whether `stage` generates with vLLM under this recipe."""
    return stage in GENERATING_STAGES and recipe.generation.backend == "vllm"


def check(recipe, server_ok: bool = False, one_process: bool = False) -> None:
    """Fail before any work when the recipe asks for vLLM on a machine that cannot run it (`server_ok`: GRPO/RLOO,
    where TRL can also reach a vLLM server; `one_process`: eval, which generates in its main process only, so an
    engine there cannot wait for the other processes)."""
    gen = recipe.generation
    if gen.backend != "vllm":
        return
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if one_process and (processes > 1 or gen.vllm_tensor_parallel_size > 1):
        raise PipelineError(f"{key_prefix(recipe, 'generation', 'backend', 'vllm_tensor_parallel_size')}backend: vllm "
                            f"in eval runs one engine in one process (vllm_tensor_parallel_size 1); this launch has "
                            f"{processes} processes and vllm_tensor_parallel_size {gen.vllm_tensor_parallel_size}")
    if gen.vllm_mode != "colocate" and not server_ok:
        raise PipelineError(f"{key_prefix(recipe, 'generation', 'vllm_mode')}vllm_mode: {gen.vllm_mode}: eval and "
                            f"our ppo run vLLM colocated; a vLLM server serves GRPO/RLOO only (ppo.algorithm: grpo or "
                            f"rloo)")
    import torch

    missing = [what for what, ok in (("the vllm package (pip install '.[vllm]')", importlib.util.find_spec("vllm")),
                                     ("a CUDA GPU", torch.cuda.is_available())) if not ok]
    if missing:
        raise PipelineError(f"{key_prefix(recipe, 'generation', 'backend')}backend: vllm needs "
                            f"{' and '.join(missing)}, which this machine lacks; use generation.backend=hf")


def trl_args(recipe) -> dict:
    """GRPOConfig/RLOOConfig arguments for the recipe's generation section (TRL runs vLLM itself there)."""
    gen = recipe.generation
    if gen.backend != "vllm":
        return {"use_vllm": False}
    out = {"use_vllm": True, "vllm_mode": gen.vllm_mode,
           "vllm_gpu_memory_utilization": gen.vllm_gpu_memory_utilization,
           "vllm_tensor_parallel_size": gen.vllm_tensor_parallel_size,
           "vllm_enable_sleep_mode": gen.vllm_enable_sleep_mode}
    if gen.vllm_server_base_url:
        out["vllm_server_base_url"] = gen.vllm_server_base_url
    if gen.vllm_max_model_length:
        out["vllm_max_model_length"] = gen.vllm_max_model_length
    return out


class Engine:
    """A colocated vLLM engine for one architecture; `use(model)` loads a model's weights, `sample` generates."""

    def __init__(self, recipe, model, tokenizer, accelerator=None):
        from trl.generation.vllm_generation import VLLMGeneration

        if accelerator is None:
            from accelerate import Accelerator

            accelerator = Accelerator()
        gen = recipe.generation
        self.architecture = _architecture(model)
        self.trl = VLLMGeneration(
            model=model, accelerator=accelerator, processing_class=tokenizer, mode="colocate",
            tensor_parallel_size=gen.vllm_tensor_parallel_size,
            gpu_memory_utilization=gen.vllm_gpu_memory_utilization,
            max_model_length=gen.vllm_max_model_length, enable_sleep_mode=gen.vllm_enable_sleep_mode,
            trust_remote_code=recipe.model.trust_remote_code, logprobs=None)
        self.built_from = model.name_or_path
        log.info(f"vLLM engine from {self.built_from} (colocated, gpu_memory_utilization "
                 f"{gen.vllm_gpu_memory_utilization})")

    def use(self, model) -> None:
        """Load `model`'s current weights into the engine (same architecture as the one it was built from)."""
        if _architecture(model) != self.architecture:
            raise PipelineError(f"{model.name_or_path}: generation.backend: vllm loads every model into one engine, "
                                f"but this one's architecture differs from {self.built_from}'s")
        self.trl.model = model  # TRL reads it again to re-push the weights after a sleep
        self.trl.sync_weights()

    def release(self) -> None:
        """Drop the reference to the last model (eval: the checkpoint is done, its memory can go)."""
        self.trl.model = None

    def sample(self, prompt_ids: list[list[int]], *, stops: list[int], max_new_tokens: int, do_sample: bool,
               temperature: float = 1.0, top_p: float = 1.0, n: int = 1) -> list[list[int]]:
        """`n` completions per prompt (prompt-major: prompt 0's n, then prompt 1's), each its sampled token ids up to
        and including the first of `stops` (generation.stop_ids of the model now loaded) where it stopped there, at
        most `max_new_tokens`. Greedy without `do_sample`."""
        trl = self.trl
        # vLLM's SamplingParams: ignore_eos drops the built-from model's eos ids, so these stops are the only ones
        trl.generation_kwargs = {**trl.generation_kwargs, "stop_token_ids": list(stops), "ignore_eos": True}
        trl.temperature = temperature if do_sample else 0.0  # vLLM: temperature 0 is greedy
        trl.top_p = top_p if do_sample else 1.0
        trl.top_k = 0
        trl.max_completion_length = max_new_tokens
        repeated = [list(ids) for ids in prompt_ids for _ in range(n)]
        _, completions, _, _ = trl.generate(repeated, None, n)
        return [list(c) for c in completions]


class EvalEngines:
    """Eval's engine: built from the first checkpoint, each later checkpoint's weights loaded into it in turn;
    `load` gives None with `generation.backend: hf`."""

    def __init__(self, recipe):
        self.recipe, self.engine = recipe, None

    def load(self, model, tokenizer) -> Engine | None:
        if not uses_vllm(self.recipe, "eval"):
            return None
        if self.engine is None:
            self.engine = Engine(self.recipe, model, tokenizer)
        self.engine.use(model)  # also the first: a merged LoRA adapter's weights are not in the folder vLLM read
        return self.engine


def _architecture(model) -> tuple:
    """What must match for one model's weights to load into an engine built from another's: its parameters' names
    and shapes (a LoRA model: its base model's)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__name__, tuple((name.replace(".base_layer", ""), tuple(p.shape))
                                      for name, p in base.named_parameters() if "lora_" not in name)
