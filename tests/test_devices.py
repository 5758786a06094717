"""Device questions asked of the device a model is on, not of torch.cuda (pipeline/devices.py): bitsandbytes' CPU
kernel checks, the random state a block forks, and where a quantized model loads. There is no GPU here: the meta
device stands for an accelerator, torch.random.fork_rng is recorded rather than run for one, and Accelerate's default
device is pretended."""

import contextlib

import pytest
import torch
from trl import get_peft_config  # noqa: F401 (bitsandbytes, imported before a test pretends CUDA is here)

from conftest import tiny_recipe
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


@pytest.fixture
def process_state():
    """Accelerate's process state as it was before the test (a stage's TrainingArguments remake it)."""
    from accelerate.state import AcceleratorState, PartialState

    saved = [(state, dict(state._shared_state)) for state in (PartialState, AcceleratorState)]
    yield
    for state, values in saved:
        state._shared_state.clear()
        state._shared_state.update(values)


@pytest.mark.parametrize("stage", ["sft", "reward"])
@pytest.mark.parametrize("accelerator, use_cpu", [(True, True), (True, False), (False, True)],
                         ids=["gpu-use_cpu", "gpu", "no-gpu"])
def test_a_quantized_model_loads_where_its_stage_trains(tmp_path, monkeypatch, process_state, stage, accelerator,
                                                        use_cpu):
    """transformers places a bitsandbytes model itself, on the accelerator where there is one, whatever the trainer's
    use_cpu: a QLoRA stage with use_cpu on a GPU machine had its model on the GPU and its trainer on the CPU. It loads
    on the CPU where the process state the stage's trainer config made says so; elsewhere from_pretrained gets no
    device_map, as before (transformers' choice: the GPU, or the CPU of a machine without one). The accelerator is
    pretended (Accelerate's default device, cluster.accelerator_here); from_pretrained records what reaches it."""
    import accelerate
    import transformers

    from pipeline import cluster, reward_model
    from pipeline.recipe import load_recipe

    monkeypatch.setattr(accelerate.state.PartialState, "default_device",
                        property(lambda _: torch.device("cuda" if accelerator else "cpu")))
    monkeypatch.setattr(cluster, "accelerator_here", lambda: accelerator)
    loaded = []
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModelForSequenceClassification):
        monkeypatch.setattr(auto, "from_pretrained", classmethod(lambda cls, path, **kw: loaded.append(kw)))
    section = {"use_cpu": use_cpu, "bf16": False, "use_peft": True, "load_in_4bit": True}
    recipe = load_recipe(tiny_recipe(tmp_path, **{stage: section}), [])
    recipe.trainer_config(stage, output_dir=str(tmp_path / stage))  # as the stage makes it, before loading its model
    if stage == "reward":
        reward_model.load_reward_model(recipe, str(tmp_path), recipe.peft_values(stage))
    else:
        models.load_causal_lm(recipe, str(tmp_path), peft_values=recipe.peft_values(stage))
    assert loaded[0]["quantization_config"].load_in_4bit
    assert loaded[0].get("device_map") == ({"": "cpu"} if accelerator and use_cpu else None)


@pytest.mark.parametrize("before", [False, True], ids=["made-by-the-stage", "made-before"])
@pytest.mark.parametrize("use_cpu", [True, False], ids=["use_cpu", "gpu"])
def test_ppo_trains_where_use_cpu_says(tmp_path, monkeypatch, process_state, use_cpu, before):
    """`ppo.use_cpu: true` on a machine with a GPU trained on the GPU: StageRun made Accelerate's process state on it,
    and PPO's Accelerator(cpu=True) keeps the state it finds. StageRun now makes it on the CPU for a stage's use_cpu
    from the start (cluster.process_group: a launch's processes join over gloo), and makes anew a state made on the
    accelerator before it. The accelerator is pretended; PPOTrainer stops once its Accelerator is built (at
    ppo_models.load_whole)."""
    import accelerate
    from accelerate.state import AcceleratorState

    from pipeline import cluster, ppo_models, runs
    from pipeline.ppo_trainer import PPOTrainer
    from pipeline.recipe import load_recipe

    monkeypatch.setattr(accelerate.state.PartialState, "default_device", property(lambda _: torch.device("cuda")))
    monkeypatch.setattr(cluster, "accelerator_here", lambda: True)
    monkeypatch.setattr(runs, "stage_inputs", lambda recipe, stage: {"checkpoints": {}})  # no upstream stages here
    monkeypatch.chdir(tmp_path)

    class Built(Exception):
        pass

    def built(accelerator):
        raise Built(accelerator)

    monkeypatch.setattr(ppo_models, "load_whole", built)
    recipe = load_recipe(tiny_recipe(tmp_path, ppo={"use_cpu": use_cpu}), [])
    cfg = recipe.trainer_config("ppo")
    AcceleratorState._reset_state(reset_partial_state=True)  # no state yet (the fixture puts back the one there was)
    if before:
        cluster.process_group()  # as a trainer stage's global_batch_size check can, before its StageRun
    resets, reset = [], AcceleratorState._reset_state
    monkeypatch.setattr(AcceleratorState, "_reset_state", staticmethod(lambda **kw: resets.append(kw) or reset(**kw)))
    with pytest.raises(Built) as accelerator:
        PPOTrainer(recipe, runs.StageRun(recipe, "ppo"), cfg, None, None, None, None, None)
    assert accelerator.value.args[0].device.type == ("cpu" if use_cpu else "cuda")
    assert len(resets) == (before and use_cpu)  # made anew only when made on the accelerator before StageRun


@pytest.fixture
def running_group(tmp_path):
    """A process group of one already running (gloo here, standing for a launch's NCCL one), and none after the test."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield dist.group.WORLD
    if dist.is_initialized():
        dist.destroy_process_group()


def test_a_state_made_anew_on_the_cpu_joins_a_new_gloo_group(monkeypatch, process_state, running_group):
    """process_group(cpu=True) made anew a state made on the accelerator, but not the process group that state had
    joined: a new PartialState(cpu=True) finds a group running and joins it as it is, so a launch's processes stayed
    on NCCL, which carries no CPU tensors. The old group is left first now, and the state joins a new one over gloo,
    as Accelerate does for the CPU. One process, in the environment `accelerate launch` gives it; the accelerator is
    pretended."""
    import socket

    import accelerate
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    from pipeline import cluster

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    launch = {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(port)}
    for key, value in launch.items():  # Accelerate writes some of them: monkeypatch puts them back
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(accelerate.state.PartialState, "default_device", property(lambda _: torch.device("cuda")))
    monkeypatch.setattr(cluster, "accelerator_here", lambda: True)
    AcceleratorState._reset_state(reset_partial_state=True)  # no state yet (the fixture puts back the one there was)
    assert cluster.process_group().device.type == "cuda"  # made on the accelerator, with the group running
    state = cluster.process_group(cpu=True)
    assert (state.device.type, state.distributed_type, state.backend) == ("cpu", DistributedType.MULTI_CPU, "gloo")
    assert torch.distributed.is_initialized() and torch.distributed.get_backend() == "gloo"
    assert torch.distributed.group.WORLD is not running_group  # the old one left, a new one joined
