"""Where a TRL refusal's values were set, for its one line: what a TRL config or trainer refuses (SFTTrainer's
assistant_only_loss on text rows, GRPOConfig's num_generations that does not divide the batch, ...) is a message
about TRL's own arguments, which the recipe file or an override on the command line may have set.

pipeline/key_checks.py's `source_of` names the override that set keys the caller knows; here the keys are the TRL
arguments the message names.
"""

from __future__ import annotations

import dataclasses
import re

import yaml


def trl_args_set(override: str, section: str) -> set[str]:
    """The keys of `<section>.trl_args` an override sets: `ppo.trl_args.beta=0` sets beta, `ppo.trl_args={beta: 0,
    x: 1}` beta and x."""
    dotted, _, value_text = override.partition("=")
    parts = dotted.strip().split(".")
    if parts[:2] != [section, "trl_args"]:
        return set()
    if len(parts) > 2:
        return {parts[2]}
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError:
        return set()
    return set(map(str, value)) if isinstance(value, dict) else set()


def source_of_trl_arg(recipe, section: str, key: str) -> str:
    """Where `<section>.trl_args.<key>` was set: the last override that set it, else the recipe file."""
    override = next((o for o in reversed(recipe.overrides) if key in trl_args_set(o, section)), None)
    return f"override '{override}'" if override else str(recipe.path)


def _arguments_set(override: str, section: str, fields: set[str], aliases: dict[str, str]) -> set[str]:
    """The TRL arguments an override of `section` sets, by TRL's names: the section key it sets where it is one of
    TRL's `fields` (`sft.max_length=1`; a key the section maps to another TRL name by that name, `aliases`: TRL's
    name -> the section's), and the trl_args keys it sets (TRL's by definition, known to it or not)."""
    dotted = override.partition("=")[0].strip().split(".")
    if dotted[0] != section or len(dotted) < 2:
        return set()
    named = {dotted[1]} | {trl for trl, ours in aliases.items() if ours == dotted[1]}
    return (named & fields) | trl_args_set(override, section)


def source_of_named(recipe, section: str, message: str, config_cls, aliases: dict[str, str] | None = None) -> str:
    """The last override that set a TRL argument (a field of `config_cls`, the dataclass TRL reads its arguments
    from) the message names as a whole word (`num_generations (3)`, `assistant_only_loss=True`), as `override
    'sft.x=1'`; else the recipe file. Only TRL's argument names count: "dataset" in a message is a word, not the
    key sft.dataset."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    for override in reversed(recipe.overrides):
        if any(re.search(rf"(?<!\w){re.escape(name)}(?!\w)", message)
               for name in _arguments_set(override, section, fields, aliases or {})):
            return f"override '{override}'"
    return str(recipe.path)


def trl_refusal(recipe, section: str, trl_class: str, err: Exception, config_cls,
                aliases: dict[str, str] | None = None) -> str:
    """A TRL config's or trainer's refusal (`err`) as one line: where an argument it names was set, the section and
    the class (`override 'sft.assistant_only_loss=true': section 'sft' (SFTTrainer): You set ...`). `config_cls`: the
    config dataclass whose fields are TRL's argument names (SFTConfig for SFTTrainer)."""
    message = str(err).splitlines()[0]
    where = source_of_named(recipe, section, message, config_cls, aliases)
    return f"{where}: section '{section}' ({trl_class}): {message}"
