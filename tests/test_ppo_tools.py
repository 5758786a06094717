"""Our PPO with tools (pipeline/ppo_tools.py): a tiny random policy on a mixture of world text prompts and tool tasks,
with the real recipe tools (an untrained tiny diffusion pipeline behind draw_image, an untrained judge behind
read_image and the gold score, the world's gallery). A random policy never writes a tool call, so in process its
first turn on a tool prompt is forced (a LogitsProcessor in its own generate: the sampled ids are the call's), by
the prompt (`forced_calls`): calls that run, a call the schema refuses or to a tool that does not exist, or nothing
(left to the policy). Everything after the first turn is sampled. Tested: tool positions take no part in the
update, neither gold score enters the reward without its weight, the logged tool statistics, the images kept, and
that an interrupted run resumes to the same history, images and weights; GRPO through TRL with the tools. At the
command line: the stage with a tools section, and bad input."""

import copy
import json
import random
import re
from pathlib import Path

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from conftest import TINY, run_cli, tiny_recipe, write_jsonl
from pipeline import faults, images, judges, models, ppo, ppo_trainer, preemption, runs, safe_resume, tool_world
from pipeline.cli import PipelineError
from pipeline.image_judge import ImageJudge, _net
from pipeline.ppo_tools import tool_counts
from pipeline.recipe import load_recipe
from pipeline.tokenizer import TOOL_CALL_START
from pipeline.tool_rollout import OfferedTools
from pipeline.tools import Tool, ToolBox, ToolCall
from test_diffusion import TINY_TEXT, TINY_UNET
from test_ppo import ENV, bag_of_words_reward_model

RUN = {"batch_size": 8, "num_minibatches": 2, "ppo_epochs": 1, "max_new_tokens": 72, "max_tool_calls": 2,
       "max_prompt_length": 2048, "learning_rate": 1e-3, "max_steps": 4, "save_steps": 2, "logging_steps": 2,
       "heldout_prompts": None}


def forced_calls(row: dict) -> list:
    """The first turns forced on a kind's tool prompts, in row order: calls that run, one the schema refuses or that
    names no tool, and one left to the policy (None)."""
    if row["kind"] == "draw":
        return [{"name": "draw_image", "arguments": {"prompt": "a large 7"}}] * 2 + [
            {"name": "draw_image", "arguments": {"text": "a 7"}}, None]  # the schema has no `text`
    image_id = row["expect"]["image_id"]
    return [{"name": "read_image", "arguments": {"image_id": image_id}}] * 2 + [
        {"name": "paint", "arguments": {"image_id": image_id}}, None]


def call_text(call: dict) -> str:
    return f"{TOOL_CALL_START}\n{json.dumps(call)}\n</tool_call>"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Policy, reward model, a tiny diffusion pipeline with its judge, and prompts: 8 world text problems and 8 tool
    tasks (4 draw, 4 read) with `tools`, `kind` and `expect` as the world's tool_eval rows have them."""
    work = tmp_path_factory.mktemp("ppotools")
    torch.manual_seed(0)
    images.build_pipeline(TINY_UNET, TINY_TEXT, {"num_train_timesteps": 10}).save_pretrained(
        str(work / "diffusion"), safe_serialization=True)
    ImageJudge(_net(4), {"width": 4}).save(work / "diffusion" / "judge")
    recipe = load_recipe(tool_recipe(work))
    tokenizer = models.load_tokenizer(recipe, runs.resolve_checkpoint(recipe, "model"))
    policy = models.build_causal_lm(recipe, tokenizer)
    models.configure_generation(policy, tokenizer)
    for folder in ("policy", "rm"):
        tokenizer.save_pretrained(work / folder)
    policy.save_pretrained(work / "policy")
    bag_of_words_reward_model(work / "policy").save_pretrained(work / "rm")

    from pipeline import data

    rows = [{"prompt": p} for p in data.load("world:preference", "prompts", recipe)["prompt"][:8]]
    rng = random.Random(0)
    for kind in ["draw"] * 4 + ["read"] * 4:
        key = tool_world.sample_task(kind, rng)
        rows.append({"prompt": [{"role": "user", "content": tool_world.prompt(key)}], "tools": tool_world.TOOLS_JSON,
                     "kind": kind, "expect": tool_world.expect(key)})
    write_jsonl(work / "prompts.jsonl", rows)
    for call in forced_calls(rows[-1]) + forced_calls(rows[-5]):  # each forced call fits in one turn
        assert call is None or len(tokenizer(call_text(call), add_special_tokens=False)["input_ids"]) < 72
    return work, tokenizer


def tool_recipe(work, **ppo_keys):
    model = {"config": {**TINY["model"]["config"], "max_position_embeddings": 2048}}  # tool prompts: ~700 tokens
    tools = {"world_gallery": True, "timeout_s": 60, "tools": [
        {"name": "draw_image", "backend": "diffusion", "source": str(work / "diffusion"), "steps": 2, "seed": 3},
        {"name": "read_image", "backend": "image_judge", "source": str(work / "diffusion")}]}
    section = {"init_from": str(work / "policy"), "reward_model": str(work / "rm"),
               "prompts": str(work / "prompts.jsonl"), **RUN, **ppo_keys}
    return tiny_recipe(work, pretrain=None, sft=None, model=model, tools=tools, ppo=section)


class ForceCalls(LogitsProcessor):
    """Forces each row's `targets` ids (None: nothing) from the first generated token on."""

    def __init__(self, start: int, targets: list):
        self.start, self.targets = start, targets

    def __call__(self, input_ids, scores):
        t = input_ids.shape[1] - self.start
        for b, target in enumerate(self.targets):
            if target is not None and t < len(target):
                scores[b] = float("-inf")
                scores[b, target[t]] = 0.0
        return scores


def force_calls(trainer) -> dict:
    """The policy's first turn on each tool prompt becomes that prompt's forced call (`forced_calls`), then
    end-of-turn: sampled ids all the same, from the policy's own generate. Returns {prompt row: call}."""
    tokenizer, model = trainer.tokenizer, trainer.unwrapped
    calls, seen = {}, {}
    for i, row in enumerate(trainer.prompts):
        if row["kind"]:
            calls[i] = forced_calls(row)[seen.setdefault(row["kind"], 0)]
            seen[row["kind"]] += 1
    targets = {tuple(trainer.prompt_ids[i]): tokenizer(call_text(c), add_special_tokens=False)["input_ids"]
               + [tokenizer.eos_token_id] for i, c in calls.items() if c}
    original = model.generate

    def generate(input_ids, attention_mask, **kw):
        rows = [tuple(ids[att.bool()].tolist()) for ids, att in zip(input_ids, attention_mask)]
        processors = LogitsProcessorList([ForceCalls(input_ids.shape[1], [targets.get(r) for r in rows])])
        return original(input_ids=input_ids, attention_mask=attention_mask, logits_processor=processors, **kw)

    model.generate = generate
    return calls


class Run:
    """What the trainer needs of runs.StageRun: the output folder and the checkpoint to resume from."""

    def __init__(self, out: Path):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)

    def last_checkpoint(self):
        found = safe_resume.find_checkpoint(self.out)
        return str(found) if found else None


def make_trainer(work, tokenizer, name, overrides=()):
    recipe = load_recipe(tool_recipe(work), list(overrides))
    keys, cfg = recipe.keys("ppo"), recipe.trainer_config("ppo")
    prompts = judges.with_answers(ppo.load_prompts(keys.prompts, recipe), keys.prompts, required=False)
    trainer = ppo_trainer.PPOTrainer(recipe, Run(work / name), cfg, keys, recipe.peft_values("ppo"), prompts,
                                     runs.Checkpoint("policy", str(work / "policy"), "", "local"),
                                     [runs.Checkpoint("rm", str(work / "rm"), "", "local")])
    trainer.forced = force_calls(trainer)
    return trainer


@pytest.fixture(scope="module")
def scored(inputs):
    """A trainer, one rollout in which some replies called tools, and the same rollout scored."""
    work, tokenizer = inputs
    trainer = make_trainer(work, tokenizer, "one-step")
    torch.manual_seed(1)
    rollout = trainer.rollout()
    assert any(rollout.calls) and any(rollout.tools) and not all(rollout.tools)  # tool and text rows, with calls
    batch = copy.deepcopy(rollout)
    trainer.score(batch)
    trainer.advantages(batch)
    return trainer, rollout, batch


# ---------------------------------------------------------------------------------------------- in process


def test_with_answers_leaves_tool_tasks_to_tool_world(inputs):
    work, tokenizer = inputs
    recipe = load_recipe(tool_recipe(work))
    prompts = judges.with_answers(ppo.load_prompts(str(work / "prompts.jsonl"), recipe), "p", required=True)
    assert {"tools", "kind", "expect", "skill", "answer"} <= set(prompts.column_names)
    assert [a is None for a in prompts["answer"]] == [False] * 8 + [True] * 8


def test_tool_tokens_take_no_part_in_the_update(scored):
    """Tool results are context: the update reads only `mask` (the policy's tokens). Perturbing the rollout's
    log-probabilities, reference log-probabilities and values at tool positions changes neither the advantages nor
    the weights one update leads to."""
    trainer, _, batch = scored
    tool = batch.tool_mask > 0
    assert tool.any() and not (tool & (batch.mask > 0)).any()
    assert (batch.rewards[tool] == 0).all() and (batch.advantages[tool] == 0).all() and (batch.kl[tool] == 0).all()
    perturbed = copy.deepcopy(batch)
    perturbed.logprobs[tool] += 3.0
    perturbed.ref_logprobs[tool] -= 2.0
    perturbed.values[tool] += 5.0
    trainer.advantages(perturbed)
    assert torch.equal(perturbed.advantages, batch.advantages) and torch.equal(perturbed.returns, batch.returns)

    parts = [trainer.model, trainer.optimizer, trainer.scheduler]  # policy and critic as one module, and theirs
    start = [copy.deepcopy(p.state_dict()) for p in parts]
    policy_start = {k.removeprefix("policy."): v for k, v in start[0].items() if k.startswith("policy.")}

    def update(b):
        for part, state in zip(parts, start):
            part.load_state_dict(copy.deepcopy(state))
        torch.manual_seed(0)  # the minibatch order
        trainer.update(b)
        return {k: v.clone() for k, v in trainer.unwrapped.state_dict().items()}

    a, b = update(batch), update(perturbed)
    assert a.keys() == policy_start.keys() and any(not torch.equal(a[k], policy_start[k]) for k in a)  # it moved
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_neither_gold_score_enters_the_reward_without_its_weight(scored, monkeypatch):
    """test_ppo's gold-score test, with tools: one rollout scored with both gold paths on (the text verifier made to
    answer 1e6, tool_world.verify to call every tool task correct) and off (no answer columns; every tool task
    wrong). With both weights 0, scores, rewards and advantages are equal; each weight adds its own gold only."""
    trainer, rollout, _ = scored
    prompts = trainer.prompts
    verify = tool_world.verify

    def scored_with(prompt_rows, tool_correct, **weights):
        monkeypatch.setattr(tool_world, "verify", lambda *a: {**verify(*a), "correct": tool_correct})
        trainer.prompts = prompt_rows
        trainer.cfg.verifier_weight = weights.get("verifier_weight", 0.0)
        trainer.cfg.image_verifier_weight = weights.get("image_verifier_weight", 0.0)
        batch = copy.deepcopy(rollout)
        trainer.score(batch)
        trainer.advantages(batch)
        return batch

    monkeypatch.setattr(judges, "verifier_scores", lambda skills, answers, texts: [
        None if a is None else 1e6 for a in answers])
    try:
        gold = scored_with(prompts, True)
        no_gold = scored_with(prompts.remove_columns(["skill", "answer"]), False)
        text_rows = torch.tensor([not t for t in rollout.tools])
        tasks = torch.tensor([v is not None for v in gold.verdicts])
        assert torch.equal(gold.judged, text_rows) and gold.correct[text_rows].eq(1e6).all()  # the gold paths ran
        assert tasks.sum() == (~text_rows).sum() and gold.tool_correct[tasks].eq(1).all()
        assert no_gold.correct is None and no_gold.tool_correct.eq(0).all()
        for name in ("scores", "rewards", "advantages", "returns"):
            assert torch.equal(getattr(gold, name), getattr(no_gold, name)), name
        text = scored_with(prompts, True, verifier_weight=1.0)
        assert torch.allclose(text.scores, no_gold.scores + 1e6 * text_rows)
        image = scored_with(prompts, True, image_verifier_weight=2.0)
        assert torch.allclose(image.scores, no_gold.scores + 2.0 * tasks)
    finally:
        trainer.prompts = prompts
        trainer.cfg.verifier_weight = trainer.cfg.image_verifier_weight = 0.0


def test_calls_run_through_the_recipe_tools_and_are_judged(scored):
    """The forced first calls as the rollout recorded them: drawn and read images, a call the schema refused, a call
    to no tool; the verdicts of tool tasks and the step's tool counts."""
    trainer, _, batch = scored
    forced = [(i, trainer.forced[row]) for i, row in enumerate(batch.rows) if trainer.forced.get(row)]
    assert forced
    for i, call in forced:
        first = batch.calls[i][0]
        assert (first.name, first.arguments) == (call["name"], call["arguments"])
        if call["name"] == "paint":
            assert not first.valid and "unknown tool 'paint'" in first.content
        elif "text" in call["arguments"]:
            assert not first.valid and first.content.startswith("invalid:")
        elif call["name"] == "draw_image":
            assert first.ok and first.content == f"Drew image {first.image}." and int(first.image) > 200
            assert batch.verdicts[i]["image"] == first.image and batch.verdicts[i]["read"]["digit"] in range(10)
        else:
            assert first.ok and first.content.startswith(f"Image {call['arguments']['image_id']} shows")
            assert batch.verdicts[i]["looked"]
    offered = [c for c, t in zip(batch.calls, batch.tools) if t]
    counts = tool_counts(batch.calls, batch.tools, batch.verdicts)
    assert counts["tool_call_rate"] == (sum(bool(c) for c in offered), len(offered))
    assert counts["valid_call_rate"] == (sum(r.valid for c in offered for r in c), sum(map(len, offered)))
    assert counts["image_verifier"][1] == len(offered) == sum(v is not None for v in batch.verdicts)


def test_reward_model_reads_the_conversation(scored):
    """A reply that called a tool is read as its turns, with the prompt's tools, as the reward stage reads
    conversations; a text prompt's reply as its text."""
    trainer, _, batch = scored
    from pipeline.ppo_tools import conversation
    from pipeline.reward_model import encode

    read = conversation(batch)
    i = next(i for i, c in enumerate(batch.calls) if c and c[0].ok)
    assert read[i][0]["tool_calls"] and read[i][1]["role"] == "tool"
    assert read[i][1]["content"] == batch.calls[i][0].content
    ids = encode(trainer.tokenizer, trainer.prompts[batch.rows[i]]["prompt"], read[i], batch.tools[i])
    assert "# Tools" in trainer.tokenizer.decode(ids) and "<tool_response>" in trainer.tokenizer.decode(ids)
    j = batch.tools.index(None)
    assert read[j] == batch.texts[j]


def test_interrupted_run_resumes_to_the_same_history_images_and_weights(inputs, monkeypatch):
    """4 steps, checkpoints every 2 and images kept every 2 (logging_steps): once straight through, once stopped
    inside step 3 (after its update, before its checkpoint) and resumed by a new trainer (new tools, new image store,
    as a new process). History, the images of step 4 and the weights are equal; the tool statistics are sane."""
    work, tokenizer = inputs
    straight = make_trainer(work, tokenizer, "straight")
    history = straight.train()

    class Stop(Exception):
        pass

    count = {"training": 0}

    def point(name, until=None):
        count[name] = count.get(name, 0) + 1
        if name == "training" and count[name] == 3:
            raise Stop

    stopped = make_trainer(work, tokenizer, "stopped")
    monkeypatch.setattr(faults, "point", point)
    with pytest.raises(Stop):
        stopped.train()
    preemption.STOP.training = False
    monkeypatch.undo()
    assert sorted(p.name for p in (work / "stopped").glob("checkpoint-*")) == ["checkpoint-2"]
    resumed = make_trainer(work, tokenizer, "stopped")
    again = resumed.train()

    def timeless(h):
        return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in h]

    assert [h["step"] for h in again] == [1, 2, 3, 4] and timeless(again) == timeless(history)
    a, b = straight.unwrapped.state_dict(), resumed.unwrapped.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    for run in ("straight", "stopped"):  # images of logged steps only (a folder once a step draws)
        assert {p.name for p in (work / run / "images").iterdir()} <= {"step-2", "step-4"}
    kept = [sorted((work / run / "images" / "step-4").iterdir()) for run in ("straight", "stopped")]
    assert [p.name for p in kept[0]] == [p.name for p in kept[1]] and any(p.suffix == ".png" for p in kept[0])
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(*kept))
    drawn = [json.loads(line) for line in (work / "straight/images/step-4/images.jsonl").read_text().splitlines()]
    assert drawn and all(d["tool"] == "draw_image" and d["prompt"] == "a large 7" for d in drawn)
    assert [d["id"] for d in drawn] == [str(201 + k) for k in range(len(drawn))]  # after the gallery, per step

    # three in four tool prompts are forced to call, one in three forced calls is refused: over the run, shares
    # within those bounds (a step holds 8 of the 16 prompts at random; a sampled later turn may call too)
    for key in ("tool_call_rate", "valid_call_rate", "tool_error_rate", "image_verifier", "verifier"):
        assert all(0 <= row[key] <= 1 for row in history if key in row), key
    assert all(row["tool_calls"] >= row["tool_call_rate"] for row in history)
    calls, valid = (sum(r[k] for r in history) / len(history) for k in ("tool_call_rate", "valid_call_rate"))
    assert 0.5 <= calls and 0.3 <= valid < 1 and all(r.get("tool_error_rate", 0) == 0 for r in history)
    metrics = ppo.summarise(history, "ppo")
    assert {"image_verifier_start", "tool_call_rate_end", "valid_call_rate_end"} <= set(metrics)


def test_a_call_to_a_tool_the_prompt_does_not_offer_is_refused():
    ran = []
    schema = {"type": "function", "function": {"name": "echo", "description": "echo",
                                               "parameters": {"type": "object", "properties": {}}}}
    box = ToolBox([Tool("echo", schema, lambda args: ran.append(args) or "hi"),
                   Tool("other", {**schema, "function": {**schema["function"], "name": "other"}}, lambda a: "x")])
    offered = OfferedTools(box, [schema])
    result = offered.call(ToolCall("other", {}, "", None))
    assert (result.valid, result.ok) == (False, False) and "unknown tool 'other'" in result.content
    assert offered.call(ToolCall("echo", {}, "", None)).content == "hi" and ran == [{}]
    assert offered.schemas() == [schema]


# ---------------------------------------------------------------------------------------------- GRPO through TRL


def force_first_calls(cls, tokenizer):
    """As force_calls, for TRL's generate (a class-level patch: TRL loads the policy itself): the first turn on a read
    task reads its image, on a draw task draws "a large 7"."""
    original, eos = cls.generate, tokenizer.eos_token_id

    def generate(self, input_ids, attention_mask, **kw):
        targets = []
        for ids, att in zip(input_ids, attention_mask):
            text = tokenizer.decode(ids[att.bool()], skip_special_tokens=False)
            if "<tool_response>" in text or "<tools>" not in text:
                targets.append(None)
                continue
            read = re.search(r"image (\d+)", text.split("<|im_start|>user")[-1])
            call = ({"name": "read_image", "arguments": {"image_id": read.group(1)}} if read else
                    {"name": "draw_image", "arguments": {"prompt": "a large 7"}})
            targets.append(tokenizer(call_text(call), add_special_tokens=False)["input_ids"] + [eos])
        processors = LogitsProcessorList([ForceCalls(input_ids.shape[1], targets)])
        return original(self, input_ids=input_ids, attention_mask=attention_mask, logits_processor=processors, **kw)

    return generate


def test_grpo_with_tools_masks_tool_results_and_logs_the_tool_statistics(inputs, monkeypatch):
    """TRL's GRPOTrainer with the recipe's tools (pipeline/trl_tools.py) on the tool tasks, first calls forced: the
    loss mask TRL builds is 0 exactly on the tool turns' tokens (their text is the tool messages) and 1 on the calls;
    the tool statistics and the tool tasks' gold score are logged; the drawn images of logged steps are kept."""
    from trl import GRPOTrainer

    from pipeline import trl_online

    work, tokenizer = inputs
    rows = [json.loads(line) for line in (work / "prompts.jsonl").read_text().splitlines()][8:]
    write_jsonl(work / "tool_prompts.jsonl", rows)
    recipe = load_recipe(tool_recipe(work), ["ppo.algorithm=grpo", "ppo.num_generations=4", "ppo.max_steps=2",
                                             "ppo.logging_steps=1", "ppo.max_total_tokens=160",
                                             f"ppo.prompts={work / 'tool_prompts.jsonl'}"])
    keys, cfg = recipe.keys("ppo"), recipe.trainer_config("ppo")
    prompts = judges.with_answers(ppo.load_prompts(keys.prompts, recipe), keys.prompts, required=False)
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "generate", force_first_calls(LlamaForCausalLM, tokenizer))
    seen = []
    compute_loss = GRPOTrainer._compute_loss
    monkeypatch.setattr(GRPOTrainer, "_compute_loss",
                        lambda self, model, batch: seen.append(batch) or compute_loss(self, model, batch))
    history, _ = trl_online.train_trl(recipe, Run(work / "grpo"), cfg, keys, recipe.peft_values("ppo"), prompts,
                                      runs.Checkpoint("policy", str(work / "policy"), "", "local"),
                                      [runs.Checkpoint("rm", str(work / "rm"), "", "local")])

    checked = 0
    for batch in seen:
        for ids, done, tool in zip(batch["completion_ids"], batch["completion_mask"], batch["tool_mask"]):
            ids, done, tool = ids.tolist(), done.tolist(), tool.tolist()
            out = [i for i, d, t in zip(ids, done, tool) if d and not t]
            if not out:
                continue
            text = tokenizer.decode(out, skip_special_tokens=False)
            assert re.fullmatch(r"(\n<\|im_start\|>tool\n<tool_response>\n[^<]*\n</tool_response><\|im_end\|>"
                                r"\n<\|im_start\|>assistant\n)+", text), text
            kept = tokenizer.decode([i for i, d, t in zip(ids, done, tool) if d and t], skip_special_tokens=False)
            assert re.match(r"<tool_call>\n\{.*\}\n</tool_call><\|im_end\|>", kept), kept  # forced, then sampled
            checked += 1
    assert checked >= 4
    assert [h["step"] for h in history] == [1, 2]
    for h in history:
        assert h["tool_call_rate"] == 1.0 and h["valid_call_rate"] == 1.0 and h["tool_calls"] >= 1
        assert 0 <= h["image_verifier"] <= 1 and h["tool_error_rate"] == 0
    assert {p.name for p in (work / "grpo" / "images").iterdir()} <= {"step-1", "step-2"}
    assert list((work / "grpo" / "images").rglob("*.png"))


def test_grpo_with_tools_refuses_what_trl_cannot_run(inputs):
    work = inputs[0]
    from pipeline.trl_tools import check_grpo_tools

    for algorithm, expected in (("grpo", "row 1 offers no tools: with algorithm grpo every prompt"),
                                ("rloo", "TRL's RLOOTrainer runs no tools")):
        recipe = load_recipe(tool_recipe(work), [f"ppo.algorithm={algorithm}"])
        keys, cfg = recipe.keys("ppo"), recipe.trainer_config("ppo")
        with pytest.raises(PipelineError, match=expected):
            check_grpo_tools(recipe, cfg, keys, ppo.load_prompts(keys.prompts, recipe))


# ---------------------------------------------------------------------------------------------- command lines


def test_stage_with_tools_at_the_command_line(inputs):
    """The stage script with a tools section: the tools and the image judge are inputs of its manifest, the tool
    statistics are in its history (a random policy seldom calls)."""
    work = inputs[0]
    proc = run_cli(["pipeline/ppo.py", tool_recipe(work), "run.name=cli", "ppo.max_steps=1", "ppo.max_new_tokens=8"],
                   cwd=work, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = work / "runs/cli/ppo"
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"tools.draw_image", "tools.read_image", "image_judge"} <= set(manifest["inputs"]["checkpoints"])
    assert manifest["inputs"]["settings"]["tools"]["world_gallery"] is True
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert 0 <= history[0]["tool_call_rate"] <= 1
    assert "8 of 16 prompts offer tools (8 tool tasks" in proc.stdout + proc.stderr
    # --check names the image judge's folder (an image classifier, not described as a language model)
    check = run_cli(["pipeline/run.py", tool_recipe(work), "run.name=cli", "--check", "--only", "ppo"], cwd=work,
                    env=ENV)
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
    assert f"image_judge: {work / 'diffusion'} (image judge: {work / 'diffusion' / 'judge'})" in check.stdout


@pytest.mark.parametrize("case", ["unknown tool", "rloo", "no tools"])
def test_bad_tool_input_exits_2_with_one_line_and_writes_nothing(inputs, case):
    work = inputs[0]
    override, expected = {
        "unknown tool": (f"tools.tools=[{{name: read_image, backend: image_judge, source: {work / 'diffusion'}}}]",
                         "row 9 offers the tool 'draw_image', which the recipe's `tools` section does not have"),
        "rloo": ("ppo.algorithm=rloo", "ppo.algorithm=rloo with tools"),
        "no tools": ("tools.tools=[]", "ppo.image_verifier_weight rewards tool tasks"),
    }[case]
    proc = run_cli(["pipeline/ppo.py", tool_recipe(work), "run.name=bad", override, "ppo.image_verifier_weight=1.0"],
                   cwd=work, env=ENV)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert expected in proc.stderr.strip().splitlines()[-1]
    assert not (work / "runs/bad").exists()


def test_a_template_that_renders_tools_without_a_response_schema_exits_2(inputs):
    """A policy kept in its own chat format (tokenizer.chat_template: own) that renders tools, with no response schema
    saved and none in TRL's registry: every call it wrote read as a final answer; now the stage stops at start (one
    line) and --check warns."""
    import shutil

    from transformers import AutoTokenizer

    from test_tool_formats import MISTRAL_TEMPLATE

    work = inputs[0]
    user = work / "policy-own-format"
    shutil.copytree(work / "policy", user, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(user)
    tok.chat_template, tok.response_template = MISTRAL_TEMPLATE, None
    tok.save_pretrained(user)
    args = [tool_recipe(work), "run.name=own", f"ppo.init_from={user}", "tokenizer.chat_template=own"]
    proc = run_cli(["pipeline/ppo.py", *args], cwd=work, env=ENV)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert f"the tokenizer of {user} has a chat template that renders tools but no response schema" in last
    assert not (work / "runs/own").exists()
    check = run_cli(["pipeline/run.py", *args, "--check", "--only", "ppo"], cwd=work, env=ENV)
    assert "warning: ppo.init_from: the tokenizer of" in check.stdout, check.stdout[-2000:]


def test_offered_tools_batch_the_calls_they_offer_and_refuse_the_others():
    """A prompt's offered tools pass its calls to the ToolBox's batch (the image tool draws a round's calls at
    once); a call to a tool the prompt does not offer never reaches the ToolBox."""
    ran = []
    batches = []

    def run_batch(batch):
        batches.append([a["x"] for a in batch])
        return [str(a["x"] * 2) for a in batch]

    schema = {"type": "function", "function": {"name": "double", "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}
    other = {"type": "function", "function": {"name": "other", "parameters": {"type": "object", "properties": {}}}}
    box = ToolBox([Tool("double", schema, lambda a: ran.append(a) or str(a["x"] * 2), run_batch=run_batch),
                   Tool("other", other, lambda a: ran.append(a) or "ran")])
    offered = OfferedTools(box, [schema])
    results = offered.call_many([ToolCall("double", {"x": 1}, "", None), ToolCall("other", {}, "", None),
                                 ToolCall("double", {"x": 3}, "", None)])
    assert [r.content for r in results[::2]] == ["2", "6"] and batches == [[1, 3]]
    assert results[1].valid is False and "unknown tool 'other'" in results[1].error and ran == []
