"""Planning with OpenRLHF's flags: which ``--algo.kl.init_coef`` trains the planned beta, and the flags of a plan.

The plan (``core.planning``) is in beta, the coefficient of E[Phi(u)] - beta * KL(pi || pi_ref). OpenRLHF 0.11.2
adds the k1 KL penalty ``init_coef * log(pi/pi_ref)`` to the reward AFTER the advantage estimator has shaped the
reward per group of n samples (``RemoteExperienceMaker.compute_advantages_and_returns``), so the estimator decides
which coefficient trains toward the planned optimum: :data:`ESTIMATORS` says it per estimator, as data. Advantage
whitening afterwards rescales reward and KL alike: it changes the step size, not the fixed point.

This module is the one home of that mapping, of a plan's train flags (:func:`openrlhf_args`), of the plan with
flags that `infalign plan` prints (:func:`plan_with_flags`) and of the coefficient training applies
(:func:`apply_kl_coef`). The direct objective (``infalign.direct``, ``core.direct``) has its own mapping, because
its group estimator's rewards compose with the estimators differently (``core.direct.COMPOSITION_RULES``): its
plan row and flags (:func:`direct_entry`, the ``direct`` entry of the plan), its refusals (:func:`check_direct`) and
its applied coefficient (:func:`apply_direct_kl_coef`) live here too. It imports no openrlhf package: `infalign
plan` uses it and must start fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from openrlhf_infalign.adapter.args import get
from openrlhf_infalign.core import direct, planning
from openrlhf_infalign.core.finite_k import expected_kl_k, expected_win_rate_k
from openrlhf_infalign.core.inference import InferenceProcedure
from openrlhf_infalign.errors import UserError

__all__ = [
    "ACCEPT_FLAG",
    "DIRECT_WRAPPER",
    "ESTIMATORS",
    "NotPlanned",
    "PlanNotApplicable",
    "Planned",
    "UPSTREAM_KL_INIT_COEF",
    "apply_direct_kl_coef",
    "apply_kl_coef",
    "beta_for_kl_coef",
    "check_direct",
    "check_planned_kl",
    "direct_entry",
    "kl_coef_for_beta",
    "kl_settings",
    "openrlhf_args",
    "plan_with_flags",
    "unplanned_reason",
]

UPSTREAM_KL_INIT_COEF = 0.01  # train_ppo_ray's default for --algo.kl.init_coef
ACCEPT_FLAG = "--infalign.accept_unplanned_kl"
DIRECT_WRAPPER = "infalign.direct"


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
    out = {**out, "openrlhf_args": openrlhf_args(out)}
    return {
        **out,
        "direct": direct_entry(out["inference"], out["kl"], k, estimator, n_samples_per_prompt),
        "notes": notes,
    }


# ── the direct objective (infalign.direct) ──


def direct_refusal(inference, estimator: str, n: int, name: str = DIRECT_WRAPPER) -> Optional[str]:
    """Why ``name`` cannot train ``inference`` with this estimator and group size (one line naming the flags), or
    None. The leave-one-out baseline needs N of the other n-1 samples; ``core.direct.composition`` says which
    estimators keep the estimator unbiased."""
    inf = InferenceProcedure.coerce(inference)
    if inf.kind == "standard":
        return (
            f"--reward_wrapper {name} optimises a Best-/Worst-of-N win rate: give --infalign.inference bon:N or won:N "
            "(the standard win rate is --reward_wrapper infalign.calibrate)"
        )
    if n <= inf.n:
        return (
            f"--reward_wrapper {name} with --infalign.inference {inf.spec} needs --rollout.n_samples_per_prompt > "
            f"{inf.n} (its leave-one-out baseline takes {inf.n} of the other n-1 samples of a prompt), got {n}"
        )
    comp = direct.composition(estimator, n, inf)
    if comp.refused:
        return (
            f"--reward_wrapper {name} cannot train with --algo.advantage.estimator {estimator}: {comp.reason}; use "
            + " | ".join(e for e in direct.COMPOSITION_RULES if not direct.composition(e, n, inf).refused)
        )
    return None


def check_direct(inference, estimator: str, n: int, name: str = DIRECT_WRAPPER) -> None:
    """Raise ValueError with :func:`direct_refusal`'s line (training start-up)."""
    _estimator(estimator, n)  # an unknown estimator or n < 1 says so first
    reason = direct_refusal(inference, estimator, n, name)
    if reason:
        raise ValueError(reason)


def direct_args(inference: str, kl: float, kl_coef: float) -> list[str]:
    """``train_ppo_ray`` flags of the direct objective, in the order :func:`openrlhf_args` writes CTRL's."""
    return [
        "--reward_wrapper",
        DIRECT_WRAPPER,
        "--infalign.inference",
        inference,
        "--infalign.kl_budget",
        f"{kl:g}",
        "--algo.kl.init_coef",
        f"{kl_coef:.4g}",
    ]


def direct_entry(inference, kl: float, k: Optional[int], estimator: str, n: int) -> dict:
    """The ``direct`` entry of a plan: the direct objective's row and its train flags, or why it is refused.

    ``{"wrapper", "baseline", "refused": None, "coef" (on the direct reward), "reward_scale", "kl_coef"
    (--algo.kl.init_coef), "kl", "win_rate" (expected over stores of K), "k", "k_aware", "composition",
    "openrlhf_args"}``; refused: ``{"wrapper", "baseline", "refused": reason}``."""
    inf = InferenceProcedure.coerce(inference)
    head = {"wrapper": DIRECT_WRAPPER, "baseline": "loo"}
    reason = direct_refusal(inf, estimator, n)
    if reason:
        return {**head, "refused": reason}
    comp = direct.composition(estimator, n, inf)
    row = direct.direct_plan(inf, kl, k)
    kl_coef = row["coef"] * comp.reward_scale
    return {
        **head,
        "refused": None,
        "coef": row["coef"],
        "reward_scale": comp.reward_scale,
        "kl_coef": kl_coef,
        "kl": row["kl"],
        "win_rate": row["win_rate"],
        "k": row["k"],
        "k_aware": row["k_aware"],
        "composition": comp.reason,
        "openrlhf_args": direct_args(inf.spec, kl, kl_coef),
    }


def apply_direct_kl_coef(
    args, inference, kl_budget: Optional[float], k: Optional[int], unplanned: Optional[str] = None
) -> tuple[Optional[float], Optional[float], str]:
    """``apply_kl_coef`` for the direct objective: set ``args.algo.kl.init_coef`` to ``core.direct.direct_kl_coef``
    (the coefficient whose direct optimum has the budget's expected KL at K, times the estimator's reward scale)
    unless given. Returns (the coefficient on the direct reward in force, init_coef in force, the line to say)."""
    ks = kl_settings(args)
    est, n = ks["estimator"], ks["n"]
    scale = direct.composition(est, n, inference).reward_scale
    coef = get(args, "algo.kl.init_coef")
    where = f"estimator {est}, n = {n}, K = {k if k is not None else 'infinity'}"
    effective = coef / scale if coef is not None and coef > 0 else None
    if kl_budget is None:
        return (
            effective,
            coef,
            (
                f"{DIRECT_WRAPPER} without --infalign.kl_budget: nothing planned, training at --algo.kl.init_coef "
                f"{coef} ({where})"
            ),
        )
    if unplanned is not None:
        return (
            None,
            coef,
            (
                f"{ACCEPT_FLAG}: training {DIRECT_WRAPPER} at --algo.kl.init_coef {coef:g}; the KL will NOT follow the "
                f"plan for KL {kl_budget:g} nats: {unplanned}"
            ),
        )
    plan = {"inference": inference, "kl": kl_budget}
    planned_coef = direct.direct_kl_coef(plan, est, n, k=k)
    row = direct.direct_plan(inference, kl_budget, k)
    expected = (
        f"expected KL {row['kl']:.3g} nats, {InferenceProcedure.coerce(inference).spec} win rate {row['win_rate']:.3f}"
    )
    if not _is_explicit(args):
        args.algo.kl.init_coef = planned_coef
        return (
            planned_coef / scale,
            planned_coef,
            (
                f"KL COEFFICIENT SET BY THE PLAN: --algo.kl.init_coef was not given, training {DIRECT_WRAPPER} at "
                f"--algo.kl.init_coef {planned_coef:.4g} (coefficient {row['coef']:.4g} on the direct reward times "
                f"{est}'s reward scale {scale:.4g}, for KL {kl_budget:g} nats; {where}): {expected}"
            ),
        )
    if effective is None:
        return (
            None,
            coef,
            (
                f"--algo.kl.init_coef {coef} (given): no KL penalty, so nothing holds the policy near the reference; "
                f"the plan's is {planned_coef:.4g} ({where})"
            ),
        )
    same = abs(coef - planned_coef) <= 1e-3 * planned_coef
    head = "is the plan's" if same else f"differs from the plan's {planned_coef:.4g} ({expected} there)"
    return (
        effective,
        coef,
        (
            f"--algo.kl.init_coef {coef:g} (given) {head}; using yours: coefficient {effective:.4g} on the direct "
            f"reward ({where})"
        ),
    )


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


def check_planned_kl(args, what: str) -> Optional[str]:
    """Stop when no fixed coefficient gives the plan, unless the user accepts an unplanned KL (returns the reason).
    ``what``: the flag that is planned (``--infalign.transform auto``, ``--reward_wrapper infalign.direct``)."""
    reason = unplanned_reason(**kl_settings(args))
    if reason is None:
        return None
    if not get(args, "infalign.accept_unplanned_kl", False):
        raise ValueError(
            f"{what} with --infalign.kl_budget plans a KL coefficient, but {reason}. "
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
