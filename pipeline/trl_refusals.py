"""Where a TRL refusal's values were set, for its one line: what a TRL config or trainer refuses (SFTTrainer's
assistant_only_loss on text rows, GRPOConfig's num_generations that does not divide the batch, ...) is a message
about TRL's own arguments, which the recipe file or an override on the command line may have set.

pipeline/key_checks.py's `source_of` names the override that set keys the caller knows; here the keys are those
behind the TRL arguments the message names (of another section too: generation's vLLM settings). Which keys each
override set is parsed once, by load_recipe (Recipe.set_by).
"""

from __future__ import annotations

import dataclasses
import re

from pipeline.cli import first_line
from pipeline.key_checks import where_set


def arguments_from(section: str, key: str, refusing: str, fields: set[str], aliases: dict[str, str],
                   derived: dict[str, tuple[str, ...]]) -> set[str]:
    """The TRL arguments the recipe key `section.key` gives their value: those computed from it (`derived`: TRL's
    name -> the keys it comes from, as section.key, of any section: vLLM's tensor_parallel_size from
    generation.vllm_tensor_parallel_size) and, for a key of the `refusing` section, the key itself where it is one of
    TRL's `fields` (`sft.max_length`), a `trl_args.<name>` key's name (TRL's by definition, known to it or not) and
    the TRL names the section maps the key to (`aliases`: TRL's name -> the section's key)."""
    computed = {trl for trl, ours in derived.items() if f"{section}.{key}" in ours}
    if section != refusing:
        return computed
    own = {key.removeprefix("trl_args.")} if key.startswith("trl_args.") else {key} & fields
    return computed | own | {trl for trl, ours in aliases.items() if ours == key and trl in fields}


def source_of_named(recipe, section: str, message: str, config_cls, aliases: dict[str, str] | None = None,
                    derived: dict[str, tuple[str, ...]] | None = None) -> str:
    """The last override that set a TRL argument (a field of `config_cls`, the dataclass TRL reads its arguments
    from) the message names as a whole word (`num_generations (3)`, `assistant_only_loss=True`), or a key it is
    computed from (`derived`: generation_batch_size from ppo.batch_size), as `override 'sft.x=1'`; else the recipe
    file. Only TRL's argument names count: "dataset" in a message is a word, not the key sft.dataset."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    keys = [(s, key) for s, key in recipe.set_by if f"{s}.{key}" not in shadowed(recipe, section, derived or {})
            and any(re.search(rf"(?<!\w){re.escape(name)}(?!\w)", message)
                    for name in arguments_from(s, key, section, fields, aliases or {}, derived or {}))]
    return where_set(recipe, keys)


def shadowed(recipe, section: str, derived: dict[str, tuple[str, ...]]) -> set[str]:
    """Keys of other sections that give a TRL argument no value: the refusing section's trl_args holds one of its
    sources (trl_args is applied last: `ppo.trl_args.vllm_tensor_parallel_size` wins over generation's), whichever
    was set last or in the recipe file."""
    trl_args = (recipe.stages.get(section) or {}).get("trl_args") or {}
    prefix = f"{section}.trl_args."
    return {other for ours in derived.values()
            if any(k.startswith(prefix) and k.removeprefix(prefix) in trl_args for k in ours)
            for other in ours if not other.startswith(f"{section}.")}


def trl_refusal(recipe, section: str, trl_class: str, err: Exception, config_cls,
                aliases: dict[str, str] | None = None, derived: dict[str, tuple[str, ...]] | None = None) -> str:
    """A TRL config's or trainer's refusal (`err`) as one line: where an argument it names was set, the section and
    the class (`override 'sft.assistant_only_loss=true': section 'sft' (SFTTrainer): You set ...`). `config_cls`: the
    config dataclass whose fields are TRL's argument names (SFTConfig for SFTTrainer)."""
    message = first_line(err)
    where = source_of_named(recipe, section, message, config_cls, aliases, derived)
    return f"{where}: section '{section}' ({trl_class}): {message}"
