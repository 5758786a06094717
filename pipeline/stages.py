"""The stage registry: what each recipe section is, which config class its keys belong to, and its pipeline keys.

A stage section of a recipe accepts (1) the fields of the stage's TRL/Transformers config class, (2) the pipeline
keys declared here in a small dataclass (where the model starts from, which data it reads), and (3) for stages that
train with adapters, TRL's `ModelConfig` LoRA/quantization fields. A new stage plugs in by adding one `StageSpec`.

Pipeline-key metadata: `ref="checkpoint"` marks a key naming a model (a stage of the recipe, `model`, a path or a
hub id): the runner orders stages by it. `ref="data"` marks a dataset spec (`world:<split>`, a local file or folder,
or a hub id): its fingerprint enters the stage's manifest.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def key(default, help: str, ref: str | None = None, **kw):
    meta = {"help": help}
    if ref:
        meta["ref"] = ref
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


# TRL ModelConfig fields accepted by stages that can train LoRA adapters (QLoRA with load_in_4bit).
PEFT_FIELDS = (
    "use_peft", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save",
    "lora_task_type", "use_rslora", "use_dora", "load_in_8bit", "load_in_4bit", "bnb_4bit_quant_type",
    "use_bnb_nested_quant", "bnb_4bit_quant_storage",
)


@dataclass
class PretrainKeys:
    init_from: str | None = key(None, "checkpoint to continue from (stage, path or hub id); empty: a new model "
                                      "from the `model` section", ref="checkpoint")
    dataset: str = key("world:pretrain", "plain-text corpus (a `text` column)", ref="data")
    eval_dataset: str | None = key(None, "held-out text; empty: `eval_fraction` of the packed blocks", ref="data")
    eval_fraction: float = key(0.02, "share of packed blocks held out when no eval_dataset is given")
    text_column: str = key("text", "column holding the documents")
    block_size: int = key(256, "tokens per packed training block")


@dataclass
class SFTKeys:
    init_from: str | None = key(None, "model to fine-tune; empty: `pretrain` if the recipe has it, else `model`",
                                ref="checkpoint")
    dataset: str = key("world:sft", "conversations (`messages`) or prompt/completion rows", ref="data")
    eval_dataset: str | None = key("world:sft_eval", "conversations for eval loss; empty: none", ref="data")
    heldout_prompts: str | None = key("world:eval", "prompts with verifiers scored for base and SFT at the end; "
                                                    "empty: skip", ref="data")
    heldout_max_prompts: int = key(400, "score at most this many held-out prompts")
    heldout_max_new_tokens: int = key(48, "generation budget per held-out reply")
    heldout_batch_size: int = key(64, "prompts per generation batch")
    merge_adapter: bool = key(False, "with use_peft: also save the merged full model under `merged/`")


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str                 # the stage's script module, run as `python -m` or by path
    config_class: str | None    # "package:Class" whose fields the section accepts
    keys: type                  # dataclass of pipeline keys
    peft: bool = False          # accepts TRL ModelConfig's LoRA/quantization fields
    default_init: tuple[str, ...] = ()  # init_from when empty: first of these that is a stage of the recipe


STAGES: dict[str, StageSpec] = {
    "pretrain": StageSpec("pretrain", "pipeline.pretrain", "transformers:TrainingArguments", PretrainKeys),
    "sft": StageSpec("sft", "pipeline.sft", "trl:SFTConfig", SFTKeys, peft=True,
                     default_init=("pretrain", "model")),
}
