"""The plan with K reference samples per prompt: the calibrated reward is a step function of the store.

With K reference rewards of a continuous reward model (no ties), the mid-rank calibrated reward of a policy sample
is C = j/K, where j = #{stored rewards below it}: the ``0.5 * ties`` term of the mid-rank never fires, so C takes
the K+1 values 0, 1/K, ..., 1, one per *bin* between consecutive order statistics (bin 0 below the lowest stored
reward, bin K above the highest). In the true base quantile v ~ Uniform[0, 1], bin j is [U_(j), U_(j+1)] with
U_(0) = 0, U_(K+1) = 1; its base probability p_j is a spacing of K uniform order statistics, so
(p_0, ..., p_K) ~ Dirichlet(1, ..., 1) = (E_0, ..., E_K) / S with E_j ~ Exp(1) iid and S = sum E_j.

The RLHF optimum for reward Phi(C) at KL coefficient beta can only see the bin, so it reweights bins:
q_j = p_j w_j / B, w_j = exp(Phi(j/K) / beta), B = sum p_j w_j, and within a bin it keeps the base's shape, i.e. it
is uniform in quantile space there. Its KL to the base and its win rates against the TRUE continuous base
distribution depend on the store; the plan uses their expectation over stores:

    E[KL] = E[sum E_j w_j log w_j / B'] - E[log B'] + E[log S],   B' = sum E_j w_j   (scale-free in p)
          = int_0^inf L(t) sum_j w_j log w_j / (1 + t w_j) dt - int_0^inf (e^{-s} - L(s)) / s ds + psi(K+1),
    L(t) = E[e^{-t B'}] = prod_j 1 / (1 + t w_j)

(1/B' = int e^{-tB'} dt, and Frullani's log x = int (e^{-s} - e^{-sx}) / s ds): exact one-dimensional integrals,
taken by the trapezoid rule in log t. Win rates are non-linear in the store's CDF, so their expectation is a
fixed-seed Monte Carlo over Latin-hypercube stratified stores, each store's win rate exact (Gauss-Legendre within
bins is exact for the polynomial integrands). ``k=None`` everywhere means K = infinity: the continuum theory.

The optimal transform enters as any other Transform (e.g. the continuum's tabulated optimum evaluated at the K+1
bin values); re-optimising the transform for finite K is not done here.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy.optimize import brentq
from scipy.special import digamma

# The continuum (K = infinity) theory; its module may be renamed or split, so every use of it goes through here.
from openrlhf_infalign.core.theory import InferenceProcedure, beta_for_kl, kl_divergence, win_rate
from openrlhf_infalign.core.transforms import Transform, parse_transform

__all__ = [
    "bin_values",
    "bin_optimum",
    "bin_kl",
    "bin_win_rate",
    "store_spacings",
    "expected_kl_k",
    "expected_win_rate_k",
    "beta_for_kl_k",
]

STORES = 4096
STORE_SEED = 20250611
BETA_MIN, BETA_MAX = 1e-6, 1e6
# log t grid for the exact integrals: wide enough that both tails are below 1e-17 for every w in (0, 1].
_LOG_T = np.linspace(-42.0, 42.0, 2801)


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"K (reference samples per prompt) must be an integer >= 2, got {k!r}")
    if k < 2:
        raise ValueError(f"K (reference samples per prompt) must be >= 2, got {k}")
    return int(k)


def _as_transform(transform) -> Transform:
    return transform if isinstance(transform, Transform) else parse_transform(transform)


def _check_beta(beta) -> float:
    beta = float(beta)
    if not (beta > 0) or not math.isfinite(beta):
        raise ValueError(f"beta must be a positive finite number, got {beta}")
    return beta


def bin_values(k: int) -> np.ndarray:
    """The K+1 calibrated rewards j/K a continuous reward can take against K reference rewards."""
    return np.arange(_check_k(k) + 1, dtype=np.float64) / k


def _log_weights(transform, beta: float, k: int) -> np.ndarray:
    """log w_j = Phi(j/K)/beta, shifted so that max w = 1 (q, KL and win rates do not see the shift)."""
    with np.errstate(divide="ignore"):
        phi = _as_transform(transform).phi(bin_values(k))
    lw = phi / beta
    return lw - np.max(lw)


def bin_optimum(p: np.ndarray, transform, beta: float) -> np.ndarray:
    """q_j = p_j exp(Phi(j/K)/beta) / Z for stores given by bin probabilities p (..., K+1)."""
    p = np.asarray(p, dtype=np.float64)
    q = p * np.exp(_log_weights(transform, _check_beta(beta), p.shape[-1] - 1))
    return q / q.sum(-1, keepdims=True)


def bin_kl(q: np.ndarray, p: np.ndarray) -> np.ndarray:
    """KL(q || p) of bin policies q against their stores' base bin probabilities p (last axis: bins)."""
    q, p = np.asarray(q, dtype=np.float64), np.asarray(p, dtype=np.float64)
    pos = q > 0
    return np.where(pos, q * np.log(np.where(pos, q, 1.0) / np.where(pos, p, 1.0)), 0.0).sum(-1)


def bin_win_rate(inference, q: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Win rate against the true continuous base of a policy that picks bin j with probability q_j and is uniform
    in quantile space within the bin (base bin probabilities p; last axis: bins)."""
    inf = InferenceProcedure.coerce(inference)
    q, p = np.asarray(q, dtype=np.float64), np.asarray(p, dtype=np.float64)
    lo = np.cumsum(p, -1) - p  # U_(j)
    f_lo = np.cumsum(q, -1) - q  # policy CDF at U_(j)
    if inf.kind == "standard":
        return (q * (lo + 0.5 * p)).sum(-1)
    n = inf.n
    # Within bin j, v = U_(j) + s p_j and F = F_j + s q_j are linear in s: the integrand is a polynomial of degree
    # 2N - 1 in s, integrated exactly by N-point Gauss-Legendre.
    nodes, weights = np.polynomial.legendre.leggauss(n)
    total = np.zeros(np.broadcast_shapes(q.shape, p.shape)[:-1])
    for s, a in zip((nodes + 1) / 2, weights / 2):
        v, f = lo + s * p, np.clip(f_lo + s * q, 0.0, 1.0)
        if inf.kind == "bon":
            total += a * (p * v ** (n - 1) * f**n).sum(-1)
        else:
            total += a * (p * (1.0 - v) ** (n - 1) * (1.0 - f) ** n).sum(-1)
    return 1.0 - n * total if inf.kind == "bon" else n * total


@lru_cache(maxsize=16)
def _spacings(k: int, stores: int, seed: int) -> np.ndarray:
    # Latin hypercube over the Exp(1) components: each store is exactly Dirichlet(1, ..., 1), and each bin's
    # exponentials are stratified across stores, which cuts the Monte Carlo error of store averages several-fold.
    rng = np.random.default_rng(seed)
    strata = (np.argsort(rng.random((k + 1, stores)), axis=1) + rng.random((k + 1, stores))) / stores
    e = -np.log1p(-strata).T
    p = e / e.sum(-1, keepdims=True)
    p.flags.writeable = False
    return p


def store_spacings(k: int, stores: int = STORES, seed: int = STORE_SEED) -> np.ndarray:
    """(stores, K+1) base bin probabilities of random stores, each Dirichlet(1, ..., 1) distributed (stratified
    across stores; fixed seed, cached, read-only)."""
    return _spacings(_check_k(k), int(stores), int(seed))


def _expected_kl_from_log_weights(lw: np.ndarray) -> float:
    k = len(lw) - 1
    w = np.exp(lw)
    with np.errstate(invalid="ignore"):  # w = 0 where lw = -inf (log transform at u = 0): w log w -> 0
        a = np.where(w > 0, w * lw, 0.0)
    t = np.exp(_LOG_T)
    tw = np.multiply.outer(t, w)
    log_l = -np.log1p(tw).sum(-1)
    tl = t * np.exp(log_l)  # dt = t dx
    mean_ratio = (tl * (a / (1.0 + tw)).sum(-1)).sum()
    mean_log_b = (np.exp(-t) - np.exp(log_l)).sum()
    dx = _LOG_T[1] - _LOG_T[0]
    return max(float((mean_ratio - mean_log_b) * dx + digamma(k + 1)), 0.0)


def expected_kl_k(transform, beta: float, k: int | None) -> float:
    """E over stores of KL(q || p) of the bin optimum for (transform, beta) with K reference samples (exact)."""
    beta = _check_beta(beta)
    if k is None:
        return kl_divergence(transform, beta)
    return _expected_kl_from_log_weights(_log_weights(transform, beta, _check_k(k)))


def expected_win_rate_k(inference, transform, beta: float, k: int | None, stores: int = STORES) -> float:
    """E over stores of the bin optimum's win rate against the true base (Monte Carlo over ``stores`` stores with
    a fixed seed, each exact)."""
    beta = _check_beta(beta)
    if k is None:
        return win_rate(inference, transform, beta)
    p = store_spacings(k, stores)
    return float(bin_win_rate(inference, bin_optimum(p, transform, beta), p).mean())


def beta_for_kl_k(transform, kl_budget: float, k: int | None) -> float:
    """beta at which the bin optimum's expected KL over stores with K reference samples equals kl_budget."""
    kl_budget = float(kl_budget)
    if not (kl_budget > 0) or not math.isfinite(kl_budget):
        raise ValueError(f"KL budget must be a positive number (nats), got {kl_budget}")
    if k is None:
        return beta_for_kl(transform, kl_budget)
    k = _check_k(k)
    tr = _as_transform(transform)

    def gap(log_beta: float) -> float:
        return math.log(max(expected_kl_k(tr, math.exp(log_beta), k), 1e-300)) - math.log(kl_budget)

    lo, hi = math.log(BETA_MIN), math.log(BETA_MAX)
    if gap(lo) <= 0:
        raise ValueError(
            f"KL {kl_budget:g} is out of reach for transform {tr.spec} with K={k}: its optimum spends at most "
            f"{expected_kl_k(tr, BETA_MIN, k):.4g} nats on average (all mass on the top bins); use a smaller budget"
        )
    # E[KL] falls as beta grows and, at a given beta, exceeds the continuum's KL: bracket from the continuum beta.
    try:
        a = math.log(beta_for_kl(tr, kl_budget))
    except ValueError:
        a = lo
    b = min(a + 1.0, hi)
    while gap(b) > 0 and b < hi:
        a, b = b, min(b + 2.0, hi)
    if gap(a) < 0:
        a = lo
    return math.exp(brentq(gap, a, b, xtol=1e-10, rtol=1e-10))
