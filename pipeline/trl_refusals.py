"""Where a TRL refusal's values were set, for its one line: what a TRL config or trainer refuses (SFTTrainer's
assistant_only_loss on text rows, GRPOConfig's num_generations that does not divide the batch, ...) is a message
about TRL's own arguments, which the recipe file or an override on the command line may have set.

pipeline/key_checks.py's `source_of` names the override that set keys the caller knows; here the keys are those
behind the TRL arguments the message names. Which keys each override set is parsed once, by load_recipe
(Recipe.set_by).
"""

from __future__ import annotations

import dataclasses
import re

from pipeline.cli import first_line
from pipeline.key_checks import source_of


def arguments_from(key: str, fields: set[str], aliases: dict[str, str],
                   derived: dict[str, tuple[str, ...]]) -> set[str]:
    """The TRL arguments a section key gives their value: the key itself where it is one of TRL's `fields`
    (`sft.max_length`), a `trl_args.<name>` key's name (TRL's by definition, known to it or not), the TRL names the
    section maps the key to (`aliases`: TRL's name -> the section's key) and the arguments computed from it
    (`derived`: TRL's name -> the section keys it comes from)."""
    own = {key.removeprefix("trl_args.")} if key.startswith("trl_args.") else {key} & fields
    return own | {trl for trl, ours in aliases.items() if ours == key and trl in fields} | \
        {trl for trl, ours in derived.items() if key in ours}


def source_of_named(recipe, section: str, message: str, config_cls, aliases: dict[str, str] | None = None,
                    derived: dict[str, tuple[str, ...]] | None = None) -> str:
    """The last override that set a TRL argument (a field of `config_cls`, the dataclass TRL reads its arguments
    from) the message names as a whole word (`num_generations (3)`, `assistant_only_loss=True`), or a key it is
    computed from (`derived`: generation_batch_size from ppo.batch_size), as `override 'sft.x=1'`; else the recipe
    file. Only TRL's argument names count: "dataset" in a message is a word, not the key sft.dataset."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    keys = [key for s, key in recipe.set_by if s == section and any(
        re.search(rf"(?<!\w){re.escape(name)}(?!\w)", message)
        for name in arguments_from(key, fields, aliases or {}, derived or {}))]
    return source_of(recipe, section, *keys)


def trl_refusal(recipe, section: str, trl_class: str, err: Exception, config_cls,
                aliases: dict[str, str] | None = None, derived: dict[str, tuple[str, ...]] | None = None) -> str:
    """A TRL config's or trainer's refusal (`err`) as one line: where an argument it names was set, the section and
    the class (`override 'sft.assistant_only_loss=true': section 'sft' (SFTTrainer): You set ...`). `config_cls`: the
    config dataclass whose fields are TRL's argument names (SFTConfig for SFTTrainer)."""
    message = first_line(err)
    where = source_of_named(recipe, section, message, config_cls, aliases, derived)
    return f"{where}: section '{section}' ({trl_class}): {message}"
