"""The direct objective through OpenRLHF 0.11.2's own advantage code and the REAL ``infalign.direct`` wrapper: how
each estimator composes with the group estimator's rewards (exactly, by enumeration), and a tabular policy converging
onto the direct objective's plan.

Each prompt is one reference store of K rewards 1..K; a response in calibrated bin j has raw reward j + 0.5, so the
real ``DirectRewardWrapper`` in front of upstream's ``RemoteExperienceMaker.compute_advantages_and_returns`` (the
seam ``install_reward_wrapper`` sets up in training) calibrates it to j/K, groups the batch by ``experience.index`` in
blocks of ``--rollout.n_samples_per_prompt`` and hands the group estimator's rewards on, as in training.

Convergence, as test_adapter_plan_convergence.py does for CTRL: each prompt's K+1 "responses" are the bins, with
base probabilities p (Dirichlet spacings). Each step, for every prompt and bin j, M groups whose first member is bin
j and whose n-1 mates are drawn from the policy; the mates are the same for every j (their baseline cancels) and come
from fixed stratified uniforms through the policy's current CDF, so the Monte Carlo error of the mates is a smooth,
fixed perturbation rather than a random walk. The first member's advantage is upstream's (its baseline, the k1 KL
with FixedKLController, whitening); the update is the natural gradient of a softmax, a fixed fraction of the way to
the fixed point (the full step overshoots: the direct reward H rises where the policy moves mass).
"""

from __future__ import annotations

import functools
import itertools

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
from openrlhf_infalign.adapter.wrapper import DirectRewardWrapper  # noqa: E402
from openrlhf_infalign.core import direct as dr  # noqa: E402
from openrlhf_infalign.core import finite_k as fk  # noqa: E402
from openrlhf_infalign.core import planning  # noqa: E402
from openrlhf_infalign.store import ReferenceStore, prompt_key  # noqa: E402

KL_BUDGET = 0.5


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
def store(k: int, prompts: int) -> ReferenceStore:
    """``prompts`` prompts, each with the K stored rewards 1..K (raw reward j + 0.5 calibrates to j/K)."""
    names = tuple(prompt_name(k, i) for i in range(prompts))
    return ReferenceStore.from_arrays([prompt_key(x) for x in names], [np.arange(1.0, k + 1)] * prompts)


def prompt_name(k: int, i: int) -> str:
    return f"Q : tabular prompt {i} with K={k} A :"


def maker_for(estimator: str, n: int, coef: float, inference: str, k: int, prompts: int, baseline: str = "loo"):
    """Upstream's maker with the real wrapper installed at the training seam (``baseline`` none: core.direct's other
    form, which has no training flag, through the same wrapper)."""
    maker = RemoteExperienceMaker.__new__(RemoteExperienceMaker)
    maker.strategy = _Strategy(real_args(estimator, n))
    maker.args, maker.advantage_estimator, maker.kl_ctl = maker.strategy.args, estimator, FixedKLController(coef)
    install_reward_wrapper(maker, DirectRewardWrapper(store(k, prompts), inference, n, baseline=baseline))
    return maker


def experience(bins: torch.Tensor, prompt_of: list, kl: torch.Tensor) -> Experience:
    """One experience of samples in calibrated bins ``bins`` (raw reward bin + 0.5) of the prompts ``prompt_of``."""
    batch = len(bins)
    exp = Experience(
        sequences=torch.zeros(batch, 2, dtype=torch.long),
        attention_mask=torch.ones(batch, 2, dtype=torch.long),
        action_mask=torch.ones(batch, 1, dtype=torch.bool),
        prompts=prompt_of,
        labels=[""] * batch,
        rewards=bins.to(torch.float64) + 0.5,  # float64: the enumeration compares to 1e-10
        response_length=torch.ones(batch),
        total_length=torch.full((batch,), 2.0),
        truncated=torch.zeros(batch, dtype=torch.bool),
        info={},
    )
    exp.index, exp.kl, exp.values = list(range(batch)), kl, torch.zeros(batch, 1, dtype=kl.dtype)
    return exp


# ---------------------------------------------------------------------------------------------------------------
# composition: the exact expected gradient of upstream's shaped rewards, over every n-tuple of a tabular policy

BINS = np.array([0, 1, 1, 2, 4])  # calibrated bins of a K = 4 store, two responses tied
VALUES = BINS / 4
THETA = np.array([0.3, -0.2, 0.5, 0.1, -0.4])
PI = np.exp(THETA) / np.exp(THETA).sum()


def _exact_win_gradient(spec: str) -> np.ndarray:
    big_n, kind = int(spec[-1]), spec[:3]
    grad = np.zeros(len(PI))
    for t in itertools.product(range(len(PI)), repeat=big_n):
        best = VALUES[list(t)].max() if kind == "bon" else VALUES[list(t)].min()
        f = best**big_n if kind == "bon" else 1 - (1 - best) ** big_n
        grad += np.prod(PI[list(t)]) * f * (np.bincount(t, minlength=len(PI)) - big_n * PI)
    return grad


def expected_shaped_gradient(estimator: str, n: int, spec: str, baseline: str) -> np.ndarray:
    """sum over all n-tuples t of P(t) sum_j R_j grad log pi(y_j), R = upstream's returns (the KL term is 0 here;
    returns are the shaped reward before whitening, whose shift and scale do not move an expectation's direction)."""
    tuples = np.array(list(itertools.product(range(len(PI)), repeat=n)))
    maker = maker_for(estimator, n, 0.0, spec, 4, 1, baseline)
    bins = torch.from_numpy(BINS[tuples].reshape(-1))
    kl = torch.zeros(len(bins), 1, dtype=torch.float64)
    (exp,) = maker.compute_advantages_and_returns([experience(bins, [prompt_name(4, 0)] * len(bins), kl)])
    returns = exp.returns.view(len(tuples), n).double().numpy()
    prob = np.prod(PI[tuples], axis=1)
    grad = np.zeros(len(PI))
    for j in range(n):
        grad += np.bincount(tuples[:, j], weights=prob * returns[:, j], minlength=len(PI))
    return grad - (prob @ returns.sum(1)) * PI


COMPOSE = [
    (estimator, baseline)
    for estimator in ("reinforce", "gae", "rloo", "reinforce_baseline", "dr_grpo", "flash_reinforce")
    for baseline in ("loo", "none")
    if not (estimator == "flash_reinforce" and baseline == "none")
]


@pytest.mark.parametrize("estimator,baseline", COMPOSE)
@pytest.mark.parametrize("spec", ["bon:3", "won:3"])
def test_estimator_composes_with_the_reward_scale_of_the_table(estimator, baseline, spec):
    n = 5
    comp = dr.composition(estimator, n, spec, baseline)
    got = expected_shaped_gradient(estimator, n, spec, baseline)
    np.testing.assert_allclose(got, comp.reward_scale * n / 3 * _exact_win_gradient(spec), atol=1e-10)


@pytest.mark.parametrize("baseline", ["loo", "none"])
def test_group_norm_is_biased(baseline):
    """group_norm divides by the group's std: its expected gradient is no multiple of grad W (refused)."""
    exact = _exact_win_gradient("bon:3")
    got = expected_shaped_gradient("group_norm", 5, "bon:3", baseline)
    best = (got @ exact) / (exact @ exact)
    assert np.linalg.norm(got - best * exact) > 0.05 * np.linalg.norm(got)
    assert dr.composition("group_norm", 5, "bon:3", baseline).refused


# ---------------------------------------------------------------------------------------------------------------
# convergence onto the direct arm's plan

N_STORES = {16: 128, 64: 48}
MATES, STEPS, STEP_FRACTION = 16, 25, 0.3


@functools.lru_cache(maxsize=None)
def plans(inference: str, k: int) -> tuple:
    """(the K-aware plan's optimal row, the direct arm's row): the rows `infalign plan --k` shows side by side."""
    return planning.plan(inference, KL_BUDGET, k=k)["optimal"], dr.direct_plan(inference, KL_BUDGET, k)


def converge(estimator: str, n: int, inference: str, k: int, coef: float, baseline: str = "loo"):
    """Train the tabular policy to its fixed point; returns (bin policy (stores, K+1), spacings p)."""
    p = np.array(fk.store_spacings(k, N_STORES[k], seed=1000 + k))
    stores, bins = p.shape
    maker = maker_for(estimator, n, coef, inference, k, stores, baseline)
    rng = np.random.default_rng(k)
    # Latin-hypercube uniforms per store and mate slot, fixed for the whole run.
    strata = np.argsort(rng.random((stores, n - 1, MATES)), -1) + rng.random((stores, n - 1, MATES))
    uniforms = torch.from_numpy(np.swapaxes(strata / MATES, 1, 2))
    log_ref = torch.from_numpy(np.log(p))
    theta = log_ref.clone()
    shape = (stores, bins, MATES, n)
    store_of = torch.arange(stores).view(-1, 1, 1, 1).expand(shape).reshape(-1)
    prompt_of = [prompt_name(k, i) for i in store_of.tolist()]
    for _ in range(STEPS):
        log_pi = theta - theta.logsumexp(-1, keepdim=True)
        cdf = log_pi.exp().cumsum(-1)
        mates = torch.searchsorted(cdf.contiguous(), uniforms.reshape(stores, -1)).clamp(max=bins - 1)
        response = torch.empty(shape, dtype=torch.long)
        response[..., 0] = torch.arange(bins).view(1, -1, 1)
        response[..., 1:] = mates.view(stores, 1, MATES, n - 1)  # the same mates for every first-member bin
        response = response.reshape(-1)
        kl = compute_approx_kl(
            log_pi[store_of, response].view(-1, 1), log_ref[store_of, response].view(-1, 1), kl_estimator="k1"
        )
        (exp,) = maker.compute_advantages_and_returns([experience(response, prompt_of, kl)])
        adv, ret = exp.advantages.view(shape), exp.returns.view(shape)
        # Whitening scales every advantage by one number; dividing it out keeps the step a fixed fraction.
        whitening = float(exp.advantages.std() / ret.std()) if estimator in ("reinforce_baseline",) else 1.0
        a = adv[..., 0].mean(-1).double()
        pi = log_pi.exp()
        theta = theta + STEP_FRACTION / (whitening * coef) * (a - (pi * a).sum(-1, keepdim=True))
    pi = (theta - theta.logsumexp(-1, keepdim=True)).exp().numpy()
    return pi, p


def _check_landed(inference, k, pi, p, coef_on_rho):
    optimal, direct = plans(inference, k)
    kl, win = fk.bin_kl(pi, p).mean(), fk.bin_win_rate(inference, pi, p).mean()
    exact = dr.bin_optimum_direct(p, inference, coef_on_rho)
    print(
        f"\n{inference} K={k}: budget {KL_BUDGET} -> converged KL {kl:.4f} (direct optimum of these stores "
        f"{fk.bin_kl(exact, p).mean():.4f}); win {win:.4f}, direct row {direct['win_rate']:.4f}, plan's optimal row "
        f"{optimal['win_rate']:.4f}"
    )
    # It lands on the direct arm's optimum of these stores (up to the mates' Monte Carlo) ...
    assert kl == pytest.approx(fk.bin_kl(exact, p).mean(), rel=0.03)
    # ... and so spends the budget and reaches the direct arm's planned win rate, never below the plan's optimal row.
    assert kl == pytest.approx(KL_BUDGET, rel=0.05)
    assert win == pytest.approx(direct["win_rate"], abs=0.01)
    assert win >= optimal["win_rate"] - 0.01
    return kl, win


@pytest.mark.parametrize("inference", ["bon:4", "won:4"])
@pytest.mark.parametrize("k", [16, pytest.param(64, marks=pytest.mark.slow)])
def test_direct_arm_lands_on_its_plan(inference, k):
    """rloo, n = 5, the leave-one-out baseline: --algo.kl.init_coef = direct_kl_coef(plan) = c * n/(n-1)."""
    n, estimator = 5, "rloo"
    plan = {"inference": inference, "kl": KL_BUDGET}
    coef = dr.direct_kl_coef(plan, estimator, n, k=k)
    pi, p = converge(estimator, n, inference, k, coef)
    _check_landed(inference, k, pi, p, coef / dr.composition(estimator, n, inference).reward_scale)


@pytest.mark.slow
def test_reinforce_baseline_lands_on_the_plan():
    """The study's estimator (whitening on): its group mean is exactly 0 under the loo baseline, coef = c."""
    plan = {"inference": "bon:4", "kl": KL_BUDGET}
    coef = dr.direct_kl_coef(plan, "reinforce_baseline", 5, k=16)
    pi, p = converge("reinforce_baseline", 5, "bon:4", 16, coef)
    _check_landed("bon:4", 16, pi, p, coef)


@pytest.mark.slow  # the factor itself is proved exactly, fast, by the enumeration above
def test_rloo_without_its_factor_overspends():
    """The same run at c itself (CTRL's conversion for rloo, kl_coef.py) trains at c (n-1)/n: more KL than planned."""
    c = dr.direct_coef_k("bon:4", KL_BUDGET, 16)
    pi, p = converge("rloo", 5, "bon:4", 16, c)
    kl = fk.bin_kl(pi, p).mean()
    assert kl == pytest.approx(fk.bin_kl(dr.bin_optimum_direct(p, "bon:4", c * 4 / 5), p).mean(), rel=0.03)
    assert kl > 1.1 * KL_BUDGET
