"""Tests of the synthetic world: determinism, verifier, held-out disjointness, demonstrator and annotator rates."""

import random
from dataclasses import replace

import pytest

from pipeline import world
from pipeline.world import (SKILLS, SPLITS, STYLE_PREFIXES, WorldConfig, annotator_prefers, extract_answer,
                            find_keys, is_hard, is_heldout, prompt_key, reply_quality, solve, systematic_mistake,
                            verify)
from pipeline.world_splits import build_split, split_stats

CFG = WorldConfig()


@pytest.fixture(scope="module")
def splits():
    return {s: build_split(CFG, s) for s in SPLITS}


def _user(row):
    msgs = row["messages"] if "messages" in row else row["prompt"]
    return [m for m in msgs if m["role"] == "user"][-1]["content"]


def _assistant(row):
    return row["messages"][-1]["content"]


# ------------------------------------------------------------------------------------------------ determinism


def test_sizes(splits):
    assert len(splits["pretrain"]) == CFG.n_pretrain_docs
    assert len(splits["sft"]) == CFG.n_sft
    assert len(splits["sft_eval"]) == CFG.n_sft_eval
    assert len(splits["preference"]) == CFG.n_preference
    assert len(splits["preference_eval"]) == CFG.n_preference_eval
    assert len(splits["eval"]) == CFG.n_eval


def test_deterministic_and_seeded():
    small = WorldConfig(n_pretrain_docs=50, n_sft=50, n_sft_eval=20, n_preference=50, n_preference_eval=20,
                        n_eval=50)
    for split in SPLITS:
        a, b = build_split(small, split), build_split(replace(small), split)
        assert a == b, split
        c = build_split(replace(small, seed=1), split)
        assert a != c, split


def test_split_settings_are_exactly_what_each_split_reads():
    """SPLIT_SETTINGS (a `world:` dataset's fingerprint) names every config field that changes a split's rows, and
    only those: each field is changed in turn and the rows compared."""
    from dataclasses import fields

    from pipeline.world_splits import SPLIT_SETTINGS

    base = WorldConfig(**{f.name: 40 for f in fields(WorldConfig) if f.name.startswith("n_")})
    changed = {f.name: (["add", "sort"] if f.name == "skills" else getattr(base, f.name) + 7 if f.type in ("int", int)
                        else round((getattr(base, f.name) + 0.4) % 1, 2)) for f in fields(WorldConfig)}
    for split in SPLITS:
        rows = build_split(base, split)
        reads = {name for name, value in changed.items() if build_split(replace(base, **{name: value}), split) != rows}
        assert reads == set(SPLIT_SETTINGS[split]), split


def test_unknown_split_and_skill():
    with pytest.raises(ValueError):
        build_split(CFG, "nope")
    with pytest.raises(ValueError):
        build_split(WorldConfig(skills=["add", "multiply"]), "sft")
    with pytest.raises(ValueError):
        build_split(WorldConfig(label_noise=1.5), "preference")


def test_skill_subset():
    rows = build_split(WorldConfig(skills=["reverse"], n_sft=30), "sft")
    assert {r["skill"] for r in rows} == {"reverse"}


# ------------------------------------------------------------------------------------------------ verifier


def test_problem_definitions():
    assert solve(("add", 7, 5)) == "12" and systematic_mistake(("add", 7, 5)) == "2" and is_hard(("add", 7, 5))
    assert not is_hard(("add", 3, 5)) and systematic_mistake(("add", 3, 5)) == "8"
    assert solve(("compare", 45, 47)) == "47" and systematic_mistake(("compare", 45, 47)) == "45"
    assert not is_hard(("compare", 35, 47))
    assert systematic_mistake(("reverse", ("cat", "dog", "sun", "sky", "pen"))) == "cat dog sun sky pen"
    assert not is_hard(("reverse", ("cat", "dog", "sun")))
    assert solve(("sort", ("cup", "cat", "dog"))) == "cat cup dog"
    assert systematic_mistake(("sort", ("cup", "cat", "dog"))) == "cup cat dog"
    assert not is_hard(("sort", ("cat", "cup", "dog")))  # shares a first letter but the mistake is harmless
    assert solve(("count", ("cat",) * 7)) == "7" and systematic_mistake(("count", ("cat",) * 7)) == "6"


@pytest.mark.parametrize("skill,answer", [("add", "12"), ("compare", "47"), ("reverse", "sun dog cat"),
                                          ("sort", "apple fig pear"), ("count", "5")])
def test_verify_accepts_every_style(skill, answer):
    for style, prefixes in STYLE_PREFIXES.items():
        for i in range(len(prefixes)):
            reply = world.make_reply(answer, style, i)
            assert verify(skill, reply, answer), reply
            assert extract_answer(reply) == answer
    assert verify(skill, f"  the ANSWER is   {answer.upper()} .  ", answer)
    assert verify(skill, f"The answer is 3. No wait, the answer is {answer}.", answer)


@pytest.mark.parametrize("reply", ["Sure! The answer is 13.", "The answer is 1", "Sure!", "", "12",
                                   "answer: 12", "The answer is .", "The answer is 12 13.", "The answer is",
                                   "The answer is 12. Actually the answer is 11.", "asdf qwer answer is zz."])
def test_verify_rejects(reply):
    assert not verify("add", reply, "12")


def test_verify_rejects_wrong_words():
    assert not verify("reverse", "Sure! The answer is cat dog sun.", "sun dog cat")
    assert not verify("reverse", "Sure! The answer is sun dog.", "sun dog cat")
    assert extract_answer(None) is None and extract_answer("no marker here.") is None
    with pytest.raises(ValueError):
        verify("multiply", "The answer is 1.", "1")


@pytest.mark.parametrize("reply, answer", [("The answer is 3.14.", "3.14"), ("The answer is Washington D.C.", "washington d.c"),
                                           ("The answer is: 8", "8"), ("So the answer is **8**.", "8"),
                                           ("The answer is 5.ever.", "5"), ("The answer is\n8", "8"),
                                           ("(The answer is 3.)", "3"), ("The answer is U.S.A.", "u.s.a"),
                                           ("The answer is 1. Sure that is what the answer is.", "1")])
def test_the_final_answer_ends_with_its_sentence(reply, answer):
    """A reference answer is compared with the text after the last "answer is" up to the end of its sentence: the
    point of 3.14 or of D.C. does not end it (it was cut there: '3', 'washington d'), any other period does, and a
    colon or markdown emphasis does not hide it. The judge's exact match (a user's prompts without a world skill)
    reads it so."""
    from pipeline import judges

    assert extract_answer(reply) == answer
    assert judges.is_correct({"answer": answer.upper()}, reply) and not judges.is_correct({"answer": "9"}, reply)


def test_reply_quality_and_annotator():
    good, rude, verbose, wrong = (world.make_reply("8", "polite", 0), world.make_reply("8", "rude", 1),
                                  world.make_reply("8", "verbose", 0), world.make_reply("9", "polite", 0))
    order = [good, verbose, rude, wrong]  # correct > polite > concise
    for i, a in enumerate(order):
        for b in order[i + 1:]:
            assert reply_quality("add", a, "8") > reply_quality("add", b, "8")
            assert annotator_prefers("add", "8", a, b) == 0
            assert annotator_prefers("add", "8", b, a) == 1
    assert annotator_prefers("add", "8", good, good) == 0
    rng = random.Random(0)
    flips = sum(annotator_prefers("add", "8", good, wrong, rng=rng, noise=0.3) for _ in range(2000))
    assert 0.25 < flips / 2000 < 0.35


# ------------------------------------------------------------------------------------------------ held-out


def test_heldout_only_in_eval(splits):
    eval_keys = {prompt_key(_user(r)) for r in splits["eval"]}
    assert None not in eval_keys and all(is_heldout(k) for k in eval_keys)
    assert len(eval_keys) == len(splits["eval"])  # deduplicated by key
    for split in ("sft", "sft_eval", "preference", "preference_eval"):
        keys = [prompt_key(_user(r)) for r in splits[split]]
        assert None not in keys, split
        assert not any(is_heldout(k) for k in keys), split
    eval_prompts = {_user(r) for r in splits["eval"]}
    found = 0
    for row in splits["pretrain"]:
        keys = find_keys(row["text"])
        found += len(keys)
        # the addition table is world knowledge (all of it is stated); other held-out problems never appear
        assert not any(is_heldout(k) and k[0] != "add" for k in keys), row["text"]
        assert not any(p in row["text"] for p in eval_prompts)
    assert found >= 4 * len(splits["pretrain"])  # the scan does recognise the corpus' sentences


def test_heldout_groups_are_symmetric():
    for a in range(10):
        for b in range(10):
            assert is_heldout(("add", a, b)) == is_heldout(("add", b, a))
    ws = ("cat", "dog", "sun", "sky")
    assert is_heldout(("reverse", ws)) == is_heldout(("reverse", ws[::-1]))
    assert is_heldout(("sort", ws)) == is_heldout(("sort", tuple(sorted(ws))))


def test_pretrain_has_addition_table_and_no_markup(splits):
    text = " ".join(r["text"] for r in splits["pretrain"])
    for a in range(10):
        for b in range(10):
            assert any(f.format(a=a, b=b, ans=a + b) in text for f in world.FACTS["add"]), (a, b)
    assert "<|" not in text and "assistant:" not in text.lower()
    assert all(len(r["text"].split(". ")) >= 4 for r in splits["pretrain"][:200])


def test_pretrain_facts_correct(splits):
    for row in splits["pretrain"][:500]:
        for skill, rx in world._FACT_RES:
            for m in rx.finditer(row["text"]):
                key = world._key_from_match(skill, m)
                assert key is not None and m["ans"] == solve(key), m.group(0)
        # every reply in the corpus is correct: each "The answer is" follows its question
        for skill, rx in world._PROMPT_RES:
            for m in rx.finditer(row["text"]):
                rest = row["text"][m.end():]
                i = rest.index("The answer is")
                ans = extract_answer(rest[:rest.index(".", i) + 1])
                assert ans == solve(world._key_from_match(skill, m)), m.group(0)


# ------------------------------------------------------------------------------------------------ sft / preference


def test_sft_rows(splits):
    rows = splits["sft"]
    for r in rows[:300]:
        roles = [m["role"] for m in r["messages"]]
        assert roles in (["user", "assistant"], ["system", "user", "assistant"])
        key = prompt_key(_user(r))
        assert r["skill"] == key[0] and r["hard"] == is_hard(key)
        assert r["correct"] == verify(r["skill"], _assistant(r), solve(key))
        if not r["correct"] and r["hard"]:
            assert verify(r["skill"], _assistant(r), systematic_mistake(key))
    hard = [r for r in rows if r["hard"]]
    easy = [r for r in rows if not r["hard"]]
    assert len(hard) > 500 and len(easy) > 500
    hard_err = 1 - sum(r["correct"] for r in hard) / len(hard)
    easy_err = 1 - sum(r["correct"] for r in easy) / len(easy)
    assert abs(hard_err - CFG.demo_hard_error_rate) < 0.05
    assert abs(easy_err - CFG.demo_easy_error_rate) < 0.025
    styles = [world.reply_style(_assistant(r)) for r in rows]
    assert abs(styles.count("rude") / len(rows) - CFG.demo_rude_rate) < 0.03
    assert abs(styles.count("verbose") / len(rows) - CFG.demo_verbose_rate) < 0.03
    system = sum(r["messages"][0]["role"] == "system" for r in rows) / len(rows)
    assert abs(system - CFG.system_prompt_rate) < 0.04
    # SFT-side validation draws differ from the training draws
    assert [r["messages"] for r in splits["sft_eval"][:20]] != [r["messages"] for r in rows[:20]]


def test_preference_rows(splits):
    rows = splits["preference"]
    n_correctness = 0
    for r in rows:
        assert [m["role"] for m in r["prompt"]] == ["user"]
        key = prompt_key(_user(r))
        answer = solve(key)
        assert r["skill"] == key[0] and r["hard"] == is_hard(key)
        chosen, rejected = r["chosen"][0]["content"], r["rejected"][0]["content"]
        qc, qr = reply_quality(r["skill"], chosen, answer), reply_quality(r["skill"], rejected, answer)
        assert qc != qr  # strictly different quality
        assert (qc > qr) == r["clean_agrees"]
        ok_c, ok_r = verify(r["skill"], chosen, answer), verify(r["skill"], rejected, answer)
        assert ok_c or ok_r  # never two wrong replies
        if ok_c != ok_r:
            n_correctness += 1
            if r["hard"]:  # the wrong reply is the demonstrator's systematic mistake
                wrong = rejected if ok_c else chosen
                assert verify(r["skill"], wrong, systematic_mistake(key))
    agree = sum(r["clean_agrees"] for r in rows) / len(rows)
    assert abs(agree - (1 - CFG.label_noise)) < 0.03
    assert abs(n_correctness / len(rows) - CFG.pref_correctness_share) < 0.04
    assert abs(sum(r["hard"] for r in rows) / len(rows) - CFG.pref_hard_share) < 0.04
    assert {r["skill"] for r in rows} == set(SKILLS)


def test_preference_noise_free():
    rows = build_split(WorldConfig(label_noise=0.0, n_preference_eval=200), "preference_eval")
    assert all(r["clean_agrees"] for r in rows)


# ------------------------------------------------------------------------------------------------ eval


def test_eval_rows(splits):
    rows = splits["eval"]
    assert [r["id"] for r in rows] == [f"eval-{i:04d}" for i in range(1, len(rows) + 1)]
    per_skill = {s: sum(r["skill"] == s for r in rows) for s in SKILLS}
    assert 10 <= per_skill["add"] <= 30  # all held-out additions (~20)
    others = [per_skill[s] for s in SKILLS if s != "add"]
    assert max(others) - min(others) <= 1
    for r in rows:
        key = prompt_key(_user(r))
        assert r["answer"] == solve(key) and r["hard"] == is_hard(key) and r["skill"] == key[0]
        assert verify(r["skill"], world.make_reply(r["answer"], "rude", 0), r["answer"])
    for s in SKILLS:
        hard = [r["hard"] for r in rows if r["skill"] == s]
        assert any(hard) and not all(hard), s


def test_split_stats(splits):
    st = split_stats(CFG, "sft", splits["sft"])
    assert st["rows"] == CFG.n_sft and sum(st["per_skill"].values()) == CFG.n_sft
    assert 0 < st["hard_correct_share"] < st["easy_correct_share"]
    st = split_stats(CFG, "preference", splits["preference"])
    assert 0.8 < st["clean_agrees_share"] < 0.9


def test_world_splits_help_names_the_module_that_prints_the_splits(capsys):
    # data/README.md: `python -m pipeline.world_splits SPLIT --n 8`; pipeline.world has no command line
    from pipeline import world_splits

    with pytest.raises(SystemExit):
        world_splits.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse reflows the description
    assert "`python -m pipeline.world_splits SPLIT" in out and "pipeline.world SPLIT" not in out
