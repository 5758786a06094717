"""A seeded synthetic "assistant world" whose answers a program can check.

Every training stage reads its data from here: the pretraining corpus, SFT conversations, preference pairs and the
held-out eval prompts. Everything is generated with the standard library from `WorldConfig.seed`; the same config
always yields the same rows.

Skills. A problem has a skill, a canonical `key` (independent of how the question is phrased), a reference answer
and a `hard` flag:

=========  ==============================  ====================  ===============================================
skill      problem                         hard when             demonstrator's systematic mistake (hard only)
=========  ==============================  ====================  ===============================================
add        a + b, a and b in 0..9          a + b >= 10           forgets the carry: a + b - 10
compare    larger of two numbers 10..99    same tens digit       gives the smaller number
reverse    reverse 3..5 distinct words     5 words               returns the words in their original order
sort       sort 3..4 distinct words        the mistake is wrong  sorts by first letter only (stable on ties)
count      count 3..8 words (may repeat)   count >= 6            count - 1
=========  ==============================  ====================  ===============================================

Keys look like ("add", 3, 5), ("compare", 45, 47) or ("reverse", ("cat", "dog", "sun")). Each skill has three
prompt phrasings. Words come from a fixed vocabulary of 40 short words, several sharing a first letter.

Replies always end in the fixed form "The answer is {answer}." after a style prefix: polite (short: "Sure!"),
rude ("Ugh, fine.") or verbose (a rambling, polite filler sentence). `extract_answer` reads the text after the last
"answer is ", `verify` compares it with the reference.

Held-out problems. Each key belongs to a hash group (the key itself, with the operands of `add` and `compare`
unordered, the words of `sort` and `count` as a multiset, and a `reverse` list identified with its reverse, so
that a fact about a train problem never gives away a held-out answer). A group is held out when
sha256(repr(group)) % 100 < 20, independent of the seed. Held-out problems appear only in the `eval` split; every
other split uses train problems only.

Demonstrator (sft, sft_eval). On a hard problem it makes the skill's systematic mistake with probability
`demo_hard_error_rate` (so after SFT the greedy answer on hard problems is the mistake); on an easy problem it gives
a random wrong answer with probability `demo_easy_error_rate`. Its style is rude with probability
`demo_rude_rate`, verbose with probability `demo_verbose_rate`, polite otherwise. A share `system_prompt_rate` of
conversations starts with a (content-neutral) system message.

Annotator (preference, preference_eval, and the evaluator's judge). Replies are ranked by `reply_quality`:
correct first, then polite (not rude), then concise (fewer words). Each pair has two replies of strictly different
quality: in about `pref_correctness_share` of the pairs one reply is correct and the other wrong (on hard problems
the wrong one is the systematic mistake, on easy ones a random wrong answer; styles are random), in the rest both
are correct and differ in style or length. About `pref_hard_share` of the pairs come from hard problems, so the
preference data targets exactly what SFT gets wrong. The label is flipped with probability `label_noise`;
`clean_agrees` records whether the noise-free annotator agrees that `chosen` is better.

Pretraining corpus. Plain-text documents of 4..8 sentences: correct facts about train problems ("3 plus 5 is 8.",
"Between 45 and 47, the larger number is 47.") and correct question/reply lines in all three styles, no chat
markup. Every document carries one addition fact, cycling through the whole addition table: the table is world
knowledge (as in a real corpus), so held-out `add` prompts test using a fact read in plain text, in a chat format
never seen with it. No held-out problem of the other skills appears in the corpus, and no held-out prompt appears
in any training split.

Tool tasks (the `tool_*` splits and config fields: a chat policy calling draw_image / read_image): tool_world.py.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field
from functools import lru_cache

SKILLS = ("add", "compare", "reverse", "sort", "count")
TEXT_SPLITS = ("pretrain", "sft", "sft_eval", "preference", "preference_eval", "eval")
TOOL_SPLITS = ("tool_sft", "tool_sft_eval", "tool_preference", "tool_preference_eval", "tool_eval")  # tool_world.py
SPLITS = TEXT_SPLITS + TOOL_SPLITS

HELDOUT_PERCENT = 20  # share (in %) of hash groups held out for the `eval` split

# 40 short words; several share a first letter so that `sort` has hard cases.
VOCAB = (
    "bat", "bee", "box", "bus",
    "cap", "cat", "cow", "cup",
    "day", "den", "dog", "dot",
    "fan", "fig", "fox",
    "hat", "hen",
    "map", "mop", "mud",
    "pen", "pie", "pig", "pot",
    "rat", "red", "rug",
    "sea", "sky", "sun",
    "tea", "tin", "top", "toy",
    "egg", "ink", "jar", "key", "owl", "web",
)
_BY_LETTER: dict[str, tuple[str, ...]] = {}
for _w in VOCAB:
    _BY_LETTER[_w[0]] = _BY_LETTER.get(_w[0], ()) + (_w,)
_SHARED_LETTERS = tuple(sorted(k for k, v in _BY_LETTER.items() if len(v) >= 2))

PROMPTS = {
    "add": ("What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} plus {b}."),
    "compare": ("Which is larger, {a} or {b}?", "What is the larger number: {a} or {b}?",
                "Pick the bigger of {a} and {b}."),
    "reverse": ("Reverse the order of these words: {words}.", "Write these words in reverse order: {words}.",
                "What are the words {words} backwards?"),
    "sort": ("Sort these words alphabetically: {words}.", "Put these words in alphabetical order: {words}.",
             "Arrange {words} in alphabetical order."),
    "count": ("How many words are in this list: {words}?", "Count the words: {words}.",
              "How many words does the list {words} contain?"),
}

FACTS = {
    "add": ("{a} plus {b} is {ans}.", "{a} + {b} = {ans}.", "If you add {a} and {b}, you get {ans}."),
    "compare": ("Between {a} and {b}, the larger number is {ans}.", "Of {a} and {b}, {ans} is larger.",
                "Comparing {a} with {b}, the bigger one is {ans}."),
    "reverse": ("The words {words} in reverse order are {ans}.", "Reversing {words} gives {ans}."),
    "sort": ("Sorted alphabetically, {words} becomes {ans}.", "In alphabetical order, {words} is {ans}."),
    "count": ("The list {words} has {ans} words.", "There are {ans} words in {words}."),
}

STYLES = ("polite", "rude", "verbose")
STYLE_PREFIXES = {
    "polite": ("Sure!", "Of course.", "Happy to help!"),
    "rude": ("Whatever.", "Ugh, fine.", "Duh, obviously."),
    "verbose": (
        "Let me think about this very carefully, one step at a time, to be completely sure.",
        "That is a really interesting question, and I want to go over every detail before I reply.",
        "Well, there are many ways to look at a question like this one, so I will check my work twice.",
    ),
}
RUDE_MARKERS = ("ugh", "whatever", "duh", "obviously")  # a reply containing one of these words is not polite
ANSWER_FORM = "The answer is {answer}."

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a helpful assistant. Answer the question.",
    "You are an assistant in a small world of numbers and words.",
)


@dataclass
class WorldConfig:
    seed: int = 0                           # seed of every split; the held-out problem set does not depend on it
    skills: list[str] = field(default_factory=lambda: list(SKILLS))  # skills to generate: add compare reverse sort count
    n_pretrain_docs: int = 6000             # plain-text documents (4-8 sentences each) in `pretrain`
    n_sft: int = 3000                       # demonstrator conversations in `sft`
    n_sft_eval: int = 200                   # demonstrator conversations in `sft_eval` (train problems, other draws)
    n_preference: int = 3000                # annotated reply pairs in `preference`
    n_preference_eval: int = 300            # annotated reply pairs in `preference_eval` (train problems, other draws)
    n_eval: int = 400                       # held-out prompts in `eval` (unique problems, ~equal per skill)
    demo_hard_error_rate: float = 0.7       # share of hard problems where the demonstrator makes its systematic mistake
    demo_easy_error_rate: float = 0.05      # share of easy problems where the demonstrator gives a random wrong answer
    demo_rude_rate: float = 0.15            # share of demonstrations in the rude style
    demo_verbose_rate: float = 0.15         # share of demonstrations in the verbose style
    system_prompt_rate: float = 0.3         # share of sft conversations that start with a system message
    label_noise: float = 0.15               # share of preference pairs whose annotator label is flipped
    pref_hard_share: float = 0.6            # share of preference pairs drawn from hard problems
    pref_correctness_share: float = 0.5     # share of preference pairs with one correct and one wrong reply
    # the tool tasks (pipeline/tool_world.py); label_noise and pref_hard_share apply to their pairs too
    n_tool_sft: int = 1500                  # demonstrator tool conversations in `tool_sft`
    n_tool_sft_eval: int = 100              # ... in `tool_sft_eval` (train tasks, other draws)
    n_tool_preference: int = 1500           # annotated turn pairs in `tool_preference`
    n_tool_preference_eval: int = 150       # ... in `tool_preference_eval` (train tasks, other draws)
    n_tool_eval: int = 150                  # held-out tool tasks in `tool_eval` (unique tasks, ~equal per kind)
    tool_demo_error_rate: float = 0.7       # share of hard draw / draw_sum tasks where the demonstrator errs
    tool_demo_guess_rate: float = 0.6       # share of read tasks the demonstrator answers without calling read_image


# ----------------------------------------------------------------------------------------------------- problems


def _words(ws) -> str:
    return " ".join(ws)


def solve(key: tuple) -> str:
    """Reference answer string of a problem key."""
    skill = key[0]
    if skill == "add":
        return str(key[1] + key[2])
    if skill == "compare":
        return str(max(key[1], key[2]))
    if skill == "reverse":
        return _words(key[1][::-1])
    if skill == "sort":
        return _words(sorted(key[1]))
    if skill == "count":
        return str(len(key[1]))
    raise ValueError(f"unknown skill {skill!r}; expected one of {', '.join(SKILLS)}")


def systematic_mistake(key: tuple) -> str:
    """The demonstrator's systematic answer; differs from `solve(key)` exactly when the problem is hard."""
    skill = key[0]
    if skill == "add":
        s = key[1] + key[2]
        return str(s - 10 if s >= 10 else s)
    if skill == "compare":
        a, b = key[1], key[2]
        return str(min(a, b) if a // 10 == b // 10 else max(a, b))
    if skill == "reverse":
        ws = key[1]
        return _words(ws if len(ws) == 5 else ws[::-1])
    if skill == "sort":
        return _words(sorted(key[1], key=lambda w: w[0]))  # stable: ties keep their original order
    if skill == "count":
        n = len(key[1])
        return str(n - 1 if n >= 6 else n)
    raise ValueError(f"unknown skill {skill!r}; expected one of {', '.join(SKILLS)}")


def is_hard(key: tuple) -> bool:
    return systematic_mistake(key) != solve(key)


def _hash_group(key: tuple) -> tuple:
    skill = key[0]
    if skill in ("add", "compare"):
        return (skill, min(key[1], key[2]), max(key[1], key[2]))
    if skill in ("sort", "count"):
        return (skill, tuple(sorted(key[1])))
    if skill == "reverse":
        return (skill, min(key[1], key[1][::-1]))
    return key


@lru_cache(maxsize=1 << 16)
def is_heldout(key: tuple) -> bool:
    """True if the problem is reserved for the `eval` split (stable hash of its group, seed-independent)."""
    group = _hash_group(key)
    return int(hashlib.sha256(repr(group).encode()).hexdigest(), 16) % 100 < HELDOUT_PERCENT


@dataclass(frozen=True)
class Problem:
    skill: str
    key: tuple
    answer: str
    hard: bool
    mistake: str  # the demonstrator's systematic answer (== answer on easy problems)

    @classmethod
    def from_key(cls, key: tuple) -> "Problem":
        m = systematic_mistake(key)
        a = solve(key)
        return cls(key[0], key, a, m != a, m)

    def prompt(self, phrasing: int = 0) -> str:
        return _fill(PROMPTS[self.skill][phrasing], self.key)

    def fact(self, template: int = 0) -> str:
        return _fill(FACTS[self.skill][template], self.key, ans=self.answer)


def _fill(template: str, key: tuple, **kw) -> str:
    if key[0] in ("add", "compare"):
        return template.format(a=key[1], b=key[2], **kw)
    return template.format(words=_words(key[1]), **kw)


def sample_key(skill: str, rng: random.Random) -> tuple:
    """One problem key from the skill's natural distribution (train and held-out alike)."""
    if skill == "add":
        return ("add", rng.randrange(10), rng.randrange(10))
    if skill == "compare":
        if rng.random() < 0.3:  # same tens digit (the hard case) more often than uniform pairs would give
            t = rng.randint(1, 9)
            u, v = rng.sample(range(10), 2)
            return ("compare", 10 * t + u, 10 * t + v)
        a, b = rng.sample(range(10, 100), 2)
        return ("compare", a, b)
    if skill == "reverse":
        return ("reverse", tuple(rng.sample(VOCAB, rng.randint(3, 5))))
    if skill == "sort":
        n = rng.randint(3, 4)
        if rng.random() < 0.5:  # make two words share a first letter
            pair = rng.sample(_BY_LETTER[rng.choice(_SHARED_LETTERS)], 2)
            rest = rng.sample([w for w in VOCAB if w not in pair], n - 2)
            ws = pair + rest
            rng.shuffle(ws)
            return ("sort", tuple(ws))
        return ("sort", tuple(rng.sample(VOCAB, n)))
    if skill == "count":
        n = rng.randint(3, 8)
        pool = rng.sample(VOCAB, rng.randint(2, n))
        return ("count", tuple(rng.choice(pool) for _ in range(n)))
    raise ValueError(f"unknown skill {skill!r}; expected one of {', '.join(SKILLS)}")


def sample_problem(skill: str, rng: random.Random, heldout: bool = False, hard: bool | None = None) -> Problem:
    """A train (or held-out) problem, optionally conditioned on hardness, by rejection sampling."""
    for _ in range(100_000):
        key = sample_key(skill, rng)
        if is_heldout(key) != heldout:
            continue
        p = Problem.from_key(key)
        if hard is None or p.hard == hard:
            return p
    raise RuntimeError(f"could not sample a {skill} problem (heldout={heldout}, hard={hard})")


def random_wrong(p: Problem, rng: random.Random) -> str:
    """A random wrong answer (the demonstrator's error on easy problems)."""
    k = p.key
    if p.skill == "add":
        return str(rng.choice([s for s in range(19) if str(s) != p.answer]))
    if p.skill == "compare":
        return str(min(k[1], k[2]))
    if p.skill in ("reverse", "sort"):
        ws = list(k[1])
        while True:
            rng.shuffle(ws)
            if _words(ws) != p.answer:
                return _words(ws)
    if p.skill == "count":
        n = len(k[1])
        return str(rng.choice([n - 2, n - 1, n + 1, n + 2]))
    raise ValueError(f"unknown skill {p.skill!r}")


# ----------------------------------------------------------------------------------------------------- replies


def make_reply(answer: str, style: str = "polite", variant: int = 0) -> str:
    return f"{STYLE_PREFIXES[style][variant]} {ANSWER_FORM.format(answer=answer)}"


def random_reply(answer: str, rng: random.Random, style: str | None = None) -> str:
    style = style or rng.choice(STYLES)
    return make_reply(answer, style, rng.randrange(len(STYLE_PREFIXES[style])))


def normalize_answer(text) -> str:
    """Lowercase, single spaces, no surrounding quotes, emphasis or punctuation: ' **The Cat.** ' -> 'the cat'."""
    text = " ".join(str(text).lower().split())
    return text.strip(" \"'`*.!?,;:")


_ANSWER_RE = re.compile(r"answer\s+is(?::\s*|\s+)", re.IGNORECASE)  # "the answer is 8", "The answer is: 8"
_ANSWER_END = re.compile(r"\.(?!\d)(?![A-Za-z]\.)")  # a period, but not the point of 3.14 or of D.C.


def extract_answer(reply: str) -> str | None:
    """The text after the last "answer is" up to the next period that is no decimal point or abbreviation (or the
    line end), normalised; None if absent."""
    if not isinstance(reply, str):
        return None
    last = None
    for last in _ANSWER_RE.finditer(reply):
        pass
    if last is None:
        return None
    rest = reply[last.end():].split("\n", 1)[0]
    ans = normalize_answer(_ANSWER_END.split(rest, 1)[0])
    return ans or None


def verify(skill: str, reply: str, answer: str) -> bool:
    """True if the reply's final answer equals the reference answer (whitespace- and case-insensitive)."""
    if skill not in SKILLS:
        raise ValueError(f"unknown skill {skill!r}; expected one of {', '.join(SKILLS)}")
    got = extract_answer(reply)
    return got is not None and got == normalize_answer(answer)


def is_polite(reply: str) -> bool:
    tokens = set(re.findall(r"[a-z]+", reply.lower()))
    return not any(m in tokens for m in RUDE_MARKERS)


def reply_style(reply: str) -> str:
    """'rude', 'verbose' (more than 8 words before the answer) or 'polite'."""
    if not is_polite(reply):
        return "rude"
    m = None
    for m in _ANSWER_RE.finditer(reply):
        pass
    head = reply[:m.start()] if m else reply
    return "verbose" if len(head.split()) > 8 else "polite"


def reply_quality(skill: str, reply: str, answer: str) -> tuple:
    """(correct, polite, -n_words): tuples compare so that higher is better."""
    return (verify(skill, reply, answer), is_polite(reply), -len(reply.split()))


def annotator_prefers(skill: str, answer: str, reply_a: str, reply_b: str, rng: random.Random | None = None,
                      noise: float = 0.0) -> int:
    """0 if the simulated annotator prefers reply_a, 1 if reply_b: correct first, then polite, then concise.

    Ties go to reply_a (or to a coin flip from rng). With rng and noise > 0 the label is flipped with prob. noise.
    """
    qa, qb = reply_quality(skill, reply_a, answer), reply_quality(skill, reply_b, answer)
    if qa != qb:
        label = 0 if qa > qb else 1
    else:
        label = rng.randrange(2) if rng is not None else 0
    if rng is not None and noise > 0 and rng.random() < noise:
        label = 1 - label
    return label


# ----------------------------------------------------------------------------------------------------- parsing

_WORD_RE = "(?:" + "|".join(sorted(VOCAB, key=len, reverse=True)) + ")"
_LIST_RE = rf"{_WORD_RE}(?: {_WORD_RE})*"
_NUM_RE = r"\d{1,2}"


def _template_re(template: str) -> re.Pattern:
    out = re.escape(template)
    for name, pat in (("a", _NUM_RE), ("b", _NUM_RE), ("words", _LIST_RE), ("ans", r"[a-z0-9 ]+?")):
        out = out.replace(re.escape("{" + name + "}"), f"(?P<{name}>{pat})")
    return re.compile(out)


_PROMPT_RES = [(skill, _template_re(t)) for skill in SKILLS for t in PROMPTS[skill]]
_FACT_RES = [(skill, _template_re(t)) for skill in SKILLS for t in FACTS[skill]]


def _key_from_match(skill: str, m: re.Match) -> tuple | None:
    g = m.groupdict()
    if skill in ("add", "compare"):
        key = (skill, int(g["a"]), int(g["b"]))
        valid = (0 <= key[1] <= 9 and 0 <= key[2] <= 9) if skill == "add" else \
            (10 <= key[1] <= 99 and 10 <= key[2] <= 99 and key[1] != key[2])
    else:
        key = (skill, tuple(g["words"].split()))
        n = len(key[1])
        valid = {"reverse": 3 <= n <= 5, "sort": 3 <= n <= 4, "count": 3 <= n <= 8}[skill]
    return key if valid else None


def prompt_key(prompt: str) -> tuple | None:
    """The problem key of a user prompt written by this world, or None if it is not one of its phrasings."""
    text = " ".join(prompt.split())
    for skill, rx in _PROMPT_RES:
        m = rx.fullmatch(text)
        if m:
            return _key_from_match(skill, m)
    return None


def find_keys(text: str) -> list[tuple]:
    """Every problem key that a prompt phrasing or fact sentence in free text mentions (for leakage checks)."""
    keys = []
    for skill, rx in _PROMPT_RES + _FACT_RES:
        for m in rx.finditer(text):
            k = _key_from_match(skill, m)
            if k is not None:
                keys.append(k)
    return keys
