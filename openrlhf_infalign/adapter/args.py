"""Reading OpenRLHF's parsed arguments: ``hierarchize`` nests ``--a.b.c`` as ``args.a.b.c`` (SimpleNamespace).

Our flags may be absent (a plain upstream args, a patched OpenRLHF, a test's bare namespace), so every read goes
through :func:`get`, which answers ``default`` at any missing level.
"""

from __future__ import annotations

from typing import Any

__all__ = ["get"]


def get(args, dotted: str, default: Any = None) -> Any:
    """``args.a.b.c`` for ``"a.b.c"``; ``default`` where a level is missing or None. Dicts are read by key."""
    node = args
    for part in dotted.split("."):
        if node is None:
            return default
        node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
    return default if node is None else node
