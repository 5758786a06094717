"""Recipes: one YAML file describes a whole pipeline; `section.key=value` overrides adjust it on the command line.

Everything is validated before any model is loaded: unknown keys are named with their section and the closest
valid names, values are coerced to the field's declared type or rejected with the type expected.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.cli import PipelineError, first_line
from pipeline.files import text_of
from pipeline.key_checks import check_value, config_refusal, long_name, source_of, unknown_key_hint
from pipeline.values import Mismatch, by_new_names, closest, coerce, field_types, type_name
from pipeline.stages import PEFT_FIELDS, STAGES, TrainingKeys


@dataclass
class RunSection:
    name: str = "run"             # run directory: <output_dir>/<name>/<stage>/
    output_dir: str = "runs"      # relative to the current directory
    seed: int = 0                 # default seed of every stage (a stage's own `seed` key wins)
    launcher: str | None = None   # prefix the runner starts each stage with, e.g. "accelerate launch --config_file launch/accelerate/ddp.yaml"
    parallel_stages: int = 1      # stages the runner runs side by side when neither needs the other (CPU machines)
    carbon_country: str = "USA"   # ISO 3166 alpha-3 code of the grid: codecarbon's intensity (README "Cost per stage")
    carbon_intensity_g_per_kwh: float | None = None  # the grid's gCO2e per kWh; wins over the country's figure


@dataclass
class TokenizerSection:
    name_or_path: str | None = None     # load a tokenizer from a path or hub id
    train: bool = False                 # or train a byte-level BPE on `dataset`
    dataset: str = "world:pretrain"     # corpus the tokenizer is trained on (the pretrain stage: its own corpus)
    chat_dataset: Any = None            # chat data (tool conversations) added to that corpus, rendered as the chat
                                        # template renders them, tools included
    vocab_size: int = 2048
    min_frequency: int = 2
    chat_template: Literal["pipeline", "auto", "own"] = "pipeline"  # README "tokenizer": ours / trainable / theirs


@dataclass
class ModelSection:
    name_or_path: str | None = None     # base model: a path or hub id ...
    config: dict | None = None          # ... or an architecture built from scratch (AutoConfig.for_model kwargs)
    revision: str | None = None
    trust_remote_code: bool = False     # safe by default: remote code runs only if the recipe says so
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"  # the dtype weights are loaded in
    attn_implementation: str | None = None


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. YAML 1.1 would read `save_strategy: no` as false. A key given twice in
    one mapping is an error (plain YAML loaders keep the last one silently: a second `ppo:` section would replace
    the first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


def _world_section():
    from pipeline.world import WorldConfig

    return WorldConfig


def _slurm_section():
    from pipeline.slurm import SlurmSection

    return SlurmSection


def _tools_section():
    from pipeline.tools import ToolsSection

    return ToolsSection


def _generation_section():
    from pipeline.vllm_engine import GenerationSection

    return GenerationSection


GLOBAL_SECTIONS = {"run": lambda: RunSection, "world": _world_section, "tokenizer": lambda: TokenizerSection,
                   "model": lambda: ModelSection, "slurm": _slurm_section, "tools": _tools_section,
                   "generation": _generation_section}


@lru_cache(maxsize=None)
def _config_class(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def stage_config_class(stage: str):
    """The stage's TRL/Transformers config class; None for a stage without one."""
    return _config_class(STAGES[stage].config_class) if STAGES[stage].config_class else None


@lru_cache(maxsize=None)
def stage_fields(stage: str) -> dict[str, tuple[str, Any]]:
    """key -> (destination, type) for a stage section; destination is 'keys', 'config', 'peft' or 'training'."""
    spec = STAGES[stage]
    out: dict[str, tuple[str, Any]] = {}
    if spec.config_class:
        for name, tp in field_types(_config_class(spec.config_class)).items():
            out[name] = ("config", tp)
    if spec.peft:
        from trl import ModelConfig

        peft_types = field_types(ModelConfig)
        for name in PEFT_FIELDS:
            if name in peft_types:
                out[name] = ("peft", peft_types[name])
    if {"per_device_train_batch_size", "gradient_accumulation_steps"} <= set(out):
        for name, tp in field_types(TrainingKeys).items():
            out[name] = ("training", tp)
    for name, tp in field_types(spec.keys).items():
        out[name] = ("keys", tp)
    out.pop("output_dir", None)  # the pipeline owns where stages write
    return out


@dataclass
class Recipe:
    path: Path
    run: RunSection
    world: Any
    tokenizer: TokenizerSection
    model: ModelSection
    stages: dict[str, dict] = field(default_factory=dict)  # section name -> validated values, in recipe order
    overrides: list[str] = field(default_factory=list)
    set_by: dict = field(default_factory=dict)  # (section, key) -> the text of the override that set it last (a key
    # inside one too: ("ppo", "trl_args.beta")), in the order they were set: key_checks.source_of. The text, not a
    # position in `overrides`, so a Recipe made with other overrides (dataclasses.replace) names the right one
    slurm: Any = None  # pipeline.slurm.SlurmSection: how `run.py --slurm` submits the stages
    tools: Any = None  # pipeline.tools.ToolsSection: the tools the policy may call (none when its list is empty)
    generation: Any = None  # pipeline.vllm_engine.GenerationSection: how eval and ppo generate (hf or vllm)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    def section(self, stage: str) -> dict:
        return self.stages.get(stage, {})

    def keys(self, stage: str):
        """The stage's pipeline keys (recipe values over the dataclass defaults)."""
        spec = STAGES[stage]
        fields = stage_fields(stage)
        values = {k: v for k, v in self.section(stage).items() if fields[k][0] == "keys"}
        keys = spec.keys(**values)
        if hasattr(keys, "init_from") and not keys.init_from and spec.default_init:
            keys.init_from = next((s for s in spec.default_init if s in self.stages), spec.default_init[-1])
        if hasattr(keys, "fill_defaults"):  # defaults that depend on the recipe (e.g. eval's checkpoint list)
            keys.fill_defaults(self)
        return keys

    def peft_values(self, stage: str) -> dict:
        fields = stage_fields(stage)
        return {k: v for k, v in self.section(stage).items() if fields[k][0] == "peft"}

    def training_keys(self, stage: str) -> TrainingKeys:
        fields = stage_fields(stage)
        return TrainingKeys(**{k: v for k, v in self.section(stage).items() if fields[k][0] == "training"})

    def config_default(self, stage: str, name: str):
        """The value of a config-class key: the section's, else the config class's own default."""
        if name in self.section(stage):
            return self.section(stage)[name]
        f = next(f for f in dataclasses.fields(_config_class(STAGES[stage].config_class)) if f.name == name)
        return f.default if f.default is not dataclasses.MISSING else f.default_factory()

    def check_config(self, stage: str, portable: bool = False) -> None:
        """The stage's config class's own checks (TRL's, transformers'), before the stage looks at models or data.
        portable: leave out what depends on this machine (bf16/fp16/tf32 where there is no GPU), as `--check` on a
        login node must."""
        spec = STAGES[stage]
        if not spec.config_class:
            return
        fields = field_types(_config_class(spec.config_class))
        fixed = {"output_dir": str(self.stage_dir(stage))} if "output_dir" in fields else {}  # recorded, not created
        if portable:
            fixed.update({k: False for k in ("bf16", "fp16") if k in fields})
            fixed.update({k: None for k in ("tf32",) if k in fields})
        with warnings.catch_warnings():  # the stage itself shows the class's warnings when it runs
            warnings.simplefilter("ignore")
            self.trainer_config(stage, num_processes=0, **fixed)

    def trainer_config(self, stage: str, num_processes: int | None = None, **fixed):
        """The stage's TRL/Transformers config object built from the section's config keys. With the section's
        `global_batch_size`, gradient_accumulation_steps is derived (or checked) for the number of processes this
        stage runs with (default: the processes of the current launch; 0: not checked, as when loading)."""
        from pipeline import cluster

        cluster.check_environment()  # the launch's DeepSpeed file found from any directory before a config reads it
        spec = STAGES[stage]
        fields = stage_fields(stage)
        values = {k: v for k, v in self.section(stage).items() if fields[k][0] == "config"}
        values.setdefault("seed", self.run.seed)
        if "report_to" in fields:
            values.setdefault("report_to", "none")
        values.update(fixed)
        if "save_steps" in values and "save_strategy" in fields and values.get("save_strategy", "no") == "no":
            values["save_strategy"] = "steps"  # save_steps asks for checkpoints: without this it saved none
        expected = self.training_keys(stage).global_batch_size if "global_batch_size" in fields else None
        if expected is not None and num_processes != 0:
            if num_processes is None:
                num_processes = cluster.process_group().num_processes
            plan = cluster.batch_plan(stage, self.config_default(stage, "per_device_train_batch_size"),
                                      values.get("gradient_accumulation_steps"), num_processes, expected)
            values["gradient_accumulation_steps"] = plan.accumulation
        config_class = _config_class(spec.config_class)
        if cluster.processes_without_accelerator() and issubclass(config_class, _config_class(
                "transformers:TrainingArguments")):
            # TrainingArguments remakes the process group, and with use_cpu false Accelerate would leave each
            # process alone, all writing as the main one
            values["use_cpu"] = True
        try:
            return config_class(**by_new_names(config_class, values))
        except (ValueError, TypeError) as err:
            raise PipelineError(config_refusal(self, stage, config_class, values, first_line(err))) from None


def _validate_section(section: str, raw, where, origins) -> dict:
    """Check keys and types of one section; returns coerced values. `origins` maps key -> override text."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PipelineError(f"{where}: section '{section}' must be a mapping of keys, got {type(raw).__name__}")
    if section in GLOBAL_SECTIONS:
        fields = {k: ("global", tp) for k, tp in field_types(GLOBAL_SECTIONS[section]()).items()}
    else:
        fields = stage_fields(section)
    out = {}
    for k, v in raw.items():
        src = f"override '{origins[k]}'" if k in origins else where
        if k not in fields:
            raise PipelineError(f"{src}: unknown key '{k}' in section '{section}'{closest(str(k), fields)}"
                                f"{unknown_key_hint(section, k)}")
        try:
            out[k] = coerce(v, fields[k][1])
        except Mismatch:
            raise PipelineError(f"{src}: {section}.{k} must be {type_name(fields[k][1])}, got {v!r}") from None
        check_value(section, k, out[k], src, _config_class(STAGES[section].config_class)
                    if fields[k][0] == "config" else None)
        if (section, k) == ("slurm", "stages"):  # per-stage overrides of known stages, checked now
            GLOBAL_SECTIONS["slurm"]().check_stages(out[k], src)
        try:  # a spec of the wrong shape or a name os.stat refuses: here, not a traceback where a stage looks
            for name in _named_paths(section, k, out[k]):
                if problem := long_name(name):
                    raise PipelineError(problem)
        except PipelineError as err:
            raise PipelineError(f"{src}: {section}.{k}: {err}") from None
    return out


def _named_paths(section: str, key: str, value) -> list:
    """The datasets or checkpoints a stage key names ([] for other keys); PipelineError for a dataset spec of the
    wrong shape (a number among the specs), now rather than when the stage reads it."""
    if section not in STAGES or value is None:
        return []
    ref = next((f.metadata.get("ref") for f in dataclasses.fields(STAGES[section].keys) if f.name == key), None)
    if ref == "data":
        from pipeline.data import mixture_parts

        return [part.name for part in mixture_parts(value)[0]]
    return (value if isinstance(value, list) else [value]) if ref else []


def _apply_override(data: dict, text: str) -> tuple[tuple[str, str], list[tuple[str, str]]]:
    """Set an override's value in the recipe's data. Returns the (section, dotted key) whose value it replaced whole,
    and the (section, key)s it set: the section key, and the key inside it it set (`ppo.trl_args.beta=0`: trl_args
    and trl_args.beta; `ppo.trl_args={beta: 0}`, which replaces trl_args: each key of the mapping too)."""
    dotted, equals, value_text = text.partition("=")
    parts = dotted.strip().split(".")
    if not equals or len(parts) < 2 or not all(parts):  # without `=` the runner took it for key=null
        raise PipelineError(f"override '{text}': expected section.key=value")
    try:
        value = yaml_load(value_text) if value_text.strip() else None
    except yaml.YAMLError as err:  # text that is not YAML (`*.jsonl`) stays text, an unclosed [, { or quote no
        if value_text.lstrip()[0] in "[{\"'":
            raise PipelineError(f"override '{text}': the value is not valid YAML "
                                f"({getattr(err, 'problem', None) or 'unclosed'}): close it or quote it") from None
        value = value_text
    node = data
    for p in parts[:-1]:
        if node.get(p) is None:
            node[p] = {}
        if not isinstance(node[p], dict):
            raise PipelineError(f"override '{text}': '{p}' is not a section")
        node = node[p]
    node[parts[-1]] = value
    inside = parts[2:3] or (list(map(str, value)) if isinstance(value, dict) else [])
    return (parts[0], ".".join(parts[1:])), [(parts[0], parts[1])] + [(parts[0], f"{parts[1]}.{k}") for k in inside]


def load_recipe(path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: recipe file not found")
    try:
        data = yaml_load(text_of(path))  # invalid UTF-8: one line naming the line
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or first_line(err)
        raise PipelineError(f"{path}:{line}: YAML syntax error: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")

    set_by: dict[tuple[str, str], str] = {}  # parsed here once: Recipe.set_by
    for text in overrides:
        (section, replaced), keys = _apply_override(data, text)
        # keys an earlier override set inside the value this one replaced are gone (`ppo.trl_args={x: 1}` after
        # `ppo.trl_args.beta=0`: no beta); the keys it set go last, in the order they were set
        set_by = {(s, k): by for (s, k), by in set_by.items()
                  if (s, k) not in keys and not (s == section and k.startswith(f"{replaced}."))}
        set_by.update(dict.fromkeys(keys, text))

    known = list(GLOBAL_SECTIONS) + list(STAGES)
    values = {}
    for section, raw in data.items():
        origins = {k: text for (s, k), text in set_by.items() if s == section and "." not in k}
        if section not in known:
            src = f"override '{next(iter(origins.values()))}'" if origins else str(path)
            raise PipelineError(f"{src}: unknown section '{section}'{closest(str(section), known)}")
        values[section] = _validate_section(section, raw, str(path), origins)

    def build(section):
        cls = GLOBAL_SECTIONS[section]()
        return cls(**values.get(section, {}))

    recipe = Recipe(path=path, run=build("run"), world=build("world"), tokenizer=build("tokenizer"),
                    model=build("model"), overrides=list(overrides), set_by=set_by, slurm=build("slurm"),
                    tools=build("tools"), generation=build("generation"),
                    stages={s: v for s, v in values.items() if s in STAGES})
    _check_world(recipe)
    from pipeline.models import check_section as check_model

    check_model(recipe)
    from pipeline.vllm_engine import check_section as check_generation

    check_generation(recipe)
    if recipe.tools.tools:
        from pipeline.tools import check_section

        check_section(dataclasses.asdict(recipe.tools), str(path), recipe)
    return recipe


def _check_world(recipe: Recipe) -> None:
    from pipeline.world_splits import BadWorldValue, check_world

    try:  # rates in [0, 1], sizes 0 or more, known skills: a ValueError when a split is built (a traceback)
        check_world(recipe.world)
    except BadWorldValue as err:  # named by the override that set a key at fault, if one did
        raise PipelineError(f"{source_of(recipe, 'world', *err.keys)}: {err}") from None


def section_docs(cls) -> dict[str, str]:
    """Help text of a pipeline-keys dataclass, for docs and --help."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def _first_sentence(text: str) -> str:
    text = " ".join(str(text).split())
    end = text.find(". ")
    return text if end < 0 else text[:end + 1]


def _default_text(f) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "required"


def stage_help(stage: str) -> str:
    """`pipeline/<stage>.py --help`: every key of the stage's section with its type, default and meaning (from the
    config classes' own field help), and which other sections take overrides."""
    from trl import ModelConfig

    spec = STAGES[stage]
    groups = [("pipeline keys", spec.keys)]
    if spec.config_class:
        groups.append((f"training keys ({spec.config_class.replace(':', '.')})", _config_class(spec.config_class)))
    if spec.peft:
        groups.append(("LoRA / quantization keys (trl.ModelConfig)", ModelConfig))
    fields = stage_fields(stage)
    lines = [f"Keys of the `{stage}` section (override any as {stage}.KEY=VALUE; values are YAML):"]
    shown = set()
    for title, cls in groups:
        rows = [f for f in dataclasses.fields(cls) if f.name in fields and f.name not in shown]
        if cls is not spec.keys and title.startswith("training") and "global_batch_size" in fields:
            rows += [f for f in dataclasses.fields(TrainingKeys)]
        if not rows:
            continue
        lines += ["", f"{title}:"]
        for f in rows:
            shown.add(f.name)
            meaning = _first_sentence(f.metadata.get("help", "")) if f.metadata else ""
            lines.append(f"  {f.name} ({type_name(fields[f.name][1])}, default {_default_text(f)})"
                         + (f": {meaning}" if meaning else ""))
    others = ", ".join(f"{section}.KEY" for section in GLOBAL_SECTIONS)
    lines += ["", f"Other sections take overrides too: {others} (e.g. run.output_dir=elsewhere "
                  f"model.dtype=bfloat16); see README.md, \"Recipe reference\"."]
    return "\n".join(lines)

