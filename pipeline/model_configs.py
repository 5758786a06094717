"""The config of the causal LM a checkpoint holds, read before any of its weights load, so that what a stage checks of
a model (its positions, its kind, its size for --check's memory estimate) stops it before loading, downloading or
generating anything."""

from __future__ import annotations

from pipeline import hub, models


def config_source(path: str, revision: str | None = None) -> tuple[str, str | None]:
    """The model folder or hub id (and revision) whose config `path` stands for: a stage's merged model, an adapter's
    base as load_causal_lm finds it."""
    path = models.model_path(path)
    while models.is_adapter(path):
        path, revision = models.model_path(models.adapter_base(path)), None
    return path, revision


def read_config(recipe, path: str, revision: str | None = None):
    """The transformers config of the model at `path` (config_source's); OSError or ValueError where it cannot be
    read, for the caller to say."""
    from transformers import AutoConfig

    path, revision = config_source(path, revision)
    hub.online_for(path)  # for its effect: a hub id offline is read from the cache only, at once, as load_causal_lm
    return AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=recipe.model.trust_remote_code)


def checkpoint_config(recipe, path: str, revision: str | None = None):
    """The transformers config of the model at `path` (a folder, a stage's merged model, a hub id at `revision`; an
    adapter: its base's, as load_causal_lm finds it). None where it cannot be read: loading the model says why."""
    try:
        return read_config(recipe, path, revision)
    except (OSError, ValueError):
        return None
