"""Running a stage under many processes: launch configs, the process group and the global batch.

Launch configs. `read_launch(path)` reads an Accelerate config (launch/accelerate/*.yaml, and the DeepSpeed JSON it
may point to) into a `Launch`: how many processes, and how the model is sharded (DDP, FSDP, ZeRO stage, offload).
`pipeline/run.py --check` uses it to predict memory; `launch_here()` describes the launch a running stage is in.

The global batch. A training stage's section may set `global_batch_size` (examples per optimizer step over all
processes). Without `gradient_accumulation_steps` the stage derives the accumulation from the number of processes
it runs with, so one recipe trains the same way on one GPU and on 64; with it, the product must match or the stage
stops before training (`batch_plan`).

The process group. `process_group()` makes Accelerate's process state the way the launch needs it on this machine,
so that every process of a launch joins one group, on the CPU too. Stopping cleanly when preempted:
pipeline/preemption.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from pathlib import Path

from pipeline import log
from pipeline.cli import PipelineError, first_line

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- launch configs


@dataclasses.dataclass
class Launch:
    """How a stage is launched: processes and the way model state is spread over them."""

    config: str | None = None        # the Accelerate config file, None: plain `python`
    num_processes: int = 1           # all processes, over all machines
    num_machines: int = 1
    distributed_type: str = "NO"     # NO, MULTI_GPU (DDP), FSDP, DEEPSPEED
    zero_stage: int = 0              # DeepSpeed ZeRO stage (0: not DeepSpeed)
    offload_optimizer: bool = False  # optimizer state (and fp32 master weights) in CPU memory
    offload_params: bool = False     # weights in CPU memory between uses (ZeRO-3 / FSDP)
    fsdp_version: int = 0            # 0: not FSDP
    save_full_model: bool = True     # the checkpoint a stage saves is one full model (ZeRO-3: gather on save)
    reduce_buffer: int = 500_000_000  # ZeRO-1/2's gradient-reduction buffer(s), elements (DeepSpeed's default bucket)
    deepspeed_file: str | None = None  # the DeepSpeed config file it names (deepspeed_config_file), None: none

    def describe(self) -> str:
        if self.distributed_type == "DEEPSPEED":
            how = f"DeepSpeed ZeRO-{self.zero_stage}"
            offload = [w for w, on in (("optimizer", self.offload_optimizer), ("weights", self.offload_params)) if on]
            if offload:
                how += f" (offload {' and '.join(offload)} to CPU)"
        elif self.fsdp_version:
            how = f"FSDP{self.fsdp_version}" + (" (offload weights to CPU)" if self.offload_params else "")
        elif self.num_processes > 1:
            how = "DDP"
        else:
            how = "no sharding"
        where = f"{self.num_processes} process{'es' if self.num_processes != 1 else ''}"
        if self.num_machines > 1:
            where += f" on {self.num_machines} machines"
        config = Path(self.config).name if self.config else "plain python"
        return f"{how}, {where} ({config})"


def resolve_path(path: str | Path) -> Path:
    """A config path as given, or relative to the repository (so `launch/...` works from any directory)."""
    p = Path(path).expanduser()
    if not p.is_absolute() and not p.exists() and (REPO / p).exists():
        return REPO / p
    return p


def deepspeed_zero(ds_file: Path) -> dict:
    """The `zero_optimization` section of a DeepSpeed config file ({} without one); one line naming the file when it
    is not a JSON object with an object there."""
    try:
        config = json.loads(ds_file.read_text())
    except json.JSONDecodeError as err:
        raise PipelineError(f"{ds_file}: invalid JSON ({err.msg}, line {err.lineno})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PipelineError(f"{ds_file}: cannot read the DeepSpeed config ({err})") from None
    zero = config.get("zero_optimization", {}) if isinstance(config, dict) else None
    if not isinstance(zero, dict):
        raise PipelineError(f"{ds_file}: not a DeepSpeed config (a JSON object whose zero_optimization is an object)")
    if zero.get("stage", 0) not in (0, 1, 2, 3) or isinstance(zero.get("stage"), bool):
        raise PipelineError(f"{ds_file}: zero_optimization.stage must be 0, 1, 2 or 3, got {zero['stage']!r}")
    for key in ("offload_optimizer", "offload_param"):
        if not isinstance(zero.get(key) or {}, dict):
            raise PipelineError(f"{ds_file}: zero_optimization.{key} must be an object ({{\"device\": \"cpu\"}}), "
                                f"got {zero[key]!r}")
    return zero


def _truthy(v) -> bool:
    return str(v).lower() in ("1", "true", "yes", "on")


def _launch_int(cfg: dict, key: str, p: Path, default: int, allowed=None, prefix: str = "") -> int:
    """A whole-number key of an Accelerate config (default when absent), as one line naming the file when not."""
    value = cfg.get(key)
    if value is None:
        return default
    number = int(value) if isinstance(value, str) and value.strip().isdigit() else value
    if isinstance(number, bool) or not isinstance(number, int) or (number not in allowed if allowed else number < 1):
        want = f"one of {', '.join(map(str, allowed))}" if allowed else "a whole number of 1 or more"
        raise PipelineError(f"{p}: {prefix}{key} must be {want}, got {value!r}")
    return number


def _launch_section(cfg: dict, key: str, p: Path) -> dict:
    section = cfg.get(key) or {}
    if not isinstance(section, dict):
        raise PipelineError(f"{p}: {key} must be a mapping of keys, got {section!r}")
    return section


def read_launch(path, num_processes: int | None = None, num_machines: int | None = None) -> Launch:
    """Read an Accelerate config file (YAML or JSON); flags given on the command line win over the file."""
    import yaml

    p = resolve_path(path)
    if not p.is_file():
        raise PipelineError(f"launch config '{path}' not found")
    try:
        cfg = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise PipelineError(f"{p}: YAML syntax error: {first_line(err)}") from None
    if not isinstance(cfg, dict):
        raise PipelineError(f"{p}: an Accelerate config is a mapping of keys")
    dist = str(cfg.get("distributed_type", "NO")).upper()
    from accelerate.utils import DistributedType

    if dist not in DistributedType.__members__:
        raise PipelineError(f"{p}: distributed_type: {cfg['distributed_type']!r} is not one of Accelerate's "
                            f"({', '.join(DistributedType.__members__)})")
    launch = Launch(config=str(p), num_processes=num_processes or _launch_int(cfg, "num_processes", p, 1),
                    num_machines=num_machines or _launch_int(cfg, "num_machines", p, 1), distributed_type=dist)
    if dist == "DEEPSPEED":
        ds = _launch_section(cfg, "deepspeed_config", p)
        zero = {"stage": _launch_int(ds, "zero_stage", p, 2, (0, 1, 2, 3), "deepspeed_config."),
                "offload_optimizer": {"device": ds.get("offload_optimizer_device", "none")},
                "offload_param": {"device": ds.get("offload_param_device", "none")},
                "stage3_gather_16bit_weights_on_model_save": _truthy(ds.get("zero3_save_16bit_model", False))}
        if ds.get("deepspeed_config_file"):
            ds_file = resolve_path(str(ds["deepspeed_config_file"]))
            if not ds_file.is_file():
                raise PipelineError(f"{p}: deepspeed_config_file '{ds['deepspeed_config_file']}' not found")
            zero = deepspeed_zero(ds_file)
            launch.deepspeed_file = str(ds_file)
        launch.zero_stage = int(zero.get("stage", 0))
        launch.offload_optimizer = (zero.get("offload_optimizer") or {}).get("device", "none") not in ("none", None)
        launch.offload_params = (zero.get("offload_param") or {}).get("device", "none") not in ("none", None)
        launch.save_full_model = launch.zero_stage < 3 or _truthy(
            zero.get("stage3_gather_16bit_weights_on_model_save", False))
        bucket = zero.get("reduce_bucket_size")  # `auto`: a trainer sizes it from the model; the image stages keep 5e8
        if isinstance(bucket, (int, float)) and not isinstance(bucket, bool) and bucket > 0:
            launch.reduce_buffer = int(bucket)
        launch.reduce_buffer *= 2 if _truthy(zero.get("overlap_comm", False)) else 1  # a second buffer to overlap
    elif dist == "FSDP":
        fsdp = _launch_section(cfg, "fsdp_config", p)
        launch.fsdp_version = _launch_int(fsdp, "fsdp_version", p, 1, (1, 2), "fsdp_config.")
        launch.offload_params = _truthy(fsdp.get("fsdp_offload_params", False))
        launch.save_full_model = str(fsdp.get("fsdp_state_dict_type", "FULL_STATE_DICT")).upper() \
            .replace("STATEDICTTYPE.", "") == "FULL_STATE_DICT"
    return launch


def launch_from_command(launcher: str | None) -> Launch:
    """The launch a `run.launcher` prefix gives: `accelerate launch [--config_file X] [--num_processes N]
    [--num_machines M] ...` or `torchrun --nproc_per_node N [--nnodes M]`; none: plain python, one process."""
    if not launcher:
        return Launch()
    words = shlex.split(launcher)

    def flag(*names):
        for i, w in enumerate(words):
            for name in names:
                if w == name and i + 1 < len(words):
                    return words[i + 1]
                if w.startswith(name + "="):
                    return w.split("=", 1)[1]
        return None

    try:
        machines = int(flag("--num_machines", "--nnodes") or 1)
        per_node = flag("--nproc_per_node", "--nproc-per-node")
        procs = int(per_node) * machines if per_node else flag("--num_processes")
        procs = int(procs) if procs else None
    except ValueError:
        raise PipelineError(f"run.launcher '{launcher}': process counts must be numbers") from None
    config = flag("--config_file")
    if config:
        return read_launch(config, procs, machines if flag("--num_machines", "--nnodes") else None)
    n = procs or 1
    return Launch(num_processes=n, num_machines=machines, distributed_type="MULTI_GPU" if n > 1 else "NO")


def launch_here() -> dict:
    """The launch this process runs in, for the manifest."""
    from accelerate.state import AcceleratorState, PartialState

    # the trainer's accelerator state (FSDP, DeepSpeed) once a trainer exists, else the process group's
    state = AcceleratorState() if AcceleratorState._shared_state else PartialState()
    out = {"distributed_type": str(state.distributed_type).split(".")[-1], "num_processes": state.num_processes,
           "backend": PartialState().backend}
    if out["distributed_type"] == "DEEPSPEED":
        plugin = getattr(state, "deepspeed_plugin", None)
        out["zero_stage"] = plugin.zero_stage if plugin is not None else \
            int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0") or 0)
        if os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"):
            out["deepspeed_config_file"] = os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"]
    elif out["distributed_type"] == "FSDP":
        out["fsdp_version"] = state.fsdp_plugin.fsdp_version if getattr(state, "fsdp_plugin", None) else 1
    slurm = {k: os.environ[v] for k, v in (("job_id", "SLURM_JOB_ID"), ("restart_count", "SLURM_RESTART_COUNT"),
                                           ("nodes", "SLURM_JOB_NODELIST"), ("partition", "SLURM_JOB_PARTITION"))
             if v in os.environ}
    if slurm:
        out["slurm"] = slurm
    return out


def cpu_bf16_native() -> bool:
    """Whether this CPU computes bf16 matmuls in hardware: x86's AVX512-BF16 or AMX, an Arm CPU's BF16 extension.
    Elsewhere torch emulates bf16, far slower than fp32 (an AVX2-only AMD EPYC: 1.3 against 147 GFLOP/s)."""
    import platform

    import torch

    if any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                  "_is_amx_tile_supported")):
        return True
    return platform.machine().lower() in ("arm64", "aarch64") and torch.ops.mkldnn._is_mkldnn_bf16_supported()


# the devices Accelerate's PartialState.default_device tries, in its order (an NPU before CUDA: torch_npu's
# transfer_to_npu makes torch.cuda answer for the NPU)
ACCELERATOR_ORDER = ("mps", "mlu", "sdaa", "musa", "npu", "hpu", "cuda", "xpu", "neuron")


def launched_with_deepspeed() -> bool:  # this process was started by `accelerate launch` with a DeepSpeed config
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def process_group(cpu: bool = False):
    """Accelerate's process state for this process, made the way the launch needs it here (once; then shared).

    Without an accelerator (accelerator_here), processes started by `accelerate launch --multi_gpu` join as CPU
    workers (gloo) only with cpu=True; a plain PartialState() would leave each of them alone, all writing as the main
    process. Under DeepSpeed without one, Accelerate picks no backend and again counts each process alone: name gloo.
    `cpu` (a stage's use_cpu) on a machine with an accelerator: the state is made on the CPU, and one made on the
    accelerator before is made anew, as a TrainingArguments does for its use_cpu; an Accelerator keeps the state it
    finds, whatever its own `cpu`. StageRun asks from the start, so that a launch's processes join over gloo, not a
    GPU backend that carries no CPU tensors. (recipe.trainer_config gives a TrainingArguments use_cpu where needed.)"""
    import torch
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    rejoin = {}  # how a state made anew joins the processes again
    if PartialState._shared_state:
        if not cpu or PartialState().device.type == "cpu":
            return PartialState()
        AcceleratorState._reset_state(reset_partial_state=True)
        # the group that state joined (NCCL on a GPU) outlives it, and a new state joins a running group as it finds
        # it: every process runs this, so all leave it here, and the CPU state joins them anew over gloo
        if torch.distributed.is_initialized():
            # the new group joins under a fresh prefix of the launch's store: that store (torchrun's) keeps the old
            # group's keys, and a new group under them read a process's old address before it had left (2 processes
            # failed or hung so)
            old_store = torch.distributed.distributed_c10d._get_default_store()
            rejoin = {"store": torch.distributed.PrefixStore("use_cpu/", old_store)}
            torch.distributed.destroy_process_group()
    deepspeed, accelerator = launched_with_deepspeed(), accelerator_here()
    if not accelerator:  # `cpu` changes nothing here: the processes are on the CPU either way
        return PartialState(cpu=not deepspeed, **({"backend": "gloo"} if deepspeed else {}))
    return PartialState(cpu=cpu, **rejoin)


def training_device() -> str:
    """The device type Accelerate (and so a Trainer) trains on here unless told to use the CPU: the first of
    ACCELERATOR_ORDER it finds, as its PartialState.default_device picks, else "cpu". Every stage asks this (not
    torch.cuda alone), so that none trains on the CPU of a machine whose XPU, NPU or MPS device the others use. In a
    launch of several processes only a device Accelerate joins them over counts (its _prepare_backend: not MPS, an
    XPU only with XCCL); without one they train on the CPU, over gloo, as one group, not each alone."""
    import torch
    from accelerate.utils import imports

    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    for device in ACCELERATOR_ORDER:  # a check this Accelerate version lacks: a device it cannot train on either
        available = torch.cuda.is_available if device == "cuda" else getattr(imports, f"is_{device}_available", None)
        if available is None or not available():
            continue
        if several and (device == "mps" or device == "xpu" and not getattr(imports, "is_xccl_available",
                                                                          lambda: False)()):
            continue
        return device
    return "cpu"


def accelerator_here() -> bool:
    """Whether this machine has an accelerator to train on (else every stage trains on the CPU)."""
    return training_device() != "cpu"


def processes_without_accelerator() -> int:
    """The processes of a launch of several on a machine without an accelerator (accelerator_here), else 0: they
    train on the CPU (over gloo), whatever a stage's `use_cpu` says, as one process does there."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    return 0 if processes < 2 or accelerator_here() else processes


def cpu_processes_line() -> str | None:
    """What a stage of such a launch says (from the launch alone a GPU config cannot be told from cpu2.yaml here:
    Accelerate starts both the same way on a machine without a GPU)."""
    processes = processes_without_accelerator()
    return f"{processes} processes and no GPU here: they train on the CPU, over gloo" if processes else None


def launched_zero() -> tuple[int, bool]:
    """(ZeRO stage, whether ZeRO-3 gathers a 16-bit model on save) of this process's DeepSpeed launch: its config
    file's, else what Accelerate's launcher put in the environment."""
    env = os.environ
    ds_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if ds_file and ds_file != "none":
        zero = deepspeed_zero(resolve_path(ds_file))
        return int(zero.get("stage", 0)), _truthy(zero.get("stage3_gather_16bit_weights_on_model_save"))
    return (int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2") or 2),
            _truthy(env.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "false")))


def data_parallel_under_deepspeed(stage: str, zero_stage: int, mixed_precision: str) -> str | None:
    """Why an image stage runs data-parallel (DDP) under this DeepSpeed launch, None when it runs with DeepSpeed.
    Under ZeRO-1/2 their own loops hand DeepSpeed the trained modules as one (diffusion_train.py), each process
    keeping whole weights for the EMA and the safetensors checkpoints; ZeRO-3 would have to gather them for both, and
    fp16 needs the loss scaling that Accelerate's DDP gives (DeepSpeed's own fp16 would also make the weights fp16)."""
    if stage not in ("diffusion", "diffusion_dpo"):
        return None
    if zero_stage == 3:
        return "ZeRO-3"
    return "and fp16 mixed precision" if mixed_precision == "fp16" else None


def leave_deepspeed(stage: str, mixed_precision: str) -> str | None:
    """Before the process group is made, a stage that cannot run under this DeepSpeed launch switches to DDP; the
    line to log."""
    why = launched_with_deepspeed() and data_parallel_under_deepspeed(stage, launched_zero()[0], mixed_precision)
    if not why:
        return None
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "false"
    return data_parallel_line(stage, why)


def data_parallel_line(stage: str, why: str) -> str:  # what the stage and `--check` say of such a stage
    return (f"launched with DeepSpeed {why}: {stage} runs data-parallel (DDP) over the same processes, each holding "
            f"whole models (ZeRO-1/2 without fp16 run with DeepSpeed: README \"Image models\")")


def check_environment() -> None:
    """Fail before any work when the launch cannot produce a loadable model; fix up relative config paths."""
    env = os.environ
    ds_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if ds_file and ds_file != "none" and not Path(ds_file).exists():
        found = resolve_path(ds_file)
        if not found.exists():
            raise PipelineError(f"DeepSpeed config file '{ds_file}' not found (run from the repository root, or "
                                f"give an absolute deepspeed_config_file)")
        env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(found)
    if not launched_with_deepspeed():
        return
    stage, gather = launched_zero()
    if stage == 3 and not gather:
        raise PipelineError("DeepSpeed ZeRO-3 without zero3_save_16bit_model (stage3_gather_16bit_weights_on_"
                            "model_save) saves only sharded optimizer files, not a model later stages can load: "
                            "use launch/accelerate/zero3.yaml or set it to true")


# ---------------------------------------------------------------------------------------------- global batch


@dataclasses.dataclass
class BatchPlan:
    per_device: int
    accumulation: int
    num_processes: int
    expected: int | None       # the recipe's global_batch_size, None: not set
    derived: bool = False      # accumulation computed from global_batch_size

    @property
    def global_batch(self) -> int:
        return self.per_device * self.accumulation * self.num_processes

    def describe(self) -> str:
        text = (f"{self.num_processes} process{'es' if self.num_processes != 1 else ''} x {self.per_device} per "
                f"device x {self.accumulation} accumulation{' (derived)' if self.derived else ''} = "
                f"{self.global_batch} per optimizer step")
        if self.expected is None:
            text += " (no global_batch_size set: it changes with the number of processes)"
        return text


def batch_plan(stage: str, per_device: int, accumulation: int | None, num_processes: int,
               expected: int | None) -> BatchPlan:
    """Check (or derive the accumulation for) processes x per-device batch x accumulation = global_batch_size.

    `accumulation` None: the recipe did not set gradient_accumulation_steps, so it is derived from `expected`."""
    if expected is None:
        return BatchPlan(per_device, accumulation or 1, num_processes, None)
    per_step = per_device * num_processes
    if accumulation is None:
        if expected % per_step:
            raise PipelineError(
                f"{stage}.global_batch_size {expected} is not a multiple of {num_processes} process(es) x "
                f"{per_device} per_device_train_batch_size = {per_step}: change per_device_train_batch_size or "
                f"the number of processes")
        return BatchPlan(per_device, expected // per_step, num_processes, expected, derived=True)
    plan = BatchPlan(per_device, accumulation, num_processes, expected)
    if plan.global_batch != expected:
        hint = (f"; drop gradient_accumulation_steps to derive it ({expected // per_step})"
                if expected % per_step == 0 else "")
        raise PipelineError(f"{stage}.global_batch_size is {expected}, but {plan.describe()}{hint}")
    return plan
