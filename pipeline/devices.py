"""Questions about the torch device a model is on, asked of that device, and about the one this process trains on,
asked of Accelerate's process state (not of torch.cuda: an XPU, NPU or MPS machine, or a stage that trains on the CPU
of a GPU machine, would get CUDA's answer)."""

from __future__ import annotations

import torch


def fork_random_state(device):
    """torch.random.fork_rng for the CPU and `device` (a torch.device or its name): the block's draws leave the global
    random state of both as it was. A device other than the CPU forks its own generator (an XPU's or MPS device's
    stream too, not CUDA's alone)."""
    device = torch.device(device)
    return torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type)


def weight_on_cpu(module) -> bool:
    """Whether a module's own weight is in CPU memory: where a bitsandbytes layer runs, whatever the stage's use_cpu
    (transformers places a quantized model when loading it, on an accelerator where there is one; no trainer moves
    it)."""
    weight = getattr(module, "weight", None)
    return weight is not None and weight.device.type == "cpu"


def quantized_device_map() -> dict | None:
    """from_pretrained's device_map for a bitsandbytes model. transformers places one itself, on the accelerator where
    there is one, whatever the trainer's use_cpu: a process that trains on the CPU of such a machine
    (cluster.accelerator_here) loads it on the CPU, where its trainer looks for it. Where the process trains is
    Accelerate's process state, which the stage's TrainingArguments (its use_cpu) or Accelerator made before the stage
    loads its model. None: transformers' own choice, right elsewhere (the CPU without an accelerator, the accelerator
    for a stage that trains on it)."""
    from accelerate import PartialState

    from pipeline import cluster

    on_cpu = bool(PartialState._shared_state) and PartialState().device.type == "cpu"
    return {"": "cpu"} if on_cpu and cluster.accelerator_here() else None
