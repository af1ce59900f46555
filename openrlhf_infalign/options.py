"""Flags written once: a settings dataclass per command, each field's flags, help and default in its metadata.

:func:`option` declares a field; :func:`add_arguments` generates the argparse flags of a dataclass from it,
:func:`settings_from_args` reads them back, :func:`flag_table` writes the Markdown table the docs carry (generated:
``python -m openrlhf_infalign.options``; a test fails when the committed tables drift). The way TRL builds its CLI
from its config dataclasses. The value parsers every command shares (:func:`parse_ns`, :func:`parse_floats`) live
here too, so a list flag means the same in the `infalign` console and in ``openrlhf train_ppo``.
"""

from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, field, fields
from typing import Any, Dict, List, Optional

__all__ = [
    "add_arguments",
    "default_words",
    "dest_of",
    "flag_table",
    "option",
    "parse_floats",
    "parse_ns",
    "settings_from_args",
]


def option(
    default=MISSING,
    *,
    flags,
    help,
    group=None,
    metavar=None,
    choices=None,
    negated=False,
    off_flag=None,
    positional=False,
    nargs=None,
    append=False,
    dest=None,
    doc_default=None,
    parse=None,
):
    """A settings field and its flag(s). A field without a default is a required flag.

    ``negated``: a ``--no-X`` switch that turns the (True) default off. ``off_flag``: a second flag that sets the
    field False (an on/off pair). ``positional``: ``flags`` holds the argument's name. ``append``: the flag repeats
    into a list. ``dest``: the namespace attribute (default argparse's, from the first long flag). ``doc_default``:
    the default as the docs' table states it, where the value alone does not say it. ``parse``: argparse's ``type``.
    """
    meta = dict(
        flags=tuple(flags),
        help=help,
        group=group,
        metavar=metavar,
        choices=choices,
        negated=negated,
        off_flag=off_flag,
        positional=positional,
        nargs=nargs,
        append=append,
        dest=dest,
        doc_default=doc_default,
        parse=parse,
    )
    return field(default=default, metadata=meta)


def dest_of(f) -> str:
    """The namespace attribute of a field: argparse's own rule (first long flag, dashes to underscores), so dotted
    OpenRLHF names stay dotted."""
    m = f.metadata
    if m["dest"]:
        return m["dest"]
    return m["flags"][0].lstrip("-").replace("-", "_") if m["flags"] else f.name


def _kind(cls, f):
    kind = typing.get_type_hints(cls)[f.name]
    if typing.get_origin(kind) is typing.Union:  # Optional[X]: the flag parses X
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    return kind


def add_arguments(
    parser: argparse.ArgumentParser,
    cls,
    groups: Optional[Dict[str, str]] = None,
    group_title: Optional[str] = None,
    skip_existing: bool = False,
) -> Dict[str, Any]:
    """The flags of every field of ``cls`` on ``parser``; returns the argument groups by name.

    ``groups``: name -> title of the groups fields name (in this order); ``group_title``: one group for all (with
    its description as the second line of the title). ``skip_existing``: leave alone an option the parser already
    has (OpenRLHF patched with our patch defines ``--reward.wrapper`` natively).
    """
    made: Dict[str, Any] = {name: parser.add_argument_group(title) for name, title in (groups or {}).items()}
    if group_title is not None:
        title, _, description = group_title.partition("\n")
        made[None] = parser.add_argument_group(title, description or None)
    for f in fields(cls):
        m = f.metadata
        target = made.get(m["group"], made.get(None, parser))
        flags = [o for o in m["flags"] if not (skip_existing and o in parser._option_string_actions)]
        if not flags:
            continue
        kind = _kind(cls, f)
        kw: Dict[str, Any] = dict(help=m["help"])
        if m["positional"]:
            if m["nargs"]:
                kw["nargs"] = m["nargs"]
            kw["metavar"] = m["metavar"] or flags[0].upper()
            target.add_argument(dest_of(f), **kw)
            continue
        kw["dest"] = dest_of(f)
        if kind is bool:
            kw["action"] = "store_true"
            if f.default is None:
                kw["default"] = None
        elif m["append"]:
            kw["action"] = "append"
            kw["default"] = None
            if m["parse"]:
                kw["type"] = m["parse"]
            kw.update({k: m[k] for k in ("metavar", "choices") if m[k] is not None})
        else:
            if m["parse"]:
                kw["type"] = m["parse"]
            elif kind not in (str, list, List[str]):  # strings stay argparse's untyped default
                kw["type"] = kind
            if f.default is MISSING:
                kw["required"] = True
            else:
                kw["default"] = f.default
            kw.update({k: m[k] for k in ("metavar", "choices") if m[k] is not None})
        target.add_argument(*flags, **kw)
        if m["off_flag"] and not (skip_existing and m["off_flag"] in parser._option_string_actions):
            target.add_argument(m["off_flag"], dest=kw["dest"], action="store_false", help=f"turn {flags[0]} off")
    return made


def settings_from_args(cls, args: argparse.Namespace):
    """An instance of ``cls`` from the namespace :func:`add_arguments` parsed into (absent flags: the defaults)."""
    values = {}
    for f in fields(cls):
        name = dest_of(f)
        if not hasattr(args, name):
            continue
        value = getattr(args, name)
        values[f.name] = not value if f.metadata["negated"] else value
    return cls(**values)


def default_words(f) -> str:
    m = f.metadata
    if m["doc_default"] is not None:
        return m["doc_default"]
    if f.default is MISSING:
        return "required"
    if m["negated"]:
        return "on"
    if f.default is None:
        return "none"
    if f.default is False:
        return "off"
    if f.default is True:
        return "on"
    return f"`{f.default}`"


def flag_table(cls) -> str:
    """The Markdown table of ``cls``'s flags: flag, default, meaning (the help text)."""
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for f in fields(cls):
        m = f.metadata
        if not m["flags"]:
            continue
        names = " / ".join(f"`{o}`" for o in (*m["flags"], *([m["off_flag"]] if m["off_flag"] else [])))
        text = m["help"].replace("|", "\\|")
        rows.append(f"| {names} | {default_words(f)} | {text} |")
    return "\n".join(rows)


# ── the value parsers every command shares ──


def parse_ns(value, flag: str) -> Optional[List[int]]:
    """An N list (``1,2,4`` or a list of ints) -> sorted distinct positive ints; None, "" or "auto" -> None (the
    default: powers of two). Errors name ``flag``."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        return None
    items = value.replace(" ", "").split(",") if isinstance(value, str) else list(value)
    out = []
    for item in items:
        if item in ("", None):
            continue
        try:
            n = int(item)
        except (TypeError, ValueError):
            raise ValueError(f"{flag}: {item!r} is not an integer (expected e.g. 1,2,4,8)") from None
        if n < 1 or n != float(item):
            raise ValueError(f"{flag}: N must be a positive integer, got {item!r}")
        out.append(n)
    if not out:
        raise ValueError(f"{flag}: no N in {value!r} (expected e.g. 1,2,4,8 or auto)")
    return sorted(set(out))


def parse_floats(value, flag: str) -> List[float]:
    """A comma-separated list of numbers (``0.25,0.5,1``); errors name ``flag``."""
    out = []
    for part in str(value).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(float(part))
        except ValueError:
            raise ValueError(f"{flag}: {part!r} is not a number (give comma-separated values, e.g. 0.25,0.5,1)")
    if not out:
        raise ValueError(f"{flag}: give at least one value, e.g. 0.25,0.5,1")
    return out
