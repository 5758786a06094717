"""Checks of one recipe value as the recipe loads (pipeline/recipe.py calls them for every key of every section): floors
of numeric keys, numbers that are finite and fit in 64 bits, trackers, the values a TRL/transformers config accepts
from a list, and hints for unknown keys. Also where a key was set, for the lines that refuse it: the override
load_recipe recorded for it (Recipe.set_by), else the recipe file.

TRL's configs accept any string for keys their trainers check only when they start or at the first training step
(DPOConfig.loss_type is checked when the first loss is computed: a traceback mid-stage); the lists of valid values
come from the config classes themselves (a field's `choices`, or the values its help text lists), not from here.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings

from pipeline import reference_free
from pipeline.cli import PipelineError, first_line
from pipeline.values import closest

# Fields whose valid values TRL lists only in the help text (no `choices`): (config class name, key) -> the part of
# the help that lists them, each quoted 'so'. The trainers raise "Unknown loss type" at the first step; tests compare
# these lists with the trainers' code (tests/test_recipe.py, tests/test_trl_online.py).
HELP_LISTED = {("DPOConfig", "loss_type"): r"Possible values are:(.*?)\. If", ("GRPOConfig", "loss_type"):
               r"Supported values are (.*?)\. "}
# Values the pipeline adds to a config class's list: the dpo stage's reference-free losses (pipeline/reference_free.py)
ADDED_VALUES = {("DPOConfig", "loss_type"): reference_free.LOSSES}

# Keys of one section that users of another section write: (section, key) -> the hint added to "unknown key".
_PIPELINE = "a diffusers pipeline: a stage, a folder or a hub id"
KEY_HINTS = {
    ("diffusion", "init_from"): f"the diffusion stage starts from `pretrained` ({_PIPELINE}), not init_from",
    ("diffusion", "pretrained_model_name_or_path"): f"write `pretrained` ({_PIPELINE})",
    ("diffusion_dpo", "pretrained"): f"diffusion_dpo starts from `init_from` ({_PIPELINE}; default: the diffusion "
                                     f"stage)",
    ("diffusion_dpo", "pretrained_model_name_or_path"): f"write `init_from` ({_PIPELINE})",
}


def listed_values(config_class, key: str) -> list[str] | None:
    """The values `config_class` accepts for `key`, if it lists them; None when any value goes."""
    f = next((f for f in dataclasses.fields(config_class) if f.name == key), None)
    if f is None:
        return None
    if "choices" in f.metadata:
        return [str(c) for c in f.metadata["choices"]]
    if (config_class.__name__, key) in HELP_LISTED:
        listed = re.search(HELP_LISTED[config_class.__name__, key], f.metadata.get("help", ""), re.S)
        valid = re.findall(r"'(\w+)'", listed.group(1)) if listed else []
        return valid + list(ADDED_VALUES.get((config_class.__name__, key), ())) if valid else None
    return None


def choice_problem(config_class, key: str, value) -> str | None:
    """What is wrong with `value` (one value, or a list of them) for a key whose values the config class lists."""
    valid = listed_values(config_class, key)
    if not valid or value is None:
        return None
    for v in value if isinstance(value, (list, tuple)) else [value]:
        if str(v) not in valid:
            return f"'{v}' is not a {config_class.__name__} {key} (one of: {', '.join(valid)}){closest(str(v), valid)}"
    return None


def unknown_key_hint(section: str, key: str) -> str:
    """What to write instead of an unknown key that other sections have ("": no hint)."""
    hint = KEY_HINTS.get((section, key))
    return f": {hint}" if hint else ""


# Numeric keys whose value has a floor (checked when the recipe loads, before any stage starts): key -> (lowest
# allowed, what it means). Names shared by many config classes; a stage's own rules stay in its config class.
FLOORS = {
    "per_device_train_batch_size": (1, "at least 1"), "per_device_eval_batch_size": (1, "at least 1"),
    "gradient_accumulation_steps": (1, "at least 1"), "global_batch_size": (1, "at least 1"),
    "batch_size": (1, "at least 1"), "eval_batch_size": (1, "at least 1"), "heldout_batch_size": (1, "at least 1"),
    "learning_rate": (0, "0 or more"), "critic_learning_rate": (0, "0 or more"), "weight_decay": (0, "0 or more"),
    "num_train_epochs": (0, "0 or more"), "max_steps": (-1, "-1 (not set) or more"), "warmup_steps": (0, "0 or more"),
    "logging_steps": (0, "0 or more"), "save_steps": (0, "0 or more"), "eval_steps": (0, "0 or more"),
    "save_total_limit": (0, "0 or more"), "max_grad_norm": (0, "0 or more"), "max_length": (1, "at least 1"),
    "block_size": (2, "at least 2"), "max_new_tokens": (1, "at least 1"), "heldout_max_prompts": (1, "at least 1"),
    "heldout_max_new_tokens": (1, "at least 1"), "num_generations": (1, "at least 1"),
    "norm_max_pairs": (1, "at least 1"), "calibration_bins": (1, "at least 1"), "monitor_window": (1, "at least 1"),
    "rounds": (1, "at least 1"), "round_max_prompts": (1, "at least 1"), "round_max_new_tokens": (1, "at least 1"),
    "carbon_intensity_g_per_kwh": (0, "0 or more"), "length_split": (1, "at least 1"),
    "parallel_stages": (1, "at least 1"), "beta": (0, "0 or more"), "num_minibatches": (1, "at least 1"),
    "vocab_size": (1, "at least 1"), "min_frequency": (0, "0 or more"), "lora_rank": (1, "at least 1"),
    # slurm (also its stages' overrides and run.py's flags): sbatch took --nodes=0 and --signal=B:USR1@-5
    "nodes": (1, "at least 1"), "gpus_per_node": (0, "0 or more"), "procs_per_node": (1, "at least 1"),
    "cpus_per_task": (1, "at least 1"), "signal_seconds": (0, "0 or more"), "rdzv_timeout": (1, "at least 1"),
}
TRACKERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
            "trackio": ("trackio",), "comet_ml": ("comet_ml",), "clearml": ("clearml",), "dvclive": ("dvclive",),
            "swanlab": ("swanlab",), "neptune": ("neptune",), "codecarbon": ("codecarbon",)}


NAME_MAX = 255  # bytes in one file or folder name (ext4, XFS, APFS): os.stat raises on a longer one, is_file too
PATH_KEYS = {("run", "name"), ("run", "output_dir"), ("model", "name_or_path"), ("tokenizer", "name_or_path")}


def long_name(path: str) -> str | None:
    """What is wrong with a path or hub id that has a name longer than a file system takes; None when none is."""
    name = next((p for p in str(path).split("/") if len(p.encode()) > NAME_MAX), None)
    return name and f"'{name[:20]}...' is {len(name.encode())} bytes, longer than a file or folder name can be " \
                    f"({NAME_MAX})"


def number_problem(value) -> str | None:
    """Why a value (or a list of them) is a number no key means, or None. .inf, .nan, '1e999' and 10**30 are numbers
    to YAML: int(inf) raised in a config class, and torch, numpy and tokenizers take int64."""
    for number in value if isinstance(value, list) else [value]:
        if isinstance(number, float) and not math.isfinite(number):
            return "must be a finite number"
        if isinstance(number, int) and not -2**63 <= number < 2**63:
            return "must fit in 64 bits (below 2**63)"
    return None


def check_value(section: str, key: str, value, src, config_class=None) -> None:
    """One key's value as the recipe loads (file or override `src`); `config_class`: the TRL/transformers class a
    config key goes to, whose listed values (`choices`) are checked here, not at the trainer's first step."""
    if problem := number_problem(value):
        raise PipelineError(f"{src}: {section}.{key} {problem}, got {value!r}")
    if config_class is not None and (problem := choice_problem(config_class, key, value)):
        raise PipelineError(f"{src}: {section}.{key}: {problem}")
    floor = FLOORS.get(key)
    if floor and isinstance(value, (int, float)) and not isinstance(value, bool) and value < floor[0]:
        raise PipelineError(f"{src}: {section}.{key} must be {floor[1]}, got {value!r}")
    if key == "eval_fraction" and isinstance(value, (int, float)) and not 0 < value < 1:
        raise PipelineError(f"{src}: {section}.eval_fraction must be between 0 and 1 (exclusive), got {value!r}")
    if section == "run" and key == "carbon_country" and not re.fullmatch(r"[A-Za-z]{3}", str(value)):
        raise PipelineError(f"{src}: run.carbon_country must be a 3-letter ISO 3166 country code (e.g. USA, FRA, "
                            f"DEU), got {value!r}")
    if (section, key) in PATH_KEYS and value and (problem := long_name(value)):
        raise PipelineError(f"{src}: {section}.{key}: {problem}")
    if section == "run" and key == "launcher" and value:
        import shlex

        try:
            shlex.split(value)
        except ValueError as err:
            raise PipelineError(f"{src}: run.launcher: {err} in {value!r}") from None
    if key == "report_to":
        import importlib.util

        for name in [value] if isinstance(value, str) else value or []:
            if name in ("none", "all"):
                continue
            if name not in TRACKERS:
                raise PipelineError(f"{src}: {section}.report_to: unknown tracker '{name}' (one of: none, all, "
                                    f"{', '.join(TRACKERS)}){closest(str(name), TRACKERS)}")
            if not any(importlib.util.find_spec(m) for m in TRACKERS[name]):
                raise PipelineError(f"{src}: {section}.report_to: '{name}' is not installed "
                                    f"(pip install {TRACKERS[name][0]})")


def source_of(recipe, section: str, *keys: str) -> str:
    """Where a section's keys were set, for messages: the last override that set one of them (a key inside one too:
    a.b.c=1), as `override 'sft.lora_r=0'`, else the recipe file. A key may also be one inside a section key
    (`trl_args.beta`: set by `ppo.trl_args.beta=0` or `ppo.trl_args={beta: 0}`). What each override set is parsed
    once, by load_recipe (Recipe.set_by)."""
    return where_set(recipe, [(section, key) for key in keys])


def where_set(recipe, keys) -> str:
    """source_of for (section, key) pairs, of any sections: the last override that set one of them, else the recipe
    file."""
    texts = [text for key, text in recipe.set_by.items() if key in keys]  # in the order they were set
    return f"override '{texts[-1]}'" if texts else str(recipe.path)


def config_refusal(recipe, stage: str, config_class, values: dict, message: str) -> str:
    """A config class's refusal (Recipe.trainer_config) as one line naming where the value came from: the one section
    key without which the class builds, by its override when the command line set it (a key inside it too: a.b.c=1);
    else the section (a refusal of several keys together: by the last override that set one of them, if any)."""
    culprits = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key in (k for k in recipe.section(stage) if k in values):
            try:
                config_class(**{k: v for k, v in values.items() if k != key})
                culprits.append(key)
            except (ValueError, TypeError):
                pass
    if len(culprits) != 1:
        return f"{source_of(recipe, stage, *culprits)}: section '{stage}': {message}"
    key = culprits[0]
    named = f"{stage}.{message}" if message.startswith(f"{key} ") else None  # "max_steps must be ..."
    if (source := source_of(recipe, stage, key)) != str(recipe.path):  # an override
        return f"{source}: {named or message}"
    return f"{recipe.path}: {named or f'{stage}.{key}: {message}'}"


def key_prefix(recipe, section: str, *keys: str) -> str:
    """What goes before a key's name in a message: `<where the keys were set>: <section>.`; without a recipe (a caller
    that checks values alone) `<section>.`, or nothing."""
    if recipe is None:
        return f"{section}." if section else ""
    return f"{source_of(recipe, section, *keys)}: {section}."


def keys_at_fault(build, values: dict, keys) -> list[str]:
    """The keys among `keys` that build(values)'s refusal (ValueError, TypeError) is about: those without which it
    passes or refuses something else. A library's message names its own argument (peft's `task_type`), not our key."""
    def refusal(kept: dict) -> str | None:
        try:
            build(kept)
        except (ValueError, TypeError) as err:
            return str(err)
        return None

    first = refusal(values)
    return [k for k in keys if refusal({n: v for n, v in values.items() if n != k}) != first]


def refusal_line(recipe, section: str, build, values: dict, keys, err, what: str) -> str:
    """One line for a library's refusal `err` of a section's values together (build(values) raised it): the keys among
    `keys` it is about, each by where it was set; where that cannot be told, all of `keys` and every place that set
    one (not the last override of any: it may not hold the value at fault)."""
    culprits, message = keys_at_fault(build, values, keys), first_line(err)
    places = " and ".join(dict.fromkeys(source_of(recipe, section, k) for k in culprits or keys)) or str(recipe.path)
    if culprits:
        return f"{places}: {' and '.join(f'{section}.{k}' for k in culprits)}: {what}: {message}"
    return f"{places}: {section}: {what}" + (f" ({', '.join(keys)})" if keys else "") + f": {message}"
