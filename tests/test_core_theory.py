import math
import warnings

import numpy as np
import pytest

from openrlhf_infalign.core import theory as th
from openrlhf_infalign.core.inference import InferenceProcedure
from openrlhf_infalign.core.transforms import parse_transform

# ---------------------------------------------------------------------------------------------------------------
# an independent reference: uniform 200k-point grid, plain numpy trapezoid, no code shared with theory.py

N_FINE = 200_001


def _reference(spec: str, beta: float, inference: str) -> tuple[float, float]:
    u = np.linspace(0.0, 1.0, N_FINE)
    with np.errstate(divide="ignore"):
        phi = parse_transform(spec).phi(u)
    logit = phi / beta
    logit -= logit.max()
    e = np.exp(logit)
    g = e / np.trapezoid(e, u)
    pos = g > 0
    kl = np.trapezoid(np.where(pos, g * np.log(np.where(pos, g, 1.0)), 0.0), u)
    G = np.concatenate([[0.0], np.cumsum((g[1:] + g[:-1]) / 2 * np.diff(u))])
    G = np.clip(G / G[-1], 0, 1)
    kind, _, n = inference.partition(":")
    if kind == "standard":
        wr = np.trapezoid(u * g, u)
    elif kind == "bon":
        n = int(n)
        wr = 1 - n * np.trapezoid(u ** (n - 1) * G**n, u)
    else:
        n = int(n)
        wr = n * np.trapezoid((1 - u) ** (n - 1) * (1 - G) ** n, u)
    return float(kl), float(wr)


CASES = [
    ("identity", 0.05),
    ("identity", 1.0),
    ("exp:t=10", 0.3),
    ("exp:t=10", 0.05),
    ("exp:t=30", 0.2),
    ("negexp:t=10", 0.1),
    ("negexp:t=20", 0.02),
    ("log", 0.02),
    ("power:k=3", 0.2),
]


@pytest.mark.parametrize("spec,beta", CASES)
@pytest.mark.parametrize("inference", ["standard", "bon:4", "bon:16", "won:4"])
def test_kl_and_win_rate_match_fine_grid_integration(spec, beta, inference):
    kl_ref, wr_ref = _reference(spec, beta, inference)
    assert th.kl_divergence(spec, beta) == pytest.approx(kl_ref, abs=1e-3)
    assert th.win_rate(inference, spec, beta) == pytest.approx(wr_ref, abs=1e-3)


def test_optimum_density_is_a_normalised_density():
    u, g = th.optimum_density(parse_transform("exp:t=10"), 0.3)
    assert u[0] == 0 and u[-1] == 1 and np.all(np.diff(u) > 0)
    assert np.trapezoid(g, u) == pytest.approx(1.0, abs=1e-9)
    assert np.all(np.diff(g) >= 0)  # a monotone transform tilts mass upward
    u2, g2 = th.optimum_density("identity", 1.0, grid=np.linspace(0, 1, 11))
    assert len(u2) == 11 and np.trapezoid(g2, u2) == pytest.approx(1.0)


@pytest.mark.parametrize("inference", ["standard", "bon:2", "bon:8", "won:2", "won:8"])
@pytest.mark.parametrize("spec", ["identity", "exp:t=10", "negexp:t=10", "log"])
def test_uniform_gives_one_half(inference, spec):
    # beta -> inf: the optimum is pi_ref itself, calibrated reward uniform.
    assert th.win_rate(inference, spec, math.inf) == pytest.approx(0.5, abs=1e-6)
    assert th.win_rate(inference, spec, 1e7) == pytest.approx(0.5, abs=1e-6)
    assert th.kl_divergence(spec, 1e7) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_log_transform_reproduces_best_of_n_policy(n):
    # Phi = log u with (raw) beta = 1/(N-1): g = N u^{N-1}, the Best-of-N policy itself.
    tr = parse_transform("log")
    beta = tr.scale / (n - 1)  # normalised beta = raw beta * scale
    assert th.kl_divergence(tr, beta) == pytest.approx(math.log(n) - (n - 1) / n, abs=1e-6)
    assert th.win_rate("standard", tr, beta) == pytest.approx(n / (n + 1), abs=1e-6)
    # BoN_N policy against BoN_N of itself: G = u^N, so 1 - N int u^{N-1+N^2} = N/(N+1) as well.
    assert th.win_rate(f"bon:{n}", tr, beta) == pytest.approx(n / (n + 1), abs=1e-6)
    # and beta_for_kl inverts it
    assert th.beta_for_kl(tr, math.log(n) - (n - 1) / n) == pytest.approx(beta, rel=1e-6)


@pytest.mark.parametrize("spec", ["identity", "exp:t=10", "exp:t=200", "negexp:t=10", "log", "power:k=2"])
@pytest.mark.parametrize("kl", [0.01, 0.25, 1.0, 3.0])
def test_beta_for_kl_inverts_kl(spec, kl):
    beta = th.beta_for_kl(spec, kl)
    assert beta > 0
    assert th.kl_divergence(spec, beta) == pytest.approx(kl, rel=1e-7)


def test_kl_is_monotone_in_beta_and_win_rate_grows_with_kl():
    betas = np.geomspace(10, 0.01, 30)
    kls = [th.kl_divergence("exp:t=10", b) for b in betas]
    wins = [th.win_rate("bon:4", "exp:t=10", b) for b in betas]
    assert np.all(np.diff(kls) > 0) and np.all(np.diff(wins) > 0)


def test_unreachable_kl_says_how_far_it_goes():
    coarse = th.Grid.uniform(11)  # a grid this coarse cannot hold a sharp optimum: max KL = log(1/w_last)
    with pytest.raises(ValueError, match=r"reaches at most KL 2\.99"):
        th.beta_for_kl("identity", 5.0, grid=coarse)
    for bad in (0, -1, math.nan, "x"):
        with pytest.raises(ValueError, match="KL budget"):
            th.beta_for_kl("identity", bad)


def test_bon1_is_standard():
    assert th.win_rate("bon:1", "exp:t=5", 0.2) == pytest.approx(th.win_rate("standard", "exp:t=5", 0.2), abs=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# the optimal transform


@pytest.mark.parametrize("inference", ["bon:8", "bon:32", "won:8"])
@pytest.mark.parametrize("beta", [10.0, 1.0, 0.3])
def test_fixed_point_converges_with_damping_09(inference, beta):
    tr, info = th.optimal_transform(inference, beta, damping=0.9)
    assert info["converged"] and info["residual"] < 1e-8 and info["iterations"] < 400
    # it is a fixed point: the RLHF optimum of the returned transform regenerates the same transform
    u, g = th.optimum_density(tr, info["beta"])
    grid = th.as_grid(None)
    phi, _ = th._win_gradient_phi(grid, InferenceProcedure.parse(inference), *th._cdfs(grid, g))
    np.testing.assert_allclose(phi, tr.phi(u), atol=1e-6)
    assert th.win_rate(inference, tr, info["beta"]) == pytest.approx(info["win_rate"])


def test_damping_05_oscillates_and_is_reported():
    with pytest.warns(RuntimeWarning, match="did not converge"):
        _, info = th.optimal_transform("bon:8", 0.3, damping=0.5, max_iter=300)
    assert not info["converged"] and info["iterations"] == 300 and info["residual"] > 1e-3


def test_standard_optimum_is_identity():
    tr, info = th.optimal_transform("standard", 0.5)
    u = np.linspace(0, 1, 501)
    np.testing.assert_allclose(tr(u), u, atol=1e-9)
    assert info["converged"] and info["beta"] == pytest.approx(0.5)


@pytest.mark.parametrize("inference", ["bon:4", "won:4"])
def test_optimal_for_kl_sits_at_kl_and_beats_every_fixed_transform(inference):
    tr, info = th.optimal_transform_for_kl(inference, 0.5)
    assert info["converged"] and info["kl"] == pytest.approx(0.5, rel=1e-6) and not info["saturated"]
    for spec in ["identity", "log", "exp:t=5", "exp:t=12", "negexp:t=5", "negexp:t=10", "power:k=3"]:
        assert info["win_rate"] >= th.win_rate(inference, spec, th.beta_for_kl(spec, 0.5)) - 1e-6


def test_optimal_saturates_instead_of_failing():
    # Worst-of-32 wins almost surely long before KL 2: the optimum spends less KL and says so.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = th.optimal_transform_for_kl("won:32", 2.0)
    assert info["saturated"] and info["kl"] < 2.0 and info["win_rate"] > 0.9999


# ---------------------------------------------------------------------------------------------------------------
# any N: past the grid's resolution near the ends, the substitution s = u^N


@pytest.mark.parametrize("beta", [0.05, 0.3, 2.0])
def test_huge_n_reaches_the_closed_form_limits(beta):
    # identity optimum g(u) = e^(u/beta) / Z: Best-of-N -> g(1)/(1+g(1)), Worst-of-N -> 1/(1+g(0)) as N -> infinity.
    z = beta * math.expm1(1 / beta)
    g1, g0 = math.exp(1 / beta) / z, 1 / z
    for n in (10**6, 10**7, 10**9):
        assert th.win_rate(f"bon:{n}", "identity", beta) == pytest.approx(g1 / (1 + g1), abs=2e-6)
        assert th.win_rate(f"won:{n}", "identity", beta) == pytest.approx(1 / (1 + g0), abs=2e-6)


def test_large_n_switch_is_continuous_and_more_accurate_than_the_grid():
    # Against an 8x finer grid: the substitution on the default grid is within 5e-7 where the trapezoid on it is
    # off by 5e-5 at N = 1000.
    fine = th.Grid.cosine(32001)
    for spec, beta in (("exp:t=12.63", 0.31), ("negexp:t=5", 0.2)):
        for inf in ("bon:65", "won:65", "bon:1000", "won:1000", "bon:100000"):
            want = th.win_rate(inf, spec, beta, grid=fine)
            assert th.win_rate(inf, spec, beta) == pytest.approx(want, abs=5e-7)
        d = th._density(spec, beta)
        trapezoid = 1.0 - 1000 * d.grid.integral(d.grid.u**999 * d.G**1000)
        assert abs(trapezoid - th.win_rate("bon:1000", spec, beta, grid=fine)) > 1e-5
        below, above = th.win_rate("bon:64", spec, beta), th.win_rate("bon:65", spec, beta)
        assert abs(below - above) < 1e-4


@pytest.mark.parametrize("spec", ["identity", "exp:t=12.63", "exp:t=1000", "log", "negexp:t=5"])
def test_win_rates_of_increasing_transforms_stay_in_half_to_one_for_any_n(spec):
    # The bon:10000000 printed win rates far below 1/2 (grid underflow).
    beta = th.beta_for_kl(spec, 0.5)
    for n in (1, 2, 64, 65, 10**4, 10**7, 10**12):
        for kind in ("bon", "won"):
            w = th.win_rate(f"{kind}:{n}", spec, beta)
            assert 0.5 - 1e-7 <= w <= 1.0, (spec, kind, n, w)
