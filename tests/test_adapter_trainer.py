"""InfAlign's trainer subclass of OpenRLHF 0.11.2's REAL PPOTrainer actor class.

The upstream constructor runs for real (KL controller, RemoteExperienceMaker, loggers, best-metric state); only its
data/vLLM plumbing (tokenizer download, dataset loading, the vLLM sample generator) is replaced, because those need
a model on disk and engines -- the CPU end-to-end test covers them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from openrlhf_infalign.adapter.cpu.standins import install_flash_attn

install_flash_attn()

import cloudpickle  # noqa: E402
import openrlhf.trainer.ppo_trainer as upstream  # noqa: E402
import openrlhf.trainer.ppo_trainer_async as upstream_async  # noqa: E402
import ray  # noqa: E402
from openrlhf.trainer.ppo_utils.experience import Experience  # noqa: E402
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker  # noqa: E402

from openrlhf_infalign.adapter import trainer as T  # noqa: E402
from openrlhf_infalign.adapter.evaluation import InfAlignEvalMixin  # noqa: E402
from openrlhf_infalign.adapter.launch import InfAlignState  # noqa: E402
from openrlhf_infalign.adapter.wrapper import INFO_TRANSFORMED, CTRLRewardWrapper  # noqa: E402
from openrlhf_infalign.core.inference import InferenceProcedure  # noqa: E402
from openrlhf_infalign.core.transforms import parse_transform  # noqa: E402
from openrlhf_infalign.store import ReferenceStore, prompt_key  # noqa: E402

PROMPTS = ["Q : a A :", "Q : b A :"]


class _Strategy:
    def __init__(self, args):
        self.args = args

    def print(self, *a):
        pass


@pytest.fixture
def state():
    rng = np.random.default_rng(3)
    store = ReferenceStore.from_arrays([prompt_key(p) for p in PROMPTS], [rng.normal(size=16) for _ in PROMPTS])
    wrapper = CTRLRewardWrapper(store, parse_transform("exp:t=4"))
    return InfAlignState(
        wrapper=wrapper, store=store, eval_store=store, transform=wrapper.transform,
        inference=InferenceProcedure.parse("bon:4"), eval_at_start=True,
    )  # fmt: skip


@pytest.fixture
def no_data_plumbing(monkeypatch):
    """Replace what needs a model on disk / vLLM engines; everything else in the constructor is upstream's."""
    monkeypatch.setattr(upstream, "get_tokenizer", lambda *a, **k: type("Tok", (), {"pad_token_id": 0})())
    monkeypatch.setattr(upstream, "prepare_datasets", lambda strategy, tok: (["batch"], None, 7))
    monkeypatch.setattr(upstream, "SamplesGenerator", lambda **kw: ("samples-generator", kw))


def build(args, **kw):
    return T.InfAlignPPOTrainer("policy", _Strategy(args), None, None, None, None, None, max_len=64, **kw)


def test_class_construction_mro_and_ray_rewrap():
    plain = upstream.PPOTrainer.__ray_actor_class__
    assert isinstance(upstream.PPOTrainer, ray.actor.ActorClass)
    assert T.UpstreamPPOTrainer is plain
    mro = T.InfAlignPPOTrainer.__mro__
    assert mro.index(InfAlignEvalMixin) < mro.index(plain) < mro.index(upstream.BasePPOTrainer)
    assert isinstance(T.InfAlignPPOTrainerActor, ray.actor.ActorClass)
    assert T.InfAlignPPOTrainerActor.__ray_actor_class__ is T.InfAlignPPOTrainer
    assert not hasattr(T.InfAlignPPOTrainer, "__ray_ready__")  # re-wrapping did not modify our plain class
    # the methods upstream's driver calls on the actor are there
    for name in ("fit", "get_max_steps", "evaluate", "train_step"):
        assert callable(getattr(T.InfAlignPPOTrainer, name))
    # async mode: the training actor (owner of the experience maker) and the coordinator
    assert issubclass(T.InfAlignTrainingActor.__ray_actor_class__, upstream_async.TrainingActor.__ray_actor_class__)
    assert isinstance(T.InfAlignTrainingActor, ray.actor.ActorClass)  # declared @ray.remote: it ships by value
    assert issubclass(T.InfAlignPPOTrainerAsync, upstream_async.PPOTrainerAsync.__ray_actor_class__)
    assert isinstance(T.InfAlignPPOTrainerAsyncActor, ray.actor.ActorClass)


def test_real_constructor_installs_wrapper_in_experience_maker(no_data_plumbing, state, upstream_args):
    args = upstream_args("--algo.advantage.estimator", "reinforce", "--algo.kl.init_coef", "0.02")
    trainer = build(args, infalign_state=state)
    assert trainer.infalign is state
    maker = trainer.experience_maker
    assert type(maker) is RemoteExperienceMaker and maker._infalign_reward_wrapper is state.wrapper
    assert trainer.kl_ctl.value == pytest.approx(0.02) and trainer.max_steps == 7
    assert trainer.generate_kwargs == {"max_len": 64}  # infalign_state did not leak into upstream's kwargs

    # the trainer's own maker now trains on Phi(C(x, y))
    r = [0.3, -1.0]
    exps = [
        Experience(
            rewards=torch.tensor([x]), prompts=[p], index=[i], action_mask=torch.ones(1, 3, dtype=torch.bool),
            kl=torch.zeros(1, 3), info={},
        )
        for i, (p, x) in enumerate(zip(PROMPTS, r))
    ]  # fmt: skip
    out = maker.compute_advantages_and_returns(exps)
    expected = state.wrapper(PROMPTS, torch.tensor(r))[0]
    torch.testing.assert_close(torch.cat([e.info[INFO_TRANSFORMED] for e in out]), expected)
    torch.testing.assert_close(torch.stack([e.returns[0, 0] for e in out]), expected)


def test_without_state_trainer_is_upstream(no_data_plumbing, upstream_args):
    trainer = build(upstream_args("--algo.advantage.estimator", "reinforce"))
    assert trainer.infalign is None
    assert "compute_advantages_and_returns" not in vars(trainer.experience_maker)


def test_fit_runs_step0_evaluation_first(no_data_plumbing, state, monkeypatch, upstream_args):
    calls = []
    monkeypatch.setattr(T.UpstreamPPOTrainer, "fit", lambda self, global_step=0: calls.append(("fit", global_step)))
    monkeypatch.setattr(InfAlignEvalMixin, "infalign_initial_evaluate", lambda self, *a: calls.append(("eval0",)))
    trainer = build(upstream_args("--algo.advantage.estimator", "reinforce"), infalign_state=state)
    trainer.fit()
    assert calls == [("eval0",), ("fit", 0)]
    calls.clear()
    state.eval_at_start = False
    trainer.fit()
    assert calls == [("fit", 0)]


def test_async_trainer_swaps_training_actor_in_its_process(state, monkeypatch):
    seen = {}

    class FakeTrainerActor:  # the handle upstream's __init__ leaves in self.trainer_actor
        class infalign_set_generator:
            @staticmethod
            def remote(generator):
                seen["generator"] = generator

    def fake_upstream_init(self, *args, **kwargs):  # upstream's __init__ builds TrainingActor.remote(...) here
        seen["TrainingActor"] = upstream_async.TrainingActor
        seen["GenerateSamplesActor"] = upstream_async.GenerateSamplesActor
        seen["kwargs"] = kwargs
        self.trainer_actor, self.generator_actor = FakeTrainerActor(), "generator-handle"

    monkeypatch.setattr(upstream_async.PPOTrainerAsync.__ray_actor_class__, "__init__", fake_upstream_init)
    T.InfAlignPPOTrainerAsync("policy", None, infalign_state=state, max_len=8)
    launcher = seen["TrainingActor"]
    assert launcher.actor_class is T.InfAlignTrainingActor and launcher.state is state
    assert seen["kwargs"] == {"max_len": 8}
    assert isinstance(upstream_async.TrainingActor, ray.actor.ActorClass)  # restored
    # the generator actor learns whether to run the step-0 evaluation; the training actor gets its handle
    generator = seen["GenerateSamplesActor"]
    assert generator.actor_class is T.InfAlignGenerateSamplesActor
    assert generator.extra == {"infalign_eval_at_start": True}
    assert isinstance(upstream_async.GenerateSamplesActor, ray.actor.ActorClass)  # restored
    assert seen["generator"] == "generator-handle"


def test_launcher_adds_state_to_remote_call(state):
    calls = []

    class FakeActorClass:
        def remote(self, *a, **k):
            calls.append((a, k))

        def options(self, **o):
            calls.append(("options", o))
            return self

    T._Launcher(FakeActorClass(), state).options(num_cpus=1).remote("pretrain", max_len=3)
    assert calls == [("options", {"num_cpus": 1}), (("pretrain",), {"infalign_state": state, "max_len": 3})]


def test_state_ships_by_value(state):
    # Ray serialises actor arguments with cloudpickle; the store travels with its data, not its path.
    copy = cloudpickle.loads(cloudpickle.dumps(state))
    r = torch.tensor([0.5, 0.1])
    torch.testing.assert_close(copy.wrapper(PROMPTS, r)[0], state.wrapper(PROMPTS, r)[0])
    assert copy.inference.spec == "bon:4" and len(copy.eval_store) == 2


def test_no_double_wrapping_on_a_patched_openrlhf(no_data_plumbing, state, monkeypatch, upstream_args):
    # With adapter/patches/ applied, upstream's maker carries the wrapper natively (reward_wrapper attribute): leave it be.
    orig_init = RemoteExperienceMaker.__init__

    def patched_init(self, *a, **k):
        orig_init(self, *a, **k)
        self.reward_wrapper = state.wrapper

    monkeypatch.setattr(RemoteExperienceMaker, "__init__", patched_init)
    trainer = build(upstream_args("--algo.advantage.estimator", "reinforce"), infalign_state=state)
    assert trainer.infalign is state
    assert "compute_advantages_and_returns" not in vars(trainer.experience_maker)
