"""Planning with OpenRLHF's flags: which ``--algo.kl.init_coef`` trains the planned beta, and the flags of a plan.

The plan (``core.planning``) is in beta, the coefficient of E[Phi(u)] - beta * KL(pi || pi_ref). OpenRLHF 0.11.2
adds the k1 KL penalty ``init_coef * log(pi/pi_ref)`` to the reward AFTER the advantage estimator has shaped the
reward per group of n samples (``RemoteExperienceMaker.compute_advantages_and_returns``), so the estimator decides
which coefficient trains toward the planned optimum: :data:`ESTIMATORS` says it per estimator, as data. Advantage
whitening afterwards rescales reward and KL alike: it changes the step size, not the fixed point.

This module is the one home of that mapping, of a plan's train flags (:func:`openrlhf_args`), of the plan with
flags that `infalign plan` prints (:func:`plan_with_flags`) and of the coefficient training applies
(:func:`apply_kl_coef`). It imports no openrlhf package: `infalign plan` uses it and must start fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from openrlhf_infalign.adapter.args import get
from openrlhf_infalign.core import planning
from openrlhf_infalign.core.finite_k import expected_kl_k, expected_win_rate_k
from openrlhf_infalign.errors import UserError

__all__ = [
    "ACCEPT_FLAG",
    "ESTIMATORS",
    "NotPlanned",
    "PlanNotApplicable",
    "Planned",
    "UPSTREAM_KL_INIT_COEF",
    "apply_kl_coef",
    "beta_for_kl_coef",
    "check_planned_kl",
    "kl_coef_for_beta",
    "kl_settings",
    "openrlhf_args",
    "plan_with_flags",
    "unplanned_reason",
]

UPSTREAM_KL_INIT_COEF = 0.01  # train_ppo_ray's default for --algo.kl.init_coef
ACCEPT_FLAG = "--infalign.accept_unplanned_kl"


@dataclass(frozen=True)
class Planned:
    """An estimator under which a fixed ``init_coef`` gives the plan: beta itself, or beta * (n-1)/n."""

    shaping: str  # what the estimator does to the reward before the KL term is added
    includes_self: bool = False  # the group baseline includes the sample: the reward's gradient shrinks by (n-1)/n
    group: bool = False  # needs a group of n >= 2 samples per prompt

    def init_coef(self, beta: float, n: int) -> float:
        return beta * (n - 1) / n if self.includes_self else beta

    def beta(self, init_coef: float, n: int) -> float:
        return init_coef * n / (n - 1) if self.includes_self else init_coef

    def words(self) -> str:
        return "beta * (n-1)/n" if self.includes_self else "beta"


@dataclass(frozen=True)
class NotPlanned:
    """An estimator under which no fixed ``init_coef`` gives the plan, and why."""

    shaping: str
    reason: str
    group: bool = False

    def words(self) -> str:
        return "none: refused"


#: ``--algo.advantage.estimator`` -> what ``--algo.kl.init_coef`` means for the planned beta (OpenRLHF 0.11.2).
ESTIMATORS: dict[str, Union[Planned, NotPlanned]] = {
    "gae": Planned("none (the critic is a baseline)"),
    "reinforce": Planned("none"),
    "rloo": Planned("minus the mean of the other n-1 samples (an unbiased baseline)", group=True),
    "flash_reinforce": Planned("minus the mean of the whole rollout batch (a 1/batch effect)"),
    "reinforce_baseline": Planned(
        "minus the group mean including the sample itself: the reward's expected gradient is scaled by (n-1)/n, "
        "the KL's is not",
        includes_self=True,
        group=True,
    ),
    "dr_grpo": Planned("as reinforce_baseline", includes_self=True, group=True),
    "group_norm": NotPlanned(
        "minus the group mean, divided by the group's std",
        "--algo.advantage.estimator group_norm divides the rewards by their group's std before the KL is added, "
        "so no fixed KL coefficient gives the planned optimum (and it erases most of the transform's shape); "
        "use rloo, reinforce_baseline, dr_grpo, reinforce or gae",
        group=True,
    ),
}
PLANNED = tuple(name for name, e in ESTIMATORS.items() if isinstance(e, Planned))


class PlanNotApplicable(ValueError):
    """No fixed --algo.kl.init_coef trains toward the planned optimum under these OpenRLHF settings."""


def _estimator(estimator: str, n: int) -> Union[Planned, NotPlanned]:
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n_samples_per_prompt must be an integer >= 1, got {n!r}")
    e = ESTIMATORS[estimator]
    if e.group and n < 2:
        raise ValueError(
            f"estimator {estimator} needs --rollout.n_samples_per_prompt >= 2 (a group baseline), got {n}"
        )
    return e


def unplanned_reason(
    estimator: str, n: int, kl_use_loss: bool = False, kl_estimator: str = "k1", kl_target: Optional[float] = None
) -> Optional[str]:
    """Why no fixed coefficient gives the plan under these settings (None when one does)."""
    e = _estimator(estimator, n)
    if isinstance(e, NotPlanned):
        return e.reason
    if kl_use_loss:
        return "--algo.kl.use_loss moves the KL out of the reward, where the plan puts it; drop --algo.kl.use_loss"
    if (kl_estimator or "k1") != "k1":
        return f"--algo.kl.estimator {kl_estimator} in the reward is not the KL's gradient; use --algo.kl.estimator k1"
    if kl_target is not None:
        return (
            "--algo.kl.target turns on upstream's adaptive KL controller, which steers its per-token mean KL rather "
            "than holding the planned coefficient; drop --algo.kl.target"
        )
    return None


def kl_coef_for_beta(beta: float, estimator: str = "gae", n: int = 1) -> float:
    """The --algo.kl.init_coef that trains toward the optimum at effective coefficient beta."""
    e = _estimator(estimator, n)
    if isinstance(e, NotPlanned):
        raise PlanNotApplicable(e.reason)
    return e.init_coef(beta, n)


def beta_for_kl_coef(coef: float, estimator: str = "gae", n: int = 1) -> float:
    """The effective beta that --algo.kl.init_coef coef gives under this estimator (inverse of the above)."""
    e = _estimator(estimator, n)
    if isinstance(e, NotPlanned):
        raise PlanNotApplicable(e.reason)
    return e.beta(coef, n)


def openrlhf_args(plan: dict) -> list[str]:
    """``train_ppo_ray`` flags for a plan: the CTRL wrapper, the inference procedure, the recommended transform, the
    KL budget it was planned for, and its beta as --algo.kl.init_coef (converted for the estimator when the plan
    names one)."""
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


def plan_with_flags(inference, kl: float, k=None, estimator: str = "gae", n_samples_per_prompt: int = 1) -> dict:
    """The plan and the OpenRLHF flags that train it: exactly the JSON of `infalign plan --json`.

    Every entry with a beta also gets ``kl_coef``, the --algo.kl.init_coef that gives that beta under the estimator.
    """
    reason = unplanned_reason(estimator, n_samples_per_prompt)  # also checks the estimator and n
    if reason:
        raise UserError(reason)
    p = planning.plan(inference, kl, k=k)
    notes = p.pop("notes")
    for entry in [p["recommended"], p.get("optimal"), *p["baselines"].values()]:
        if entry is not None:
            entry["kl_coef"] = kl_coef_for_beta(entry["beta"], estimator, n_samples_per_prompt)
    head = {"inference": p.pop("inference"), "kl": p.pop("kl"), "k": k, "estimator": estimator}
    head["n_samples_per_prompt"] = n_samples_per_prompt
    out = {**head, **p}
    # The flags sit before the notes, where the plan has always printed them.
    return {**out, "openrlhf_args": openrlhf_args(out), "notes": notes}


# ── the coefficient training applies (build.ctrl_settings, in the driver, before upstream's train()) ──


def kl_settings(args) -> dict:
    """The run's settings that decide what ``--algo.kl.init_coef`` means (upstream's defaults where absent)."""
    return dict(
        estimator=get(args, "algo.advantage.estimator", "gae"),
        n=int(get(args, "rollout.n_samples_per_prompt", 1)),
        kl_use_loss=bool(get(args, "algo.kl.use_loss", False)),
        kl_estimator=get(args, "algo.kl.estimator", "k1"),
        kl_target=get(args, "algo.kl.target"),
    )


def check_planned_kl(args, spec: str) -> Optional[str]:
    """Stop when no fixed coefficient gives the plan, unless the user accepts an unplanned KL (returns the reason)."""
    reason = unplanned_reason(**kl_settings(args))
    if reason is None:
        return None
    if not get(args, "infalign.accept_unplanned_kl", False):
        raise ValueError(
            f"--infalign.transform {spec} with --infalign.kl_budget plans a KL coefficient, but {reason}. "
            f"Supported: --algo.advantage.estimator {' | '.join(PLANNED)} with the k1 KL in the reward and a fixed "
            f"coefficient; or pass {ACCEPT_FLAG} to train with the transform at an unplanned KL."
        )
    return reason


def _is_explicit(args) -> bool:
    given = get(args, "infalign.explicit_dests")  # set by the console; None on the source patch path
    coef = get(args, "algo.kl.init_coef")
    return ("algo.kl.init_coef" in given) if given is not None else coef != UPSTREAM_KL_INIT_COEF


def _expected(inference, transform, beta: float, k: Optional[int]) -> str:
    """The theory's expected KL and win rate at effective coefficient beta with K reference samples."""
    try:
        kl = expected_kl_k(transform, beta, k)
        wr = expected_win_rate_k(inference, transform, beta, k)
    except ValueError as e:
        return f"expected KL not computable ({e})"
    return f"expected KL {kl:.3g} nats, {inference.spec} win rate {wr:.3f}"


def apply_kl_coef(
    args, inference, transform, beta: float, kl_budget: float, k: Optional[int], unplanned: Optional[str] = None
) -> tuple[Optional[float], Optional[float], str]:
    """Set ``args.algo.kl.init_coef`` to the plan's coefficient unless the user gave one; returns (effective beta,
    init_coef in force, the line to say). The effective beta is None where no fixed coefficient gives the plan."""
    ks = kl_settings(args)
    est, n = ks["estimator"], ks["n"]
    coef = get(args, "algo.kl.init_coef")
    where = f"estimator {est}, n = {n}, K = {k if k is not None else 'infinity'}"
    if unplanned is not None:
        return (
            None,
            coef,
            (
                f"{ACCEPT_FLAG}: training with {transform.spec} at --algo.kl.init_coef {coef:g}; the KL will NOT follow "
                f"the plan (planned beta {beta:.4g} for KL {kl_budget:g} nats): {unplanned}"
            ),
        )
    planned_coef = kl_coef_for_beta(beta, est, n)
    if not _is_explicit(args):
        args.algo.kl.init_coef = planned_coef
        return (
            beta,
            planned_coef,
            (
                f"KL COEFFICIENT SET BY THE PLAN: --algo.kl.init_coef was not given, training at "
                f"--algo.kl.init_coef {planned_coef:.4g} (planned beta {beta:.4g} for {transform.spec} at KL "
                f"{kl_budget:g} nats; {where}): {_expected(inference, transform, beta, k)}"
            ),
        )
    if coef is None or coef <= 0:
        return (
            None,
            coef,
            (
                f"--algo.kl.init_coef {coef} (given): no KL penalty, so nothing holds the policy near the reference; "
                f"the plan's is {planned_coef:.4g} (beta {beta:.4g}, {where})"
            ),
        )
    effective = beta_for_kl_coef(coef, est, n)
    same = abs(coef - planned_coef) <= 1e-3 * planned_coef
    head = "is the plan's" if same else f"differs from the planned beta {beta:.4g} (init_coef {planned_coef:.4g})"
    return (
        effective,
        coef,
        (
            f"--algo.kl.init_coef {coef:g} (given) {head}; using yours: effective beta {effective:.4g} ({where}), "
            f"{_expected(inference, transform, effective, k)}"
        ),
    )
