"""What a checkpoint reference in a recipe names, told from names and the paths that exist (nothing hashed or
loaded): the one set of rules both the runner's early check (run.check_references) and the loading of a stage's
inputs (runs.resolve_checkpoint) follow."""

from __future__ import annotations

from pathlib import Path

from pipeline.cli import PipelineError
from pipeline.key_checks import source_of
from pipeline.stages import STAGES
from pipeline.values import closest


def key_source(recipe, key: str) -> str:
    """Where `key` (`stage.key`; "checkpoint": no key named) was set, for messages: its override, else the recipe."""
    section, _, name = key.partition(".")
    return source_of(recipe, section, name) if name else str(recipe.path)


def misspelt_stage(recipe, ref: str, key: str) -> None:
    """A bare name that is no stage and nothing here but close to a stage's name is a typo, not a hub id (`rewrd`
    was looked up on the hub, and failed there or only once the stages before it had run)."""
    if ref in (*recipe.stages, *STAGES, "model") or "/" in ref or Path(ref).expanduser().exists() or \
            (recipe.run_dir / ref).is_dir():  # tools and image judges look in the run folder first
        return
    if (near := closest(ref, [*STAGES, "model"])):
        raise PipelineError(f"{key_source(recipe, key)}: {key}: '{ref}' is not a stage of this recipe, a folder or a "
                            f"hub id{near}")


def reference_kind(recipe, ref: str | None, key: str = "checkpoint") -> str:
    """What `ref` names: "model" (the model section), "stage" (of this recipe, or a stage's name), "local" (an
    existing path) or "hub". A path that is missing, or a stage's name misspelt, cannot be a hub id and stops here in
    one line naming `key`; a hub id passes (it is looked for when a stage loads it)."""
    if not ref or ref == "model":
        return "model"
    if ref in recipe.stages or ref in STAGES:
        return "stage"
    if Path(ref).expanduser().exists():
        return "local"
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        named = f"{key}: " if key != "checkpoint" else ""
        raise PipelineError(f"{key_source(recipe, key)}: {named}checkpoint '{ref}' not found (not a stage, a folder "
                            f"or a hub id)")
    misspelt_stage(recipe, ref, key)
    return "hub"
