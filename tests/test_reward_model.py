"""One reward-model path (pipeline/reward_model.py): every reader scores a reply exactly as TRL's RewardTrainer built
the pair the reward stage trained on, and gets the same number: the reward stage's held-out scoring, PPO's and
GRPO/RLOO's reward, and the eval stage."""

import pytest
import torch

from conftest import tiny_recipe
from pipeline import evaluate, judges, runs, trl_online
from pipeline.generation import Reply
from pipeline.reward_model import RewardModel, load_reward_model, save_statistics
from pipeline.recipe import load_recipe

MEAN, STD = 0.25, 2.0


@pytest.fixture(scope="module")
def scored(tiny_run, tmp_path_factory):
    """A reward model on the tiny SFT model (a random score head, statistics saved as the reward stage saves them),
    world preference pairs (conversations) plus text pairs, and each chosen reply's reward as TRL computes it: the
    RewardTrainer's own tokenisation of the pair, scored one sequence at a time."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    work, _, _ = tiny_run
    out = tmp_path_factory.mktemp("rm")
    recipe = load_recipe(tiny_recipe(out))
    sft = str(work / "runs/tiny/sft")
    tokenizer = AutoTokenizer.from_pretrained(sft)
    torch.manual_seed(0)
    model = load_reward_model(recipe, sft)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out / "rm")
    tokenizer.save_pretrained(out / "rm")
    save_statistics(out / "rm", model, mean=MEAN, std=STD, max_length=128, conversational=None)  # trained on both

    from pipeline import data

    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected", "skill")}
            for r in data.world_rows(recipe, "preference")[:12]]
    text_rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f" The answer is {2 * i}.",
                  "rejected": f" The answer is {2 * i + 1}."} for i in range(4)]
    truth = []
    for pairs in (rows, text_rows):
        args = RewardConfig(output_dir=str(out / "trl"), report_to="none", use_cpu=True, max_length=128,
                            gradient_checkpointing=False, center_rewards_coefficient=None)
        trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs),
                                processing_class=tokenizer)
        model.eval()
        with torch.no_grad():
            for ids in trainer.train_dataset["chosen_ids"]:
                truth.append(float(model(input_ids=torch.tensor([ids])).logits[0, 0]))
    checkpoint = runs.Checkpoint("rm", str(out / "rm"), "", "local")
    return recipe, checkpoint, rows + text_rows, truth


def reply_text(reply) -> str:
    return reply if isinstance(reply, str) else reply[-1]["content"]


def test_the_saved_model_carries_what_readers_need(scored):
    recipe, checkpoint, _, _ = scored
    reward_model = RewardModel.load(recipe, checkpoint)
    assert (reward_model.mean, reward_model.std, reward_model.max_length) == (MEAN, STD, 128)
    assert reward_model.standardised and reward_model.normalise([MEAN + STD]) == [1.0]


def test_every_reader_gets_the_reward_trl_trained_on(scored):
    recipe, checkpoint, rows, truth = scored
    reward_model = RewardModel.load(recipe, checkpoint)
    prompts, texts = [r["prompt"] for r in rows], [reply_text(r["chosen"]) for r in rows]
    normalised = [(t - MEAN) / STD for t in truth]

    # the reward stage: held-out pairs scored on both sides
    stage = reward_model.score_pairs(rows, batch_size=5, desc="pairs").chosen
    assert stage == pytest.approx(truth, abs=1e-5)

    # PPO: a generated reply's text after its prompt, normalised, minus the penalty where it did not end
    ended = torch.tensor([i % 3 != 0 for i in range(len(rows))])
    raw, norm, ppo_scores = reward_model.policy_scores(prompts, texts, ended, missing_eos_penalty=1.0)
    assert raw.tolist() == pytest.approx(truth, abs=1e-5) and norm.tolist() == pytest.approx(normalised, abs=1e-5)
    assert ppo_scores.tolist() == pytest.approx([n - (0 if e else 1.0) for n, e in zip(normalised, ended)], abs=1e-5)

    # GRPO / RLOO: TRL's reward-function call, completions as assistant messages (or text), token ids for eos
    eos = reward_model.tokenizer.eos_token_id
    completions = [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts, texts)]
    logged = {}
    grpo = trl_online.reward_function(reward_model, [eos], 1.0)(
        prompts=prompts, completions=completions, completion_ids=[[5, eos] if e else [5, 6] for e in ended],
        log_metric=lambda k, v: logged.__setitem__(k, v))
    assert grpo == pytest.approx(ppo_scores.tolist(), abs=1e-5)
    assert logged["reward_raw"] == pytest.approx(sum(truth) / len(truth), abs=1e-5)

    # reward_clip: the normalised score clamped before the penalty, the same for ppo and grpo
    clip = sorted(abs(n) for n in normalised)[len(normalised) // 2]  # half the replies are past it
    _, clipped, clipped_scores = reward_model.policy_scores(prompts, texts, ended, missing_eos_penalty=1.0, clip=clip)
    assert clipped.tolist() == pytest.approx([max(-clip, min(clip, n)) for n in normalised], abs=1e-5)
    assert sum(abs(n) > clip + 1e-6 for n in normalised) > 0
    grpo = trl_online.reward_function(reward_model, [eos], 1.0, clip=clip)(
        prompts=prompts, completions=completions, completion_ids=[[5, eos] if e else [5, 6] for e in ended],
        log_metric=lambda k, v: None)
    assert grpo == pytest.approx(clipped_scores.tolist(), abs=1e-5)

    # the eval stage: each checkpoint's greedy reply, standardised
    target = evaluate.Target("policy", checkpoint, greedy=[Reply(t, True, 0) for t in texts])
    assert evaluate.score_rewards(recipe, checkpoint, [target], rows, batch_size=3, device="cpu") is True
    assert target.rewards == pytest.approx(normalised, abs=1e-5)


def test_a_text_prompt_is_scored_in_the_form_the_model_trained_on(scored):
    """A reward model that trained on conversations (the reward stage saves `reward_conversational`) scores a text
    prompt as the user turn the policy answered, through its chat template; before, as raw `prompt + reply + eos`,
    which it never saw (a cluster recipe's text eval prompts against its conversational pairs). One that trained on
    text, or whose training is not known, scores it as given."""
    recipe, checkpoint, _, _ = scored
    reward_model = RewardModel.load(recipe, checkpoint)
    text, turn, reply = "What is 2 plus 2?", [{"role": "user", "content": "What is 2 plus 2?"}], "The answer is 4."
    as_turn, as_text = reward_model.scores([turn], [reply])[0], reward_model.scores([text], [reply])[0]
    assert reward_model.conversational is None and as_text != as_turn
    for conversational, expected in ((True, as_turn), (False, as_text)):
        reward_model.conversational = conversational
        assert reward_model.scores([text], [reply]) == [expected]
        scored_pairs = reward_model.score_pairs([{"prompt": text, "chosen": reply, "rejected": "No."}], batch_size=4,
                                                desc="pairs")
        assert scored_pairs.chosen == [pytest.approx(expected, abs=1e-5)]  # batched with its pair: padding

    # a reply with tool turns after a text prompt (a tools column beside text prompts): the prompt is its user turn,
    # whatever the model trained on; before, `prompt + reply` of text and messages stopped ppo with a TypeError
    call = [{"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}]},
            {"role": "tool", "name": "add", "content": "4"}, {"role": "assistant", "content": reply}]
    reward_model.conversational = None
    assert reward_model.scores([text], [call]) == reward_model.scores([turn], [call])


def test_a_sequence_over_max_length_keeps_its_end(scored):
    """The score head reads the last token: a cut keeps the end of the reply (left truncation)."""
    recipe, checkpoint, rows, _ = scored
    reward_model = RewardModel.load(recipe, checkpoint, max_length=6)
    prompt, reply = rows[0]["prompt"], rows[0]["chosen"]
    from pipeline.reward_model import encode

    ids = encode(reward_model.tokenizer, prompt, reply)
    assert len(ids) > 6
    with torch.no_grad():
        tail = float(reward_model.model(input_ids=torch.tensor([ids[-6:]])).logits[0, 0])
    assert reward_model.scores([prompt], [reply]) == pytest.approx([tail], abs=1e-5)
    assert reward_model.score_pairs(rows[:1], batch_size=2, desc="x").truncated == 1


def test_a_reply_scores_the_same_alone_and_in_a_batch_when_config_and_tokenizer_pad_differ(scored, monkeypatch):
    """A user's reward model whose config names another pad id than its tokenizer: transformers reads the score at
    the last token that is not the config's pad id, so padding with the tokenizer's moved where a short reply's score
    was read, and its reward changed with the longer replies beside it."""
    from pipeline.reward_model import encode, score

    recipe, checkpoint, rows, _ = scored
    reward_model = RewardModel.load(recipe, checkpoint)
    model, tokenizer = reward_model.model, reward_model.tokenizer
    seqs = [encode(tokenizer, r["prompt"], r["chosen"]) for r in rows[:4]]
    other_pad = next(i for i in range(len(tokenizer)) if i != tokenizer.pad_token_id and all(i not in s for s in seqs))
    model.config.pad_token_id = other_pad
    short = min(range(4), key=lambda i: len(seqs[i]))
    alone = score(model, [seqs[short]], tokenizer.pad_token_id, batch_size=1, max_length=None)
    batched = score(model, seqs, tokenizer.pad_token_id, batch_size=4, max_length=None)
    assert len(seqs[short]) < max(map(len, seqs))
    assert batched[short] == pytest.approx(alone[0], abs=1e-5)
    # ppo's reward rounds train it on batches padded the same way (head_pad_id), not with the tokenizer's id
    from pipeline import reward_model as rm, reward_rounds

    pads = []
    real_pad_right = rm.pad_right
    monkeypatch.setattr(reward_rounds, "pad_right", lambda seqs, pad_id: pads.append(pad_id) or real_pad_right(
        seqs, pad_id))
    reward_rounds.fine_tune(reward_model, rows[:2], epochs=1, learning_rate=0.0, batch_size=2, seed=0)
    assert pads == [other_pad]


def test_only_the_reward_model_module_loads_a_reward_model():
    """The other modules load and score through pipeline/reward_model.py: a second loader or encoder would drift."""
    from pathlib import Path

    import ast

    def uses(path):
        return any(isinstance(n, ast.alias) and n.name == "AutoModelForSequenceClassification"
                   for n in ast.walk(ast.parse(path.read_text())))

    others = [p.name for p in Path(judges.__file__).parent.glob("*.py") if p.name != "reward_model.py" and uses(p)]
    assert not others, others


def test_a_hub_model_is_told_reward_model_or_language_model_by_its_config(tmp_path, monkeypatch):
    """Hub ids were never checked: a causal LM named as eval's or ppo's reward model got a random score head, silently
    (TRL's loader hides the report), and a reward model named as a checkpoint answered with a random LM head. The
    hub's config.json (offline: the cache's) says which it is; a hub id neither has is left to the load."""
    import json

    from huggingface_hub import constants

    from pipeline import hub
    from pipeline.cli import PipelineError
    from pipeline.reward_model import saved_head

    cache, commit = tmp_path / "hub", "0" * 40
    remote_rm = {"architectures": ["LlamaForRewardModelWithGating"],  # remote code, its own class name
                 "auto_map": {"AutoModelForSequenceClassification": "modeling_rm.LlamaForRewardModelWithGating"}}
    for repo, name, values in (("someone/chat-lm", "config.json", {"architectures": ["LlamaForCausalLM"]}),
                               ("someone/rm", "config.json", {"architectures": ["LlamaForSequenceClassification"]}),
                               ("someone/remote-rm", "config.json", remote_rm),
                               ("someone/rm-lora", "adapter_config.json", {"task_type": "SEQ_CLS"})):
        folder = cache / f"models--{repo.replace('/', '--')}"
        (folder / "snapshots" / commit).mkdir(parents=True)
        (folder / "refs").mkdir()
        (folder / "refs" / "main").write_text(commit)
        (folder / "snapshots" / commit / name).write_text(json.dumps(values))
    monkeypatch.setattr(hub, "reachable", lambda: False)  # not the cached probe: other tests may have network
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the cache only
    assert saved_head("someone/chat-lm", from_hub=True) == "causal"
    assert saved_head("someone/rm", from_hub=True) == "classifier"
    assert saved_head("someone/remote-rm", from_hub=True) == "classifier"
    assert saved_head("someone/rm-lora", from_hub=True) == "classifier"
    assert saved_head("someone/not-cached", from_hub=True) is None
    assert saved_head("someone/rm") is None  # not a local folder, and not asked of the hub

    recipe = load_recipe(tiny_recipe(tmp_path))
    lm, rm = (runs.Checkpoint(ref, ref, None, "hub") for ref in ("someone/chat-lm", "someone/rm"))
    with pytest.raises(PipelineError, match=f"^{recipe.path}: eval.reward_model: someone/chat-lm is not a reward"):
        evaluate.check_model(recipe, lm, "reward_model", reward=True)
    with pytest.raises(PipelineError, match=f"^{recipe.path}: eval.checkpoints: someone/rm is a reward model, not a "
                                            f"causal LM"):
        evaluate.check_model(recipe, rm, "checkpoints")
    evaluate.check_model(recipe, rm, "reward_model", reward=True)
    evaluate.check_model(recipe, runs.Checkpoint("x/y", "someone/not-cached", None, "hub"), "checkpoints")


def test_the_not_a_reward_model_refusal_names_where_the_key_was_set(tmp_path):
    """eval's and ppo's refusal of a causal LM as a reward model named the checkpoint first, not where the key was
    set: it names the override that set the key (else the recipe file), then the key and the checkpoint."""
    import json

    from pipeline.cli import PipelineError

    lm = tmp_path / "lm"
    lm.mkdir()
    (lm / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    cp = runs.Checkpoint(str(lm), str(lm), None, "local")
    path = tiny_recipe(tmp_path)
    override = f"eval.reward_model={lm}"
    with pytest.raises(PipelineError) as err:
        evaluate.check_model(load_recipe(path, [override]), cp, "reward_model", reward=True)
    assert str(err.value).startswith(f"override '{override}': eval.reward_model: {lm} is not a reward model (a "
                                     f"sequence-classification model")
    with pytest.raises(PipelineError) as err:
        evaluate.check_model(load_recipe(path), cp, "reward_model", reward=True)
    assert str(err.value).startswith(f"{path}: eval.reward_model: {lm} is not a reward model")
    from pipeline.reward_model import refuse_causal_head  # ppo's refusal, its keys, one of an ensemble too

    override = f"ppo.reward_ensemble=[{lm}]"
    with pytest.raises(PipelineError) as err:
        refuse_causal_head(load_recipe(path, [override]), "ppo", "reward_ensemble", cp, "causal")
    assert str(err.value).startswith(f"override '{override}': ppo.reward_ensemble: {lm} is not a reward model")
    refuse_causal_head(load_recipe(path), "ppo", "reward_model", cp, "classifier")
    refuse_causal_head(load_recipe(path), "ppo", "reward_model", cp, None)  # no saved model: the load says why


def test_a_failed_hub_read_skips_the_head_check_with_a_warning(tmp_path, monkeypatch, capsys):
    """The hub reachable but reading a hub model's config failing otherwise (a dropped connection, the hub's 5xx,
    which huggingface_hub raises as LocalEntryNotFoundError when the file is not cached) skipped the head check
    without a word: one line on stderr names the repo, the file and the reason. A file the repo lacks stays quiet."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    from pipeline import hub
    from pipeline.reward_model import saved_head

    monkeypatch.setattr(hub, "reachable", lambda: True)
    failures = {"adapter_config.json": EntryNotFoundError("no adapter_config.json in someone/rm"),
                "config.json": LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")}

    def download(repo, name, revision=None, **_):
        raise failures[name]

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert saved_head("someone/rm", from_hub=True) is None
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("warning: someone/rm: reading config.json from the hub failed "
                               "(LocalEntryNotFoundError: An error happened"), lines
    assert "not checked" in lines[0]
    failures["adapter_config.json"] = ConnectionResetError("Connection reset by peer")  # mid-download
    assert saved_head("someone/rm", from_hub=True) is None
    assert "reading adapter_config.json from the hub failed (ConnectionResetError: Connection reset by peer)" in \
        capsys.readouterr().err
    failures["adapter_config.json"] = failures["config.json"] = EntryNotFoundError("no such file")
    assert saved_head("someone/rm", from_hub=True) is None  # the repo lacks both: left to the load, quietly
    assert capsys.readouterr().err == ""

    # the adapter's read failing does not skip the config's: a causal LM whose config the cache holds (as
    # huggingface_hub serves it while the hub fails) is still told, with nothing to warn about
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    failures["adapter_config.json"] = LocalEntryNotFoundError("An error happened while trying to locate the file")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, revision=None, **_:
                        str(tmp_path / "config.json") if name == "config.json" else download(repo, name))
    assert saved_head("someone/chat-lm", from_hub=True) == "causal"
    assert capsys.readouterr().err == ""


def test_an_outside_reward_model_scores_within_its_usable_positions(scored, tmp_path):
    """A reward model without `reward_max_length` (one trained elsewhere) truncates to the positions its config can
    index: a RoBERTa-style table of 514 starts its position ids past the pad token's, so 512 of them, not 514."""
    from transformers import AutoTokenizer, RobertaConfig, RobertaForSequenceClassification

    recipe, checkpoint, _, _ = scored
    tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=514, pad_token_id=1, num_labels=1)
    RobertaForSequenceClassification(config).save_pretrained(tmp_path / "roberta-rm")
    tokenizer.save_pretrained(tmp_path / "roberta-rm")
    outside = runs.Checkpoint("roberta-rm", str(tmp_path / "roberta-rm"), "", "local")
    assert RewardModel.load(recipe, outside).max_length == 512
