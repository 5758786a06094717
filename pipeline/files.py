"""Local data files and folders read into rows, each with where it came from (`line N`, `row N`), for the
messages that name a bad row: JSON Lines, JSON, CSV and plain text (each optionally .gz), Parquet and Arrow (the IPC
stream format `datasets` writes, e.g. save_to_disk's `data-00000-of-00001.arrow`, or the IPC file format), and folders
saved with `datasets.save_to_disk` or holding such files. pipeline/data.py resolves dataset specs to these."""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
from pathlib import Path

from pipeline.cli import PipelineError, first_line, typed_line
from pipeline.fingerprints import hash_folder

FILE_TYPES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv",
              ".txt": "txt"}
TABLES = ("parquet", "arrow")  # read memory-mapped in place, so never compressed


BUILT_IN_SPECS = ("world:", "images:")  # the task world's splits (world_splits.py), the digit world (images.py)


def names_a_local_file(spec: str) -> bool:
    """Whether a spec that is no file or folder here was meant as one (a path, or a data file's name) rather than a
    hub dataset id (`org/name`) or a built-in dataset (`world:sft`, `images:digits`)."""
    if spec.startswith(BUILT_IN_SPECS):
        return False
    return spec.startswith((".", "/", "~")) or bool(file_kind(Path(spec))) or spec.count("/") != 1


def text_of(path: Path) -> str:
    """The file's text (gzip-compressed when it ends in .gz) without the byte order mark some editors (Windows
    Notepad, Excel's "CSV UTF-8") write first; invalid UTF-8 is named with its line."""
    raw = gzip.open(path, "rb").read() if path.suffix.lower() == ".gz" else path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:  # err.object: the bytes after the mark
        line = err.object[:err.start].count(b"\n") + 1
        raise PipelineError(f"{path}: line {line}: invalid UTF-8 (byte 0x{err.object[err.start]:02x}); save the file "
                            f"as UTF-8") from None


def file_kind(path: Path) -> str | None:
    """The file's type by its name (a FILE_TYPES value; `x.jsonl.gz` is jsonl), or None for any other name."""
    suffix = Path(path.name[:-3]).suffix if path.name.lower().endswith(".gz") else path.suffix
    return FILE_TYPES.get(suffix.lower())


def _lines(text: str) -> list[str]:
    """The text's lines, split at line feeds alone, as JSON Lines and the line numbers in errors count them:
    `str.splitlines` also splits at U+2028, U+2029 and U+0085, which a JSON string may hold unescaped."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def jsonl_rows(path: Path, text: str) -> tuple[list[dict], list[str]]:
    """The rows of JSON Lines `text` read from `path` and where each came from (`line N`); a line that is not a JSON
    object raises PipelineError naming the file and the line."""
    rows, where = [], []
    for lineno, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise PipelineError(f"{path}: line {lineno}: invalid JSON ({err.msg})") from None
        if not isinstance(row, dict):
            raise PipelineError(f"{path}: line {lineno}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
        where.append(f"line {lineno}")
    return rows, where


def read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    """A JSON Lines file's rows (gzip-compressed when it ends in .gz) and where each came from (`line N`)."""
    return jsonl_rows(path, text_of(path))


def txt_rows(text: str, split: str) -> tuple[list[dict], list[str]]:
    """Plain text: one document per blank-line-separated block (`paragraph`) or per line (`line`)."""
    rows, where, start = [], [], 1
    if split == "line":
        for lineno, line in enumerate(_lines(text), 1):
            if line.strip():
                rows.append({"text": line.strip()})
                where.append(f"line {lineno}")
        return rows, where
    block: list[str] = []
    for lineno, line in enumerate(_lines(text) + [""], 1):
        if line.strip():
            if not block:
                start = lineno
            block.append(line)
        elif block:
            rows.append({"text": "\n".join(block).strip()})
            where.append(f"line {start}")
            block = []
    return rows, where


def read_file(path: Path, text_split: str = "paragraph") -> tuple[list[dict], list[str]]:
    """A local file's rows and where each came from; plain text split into documents by `text_split`."""
    kind = file_kind(path)
    if kind is None:
        raise PipelineError(f"{path}: unsupported file type '{path.suffix}' (use {', '.join(FILE_TYPES)}, "
                            f"each but {' and '.join('.' + t for t in TABLES)} optionally .gz)")
    if path.stat().st_size == 0:
        raise PipelineError(f"{path}: empty file")
    if kind in ("jsonl", "json", "txt"):
        text = text_of(path)
        if kind == "txt":
            return txt_rows(text, text_split)
        if kind == "jsonl":
            return jsonl_rows(path, text)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            try:  # JSON Lines saved with a .json name
                return jsonl_rows(path, text)
            except PipelineError:
                raise PipelineError(f"{path}: line {err.lineno}: invalid JSON ({err.msg})") from None
        rows = json_rows(obj)
        if rows is None:
            raise PipelineError(f"{path}: expected a list of JSON objects (one per row); {_what_json_holds(obj)}")
        return rows, [f"row {i}" for i in range(1, len(rows) + 1)]
    ds, where = read_table(path, kind)
    try:
        return arrow_rows(ds), where
    except Exception as err:  # a value the table's features cannot decode
        raise PipelineError(f"{path}: cannot read {kind}: {first_line(err)}") from None


def arrow_rows(ds) -> list[dict]:
    """A datasets.Dataset's rows (a Parquet or Arrow file, a saved or hub dataset) without the nulls Arrow filled in:
    it gives a column's objects one struct type, each with every key any row's has, null where it had none (a call's
    arguments and a tool's schema would get other rows' keys). Only keys inside a cell go: a column's null is its
    row's "no value", as a key a JSON row lacks. JSON rows are read with Python's json: their nulls are the user's."""
    return [{column: _without_nulls(value) for column, value in row.items()} for row in ds.to_list()]


def _without_nulls(value):
    if isinstance(value, dict):  # a message's null content stays: a reply of tool calls alone, as TRL writes it
        return {k: _without_nulls(v) for k, v in value.items() if v is not None or (k == "content" and "role" in value)}
    return [_without_nulls(v) for v in value] if isinstance(value, list) else value


_JSON_TYPES = {str: "string", int: "number", float: "number", bool: "boolean", type(None): "null"}


def _what_json_holds(obj) -> str:
    """What a .json file without rows holds, for its error."""
    if isinstance(obj, list):
        return f"row {next(i for i, r in enumerate(obj, 1) if not isinstance(r, dict))} is not an object"
    if isinstance(obj, dict):
        return f"an object with keys {', '.join(obj) or 'none'}"
    return f"a JSON {_JSON_TYPES.get(type(obj), type(obj).__name__)}"


def _message(value) -> bool:
    return isinstance(value, dict) and ("role" in value or {"from", "value"} <= value.keys())


def json_rows(obj) -> list[dict] | None:
    """A .json file's rows: a list of objects; an object whose one value is that list ({"data": [...]}); an object of
    columns (lists of one length), as datasets' json builder reads one; else an object without lists of rows is one
    row (JSON Lines of one line; a row's messages are not rows). None: neither (a list of numbers, an object beside
    its rows, an empty object)."""
    if isinstance(obj, list):
        return obj if all(isinstance(row, dict) for row in obj) else None
    if not isinstance(obj, dict) or not obj:
        return None
    lists = [v for v in obj.values() if isinstance(v, list)]
    columns = len(lists) == len(obj) and len({len(v) for v in lists}) == 1
    holds_rows = any(isinstance(x, dict) and not _message(x) for v in lists for x in v)
    if holds_rows and len(obj) == 1:
        return lists[0] if all(isinstance(x, dict) for x in lists[0]) else None
    if columns and (holds_rows or not any(isinstance(x, dict) for v in lists for x in v)):
        return [dict(zip(obj, row)) for row in zip(*lists)]
    return None if holds_rows else [obj]


def first_row(path: Path) -> dict | None:
    """A local file's first row, for its columns. A .jsonl's first object line and a .csv's header and first record
    (a quoted field may run over lines) are read alone, so a large file is not read whole (its later rows are checked
    when a stage reads them); any other file is read whole. A file without a row is None; one whose first row does
    not read is read_file's one-line error, naming its line."""
    kind = file_kind(path)
    if kind in ("jsonl", "csv"):
        try:
            with (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rb") as raw, \
                    io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as f:
                if kind == "csv":
                    row = next(csv.DictReader(f), None)
                else:
                    line = next((line for line in f if line.strip()), None)
                    row = line and jsonl_rows(path, line)[0][0]
            if row is not None:
                return row
        except (UnicodeDecodeError, csv.Error, PipelineError):
            pass  # read_file names the line
    rows, _ = read_file(path)
    return rows[0] if rows else None


def read_table(path: Path, kind: str, empty_is_text: bool = False) -> tuple:  # (datasets.Dataset, each row's place)
    """A non-empty .csv, .parquet or .arrow file as a memory-mapped datasets.Dataset (rows read when asked for), and
    where each row came from; a file that does not parse is one line naming it. A CSV's cells are the text they hold:
    a CSV has no types, and pandas' guessing read the answer "08" as 8, "3.10" as 3.1 and "NA" or "None" as no answer
    (margins, scores and labels are read from text where they are used). An empty cell is None (empty_is_text: "",
    as an image's empty caption)."""
    import datasets

    options = {}
    if kind == "csv":
        import pandas

        text = text_of(path)  # names the line of invalid UTF-8 before pandas does
        try:  # the names pandas gives the columns (an unnamed index column is "Unnamed: 0", a repeated name "a.1")
            header = pandas.read_csv(io.StringIO(text), nrows=0).columns
        except Exception as err:
            raise PipelineError(f"{path}: cannot read csv: {first_line(err)}") from None
        options = {"keep_default_na": False, "na_values": [] if empty_is_text else [""],
                   "features": datasets.Features({name: datasets.Value("string") for name in header})}
    if kind in TABLES and path.name.lower().endswith(".gz"):
        raise PipelineError(f"{path}: a compressed .{kind} file is not read (.{kind} files are read in place, "
                            f"memory-mapped); decompress it (gunzip)")
    try:
        ds = arrow_dataset(path) if kind == "arrow" else datasets.Dataset.from_parquet(str(path)) \
            if kind == "parquet" else datasets.Dataset.from_csv(str(path), **options)
    except PipelineError:
        raise
    except Exception as err:  # pyarrow/pandas parse errors
        raise PipelineError(f"{path}: cannot read {kind}: {first_line(err)}") from None
    if kind == "csv":
        starts = csv_record_lines(text)[1:]  # the header's line first
        if len(starts) == len(ds):
            return ds, [f"line {n}" for n in starts]
        return ds, [f"line {i + 2}" for i in range(len(ds))]  # a parse the csv module disagrees on
    return ds, [f"row {i + 1}" for i in range(len(ds))]


def csv_record_lines(text: str) -> list[int]:
    """The line each record of a CSV text starts on (a quoted field may run over lines). A line of nothing but spaces
    and tabs (or nothing) is no record, as pandas skips it; a quoted blank ("  ") is one."""
    last = [""]  # the line the reader took last: a record's final line, blank only for a blank record

    def lines():
        for line in io.StringIO(text, newline=""):
            last[0] = line
            yield line

    reader, starts, end = csv.reader(lines()), [], 0
    for _ in reader:
        if last[0].strip(" \t\r\n"):
            starts.append(end + 1)
        end = reader.line_num
    return starts


ARROW_FILE, ARROW_STREAM = b"ARROW1", b"\xff\xff\xff\xff"  # how each Arrow IPC format starts


def arrow_dataset(path: Path):  # datasets.Dataset
    """An .arrow file as a datasets.Dataset, memory-mapped: the IPC stream format (what `datasets` writes: its
    `Dataset.from_file` and LLaMA-Factory's `load_dataset("arrow")` read it) or the IPC file format (`pa.ipc.new_file`,
    Feather 2: `load_dataset("arrow")` reads it, `Dataset.from_file` does not). Every buffer is validated first: a
    corrupt file read unchecked can crash the process (SIGSEGV). Arrow holds no code: nothing is unpickled."""
    import datasets
    import pyarrow as pa
    from datasets.fingerprint import generate_random_fingerprint
    from datasets.table import InMemoryTable, MemoryMappedTable

    with open(path, "rb") as f:
        head = f.read(len(ARROW_FILE))
    try:
        if head == ARROW_FILE:  # the table's buffers still point into the memory map: nothing is copied
            table = InMemoryTable(pa.ipc.open_file(pa.memory_map(str(path))).read_all())
        else:
            table = MemoryMappedTable.from_file(str(path))
        table.table.validate(full=True)
    except (pa.ArrowException, OSError):
        if head != ARROW_FILE and not head.startswith(ARROW_STREAM):
            raise PipelineError(f"{path}: cannot read arrow: not an Arrow file (neither the IPC stream format, which "
                                f"datasets writes, nor the IPC file format)") from None
        raise
    # an in-memory table is hashed whole for its fingerprint: a random one instead (nothing is cached from it)
    fingerprint = None if isinstance(table, MemoryMappedTable) else generate_random_fingerprint()
    return datasets.Dataset(table, fingerprint=fingerprint)


def read_folder(path: Path, text_split: str = "paragraph") -> tuple[list[dict], list[str]]:
    """A folder saved with `datasets.save_to_disk` (its train split), a `datasets` cache folder (its train split's
    Arrow files), or every data file in it, in name order (plain text split by `text_split`, as a single file's)."""
    if (shards := cache_train_files(path)) is not None:
        return read_files(shards, text_split, lambda f: f.name)
    if is_saved_dataset(path):
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except (OSError, ValueError, KeyError, TypeError) as err:  # state.json or the Arrow files missing or broken
            raise PipelineError(f"{path}: cannot read the dataset saved here ({typed_line(err, 200)})") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise PipelineError(f"{path}: a saved DatasetDict without a 'train' split (has {list(ds)})")
            ds = ds["train"]
        rows = arrow_rows(ds)
        return rows, [f"row {i}" for i in range(1, len(rows) + 1)]
    files = data_files(path)
    if not files:
        raise PipelineError(f"{path}: folder holds no saved dataset and no {'/'.join(FILE_TYPES)} files")
    return read_files(files, text_split, lambda f: f.name)


def is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()


def cache_train_files(path: Path) -> list[Path] | None:
    """The train split's files of a `datasets` cache folder (what `load_dataset` prepares under its cache_dir:
    `dataset_info.json` and `<builder>-<split>.arrow` or `<builder>-<split>-NNNNN-of-NNNNN.arrow`, no `state.json`),
    in shard order; None for any other folder. A cache folder without a train split stops in one line."""
    if not (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
        return None
    # a split name has no '-' (datasets' rule), so it is the last part of the name without its shard suffix
    parts = {a: re.sub(r"-\d{5}-of-\d{5}$", "", a.stem).rpartition("-") for a in sorted(path.glob("*.arrow"))}
    splits = {a: split for a, (builder, dash, split) in parts.items() if builder and dash}
    if not splits:
        return None  # not a cache folder: read_folder says what is wrong with it as a saved dataset
    if "train" not in splits.values():
        raise PipelineError(f"{path}: a datasets cache folder without a train split (has "
                            f"{', '.join(sorted(set(splits.values())))})")
    return [a for a, split in splits.items() if split == "train"]


def data_files(path: Path) -> list[Path]:
    """The files read_folder reads from a folder that is no saved dataset: its data files, not its subfolders'."""
    return sorted(p for p in path.iterdir() if p.is_file() and file_kind(p))


def folder_fingerprint(path: Path) -> str:
    """A data folder's fingerprint over what read_folder reads: a cache folder's train files, a saved dataset whole,
    else its data files (a folder of other things, `/` even, is not walked; for a folder of data files alone it is
    the whole folder's)."""
    if (shards := cache_train_files(path)) is not None:
        return hash_folder(path, shards)
    return hash_folder(path) if is_saved_dataset(path) else hash_folder(path, data_files(path))


def read_files(files: list[Path], text_split: str, label) -> tuple[list[dict], list[str]]:
    """Every file's rows in order (a folder's or a glob's), each row's `where` led by `label(file)`."""
    rows, where = [], []
    for f in files:
        r, w = read_file(f, text_split)
        rows += r
        where += [f"{label(f)} {x}" for x in w]
    return rows, where
