"""Flags written once (openrlhf_infalign/options.py): generated flags, read back, the shared value parsers, and the
docs' flag tables generated from the definitions (a drift fails here)."""

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import pytest

from openrlhf_infalign import options
from openrlhf_infalign.options import option, parse_floats, parse_ns

ROOT = Path(__file__).resolve().parents[1]


@dataclass(kw_only=True)
class _Demo:
    path: str = option(flags=("--path",), metavar="P", help="required")
    k: int = option(4, flags=("--k",), help="an int")
    on: Optional[bool] = option(None, flags=("--x.on",), off_flag="--x.no_on", help="tristate")
    keep: bool = option(True, flags=("--no-keep",), negated=True, help="negated switch")
    label: Optional[List[str]] = option(None, flags=("--label",), append=True, help="repeated")
    runs: List[str] = option(flags=("runs",), positional=True, nargs="+", metavar="RUN", help="positional")


def test_flags_are_generated_and_read_back():
    parser = argparse.ArgumentParser()
    options.add_arguments(parser, _Demo)
    ns = parser.parse_args(["a", "b", "--path", "p", "--x.no_on", "--no-keep", "--label", "u", "--label", "v"])
    s = options.settings_from_args(_Demo, ns)
    assert (s.path, s.k, s.on, s.keep, s.label, s.runs) == ("p", 4, False, False, ["u", "v"], ["a", "b"])
    assert getattr(ns, "x.on") is False  # dotted dests stay dotted (OpenRLHF's hierarchize nests them)
    s = options.settings_from_args(_Demo, parser.parse_args(["a", "--path", "p", "--k", "8", "--x.on"]))
    assert (s.k, s.on, s.keep, s.label) == (8, True, True, None)
    with pytest.raises(SystemExit):
        parser.parse_args(["a"])  # --path is required


def test_parse_ns():
    assert parse_ns(None, "--eval-n") is None and parse_ns("auto", "--eval-n") is None and parse_ns("", "-") is None
    assert parse_ns("8, 1,2,2", "--eval-n") == [1, 2, 8]
    assert parse_ns([4, 1], "--eval-n") == [1, 4]
    for bad in ("0", "1,x", "2.5", ","):
        with pytest.raises(ValueError, match="--infalign.eval_n"):
            parse_ns(bad, "--infalign.eval_n")


def test_parse_floats():
    assert parse_floats("0.25, 0.5,1", "--kl-budget") == [0.25, 0.5, 1.0]
    for bad in ("x", ",", ""):
        with pytest.raises(ValueError, match="--kl-budget"):
            parse_floats(bad, "--kl-budget")


def test_docs_flag_tables_are_generated_from_the_definitions():
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "flag_tables.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr + "\n(regenerate with: python scripts/flag_tables.py)"
