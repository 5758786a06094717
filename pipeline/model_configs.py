"""The config of the causal LM a checkpoint holds, read before any of its weights load, so that what a stage checks of
a model (its positions, its kind) stops it before loading, downloading or generating anything."""

from __future__ import annotations

from pipeline import hub, models


def checkpoint_config(recipe, path: str, revision: str | None = None):
    """The transformers config of the model at `path` (a folder, a stage's merged model, a hub id at `revision`; an
    adapter: its base's, as load_causal_lm finds it). None where it cannot be read: loading the model says why."""
    from transformers import AutoConfig

    path = models.model_path(path)
    while models.is_adapter(path):
        path, revision = models.model_path(models.adapter_base(path)), None  # as load_causal_lm finds its base
    hub.online_for(path)  # for its effect: a hub id offline is read from the cache only, at once, as load_causal_lm
    try:
        return AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=recipe.model.trust_remote_code)
    except (OSError, ValueError):
        return None
