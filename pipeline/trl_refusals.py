"""Where a TRL refusal's values were set, for its one line: what a TRL config or trainer refuses (SFTTrainer's
assistant_only_loss on text rows, GRPOConfig's num_generations that does not divide the batch, ...) is a message
about TRL's own keys, which the recipe file or an override on the command line may have set.

pipeline/key_checks.py's `source_of` names the override that set keys the caller knows; here the keys are the ones
the message names.
"""

from __future__ import annotations

import re

import yaml


def _names_set(override: str, section: str, aliases: dict[str, str]) -> set[str]:
    """The keys an override of `section` sets, by every name a refusal may call them: the key it names (`a.b.c=1`:
    c), a mapping value's keys (`ppo.trl_args={beta: 1}`: trl_args and beta), and TRL's names for a key the section
    maps to one of TRL's (`aliases`: TRL's name -> the section's)."""
    dotted, _, value_text = override.partition("=")
    parts = dotted.strip().split(".")
    if parts[0] != section or len(parts) < 2:
        return set()
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError:
        value = None
    names = {parts[-1]} | (set(map(str, value)) if isinstance(value, dict) else set())
    return names | {trl for trl, ours in aliases.items() if ours in names}


def source_of_named(recipe, section: str, message: str, aliases: dict[str, str] | None = None) -> str:
    """The last override that set a key of `section` the message names (a whole word: `num_generations (3)`,
    `assistant_only_loss=True`), as `override 'sft.x=1'`; else the recipe file."""
    for override in reversed(recipe.overrides):
        if any(re.search(rf"(?<!\w){re.escape(name)}(?!\w)", message)
               for name in _names_set(override, section, aliases or {})):
            return f"override '{override}'"
    return str(recipe.path)


def trl_refusal(recipe, section: str, trl_class: str, err: Exception, aliases: dict[str, str] | None = None) -> str:
    """A TRL config's or trainer's refusal (`err`) as one line: where a key it names was set, the section and the
    class (`override 'sft.assistant_only_loss=true': section 'sft' (SFTTrainer): You set ...`)."""
    message = str(err).splitlines()[0]
    return f"{source_of_named(recipe, section, message, aliases)}: section '{section}' ({trl_class}): {message}"
