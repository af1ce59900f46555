"""The CTRL reward wrapper at OpenRLHF's real seam: RemoteExperienceMaker.compute_advantages_and_returns (0.11.2).

Arguments come from OpenRLHF's REAL parser and validation (through our console, stopped at train()); experiences are
real ``Experience`` objects batched by the maker's own ``split_rollout_samples``. Only flash_attn is a stand-in.
The remote actor groups are never touched by compute_advantages_and_returns, so the maker holds None for them.
"""

from __future__ import annotations

import pickle

import cloudpickle
import numpy as np
import pytest
import torch

from openrlhf_infalign.adapter.cpu.standins import install_flash_attn

install_flash_attn()

from openrlhf.trainer.ppo_utils.experience import Experience  # noqa: E402
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker  # noqa: E402
from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController  # noqa: E402

from openrlhf_infalign.adapter.upstream.experience_maker import install_reward_wrapper  # noqa: E402
from openrlhf_infalign.adapter.wrapper import (  # noqa: E402
    INFO_CALIBRATED,
    INFO_MISSING,
    INFO_RAW,
    INFO_TRANSFORMED,
    CTRLRewardWrapper,
    MissingPromptError,
)
from openrlhf_infalign.core.transforms import parse_transform  # noqa: E402
from openrlhf_infalign.store import ReferenceStore, prompt_key  # noqa: E402

N_PROMPTS, N_SAMPLES, K = 6, 4, 16
PROMPTS = [f"Q : prompt number {i} {'x' * i} A :" for i in range(N_PROMPTS)]


@pytest.fixture(scope="module")
def refs():
    rng = np.random.default_rng(0)
    # Reference rewards with ties (rounded) so the mid-rank convention matters.
    return {p: np.round(rng.normal(size=K), 1) for p in PROMPTS}


@pytest.fixture(scope="module")
def store(refs):
    return ReferenceStore.from_arrays([prompt_key(p) for p in refs], [refs[p] for p in refs])


def brute_force_calibrated(reward: float, ref: np.ndarray) -> float:
    """Eq. 12 written out: (1/K) sum 1{r > z} + 0.5 * 1{r == z}."""
    return float(np.mean((reward > ref) + 0.5 * (reward == ref)))


def raw_rewards(refs, seed=1):
    rng = np.random.default_rng(seed)
    out = []
    for p in PROMPTS:
        for _ in range(N_SAMPLES):
            # Half the samples tie with a reference value exactly.
            out.append(float(rng.choice(refs[p])) if rng.random() < 0.5 else float(np.round(rng.normal(), 2)))
    return np.array(out)


def make_experiences(maker, rewards: np.ndarray, shape: str, seed=2):
    """Rollout samples as the vLLM path builds them (one Experience per sample), then the maker's own batching."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i, r in enumerate(rewards):
        prompt = PROMPTS[i // N_SAMPLES]
        T = 10
        A = 6 + (i % 3)
        action_mask = torch.zeros(1, T - 1, dtype=torch.bool)
        action_mask[0, :A] = True
        samples.append(
            Experience(
                sequences=torch.randint(3, 50, (1, T), generator=g),
                attention_mask=torch.ones(1, T, dtype=torch.long),
                action_mask=action_mask,
                prompts=[prompt],
                labels=[""],
                rewards=torch.tensor([r], dtype=torch.float32),
                response_length=torch.tensor([A]),
                total_length=torch.tensor([T]),
                truncated=torch.tensor([False]),
                info={"reward": torch.tensor([r], dtype=torch.float32)},
            )
        )
    experiences = maker.split_rollout_samples(samples)
    for e in experiences:
        b, a = e.action_mask.shape
        e.kl = torch.rand(b, a, generator=g) * 0.1
        e.values = torch.randn(b, a, generator=g)
        if shape == "B1":
            e.rewards = e.rewards.reshape(-1, 1)
    return experiences


def new_maker(args, kl_coef=0.05):
    return RemoteExperienceMaker(None, None, None, None, FixedKLController(kl_coef), _Strategy(args), _Tokenizer())


class _Strategy:  # the maker reads strategy.args only
    def __init__(self, args):
        self.args = args


class _Tokenizer:  # split_rollout_samples reads pad_token_id only
    pad_token_id = 0


def advantages(experiences):
    return torch.cat([e.advantages.flatten() for e in experiences])


@pytest.mark.parametrize(
    "estimator", ["gae", "rloo", "group_norm", "reinforce_baseline", "reinforce", "dr_grpo", "flash_reinforce"]
)
@pytest.mark.parametrize("shape", ["B", "B1"])
def test_wrapped_reward_reaches_advantages(estimator, shape, store, refs, upstream_args):
    args = upstream_args(
        "--algo.advantage.estimator",
        estimator,
        "--rollout.n_samples_per_prompt",
        str(N_SAMPLES),
        "--rollout.micro_batch_size",
        "3",  # experiences straddle prompt groups: the maker's index bookkeeping must hold
    )
    transform = parse_transform("exp:t=5")
    raw = raw_rewards(refs)
    expected = transform(
        np.array([brute_force_calibrated(r, refs[PROMPTS[i // N_SAMPLES]]) for i, r in enumerate(raw)])
    )

    wrapper = CTRLRewardWrapper(store, transform)
    maker = new_maker(args)
    install_reward_wrapper(maker, wrapper)
    wrapped = maker.compute_advantages_and_returns(make_experiences(maker, raw, shape))

    # Upstream, unwrapped, on rewards transformed by hand (and on the raw rewards).
    by_hand = new_maker(args).compute_advantages_and_returns(make_experiences(maker, expected, shape))
    plain = new_maker(args).compute_advantages_and_returns(make_experiences(maker, raw, shape))

    torch.testing.assert_close(advantages(wrapped), advantages(by_hand), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(advantages(wrapped), advantages(plain), atol=1e-3)
    torch.testing.assert_close(
        torch.cat([e.returns.flatten() for e in wrapped]), torch.cat([e.returns.flatten() for e in by_hand])
    )

    # Per-sample logs: one float per sample, in [0, 1]; upstream re-syncs info["reward"] to the reward trained on.
    for key in (INFO_RAW, INFO_CALIBRATED, INFO_TRANSFORMED):
        for e in wrapped:
            assert e.info[key].shape == (len(e.prompts),)
    cal = torch.cat([e.info[INFO_CALIBRATED] for e in wrapped]).double().numpy()
    tr = torch.cat([e.info[INFO_TRANSFORMED] for e in wrapped]).double().numpy()
    got_raw = torch.cat([e.info[INFO_RAW] for e in wrapped]).double().numpy()
    order = np.concatenate([np.asarray(e.index) for e in wrapped])
    np.testing.assert_allclose(tr[np.argsort(order)], expected, atol=1e-6)
    np.testing.assert_allclose(got_raw[np.argsort(order)], raw.astype(np.float32), atol=1e-6)
    assert cal.min() >= 0 and cal.max() <= 1
    torch.testing.assert_close(
        torch.cat([e.info["reward"].flatten() for e in wrapped]),
        torch.cat([e.info[INFO_TRANSFORMED] for e in wrapped]),
    )


def test_rewards_keep_shape_device_and_dtype(store, refs):
    w = CTRLRewardWrapper(store, parse_transform("identity"))
    prompts = [PROMPTS[0], PROMPTS[1]]
    for r in (
        torch.tensor([0.3, -2.0]),
        torch.tensor([[0.3], [-2.0]]),
        torch.tensor([0.3, -2.0], dtype=torch.float64),
    ):
        new, info = w(prompts, r)
        assert new.shape == r.shape and new.device == r.device and new.dtype == r.dtype
    new, _ = w(prompts, torch.tensor([1, -3]))  # a reward_func returning ints: promoted like upstream does
    assert new.dtype == torch.float32
    new, _ = w(prompts, torch.tensor([0.3, -2.0], dtype=torch.bfloat16))
    assert new.dtype == torch.float32
    expected = [brute_force_calibrated(0.3, refs[PROMPTS[0]]), brute_force_calibrated(-2.0, refs[PROMPTS[1]])]
    np.testing.assert_allclose(w(prompts, np.array([0.3, -2.0]))[0], expected)


def test_missing_prompt_fails_with_key_and_text(store, refs, upstream_args):
    args = upstream_args("--algo.advantage.estimator", "rloo", "--rollout.n_samples_per_prompt", str(N_SAMPLES))
    maker = new_maker(args)
    install_reward_wrapper(maker, CTRLRewardWrapper(store, parse_transform("identity")))
    exps = make_experiences(maker, raw_rewards(refs), "B")
    stranger = "Q : a prompt nobody calibrated A :"
    exps[1].prompts[0] = stranger
    with pytest.raises(MissingPromptError) as err:
        maker.compute_advantages_and_returns(exps)
    msg = str(err.value)
    assert prompt_key(stranger) in msg and stranger in msg and "--infalign.on_missing raw" in msg


def test_missing_prompt_raw_mode_keeps_raw_reward(store, refs):
    w = CTRLRewardWrapper(store, parse_transform("exp:t=3"), on_missing="raw")
    prompts = [PROMPTS[0], "never calibrated", PROMPTS[2]]
    raw = torch.tensor([0.1, 7.5, -0.4])
    new, info = w(prompts, raw)
    assert new[1].item() == pytest.approx(7.5)
    assert info[INFO_MISSING].tolist() == [0.0, 1.0, 0.0]
    t = parse_transform("exp:t=3")
    assert new[0].item() == pytest.approx(float(t(np.array([brute_force_calibrated(0.1, refs[PROMPTS[0]])]))[0]))


def test_raw_mode_warns_with_prompt_count_and_scale(store, caplog):
    w = CTRLRewardWrapper(store, parse_transform("identity"), on_missing="raw")
    prompts = ["stranger one", "stranger one", PROMPTS[0], "stranger two"]
    with caplog.at_level("WARNING", logger="openrlhf_infalign"):
        w(prompts, torch.tensor([3.0, 4.0, 0.1, -2.0]))
    msg = caplog.text
    assert "2 prompt(s) (3 of 4 samples) have no reference rewards" in msg and "not in [0, 1]" in msg


def test_digest_cache_is_bounded(store, monkeypatch):
    from openrlhf_infalign.adapter import wrapper as wrapper_module
    from openrlhf_infalign.store import prompt_digests

    monkeypatch.setattr(wrapper_module, "_KEY_CACHE_ENTRIES", 8)
    monkeypatch.setattr(wrapper_module, "_KEY_CACHE_CHARS", 200)
    w = CTRLRewardWrapper(store, parse_transform("identity"))
    for start in range(0, 60, 3):
        batch = [f"prompt {i} " + "y" * (i % 7) for i in range(start, start + 3)] * 2  # each twice, as n_samples
        np.testing.assert_array_equal(w.prompt_digests(batch), prompt_digests(batch))
        assert len(w._digest_cache) <= 8 and sum(map(len, w._digest_cache)) <= 200
        assert w._digest_cache_chars == sum(map(len, w._digest_cache))
    long = ["z" * 150 + str(i) for i in range(3)]  # one batch above the bound: kept for that batch only
    np.testing.assert_array_equal(w.prompt_digests(long), prompt_digests(long))
    assert set(w._digest_cache) == set(long)


def test_install_is_per_instance_and_idempotent(store, upstream_args):
    args = upstream_args("--algo.advantage.estimator", "reinforce")
    a, b = new_maker(args), new_maker(args)
    w = CTRLRewardWrapper(store, parse_transform("identity"))
    install_reward_wrapper(a, w)
    first = a.compute_advantages_and_returns
    install_reward_wrapper(a, w)
    assert a.compute_advantages_and_returns is first
    assert "compute_advantages_and_returns" not in vars(b)  # other makers (other trainers) stay upstream's


def test_wrapper_pickles_by_value(store, refs):
    # Ray ships the wrapper (store arrays included) to the trainer actor; the copy must work without the directory.
    w = CTRLRewardWrapper(
        store, parse_transform("negexp:t=4"), inference="won:4", beta=0.2, kl_budget=1.0, name="infalign.ctrl"
    )
    w.prompt_digests(PROMPTS)  # fill the cache: it must not travel
    w2 = pickle.loads(cloudpickle.dumps(w))
    assert w2._digest_cache == {} and w2._digest_cache_chars == 0
    assert (w2.inference, w2.beta, w2.kl_budget) == ("won:4", 0.2, 1.0)
    assert (w2.on_missing, w2.name) == ("error", "infalign.ctrl")
    r = torch.tensor([0.2, 1.5])
    np.testing.assert_array_equal(w(PROMPTS[:2], r)[0].numpy(), w2(PROMPTS[:2], r)[0].numpy())
