"""Evaluation with a LOCAL reward model, through Ray: what upstream's CLI refuses (eval needs a remote RM there).

Real: Ray on loopback, OpenRLHF's SamplesGenerator.generate_eval_samples (dispatch, ray.wait loop, response ->
Experience), RayActorGroup with two RewardModelActor processes (upstream's forward, a real OpenRLHF RewardModel
loaded by get_llm_for_sequence_regression from a tiny local checkpoint), RemoteExperienceMaker's dispatch/flatten
helpers, compute_eval_metrics. Stand-ins: the vLLM engines (a Ray actor sampling random responses) and, in the reward
actors, DeepSpeed's engine wrapper (an eval-only RM needs none) plus the CPU patches of openrlhf_infalign.adapter.cpu.

Checks: every eval sample gets ITS reward (equal to scoring it alone, unpadded, in this process); the step-0
evaluation of a policy that samples like the base policy is consistent with 0.5 for every N.
"""

import json
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("openrlhf")
ray = pytest.importorskip("ray")
torch = pytest.importorskip("torch")
cpu = pytest.importorskip("openrlhf_infalign.adapter.cpu")
tiny = pytest.importorskip("openrlhf_infalign.demo.tiny")

cpu.apply()

from openrlhf.models import get_llm_for_sequence_regression  # noqa: E402
from openrlhf.trainer.ppo_trainer import BasePPOTrainer, PPOTrainer  # noqa: E402
from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator  # noqa: E402
from openrlhf.trainer.ray.launcher import RayActorGroup, RewardModelActor  # noqa: E402
from openrlhf.utils.config import hierarchize  # noqa: E402

from openrlhf_infalign.adapter import evaluation as ev  # noqa: E402
from openrlhf_infalign.adapter.hook import runtime_env  # noqa: E402
from openrlhf_infalign.adapter.upstream.train_ppo_ray import train_ppo_parser  # noqa: E402
from openrlhf_infalign.store import ReferenceStore, prompt_key  # noqa: E402

pytestmark = pytest.mark.openrlhf

PROMPTS = [f"Q : question number {i} A :" for i in range(40)]
M, K = 4, 8


def prompt_tokens(prompt):
    return [1] + [4 + (ord(c) * 7 + i) % 200 for i, c in enumerate(prompt[-6:])]


def sample_response(prompt, rng):
    """The 'base policy': a response of 2-6 random tokens (same law for reference and eval samples)."""
    toks = rng.integers(4, 300, size=int(rng.integers(2, 7))).tolist()
    obs = prompt_tokens(prompt) + toks
    return {
        "prompt": prompt,
        "label": "",
        "observation_tokens": obs,
        "action_ranges": [(len(obs) - len(toks), len(obs))],
        "reward": None,  # a local RM scores it later (the rollout worker has no reward_func / URL)
        "scores": None,
        "rollout_log_probs": None,
        "truncated": False,
        "extra_logs": {},
    }


class FakeRolloutEngine:
    """Stands in for OpenRLHF's vLLM RolloutRayActor (CUDA vLLM): same two methods the SamplesGenerator calls."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def get_num_unfinished_requests(self):
        return 0

    def generate_responses(self, prompt, label, sampling_params, max_length, hf_tokenizer, num_samples, images=None):
        return [sample_response(prompt, self.rng) for _ in range(num_samples)]


class EvalRewardActor(RewardModelActor.__ray_actor_class__):
    """Upstream's RewardModelActor (its forward() is what runs); loading skips the DeepSpeed engine wrapper."""

    def init_model_from_pretrained(self, strategy, pretrain):
        self.strategy = strategy
        self.model = get_llm_for_sequence_regression(
            pretrain, "reward", param_dtype="bf16", attn_implementation="sdpa"
        )
        self.model.eval()

    def empty_cache(self):
        pass


@pytest.fixture(scope="module")
def ray_cluster():
    # The test module's classes travel to the workers by value (pytest's importlib mode: not importable there).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(
        **cpu.ray_init_kwargs(num_cpus=4, num_gpus=2),
        runtime_env=runtime_env(None, cpu_mode=True),
        log_to_driver=False,
    )
    yield
    ray.shutdown()


def _score_alone(model, obs):
    seq = torch.tensor([obs])
    with torch.no_grad():
        return float(model(seq, torch.ones_like(seq), pad_sequence=True).float().item())


def test_local_reward_model_eval_through_ray(ray_cluster, tmp_path):
    tok = tiny.build_tokenizer(tmp_path / "tok")
    rm_path = tiny.build_reward_model(tmp_path / "rm", tok, seed=0)
    local_rm = get_llm_for_sequence_regression(rm_path, "reward", param_dtype="bf16", attn_implementation="sdpa")
    local_rm.eval()

    # Reference store: K base-policy samples per prompt scored by the same reward model (what `infalign calibrate`
    # does with vLLM + the RM; here the sampler is the fake engine's law).
    rng = np.random.default_rng(123)
    refs = [[_score_alone(local_rm, sample_response(p, rng)["observation_tokens"]) for _ in range(K)] for p in PROMPTS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store = ReferenceStore.from_arrays([prompt_key(p) for p in PROMPTS], [np.float32(r) for r in refs])

    argv = [
        "--actor.model_name_or_path", "tiny",
        "--reward.model_name_or_path", rm_path,
        "--eval.dataset", "eval.jsonl",
        "--eval.n_samples_per_prompt", str(M),
        "--eval.temperature", "1.0",
        "--rollout.batch_size", "16",
        "--rollout.micro_batch_size", "3",
        "--ckpt.output_dir", str(tmp_path / "run"),
    ]  # fmt: skip
    args = hierarchize(train_ppo_parser().parse_args(argv))

    # Upstream's trainer class with the mixin; its __init__ would also load a tokenizer and datasets: by hand.
    trainer_cls = type("EvalTrainer", (ev.InfAlignEvalMixin, PPOTrainer.__ray_actor_class__), {})
    t = trainer_cls.__new__(trainer_cls)
    engines = [ray.remote(num_cpus=0)(FakeRolloutEngine).remote(seed) for seed in (7,)]
    rm_group = RayActorGroup(1, 2, ray.remote(EvalRewardActor), num_gpus_per_actor=1)
    rm_strategy = SimpleNamespace(ring_attn_group=None, args=args, is_rank_0=lambda: False)
    ray.get(rm_group.async_init_model_from_pretrained(rm_strategy, rm_path))
    strategy = SimpleNamespace(args=args)
    BasePPOTrainer.__init__(t, strategy, None, None, rm_group, None, engines, tok)
    t.eval_dataloader = [(["default"] * 8, PROMPTS[i : i + 8], [""] * 8, [None] * 8) for i in range(0, 40, 8)]
    t.samples_generator = SamplesGenerator(strategy, None, t.eval_dataloader, tok, engines)
    t.generate_kwargs = {"do_sample": True, "max_len": 64, "max_new_tokens": 8, "temperature": 1.0, "top_p": 1.0}
    t.infalign = SimpleNamespace(store=store, eval_store=store, inference="bon:4", transform=None, eval_at_start=True)

    captured = {}
    real_generate = t.samples_generator.generate_eval_samples

    def generate_eval_samples(**kw):
        captured["samples"] = real_generate(**kw)
        assert all(s.rewards is None for s in captured["samples"])  # nobody scored them yet: the local RM must
        return captured["samples"]

    t.samples_generator.generate_eval_samples = generate_eval_samples
    logs = t.infalign_initial_evaluate()

    samples = captured["samples"]
    assert len(samples) == len(PROMPTS) * M
    # Each sample got its own reward: the batched, right-padded score of the actors equals scoring it alone.
    got = np.array([float(s.rewards.reshape(-1)[0]) for s in samples])
    alone = np.array([_score_alone(local_rm, s.sequences[0].tolist()) for s in samples])
    np.testing.assert_allclose(got, alone, rtol=0.02, atol=0.02)
    assert np.unique(np.round(alone, 2)).size > len(alone) // 2  # distinct rewards: a mix-up could not hide
    assert all(float(s.info["reward"][0]) == float(s.rewards[0]) for s in samples)

    # Upstream's pass@k metrics now exist with a local RM, and the step-0 win rates are consistent with 0.5.
    assert "eval_default_pass1" in logs and logs["eval_num_samples"] == len(PROMPTS) * M
    with open(tmp_path / "run" / ev.EVAL_LOG) as f:
        (rec,) = [json.loads(line) for line in f]
    assert rec["step"] == 0 and rec["kl"] == 0.0 and rec["num_prompts"] == len(PROMPTS)
    assert set(rec["bon"]) == {"1", "2", "4"}  # powers of two up to min(M, K)
    for kind in ("bon", "won"):
        for n, v in rec[kind].items():
            assert abs(v["win_rate"] - 0.5) < 4 * v["stderr"], (kind, n, v)
            assert logs[f"infalign/{kind}_{n}"] == v["win_rate"]
