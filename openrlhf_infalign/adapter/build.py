"""Building the ``infalign.*`` reward wrappers from OpenRLHF's parsed arguments, in the driver.

:func:`ctrl_settings` opens the reference store (``--infalign.store``), checks its run record against this
run's (:mod:`.run_record`: template, sampling, policy, reward source, normalisation), plans the transform for
``--infalign.inference`` at ``--infalign.kl_budget`` with K = the store's median reference samples per prompt, and
says where training would differ from the plan (reward flags that distort [0, 1] rewards). Its result is the
complete set of constructor arguments of :class:`~openrlhf_infalign.adapter.wrapper.CTRLRewardWrapper`; the
entry-point factories in :mod:`.wrapper` build the wrapper from it.

The planned KL coefficient is APPLIED (:func:`apply_kl_coef`): without an explicit ``--algo.kl.init_coef``,
``args.algo.kl.init_coef`` is set to the coefficient that gives the planned beta under the run's advantage
estimator and ``--rollout.n_samples_per_prompt`` (:mod:`.kl_coef`). This runs in the driver, inside
``launch.prepare``, before upstream's ``train(args)`` reads the value: it creates the reference model only when
``init_coef > 0`` and builds the trainer actor (whose KL controller takes ``init_coef``) from ``args`` by value. On
the source patch path the wrapper is built in ``train()`` after the reference model (which upstream's default 0.01
has already created) and before the trainer, which still reads the value set here. An explicit value wins; the
theory's expected KL and win rate at that value are logged instead.
"""

from __future__ import annotations

import sys
from typing import Optional

from openrlhf_infalign.adapter.args import get
from openrlhf_infalign.adapter.flags import DEFAULTS
from openrlhf_infalign.adapter.kl_coef import (
    ACCEPT_FLAG,
    ESTIMATORS,
    beta_for_kl_coef,
    kl_coef_for_beta,
    unplanned_reason,
)
from openrlhf_infalign.adapter.run_record import check_run
from openrlhf_infalign.core.finite_k import expected_kl_k, expected_win_rate_k
from openrlhf_infalign.core.inference import InferenceProcedure
from openrlhf_infalign.core.planning import check_k, resolve_transform
from openrlhf_infalign.store import ReferenceStore

__all__ = ["UPSTREAM_KL_INIT_COEF", "apply_kl_coef", "ctrl_settings", "kl_settings", "say", "store_k"]

UPSTREAM_KL_INIT_COEF = 0.01  # train_ppo_ray's default for --algo.kl.init_coef


def say(msg: str) -> None:
    """Driver-side notices, in the same plain style as upstream's CLI warnings."""
    print(f"[InfAlign] {msg}", file=sys.stderr, flush=True)


def ctrl_settings(args, name: str, transform_spec: Optional[str] = None) -> dict:
    """Keyword arguments of ``CTRLRewardWrapper`` for wrapper ``name``: store, transform and the plan behind it.

    ``transform_spec`` overrides ``--infalign.transform`` (``infalign.calibrate`` is the identity transform).
    """
    store_dir = get(args, "infalign.store")
    if not store_dir:
        raise ValueError(
            f"--reward_wrapper {name} needs --infalign.store DIR: the reference rewards of the training prompts "
            "(build them with `infalign calibrate`)"
        )
    store = ReferenceStore.open(store_dir)
    check_run(args, store)

    inference = InferenceProcedure.parse(get(args, "infalign.inference", DEFAULTS["inference"]))
    spec = transform_spec or get(args, "infalign.transform", DEFAULTS["transform"])
    kl_budget = get(args, "infalign.kl_budget")
    if spec.split(":")[0].strip().lower() in ("auto", "optimal") and kl_budget is None:
        raise ValueError(
            f"--infalign.transform {spec} is planned for a KL budget: pass --infalign.kl_budget NATS "
            f"(see `infalign plan --inference {inference.spec} --kl 0.5`), or give a fixed transform such as exp:t=10"
        )
    k = store_k(store)
    unplanned = _check_planned_kl(args, spec) if kl_budget is not None else None
    transform, beta = resolve_transform(spec, inference, kl_budget, k=k)

    _check_reward_flags(args)
    say(
        f"{name}: reference store {store_dir} ({len(store)} prompts, median K = {k}), inference {inference.spec}, "
        f"transform {transform.spec}" + (f" (planned for KL {kl_budget:g} nats)" if kl_budget is not None else "")
    )
    kl_coef = get(args, "algo.kl.init_coef")
    if beta is not None:
        beta, kl_coef = apply_kl_coef(args, inference, transform, beta, kl_budget, k, unplanned)
    return dict(
        store=store,
        transform=transform,
        inference=inference,
        beta=beta,
        kl_coef=kl_coef,
        k=k,
        kl_budget=kl_budget,
        on_missing=get(args, "infalign.on_missing", DEFAULTS["on_missing"]),
        name=name,
    )


def _check_reward_flags(args) -> None:
    clip = get(args, "reward.clip_range")
    if clip is not None and len(clip) == 2:
        lo, hi = float(clip[0]), float(clip[1])
        if lo > 0.0 or hi < 1.0:
            say(
                f"warning: --reward.clip_range {lo:g} {hi:g} clips transformed rewards, which lie in [0, 1] "
                "(before baselines and KL). Use a range containing [0, 1], e.g. the default -10 10."
            )


def store_k(store) -> Optional[int]:
    """K the plan takes for this store: its median reference rewards per prompt (None: the continuum, K < 2)."""
    stats = store.k_stats() if hasattr(store, "k_stats") else (getattr(store, "manifest", None) or {}).get("k_stats")
    median = (stats or {}).get("median")
    if median is None or round(median) < 2:
        return None
    return check_k(int(round(median)))


def kl_settings(args) -> dict:
    """The run's settings that decide what ``--algo.kl.init_coef`` means (upstream's defaults where absent)."""
    return dict(
        estimator=get(args, "algo.advantage.estimator", "gae"),
        n=int(get(args, "rollout.n_samples_per_prompt", 1)),
        kl_use_loss=bool(get(args, "algo.kl.use_loss", False)),
        kl_estimator=get(args, "algo.kl.estimator", "k1"),
        kl_target=get(args, "algo.kl.target"),
    )


def _check_planned_kl(args, spec: str) -> Optional[str]:
    """Stop when no fixed coefficient gives the plan, unless the user accepts an unplanned KL (returns the reason)."""
    reason = unplanned_reason(**kl_settings(args))
    if reason is None:
        return None
    if not get(args, "infalign.accept_unplanned_kl", False):
        planned = [e for e, what in ESTIMATORS.items() if not what.startswith("no fixed")]
        raise ValueError(
            f"--infalign.transform {spec} with --infalign.kl_budget plans a KL coefficient, but {reason}. "
            f"Supported: --algo.advantage.estimator {' | '.join(planned)} with the k1 KL in the reward and a fixed "
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
) -> tuple[Optional[float], Optional[float]]:
    """Set ``args.algo.kl.init_coef`` to the plan's coefficient unless the user gave one; returns (effective beta,
    init_coef in force). The effective beta is None where no fixed coefficient gives the plan (``unplanned``)."""
    ks = kl_settings(args)
    est, n = ks["estimator"], ks["n"]
    coef = get(args, "algo.kl.init_coef")
    where = f"estimator {est}, n = {n}, K = {k if k is not None else 'infinity'}"
    if unplanned is not None:
        say(
            f"{ACCEPT_FLAG}: training with {transform.spec} at --algo.kl.init_coef {coef:g}; the KL will NOT follow "
            f"the plan (planned beta {beta:.4g} for KL {kl_budget:g} nats): {unplanned}"
        )
        return None, coef
    planned_coef = kl_coef_for_beta(beta, est, n)
    if not _is_explicit(args):
        args.algo.kl.init_coef = planned_coef
        say(
            f"KL COEFFICIENT SET BY THE PLAN: --algo.kl.init_coef was not given, training at "
            f"--algo.kl.init_coef {planned_coef:.4g} (planned beta {beta:.4g} for {transform.spec} at KL "
            f"{kl_budget:g} nats; {where}): {_expected(inference, transform, beta, k)}"
        )
        return beta, planned_coef
    if coef is None or coef <= 0:
        say(
            f"--algo.kl.init_coef {coef} (given): no KL penalty, so nothing holds the policy near the reference; "
            f"the plan's is {planned_coef:.4g} (beta {beta:.4g}, {where})"
        )
        return None, coef
    effective = beta_for_kl_coef(coef, est, n)
    same = abs(coef - planned_coef) <= 1e-3 * planned_coef
    head = "is the plan's" if same else f"differs from the planned beta {beta:.4g} (init_coef {planned_coef:.4g})"
    say(
        f"--algo.kl.init_coef {coef:g} (given) {head}; using yours: effective beta {effective:.4g} ({where}), "
        f"{_expected(inference, transform, effective, k)}"
    )
    return effective, coef
