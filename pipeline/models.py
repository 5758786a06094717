"""Building, loading and saving models and tokenizers, with LoRA/QLoRA through peft and TRL's ModelConfig.

A checkpoint folder is one of: a full model (`config.json` + safetensors), a LoRA adapter (`adapter_config.json`,
whose base the adapter names), or an adapter stage that also saved `merged/`. `load_causal_lm` takes any of them.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from pipeline import devices, faults
from pipeline.cli import PipelineError, built_from_config, first_line
from pipeline.formats import ObjectArguments
from pipeline.key_checks import key_prefix, refusal_line, source_of
from pipeline.values import closest

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def torch_dtype(name: str):
    if name not in DTYPES:
        raise PipelineError(f"model.dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def is_adapter(path) -> bool:
    return path is not None and (Path(path) / "adapter_config.json").is_file()


def model_path(path: str) -> str:
    """A stage that saved an adapter and a merged model: use the merged one."""
    merged = Path(path) / "merged"
    return str(merged) if (merged / "config.json").is_file() else path


# ---------------------------------------------------------------------------------------------- tokenizers


def load_tokenizer(recipe, checkpoint, corpus=None, as_saved: bool = False):
    """The tokenizer for a stage: the checkpoint's own, or (new model) trained/loaded per the recipe. as_saved: the
    checkpoint's own as it is, without the recipe's chat format (a finished model that only reads: a reward model
    whose vocabulary the chat format's added tokens would overrun)."""
    from pipeline import tokenizer as tok_lib

    tcfg = recipe.tokenizer
    if checkpoint.path is not None:
        source = checkpoint.path
        if is_adapter(source) and not (Path(source) / "tokenizer_config.json").is_file():
            source = adapter_base(source)
        from pipeline import hub, integrity

        # a folder that is no model, or without its tokenizer files
        if Path(source).is_dir() and (problem := integrity.language_model_problem(source)):
            raise PipelineError(problem)
        online = hub.online_for(source)  # a hub id offline: the cache only
        try:
            tok = tok_lib.load_tokenizer(source, trust_remote_code=recipe.model.trust_remote_code,
                                         revision=recipe.model.revision if checkpoint.source == "hub" else None)
        except (OSError, ValueError) as err:  # ValueError: tokenizer files transformers cannot read
            why = hub.load_failure(online, f"cannot load its tokenizer: {' '.join(str(err).split())[:300]}")
            raise PipelineError(f"{source}: {why}") from None
    elif tcfg.train:
        if corpus is None:
            from pipeline import data

            corpus = data.load(tcfg.dataset, "text", recipe)["text"]
        if tcfg.chat_dataset:  # conversations as the model will read them: chat markup and tool schemas get merges
            from pipeline import data

            corpus = list(corpus) + tok_lib.rendered_chats(data.load(tcfg.chat_dataset, "chat", recipe))
        tok = tok_lib.train_tokenizer(corpus, vocab_size=tcfg.vocab_size, min_frequency=tcfg.min_frequency)
    elif tcfg.name_or_path:
        tok = tok_lib.load_tokenizer(tcfg.name_or_path, trust_remote_code=recipe.model.trust_remote_code)
    else:
        raise PipelineError(f"{source_of(recipe, 'tokenizer', 'train', 'name_or_path')}: a model built from "
                            f"`model.config` needs `tokenizer.train: true` or `tokenizer.name_or_path`")
    tok = tok if as_saved and checkpoint.path is not None else recipe_chat_template(recipe, tok)
    tok.apply_chat_template = ObjectArguments(tok.apply_chat_template)  # every render: ours, TRL's, vLLM's prompts
    return tok


def recipe_chat_template(recipe, tok):
    """`tok` (changed in place) with the chat template `tokenizer.chat_template` asks for."""
    from pipeline import tokenizer as tok_lib

    mode = recipe.tokenizer.chat_template
    if mode == "pipeline" or (mode == "auto" and not tok_lib.trains_as_is(tok)):
        tok, _ = tok_lib.apply_chat_format(tok, force=True)  # the pipeline's ChatML, also over a marked template
    return tok


def check_chat_template(tokenizer, data: dict, assistant_only: bool = False) -> None:
    """One line (exit 2) before training when the tokenizer's own chat template cannot train on a dataset of the
    stage (`data`: {source: rows, or (rows, where each is from)}; pipeline.tokenizer.chat_template_problem says why)."""
    from pipeline import tokenizer as tok_lib

    for source, given in data.items():
        rows, places = given if isinstance(given, tuple) else (given, None)
        if rows is not None and (problem := tok_lib.chat_template_problem(tokenizer, rows, assistant_only, places)):
            raise PipelineError(f"{source}: the tokenizer of {tokenizer.name_or_path}: {problem} "
                                f"(tokenizer.chat_template: pipeline uses the pipeline's ChatML template)")


def check_tool_parser(tokenizer, where: str) -> None:
    """One line (exit 2) before a stage that reads the policy's tool calls when nothing can parse them: a chat
    template that renders tools without a response schema (pipeline.tool_formats.tool_parser_problem)."""
    from pipeline.tool_formats import tool_parser_problem

    problem = tool_parser_problem(tokenizer)
    if problem:
        raise PipelineError(f"{where}: {problem}")


def adapter_base(path) -> str:
    """The model an adapter folder goes on. peft records its absolute path at training time; a stage folder's manifest
    records where the stage started relative to its run folder, which stays right when the run folder is moved or
    copied (a reward stage keeps its adapter in `adapter/`, its manifest one folder up). The manifest's answer wins
    where it names an existing folder; otherwise (no manifest, a hub id) peft's."""
    from pipeline import runs

    recorded = json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
    stage = Path(path) if (Path(path) / runs.MANIFEST).is_file() else Path(path).parent
    started = runs.trained_from(stage)
    if started and Path(started).is_dir():
        return started
    if Path(recorded).is_absolute() and not Path(recorded).exists():  # a folder that moved, not a hub id
        raise PipelineError(f"{path}: the LoRA adapter's base model {recorded} (base_model_name_or_path in its "
                            f"adapter_config.json) does not exist: point it at the base model's folder")
    return recorded


# ---------------------------------------------------------------------------------------------- models


def check_section(recipe) -> None:
    """The model section's values that need transformers to check (when the recipe loads, before any stage):
    `attn_implementation` and the config `model.config` builds."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attn = recipe.model.attn_implementation
    known = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
    if attn is not None and "/" not in attn and attn.removeprefix("paged|") not in known:  # org/repo: a hub kernel
        raise PipelineError(f"{key_prefix(recipe, 'model', 'attn_implementation')}attn_implementation: '{attn}' is not "
                            f"one of {', '.join(known)} (or a kernels hub repo){closest(attn, known)}")
    if recipe.model.config:
        model_config(recipe)
    check_peft(recipe)


def model_config(recipe):
    """The transformers config `model.config` describes ({model_type: llama, hidden_size: 128, ...}); a key that
    is close to one of the config's own names but not one (a typo, which transformers keeps unused) is refused."""
    import dataclasses
    import difflib

    from transformers import CONFIG_MAPPING, AutoConfig

    source = lambda key: source_of(recipe, "model", key)  # noqa: E731 (`config.hidden_size`: its override, if any)
    cfg = dict(recipe.model.config)
    model_type = cfg.pop("model_type", "llama")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:  # a list is named, not hashed
        raise PipelineError(f"{source('config.model_type')}: model.config.model_type: unknown '{model_type}'"
                            f"{closest(str(model_type), list(CONFIG_MAPPING.keys()))}")
    cls = CONFIG_MAPPING[model_type]
    names = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    names |= set(getattr(cls, "attribute_map", {}))
    for key in cfg:
        if not isinstance(key, str):  # YAML reads `7:` or `true:` as a number or a boolean
            raise PipelineError(f"{source(f'config.{key}')}: model.config: key {key!r} is not a name")
        close = difflib.get_close_matches(str(key), sorted(names), n=3, cutoff=0.8)
        if key not in names and not hasattr(cls, key) and close:
            raise PipelineError(f"{source(f'config.{key}')}: model.config: unknown key '{key}' for {model_type} "
                                f"(closest: {', '.join(close)})")
    # transformers takes these, but -2 layers build none, 0 heads or hidden_size divide by 0, 10**30 is too wide
    for key, value in cfg.items():
        if (key.startswith("num_") or key.endswith("_size")) and type(value) is int:
            least = 1 if key.endswith("_heads") or key == "hidden_size" else 0
            if not least <= value < 2**31:
                bound = f"{least} or more" if value < least else "below 2**31"
                raise PipelineError(f"{source(f'config.{key}')}: model.config.{key} must be {bound}, got {value}")
    return built_from_config(lambda: AutoConfig.for_model(model_type, **cfg), f"{source('config')}: model.config")


def build_causal_lm(recipe, tokenizer):
    """A new model from `model.config` (e.g. {model_type: llama, hidden_size: 128, ...}) sized to the tokenizer."""
    from transformers import AutoModelForCausalLM

    config = model_config(recipe)
    config.vocab_size = len(tokenizer)
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(recipe.run.seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=recipe.model.attn_implementation)
    dtype = torch_dtype(recipe.model.dtype)
    return model.to(dtype) if dtype != "auto" else model


def quantization_config(recipe, peft_values: dict):
    if not (peft_values.get("load_in_4bit") or peft_values.get("load_in_8bit")):
        return None
    from trl import ModelConfig, get_quantization_config

    return get_quantization_config(ModelConfig(dtype=recipe.model.dtype, **peft_values))


def peft_config(peft_values: dict, task_type: str = "CAUSAL_LM", *, model=None, recipe=None, stage: str = ""):
    """The stage's LoRA config (None without use_peft). With `model` (the loaded model the adapter goes on; the recipe
    and stage name where each key was set; without a recipe messages name the keys alone), target modules and modules
    to save that name no module, and 4-bit layers this CPU cannot run, are one line here, not a trainer's traceback."""
    if not peft_values.get("use_peft"):
        return None
    from trl import ModelConfig, get_peft_config

    values = {"lora_task_type": task_type, **peft_values}
    config = get_peft_config(ModelConfig(**values))
    targets = peft_values.get("lora_target_modules")
    if targets and [t.lower() for t in targets] != ["all-linear"]:  # TRL makes a list of one name a string, which
        config.target_modules = set(targets)  # peft matches as a regex against the whole module path: no module
    if model is not None:
        _check_against(model, config, lambda *keys: key_prefix(recipe, stage, *keys))
    return config


def _check_against(model, config, where) -> None:  # where(*keys): "<where the keys were set>: <stage>."
    import re

    names = [name for name, _ in model.named_modules()]

    def found(wanted: str) -> bool:  # as peft matches a name in a list: the module's name or its last parts
        return any(n == wanted or n.endswith("." + wanted) for n in names)

    targets = config.target_modules  # a string: all-linear, or a regex peft matches against the whole path
    if isinstance(targets, str):
        missing = [] if targets.lower() == "all-linear" or any(re.fullmatch(targets, n) for n in names) else [targets]
    else:
        missing = sorted(t for t in targets or [] if not found(t))
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise PipelineError(f"{where('lora_target_modules')}lora_target_modules: {', '.join(missing)} names no "
                            f"module of the model (its linear layers: {', '.join(linear)}; or [all-linear])")
    for wanted in config.modules_to_save or []:
        if not found(wanted):
            raise PipelineError(f"{where('lora_modules_to_save')}lora_modules_to_save: '{wanted}' names no module "
                                f"of the model{closest(wanted, {n.rsplit('.', 1)[-1] for n in names if n})}")
    on_cpu = {name: m for name, m in model.named_modules() if devices.weight_on_cpu(m)}  # bitsandbytes' CPU kernels
    if config.use_dora and any(type(m).__name__ == "Linear8bitLt" for m in on_cpu.values()):
        # peft 0.21's DoRA moves each 8-bit weight back to the CPU after the first forward pass, which drops
        # its int8 scales: the second step fails inside bitsandbytes ('NoneType' has no attribute 'unsqueeze')
        raise PipelineError(f"{where('use_dora', 'load_in_8bit')}use_dora with load_in_8bit does not train on a "
                            f"CPU (peft's DoRA loses the 8-bit scales after the first step): use load_in_4bit, "
                            f"plain LoRA, or a GPU")
    for name, module in on_cpu.items():  # the packed CPU kernel (AVX512-BF16) works on blocks of 32 outputs
        if getattr(module, "support_avx512bf16_for_cpu", False) and module.out_features % 32:
            raise PipelineError(f"{where('load_in_4bit')}load_in_4bit: on this CPU bitsandbytes runs a 4-bit "
                                f"layer only when its output size is a multiple of 32, and {name} has "
                                f"{module.out_features}: train this model without load_in_4bit here, or on a GPU")


def check_peft(recipe) -> None:
    """Every stage's LoRA/quantization keys, when the recipe loads: what peft, TRL or bitsandbytes would reject
    inside the stage with a traceback, as one line naming the key."""
    import importlib.util

    for stage in recipe.stages:
        values = recipe.peft_values(stage)
        where = lambda *keys: key_prefix(recipe, stage, *keys)  # noqa: E731 (an override that set one)
        quant = [k for k in ("load_in_4bit", "load_in_8bit") if values.get(k)]
        if len(quant) == 2:
            raise PipelineError(f"{where(*quant)}load_in_4bit and {stage}.load_in_8bit are both set: choose one")
        if quant and not values.get("use_peft"):
            raise PipelineError(f"{where(quant[0], 'use_peft')}{quant[0]} needs {stage}.use_peft: true (a quantized "
                                f"model trains only through LoRA adapters: QLoRA)")
        if quant and importlib.util.find_spec("bitsandbytes") is None:
            raise PipelineError(f"{where(quant[0])}{quant[0]} needs bitsandbytes, which is not installed "
                                f"(pip install bitsandbytes)")
        if not values.get("use_peft"):
            continue
        if values.get("lora_r", 1) < 1:  # absent: TRL's default (16)
            raise PipelineError(f"{where('lora_r')}lora_r must be at least 1, got {values['lora_r']}")
        if not 0 <= values.get("lora_dropout", 0.0) < 1:
            raise PipelineError(f"{where('lora_dropout')}lora_dropout must be in [0, 1), got {values['lora_dropout']}")
        try:
            peft_config(values)
        except (ValueError, TypeError) as err:  # peft's LoraConfig checks: named by the keys they are about
            raise PipelineError(refusal_line(recipe, stage, peft_config, values, [k for k in values if k != "use_peft"],
                                             err, "LoRA settings")) from None


def load_causal_lm(recipe, path: str, *, peft_values: dict | None = None, cls=None, revision=None, tokenizer=None,
                   **kw):
    """Load a saved causal LM (full or adapter). An adapter is merged into its base so the next stage starts
    from a plain model (it may add a fresh adapter of its own). With `tokenizer`, the embeddings are grown to it
    (`fit_embeddings`): a user's model whose tokenizer got the chat tokens (`apply_chat_format`) reads them."""
    from transformers import AutoModelForCausalLM

    cls = cls or AutoModelForCausalLM
    path = model_path(path)
    adapter = is_adapter(path)
    quant = quantization_config(recipe, peft_values or {})
    load_kw = dict(dtype=torch_dtype(recipe.model.dtype), trust_remote_code=recipe.model.trust_remote_code,
                   attn_implementation=recipe.model.attn_implementation, use_safetensors=None, **kw)
    if quant is not None:  # placed where this process trains (devices.quantized_device_map)
        load_kw.update(quantization_config=quant, device_map=devices.quantized_device_map())
    from pipeline import hub

    online = hub.online_for(path)  # a hub id offline: the cache only, at once
    try:
        if adapter:
            if quant is not None:
                raise PipelineError(f"{path}: quantized training from an adapter checkpoint: save the stage with "
                                    f"merge_adapter=true and start from its merged model")
            model = _merged_adapter(cls, path, load_kw)
        else:
            model = cls.from_pretrained(path, revision=revision, **load_kw)
    except OSError as err:
        why = hub.load_failure(online, f"cannot load model: {first_line(err)}")
        raise PipelineError(f"{path}: {why}") from None
    if tokenizer is not None:
        fit_embeddings(model, tokenizer)
    return model


def _merged_adapter(cls, path: str, load_kw: dict):
    """The model an adapter folder stands for: its base with the adapter merged in. The base may itself be an adapter
    stage (a LoRA stage started from an unmerged LoRA stage records that folder as its base), loaded the same way.
    The merged model then names the adapter folder as its own, so an adapter trained on it records that folder, not
    the base below, which lacks this adapter. A causal-LM adapter read into another head (a reward model or critic
    started from a LoRA sft) applies to the shared body; the LM head is not there."""
    from peft import PeftConfig, PeftModel

    config = PeftConfig.from_pretrained(path)
    base_path = model_path(adapter_base(path))
    base = _merged_adapter(cls, base_path, load_kw) if is_adapter(base_path) else cls.from_pretrained(base_path,
                                                                                                       **load_kw)
    if (Path(path) / "tokenizer_config.json").is_file():  # the stage grew the embeddings to its tokenizer (chat
        from transformers import AutoTokenizer  # tokens added to a hub tokenizer): the adapter holds the grown ones

        fit_embeddings(base, AutoTokenizer.from_pretrained(path))
    if config.task_type == "CAUSAL_LM" and not type(base).__name__.endswith("ForCausalLM"):
        config.task_type = None  # peft's causal-LM wrapper needs generate(); the plain wrapper merges the same LoRA
    model = PeftModel.from_pretrained(base, path, config=config).merge_and_unload()
    model.name_or_path = model.config.name_or_path = str(path)  # what peft records as a new adapter's base
    return model


@contextlib.contextmanager
def single_process():
    """Load and run models in this process alone, e.g. the main process scoring a saved checkpoint while the
    others wait.

    Under DeepSpeed ZeRO-3, transformers builds every model it loads partitioned over all processes
    (`deepspeed.zero.Init`) and generates with `synced_gpus` (a collective per token): both would wait forever for
    processes that are not there. Inside this block models load whole and generate alone, as in a
    single-process run."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def fit_embeddings(model, tokenizer) -> None:
    """Grow the embeddings to the tokenizer when it has more tokens (chat tokens added to a hub tokenizer); padded
    hub embeddings larger than the tokenizer stay as they are. The new rows (drawn around the old ones' mean) are
    seeded: every load of the same model grows the same rows, so a policy and its reference, or a LoRA base at
    training and at merging, agree on them."""
    weight = model.get_input_embeddings().weight
    if len(tokenizer) > weight.shape[0]:
        with devices.fork_random_state(weight.device):  # the caller's random state stays as it was
            torch.manual_seed(0)
            model.resize_token_embeddings(len(tokenizer))


def load_policy(recipe, init, peft_values: dict, tokenizer, stage: str, reference_with_peft: bool = False,
                reference: bool = True):
    """A preference stage's policy (generation configured), its LoRA config (None without use_peft) and its frozen
    reference: the same checkpoint loaded again, or with LoRA None (the policy with its adapter switched off) unless
    `reference_with_peft`; None without `reference` (a reference-free loss)."""
    policy = load_causal_lm(recipe, init.path, peft_values=peft_values, revision=recipe.model.revision,
                            tokenizer=tokenizer)
    configure_generation(policy, tokenizer)
    lora = peft_config(peft_values, model=policy, recipe=recipe, stage=stage)
    frozen = None
    if reference and (lora is None or reference_with_peft):
        frozen = load_causal_lm(recipe, init.path, revision=recipe.model.revision, tokenizer=tokenizer).eval()
        frozen.requires_grad_(False)
    return policy, lora, frozen


def configure_generation(model, tokenizer) -> None:
    """Stop at end of turn (generation.stop_ids: a saved model's generate stops as ours does), pad with pad, use the
    KV cache (trainers may have saved use_cache=False)."""
    from pipeline.generation import stop_ids

    model.config.use_cache = True
    gen = model.generation_config
    stops = stop_ids(tokenizer, model)
    gen.eos_token_id = stops if len(stops) > 1 else stops[0]
    gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = gen.pad_token_id


def save_trained(trainer, tokenizer, out: Path, merge_adapter: bool = False) -> None:
    """Save the trainer's model (safetensors; gathers ZeRO-3/FSDP shards) and tokenizer; optionally a merged copy."""
    model = trainer.model
    unwrapped = trainer.accelerator.unwrap_model(model)
    configure_generation(unwrapped, tokenizer)
    trainer.save_model(str(out))
    faults.point("final-save")
    if trainer.accelerator.is_main_process:
        (out / "training_args.bin").unlink(missing_ok=True)  # a pickle; manifest.json records the config instead
        tokenizer.save_pretrained(str(out))
        unwrapped.generation_config.save_pretrained(str(out))
    trainer.accelerator.wait_for_everyone()
    if merge_adapter and is_adapter(out) and trainer.accelerator.is_main_process:
        save_merged(out, tokenizer)
    trainer.accelerator.wait_for_everyone()


def save_merged(out: Path, tokenizer) -> None:
    """`merge_adapter`: `out/merged/`, the full model, from the adapter saved in `out` merged into its base read from
    disk in float32: a QLoRA adapter goes onto its base unquantized (merging into 4-bit weights would round them and
    save a quantized model); a base that is an unmerged adapter stage is loaded through its chain."""
    from transformers import AutoModelForCausalLM

    merged = _merged_adapter(AutoModelForCausalLM, str(out), {"dtype": torch.float32})
    configure_generation(merged, tokenizer)
    merged.save_pretrained(str(out / "merged"), safe_serialization=True)
    tokenizer.save_pretrained(str(out / "merged"))


def param_count(model, trainable_only: bool = False) -> int:
    """Parameters of the whole model: under ZeRO-3 a partitioned tensor's numel() is this rank's share (often 0)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad or not trainable_only)


def describe(model) -> str:
    total = param_count(model)
    trainable = param_count(model, trainable_only=True)
    return f"{total / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable)"

