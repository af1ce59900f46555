"""Loading InfAlign into OpenRLHF's ``train_ppo_ray``: wrapper resolution, driver-side preparation, Ray worker hook.

Driver side (``openrlhf train_ppo``, :mod:`.console`): after upstream has parsed and validated its arguments,
:func:`run_train` wraps upstream's ``train(args)``:

1. ``--infalign.cpu`` only: the CPU compatibility module (:mod:`.cpu`) was applied before upstream was imported;
   its ``ray.init`` settings join upstream's call below. GPU runs never import it.
2. :func:`prepare` resolves ``--reward_wrapper NAME`` through the entry-point group ``openrlhf.reward_wrappers``
   and calls the factory: for ``infalign.*`` that opens the reference store HERE, in the driver, checks its prompt
   template settings, plans the transform. The result (:class:`InfAlignState`) travels to the trainer actor as a
   constructor argument, i.e. through Ray's object store by value: other nodes need no shared filesystem.
3. ``ray.init`` (upstream's own call) gets ``runtime_env.worker_process_setup_hook`` = :func:`worker_setup`, merged
   with upstream's environment, so every Ray worker loads the plugin (and the CPU module when asked for).
4. The name upstream's ``train()`` instantiates, ``openrlhf.trainer.ppo_trainer.PPOTrainer`` (or
   ``ppo_trainer_async.PPOTrainerAsync`` with ``--train.async_enable``), points at our trainer (:mod:`.trainer`)
   for the duration of the call; the trainer installs the wrapper into its own experience maker, in its own process.

Everything is restored when ``train()`` returns, so a second run in the same process starts clean.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from openrlhf_infalign.openrlhf.flags import WRAPPER_GROUP, known_wrappers

__all__ = [
    "InfAlignState",
    "SETUP_HOOK",
    "build_reward_wrapper",
    "load_reward_wrapper",
    "prepare",
    "run_train",
    "worker_setup",
]

#: Ray 2.55 wants the dotted form "pkg.module.function" (it rejects "pkg.module:function").
SETUP_HOOK = "openrlhf_infalign.openrlhf.plugin.worker_setup"
#: Set in every Ray worker's environment when --infalign.cpu is given.
CPU_ENV = "INFALIGN_CPU"

UPSTREAM_KL_INIT_COEF = 0.01  # train_ppo_ray's default for --algo.kl.init_coef


def say(msg: str) -> None:
    """Driver-side notices, in the same plain style as upstream's CLI warnings."""
    print(f"[InfAlign] {msg}", file=sys.stderr, flush=True)


# ── the Ray worker hook ──


def worker_setup() -> None:
    """``worker_process_setup_hook``: runs first in every Ray worker process of the job."""
    if os.environ.get(CPU_ENV) == "1":
        from openrlhf_infalign.openrlhf import cpu

        cpu.apply()


# ── state shipped to the trainer actor ──


@dataclass
class InfAlignState:
    """What the trainer actor needs, built in the driver and shipped by value (``self.infalign`` in the trainer).

    ``wrapper``: the reward wrapper (``wrap_experiences``) or None (evaluation only). ``store`` / ``eval_store``:
    ``ReferenceStore`` of the training / eval prompts (eval defaults to the training store). ``transform``,
    ``inference``, ``beta``, ``kl_budget``: the plan. ``args``: the ``args.infalign`` namespace.
    ``eval_at_start``: run the step-0 evaluation before the first update.
    """

    wrapper: Any = None
    store: Any = None
    eval_store: Any = None
    transform: Any = None
    inference: Any = None
    beta: Optional[float] = None
    kl_budget: Optional[float] = None
    args: Any = None
    eval_at_start: bool = False
    notes: list = field(default_factory=list)


# ── wrapper resolution ──


def load_reward_wrapper(name: str, args):
    """Resolve ``name`` in the ``openrlhf.reward_wrappers`` entry-point group and build it with ``factory(args)``."""
    from importlib.metadata import entry_points

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


def _get(args, dotted: str, default=None):
    node = args
    for part in dotted.split("."):
        node = getattr(node, part, None)
        if node is None:
            return default
    return node


def build_reward_wrapper(args, name: str, transform_spec: Optional[str] = None):
    """The ``infalign.*`` factories: open the store, check it, plan the transform, warn where training would differ."""
    from openrlhf_infalign.core.inference import InferenceProcedure
    from openrlhf_infalign.core.planning import resolve_transform
    from openrlhf_infalign.openrlhf.wrapper import CTRLRewardWrapper
    from openrlhf_infalign.store import ReferenceStore

    store_dir = _get(args, "infalign.store")
    if not store_dir:
        raise ValueError(
            f"--reward_wrapper {name} needs --infalign.store DIR: the reference rewards of the training prompts "
            "(build them with `infalign calibrate`)"
        )
    store = ReferenceStore.open(store_dir)
    store.check_template(_template_settings(args), allow_mismatch=bool(_get(args, "infalign.allow_mismatch", False)))

    inference = InferenceProcedure.parse(_get(args, "infalign.inference", "bon:4"))
    spec = transform_spec or _get(args, "infalign.transform", "auto")
    kl_budget = _get(args, "infalign.kl_budget")
    if spec.split(":")[0].strip().lower() in ("auto", "optimal") and kl_budget is None:
        raise ValueError(
            f"--infalign.transform {spec} is planned for a KL budget: pass --infalign.kl_budget NATS "
            f"(see `infalign plan --inference {inference.spec} --kl 0.5`), or give a fixed transform such as exp:t=10"
        )
    transform, beta = resolve_transform(spec, inference, kl_budget)

    wrapper = CTRLRewardWrapper(store, transform, on_missing=_get(args, "infalign.on_missing", "error"), name=name)
    wrapper.inference = inference
    wrapper.beta = beta
    wrapper.kl_budget = kl_budget
    _check_reward_flags(args, wrapper)
    say(
        f"{name}: reference store {store_dir} ({len(store)} prompts), inference {inference.spec}, "
        f"transform {transform.spec}" + (f" (planned for KL {kl_budget:g} nats)" if kl_budget is not None else "")
    )
    _report_beta(args, wrapper, spec)
    return wrapper


def _template_settings(args) -> dict:
    # What decides the exact prompt string (hence its key) in OpenRLHF's PromptDataset.
    return {
        "input_template": _get(args, "data.input_template"),
        "apply_chat_template": bool(_get(args, "data.apply_chat_template", False)),
        "input_key": _get(args, "data.input_key"),
    }


def _check_reward_flags(args, wrapper) -> None:
    clip = _get(args, "reward.clip_range")
    if clip is not None and len(clip) == 2:
        lo, hi = float(clip[0]), float(clip[1])
        if lo > 0.0 or hi < 1.0:
            say(
                f"warning: --reward.clip_range {lo:g} {hi:g} clips transformed rewards, which lie in [0, 1] "
                "(before baselines and KL). Use a range containing [0, 1], e.g. the default -10 10."
            )
    if _get(args, "reward.normalize_enable", False):
        say(
            "note: --reward.normalize_enable: the reference store's rewards must come from the same normalised "
            "reward model, or calibrated ranks are off."
        )


def _report_beta(args, wrapper, spec: str) -> None:
    beta = wrapper.beta
    if beta is None:
        return
    given = _explicit_dests
    coef = _get(args, "algo.kl.init_coef")
    explicit = ("algo.kl.init_coef" in given) if given is not None else coef != UPSTREAM_KL_INIT_COEF
    if not explicit:
        say(
            f"the plan for {wrapper.inference.spec} at KL {wrapper.kl_budget:g} recommends KL coefficient "
            f"beta = {beta:.4g} for {wrapper.transform.spec}; --algo.kl.init_coef was not given (upstream default "
            f"{coef:g}): pass --algo.kl.init_coef {beta:.4g} to train at the planned KL."
        )
    elif coef is not None and abs(coef - beta) > 1e-3 * max(abs(beta), 1e-12):
        say(f"--algo.kl.init_coef {coef:g} differs from the planned beta {beta:.4g} ({spec}); using yours.")


# Set by the console for the duration of one run: the dests the user gave explicitly (None: unknown).
_explicit_dests: Optional[set] = None


# ── driver-side preparation ──


def prepare(args) -> Optional[InfAlignState]:
    """Build the state the trainer needs, or None when no InfAlign feature is switched on (plain upstream run)."""
    name = _get(args, "reward.wrapper")
    eval_dir = _get(args, "infalign.eval_store")
    if not name and not eval_dir:
        if _get(args, "infalign.store"):
            say("note: --infalign.store is given without --reward_wrapper: training uses the plain OpenRLHF reward")
        return None
    state = InfAlignState(args=getattr(args, "infalign", None))
    if name:
        state.wrapper = load_reward_wrapper(name, args)
        for attr in ("store", "transform", "inference", "beta", "kl_budget"):
            setattr(state, attr, getattr(state.wrapper, attr, None))
    if eval_dir:
        from openrlhf_infalign.store import ReferenceStore

        state.eval_store = ReferenceStore.open(eval_dir)
    else:
        state.eval_store = state.store
    if state.inference is None:
        from openrlhf_infalign.core.inference import InferenceProcedure

        state.inference = InferenceProcedure.parse(_get(args, "infalign.inference", "bon:4"))

    at_start = _get(args, "infalign.eval_at_start")
    has_eval = bool(_get(args, "eval.dataset"))
    state.eval_at_start = bool(has_eval and state.eval_store is not None and (at_start is None or at_start))
    if getattr(args, "infalign", None) is not None:
        args.infalign.eval_at_start = state.eval_at_start  # what the trainer's eval hook reads
    if _get(args, "train.async_enable", False) and has_eval and state.eval_store is not None:
        say(
            "note: with --train.async_enable, evaluation runs in upstream's generator actor: the InfAlign win rates "
            "(eval/infalign/...) and the step-0 evaluation are not computed; the reward wrapper is active."
        )
        state.eval_at_start = False
    return state


# ── the run ──


def _merge_runtime_env(runtime_env: Optional[dict], cpu_mode: bool) -> dict:
    env = dict(runtime_env or {})
    env_vars = dict(env.get("env_vars") or {})
    if cpu_mode:
        from openrlhf_infalign.openrlhf import cpu

        cpu_env = (cpu.ray_init_kwargs(setup_hook=None).get("runtime_env") or {}).get("env_vars") or {}
        env_vars = {**cpu_env, **env_vars}
        env_vars[CPU_ENV] = "1"
    env["env_vars"] = env_vars
    hook = env.get("worker_process_setup_hook")
    if hook and hook != SETUP_HOOK:
        raise ValueError(f"ray.init already sets worker_process_setup_hook={hook!r}; cannot also load InfAlign's")
    env["worker_process_setup_hook"] = SETUP_HOOK
    return env


@contextlib.contextmanager
def _patched(obj, attr: str, value):
    old = getattr(obj, attr)
    setattr(obj, attr, value)
    try:
        yield old
    finally:
        setattr(obj, attr, old)


@contextlib.contextmanager
def ray_init_with_plugin(cpu_mode: bool):
    """Make upstream's ``ray.init(...)`` load the plugin in every worker (and the CPU settings with --infalign.cpu)."""
    import ray

    real_init = ray.init

    def init(*a, **kw):
        kw["runtime_env"] = _merge_runtime_env(kw.get("runtime_env"), cpu_mode)
        if cpu_mode and not a and "address" not in kw and not os.environ.get("RAY_ADDRESS"):
            from openrlhf_infalign.openrlhf import cpu

            for k, v in cpu.ray_init_kwargs(setup_hook=None).items():
                kw.setdefault(k, v)
        return real_init(*a, **kw)

    with _patched(ray, "init", init):
        yield


def run_train(train: Callable, args) -> Any:
    """Upstream's ``train(args)`` with the plugin in place (see the module docstring)."""
    import ray

    from openrlhf_infalign.openrlhf import trainer as infalign_trainer

    cpu_mode = bool(_get(args, "infalign.cpu", False))
    state = prepare(args)
    if ray.is_initialized() and (cpu_mode or state is not None):
        say("note: Ray was already initialised: worker_process_setup_hook is not added (workers import the plugin)")
    with contextlib.ExitStack() as stack:
        stack.enter_context(ray_init_with_plugin(cpu_mode))
        if state is not None:
            stack.enter_context(infalign_trainer.use_infalign_trainer(state))
        return train(args)
