"""The ``openrlhf`` console: ``openrlhf train_ppo ...`` runs OpenRLHF's own ``openrlhf.cli.train_ppo_ray``.

We run that very module as ``__main__`` (``runpy``), so its parser, its validation and its ``train()`` are the real
ones; :mod:`.upstream.train_ppo_ray` adds our flags to its parser and the plugin around its ``train``. With
``--infalign.cpu`` the CPU mode (:mod:`.cpu`) is applied first, before upstream is imported.
``python -m openrlhf_infalign.train_ppo ...`` is the same command.
"""

from __future__ import annotations

import runpy
import sys
from typing import Callable, Optional, Sequence

from openrlhf_infalign.adapter.upstream.train_ppo_ray import UPSTREAM_MODULE, intercept

__all__ = ["main", "run_train_ppo"]

PROG = "openrlhf train_ppo"

COMMANDS = {"train_ppo": "OpenRLHF's Ray PPO trainer (openrlhf.cli.train_ppo_ray) with InfAlign's reward wrappers"}


def _wants_help(argv: Sequence[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def run_train_ppo(argv: Sequence[str], prog: str = PROG, train: Optional[Callable] = None) -> int:
    """Run upstream's ``train_ppo_ray`` as ``__main__`` with InfAlign loaded. ``train`` replaces upstream's
    ``train(args)`` at that exact boundary (tests); by default upstream's own runs."""
    argv = list(argv)
    if "--infalign.cpu" in argv:
        # Before upstream is imported: the CPU mode installs the flash_attn stand-in and the CUDA no-ops. GPU runs
        # never import it.
        from openrlhf_infalign.adapter import cpu

        cpu.apply()
        argv = cpu.with_cpu_flags(argv)
    elif _wants_help(argv):
        # Help never trains: let it show on a machine without flash-attn (no-op where the real one is installed).
        from openrlhf_infalign.adapter.cpu.standins import install_flash_attn

        install_flash_attn()
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        print(
            f"{prog}: error: OpenRLHF needs flash-attn (`pip install flash-attn==2.8.3 --no-build-isolation` on a "
            "GPU machine); on a CPU-only machine pass --infalign.cpu",
            file=sys.stderr,
        )
        return 2
    with intercept(argv, prog, train) as done:
        try:
            runpy.run_module(UPSTREAM_MODULE, run_name="__main__", alter_sys=False)
        except SystemExit as e:  # argparse errors / --help
            code = e.code
            return code if isinstance(code, int) else (0 if code is None else 1)
        except (ValueError, FileNotFoundError, LookupError) as e:
            if not done:
                raise
            from openrlhf_infalign.store import StoreError

            if isinstance(e, (StoreError, FileNotFoundError)) or _is_ours(e):
                print(f"{prog}: error: {e}", file=sys.stderr)
                return 2
            raise
    return 0


def _is_ours(e: BaseException) -> bool:
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    mod = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return mod.startswith("openrlhf_infalign")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: openrlhf COMMAND [ARGS...]\n\ncommands:")
        for name, help_ in COMMANDS.items():
            print(f"  {name:<12} {help_}")
        print("\n`openrlhf COMMAND --help` lists a command's flags (upstream's and InfAlign's).")
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"openrlhf: error: unknown command {cmd!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return run_train_ppo(rest)


if __name__ == "__main__":
    sys.exit(main())
