"""Captions against a word-level tokenizer, for the image stages and `--check`.

A new image model's tokenizer (images.build_tokenizer) is word-level: its vocabulary is the words of the captions it
was built on, and any other word reads as `<unk>`. A model reused with captions of other words (diffusion_dpo's
pairs or captions, held-out captions, `pretrained` fine-tuning) conditioned every such caption alike, silently; the
stages now refuse it in one line naming the caption's file and row, and `--check` says the same where the tokenizer
is cheap to know. Subword tokenizers (CLIP's, T5's) spell any word and are not checked.
"""

from __future__ import annotations

from pathlib import Path


def word_level(tokenizer) -> bool:
    """Whether a tokenizer is word-level (a new model's: images.build_tokenizer), whose vocabulary is the words of
    the captions it was built from; a subword one (CLIP's, T5's) spells any word."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)  # a transformers fast tokenizer's, or itself
    return type(getattr(backend, "model", None)).__name__ == "WordLevel"


def unknown_words(tokenizer, text: str) -> list[str]:
    """The words of `text` a word-level tokenizer reads as its unknown token, in order, each once."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)  # or a tokenizers.Tokenizer
    text = backend.normalizer.normalize_str(text) if backend.normalizer else text
    words = [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(text)] if backend.pre_tokenizer else text.split()
    return list(dict.fromkeys(w for w in words if backend.token_to_id(w) is None))


def caption_words_problem(tokenizer, rows) -> str | None:
    """The first of `rows` ((where, caption or list of captions)) with words a word-level tokenizer does not know,
    or None (always for a subword tokenizer). Every such word reads as `<unk>`, so captions that differ only in
    them condition the model alike: a model reused with captions of other words ignored them silently."""
    if not word_level(tokenizer):
        return None
    for where, text in rows:
        for caption in [text] if isinstance(text, str) else text:
            if isinstance(caption, str) and (unknown := unknown_words(tokenizer, caption)):
                return (f"{where}: caption '{caption}': the model's word-level tokenizer does not know "
                        f"{', '.join(map(repr, unknown[:5]))}{', ...' if len(unknown) > 5 else ''} (its words are "
                        f"those of the captions the model was built on; others all read as '<unk>', so the model "
                        f"cannot tell such captions apart): use its words, or train a new model on these captions")
    return None


def world_captions() -> list[tuple]:
    """(where, caption) of the digit world's training captions."""
    from pipeline import images

    return [(images.WORLD_SPEC, images.caption(*c)) for c in images.train_combos()]


def source_captions(source) -> list[tuple]:
    """(where, caption) of a training source: a metadata file's rows, or the world's full captions."""
    if hasattr(source, "where"):
        return [(f"{source.metadata}: {w}", c) for w, c in zip(source.where, source.captions)]
    return world_captions()


def ref_tokenizer(recipe, ref: str | None, keys=None, seen=()):
    """The word-level tokenizer of the pipeline a ref names, where --check can know it without loading a model: a
    new model's (`keys`: its section), built from its training captions as the stage builds it; a stage's or
    folder's saved tokenizer.json; a stage not trained yet, from its own ref. None otherwise (a hub id, a new model
    whose dataset does not read)."""
    from pipeline import images, runs

    if not ref:
        if keys is None or not hasattr(keys, "caption_column"):
            return None
        rows = [] if keys.dataset == images.WORLD_SPEC else dataset_captions(keys.dataset, keys.caption_column)
        if not rows and keys.dataset != images.WORLD_SPEC:
            return None  # its captions do not read (its stage says why): the new model's words are unknown
        return images.build_tokenizer([t for _, c in rows for t in ([c] if isinstance(c, str) else c)
                                       if isinstance(t, str)])
    if ref in recipe.stages and ref not in seen:
        folder = recipe.stage_dir(ref)
        if runs.read_manifest(folder) is not None and (folder / "model_index.json").is_file():
            return ref_tokenizer(recipe, str(folder))
        up = recipe.keys(ref)
        return ref_tokenizer(recipe, getattr(up, "pretrained", None) or getattr(up, "init_from", None), up,
                             (*seen, ref))
    file = Path(ref).expanduser() / "tokenizer" / "tokenizer.json"
    if not file.is_file():
        return None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(file))
    return tokenizer if word_level(tokenizer) else None


def dataset_captions(spec: str, caption_column: str | None = None) -> list[tuple]:
    """(where, caption) of an image dataset's rows, read without its images (--check; the stage reads them whole);
    [] when the rows do not read (said elsewhere)."""
    from pipeline import image_files
    from pipeline.cli import PipelineError

    try:
        source = image_files.dataset_source(spec)
        rows, where = image_files.table_rows(source)
    except PipelineError:
        return []
    names = image_files.columns(rows)
    column = caption_column or next((k for k in ("caption", "text") if k in names), None)
    if column not in names:
        return []
    texts = rows[column] if hasattr(rows, "column_names") else [row.get(column) for row in rows]
    return [(f"{source}: {w}", t) for w, t in zip(where, texts) if isinstance(t, (str, list, tuple))]
