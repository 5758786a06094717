"""The image stages' config classes: the keys of the `diffusion` and `diffusion_dpo` sections besides the pipeline
keys (pipeline/stages.py: DiffusionKeys, DiffusionDPOKeys), with their checks (recipe.check_config runs them before
any work)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class DiffusionConfig:
    """Keys of the `diffusion` section besides the pipeline keys (pipeline/stages.py: DiffusionKeys)."""

    max_steps: int = 2000               # optimizer steps
    batch_size: int = 64                # images per process per micro-batch
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    lr_scheduler_type: str = "cosine"   # any name of diffusers.optimization.get_scheduler
    warmup_steps: int = 50
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"         # no | bf16 | fp16 | auto: Accelerate's autocast over fp32 weights; auto:
                                        # bf16 where the device computes it natively, else no (mixed_precision_here)
    attn_implementation: str = "sdpa"   # sdpa (diffusers' default processor) | eager (bmm + softmax): faster in
                                        # bf16 on CPUs, whose SDPA backward in bf16 is slow (README "Image models")
    ema_decay: float = 0.999            # EMA of the trained weights (with warmup); the saved model is the EMA; 0: off
    caption_dropout: float = 0.1        # share of captions replaced by "" (classifier-free guidance)
    property_dropout: float = 0.3       # world captions: each property left out with this probability
    random_flip: bool = False           # each training image mirrored left-right with probability 0.5 (diffusers'
                                        # --random_flip), from the step's generator; refused on the digit world
    num_train_timesteps: int = 1000     # new model: DDPM schedule; a loaded pipeline keeps its own
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "epsilon"    # epsilon | v_prediction
    snr_gamma: float | None = 5.0       # Min-SNR loss weighting (Hang et al. 2023); empty: plain MSE
    train_text_encoder: bool | None = None  # empty: true for a new model (it trains with the UNet), false when
                                            # fine-tuning a pipeline (as diffusers' train_text_to_image.py)
    use_lora: bool = False              # train LoRA adapters on the UNet's attention (peft) instead of all weights
    lora_rank: int = 8
    lora_alpha: int = 8
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    unet: dict = field(default_factory=dict)          # new model: UNet2DConditionModel kwargs over images.DEFAULT_UNET
    text_encoder: dict = field(default_factory=dict)  # new model: T5Config kwargs over images.DEFAULT_TEXT_ENCODER
    sampler: str = "ddim"               # scheduler saved with the model for sampling: ddim | dpm | ddpm | euler
    logging_steps: int = 50
    save_steps: int = 500               # checkpoint every N steps (resume after a kill); 0: only at the end
    save_total_limit: int = 1
    seed: int | None = None             # empty: run.seed

    def __post_init__(self):
        check_common(self)
        _one_of("prediction_type", self.prediction_type, ("epsilon", "v_prediction", "sample"))
        _one_of("sampler", self.sampler, SAMPLERS)
        for name in ("caption_dropout", "property_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.train_text_encoder and self.use_lora:  # LoRA adapts the UNet only: the text encoder stayed frozen
            raise ValueError("train_text_encoder: true cannot train with use_lora: true (LoRA's adapters are on the "
                             "UNet's attention only; the text encoder would stay frozen): set one of them false")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SAMPLERS = ("ddim", "dpm", "ddpm", "euler")


def flip_problem(random_flip: bool, dataset: str) -> str | None:
    """Why `random_flip` cannot train on `dataset`, or None. The digit world's captions say where the digit stands
    ("a 7 on the left") and a mirrored 3 or 7 is no digit: a flipped image would contradict its caption."""
    from pipeline.images import WORLD_SPEC

    if random_flip and dataset == WORLD_SPEC:
        return (f"the digit world ({WORLD_SPEC}) captions say the digit's side ('on the left') and a mirrored 3 or 7 "
                f"is no digit, so a flipped image contradicts its caption: set random_flip false")
    return None


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


def mixed_precision_here(value: str, stage: str) -> str:
    """The precision an image stage trains in here, logged when it is worth saying. `auto`: bf16 on a GPU that
    supports it or a CPU that computes it natively, else fp32; bf16 asked for on a CPU that only emulates it is kept,
    with a warning (a step took 11.6x fp32's on an AVX2-only CPU: benchmarks/README.md, image_step.py)."""
    import torch

    from pipeline import cluster, log

    device = cluster.training_device()  # the device the stage trains on: the question is its bf16
    if device == "cuda":
        native, where = torch.cuda.is_bf16_supported(), "this GPU"
    elif device == "cpu":
        native, where = cluster.cpu_bf16_native(), "this CPU"
    elif value == "auto":  # an XPU, NPU or MPS device: torch has no bf16 question common to them; fp32 runs on all
        log.info(f"{stage}.mixed_precision auto: fp32 (whether this {device} device computes bf16 is not checked)")
        return "no"
    else:
        return value
    if value == "auto":
        log.info(f"{stage}.mixed_precision auto: {'bf16' if native else 'fp32'} ({where} "
                 f"{'computes' if native else 'has no native'} bf16)")
        return "bf16" if native else "no"
    if value == "bf16" and not native:
        log.warning(f"{stage}.mixed_precision bf16: {where} has no native bf16, so torch emulates it, many times "
                    f"slower than fp32; set mixed_precision: auto or no")
    return value


def check_common(cfg) -> None:
    """The checks both image configs share (recipe.check_config runs them before any work)."""
    from diffusers.optimization import SchedulerType

    _one_of("mixed_precision", cfg.mixed_precision, ("no", "bf16", "fp16", "auto"))
    _one_of("attn_implementation", cfg.attn_implementation, ("sdpa", "eager"))
    _one_of("lr_scheduler_type", cfg.lr_scheduler_type, [t.value for t in SchedulerType])  # get_scheduler's names
    if not 0 <= cfg.ema_decay < 1:
        raise ValueError(f"ema_decay must be in [0, 1), got {cfg.ema_decay}")
    if cfg.max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {cfg.max_steps}")


@dataclass
class DiffusionDPOConfig:
    """Keys of the `diffusion_dpo` section besides the pipeline keys (DiffusionDPOKeys)."""

    max_steps: int = 200
    batch_size: int = 32                # preference pairs per process per micro-batch
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_scheduler_type: str = "constant_with_warmup"
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    attn_implementation: str = "sdpa"
    beta: float = 2000.0                # Diffusion-DPO's beta (the official script's beta_dpo; SD1.5 used 5000)
    sft_weight: float = 0.0             # weight of the plain denoising loss (stays near the data)
    sft_images: str = "chosen"          # what that loss sees: `chosen` images, or `both` images of every pair
    max_timestep: int | None = None     # pairs noised only at t < this; empty: every training timestep
    winner_penalty: float = 0.0         # DPO-Positive's lambda: the winner's error may not rise over the reference's
    pair_filter: str = "any"            # `digit`: keep only pairs whose images differ on showing the caption's digit
    ema_decay: float = 0.0              # 0: the tuned weights as they are
    use_lora: bool = False
    lora_rank: int = 8
    lora_alpha: int = 8
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    candidates_per_caption: int = 4     # images the start model draws per training caption; pairs come from them
    candidate_steps: int | None = None  # sampler steps per candidate; empty: the section's sample_steps
    rounds: int = 1                     # > 1: later rounds draw their candidates from the model tuned so far
    label_noise: float = 0.15           # the simulated annotator flips this share of labels (as the text world)
    logging_steps: int = 25
    save_steps: int = 100
    save_total_limit: int = 1
    seed: int | None = None

    def __post_init__(self):
        check_common(self)
        if self.beta <= 0:
            raise ValueError(f"beta must be above 0, got {self.beta}")
        if not 0 <= self.label_noise <= 0.5:
            raise ValueError(f"label_noise must be in [0, 0.5], got {self.label_noise}")
        if self.candidates_per_caption < 2 or self.rounds < 1:
            raise ValueError("candidates_per_caption must be at least 2 and rounds at least 1 (pairs need two images)")
        if self.candidate_steps is not None and self.candidate_steps < 1:
            raise ValueError(f"candidate_steps must be at least 1 (or empty: sample_steps), got {self.candidate_steps}")
        if self.rounds > self.max_steps:
            raise ValueError(f"rounds ({self.rounds}) must not exceed max_steps ({self.max_steps}): each round trains")
        _one_of("sft_images", self.sft_images, ("chosen", "both"))
        _one_of("pair_filter", self.pair_filter, ("any", "digit"))
        if self.max_timestep is not None and self.max_timestep < 1:
            raise ValueError(f"max_timestep must be at least 1 (or empty: every timestep), got {self.max_timestep}")
        if self.winner_penalty < 0:
            raise ValueError(f"winner_penalty must be 0 or above, got {self.winner_penalty}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
