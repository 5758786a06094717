"""Tests of the tool tasks (pipeline/tool_world.py): the old splits untouched, determinism, held-out disjointness,
demonstrator and annotator rates, the chat template's assistant mask, loading, the verifier and the annotator."""

import hashlib
import json
import random
import re
from dataclasses import replace
from types import SimpleNamespace

import pytest

from pipeline import data, images, tool_world as tw, world
from pipeline.cli import PipelineError
from pipeline.world import TEXT_SPLITS, TOOL_SPLITS, WorldConfig
from pipeline.world_splits import build_split, split_stats

CFG = WorldConfig()
SMALL = dict(seed=3, n_pretrain_docs=300, n_sft=200, n_sft_eval=20, n_preference=200, n_preference_eval=40, n_eval=40)
TRAIN_SPLITS = ("tool_sft", "tool_sft_eval", "tool_preference", "tool_preference_eval")


@pytest.fixture(scope="module")
def splits():
    return {s: build_split(CFG, s) for s in TOOL_SPLITS}


def _user(row) -> str:
    msgs = row["messages"] if "messages" in row else row["prompt"]
    return next(m["content"] for m in msgs if m["role"] == "user")


def _calls(messages):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"]))
            for m in messages for c in m.get("tool_calls") or []]


def _digest(rows) -> str:
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ the text world


def test_old_splits_unchanged():
    # digests of the text splits taken before the tool world existed (commit 2fc5aba)
    before = {
        "default": {"pretrain": "240a48935baafa6c", "sft": "7116fc2bb6c2dbfc", "sft_eval": "44e42f2ac715a1d2",
                    "preference": "e224d08ad2a42bdd", "preference_eval": "c4273fca049b0b80", "eval": "84cb896182410cd3"},
        "small": {"pretrain": "31881667de6ee656", "sft": "cab9db7abea43b01", "sft_eval": "430bc0c6e0396708",
                  "preference": "1ac9f3f2376e3248", "preference_eval": "578f0e51867c96c6", "eval": "a3cebf612281cdaa"},
    }
    for name, cfg in (("default", CFG), ("small", WorldConfig(**SMALL))):
        assert {s: _digest(build_split(cfg, s)) for s in TEXT_SPLITS} == before[name], name


def test_deterministic_seeded_and_checked():
    small = WorldConfig(n_tool_sft=60, n_tool_sft_eval=20, n_tool_preference=60, n_tool_preference_eval=20,
                        n_tool_eval=60)
    for split in TOOL_SPLITS:
        a = build_split(small, split)
        assert a == build_split(replace(small), split), split
        assert a != build_split(replace(small, seed=1), split), split
    assert [len(build_split(small, s)) for s in TOOL_SPLITS] == [60, 20, 60, 20, 60]
    with pytest.raises(ValueError):
        build_split(WorldConfig(tool_demo_error_rate=1.5), "tool_sft")


# ------------------------------------------------------------------------------------------------ gallery, tasks


def test_tool_schemas():
    assert [t["function"]["name"] for t in tw.TOOL_SCHEMAS] == ["draw_image", "read_image"]
    for t in tw.TOOL_SCHEMAS:
        assert t["type"] == "function" and set(t["function"]) == {"name", "description", "parameters"}
        assert len(t["function"]["description"]) < 60
    assert json.loads(tw.TOOLS_JSON) == tw.TOOL_SCHEMAS


class FakeStore:
    """What verify and register_gallery need of pipeline/tools.py's ImageStore, backed by a dict."""

    def __init__(self):
        self.images, self.metas = {}, {}

    def add(self, image, meta, image_id):
        self.images[image_id], self.metas[image_id] = image, meta
        return image_id

    def get(self, image_id):
        return self.images[image_id]


def test_gallery():
    cells = [tuple(tw.gallery_truth(str(i)).values()) for i in range(1, tw.GALLERY_SIZE + 1)]
    counts = {c: cells.count(c) for c in set(cells)}
    assert len(counts) == 80 and set(counts.values()) == {2, 3}  # every digit x combination, 2 or 3 times
    assert cells[:10] != sorted(cells[:10])  # shuffled: an id says nothing about its image
    with pytest.raises(PipelineError):
        tw.gallery_truth("0")
    store = FakeStore()
    ids = tw.register_gallery(store)
    assert ids == [str(i) for i in range(1, tw.GALLERY_SIZE + 1)]
    for image_id in ("1", "77", "200"):
        img, truth = store.get(image_id), store.metas[image_id]
        assert tuple(img.shape) == (1, 16, 16) and 0 <= float(img.min()) and float(img.max()) <= 1
        assert truth == {"source": "gallery", **tw.gallery_truth(image_id)}
        left, right = float(img[..., :8].sum()), float(img[..., 8:].sum())
        assert (left > right) == (truth["position"] == "left")
    big = tw.gallery(resolution=32)
    assert tuple(big[0][1].shape) == (1, 32, 32) and big[0][2] == tw.gallery_truth("1")


def test_task_definitions():
    key = ("draw", 7, "large", "thin", "left")
    assert tw.answer(key) == "a large thin 7 on the left" and tw.mistake(key) == "a large thin 7"
    assert tw.is_hard(key) and not tw.is_hard(("draw", 7, "large", None, None))
    assert tw.answer(("draw_sum", 3, 4, "large", None, None)) == "a large 7"
    assert tw.mistake(("draw_sum", 3, 4, "large", None, None)) == "a large 3"
    assert not tw.is_hard(("draw_sum", 2, 4, None, None, None)) and not tw.is_hard(("draw_sum", 7, 0, None, None, None))
    read = ("read", "12")
    assert tw.answer(read) == str(tw.gallery_truth("12")["digit"]) and tw.mistake(read) == "2"
    assert tw.expect(read) == {"image_id": "12", "answer": tw.answer(read)}
    assert tw.expect(("draw_sum", 3, 4, "large", None, "left")) == {"caption": "a large 7 on the left", "digit": 7,
                                                                     "size": "large", "position": "left"}
    assert tw.prompt(("draw_sum", 3, 4, "large", None, None), 0) == "Draw the sum of 3 and 4, large."
    assert tw.prompt(("draw", 7, "large", "thin", None), 1) == "Please draw the digit 7, large, thin."
    # every phrasing reads back as its key; the text world's prompts are not tool tasks
    rng = random.Random(0)
    for kind in tw.KINDS:
        for _ in range(300):
            key = tw.sample_key(kind, rng)
            for k in range(3):
                assert tw.task_key(tw.prompt(key, k)) == key, tw.prompt(key, k)
    assert tw.task_key("What is 3 + 4?") is None and tw.task_key("Add 3 and 4.") is None


def test_read_result_is_the_judge_phrase():
    assert tw.read_result_text("12", {"digit": 4, "size": "small", "thickness": "thick", "position": "right",
                                      "p": {}}) == "Image 12 shows a small thick 4 on the right."


# ------------------------------------------------------------------------------------------------ held-out


def test_heldout_only_in_tool_eval(splits):
    eval_keys = [tw.task_key(_user(r)) for r in splits["tool_eval"]]
    assert None not in eval_keys and all(tw.is_heldout(k) for k in eval_keys)
    assert len(set(eval_keys)) == len(eval_keys)
    # the held-out draw tasks are the image world's held-out captions, every one of them
    assert {k[1:] for k in eval_keys if k[0] == "draw"} == images.heldout_combos()
    held_sums = {(min(k[1], k[2]), max(k[1], k[2])) for k in eval_keys if k[0] == "draw_sum"}
    assert {p for p in held_sums if world.is_heldout(("add", *p))}  # held-out additions of the text world
    held_ids = {str(i) for i in range(1, tw.GALLERY_SIZE + 1) if tw.is_heldout_image(str(i))}
    assert 50 < len(held_ids) < 100
    held_captions = images.heldout_captions()
    for split in TRAIN_SPLITS:
        for r in splits[split]:
            key = tw.task_key(_user(r))
            assert key is not None and not tw.is_heldout(key), (split, _user(r))
            text = json.dumps(r)
            assert not any(c in text for c in held_captions), text  # not even in a tool message
            ids = {a or b for a, b in re.findall(r"image_id\W+(\d+)|[Ii]mage (\d+)", text)}
            assert not ids & held_ids, (split, ids & held_ids)


# ------------------------------------------------------------------------------------------------ sft / preference


def test_sft_rows_and_demonstrator_rates(splits):
    rows = splits["tool_sft"]
    assert {r["kind"] for r in rows} == set(tw.KINDS)
    by = {}
    for r in rows:
        key = tw.task_key(_user(r))
        msgs, calls = r["messages"], _calls(r["messages"])
        assert r["kind"] == key[0] and r["hard"] == tw.is_hard(key) and r["tools"] == tw.TOOLS_JSON
        assert r["called"] == bool(calls)
        if calls:
            assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "assistant"]
            name, args = calls[0]
            said = args["prompt"] if name == "draw_image" else world.extract_answer(msgs[-1]["content"])
            assert msgs[2]["name"] == name
            if name == "read_image":
                assert args == {"image_id": key[1]}
                assert msgs[2]["content"] == tw.read_result_text(key[1], tw.gallery_truth(key[1]))
            else:
                image_id = re.fullmatch(r"Drew image (\d+)\.", msgs[2]["content"])[1]
                assert int(image_id) > tw.GALLERY_SIZE and image_id in msgs[3]["content"]
        else:
            assert key[0] == "read" and [m["role"] for m in msgs] == ["user", "assistant"]
            said = world.extract_answer(msgs[1]["content"])
        assert said in (tw.answer(key), tw.mistake(key))
        assert r["correct"] == (said == tw.answer(key))
        by.setdefault((key[0], r["hard"]), []).append(r)
    for kind in ("draw", "draw_sum"):
        hard_err = 1 - sum(r["correct"] for r in by[kind, True]) / len(by[kind, True])
        assert abs(hard_err - CFG.tool_demo_error_rate) < 0.08, kind
        assert all(r["correct"] for r in by[kind, False])
    reads = by["read", True] + by["read", False]
    assert abs(1 - sum(r["called"] for r in reads) / len(reads) - CFG.tool_demo_guess_rate) < 0.07
    st = split_stats(CFG, "tool_sft", rows)
    assert st["rows"] == CFG.n_tool_sft and 0.5 < st["correct_share"] < 0.7


def test_preference_rows(splits):
    rows = splits["tool_preference"]
    for r in rows:
        key = tw.task_key(_user(r))
        assert r["hard"] == tw.is_hard(key) and len(r["chosen"]) == len(r["rejected"]) == 1
        assert r["skill"] == f"tool_{key[0]}" and r["skill"] not in world.SKILLS  # the reward's per-skill table
        good, bad = (r["chosen"][0], r["rejected"][0]) if r["clean_agrees"] else (r["rejected"][0], r["chosen"][0])
        if r["turn"] == "final":
            assert key[0] == "read" and [m["role"] for m in r["prompt"]] == ["user", "assistant", "tool"]
            assert world.extract_answer(good["content"]) == tw.answer(key) != world.extract_answer(bad["content"])
            continue
        assert [m["role"] for m in r["prompt"]] == ["user"]
        name = "read_image" if key[0] == "read" else "draw_image"
        arg = {"image_id": key[1]} if key[0] == "read" else {"prompt": tw.answer(key)}
        assert _calls([good]) == [(name, arg)] and _calls([bad]) != [(name, arg)]
        if r["hard"]:  # the wrong turn is the demonstrator's systematic mistake
            wrong = world.extract_answer(bad["content"]) if key[0] == "read" else _calls([bad])[0][1]["prompt"]
            assert wrong == tw.mistake(key)
    assert abs(sum(r["clean_agrees"] for r in rows) / len(rows) - (1 - CFG.label_noise)) < 0.03
    assert abs(sum(r["hard"] for r in rows) / len(rows) - CFG.pref_hard_share) < 0.04
    assert {r["turn"] for r in rows} == {"call", "final"}


def test_eval_rows(splits):
    rows = splits["tool_eval"]
    assert [r["id"] for r in rows] == [f"tool-eval-{i:04d}" for i in range(1, len(rows) + 1)]
    assert len(rows) == CFG.n_tool_eval and sum(r["kind"] == "draw" for r in rows) == 20
    for r in rows:
        key = tw.task_key(_user(r))
        assert r["expect"] == tw.expect(key) and r["hard"] == tw.is_hard(key) and len(r["prompt"]) == 1


# ------------------------------------------------------------------------------------------------ chat template


def test_demonstrations_render_with_tools_and_mask_only_the_assistant(splits):
    from pipeline.tokenizer import train_tokenizer

    rows = splits["tool_sft"][:200]
    tok = train_tokenizer([json.dumps(r["messages"]) for r in rows], vocab_size=400)
    row = next(r for r in rows if r["kind"] == "draw" and r["called"])
    tools = json.loads(row["tools"])
    text = tok.apply_chat_template(row["messages"], tools=tools, tokenize=False)
    assert '"name": "draw_image"' in text.split("<|im_end|>")[0]  # the schemas in the system turn
    out = tok.apply_chat_template(row["messages"], tools=tools, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs, cur = runs + [cur], []
    runs += [cur] if cur else []
    prompt = json.loads(row["messages"][1]["tool_calls"][0]["function"]["arguments"])["prompt"]
    assert [tok.decode(r) for r in runs] == [
        '<tool_call>\n{"name": "draw_image", "arguments": {"prompt": "' + prompt + '"}}\n</tool_call><|im_end|>',
        row["messages"][3]["content"] + "<|im_end|>"]
    assert row["messages"][2]["content"] not in "".join(tok.decode(r) for r in runs)  # the tool's reply is not trained


# ------------------------------------------------------------------------------------------------ loading


@pytest.fixture()
def recipe(tmp_path):
    from conftest import tiny_recipe

    from pipeline.recipe import load_recipe

    return load_recipe(tiny_recipe(tmp_path, world={"n_tool_sft": 60, "n_tool_sft_eval": 10, "n_tool_preference": 60,
                                                    "n_tool_preference_eval": 10, "n_tool_eval": 30}))


def test_rows_pass_the_loaders(recipe):
    import torch

    from pipeline.preferences import load_preferences

    sft = data.load("world:tool_sft", "chat", recipe)
    assert len(sft) == 60 and json.loads(sft[0]["tools"]) == tw.TOOL_SCHEMAS
    assert {"kind", "hard", "correct", "called"} <= set(sft.column_names)
    pairs, info = load_preferences("world:tool_preference", recipe)
    assert info["pairs"] == 60 and info["conversational"] and json.loads(pairs[0]["tools"]) == tw.TOOL_SCHEMAS
    for kind in ("eval_prompts", "prompts"):
        ev = data.load("world:tool_eval", kind, recipe)
        assert len(ev) == 30 and {"expect", "kind", "tools"} <= set(ev.column_names)
    # through Arrow every `expect` has every key (None where a kind has none): the verifier reads them alike
    for row in ev:
        exp = row["expect"]
        if row["kind"] == "read":
            assert tw.verify(row, [], f"The answer is {exp['answer']}.")["correct"]
        else:
            reading = {"digit": exp["digit"], **{p: exp[p] or tw.PROPERTIES[p][0] for p in tw.PROPS}}
            store = FakeStore()
            store.add(torch.zeros(1, 16, 16), {}, "d1")
            assert tw.verify(row, [_result("draw_image", {"prompt": exp["caption"]}, image="d1")], "",
                             FakeJudge(reading), store)["correct"]
    # mixed with a text split, tool rows keep their tools whichever row comes first
    mixed = data.load({"world:sft": 0.5, "world:tool_sft": 0.5}, "chat", recipe)
    tools = [t for t, m in zip(mixed["tools"], mixed["messages"]) if any(x.get("tool_calls") for x in m)]
    assert tools and all(t == tw.TOOLS_JSON for t in tools)
    assert data.fingerprint("world:tool_sft", recipe) != data.fingerprint("world:sft", recipe)


# ------------------------------------------------------------------------------------------------ verifier


class FakeJudge:
    def __init__(self, reading):
        self.reading, self.seen = reading, []

    def predict(self, batch):
        self.seen.append(batch)
        return [dict(self.reading) for _ in range(len(batch))]


def _result(name, arguments, ok=True, valid=True, image=None):
    return SimpleNamespace(name=name, arguments=arguments, valid=valid, ok=ok, image=image)


def _draw_row(key):
    return {"kind": key[0], "expect": tw.expect(key)}


def test_verify_draw_judges_the_image_actually_drawn():
    import torch

    store = FakeStore()
    store.add(torch.zeros(1, 16, 16), {}, "d1")
    store.add(torch.ones(1, 16, 16), {}, "d2")
    seven = {"digit": 7, "size": "large", "thickness": "thin", "position": "left", "p": {}}
    row = _draw_row(("draw_sum", 3, 4, "large", None, "left"))
    results = [_result("draw_image", {"prompt": "a 3"}, image="d1"), _result("draw_image", {"prompt": "a large 7"},
                                                                                image="d2"),
               _result("draw_image", '{"prompt": "a 9"}', ok=False)]
    judge = FakeJudge(seven)
    v = tw.verify(row, results, "Here is image d2.", judge, store)
    assert v["correct"] and v["image"] == "d2" and v["read"] == seven and v["calls"] == 3 and v["valid_calls"] == 3
    assert float(judge.seen[0].mean()) == 1.0 and tuple(judge.seen[0].shape) == (1, 1, 16, 16)
    # a property asked for and read otherwise: wrong; one not asked for: ignored
    assert not tw.verify(row, results, "", FakeJudge({**seven, "position": "right"}), store)["correct"]
    assert tw.verify(row, results, "", FakeJudge({**seven, "thickness": "thick"}), store)["correct"]
    assert not tw.verify(row, results, "", FakeJudge({**seven, "digit": 3}), store)["correct"]
    # nothing drawn: wrong, without asking the judge
    none = tw.verify(row, [_result("draw_image", {}, ok=False, valid=False)], "Here is image 5.", None, None)
    assert none == {"correct": False, "called": True, "calls": 1, "valid_calls": 0, "image": None, "read": None}
    with pytest.raises(PipelineError):
        tw.verify(row, results, "", None, store)


def test_verify_read():
    key = ("read", "12")
    row = {"kind": "read", "expect": tw.expect(key)}
    digit = tw.answer(key)
    wrong = str((int(digit) + 1) % 10)
    looked = [_result("read_image", {"image_id": "12"})]
    v = tw.verify(row, looked, f"The answer is {digit}.")
    assert v["correct"] and v["called"] and v["looked"] and v["image"] is None
    assert not tw.verify(row, looked, f"The answer is {wrong}.")["correct"]
    assert not tw.verify(row, looked, f"It is {digit}.")["correct"]  # no answer in the fixed form
    guess = tw.verify(row, [], f"The answer is {digit}.")  # a right guess counts; `looked` says it was one
    assert guess["correct"] and not guess["called"] and not guess["looked"]
    assert not tw.verify(row, [_result("read_image", {"image_id": "13"})], "")["looked"]
    # a row without `expect`: read from its prompt
    assert tw.verify({"prompt": [{"role": "user", "content": "Which digit is in image 12?"}]}, looked,
                     f"The answer is {digit}.")["correct"]
    with pytest.raises(PipelineError):
        tw.verify({"prompt": "What is 3 + 4?"}, [], "")


def test_annotator_prefers_tool():
    key = ("read", "12")
    row = {"kind": "read", "expect": tw.expect(key)}
    digit = tw.answer(key)
    wrong = str((int(digit) + 1) % 10)
    call = _result("read_image", {"image_id": "12"})
    bad_call = _result("read_image", {"id": 12}, valid=False, ok=False)
    right = {"results": [call], "text": f"The answer is {digit}."}
    wordy = {"results": [call], "text": f"I looked at it. The answer is {digit}."}
    invalid_first = {"results": [bad_call, call], "text": f"The answer is {digit}."}
    twice = {"results": [call, call], "text": f"The answer is {digit}."}
    wrong_ = {"results": [call], "text": f"The answer is {wrong}."}
    order = [right, wordy, twice, invalid_first, wrong_]  # correct > fewer invalid calls > fewer calls > fewer words
    for i, a in enumerate(order):
        for b in order[i + 1:]:
            assert tw.annotator_prefers_tool(row, a, b) == 0 and tw.annotator_prefers_tool(row, b, a) == 1
    # draw rollouts carry the verifier's verdict (the judge's reading of the drawn image)
    yes = {"results": [], "text": "", "verdict": {"correct": True, "calls": 1, "valid_calls": 1}}
    no = {"results": [], "text": "", "verdict": {"correct": False, "calls": 1, "valid_calls": 1}}
    assert tw.annotator_prefers_tool(_draw_row(("draw", 7, None, None, None)), no, yes) == 1
    rng = random.Random(0)
    flips = sum(tw.annotator_prefers_tool(row, right, wrong_, rng=rng, noise=0.2) for _ in range(2000))
    assert 0.16 < flips / 2000 < 0.24


def test_text_and_tool_pairs_mixed_survive_trls_prompt_plus_reply_map(tmp_path):
    """TRL's reward and DPO trainers write prompt + chosen back into `chosen` inside `Dataset.map`; with text pairs
    first and tool pairs after (a list of specs), the messages of every column must share one type or the map
    fails ("Couldn't cast ... to null": a tool call in a column that never had one)."""
    from pipeline import preferences
    from pipeline.recipe import load_recipe

    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("world: {n_preference: 1200, n_tool_preference: 60}\n")
    ds = preferences.load_preferences(["world:preference", "world:tool_preference"], load_recipe(recipe_file))
    ds = ds[0] if isinstance(ds, tuple) else ds
    assert {"prompt", "chosen", "rejected"} <= set(ds.column_names)
    assert ds.features["prompt"] == ds.features["chosen"] == ds.features["rejected"]

    def as_trl_does(example):
        example["chosen"] = example["prompt"] + example["chosen"]
        example["rejected"] = example["prompt"] + example["rejected"]
        return {"turns": len(example["chosen"])}

    mapped = ds.map(as_trl_does)
    with_call = [m for m in mapped["chosen"] if any(x.get("tool_calls") for x in m)]
    assert len(mapped) == len(ds) and with_call  # tool calls survived in the concatenated conversations
