"""A new user's files through the real command lines: SFT on Alpaca and on ShareGPT with tool calls, DPO and reward
on ShareGPT preference pairs, pretraining on plain text, the shipped tool sample, what a stage folder tells a user
(model card, detected format, readable weights), --help, standalone evaluation, and bad input stopping in one line."""

import json
import os
import stat

import pytest


from conftest import REPO, run_cli, tiny_recipe, write_jsonl
from test_formats import ALPACA, SHAREGPT

ONE_THREAD = {"OMP_NUM_THREADS": "1"}
SHORT = {"max_steps": 2, "logging_steps": 1, "heldout_prompts": "", "eval_dataset": ""}


def manifest(work, name, stage):
    return json.loads((work / "runs" / name / stage / "manifest.json").read_text())


def one_error_line(proc) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    return lines[-1]


def one_error_line_of(main, argv: list[str], capsys) -> str:
    """one_error_line of a stage run in this process, as its script runs it (cli.run_main)."""
    from pipeline import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(main, argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err[-2000:]
    return err.strip().splitlines()[-1]


def test_sft_on_an_alpaca_file_names_the_format_and_writes_a_model_card(tiny_run, tmp_path):
    work, _, _ = tiny_run
    rows = [ALPACA, {"instruction": "Say hi.", "output": "Hi."}] * 4
    recipe = tiny_recipe(tmp_path, pretrain=None, sft={
        **SHORT, "init_from": str(work / "runs/tiny/pretrain"), "dataset": write_jsonl(tmp_path / "a.jsonl", rows),
        "heldout_prompts": "world:eval", "max_steps": 6, "report_to": "tensorboard"})
    proc = run_cli(["pipeline/sft.py", recipe, "run.name=alpaca"], cwd=tmp_path, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert manifest(tmp_path, "alpaca", "sft")["data"]["dataset"]["format"] == "alpaca"
    assert "dataset: 8 rows from" in proc.stdout and "(format alpaca)" in proc.stdout
    # a user's data measured on the world's held-out prompts, and 6 steps x 8 rows over 8 rows: both said once
    assert proc.stdout.count("sft.heldout_prompts=world:eval") == 1 and "6.0 epochs of the 8 training rows" in proc.stdout
    out = tmp_path / "runs/alpaca/sft"
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and "## Started from" in card
    assert "format alpaca, 8 rows" in card and "| train_loss |" in card
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((out / "model.safetensors").stat().st_mode) == 0o666 & ~mask  # as readable as the rest
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pkl"))
    assert list(out.rglob("events.out.tfevents.*"))  # report_to: tensorboard


def test_sft_on_sharegpt_with_tool_calls_and_the_shipped_tool_sample(tiny_run, tmp_path):
    work, _, _ = tiny_run
    plain = {"conversations": [{"from": "human", "value": "What is 3 + 4?"}, {"from": "gpt", "value": "7"}]}
    # the shipped tool sample's rows whole: 512-665 tokens with the tiny recipe's tokenizer (their tool schemas);
    # each is one exchange, which drop_oldest_turns keeps whole, and keep_start would cut its reply away
    settings = {**SHORT, "init_from": str(work / "runs/tiny/pretrain"), "max_length": 704, "drop_oldest_turns": True}
    for name, spec, fmt in (("sharegpt", write_jsonl(tmp_path / "s.jsonl", [SHAREGPT, plain] * 4), "sharegpt"),
                            ("tools", str(REPO / "data/samples/chat_tools.jsonl"), "messages")):
        recipe = tiny_recipe(tmp_path, pretrain=None, sft={**settings, "dataset": spec})
        proc = run_cli(["pipeline/sft.py", recipe, f"run.name={name}"], cwd=tmp_path, env=ONE_THREAD)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert manifest(tmp_path, name, "sft")["data"]["dataset"]["format"] == fmt


def test_dpo_and_reward_on_a_sharegpt_preference_file(tiny_run, tmp_path):
    work, _, _ = tiny_run
    pairs = [{"conversations": [{"from": "human", "value": f"What is {i} + {i}?"}],
              "chosen": {"from": "gpt", "value": f"Sure! The answer is {2 * i}."},
              "rejected": {"from": "gpt", "value": f"Ugh. The answer is {2 * i + 1}."}} for i in range(24)]
    spec = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    sft = str(work / "runs/tiny/sft")
    for stage, extra in (("dpo", {"per_device_train_batch_size": 4}),
                         ("reward", {"per_device_train_batch_size": 4, "eval_fraction": 0.25})):
        recipe = tiny_recipe(tmp_path, pretrain=None, sft=None, **{stage: {
            "init_from": sft, "dataset": spec, "eval_dataset": "", "max_steps": 2, "logging_steps": 1,
            "use_cpu": True, "gradient_checkpointing": False, "bf16": False, "save_strategy": "no",
            **({"heldout_prompts": ""} if stage == "dpo" else {}), **extra}})
        proc = run_cli([f"pipeline/{stage}.py", recipe, f"run.name={stage}"], cwd=tmp_path, env=ONE_THREAD)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert manifest(tmp_path, stage, stage)["data"]["dataset"]["format"] == "sharegpt"


def test_reward_on_datasets_with_and_without_margins_stops_in_one_line(tiny_run, tmp_path):
    """A list of preference datasets where one gives margins (score_chosen/score_rejected) and the other none: the
    reward stage, the one that trains on margins, stops before any model loads, unless margin_scale is 0."""
    work, _, _ = tiny_run
    turn = [{"role": "user", "content": "What is 1 + 1?"}]
    scored = write_jsonl(tmp_path / "scored.jsonl", [
        {"chosen": turn + [{"role": "assistant", "content": "2"}], "rejected": turn + [{"role": "assistant",
                                                                                        "content": "3"}],
         "score_chosen": 9.0, "score_rejected": 2.0}] * 8)
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": [{"role": "user", "content": "What is 2 + 2?"}],
                                                    "chosen": [{"role": "assistant", "content": "4"}],
                                                    "rejected": [{"role": "assistant", "content": "5"}]}] * 8)
    recipe = tiny_recipe(tmp_path, pretrain=None, sft=None, reward={
        "init_from": str(work / "runs/tiny/sft"), "dataset": [scored, plain], "eval_dataset": plain,
        "max_steps": 1, "use_cpu": True, "save_strategy": "no"})
    proc = run_cli(["pipeline/reward.py", recipe, "run.name=margins"], cwd=tmp_path, env=ONE_THREAD)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"error: {scored} + {plain}: some of its datasets give margins (margin or score_chosen/score_rejected) and "
        f"some do not: give them to all or none, or set reward.margin_scale: 0")
    assert not (tmp_path / "runs/margins").exists()


def test_pretraining_on_a_plain_text_file(tmp_path):
    text = "\n\n".join(f"Document {i}: three plus {i} is {3 + i}. The cat sat on the mat." for i in range(200))
    (tmp_path / "corpus.txt").write_text(text)
    recipe = tiny_recipe(tmp_path, sft=None, pretrain={"dataset": str(tmp_path / "corpus.txt"), "max_steps": 2},
                         tokenizer={"dataset": str(tmp_path / "corpus.txt")})
    proc = run_cli(["pipeline/pretrain.py", recipe], cwd=tmp_path, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = manifest(tmp_path, "tiny", "pretrain")["data"]["dataset"]
    assert info["format"] == "txt, a document per paragraph" and info["rows"] == 200


def test_sft_on_a_llamafactory_data_folder_by_the_name_its_registry_gives(tiny_run, tmp_path):
    """A LLaMA-Factory user's data folder as it is: `data:NAME` trains on the dataset its dataset_info.json names
    (with its own column names); a bad row in another is found by --check and by the stage, naming file and row."""
    work, _, _ = tiny_run
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "dataset_info.json").write_text(json.dumps({
        "qa": {"file_name": "qa.json", "columns": {"prompt": "question", "response": "answer"}},
        "chats": {"file_name": "chats.json", "formatting": "sharegpt"}}))
    (folder / "qa.json").write_text(json.dumps([{"question": f"Say {i}.", "answer": f"{i}."} for i in range(8)]))
    (folder / "chats.json").write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "Hello."}]},
        {"conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "Hello."}]}]))
    settings = {**SHORT, "init_from": str(work / "runs/tiny/pretrain")}
    recipe = tiny_recipe(tmp_path, pretrain=None, sft={**settings, "dataset": f"{folder}:qa"})
    proc = run_cli(["pipeline/sft.py", recipe, "run.name=lf"], cwd=tmp_path, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert manifest(tmp_path, "lf", "sft")["data"]["dataset"]["format"] == "alpaca"
    assert f"dataset: 8 rows from {folder}:qa" in proc.stdout
    recipe = tiny_recipe(tmp_path, pretrain=None, sft={**settings, "dataset": f"{folder}:chats"})
    check = run_cli(["pipeline/run.py", recipe, "--check", "run.name=bad"], cwd=tmp_path, env=ONE_THREAD)
    assert check.returncode == 2 and f"{folder}:chats: chats.json row 2: turn 0: unknown 'from' 'robot'" in check.stdout
    proc = run_cli(["pipeline/sft.py", recipe, "run.name=bad"], cwd=tmp_path, env=ONE_THREAD)
    assert one_error_line(proc).startswith(f"error: {folder}:chats: chats.json row 2: turn 0: unknown 'from'")
    assert not (tmp_path / "runs/bad").exists()


def test_sft_rows_all_over_max_length_stop_in_one_line_and_leave_nothing(tiny_run, tmp_path):
    work, _, _ = tiny_run
    long = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]}
    spec = write_jsonl(tmp_path / "long.jsonl", [long] * 4)
    recipe = tiny_recipe(tmp_path, pretrain=None, sft={**SHORT, "init_from": str(work / "runs/tiny/pretrain"),
                                                       "dataset": spec, "max_length": 64})
    proc = run_cli(["pipeline/sft.py", recipe], cwd=tmp_path, env=ONE_THREAD)
    line = one_error_line(proc)
    assert line.startswith(f"error: {spec}: all 4 rows are over sft.max_length=64 tokens")
    assert not (tmp_path / "runs").exists()


def test_what_trls_sft_trainer_refuses_stops_in_one_line_and_leaves_nothing(tiny_run, tmp_path):
    """TRL's SFTTrainer refuses some settings only when it is built, after the stage folder was made:
    assistant_only_loss on text prompt/completion rows was a traceback with a .partial folder left behind."""
    work, _, _ = tiny_run
    spec = write_jsonl(tmp_path / "text.jsonl", [{"prompt": "What is 2 + 2?", "completion": " 4."}] * 4)
    recipe = tiny_recipe(tmp_path, pretrain=None, sft={**SHORT, "init_from": str(work / "runs/tiny/pretrain"),
                                                       "dataset": spec, "eval_dataset": spec,
                                                       "assistant_only_loss": True})
    proc = run_cli(["pipeline/sft.py", recipe], cwd=tmp_path, env=ONE_THREAD)
    line = one_error_line(proc)
    assert line.startswith(f"error: {recipe}: section 'sft' (SFTTrainer): You set `assistant_only_loss=True`")
    assert not (tmp_path / "runs").exists()
    # set on the command line: the line names that override, as the stage's other refusals do
    recipe.write_text(recipe.read_text().replace("assistant_only_loss: true", "assistant_only_loss: false"))
    proc = run_cli(["pipeline/sft.py", recipe, "sft.assistant_only_loss=true"], cwd=tmp_path, env=ONE_THREAD)
    line = one_error_line(proc)
    assert line.startswith("error: override 'sft.assistant_only_loss=true': section 'sft' (SFTTrainer): You set `assis")
    assert not (tmp_path / "runs").exists()


def test_held_out_rows_of_another_kind_are_scored_with_the_loss_trained(tiny_run, tmp_path):
    """The trainer takes its loss mask from the training rows and tokenized held-out rows of another kind with it:
    conversations held out beside prompt/completion training rows had all their text in eval_loss (user turns too).
    Now conversations and conversational prompt/completion rows are converted to the training rows' kind; text
    rows beside conversations stop the stage in one line, or, with the default world:sft_eval, give no eval_loss."""
    import datasets

    from pipeline.cli import PipelineError
    from pipeline.sft import in_training_shape

    turns = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}]
    chats = datasets.Dataset.from_list([{"messages": turns}])
    pairs = datasets.Dataset.from_list([{"prompt": turns[:1], "completion": turns[1:]}])
    text = datasets.Dataset.from_list([{"prompt": "What is 2 + 2?", "completion": " 4."}])
    assert in_training_shape(chats, pairs, "e.jsonl", False).to_list() == pairs.to_list()
    assert in_training_shape(pairs, chats, "e.jsonl", False).to_list() == chats.to_list()
    assert in_training_shape(text, text, "e.jsonl", False) is text
    with pytest.raises(PipelineError, match=r"^e\.jsonl: held-out conversations beside training text prompt/"):
        in_training_shape(chats, text, "e.jsonl", False)
    with pytest.raises(PipelineError, match=r"^e\.jsonl: held-out text prompt/completion rows beside training conv"):
        in_training_shape(text, chats, "e.jsonl", False)
    # through the stage: text rows of yours with the default held-out set train, without an eval_loss
    work, _, _ = tiny_run
    spec = write_jsonl(tmp_path / "text.jsonl", [{"prompt": "What is 2 + 2?", "completion": " 4."}] * 4)
    recipe = tiny_recipe(tmp_path, pretrain=None, sft={**SHORT, "init_from": str(work / "runs/tiny/pretrain"),
                                                       "dataset": spec, "eval_dataset": "world:sft_eval"})
    proc = run_cli(["pipeline/sft.py", recipe], cwd=tmp_path, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world:sft_eval: no eval_loss: its conversations beside training text prompt/completion rows" in \
        proc.stdout + proc.stderr
    assert "eval_loss" not in json.loads((tmp_path / "runs/tiny/sft/metrics.json").read_text())


def test_text_rows_beside_held_out_scoring_are_said(tiny_run, tmp_path):
    """Text prompt/completion rows train on their plain text, while the held-out scoring asks each prompt as a chat
    user turn (as eval does): its accuracies were reported without a word about the format the stage trained."""
    work, _, _ = tiny_run
    spec = write_jsonl(tmp_path / "text.jsonl", [{"prompt": "What is 2 + 2?", "completion": " 4."}] * 4)
    recipe = tiny_recipe(tmp_path, pretrain=None, sft={**SHORT, "init_from": str(work / "runs/tiny/pretrain"),
                                                       "dataset": spec, "max_steps": 1, "heldout_prompts": "world:eval",
                                                       "heldout_max_prompts": 2, "heldout_max_new_tokens": 2})
    proc = run_cli(["pipeline/sft.py", recipe], cwd=tmp_path, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{spec}: text prompt/completion rows train on their plain text, but the held-out scoring " \
           f"(sft.heldout_prompts) asks each prompt as a chat user turn" in proc.stdout + proc.stderr


def test_blocks_longer_than_the_models_positions_stop_in_one_line(tmp_path):
    """A GPT-2 style model (learned positions, n_positions 64) with block_size 128 crashed in its first step with an
    IndexError, a .partial left behind."""
    recipe = tiny_recipe(tmp_path, model={"config": {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2,
                                                     "n_positions": 64}},
                         pretrain={"block_size": 128, "max_steps": 1}, sft=None)
    proc = run_cli(["pipeline/pretrain.py", recipe], cwd=tmp_path, env=ONE_THREAD)
    assert one_error_line(proc) == f"error: {recipe}: pretrain.block_size (128) is over the model's 64 positions: " \
                                   f"lower it, or build the model with more"
    assert not (tmp_path / "runs/tiny/pretrain.partial").exists()


@pytest.mark.parametrize("stage", ["sft", "dpo", "reward", "kto"])
def test_a_max_length_over_learned_positions_stops_in_one_line(tmp_path, stage):
    """A GPT-2 style model (learned positions, n_positions 64) under a max_length of 128 (TRL's default 1024 for the
    preference stages) crashed in its first step with an IndexError, a .partial left behind."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.tokenizer import train_tokenizer

    folder = str(tmp_path / "gpt2")
    tokenizer = train_tokenizer([f"What is {i} + {i}? The answer is {2 * i}." for i in range(50)], vocab_size=300)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64,
                               pad_token_id=tokenizer.pad_token_id)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    recipe = tiny_recipe(tmp_path, pretrain=None, tokenizer=None, model={"config": None, "name_or_path": folder},
                         **{stage: {"init_from": "model", "max_steps": 1, "use_cpu": True}})
    proc = run_cli([f"pipeline/{stage}.py", recipe], cwd=tmp_path, env=ONE_THREAD)
    given = 128 if stage == "sft" else 1024
    assert one_error_line(proc) == f"error: {recipe}: {stage}.max_length ({given}) is over the model's table of 64 " \
                                   f"positions: a longer row stops training with an index out of range; set " \
                                   f"{stage}.max_length to 64 or less"
    assert not list((tmp_path / "runs/tiny").glob("*.partial"))
    if stage == "dpo":  # --check says it from the model's config (the tiny recipe has an sft section too)
        check = run_cli(["pipeline/run.py", recipe, "--check"], cwd=tmp_path, env=ONE_THREAD)
        assert check.returncode == 2
        assert "error: sft.max_length (128) is over the model's table of 64 positions" in check.stdout
        assert "error: dpo.max_length (1024) is over the model's table of 64 positions" in check.stdout


def test_packed_rows_over_max_length_are_counted_and_said(tiny_run, tmp_path):
    """TRL's default packing (bfd) cuts each row at max_length and trains on no more of it; metrics.json said no row
    was too long (the count was skipped when packing)."""
    work, _, _ = tiny_run
    long = {"messages": [{"role": "user", "content": "word " * 60}, {"role": "assistant", "content": "ok " * 40}]}
    spec = write_jsonl(tmp_path / "long.jsonl", [long] * 3 + [{"messages": long["messages"][:1] + [
        {"role": "assistant", "content": "ok"}]}])
    recipe = tiny_recipe(tmp_path, pretrain=None, sft={**SHORT, "init_from": str(work / "runs/tiny/pretrain"),
                                                       "dataset": spec, "max_length": 96, "packing": True})
    proc = run_cli(["pipeline/sft.py", recipe], cwd=tmp_path, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs/tiny/sft/metrics.json").read_text())
    assert metrics["train_rows_too_long"] == 3
    assert "3 rows are over sft.max_length=96 tokens: packing (bfd) cuts each" in proc.stdout + proc.stderr


def test_a_held_out_text_too_short_for_a_block_is_named(tmp_path):
    """pretrain's error named the training file when the held-out file was the one too short for a block."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Document {i} has a few words in it, and then a few more." for i in range(40)))
    (tmp_path / "held.txt").write_text("Short.")
    recipe = tiny_recipe(tmp_path, pretrain={"dataset": str(corpus), "eval_dataset": str(tmp_path / "held.txt"),
                                             "block_size": 32, "max_steps": 1})
    proc = run_cli(["pipeline/pretrain.py", recipe], cwd=tmp_path, env=ONE_THREAD)
    assert one_error_line(proc) == f"error: {tmp_path / 'held.txt'}: too little text for one block of 32 tokens"


@pytest.mark.parametrize("stage, unit", [("dpo", "pairs"), ("kto", "rows")])
def test_pairs_whose_prompts_fill_max_length_are_counted_and_all_of_them_stop_in_one_line(tiny_run, tmp_path, stage,
                                                                                          unit):
    """TRL leaves out a pair (a kto row) whose prompt alone fills max_length, without a word: the stage counts them
    in metrics.json, and when they are all of the training or held-out data it stops before training."""
    work, _, _ = tiny_run
    def rows(prompt, n):
        pairs = [{"prompt": f"{prompt} {i}", "chosen": " yes.", "rejected": " no."} for i in range(n)]
        return pairs if stage == "dpo" else [
            {"prompt": p["prompt"], "completion": p[side], "label": side == "chosen"}
            for p in pairs for side in ("chosen", "rejected")]
    long, short = "word " * 100, "Say yes"
    train = write_jsonl(tmp_path / "train.jsonl", rows(long, 3) + rows(short, 5))
    held = write_jsonl(tmp_path / "held.jsonl", rows(long, 1) + rows(short, 3))
    per_pair = 1 if stage == "dpo" else 2
    section = {**SHORT, "init_from": str(work / "runs/tiny/pretrain"), "max_length": 64, "use_cpu": True,
               "per_device_train_batch_size": 2, "dataset": train, "eval_dataset": held}
    recipe = tiny_recipe(tmp_path, pretrain=None, **{stage: section})
    proc = run_cli([f"pipeline/{stage}.py", recipe, "run.name=some"], cwd=tmp_path, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / f"runs/some/{stage}/metrics.json").read_text())
    too_long = ("train_pairs_too_long", "eval_pairs_too_long") if stage == "dpo" else \
        ("train_examples_too_long", "eval_examples_too_long")
    assert (m[too_long[0]], m[too_long[1]]) == (3 * per_pair, 1 * per_pair)
    # the pairs (rows) trained on, as the reward stage counts them (it counted the ones left out too)
    assert m["train_pairs" if stage == "dpo" else "train_examples"] == 5 * per_pair
    assert f"({3 * per_pair} and {per_pair} of them over max_length=64 in the prompt alone: left out)" in proc.stdout
    for name, data_key, spec in (("train", "dataset", write_jsonl(tmp_path / "all.jsonl", rows(long, 4))),
                                 ("held", "eval_dataset", write_jsonl(tmp_path / "all_held.jsonl", rows(long, 2)))):
        proc = run_cli([f"pipeline/{stage}.py", recipe, f"run.name={name}", f"{stage}.{data_key}={spec}"],
                       cwd=tmp_path, env=ONE_THREAD)
        held_out = "held-out " if name == "held" else ""
        assert one_error_line(proc) == (f"error: {spec}: all {(4 if name == 'train' else 2) * per_pair} {held_out}"
                                        f"{unit} have prompts of {stage}.max_length=64 tokens or more, which leave no "
                                        f"reply token: raise max_length")
        assert not (tmp_path / f"runs/{name}").exists()


def test_sft_held_out_rows_all_over_max_length_stop_before_training(tiny_run, tmp_path):
    """Held-out rows that keep no completion token once cut would leave the stage without an eval loss after
    training: it stops before, in one line."""
    work, _, _ = tiny_run
    long = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]}
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    spec = write_jsonl(tmp_path / "long.jsonl", [long] * 3)
    recipe = tiny_recipe(tmp_path, pretrain=None, sft={**SHORT, "init_from": str(work / "runs/tiny/pretrain"),
                                                       "dataset": write_jsonl(tmp_path / "s.jsonl", [short] * 4),
                                                       "eval_dataset": spec, "max_length": 64})
    proc = run_cli(["pipeline/sft.py", recipe], cwd=tmp_path, env=ONE_THREAD)
    assert one_error_line(proc) == (f"error: {spec}: all 3 held-out rows are over sft.max_length=64 tokens and keep "
                                    f"no completion token once cut (truncation_mode keep_start): raise max_length or, "
                                    f"for conversations of several exchanges, set sft.drop_oldest_turns: true")
    assert not (tmp_path / "runs").exists()
    # some training rows left out: train_rows counts the rows trained on (it counted the ones left out too)
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [long] * 2 + [short] * 4)
    proc = run_cli(["pipeline/sft.py", recipe, f"sft.dataset={mixed}", "sft.eval_dataset="], cwd=tmp_path,
                   env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((tmp_path / "runs/tiny/sft/metrics.json").read_text())
    assert (m["train_rows"], m["train_rows_too_long"], m["train_rows_dropped"]) == (4, 2, 2)


def test_bad_input_files_stop_in_one_line_naming_file_and_row(tiny_run, tmp_path):
    work, _, _ = tiny_run
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    recipe = tiny_recipe(tmp_path, pretrain=None, sft={**SHORT, "init_from": str(work / "runs/tiny/pretrain"),
                                                       "dataset": str(bad)})
    proc = run_cli(["pipeline/sft.py", recipe], cwd=tmp_path, env=ONE_THREAD)
    assert one_error_line(proc) == f"error: {bad}: line 1: invalid UTF-8 (byte 0xe9); save the file as UTF-8"
    check = run_cli(["pipeline/run.py", recipe, "--check"], cwd=tmp_path, env=ONE_THREAD)  # --check reads rows too
    assert check.returncode == 2 and f"{bad}: line 1: invalid UTF-8" in check.stdout
    assert not (tmp_path / "runs").exists()


def test_sft_help_lists_the_sections_keys_with_defaults(tmp_path):
    proc = run_cli(["pipeline/sft.py", "--help"], cwd=tmp_path)
    assert proc.returncode == 0
    line = next(x for x in proc.stdout.splitlines() if x.strip().startswith("learning_rate "))
    assert "(float, default 2e-05)" in line and "learning rate" in line.lower()
    assert "dataset (str or list or dict, default 'world:sft')" in proc.stdout and "run.KEY" in proc.stdout


def test_standalone_evaluation_into_another_folder(tiny_run, tmp_path):
    """eval.checkpoints given by hand in a recipe whose reward stage has not run: the baseline and the KL reference
    are the first checkpoint, and the reward model is skipped with a word instead of stopping the evaluation."""
    work, _, _ = tiny_run
    prompts = write_jsonl(tmp_path / "my.jsonl", [{"prompt": "What is 2 + 3?", "answer": "5"},
                                                   {"prompt": "Say hello."}])
    recipe = tiny_recipe(tmp_path, reward={"use_cpu": True}, eval={"num_samples": 1, "perplexity_data": "",
                                                                   "report_to": "tensorboard"})
    sft = str(work / "runs/tiny/sft")
    proc = run_cli(["pipeline/evaluate.py", recipe, f"eval.checkpoints=[{sft}]", f"eval.prompts={prompts}",
                    "run.output_dir=elsewhere"], cwd=tmp_path, env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the reward stage has not finished: no reward-model scores" in proc.stdout
    metrics = json.loads((tmp_path / "elsewhere/tiny/eval/metrics.json").read_text())
    assert metrics["baseline"] == "tiny/sft" and metrics["reference"] == "tiny/sft" and metrics["reward_model"] is None
    assert metrics["checkpoints"]["tiny/sft"]["verified"] == 1 and not (tmp_path / "runs").exists()
    assert list((tmp_path / "elsewhere/tiny/eval").rglob("events.out.tfevents.*"))


def test_check_with_a_hub_model_and_no_network_names_it_at_once(tmp_path):
    recipe = tiny_recipe(tmp_path, model={"config": None, "name_or_path": "someone/no-such-model"}, pretrain=None,
                         tokenizer={"train": False}, sft={"init_from": "model", "heldout_prompts": ""})
    proc = run_cli(["pipeline/run.py", recipe, "--check"], cwd=tmp_path,
                   env={**ONE_THREAD, "HF_ENDPOINT": "http://127.0.0.1:9"})  # nothing listens: offline at once
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "model 'someone/no-such-model': the hub cannot be reached from this machine" in proc.stdout


def test_a_truncated_init_from_is_named_by_the_stage_and_by_check(tiny_run, tmp_path):
    import shutil

    work, _, _ = tiny_run
    damaged = tmp_path / "damaged"
    shutil.copytree(work / "runs/tiny/pretrain", damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short, as by a full disk or a killed copy
    recipe = tiny_recipe(tmp_path, pretrain=None, sft={**SHORT, "init_from": str(damaged)})
    proc = run_cli(["pipeline/sft.py", recipe], cwd=tmp_path, env=ONE_THREAD)
    assert f"{weights}" in one_error_line(proc) and not (tmp_path / "runs").exists()
    check = run_cli(["pipeline/run.py", recipe, "--check"], cwd=tmp_path, env=ONE_THREAD)
    assert check.returncode == 2 and f"checkpoint '{damaged}' is damaged: {weights}" in check.stdout


LLAMA3_TEMPLATE = ("{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
                   "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
                   "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if "
                   "add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")


def user_model(folder, template=LLAMA3_TEMPLATE, extra_rows=0, tied=False):
    """A user's model folder in the shape of a Llama-3 instruct model: a byte-level BPE whose post-processor puts
    `<|begin_of_text|>` first, eos `<|eot_id|>`, no pad token, no chat tokens of ours; untied embeddings with exactly
    len(tokenizer) rows (+ `extra_rows`, as hub models pad them), saved with save_pretrained."""
    import torch
    from tokenizers import Tokenizer, decoders, models as bpe_models, pre_tokenizers, processors, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    bpe = Tokenizer(bpe_models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator([f"What is {i} + {i}? Sure! The answer is {2 * i}." for i in range(50)],
                            trainer=trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                  chat_template=template)
    config = LlamaConfig(vocab_size=len(tok) + extra_rows, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=tied, bos_token_id=0, eos_token_id=[1, 4])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def test_a_users_model_without_the_chat_tokens_is_grown_to_them_wherever_it_loads(tmp_path):
    """The chat format adds tokens to a user's tokenizer (Llama-3's has no <|im_start|>): the held-out check of its
    input model, eval and the dpo/ppo reference read it with grown embeddings, the same rows on every load."""
    import torch

    from pipeline import evaluate, heldout, models, runs
    from pipeline.recipe import load_recipe

    folder = user_model(tmp_path / "llama3")
    recipe = load_recipe(tiny_recipe(tmp_path, pretrain=None, tokenizer=None, model={"config": None,
                                                                                   "name_or_path": folder}))
    cp = runs.Checkpoint("model", folder, "", "local")
    tokenizer = models.load_tokenizer(recipe, cp)
    assert len(tokenizer) > 325 and tokenizer.eos_token == "<|im_end|>"
    rows = [{"prompt": "What is 2 + 2?", "skill": "add", "answer": "4"}]
    assert heldout.score_checkpoint(recipe, folder, rows, max_new_tokens=4)["n"] == 1  # was an IndexError
    loaded = evaluate.load_lm(recipe, cp, "cpu")  # was "its tokenizer has 332 tokens but the model only 325"
    assert loaded.model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    policy, reference = (models.load_causal_lm(recipe, folder, tokenizer=tokenizer) for _ in range(2))
    for get in ("get_input_embeddings", "get_output_embeddings"):
        assert torch.equal(getattr(policy, get)().weight, getattr(reference, get)().weight)


MISTRAL_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
                    "(loop.index0 % 2 == 0) %}"
                    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
                    "{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
                    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}"
                    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")


def test_a_users_chat_template_that_cannot_train_on_the_data_stops_in_one_line(tmp_path):
    """`tokenizer.chat_template: own` keeps a user's template: one that raises on a row (Mistral's on a system
    message) or has no assistant markers TRL can patch stops the stage before training, naming the row: in a list
    of files, the file and its own line (row 4 of the files together before)."""
    folder = user_model(tmp_path / "mistral", template=MISTRAL_TEMPLATE)
    chats = [{"messages": [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"}]},
             {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hi."}]}]
    first, second = write_jsonl(tmp_path / "ok.jsonl", chats[:1] * 2), write_jsonl(tmp_path / "chats.jsonl", chats)
    pair = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hi."}],
            "rejected": [{"role": "assistant", "content": "No."}]}
    brief = {**pair, "prompt": [{"role": "system", "content": "Be brief."}, *pair["prompt"]]}
    pairs = [write_jsonl(tmp_path / "p.jsonl", [pair]), write_jsonl(tmp_path / "q.jsonl", [pair, brief])]
    prompts = tmp_path / "prompts.jsonl"  # eval's: a blank line first, so its second row is on line 3
    prompts.write_text("\n" + "".join(json.dumps({"prompt": p["prompt"]}) + "\n" for p in (pair, brief)))
    recipe = tiny_recipe(tmp_path, pretrain=None, tokenizer={"train": False, "chat_template": "own"},
                         model={"config": None, "name_or_path": folder}, sft={**SHORT, "dataset": [first, second]},
                         **{stage: {"init_from": "model", "dataset": pairs, "eval_dataset": "", "use_cpu": True}
                            for stage in ("dpo", "kto")},
                         eval={"checkpoints": [folder], "prompts": str(prompts), "perplexity_data": "",
                               "num_samples": 0})
    proc = run_cli(["pipeline/sft.py", recipe, "sft.assistant_only_loss=false"], cwd=tmp_path, env=ONE_THREAD)
    assert one_error_line(proc) == (f"error: {first} + {second}: the tokenizer of {folder}: {second} line 2: its chat "
                                    f"template refuses the row: Conversation roles must alternate user/assistant/user/"
                                    f"assistant/... (tokenizer.chat_template: pipeline uses the pipeline's ChatML "
                                    f"template)")
    assert not (tmp_path / "runs").exists()
    check = run_cli(["pipeline/run.py", recipe, "--check", "sft.assistant_only_loss=false"], cwd=tmp_path,
                    env=ONE_THREAD)  # --check finds it too, on the rows it samples, from the tokenizer alone
    assert check.returncode == 2 and f"sft.dataset: {first} + {second}: the tokenizer of {folder}: {second} line 2: " \
                                      f"its chat template refuses the row: Conversation roles must alternate" \
                                      in check.stdout
    assert f"dpo.dataset: {pairs[0]} + {pairs[1]}: the tokenizer of {folder}: {pairs[1]} line 2: its chat template " \
           f"refuses the row" in check.stdout  # the pairs' own places too
    assert not (tmp_path / "runs").exists()
    # the stages too, after the held-out split and kto's shuffle (before: the row's number among the rows on its
    # side, and a held-out source named as a Python list; eval's row 2, its blank line skipped)
    named = {"dpo": (f"{pairs[0]} + {pairs[1]}", f"{pairs[1]} line 2"), "kto": (f"{pairs[0]} + {pairs[1]}",
             f"{pairs[1]} line 2"), "evaluate": (str(prompts), "line 3")}
    lines = {stage: one_error_line(run_cli([f"pipeline/{stage}.py", recipe], cwd=tmp_path, env=ONE_THREAD))
             for stage in named}
    assert [stage for stage, (source, place) in named.items() if not lines[stage].startswith(f"error: {source}") or
            f"the tokenizer of {folder}: {place}: its chat template refuses the row" not in lines[stage]] == [], lines
    assert not (tmp_path / "runs").exists()
    from pipeline import models
    from pipeline.cli import PipelineError
    from transformers import AutoTokenizer

    with pytest.raises(PipelineError, match="no {% generation %} markers .* TRL has no training version"):
        models.check_chat_template(AutoTokenizer.from_pretrained(folder), {second: chats[:1]}, assistant_only=True)


def test_a_model_folder_without_a_model_or_its_tokenizer_stops_in_one_line(tmp_path):
    """`model.name_or_path` naming a folder that holds no model, or a model without its tokenizer files: one line
    from the stage (a traceback from the tokenizer loader before) and from --check (which called the second ok)."""
    import shutil

    from pipeline import models, runs
    from pipeline.cli import PipelineError
    from pipeline.recipe import load_recipe

    folder = user_model(tmp_path / "llama3")
    no_model, no_tokenizer = tmp_path / "downloads", tmp_path / "weights_only"
    no_model.mkdir()
    (no_model / "notes.txt").write_text("the model is somewhere else")
    no_tokenizer.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy(f"{folder}/{name}", no_tokenizer)
    for bad, why in ((no_model, "no config.json or adapter_config.json (not a saved model)"),
                     (no_tokenizer, "tokenizer files missing (none of tokenizer.json, vocab.json, tokenizer.model, "
                                    "...)")):
        recipe = tiny_recipe(tmp_path, pretrain=None, tokenizer=None, model={"config": None, "name_or_path": str(bad)},
                             sft=SHORT)
        with pytest.raises(PipelineError) as err:  # what the stage says (sft, dpo, reward, ppo, eval load it so)
            models.load_tokenizer(load_recipe(recipe), runs.Checkpoint("model", str(bad), "", "local"))
        assert str(err.value) == f"{bad}: {why}"
    check = run_cli(["pipeline/run.py", recipe, "--check"], cwd=tmp_path, env=ONE_THREAD)
    assert check.returncode == 2 and f"sft.init_from: checkpoint 'model' is damaged: {no_tokenizer}: tokenizer " \
                                      f"files missing" in check.stdout


@pytest.mark.parametrize("stage, overrides, message", [
    ("sft", ["sft.use_peft=true", "sft.lora_target_modules=[q_proj,nope_proj]"],
     "sft.lora_target_modules: nope_proj names no module of the model"),
    ("dpo", ["dpo.use_peft=true", "dpo.lora_modules_to_save=[lm_heads]"],
     "dpo.lora_modules_to_save: 'lm_heads' names no module of the model"),
    pytest.param("kto", ["kto.use_peft=true", "kto.load_in_8bit=true", "kto.use_dora=true"],
                 "kto.use_dora with load_in_8bit does not train on a CPU",
                 marks=pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="refused on a CPU only")),
])
def test_lora_refusals_against_the_loaded_model_name_the_override_that_set_the_key(tmp_path, stage, overrides,
                                                                                   message):
    """The stage checks these keys against the model it loaded; set on the command line, the refusal named the recipe
    file, which does not hold them."""
    folder = user_model(tmp_path / "llama3")
    recipe = tiny_recipe(tmp_path, pretrain=None, tokenizer=None, model={"config": None, "name_or_path": folder},
                         **{stage: {"init_from": "model", "max_steps": 1, "use_cpu": True}})
    proc = run_cli([f"pipeline/{stage}.py", recipe, *overrides], cwd=tmp_path, env=ONE_THREAD)
    assert one_error_line(proc).startswith(f"error: override '{overrides[-1]}': {message}")
    assert not (tmp_path / "runs").exists()


def test_a_held_out_conversation_that_cannot_be_split_is_named_by_its_file_and_line(tiny_run, tmp_path):
    """Held-out conversations beside conversational prompt/completion training rows are split at their trailing
    assistant turns; one that does not end with one was named `row N` (its place among all held-out rows), where
    the stage's other refusals name the file and its own line."""
    work, _, _ = tiny_run
    turns = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}]
    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": turns[:1], "completion": turns[1:]}] * 4)
    first = write_jsonl(tmp_path / "held_a.jsonl", [{"messages": turns}] * 2)
    second = write_jsonl(tmp_path / "held_b.jsonl", [{"messages": turns},
                                                     {"messages": turns + [{"role": "user", "content": "And 3 + 3?"}]}])
    recipe = tiny_recipe(tmp_path, pretrain=None, sft={**SHORT, "init_from": str(work / "runs/tiny/pretrain"),
                                                       "dataset": train, "eval_dataset": [first, second]})
    proc = run_cli(["pipeline/sft.py", recipe], cwd=tmp_path, env=ONE_THREAD)
    assert one_error_line(proc) == (f"error: {first} + {second}: {second} line 2: the conversation must end with the "
                                    f"assistant reply (the completion)")
    assert not (tmp_path / "runs").exists()


def test_check_on_pairs_all_with_chosen_equal_to_rejected_says_what_the_stage_says(tmp_path):
    """The stages drop pairs whose chosen reply is the rejected one and stop when none is left; --check ran out of
    sampled pairs and raised an IndexError. Now it names the file as the stage does, also when the identical pairs
    run past the sample (it passed those), and says nothing of a dataset whose identical pairs fill the sample but not
    the file (the stage reads on)."""
    from pipeline.check import SAMPLE_ROWS

    folder = user_model(tmp_path / "llama3")
    same = {"prompt": "What is 2 + 2?", "chosen": "4.", "rejected": "4."}
    identical = write_jsonl(tmp_path / "same.jsonl", [same] * 3)
    all_same = write_jsonl(tmp_path / "all_same.jsonl", [same] * (SAMPLE_ROWS + 1))
    longer = write_jsonl(tmp_path / "longer.jsonl", [same] * SAMPLE_ROWS + [{**same, "rejected": "5."}])
    stage = {"init_from": "model", "eval_dataset": "", "use_cpu": True, "max_steps": 1}
    recipe = tiny_recipe(tmp_path, pretrain=None, sft=None, tokenizer=None,
                         model={"config": None, "name_or_path": folder}, dpo={**stage, "dataset": all_same},
                         kto={**stage, "dataset": identical}, reward={**stage, "dataset": longer},
                         ppo={"init_from": "model", "max_steps": 1, "prompts": longer})  # ppo reads on past them too
    check = run_cli(["pipeline/run.py", recipe, "--check"], cwd=tmp_path, env=ONE_THREAD)
    assert check.returncode == 2 and "Traceback" not in check.stderr, check.stderr[-2000:]
    errors = [line.strip() for line in check.stdout.splitlines() if line.strip().startswith("error:")]
    said = {name: one_error_line(run_cli([f"pipeline/{name}.py", recipe], cwd=tmp_path, env=ONE_THREAD))
            for name in ("dpo", "kto")}
    assert said["dpo"] == f"error: {all_same}: no pairs left: all {SAMPLE_ROWS + 1} have chosen equal to rejected"
    assert errors == [said[name].replace("error: ", f"error: {name}.dataset: ") for name in ("dpo", "kto")], errors
    assert not (tmp_path / "runs").exists()


def test_only_a_config_that_says_it_has_a_table_of_positions_is_refused_past_it():
    """Any config without `rope_parameters` was refused as if it had learned positions: a remote-code RoPE model's
    (ChatGLM's seq_length and rope_ratio, Qwen-1's rotary_emb_base and use_dynamic_ntk: names of their own) and a
    state-space hybrid's (Jamba) too. A config that says it has a table (GPT-2's type, a BERT-style
    position_embedding_type: absolute) is refused past it; one that does not say is let through."""
    from transformers import GPT2Config, JambaConfig, PretrainedConfig

    from pipeline.generation import learned_positions_problem

    def remote(model_type, **values):  # a trust_remote_code config: a class and names of its own
        return type(f"{model_type}Config", (PretrainedConfig,), {"model_type": model_type})(**values)

    chatglm = remote("chatglm", seq_length=32768, rope_ratio=50, auto_map={"AutoConfig": "configuration_chatglm."
                                                                                         "ChatGLMConfig"})
    qwen1 = remote("qwen", max_position_embeddings=8192, seq_length=8192, rotary_emb_base=10000, use_dynamic_ntk=True)
    for config in (chatglm, qwen1, JambaConfig(max_position_embeddings=64)):
        assert learned_positions_problem(config, 10**6, "sft.max_length") is None, config.model_type
    bert_like = remote("my_encoder", max_position_embeddings=512, position_embedding_type="absolute")
    assert learned_positions_problem(GPT2Config(n_positions=64), 128, "sft.max_length") == \
        "sft.max_length (128) is over the model's table of 64 positions: a longer row stops training with an " \
        "index out of range; set sft.max_length to 64 or less"
    assert learned_positions_problem(bert_like, None, "reward.max_length").startswith(
        "reward.max_length is unset, so rows are not cut to the model's table of 512 positions: ")
    assert learned_positions_problem(GPT2Config(n_positions=64), 64, "sft.max_length") is None
    relative = remote("my_encoder", max_position_embeddings=512, position_embedding_type="relative_key")  # a table
    assert learned_positions_problem(relative, 1024, "reward.max_length").startswith(  # of distances, as long
        "reward.max_length (1024) is over the model's table of 512 positions: ")


def test_a_fixed_table_of_positions_is_not_called_learned():
    """GPT-J's table (embed_positions) is sinusoids, CodeGen's and CTRL's too: the refusal called them learned."""
    from transformers import CodeGenConfig, CTRLConfig, GPTJConfig

    from pipeline.generation import learned_positions_problem

    for config in (GPTJConfig(n_positions=64), CodeGenConfig(n_positions=64), CTRLConfig(n_positions=64)):
        assert learned_positions_problem(config, 65, "sft.max_length") == \
            "sft.max_length (65) is over the model's table of 64 positions: a longer row stops training with an " \
            "index out of range; set sft.max_length to 64 or less", config.model_type


def test_a_roberta_style_table_holds_two_positions_fewer_than_its_size():
    """RoBERTa's position ids start at pad_token_id + 1 (2): its table of max_position_embeddings 514 holds 512
    positions, and a max_length of 513 or 514 passed the check, then stopped training out of range. The same for
    every type built that way (POSITIONS_PAST_PAD, each a transformers model type)."""
    import torch
    from transformers import AutoConfig, RobertaConfig, RobertaForCausalLM

    from pipeline import generation
    from pipeline.generation import config_positions, learned_positions_problem

    roberta = RobertaConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=8, max_position_embeddings=514, is_decoder=True)
    model = RobertaForCausalLM(roberta)
    model(torch.full((1, 512), 5))  # the longest row it takes
    with pytest.raises((IndexError, RuntimeError), match="out of"):
        model(torch.full((1, 513), 5))
    assert learned_positions_problem(roberta, 512, "reward.max_length") is None
    for max_length in (513, 514):
        assert learned_positions_problem(roberta, max_length, "reward.max_length") == \
            f"reward.max_length ({max_length}) is over the model's 512 positions (a table of 514 whose position ids " \
            f"start at 2): a longer row stops training with an index out of range; set reward.max_length to 512 or less"
    assert config_positions(RobertaConfig(max_position_embeddings=514, pad_token_id=0)) == 513
    assert generation.POSITIONS_PAST_PAD - {"esm"} <= generation.POSITION_TABLES
    for model_type in generation.POSITIONS_PAST_PAD:  # ESM's default position_embedding_type: absolute (ESM-1b)
        config = AutoConfig.for_model(model_type, max_position_embeddings=514, pad_token_id=1)
        assert config_positions(config) == 512 and learned_positions_problem(config, 513, "k"), model_type


def test_esm_lilt_and_markuplm_tables_hold_two_positions_fewer_than_their_size():
    """ESM, LiLT, MarkupLM and LayoutLMv3 (and the text models of AltCLIP, BridgeTower and CLAP) also start their
    position ids at pad_token_id + 1 but were not listed: a max_length of 513 passed the check on a table of 514,
    then stopped training out of range. ESM-2 rotates (no table): not refused."""
    import torch
    from transformers import AutoConfig, AutoModel, EsmConfig

    from pipeline.generation import learned_positions_problem

    small = dict(vocab_size=16, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                 max_position_embeddings=514, pad_token_id=1)
    for model_type in ("esm", "lilt", "markuplm"):
        config = AutoConfig.for_model(model_type, **small)
        model = AutoModel.from_config(config).eval()
        model(input_ids=torch.full((1, 512), 5))  # the longest row it takes
        with pytest.raises(IndexError, match="out of range"):
            model(input_ids=torch.full((1, 513), 5))
        assert learned_positions_problem(config, 512, "reward.max_length") is None, model_type
        assert learned_positions_problem(config, 513, "reward.max_length").startswith(
            "reward.max_length (513) is over the model's 512 positions (a table of 514 whose position ids start at "
            "2)"), model_type
    assert learned_positions_problem(EsmConfig(position_embedding_type="rotary", max_position_embeddings=1026,
                                               pad_token_id=1), 4096, "reward.max_length") is None


def test_the_types_past_the_pad_are_those_whose_transformers_source_says_so():
    """POSITIONS_PAST_PAD is a hand list (transformers says it only in its modeling code), checked here against that
    code both ways: every listed type's model builds a table of max_position_embeddings with a padding_idx and numbers
    positions from padding_idx + 1, and every type whose model does so is listed, so a transformers that adds one
    fails here rather than in training. Its padding_idx is read as positions_skipped reads it (MPNet's is always 1)."""
    import importlib.util
    import re
    from pathlib import Path

    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    from pipeline.generation import POSITIONS_PAST_PAD, positions_skipped, text_config

    models = Path(importlib.util.find_spec("transformers").origin).parent / "models"
    table = re.compile(r"position_embeddings = (nn\.|Quant)Embedding\(\s*config\.max_position_embeddings,"
                       r"[^)]*padding_idx=")
    not_text = {"evolla"}  # its table is the protein encoder's (SaProt); its language model rotates
    found = {}
    for model_type, base in MODEL_MAPPING_NAMES.items():  # the modeling file that defines the type's base model
        base = base[0] if isinstance(base, tuple) else base
        files = sorted((models / model_type_to_module_name(model_type)).glob("modeling_*.py"))
        source = next((t for p in files if re.search(rf"^class {base}\(", t := p.read_text(), re.M)), "")
        if table.search(source) and "padding_idx + 1" in source and model_type not in not_text:
            text = text_config(AutoConfig.for_model(model_type))  # a composite model's text part (AltCLIP's)
            found[text.model_type] = source
    assert set(found) == POSITIONS_PAST_PAD
    for model_type, source in found.items():
        fixed = re.search(r"self\.padding_idx = (\d+)$", source, re.M)
        config = AutoConfig.for_model(model_type, max_position_embeddings=514, pad_token_id=7)
        assert positions_skipped(config) == (int(fixed[1]) if fixed else 7) + 1, model_type

