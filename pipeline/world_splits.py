"""The task world's splits: the pretraining corpus, the demonstrators' conversations, the annotators' preference
pairs and the held-out eval prompts, generated from a `WorldConfig` (the rules they follow are pipeline/world.py's
docstring; the `tool_*` splits are pipeline/tool_world.py's). The same config always yields the same rows.

    python -m pipeline.world_splits SPLIT [--n N] [--seed S]     # print a split as JSON Lines
"""

from __future__ import annotations

import hashlib
import random

from pipeline import tool_world
from pipeline.world import (FACTS, SKILLS, SPLITS, SYSTEM_PROMPTS, TOOL_SPLITS, Problem, WorldConfig, annotator_prefers, is_heldout,
                            prompt_key, random_reply, random_wrong, reply_quality, sample_key, sample_problem, solve,
                            verify)


# ----------------------------------------------------------------------------------------------------- splits


def _rng(cfg: WorldConfig, split: str) -> random.Random:
    digest = hashlib.sha256(f"world:{cfg.seed}:{split}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _check(cfg: WorldConfig, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown world split {split!r}; expected one of {', '.join(SPLITS)}")
    check_world(cfg)


class BadWorldValue(ValueError):
    """A world setting check_world refuses; `keys`: the world keys at fault (the recipe loader names their source)."""

    def __init__(self, message: str, *keys: str):
        super().__init__(message)
        self.keys = keys


def check_world(cfg: WorldConfig) -> None:
    """The world section's values (the recipe loader runs this, naming the recipe): skills, sizes and rates."""
    from pipeline.values import closest

    if not cfg.skills:
        raise BadWorldValue("world.skills is empty", "skills")
    bad = [s for s in cfg.skills if s not in SKILLS]
    if bad:
        raise BadWorldValue(f"world.skills: unknown skill '{bad[0]}'{closest(str(bad[0]), SKILLS)}", "skills")
    for name, value in vars(cfg).items():
        if name.startswith("n_") and value < 0:
            raise BadWorldValue(f"world.{name} must be 0 or more, got {value}", name)
    for name in ("demo_hard_error_rate", "demo_easy_error_rate", "demo_rude_rate", "demo_verbose_rate",
                 "system_prompt_rate", "label_noise", "pref_hard_share", "pref_correctness_share",
                 "tool_demo_error_rate", "tool_demo_guess_rate"):
        v = getattr(cfg, name)
        if not 0.0 <= v <= 1.0:
            raise BadWorldValue(f"world.{name} must be in [0, 1], got {v}", name)
    if cfg.demo_rude_rate + cfg.demo_verbose_rate > 1.0:
        raise BadWorldValue("world.demo_rude_rate + world.demo_verbose_rate must be <= 1", "demo_rude_rate",
                            "demo_verbose_rate")


def _skills(cfg: WorldConfig) -> list[str]:
    return [s for s in SKILLS if s in cfg.skills]  # canonical order, duplicates dropped


def _pretrain(cfg: WorldConfig, rng: random.Random) -> list[dict]:
    skills = _skills(cfg)
    # The addition table is world knowledge, stated in full as a real corpus would: a held-out `add` prompt asks
    # the model to use a fact it read, in a chat it never saw. Algorithmic skills state train problems only.
    add_table = [("add", a, b) for a in range(10) for b in range(10)]
    cycle: list[tuple] = []
    rows = []
    for _ in range(cfg.n_pretrain_docs):
        sentences = []
        if "add" in skills:
            if not cycle:
                cycle = add_table[:]
                rng.shuffle(cycle)
            p = Problem.from_key(cycle.pop())
            sentences.append(p.fact(rng.randrange(len(FACTS["add"]))))
        for _ in range(rng.randint(4, 8) - len(sentences)):
            p = sample_problem(rng.choice(skills), rng)
            if rng.random() < 0.6:
                sentences.append(p.fact(rng.randrange(len(FACTS[p.skill]))))
            else:
                sentences.append(p.prompt(rng.randrange(3)) + " " + random_reply(p.answer, rng))
        rng.shuffle(sentences)
        rows.append({"text": " ".join(sentences)})
    return rows


def _sft(cfg: WorldConfig, rng: random.Random, n: int) -> list[dict]:
    skills = _skills(cfg)
    rows = []
    for _ in range(n):
        p = sample_problem(rng.choice(skills), rng)
        if p.hard:
            ans = p.mistake if rng.random() < cfg.demo_hard_error_rate else p.answer
        else:
            ans = random_wrong(p, rng) if rng.random() < cfg.demo_easy_error_rate else p.answer
        r = rng.random()
        style = "rude" if r < cfg.demo_rude_rate else \
            "verbose" if r < cfg.demo_rude_rate + cfg.demo_verbose_rate else "polite"
        messages = []
        if rng.random() < cfg.system_prompt_rate:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        messages.append({"role": "user", "content": p.prompt(rng.randrange(3))})
        messages.append({"role": "assistant", "content": random_reply(ans, rng, style)})
        rows.append({"messages": messages, "skill": p.skill, "hard": p.hard, "correct": ans == p.answer})
    return rows


def _preference(cfg: WorldConfig, rng: random.Random, n: int) -> list[dict]:
    skills = _skills(cfg)
    rows = []
    for _ in range(n):
        p = sample_problem(rng.choice(skills), rng, hard=rng.random() < cfg.pref_hard_share)
        if rng.random() < cfg.pref_correctness_share:
            wrong = p.mistake if p.hard else random_wrong(p, rng)
            pair = [random_reply(p.answer, rng), random_reply(wrong, rng)]
        else:  # both correct, differing in politeness and/or length
            while True:
                pair = [random_reply(p.answer, rng), random_reply(p.answer, rng)]
                if reply_quality(p.skill, pair[0], p.answer) != reply_quality(p.skill, pair[1], p.answer):
                    break
        rng.shuffle(pair)
        a, b = pair
        clean = annotator_prefers(p.skill, p.answer, a, b)
        label = annotator_prefers(p.skill, p.answer, a, b, rng=rng, noise=cfg.label_noise)
        chosen, rejected = (a, b) if label == 0 else (b, a)
        rows.append({
            "prompt": [{"role": "user", "content": p.prompt(rng.randrange(3))}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "skill": p.skill, "hard": p.hard, "clean_agrees": label == clean,
        })
    return rows


def _eval(cfg: WorldConfig, rng: random.Random) -> list[dict]:
    skills = _skills(cfg)
    # unique held-out problems per skill, in sampling order (natural hard/easy mix); small skills run out
    pools: dict[str, list[Problem]] = {}
    for skill in skills:
        seen: set = set()
        pool: list[Problem] = []
        misses = 0
        while len(pool) < cfg.n_eval and misses < max(2000, 20 * cfg.n_eval):
            key = sample_key(skill, rng)
            if key in seen or not is_heldout(key):
                misses += 1
                continue
            seen.add(key)
            pool.append(Problem.from_key(key))
            misses = 0
        pools[skill] = pool
    # equal quotas; what a small skill (add has ~20 held-out problems) cannot fill goes to the others
    quota = {s: 0 for s in skills}
    left = cfg.n_eval
    for i, s in enumerate(sorted(skills, key=lambda s: (len(pools[s]), SKILLS.index(s)))):
        quota[s] = min(len(pools[s]), left // (len(skills) - i))
        left -= quota[s]
    problems = [p for s in skills for p in pools[s][:quota[s]]]
    rng.shuffle(problems)
    return [{"id": f"eval-{i + 1:04d}", "skill": p.skill, "hard": p.hard,
             "prompt": [{"role": "user", "content": p.prompt(rng.randrange(3))}], "answer": p.answer}
            for i, p in enumerate(problems)]


def build_split(cfg: WorldConfig, split: str) -> list[dict]:
    """The rows of one split; deterministic given cfg. Raises ValueError for an unknown split or skill."""
    _check(cfg, split)
    rng = _rng(cfg, split)
    if split in TOOL_SPLITS:
        return tool_world.build(cfg, split, rng)
    if split == "pretrain":
        return _pretrain(cfg, rng)
    if split == "sft":
        return _sft(cfg, rng, cfg.n_sft)
    if split == "sft_eval":
        return _sft(cfg, rng, cfg.n_sft_eval)
    if split == "preference":
        return _preference(cfg, rng, cfg.n_preference)
    if split == "preference_eval":
        return _preference(cfg, rng, cfg.n_preference_eval)
    return _eval(cfg, rng)


# The config fields each split's rows are built from (what build_split reads for it; a test checks this table
# against the rows). A `world:` dataset's fingerprint covers these only: label_noise reruns no pretraining.
_TEXT, _PAIRS = ("seed", "skills"), ("pref_hard_share", "label_noise")
_DEMO = ("demo_hard_error_rate", "demo_easy_error_rate", "demo_rude_rate", "demo_verbose_rate", "system_prompt_rate")
_TOOL_DEMO = ("seed", "tool_demo_error_rate", "tool_demo_guess_rate")
SPLIT_SETTINGS = {
    "pretrain": (*_TEXT, "n_pretrain_docs"), "eval": (*_TEXT, "n_eval"),
    "sft": (*_TEXT, *_DEMO, "n_sft"), "sft_eval": (*_TEXT, *_DEMO, "n_sft_eval"),
    "preference": (*_TEXT, *_PAIRS, "pref_correctness_share", "n_preference"),
    "preference_eval": (*_TEXT, *_PAIRS, "pref_correctness_share", "n_preference_eval"),
    "tool_sft": (*_TOOL_DEMO, "n_tool_sft"), "tool_sft_eval": (*_TOOL_DEMO, "n_tool_sft_eval"),
    "tool_preference": ("seed", *_PAIRS, "n_tool_preference"),
    "tool_preference_eval": ("seed", *_PAIRS, "n_tool_preference_eval"),
    "tool_eval": ("seed", "n_tool_eval"),
}


def split_settings(cfg: WorldConfig, split: str) -> dict:
    """The config values a split's rows depend on (SPLIT_SETTINGS), as its dataset fingerprint records them; none for
    an unknown split (reading it stops the stage in one line)."""
    return {name: getattr(cfg, name) for name in SPLIT_SETTINGS.get(split, ())}


def split_stats(cfg: WorldConfig, split: str, rows: list[dict] | None = None) -> dict:
    """Row count, rows per skill, and the shares of hard / correct / clean-label rows where the split has them."""
    rows = build_split(cfg, split) if rows is None else rows
    if split in TOOL_SPLITS:
        return tool_world.split_stats(split, rows)
    out: dict = {"split": split, "rows": len(rows)}
    if split == "pretrain":
        out["words"] = sum(len(r["text"].split()) for r in rows)
        return out
    per_skill: dict[str, int] = {}
    for r in rows:
        per_skill[r["skill"]] = per_skill.get(r["skill"], 0) + 1
    out["per_skill"] = per_skill
    n = max(len(rows), 1)
    out["hard_share"] = round(sum(r["hard"] for r in rows) / n, 3)
    if split in ("sft", "sft_eval"):
        out["correct_share"] = round(sum(r["correct"] for r in rows) / n, 3)
        hard = [r for r in rows if r["hard"]]
        easy = [r for r in rows if not r["hard"]]
        out["hard_correct_share"] = round(sum(r["correct"] for r in hard) / max(len(hard), 1), 3)
        out["easy_correct_share"] = round(sum(r["correct"] for r in easy) / max(len(easy), 1), 3)
    if split in ("preference", "preference_eval"):
        out["clean_agrees_share"] = round(sum(r["clean_agrees"] for r in rows) / n, 3)
        out["correctness_pair_share"] = round(sum(
            verify(r["skill"], r["chosen"][0]["content"], _pair_answer(r)) !=
            verify(r["skill"], r["rejected"][0]["content"], _pair_answer(r)) for r in rows) / n, 3)
    return out


def _pair_answer(row: dict) -> str:
    key = prompt_key(row["prompt"][-1]["content"])
    return solve(key) if key else ""


def main(argv=None) -> None:
    """`python -m pipeline.world_splits SPLIT [--n N] [--seed S]`: print a split as JSON Lines (e.g. to make samples)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m pipeline.world_splits", description=main.__doc__)
    parser.add_argument("split", choices=SPLITS)
    parser.add_argument("--n", type=int, default=None, help="print only the first N rows")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = build_split(WorldConfig(seed=args.seed), args.split)
    for row in rows[: args.n]:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
