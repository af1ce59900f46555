"""``openrlhf.cli.train_ppo_ray`` as ``__main__``, with our flags on its parser and the plugin around its ``train``.

Upstream builds its parser inline under ``if __name__ == "__main__":``, validates the parsed arguments there and
calls ``train(args)``. :func:`intercept` steps in at two points only (read from OpenRLHF 0.11.2; ``UPSTREAM_HOOKS``):

* ``ArgumentParser.parse_args`` of that one parser (the call made from the module's ``__main__`` code): InfAlign's
  flags are added first (:mod:`..flags`), so ``--help`` lists upstream's flags and ours and every upstream flag
  passes through unchanged; then our argv is parsed.
* ``train`` in the module's namespace, looked up when the ``__main__`` block calls it, is wrapped by
  :func:`openrlhf_infalign.adapter.launch.run_train`, which is also handed ``args.infalign.explicit_dests``: the
  dests given on the command line (see :mod:`..flags`).
"""

from __future__ import annotations

import argparse
import contextlib
import runpy
import sys
from typing import Callable, Optional, Sequence

from openrlhf_infalign.adapter.flags import add_infalign_arguments

__all__ = ["UPSTREAM_MODULE", "intercept", "train_ppo_parser"]

UPSTREAM_MODULE = "openrlhf.cli.train_ppo_ray"


def _explicit_dests(parser: argparse.ArgumentParser, argv: Sequence[str]) -> set:
    """Dests the user actually gave (parse again with every default suppressed)."""
    saved = [(a, a.default) for a in parser._actions]
    try:
        for a, _ in saved:
            a.default = argparse.SUPPRESS
        ns, _ = parser.parse_known_args(list(argv))
    except SystemExit:  # pragma: no cover - the real parse below reports the error
        return set()
    finally:
        for a, d in saved:
            a.default = d
    return set(vars(ns))


def _hide_local_rm_eval_dataset(ns: argparse.Namespace) -> Optional[str]:
    """Upstream asserts that --eval.dataset comes with a remote RM or reward_func, because its evaluate() only reads
    rewards the rollout workers computed. InfAlign's evaluation hook scores eval samples with the local reward model
    too (in async mode the training actor does, on the samples the generator actor ships), so when the plugin is
    active the dataset is kept out of that one check and handed back to train()."""
    d = vars(ns)
    active = d.get("reward.wrapper") or d.get("infalign.eval_store")
    if not (active and d.get("eval.dataset")) or d.get("reward.remote_url") or d.get("train.agent_func_path"):
        return None
    dataset, d["eval.dataset"] = d["eval.dataset"], None
    return dataset


@contextlib.contextmanager
def intercept(argv: Sequence[str], prog: str, train: Optional[Callable]):
    """Patch ArgumentParser.parse_args for the upstream module's own call (identified by its calling frame)."""
    # Here, not at the top: launch imports OpenRLHF, which must come after cpu.apply() (run_train_ppo).
    from openrlhf_infalign.adapter import launch

    real_parse_args = argparse.ArgumentParser.parse_args
    done = []

    def parse_args(self, args=None, namespace=None):
        frame = sys._getframe(1)
        g = frame.f_globals
        if (
            done
            or g.get("__name__") != "__main__"
            or g.get("__spec__") is None
            or g["__spec__"].name != UPSTREAM_MODULE
        ):
            return real_parse_args(self, args, namespace)
        done.append(True)
        self.prog = prog
        add_infalign_arguments(self)
        given = list(argv) if args is None else list(args)
        explicit = sorted(_explicit_dests(self, given))
        ns = real_parse_args(self, given, namespace)
        eval_dataset = _hide_local_rm_eval_dataset(ns)
        upstream_train = g["train"]
        inner = train or upstream_train

        def train_with_infalign(hargs):
            if eval_dataset is not None:
                hargs.eval.dataset = eval_dataset
            hargs.infalign.explicit_dests = explicit
            return launch.run_train(inner, hargs)

        train_with_infalign.__wrapped__ = upstream_train
        g["train"] = train_with_infalign  # the __main__ block calls train(args) by this global name
        return ns

    argparse.ArgumentParser.parse_args = parse_args
    try:
        yield done
    finally:
        argparse.ArgumentParser.parse_args = real_parse_args


class _ParserBuilt(Exception):
    pass


def train_ppo_parser() -> argparse.ArgumentParser:
    """Upstream's ``train_ppo_ray`` parser (built inline under ``__main__``) with InfAlign's flags added.

    Runs the module up to its ``parse_args`` call and stops there: nothing is parsed, validated or trained. For tools
    and tests that check command lines against the real flags. ``flash_attn`` must be importable (or stood in).
    """
    built = {}
    real_parse_args = argparse.ArgumentParser.parse_args

    def stop(self, *args, **kwargs):
        built["parser"] = self
        raise _ParserBuilt

    argparse.ArgumentParser.parse_args = stop
    try:
        runpy.run_module(UPSTREAM_MODULE, run_name="__main__", alter_sys=False)
    except _ParserBuilt:
        pass
    finally:
        argparse.ArgumentParser.parse_args = real_parse_args
    return add_infalign_arguments(built["parser"])
