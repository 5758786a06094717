"""Questions about the torch device a model is on, asked of that device (not of torch.cuda: an XPU, NPU or MPS
machine, or a stage that trains on the CPU of a GPU machine, would get CUDA's answer)."""

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
