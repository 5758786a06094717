"""`generation.backend: vllm` (pipeline/vllm_engine.py). On any machine: the recipe section's checks, the clear
error where vLLM cannot run, and the callers' engine paths (eval's `generate`, PPO's `sample_replies`) fed by a
stand-in engine that samples with `model.generate` one prompt at a time, so their outputs must equal the `hf` paths'.
With vllm installed and a CUDA GPU: the real engine against `model.generate`, weight pushes, and the ppo and eval
stages end to end with vLLM (skipped elsewhere, with the reason printed)."""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import REPO, run_cli, tiny_recipe
from pipeline import ppo_rollout, vllm_engine
from pipeline.cli import PipelineError
from pipeline.generation import generate, stop_ids
from pipeline.recipe import load_recipe
from pipeline.tokenizer import train_tokenizer

HAS_VLLM = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="generation.backend: vllm needs the vllm package and a CUDA GPU; "
                                                     "this machine lacks one of them")


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    words = "the answer is what plus two three five seven number please sum of larger smaller".split()
    return train_tokenizer([" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)], vocab_size=300)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.5)  # peaked next-token distributions: greedy has no near-ties
    m = LlamaForCausalLM(config).eval()
    m.generation_config.pad_token_id = tok.pad_token_id
    return m


class GenerateEngine:
    """Stands in for vllm_engine.Engine: `sample` with the engine's contract (prompt-major, n per prompt, new ids up
    to and including end-of-turn, no padding), computed by `model.generate` on each prompt alone."""

    def __init__(self, model, tokenizer):
        self.model, self.calls = model, []

    def sample(self, prompt_ids, *, stops, max_new_tokens, do_sample, temperature=1.0, top_p=1.0, n=1):
        self.calls.append(dict(prompts=len(prompt_ids), n=n, do_sample=do_sample, max_new_tokens=max_new_tokens))
        out = []
        for ids in prompt_ids:
            for _ in range(n):
                new = self.model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                          eos_token_id=stops, pad_token_id=stops[0])[0, len(ids):].tolist()
                end = next((k for k, t in enumerate(new) if t in stops), None)
                out.append(new if end is None else new[:end + 1])
        return out


PROMPTS = ["what is two plus three", "which number is larger", "sum of five and seven please", "the answer"]


def test_generate_with_an_engine_gives_the_replies_of_model_generate(model, tok):
    engine = GenerateEngine(model, tok)
    plain = generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=3, progress=False)
    routed = generate(model, tok, PROMPTS, max_new_tokens=12, progress=False, engine=engine)
    assert engine.calls == [dict(prompts=len(PROMPTS), n=1, do_sample=False, max_new_tokens=12)]  # one call, all
    assert [[(r.text, r.ended, r.n_tokens, r.token_ids) for r in rs] for rs in routed] == \
        [[(r.text, r.ended, r.n_tokens, r.token_ids) for r in rs] for rs in plain]
    assert len({rs[0].text for rs in routed}) > 1  # the prompts' replies differ: their order is checked


class Labelled:
    """An engine whose k-th sample for prompt i is the ids [10 + i, 20 + k], then end-of-turn unless i is odd."""

    def __init__(self, eos):
        self.eos = eos

    def sample(self, prompt_ids, *, stops, max_new_tokens, do_sample, temperature=1.0, top_p=1.0, n=1):
        return [[10 + i, 20 + k] + ([] if i % 2 else [self.eos]) for i in range(len(prompt_ids)) for k in range(n)]


def test_generate_groups_an_engines_samples_by_prompt(model, tok):
    routed = generate(model, tok, PROMPTS, max_new_tokens=12, do_sample=True, num_samples=3, progress=False,
                      engine=Labelled(tok.eos_token_id))
    assert [[r.token_ids for r in rs] for rs in routed] == [[[10 + i, 20 + k] for k in range(3)]
                                                             for i in range(len(PROMPTS))]
    assert [[r.ended for r in rs] for rs in routed] == [[i % 2 == 0] * 3 for i in range(len(PROMPTS))]
    assert routed[1][2].text == tok.decode([11, 22], skip_special_tokens=True).strip()


class Scripted:
    """An engine whose replies are given: row i's reply is scripts[i] (cut at max_new_tokens)."""

    def __init__(self, scripts):
        self.scripts = scripts

    def sample(self, prompt_ids, *, stops, max_new_tokens, do_sample, temperature=1.0, top_p=1.0, n=1):
        assert do_sample and n == 1
        return [s[:max_new_tokens] for s in self.scripts]


def test_sample_replies_pads_the_engines_replies_like_generate(tok):
    eos, pad = tok.eos_token_id, tok.pad_token_id
    cfg = type("Cfg", (), {"max_new_tokens": 4, "temperature": 1.0, "top_p": 1.0})()
    prompts = [[5, 6, 7], [8, 9]]
    batch = ppo_rollout.sample_replies(None, tok, prompts, [0, 1], cfg, "cpu",
                                       engine=Scripted([[11, eos], [12, 13, 14, 15]]))
    assert batch.replies.tolist() == [[11, eos, pad, pad], [12, 13, 14, 15]]
    assert batch.mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch.ended.tolist() == [True, False]
    assert batch.context_length == 3
    assert batch.sequences.tolist() == [[5, 6, 7, 11, eos, pad, pad], [pad, 8, 9, 12, 13, 14, 15]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1, 1]]


class VLLMStandIn:
    """Stands in for vLLM's LLM under TRL's real VLLMGeneration, keeping vLLM's stop rule: the ids of the tokenizer and
    generation_config the engine was built from are eos (unless the call's SamplingParams say ignore_eos), beside
    the call's stop_token_ids. Each prompt's completion is `script`, cut after the first token it stops at."""

    def __init__(self, trl, script):
        own = trl.model.generation_config.eos_token_id
        self.built_eos = {trl.processing_class.eos_token_id, *(own if isinstance(own, list) else [own])}
        self.script, self.params = script, []

    def generate(self, prompts, sampling_params, use_tqdm):
        from types import SimpleNamespace

        kw = sampling_params.kwargs
        self.params.append(kw)
        stops = set(kw.get("stop_token_ids") or ()) | (set() if kw.get("ignore_eos") else self.built_eos)
        end = next((k for k, t in enumerate(self.script) if t in stops), len(self.script) - 1)
        return [SimpleNamespace(prompt_token_ids=p["prompt_token_ids"],
                                outputs=[SimpleNamespace(token_ids=self.script[:end + 1], logprobs=None)])
                for p in prompts]


class RecordedParams:
    """vllm.SamplingParams as TRL builds it: the keyword arguments."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs


def test_an_eval_engine_stops_each_checkpoint_at_its_own_stop_ids_only(tmp_path, monkeypatch):
    """eval loads every checkpoint into the engine built from the first: vLLM stopped a later checkpoint at the first's
    eos too (the engine's tokenizer and generation_config), cutting replies where that token is an ordinary one. Each
    call's SamplingParams carry the checkpoint's stop ids and ignore_eos, through TRL's real VLLMGeneration."""
    import copy

    from trl.generation import vllm_generation

    from test_evaluate import gemma_like

    script = [8, 1, 10, 0, 12]  # <eos> (1) in the middle, then <end_of_turn> (0)
    monkeypatch.setattr(vllm_generation, "SamplingParams", RecordedParams, raising=False)
    monkeypatch.setattr(vllm_generation.VLLMGeneration, "_init_vllm",
                        lambda trl: setattr(trl, "llm", VLLMStandIn(trl, script)))
    monkeypatch.setattr(vllm_generation.VLLMGeneration, "sync_weights", lambda trl: None)
    engines = vllm_engine.EvalEngines(load_recipe(tiny_recipe(tmp_path), ["generation.backend=vllm"]))
    model, gemma = gemma_like(eos_list=False)  # eos <eos> (1), turns end with <end_of_turn> (0): stops [1, 0]
    later, own_eos = copy.deepcopy(model), copy.deepcopy(gemma)  # a checkpoint whose eos is <end_of_turn>: stops [0]
    own_eos.eos_token = "<end_of_turn>"
    later.generation_config.eos_token_id = later.config.eos_token_id = 0
    replies = [generate(m, tokenizer, ["What is 2 + 3 ?"], max_new_tokens=8, progress=False,
                        engine=engines.load(m, tokenizer))[0][0] for m, tokenizer in ((model, gemma), (later, own_eos))]
    assert [(p["stop_token_ids"], p.get("ignore_eos")) for p in engines.engine.trl.llm.params] == \
        [([1, 0], True), ([0], True)]
    assert [(r.token_ids, r.ended) for r in replies] == [([8], True), ([8, 1, 10], True)]  # <eos> is text to the later


def test_generation_section_is_checked(tmp_path):
    recipe = tiny_recipe(tmp_path)
    assert load_recipe(recipe, []).generation.backend == "hf"
    with pytest.raises(PipelineError, match=r"generation.backend: 'vlm' is not one of hf, vllm \(closest: vllm\)"):
        load_recipe(recipe, ["generation.backend=vlm"])
    with pytest.raises(PipelineError, match="vllm_gpu_memory_utilization must be in"):
        load_recipe(recipe, ["generation.vllm_gpu_memory_utilization=1.5"])
    on = load_recipe(recipe, ["generation.backend=vllm", "generation.vllm_mode=server",
                              "generation.vllm_server_base_url=http://10.0.0.7:8000"])
    assert vllm_engine.trl_args(on) == {"use_vllm": True, "vllm_mode": "server", "vllm_gpu_memory_utilization": 0.3,
                                        "vllm_tensor_parallel_size": 1, "vllm_enable_sleep_mode": False,
                                        "vllm_server_base_url": "http://10.0.0.7:8000"}
    assert vllm_engine.trl_args(load_recipe(recipe, [])) == {"use_vllm": False}


@pytest.mark.skipif(HAS_VLLM, reason="vllm and a CUDA GPU are here: the stages run with it (tests below)")
@pytest.mark.parametrize("stage", ["eval", "ppo"])
def test_vllm_backend_without_vllm_fails_before_any_work(tmp_path, stage):
    recipe = tiny_recipe(tmp_path)
    script = {"eval": "pipeline/evaluate.py", "ppo": "pipeline/ppo.py"}[stage]
    out = run_cli([script, recipe, "generation.backend=vllm"], cwd=tmp_path, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "generation.backend: vllm needs" in lines[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()  # nothing written


# ---------------------------------------------------------------------------------------------- GPU, vllm

@pytest.fixture(scope="module")
def saved(tmp_path_factory, model, tok):
    folder = tmp_path_factory.mktemp("vllm-model")
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@needs_vllm
def test_vllm_engine_matches_model_generate_and_takes_new_weights(tmp_path, saved, tok):
    recipe = load_recipe(tiny_recipe(tmp_path), ["generation.backend=vllm"])
    gpu = LlamaForCausalLM.from_pretrained(saved, dtype=torch.float32).cuda().eval()
    engine = vllm_engine.Engine(recipe, gpu, tok)
    reference = GenerateEngine(gpu, tok)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in PROMPTS]
    stops = stop_ids(tok, gpu)

    def agreement():
        a = engine.sample(ids, stops=stops, max_new_tokens=12, do_sample=False, n=1)
        b = reference.sample(ids, stops=stops, max_new_tokens=12, do_sample=False, n=1)
        return sum(x == y for x, y in zip(a, b)) / len(ids)

    assert agreement() >= 0.75  # greedy in vLLM's kernels against transformers': all but rare near-ties
    with torch.no_grad():  # new weights: vLLM samples from them only after use()
        for p in gpu.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    engine.use(gpu)
    assert agreement() >= 0.75
    samples = engine.sample(ids, stops=stops, max_new_tokens=12, do_sample=True, temperature=1.0, n=3)
    assert len(samples) == 3 * len(ids) and all(0 < len(s) <= 12 for s in samples)


@needs_vllm
def test_ppo_and_eval_run_with_vllm(tmp_path):
    recipe = tiny_recipe(tmp_path, reward={"init_from": "sft", "max_steps": 8, "per_device_train_batch_size": 8,
                                           "max_length": 128, "logging_steps": 4, "save_strategy": "no"},
                         ppo={"init_from": "sft", "reward_model": "reward", "max_steps": 2, "batch_size": 8,
                              "max_new_tokens": 12, "save_steps": 0, "logging_steps": 1},
                         eval={"num_samples": 2, "max_new_tokens": 12, "bootstrap": 50},
                         generation={"backend": "vllm", "vllm_gpu_memory_utilization": 0.2})
    for stage in ("pretrain", "sft", "reward", "ppo", "evaluate"):
        out = run_cli([f"pipeline/{stage}.py", recipe], cwd=tmp_path, timeout=1200)
        assert out.returncode == 0, f"{stage}: {out.stderr[-3000:]}"
    assert (tmp_path / "runs" / "tiny" / "eval" / "metrics.json").exists()
    assert "vLLM engine" in (tmp_path / "runs" / "tiny" / "ppo" / "log.txt").read_text()


def test_engine_architecture_check_reads_parameter_shapes(model):
    """One eval engine takes every checkpoint's weights: the same architecture (a LoRA-wrapped one: its base) loads,
    another size does not."""
    from peft import LoraConfig, get_peft_model

    same = LlamaForCausalLM(model.config)
    bigger = LlamaForCausalLM(LlamaConfig(**{**model.config.to_dict(), "intermediate_size": 192}))
    lora = get_peft_model(LlamaForCausalLM(model.config), LoraConfig(r=4, target_modules=["q_proj"]))
    arch = vllm_engine._architecture
    assert arch(same) == arch(model) == arch(lora) != arch(bigger)


def test_vllm_settings_that_cannot_work_fail_on_any_machine(tmp_path, monkeypatch):
    """eval generates in its main process: an engine there would wait for the other processes forever; our PPO
    and eval run vLLM colocated, never through a server."""
    recipe = load_recipe(tiny_recipe(tmp_path), ["generation.backend=vllm"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PipelineError, match="vllm in eval runs one engine in one process"):
        vllm_engine.check(recipe, one_process=True)
    monkeypatch.setenv("WORLD_SIZE", "1")
    wide = load_recipe(tiny_recipe(tmp_path), ["generation.backend=vllm", "generation.vllm_tensor_parallel_size=2"])
    with pytest.raises(PipelineError, match="vllm_tensor_parallel_size 2"):
        vllm_engine.check(wide, one_process=True)
    server = load_recipe(tiny_recipe(tmp_path), ["generation.backend=vllm", "generation.vllm_mode=server"])
    with pytest.raises(PipelineError, match="a vLLM server serves GRPO/RLOO only"):
        vllm_engine.check(server)  # our ppo


def test_check_counts_the_vllm_engines_share_of_device_memory(tmp_path, capsys):
    """`run.py --check`: with vLLM colocated, the training models get what the engine leaves of each device."""
    from pipeline import check, cluster, memory
    from pipeline.run import plan

    path = tiny_recipe(tmp_path, reward={"init_from": "sft", "max_steps": 2},
                       ppo={"init_from": "sft", "reward_model": "reward", "max_steps": 2, "batch_size": 8})

    def warnings(*overrides):
        recipe = load_recipe(path, list(overrides))
        (errors, n_warnings), out = (check.run_check(recipe, plan(recipe), lambda stage: cluster.Launch(),
                                                     memory.parse_size("8GiB")), capsys.readouterr().out)
        assert errors == 0, out
        return n_warnings, out

    n, out = warnings()
    assert n == 0 and "vLLM engine" not in out
    n, out = warnings("generation.backend=vllm", "generation.vllm_gpu_memory_utilization=0.5")
    assert n == 0 and "vLLM engine (generation.vllm_gpu_memory_utilization): 50% of each device, 4 GiB left" in out
    n, out = warnings("generation.backend=vllm", "generation.vllm_gpu_memory_utilization=0.9999")
    assert n == 1 and "warning: ppo: needs about" in out and "left beside the vLLM engine" in out
