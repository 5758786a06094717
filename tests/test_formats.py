"""Bring your own data: the formats users of LLaMA-Factory and TRL have (Alpaca, ShareGPT with tool calls, ShareGPT
and Alpaca preference pairs, plain text, compressed files, globs, mixtures, column mappings), tool calls checked
against their schemas, and the bad inputs that must stop with one line."""

import gzip
import json

import pytest

from conftest import REPO, tiny_recipe, write_jsonl
from pipeline import data, formats, preferences
from pipeline.cli import PipelineError
from pipeline.recipe import load_recipe

TOOLS = [{"name": "render_image", "description": "Draw a picture.",
          "parameters": {"type": "object", "properties": {"prompt": {"type": "string"}, "size": {"type": "integer"}},
                         "required": ["prompt"]}}]
SHAREGPT = {"conversations": [
    {"from": "human", "value": "Draw a red circle."},
    {"from": "function_call", "value": json.dumps({"name": "render_image", "arguments": {"prompt": "a red circle"}})},
    {"from": "observation", "value": "{\"image\": \"img-1.png\"}"},
    {"from": "gpt", "value": "Here it is."}], "system": "You can draw.", "tools": json.dumps(TOOLS)}
ALPACA = {"instruction": "Add the numbers.", "input": "3 and 4", "output": "The answer is 7.", "system": "Be brief.",
          "history": [["hi", "Hello!"]]}


@pytest.fixture()
def recipe(tmp_path):
    return load_recipe(tiny_recipe(tmp_path))



def test_alpaca_rows_become_conversations(tmp_path, recipe):
    ds, info = data.load_with_info(write_jsonl(tmp_path / "a.jsonl", [ALPACA, {"instruction": "Say hi.",
                                                                              "output": "Hi."}]), "chat", recipe)
    assert info["format"] == "alpaca" and info["rows"] == 2
    assert ds[0]["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Add the numbers.\n3 and 4"},
        {"role": "assistant", "content": "The answer is 7."}]
    assert ds[1]["messages"][-2:] == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi."}]


def test_sharegpt_with_function_call_observation_and_a_tools_string(tmp_path, recipe):
    plain = {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}
    ds, info = data.load_with_info(write_jsonl(tmp_path / "s.jsonl", [SHAREGPT, plain]), "chat", recipe)
    assert info["format"] == "sharegpt"
    messages = ds[0]["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "assistant"]
    call = messages[2]["tool_calls"][0]["function"]
    assert call["name"] == "render_image" and json.loads(call["arguments"]) == {"prompt": "a red circle"}
    assert messages[3]["content"] == "{\"image\": \"img-1.png\"}"
    assert json.loads(ds[0]["tools"]) == TOOLS and ds[1]["tools"] is None


def test_rows_with_object_and_string_arguments_share_one_schema(tmp_path, recipe):
    rows = []
    for args in ({"prompt": "a cat"}, json.dumps({"prompt": "a dog", "size": 8})):
        rows.append({"messages": [{"role": "user", "content": "draw"}, {"role": "assistant", "content": None,
                     "tool_calls": [{"type": "function", "function": {"name": "render_image", "arguments": args}}]}],
                     "tools": TOOLS})
    ds = data.load(write_jsonl(tmp_path / "m.jsonl", rows), "chat", recipe)
    assert [json.loads(r["messages"][1]["tool_calls"][0]["function"]["arguments"]) for r in ds] == \
        [{"prompt": "a cat"}, {"prompt": "a dog", "size": 8}]


@pytest.mark.parametrize("template", ["qwen2_5", "llama3_1"])
def test_a_models_own_template_renders_tool_call_arguments_as_an_object(tmp_path, recipe, template):
    """Rows hold tool calls' arguments as JSON text (one Arrow type); Qwen2.5's and Llama 3.1's own chat templates
    (TRL ships them) write `arguments | tojson`, which quoted that text ("arguments": "{\\"prompt\\": ...}"), so a
    model trained on them learnt to call with a string. Every stage's tokenizer parses them first, floats exactly."""
    from tokenizers import Tokenizer, models as tok_models
    from transformers import PreTrainedTokenizerFast
    from trl import chat_template_utils as ctu

    from pipeline import models, runs
    from pipeline.formats import ObjectArguments

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tok_models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                  eos_token="<unk>")
    tok.chat_template = getattr(ctu, f"{template}_chat_template")
    tok.save_pretrained(tmp_path / "tok")
    mine = load_recipe(tiny_recipe(tmp_path, tokenizer={"train": False, "name_or_path": str(tmp_path / "tok"),
                                                        "chat_template": "own"}))
    tok = models.load_tokenizer(mine, runs.Checkpoint("new", None, None, "config"))
    assert isinstance(tok.apply_chat_template, ObjectArguments)
    args = {"prompt": "a cat", "scale": 0.009}
    row = {"messages": [{"role": "user", "content": "draw"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "render_image", "arguments": args}}]}], "tools": TOOLS}
    ds = data.load(write_jsonl(tmp_path / "m.jsonl", [row]), "chat", recipe)
    assert isinstance(ds[0]["messages"][1]["tool_calls"][0]["function"]["arguments"], str)  # as Arrow holds it
    text = tok.apply_chat_template(ds[0]["messages"], tools=json.loads(ds[0]["tools"]), tokenize=False)
    key = "arguments" if template == "qwen2_5" else "parameters"
    assert f'"{key}": {json.dumps(args)}' in text and '\\"prompt' not in text


@pytest.mark.parametrize("arguments, message", [
    ({"size": 3}, "required argument 'prompt' is missing"),
    ({"prompt": 5}, "argument 'prompt' must be string, got int"),
    ({"prompt": "x", "size": "big"}, "argument 'size' must be integer, got str"),
    ("{not json", "arguments are not JSON"),
    ([1, 2], "arguments must be a JSON object, got list"),
])
def test_a_tool_call_that_breaks_its_schema_names_file_row_and_tool(tmp_path, recipe, arguments, message):
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "render_image", "arguments": arguments}}]}
    rows = [{"messages": [{"role": "user", "content": "draw"}, {"role": "assistant", "content": "ok"}]},
            {"messages": [{"role": "user", "content": "draw"}, call], "tools": TOOLS}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(PipelineError) as err:
        data.load(path, "chat", recipe)
    assert str(err.value).startswith(f"{path}: line 2: message 1: tool 'render_image'") and message in str(err.value)


def test_a_call_to_a_tool_the_row_does_not_declare(tmp_path, recipe):
    row = dict(SHAREGPT, tools=json.dumps([{"name": "search", "parameters": {}}]))
    with pytest.raises(PipelineError, match=r"line 1: message 2: unknown tool 'render_image' \(tools: search\)"):
        data.load(write_jsonl(tmp_path / "t.jsonl", [row]), "chat", recipe)


def test_a_file_in_no_format_says_which_were_expected_and_what_it_has(tmp_path, recipe):
    with pytest.raises(PipelineError) as err:
        data.load(write_jsonl(tmp_path / "q.jsonl", [{"question": "q", "answer": "a"}]), "chat", recipe)
    assert "no conversation format matches the columns (question, answer)" in str(err.value)
    assert "Alpaca" in str(err.value) and "ShareGPT" in str(err.value)


def test_a_column_mapping_reads_any_names(tmp_path, recipe):
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "2+2?", "answer": "4"}])
    ds, info = data.load_with_info(path, "chat", recipe, columns={"prompt": "question", "completion": "answer"})
    assert info["format"] == "prompt_completion" and ds[0]["prompt"] == "2+2?" and ds[0]["completion"] == "4"
    with pytest.raises(PipelineError, match="column 'query' \\(mapped to 'prompt' by `columns`\\) is missing"):
        data.load(path, "chat", recipe, columns={"prompt": "query"})


def test_sharegpt_and_alpaca_preference_pairs(tmp_path, recipe):
    sharegpt = [{"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi?"}],
                 "chosen": {"from": "gpt", "value": "Hello!"}, "rejected": {"from": "gpt", "value": "What."}},
                {"conversations": [{"from": "human", "value": "2+2?"}], "chosen": "4", "rejected": "5"}]
    ds, info = preferences.load_preferences(write_jsonl(tmp_path / "p.jsonl", sharegpt), recipe)
    assert info["format"] == "sharegpt" and info["conversational"] and len(ds) == 2
    assert ds[0]["prompt"] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}]
    assert ds[0]["chosen"] == [{"role": "assistant", "content": "Hello!"}]
    assert ds[1]["rejected"] == [{"role": "assistant", "content": "5"}]
    alpaca = [{"instruction": "Add.", "input": "1 and 2", "chosen": "3", "rejected": "4"}]
    ds, info = preferences.load_preferences(write_jsonl(tmp_path / "a.jsonl", alpaca), recipe)
    assert info["format"] == "alpaca" and ds[0]["prompt"] == [{"role": "user", "content": "Add.\n1 and 2"}]


def test_plain_text_compressed_files_globs_lists_and_mixtures(tmp_path, recipe):
    (tmp_path / "a.txt").write_text("First document,\nstill the first.\n\nSecond document.\n")
    with gzip.open(tmp_path / "b.txt.gz", "wt") as f:
        f.write("Third.\n")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "Fourth."}) + "\n")
    ds, info = data.load_with_info(str(tmp_path / "*.txt*"), "text", recipe)
    assert ds["text"] == ["First document,\nstill the first.", "Second document.", "Third."]
    assert info["format"] == "txt, a document per paragraph"
    assert data.load(str(tmp_path / "a.txt"), "text", recipe, text_split="line")["text"] == \
        ["First document,", "still the first.", "Second document."]
    both = data.load([str(tmp_path / "c.jsonl.gz"), str(tmp_path / "b.txt.gz")], "text", recipe)
    assert both["text"] == ["Fourth.", "Third."]
    folder = tmp_path / "folder"  # a folder's data files, compressed ones too, in name order; other files skipped
    folder.mkdir()
    for name in ("b.txt.gz", "c.jsonl.gz", "a.txt"):
        (folder / name).write_bytes((tmp_path / name).read_bytes())
    (folder / "notes.md").write_text("not data")
    assert data.load(str(folder), "text", recipe)["text"] == \
        ["First document,\nstill the first.", "Second document.", "Third.", "Fourth."]
    assert data.load(str(folder), "text", recipe, text_split="line")["text"] == \
        ["First document,", "still the first.", "Second document.", "Third.", "Fourth."]
    rows = [{"text": f"doc {i}"} for i in range(10)]
    mix = {write_jsonl(tmp_path / "x.jsonl", rows): 0.5, write_jsonl(tmp_path / "y.jsonl", rows[:4]): 1.0}
    mixed = data.load(mix, "text", recipe)
    assert len(mixed) == 5 + 4 and mixed["text"] == data.load(mix, "text", recipe)["text"]  # one seed
    handbook = {"datasets": [{"path": str(tmp_path / "x.jsonl"), "weight": 0.2}], "seed": 3}
    assert len(data.load(handbook, "text", recipe)) == 2


def test_a_hub_dataset_loads_with_its_configuration(tmp_path, recipe, monkeypatch):
    """A hub dataset with several configurations (gsm8k's `main` and `socratic`, smoltalk2's `Preference`) is named
    `org/name:config:split`, or in alignment-handbook's dataset_mixture with its `config`, which was dropped: such a
    dataset failed to load ("Config name is missing") or loaded another configuration."""
    import datasets

    from pipeline import hub
    from pipeline.fingerprints import hash_obj

    calls = []

    def load_dataset(path, name=None, split=None):  # datasets' own names: `name` is the configuration
        calls.append((path, name, split))
        return datasets.Dataset.from_list([{"text": f"doc of {name}"}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(hub, "reachable", lambda: True)
    handbook = {"datasets": [{"id": "openai/gsm8k", "config": "main", "split": "test"}]}
    for spec in ("openai/gsm8k:main:test", handbook):
        rows, _, source = data.read_rows(spec, recipe)
        assert rows == [{"text": "doc of main"}] and calls[-1] == ("openai/gsm8k", "main", "test")
        assert source == "openai/gsm8k:main:test"
    assert data.read_rows("openai/gsm8k:test", recipe)[0] and calls[-1] == ("openai/gsm8k", None, "test")
    assert data.read_rows("openai/gsm8k", recipe)[0] and calls[-1] == ("openai/gsm8k", None, "train")
    assert data.fingerprint(handbook, recipe) != data.fingerprint(
        {"datasets": [{"id": "openai/gsm8k", "config": "socratic", "split": "test"}]}, recipe)
    assert data.fingerprint("openai/gsm8k:test", recipe) == hash_obj({"hub": "openai/gsm8k:test"})  # as before
    local = {"datasets": [{"path": write_jsonl(tmp_path / "x.jsonl", [{"text": "a"}]), "config": "main"}]}
    with pytest.raises(PipelineError, match=r"config names a hub dataset's configuration"):
        data.read_rows(local, recipe)


def test_invalid_utf8_is_named_by_file_and_line(tmp_path, recipe):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(PipelineError, match=rf"{path}: line 2: invalid UTF-8 \(byte 0xe9\)"):
        data.load(str(path), "text", recipe)


def test_a_hub_id_without_network_fails_at_once_naming_the_id(tmp_path, recipe, monkeypatch):
    from pipeline import hub

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: the probe fails at once
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    hub.reachable.cache_clear()
    try:
        with pytest.raises(PipelineError, match="dataset 'someone/nothing-here': not a local file or folder, and "
                                                "the hub cannot be reached"):
            data.load("someone/nothing-here", "chat", recipe)
    finally:
        hub.reachable.cache_clear()


@pytest.mark.parametrize("override, message", [
    ("sft.per_device_train_batch_size=0", "sft.per_device_train_batch_size must be at least 1, got 0"),
    ("sft.learning_rate=-1e-4", "sft.learning_rate must be 0 or more, got -0.0001"),
    ("pretrain.max_steps=-5", "pretrain.max_steps must be -1 (not set) or more, got -5"),
    ("sft.report_to=[nosuchtracker]", "unknown tracker 'nosuchtracker'"),
])
def test_out_of_range_values_stop_the_recipe_before_anything_loads(tmp_path, override, message):
    with pytest.raises(PipelineError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe(tiny_recipe(tmp_path), [override])


def test_a_config_class_error_comes_before_any_upstream_check(tmp_path):
    """The stage checks its own section with its config class before it looks for the stages it reads."""
    from pipeline import sft

    recipe = tiny_recipe(tmp_path)  # its pretrain stage has not run
    with pytest.raises(PipelineError, match="override 'sft.lr_scheduler_type=nope': nope is not a valid SchedulerType"):
        sft.main([str(recipe), "sft.lr_scheduler_type=nope"])
    with pytest.raises(PipelineError, match="stage 'pretrain' has not finished"):
        sft.main([str(recipe)])
    loaded = load_recipe(recipe, ["reward.bf16=true"])  # bf16 without a GPU: --check leaves that to the machine
    loaded.check_config("reward", portable=True)


def test_a_config_class_refusal_names_the_key_and_the_override_that_set_it(tmp_path):
    """A value TrainingArguments refuses was reported against the recipe file and the section, even when an override
    set it: the one key without which the class builds is named, by its override when the command line set it."""
    recipe = tiny_recipe(tmp_path, sft={"optim": "bogus", "use_cpu": True})
    with pytest.raises(PipelineError, match=rf"^{recipe}: sft.optim: bogus is not a valid OptimizerNames"):
        load_recipe(recipe).check_config("sft")
    loaded = load_recipe(tiny_recipe(tmp_path, sft={"use_cpu": True}), ["sft.optim=adamw_torch", "sft.optim=bogus"])
    with pytest.raises(PipelineError, match="^override 'sft.optim=bogus': bogus is not a valid OptimizerNames"):
        loaded.check_config("sft")
    loaded = load_recipe(tiny_recipe(tmp_path, sft={"use_cpu": True}), ["sft.accelerator_config.bogus=1"])
    with pytest.raises(PipelineError, match="^override 'sft.accelerator_config.bogus=1': .*'bogus'"):
        loaded.check_config("sft")  # a key inside the section's key
    # refused for two keys together (either alone builds): the section is named, by the last override that set one
    loaded = load_recipe(tiny_recipe(tmp_path, sft={"use_cpu": True, "eval_strategy": "steps"}),
                         ["sft.load_best_model_at_end=true", "sft.save_strategy=epoch"])
    with pytest.raises(PipelineError, match="^override 'sft.save_strategy=epoch': section 'sft': .*load_best_model"):
        loaded.check_config("sft")
    loaded = load_recipe(tiny_recipe(tmp_path, sft={"use_cpu": True, "eval_strategy": "steps",
                                                    "load_best_model_at_end": True, "save_strategy": "epoch"}))
    with pytest.raises(PipelineError, match=rf"^{recipe}: section 'sft': .*load_best_model_at_end"):
        loaded.check_config("sft")


def test_a_tracker_that_is_not_installed_is_caught_at_validation(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(PipelineError, match="dpo.report_to: 'wandb' is not installed \\(pip install wandb\\)"):
        load_recipe(tiny_recipe(tmp_path, dpo={}), ["dpo.report_to=wandb"])


def test_reward_checks_say_nothing_about_categories_the_data_does_not_have():
    from pipeline.reward_report import trust_checks

    m = {"accuracy": 0.8, "accuracy_chosen_shorter": None, "accuracy_chosen_longer": None, "pairs_chosen_shorter": 0,
         "pairs_chosen_longer": 0, "ece": None, "train_accuracy": 0.85, "train_pairs": 10,
         "train_pairs_too_long": 0, "eval_pairs_too_long": 0}
    assert not any(c["check"].startswith("no weak") for c in trust_checks(m, "skill"))
    m["accuracy_per_skill"] = {"add": {"n": 20, "accuracy": 0.5}}
    assert [c["ok"] for c in trust_checks(m, "skill") if c["check"] == "no weak skill"] == [False]


def test_formats_detect_from_the_first_row():
    assert formats.detect_sft_format({"conversations": []}) == "sharegpt"
    assert formats.detect_sft_format({"instruction": "x", "output": "y"}) == "alpaca"
    assert formats.detect_sft_format({"messages": []}) == "messages"
    assert formats.detect_sft_format({"prompt": "a", "completion": "b"}) == "prompt_completion"
    assert formats.detect_sft_format({"text": "a"}) is None


@pytest.mark.parametrize("row", [
    {"prompt": "The sky is", "completion": " blue.", "label": True},  # TRL's unpaired preference (KTO)
    {"prompt": [{"role": "user", "content": "What color is the sky?"}],
     "completion": [{"role": "assistant", "content": "It is green."}], "label": False},
    {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}], "label": True},
    {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}], "kto_tag": False},
    {"instruction": "Q?", "output": "A.", "kto_tag": True},  # LLaMA-Factory's KTO rows
    {"prompt": "The sky is", "completion": " green.", "label": 0},  # labels the kto stage reads as 1/0 or text
    {"prompt": "The sky is", "completion": " blue.", "label": "true"},
])
def test_unpaired_preference_rows_are_not_taken_for_demonstrations(tmp_path, recipe, row):
    """A completion labelled false is one the model must not learn: sft stops, naming the file and the columns."""
    path = write_jsonl(tmp_path / "kto.jsonl", [row])
    with pytest.raises(PipelineError) as err:
        data.load(path, "chat", recipe)
    assert str(err.value).startswith(f"{path}: unpaired preference rows") and len(str(err.value).splitlines()) == 1
    assert f"(columns: {', '.join(row)})" in str(err.value)


def test_preference_pairs_with_tool_calls_are_checked_and_keep_their_own_arguments(tmp_path, recipe):
    """TRL's conversational pairs with a `tools` column: each call fits its row's schemas, and arguments and tools
    become JSON strings, so Arrow does not give every call the keys of every other row's (as nulls)."""
    light = {"type": "function", "function": {"name": "control_light", "parameters": {
        "type": "object", "properties": {"room": {"type": "string"}, "state": {"type": "string"}},
        "required": ["room", "state"]}}}
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}

    def call(name, arguments):
        return [{"role": "assistant", "tool_calls": [{"type": "function",
                                                      "function": {"name": name, "arguments": arguments}}]}]

    rows = [{"prompt": [{"role": "user", "content": "Kitchen lights on."}], "tools": [light],
             "chosen": call("control_light", {"room": "kitchen", "state": "on"}),
             "rejected": call("control_light", {"room": "kitchen", "state": "off"})},
            {"prompt": [{"role": "user", "content": "Weather in Paris?"}], "tools": [weather],
             "chosen": call("get_weather", {"city": "Paris"}), "rejected": call("get_weather", {"city": "Rome"})}]
    ds, info = preferences.load_preferences(write_jsonl(tmp_path / "p.jsonl", rows), recipe)
    assert info["format"] == "explicit"
    assert json.loads(ds[0]["chosen"][0]["tool_calls"][0]["function"]["arguments"]) == {"room": "kitchen",
                                                                                         "state": "on"}
    assert json.loads(ds[1]["rejected"][0]["tool_calls"][0]["function"]["arguments"]) == {"city": "Rome"}
    assert [json.loads(t) for t in ds["tools"]] == [[light], [weather]]
    rows.append(dict(rows[1], rejected=call("get_forecast", {"city": "Rome"})))
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(PipelineError, match=rf"^{path}: line 3: rejected: message 0: unknown tool 'get_forecast'"):
        preferences.load_preferences(path, recipe)


def test_prompt_completion_rows_mixing_text_and_messages_become_conversations(tmp_path, recipe):
    """TRL joins prompt + completion: text with a list of messages cannot be joined, so the text side becomes a
    message (a user prompt, an assistant completion), as the preference loader does."""
    user, reply = [{"role": "user", "content": "What color is the sky?"}], [{"role": "assistant", "content": "Blue."}]
    rows = [{"prompt": "What color is the sky?", "completion": reply}, {"prompt": user, "completion": "Blue."}]
    ds = data.load(write_jsonl(tmp_path / "pc.jsonl", rows), "chat", recipe)
    assert ds["prompt"] == [user, user] and ds["completion"] == [reply, reply]


def test_prompt_completion_text_rows_after_conversation_rows_are_named_by_row(tmp_path, recipe):
    """A text row (prompt and completion both text: a plain continuation) after conversational rows is not in the
    first row's format: one line naming the row, as the preference loader says it, not Arrow's schema error."""
    user, reply = [{"role": "user", "content": "What color is the sky?"}], [{"role": "assistant", "content": "Blue."}]
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": user, "completion": reply},
                                               {"prompt": "The sky is", "completion": " blue."}])
    with pytest.raises(PipelineError, match=rf"^{path}: line 2: mixes text and conversation rows \(earlier rows "
                                            rf"are conversations\)"):
        data.load(path, "chat", recipe)


def test_conversations_of_messages_beside_prompt_completion_ones_stop_naming_the_row(tmp_path, recipe):
    """A list of a messages file and a conversational prompt/completion file loaded, then failed inside TRL (its
    prompt/completion branch takes every row with a `prompt` key, None too) or in sft's length count, with a
    traceback: one line naming the first row of the other form."""
    user, reply = [{"role": "user", "content": "What color is the sky?"}], [{"role": "assistant", "content": "Blue."}]
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": user + reply}])
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": user, "completion": reply}])
    with pytest.raises(PipelineError, match=r"pc\.jsonl line 1: mixes prompt/completion rows with messages rows "
                                            r"before it: TRL's SFTTrainer trains one of the two per dataset"):
        data.load([chats, pc], "chat", recipe)


def test_openai_content_parts_are_read_as_their_text(tmp_path, recipe):
    """OpenAI's messages may give content as parts ([{"type": "text", "text": ...}]): they stopped every stage with
    "'content' must be a string". Text parts are their joined text, in conversations, pairs and prompts; another part
    (an image) stops the stage naming the row."""
    parts = [{"type": "text", "text": "What color "}, {"type": "text", "text": "is the sky?"}]
    row = {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": [
        {"type": "text", "text": "Blue."}]}]}
    ds = data.load(write_jsonl(tmp_path / "parts.jsonl", [row]), "chat", recipe)
    assert ds[0]["messages"] == [{"role": "user", "content": "What color is the sky?"},
                                 {"role": "assistant", "content": "Blue."}]
    pair = {"prompt": [{"role": "user", "content": parts}], "chosen": [{"role": "assistant", "content": "Blue."}],
            "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "Green."}]}]}
    pairs, _ = preferences.load_preferences(write_jsonl(tmp_path / "pairs.jsonl", [pair]), recipe)
    assert pairs[0]["prompt"][0]["content"] == "What color is the sky?" and pairs[0]["rejected"][0]["content"] == \
        "Green."
    prompts = data.load(write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": pair["prompt"]}]), "prompts", recipe)
    assert prompts[0]["prompt"] == [{"role": "user", "content": "What color is the sky?"}]
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                          row["messages"][1]]}
    path = write_jsonl(tmp_path / "image.jsonl", [row, image])
    with pytest.raises(PipelineError, match=rf"^{path}: line 2: message 0: a content part of type 'image_url'"):
        data.load(path, "chat", recipe)


def test_the_shipped_prompt_completion_sample_loads(recipe):
    ds, info = data.load_with_info(str(REPO / "data/samples/prompt_completion.jsonl"), "chat", recipe)
    assert info["format"] == "prompt_completion" and len(ds) >= 2


def test_a_sharegpt_preference_reply_that_is_a_function_call_stays_a_tool_call(tmp_path, recipe):
    """LLaMA-Factory lets chosen/rejected be a function_call turn: it is trained as the template's tool call, not as
    its JSON text in an assistant message."""
    row = {"conversations": [{"from": "human", "value": "Draw a red circle."}], "system": "You can draw.",
           "chosen": {"from": "function_call", "value": json.dumps({"name": "render_image",
                                                                    "arguments": {"prompt": "a red circle"}})},
           "rejected": {"from": "gpt", "value": "I cannot draw."}, "tools": json.dumps(TOOLS)}
    ds, info = preferences.load_preferences(write_jsonl(tmp_path / "p.jsonl", [row]), recipe)
    chosen = ds[0]["chosen"]
    assert len(chosen) == 1 and chosen[0]["role"] == "assistant" and chosen[0]["content"] is None
    call = chosen[0]["tool_calls"][0]["function"]
    assert call["name"] == "render_image" and json.loads(call["arguments"]) == {"prompt": "a red circle"}
    assert ds[0]["rejected"][0]["content"] == "I cannot draw." and json.loads(ds[0]["tools"]) == TOOLS


def test_a_sharegpt_system_turn_overrides_the_system_column(tmp_path, recipe):
    """As LLaMA-Factory reads them (its system_tag "can override system column"): one system message, not two."""
    row = {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi?"},
                             {"from": "gpt", "value": "Hello!"}], "system": "Be brief."}
    ds = data.load(write_jsonl(tmp_path / "s.jsonl", [row]), "chat", recipe)
    assert ds[0]["messages"] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"},
                                 {"role": "assistant", "content": "Hello!"}]


def test_an_empty_tools_string_means_no_tools(tmp_path, recipe):
    """LLaMA-Factory's glaive_toolcall demo writes "tools": "[]" on rows without tools: like an empty list, no tools
    (a template testing `tools is not none` would render an empty tool preamble)."""
    rows = [{"conversations": [{"from": "human", "value": "Define photoshop."}, {"from": "gpt", "value": "An app."}],
             "tools": "[]"}, dict(SHAREGPT)]
    ds = data.load(write_jsonl(tmp_path / "g.jsonl", rows), "chat", recipe)
    assert ds[0]["tools"] is None and json.loads(ds[1]["tools"]) == TOOLS
    pairs = [{"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go.", "tools": "[]"}]
    assert preferences.load_preferences(write_jsonl(tmp_path / "p.jsonl", pairs), recipe)[0][0]["tools"] is None


def test_implicit_text_pairs_split_as_trls_explicit_example(tmp_path, recipe):
    """TRL's implicit pair {"chosen": "The sky is blue.", "rejected": "The sky is green."} is its explicit one: the
    space starts the replies (extract_prompt), so a prompt never ends in a lone space token."""
    ds, info = preferences.load_preferences(write_jsonl(tmp_path / "i.jsonl", [
        {"chosen": "The sky is blue.", "rejected": "The sky is green."}]), recipe)
    assert info["format"] == "implicit_text"
    assert ds[0] == {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}


def test_a_text_prompt_beside_whole_conversations_is_taken_from_the_conversations(tmp_path, recipe):
    """HuggingFaceH4/ultrafeedback_binarized's layout: a text `prompt` and chosen/rejected conversations that begin
    with it. The prompt is their shared beginning (TRL's maybe_extract_prompt), not a second user turn before it."""
    turn = {"role": "user", "content": "What is 0+1?"}
    rows = [{"prompt": "What is 0+1?", "chosen": [turn, {"role": "assistant", "content": "1"}],
             "rejected": [turn, {"role": "assistant", "content": "2"}], "score_chosen": 9.0, "score_rejected": 2.0}]
    ds, info = preferences.load_preferences(write_jsonl(tmp_path / "uf.jsonl", rows), recipe)
    assert info["format"] == "implicit"
    assert ds[0]["prompt"] == [turn] and ds[0]["margin"] == 7.0
    assert ds[0]["chosen"] == [{"role": "assistant", "content": "1"}]
    assert ds[0]["rejected"] == [{"role": "assistant", "content": "2"}]
    # a text prompt beside replies given as assistant messages stays the user's turn
    rows = [{"prompt": "What is 0+1?", "chosen": [{"role": "assistant", "content": "1"}],
             "rejected": [{"role": "assistant", "content": "2"}]}]
    ds, info = preferences.load_preferences(write_jsonl(tmp_path / "ex.jsonl", rows), recipe)
    assert info["format"] == "explicit" and ds[0]["prompt"] == [turn]


def test_a_list_of_datasets_in_different_formats_is_read_row_by_row(tmp_path, recipe):
    """LLaMA-Factory's `dataset: alpaca_x,sharegpt_y`: each dataset in its own format, all as messages; a labelled
    reply (KTO) anywhere in the list is still no demonstration, and stops the stage naming its row."""
    alpaca = write_jsonl(tmp_path / "a.jsonl", [ALPACA])
    sharegpt = write_jsonl(tmp_path / "s.jsonl", [SHAREGPT])
    ds, info = data.load_with_info([alpaca, sharegpt], "chat", recipe)
    assert info["format"] == "alpaca + sharegpt" and len(ds) == 2
    for row, fmt, source in ((ALPACA, "alpaca", alpaca), (SHAREGPT, "sharegpt", sharegpt)):
        own = formats.to_sft_row(row, fmt, source, "line 1")["messages"]  # as the file alone would be read
        read = ds[0 if fmt == "alpaca" else 1]["messages"]
        assert [(m["role"], m["content"]) for m in read] == [(m["role"], m.get("content")) for m in own]
    kto = write_jsonl(tmp_path / "k.jsonl", [{"instruction": "Q?", "output": "A.", "kto_tag": False}])
    with pytest.raises(PipelineError) as err:
        data.load([alpaca, kto], "chat", recipe)
    assert str(err.value).startswith(f"{alpaca} + {kto}: {kto} line 1: unpaired preference rows")


def test_a_list_of_preference_datasets_in_different_formats_reads_each_in_its_own(tmp_path, recipe):
    """`dpo.dataset: [ultrafeedback.jsonl, hh.jsonl]` (or LLaMA-Factory's `dataset: alpaca_pairs,sharegpt_pairs`):
    the first dataset's format was applied to every row, so the second stopped at its first row. Each now reads in
    its own format, as the file alone would, in the list's order."""
    from pipeline import unpaired

    implicit = [{"chosen": [{"role": "user", "content": "0+1?"}, {"role": "assistant", "content": "1"}],
                 "rejected": [{"role": "user", "content": "0+1?"}, {"role": "assistant", "content": "2"}]}]
    hh = [{"chosen": "\n\nHuman: 2+2?\n\nAssistant: 4", "rejected": "\n\nHuman: 2+2?\n\nAssistant: 5"}]
    sharegpt = [{"conversations": [{"from": "human", "value": "3+3?"}], "chosen": "6", "rejected": "7"}]
    files = [write_jsonl(tmp_path / f"{name}.jsonl", rows)
             for name, rows in (("uf", implicit), ("hh", hh), ("sg", sharegpt))]
    ds, info = preferences.load_preferences(files, recipe)
    assert info["format"] == "implicit + hh + sharegpt" and info["conversational"]
    alone = [preferences.load_preferences(f, recipe)[0][0] for f in files]
    assert ds.to_list() == alone
    # kto: labelled rows beside pairs, each dataset in its own format
    labelled = write_jsonl(tmp_path / "k.jsonl", [{"prompt": [{"role": "user", "content": "5+5?"}],
                                                   "completion": [{"role": "assistant", "content": "10"}],
                                                   "label": True}])
    rows, info = unpaired.load_unpaired([files[1], labelled], recipe)
    assert info["format"] == "pairs + unpaired" and [r["label"] for r in rows] == [True, False, True]
    assert rows[2]["completion"] == [{"role": "assistant", "content": "10"}]
    tagged = write_jsonl(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": "6+6?"},  # LLaMA-Factory's
                                                              {"role": "assistant", "content": "13"}],
                                                 "kto_tag": False}])
    conversation = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "7+7?"},
                                                                    {"role": "assistant", "content": "14"}],
                                                       "label": True}])
    rows, info = unpaired.load_unpaired([conversation, tagged], recipe)  # was: t.jsonl line 1: missing 'label'
    assert info["format"] == "conversation" and [r["label"] for r in rows] == [True, False]
    # margins from one dataset and not the other: None where there are none (dpo ignores them; reward refuses)
    scored = write_jsonl(tmp_path / "scored.jsonl", [{**implicit[0], "score_chosen": 9.0, "score_rejected": 2.0}])
    ds, info = preferences.load_preferences([scored, files[1]], recipe)
    assert ds["margin"] == [7.0, None] and info["margin"] == "score_chosen - score_rejected"


@pytest.mark.parametrize("prompt", [[{"role": "system", "content": "Be nice."}],
                                    [{"role": "user", "content": " "}]])
def test_a_message_prompt_without_a_user_turn_with_text_is_one_line_naming_its_row(tmp_path, recipe, prompt):
    """A system turn alone stopped PPO with a StopIteration traceback (its last user turn is what it asks); an empty
    user turn trained, where an empty text prompt is refused."""
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": [{"role": "user", "content": "Hi?"}]}, {"prompt": prompt}])
    with pytest.raises(PipelineError) as err:
        data.load(path, "prompts", recipe)
    assert str(err.value) == (f"{path}: line 2: 'prompt' needs a user turn with text (the last user turn is what "
                              f"is asked)")


def test_ppo_prompts_mixing_text_and_messages_read_the_text_as_user_turns(tmp_path, recipe):
    """ppo's prompts holding text beside messages (one file, or a text file listed with conversational pairs) become
    one column of messages, each text prompt the user turn the chat template renders it as (Arrow refused the two
    types in one column); a file of text prompts alone stays text."""
    from pipeline import ppo

    messages = [{"role": "user", "content": "Hi?"}]
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 2 + 3?"}, {"prompt": messages}])
    ds, info = ppo.read_prompts(path, recipe)
    assert ds["prompt"] == [[{"role": "user", "content": "What is 2 + 3?"}], messages] and info["format"] == "prompts"
    text = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "What is 2 + 3?"}])
    assert ppo.read_prompts(text, recipe)[0]["prompt"] == ["What is 2 + 3?"]


def test_a_column_of_mixed_types_is_named_with_its_rows(tmp_path, recipe):
    """A column Arrow cannot hold as one type (an id that is a number in one row and text in the next) stops the
    stage naming the column and both rows, not with Arrow's message alone."""
    rows = [{"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}], "id": 1},
            {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "B."}], "id": "b"}]
    path = write_jsonl(tmp_path / "ids.jsonl", rows)
    with pytest.raises(PipelineError) as err:
        data.load(path, "chat", recipe)
    assert str(err.value) == (f"{path}: rows do not share one schema: column 'id' holds int 1 (line 1) and str 'b' "
                              f"(line 2)")


def test_a_mixed_column_of_pairs_and_unpaired_rows_is_named_with_its_rows(tmp_path, recipe):
    """Pairs (reward, dpo, ppo's pair prompts) and kto's rows name the rows of a column Arrow cannot hold as one type,
    after an identical pair was left out (their places no longer line up with the rows): the error named no row."""
    from pipeline import ppo, preferences, unpaired

    rows = [{"prompt": "Q0?", "chosen": "A.", "rejected": "A.", "skill": 0},  # identical: left out
            {"prompt": "Q1?", "chosen": "A.", "rejected": "B.", "skill": 1},
            {"prompt": "Q2?", "chosen": "A.", "rejected": "B.", "skill": "add"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    expected = f"{path}: rows do not share one schema: column 'skill' holds int 1 (line 2) and str 'add' (line 3)"
    for load in (lambda: preferences.load_preferences(path, recipe), lambda: unpaired.load_unpaired(path, recipe),
                 lambda: ppo.read_prompts(path, recipe, pairs=True)):
        with pytest.raises(PipelineError) as err:
            load()
        assert str(err.value) == expected


def test_sharegpt_preference_pairs_are_not_taken_for_demonstrations(tmp_path, recipe):
    """LLaMA-Factory's ShareGPT ranking rows end with the user's turn, the replies in chosen/rejected: as sft data the
    chosen reply was lost and the history's replies trained; sft stops, naming the file and the columns."""
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                             {"from": "human", "value": "2+2?"}],
           "chosen": {"from": "gpt", "value": "4"}, "rejected": {"from": "gpt", "value": "5"}}
    path = write_jsonl(tmp_path / "dpo.jsonl", [row])
    with pytest.raises(PipelineError, match=rf"^{path}: ShareGPT preference pairs .* \(columns: conversations, "
                                            rf"chosen, rejected\); use them as reward.dataset or dpo.dataset$"):
        data.load(path, "chat", recipe)


def test_prompt_rows_offering_different_tools_keep_their_own_schemas(tmp_path, recipe):
    """PPO's prompts (`ppo.load_prompts` reads them as kind "prompts"): tools given as lists become JSON text, so
    Arrow does not give each row's schemas the other rows' properties as nulls; "[]" is no tools."""
    draw = {"type": "function", "function": {"name": "draw_image", "parameters": {
        "type": "object", "properties": {"prompt": {"type": "string"}}, "required": ["prompt"]}}}
    read = {"type": "function", "function": {"name": "read_image", "parameters": {
        "type": "object", "properties": {"image_id": {"type": "string"}}, "required": ["image_id"]}}}
    rows = [{"prompt": [{"role": "user", "content": "Draw a 7."}], "tools": [draw]},
            {"prompt": [{"role": "user", "content": "Which digit is in image 12?"}], "tools": [read]},
            {"prompt": [{"role": "user", "content": "Hi?"}], "tools": "[]"}]
    ds = data.load(write_jsonl(tmp_path / "prompts.jsonl", rows), "prompts", recipe)
    assert [json.loads(t) for t in ds["tools"][:2]] == [[draw], [read]] and ds[2]["tools"] is None


def _with_tool(parameters=None, function=None):
    tool = {"type": "function", "function": function if function is not None else
            {"name": "render_image", "description": "Draw.", "parameters": parameters}}
    return dict(SHAREGPT, tools=json.dumps([tool]))


# Cells of the wrong type that reached Python operations before any check (found by mutating rows of every format
# at random): each was a traceback (TypeError, AttributeError) instead of one line naming the file and row.
WRONG_CELLS = [
    ("chat", {"conversations": [{"from": "human", "value": "hi"}, {"from": ["gpt"], "value": "yo"}]},
     "turn 1: unknown 'from' ['gpt']"),
    ("chat", {"instruction": "Add.", "input": [3, 4], "output": "7"}, "'input' must be text, got list"),
    ("chat", {"instruction": {"text": "Add."}, "output": "7"}, "'instruction' must be text, got dict"),
    ("chat", _with_tool(function="render_image"), "a tool schema in 'tools' has no 'name'"),
    ("chat", _with_tool(function=[{"name": "render_image"}]), "a tool schema in 'tools' has no 'name'"),
    ("chat", _with_tool({"type": "object", "properties": {"prompt": {"type": [{}]}}}),
     "tool 'render_image': 'parameters' is not a valid JSON Schema (properties/prompt/type: "),
    ("chat", _with_tool({"type": "object", "properties": {}, "required": [["prompt"]]}),
     "tool 'render_image': 'parameters' is not a valid JSON Schema (required/0: ['prompt'] is not of type 'string')"),
    ("chat", _with_tool("object"), "tool 'render_image': 'parameters' must be a JSON Schema object, got str"),
    ("pref", {"conversations": [{"from": {"who": "human"}, "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
              "rejected": {"from": "gpt", "value": "b"}}, "turn 0: unknown 'from' {'who': 'human'}"),
    ("pref", {"instruction": ["q"], "chosen": "a", "rejected": "b"}, "'instruction' must be text, got list"),
]


@pytest.mark.parametrize("kind, row, message", WRONG_CELLS)
def test_a_cell_of_the_wrong_type_stops_with_one_line_naming_file_and_row(tmp_path, recipe, kind, row, message):
    path = write_jsonl(tmp_path / "rows.jsonl", [row])
    with pytest.raises(PipelineError) as err:
        data.load(path, "chat", recipe) if kind == "chat" else preferences.load_preferences(path, recipe)
    assert str(err.value).startswith(f"{path}: line 1: ") and message in str(err.value), str(err.value)


def test_a_tool_schema_may_give_an_argument_the_schema_true(tmp_path, recipe):
    # JSON Schema allows `true` (anything) as a property's schema: a call with any value for it loads
    row = _with_tool({"type": "object", "properties": {"prompt": True}, "required": ["prompt"]})
    ds = data.load(write_jsonl(tmp_path / "rows.jsonl", [row]), "chat", recipe)
    assert json.loads(ds[0]["messages"][2]["tool_calls"][0]["function"]["arguments"]) == {"prompt": "a red circle"}


def test_is_text_completion_tells_text_prompt_completion_rows_from_conversations(tmp_path, recipe):
    """The predicate sft, data and unpaired decide "text prompt/completion rows" by (sft decided it twice, reading
    `prompt` in one place and `completion` in another): on loaded rows, a row with text on one side only became a
    conversation, so it is not a text row, nor are messages, ShareGPT or Alpaca rows."""
    reply = [{"role": "assistant", "content": "Blue."}]
    loaded = {name: data.load(write_jsonl(tmp_path / f"{name}.jsonl", [row]), "chat", recipe)[0]
              for name, row in (("text", {"prompt": "The sky is", "completion": " blue."}),
                                ("half_text", {"prompt": "What color is the sky?", "completion": reply}),
                                ("sharegpt", SHAREGPT), ("alpaca", ALPACA))}
    assert {name: formats.is_text_completion(row) for name, row in loaded.items()} == {
        "text": True, "half_text": False, "sharegpt": False, "alpaca": False}


def test_arguments_and_tools_from_parquet_keep_no_nulls_arrow_filled_in(tmp_path, recipe):
    """Arrow gives a column's objects one struct type: each call's arguments and each tool schema read back from
    Parquet with every key any row's has, null where it had none (get_weather called with "tz": null)."""
    import datasets

    def tool(name, param):
        return {"type": "function", "function": {"name": name, "parameters": {
            "type": "object", "properties": {param: {"type": "string"}}, "required": [param]}}}

    def row(name, arguments):
        return {"messages": [{"role": "user", "content": "go"}, {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": name, "arguments": arguments}}]},
            {"role": "tool", "content": "22"}, {"role": "assistant", "content": "22"}], "tools": [tool(name, *arguments)]}

    path = tmp_path / "calls.parquet"
    datasets.Dataset.from_list([row("get_weather", {"city": "Paris"}), row("get_time", {"tz": "UTC"})]).to_parquet(path)
    ds = data.load(str(path), "chat", recipe)
    assert [json.loads(r["messages"][1]["tool_calls"][0]["function"]["arguments"]) for r in ds] == \
        [{"city": "Paris"}, {"tz": "UTC"}]
    assert [json.loads(r["tools"]) for r in ds] == [[tool("get_weather", "city")], [tool("get_time", "tz")]]


def test_a_sharegpt_pair_whose_prompt_ends_with_a_tool_result_is_read(tmp_path, recipe):
    """LLaMA-Factory's pairs may end their turns with an observation (the replies judge what the assistant says of a
    tool's result), as TRL's prompt may end with a tool message."""
    call = {"from": "function_call", "value": json.dumps({"name": "render_image", "arguments": {"prompt": "a cat"}})}
    row = {"conversations": [{"from": "human", "value": "Draw a cat."}, call, {"from": "observation", "value": "ok"}],
           "chosen": {"from": "gpt", "value": "Here it is."}, "rejected": {"from": "gpt", "value": "I cannot draw."},
           "tools": json.dumps(TOOLS)}
    ds, info = preferences.load_preferences(write_jsonl(tmp_path / "p.jsonl", [row]), recipe)
    assert [m["role"] for m in ds[0]["prompt"]] == ["user", "assistant", "tool"]
    assert ds[0]["chosen"][0]["content"] == "Here it is." and ds[0]["rejected"][0]["content"] == "I cannot draw."


def test_pairs_from_parquet_with_a_tool_call_on_one_side_share_their_prompt(tmp_path, recipe):
    """Arrow gives the chosen column's messages a tool_calls key (null where there is none) that the rejected
    column's lack: the shared prompt of implicit pairs, and an explicit pair of one reply, are found all the same."""
    import datasets

    user = {"role": "user", "content": "Draw a cat."}
    call = {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
        "name": "render_image", "arguments": json.dumps({"prompt": "a cat"})}}]}
    refusal, same = {"role": "assistant", "content": "I cannot draw."}, {"role": "assistant", "content": "Sure."}
    implicit = [{"chosen": [user, call], "rejected": [user, refusal]}]
    explicit = [{"prompt": [user], "chosen": [call], "rejected": [refusal]},
                {"prompt": [user], "chosen": [same], "rejected": [same]}]
    for name, rows in (("implicit", implicit), ("explicit", explicit)):
        datasets.Dataset.from_list([{**row, "tools": json.dumps(TOOLS)} for row in rows]).to_parquet(
            tmp_path / f"{name}.parquet")
        ds, info = preferences.load_preferences(str(tmp_path / f"{name}.parquet"), recipe)
        assert info["pairs"] == 1 and info["identical_dropped"] == len(rows) - 1
        assert [m["content"] for m in ds[0]["prompt"]] == ["Draw a cat."]
        assert ds[0]["chosen"][0]["tool_calls"][0]["function"]["name"] == "render_image"


def test_tool_calls_in_prompts_are_checked_and_their_arguments_become_json_text(tmp_path, recipe):
    """ppo's and eval's message prompts with earlier tool calls get the check sft and dpo give them: a call to a tool
    the row does not offer stops in one line; arguments given as objects become JSON text without the keys of other
    rows' calls (no Arrow struct of every row's keys), so objects beside JSON text in one file read as one type."""
    from pipeline import ppo

    tools = [{"name": "a", "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}},
             {"name": "b", "parameters": {"type": "object", "properties": {"y": {"type": "integer"}}}}]

    def row(name, arguments):
        return {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": name, "arguments": arguments}}]},
            {"role": "tool", "content": "ok"}, {"role": "user", "content": "and?"}], "tools": tools}

    path = write_jsonl(tmp_path / "p.jsonl", [row("a", {"x": "1"}), row("b", json.dumps({"y": 2}))])
    for read in (lambda: ppo.read_prompts(path, recipe)[0], lambda: data.load(path, "eval_prompts", recipe)):
        assert [json.loads(r["prompt"][1]["tool_calls"][0]["function"]["arguments"]) for r in read()] == \
            [{"x": "1"}, {"y": 2}]
    path = write_jsonl(tmp_path / "bad.jsonl", [row("a", {"x": "1"}), row("zzz", {"q": 1})])
    for kind in ("prompts", "eval_prompts"):
        with pytest.raises(PipelineError) as err:
            data.load(path, kind, recipe)
        assert str(err.value) == f"{path}: line 2: message 1: unknown tool 'zzz' (tools: a, b)"


@pytest.mark.parametrize("name", ["c.jsonl", "c.json", "c.jsonl.gz"])
def test_a_file_starting_with_a_utf8_byte_order_mark_is_read(tmp_path, recipe, name):
    """Notepad and Excel write UTF-8 with a byte order mark first: JSON and JSON Lines stopped with json's
    "Unexpected UTF-8 BOM" (a CSV was read); invalid UTF-8 after the mark is still named by its line."""
    rows = [{"text": "a"}, {"text": "b"}]
    body = (json.dumps(rows) if name == "c.json" else "".join(json.dumps(r) + "\n" for r in rows)).encode()
    path = tmp_path / name
    path.write_bytes((gzip.compress if name.endswith(".gz") else bytes)(b"\xef\xbb\xbf" + body))
    assert data.load(str(path), "text", recipe)["text"] == ["a", "b"]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'\xef\xbb\xbf{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(PipelineError, match=rf"{bad}: line 2: invalid UTF-8 \(byte 0xe9\)"):
        data.load(str(bad), "text", recipe)


@pytest.mark.parametrize("reply", [{"from": "gpt"}, [{"from": "gpt", "value": "a"}, {"from": "gpt"}]])
def test_a_sharegpt_reply_without_its_value_is_named(tmp_path, recipe, reply):
    """A ShareGPT chosen turn without `value` was kept as a message and named as one of no role ("unknown role
    None"): the turn and the key it lacks are named."""
    row = {"conversations": [{"from": "human", "value": "q"}], "chosen": reply,
           "rejected": {"from": "gpt", "value": "n"}}
    path = write_jsonl(tmp_path / "p.jsonl", [row])
    with pytest.raises(PipelineError) as err:
        preferences.load_preferences(path, recipe)
    turn = len(reply) - 1 if isinstance(reply, list) else 0
    assert str(err.value) == f"{path}: line 1: turn {turn} of 'chosen' has no 'value' (a turn needs 'from' and 'value')"


def _alarm_rows(arguments: dict, tools_cells: list) -> list[dict]:
    return [{"messages": [{"role": "user", "content": "at 7"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "set_alarm", "arguments": arguments}}]},
        {"role": "tool", "content": "ok"}, {"role": "assistant", "content": "Done."}], "tools": cell}
        for cell in tools_cells]


def _alarm_tools(required: list[str]) -> list[dict]:
    return [{"type": "function", "function": {"name": "set_alarm", "parameters": {"type": "object", "properties": {
        "time": {"type": "string"}, "label": {"type": ["string", "null"], "default": None}}, "required": required}}}]


@pytest.mark.parametrize("required", [["time", "label"], ["time"]])
def test_null_arguments_written_in_json_lines_are_kept(tmp_path, recipe, required):
    """A null a user wrote in JSON Lines (read with Python's json, no Arrow) is theirs: a required argument whose
    schema allows null was refused as missing, an optional one left out of the trained call."""
    rows = _alarm_rows({"time": "07:00", "label": None}, [_alarm_tools(required)])
    ds = data.load(write_jsonl(tmp_path / "calls.jsonl", rows), "chat", recipe)
    arguments = ds[0]["messages"][1]["tool_calls"][0]["function"]["arguments"]
    assert json.loads(arguments) == {"time": "07:00", "label": None}


def test_a_tool_schema_given_as_objects_keeps_its_nulls(tmp_path, recipe):
    """`"default": null` in a schema given as objects was dropped: the same schema as JSON text and as objects
    differed in the dataset the trainer sees."""
    tools = _alarm_tools(["time"])
    rows = _alarm_rows({"time": "07:00"}, [tools, json.dumps(tools)])
    ds = data.load(write_jsonl(tmp_path / "calls.jsonl", rows), "chat", recipe)
    assert [json.loads(r["tools"]) for r in ds] == [tools, tools]


def test_a_pair_differing_only_in_a_null_argument_is_kept(tmp_path, recipe):
    """Replies whose calls differ only in `b: null` against `b` left out were dropped as identical."""
    schema = [{"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer"}, "b": {"type": ["integer", "null"]}}}}]

    def call(arguments):
        return [{"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": arguments}}]}]

    pair = {"prompt": [{"role": "user", "content": "q"}], "chosen": call({"a": 1, "b": None}),
            "rejected": call({"a": 1}), "tools": schema}
    ds, info = preferences.load_preferences(write_jsonl(tmp_path / "p.jsonl", [pair]), recipe)
    assert info["pairs"] == 1 and info["identical_dropped"] == 0
    assert json.loads(ds[0]["chosen"][0]["tool_calls"][0]["function"]["arguments"]) == {"a": 1, "b": None}


def test_implicit_pairs_written_from_arrow_share_a_prompt_whose_messages_differ_by_none_keys(tmp_path, recipe):
    """JSON Lines written from Arrow (Dataset.to_json) give every message of a column the keys any of them has: the
    side with a tool call has `"tool_calls": null` on its prompt's messages, the other side not. The chat template
    never sees a key holding None, so the prompt is shared; before, such a pair stopped with "share no prompt"."""
    user = {"role": "user", "content": "draw"}
    call = {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    rows = [{"chosen": [{**user, "tool_calls": None}, call],
             "rejected": [user, {"role": "assistant", "content": "no"}], "tools": [{"name": "f"}]},
            {"chosen": [{**user, "tool_calls": None}, {"role": "assistant", "content": "yes", "tool_calls": None}],
             "rejected": [user, {"role": "assistant", "content": "yes"}]}]
    ds, info = preferences.load_preferences(write_jsonl(tmp_path / "p.jsonl", rows), recipe)
    assert info["pairs"] == 1 and info["identical_dropped"] == 1  # the second pair's sides render alike
    assert [m["content"] for m in ds[0]["prompt"]] == ["draw"] and ds[0]["rejected"][0]["content"] == "no"


def test_arrow_filled_in_nulls_are_dropped_from_saved_and_hub_datasets(tmp_path, recipe, monkeypatch):
    """A saved dataset, an .arrow file and a hub dataset are read as Parquet is (files.arrow_rows): objects inside a
    cell lose the keys Arrow gave them from other rows."""
    import datasets

    from pipeline import hub

    def row(name, arguments):
        return {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": name, "arguments": arguments}}]},
            {"role": "tool", "content": "ok"}, {"role": "user", "content": "and?"}],
            "tools": [{"name": name, "parameters": {"type": "object", "properties": {
                k: {"type": "string"} for k in arguments}, "required": list(arguments)}}]}

    ds = datasets.Dataset.from_list([row("a", {"x": "1"}), row("b", {"y": "2"})])
    ds.save_to_disk(tmp_path / "saved")
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, split=None: ds)
    monkeypatch.setattr(hub, "reachable", lambda: True)
    for spec in (tmp_path / "saved", *(tmp_path / "saved").glob("*.arrow"), "org/calls"):
        loaded = data.load(str(spec), "eval_prompts", recipe)
        assert [json.loads(r["prompt"][1]["tool_calls"][0]["function"]["arguments"]) for r in loaded] == \
            [{"x": "1"}, {"y": "2"}]


def test_earlier_calls_in_a_prompt_without_tools_are_not_checked_against_none(tmp_path, recipe):
    """A prompt row without a `tools` column offers eval every tool of the recipe (ppo none; neither checks a prompt's
    earlier calls): its earlier call to the recipe's draw_image was refused as a call to an unknown tool (tools: none).
    Its arguments still become JSON text."""
    row = {"prompt": [{"role": "user", "content": "Draw a cat."}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "draw_image", "arguments": {"prompt": "a cat"}}}]},
        {"role": "tool", "content": "image 1"}, {"role": "user", "content": "Now a dog."}]}
    path = write_jsonl(tmp_path / "prompts.jsonl", [row])
    for kind in ("prompts", "eval_prompts"):
        ds = data.load(path, kind, recipe)
        assert ds[0]["prompt"][1]["tool_calls"][0]["function"]["arguments"] == json.dumps({"prompt": "a cat"})
