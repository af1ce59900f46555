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

Bounded at any K and N. The sums over the K+1 bins in E[KL] depend on each bin only through its log weight, so
beyond K = 256 they are taken by a quadrature of those log weights (4-node Gauss rules of the bins in each
width-1/2 panel of log weight, exact for cubics; below log weight -100 nothing counts): at most ~800 nodes for any K.
The Monte Carlo holds at most 2^21 bin probabilities (fewer stores at larger K: a store's win rate varies less
there). Each store's win rate is a sum over bins of n int v^(n-1) F^n: up to N = 16 by N-point Gauss-Legendre
(exact); beyond, or where that is too much work, with v = U_hi e^(-z/N) in each bin (smooth in z, so a few nodes;
panels scaled to the integrand's decay in wide bins), and bins that cannot matter ((U_hi F_hi)^N < e^-46) skipped.
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
# Beyond a million reference samples per prompt a store is the continuum to within the Monte Carlo's error.
K_MAX = 1_000_000
# At most this many bin probabilities (stores x (K+1)) in the Monte Carlo: 16 MB per array at any K. A store's
# win rate varies less at larger K, so fewer stores keep the error (~1e-4 at K = 1000 and 100,000) where it was.
STORE_ELEMENTS = 1 << 21
MIN_STORES = 16
# Beyond this many bins the E[KL] sums go through the log-weight quadrature (module docstring).
K_EXACT_SUMS = 256
_PANEL_WIDTH, _PANEL_NODES, _LOG_WEIGHT_FLOOR = 0.5, 4, -100.0
# Bin integrals: exact Gauss-Legendre in v up to this N (and this many nodes x bins x stores), else in z.
_GL_EXACT_N, _GL_BUDGET = 16, 1 << 24
_TINY, _NARROW, _NARROW_NODES, _WIDE_NODES = 0.05, 1.0, 6, 10
_Z_BREAKS = np.array([0.0, 0.5, 2.0, 6.0, 15.0, 45.0])
_NEGLIGIBLE_LOG = -46.0
_BIN_CHUNK = 1 << 17
BETA_MIN, BETA_MAX = 1e-6, 1e6
# log t grid for the exact integrals: wide enough that both tails are below 1e-17 for every w in (0, 1].
_LOG_T = np.linspace(-42.0, 42.0, 2801)


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ValueError(f"K (reference samples per prompt) must be an integer >= 2, got {k!r}")
    if k < 2:
        raise ValueError(f"K (reference samples per prompt) must be >= 2, got {k}")
    if k > K_MAX:
        raise ValueError(
            f"K = {int(k)} is beyond {K_MAX:,}, where a store is the continuum to within the planner's error: "
            "leave K out (--k) to plan for the continuum"
        )
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
    if inf.kind == "standard":
        return (q * (np.cumsum(p, -1) - 0.5 * p)).sum(-1)
    n = inf.n
    if n > _GL_EXACT_N or int(np.prod(np.broadcast_shapes(q.shape, p.shape))) * n > _GL_BUDGET:
        if inf.kind == "bon":
            return 1.0 - _max_of_n_mass(q, p, n)
        # Worst-of-N is Best-of-N of the mirrored policy and base (v -> 1 - v reverses the bins).
        return _max_of_n_mass(q[..., ::-1], p[..., ::-1], n)
    lo = np.cumsum(p, -1) - p  # U_(j)
    f_lo = np.cumsum(q, -1) - q  # policy CDF at U_(j)
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


def _max_of_n_mass(q: np.ndarray, p: np.ndarray, n: int) -> np.ndarray:
    """n int_0^1 v^(n-1) F(v)^n dv (= 1 - the Best-of-N win rate) for bin policies, any n, bin by bin in
    z = n log(U_hi / v): there the bin's integral is (U_hi F_hi)^n int_0^Z e^-z (F / F_hi)^n dz, a smooth decay."""
    q, p = np.broadcast_arrays(np.asarray(q, dtype=np.float64), np.asarray(p, dtype=np.float64))
    shape = q.shape[:-1]
    q, p = q.reshape(-1, q.shape[-1]), p.reshape(-1, p.shape[-1])
    # Masses above each bin, summed from the top: 1 - U_hi and 1 - F_hi keep their digits near v = 1.
    above_p = np.cumsum(p[:, ::-1], 1)[:, ::-1] - p
    above_q = np.clip(np.cumsum(q[:, ::-1], 1)[:, ::-1] - q, 0.0, 1.0)
    with np.errstate(divide="ignore"):
        log_u_hi = np.log1p(-np.minimum(above_p, 1.0))
        log_f_hi = np.log1p(-above_q)
        head = n * (log_u_hi + log_f_hi)  # log (U_hi F_hi)^n
    width = q.shape[1]
    flat_all = np.flatnonzero(head > _NEGLIGIBLE_LOG)
    log_u_hi, log_f_hi, head = log_u_hi.reshape(-1), log_f_hi.reshape(-1), head.reshape(-1)
    above_p, p_flat, q_flat = above_p.reshape(-1), p.reshape(-1), q.reshape(-1)
    out = np.zeros(q.shape[0])
    for c0 in range(0, flat_all.size, _BIN_CHUNK):  # bounded temporaries: (chunk, nodes) at a time
        flat = flat_all[c0 : c0 + _BIN_CHUNK]
        u_hi, f_hi = np.exp(log_u_hi[flat]), np.exp(log_f_hi[flat])
        with np.errstate(divide="ignore"):
            z_bin = n * (log_u_hi[flat] - np.log1p(-np.minimum(above_p[flat] + p_flat[flat], 1.0)))
        # slope: -(d/dz) log (F/F_hi)^n at z = 0, i.e. U_hi g / F_hi with g = q/p the bin's density ratio
        slope = u_hi * q_flat[flat] / p_flat[flat] / f_hi
        z_max = np.minimum(z_bin, 45.0)
        alpha = 1.0 + slope
        integral = np.empty(flat.size)
        # Nodes by how far the integrand decays over the bin: e^(alpha z) on [0, 1] needs m nodes for a relative
        # error ~ (alpha z)^(2m) / 4^m (2m)!: 2 nodes to 0.05, 6 to 1; wider bins in panels of e-folds.
        span = alpha * z_max
        for lo, hi, m in ((-1.0, _TINY, 2), (_TINY, _NARROW, _NARROW_NODES)):
            sel = np.flatnonzero((span > lo) & (span <= hi))
            if sel.size:
                gl = np.polynomial.legendre.leggauss(m)
                integral[sel] = _bin_integral(np.zeros(sel.size), z_max[sel], slope[sel], n, *gl)
        wide = np.flatnonzero(span > _NARROW)
        if wide.size:
            # Panels at 0, 0.5, 2, 6, 15, 45 e-folds of the initial decay, then on to z_max (a slower tail).
            zw = z_max[wide, None]
            breaks = np.minimum(np.append(_Z_BREAKS[None, :] / alpha[wide, None], zw, 1), zw)
            gl = np.polynomial.legendre.leggauss(_WIDE_NODES)
            integral[wide] = sum(
                _bin_integral(breaks[:, i], breaks[:, i + 1], slope[wide], n, *gl) for i in range(breaks.shape[1] - 1)
            )
        out += np.bincount(flat // width, weights=np.exp(head[flat]) * integral, minlength=out.size)
    return np.clip(out, 0.0, 1.0).reshape(shape)


def _bin_integral(a, b, rate, n, nodes, weights) -> np.ndarray:
    """int_a^b e^-z (F/F_hi)^n dz per bin by Gauss-Legendre, where F/F_hi = 1 - (U_hi - v) g / F_hi
    = 1 + expm1(-z/n) * rate, never below F_lo / F_hi >= 0 inside the bin."""
    z = a[:, None] + (b - a)[:, None] * (nodes + 1) / 2
    with np.errstate(divide="ignore"):
        f = np.exp(-z + n * np.log1p(np.maximum(np.expm1(-z / n) * rate[:, None], -1.0)))
    return (f * weights).sum(1) * (b - a) / 2


def stores_for_k(k: int) -> int:
    """Stores in the Monte Carlo at K: 4096 up to K = 511, then fewer so that at most 2^21 bins are held."""
    return int(min(STORES, max(MIN_STORES, STORE_ELEMENTS // (_check_k(k) + 1))))


@lru_cache(maxsize=4)
def _spacings(k: int, stores: int, seed: int) -> np.ndarray:
    # Latin hypercube over the Exp(1) components: each store is exactly Dirichlet(1, ..., 1), and each bin's
    # exponentials are stratified across stores, which cuts the Monte Carlo error of store averages several-fold.
    rng = np.random.default_rng(seed)
    strata = (np.argsort(rng.random((k + 1, stores)), axis=1) + rng.random((k + 1, stores))) / stores
    e = -np.log1p(-strata).T
    p = e / e.sum(-1, keepdims=True)
    p.flags.writeable = False
    return p


def store_spacings(k: int, stores: int | None = None, seed: int = STORE_SEED) -> np.ndarray:
    """(stores, K+1) base bin probabilities of random stores, each Dirichlet(1, ..., 1) distributed (stratified
    across stores; fixed seed, cached, read-only). stores: default stores_for_k(K)."""
    k = _check_k(k)
    return _spacings(k, int(stores_for_k(k) if stores is None else stores), int(seed))


def _levels(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct finite values ascending, their multiplicities): what the E[KL] sums depend on."""
    x = np.sort(values[np.isfinite(values)])
    first = np.flatnonzero(np.r_[True, x[1:] != x[:-1]])
    return x[first], np.diff(np.r_[first, x.size]).astype(float)


def _compressed(x: np.ndarray, mult: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, counts): a quadrature of the bins' log weights x (distinct, ascending, with multiplicities mult),
    sum_j f(lw_j) ~ sum_i counts_i f(nodes_i). Per panel of width _PANEL_WIDTH in log weight, the _PANEL_NODES-node
    Gauss rule of the panel's own points (from their recurrence, Stieltjes' procedure; exact for polynomials of
    degree < 2 * nodes), or the points themselves where a panel has no more than that many; bins with log weight at
    or below _LOG_WEIGHT_FLOOR are left out (their terms in E[KL] are below 1e-20)."""
    keep = x > _LOG_WEIGHT_FLOOR
    x, mult = x[keep], mult[keep]
    if not x.size:
        return x, mult
    panel = np.floor((x - x[0]) / _PANEL_WIDTH).astype(np.int64)
    starts = np.flatnonzero(np.r_[True, panel[1:] != panel[:-1]])
    sizes = np.diff(np.r_[starts, x.size])
    small = np.repeat(sizes <= _PANEL_NODES, sizes)
    nodes, weights = [x[small]], [mult[small]]
    big = np.flatnonzero(sizes > _PANEL_NODES)
    if big.size:
        y, c = x[~small], mult[~small]
        pid = np.repeat(np.arange(big.size), sizes[big])
        bstarts = np.r_[0, np.cumsum(sizes[big])[:-1]]
        centre = (x[starts[big]] + x[starts[big] + sizes[big] - 1]) / 2
        y = (y - centre[pid]) / _PANEL_WIDTH  # within [-1/2, 1/2]
        m = _PANEL_NODES
        alpha, beta = np.zeros((big.size, m)), np.zeros((big.size, m))
        prev, cur, norm_prev = np.zeros_like(y), np.ones_like(y), None
        for i in range(m):  # more than m distinct points per panel: every norm here is positive
            norm = np.add.reduceat(c * cur * cur, bstarts)
            alpha[:, i] = np.add.reduceat(c * y * cur * cur, bstarts) / norm
            if i:
                beta[:, i] = norm / norm_prev
            prev, cur, norm_prev = cur, (y - alpha[pid, i]) * cur - (beta[pid, i] * prev if i else 0.0), norm
        jac = np.zeros((big.size, m, m))
        idx = np.arange(m)
        jac[:, idx, idx] = alpha
        off = np.sqrt(beta[:, 1:])
        jac[:, idx[:-1], idx[1:]] = off
        jac[:, idx[1:], idx[:-1]] = off
        theta, vec = np.linalg.eigh(jac)
        total = np.add.reduceat(c, bstarts)
        nodes.append((centre[:, None] + _PANEL_WIDTH * theta).reshape(-1))
        weights.append((total[:, None] * vec[:, 0, :] ** 2).reshape(-1))
    return np.concatenate(nodes), np.concatenate(weights)


def _expected_kl_from_log_weights(lw: np.ndarray) -> float:
    k = len(lw) - 1
    if k > K_EXACT_SUMS:
        return _expected_kl_from_nodes(*_compressed(*_levels(lw)), k)
    return _expected_kl_from_nodes(lw, np.ones_like(lw), k)


def _expected_kl_from_nodes(lw: np.ndarray, count: np.ndarray, k: int) -> float:
    """The E[KL] integrals (module docstring) for bins with log weights lw, each standing for count bins."""
    w = np.exp(lw)
    with np.errstate(invalid="ignore"):  # w = 0 where lw = -inf (log transform at u = 0): w log w -> 0
        a = np.where(w > 0, w * lw, 0.0) * count
    t = np.exp(_LOG_T)
    tw = np.multiply.outer(t, w)
    log_l = -(np.log1p(tw) * count).sum(-1)
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


def expected_win_rate_k(inference, transform, beta: float, k: int | None, stores: int | None = None) -> float:
    """E over stores of the bin optimum's win rate against the true base (Monte Carlo over ``stores`` stores with
    a fixed seed, each exact; default stores_for_k(K))."""
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
    # Only beta changes in the search: Phi at the bins (and, at large K, its distinct levels) is computed once.
    with np.errstate(divide="ignore"):
        phi = tr.phi(bin_values(k))
    top = np.max(phi)
    levels = _levels(phi - top) if k > K_EXACT_SUMS else None

    def expected_kl(beta: float) -> float:
        if levels is None:
            return _expected_kl_from_nodes((phi - top) / beta, np.ones_like(phi), k)
        return _expected_kl_from_nodes(*_compressed(levels[0] / beta, levels[1]), k)

    def gap(log_beta: float) -> float:
        return math.log(max(expected_kl(math.exp(log_beta)), 1e-300)) - math.log(kl_budget)

    lo, hi = math.log(BETA_MIN), math.log(BETA_MAX)
    if gap(lo) <= 0:
        raise ValueError(
            f"KL {kl_budget:g} is out of reach for transform {tr.spec} with K={k}: its optimum spends at most "
            f"{expected_kl(BETA_MIN):.4g} nats on average (all mass on the top bins); use a smaller budget"
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
