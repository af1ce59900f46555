"""Loading InfAlign into OpenRLHF's ``train_ppo_ray``: driver-side preparation and the Ray runtime env.

Driver side (``openrlhf train_ppo``, :mod:`.console`): after upstream has parsed and validated its arguments,
:func:`run_train` wraps upstream's ``train(args)``:

1. ``--infalign.cpu`` only: the CPU mode (:mod:`.cpu`) was applied before upstream was imported; its ``ray.init``
   settings join upstream's call below. GPU runs never import it.
2. :func:`prepare` resolves ``--reward_wrapper NAME`` through the entry-point group ``openrlhf.reward_wrappers``
   (:mod:`.registry`) and calls the factory: for ``infalign.*`` that opens the reference store HERE, in the driver,
   checks its prompt template settings, plans the transform and SETS ``args.algo.kl.init_coef`` to the planned
   coefficient unless given (:mod:`.build`): before ``train(args)``, which creates the reference model only when
   it is > 0 and passes ``args`` by value to the actors it builds. The result (:class:`InfAlignState`)
   travels to the trainer actor as a constructor argument, i.e. through Ray's object store by value: other nodes
   need no shared filesystem.
3. ``ray.init`` (upstream's own call) gets ``runtime_env.worker_process_setup_hook`` = the adapter's worker hook
   (:mod:`.hook`), merged with upstream's environment (:mod:`.upstream.ray_init`), so every Ray worker loads the
   plugin (and the CPU mode in a CPU run).
4. The name upstream's ``train()`` instantiates, ``openrlhf.trainer.ppo_trainer.PPOTrainer`` (or
   ``ppo_trainer_async.PPOTrainerAsync`` with ``--train.async_enable``), points at our trainer (:mod:`.trainer`)
   for the duration of the call; the trainer installs the wrapper into its own experience maker, in its own process.

Everything is restored when ``train()`` returns, so a second run in the same process starts clean.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

import ray

from openrlhf_infalign.adapter.args import get
from openrlhf_infalign.adapter.build import say
from openrlhf_infalign.adapter.flags import TRAIN_DEFAULTS
from openrlhf_infalign.adapter.registry import load_reward_wrapper
from openrlhf_infalign.adapter.run_record import check_run
from openrlhf_infalign.adapter.trainer import use_infalign_trainer
from openrlhf_infalign.adapter.upstream.ray_init import ray_init_with_hook
from openrlhf_infalign.core.inference import InferenceProcedure
from openrlhf_infalign.store import ReferenceStore

__all__ = ["InfAlignState", "prepare", "run_train"]


@dataclass
class InfAlignState:
    """What the trainer actor needs, built in the driver and shipped by value (``self.infalign`` in the trainer).

    ``wrapper``: the reward wrapper (``wrap_experiences``) or None (evaluation only). ``store`` / ``eval_store``:
    ``ReferenceStore`` of the training / eval prompts (eval defaults to the training store). ``transform``,
    ``inference``, ``beta`` (effective KL coefficient in force), ``kl_coef`` (``--algo.kl.init_coef``, set by the
    plan in the driver before ``train()`` unless given), ``k`` (the store's median K), ``kl_budget``: the plan.
    ``args``: the ``args.infalign`` namespace. ``eval_at_start``: run the step-0 evaluation before the first update.
    ``objective``: what the wrapper trains (``ctrl`` for a transform, ``direct`` for the group estimator; None
    without a wrapper or for a third party's that does not say), recorded in the eval log.
    """

    wrapper: Any = None
    store: Any = None
    eval_store: Any = None
    transform: Any = None
    inference: Any = None
    beta: Optional[float] = None
    kl_coef: Optional[float] = None
    k: Optional[int] = None
    kl_budget: Optional[float] = None
    args: Any = None
    eval_at_start: bool = False
    objective: Optional[str] = None


def prepare(args) -> Optional[InfAlignState]:
    """Build the state the trainer needs, or None when no InfAlign feature is switched on (plain upstream run)."""
    name = get(args, "reward.wrapper")
    eval_dir = get(args, "infalign.eval_store")
    if not name and not eval_dir:
        if get(args, "infalign.store"):
            say("note: --infalign.store is given without --reward_wrapper: training uses the plain OpenRLHF reward")
        return None
    wrapper = load_reward_wrapper(name, args) if name else None
    # A third-party wrapper need only have wrap_experiences(); the plan attributes are optional (registry.py).
    store = getattr(wrapper, "store", None)
    eval_store = ReferenceStore.open(eval_dir) if eval_dir else store
    inference = getattr(wrapper, "inference", None) or InferenceProcedure.parse(
        get(args, "infalign.inference", TRAIN_DEFAULTS.inference)
    )

    at_start = get(args, "infalign.eval_at_start")
    has_eval = bool(get(args, "eval.dataset"))
    eval_at_start = bool(has_eval and eval_store is not None and (at_start is None or at_start))
    if getattr(args, "infalign", None) is not None:
        args.infalign.eval_at_start = eval_at_start  # what the trainer's eval hook reads
    if has_eval and eval_store is not None:
        # Win rates against the store mean something only if eval samples are drawn as its references were.
        check_run(args, eval_store, role="eval")
    return InfAlignState(
        wrapper=wrapper,
        store=store,
        eval_store=eval_store,
        transform=getattr(wrapper, "transform", None),
        inference=inference,
        beta=getattr(wrapper, "beta", None),
        kl_coef=getattr(wrapper, "kl_coef", None),
        k=getattr(wrapper, "k", None),
        kl_budget=getattr(wrapper, "kl_budget", None),
        args=getattr(args, "infalign", None),
        eval_at_start=eval_at_start,
        objective=getattr(wrapper, "objective", None),
    )


def run_train(train: Callable, args) -> Any:
    """Upstream's ``train(args)`` with the plugin in place (see the module docstring)."""
    cpu_mode = bool(get(args, "infalign.cpu", False))
    state = prepare(args)
    if ray.is_initialized() and (cpu_mode or state is not None):
        say("note: Ray was already initialised: worker_process_setup_hook is not added (workers import the plugin)")
    with contextlib.ExitStack() as stack:
        stack.enter_context(ray_init_with_hook(cpu_mode))
        if state is not None:
            stack.enter_context(use_infalign_trainer(state))
        return train(args)
