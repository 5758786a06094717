"""Unpaired preference rows for the KTO stage: one loader, whatever the input format.

Rows come out in TRL's unpaired preference format: `prompt`, `completion` (both text, or both lists of messages),
a boolean `label` (true: a reply to learn from, false: one to unlearn), `tools` as JSON text when the row has tool
schemas, and every other column of the input kept as it was. The formats read (data/README.md):

    unpaired        TRL's: {"prompt", "completion", "label"} (text or messages)
    conversation    a conversation (messages, ShareGPT `conversations`, Alpaca instruction/output) with a `label`
                    or LLaMA-Factory's `kto_tag`: the trailing assistant turns are the completion, the rest the prompt
    pairs           preference pairs in any format of pipeline/preferences.py: each pair is two rows, its chosen
                    reply labelled true and its rejected one false (what TRL's KTOTrainer does with pairs)
"""

from __future__ import annotations

from pipeline import data
from pipeline.cli import PipelineError
from pipeline.formats import as_bool, bad_row, detect_sft_format, is_text_completion, to_sft_row
from pipeline.preferences import normalize_preferences

UNPAIRED_FORMATS = {
    "unpaired": "prompt + completion + label (TRL's unpaired preference)",
    "conversation": "a conversation (messages, conversations or instruction/output) + label or kto_tag",
    "pairs": "preference pairs (prompt/chosen/rejected or any pair format of data/README.md), each split in two",
}
LABEL_COLUMNS = ("label", "kto_tag")  # TRL's name, LLaMA-Factory's
DROPPED = {"messages", "conversations", "instruction", "input", "output", "history", "system", "prompt",
           "completion", "tools", "label", "kto_tag"}


def label_of(value, source, where) -> bool:
    """A row's label as a bool: true/false, 1/0, or their text (a CSV cell)."""
    label = as_bool(value)
    if label is None:
        bad_row(source, where, f"the label must be true or false, got {value!r}")
    return label


def detect_unpaired_format(first: dict, source) -> str:
    cols = set(first)
    if {"chosen", "rejected"} <= cols:
        return "pairs"
    if cols & set(LABEL_COLUMNS):
        if {"prompt", "completion"} <= cols:
            return "unpaired"
        if detect_sft_format(first) is not None:
            return "conversation"
    raise PipelineError(f"{source}: no unpaired preference format matches the columns ({', '.join(first) or 'none'})"
                        f"; expected " + "; ".join(UNPAIRED_FORMATS.values()))


def split_reply(messages: list[dict], source, where) -> tuple[list[dict], list[dict]]:
    """A conversation as (prompt, completion): the completion is its trailing assistant turns, the rest the prompt
    (after a tool call and its result, the final reply alone is judged), as LLaMA-Factory cuts a KTO row."""
    cut = len(messages)
    while cut > 0 and messages[cut - 1]["role"] == "assistant":
        cut -= 1
    if cut == len(messages):
        bad_row(source, where, "the conversation must end with the assistant reply (the completion)")
    if cut == 0:
        bad_row(source, where, "the conversation has no prompt before the assistant reply")
    return messages[:cut], messages[cut:]


def balance(labels) -> dict:
    """How many rows there are, and how many of them are desirable (labelled true) and undesirable."""
    desirable = sum(bool(label) for label in labels)
    return {"examples": len(labels), "desirable": desirable, "undesirable": len(labels) - desirable}


def _unpair(row: dict) -> list[dict]:
    rest = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected", "margin")}
    # the pair's own columns are kept, but a `completion` or `label` of its own gives way to the split's
    return [{**rest, "prompt": row["prompt"], "completion": row["chosen"], "label": True},
            {**rest, "prompt": row["prompt"], "completion": row["rejected"], "label": False}]


def normalize_unpaired(rows: list[dict], where: list[str], source, part_of: list[int] | None = None
                       ) -> tuple[list[dict], dict, list]:
    """Rows of any unpaired format (UNPAIRED_FORMATS) -> TRL's unpaired rows, what was done, and each row's place
    (a pair's two rows share it). Each dataset of a list (part_of: its index, per row) has the format and label
    column of its own first row; datasets that differ in them are read each on its own, in list order."""
    plans, part_of = data.plans_by_dataset(rows, where, source, part_of,  # dataset index: (format, label column)
                                           lambda first, at: (detect_unpaired_format(first, at),
                                                              next((c for c in LABEL_COLUMNS if c in first), None)))
    if len(set(plans.values())) > 1:  # e.g. TRL's `label` beside LLaMA-Factory's `kto_tag`
        return _each_dataset(rows, where, source, part_of, list(plans))
    fmt, label_column = next(iter(plans.values()))
    if fmt == "pairs":
        pairs, pair_info, pair_places = normalize_preferences(rows, where, source, part_of)
        out = [r for pair in pairs for r in _unpair(pair)]
        places = [w for w in pair_places for _ in range(2)]
        conversational = pair_info["conversational"]
    else:
        out, conversational, places = [], None, list(where)
        for row, w in zip(rows, where):
            if label_column not in row:
                bad_row(source, w, f"missing column '{label_column}' (columns: {', '.join(row) or 'none'})")
            sft_format = "prompt_completion" if fmt == "unpaired" else detect_sft_format(row)
            if sft_format is None or (fmt == "unpaired") != ({"prompt", "completion"} <= set(row)):
                bad_row(source, w, f"not in the format of the first row, {UNPAIRED_FORMATS[fmt]} (columns: "
                                   f"{', '.join(row) or 'none'})")
            converted = to_sft_row(row, sft_format, source, w)
            if "messages" in converted:
                converted["prompt"], converted["completion"] = split_reply(converted.pop("messages"), source, w)
            is_conv = not is_text_completion(converted)
            if conversational is not None and is_conv != conversational:
                bad_row(source, w, f"mixes text and conversation rows (earlier rows are "
                                   f"{'conversations' if conversational else 'text'})")
            conversational = is_conv
            out.append({**{k: v for k, v in row.items() if k not in DROPPED}, **converted,
                        "label": label_of(row[label_column], source, w)})
    info = {"source": str(source), "format": fmt, "conversational": bool(conversational), "rows": len(rows),
            **balance([r["label"] for r in out])}
    return out, info, places


def _each_dataset(rows, where, source, part_of, parts) -> tuple[list[dict], dict, list]:
    """normalize_unpaired of each dataset of a list on its own (`parts`: their indices in list order), joined."""
    out, infos, places = [], [], []
    for part in parts:
        mine = [i for i, p in enumerate(part_of) if p == part]
        rows_of, info, places_of = normalize_unpaired([rows[i] for i in mine], [where[i] for i in mine], source)
        if infos and info["conversational"] != infos[0]["conversational"]:
            bad_row(source, where[mine[0]], f"mixes text and conversation rows (earlier datasets are "
                                            f"{'conversations' if infos[0]['conversational'] else 'text'})")
        out += rows_of
        places += places_of
        infos.append(info)
    info = {"source": str(source), "format": " + ".join(dict.fromkeys(i["format"] for i in infos)),
            "conversational": infos[0]["conversational"], "rows": len(rows), **balance([r["label"] for r in out])}
    return out, info, places


def load_unpaired(spec, recipe, columns: dict | None = None, places: bool = False):
    """Unpaired preference rows of any supported format, normalized; returns (Dataset, info), with `places` also
    where each row is from (a pair's two rows: its place). `columns` maps our column names to the file's
    ({completion: reply, label: thumbs_up})."""
    from pipeline.formats import rename_columns

    rows, where, source, part_of = data.read_rows_by_part(spec, recipe)
    rows = rename_columns(rows, columns, source, where)
    out, info, kept = normalize_unpaired(rows, where, source, part_of)
    if not out:
        raise PipelineError(f"{source}: no rows left to learn from (every pair has chosen equal to rejected)")
    return (data.dataset_of(out, source, kept), info) + ((kept,) if places else ())
