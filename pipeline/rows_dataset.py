"""Rows a loader checked (pipeline/data.py's, preferences.py's, unpaired.py's) as one `datasets.Dataset`: one Arrow
type per column, or one line naming the column and the rows whose types clash."""

from __future__ import annotations

from pipeline.cli import PipelineError, first_line


def dataset_of(rows: list[dict], source, where: list[str] | None = None):
    """A `datasets.Dataset` with every column any row has (None where a row lacks it: a mixture of datasets with
    different columns, e.g. world:sft with world:tool_sft, keeps each one's `tools`). `where`: each row's place,
    to name the row whose column's type differs from the rows before it."""
    import datasets

    columns = list(dict.fromkeys(k for row in rows for k in row))
    try:
        return _one_message_type(datasets.Dataset.from_dict({k: [row.get(k) for row in rows] for k in columns}))
    except Exception as err:  # mixed types across rows that Arrow cannot unify
        clash = _type_clash(rows, columns, where) or first_line(err)
        raise PipelineError(f"{source}: rows do not share one schema: {clash}") from None


def _type_clash(rows: list[dict], columns: list[str], where: list[str] | None) -> str | None:
    """The first column whose values Arrow cannot hold as one type, and the first row whose value's type differs
    from the first value's (None if no single column fails alone)."""
    import datasets

    for column in columns:
        values = [row.get(column) for row in rows]
        try:
            datasets.Dataset.from_dict({column: values})
            continue
        except Exception:
            pass
        present = [(i, v) for i, v in enumerate(values) if v is not None]
        first_i, first = present[0]
        for i, v in present:
            if type(v) is not type(first):
                place = (f" ({where[first_i]}) and {type(v).__name__} {v!r:.40} ({where[i]})" if where
                         else f" and {type(v).__name__} {v!r:.40}")
                return f"column '{column}' holds {type(first).__name__} {first!r:.40}{place}"
        return f"column '{column}' (its values differ in their inner types)"
    return None


def _one_message_type(ds):
    """Every column of chat messages (prompt, chosen, rejected, messages, ...) with one message type: the union of
    their fields. TRL concatenates them (prompt + chosen) inside `map`, which cannot write a message with
    `tool_calls` into a column whose messages never had any (pairs whose prompt holds a tool call)."""
    import datasets

    def is_messages(f):
        return isinstance(f, datasets.List) and isinstance(f.feature, dict) and "role" in f.feature

    def is_null(f):
        return isinstance(f, datasets.Value) and f.dtype == "null"

    columns = [c for c, f in ds.features.items() if is_messages(f)]
    merged = {}
    for c in columns:
        for k, f in ds.features[c].feature.items():
            if k not in merged or is_null(merged[k]):
                merged[k] = f
    if all(ds.features[c].feature == merged for c in columns):
        return ds
    features = ds.features.copy()
    for c in columns:
        features[c] = datasets.List(merged)
    return ds.cast(features)
