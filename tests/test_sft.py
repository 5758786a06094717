"""sft's `drop_oldest_turns`: a conversation over max_length loses whole oldest exchanges (pipeline/turns.py), in
the function, through recipe loading and through the stage."""

import json
import warnings

import pytest
import yaml

from conftest import REPO, run_cli, tiny_recipe, write_jsonl
from test_tokenizer import TOOLS, make_corpus

SYSTEM = {"role": "system", "content": "You can use tools."}


def exchange(city: str, degrees: int) -> list[dict]:
    """A user turn, a tool call, its result and the reply."""
    return [{"role": "user", "content": f"What is the weather in {city} today?"},
            {"role": "assistant", "content": None,
             "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}]},
            {"role": "tool", "name": "get_weather", "content": json.dumps({"degrees": degrees})},
            {"role": "assistant", "content": f"It is {degrees} degrees in {city}."}]


FIRST, SECOND, LAST = exchange("Paris", 21), exchange("London", 12), exchange("Rome", 30)


@pytest.fixture(scope="module")
def tok():
    from pipeline.tokenizer import train_tokenizer

    return train_tokenizer(make_corpus(), vocab_size=512)


def length(tok, messages) -> int:
    from pipeline.turns import row_length

    return row_length(tok, {"messages": messages, "tools": json.dumps(TOOLS)})


def test_a_conversation_over_max_length_loses_its_oldest_exchanges_only(tok):
    from pipeline.turns import drop_oldest_turns

    row = {"messages": [SYSTEM] + FIRST + SECOND + LAST, "tools": json.dumps(TOOLS)}
    full, last_two, last_one = (length(tok, [SYSTEM] + FIRST + SECOND + LAST), length(tok, [SYSTEM] + SECOND + LAST),
                                length(tok, [SYSTEM] + LAST))
    assert full > last_two > last_one
    assert drop_oldest_turns(tok, row, full) is row  # it fits: unchanged
    assert drop_oldest_turns(tok, row, full - 1) == {**row, "messages": [SYSTEM] + SECOND + LAST}
    assert drop_oldest_turns(tok, row, last_two) == {**row, "messages": [SYSTEM] + SECOND + LAST}
    assert drop_oldest_turns(tok, row, last_two - 1) == {**row, "messages": [SYSTEM] + LAST}
    assert drop_oldest_turns(tok, row, last_one - 1) is row  # not even the last exchange fits: truncation_mode's
    # a trailing user turn has no reply to learn from: the last exchange with a reply stays with it
    thanks = [{"role": "user", "content": "Thanks!"}]
    asked = {**row, "messages": row["messages"] + thanks}
    assert drop_oldest_turns(tok, asked, length(tok, [SYSTEM] + LAST + thanks))["messages"] == [SYSTEM] + LAST + thanks


def test_the_kept_assistant_turns_are_the_ones_the_loss_sees(tok):
    """The tool schemas still render in the system turn, and assistant_only_loss masks the kept replies."""
    from pipeline.turns import drop_oldest_turns

    row = {"messages": [SYSTEM] + FIRST + SECOND + LAST, "tools": json.dumps(TOOLS)}
    kept = drop_oldest_turns(tok, row, length(tok, [SYSTEM] + LAST))["messages"]
    out = tok.apply_chat_template(kept, tools=TOOLS, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert tok.decode(ids).startswith("<|im_start|>system\nYou can use tools.\n\n# Tools")
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>'
        "It is 30 degrees in Rome.<|im_end|>")


def test_a_dataset_keeps_its_other_rows_and_columns(tok):
    from datasets import Dataset

    from pipeline.turns import fit_conversations

    rows = [{"messages": [SYSTEM] + FIRST + SECOND + LAST, "tools": json.dumps(TOOLS)},
            {"messages": [SYSTEM] + LAST, "tools": json.dumps(TOOLS)}]
    ds = Dataset.from_list(rows)
    max_length = length(tok, [SYSTEM] + SECOND + LAST)
    fitted, shortened = fit_conversations(tok, ds, max_length)
    assert shortened == 1 and fitted.features == ds.features and fitted["tools"] == ds["tools"]
    assert [[m["content"] for m in r["messages"]] for r in fitted] == [
        [m["content"] for m in [SYSTEM] + SECOND + LAST], [m["content"] for m in [SYSTEM] + LAST]]
    assert fit_conversations(tok, ds, 10_000) == (ds, 0)


def test_the_small_recipe_drops_oldest_turns_instead_of_keep_end(tmp_path):
    """TRL 1.x warns that keep_end goes in 2.0: the small recipe's sft asks for the pipeline's own key instead."""
    from pipeline.recipe import load_recipe

    section = yaml.safe_load((REPO / "recipes/small.yaml").read_text())["sft"]
    assert section["drop_oldest_turns"] is True and "truncation_mode" not in section
    recipe = load_recipe(REPO / "recipes/small.yaml")
    assert recipe.keys("sft").drop_oldest_turns is True
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # TRL's keep_end deprecation
        args = recipe.trainer_config("sft", num_processes=0)
    assert args.truncation_mode == "keep_start" and not hasattr(args, "drop_oldest_turns")
    assert load_recipe(tiny_recipe(tmp_path), ["sft.drop_oldest_turns=true"]).keys("sft").drop_oldest_turns


def test_the_stage_trains_long_conversations_on_their_last_exchanges(tiny_run, tmp_path):
    """Conversations whose first exchange alone fills max_length: cut at their end (keep_start) none keeps a reply
    and the stage stops, naming the key; with drop_oldest_turns they train on their last exchange."""
    work, _, _ = tiny_run
    long_first = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    last = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]
    spec = write_jsonl(tmp_path / "long.jsonl", [{"messages": [{"role": "system", "content": "Be brief."}]
                                                  + long_first + last}] * 4)
    recipe = tiny_recipe(tmp_path, pretrain=None, sft={
        "init_from": str(work / "runs/tiny/pretrain"), "dataset": spec, "eval_dataset": spec, "heldout_prompts": "",
        "max_steps": 1, "logging_steps": 1})
    proc = run_cli(["pipeline/sft.py", recipe], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: {spec}: all 4 rows are over sft.max_length=128 tokens and keep no completion token once cut "
        f"(truncation_mode keep_start): raise max_length or, for conversations of several exchanges, set "
        f"sft.drop_oldest_turns: true")
    proc = run_cli(["pipeline/sft.py", recipe, "sft.drop_oldest_turns=true"], cwd=tmp_path,
                   env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("sft.drop_oldest_turns: 4 of 4 training conversations and 4 of 4 held-out ones were over "
            "max_length=128 tokens and lost their oldest exchanges") in proc.stdout + proc.stderr
    metrics = json.loads((tmp_path / "runs/tiny/sft/metrics.json").read_text())
    assert (metrics["train_rows"], metrics["train_rows_too_long"], metrics["train_rows_dropped"]) == (4, 0, 0)
    assert "keep_end" not in proc.stdout + proc.stderr
    # prompt/completion rows: nothing for the key to shorten, said
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "What is 2 + 2?", "completion": " 4"}] * 4)
    proc = run_cli(["pipeline/sft.py", recipe, "sft.drop_oldest_turns=true", f"sft.dataset={pairs}",
                    "sft.eval_dataset=", "run.name=pairs"], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (f"{pairs}: sft.drop_oldest_turns shortens conversations (`messages`) only, and these rows are "
            f"prompt/completion rows: a row over max_length is cut by truncation_mode") in proc.stdout + proc.stderr
