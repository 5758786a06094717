"""Training images from files for the diffusion stage: a `metadata.jsonl` (or .csv, .parquet) of `file_name`
+ `caption` rows, files relative to it (Hugging Face's `imagefolder` layout; data/README.md), or in a parquet file
the images' bytes (a `datasets` Image column, {bytes, path} per row), or a hub dataset by its id (`org/name[:split]`,
diffusers' `--dataset_name`); a parquet file's and a hub dataset's rows are read from the datasets cache
(memory-mapped) when needed. Every image is decoded once when the stage starts (an unreadable, truncated or missing
file is one line naming the metadata file and the row, before anything is written), then again per batch, so a large
set need not fit in memory.

Decoding turns any image into the model's `L` or `RGB` the way it looks: 16-bit images are scaled to 8 bits
(PIL's `convert` clips them, nearly all white; 32-bit ones, float or beyond 16 bits, are refused in one line),
transparency is composited onto white (dropping the alpha channel would keep whatever colour hides under transparent
pixels), and an image of another size is resized (shorter side to the resolution, bilinear) and centre-cropped, as
diffusers' train_text_to_image.py does with `--center_crop`.
"""

from __future__ import annotations

import io
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageOps

from pipeline.cli import PipelineError, typed_line
from pipeline.files import file_kind, names_a_local_file, read_file, read_table

SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # PNG's 16-bit grey opens as one of these


# what PIL raises for an image it cannot read: OSError (UnidentifiedImageError too), ValueError, SyntaxError, and
# DecompressionBombError (an image of over ~179M pixels, or a damaged header that claims one)
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def as_model_image(im, channels: int, resolution: int):
    """A PIL image as the model sees it: mode `L` (channels 1) or `RGB`, resolution x resolution."""
    import numpy as np

    if im.getexif().get(0x0112, 1) != 1:  # a phone photo upright, as datasets' Image feature (diffusers') turns it
        im = ImageOps.exif_transpose(im)
    if im.mode == "F":  # 32-bit float: no scale says what white is (convert("L") clipped it, unscaled)
        raise ValueError("32-bit float image (mode F): no white level; save it as an 8- or 16-bit image")
    if im.mode in SIXTEEN_BIT:
        transparent = im.info.get("transparency")  # the grey value tRNS makes transparent
        values = np.asarray(im, dtype=np.float64)
        if im.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):  # was read as 16-bit
            raise ValueError(f"32-bit values {values.min():.0f} to {values.max():.0f} (mode I), not 16-bit's 0-65535: "
                             f"save it as 8 or 16 bits")
        im = Image.fromarray((np.clip(values, 0, 65535) / 257).round().astype(np.uint8))
        if isinstance(transparent, int):
            im.info["transparency"] = round(transparent / 257)
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        im = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
    im = im.convert("L" if channels == 1 else "RGB")
    if im.size != (resolution, resolution):
        scale = resolution / min(im.size)
        w, h = max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale))
        im = im.resize((w, h), Image.BILINEAR)
        left, top = (w - resolution) // 2, (h - resolution) // 2
        im = im.crop((left, top, left + resolution, top + resolution))
    return im


def open_image(file: Path | bytes):
    """A PIL image from a file, or from the bytes a metadata file stores (datasets' Image feature in a parquet)."""
    return Image.open(io.BytesIO(file) if isinstance(file, bytes) else file)


def decode(file: Path | bytes, channels: int, resolution: int):
    """An image file (or an image's stored bytes) as a C x R x R tensor in [0, 1]."""
    import numpy as np
    import torch

    with open_image(file) as im:
        arr = np.asarray(as_model_image(im, channels, resolution), dtype=np.float32) / 255.0
    t = torch.from_numpy(arr)
    return t[None] if channels == 1 else t.permute(2, 0, 1)


def decode_checked(file: Path | bytes, channels: int, resolution: int, metadata, where: str):
    """decode() in training: an image changed or removed since the stage checked it is one line naming the
    metadata file (or hub dataset) and the row."""
    try:
        return decode(file, channels, resolution)
    except UNREADABLE as err:
        raise PipelineError(f"{metadata}: {where}: {unreadable(getattr(file, 'name', file), err)}") from None


def unreadable(name: str | bytes, err: Exception) -> str:
    name = f"of {len(name)} stored bytes" if isinstance(name, bytes) else f"'{name}'"
    return f"cannot read image {name} ({typed_line(err, 100)})"


class FileImages:
    """Images and captions from files (checked by read_image_rows), decoded per batch. Images in [-1, 1]. A row's
    caption may be a list (several captions of one image): each draw picks one, as diffusers' scripts do. `files`:
    each row's image (a path, or the bytes stored in a metadata file or hub dataset), read from its row when asked."""

    def __init__(self, files: RowCells, captions: list, channels: int, resolution: int, where: list[str],
                 metadata: Path):
        self.files, self.captions, self.channels, self.resolution = files, captions, channels, resolution
        self.where, self.metadata, self.size = where, metadata, len(captions)
        self.resized = 0  # how many are not resolution x resolution (resized and cropped when decoded)

    def sample(self, n: int, gen) -> tuple:
        import torch

        idx = torch.randint(0, self.size, (n,), generator=gen).tolist()
        batch = [decode_checked(self.files[i], self.channels, self.resolution, self.metadata, self.where[i])
                 for i in idx]
        texts = [c if isinstance(c, str) else c[int(torch.randint(0, len(c), (1,), generator=gen))]
                 for c in (self.captions[i] for i in idx)]
        return torch.stack(batch) * 2 - 1, texts

    @property
    def texts(self) -> list[str]:
        """Every caption, a list's one by one (a new model's tokenizer takes its words from them)."""
        return [t for c in self.captions for t in ([c] if isinstance(c, str) else c)]


METADATA = ("metadata.jsonl", "metadata.csv", "metadata.parquet")  # what Hugging Face's imagefolder reads
SPLIT = "train"  # the split folder read in imagefolder's split layout (a validation/ or test/ beside it is not)


def metadata_file(spec: str) -> Path | None:
    """The metadata file a dataset spec names: the file itself, or a folder's metadata.jsonl / .csv / .parquet, or
    its train/ folder's (datasets' imagefolder split layout, as diffusers' --train_data_dir reads its train split)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        found = (folder / m for folder in (path, path / SPLIT) for m in METADATA)
        path = next((f for f in found if f.is_file()), path / METADATA[0])
    return path if path.is_file() else None


def dataset_source(spec: str, world: str | None = None) -> Path | str:
    """What an image stage reads for a dataset spec other than the world's (`world`, offered in the message; None for
    a key that takes no world): its metadata file (metadata_file) or a hub dataset id; else PipelineError saying what
    was looked for. The stages and --check ask this one."""
    if (path := metadata_file(spec)) is not None:
        return path
    if is_hub_id(spec):
        return spec
    folder = Path(spec).expanduser()
    if (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file():
        raise PipelineError(f"'{spec}': a datasets save_to_disk folder (Arrow), which the image stages do not read: "
                            f"write it with Dataset.to_parquet to a .parquet file (its images stored as bytes), or "
                            f"as image files with a metadata.jsonl")
    if folder.is_dir():
        raise PipelineError(f"'{spec}': no metadata.jsonl, .csv or .parquet in it or in its {SPLIT}/ folder (the "
                            f"imagefolder layout: rows of file_name and caption; data/README.md)")
    offered = f"{world}, " if world else ""
    raise PipelineError(f"'{spec}': not found (expected {offered}a .jsonl / .csv / .parquet file, a folder with "
                        f"metadata.jsonl, .csv or .parquet, or its {SPLIT}/ folder with one, or a hub dataset id)")


def _column(row: dict, named: str | None, defaults: tuple[str, ...]):
    return row.get(named) if named else next((row[k] for k in defaults if row.get(k) is not None), None)


def named_files(path: Path) -> list:
    """(value, size, mtime) of every existing file a metadata file's rows name (any column), for the runner's
    fingerprint: images replaced under the same names rerun the stage. Unreadable metadata: [] (the stage says why)."""
    out = []
    for value in _cell_names(path):
        value = value.get("path") if isinstance(value, dict) else value
        try:  # captions are values too: most name no file (or no possible one: OSError)
            st = (path.parent / value).stat() if isinstance(value, str) and value else None
        except (OSError, ValueError):
            continue
        if st is not None and (st.st_mode & 0o170000) == 0o100000:  # a regular file
            out.append((value, st.st_size, st.st_mtime_ns))
    return out


def _cell_names(path: Path):
    """Row by row, each cell that could name a file (text, or a stored image's {path}). A parquet file is read from
    those columns alone: its stored image bytes (Pick-a-Pic's shards hold GBs) are not read for a fingerprint."""
    if file_kind(path) == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            parquet = pq.ParquetFile(path)
            schema = parquet.schema_arrow
            text = {f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)}
            stored = {f.name for f in schema if pa.types.is_struct(f.type) and f.type.get_field_index("path") >= 0}
            names = [f.name if f.name in text else f"{f.name}.path" for f in schema if f.name in text | stored]
            for batch in parquet.iter_batches(columns=names):
                for row in zip(*(column.to_pylist() for column in batch.columns)):
                    yield from row
        except (OSError, ValueError):  # not a parquet file (ArrowInvalid): the stage's reader says so in one line
            return
        return
    try:
        rows, _ = table_rows(path)
    except PipelineError:
        return
    for row in rows:
        yield from row.values()


def cell_file(path: Path, where: str, value, column: str) -> Path | bytes:
    """The image a metadata file's cell names: a file relative to the metadata file, or its stored bytes (a datasets
    Image value, {bytes, path}: the bytes, else the file)."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if not isinstance(value, (str, bytes)) or not value:
        raise PipelineError(f"{path}: {where}: missing {column}: an image file's path, relative to {path.name}, "
                            f"or the image's bytes (a datasets Image column)")
    return value if isinstance(value, bytes) else path.parent / value


def check_decodes(file: Path | bytes, path: Path, where: str, channels: int, resolution: int) -> bool:
    """Decode one image as training will (a truncated file fails here, not in training: verify() passes cut JPEGs);
    False when it is not resolution x resolution (it is resized and cropped when decoded)."""
    try:
        with open_image(file) as im:
            right_size = im.size == (resolution, resolution)
            im.load()
            as_model_image(im, channels, resolution)
    except UNREADABLE as err:
        name = file if isinstance(file, bytes) or not file.is_relative_to(path.parent) else \
            str(file.relative_to(path.parent))  # as the row names it
        raise PipelineError(f"{path}: {where}: {unreadable(name, err)}") from None
    return right_size


def is_hub_id(spec: str) -> bool:
    """A spec that is no local file or folder and reads as a hub dataset id (`org/name`, optionally `:split`)."""
    return not Path(spec).expanduser().exists() and not spec.startswith("images:") and \
        not names_a_local_file(spec.partition(":")[0])


class RowCells:
    """What `pick(row, i)` reads from rows[i] for each of `indices` (a row's image, or a pair's two), read when asked
    for: FileImages and FilePairs hold this, so the image bytes of a hub dataset or parquet file stay in its cache."""

    def __init__(self, rows, indices: list[int], pick):
        self.rows, self.indices, self.pick = rows, indices, pick

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        return self.pick(self.rows[self.indices[k]], self.indices[k])

    def __iter__(self):
        return (self[k] for k in range(len(self)))


def undecoded(ds):
    """A datasets.Dataset whose Image columns read as their stored {bytes, path} (decoded when a batch needs them)."""
    import datasets

    for column, feature in ds.features.items():
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(column, datasets.Image(decode=False))
    return ds


@lru_cache(maxsize=2)
def hub_rows(spec: str) -> tuple:  # (datasets.Dataset, where each row came from)
    """The rows of a hub dataset (hub.load_dataset), as diffusers' `--dataset_name` reads it: images as their stored
    bytes or cached files, a row at a time from the dataset's memory-mapped cache (never all in memory at once)."""
    from pipeline import hub

    ds = undecoded(hub.load_dataset(spec))
    return ds, [f"row {i}" for i in range(1, len(ds) + 1)]


def table_rows(source: Path | str) -> tuple:  # (rows: a list of dicts or a datasets.Dataset, where each came from)
    """A metadata file's rows (a Path) or a hub dataset's (its id), with where each came from. A parquet file is read
    as a hub dataset is (memory-mapped by `datasets`): the images it stores are read with their row, when asked for."""
    if isinstance(source, str):
        return hub_rows(source)
    if file_kind(source) == "csv" and source.stat().st_size:
        ds, where = read_table(source, "csv", empty_is_text=True)  # captions as written: "" and "7" are text
        return ds.to_list(), where
    if file_kind(source) != "parquet" or source.stat().st_size == 0:
        return read_file(source)  # an empty file: read_file says so
    ds, where = read_table(source, "parquet")
    return undecoded(ds), where


def columns(rows) -> list[str]:
    """The column names of table_rows' rows: a dataset's (no row read), else the first row's keys."""
    return list(rows.column_names) if hasattr(rows, "column_names") else list(rows[0]) if rows else []


def read_image_rows(source: Path | str, resolution: int, channels: int, image_column: str | None = None,
                    caption_column: str | None = None, max_rows: int | None = None) -> FileImages:
    """The images of a metadata file (.jsonl, .json, .csv, .parquet) or a hub dataset (its id), each decoded once:
    a missing column or caption or an image that does not decode (missing, truncated, not an image) raises
    PipelineError naming the file and the line. Columns: `image_column` / `caption_column` (as diffusers'
    --image_column / --caption_column), else `file_name` or `image`, and `caption` or `text`. `max_rows`: the first
    rows only."""

    rows, where = table_rows(source)
    if max_rows is not None and len(rows) > max_rows:
        rows = rows[:max_rows] if isinstance(rows, list) else rows.select(range(max_rows))
        where = where[:max_rows]
    path = Path(source)  # for messages, and the folder that relative image paths start from
    if not rows:
        raise PipelineError(f"{path}: no rows")
    if image_column == "image" and "image" not in columns(rows) and "file_name" in columns(rows):
        image_column = "file_name"  # datasets' imagefolder shows a metadata file's file_name as its `image` column
    for key, named in (("image_column", image_column), ("caption_column", caption_column)):
        if named and named not in columns(rows):
            raise PipelineError(f"{path}: {where[0]}: no column '{named}' (diffusion.{key}; the row has "
                                f"{', '.join(map(repr, columns(rows))) or 'no columns'})")
    image_name = f"'{image_column}'" if image_column else "'file_name' (or 'image')"
    caption_name = f"'{caption_column}'" if caption_column else "'caption' (or 'text')"

    def image_of(row: dict, i: int) -> Path | bytes:
        return cell_file(path, where[i], _column(row, image_column, ("file_name", "image")), image_name)

    captions, resized = [], 0
    for i, (row, w) in enumerate(zip(rows, where)):
        file = image_of(row, i)
        text = _column(row, caption_column, ("caption", "text"))
        # an empty caption is the empty prompt: that image trains unconditionally (what caption dropout does), as
        # diffusers' train_text_to_image.py takes it; a missing one (no such column, null) is an error
        if isinstance(text, (list, tuple)) and text and all(isinstance(t, str) for t in text):
            text = [t.strip() for t in text]  # several captions: one is drawn each time the image is
        elif not isinstance(text, str):
            raise PipelineError(f"{path}: {w}: missing caption ({caption_name}: a string, \"\" for none, or a list of "
                                f"them; the row has {', '.join(map(repr, row)) or 'no columns'})")
        resized += not check_decodes(file, path, w, channels, resolution)
        captions.append(text.strip() if isinstance(text, str) else text)
    out = FileImages(RowCells(rows, list(range(len(rows))), image_of), captions, channels, resolution, where, path)
    out.resized = resized
    return out
