"""Image preference pairs for diffusion_dpo: the model's own draws labelled by the simulated annotator (held in
memory), or pairs of your own read from a metadata file (.jsonl, .json, .csv, .parquet, or a folder holding
metadata.jsonl / .csv / .parquet) or a hub dataset (`org/name[:split]`), in one of two layouts:

- Pick-a-Pic's, which the official Diffusion-DPO script reads: `caption`, `jpg_0`, `jpg_1`, `label_0` (1: jpg_0 is
  preferred, 0: jpg_1 is, 0.5: a tie, dropped as that script drops them);
- chosen / rejected: `caption` (or `prompt`, `text`), `chosen`, `rejected`.

An image is a file path relative to the metadata file or the image's bytes (a datasets Image column, {bytes, path},
as Pick-a-Pic's parquet files store them). Each is decoded once when the stage starts, so a missing, truncated or
unreadable image is one line naming the file and the row before anything is written, then again per batch: a large
set need not fit in memory.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.cli import PipelineError
from pipeline.files import file_kind, first_row

PICKAPIC = ("jpg_0", "jpg_1", "label_0")
CHOSEN_REJECTED = ("chosen", "rejected")
CAPTIONS = ("caption", "prompt", "text")


def layout(row: dict) -> str | None:
    """`pickapic`, `chosen` (chosen / rejected), or None: a row of captions only."""
    if "jpg_0" in row or "jpg_1" in row or "label_0" in row:
        return "pickapic"
    if "chosen" in row or "rejected" in row:
        return "chosen"
    return None


def pair_file(spec: str | None) -> Path | str | None:
    """The metadata file of `spec` (or the hub dataset id) when it holds preference pairs (its columns say), else
    None: no spec, the world, captions, or a spec that names nothing readable (section_problem says what was looked
    for). Only the columns are read: a parquet file's from its schema (Pick-a-Pic's shards hold their images), a
    .jsonl's or .csv's from its first row, a hub dataset's from its features."""
    from pipeline.image_files import columns, dataset_source, hub_rows

    if not spec or spec.startswith("images:"):
        return None
    try:
        path = dataset_source(spec)
    except PipelineError:  # names nothing readable: section_problem says so, naming the key
        return None
    if isinstance(path, str):  # a hub dataset id
        rows, _ = hub_rows(spec)
        return spec if len(rows) and layout(dict.fromkeys(columns(rows))) else None
    kind = file_kind(path)
    if kind in (None, "txt"):
        return None
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            return path if layout(dict.fromkeys(pq.read_schema(path).names)) else None
        except (OSError, ValueError):  # not a parquet file (ArrowInvalid): the stage's reader says so in one line
            return None
    row = first_row(path)
    return path if row is not None and layout(row) else None


class DrawnPairs:
    """Pairs held as tensors in [-1, 1] (the stage's own labelled draws)."""

    def __init__(self, chosen, rejected, captions: list[str]):
        self.chosen, self.rejected, self.captions = chosen, rejected, captions

    def __len__(self) -> int:
        return len(self.captions)

    def batch(self, idx: list[int]) -> tuple:
        return self.chosen[idx], self.rejected[idx], [self.captions[i] for i in idx]


class FilePairs:
    """Pairs of image files (or stored bytes; RowCells) checked by read_pairs, decoded per batch, in [-1, 1]."""

    def __init__(self, files, captions: list[str], where: list[str], path: Path, channels: int,
                 resolution: int):
        self.files, self.captions, self.where, self.path = files, captions, where, path
        self.channels, self.resolution = channels, resolution
        self.ties = self.resized = 0

    def __len__(self) -> int:
        return len(self.captions)

    def batch(self, idx: list[int]) -> tuple:
        import torch

        from pipeline.image_files import decode_checked

        x = torch.stack([decode_checked(file, self.channels, self.resolution, self.path, self.where[i])
                         for i in idx for file in self.files[i]]) * 2 - 1
        return x[0::2], x[1::2], [self.captions[i] for i in idx]


def _label(value, path: Path, where: str) -> float:
    try:
        label = float(value)
    except (TypeError, ValueError):
        label = None
    if label not in (0.0, 0.5, 1.0):
        raise PipelineError(f"{path}: {where}: label_0 must be 1 (jpg_0 preferred), 0 (jpg_1 preferred) or 0.5 (a "
                            f"tie), got {value!r}")
    return label


def pair_rows(source: Path | str, check=None) -> tuple:  # (RowCells of (chosen, rejected), captions, where, ties)
    """A pairs file's (or hub dataset's) rows read once: ((chosen, rejected) files, captions, where each came from,
    ties dropped), `check(file, where)` called on each image of a pair kept, in the same pass (a hub dataset's row is
    read once). A missing column, caption, label or image cell raises PipelineError naming the file and the row."""
    from pipeline.image_files import RowCells, cell_file, columns, table_rows

    rows, where = table_rows(source)
    path = Path(source)  # for messages, and the folder that relative image paths start from
    kind = layout(dict.fromkeys(columns(rows)))
    if kind is None:
        raise PipelineError(f"{path}: no preference pairs (rows of caption, jpg_0, jpg_1, label_0 or of caption, "
                            f"chosen, rejected)")

    def pair_of(row: dict, i: int) -> tuple | None:  # (chosen, rejected), or None for a tie
        if kind == "chosen":
            return tuple(cell_file(path, where[i], row.get(k), f"'{k}'") for k in CHOSEN_REJECTED)
        label = _label(row.get("label_0"), path, where[i])
        a, b = (cell_file(path, where[i], row.get(k), f"'{k}'") for k in ("jpg_0", "jpg_1"))
        return None if label == 0.5 else (a, b) if label == 1.0 else (b, a)

    captions, kept, indices, ties = [], [], [], 0
    for i, (row, w) in enumerate(zip(rows, where)):
        text = next((row[k] for k in CAPTIONS if row.get(k) is not None), None)
        if not isinstance(text, str):
            raise PipelineError(f"{path}: {w}: missing caption ('caption', 'prompt' or 'text': a string, \"\" for "
                                f"none)")
        pair = pair_of(row, i)
        if pair is None:
            ties += 1
            continue
        if check:
            for file in pair:
                check(file, w)
        captions.append(text.strip())
        kept.append(w)
        indices.append(i)
    if not kept:
        raise PipelineError(f"{path}: no pair with a preference ({ties} ties, label_0 0.5, dropped)")
    return RowCells(rows, indices, pair_of), captions, kept, ties  # a pair is read from its row when asked for


def read_pairs(source: Path | str, channels: int, resolution: int) -> FilePairs:
    """Every pair of a metadata file or hub dataset (pair_rows), each image decoded once as training will decode
    it, in the pass that reads the rows; ties dropped and counted (`.ties`)."""
    from pipeline.image_files import check_decodes

    path, resized = Path(source), 0

    def decodes(file, where: str):
        nonlocal resized
        resized += not check_decodes(file, path, where, channels, resolution)

    files, captions, where, ties = pair_rows(source, decodes)
    out = FilePairs(files, captions, where, path, channels, resolution)
    out.ties, out.resized = ties, resized
    return out


def section_problem(keys, rounds: int, own_file, eval_file) -> str | None:
    """What diffusion_dpo's section asks that its data cannot give (the stage and `--check` both say it);
    `own_file`, `eval_file`: pair_file of `dataset` and `eval_dataset` (own_file False: `dataset` was not read, its
    problem said already: --check's). A spec that names nothing readable is dataset_source's line, said before the
    stage loads a model (a `dataset` that is not pairs was then read as a captions file: "not found", or no judge)."""
    from pipeline.image_files import dataset_source
    from pipeline.images import WORLD_SPEC

    if own_file is None and keys.dataset != WORLD_SPEC:  # not pairs: captions, or nothing readable
        try:
            dataset_source(keys.dataset, WORLD_SPEC)
        except PipelineError as err:
            return f"dataset: {err}"
    if keys.eval_dataset and eval_file is None:
        try:
            dataset_source(keys.eval_dataset)  # held-out pairs: no world
        except PipelineError as err:
            return f"eval_dataset: {err}"
        return (f"eval_dataset: '{keys.eval_dataset}' holds no preference pairs (rows of caption, jpg_0, jpg_1, "
                f"label_0 or of caption, chosen, rejected)")
    if rounds > 1 and own_file:
        return (f"rounds: {rounds}: later rounds draw new candidates for the image judge to label; pairs of your own "
                f"({keys.dataset}) train in one round")
    return None


def implicit_accuracy(forward, pairs, *, batch_size: int, draws: int, seed: int) -> dict:
    """How many held-out pairs the tuned model prefers as labelled: Diffusion-DPO's implicit accuracy. `forward(chosen,
    rejected, captions, gen)` gives the tuned and the reference model's predictions and the target for both halves
    (as in training: a shared noise and timestep per pair). Per pair, the change of the winner's error against the
    reference minus the loser's, averaged over `draws` noisings with fixed seeds: below 0 is right, 0 (the start
    model: no change) half right. Returns the share with its 95% bootstrap interval and the mean change."""
    import torch

    from pipeline import metrics as M
    from pipeline.diffusion_train import pair_errors

    changes = torch.zeros(len(pairs))
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, len(pairs), batch_size):
        idx = list(range(start, min(start + batch_size, len(pairs))))
        chosen, rejected, captions = pairs.batch(idx)
        for _ in range(draws):
            with torch.no_grad():
                pred, ref, target = forward(chosen, rejected, captions, gen)
            model_w, model_l = pair_errors(pred, target).chunk(2)
            ref_w, ref_l = pair_errors(ref, target).chunk(2)
            changes[idx] += ((model_w - ref_w) - (model_l - ref_l)).cpu() / draws
    right = (changes < 0).float() + 0.5 * (changes == 0).float()
    return {**M.mean_ci(right.tolist(), seed=seed), "pairs": len(pairs), "draws": draws,
            "mean_error_change": float(changes.mean())}
