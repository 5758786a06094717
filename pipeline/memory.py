"""Memory per device of a training stage, estimated from the model's config and the launch config (run.py --check).

The estimate is the usual accounting (Rajbhandari et al. 2020, ZeRO; Korthikanti et al. 2022 for activations):
AdamW keeps two moments per trainable parameter; mixed precision under DeepSpeed keeps 16-bit weights and
gradients plus fp32 master weights and moments (16 bytes per parameter); ZeRO-1/2/3 divide the optimizer state /
plus gradients / plus weights by the number of processes, FSDP divides all three; activations per token and layer
are about 8h + 4i values (h hidden, i MLP size; h with gradient checkpointing, plus one layer recomputed), plus
the logits over the vocabulary. Expect the real peak within some tens of percent: allocator fragmentation,
temporary buffers and the CUDA context are covered only by a flat overhead.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from pipeline import cluster, runs
from pipeline.cli import PipelineError, first_line
from pipeline.reference_free import is_reference_free


GIB = 1 << 30
UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1 << 10, "m": 1e6, "mb": 1e6, "mib": 1 << 20, "g": 1e9,
         "gb": 1e9, "gib": 1 << 30, "t": 1e12, "tb": 1e12, "tib": 1 << 40}
OVERHEAD = 0.75 * GIB  # CUDA context, NCCL buffers, allocator slack: a flat allowance


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in UNITS:
        raise PipelineError(f"memory size '{text}': expected a number with a unit, e.g. 80GiB, 24GB, 512MiB")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def human(n: float) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


# ---------------------------------------------------------------------------------------------- stage shapes


@dataclasses.dataclass
class StageProfile:
    """What a stage keeps in memory besides one trained model (for stages not listed: the defaults)."""

    sequences_per_example: int = 1   # reward and DPO put chosen and rejected through the model
    trained_models: int = 1          # PPO trains a policy and a critic
    frozen_models: int = 0           # DPO's reference; PPO's reference and reward model
    frozen_with_peft: int | None = None  # frozen models when use_peft (the reference is the adapter switched off)
    lm_head: bool = True             # logits over the vocabulary (a reward model has a one-output head)
    frozen_sharded: bool = True      # ZeRO-3 / FSDP shard the frozen models too (our PPO loads them whole)
    gathers_trained: bool = False    # ZeRO-3: the trained weights gathered whole for generation (our PPO's rollouts)


# Add new stages here when they keep more than one trained model, or more than one sequence per example.
PROFILES = {
    "reward": StageProfile(sequences_per_example=2, lm_head=False),
    "dpo": StageProfile(sequences_per_example=2, frozen_models=1, frozen_with_peft=0),
    "kto": StageProfile(sequences_per_example=2, frozen_models=1, frozen_with_peft=0),  # a reply and a KL reply
    "ppo": StageProfile(trained_models=2, frozen_models=2, frozen_with_peft=1, frozen_sharded=False,
                        gathers_trained=True),
}


def profile_of(recipe, stage: str) -> StageProfile:
    """The stage's profile with what its keys add: the reward stage's LM regulariser (vocabulary logits again,
    counted for both replies though only the chosen need them); dpo's reference-free losses; ppo's critic only with
    GAE, and its further frozen models (each of `reward_ensemble`, and the `implicit_reward` policy)."""
    profile, keys = PROFILES.get(stage, StageProfile()), recipe.keys(stage)
    if getattr(keys, "lm_loss_coefficient", 0):
        profile = dataclasses.replace(profile, lm_head=True)
    if stage == "dpo" and keys.rounds == 1 and is_reference_free(recipe.config_default(stage, "loss_type")):
        profile = dataclasses.replace(profile, frozen_models=0)  # simpo, cpo, orpo: no reference model
    if stage == "ppo" and not recipe.trainer_config(stage, num_processes=0).trains_critic:
        profile = dataclasses.replace(profile, trained_models=1)
    more = len(getattr(keys, "reward_ensemble", None) or []) + bool(getattr(keys, "implicit_reward", None))
    if more:
        with_peft = None if profile.frozen_with_peft is None else profile.frozen_with_peft + more
        profile = dataclasses.replace(profile, frozen_models=profile.frozen_models + more, frozen_with_peft=with_peft)
    return profile


@dataclasses.dataclass
class ModelShape:
    source: str                  # where the architecture came from, for the report
    model_type: str
    params: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_dim: int
    vocab: int
    max_positions: int | None
    linear_params: int           # weights in Linear layers (what 4-bit quantization shrinks)
    lora_params_per_rank: dict   # target module name -> in+out features summed over layers
    config: object = None        # the model's config, for --check's questions the numbers above do not answer


def _architecture(recipe, ref: str | None, seen=()) -> tuple:
    """(AutoConfig, source text) of the model a checkpoint ref names, following stages back to their inputs; a
    folder or hub id read as the stages read it (model_configs: a stage's merged model, an adapter's base)."""
    from transformers import AutoConfig

    from pipeline import hub, model_configs, models

    if ref and ref in recipe.stages and ref not in seen:
        folder = recipe.stage_dir(ref)
        if runs.read_manifest(folder) is not None and \
                (config := model_configs.checkpoint_config(recipe, str(folder))) is not None:
            return config, "finished stage"
        upstream = recipe.keys(ref).init_from if hasattr(recipe.keys(ref), "init_from") else None
        config, _ = _architecture(recipe, upstream, (*seen, ref))
        return config, "stage not trained yet"
    if not ref or ref == "model":
        m = recipe.model
        if m.name_or_path:
            return _architecture(recipe, m.name_or_path, seen)
        if not m.config:
            raise PipelineError(f"{recipe.path}: the model section needs `name_or_path` or `config`")
        cfg = dict(m.config)
        model_type = cfg.pop("model_type", "llama")
        try:
            config = AutoConfig.for_model(model_type, **cfg)
        except (ValueError, TypeError) as err:
            raise PipelineError(f"{recipe.path}: model.config: {first_line(err)}") from None
        if recipe.tokenizer.train:
            config.vocab_size = recipe.tokenizer.vocab_size
        return config, "new model from model.config"
    local = Path(ref).expanduser().exists()
    name, revision = ((str(Path(ref).expanduser()), None) if local else  # a missing local path: resolve raises
                      (runs.resolve_checkpoint(recipe, ref, must_exist=False).path, recipe.model.revision))
    adapter = models.is_adapter(models.model_path(name))
    source, revision = model_configs.config_source(name, revision)
    shown = source if adapter else ref
    try:
        config = model_configs.read_config(recipe, source, revision)
    except (OSError, ValueError) as err:
        if Path(source).exists():
            why = (f"cannot read its config.json: {first_line(err)}" if (Path(source) / "config.json").is_file()
                   else "no config.json (not a saved model)")
            raise PipelineError(f"checkpoint '{shown}': {why}") from None
        why = hub.load_failure(hub.online_for(source), f"cannot read its config from the hub: {first_line(err)}")
        raise PipelineError(f"model '{shown}': {why}") from None
    return config, f"adapter on {source}" if adapter else "local" if local else "hub"


def model_shape(recipe, ref: str | None) -> ModelShape:
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.generation import text_config  # imports torch: here, where the shape needs it anyway

    config, source = _architecture(recipe, ref)
    text = text_config(config)
    hidden = getattr(text, "hidden_size", None) or getattr(text, "n_embd", None) or getattr(text, "d_model", 0)
    layers = getattr(text, "num_hidden_layers", None) or getattr(text, "n_layer", None) or 0
    heads = getattr(text, "num_attention_heads", None) or getattr(text, "n_head", None) or 1
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or (hidden // heads if heads else hidden)
    intermediate = getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None) or 4 * hidden
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    params = sum(p.numel() for p in model.parameters())
    linear, lora = 0, {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            linear += module.weight.numel()
            short = name.rsplit(".", 1)[-1]
            if short != "lm_head":
                lora[short] = lora.get(short, 0) + module.in_features + module.out_features
    return ModelShape(source, getattr(config, "model_type", ""), params, hidden, intermediate, layers, heads, kv_heads * head_dim,
                      getattr(text, "vocab_size", 0) or 0, getattr(text, "max_position_embeddings", None),
                      linear, lora, config)


# ---------------------------------------------------------------------------------------------- memory


@dataclasses.dataclass
class Estimate:
    parts: dict                  # name -> bytes on each device
    notes: list
    host_bytes: float = 0.0      # offloaded state in CPU memory, per process

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def describe(self) -> str:
        parts = " + ".join(f"{k} {human(v)}" for k, v in self.parts.items() if v)
        text = f"{parts} = {human(self.total)}"
        if self.host_bytes:
            text += f" (and {human(self.host_bytes)} of CPU memory per process for offloaded state)"
        return text


def _lora_trainable(shape: ModelShape, peft: dict) -> int:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    from trl import ModelConfig

    r = peft.get("lora_r", ModelConfig.lora_r)  # absent: TRL's default
    targets = peft.get("lora_target_modules")
    if targets in ("all-linear", ["all-linear"]):
        names = list(shape.lora_params_per_rank)
    elif targets:
        names = [targets] if isinstance(targets, str) else list(targets)
    else:
        names = DEFAULTS.get(shape.model_type, ["q_proj", "v_proj"])
    return r * sum(shape.lora_params_per_rank.get(n, 0) for n in names)


def estimate_memory(shape: ModelShape, launch: cluster.Launch, *, profile: StageProfile, per_device: int,
                    seq_len: int, mixed: bool, weight_bytes: int, grad_ckpt: bool, peft: dict,
                    attn: str | None) -> Estimate:
    n = max(1, launch.num_processes)
    notes = []
    p = shape.params
    if peft.get("use_peft"):
        trainable = _lora_trainable(shape, peft)
    else:
        trainable = p
    base_weight = p * weight_bytes
    if peft.get("load_in_4bit"):
        base_weight = shape.linear_params * 0.55 + (p - shape.linear_params) * weight_bytes  # nf4 + constants
    elif peft.get("load_in_8bit"):
        base_weight = shape.linear_params * 1.0 + (p - shape.linear_params) * weight_bytes
    deepspeed = launch.distributed_type == "DEEPSPEED"
    zero = launch.zero_stage if deepspeed else 0
    fsdp = launch.fsdp_version > 0
    # bytes per trainable parameter
    if deepspeed and mixed:
        w_b, g_b, opt_b = 2, 2, 12     # 16-bit weights and gradients; fp32 master weights + 2 moments
        base_weight = base_weight * 2 / max(weight_bytes, 1) if not peft.get("load_in_4bit") else base_weight
    else:
        w_b, g_b, opt_b = weight_bytes, weight_bytes, 2 * weight_bytes
    layer_params = (p - shape.vocab * shape.hidden * 2) / max(shape.layers, 1)
    weights = base_weight + (trainable * w_b if peft.get("use_peft") else 0)
    grads = trainable * g_b
    optimizer = trainable * opt_b
    host, whole_weights = 0.0, weights
    if zero >= 1 or fsdp:
        optimizer /= n
    if zero >= 2 or fsdp:
        grads /= n
    if zero == 3 or fsdp:
        weights = weights / n + 2 * max(layer_params, 0) * w_b   # own shard + the gathered layers in use
    if launch.offload_optimizer:
        host += optimizer
        optimizer = 0
    if launch.offload_params and (zero == 3 or fsdp):
        host += weights - 2 * max(layer_params, 0) * w_b
        weights = 2 * max(layer_params, 0) * w_b
        if fsdp:
            host += grads + optimizer
            grads = optimizer = 0
    frozen_count = profile.frozen_models
    if peft.get("use_peft") and profile.frozen_with_peft is not None:
        frozen_count = profile.frozen_with_peft
    frozen = frozen_count * p * (2 if mixed and deepspeed else weight_bytes)
    if (zero == 3 or fsdp) and profile.frozen_sharded:
        frozen /= n
    parts = {"weights": weights * profile.trained_models,
             "gradients": grads * profile.trained_models, "optimizer": optimizer * profile.trained_models}
    if zero == 3 and profile.gathers_trained:
        parts["gathered for generation"] = whole_weights * profile.trained_models
    if frozen:
        parts["frozen models"] = frozen
    act_b = 2 if (mixed or weight_bytes == 2) else 4
    seqs = per_device * profile.sequences_per_example
    per_token_layer = 8 * shape.hidden + 4 * shape.intermediate + 2 * shape.kv_dim
    if attn == "eager":
        per_token_layer += 2 * shape.heads * seq_len
    stored = shape.hidden * shape.layers + per_token_layer if grad_ckpt else per_token_layer * shape.layers
    activations = seqs * seq_len * stored * act_b * profile.trained_models
    if profile.lm_head:
        activations += seqs * seq_len * shape.vocab * (2 * act_b + 4)
        if frozen_count:
            activations += seqs * seq_len * shape.vocab * act_b
    parts["activations"] = activations
    parts["overhead"] = OVERHEAD + 0.05 * sum(parts.values())
    if peft.get("use_peft"):
        notes.append(f"LoRA: {trainable / 1e6:.3g}M trainable of {p / 1e6:.4g}M")
    return Estimate(parts, notes, host)
