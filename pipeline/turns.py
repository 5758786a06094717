"""sft's `drop_oldest_turns`: a conversation over max_length tokens loses whole oldest exchanges, not tokens.

TRL's token truncation cuts a conversation mid-turn: keep_start loses its last replies, keep_end (deprecated in TRL
1.x, gone in 2.0) its system message and tool schemas. An exchange is a user turn and everything after it up to the
next user turn (the reply, its tool calls and tool results). The system message(s) at the start, the `tools` and the
last exchange with a reply always stay.
"""

import json

from pipeline.formats import is_text_completion


def row_length(tokenizer, row: dict) -> int:
    """A row's tokens as the trainer tokenizes it: the chat template with the row's tools, or (text prompt/completion)
    the prompt and completion and the eos."""
    tools = json.loads(row["tools"]) if row.get("tools") else None
    if "messages" in row:
        messages = row["messages"]
    elif is_text_completion(row):
        return len(tokenizer(row["prompt"] + row["completion"])["input_ids"]) + 1  # + eos
    else:
        messages = row["prompt"] + row["completion"]
    return len(tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True)["input_ids"])


def exchanges(messages: list[dict]) -> tuple[list[dict], list[list[dict]]]:
    """The system message(s) at the start, and the rest cut before each user turn (what comes before the first user
    turn, if anything, is an exchange of its own)."""
    start = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
    parts = []
    for m in messages[start:]:
        if m["role"] == "user" or not parts:
            parts.append([])
        parts[-1].append(m)
    return messages[:start], parts


def drop_oldest_turns(tokenizer, row: dict, max_length: int) -> dict:
    """`row` (a conversation) with the fewest of its oldest exchanges left out that make it fit max_length tokens. A
    row that fits, or that does not even with only its last exchange with a reply, comes back as it is: TRL's
    truncation_mode cuts it, as without the key."""
    if row_length(tokenizer, row) <= max_length:
        return row
    head, parts = exchanges(row["messages"])
    last = max((i for i, part in enumerate(parts) if any(m["role"] == "assistant" for m in part)), default=0)
    for first in range(1, last + 1):  # one more exchange dropped at a time: the row grows shorter with each
        shorter = {**row, "messages": head + [m for part in parts[first:] for m in part]}
        if row_length(tokenizer, shorter) <= max_length:
            return shorter
    return row


def fit_conversations(tokenizer, ds, max_length: int):
    """(`ds` with each conversation over max_length shortened by drop_oldest_turns, how many were shortened)."""
    shortened = {}
    for i, row in enumerate(ds):
        kept = drop_oldest_turns(tokenizer, row, max_length)
        if kept is not row:
            shortened[i] = kept["messages"]
    if not shortened:
        return ds, 0
    return ds.map(lambda row, i: {"messages": shortened.get(i, row["messages"])}, with_indices=True,
                  features=ds.features), len(shortened)
