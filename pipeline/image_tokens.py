"""The prompt length of a pretrained text-to-image pipeline's tokenizer (images.load_pipeline asks it)."""

from __future__ import annotations

from pipeline.cli import PipelineError

UNSET_LENGTH = 10**9  # a tokenizer's model_max_length above this is transformers' "not set" (int(1e30))


def cap_text_length(pipe, where: str) -> None:
    """A tokenizer saved without model_max_length: padding to its sentinel overflowed (OverflowError, in training and
    in the pipeline's own prompt encoding); its text encoder's max_position_embeddings (CLIP's 77) is the limit
    instead, or one line. IF pipelines pad to 77 tokens (images.MAX_TEXT_LENGTH) whatever their tokenizer says."""
    tokenizer = getattr(pipe, "tokenizer", None)
    if tokenizer is None or tokenizer.model_max_length < UNSET_LENGTH or pipe.__class__.__name__.startswith("IF"):
        return
    limit = getattr(getattr(getattr(pipe, "text_encoder", None), "config", None), "max_position_embeddings", None)
    if not limit:
        raise PipelineError(f"{where}: its tokenizer sets no model_max_length and its text encoder no "
                            f"max_position_embeddings: set model_max_length in tokenizer/tokenizer_config.json")
    tokenizer.model_max_length = limit
