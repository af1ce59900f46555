"""Optimising the Best-of-N / Worst-of-N win rate head on: unbiased group estimators on calibrated rewards.

With u = C(x, y) (Uniform[0, 1] under the base policy) the win rates are expectations of a function of the best of N
policy samples (Walder & Karkhanis, "Pass@K Policy Optimization", NeurIPS 2025: max_g@k):

    Best-of-N   W = E_pi[f(max_{i<=N} u_i)],  f(m) = m^N                 (P(all N base samples are below m))
    Worst-of-N  W = E_pi[f(min_{i<=N} u_i)],  f(m) = 1 - (1 - m)^N       (P(some base sample is below m))

"Best" is the max for Best-of-N and the min for Worst-of-N; everything below is written for the max.

**Value.** From a group of n >= N samples of one prompt, sorted u_(1) <= ... <= u_(n), the U-statistic over all
N-subsets is  W_hat = sum_i C(i-1, N-1) / C(n, N) * f(u_(i))  (u_(i) is the max of C(i-1, N-1) subsets).

**Per-sample rewards.** grad W = N E[f(max(u_1, M)) grad log pi(y_1)], M the best of N-1 further samples, so

    rho_j = mean over the (N-1)-subsets S of the other n-1 samples of f(max(u_j, max_S u))
          = [C(i-1, N-1) f(u_(i)) + sum_{k>i} C(k-2, N-2) f(u_(k))] / C(n-1, N-1)        (j at sorted position i)

is unbiased for H(u_j) = E[f(max(u_j, M)) | u_j], and  E[sum_j rho_j grad log pi(y_j)] = (n/N) grad W.  rho is a
reward in [0, 1]: the plan below treats it as one, so the factor n/N is absorbed by OpenRLHF's per-sample KL.
Baseline ``loo``: b_j = W_hat_{-j}, the same U-statistic on the other n-1 samples (needs n > N); it does not depend
on y_j, so the estimate stays unbiased. Two identities make it compose with OpenRLHF's group baselines:
mean_j rho_j = W_hat and mean_j W_hat_{-j} = W_hat, so the rewards r_j = rho_j - b_j sum to exactly 0 per group.

**Ties.** f(max) depends only on the value of the max, so tied samples get identical rho and baselines whatever
order the sort puts them in; no tie rule is needed inside the group. What is estimated is E_pi[f(best of N C)] for
the store's mid-rank C: with K stored rewards and no reward ties against the store C = j/K, and (j/K)^N is the
probability that the sample beats N draws with replacement from the store, i.e. the win rate against the store's
empirical base. Samples in one bin tie in C although their raw rewards differ: the estimator cannot order them and needs not
(the finite-K plan, ``direct_coef_k``, optimises exactly this binned objective). A raw reward that ties t stored
ones gets C = (below + t/2) / K and f of that mid-rank, not the mid-rank of the Best-of-N comparison itself,
((below/K)^N + ((below + t)/K)^N) / 2: they differ in the second order of t/K.

**The plan.** With reward rho and OpenRLHF's k1 KL at coefficient c, the stationary policy is the RLHF tilt
pi ~ pi_ref exp(H(u) / c), H(v) = E[f(max(v, M))] over the optimum itself. H(v) = 1 - N int_v^1 u^{N-1} F^{N-1} du
(Worst-of-N: int_0^v N (1-u)^{N-1} (1-F)^{N-1} du), i.e. N (H - H(1)) is theory.py's R_g: the same fixed point as
the optimal transform at win-rate beta beta_w = N c. The planner's beta is for the optimum's transform normalised
onto [0, 1], phi = (H - H(0)) / (H(1) - H(0)), so  c = beta * (H(1) - H(0)) = beta * scale / N  (scale = N^2 int h,
``beta_win_rate_units / beta`` in theory.py). With K stored rewards the optimum sees bins j/K and H is the bins'
own, policy-dependent; ``direct_coef_k`` puts the EXPECTED KL over stores of that fixed point at the budget, as
finite_k.py does for a fixed transform (``rescaled_coef``, the continuum's rescaling applied to the K-aware optimal
beta, misses it: 0.41 nats for a 0.5 budget at K = 16, Best-of-4). The advantage estimator then rescales the
reward (``composition``, ``COMPOSITION_RULES``): ``--algo.kl.init_coef`` = c * reward_scale (``direct_kl_coef``),
NOT kl_coef.py's conversion for transforms (with the loo baseline reinforce_baseline and dr_grpo keep c).

The adapter's calls: ``group_rewards(u.view(-1, n), inference)`` on each rollout batch's calibrated rewards in
upstream's group order, ``composition(estimator, n, inference)`` to refuse, ``direct_kl_coef(plan, estimator, n,
k=K)`` for the coefficient, ``direct_plan(inference, kl, k)`` for the row to log beside the plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np
from scipy.optimize import brentq

from openrlhf_infalign.core import finite_k as fk
from openrlhf_infalign.core.inference import InferenceProcedure
from openrlhf_infalign.core.planning import check_k
from openrlhf_infalign.core.theory import as_grid, check_kl, optimal_transform_for_kl

__all__ = [
    "BASELINES",
    "DIRECT_K_EXACT",
    "group_win_rate",
    "group_rewards",
    "group_rewards_ragged",
    "win_rate_reward",
    "win_rate_reward_curve",
    "bin_optimum_direct",
    "expected_kl_direct_k",
    "expected_win_rate_direct_k",
    "direct_coef",
    "rescaled_coef",
    "direct_coef_k",
    "direct_plan",
    "Composition",
    "COMPOSITION_RULES",
    "DirectNotApplicable",
    "composition",
    "direct_kl_coef",
]

BASELINES = ("loo", "none")
# Stores in the direct arm's finite-K expectations: each needs a fixed-point solve (a (K+1)^2 system per Newton
# step); finite_k's stratification keeps 1024 stores' mean KL within 0.2% of 4096's at K = 64.
DIRECT_STORES = 1024
# Each store's solve is a (K+1)^2 system: time grows as K^3 (8 s and 0.4 GB at K = 128), so above this K the plan
# takes the continuum's coefficient, whose gap to the K-aware one shrinks as K grows (tests measure it at this K).
DIRECT_K_EXACT = 128


# ----------------------------------------------------------------------------------------------------------------
# the group estimator


def _procedure(inference) -> InferenceProcedure:
    inf = InferenceProcedure.coerce(inference)
    if inf.kind == "standard":
        return InferenceProcedure("bon", 1)  # the standard win rate is Best-of-1: f(u) = u
    return inf


def _f(u: np.ndarray, inf: InferenceProcedure) -> np.ndarray:
    """f(best) = P(the best of N base samples loses to it): u^N, or 1 - (1 - u)^N for Worst-of-N (via log1p, so
    small u keeps its relative precision)."""
    if inf.kind == "won":
        with np.errstate(divide="ignore"):  # u = 1: log1p(-1) = -inf, f = 1
            return -np.expm1(inf.n * np.log1p(-u))
    return u**inf.n


@lru_cache(maxsize=256)
def _coefficients(n: int, big_n: int) -> dict:
    """Binomial weights over sorted positions i = 1..n (exact integer binomials, then one rounding each)."""
    comb = math.comb
    i = range(1, n + 1)
    c_rho = comb(n - 1, big_n - 1)
    c_loo = comb(n - 1, big_n)
    out = {
        "whole": [comb(k - 1, big_n - 1) / comb(n, big_n) for k in i],
        "own": [comb(k - 1, big_n - 1) / c_rho for k in i],
        # a higher sample k is the max of a subset holding j: the other N-2 come from the k-2 below k, less j
        "above": [comb(k - 2, big_n - 2) / c_rho if big_n >= 2 and k >= 2 else 0.0 for k in i],
        # W_hat_{-j}: a sample below j keeps its rank among the others, one above drops a rank
        "loo_below": [comb(k - 1, big_n - 1) / c_loo if c_loo else math.nan for k in i],
        "loo_above": [comb(k - 2, big_n - 1) / c_loo if c_loo and k >= 2 else 0.0 for k in i],
    }
    return {key: np.asarray(v, dtype=np.float64) for key, v in out.items()}


def _as_numpy(u):
    """(float64 array, back) where back(result) restores a torch tensor's device (float64) or leaves numpy."""
    if hasattr(u, "detach") and hasattr(u, "new_tensor"):  # torch, without importing it (core/ floors)
        t = u.detach()
        dtype = t.double().dtype
        return t.cpu().double().numpy(), lambda x: t.new_tensor(x, dtype=dtype)
    return np.asarray(u, dtype=np.float64), lambda x: x


def _check_values(u: np.ndarray) -> None:
    if u.size and not (np.all(u >= 0.0) and np.all(u <= 1.0)):
        bad = u[~((u >= 0.0) & (u <= 1.0))].flat[0]
        raise ValueError(f"calibrated rewards must lie in [0, 1] (got {bad}): the estimator needs C(x, y), not raw")


def _check_group(n: int, inf: InferenceProcedure, baseline: str) -> None:
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; choose one of {', '.join(BASELINES)}")
    if n < inf.n:
        raise ValueError(f"{inf.spec} needs n >= {inf.n} samples per prompt group, got {n}")
    if baseline == "loo" and n <= inf.n:
        raise ValueError(
            f"the leave-one-out baseline for {inf.spec} needs n > {inf.n} samples per prompt group (an N-subset of the "
            f"other n-1), got n = {n}; raise --rollout.n_samples_per_prompt or use baseline 'none'"
        )


def _sorted_best(u: np.ndarray, inf: InferenceProcedure):
    """Order putting each group's best last (ascending u, or descending for Worst-of-N) and f in that order."""
    order = np.argsort(-u if inf.kind == "won" else u, axis=-1, kind="stable")
    return order, _f(np.take_along_axis(u, order, -1), inf)


def _suffix(x: np.ndarray) -> np.ndarray:
    """sum_{k > i} x_k along the last axis."""
    s = np.cumsum(x[..., ::-1], -1)[..., ::-1]
    return np.concatenate([s[..., 1:], np.zeros_like(s[..., :1])], -1)


def _prefix(x: np.ndarray) -> np.ndarray:
    """sum_{k < i} x_k along the last axis."""
    s = np.cumsum(x, -1)
    return np.concatenate([np.zeros_like(s[..., :1]), s[..., :-1]], -1)


def group_win_rate(u, inference):
    """The unbiased U-statistic of the win rate E_pi[f(best of N u)] per group: u (..., n) calibrated rewards of
    the groups' n >= N samples -> (...,). numpy or torch (float64 on the input's device)."""
    arr, back = _as_numpy(u)
    inf = _procedure(inference)
    _check_values(arr)
    _check_group(arr.shape[-1], inf, "none")
    _, fs = _sorted_best(arr, inf)
    return back(fs @ _coefficients(arr.shape[-1], inf.n)["whole"])


def _rewards(u: np.ndarray, inf: InferenceProcedure, baseline: str) -> np.ndarray:
    n = u.shape[-1]
    _check_group(n, inf, baseline)
    c = _coefficients(n, inf.n)
    order, fs = _sorted_best(u, inf)
    r = c["own"] * fs + _suffix(c["above"] * fs)
    if baseline == "loo":
        r = r - (_prefix(c["loo_below"] * fs) + _suffix(c["loo_above"] * fs))
    out = np.empty_like(r)
    np.put_along_axis(out, order, r, -1)
    return out


def group_rewards(u, inference, baseline: str = "loo"):
    """Per-sample rewards r_j = rho_j - b_j for groups u (..., n) of calibrated rewards (module docstring):
    E[sum_j r_j grad log pi(y_j)] = (n/N) grad W, per group. ``baseline``: ``loo`` (b_j = W_hat of the other n-1
    samples; needs n > N; each group's rewards then sum to 0) or ``none`` (b_j = 0; n >= N). numpy or torch."""
    arr, back = _as_numpy(u)
    inf = _procedure(inference)
    _check_values(arr)
    if arr.ndim == 0:
        raise ValueError("calibrated rewards must have a group axis (..., n)")
    return back(_rewards(arr, inf, baseline))


def group_rewards_ragged(u, sizes, inference, baseline: str = "loo"):
    """group_rewards for consecutive groups of different sizes: u flat (sum sizes,), sizes (G,). Groups of one size
    go through the vectorised path together."""
    arr, back = _as_numpy(u)
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1)
    inf = _procedure(inference)
    if arr.ndim != 1 or sizes.sum() != arr.size or (sizes < 0).any():
        raise ValueError(f"{arr.size} calibrated rewards do not split into groups of sizes summing to {sizes.sum()}")
    _check_values(arr)
    starts = np.cumsum(sizes) - sizes
    out = np.empty_like(arr)
    for n in np.unique(sizes):
        if n == 0:
            continue
        rows = starts[sizes == n][:, None] + np.arange(n)
        try:
            out[rows] = _rewards(arr[rows], inf, baseline)
        except ValueError as e:
            raise ValueError(f"group #{int(np.flatnonzero(sizes == n)[0])}: {e}") from None
    return back(out)


# ----------------------------------------------------------------------------------------------------------------
# what the rewards estimate: H(v) = E[f(best(v, M))]


def _best_last(v: np.ndarray, q: np.ndarray, inf: InferenceProcedure):
    """Values and probabilities reordered so that the best bin is last (Worst-of-N: the lowest value)."""
    return (v[..., ::-1], q[..., ::-1]) if inf.kind == "won" else (v, q)


def _reward_terms(v: np.ndarray, q: np.ndarray, inf: InferenceProcedure):
    """In best-last order: H_j = sum_{m>=j} P(M at or before bin m) (f_m - f_{m+1}) (summation by parts, f_{K+1}=0),
    and the derivative weights e_m = (N-1) Q_m^{N-2} (f_m - f_{m+1}) with dH_j/dq_l = sum_{m >= max(j, l)} e_m."""
    f = _f(v, inf)
    d = f - np.concatenate([f[..., 1:], np.zeros_like(f[..., :1])], -1)
    cq = np.clip(np.cumsum(q, -1), 0.0, 1.0)
    big_n = inf.n
    h = _suffix(cq ** (big_n - 1) * d) + cq ** (big_n - 1) * d
    e = (big_n - 1) * cq ** max(big_n - 2, 0) * d if big_n >= 2 else np.zeros_like(d)
    return h, e


def win_rate_reward(values, q, inference) -> np.ndarray:
    """H_j = E[f(best(v_j, M))], M the best of N-1 draws from a discrete policy q over ascending values v (last
    axis): what rho estimates for a sample of value v_j, the policy-dependent reward the direct objective tilts by."""
    inf = _procedure(inference)
    v, q = np.broadcast_arrays(np.asarray(values, dtype=np.float64), np.asarray(q, dtype=np.float64))
    h, _ = _reward_terms(*_best_last(v, q, inf), inf)
    return h[..., ::-1] if inf.kind == "won" else h


def win_rate_reward_curve(inference, g: np.ndarray, grid=None) -> tuple[np.ndarray, np.ndarray]:
    """(u, H(u)) on theory's grid for a continuum policy of density g: BoN 1 - N int_u^1 v^{N-1} F^{N-1} dv, WoN
    int_0^u N (1-v)^{N-1} (1-F)^{N-1} dv."""
    inf = _procedure(inference)
    gr = as_grid(grid)
    u, n = gr.u, inf.n
    if inf.kind == "won":
        s = np.clip(gr.cumulative_from_right(g), 0.0, 1.0)
        return u, gr.cumulative(n * (1.0 - u) ** (n - 1) * s ** (n - 1))
    f = np.clip(gr.cumulative(g), 0.0, 1.0)
    return u, 1.0 - gr.cumulative_from_right(n * u ** (n - 1) * f ** (n - 1))


# ----------------------------------------------------------------------------------------------------------------
# the direct arm's optimum with K stored rewards


class _DirectObjective:
    """Per store (rows), in best-last order: the objective Phi = W(q) / N - coef KL(q || p) over logits theta, and
    the stationarity residual r = theta - log p - H(softmax theta) / coef (centred: theta is defined up to a
    constant; r = 0 where grad Phi = 0, as dW/dq_j = N H_j)."""

    def __init__(self, log_p: np.ndarray, v: np.ndarray, inf: InferenceProcedure, coef: float):
        self.log_p, self.v, self.inf, self.coef = log_p, v, inf, coef
        self.f = _f(v, inf)
        self.diag = np.arange(log_p.shape[-1])

    def __call__(self, theta: np.ndarray, rows) -> tuple:
        t = theta - theta.max(-1, keepdims=True)
        log_q = t - np.log(np.exp(t).sum(-1, keepdims=True))
        q = np.exp(log_q)
        h, e = _reward_terms(self.v[rows], q, self.inf)
        r = log_q - self.log_p[rows] - h / self.coef
        big_q = np.clip(np.cumsum(q, -1), 0.0, 1.0) ** self.inf.n
        win = (self.f[rows] * np.diff(big_q, axis=-1, prepend=0.0)).sum(-1)
        phi = win / self.inf.n - self.coef * (q * (log_q - self.log_p[rows])).sum(-1)
        return r - r.mean(-1, keepdims=True), q, e, phi

    def newton_step(self, resid, q, e, lam) -> np.ndarray:
        """x solving (J + lam I) x = r, J = dr/dtheta = I - A (diag(q) - q q^T) / coef with A_jl = dH_j/dq_l =
        sum_{m >= max(j, l)} e_m = (U diag(e) U^T)_jl, U_jm = 1{j <= m}. With x = U y the system becomes
        ((1 + lam) I - diag(e / coef) S) y = U^-1 r, S = U^T (diag(q) - q q^T) U: S_ml = min(Q_m, Q_l) - Q_m Q_l
        for the cumulative Q (fewer passes over the (stores, K+1, K+1) array than forming J)."""
        big_q = np.cumsum(q, -1)
        s = np.minimum(big_q[:, :, None], big_q[:, None, :])
        s -= big_q[:, :, None] * big_q[:, None, :]
        s *= -(e / self.coef)[:, :, None]
        s[:, self.diag, self.diag] += 1.0 + lam[:, None]
        rhs = resid - np.concatenate([resid[:, 1:], np.zeros_like(resid[:, :1])], -1)
        y = np.linalg.solve(s, rhs[..., None])[..., 0]
        return _suffix(y) + y


def _solve_direct(obj: _DirectObjective, theta: np.ndarray, tol: float, max_iter: int, lam0: float = 1.0) -> tuple:
    """Levenberg-Marquardt steps (J + lam I) d = -r per store, kept only where they raise Phi: lam -> 0 is Newton
    (quadratic near a fixed point), large lam a short step of the flow theta' = -r, which raises Phi (its slope
    along -r is coef Var_q(r) >= 0). Plain Newton on r stalls where a branch of optima folds, and the plain map
    is stiff. Converges to a local maximum of Phi per store. Returns (theta, the largest residual)."""
    theta = theta.copy()
    resid, q, e, phi = obj(theta, np.arange(len(theta)))
    lam = np.full(len(theta), lam0)  # from the base policy: flow-like first steps, climbing as training does
    for _ in range(max_iter):
        active = np.flatnonzero(np.abs(resid).max(-1) >= tol)
        if not active.size:
            break
        trial = theta[active] - obj.newton_step(resid[active], q[active], e[active], lam[active])
        r_t, q_t, e_t, phi_t = obj(trial, active)
        # Phi's change is second order near the optimum: there, round-off decides, so a lower residual also counts.
        flat = np.abs(phi_t - phi[active]) <= 1e-13 * (1.0 + np.abs(phi[active]))
        ok = (phi_t > phi[active]) | (flat & ((r_t**2).sum(-1) < (resid[active] ** 2).sum(-1)))
        take = active[ok]
        theta[take], resid[take], q[take], e[take], phi[take] = trial[ok], r_t[ok], q_t[ok], e_t[ok], phi_t[ok]
        lam[take] = np.maximum(lam[take] / 4.0, 1e-12)
        lam[active[~ok]] *= 8.0
    return theta, float(np.abs(resid).max())


def bin_optimum_direct(p, inference, coef: float, tol: float = 1e-10, start=None, max_iter: int = 200) -> np.ndarray:
    """The direct arm's fixed point q = normalise(p exp(H_q(j/K) / coef)) per store (bin probabilities p (..., K+1),
    calibrated values j/K): the stationary policy of win rate - N coef KL on the store's bins.

    It climbs Phi = W / N - coef KL from ``start`` (default p: the local maximum that training from the base policy
    climbs to)."""
    inf = _procedure(inference)
    p = np.asarray(p, dtype=np.float64)
    if not (coef > 0) or not math.isfinite(coef):
        raise ValueError(f"coef must be a positive finite number, got {coef}")
    shape = p.shape
    p2 = p.reshape(-1, shape[-1])
    v, p_b = _best_last(np.arange(shape[-1]) / (shape[-1] - 1), p2, inf)
    v = np.broadcast_to(v, p_b.shape)
    log_p = np.log(p_b)
    if start is None:
        theta, lam0 = log_p, 1.0
    else:  # a neighbouring optimum: Newton steps at once
        # Bins that optimum avoids may have underflowed to 0: the smallest normal keeps their logits finite.
        q0 = _best_last(v, np.asarray(start, dtype=np.float64).reshape(p2.shape), inf)[1]
        theta, lam0 = np.log(np.maximum(q0, np.finfo(np.float64).tiny)), 1e-4
    theta, worst = _solve_direct(_DirectObjective(log_p, v, inf, coef), theta, tol, max_iter, lam0)
    if not worst < tol:
        raise RuntimeError(
            f"direct fixed point for {inf.spec} at coef {coef:g} did not converge (residual {worst:.1e})"
        )
    theta = theta - theta.max(-1, keepdims=True)
    q = np.exp(theta)
    q /= q.sum(-1, keepdims=True)
    return (q[..., ::-1] if inf.kind == "won" else q).reshape(shape)


def expected_kl_direct_k(inference, coef: float, k: int, stores: Optional[int] = None) -> float:
    """E over stores (finite_k's stratified stores) of KL(q || p) of the direct arm's bin optimum."""
    p = fk.store_spacings(k, stores or DIRECT_STORES)
    return float(fk.bin_kl(bin_optimum_direct(p, inference, coef), p).mean())


def expected_win_rate_direct_k(inference, coef: float, k: int, stores: Optional[int] = None) -> float:
    """E over stores of the direct arm's bin optimum's win rate against the true continuous base."""
    p = fk.store_spacings(k, stores or DIRECT_STORES)
    return float(fk.bin_win_rate(_procedure(inference), bin_optimum_direct(p, inference, coef), p).mean())


def direct_coef(inference, kl: float, grid=None) -> tuple[float, dict]:
    """(c, info): the KL coefficient on the rewards rho (reward_scale 1) whose optimum sits at KL ``kl`` in the
    continuum: c = beta_w / N = beta * (H(1) - H(0)), from theory's optimal fixed point (info: its beta, kl,
    win_rate, and H(0), H(1) of the optimum)."""
    inf = _procedure(inference)
    tr, info = optimal_transform_for_kl(inf, check_kl(kl), grid=grid)
    gr = as_grid(grid)
    logits = tr.phi(gr.u) / info["beta"]
    g = np.exp(logits - logits.max())
    g /= gr.integral(g)
    _, h = win_rate_reward_curve(inf, g, gr)
    c = info["beta_win_rate_units"] / inf.n
    return c, {**info, "h0": float(h[0]), "h1": float(h[-1]), "coef": c}


def rescaled_coef(plan: dict) -> float:
    """The plan's optimal-row beta (normalised optimal transform) rescaled onto rho: beta * (H(1) - H(0)), H of the
    continuum optimum. Exact in the continuum; with K stored rewards the direct arm's optimum differs from the
    optimal transform's bin optimum (H is the bins' own), so training uses ``direct_coef_k`` instead."""
    _, info = direct_coef(plan["inference"], float(plan["kl"]))
    return plan["optimal"]["beta"] * (info["h1"] - info["h0"])


@lru_cache(maxsize=64)
def direct_coef_k(inference, kl: float, k: Optional[int]) -> float:
    """The coefficient on rho whose direct bin optimum has EXPECTED KL ``kl`` over stores of K rewards (finite_k's
    stratified stores), as finite_k.beta_for_kl_k does for a transform; K None or above DIRECT_K_EXACT: the
    continuum's direct_coef. Brent in log c, bracketed from the continuum's c, each solve warm-started from the
    nearest one."""
    inf = _procedure(inference)
    kl = check_kl(kl)
    c0 = direct_coef(inf, kl)[0]
    if k is None or check_k(k) > DIRECT_K_EXACT:
        return c0
    p = fk.store_spacings(check_k(k), DIRECT_STORES)
    solved: dict = {}
    gaps: dict = {}

    def gap(log_c: float) -> float:
        if log_c not in gaps:
            near = min(solved, key=lambda x: abs(x - log_c)) if solved else None
            q = bin_optimum_direct(p, inf, math.exp(log_c), start=solved.get(near))
            solved[log_c] = q
            gaps[log_c] = math.log(max(float(fk.bin_kl(q, p).mean()), 1e-300)) - math.log(kl)
        return gaps[log_c]

    a, b = math.log(c0) - 0.25, math.log(c0) + 0.25
    while gap(a) < 0:  # KL falls as c grows
        a, b = a - 0.5, a
    while gap(b) > 0:
        a, b = b, b + 0.5
    return math.exp(brentq(gap, a, b, xtol=1e-7, rtol=1e-9))


def direct_plan(inference, kl: float, k: Optional[int] = None) -> dict:
    """The direct arm's row beside a plan's: its coefficient on rho (reward_scale 1), KL and win rate (with K: the
    expectations over stores, the win rate against the true base). With K it is not the plan's optimal row: that
    reads the continuum's optimal shape at the bins, while the direct optimum is each store's own (at K = 16,
    Best-of-4, 0.5 nats it wins 0.844 against the optimal row's 0.826). ``k_aware`` False: K None, or above
    DIRECT_K_EXACT, where the row is the continuum's."""
    inf = _procedure(inference)
    k = check_k(k)
    c = direct_coef_k(inf, check_kl(kl), k)
    if k is None or k > DIRECT_K_EXACT:
        _, info = direct_coef(inf, kl)
        return {"coef": c, "kl": info["kl"], "win_rate": info["win_rate"], "k": k, "k_aware": False}
    p = fk.store_spacings(k, DIRECT_STORES)
    q = bin_optimum_direct(p, inf, c)
    return {
        "coef": c,
        "kl": float(fk.bin_kl(q, p).mean()),
        "win_rate": float(fk.bin_win_rate(inf, q, p).mean()),
        "k": k,
        "k_aware": True,
    }


# ----------------------------------------------------------------------------------------------------------------
# composition with OpenRLHF's advantage estimators (they shape the rewards per group before the k1 KL term)


class DirectNotApplicable(ValueError):
    """This advantage estimator (with this baseline / group size) does not give the direct estimator's gradient."""


@dataclass(frozen=True)
class Composition:
    """What an advantage estimator does to the rewards r: E[its shaped gradient] = reward_scale * E[sum_j r_j grad
    log pi(y_j)] (the KL term is added after it, unscaled), or refused (reward_scale None) with the reason."""

    estimator: str
    reward_scale: Optional[float]
    reason: str

    @property
    def refused(self) -> bool:
        return self.reward_scale is None


# estimator -> (with the loo baseline, with none): the factor, or why it is refused.
COMPOSITION_RULES = {
    "reinforce": ("1 (no shaping)", "1 (no shaping)"),
    "gae": ("1 (the critic's value is a function of the sample's own state: a baseline)", "1 (critic baseline)"),
    "rloo": (
        "n/(n-1): the rewards sum to 0 per group, so r_j - mean_{k!=j} r_k = r_j n/(n-1)",
        "(n-N)/(n-1): r_j - mean_{k!=j} r_k = n/(n-1) (rho_j - W_hat), and W_hat's score term is grad W",
    ),
    "reinforce_baseline": ("1: the group mean is exactly 0", "(n-N)/n: rho_j - W_hat"),
    "dr_grpo": ("1: the group mean is exactly 0", "(n-N)/n: rho_j - W_hat"),
    "flash_reinforce": (
        "1: the rollout-batch mean is exactly 0",
        "refused: the batch mean holds the sample's own group, a factor 1 - N/(n B) that depends on the batch",
    ),
    "group_norm": (
        "refused: dividing by the group's std, a function of every sample, biases the estimator",
        "refused: dividing by the group's std, a function of every sample, biases the estimator",
    ),
}


def composition(estimator: str, n: int, inference, baseline: str = "loo") -> Composition:
    """How OpenRLHF 0.11.2's ``--algo.advantage.estimator`` composes with the direct rewards of groups of n."""
    if estimator not in COMPOSITION_RULES:
        raise ValueError(f"unknown advantage estimator {estimator!r}; choose one of {', '.join(COMPOSITION_RULES)}")
    inf = _procedure(inference)
    _check_group(n, inf, baseline)
    rule = COMPOSITION_RULES[estimator][BASELINES.index(baseline)]
    big_n = inf.n
    scale = {
        ("reinforce", "loo"): 1.0,
        ("reinforce", "none"): 1.0,
        ("gae", "loo"): 1.0,
        ("gae", "none"): 1.0,
        ("rloo", "loo"): n / (n - 1),
        ("rloo", "none"): (n - big_n) / (n - 1),
        ("reinforce_baseline", "loo"): 1.0,
        ("reinforce_baseline", "none"): (n - big_n) / n,
        ("dr_grpo", "loo"): 1.0,
        ("dr_grpo", "none"): (n - big_n) / n,
        ("flash_reinforce", "loo"): 1.0,
    }.get((estimator, baseline))
    if scale is not None and scale <= 0:
        rule = f"refused: with n = N = {n} every sample's reward equals the group's mean, which {estimator} removes"
        scale = None
    return Composition(estimator, scale, f"{estimator} with baseline {baseline}: {rule}")


def direct_kl_coef(plan: dict, estimator: str, n: int, baseline: str = "loo", k: Optional[int] = None) -> float:
    """The direct arm's ``--algo.kl.init_coef`` for a plan (``planning.plan``'s dict: its inference and KL budget; K
    the store's, None for the continuum): direct_coef_k * reward_scale of the estimator. Raises
    DirectNotApplicable when the estimator is refused (``composition``)."""
    comp = composition(estimator, n, plan["inference"], baseline)
    if comp.refused:
        raise DirectNotApplicable(comp.reason)
    return direct_coef_k(plan["inference"], float(plan["kl"]), k) * comp.reward_scale
