"""InfAlign's PPO trainer: OpenRLHF 0.11.2's own trainer actor with the reward wrapper in its experience maker.

Why a subclass: upstream's trainer is a Ray actor (``@ray.remote class PPOTrainer``) living in its own process, and
the experience maker whose ``compute_advantages_and_returns`` is the reward seam is built inside it. A monkeypatch in
the driver never reaches it; the actor's own ``__init__`` does. ``PPOTrainer.__ray_actor_class__`` is the plain class:

    class InfAlignPPOTrainer(InfAlignEvalMixin, <plain PPOTrainer>)   # evaluation hook of evaluation.py
    InfAlignPPOTrainerActor = ray.remote(InfAlignPPOTrainer)

Attributes it adds (the evaluation mixin reads them):

    self.infalign            InfAlignState (launch.py) or None when the trainer is built without it (plain upstream)
    self.infalign.wrapper    the reward wrapper (CTRLRewardWrapper for infalign.*), installed in self.experience_maker
    self.infalign.store      ReferenceStore of the training prompts (shipped by value through Ray)
    self.infalign.eval_store ReferenceStore of the eval prompts (default: the training store)
    self.infalign.transform  Transform (.spec), self.infalign.inference InferenceProcedure (.spec, .kind, .n)
    self.infalign.beta       planned KL coefficient (or None); .kl_budget; .args (the args.infalign namespace)
    self.infalign.eval_at_start  run infalign_initial_evaluate() once before the first update

How upstream uses it: ``train_ppo_ray.train()`` does ``from openrlhf.trainer.ppo_trainer import PPOTrainer`` and then
``PPOTrainer.remote(pretrain, strategy, ...groups..., vllm_engines, **generate_kwargs)``. :func:`use_infalign_trainer`
points that module attribute at a launcher which adds ``infalign_state=...`` to the same call (async mode: the same
for ``ppo_trainer_async.PPOTrainerAsync``, whose training actor gets the wrapper).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import ray
from openrlhf.trainer import ppo_trainer as _ppo_trainer
from openrlhf.trainer import ppo_trainer_async as _ppo_trainer_async
from openrlhf.trainer.ppo_trainer import PPOTrainer as _UpstreamPPOTrainerActor

from openrlhf_infalign.openrlhf.evaluation import InfAlignEvalMixin

__all__ = [
    "InfAlignPPOTrainer",
    "InfAlignPPOTrainerActor",
    "InfAlignPPOTrainerAsync",
    "InfAlignTrainingActor",
    "install_reward_wrapper",
    "patched",
    "use_infalign_trainer",
    "UpstreamPPOTrainer",
]

#: The plain (non-actor) class behind upstream's ``@ray.remote class PPOTrainer``.
UpstreamPPOTrainer = _UpstreamPPOTrainerActor.__ray_actor_class__


def install_reward_wrapper(experience_maker, wrapper) -> None:
    """Make ``experience_maker.compute_advantages_and_returns`` wrap the rewards first (idempotent).

    Instance-level, so only this trainer's maker changes. At that point every reward path (local RM actors, remote
    RM, reward_func) has filled ``experience.rewards`` and no baseline, normalisation, clip or KL term has run.
    """
    if getattr(experience_maker, "_infalign_reward_wrapper", None) is wrapper:
        return
    upstream = type(experience_maker).compute_advantages_and_returns.__get__(experience_maker)

    def compute_advantages_and_returns(experiences, *args, **kwargs):
        return upstream(wrapper.wrap_experiences(experiences), *args, **kwargs)

    experience_maker.compute_advantages_and_returns = compute_advantages_and_returns
    experience_maker._infalign_reward_wrapper = wrapper


def _setup(trainer, state) -> None:
    trainer.infalign = state
    if state is None or state.wrapper is None:
        return
    if getattr(trainer.experience_maker, "reward_wrapper", None) is not None:
        return  # an OpenRLHF with patches/ applied already runs the wrapper natively at the same seam
    install_reward_wrapper(trainer.experience_maker, state.wrapper)


class InfAlignPPOTrainer(InfAlignEvalMixin, UpstreamPPOTrainer):
    """Upstream ``PPOTrainer`` + the reward wrapper in its experience maker + the step-0 evaluation."""

    def __init__(self, *args, infalign_state=None, **kwargs):
        super().__init__(*args, **kwargs)
        _setup(self, infalign_state)

    def fit(self, global_step: int = 0) -> None:
        state = self.infalign
        if state is not None and state.eval_at_start and global_step == 0 and not self._infalign_resuming():
            self.infalign_initial_evaluate()
        return super().fit(global_step)

    def _infalign_resuming(self) -> bool:
        # Same test as upstream's init_checkpoint_states(): a resumed run already had its step-0 evaluation.
        return bool(self.args.ckpt.load_enable and os.path.exists(os.path.join(self.args.ckpt.path, "_actor")))


InfAlignPPOTrainerActor = ray.remote(InfAlignPPOTrainer)


# ── async mode (--train.async_enable): the wrapper goes into the training actor ──


class InfAlignTrainingActor(_ppo_trainer_async.TrainingActor.__ray_actor_class__):
    """Upstream's async ``TrainingActor`` (it owns the experience maker) with the reward wrapper installed."""

    def __init__(self, *args, infalign_state=None, **kwargs):
        super().__init__(*args, **kwargs)
        _setup(self, infalign_state)


InfAlignTrainingActorActor = ray.remote(InfAlignTrainingActor)


class InfAlignPPOTrainerAsync(_ppo_trainer_async.PPOTrainerAsync.__ray_actor_class__):
    """Upstream's ``PPOTrainerAsync``; the ``TrainingActor`` it creates (in this actor's process) is ours."""

    def __init__(self, *args, infalign_state=None, **kwargs):
        # Upstream's __init__ looks the module global up at call time, in this actor's process.
        with patched(_ppo_trainer_async, "TrainingActor", _Launcher(InfAlignTrainingActorActor, infalign_state)):
            super().__init__(*args, **kwargs)


InfAlignPPOTrainerAsyncActor = ray.remote(InfAlignPPOTrainerAsync)


class _Launcher:
    """Stands where upstream's code says ``SomeTrainer.remote(...)`` and adds ``infalign_state`` to the call."""

    def __init__(self, actor_class, state):
        self.actor_class = actor_class
        self.state = state

    def remote(self, *args, **kwargs):
        return self.actor_class.remote(*args, infalign_state=self.state, **kwargs)

    def options(self, **options):
        return _Launcher(self.actor_class.options(**options), self.state)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.actor_class, name)


@contextlib.contextmanager
def patched(obj, name: str, value):
    """``obj.name`` is ``value`` while the block runs (yields the original), then the original again.

    How the plugin reaches upstream code without editing it: upstream looks these names up at call time.
    """
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield old
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def use_infalign_trainer(state):
    """Driver side: while active, upstream ``train()`` builds our trainer (sync and async) with ``state``."""
    with patched(_ppo_trainer, "PPOTrainer", _Launcher(InfAlignPPOTrainerActor, state)):
        with patched(_ppo_trainer_async, "PPOTrainerAsync", _Launcher(InfAlignPPOTrainerAsyncActor, state)):
            yield
