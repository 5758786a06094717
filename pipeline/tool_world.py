"""The world's tool tasks: a chat policy that calls `draw_image(prompt)` (the diffusion model draws one image and
returns its id) and `read_image(image_id)` (the image judge says what an image shows), with demonstrators,
annotators and held-out tasks in the manner of pipeline/world.py.

=========  ==========================  =========================  ==========================================
kind       task (user prompt)          hard when                  demonstrator's systematic mistake
=========  ==========================  =========================  ==========================================
draw       "Draw a large thin 7."      the position is asked for  forgets the position in the prompt
draw_sum   "Draw the sum of 3 and 4,   a + b >= 7 (and b > 0)     draws the first operand: "a large 3"
           large." (a + b <= 9)
read       "Which digit is in image    the id's last digit is     answers without calling read_image,
           12?" (a gallery image)      not the image's digit      guessing the id's last digit
=========  ==========================  =========================  ==========================================

The right draw call names the task's caption in the image world's caption language (`images.caption`: "a large
thin 7 on the left"; properties the user did not ask for are left out), then a short reply names the drawn image
("Here is image 214."). The right read is read_image(image_id="12"), the judge's answer ("Image 12 shows a small
thick 4 on the right.") and "The answer is 4." (world.ANSWER_FORM, so `world.extract_answer` reads it). Each kind
has three phrasings; properties are asked for with probability 0.6 each (draw) or 0.4 (draw_sum).

Gallery: `GALLERY_SIZE` (200) images with ids "1".."200", real training digits of `images.real_digits` rendered
under the 8 property combinations (each digit-combination 2 or 3 times, shuffled, so an id says nothing about its
image). Training digits, so the judge behind read_image reads them almost always right and read tasks test the
policy, not the judge. The gallery and the held-out sets do not depend on the seed (as in world.py).

Held-out tasks (only in `tool_eval`). The held-out draw tasks are exactly the image world's held-out captions
(`images.heldout_combos`: all three properties asked for, 20 combinations the diffusion model never trained on), so
they test the policy and the drawing tool on captions neither has seen; every partial caption is drawn in training.
A draw_sum is held out when its operands are a held-out `add` problem of the text world (no chat in any training
split adds them) or its caption, or that of its mistake, is a held-out one. An image id is held out by a hash of the id (20%) or when its
image's caption is a held-out one, so no training split ever shows a held-out caption, even in a tool message.

Demonstrator (tool_sft, tool_sft_eval): on a hard draw / draw_sum task it makes the mistake with probability
`tool_demo_error_rate`; on a read task it answers without calling with probability `tool_demo_guess_rate`
(a guess that is right only when the task is easy). Drawn images get ids after the gallery's ("201".."999").

Annotator (tool_preference, tool_preference_eval): each pair is one assistant turn, right against wrong: the right
call against the systematic mistake (hard tasks) or a wrong digit / no call at all (easy ones); for read tasks also
the final answer after the tool's reply, right against wrong. `pref_hard_share` of the pairs come from hard
tasks; the label is flipped with probability `label_noise`, and `clean_agrees` records whether it was.

Rows carry `tools` as a JSON string of TOOL_SCHEMAS and tool-call `arguments` as JSON strings (the forms the
loaders produce, pipeline/formats.py; one Arrow schema for every row).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from functools import lru_cache

from pipeline import world
from pipeline.cli import PipelineError
from pipeline.images import ATTR_COMBOS, PROPERTIES, caption, heldout_combos
from pipeline.tools import draw_schema, drawn_text, read_schema, read_text

KINDS = ("draw", "draw_sum", "read")
PROPS = tuple(PROPERTIES)  # size, thickness, position
GALLERY_SIZE = 200
GALLERY_RANKS = 130  # a gallery image is one of the first 130 training images of its digit (each has >= 133)
HARD_SUM = 7
PROP_RATE = {"draw": 0.6, "draw_sum": 0.4}  # probability that the user asks for each property

TOOL_SCHEMAS = [draw_schema("draw_image"), read_schema("read_image")]  # what the recipe's image tools present
TOOLS_JSON = json.dumps(TOOL_SCHEMAS)

PROMPTS = {
    "draw": ("Draw {caption}.", "Please draw the digit {digit}{mods}.", "Make an image of {caption}."),
    "draw_sum": ("Draw the sum of {a} and {b}{mods}.", "What is {a} plus {b}? Draw it{mods}.", "Draw {a} + {b}{mods}."),
    "read": ("Which digit is in image {image_id}?", "What digit does image {image_id} show?",
             "Look at image {image_id}. Which digit is it?"),
}
DRAW_REPLIES = ("Here is image {image_id}.", "Done: image {image_id}.")


# ----------------------------------------------------------------------------------------------------- gallery


def _percent(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % 100


@lru_cache(maxsize=1)
def _gallery_cells() -> tuple:
    rng = random.Random("tool_world:gallery")  # fixed: the gallery is part of the world, whatever the seed
    pairs = [(d, *a) for d in range(10) for a in ATTR_COMBOS]
    cells = pairs * 2 + rng.sample(pairs, GALLERY_SIZE - 2 * len(pairs))
    rng.shuffle(cells)
    return tuple((d, s, t, p, rng.randrange(GALLERY_RANKS)) for d, s, t, p in cells)


def gallery_truth(image_id: str) -> dict:
    """{digit, size, thickness, position} of a gallery image."""
    if not str(image_id).isdigit() or not 1 <= int(image_id) <= GALLERY_SIZE:
        raise PipelineError(f"image id {image_id!r} is not in the gallery (ids 1..{GALLERY_SIZE})")
    return dict(zip(("digit", *PROPS), _gallery_cells()[int(image_id) - 1][:4]))


def is_heldout_image(image_id: str) -> bool:
    t = gallery_truth(image_id)
    return _percent(f"image {image_id}") < world.HELDOUT_PERCENT or tuple(t.values()) in heldout_combos()


def gallery(resolution: int = 16) -> list[tuple]:
    """[(image_id, image 1 x R x R in [0, 1], truth dict)] of every gallery image."""
    import torch

    from pipeline.images import real_digits, render

    base, labels = real_digits("train")
    by_digit = {d: torch.nonzero(labels == d)[:, 0] for d in range(10)}
    out = []
    for i, (d, size, thickness, position, rank) in enumerate(_gallery_cells(), 1):
        image = render(base[by_digit[d][rank]][None], size, thickness, position, resolution)[0]
        out.append((str(i), image, gallery_truth(str(i))))
    return out


def register_gallery(store, resolution: int = 16) -> list[str]:
    """Add the gallery to an image store (`store.add(image, meta, image_id)`) under its ids; returns the ids."""
    return [store.add(image, {"source": "gallery", **truth}, image_id) for image_id, image, truth in
            gallery(resolution)]


# ----------------------------------------------------------------------------------------------------- tasks
# keys: ("draw", digit, size, thickness, position), ("draw_sum", a, b, size, thickness, position), ("read", id);
# a property the user does not ask for is None.


def _target(key: tuple) -> tuple:
    """(digit, size, thickness, position) a draw task asks for."""
    return key[1:] if key[0] == "draw" else (key[1] + key[2], *key[3:])


def answer(key: tuple) -> str:
    """The right draw_image prompt, or the digit a read task asks for."""
    if key[0] == "read":
        return str(gallery_truth(key[1])["digit"])
    return caption(*_target(key))


def mistake(key: tuple) -> str:
    """The demonstrator's systematic answer (== `answer` exactly when the task is easy)."""
    if key[0] == "read":
        return key[1][-1]
    if key[0] == "draw":
        return caption(*key[1:4])
    a, b = key[1], key[2]
    return caption(a if a + b >= HARD_SUM else a + b, *key[3:])


def is_hard(key: tuple) -> bool:
    return mistake(key) != answer(key)


def _held_caption(target: tuple) -> bool:
    return None not in target and tuple(target) in heldout_combos()


def is_heldout(key: tuple) -> bool:
    if key[0] == "read":
        return is_heldout_image(key[1])
    if key[0] == "draw":
        return _held_caption(key[1:])
    a, b, props = key[1], key[2], key[3:]  # the mistake's caption too: no demonstration draws a held-out caption
    return world.is_heldout(("add", a, b)) or _held_caption((a + b, *props)) or _held_caption((a, *props))


def expect(key: tuple) -> dict:
    """What the verifier needs: the read's image id and answer, or the caption and the properties asked for."""
    if key[0] == "read":
        return {"image_id": key[1], "answer": answer(key)}
    target = _target(key)
    return {"caption": caption(*target), **{k: v for k, v in zip(("digit", *PROPS), target) if v is not None}}


def sample_key(kind: str, rng: random.Random) -> tuple:
    if kind == "read":
        return ("read", str(rng.randint(1, GALLERY_SIZE)))
    if kind not in KINDS:
        raise ValueError(f"unknown tool task kind {kind!r}; expected one of {', '.join(KINDS)}")
    props = tuple(rng.choice(v) if rng.random() < PROP_RATE[kind] else None for v in PROPERTIES.values())
    if kind == "draw":
        return ("draw", rng.randrange(10), *props)
    while True:  # uniform over the 55 ordered pairs with a + b <= 9
        a, b = rng.randrange(10), rng.randrange(10)
        if a + b <= 9:
            return ("draw_sum", a, b, *props)


def sample_task(kind: str, rng: random.Random, heldout: bool = False, hard: bool | None = None) -> tuple:
    for _ in range(100_000):
        key = sample_key(kind, rng)
        if is_heldout(key) == heldout and (hard is None or is_hard(key) == hard):
            return key
    raise RuntimeError(f"could not sample a {kind} task (heldout={heldout}, hard={hard})")


def prompt(key: tuple, phrasing: int = 0) -> str:
    if key[0] == "read":
        return PROMPTS["read"][phrasing].format(image_id=key[1])
    props = key[-3:]
    words = [w for w in (props[0], props[1], props[2] and f"on the {props[2]}") if w]
    mods = ", " + ", ".join(words) if words else ""
    fields = {"caption": answer(key), "digit": key[1], "mods": mods}
    if key[0] == "draw_sum":
        fields.update(a=key[1], b=key[2])
    return PROMPTS[key[0]][phrasing].format(**fields)


def task_key(text: str) -> tuple | None:
    """The task key of a user prompt written by this module (None if it is not one), read from its words."""
    low = text.lower()
    m = re.search(r"\bimage (\d+)\b", low)
    if m:
        return ("read", m.group(1)) if 1 <= int(m.group(1)) <= GALLERY_SIZE else None
    words = re.sub(r"[^\w+ ]", " ", low).split()
    if "draw" not in words and not low.startswith("make an image of"):
        return None
    nums = [int(w) for w in words if w.isdigit()]
    props = tuple(next((v for v in values if v in words), None) for values in PROPERTIES.values())
    if len(nums) == 2 and {"sum", "plus", "+"} & set(words) and sum(nums) <= 9:
        return ("draw_sum", *nums, *props)
    if len(nums) == 1 and nums[0] <= 9:
        return ("draw", nums[0], *props)
    return None


# ----------------------------------------------------------------------------------------------------- messages


def call_message(name: str, **arguments) -> dict:
    return {"role": "assistant", "content": None,
            "tool_calls": [{"type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}]}


def tool_message(name: str, content: str) -> dict:
    return {"role": "tool", "name": name, "content": content}


draw_result_text = drawn_text  # what draw_image says (pipeline/tools.py), in the demonstrations too
read_result_text = read_text    # "Image 12 shows a small thick 4 on the right."


def _reply(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _answer_reply(digit) -> dict:
    return _reply(world.ANSWER_FORM.format(answer=digit))


def _drawn_id(rng: random.Random) -> str:
    return str(rng.randint(GALLERY_SIZE + 1, 999))


def _right_turns(key: tuple, rng: random.Random) -> list[dict]:
    """The right assistant call, the tool's reply and the final answer."""
    if key[0] == "read":
        return [call_message("read_image", image_id=key[1]),
                tool_message("read_image", read_result_text(key[1], gallery_truth(key[1]))), _answer_reply(answer(key))]
    image_id = _drawn_id(rng)
    return [call_message("draw_image", prompt=answer(key)), tool_message("draw_image", draw_result_text(image_id)),
            _reply(rng.choice(DRAW_REPLIES).format(image_id=image_id))]


# ----------------------------------------------------------------------------------------------------- splits


def _sft(cfg, rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        key = sample_task(rng.choice(KINDS), rng)
        user = {"role": "user", "content": prompt(key, rng.randrange(3))}
        if key[0] == "read" and rng.random() < cfg.tool_demo_guess_rate:
            said, messages = mistake(key), [user, _answer_reply(mistake(key))]
        else:
            err = key[0] != "read" and is_hard(key) and rng.random() < cfg.tool_demo_error_rate
            said = mistake(key) if err else answer(key)
            messages = [user, *_right_turns(key, rng)]
            if err:
                messages[1] = call_message("draw_image", prompt=said)
        rows.append({"messages": messages, "tools": TOOLS_JSON, "kind": key[0], "hard": is_hard(key),
                     "correct": said == answer(key), "called": len(messages) > 2})
    return rows


def _wrong_answer(key: tuple, rng: random.Random) -> dict:
    """A wrong answer to a read: the guess (hard) or another digit (easy)."""
    return _answer_reply(mistake(key) if is_hard(key) else rng.choice([d for d in range(10) if str(d) != answer(key)]))


def _wrong_turn(key: tuple, rng: random.Random) -> dict:
    """A wrong first assistant turn: the systematic mistake (hard), a wrong digit or no call at all (easy)."""
    if key[0] == "read":
        return _wrong_answer(key, rng)
    if is_hard(key):
        return call_message("draw_image", prompt=mistake(key))
    if rng.random() < 0.5:
        return _reply(rng.choice(DRAW_REPLIES).format(image_id=_drawn_id(rng)))  # claims an image it never drew
    digit, *props = _target(key)
    other = [d for d in range(10) if d != digit and not _held_caption((d, *props))]
    return call_message("draw_image", prompt=caption(rng.choice(other), *props))


def _preference(cfg, rng: random.Random, n: int) -> list[dict]:
    rows = []
    for _ in range(n):
        key = sample_task(rng.choice(KINDS), rng, hard=rng.random() < cfg.pref_hard_share)
        user = {"role": "user", "content": prompt(key, rng.randrange(3))}
        right = _right_turns(key, rng)
        if key[0] == "read" and rng.random() < 0.5:  # the final answer after the tool's reply
            turn, context, good, bad = "final", [user, *right[:2]], right[2], _wrong_answer(key, rng)
        else:
            turn, context, good, bad = "call", [user], right[0], _wrong_turn(key, rng)
        flip = rng.random() < cfg.label_noise
        chosen, rejected = (bad, good) if flip else (good, bad)
        rows.append({"prompt": context, "chosen": [chosen], "rejected": [rejected], "tools": TOOLS_JSON,
                     "kind": key[0], "skill": f"tool_{key[0]}",  # the reward stage's per-skill accuracy
                     "hard": is_hard(key), "turn": turn, "clean_agrees": not flip})
    return rows


def _eval(cfg, rng: random.Random) -> list[dict]:
    pools: dict[str, list[tuple]] = {kind: [] for kind in KINDS}
    for kind, pool in pools.items():  # unique held-out tasks per kind, in sampling order; draw has only 20
        misses = 0
        while len(pool) < cfg.n_tool_eval and misses < 5000:
            key = sample_key(kind, rng)
            if key in pool or not is_heldout(key):
                misses += 1
                continue
            pool.append(key)
            misses = 0
    quota, left = {}, cfg.n_tool_eval
    for i, kind in enumerate(sorted(KINDS, key=lambda k: (len(pools[k]), KINDS.index(k)))):
        quota[kind] = min(len(pools[kind]), left // (len(KINDS) - i))
        left -= quota[kind]
    keys = [k for kind in KINDS for k in pools[kind][:quota[kind]]]
    rng.shuffle(keys)
    return [{"id": f"tool-eval-{i + 1:04d}", "kind": k[0], "hard": is_hard(k), "tools": TOOLS_JSON,
             "prompt": [{"role": "user", "content": prompt(k, rng.randrange(3))}], "expect": expect(k)}
            for i, k in enumerate(keys)]


def build(cfg, split: str, rng: random.Random) -> list[dict]:
    """The rows of a tool split (world_splits.build_split checks the config and makes `rng`)."""
    if split in ("tool_sft", "tool_sft_eval"):
        return _sft(cfg, rng, cfg.n_tool_sft if split == "tool_sft" else cfg.n_tool_sft_eval)
    if split in ("tool_preference", "tool_preference_eval"):
        return _preference(cfg, rng, cfg.n_tool_preference if split == "tool_preference" else
                           cfg.n_tool_preference_eval)
    if split == "tool_eval":
        return _eval(cfg, rng)
    raise ValueError(f"unknown tool split {split!r}; expected one of {', '.join(world.TOOL_SPLITS)}")


def split_stats(split: str, rows: list[dict]) -> dict:
    n = max(len(rows), 1)
    out = {"split": split, "rows": len(rows), "per_kind": {k: sum(r["kind"] == k for r in rows) for k in KINDS},
           "hard_share": round(sum(r["hard"] for r in rows) / n, 3)}
    for col in ("correct", "called", "clean_agrees"):
        if rows and col in rows[0]:
            out[f"{col}_share"] = round(sum(r[col] for r in rows) / n, 3)
    return out


# ----------------------------------------------------------------------------------------------------- judging


def _arguments(result) -> dict:
    args = getattr(result, "arguments", None)
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return {}
    return args if isinstance(args, dict) else {}


def verify(row: dict, results: list, final_text: str, judge=None, store=None) -> dict:
    """The outcome of one rollout of a tool task (a row with `kind` and `expect`, or a prompt this module wrote).

    draw / draw_sum: the judge's reading of the image last drawn successfully (`store.get(result.image)`) must match
    every property asked for. read: the final answer must be the image's digit; the outcome alone counts (a right
    guess without looking is correct), `looked` says whether read_image was called on that image."""
    exp = row.get("expect")
    if exp is None:
        msgs = row.get("prompt") or row.get("messages") or []
        key = task_key(next((m["content"] for m in msgs if m.get("role") == "user"), "") if isinstance(msgs, list)
                       else msgs)
        if key is None:
            raise PipelineError("verify: the row has no `expect` and its prompt is not a tool task")
        exp = expect(key)
    kind = row.get("kind") or ("read" if exp.get("image_id") else "draw")
    out = {"correct": False, "called": bool(results), "calls": len(results),
           "valid_calls": sum(bool(r.valid) for r in results), "image": None, "read": None}
    if kind == "read":
        out["looked"] = any(r.name == "read_image" and r.ok and str(_arguments(r).get("image_id")) == exp["image_id"]
                            for r in results)
        out["correct"] = world.extract_answer(final_text) == str(exp["answer"])
        return out
    drawn = [r for r in results if r.name == "draw_image" and r.ok and getattr(r, "image", None)]
    if not drawn:
        return out
    if judge is None or store is None:
        raise PipelineError("verify: a draw task needs the image judge and the image store")
    from pipeline.image_judge import matches

    reading = judge.predict(store.get(drawn[-1].image)[None])[0]
    wanted = {k: exp[k] for k in ("digit", *PROPS) if exp.get(k) is not None}
    out.update(image=drawn[-1].image, read=reading, correct=matches(reading, wanted)["all"])
    return out


def rollout_quality(row: dict, rollout: dict) -> tuple:
    """(correct, -invalid calls, -calls, -words of the final reply): higher is better. A rollout is
    {"results", "text", "verdict"?}; without a verdict it is verified here (read tasks need no judge)."""
    verdict = rollout.get("verdict") or verify(row, rollout["results"], rollout["text"])
    return (bool(verdict["correct"]), verdict["valid_calls"] - verdict["calls"], -verdict["calls"],
            -len(str(rollout.get("text") or "").split()))


def annotator_prefers_tool(row: dict, a: dict, b: dict, rng: random.Random | None = None, noise: float = 0.0) -> int:
    """0 if the simulated annotator prefers rollout a, 1 if b: the correct outcome first, then fewer invalid calls,
    then shorter (fewer calls, fewer words). Ties go to a (or a coin flip from rng); with rng and noise > 0 the
    label is flipped with probability noise, as world.annotator_prefers does."""
    qa, qb = rollout_quality(row, a), rollout_quality(row, b)
    label = (0 if qa > qb else 1) if qa != qb else (rng.randrange(2) if rng is not None else 0)
    if rng is not None and noise > 0 and rng.random() < noise:
        label = 1 - label
    return label
