"""Preference pairs for the reward, DPO and PPO stages: one loader, whatever the input format.

One loader for the reward, DPO and PPO stages. Whatever the input format, rows come out in ONE normalized TRL
format: explicit `prompt`, `chosen`, `rejected` (lists of messages when the input was conversational or Anthropic
HH text, plain strings otherwise), an optional float `margin` (TRL's RewardTrainer subtracts it inside the loss),
and every other column of the input kept as it was (e.g. the world's skill, hard, clean_agrees).
"""

from __future__ import annotations

import json
import re
from collections import Counter

from pipeline import data, log
from pipeline.cli import PipelineError
from pipeline.formats import (as_messages, bad_row, check_messages, check_tool_calls, finite_number, json_messages,
                              prompt_cells, sharegpt_messages, tools_json, tools_of)


PREFERENCE_FORMATS = {
    "explicit": "prompt + chosen + rejected (text or lists of messages)",
    "implicit": "chosen + rejected full conversations (the shared beginning is the prompt)",
    "implicit_text": "chosen + rejected full texts (the shared beginning, cut at a space, is the prompt)",
    "hh": "chosen + rejected Anthropic HH-RLHF text (\\n\\nHuman: ... \\n\\nAssistant: ...)",
    "hh_explicit": "prompt (HH text ending in 'Assistant:') + chosen + rejected replies",
    "sharegpt": "conversations (ShareGPT from/value) + chosen + rejected (message objects or text)",
    "alpaca": "instruction (+ input, system, history) + chosen + rejected (Alpaca / LLaMA-Factory)",
}
PREFERENCE_EXPECTED = ("prompt/chosen/rejected, chosen/rejected (full conversations or Anthropic HH text), "
                       "conversations/chosen/rejected (ShareGPT) or instruction/chosen/rejected (Alpaca); "
                       "optionally score_chosen/score_rejected or margin")
CONVERTED = ("sharegpt", "alpaca")  # turned into the explicit conversational format row by row
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


def parse_hh(text: str) -> list[dict] | None:
    """Anthropic HH-RLHF text as messages (Human -> user, Assistant -> assistant); None if not in that form."""
    if not isinstance(text, str) or not re.match(r"\s*Human:", text):
        return None
    parts = _HH_TURN.split(text.lstrip(" \t\n"))  # [before, role, content, role, content, ...]
    if len(parts) < 5 or parts[0].strip():
        return None
    return [{"role": "user" if role == "Human" else "assistant", "content": content.strip()}
            for role, content in zip(parts[1::2], parts[2::2])]


def same_messages(a: list, b: list) -> bool:
    """Whether two lists of messages render alike: a message key holding None is none (the chat template never sees
    it: transformers drops such keys), as in JSON Lines written from Arrow (Dataset.to_json), where one side's messages
    carry `"tool_calls": null` because the other side's have calls."""
    def plain(m):
        return {k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m
    return len(a) == len(b) and all(plain(x) == plain(y) for x, y in zip(a, b))


def _split_conversations(chosen: list, rejected: list, source, where):
    """Shared leading messages -> prompt; the rest of each side (starting at an assistant turn) -> completions."""
    n = 0
    while n < min(len(chosen), len(rejected)) and same_messages(chosen[n:n + 1], rejected[n:n + 1]):
        n += 1
    if n == len(chosen) == len(rejected):
        return chosen, [], []  # identical conversations: the caller drops the pair
    # the completions must start with an assistant turn: move the cut back to one
    k = n
    while k > 0 and not (k < len(chosen) and k < len(rejected)
                         and chosen[k]["role"] == "assistant" and rejected[k]["role"] == "assistant"):
        k -= 1
    if k == 0:
        bad_row(source, where, "chosen and rejected share no prompt that ends before an assistant reply")
    return chosen[:k], chosen[k:], rejected[k:]


def _split_text(chosen: str, rejected: str, source, where):
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if chosen == rejected:
        return chosen, "", ""
    cut = max(chosen.rfind(" ", 0, n), chosen.rfind("\n", 0, n)) + 1  # keep whole words in the replies
    if chosen[cut - 1:cut] == " ":  # the space starts the replies, as TRL's extract_prompt leaves it
        cut -= 1
    if not chosen[:cut].strip():
        bad_row(source, where, "chosen and rejected share no prompt (no common beginning ending at a space)")
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _reply(value, source, where, col):
    """A reply given as a message object (ShareGPT {from, value} or {role, content}), a list of them, or text, as
    a list of assistant messages (a ShareGPT function_call turn as an assistant tool call)."""
    value = json_messages(value)
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        bad_row(source, where, f"'{col}' must be a message object, a list of messages or text")
    # ShareGPT turns (gpt: assistant, function_call: a tool call) read as the column's turns: one lacking a key is named
    if any("from" in m and "role" not in m for m in value):
        return sharegpt_messages({col: value}, source, where, col)
    return value


def _to_explicit(row: dict, fmt: str, source, where) -> dict:
    """A ShareGPT or Alpaca preference row as an explicit conversational pair (other columns kept)."""
    from pipeline.formats import alpaca_messages

    for col in ("chosen", "rejected") + (("conversations",) if fmt == "sharegpt" else ("instruction",)):
        if col not in row:
            bad_row(source, where, f"missing column '{col}' (columns: {', '.join(row) or 'none'}; format: "
                                   f"{PREFERENCE_FORMATS[fmt]})")
    if fmt == "sharegpt":
        prompt = sharegpt_messages(row, source, where)
    else:
        prompt = alpaca_messages({**row, "output": ""}, source, where)[:-1]
    if not prompt or prompt[-1]["role"] not in ("user", "tool"):  # LLaMA-Factory's odd turns: human, observation
        bad_row(source, where, "the conversation must end with a user turn (or a tool result, an observation) before "
                               "the chosen/rejected replies")
    drop = ("conversations", "system", "tools", "instruction", "input", "history")
    tools = tools_of(row, source, where)
    return {**{k: v for k, v in row.items() if k not in drop}, **({"tools": json.dumps(tools)} if tools else {}),
            "prompt": prompt,
            "chosen": _reply(row["chosen"], source, where, "chosen"),
            "rejected": _reply(row["rejected"], source, where, "rejected")}


def _detect_preference_format(first: dict, source) -> str:
    cols = set(first)
    if {"conversations", "chosen", "rejected"} <= cols:
        return "sharegpt"
    if {"instruction", "chosen", "rejected"} <= cols:
        return "alpaca"
    if not {"chosen", "rejected"} <= cols:
        have = ", ".join(first) or "none"
        raise PipelineError(f"{source}: no preference format matches the columns ({have}); expected "
                            f"{PREFERENCE_EXPECTED}")
    chosen = json_messages(first["chosen"])
    if "prompt" in cols:
        prompt = json_messages(first["prompt"])
        if isinstance(prompt, str) and isinstance(chosen, list) and chosen and isinstance(chosen[0], dict) \
                and chosen[0].get("role", "assistant") != "assistant":  # (ShareGPT reply turns have no role)
            # a text prompt beside whole conversations that hold it (HuggingFaceH4/ultrafeedback_binarized): the
            # conversations' shared beginning is the prompt, as TRL's maybe_extract_prompt takes it
            return "implicit"
        if isinstance(prompt, str) and not isinstance(chosen, list):
            turns = parse_hh(prompt)
            if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
                return "hh_explicit"
        return "explicit"
    if isinstance(chosen, list):
        return "implicit"
    if parse_hh(chosen) is not None:
        return "hh"
    return "implicit_text"


def _pair_margin(row, margin_from, source, where):
    cols = ("margin",) if margin_from == "margin" else ("score_chosen", "score_rejected")
    values = {c: finite_number(row.get(c)) for c in cols}
    for col, v in values.items():
        if v is None:
            bad_row(source, where, f"'{col}' must be a finite number, got {row.get(col)!r}")
    margin = values["margin"] if margin_from == "margin" else values["score_chosen"] - values["score_rejected"]
    if margin < 0:
        bad_row(source, where, f"negative margin {margin:g}: the chosen reply must score at least as high as the "
                            f"rejected one")
    return margin


def _margin_from(first: dict, source) -> str | None:
    """Where a dataset's pairs take their margin from (its first row's columns), or None."""
    cols = set(first)
    if "margin" in cols:
        return "margin"
    if {"score_chosen", "score_rejected"} & cols:
        missing = {"score_chosen", "score_rejected"} - cols
        if missing:
            raise PipelineError(f"{source}: has {({'score_chosen', 'score_rejected'} - missing).pop()} but no "
                                f"{missing.pop()} column (scores come in pairs)")
        return "score_chosen - score_rejected"
    return None


def normalize_preferences(rows, where, source, part_of: list[int] | None = None) -> tuple[list[dict], dict, list]:
    """Rows of any supported preference format -> normalized rows, what was done (format, drops, margin), and each
    pair's place (its row's `where`: identical pairs are left out, so the places no longer line up with rows). Each
    dataset of a list (part_of: its index, per row) has the format and margin of its own first row (a dataset
    without margins among ones with: its pairs' margin is None, which the reward stage refuses)."""
    plans, part_of = data.plans_by_dataset(rows, where, source, part_of,  # dataset index: (format, margin_from)
                                           lambda first, at: (_detect_preference_format(first, at),
                                                              _margin_from(first, at)))
    conversational = None
    out, places, identical = [], [], 0
    for i, (row, w) in enumerate(zip(rows, where)):
        fmt, margin_from = plans[part_of[i]]
        needed = ("prompt", "chosen", "rejected") if fmt in ("explicit", "hh_explicit") else ("chosen", "rejected")
        if fmt in CONVERTED:
            row = _to_explicit(row, fmt, source, w)
        for col in needed:
            if col not in row:
                bad_row(source, w, f"missing column '{col}' (columns: {', '.join(row) or 'none'}; format: "
                                f"{PREFERENCE_FORMATS[fmt]})")
        chosen, rejected = json_messages(row["chosen"]), json_messages(row["rejected"])
        prompt = json_messages(row.get("prompt"))
        if fmt in ("explicit", *CONVERTED):
            if any(isinstance(v, dict) or (isinstance(v, list) and any(isinstance(m, dict) and "from" in m for m in v))
                   for v in (chosen, rejected)):  # a reply as one message object, or as ShareGPT turns
                chosen, rejected = _reply(chosen, source, w, "chosen"), _reply(rejected, source, w, "rejected")
            for col, v in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
                if not isinstance(v, (str, list)):
                    bad_row(source, w, f"'{col}' must be text or a list of messages, got {type(v).__name__}")
            if isinstance(prompt, str) and not prompt.strip():
                bad_row(source, w, "'prompt' is empty")
            if isinstance(prompt, list) or isinstance(chosen, list) or isinstance(rejected, list):
                prompt = check_messages(prompt, source, w, need_assistant=False) if isinstance(prompt, list) \
                    else [{"role": "user", "content": prompt}]
                chosen, rejected = [check_messages(v, source, w) if isinstance(v, list)
                                    else [{"role": "assistant", "content": v}] for v in (chosen, rejected)]
        elif fmt == "hh_explicit":
            turns = parse_hh(prompt) if isinstance(prompt, str) else None
            if not turns or turns[-1]["role"] != "assistant" or turns[-1]["content"] or len(turns) < 2:
                bad_row(source, w, "'prompt' is not Anthropic HH text ending in '\\n\\nAssistant:'")
            for col, v in (("chosen", chosen), ("rejected", rejected)):
                if not isinstance(v, str):
                    bad_row(source, w, f"'{col}' must be text, like the first row's")
            prompt = turns[:-1]
            chosen, rejected = [{"role": "assistant", "content": chosen.strip()}], \
                [{"role": "assistant", "content": rejected.strip()}]
        elif fmt == "implicit":
            for col, v in (("chosen", chosen), ("rejected", rejected)):
                if not isinstance(v, list):
                    bad_row(source, w, f"'{col}' must be a list of messages, like the first row's")
                check_messages(v, source, w)
            prompt, chosen, rejected = _split_conversations(chosen, rejected, source, w)
        elif fmt == "hh":
            turns_c, turns_r = parse_hh(chosen), parse_hh(rejected)
            for col, turns in (("chosen", turns_c), ("rejected", turns_r)):
                if turns is None:
                    bad_row(source, w, f"'{col}' is not Anthropic HH text (\\n\\nHuman: ... \\n\\nAssistant: ...)")
                if turns[-1]["role"] != "assistant":
                    bad_row(source, w, f"'{col}' does not end with an Assistant turn")
            prompt, chosen, rejected = _split_conversations(turns_c, turns_r, source, w)
        else:  # implicit_text
            for col, v in (("chosen", chosen), ("rejected", rejected)):
                if not isinstance(v, str):
                    bad_row(source, w, f"'{col}' must be text, like the first row's")
            prompt, chosen, rejected = _split_text(chosen, rejected, source, w)
        is_conv = isinstance(chosen, list)
        if conversational is None:
            conversational = is_conv
        elif is_conv != conversational:
            bad_row(source, w, "mixes text and conversation pairs (earlier rows are "
                            f"{'conversations' if conversational else 'text'})")
        if same_messages(chosen, rejected) if is_conv else chosen == rejected:
            identical += 1
            continue
        pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        if margin_from:
            pair["margin"] = _pair_margin(row, margin_from, source, w)
        pair.update((k, v) for k, v in row.items() if k not in ("prompt", "chosen", "rejected", "margin"))
        tools = tools_of(row, source, w)
        if is_conv:  # calls fit the row's tools; arguments become JSON strings (one Arrow schema, as for sft)
            for col in ("prompt", "chosen", "rejected"):
                check_tool_calls(pair[col], tools, source, f"{w}: {col}")
        if "tools" in pair:  # no tools ("[]" too): None; a list: JSON text
            pair["tools"] = tools_json(row["tools"], tools)
        out.append(pair)
        places.append(w)
    info = {"source": str(source), "format": " + ".join(dict.fromkeys(f for f, _ in plans.values())),
            "conversational": bool(conversational), "rows": len(rows), "pairs": len(out),
            "identical_dropped": identical, "margin": " + ".join(dict.fromkeys(m for _, m in plans.values() if m))
            or None}
    return out, info, places


def load_preferences(spec, recipe, columns: dict | None = None, places: bool = False):
    """Preference pairs of any supported format (see PREFERENCE_FORMATS), normalized; returns (Dataset, info), with
    `places` also where each pair is from (for a check after loading: a list's files and their own rows). `columns`
    maps our column names to the file's ({prompt: question, chosen: good, rejected: bad})."""
    from pipeline.formats import rename_columns

    rows, where, source, part_of = data.read_rows_by_part(spec, recipe)
    ds, info, kept = pairs_dataset(rename_columns(rows, columns, source, where), where, source, part_of)
    return (ds, info) + ((kept,) if places else ())


def pairs_dataset(rows: list[dict], where: list[str], source, part_of: list[int] | None = None):
    """Rows read from `source` as normalized pairs in a Dataset, what was done, and where each pair is from
    (normalize_preferences)."""
    pairs, info, places = normalize_preferences(rows, where, source, part_of)
    if not pairs:
        raise PipelineError(f"{source}: no pairs left: all {info['identical_dropped']} have chosen equal to rejected")
    return data.dataset_of(pairs, source, places), info, places


PROMPT_COLUMNS = ("prompt", "skill", "answer", "tools", "kind", "expect")  # what ppo keeps of a prompt row


def prompt_rows(rows: list[dict], where: list[str], source, part_of: list[int] | None, pairs: bool = False,
                all_rows: bool = True):
    """ppo's prompts from rows as data.read_rows_by_part reads them (columns mapped): each dataset of a list is
    preference pairs (its first row has chosen and rejected: read as reward and dpo read them, so an HH prompt is its
    turns) or prompts, the prompt datasets' rows first. Text prompts beside prompts of messages become the user turns
    they are rendered as (one column type). Each row keeps PROMPT_COLUMNS (pairs: also chosen/rejected). Returns
    (rows, where each is from, format). Not `all_rows` (run.py --check's first rows of more): pairs that are all
    identical there leave no rows, no error (the stage reads on)."""
    plans, part_of = data.plans_by_dataset(rows, where, source, part_of,
                                           lambda first, _: "chosen" in first and "rejected" in first)
    of_prompts = [i for i, part in enumerate(part_of) if not plans[part]]
    of_pairs = [i for i, part in enumerate(part_of) if plans[part]]
    out, places, fmt = [], [], []
    if of_prompts:
        out += data.CHECKS["prompts"]([rows[i] for i in of_prompts], [where[i] for i in of_prompts], source)
        places += [where[i] for i in of_prompts]
        fmt.append("prompts")
    if of_pairs:
        normalized, info, pair_places = normalize_preferences([rows[i] for i in of_pairs], [where[i] for i in of_pairs],
                                                              source, [part_of[i] for i in of_pairs])
        if not normalized and not of_prompts and all_rows:
            raise PipelineError(f"{source}: no pairs left: all {info['identical_dropped']} have chosen equal to "
                                f"rejected")
        if info["identical_dropped"]:
            log.info(f"{source}: {info['identical_dropped']} pairs with chosen equal to rejected left out")
        out += normalized
        places += pair_places
        fmt.append(f"the prompts of {info['format']} preference pairs")
    if any(isinstance(row["prompt"], list) for row in out):
        for row in out:
            row["prompt"] = as_messages(row["prompt"])
    keep = PROMPT_COLUMNS + (("chosen", "rejected") if pairs else ())
    out = [{c: row[c] for c in keep if c in row} for row in out]
    for row, w in zip(out, places):  # as eval reads them (data's eval_prompts check)
        prompt_cells(row, source, w)
    return out, places, " + ".join(fmt)


WHITESPACE = (" ", "\t", "\n", "\r")


def _text_prompt_roots(prompts: list) -> dict[str, str]:
    """Each distinct text prompt's root: the shortest prompt it extends word-wise ("Q? Answer: The answer is" extends
    "Q? Answer:"). Implicit text pairs of one question get such prompts (the part chosen and rejected share), and
    keyed by their exact text one question landed on both sides of a split."""
    def extends(p, shorter):  # at a word: the next character, or the shorter one's last, is ASCII whitespace
        return p.startswith(shorter) and (p[len(shorter):len(shorter) + 1] in WHITESPACE
                                          or shorter[-1:] in WHITESPACE)

    # in sorted order a prompt's extensions follow it (ASCII whitespace sorts before the characters that do not
    # extend it at a word); stack: prompts each extending the one below it
    roots, stack = {}, []
    for p in sorted({p for p in prompts if isinstance(p, str)}):
        while stack and not extends(p, stack[-1]):
            stack.pop()
        roots[p] = stack[0] if stack else p
        stack.append(p)
    return roots


def split_by_prompt(ds, fraction: float, seed: int, source: str, unit: str = "pairs", places: list | None = None):
    """Hold out `fraction` of the prompts (with all their pairs, or kto's rows: `unit`), so no prompt is on both
    sides; a text prompt goes with the shorter ones it extends (_text_prompt_roots). (train, held-out), with
    `places` (where each row is from) also each side's places."""
    import random

    if not 0 < fraction < 1:
        raise PipelineError(f"eval_fraction must be between 0 and 1, got {fraction}")
    column = ds["prompt"]
    roots = _text_prompt_roots(column)
    if grouped := sum(root != p for p, root in roots.items()):
        sizes = Counter(roots.values())
        log.info(f"{source}: {grouped} text prompts held out or kept with a shorter prompt they extend (the largest "
                 f"group: {max(sizes.values())} prompts under {next(r for r, n in sizes.most_common(1))[:60]!r})")
    keys = [json.dumps(roots.get(p, p) if isinstance(p, str) else p, sort_keys=True) for p in column]
    prompts = sorted(set(keys))
    if len(prompts) < 2:
        raise PipelineError(f"{source}: {len(ds)} {unit} with {len(prompts)} distinct prompt: too few to hold any "
                            f"out; give an eval_dataset")
    random.Random(seed).shuffle(prompts)
    n_eval = min(len(prompts) - 1, max(1, round(fraction * len(prompts))))
    held = set(prompts[:n_eval])
    train_idx = [i for i, k in enumerate(keys) if k not in held]
    eval_idx = [i for i, k in enumerate(keys) if k in held]
    return (ds.select(train_idx), ds.select(eval_idx)) + (() if places is None else (
        [places[i] for i in train_idx], [places[i] for i in eval_idx]))


def load_preference_splits(dataset, eval_dataset, eval_fraction: float, recipe, columns: dict | None = None,
                           places: bool = False):
    """Training and held-out pairs for a preference stage: `eval_dataset`, or `eval_fraction` of the training
    prompts held out. Returns (train, held_out, train_info, held_out_info), with `places` also where each side's
    pairs are from (their files' own rows, for models.check_chat_template)."""
    train_ds, train_info, train_places = load_preferences(dataset, recipe, columns, places=True)
    if eval_dataset:
        eval_ds, eval_info, eval_places = load_preferences(eval_dataset, recipe, columns, places=True)
    else:
        train_ds, eval_ds, train_places, eval_places = split_by_prompt(train_ds, eval_fraction, recipe.run.seed,
                                                                       train_info["source"], places=train_places)
        # the rows read and the identical pairs left out were counted once, before the split: the training side's
        eval_info = {**train_info, "source": f"{train_info['source']} (held-out {eval_fraction:.0%} of prompts)",
                     "rows": len(eval_ds), "pairs": len(eval_ds), "identical_dropped": 0}
        train_info = {**train_info, "rows": train_info["rows"] - len(eval_ds), "pairs": len(train_ds)}
    return (train_ds, eval_ds, train_info, eval_info) + ((train_places, eval_places) if places else ())
