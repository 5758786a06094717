"""Device questions asked of the device a model is on, not of torch.cuda (pipeline/devices.py): bitsandbytes' CPU
kernel checks, and the random state a block forks. There is no GPU here: the meta device stands for an accelerator,
and torch.random.fork_rng is recorded rather than run for one."""

import contextlib

import pytest
import torch
from trl import get_peft_config  # noqa: F401 (bitsandbytes, imported before a test pretends CUDA is here)

from pipeline import devices, models
from pipeline.cli import PipelineError


class Linear8bitLt(torch.nn.Linear):  # named as bitsandbytes' 8-bit layer, which the DoRA check looks for
    pass


def quantized(device: str, kind: str) -> torch.nn.Module:
    """A model of one layer `proj` standing for a bitsandbytes one: a 4-bit layer whose 48 outputs the packed CPU
    kernel (blocks of 32) cannot run, or an 8-bit layer."""
    model = torch.nn.Module()
    model.proj = (Linear8bitLt if kind == "8bit" else torch.nn.Linear)(32, 48, device=device)
    model.proj.support_avx512bf16_for_cpu = kind == "4bit"  # what bitsandbytes sets on a CPU with AVX512-BF16
    return model


CHECKS = {"4bit": ({"load_in_4bit": True}, "load_in_4bit: on this CPU .* proj has 48"),
          "8bit": ({"load_in_8bit": True, "use_dora": True}, "use_dora with load_in_8bit does not train on a CPU")}


@pytest.mark.parametrize("kind", CHECKS)
@pytest.mark.parametrize("cuda", [True, False], ids=["cuda", "no-cuda"])
def test_bitsandbytes_cpu_checks_ask_where_the_quantized_layers_are(monkeypatch, kind, cuda):
    """A quantized model runs where transformers placed it when loading: its layers on the CPU are refused what
    bitsandbytes' CPU kernels cannot train, though the machine has a CUDA GPU (a stage that loaded it there); the
    same layers on an accelerator (meta stands for one) are not, though torch.cuda has none (an XPU or NPU)."""
    values, refusal = CHECKS[kind]
    values = {"use_peft": True, "lora_target_modules": ["proj"], **values}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    with pytest.raises(PipelineError, match=refusal):
        models.peft_config(values, model=quantized("cpu", kind))
    assert models.peft_config(values, model=quantized("meta", kind)) is not None


def recorded_forks(monkeypatch) -> list[dict]:
    forks = []

    @contextlib.contextmanager
    def fork_rng(**kw):
        forks.append(kw)
        yield

    monkeypatch.setattr(torch.random, "fork_rng", fork_rng)
    return forks


def test_fork_random_state_forks_the_cpu_and_the_given_device(monkeypatch):
    """The CPU's generator is as it was after the block; another device's generator is forked by its own type."""
    torch.manual_seed(3)
    before = torch.get_rng_state()
    with devices.fork_random_state("cpu"):
        torch.rand(16)
    assert torch.equal(torch.get_rng_state(), before)

    forks = recorded_forks(monkeypatch)
    with devices.fork_random_state(torch.device("xpu", 1)):
        pass
    assert forks == [{"devices": [torch.device("xpu", 1)], "device_type": "xpu"}]
