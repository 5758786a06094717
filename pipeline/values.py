"""Values in recipe sections: coercing YAML values to a config field's declared type, naming types and the closest
valid key in error messages. Shared by the recipe loader and the Slurm settings; imports nothing of the package."""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from functools import lru_cache
from typing import Any


@lru_cache(maxsize=None)
def field_types(cls) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # a forward reference we cannot resolve: fall back to "anything goes"
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def type_name(tp) -> str:
    if tp is Any:
        return "any"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


class Mismatch(Exception):
    """A value that does not fit the declared type."""


def coerce(value, tp):
    """Return value converted to type tp, or raise Mismatch. YAML leaves '1e-4' a string: accept it for floats."""
    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        # str after the other scalars ('1e-4' becomes a float where allowed), lists last (a string stays a string
        # where the type allows one, and becomes a list of one only where it does not)
        for arg in sorted(args, key=lambda a: 2 if _is_list(a) else a is str):
            if arg is type(None):
                continue
            try:
                return coerce(value, arg)
            except Mismatch:
                pass
        raise Mismatch
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise Mismatch
    if _is_list(tp):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):  # one value for a list: a list of one, as TRL's CLI (nargs="+")
            if not args or not (args[0] in (str, int, float) or typing.get_origin(args[0]) is typing.Literal):
                raise Mismatch  # and its configs (loss_type="sigmoid") take it; only for lists of plain values
            return [coerce(value, args[0])]
        return [coerce(v, args[0]) if args else v for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise Mismatch
        return value
    if tp is type(None):
        if value is None:
            return None
        raise Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise Mismatch from None
        raise Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise Mismatch
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        values = [m.value for m in tp]  # a list: a list or mapping given for a name is compared, not hashed
        if isinstance(value, tp) or value in values:
            return value
        raise Mismatch
    return value  # a type we do not check (a config class handles it)


def _is_list(tp) -> bool:
    return typing.get_origin(tp) in (list, tuple, typing.Sequence) or tp in (list, tuple)


def closest(name: str, valid) -> str:
    close = difflib.get_close_matches(name, list(valid), n=3, cutoff=0.5)
    return f" (closest: {', '.join(close)})" if close else ""


# transformers 5 renamed these config fields; the old names (TRL's configs default gradient_checkpointing to true, and
# recipes written for TRL set it) still work, with a FutureWarning at every config built
RENAMED_FIELDS = {"gradient_checkpointing": "activation_checkpointing",
                  "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs"}


def by_new_names(config_class, values: dict) -> dict:
    """`values` with each renamed field given by its new name, as the config class resolves them (the new name's
    value, else the old name's, else the class's default of the old one), so building it warns of no old name."""
    out = dict(values)
    if not dataclasses.is_dataclass(config_class):
        return out
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    for old, new in RENAMED_FIELDS.items():
        if old in fields and new in fields and out.get(new, fields[new].default) in (None, dataclasses.MISSING):
            default = fields[old].default if fields[old].default is not dataclasses.MISSING else None
            if (value := out.pop(old, default)) is not None:
                out[new] = value
    return out


def field_value(config_class, values: dict, name: str):
    """What `config_class(**by_new_names(config_class, values))` holds in field `name` (a renamed field: its new
    name), read without building it: the value given, else the class's default; None for a field it lacks."""
    fields = {f.name: f for f in dataclasses.fields(config_class)} if dataclasses.is_dataclass(config_class) else {}
    if name not in fields:
        return None
    default = fields[name].default if fields[name].default is not dataclasses.MISSING else None
    return by_new_names(config_class, values).get(name, default)
