"""LLaMA-Factory's dataset registry (data/dataset_info.json) as a dataset spec, `folder:NAME`: each of its layouts
reads as the same data in the standard columns would, and what cannot be read stops in one line."""

import json

import datasets
import pytest

from pipeline import data, hub, llamafactory, preferences
from pipeline.cli import PipelineError
from pipeline.recipe import load_recipe
from conftest import tiny_recipe, write_jsonl
from test_formats import ALPACA, SHAREGPT, TOOLS

OPENAI = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3 + 4?"},
                       {"role": "assistant", "content": "7"}]}
OPENAI_TOOLS = {"messages": [
    {"role": "user", "content": "Draw a red circle."},
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "render_image", "arguments": {"prompt": "a red circle"}}}]},
    {"role": "tool", "content": "{\"image\": \"img-1.png\"}"}, {"role": "assistant", "content": "Here it is."}],
    "tools": json.dumps(TOOLS)}
PAIR = {"conversations": [{"from": "human", "value": "3 + 4?"}], "chosen": {"from": "gpt", "value": "7"},
        "rejected": {"from": "gpt", "value": "8"}}


@pytest.fixture()
def recipe(tmp_path):
    return load_recipe(tiny_recipe(tmp_path))


def registry(folder, entries: dict, files: dict) -> str:
    """A LLaMA-Factory data folder: dataset_info.json and its files (.json lists, as LLaMA-Factory ships them)."""
    folder.mkdir(exist_ok=True)
    (folder / "dataset_info.json").write_text(json.dumps(entries))
    for name, rows in files.items():
        (folder / name).write_text(json.dumps(rows))
    return str(folder)


def renamed(row: dict, names: dict) -> dict:
    return {names.get(k, k): v for k, v in row.items()}


def retagged(message: dict) -> dict:
    roles = {"human": "user", "gpt": "assistant", "observation": "tool", "function_call": "call"}
    return {"role": roles.get(message["from"], message["from"]), "content": message["value"]}


# each: (entry, the rows as LLaMA-Factory's file holds them, the same rows in the standard columns, the loader's kind)
LAYOUTS = {
    "alpaca": ({"file_name": "a.json"}, [ALPACA], [{k: ALPACA[k] for k in ("instruction", "input", "output")}],
               "chat"),  # without `columns`, system and history are not read (LLaMA-Factory's defaults are None)
    "alpaca_columns": ({"file_name": "a.json", "columns": {"prompt": "q", "query": "ctx", "response": "a",
                                                           "system": "sys", "history": "past"}},
                       [renamed(ALPACA, {"instruction": "q", "input": "ctx", "output": "a", "system": "sys",
                                         "history": "past"})], [ALPACA], "chat"),
    "alpaca_unlisted_column": ({"file_name": "a.json", "columns": {"prompt": "instruction", "response": "output"}},
                               [ALPACA], [{"instruction": ALPACA["instruction"], "output": ALPACA["output"]}], "chat"),
    "sharegpt_tools": ({"file_name": "s.json", "formatting": "sharegpt",
                        "columns": {"messages": "conversations", "system": "system", "tools": "tools"}},
                       [SHAREGPT], [SHAREGPT], "chat"),
    "openai": ({"file_name": "o.json", "formatting": "sharegpt", "columns": {"messages": "messages"},
                "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                         "assistant_tag": "assistant", "system_tag": "system"}}, [OPENAI], [OPENAI], "chat"),
    "retagged_sharegpt": ({"file_name": "s.json", "formatting": "sharegpt",
                           "columns": {"messages": "turns", "system": "system", "tools": "tools"},
                           "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                    "assistant_tag": "assistant", "observation_tag": "tool",
                                    "function_tag": "call"}},
                          [{"turns": [retagged(m) for m in SHAREGPT["conversations"]], "system": SHAREGPT["system"],
                            "tools": SHAREGPT["tools"]}], [SHAREGPT], "chat"),
    "openai_tool_calls": ({"file_name": "o.json", "formatting": "openai",
                           "columns": {"messages": "chat", "tools": "tools"},
                           "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                    "assistant_tag": "assistant", "observation_tag": "tool"}},
                          [renamed(OPENAI_TOOLS, {"messages": "chat"})], [OPENAI_TOOLS], "chat"),
    # LLaMA-Factory's OpenAI converter: the system column before the messages (it was dropped), a function_tag
    # message as the tool call its content holds (it was trained as assistant text, never checked against tools)
    "openai_system_and_function_tag": (
        {"file_name": "o.json", "formatting": "openai", "columns": {"messages": "messages", "system": "system",
                                                                   "tools": "tools"},
         "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
                  "observation_tag": "tool", "function_tag": "function_call"}},
        [{"system": "Be brief.", "tools": OPENAI_TOOLS["tools"], "messages": [
            OPENAI_TOOLS["messages"][0],
            {"role": "function_call", "content": json.dumps({"name": "render_image",
                                                             "arguments": {"prompt": "a red circle"}})},
            *OPENAI_TOOLS["messages"][2:]]}],
        [{**OPENAI_TOOLS, "messages": [{"role": "system", "content": "Be brief."}, *OPENAI_TOOLS["messages"]]}],
        "chat"),
    "pretraining": ({"file_name": "p.json", "columns": {"prompt": "text"}}, [{"text": "A document."}],
                    [{"text": "A document."}], "text"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_reads_as_the_same_rows_in_the_standard_columns(tmp_path, recipe, layout):
    entry, theirs, standard = LAYOUTS[layout][:3]
    kind = LAYOUTS[layout][3]
    folder = registry(tmp_path / "data", {"mine": entry}, {entry["file_name"]: theirs})
    expected = data.load(write_jsonl(tmp_path / "standard.jsonl", standard), kind, recipe).to_list()
    assert data.load(f"{folder}:mine", kind, recipe).to_list() == expected
    assert data.load(f"{folder}/dataset_info.json:mine", kind, recipe).to_list() == expected


@pytest.mark.parametrize("entry, theirs, standard", [
    ({"file_name": "p.json", "formatting": "sharegpt", "ranking": True,
      "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}, [PAIR], [PAIR]),
    ({"file_name": "p.json", "ranking": True,
      "columns": {"prompt": "instruction", "query": "input", "chosen": "better", "rejected": "worse"}},
     [{"instruction": "Add.", "input": "3 and 4", "better": "7", "worse": "8"}],
     [{"instruction": "Add.", "input": "3 and 4", "chosen": "7", "rejected": "8"}]),
    ({"file_name": "p.json", "formatting": "openai", "ranking": True,
      "columns": {"messages": "messages", "chosen": "chosen", "rejected": "rejected"},
      "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}},
     [{"messages": [{"role": "user", "content": "3 + 4?"}], "chosen": {"role": "assistant", "content": "7"},
       "rejected": {"role": "assistant", "content": "8"}}],
     [{"prompt": [{"role": "user", "content": "3 + 4?"}], "chosen": [{"role": "assistant", "content": "7"}],
       "rejected": [{"role": "assistant", "content": "8"}]}]),
])
def test_preference_layouts_read_as_the_same_pairs(tmp_path, recipe, entry, theirs, standard):
    folder = registry(tmp_path / "data", {"pairs": entry}, {"p.json": theirs})
    expected = preferences.load_preferences(write_jsonl(tmp_path / "standard.jsonl", standard), recipe)
    got = preferences.load_preferences(f"{folder}:pairs", recipe)
    assert got[0].to_list() == expected[0].to_list() and len(got[0]) == 1


def test_num_samples_takes_every_row_once_then_draws_again(tmp_path, recipe):
    """LLaMA-Factory's num_samples: a shuffled subset when smaller than the data, every row then random repeats when
    larger; the same rows for the same run.seed."""
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)]
    folder = registry(tmp_path / "data", {"few": {"file_name": "a.json", "num_samples": 4},
                                          "many": {"file_name": "a.json", "num_samples": 25}}, {"a.json": rows})
    few, where, _ = data.read_rows(f"{folder}:few", recipe)
    assert len(few) == 4 and len({r["instruction"] for r in few}) == 4 and where[0].startswith("a.json row ")
    many, _, _ = data.read_rows(f"{folder}:many", recipe)
    assert len(many) == 25 and {r["instruction"] for r in many} == {r["instruction"] for r in rows}
    assert data.read_rows(f"{folder}:many", recipe)[0] == many
    (tmp_path / "other").mkdir()
    other = load_recipe(tiny_recipe(tmp_path / "other", run={"name": "tiny", "seed": 1}))
    assert data.read_rows(f"{folder}:many", other)[0] != many


def test_a_hub_entry_loads_its_subset_split_and_folder(tmp_path, recipe, monkeypatch):
    calls = []

    def load_dataset(spec, **options):
        calls.append((spec, options))
        return datasets.Dataset.from_list([{"instruction": "q", "output": "a"}])

    monkeypatch.setattr(hub, "load_dataset", load_dataset)
    folder = registry(tmp_path / "data", {"h": {"hf_hub_url": "org/set", "subset": "en", "split": "test",
                                                "folder": "v2", "ms_hub_url": "org/ms"}}, {})
    rows, where, _ = data.read_rows(f"{folder}:h", recipe)
    assert rows == [{"instruction": "q", "output": "a"}] and where == ["row 1"]
    assert calls == [("org/set:en:test", {"data_dir": "v2", "revision": None})]
    assert data.fingerprint(f"{folder}:h", recipe) != data.fingerprint(
        registry(tmp_path / "other", {"h": {"hf_hub_url": "org/set", "subset": "fr"}}, {}) + ":h", recipe)


def test_the_fingerprint_follows_the_entry_and_its_file(tmp_path, recipe):
    folder = registry(tmp_path / "data", {"a": {"file_name": "a.json"}}, {"a.json": [ALPACA]})
    before = data.fingerprint(f"{folder}:a", recipe)
    assert data.fingerprint(f"{folder}:a", recipe) == before
    (tmp_path / "data/a.json").write_text(json.dumps([ALPACA, ALPACA]))
    after = data.fingerprint(f"{folder}:a", recipe)
    assert after != before
    registry(tmp_path / "data", {"a": {"file_name": "a.json", "num_samples": 1}}, {})
    assert data.fingerprint(f"{folder}:a", recipe) != after


@pytest.mark.parametrize("entries, spec, message", [
    ({"a": {"file_name": "a.json"}}, "{folder}:b", r"dataset_info.json: no dataset 'b' \(it names a\)$"),
    ({"a": {"file_name": "gone.json"}}, "{folder}:a", r"file_name 'gone.json' not found in"),
    ({"a": {"ms_hub_url": "org/x"}}, "{folder}:a", r"dataset 'a': ms_hub_url \(ModelScope\) is not read here"),
    ({"a": {"om_hub_url": "org/x"}}, "{folder}:a", r"dataset 'a': om_hub_url \(Modelers \(OpenMind\)\) is not read"),
    ({"a": {"cloud_file_name": "s3://b/x.json"}}, "{folder}:a", r"dataset 'a': cloud_file_name \(S3 or GCS\) is not"),
    ({"a": {"script_url": "loader"}}, "{folder}:a", r"dataset 'a': script_url names a loading script, and no "
                                                    r"dataset code runs here"),
    ({"a": {"file_name": "a.json", "columns": {"prompt": "instruction", "response": "output", "images": "im"}}},
     "{folder}:a", r"columns.images: images are not read by the language-model stages"),
    ({"a": {"file_name": "a.json", "formatting": "chatml"}}, "{folder}:a",
     r"formatting must be alpaca, sharegpt or openai"),
    ({"a": {"file_name": "a.json", "formatting": "sharegpt", "tags": ["role"]}}, "{folder}:a",
     r"tags must be an object of names"),
    ({"a": {"file_name": "a.json", "num_samples": 0}}, "{folder}:a", r"num_samples must be a whole number"),
    ({"a": {"file_name": "a.json", "num_samples": 10**30}}, "{folder}:a", r"num_samples must be a whole number from 1"),
    ({"a": {"file_name": "a.json", "columns": {"prompt": "instruction", "response": {}}}}, "{folder}:a",
     r"columns must be an object of column names"),
    ({"a": {"file_name": "a.json", "columns": {"prompt": "q", "response": "r"}}}, "{folder}:a",
     r"dataset 'a': columns.prompt names 'q', a column none of its rows has \(its columns: history, input, "
     r"instruction, output, system\)$"),
    ({"a": {"file_name": "a.json", "columns": {"prompt": "instruction", "response": "answer"}}}, "{folder}:a",
     r"dataset 'a': columns.response names 'answer', a column none of its rows has"),  # was: no format matches
    ({"a": {"file_name": "a.json"}}, "{folder}", r"a LLaMA-Factory data folder .*: name one as .*:NAME \(a\)$"),
    ({"a": {"file_name": "a.json"}, "b": {"formatting": "sharegpt"}}, "{folder}:b",
     r"dataset 'b': says nowhere where its data is \(file_name or hf_hub_url\)$"),
])
def test_what_cannot_be_read_stops_in_one_line(tmp_path, recipe, entries, spec, message):
    folder = registry(tmp_path / "data", entries, {"a.json": [ALPACA]})
    with pytest.raises(PipelineError, match=message):
        data.read_rows(spec.format(folder=folder), recipe)


def test_a_saved_dataset_folder_is_not_taken_for_a_registry(tmp_path, recipe):
    """`datasets.save_to_disk` writes a dataset_info.json too (features, splits): that folder reads as before."""
    datasets.Dataset.from_list([ALPACA]).save_to_disk(str(tmp_path / "saved"))
    assert llamafactory.folder_registry(tmp_path / "saved") is None
    rows, _, _ = data.read_rows(str(tmp_path / "saved"), recipe)
    assert rows == [ALPACA]


def test_plain_text_is_a_document_per_line_as_llamafactory_reads_it(tmp_path, recipe):
    """LLaMA-Factory reads a .txt file (its wiki_demo.txt) with datasets' text builder, a row per line; read as the
    pipeline's own .txt (a document per blank-line-separated block) it was one 1 MB document."""
    folder = registry(tmp_path / "data", {"wiki": {"file_name": "wiki.txt", "columns": {"prompt": "text"}}}, {})
    (tmp_path / "data/wiki.txt").write_text("First article.\nSecond article.\n\nThird article.\n")
    rows, where, _ = data.read_rows(f"{folder}:wiki", recipe)
    assert rows == [{"text": "First article."}, {"text": "Second article."}, {"text": "Third article."}]
    assert where == ["wiki.txt line 1", "wiki.txt line 2", "wiki.txt line 4"]


def test_a_registry_that_is_not_json_is_named_in_one_line(tmp_path, recipe):
    (tmp_path / "data").mkdir()
    (tmp_path / "data/dataset_info.json").write_text('{"a": {"file_name": "a.json",}}')
    for spec in (f"{tmp_path}/data:a", f"{tmp_path}/data"):
        with pytest.raises(PipelineError, match=r"dataset_info.json: invalid JSON \(Expecting property name"):
            data.read_rows(spec, recipe)


def test_the_fingerprint_of_an_entry_whose_file_is_missing_leaves_the_stage_to_name_it(tmp_path, recipe):
    """The runner fingerprints every input before the stage runs: a missing file_name raised FileNotFoundError there
    (a traceback); now the stage's reader names it in one line."""
    folder = registry(tmp_path / "data", {"a": {"file_name": "gone.json"}}, {})
    assert data.fingerprint(f"{folder}:a", recipe) == data.fingerprint(f"{folder}:a", recipe)
    with pytest.raises(PipelineError, match="file_name 'gone.json' not found"):
        data.read_rows(f"{folder}:a", recipe)


def test_a_role_that_is_not_a_name_is_left_for_the_sharegpt_reader_to_name(tmp_path, recipe):
    turns = [{"from": ["human"], "value": "q"}, {"from": "gpt", "value": "a"}]
    folder = registry(tmp_path / "data", {"s": {"file_name": "s.json", "formatting": "sharegpt"}},
                      {"s.json": [{"conversations": turns}]})
    with pytest.raises(PipelineError, match=r"s.json row 1: turn 0"):
        data.load(f"{folder}:s", "chat", recipe)


def test_a_name_a_long_registry_lacks_is_one_short_line_with_the_closest_names(tmp_path, recipe):
    """LLaMA-Factory's own registry names 104 datasets: all of them were listed in the error (a 1,900-character
    line)."""
    names = {f"set_{i:03d}": {"file_name": "a.json"} for i in range(100)} | {"alpaca_en_demo": {"file_name": "a.json"}}
    folder = registry(tmp_path / "data", names, {"a.json": [ALPACA]})
    with pytest.raises(PipelineError, match=r"no dataset 'alpaca_en_dem' \(it names 101 datasets \(closest: "
                                            r"alpaca_en_demo\)\)$"):
        data.read_rows(f"{folder}:alpaca_en_dem", recipe)
    with pytest.raises(PipelineError, match=r"name one as .*:NAME \(alpaca_en_demo, set_000, .*, set_010, \.\.\.\)$"):
        data.read_rows(folder, recipe)


@pytest.mark.parametrize("entry, add", [
    ({"columns": {"messages": "conversations", "system": "system"}}, '"tools": "tools" to its columns'),
    ({}, '"columns": {"messages": "conversations", "tools": "tools"} to it'),
    ({"formatting": "openai", "columns": {"messages": "messages"}}, '"tools": "tools" to its columns')])
def test_calls_beside_a_tools_column_the_entry_does_not_name_say_to_name_it(tmp_path, recipe, entry, add):
    """LLaMA-Factory reads `tools` only where `columns` names it: each call was refused as one to an unknown tool
    ("tools: none") though the rows offer it; the entry is named with what to add. Calls are read as before once
    it is named, and rows without calls beside the column read as LLaMA-Factory reads them."""
    rows = [OPENAI_TOOLS] if entry.get("formatting") == "openai" else [SHAREGPT]
    entry = {"file_name": "s.json", "formatting": "sharegpt", **entry}
    folder = registry(tmp_path / "data", {"s": entry}, {"s.json": rows})
    with pytest.raises(PipelineError) as err:
        data.load(f"{folder}:s", "chat", recipe)
    assert str(err.value) == (f"{folder}/dataset_info.json: dataset 's': its rows call tools, offered in a 'tools' "
                              f"column it does not name (as in LLaMA-Factory, only the columns an entry names are "
                              f"read): add {add}")
    named = {**entry, "columns": {**entry.get("columns", {"messages": "conversations"}), "tools": "tools"}}
    folder = registry(tmp_path / "data", {"s": named}, {"s.json": rows})
    assert data.load(f"{folder}:s", "chat", recipe)[0]["tools"] is not None
    chats = [{**rows[0], "conversations": SHAREGPT["conversations"][:1] + SHAREGPT["conversations"][-1:]}] \
        if "conversations" in rows[0] else [{**rows[0], "messages": OPENAI["messages"]}]
    folder = registry(tmp_path / "data", {"s": entry}, {"s.json": chats})
    assert "tools" not in data.load(f"{folder}:s", "chat", recipe)[0]


def test_a_registry_starting_with_a_byte_order_mark_is_read(tmp_path, recipe):
    folder = registry(tmp_path / "data", {"a": {"file_name": "a.json"}}, {"a.json": [ALPACA]})
    info = tmp_path / "data/dataset_info.json"
    info.write_bytes(b"\xef\xbb\xbf" + info.read_bytes())
    assert data.load(f"{folder}:a", "chat", recipe)[0]["messages"][-1]["content"] == ALPACA["output"]
