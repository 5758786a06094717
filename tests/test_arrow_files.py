""".arrow data files (datasets' shards, `Dataset.save_to_disk`'s `data-00000-of-00001.arrow`, a file copied out of a
datasets cache, or pyarrow's IPC file format) read as the same rows as the JSON Lines file holding them; a file,
a folder of them, a glob and a LLaMA-Factory `file_name`; what does not read is one line naming the file."""

import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pytest

from pipeline import cli, data
from pipeline.fingerprints import hash_file
from pipeline.recipe import load_recipe
from conftest import tiny_recipe, write_jsonl
from test_formats import ALPACA

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def recipe(tmp_path):
    return load_recipe(tiny_recipe(tmp_path))


def chats(recipe) -> list[dict]:
    """Conversations with and without tool calls and a tools column: in Arrow every row has every key (null where
    the row has none), as datasets writes them."""
    return data.world_rows(recipe, "tool_sft")[:5] + data.world_rows(recipe, "sft")[:5]


def write_stream(path: Path, table: pa.Table, chunk: int | None = None) -> Path:
    with pa.ipc.new_stream(str(path), table.schema) as writer:
        writer.write_table(table, max_chunksize=chunk)
    return path


def write_ipc_file(path: Path, table: pa.Table, chunk: int | None = None) -> Path:
    with pa.ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table, max_chunksize=chunk)
    return path


@pytest.mark.parametrize("layout", ["saved_shard", "stream", "ipc_file", "feather_lz4", "folder", "glob"])
def test_arrow_rows_load_as_the_jsonl_rows(tmp_path, recipe, layout):
    """Before, `.arrow` was an unsupported file type. Both Arrow IPC formats read: the stream format (datasets writes
    it; `Dataset.from_file` reads only it) and the file format (`pa.ipc.new_file`, Feather 2)."""
    rows = chats(recipe)
    jsonl = write_jsonl(tmp_path / "c.jsonl", rows)
    ds = datasets.Dataset.from_json(jsonl)  # its columns: every row's (`from_list` takes the first row's)
    table = ds.data.table
    if layout == "saved_shard":  # the file save_to_disk writes, taken out of its folder
        ds.save_to_disk(str(tmp_path / "saved"))
        spec = tmp_path / "saved" / "data-00000-of-00001.arrow"
    elif layout == "stream":
        spec = write_stream(tmp_path / "c.arrow", table, chunk=3)
    elif layout == "ipc_file":
        spec = write_ipc_file(tmp_path / "c.arrow", table, chunk=3)
    elif layout == "feather_lz4":
        import pyarrow.feather as feather

        spec = tmp_path / "c.arrow"
        feather.write_feather(table, str(spec), compression="lz4")
    elif layout == "folder":  # shards without save_to_disk's state.json: every .arrow file, in name order
        spec = tmp_path / "shards"
        spec.mkdir()
        write_stream(spec / "a.arrow", table.slice(0, 4))
        write_ipc_file(spec / "b.arrow", table.slice(4))
    else:  # a glob over save_to_disk's shards
        ds.save_to_disk(str(tmp_path / "saved"), num_shards=2)
        spec = f"{tmp_path}/saved/*.arrow"
    assert data.load(str(spec), "chat", recipe).to_list() == data.load(jsonl, "chat", recipe).to_list()
    got, where, _ = data.read_rows(str(spec), recipe)
    assert [{k: v for k, v in r.items() if v is not None} for r in got] == \
        [{k: v for k, v in r.items() if v is not None} for r in rows]
    first = {"folder": "a.arrow row 1", "glob": f"{tmp_path}/saved/data-00000-of-00002.arrow row 1"}
    assert where[0] == first.get(layout, "row 1") and len(where) == len(rows)


def test_a_llamafactory_entry_with_an_arrow_file_loads(tmp_path, recipe):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps([ALPACA, ALPACA]))
    datasets.Dataset.from_list([ALPACA, ALPACA]).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "saved" / "data-00000-of-00001.arrow").rename(folder / "a.arrow")
    (folder / "dataset_info.json").write_text(json.dumps({"j": {"file_name": "a.json"},
                                                          "a": {"file_name": "a.arrow"}}))
    assert data.load(f"{folder}:a", "chat", recipe).to_list() == data.load(f"{folder}:j", "chat", recipe).to_list()
    assert data.read_rows(f"{folder}:a", recipe)[1] == ["a.arrow row 1", "a.arrow row 2"]


def test_the_fingerprint_of_an_arrow_file_is_its_hash(tmp_path, recipe):
    path = write_stream(tmp_path / "c.arrow", pa.table({"text": ["a", "b"]}))
    assert data.fingerprint(str(path), recipe) == hash_file(path)
    before = hash_file(path)
    write_stream(path, pa.table({"text": ["a", "c"]}))
    assert data.fingerprint(str(path), recipe) == hash_file(path) != before


def cache_folder(tmp_path, splits: dict) -> Path:
    """The folder `load_dataset` prepares in its cache_dir (dataset_info.json, `json-<split>.arrow`), offline from
    local JSON Lines files."""
    files = {name: write_jsonl(tmp_path / f"{name}.jsonl", rows) for name, rows in splits.items()}
    datasets.load_dataset("json", data_files=files, cache_dir=str(tmp_path / "cache"))
    (info,) = (tmp_path / "cache").rglob("dataset_info.json")
    return info.parent


def test_a_datasets_cache_folder_reads_its_train_split(tmp_path, recipe):
    """Before, the folder stopped with "cannot read the dataset saved here" (no state.json); read as a folder of
    Arrow files it would have mixed the test split in. Its train shards read in order; the fingerprint follows
    them, not the other splits."""
    rows = chats(recipe)
    folder = cache_folder(tmp_path, {"train": rows[:6], "test": rows[6:]})
    assert sorted(p.name for p in folder.glob("*.arrow")) == ["json-test.arrow", "json-train.arrow"]
    train_jsonl = write_jsonl(tmp_path / "train.jsonl", rows[:6])
    assert data.load(str(folder), "chat", recipe).to_list() == data.load(train_jsonl, "chat", recipe).to_list()
    assert data.read_rows(str(folder), recipe)[1][0] == "json-train.arrow row 1"
    before = data.fingerprint(str(folder), recipe)
    write_stream(folder / "json-test.arrow", pa.table({"text": ["another test split"]}))
    assert data.fingerprint(str(folder), recipe) == before
    # sharded: load_dataset's `<builder>-train-NNNNN-of-NNNNN.arrow` names, read in shard order
    table = datasets.Dataset.from_file(str(folder / "json-train.arrow")).data.table
    (folder / "json-train.arrow").unlink()
    write_stream(folder / "json-train-00001-of-00002.arrow", table.slice(3))
    write_stream(folder / "json-train-00000-of-00002.arrow", table.slice(0, 3))
    assert data.load(str(folder), "chat", recipe).to_list() == data.load(train_jsonl, "chat", recipe).to_list()
    assert data.fingerprint(str(folder), recipe) != before


def test_a_datasets_cache_folder_without_a_train_split_is_one_line(tmp_path, recipe):
    folder = cache_folder(tmp_path, {"validation": chats(recipe)[:2], "test": chats(recipe)[2:4]})
    with pytest.raises(cli.PipelineError, match=rf"^{folder}: a datasets cache folder without a train split \(has "
                                                rf"test, validation\)$"):
        data.load(str(folder), "chat", recipe)


def _offsets_past_the_data(path: Path) -> Path:
    """A stream whose string offsets point 1 GiB past the file: read without validation, this crashes the process
    (SIGBUS or SIGSEGV), no exception."""
    write_stream(path, pa.table({"text": ["x" * 77]}))
    raw = bytearray(path.read_bytes())
    at = raw.rfind(struct.pack("<ii", 0, 77))  # the body's offsets, after the metadata's buffer lengths
    raw[at:at + 8] = struct.pack("<ii", 0, 1 << 30)
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("damage, message", [
    ("not_arrow", "cannot read arrow: not an Arrow file"),
    ("truncated_stream", "cannot read arrow: "),
    ("truncated_file", "cannot read arrow: "),
    ("gzipped", "a compressed .arrow file is not read"),
    ("empty", "empty file"),
    ("no_rows", "no rows"),
])
def test_an_arrow_file_that_does_not_read_is_one_line(tmp_path, recipe, capsys, damage, message):
    table = pa.table({"text": ["a" * 50, "b" * 50]})
    path = tmp_path / ("c.arrow.gz" if damage == "gzipped" else "c.arrow")
    if damage == "not_arrow":
        path.write_text('{"text": "a JSON Lines file named .arrow"}\n')
    elif damage == "truncated_stream":
        path.write_bytes(write_stream(path, table).read_bytes()[:-40])
    elif damage == "truncated_file":
        path.write_bytes(write_ipc_file(path, table).read_bytes()[:-20])
    elif damage == "gzipped":
        import gzip

        path.write_bytes(gzip.compress(write_stream(tmp_path / "c.arrow", table).read_bytes()))
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        write_stream(path, table.slice(0, 0))
    with pytest.raises(SystemExit) as stop:
        cli.run_main(lambda argv: data.load(str(path), "text", recipe), [])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith(f"error: {path}: {message}") and err.count("\n") == 1, err


def test_a_corrupt_arrow_file_is_one_line_not_a_crash(tmp_path):
    """Every buffer is validated before a row is read: run in a process of its own, as a crash would end pytest."""
    path = _offsets_past_the_data(tmp_path / "c.arrow")
    code = ("import sys; from pathlib import Path; from pipeline.files import read_file; from pipeline.cli import "
            "PipelineError\ntry:\n    read_file(Path(sys.argv[1]))\nexcept PipelineError as err:\n    print(err)")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert done.returncode == 0 and done.stdout.startswith(f"{path}: cannot read arrow: ") and \
        done.stdout.count("\n") == 1, (done.returncode, done.stdout, done.stderr[-2000:])


@pytest.mark.parametrize("write", [write_stream, write_ipc_file])
def test_no_pickle_in_an_arrow_file_is_loaded(tmp_path, recipe, write):
    """pyarrow before 14.0.1 unpickled the metadata of an `arrow.py_extension_type` column (CVE-2023-47248): a file
    could run code when read. Such a column reads as its plain storage and the pickle stays unloaded."""
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    field = pa.field("text", pa.string(), metadata={b"ARROW:extension:name": b"arrow.py_extension_type",
                                                    b"ARROW:extension:metadata": pickle.dumps(Payload())})
    path = write(tmp_path / "c.arrow", pa.table({"text": ["a", "b"]}, schema=pa.schema([field])))
    assert data.load(str(path), "text", recipe)["text"] == ["a", "b"] and not marker.exists()
