"""Building the ``infalign.*`` reward wrappers from OpenRLHF's parsed arguments, in the driver.

:func:`direct_settings` does the same for ``infalign.direct`` (store, run record, K), refuses the group sizes and
advantage estimators the direct estimator cannot train with, and applies its own planned coefficient
(:func:`.planning.apply_direct_kl_coef`).

:func:`ctrl_settings` opens the reference store (``--infalign.store``), checks its run record against this
run's (:mod:`.run_record`: template, sampling, policy, reward source, normalisation), plans the transform for
``--infalign.inference`` at ``--infalign.kl_budget`` with K = the store's median reference samples per prompt, and
says where training would differ from the plan (reward flags that distort [0, 1] rewards). Its result is the
complete set of constructor arguments of :class:`~openrlhf_infalign.adapter.wrapper.CTRLRewardWrapper`; the
entry-point factories in :mod:`.wrapper` build the wrapper from it.

The planned KL coefficient is APPLIED (:func:`.planning.apply_kl_coef`): without an explicit
``--algo.kl.init_coef``, ``args.algo.kl.init_coef`` is set to the coefficient that gives the planned beta under the
run's advantage estimator and ``--rollout.n_samples_per_prompt``. This runs in the driver, inside
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
from openrlhf_infalign.adapter.flags import TRAIN_DEFAULTS
from openrlhf_infalign.adapter.planning import (
    apply_direct_kl_coef,
    apply_kl_coef,
    check_direct,
    check_planned_kl,
    kl_settings,
)
from openrlhf_infalign.adapter.run_record import check_run
from openrlhf_infalign.core.inference import InferenceProcedure
from openrlhf_infalign.core.planning import check_k, resolve_transform
from openrlhf_infalign.store import ReferenceStore

__all__ = ["ctrl_settings", "direct_settings", "say", "store_k"]


def say(msg: str) -> None:
    """Driver-side notices, in the same plain style as upstream's CLI warnings."""
    print(f"[InfAlign] {msg}", file=sys.stderr, flush=True)


def ctrl_settings(args, name: str, transform_spec: Optional[str] = None) -> dict:
    """Keyword arguments of ``CTRLRewardWrapper`` for wrapper ``name``: store, transform and the plan behind it.

    ``transform_spec`` overrides ``--infalign.transform`` (``infalign.calibrate`` is the identity transform).
    """
    store_dir, store = _open_store(args, name)
    inference = InferenceProcedure.parse(get(args, "infalign.inference", TRAIN_DEFAULTS.inference))
    spec = transform_spec or get(args, "infalign.transform", TRAIN_DEFAULTS.transform)
    kl_budget = get(args, "infalign.kl_budget")
    if spec.split(":")[0].strip().lower() in ("auto", "optimal") and kl_budget is None:
        raise ValueError(
            f"--infalign.transform {spec} is planned for a KL budget: pass --infalign.kl_budget NATS "
            f"(see `infalign plan --inference {inference.spec} --kl-budget 0.5`), or give a fixed transform such as exp:t=10"
        )
    k = store_k(store)
    unplanned = check_planned_kl(args, f"--infalign.transform {spec}") if kl_budget is not None else None
    transform, beta = resolve_transform(spec, inference, kl_budget, k=k)

    _check_reward_flags(args)
    say(
        f"{name}: reference store {store_dir} ({len(store)} prompts, median K = {k}), inference {inference.spec}, "
        f"transform {transform.spec}" + (f" (planned for KL {kl_budget:g} nats)" if kl_budget is not None else "")
    )
    kl_coef = get(args, "algo.kl.init_coef")
    if beta is not None:
        beta, kl_coef, line = apply_kl_coef(args, inference, transform, beta, kl_budget, k, unplanned)
        say(line)
    return dict(
        store=store,
        transform=transform,
        inference=inference,
        beta=beta,
        kl_coef=kl_coef,
        k=k,
        kl_budget=kl_budget,
        on_missing=get(args, "infalign.on_missing", TRAIN_DEFAULTS.on_missing),
        name=name,
    )


def direct_settings(args, name: str) -> dict:
    """Keyword arguments of ``DirectRewardWrapper`` for wrapper ``name``: store, procedure, group size and the
    planned coefficient. Every refusal is one line naming the flags to change, before any Ray actor starts."""
    store_dir, store = _open_store(args, name)
    inference = InferenceProcedure.parse(get(args, "infalign.inference", TRAIN_DEFAULTS.inference))
    spec = get(args, "infalign.transform", TRAIN_DEFAULTS.transform)
    if spec != TRAIN_DEFAULTS.transform:
        raise ValueError(
            f"--reward_wrapper {name} trains on the group estimator of the win rate, not on a transform: drop "
            f"--infalign.transform {spec} (or use --reward_wrapper infalign.ctrl)"
        )
    ks = kl_settings(args)
    check_direct(inference, ks["estimator"], ks["n"], name)
    kl_budget = get(args, "infalign.kl_budget")
    unplanned = check_planned_kl(args, f"--reward_wrapper {name}") if kl_budget is not None else None
    k = store_k(store)
    _check_reward_flags(args, low=-1.0, what="the direct rewards (group estimator minus its baseline)")
    say(
        f"{name}: reference store {store_dir} ({len(store)} prompts, median K = {k}), inference {inference.spec}, "
        f"the unbiased group estimator of its win rate over groups of n = {ks['n']} with the leave-one-out baseline"
    )
    coef, kl_coef, line = apply_direct_kl_coef(args, inference, kl_budget, k, unplanned)
    say(line)
    return dict(
        store=store,
        inference=inference,
        n=ks["n"],
        coef=coef,
        kl_coef=kl_coef,
        k=k,
        kl_budget=kl_budget,
        on_missing=get(args, "infalign.on_missing", TRAIN_DEFAULTS.on_missing),
        name=name,
    )


def _open_store(args, name: str) -> tuple:
    """(directory, opened store) of ``--infalign.store``, its run record checked against this run's."""
    store_dir = get(args, "infalign.store")
    if not store_dir:
        raise ValueError(
            f"--reward_wrapper {name} needs --infalign.store DIR: the reference rewards of the training prompts "
            "(build them with `infalign calibrate`)"
        )
    store = ReferenceStore.open(store_dir)
    check_run(args, store)
    return store_dir, store


def _check_reward_flags(args, low: float = 0.0, what: str = "transformed rewards") -> None:
    """Warn where --reward.clip_range would clip the wrapper's rewards, which lie in [low, 1]."""
    clip = get(args, "reward.clip_range")
    if clip is not None and len(clip) == 2:
        lo, hi = float(clip[0]), float(clip[1])
        if lo > low or hi < 1.0:
            say(
                f"warning: --reward.clip_range {lo:g} {hi:g} clips {what}, which lie in [{low:g}, 1] "
                f"(before baselines and KL). Use a range containing [{low:g}, 1], e.g. the default -10 10."
            )


def store_k(store) -> Optional[int]:
    """K the plan takes for this store: its median reference rewards per prompt (None: the continuum, K < 2)."""
    stats = store.k_stats() if hasattr(store, "k_stats") else (getattr(store, "manifest", None) or {}).get("k_stats")
    median = (stats or {}).get("median")
    if median is None or round(median) < 2:
        return None
    return check_k(int(round(median)))
