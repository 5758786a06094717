import json

import datasets
import pytest

from pipeline import data
from pipeline.cli import PipelineError
from pipeline.recipe import load_recipe
from conftest import tiny_recipe, write_jsonl

CHATS = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Sure! The answer is 1."}]},
    {"messages": [{"role": "system", "content": "be kind"}, {"role": "user", "content": "add 1 and 2"},
                  {"role": "assistant", "content": "Sure! The answer is 3."}]},
]


@pytest.fixture()
def recipe(tmp_path):
    return load_recipe(tiny_recipe(tmp_path))



@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "saved", "folder"])
def test_every_local_format_loads_chats(tmp_path, recipe, fmt):
    ds = datasets.Dataset.from_list(CHATS)
    if fmt == "jsonl":
        spec = write_jsonl(tmp_path / "c.jsonl", CHATS)
    elif fmt == "json":
        spec = tmp_path / "c.json"
        spec.write_text(json.dumps(CHATS))
    elif fmt == "parquet":
        spec = tmp_path / "c.parquet"
        ds.to_parquet(str(spec))
    elif fmt == "csv":  # CSV cells hold the messages as JSON text
        spec = tmp_path / "c.csv"
        datasets.Dataset.from_list([{"messages": json.dumps(r["messages"])} for r in CHATS]).to_csv(str(spec))
    elif fmt == "saved":
        spec = tmp_path / "saved"
        ds.save_to_disk(str(spec))
    else:
        spec = tmp_path / "folder"
        spec.mkdir()
        write_jsonl(spec / "a.jsonl", CHATS[:1])
        write_jsonl(spec / "b.jsonl", CHATS[1:])
    loaded = data.load(str(spec), "chat", recipe)
    assert len(loaded) == 2
    assert loaded[1]["messages"][-1] == {"role": "assistant", "content": "Sure! The answer is 3."}


def test_csv_cells_of_json_messages_and_history_read_as_they_do_in_json_lines(tmp_path, recipe):
    """A CSV holds conversational prompt/completion rows (sft; kto with a label) and Alpaca's history as JSON text:
    prompt and completion were trained as that literal JSON, and a history cell stopped the stage."""
    from pipeline import unpaired

    prompt, completion = [{"role": "user", "content": "2 + 3?"}], [{"role": "assistant", "content": "5"}]
    path = write_csv(tmp_path / "pc.csv", [["prompt", "completion", "label"],
                                           [json.dumps(prompt), json.dumps(completion), "true"]])
    kto, info = unpaired.load_unpaired(str(path), recipe)
    assert (kto[0]["prompt"], kto[0]["completion"], info["conversational"]) == (prompt, completion, True)
    sft = data.load(str(write_csv(tmp_path / "sft.csv", [["prompt", "completion"], [json.dumps(prompt),
                                                                                    json.dumps(completion)]])),
                    "chat", recipe)
    assert (sft[0]["prompt"], sft[0]["completion"]) == (prompt, completion)
    history = json.dumps([["Hi", "Hello!"]])
    alpaca = data.load(str(write_csv(tmp_path / "alpaca.csv", [["instruction", "output", "history"],
                                                               ["2 + 3?", "5", history]])), "chat", recipe)
    assert [m["content"] for m in alpaca[0]["messages"]] == ["Hi", "Hello!", "2 + 3?", "5"]


def write_csv(path, records):
    import csv

    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(records)
    return path


def test_world_splits_load_in_their_formats(recipe):
    assert "text" in data.load("world:pretrain", "text", recipe).column_names
    assert "messages" in data.load("world:sft", "chat", recipe).column_names
    prompts = data.load("world:eval", "prompts", recipe)
    assert {"prompt", "answer", "skill"} <= set(prompts.column_names)
    with pytest.raises(PipelineError, match="unknown world split"):
        data.load("world:nope", "chat", recipe)


def test_prompt_completion_and_tool_calls_are_accepted(tmp_path, recipe):
    rows = [
        {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]},
        {"prompt": [{"role": "user", "content": "draw a cat"}],
         "completion": [{"role": "assistant", "content": None,
                         "tool_calls": [{"type": "function", "function": {"name": "draw", "arguments": {"x": 1}}}]}],
         "tools": [{"type": "function", "function": {"name": "draw", "parameters": {
             "type": "object", "properties": {"x": {"type": "integer"}}}}}]},
    ]
    assert len(data.load(str(write_jsonl(tmp_path / "pc.jsonl", rows)), "chat", recipe)) == 2
    del rows[1]["tools"]  # a call is checked against the row's tools: here there are none
    with pytest.raises(PipelineError, match="line 2: message 0: unknown tool 'draw' \\(tools: none\\)"):
        data.load(str(write_jsonl(tmp_path / "pc.jsonl", rows)), "chat", recipe)


@pytest.mark.parametrize("content, message", [
    ('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [}\n', r"line 2: invalid JSON"),
    ('{"text": "hi"}\n', r"no conversation format matches the columns \(text\)"),
    ('{"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]}\n',
     r"line 1: message 0: unknown role 'bot'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', r"line 1: no assistant message"),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}\n',
     r"line 1: message 0: 'content' must be a string"),
    ('[1, 2]\n', r"line 1: expected a JSON object"),
    ('', r"empty file"),
])
def test_malformed_rows_name_file_and_line(tmp_path, recipe, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(PipelineError, match=message) as err:
        data.load(str(path), "chat", recipe)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


PAIR = {"prompt": "Is 3 more than 2?", "chosen": "Yes.", "rejected": "No."}


@pytest.mark.parametrize("content, rows", [
    ([PAIR, PAIR], [PAIR, PAIR]),  # a list of rows
    ({"data": [PAIR, PAIR]}, [PAIR, PAIR]),  # the list under one key
    ({k: [v, v + "!"] for k, v in PAIR.items()}, [PAIR, {k: v + "!" for k, v in PAIR.items()}]),  # columns
    (PAIR, [PAIR]),  # one row, as datasets' json builder reads a one-line file (was: "expected a list")
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},  # one chat
     [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]),
    ({"conversations": [{"conversations": [{"from": "human", "value": "hi"}]}]},  # rows under a message key
     [{"conversations": [{"from": "human", "value": "hi"}]}]),
    ({"meta": [{"id": 1}, {"id": 2}], "text": ["a", "b"]}, [{"meta": {"id": 1}, "text": "a"},  # a struct column
                                                             {"meta": {"id": 2}, "text": "b"}]),
])
def test_a_json_file_reads_as_rows_columns_or_one_row(tmp_path, content, rows):
    from pipeline import files

    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(content, indent=2))
    assert files.read_file(path)[0] == rows


@pytest.mark.parametrize("content, message", [
    ([PAIR, "Yes."], r"expected a list of JSON objects \(one per row\); row 2 is not an object$"),
    ("Yes.", r"expected a list of JSON objects \(one per row\); a JSON string$"),
    ({}, r"expected a list of JSON objects \(one per row\); an object with keys none$"),
    ({"data": [PAIR, "x"]}, r"; an object with keys data$"),
    ({"version": 1, "data": [PAIR]}, r"; an object with keys version, data$"),  # rows beside other keys
])
def test_a_json_file_without_rows_says_what_it_holds(tmp_path, content, message):
    from pipeline import files

    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(content))
    with pytest.raises(PipelineError, match=message):
        files.read_file(path)


def test_a_csv_row_is_named_by_the_line_it_starts_on(tmp_path):
    """A quoted field over several lines (a multi-line reply) or a blank line shifted every later row's line number:
    errors named the wrong line."""
    from pipeline import files

    path = tmp_path / "chats.csv"
    path.write_text('prompt,completion\n"Two\nlines",x\n\nc,"d\ne\nf"\ng,h\n')
    ds, where = files.read_table(path, "csv")
    assert ds["prompt"] == ["Two\nlines", "c", "g"] and where == ["line 2", "line 5", "line 8"]


def test_a_csv_line_of_spaces_is_no_row_and_shifts_no_line(tmp_path):
    """pandas skips a line of spaces or tabs as blank, the csv module read it as a record: the counts disagreed and
    every row was named by its index (line 3 for a row on line 4). A quoted blank is a row."""
    from pipeline import files

    path = tmp_path / "chats.csv"
    path.write_text('prompt,completion\na,b\n   \nc,"d\ne"\n"  ",\n\t\ng,h\n')
    ds, where = files.read_table(path, "csv")
    assert ds["prompt"] == ["a", "c", "  ", "g"] and where == ["line 2", "line 4", "line 6", "line 8"]


def test_csv_cells_are_the_text_they_hold(tmp_path, recipe):
    """A CSV has no types: pandas' guessing read the answers "08" as 8 and "3.10" as 3.1 (no reply saying 08 or 3.10
    matched) and "NA" or "None" as no answer. Cells are read as written, an empty cell as None; a margin and a KTO
    label are read from their text where they are used; an unnamed index column (pandas' to_csv) and a BOM read."""
    from pipeline import preferences, unpaired

    path = tmp_path / "p.csv"
    path.write_bytes("\ufeff,prompt,answer\n0,What is 5 + 3 with a leading zero?,08\n1,Pi to two places?,3.10\n"
                     "2,Which is prime: 4 or 6?,None\n3,Say hi.,\n4,Which country code is Namibia's?,NA\n".encode())
    rows = data.load(str(path), "eval_prompts", recipe).to_list()
    assert [r["answer"] for r in rows] == ["08", "3.10", "None", None, "NA"]
    assert [r["Unnamed: 0"] for r in rows] == ["0", "1", "2", "3", "4"]
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("prompt,chosen,rejected,margin\nHi,Hello!,Go away.,1.5\nBye,Goodbye!,...,2\n")
    ds, _ = preferences.load_preferences(str(pairs), recipe)
    assert ds["margin"] == [1.5, 2.0]
    labels = tmp_path / "kto.csv"
    labels.write_text("prompt,completion,label\nHi,Hello!,true\nHi,Go away.,0\n")
    assert unpaired.load_unpaired(str(labels), recipe)[0]["label"] == [True, False]

def test_lines_split_at_line_feeds_alone(tmp_path, recipe):
    """JSON strings may hold U+2028, U+2029 and U+0085 unescaped (json.dumps(..., ensure_ascii=False) writes them so):
    they stay inside their row, as does a form feed in plain text; CRLF files read the same; errors count lines by
    line feeds."""
    texts = ["one\u2028line", "two\u2029par\u0085nel"]
    path = tmp_path / "t.jsonl"
    path.write_bytes("\r\n".join(json.dumps({"text": t}, ensure_ascii=False) for t in texts).encode() + b"\r\n")
    assert data.load(str(path), "text", recipe)["text"] == texts
    path.write_text(json.dumps({"text": "a\u2028b"}, ensure_ascii=False) + "\n{bad\n")
    with pytest.raises(PipelineError, match="line 2: invalid JSON"):
        data.load(str(path), "text", recipe)
    (tmp_path / "t.txt").write_text("page\fbreak\u2028kept\nnext\n")
    assert data.load(str(tmp_path / "t.txt"), "text", recipe, text_split="line")["text"] == \
        ["page\fbreak\u2028kept", "next"]


def test_missing_file_unsupported_type_and_text_column(tmp_path, recipe):
    with pytest.raises(PipelineError, match="file not found"):
        data.load(str(tmp_path / "nope.jsonl"), "chat", recipe)
    (tmp_path / "x.xml").write_text("<hello/>")
    with pytest.raises(PipelineError, match="unsupported file type"):
        data.load(str(tmp_path / "x.xml"), "text", recipe)
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"body": "b"}])
    with pytest.raises(PipelineError, match="line 2: missing column 'text'"):
        data.load(str(path), "text", recipe)


def test_fingerprint_follows_content(tmp_path, recipe):
    path = write_jsonl(tmp_path / "c.jsonl", CHATS)
    before = data.fingerprint(str(path), recipe)
    assert data.fingerprint(str(path), recipe) == before
    write_jsonl(path, CHATS[:1])
    assert data.fingerprint(str(path), recipe) != before
    assert data.fingerprint("world:sft", recipe) != data.fingerprint("world:eval", recipe)


def test_a_data_folders_fingerprint_covers_what_is_read_and_nothing_else(tmp_path, recipe):
    """A folder of data files is fingerprinted over the files read_folder reads: a change to one reruns the stage; a
    subfolder or a file of another type (a checkout's .git, notes, `dataset: /`'s whole file system) is not walked.
    A folder of data files alone keeps the fingerprint it had (every file hashed)."""
    from pipeline.fingerprints import hash_folder

    folder = tmp_path / "chats"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", CHATS)
    assert data.fingerprint(str(folder), recipe) == hash_folder(folder)
    before = data.fingerprint(str(folder), recipe)
    (folder / ".git").mkdir()
    (folder / ".git" / "index").write_bytes(b"x" * 100)
    (folder / "notes.md").write_text("not read")
    assert data.fingerprint(str(folder), recipe) == before
    write_jsonl(folder / "a.jsonl", CHATS[:1])
    assert data.fingerprint(str(folder), recipe) != before
    saved = tmp_path / "saved"
    data.dataset_of(CHATS, "chats").save_to_disk(str(saved))
    assert data.fingerprint(str(saved), recipe) == hash_folder(saved)  # a saved dataset: all of it


def test_world_eval_warning_is_for_a_users_data_not_for_a_list_of_world_splits(tmp_path):
    """sft.dataset: [world:sft, world:tool_sft] (the small recipe) measured on world:eval is the world's own pairing:
    no warning; a user's file among them, or alone, measured there gets one."""
    import logging
    from types import SimpleNamespace

    from pipeline.log import LOGGER

    class Lines(logging.Handler):
        lines: list = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    recipe = load_recipe(tiny_recipe(tmp_path))
    handler = Lines()
    LOGGER.addHandler(handler)
    try:
        for dataset, warned in ((["world:sft", "world:tool_sft"], False), ({"world:sft": 0.5}, False),
                                ("world:sft", False), (["world:sft", "mine.jsonl"], True), ("mine.jsonl", True)):
            handler.lines.clear()
            data.warn_world_eval(recipe, "sft", SimpleNamespace(dataset=dataset, heldout_prompts="world:eval"))
            assert any("paired with the task world's held-out data" in line for line in handler.lines) == warned, \
                dataset
    finally:
        LOGGER.removeHandler(handler)


@pytest.mark.parametrize("damage", ["stray_info", "arrow_gone", "state_not_json"])
def test_a_saved_dataset_folder_that_does_not_load_stops_in_one_line(tmp_path, recipe, damage):
    """A folder with a dataset_info.json is read with datasets.load_from_disk; one that is not a whole saved
    dataset (a stray dataset_info.json, its Arrow file or state.json gone or broken) raised the library's
    FileNotFoundError or JSONDecodeError, a traceback."""
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(CHATS).save_to_disk(str(folder))
    if damage == "stray_info":
        for f in folder.iterdir():
            f.unlink()
        (folder / "dataset_info.json").write_text("{}")
    elif damage == "arrow_gone":
        next(folder.glob("*.arrow")).unlink()
    else:
        (folder / "state.json").write_text("{not json")
    with pytest.raises(PipelineError, match=rf"^{folder}: cannot read the dataset saved here \("):
        data.load(str(folder), "chat", recipe)


def test_a_file_the_user_may_not_read_stops_in_one_line(tmp_path, recipe, monkeypatch, capsys):
    """A data file without read permission for the user raised PermissionError out of the stage: a traceback. As root
    (CI) every file reads, so the error is raised where the file is read, as the OS raises it for other users."""
    from pathlib import Path

    from pipeline import cli

    bad = Path(write_jsonl(tmp_path / "chats.jsonl", CHATS))
    read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied", str(self))) if self == bad else read_bytes(self))
    with pytest.raises(SystemExit) as stop:
        cli.run_main(lambda argv: data.load(str(bad), "chat", recipe), [])
    assert stop.value.code == 2 and capsys.readouterr().err == f"error: {bad}: permission denied\n"
