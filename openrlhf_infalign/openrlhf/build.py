"""Building the ``infalign.*`` reward wrappers from OpenRLHF's parsed arguments, in the driver.

:func:`ctrl_settings` opens the reference store (``--infalign.store``), checks its run record against this
run's (:mod:`.run_record`: template, sampling, policy, reward source, normalisation), plans the transform for
``--infalign.inference`` at ``--infalign.kl_budget``, and says where training would differ from the plan: reward
flags that distort [0, 1] rewards, and the planned KL coefficient beta against ``--algo.kl.init_coef``. Its result
is the complete set of constructor arguments of :class:`~openrlhf_infalign.openrlhf.wrapper.CTRLRewardWrapper`; the
entry-point factories in :mod:`.wrapper` build the wrapper from it.
"""

from __future__ import annotations

import sys
from typing import Optional

from openrlhf_infalign.core.inference import InferenceProcedure
from openrlhf_infalign.core.planning import resolve_transform
from openrlhf_infalign.openrlhf.args import get
from openrlhf_infalign.openrlhf.flags import DEFAULTS
from openrlhf_infalign.openrlhf.run_record import check_run
from openrlhf_infalign.store import ReferenceStore

__all__ = ["UPSTREAM_KL_INIT_COEF", "ctrl_settings", "say"]

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
    transform, beta = resolve_transform(spec, inference, kl_budget)

    _check_reward_flags(args)
    say(
        f"{name}: reference store {store_dir} ({len(store)} prompts), inference {inference.spec}, "
        f"transform {transform.spec}" + (f" (planned for KL {kl_budget:g} nats)" if kl_budget is not None else "")
    )
    if beta is not None:
        _advise_beta(args, inference, transform, beta, kl_budget, spec)
    return dict(
        store=store,
        transform=transform,
        inference=inference,
        beta=beta,
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


def _advise_beta(args, inference, transform, beta: float, kl_budget: float, spec: str) -> None:
    given = get(args, "infalign.explicit_dests")  # set by the console; None on the source patch path
    coef = get(args, "algo.kl.init_coef")
    explicit = ("algo.kl.init_coef" in given) if given is not None else coef != UPSTREAM_KL_INIT_COEF
    if not explicit:
        say(
            f"the plan for {inference.spec} at KL {kl_budget:g} recommends KL coefficient "
            f"beta = {beta:.4g} for {transform.spec}; --algo.kl.init_coef was not given (upstream default "
            f"{coef:g}): pass --algo.kl.init_coef {beta:.4g} to train at the planned KL."
        )
    elif coef is not None and abs(coef - beta) > 1e-3 * max(abs(beta), 1e-12):
        say(f"--algo.kl.init_coef {coef:g} differs from the planned beta {beta:.4g} ({spec}); using yours.")
