"""GRPO/RLOO through TRL (pipeline/trl_online.py) as a TRL user runs them: the policy's own sampling defaults, prompt
files in TRL's formats, a reward model of their own."""

import json
import shutil

import pytest
import torch

from conftest import tiny_recipe
from pipeline import runs
from pipeline.recipe import load_recipe
from test_ppo import random_policy_and_reward

SHAPING = {"top_k": 3, "repetition_penalty": 1.8, "temperature": 0.3, "top_p": 0.5, "min_p": 0.2,
           "no_repeat_ngram_size": 2, "typical_p": 0.9, "do_sample": True, "suppress_tokens": [5, 6, 7],
           "min_length": 12, "bad_words_ids": [[8]]}


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    """A tiny random policy whose generation_config.json shapes samples (as Qwen2.5's does), and a reward model."""
    work = tmp_path_factory.mktemp("trl_online")
    random_policy_and_reward(work)
    shutil.copytree(work / "policy", work / "shaped")
    config = json.loads((work / "shaped/generation_config.json").read_text())
    (work / "shaped/generation_config.json").write_text(json.dumps({**config, **SHAPING}))
    return work


def grpo_recipe(work, **extra):
    section = {"init_from": str(work / "policy"), "reward_model": str(work / "rm"), "algorithm": "grpo",
               "max_steps": 1, "batch_size": 8, "num_generations": 4, "max_new_tokens": 6,
               "heldout_prompts": None, "save_steps": 0, **extra}
    return tiny_recipe(work, pretrain=None, sft=None, ppo=section)


@pytest.mark.parametrize("algorithm, trl_args, expected", [
    ("grpo", {}, {"min_p": None, "typical_p": 1.0}),
    ("rloo", {"min_p": 0.1, "generation_kwargs": {"typical_p": 0.5}}, {"min_p": 0.1, "typical_p": 0.5}),
])
def test_rollouts_sample_as_trls_config_says_not_as_the_policys_generation_config(user, monkeypatch, algorithm,
                                                                                trl_args, expected):
    """The policy's generation_config.json set min_p, no_repeat_ngram_size, typical_p, suppress_tokens, min_length
    and bad_words_ids of TRL's rollouts (transformers fills what TRL's GenerationConfig leaves unset from it); TRL's
    own keys and trl_args win."""
    from transformers.generation import utils

    from pipeline import ppo

    seen, prepare = [], utils.GenerationMixin._prepare_generation_config

    def spy(self, config, **kwargs):
        out = prepare(self, config, **kwargs)
        seen.append(out[0])
        return out

    monkeypatch.setattr(utils.GenerationMixin, "_prepare_generation_config", spy)
    monkeypatch.chdir(user)
    ppo.main([str(grpo_recipe(user, init_from=str(user / "shaped"), algorithm=algorithm, trl_args=trl_args)),
              f"run.name={algorithm}_shaped"])
    effective = {k: getattr(seen[0], k) for k in ("temperature", "top_k", "top_p", "repetition_penalty",
                                                   "no_repeat_ngram_size", "num_beams", "min_p", "typical_p",
                                                   "suppress_tokens", "min_length", "bad_words_ids")}
    assert effective == {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0,
                         "no_repeat_ngram_size": 0, "num_beams": 1, "suppress_tokens": None, "min_length": 0,
                         "bad_words_ids": None, **expected}
    saved = json.loads((user / f"runs/{algorithm}_shaped/ppo/generation_config.json").read_text())
    assert saved["min_p"] == 0.2 and saved["no_repeat_ngram_size"] == 2  # kept for the user's own use
    assert saved["suppress_tokens"] == [5, 6, 7] and saved["min_length"] == 12


def write_prompts(path, prompts):
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return str(path)


def test_prompts_longer_than_max_prompt_length_are_left_out_as_our_ppo_leaves_them(user, monkeypatch):
    """TRL 1.x has no max_prompt_length: ppo.max_prompt_length was silently ignored and a long prompt went whole
    into the rollouts (past the model's context, a crash mid-training); now it is left out, and said so."""
    import trl

    from pipeline import ppo

    short = [f"What is {i} + {i}?" for i in range(6)]
    spec = write_prompts(user / "long.jsonl", short[:3] + ["word " * 300] + short[3:])
    given, init = [], trl.GRPOTrainer.__init__

    def spy(self, *args, **kwargs):
        given.append(list(kwargs["train_dataset"]["prompt"]))
        init(self, *args, **kwargs)

    monkeypatch.setattr(trl.GRPOTrainer, "__init__", spy)
    monkeypatch.chdir(user)
    ppo.main([str(grpo_recipe(user, prompts=spec)), "run.name=long"])
    assert given == [[[{"role": "user", "content": p}] for p in short]]  # text prompts: user turns
    assert "1 of 7 prompts not within max_prompt_length=128 tokens: left out" in \
        (user / "runs/long/ppo/log.txt").read_text()


def test_text_prompts_reach_trls_policy_as_user_turns_and_its_reward_model_as_text(user, monkeypatch):
    """Our PPO renders a text prompt as a user turn; TRL tokenized it raw (no template, no assistant header), so GRPO
    trained a chat policy on bare continuations. The reward model still reads the text, as our PPO gives it."""
    import trl

    from pipeline import ppo, trl_online

    prompts = [f"What is {i} + {i}?" for i in range(6)]
    given, scored, init = [], [], trl.GRPOTrainer.__init__

    def spy(self, *args, **kwargs):
        given.append(kwargs["train_dataset"])
        init(self, *args, **kwargs)

    def reward_function(*args, **kwargs):
        score = make(*args, **kwargs)

        def spy_score(prompts, completions, **columns):
            scored.append(columns[trl_online.TEXT_PROMPT])
            return score(prompts, completions, **columns)
        return spy_score

    make = trl_online.reward_function
    monkeypatch.setattr(trl.GRPOTrainer, "__init__", spy)
    monkeypatch.setattr(trl_online, "reward_function", reward_function)
    monkeypatch.chdir(user)
    ppo.main([str(grpo_recipe(user, prompts=write_prompts(user / "text.jsonl", prompts))), "run.name=text"])
    assert given[0]["prompt"] == [[{"role": "user", "content": p}] for p in prompts]
    assert scored and all(isinstance(p, str) and p in prompts for batch in scored for p in batch)


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_trls_rollouts_end_at_the_templates_end_of_turn_when_it_is_not_the_eos(user, monkeypatch, algorithm):
    """A Gemma-style policy ends a turn with <end_of_turn>, not its eos. TRL before 1.14.2 (pyproject asks for it)
    stopped its rollouts and cut their loss mask at the tokenizer's eos alone: what followed the end of turn was
    trained on. TRL reads the stop list from the policy's generation_config (models.configure_generation)."""
    from transformers import LlamaForCausalLM

    from pipeline import ppo, trl_online
    from test_evaluate import gemma_like

    model, tok = gemma_like(eos_list=False)  # its generation_config names the eos alone, as a base model's does
    policy = LlamaForCausalLM(model.config)
    with torch.no_grad():  # every token embeds as ones and no sublayer adds to it: <end_of_turn> (id 0), always
        for layer in policy.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        policy.model.embed_tokens.weight.fill_(1.0)
        policy.lm_head.weight.zero_()[0] = 5.0
    policy.generation_config = model.generation_config
    policy.save_pretrained(user / "gemma")
    tok.save_pretrained(user / "gemma")
    completions, make = [], trl_online.reward_function

    def reward_function(*args, **kwargs):
        score = make(*args, **kwargs)

        def spy_score(**columns):
            completions.extend(columns["completion_ids"])  # as TRL's loss mask keeps them
            return score(**columns)
        return spy_score

    monkeypatch.setattr(trl_online, "reward_function", reward_function)
    monkeypatch.chdir(user)
    spec = write_prompts(user / "gemma.jsonl", [f"What is {a} + {b} ?" for a in (2, 3) for b in (2, 3)])
    ppo.main([str(grpo_recipe(user, init_from=str(user / "gemma"), algorithm=algorithm, prompts=spec, kl_coef=0)),
              f"run.name=gemma_{algorithm}", "tokenizer.chat_template=own"])
    assert completions and all(ids == [0] for ids in completions)


def test_too_few_prompts_within_max_prompt_length_stop_in_one_line(user):
    from conftest import run_cli

    spec = write_prompts(user / "all_long.jsonl", ["word " * 300, "What is 1 + 1?"])
    proc = run_cli(["pipeline/ppo.py", grpo_recipe(user, prompts=spec), "run.name=all_long"], cwd=user,
                   env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {spec}: 1 of its 2 prompts within max_prompt_length=128 tokens, fewer than one step's 2 (8 replies "
        f"x 1 processes / num_generations 4)")
    assert not (user / "runs/all_long").exists()


def test_too_few_prompts_stop_before_the_policy_loads(user, monkeypatch):
    """The prompts were checked against the policy's context after its weights had loaded: the user waited for a
    model to be told about their data. The context is read from the policy's config."""
    from pipeline import cli, models, ppo

    loaded, load = [], models.load_causal_lm
    monkeypatch.setattr(models, "load_causal_lm", lambda *args, **kw: loaded.append(args[1]) or load(*args, **kw))
    monkeypatch.chdir(user)
    spec = write_prompts(user / "one_short.jsonl", ["word " * 300, "What is 1 + 1?"])
    with pytest.raises(cli.PipelineError, match=r"1 of its 2 prompts within max_prompt_length=128 tokens"):
        ppo.main([str(grpo_recipe(user, prompts=spec)), "run.name=one_short"])
    assert loaded == []


def test_prompts_that_fit_leave_room_for_the_reply_in_the_policys_context():
    from pipeline.ppo_config import PPOConfig, prompts_that_fit

    cfg = PPOConfig(max_prompt_length=128)
    lengths, replies = [10, 100, 128, 129, 100], [32, 32, 32, 32, 200]
    assert prompts_that_fit(lengths, replies, cfg, None) == ([0, 1, 2, 4], "max_prompt_length=128 tokens")
    assert prompts_that_fit(lengths, replies, cfg, 256) == ([0, 1, 2], "max_prompt_length=128 tokens and room for a "
                                                            "reply of up to 200 tokens in the policy's 256 positions")
    assert prompts_that_fit(lengths, replies[:4] + [32], cfg, 256) == ([0, 1, 2, 4], "max_prompt_length=128 tokens")


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_prompts_whose_reply_would_run_past_the_policys_context_are_left_out(user, algorithm):
    """A prompt within max_prompt_length whose reply budget runs past the policy's positions trained there anyway
    (where the model never trained; a model with a table of positions fails): it is left out as a long prompt is."""
    from transformers import AutoTokenizer

    from conftest import run_cli
    from pipeline.generation import render_prompt

    medium = "Which is more, 3 or 4? " * 5
    tokenizer = AutoTokenizer.from_pretrained(user / "policy")
    length = len(tokenizer(render_prompt(tokenizer, medium), add_special_tokens=False)["input_ids"])
    assert 56 < length <= 128  # within max_prompt_length, but not with 200 reply tokens in 256 positions
    spec = write_prompts(user / "medium.jsonl", [medium] * 8)
    proc = run_cli(["pipeline/ppo.py", grpo_recipe(user, algorithm=algorithm, prompts=spec, max_new_tokens=200,
                                                   **({"critic_init": "policy"} if algorithm == "ppo" else {})),
                    f"run.name=medium_{algorithm}"], cwd=user, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"error: {spec}: 0 of its 8 prompts within max_prompt_length=128 tokens and room for a reply of up to 200 "
        f"tokens in the policy's 256 positions, fewer than ")


def foreign_reward_model(folder, chat_template=None):
    """A reward model trained elsewhere: its own 300-token BPE (eos `</s>`, no pad token, maybe no chat template),
    pad_token_id unset in its config."""
    import torch
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    bpe = Tokenizer(tok_models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator([f"What is {i} + {j}? {i + j}." for i in range(30) for j in range(30)],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = chat_template
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, num_labels=1, pad_token_id=None))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text()).get("pad_token_id") is None
    return folder


def test_a_reward_model_with_its_own_tokenizer_scores_replies(user):
    """Its tokenizer got the recipe's chat format (new tokens past its 300 embeddings): every score was an
    IndexError traceback. It reads replies with its tokenizer as saved."""
    from pipeline.reward_model import RewardModel

    folder = foreign_reward_model(user / "rm_foreign")
    recipe = load_recipe(tiny_recipe(user, pretrain=None, sft=None))
    reward_model = RewardModel.load(recipe, runs.Checkpoint("rm", str(folder), "", "local"))
    assert len(reward_model.tokenizer) == 300 and reward_model.tokenizer.pad_token == "</s>"
    scores = reward_model.scores(["What is 2 + 3?", "What is 10 + 11?"], ["5", "The answer is 21."])
    assert len(scores) == 2 and scores[0] != scores[1]


def test_a_reward_model_without_a_chat_template_and_conversational_prompts_stop_in_one_line(user):
    from conftest import run_cli

    folder = foreign_reward_model(user / "rm_no_template")
    spec = str(user / "chats.jsonl")
    (user / "chats.jsonl").write_text("".join(json.dumps({"prompt": [
        {"role": "system", "content": "Be terse."}, {"role": "user", "content": f"What is {i} + 1?"}]}) + "\n"
        for i in range(4)))
    recipe = grpo_recipe(user, reward_model=str(folder), prompts=spec)
    proc = run_cli(["pipeline/ppo.py", recipe, "run.name=no_template"], cwd=user, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = (f"{folder}: ppo.reward_model: its tokenizer has no chat template, so it cannot read the "
            f"conversational prompts of {spec} (row 1); give it one or use text prompts")
    assert proc.stderr.strip().splitlines()[-1] == f"error: {line}"
    assert not (user / "runs/no_template").exists()
    # --check said nothing of it: the stage stopped only once submitted (tokenizer files are read, no weights)
    proc = run_cli(["pipeline/run.py", recipe, "run.name=no_template", "--check"], cwd=user,
                   env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"error: ppo.prompts: {line}" in [x.strip() for x in proc.stdout.splitlines()], proc.stdout[-3000:]
    assert not (user / "runs/no_template").exists()


def test_prompts_with_an_answer_column_alone_are_verified_by_it():
    """An `answer` column without `skill` (TRL-style prompt data) lost its answers wherever one prompt was no world
    problem, and verifier_weight refused it; now a world problem gets its skill and the others their own answer."""
    from datasets import Dataset

    from pipeline import judges
    from pipeline.cli import PipelineError

    ds = Dataset.from_list([{"prompt": [{"role": "system", "content": "Be terse."},
                                        {"role": "user", "content": "What is 2 + 3?"}], "answer": "5"},
                            {"prompt": [{"role": "user", "content": "Name the capital of France."}],
                             "answer": "Paris"}])
    out = judges.with_answers(ds, "p.jsonl", required=True)
    assert out["skill"][1] is None and out["answer"][1] == "Paris" and out["skill"][0] is not None
    assert judges.verifier_scores(out["skill"], out["answer"], ["The answer is 5.", "The answer is Paris."]) == \
        [1.0, 1.0]
    missing = Dataset.from_list([{"prompt": "What is 2 + 3?", "answer": "5"},
                                 {"prompt": "Name the capital of France.", "answer": None}])
    with pytest.raises(PipelineError, match=r"^p.jsonl: row 2: verifier_weight needs"):
        judges.with_answers(missing, "p.jsonl", required=True)
    assert judges.with_answers(missing, "p.jsonl", required=False)["answer"] == ["5", None]  # row 1 still checked


def test_answers_as_numbers_beside_world_problems_and_tool_rows_with_answers(tmp_path):
    """ppo reads a number answer as eval reads it: its text (3.0 is "3"). Beside a world problem (whose solution is
    text), or beside text answers, Arrow refused the mix ("Expected bytes, got a 'int' object"); with `skill` given,
    3.0 never matched a reply's "3". A world-phrased prompt's own answer was replaced by the world's solution.
    Prompts that all offer tools kept their `answer` column with no answer left in it, so verifier_weight passed its
    check and crashed at the first step; now they keep no `answer` column, which the check refuses in one line. In a
    CSV, a tool task's `expect` is the object its JSON text holds (tool_world.verify failed on the text mid-run)."""
    import pandas as pd
    from datasets import Dataset

    from pipeline import judges, ppo

    recipe = load_recipe(tiny_recipe(tmp_path))
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "What is the larger number: 72 or 76?", "answer": 77},
        {"prompt": "Name a prime above 6.", "answer": 7.0},
        {"prompt": "Which city is the capital?", "answer": "D.C."}]))
    out = judges.with_answers(ppo.read_prompts(str(numbers), recipe)[0], "p.jsonl", required=True)
    assert out["answer"] == ["77", "7", "D.C."] and out["skill"] == ["compare", None, None]  # the file's own answers
    given = tmp_path / "given.jsonl"
    given.write_text("".join(json.dumps({"prompt": "What is 1 + 2?", "skill": "add", "answer": a}) + "\n"
                             for a in (3.0, 3)))
    prompts = ppo.read_prompts(str(given), recipe)[0]
    assert judges.verifier_scores(prompts["skill"], prompts["answer"], ["The answer is 3."] * 2) == [1.0, 1.0]
    schema = '[{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]'
    tools_only = Dataset.from_list([{"prompt": "What is 1 + 2?", "answer": "3", "tools": schema}] * 2)
    assert "answer" not in judges.with_answers(tools_only, "p.jsonl", required=True).column_names
    pd.DataFrame([{"prompt": "Which digit is in image 7?", "kind": "read", "tools": schema,
                   "expect": json.dumps({"image_id": 7, "answer": 3})}]).to_csv(tmp_path / "t.csv", index=False)
    assert ppo.read_prompts(str(tmp_path / "t.csv"), recipe)[0]["expect"] == [{"image_id": 7, "answer": 3}]


def test_ppo_and_eval_read_a_prompt_rows_answer_and_expect_alike(tmp_path):
    """One rule for the cells replies are checked against (formats.prompt_cells), in both readers of prompt rows:
    eval's prompt check kept a CSV's `expect` as its JSON text, which ppo's reader parsed."""
    import pandas as pd

    from pipeline import data, ppo

    recipe = load_recipe(tiny_recipe(tmp_path))
    schema = '[{"type": "function", "function": {"name": "read", "parameters": {"type": "object"}}}]'
    pd.DataFrame([{"prompt": "Which digit is in image 7?", "kind": "read", "tools": schema, "answer": 3,
                   "expect": json.dumps({"image_id": 7, "answer": 3})}]).to_csv(tmp_path / "t.csv", index=False)
    ppo_row = ppo.read_prompts(str(tmp_path / "t.csv"), recipe)[0][0]
    rows, where, source = data.read_rows(str(tmp_path / "t.csv"), recipe)
    eval_row = data.CHECKS["eval_prompts"](rows, where, source)[0]
    assert {k: eval_row[k] for k in ("answer", "expect")} == {k: ppo_row[k] for k in ("answer", "expect")} == \
        {"answer": "3", "expect": {"image_id": 7, "answer": 3}}
    # a row that is no tool task (no kind, no tools): its `expect` is a column of the user's, kept as its text
    pd.DataFrame([{"prompt": "What is 2 + 2?", "answer": 4, "expect": "a short answer"}]).to_csv(tmp_path / "p.csv",
                                                                                                 index=False)
    rows, where, source = data.read_rows(str(tmp_path / "p.csv"), recipe)
    assert data.CHECKS["eval_prompts"](rows, where, source)[0]["expect"] == "a short answer"
    assert ppo.read_prompts(str(tmp_path / "p.csv"), recipe)[0][0]["expect"] == "a short answer"


@pytest.mark.parametrize("override, expected", [
    ("ppo.num_generations=3", "(GRPOConfig): generation_batch_size (8) must be divisible by num_generations (3)."),
    ("ppo.trl_args={bogus_key: 1}", "(GRPOConfig): GRPOConfig.__init__() got an unexpected keyword argument"),
    ("ppo.trl_args={beta: 0.2}", "(GRPOConfig): trl_args.beta is set by ppo.kl_coef: set that instead"),
    ("ppo.trl_args={output_dir: /elsewhere}", "(GRPOConfig): trl_args.output_dir is set by the stage folder"),
    # TRL took it and raised "Unknown loss type" at the first training step: a traceback mid-stage
    ("ppo.trl_args={loss_type: dr_grp}", "(GRPOConfig): trl_args.loss_type: 'dr_grp' is not a GRPOConfig loss_type "
                                         "(one of: grpo, dr_grpo, dapo, bnpo, cispo, sapo, luspo, vespo) (closest: "
                                         "dr_grpo"),
])
def test_trls_own_config_checks_run_before_any_stage(user, override, expected):
    """--check and the runner's checks said "no problems" to a GRPO section TRL refuses, found only when the ppo
    stage started (after every stage before it); a trl_args key the pipeline maps silently beat the ppo key."""
    from pipeline import check
    from pipeline.cli import PipelineError

    recipe = load_recipe(grpo_recipe(user), [override])
    with pytest.raises(PipelineError) as err:
        check.check_stage_config(recipe, "ppo")
    assert str(err.value).startswith(f"override '{override}': section 'ppo' {expected}")  # the key's override
    check.check_stage_config(load_recipe(grpo_recipe(user), ["ppo.trl_args={loss_type: dr_grpo}"]), "ppo")  # fine


def test_what_trls_trainer_refuses_stops_in_one_line(user):
    """A ValueError of TRL's trainer (a Llama is no mixture of experts) was a traceback from a started stage."""
    from conftest import run_cli

    proc = run_cli(["pipeline/ppo.py", grpo_recipe(user), "run.name=moe", "ppo.trl_args={router_aux_loss_coef: 0.1}"],
                   cwd=user, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: override 'ppo.trl_args={router_aux_loss_coef: 0.1}': section 'ppo' (GRPOTrainer): "
                           "`router_aux_loss_coef` is set to 0.1 but"), line
    assert not list((user / "runs").glob("moe/ppo*"))


@pytest.mark.parametrize("algorithm", ["grpo"])  # RLOO shares the sampler (checked by hand alike)
def test_killed_in_a_later_epoch_resumes_to_the_uninterrupted_result(user, algorithm):
    """4 prompts, 2 per step: step 3 is the second epoch. A run resumed there drew the first epoch's prompt order
    again (TRL's sampler shuffles with one generator over the run) and ended with other weights."""
    from safetensors.torch import load_file

    from conftest import run_cli

    spec = write_prompts(user / "four.jsonl", [f"What is {i} + 2?" for i in range(4)])
    args = ["pipeline/ppo.py", grpo_recipe(user, algorithm=algorithm, prompts=spec, max_steps=4, save_steps=2)]
    env = {"OMP_NUM_THREADS": "1"}
    assert run_cli([*args, f"run.name={algorithm}_whole"], cwd=user, env=env).returncode == 0
    killed = run_cli([*args, f"run.name={algorithm}_killed"], cwd=user,
                     env={**env, "PIPELINE_FAULT": "kill:training:3"})
    assert killed.returncode == -9 and not (user / f"runs/{algorithm}_killed/ppo").exists()
    proc = run_cli([*args, f"run.name={algorithm}_killed"], cwd=user, env=env)
    assert proc.returncode == 0 and "resuming from" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    whole, resumed = (load_file(user / f"runs/{algorithm}_{n}/ppo/model.safetensors") for n in ("whole", "killed"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    history = [json.loads((user / f"runs/{algorithm}_{n}/ppo/metrics.json").read_text())["history"]
               for n in ("whole", "killed")]
    assert [h["step"] for h in history[1]] == [1, 2, 3, 4] and history[0] == history[1]


def test_the_manifest_records_trls_whole_config(user, monkeypatch):
    """The manifest of a grpo run kept our ppo keys only: TRL's own defaults the run trained with (loss_type,
    scale_rewards, ...) were nowhere, though the README says the manifest has the full trainer config."""
    from pipeline import ppo

    monkeypatch.chdir(user)
    ppo.main([str(grpo_recipe(user, kl_coef=0.02, trl_args={"scale_rewards": "none"})), "run.name=manifest"])
    config = json.loads((user / "runs/manifest/ppo/manifest.json").read_text())["config"]
    assert config["kl_coef"] == 0.02 and config["trl_args"] == {"scale_rewards": "none"}
    assert config["trl"]["beta"] == 0.02 and config["trl"]["scale_rewards"] == "none"
    assert config["trl"]["loss_type"] == "dapo" and config["trl"]["num_generations"] == 4  # TRL's default; mapped


def test_our_ppo_with_fewer_prompts_than_a_batch_says_so_not_that_they_are_too_long(user):
    """4 short prompts and batch_size 8 (one reply each): the error blamed max_prompt_length ("4 prompts of at most
    ...")."""
    from conftest import run_cli

    spec = write_prompts(user / "few.jsonl", [f"What is {i} + 1?" for i in range(4)])
    proc = run_cli(["pipeline/ppo.py", grpo_recipe(user, algorithm="ppo", prompts=spec, critic_init="policy",
                                                   num_generations=1), "run.name=few"],
                   cwd=user, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {spec}: 4 of its 4 prompts within max_prompt_length=128 tokens, fewer than one batch (8 x 1 "
        f"processes)")


def test_a_trainer_error_on_resume_keeps_the_killed_runs_checkpoints(user, monkeypatch):
    """A ValueError of TRL's trainer is one line and, as bad input, removes the stage folder; when the folder holds a
    killed run's checkpoints (the error then comes from the machine, e.g. several GPUs seen by one process) it is
    raised as it is and the checkpoints stay."""
    import trl

    from conftest import run_cli
    from pipeline import ppo

    recipe = grpo_recipe(user, max_steps=3, save_steps=1)
    killed = run_cli(["pipeline/ppo.py", recipe, "run.name=kept"], cwd=user,
                     env={"OMP_NUM_THREADS": "1", "PIPELINE_FAULT": "kill:training:2"})
    assert killed.returncode == -9 and (user / "runs/kept/ppo.partial/checkpoint-1").is_dir()

    def refuse(self, *args, **kwargs):
        raise ValueError("GRPOTrainer does not support `nn.DataParallel`")

    monkeypatch.setattr(trl.GRPOTrainer, "__init__", refuse)
    monkeypatch.chdir(user)
    with pytest.raises(ValueError, match="DataParallel"):
        ppo.main([str(recipe), "run.name=kept"])
    assert (user / "runs/kept/ppo.partial/checkpoint-1/trainer_state.json").is_file()


def test_grpo_loss_types_read_from_trl_are_those_its_trainer_computes():
    # the list comes from GRPOConfig's help text; the trainer's branches on self.loss_type are the truth
    import inspect
    import re

    from trl import GRPOConfig
    from trl.trainer import grpo_trainer

    from pipeline.key_checks import listed_values

    source = inspect.getsource(grpo_trainer.GRPOTrainer._compute_loss)
    branches = set(re.findall(r'self\.loss_type == "(\w+)"', source))
    for group in re.findall(r"self\.loss_type in \[([^\]]*)\]", source):
        branches |= set(re.findall(r'"(\w+)"', group))
    assert branches and set(listed_values(GRPOConfig, "loss_type")) == branches


def test_trls_checkpoints_keep_the_policys_own_generation_config(user):
    """While TRL trains, the policy's generation_config holds neutral values (generation.unshaped); the checkpoints
    TRL saved meanwhile carried those instead of the user's min_p, repetition_penalty, ..., so a checkpoint loaded
    as a model sampled otherwise than the policy it came from."""
    from conftest import run_cli

    recipe = grpo_recipe(user, init_from=str(user / "shaped"), max_steps=3, save_steps=1)
    killed = run_cli(["pipeline/ppo.py", recipe, "run.name=gen_kept"], cwd=user,
                     env={"OMP_NUM_THREADS": "1", "PIPELINE_FAULT": "kill:training:2"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    saved = json.loads((user / "runs/gen_kept/ppo.partial/checkpoint-1/generation_config.json").read_text())
    assert {k: saved.get(k) for k in SHAPING} == SHAPING


def test_a_prompt_without_an_answer_is_named_by_its_file_and_line(user, tmp_path):
    """verifier_weight's refusal of a prompt with nothing to verify numbered the rows as the stage holds them (a
    list's files run together, blank lines skipped, pairs put after prompts): "row 5" was line 4 of the second file."""
    from conftest import run_cli, write_jsonl

    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "What is 2 + 3?", "answer": "5"}] * 2)
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"prompt": "What is 2 + 3?", "answer": "5"}\n\n{"prompt": "What is 3 + 4?", "answer": "7"}\n'
                   '{"prompt": "Name a colour."}\n')
    proc = run_cli(["pipeline/ppo.py", grpo_recipe(user), "run.name=unverified", "ppo.verifier_weight=1.0",
                    f"ppo.prompts=[{good}, {odd}]"], cwd=user, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {good} + {odd}: {odd} line 4: verifier_weight needs `skill` and `answer`"), line
    assert not list((user / "runs").glob("unverified/ppo*"))


def test_trls_refusals_name_the_override_that_set_a_key_they_name(user):
    """What a TRL config or trainer refuses named the recipe file even when an override on the command line set the
    key: the line names the last override that set a key the message names (TRL's name for a mapped key too), else
    the recipe file."""
    from pipeline import check
    from pipeline.cli import PipelineError
    from trl import GRPOConfig

    from pipeline.trl_online import MAPPED
    from pipeline.trl_refusals import source_of_named

    path = grpo_recipe(user, trl_args={"num_iterations": 2})
    overrides = ["ppo.kl_coef=0.5", "ppo.trl_args.scale_rewards=batch", "ppo.max_steps=2"]
    recipe = load_recipe(path, overrides)

    def named(message, section="ppo", aliases=MAPPED):
        return source_of_named(recipe, section, message, GRPOConfig, aliases)

    assert named("beta must be 0 or more") == "override 'ppo.kl_coef=0.5'"  # TRL's name of ppo.kl_coef
    assert named("beta must be 0 or more", aliases={}) == str(path)  # ppo's own names only
    assert named("`scale_rewards` is wrong") == "override 'ppo.trl_args.scale_rewards=batch'"
    assert named("num_iterations must be 1") == str(path)  # the file set it
    assert named("generation_batch_size (8) must ...") == str(path)  # no key it names
    assert named("max_steps is wrong", section="sft") == str(path)  # another section's
    recipe = load_recipe(path, ["ppo.trl_args={num_iterations: 3}", "ppo.prompts=world:preference"])
    assert named("num_iterations (3) needs prompts") == "override 'ppo.trl_args={num_iterations: 3}'"  # a mapping's
    # key; "prompts" is a word of the message, not a TRL argument
    recipe = load_recipe(path, ["ppo.num_generations=3", "ppo.temperature=0.5"])
    with pytest.raises(PipelineError) as err:
        check.check_stage_config(recipe, "ppo")
    assert str(err.value).startswith("override 'ppo.num_generations=3': section 'ppo' (GRPOConfig): "
                                     "generation_batch_size (8) must be divisible by num_generations (3)")
    with pytest.raises(PipelineError) as err:
        check.check_stage_config(load_recipe(grpo_recipe(user, num_generations=3), ["ppo.temperature=0.5"]), "ppo")
    assert str(err.value).startswith(f"{path}: section 'ppo' (GRPOConfig): generation_batch_size (8) must be")
    # a trl_args key the section maps, set in the file: the override of the section's own key is not at fault
    with pytest.raises(PipelineError) as err:
        check.check_stage_config(load_recipe(grpo_recipe(user, trl_args={"temperature": 0.9}),
                                             ["ppo.temperature=0.7"]), "ppo")
    assert str(err.value) == (f"{path}: section 'ppo' (GRPOConfig): trl_args.temperature is set by ppo.temperature: "
                              f"set that instead")


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_trls_refusal_of_a_derived_argument_names_the_override_of_a_key_it_comes_from(user, algorithm):
    """GRPOConfig/RLOOConfig compute generation_batch_size from ppo.batch_size (per_device_train_batch_size),
    gradient_accumulation_steps and trl_args.steps_per_generation: its refusal named the recipe file even when an
    override set one of those keys. It names the last override that set a key it comes from (derived), else the
    file."""
    from pipeline import check
    from pipeline.cli import PipelineError

    path = grpo_recipe(user, algorithm=algorithm, batch_size=2, gradient_accumulation_steps=2)
    refusal = f"section 'ppo' ({algorithm.upper()}Config): generation_batch_size (6) must be divisible by " \
              f"num_generations (4)"
    for overrides, where in [(["ppo.batch_size=3", "ppo.temperature=0.5"], "override 'ppo.batch_size=3'"),
                             (["ppo.gradient_accumulation_steps=3", "ppo.max_steps=2"],
                              "override 'ppo.gradient_accumulation_steps=3'"),
                             (["ppo.gradient_accumulation_steps=1", "ppo.trl_args={steps_per_generation: 3}"],
                              "override 'ppo.trl_args={steps_per_generation: 3}'")]:
        with pytest.raises(PipelineError) as err:
            check.check_stage_config(load_recipe(path, overrides), "ppo")
        assert str(err.value).startswith(f"{where}: {refusal}"), overrides
    with pytest.raises(PipelineError) as err:  # the file set them all
        check.check_stage_config(load_recipe(grpo_recipe(user, algorithm=algorithm, batch_size=3,
                                                         gradient_accumulation_steps=2), ["ppo.max_steps=2"]), "ppo")
    assert str(err.value).startswith(f"{path}: {refusal}")


def test_trls_vllm_refusal_of_tensor_parallel_size_names_the_generation_override(tmp_path):
    """GRPO/RLOO's colocated vLLM engine refuses a tensor_parallel_size that does not divide the processes, by that
    name; it comes from generation.vllm_tensor_parallel_size, another section than ppo's, and the line named the
    recipe file even when an override set it (derived pointed at ppo's keys only). trl_args wins over generation."""
    import inspect

    from trl import GRPOConfig
    from trl.generation.vllm_generation import VLLMGeneration

    from pipeline.trl_online import MAPPED, derived
    from pipeline.trl_refusals import trl_refusal

    # TRL's own words (VLLMGeneration, which GRPOTrainer and RLOOTrainer build from args.vllm_tensor_parallel_size)
    assert "f\"tensor_parallel_size ({self.tensor_parallel_size}) must divide world size " in \
        inspect.getsource(VLLMGeneration._init_vllm)
    refused = ValueError("tensor_parallel_size (2) must divide world size (1) evenly.")
    path = tiny_recipe(tmp_path, ppo={"algorithm": "grpo"})

    def line(overrides):
        return trl_refusal(load_recipe(path, overrides), "ppo", "GRPOTrainer", refused, GRPOConfig, MAPPED,
                           derived({}))

    assert line(["generation.vllm_tensor_parallel_size=2", "ppo.max_steps=2"]) == \
        "override 'generation.vllm_tensor_parallel_size=2': section 'ppo' (GRPOTrainer): " + str(refused)
    assert line(["generation.vllm_tensor_parallel_size=1", "ppo.trl_args={vllm_tensor_parallel_size: 2}"]) \
        .startswith("override 'ppo.trl_args={vllm_tensor_parallel_size: 2}': ")
    # trl_args wins whatever the order: the value refused is its own
    assert line(["ppo.trl_args={vllm_tensor_parallel_size: 2}", "generation.vllm_tensor_parallel_size=1"]) \
        .startswith("override 'ppo.trl_args={vllm_tensor_parallel_size: 2}': ")
    (tmp_path / "in_file").mkdir()
    in_file = tiny_recipe(tmp_path / "in_file", ppo={"algorithm": "grpo", "trl_args": {"vllm_tensor_parallel_size": 2}})
    assert trl_refusal(load_recipe(in_file, ["generation.vllm_tensor_parallel_size=1"]), "ppo", "GRPOTrainer", refused,
                       GRPOConfig, MAPPED, derived({})).startswith(f"{in_file}: ")
    assert line(["generation.vllm_gpu_memory_utilization=0.5"]).startswith(f"{path}: ")  # not a key it comes from


def test_policy_context_of_a_hub_id_without_network_reads_the_cache_at_once(tmp_path, monkeypatch):
    """An adapter whose base is a hub id: the policy's config was read with huggingface_hub's retries (23 s without
    network) before loading the model said the hub cannot be reached. It asks hub.reachable first, as loading does."""
    import time

    from transformers import AutoConfig  # noqa: F401  imported here: the clock times the reading, not the import

    from pipeline import hub, trl_online

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "someone/no-such-model",
                                                             "peft_type": "LORA"}))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: the probe fails at once
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    recipe = load_recipe(tiny_recipe(tmp_path))
    hub.reachable.cache_clear()
    try:
        started = time.monotonic()
        assert trl_online.policy_context(recipe, str(adapter), None) is None
        assert time.monotonic() - started < 10
        assert hub.reachable.cache_info().currsize == 1
    finally:
        hub.reachable.cache_clear()


@pytest.mark.parametrize("override, expected", [
    ("ppo.trl_args={use_liger_kernel: true}", "(GRPOConfig): trl_args.use_liger_kernel: needs liger-kernel >= 0.3.0 "
                                              "(pip install liger-kernel), which is not installed"),
    ("ppo.trl_args={scale_rewards: std}", "(GRPOConfig): trl_args.scale_rewards: 'std' is not a GRPOConfig "
                                          "scale_rewards (one of: group, batch, none)"),
    ("ppo.trl_args={importance_sampling_level: seq}", "(GRPOConfig): trl_args.importance_sampling_level: 'seq' is "
                                                      "not a GRPOConfig importance_sampling_level (one of: token, "
                                                      "sequence)"),
    ("ppo.trl_args={use_vllm: true}", "(GRPOConfig): trl_args.use_vllm is set by generation.backend (vllm or hf)"),
])
def test_trl_args_trl_refuses_only_in_training_stop_before_any_stage(user, monkeypatch, override, expected):
    """Without liger-kernel, use_liger_kernel was an ImportError traceback once training started, leaving
    ppo.partial, and so was a scale_rewards GRPOTrainer does not know (a ValueError at the first step); use_vllm
    bypassed generation.backend's checks (vLLM installed, a GPU) for an ImportError traceback from GRPOTrainer, and
    use_vllm: false silently beat generation.backend: vllm."""
    import transformers.utils

    from pipeline import check
    from pipeline.cli import PipelineError

    monkeypatch.setattr(transformers.utils, "is_liger_kernel_available", lambda: False)  # whatever is installed
    with pytest.raises(PipelineError) as err:
        check.check_stage_config(load_recipe(grpo_recipe(user), [override]), "ppo")
    assert str(err.value) == f"override '{override}': section 'ppo' {expected}"


def test_scale_rewards_is_not_checked_where_grpo_never_reads_it(user):
    """GRPOTrainer reads scale_rewards only when it sums the rewards before normalising (multi_objective_aggregation
    sum_then_normalize): under normalize_then_sum TRL trains with any value, and so does the stage."""
    from pipeline import check

    recipe = load_recipe(grpo_recipe(user), ["ppo.trl_args={scale_rewards: std, "
                                             "multi_objective_aggregation: normalize_then_sum}"])
    check.check_stage_config(recipe, "ppo")  # no refusal


def test_grpo_choices_checked_before_training_are_those_its_trainer_computes():
    import inspect
    import re

    from trl.trainer import grpo_trainer

    from pipeline.trl_online import TRAINING_CHOICES

    source = inspect.getsource(grpo_trainer.GRPOTrainer)
    for key, valid in TRAINING_CHOICES.items():
        branches = set(re.findall(rf'self\.{key} == "(\w+)"', source))
        for group in re.findall(rf"self\.{key} in \[([^\]]*)\]", source):
            branches |= set(re.findall(r'"(\w+)"', group))
        assert set(valid) == branches, key


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_trls_refusals_that_word_an_argument_name_the_override_that_set_it(user, algorithm):
    """GRPOConfig/RLOOConfig refuse num_generations 1 as "at least 2 generations per prompt", and an eval batch as
    "global eval batch size", not by the arguments' names: the line named the recipe file even when an override set
    them. It names the override (derived: the words -> the keys), else the file."""
    from pipeline import check
    from pipeline.cli import PipelineError

    def refusal(path, overrides):
        with pytest.raises(PipelineError) as err:
            check.check_stage_config(load_recipe(path, overrides), "ppo")
        return str(err.value)

    section = f"section 'ppo' ({algorithm.upper()}Config)"
    path = grpo_recipe(user, algorithm=algorithm)
    assert refusal(path, ["ppo.num_generations=1", "ppo.max_steps=2"]) == (
        f"override 'ppo.num_generations=1': {section}: {algorithm.upper()} requires at least 2 generations per prompt "
        f"to calculate the advantages. You provided 1, which is less than the minimum required.")
    evaluation = "ppo.trl_args={eval_strategy: steps, per_device_eval_batch_size: 3}"
    assert refusal(path, [evaluation, "ppo.max_steps=2"]).startswith(
        f"override '{evaluation}': {section}: The global eval batch size (3 * 1) must be divisible by the number of "
        f"generations used for evaluation (4)")
    path = grpo_recipe(user, algorithm=algorithm, num_generations=1)  # the file set it
    assert refusal(path, ["ppo.max_steps=2"]).startswith(f"{path}: {section}: {algorithm.upper()} requires at least 2")



@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_trls_refusal_of_the_eval_generations_names_num_generations_eval_when_trl_args_sets_it(user, algorithm):
    """GRPOConfig/RLOOConfig check the eval batch against num_generations_eval when trl_args sets it (num_generations
    otherwise), in words ("generations used for evaluation"): the line named the last override of either, an
    override of ppo.num_generations too when TRL had checked num_generations_eval of the file or an earlier
    override. It names the override of the key TRL checked, else the file."""
    from pipeline import check
    from pipeline.cli import PipelineError

    def refusal(path, overrides):
        with pytest.raises(PipelineError) as err:
            check.check_stage_config(load_recipe(path, overrides), "ppo")
        return str(err.value)

    evaluation = {"eval_strategy": "steps", "per_device_eval_batch_size": 4}
    words = f"section 'ppo' ({algorithm.upper()}Config): The global eval batch size (4 * 1) must be divisible by " \
            f"the number of generations used for evaluation"
    path = grpo_recipe(user, algorithm=algorithm, trl_args=evaluation)
    assert refusal(path, ["ppo.num_generations=8"]) == f"override 'ppo.num_generations=8': {words} (8)."
    assert refusal(path, ["ppo.trl_args.num_generations_eval=3", "ppo.num_generations=2"]) == \
        f"override 'ppo.trl_args.num_generations_eval=3': {words} (3)."
    path = grpo_recipe(user, algorithm=algorithm, trl_args={**evaluation, "num_generations_eval": 3})
    assert refusal(path, ["ppo.num_generations=2"]) == f"{path}: {words} (3)."  # the file set it


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_trls_refusal_of_the_generation_batch_names_no_key_trl_args_replaced(user, algorithm):
    """GRPOConfig/RLOOConfig take trl_args' generation_batch_size or steps_per_generation as given, and
    gradient_accumulation_steps then plays no part: the line named an override of it, or of ppo.batch_size where the
    refusal is of the two trl_args together. It names the override of a key TRL read."""
    from pipeline import check
    from pipeline.cli import PipelineError

    path = grpo_recipe(user, algorithm=algorithm)
    section = f"section 'ppo' ({algorithm.upper()}Config)"
    for overrides, where, words in [
            (["ppo.trl_args.steps_per_generation=3", "ppo.batch_size=2", "ppo.gradient_accumulation_steps=2"],
             "ppo.batch_size=2", "generation_batch_size (6) must be divisible by num_generations (4)"),
            (["ppo.trl_args.generation_batch_size=6", "ppo.batch_size=2", "ppo.gradient_accumulation_steps=2"],
             "ppo.trl_args.generation_batch_size=6", "generation_batch_size (6) must be divisible by num_generations"),
            (["ppo.trl_args.generation_batch_size=8", "ppo.trl_args.steps_per_generation=2", "ppo.batch_size=4"],
             "ppo.trl_args.steps_per_generation=2", "'generation_batch_size' and 'steps_per_generation' can not be"),
            (["ppo.trl_args.generation_batch_size=6", "ppo.batch_size=4"],
             "ppo.batch_size=4", "generation_batch_size (6) must be divisible by the global batch size (4)")]:
        with pytest.raises(PipelineError) as err:
            check.check_stage_config(load_recipe(path, overrides), "ppo")
        assert str(err.value).startswith(f"override '{where}': {section}: {words}"), overrides

def test_a_grpo_run_warns_of_no_deprecated_checkpointing_name(user, monkeypatch):
    """Every GRPO/RLOO run printed transformers' FutureWarnings "`gradient_checkpointing` is deprecated" (the name
    we turned it off by) and "`is_gradient_checkpointing` is deprecated" (read by TRL itself at every rollout).
    trl_args may still turn it on by the old name."""
    import warnings

    from pipeline import ppo
    from pipeline.trl_online import trl_config

    monkeypatch.chdir(user)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # over pytest's filterwarnings, which hide FutureWarnings
        ppo.main([str(grpo_recipe(user)), "run.name=no_deprecation"])
    assert not [str(w.message) for w in caught if "checkpointing` is deprecated" in str(w.message)]
    recipe = load_recipe(grpo_recipe(user, trl_args={"gradient_checkpointing": True}))
    config, _ = trl_config(recipe, recipe.trainer_config("ppo"), str(user / "runs/checkpointing"))
    assert config.activation_checkpointing and config.gradient_checkpointing
