"""The direct objective's wrapper (``infalign.direct``) at OpenRLHF's real seam, compute_advantages_and_returns.

Args come from OpenRLHF's REAL parser (our console, stopped at train()); experiences are real ``Experience`` objects
batched by the maker's own ``split_rollout_samples`` with micro-batches that straddle prompt groups, then handed
over in shuffled order: the wrapper must group by ``experience.index`` exactly as upstream does right after it.
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
    INFO_DIRECT,
    INFO_MISSING,
    INFO_RAW,
    INFO_TRANSFORMED,
    DirectRewardWrapper,
)
from openrlhf_infalign.core.direct import group_rewards  # noqa: E402
from openrlhf_infalign.store import ReferenceStore, prompt_key  # noqa: E402

N_PROMPTS, N_SAMPLES, K = 5, 6, 16
PROMPTS = [f"Q : direct prompt {i} {'y' * i} A :" for i in range(N_PROMPTS)]


@pytest.fixture(scope="module")
def refs():
    rng = np.random.default_rng(3)
    return {p: np.round(rng.normal(size=K), 1) for p in PROMPTS}  # rounded: ties with the store happen


@pytest.fixture(scope="module")
def store(refs):
    return ReferenceStore.from_arrays([prompt_key(p) for p in refs], [refs[p] for p in refs])


def raw_rewards(refs, seed=4):
    rng = np.random.default_rng(seed)
    return np.array(
        [
            float(rng.choice(refs[p])) if rng.random() < 0.4 else float(np.round(rng.normal(), 2))
            for p in PROMPTS
            for _ in range(N_SAMPLES)
        ]
    )


def calibrated_by_hand(raw, refs) -> np.ndarray:
    """Eq. 12 written out, per sample of prompt i // n."""
    return np.array(
        [np.mean((r > refs[PROMPTS[i // N_SAMPLES]]) + 0.5 * (r == refs[PROMPTS[i // N_SAMPLES]])) for i, r in
         enumerate(raw)]
    )  # fmt: skip


class _Strategy:
    def __init__(self, args):
        self.args = args


class _Tokenizer:
    pad_token_id = 0


def new_maker(args):
    return RemoteExperienceMaker(None, None, None, None, FixedKLController(0.05), _Strategy(args), _Tokenizer())


def make_experiences(maker, rewards, seed=5, shuffle=True):
    """One Experience per sample in the generator's order (a prompt's n samples consecutive), batched by upstream's
    ``split_rollout_samples``; the micro-batches are then handed over in a shuffled order (indices keep the order)."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i, r in enumerate(rewards):
        t, a = 8, 4 + (i % 3)
        mask = torch.zeros(1, t - 1, dtype=torch.bool)
        mask[0, :a] = True
        samples.append(
            Experience(
                sequences=torch.randint(3, 50, (1, t), generator=g),
                attention_mask=torch.ones(1, t, dtype=torch.long),
                action_mask=mask,
                prompts=[PROMPTS[i // N_SAMPLES]],
                labels=[""],
                rewards=torch.tensor([r], dtype=torch.float32),
                response_length=torch.tensor([a]),
                total_length=torch.tensor([t]),
                truncated=torch.tensor([False]),
                info={"reward": torch.tensor([r], dtype=torch.float32)},
            )
        )
    exps = maker.split_rollout_samples(samples)
    for e in exps:
        e.kl = torch.rand(*e.action_mask.shape, generator=g) * 0.1
        e.values = torch.randn(*e.action_mask.shape, generator=g)
    if shuffle:
        exps = [exps[i] for i in torch.randperm(len(exps), generator=g).tolist()]
    return exps


def flat(exps, key=None):
    return torch.cat([(e.info[key] if key else e.advantages).flatten() for e in exps])


def in_upstream_order(exps, values):
    order = np.concatenate([np.asarray(e.index) for e in exps])
    out = np.empty_like(values)
    out[order] = values
    return out


@pytest.mark.parametrize("estimator", ["rloo", "reinforce_baseline", "dr_grpo", "reinforce", "gae", "flash_reinforce"])
@pytest.mark.parametrize("inference", ["bon:4", "won:3"])
def test_direct_rewards_reach_advantages_in_upstreams_grouping(estimator, inference, store, refs, upstream_args):
    args = upstream_args(
        "--algo.advantage.estimator",
        estimator,
        "--rollout.n_samples_per_prompt",
        str(N_SAMPLES),
        "--rollout.micro_batch_size",
        "4",
    )  # fmt: skip  (4 does not divide 6: batches straddle groups)
    raw = raw_rewards(refs)
    expected = group_rewards(calibrated_by_hand(raw, refs).reshape(-1, N_SAMPLES), inference).reshape(-1)

    maker = new_maker(args)
    install_reward_wrapper(maker, DirectRewardWrapper(store, inference, N_SAMPLES))
    wrapped = maker.compute_advantages_and_returns(make_experiences(maker, raw))
    by_hand = new_maker(args).compute_advantages_and_returns(make_experiences(maker, expected))
    plain = new_maker(args).compute_advantages_and_returns(make_experiences(maker, raw))

    torch.testing.assert_close(flat(wrapped), flat(by_hand), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(flat(wrapped), flat(plain), atol=1e-3)
    # the logs: raw, calibrated and the direct reward per sample, in upstream's order the hand-made ones
    for key, want in ((INFO_RAW, raw), (INFO_CALIBRATED, calibrated_by_hand(raw, refs)), (INFO_DIRECT, expected)):
        got = in_upstream_order(wrapped, flat(wrapped, key).double().numpy())
        np.testing.assert_allclose(got, want, atol=1e-6)
    assert INFO_TRANSFORMED not in wrapped[0].info
    # the leave-one-out rewards sum to 0 in every prompt group
    direct = in_upstream_order(wrapped, flat(wrapped, INFO_DIRECT).double().numpy())
    np.testing.assert_allclose(direct.reshape(-1, N_SAMPLES).sum(-1), 0.0, atol=1e-6)


def test_groups_follow_the_index_not_the_list_order(store, refs, upstream_args):
    """The same batch handed over in two orders trains each sample on the same reward."""
    args = upstream_args("--algo.advantage.estimator", "rloo", "--rollout.n_samples_per_prompt", str(N_SAMPLES),
                     "--rollout.micro_batch_size", "4")  # fmt: skip
    raw = raw_rewards(refs)
    got = []
    for shuffle in (False, True):
        w = DirectRewardWrapper(store, "bon:4", N_SAMPLES)
        exps = w.wrap_experiences(make_experiences(new_maker(args), raw, shuffle=shuffle))
        got.append(in_upstream_order(exps, flat(exps, INFO_DIRECT).double().numpy()))
    np.testing.assert_array_equal(got[0], got[1])


def test_a_group_of_mixed_prompts_is_refused_with_its_positions(store, refs, upstream_args):
    args = upstream_args("--algo.advantage.estimator", "rloo", "--rollout.n_samples_per_prompt", str(N_SAMPLES))
    maker = new_maker(args)
    install_reward_wrapper(maker, DirectRewardWrapper(store, "bon:4", N_SAMPLES))
    exps = make_experiences(maker, raw_rewards(refs), shuffle=False)
    exps[1].prompts[0] = PROMPTS[3]  # sample 1 (micro-batches of one): a calibrated prompt, not its group's
    with pytest.raises(ValueError, match=r"prompt group 0 \(positions 0\.\.5 .*different prompts") as e:
        maker.compute_advantages_and_returns(exps)
    assert "--rollout.n_samples_per_prompt 6" in str(e.value) and "\n" not in str(e.value)


def test_ragged_batches_and_unknown_positions_are_refused(store, refs, upstream_args):
    w = DirectRewardWrapper(store, "bon:4", N_SAMPLES)
    prompts = [PROMPTS[0]] * N_SAMPLES + [PROMPTS[1]] * 3  # 9 samples: not groups of 6
    with pytest.raises(ValueError, match="a rollout batch of 9 samples does not split into prompt groups of"):
        w(prompts, torch.zeros(9))
    prompts = [PROMPTS[0]] * N_SAMPLES
    with pytest.raises(ValueError, match="repeat"):
        w(prompts, torch.zeros(N_SAMPLES), index=np.array([0, 1, 2, 3, 4, 4]))
    with pytest.raises(ValueError, match="not 0..5"):
        w(prompts, torch.zeros(N_SAMPLES), index=np.arange(1, N_SAMPLES + 1))
    args = upstream_args("--algo.advantage.estimator", "rloo", "--rollout.n_samples_per_prompt", str(N_SAMPLES))
    exps = make_experiences(new_maker(args), raw_rewards(refs))
    exps[1].index = None
    with pytest.raises(ValueError, match="experience 1 has no sample index"):
        w.wrap_experiences(exps)


def test_group_size_must_exceed_n_at_construction(store):
    with pytest.raises(ValueError, match="needs n > 4"):
        DirectRewardWrapper(store, "bon:4", 4)
    assert DirectRewardWrapper(store, "won:4", 5).n == 5


def test_a_missing_prompt_group_keeps_its_raw_rewards_in_raw_mode(store, refs):
    w = DirectRewardWrapper(store, "bon:2", 3, on_missing="raw")
    prompts = [PROMPTS[0]] * 3 + ["never calibrated"] * 3
    raw = torch.tensor([0.1, 0.7, -0.3, 5.0, 6.0, 7.0])
    new, info = w(prompts, raw)
    np.testing.assert_allclose(new[3:].numpy(), [5.0, 6.0, 7.0])
    u = np.array([np.mean((r > refs[PROMPTS[0]]) + 0.5 * (r == refs[PROMPTS[0]])) for r in raw[:3].double().numpy()])
    np.testing.assert_allclose(new[:3].numpy(), group_rewards(u[None], "bon:2")[0], atol=1e-6)
    assert info[INFO_MISSING].tolist() == [0, 0, 0, 1, 1, 1]


def test_direct_wrapper_pickles_by_value(store, refs):
    w = DirectRewardWrapper(store, "won:4", 6, coef=0.05, kl_coef=0.05, kl_budget=0.5, k=16)
    w.prompt_digests(PROMPTS)
    w2 = pickle.loads(cloudpickle.dumps(w))
    assert w2._digest_cache == {} and (w2.n, w2.coef, w2.objective, w2.transform) == (6, 0.05, "direct", None)
    r = torch.from_numpy(raw_rewards(refs)[:12]).float()
    prompts = [PROMPTS[0]] * 6 + [PROMPTS[1]] * 6
    np.testing.assert_array_equal(w(prompts, r)[0].numpy(), w2(prompts, r)[0].numpy())
