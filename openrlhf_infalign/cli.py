"""`infalign` console: one subcommand per module in openrlhf_infalign/commands/.

Each command module defines ``add_arguments(parser)`` and ``run(args) -> int`` and a module docstring whose first
line is the help text. Modules are imported lazily so that `infalign plan` never pays for torch/openrlhf imports.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from openrlhf_infalign.errors import UserError

# name -> module under openrlhf_infalign.commands
COMMANDS = {
    "plan": "plan",
    "frontier": "frontier",
    "store": "store",
    "score": "score",
    "calibrate": "calibrate",
    "evaluate": "evaluate",
    "report": "report",
}


def _load(name: str):
    return importlib.import_module(f"openrlhf_infalign.commands.{COMMANDS[name]}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="infalign",
        description="InfAlign for OpenRLHF: plan transforms, build reference reward stores, evaluate win rates.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        if only is not None and name != only:
            # Only the chosen command's module is imported; others are listed by name.
            sub.add_parser(name, help=f"see `infalign {name} --help`")
            continue
        try:
            mod = _load(name)
        except ImportError as e:  # a command whose optional deps are missing stays listed with the reason
            sub.add_parser(name, help=f"unavailable: {e}")
            continue
        doc = (mod.__doc__ or "").strip().splitlines()
        p = sub.add_parser(
            name,
            help=doc[0] if doc else None,
            description="\n".join(doc) if doc else None,
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    only = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only if only in COMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except BrokenPipeError:
        # `infalign ... | head` closed the pipe: not an error worth a traceback.
        sys.stderr.close()
        return 0
    except (UserError, ValueError, OSError) as e:
        # A user's mistake, or a path the system refuses (a folder where a file is read, no permission, a full
        # disk): the path and the reason on one line, not a traceback; the user can act on it.
        what = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename and e.strerror else e
        print(f"infalign {args.command}: error: {_one_line(what)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"infalign {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(e) -> str:
    """Messages are one line by rule; a multi-line one (from a library) is folded rather than cut."""
    return " ".join(str(e).split("\n")).strip()


if __name__ == "__main__":
    sys.exit(main())
