"""`run.py --check`'s cost projection: GPU time, energy and CO2e of each training stage before it runs.

From the recipe alone: the stage's model size (from its config, as the memory estimate), its optimizer steps
(`max_steps`, or epochs over a world split or a list of them: sizes known), the sequences per step (the global
batch) and their length (`block_size` / `max_length`, or prompt + `max_new_tokens`: an upper bound, padding
included), and an assumed throughput per GPU:

    FLOPs    = factor x parameters x tokens           tokens = steps x sequences per step x sequence length
    factor   = sequences per example x (6 per trained model (4 with LoRA: no weight gradients) x epochs per batch
               + 2 per frozen model forward (DPO's reference, PPO's reference and reward model)) [+ 2: PPO generates]
    time     = FLOPs / (GPUs x peak TFLOPS x MFU)     one GPU per process of the launch
    energy   = GPUs x time x watts per GPU            the GPUs alone: no CPUs, memory, network or cooling (PUE)
    CO2e     = energy x the grid's intensity          run.carbon_intensity_g_per_kwh, else codecarbon's country figure

The usual 6 x N x D rule for training (Kaplan et al. 2020): an order of magnitude to plan with, not a measurement.
"""

from __future__ import annotations

import dataclasses
import math

from pipeline import cost
from pipeline.cli import PipelineError
from pipeline.memory import profile_of

DEFAULT_TFLOPS = 312.0   # per GPU: an A100's dense BF16 peak (H100 SXM: 989)
DEFAULT_WATTS = 400.0    # per GPU under load: an A100 SXM's TDP (H100 SXM: 700)
DEFAULT_MFU = 0.4        # model FLOPs utilisation: well-tuned large-model training reaches 0.35-0.5, small models less
# world splits whose size is a recipe key (rows, or pairs): epochs over them give a step count
WORLD_ROWS = {"sft": "n_sft", "sft_eval": "n_sft_eval", "preference": "n_preference",
              "preference_eval": "n_preference_eval", "eval": "n_eval", "tool_sft": "n_tool_sft",
              "tool_sft_eval": "n_tool_sft_eval", "tool_preference": "n_tool_preference",
              "tool_preference_eval": "n_tool_preference_eval", "tool_eval": "n_tool_eval"}


@dataclasses.dataclass
class Throughput:
    tflops: float = DEFAULT_TFLOPS
    watts: float = DEFAULT_WATTS
    mfu: float = DEFAULT_MFU

    def __post_init__(self):
        for name, value in (("--gpu-tflops", self.tflops), ("--gpu-watts", self.watts)):
            if not value > 0:
                raise PipelineError(f"{name} must be more than 0, got {value}")
        if not 0 < self.mfu <= 1:
            raise PipelineError(f"--mfu must be more than 0 and at most 1, got {self.mfu}")

    def describe(self) -> str:
        return f"{self.tflops:g} TFLOPS peak x MFU {self.mfu:g}, {self.watts:g} W per GPU"


@dataclasses.dataclass
class Projection:
    stage: str
    parameters: int
    steps: int
    tokens: float
    factor: float
    gpus: int
    throughput: Throughput
    carbon_intensity_g_per_kwh: float | None
    carbon_intensity_source: str

    @property
    def flops(self) -> float:
        return self.factor * self.parameters * self.tokens

    @property
    def wall_s(self) -> float:
        return self.flops / (self.gpus * self.throughput.tflops * 1e12 * self.throughput.mfu)

    @property
    def gpu_hours(self) -> float:
        return self.gpus * self.wall_s / 3600

    @property
    def energy_kwh(self) -> float:
        return self.gpu_hours * self.throughput.watts / 1000

    @property
    def co2e_kg(self) -> float | None:
        if self.carbon_intensity_g_per_kwh is None:
            return None
        return self.energy_kwh * self.carbon_intensity_g_per_kwh / 1000

    def row(self) -> dict:
        return {"stage": self.stage, "parameters": self.parameters, "wall_s": self.wall_s,
                "energy_kwh": self.energy_kwh, "carbon_intensity_g_per_kwh": self.carbon_intensity_g_per_kwh,
                "co2e_kg": self.co2e_kg, "gpu_hours": self.gpu_hours}

    def describe(self) -> str:
        co2e = "" if self.co2e_kg is None else f", {self.co2e_kg:.3g} kg CO2e"
        return (f"{self.flops:.3g} FLOPs ({self.factor:g} x {cost.human_count(self.parameters)} parameters x "
                f"{self.tokens:.3g} tokens, {self.steps} steps) = {cost.human_time(self.wall_s)} on {self.gpus} "
                f"GPU{'s' if self.gpus != 1 else ''}, {self.gpu_hours:.3g} GPU-h, {self.energy_kwh:.3g} kWh{co2e}")


def flops_factor(recipe, stage: str, peft: bool) -> float:
    """FLOPs per parameter and token position of one optimizer step's sequences (see the module docstring)."""
    profile = profile_of(recipe, stage)
    trained, passes, generation = profile.trained_models, 1, 0
    if stage == "ppo":
        algorithm = recipe.config_default(stage, "algorithm")
        passes = int(recipe.config_default(stage, "ppo_epochs")) if algorithm == "ppo" else 1
        generation = 2
    per_trained = 4 if peft else 6
    return profile.sequences_per_example * (per_trained * trained * passes + 2 * profile.frozen_models) + generation


def training_steps(recipe, stage: str, keys, sequences_per_step: int) -> tuple[int | None, str]:
    """(optimizer steps, how they were found), or (None, why not)."""
    max_steps = recipe.config_default(stage, "max_steps")
    if max_steps and max_steps > 0:
        return int(max_steps), "max_steps"
    rows = known_rows(recipe, getattr(keys, "dataset", None))
    epochs = recipe.config_default(stage, "num_train_epochs") if "num_train_epochs" in _fields(stage) else None
    if rows is not None and epochs:
        return math.ceil(epochs * math.ceil(rows / sequences_per_step)), f"{epochs:g} epochs over {rows} rows"
    return None, "set max_steps (epochs over a dataset of unknown size)"


def known_rows(recipe, dataset) -> int | None:
    """The rows of a world split, or of a list of them (the stage trains on all their rows, concatenated); None
    for any other dataset: its size is unknown before it is read."""
    specs = dataset if isinstance(dataset, list) else [dataset]
    splits = [s.split(":", 1)[1] if isinstance(s, str) and s.startswith("world:") else None for s in specs]
    if not splits or not all(split in WORLD_ROWS for split in splits):
        return None
    return sum(getattr(recipe.world, WORLD_ROWS[split]) for split in splits)


def _fields(stage):
    from pipeline.recipe import stage_fields

    return stage_fields(stage)


def project(recipe, stage: str, keys, parameters: int, gpus: int, sequences_per_step: int, seq_len: int,
            peft: bool, throughput: Throughput) -> Projection | str:
    """The stage's projection, or why there is none."""
    if "max_steps" not in _fields(stage):
        return "not projected: the stage trains nothing"
    steps, how = training_steps(recipe, stage, keys, sequences_per_step)
    if steps is None:
        return f"not projected: {how}"
    intensity, source = cost.grid_intensity(recipe.run.carbon_country, recipe.run.carbon_intensity_g_per_kwh)
    return Projection(stage, parameters, steps, float(steps) * sequences_per_step * seq_len,
                      flops_factor(recipe, stage, peft), max(gpus, 1), throughput, intensity, source)


def report(projections: list[Projection], throughput: Throughput) -> list[str]:
    """The projected cost table (the runner's format) and what it assumes."""
    if not projections:
        return []
    sources = sorted({p.carbon_intensity_source for p in projections})
    lines = [f"projected cost at {throughput.describe()} (FLOPs ~ 6 x parameters x tokens for training; "
             f"GPUs only; intensity from {', '.join(sources)}):"]
    lines += cost.cost_table([p.row() for p in projections])
    total_hours = sum(p.gpu_hours for p in projections)
    lines.append(f"{total_hours:.3g} GPU-hours in all (--gpu-tflops, --gpu-watts and --mfu change the assumptions)")
    return lines
