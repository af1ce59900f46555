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
for ``ppo_trainer_async.PPOTrainerAsync``, whose training actor gets the wrapper and completes the evaluations its
generator actor samples; see "async mode" below).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import ray
from openrlhf.trainer import ppo_trainer as _ppo_trainer
from openrlhf.trainer import ppo_trainer_async as _ppo_trainer_async
from openrlhf.trainer.ppo_trainer import PPOTrainer as _UpstreamPPOTrainerActor

from openrlhf_infalign.adapter.evaluation import InfAlignEvalMixin
from openrlhf_infalign.adapter.upstream import patched
from openrlhf_infalign.adapter.upstream.experience_maker import install_reward_wrapper

__all__ = [
    "InfAlignPPOTrainer",
    "InfAlignPPOTrainerActor",
    "AsyncEvalSamples",
    "InfAlignGenerateSamples",
    "InfAlignPPOTrainerAsync",
    "InfAlignTrainingActor",
    "use_infalign_trainer",
    "UpstreamPPOTrainer",
]

#: The plain (non-actor) class behind upstream's ``@ray.remote class PPOTrainer``.
UpstreamPPOTrainer = _UpstreamPPOTrainerActor.__ray_actor_class__


def _setup(trainer, state) -> None:
    trainer.infalign = state
    if state is None or state.wrapper is None:
        return
    if getattr(trainer.experience_maker, "reward_wrapper", None) is not None:
        return  # an OpenRLHF with adapter/patches/ applied already runs the wrapper natively at the same seam
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


# ── async mode (--train.async_enable) ──
#
# Upstream splits the trainer in two actors: GenerateSamplesActor (vLLM rollouts and the eval samples) and
# TrainingActor (experience maker, reward model group, KL controller, loggers). The wrapper goes into the training
# actor's maker. Evaluation: our generator ships the eval samples (AsyncEvalSamples) where upstream ships its
# metrics; our training actor turns them into metrics + win rates (it has the reward model, the store and the KL)
# before upstream's fit() logs them and saves the best checkpoint. Added to upstream's schedule: the step-0
# evaluation (generator, before its first rollout) and the final step's (training actor, after the last update).


@dataclass
class AsyncEvalSamples:
    """What our generator actor puts in the rollout queue in place of upstream's eval metrics dict."""

    samples: list
    generate_kwargs: dict
    eval_batches: list  # (datasources, prompts, None, None) per eval batch: what compute_eval_metrics reads


class InfAlignGenerateSamples(_ppo_trainer_async.GenerateSamplesActor.__ray_actor_class__):
    """Upstream's async generator; its evaluations ship samples, and it runs the step-0 evaluation."""

    def __init__(self, *args, infalign_eval_at_start=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.infalign_eval_at_start = infalign_eval_at_start

    def _run_eval(self) -> AsyncEvalSamples:
        kwargs = self.generate_kwargs.copy()
        kwargs["temperature"] = self.args.eval.temperature
        kwargs["n_samples_per_prompt"] = self.args.eval.n_samples_per_prompt
        samples = self.samples_generator.generate_eval_samples(**kwargs)
        batches = [(datasources, prompts, None, None) for datasources, prompts, _, _ in self.eval_dataloader]
        return AsyncEvalSamples(samples, kwargs, batches)

    def infalign_evaluate(self) -> AsyncEvalSamples:
        """One evaluation on request of the training actor (after the last update, when upstream's loop is done)."""
        ray.get(self.vllm_lock.acquire.remote())
        try:
            return self._run_eval()
        finally:
            ray.get(self.vllm_lock.release.remote())

    def fit(self, episode: int, total_consumed_prompts: int) -> None:
        # A resumed run (prompts already consumed) had its step-0 evaluation. Same slot-token protocol as upstream's
        # evaluations: take a token, queue the evaluation, the training actor returns the token.
        fresh = not (episode or total_consumed_prompts)
        if self.infalign_eval_at_start and self.eval_dataloader is not None and fresh:
            step = self.rollout_slots.get(block=True)
            self._last_eval_step = step
            self.rollout_queue.put(("eval", step, self.infalign_evaluate()), block=True)
        return super().fit(episode, total_consumed_prompts)


class _EvalCompletingQueue:
    """The training actor's view of the rollout queue: eval samples come out as metrics (win rates included)."""

    def __init__(self, queue, trainer):
        self.queue = queue
        self.trainer = trainer

    def get(self, *args, **kwargs):
        payload = self.queue.get(*args, **kwargs)
        if payload == "done":
            self.trainer.infalign_final_evaluate()
        elif isinstance(payload, tuple) and payload[0] == "eval" and isinstance(payload[2], AsyncEvalSamples):
            payload = ("eval", payload[1], self.trainer.infalign_async_eval_logs(payload[1], payload[2]))
        return payload

    def __getattr__(self, name: str) -> Any:
        return getattr(self.queue, name)


# Declared as upstream declares its actor (``@ray.remote class``), not ``ray.remote(<plain class>)``: ray.remote copies
# every method into the actor class it ships, and cloudpickle ships by value what it cannot import by name, as
# upstream's TrainingActor methods (its module name is an ActorClass); their zero-argument super() (in
# broadcast_to_vllm) then names a COPY of upstream's class. Only if our class ships by value too is that copy the one
# in its MRO; a plain module-level class ships by name and keeps the imported original there (TypeError in super()).
@ray.remote
class InfAlignTrainingActor(InfAlignEvalMixin, _ppo_trainer_async.TrainingActor.__ray_actor_class__):
    """Upstream's async ``TrainingActor`` (it owns the experience maker) with the reward wrapper installed and the
    InfAlign evaluation completed here (see "async mode" above)."""

    def __init__(self, *args, infalign_state=None, **kwargs):
        super().__init__(*args, **kwargs)
        _setup(self, infalign_state)
        self.rollout_queue = _EvalCompletingQueue(self.rollout_queue, self)
        self._infalign_generator = None
        self._infalign_step = 0
        self._infalign_last_eval_step = None

    def infalign_set_generator(self, generator) -> None:
        self._infalign_generator = generator

    def train_step(self, rollout_samples, global_step: int):
        status, global_step = super().train_step(rollout_samples, global_step)
        self._infalign_step = global_step
        return status, global_step

    def infalign_async_eval_logs(self, global_step: int, shipped: AsyncEvalSamples) -> dict:
        if global_step == 0:
            self._infalign_kl, self._infalign_kl_token_mean = 0.0, 0.0
        self._infalign_last_eval_step = global_step
        return self.infalign_eval_logs(global_step, shipped.samples, shipped.generate_kwargs, shipped.eval_batches)

    def infalign_final_evaluate(self) -> None:
        """The evaluation sync mode runs after the last update (upstream's async loop has ended before it)."""
        step, every = self._infalign_step, self.args.eval.steps
        if self._infalign_generator is None or not self.args.eval.dataset or every == float("inf") or step == 0:
            return
        if step % every or step == self._infalign_last_eval_step:
            return
        logs = self.infalign_async_eval_logs(step, ray.get(self._infalign_generator.infalign_evaluate.remote()))
        _ppo_trainer_async.logger.info(f"Eval at step {step}: {logs}")
        if self.wandb_logger:
            self.wandb_logger.log_eval(step, logs)
        if self.tensorboard_logger:
            self.tensorboard_logger.log_eval(step, logs)
        client_states = {**getattr(self, "_latest_client_states", {}), "global_step": step}
        self.save_best_checkpoint(logs, step, client_states)

    def save_best_checkpoint(self, eval_metrics, global_step, client_states=None):
        # As in sync mode, the step-0 evaluation (the base policy) updates no best-checkpoint state.
        if global_step == 0:
            return
        return super().save_best_checkpoint(eval_metrics, global_step, client_states)


InfAlignGenerateSamplesActor = ray.remote(InfAlignGenerateSamples)


class InfAlignPPOTrainerAsync(_ppo_trainer_async.PPOTrainerAsync.__ray_actor_class__):
    """Upstream's ``PPOTrainerAsync``; the two actors it creates (in this actor's process) are ours."""

    def __init__(self, *args, infalign_state=None, **kwargs):
        at_start = bool(getattr(infalign_state, "eval_at_start", False))
        # Upstream's __init__ looks the module globals up at call time, in this actor's process.
        generator = _Launcher(InfAlignGenerateSamplesActor, infalign_eval_at_start=at_start)
        with patched(_ppo_trainer_async, "GenerateSamplesActor", generator):
            with patched(_ppo_trainer_async, "TrainingActor", _Launcher(InfAlignTrainingActor, infalign_state)):
                super().__init__(*args, **kwargs)
        # Calls from one caller to one actor run in order: this one before upstream's fit().
        self.trainer_actor.infalign_set_generator.remote(self.generator_actor)


InfAlignPPOTrainerAsyncActor = ray.remote(InfAlignPPOTrainerAsync)


class _Launcher:
    """Stands where upstream's code says ``SomeActor.remote(...)`` and adds ``infalign_state`` (or ``extra``) to it."""

    def __init__(self, actor_class, state=None, **extra):
        self.actor_class = actor_class
        self.state = state
        self.extra = extra or {"infalign_state": state}

    def remote(self, *args, **kwargs):
        return self.actor_class.remote(*args, **self.extra, **kwargs)

    def options(self, **options):
        return _Launcher(self.actor_class.options(**options), self.state, **self.extra)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.actor_class, name)


@contextlib.contextmanager
def use_infalign_trainer(state):
    """Driver side: while active, upstream ``train()`` builds our trainer (sync and async) with ``state``."""
    with patched(_ppo_trainer, "PPOTrainer", _Launcher(InfAlignPPOTrainerActor, state)):
        with patched(_ppo_trainer_async, "PPOTrainerAsync", _Launcher(InfAlignPPOTrainerAsyncActor, state)):
            yield
