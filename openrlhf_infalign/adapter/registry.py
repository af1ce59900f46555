"""Reward wrappers as plugins: the entry-point group ``openrlhf.reward_wrappers``.

An entry point names a factory ``factory(args) -> wrapper``; the wrapper has
``wrap_experiences(list[Experience]) -> list[Experience]``, and may expose ``store``, ``transform``, ``inference``,
``beta`` and ``kl_budget`` (the evaluation hook and the logs read them). A factory may carry
``add_arguments(parser)`` to register its flags (the source patch calls it). This package registers
``infalign.ctrl`` and ``infalign.calibrate`` (:mod:`.wrapper`); third parties register theirs the same way.
"""

from __future__ import annotations

from importlib.metadata import entry_points

__all__ = ["WRAPPER_GROUP", "known_wrappers", "load_reward_wrapper"]

WRAPPER_GROUP = "openrlhf.reward_wrappers"


def known_wrappers() -> list[str]:
    """Names registered in the ``openrlhf.reward_wrappers`` entry-point group (this package's and third parties')."""
    return sorted({ep.name for ep in entry_points(group=WRAPPER_GROUP)})


def load_reward_wrapper(name: str, args):
    """Resolve ``name`` in the ``openrlhf.reward_wrappers`` entry-point group and build it with ``factory(args)``."""
    eps = {ep.name: ep for ep in entry_points(group=WRAPPER_GROUP)}
    if name not in eps:
        known = ", ".join(sorted(eps)) or "none installed"
        raise ValueError(
            f"unknown reward wrapper {name!r} for --reward_wrapper; known: {known} "
            f"(wrappers register in the entry-point group {WRAPPER_GROUP!r})"
        )
    factory = eps[name].load()
    wrapper = factory(args)
    if not callable(getattr(wrapper, "wrap_experiences", None)):
        raise TypeError(f"reward wrapper {name!r}: its factory returned {wrapper!r}, which has no wrap_experiences()")
    return wrapper
