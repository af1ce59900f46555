"""The OpenRLHF flags that train a plan: `infalign plan` prints them, the demo and the examples paste them.

They are the adapter's words (``--reward_wrapper``, ``--infalign.*`` from flags.py, upstream's
``--algo.kl.init_coef``), so they live here and not in core/. This module imports no openrlhf package: `infalign
plan` must start in well under two seconds, and the flags are plain strings.
"""

from __future__ import annotations

__all__ = ["openrlhf_args"]


def openrlhf_args(plan: dict) -> list[str]:
    """``train_ppo_ray`` flags for a plan (core.planning.plan): the CTRL wrapper, the inference procedure, the
    recommended transform, the KL budget it was planned for, and its beta as --algo.kl.init_coef, converted for
    the run's advantage estimator when the plan names one (kl_coef.py)."""
    rec = plan["recommended"]
    coef = rec.get("kl_coef", rec["beta"])
    return [
        "--reward_wrapper",
        "infalign.ctrl",
        "--infalign.inference",
        plan["inference"],
        "--infalign.transform",
        rec["transform"],
        "--infalign.kl_budget",
        f"{plan['kl']:g}",
        "--algo.kl.init_coef",
        f"{coef:.4g}",
    ]
