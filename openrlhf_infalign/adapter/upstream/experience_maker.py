"""OpenRLHF 0.11.2's ``RemoteExperienceMaker``: the reward seam, the rollout KL, and the private calls eval makes.

Instance-level throughout: only the one trainer's maker changes, in the trainer actor's own process.
"""

from __future__ import annotations

from typing import Callable

__all__ = ["effective_actors", "forward", "install_reward_wrapper", "record_rollout_kl"]


def install_reward_wrapper(experience_maker, wrapper) -> None:
    """Make ``experience_maker.compute_advantages_and_returns`` wrap the rewards first (idempotent).

    At that point every reward path (local RM actors, remote RM, reward_func) has filled ``experience.rewards`` and no
    baseline, normalisation, clip or KL term has run.
    """
    if getattr(experience_maker, "_infalign_reward_wrapper", None) is wrapper:
        return
    upstream = type(experience_maker).compute_advantages_and_returns.__get__(experience_maker)

    def compute_advantages_and_returns(experiences, *args, **kwargs):
        return upstream(wrapper.wrap_experiences(experiences), *args, **kwargs)

    experience_maker.compute_advantages_and_returns = compute_advantages_and_returns
    experience_maker._infalign_reward_wrapper = wrapper


def record_rollout_kl(experience_maker, record: Callable[[list], None]) -> None:
    """Call ``record(experiences)`` on every batch ``make_experience_batch`` returns (installed once)."""
    if getattr(experience_maker, "_infalign_kl_wrapped", False):
        return
    inner = experience_maker.make_experience_batch

    def make_experience_batch(rollout_samples, *args, **kwargs):
        experiences = inner(rollout_samples, *args, **kwargs)
        record(experiences)
        return experiences

    experience_maker.make_experience_batch = make_experience_batch
    experience_maker._infalign_kl_wrapped = True


def effective_actors(group) -> int:
    """Distinct actors of a ``RayActorGroup`` (its private ``_actor_handlers`` over ring / tensor-parallel copies)."""
    handlers = getattr(group, "_actor_handlers", None)
    dup = int(getattr(group, "duplicate_actors", 1) or 1)
    return max(1, len(handlers) // dup) if handlers else 1


def forward(experience_maker, group, sync: bool, duplicate: int, count: int, **kwargs) -> list:
    """``group``'s ``forward`` on per-micro-batch ``kwargs`` lists, as ``make_experience`` calls it (the private
    ``_dispatch_forward``), results de-duplicated (``_flatten_results``) and cut to the first ``count``."""
    refs = experience_maker._dispatch_forward(group, sync, **kwargs)
    return experience_maker._flatten_results(refs, duplicate)[:count]
