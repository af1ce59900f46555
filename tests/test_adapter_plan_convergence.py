"""The plan comes true through OpenRLHF 0.11.2's own advantage code: a tabular policy converges onto it.

Each prompt is one reference store with K stored rewards: its K+1 "responses" are the calibrated-reward bins, the
reference policy picks bin j with the store's Dirichlet spacing p_j, and a response's raw reward is j + 0.5 against
stored rewards 1..K (any increasing reward works: calibration only sees ranks), so the REAL CTRLRewardWrapper in
front of upstream's ``RemoteExperienceMaker.compute_advantages_and_returns`` turns it into Phi(j/K). The k1 KL of
each sample (upstream's ``compute_approx_kl``) goes in the reward with upstream's ``FixedKLController``.

The policy-gradient step is an exact expectation over the sample's own response and a Monte Carlo over its group
mates: for every prompt and bin j, one group whose first member is bin j and whose n-1 mates are drawn from the
policy (the same mates for every j, so their noise cancels in the update). The first member's advantage is
upstream's, so every baseline, normalisation and whitening acts as in training. The update is the natural gradient
of a softmax (logit j moves by its advantage minus the policy mean), with a step that moves a fixed fraction of the
way to the fixed point; the step size does not change where it converges.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from openrlhf_infalign.adapter.cpu.standins import install_flash_attn

install_flash_attn()

from openrlhf.models.utils import compute_approx_kl  # noqa: E402
from openrlhf.trainer.ppo_utils.experience import Experience  # noqa: E402
from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker  # noqa: E402
from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController  # noqa: E402

from openrlhf_infalign.adapter.console import run_train_ppo  # noqa: E402
from openrlhf_infalign.adapter.upstream.experience_maker import install_reward_wrapper  # noqa: E402
from openrlhf_infalign.adapter.wrapper import CTRLRewardWrapper  # noqa: E402
from openrlhf_infalign.core import finite_k as fk  # noqa: E402
from openrlhf_infalign.core import planning  # noqa: E402
from openrlhf_infalign.core.transforms import parse_transform  # noqa: E402
from openrlhf_infalign.store import ReferenceStore, prompt_key, write_store  # noqa: E402

KL_BUDGET = 0.5
# The plan averages over stores; stratified stores (finite_k.store_spacings) keep this many near the average.
N_STORES = {16: 128, 64: 48}
STEPS, STEP_FRACTION = 12, 0.75


@functools.lru_cache(maxsize=None)
def real_args(estimator: str, n: int):
    """OpenRLHF's own parsed + validated args (upstream parser and checks via our console, stopped at train())."""
    seen = []
    flags = ["--actor.model_name_or_path", "policy", "--reward.model_name_or_path", "rm"]
    flags += ["--algo.advantage.estimator", estimator, "--rollout.n_samples_per_prompt", str(n)]
    if estimator == "gae":
        flags += ["--critic.model_name_or_path", "critic"]
    rc = run_train_ppo(flags, train=lambda args: seen.append(args))
    assert rc == 0 and len(seen) == 1
    return seen[0]


class _Strategy:  # the maker reads strategy.args only
    def __init__(self, args):
        self.args = args


@functools.lru_cache(maxsize=None)
def plan(inference: str, k: int) -> dict:
    """The K-aware plan at KL_BUDGET, as `infalign plan --k` and training make it: the continuum plan's transform,
    beta from the expected KL over stores (checked here against finite_k directly)."""
    rec = planning.plan(inference, KL_BUDGET, with_optimal=False, k=k)["recommended"]
    assert rec["beta"] == pytest.approx(fk.beta_for_kl_k(rec["transform"], KL_BUDGET, k), rel=1e-9)
    return {"transform": rec["transform"], "beta": rec["beta"], "win_rate": rec["win_rate"]}


@functools.lru_cache(maxsize=None)
def stores(k: int, directory: str):
    """N_STORES prompts with K stored rewards 1..K each, their Dirichlet spacings, and the store on disk."""
    p = np.array(fk.store_spacings(k, N_STORES[k], seed=1000 + k))
    prompts = [f"Q : tabular prompt {i} with K={k} A :" for i in range(len(p))]
    rewards = np.tile(np.arange(1.0, k + 1), (len(p), 1))
    path = write_store(f"{directory}/k{k}", [prompt_key(s) for s in prompts], rewards)
    return p, prompts, ReferenceStore.open(path, warn_small_k=False)


def converge(estimator: str, n: int, inference: str, k: int, coef: float, directory: str, mates: int = 1):
    """Train the tabular policy to its fixed point; returns (bin policy (stores, K+1), spacings p)."""
    p, prompts, store = stores(k, directory)
    bins = k + 1
    maker = RemoteExperienceMaker.__new__(RemoteExperienceMaker)
    maker.strategy = _Strategy(real_args(estimator, n))
    maker.args, maker.advantage_estimator, maker.kl_ctl = maker.strategy.args, estimator, FixedKLController(coef)
    install_reward_wrapper(maker, CTRLRewardWrapper(store, parse_transform(plan(inference, k)["transform"])))

    log_ref = torch.from_numpy(np.log(p))
    theta = log_ref.clone()
    rng = torch.Generator().manual_seed(0)
    shape = (len(p), bins, mates, n)
    prompt_of = np.repeat(np.array(prompts, dtype=object), bins * mates * n).tolist()
    store_of = torch.arange(len(p)).view(-1, 1, 1, 1).expand(shape)
    for _ in range(STEPS):
        log_pi = theta - theta.logsumexp(-1, keepdim=True)
        drawn = torch.multinomial(log_pi.exp(), mates * (n - 1), replacement=True, generator=rng)
        response = torch.empty(shape, dtype=torch.long)
        response[..., 0] = torch.arange(bins).view(1, -1, 1)
        response[..., 1:] = drawn.view(len(p), 1, mates, n - 1)  # the same mates for every first-member bin
        response = response.reshape(-1)
        stores_flat = store_of.reshape(-1)
        kl = compute_approx_kl(
            log_pi[stores_flat, response].view(-1, 1),
            log_ref[stores_flat, response].view(-1, 1),
            kl_estimator="k1",
        )
        batch = len(response)
        exp = Experience(
            sequences=torch.zeros(batch, 2, dtype=torch.long),
            attention_mask=torch.ones(batch, 2, dtype=torch.long),
            action_mask=torch.ones(batch, 1, dtype=torch.bool),
            prompts=prompt_of,
            labels=[""] * batch,
            rewards=response.to(torch.float32) + 0.5,
            response_length=torch.ones(batch),
            total_length=torch.full((batch,), 2.0),
            truncated=torch.zeros(batch, dtype=torch.bool),
            info={},
        )
        exp.index, exp.kl, exp.values = list(range(batch)), kl, torch.zeros(batch, 1)
        (exp,) = maker.compute_advantages_and_returns([exp])
        adv, ret = exp.advantages.view(shape), exp.returns.view(shape)
        # Whitening scales every advantage by one number; dividing it out keeps the step a fixed fraction.
        whitening = float(exp.advantages.std() / ret.std()) if estimator not in ("rloo", "group_norm") else 1.0
        a = adv[..., 0].mean(-1).double()
        pi = log_pi.exp()
        theta = theta + STEP_FRACTION / (whitening * coef) * (a - (pi * a).sum(-1, keepdim=True))
    pi = (theta - theta.logsumexp(-1, keepdim=True)).exp().numpy()
    return pi, p


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("stores"))


CASES = [
    (estimator, n, inference, k)
    for estimator in ("reinforce", "gae", "rloo", "reinforce_baseline")
    for n in (4, 8)
    for inference in ("bon:4", "won:4")
    for k in (16, 64)
    if not (estimator in ("reinforce", "gae") and n == 8)  # no group baseline: n only sizes the batch
]


def init_coef(estimator: str, n: int, beta: float) -> float:
    """--algo.kl.init_coef for an effective beta: reinforce_baseline subtracts a mean including the sample."""
    return beta * (n - 1) / n if estimator in ("reinforce_baseline", "dr_grpo") else beta


def _report(case, planned, got):
    planned_text = f"planned KL {KL_BUDGET:.3f} win {planned['win_rate']:.4f}"
    print(f"\n{case}: {planned_text}; converged KL {got[0]:.4f} win {got[1]:.4f}")


@pytest.mark.parametrize("estimator,n,inference,k", CASES)
def test_converged_policy_lands_on_the_plan(estimator, n, inference, k, store_dir):
    planned = plan(inference, k)
    pi, p = converge(estimator, n, inference, k, init_coef(estimator, n, planned["beta"]), store_dir)
    kl, win = fk.bin_kl(pi, p), fk.bin_win_rate(inference, pi, p)
    _report((estimator, n, inference, k), planned, (kl.mean(), win.mean()))
    # The fixed point of upstream's shaping is the bin optimum of these very stores ...
    q = fk.bin_optimum(p, planned["transform"], planned["beta"])
    np.testing.assert_allclose(kl, fk.bin_kl(q, p), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(win, fk.bin_win_rate(inference, q, p), atol=1e-4)
    # ... and on average over stores it spends the budget and reaches the planned win rate.
    assert kl.mean() == pytest.approx(KL_BUDGET, rel=0.05)
    assert win.mean() == pytest.approx(planned["win_rate"], abs=0.01)


@pytest.mark.parametrize("n", [4, 8])
def test_reinforce_baseline_at_the_plain_beta_misses_the_plan(n, store_dir):
    """Passing the effective beta itself as init_coef trains at beta * n/(n-1): less KL than planned."""
    planned = plan("bon:4", 16)
    pi, p = converge("reinforce_baseline", n, "bon:4", 16, planned["beta"], store_dir)
    expected = fk.expected_kl_k(planned["transform"], planned["beta"] * n / (n - 1), 16)
    assert fk.bin_kl(pi, p).mean() == pytest.approx(expected, rel=0.05)
    assert fk.bin_kl(pi, p).mean() < 0.9 * KL_BUDGET


def test_group_norm_does_not_land_on_the_plan(store_dir):
    """group_norm divides each group's rewards by their std before the KL is added: the reward scale depends on the
    policy and the group, so no init_coef is the planned beta. At the plan's beta it overshoots the budget."""
    planned = plan("bon:4", 16)
    pi, p = converge("group_norm", 4, "bon:4", 16, planned["beta"], store_dir, mates=4)
    kl = fk.bin_kl(pi, p).mean()
    _report(("group_norm", 4, "bon:4", 16), planned, (kl, fk.bin_win_rate("bon:4", pi, p).mean()))
    assert abs(kl - KL_BUDGET) > 0.5 * KL_BUDGET
