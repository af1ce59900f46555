"""Unbiased Best-of-N / Worst-of-N win-rate estimators from samples (InfAlign; the math in docs/architecture.md).

Per prompt we have M policy rewards a_1..a_M and K reference (base policy) rewards b_1..b_K. For N <= min(M, K):

* BoN_N win rate: P(max of N policy rewards > max of N reference rewards), ties counted 1/2, where each side's N
  samples are a uniformly random N-subset of that side's samples. The estimate is the exact average over ALL pairs of
  N-subsets (a U-statistic, hence unbiased for the population BoN_N win rate), computed from order statistics:
  the i-th smallest a (1-based, ties broken by index) is the max of a random N-subset with probability
  w_i = C(i-1, N-1) / C(M, N), and P(max of N reference < v) = C(#{b < v}, N) / C(K, N), so

      BoN_N = sum_i w_i * [C(L_i, N) + C(L_i + E_i, N)] / (2 C(K, N)),   L_i = #{b < a_i},  E_i = #{b == a_i}.

  Ties among the policy samples themselves do not change the value of the max, so breaking them by index is exact.
* WoN_N win rate: P(min of N policy rewards > min of N reference rewards), ties 1/2: the policy WINS when its worst
  of N is BETTER (higher reward) than the reference's worst of N (jailbreak robustness). It is BoN_N on negated
  rewards with the sides swapped, i.e. 1 - BoN_N(-a, -b).
* standard win rate = BoN_1 = WoN_1 = P(a > b) + P(a == b) / 2.

Prompts are averaged with equal weight. The standard error is prompt-level: std of the per-prompt estimates (ddof=1)
/ sqrt(P). It captures both prompt-to-prompt and sampling variance; it is undefined for a single prompt and reported
as 0.0 there. (A bootstrap of max-of-N is biased and never used.)

Binomial ratios are evaluated in log space (log-factorial table) in float64, so N, M, K in the thousands neither
overflow nor lose precision; tests check exactness against brute-force enumeration of all N-subsets.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from scipy.special import gammaln

from openrlhf_infalign.core.calibration import at_precision

__all__ = ["win_rates", "win_rates_dense", "default_ns", "per_prompt_win_rates", "summarize"]

# Elements (prompts x samples) processed at once in the dense path: bounds peak memory for M, K in the thousands.
_CHUNK_ELEMENTS = 1 << 22


def default_ns(m: int, k: int) -> list[int]:
    """Powers of two 1, 2, 4, ... up to min(m, k)."""
    top = min(int(m), int(k))
    if top < 1:
        raise ValueError(f"need at least one sample on each side (M={m}, K={k})")
    return [1 << j for j in range(int(np.log2(top)) + 1) if (1 << j) <= top]


def _check_ns(ns: Iterable[int]) -> list[int]:
    out = []
    for n in ns:
        if isinstance(n, (bool, np.bool_)) or int(n) != n or int(n) < 1:
            raise ValueError(f"N must be a positive integer, got {n!r}")
        if int(n) not in out:
            out.append(int(n))
    if not out:
        raise ValueError("no N given")
    return sorted(out)


def _log_binom_table(n_max: int, n: int) -> np.ndarray:
    """log C(x, n) for x = 0..n_max, -inf where x < n."""
    x = np.arange(n_max + 1, dtype=np.float64)
    out = np.full(n_max + 1, -np.inf)
    ok = x >= n
    out[ok] = gammaln(x[ok] + 1) - gammaln(n + 1) - gammaln(x[ok] - n + 1)
    return out


def _max_weights(m: int, n: int) -> np.ndarray:
    """w_i = C(i-1, n-1) / C(m, n), i = 1..m: P(the i-th smallest of m is the max of a random n-subset)."""
    return np.exp(_log_binom_table(m - 1, n - 1) - _log_binom_table(m, n)[m])


def _below_table(k: int, n: int) -> np.ndarray:
    """T[L] = C(L, n) / C(k, n), L = 0..k: P(max of a random n-subset of k values lies among the L smallest)."""
    return np.exp(_log_binom_table(k, n) - _log_binom_table(k, n)[k])


def _ranks(policy: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row and the i-th smallest policy reward a_(i): L = #{b < a_(i)} and LE = #{b <= a_(i)}, (P, M) int.

    One stable argsort of [a, b] (a first, so on ties a sorts before b) puts the a's in ascending order and, before
    each a, exactly the b's strictly below it: L_i = (position of the i-th a) - (i - 1). Sorting [b, a] instead puts
    the tied b's first and gives LE the same way.
    """
    p, m = policy.shape
    k = reference.shape[1]
    out = []
    for first, second, a_first in ((policy, reference, True), (reference, policy, False)):
        order = np.argsort(np.concatenate([first, second], axis=1), axis=1, kind="stable")
        is_a = order < m if a_first else order >= k
        pos = np.nonzero(is_a)[1].reshape(p, m)  # row-major: each row holds exactly m policy positions, ascending
        out.append(pos - np.arange(m))
    return out[0], out[1]


def _as_2d(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (prompts, samples) array, got shape {arr.shape}")
    if arr.shape[1] < 1:
        raise ValueError(f"{name} has no samples per prompt")
    if np.isnan(arr).any():
        row = int(np.nonzero(np.isnan(arr).any(axis=1))[0][0])
        raise ValueError(f"{name} has a NaN reward (prompt row {row}): a NaN has no order")
    return arr


def per_prompt_win_rates(policy, reference, ns: Sequence[int]) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Per-prompt BoN_N and WoN_N estimates for equal sizes: policy (P, M), reference (P, K).

    Returns ({N: (P,) BoN_N}, {N: (P,) WoN_N}) for every N in ns; every N must be <= min(M, K).
    """
    b_in = np.asarray(reference)
    a = _as_2d(at_precision(policy, b_in.dtype), "policy rewards")
    b = _as_2d(b_in, "reference rewards")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"policy has {a.shape[0]} prompts but reference has {b.shape[0]}")
    if a.shape[0] == 0:
        raise ValueError("no prompts")
    p, m = a.shape
    k = b.shape[1]
    ns = _check_ns(ns)
    if ns[-1] > min(m, k):
        raise ValueError(f"N={ns[-1]} exceeds min(M, K) = min({m}, {k})")
    tables = {n: (_max_weights(m, n), _below_table(k, n)) for n in ns}
    bon = {n: np.empty(p) for n in ns}
    won = {n: np.empty(p) for n in ns}
    step = max(1, _CHUNK_ELEMENTS // (m + k))
    for s in range(0, p, step):
        lt, le = _ranks(a[s : s + step], b[s : s + step])
        # Worst-of-N reuses the same counts: on negated rewards the i-th smallest is a_(M+1-i), with
        # #{-b < -a} = K - LE and #{-b <= -a} = K - L.
        lt_neg, le_neg = k - le[:, ::-1], k - lt[:, ::-1]
        for n, (w, t) in tables.items():
            # Only the top M-N+1 order statistics can be a max of N: skip the zero weights.
            w_n = w[n - 1 :]
            bon[n][s : s + step] = 0.5 * ((t[lt[:, n - 1 :]] + t[le[:, n - 1 :]]) @ w_n)
            won[n][s : s + step] = 1.0 - 0.5 * ((t[lt_neg[:, n - 1 :]] + t[le_neg[:, n - 1 :]]) @ w_n)
    return bon, won


def _stat(values: np.ndarray) -> dict:
    count = int(values.size)
    stderr = float(np.std(values, ddof=1) / np.sqrt(count)) if count > 1 else 0.0
    return {"win_rate": float(np.mean(values)), "stderr": stderr, "num_prompts": count}


def summarize(bon: dict[int, np.ndarray], won: dict[int, np.ndarray], num_prompts: int) -> dict:
    """The public result dict from per-prompt estimates (arrays may cover fewer prompts for larger N)."""
    std = _stat(bon[1]) if 1 in bon else None
    out: dict = {"num_prompts": int(num_prompts)}
    if std is not None:
        out["standard"] = {"win_rate": std["win_rate"], "stderr": std["stderr"]}
    out["bon"] = {str(n): _stat(v) for n, v in sorted(bon.items())}
    out["won"] = {str(n): _stat(v) for n, v in sorted(won.items())}
    return out


def win_rates_dense(policy, reference, ns: Sequence[int]) -> dict:
    """Win rates for equal sizes: policy (P, M) rewards, reference (P, K) rewards (same prompt order), N in ns.

    Returns {"num_prompts": P, "standard": {"win_rate", "stderr"}, "bon": {"N": {"win_rate", "stderr",
    "num_prompts"}}, "won": {...}} with string keys for N. Every N must be <= min(M, K).
    """
    ns = _check_ns(ns)
    bon, won = per_prompt_win_rates(policy, reference, sorted(set(ns) | {1}))
    out = summarize(bon, won, len(bon[1]))
    for key in ("bon", "won"):
        out[key] = {str(n): out[key][str(n)] for n in ns}
    return out


def win_rates(policy_rewards: Sequence, reference_rewards: Sequence, ns: Sequence[int]) -> dict:
    """Win rates with per-prompt sample sizes that may differ (M_p policy, K_p reference rewards for prompt p).

    policy_rewards / reference_rewards: one 1-D array of rewards per prompt, the same prompts in the same order.
    A prompt contributes to N only if N <= min(M_p, K_p) (so each N reports its own num_prompts); the standard win
    rate (N = 1) uses every prompt. Raises ValueError if some N fits no prompt, or a prompt has no samples.
    Output as in `win_rates_dense`.
    """
    if len(policy_rewards) != len(reference_rewards):
        raise ValueError(f"{len(policy_rewards)} policy prompts but {len(reference_rewards)} reference prompts")
    if len(policy_rewards) == 0:
        raise ValueError("no prompts")
    ns = _check_ns(ns)
    # Policy rewards are compared at the precision of their prompt's reference rewards (ties at the store's float32).
    ref = [np.asarray(x).reshape(-1) for x in reference_rewards]
    pol = [at_precision(x, r.dtype).reshape(-1) for x, r in zip(policy_rewards, ref)]
    ref = [r.astype(np.float64) for r in ref]
    m = np.fromiter((x.size for x in pol), dtype=np.int64, count=len(pol))
    k = np.fromiter((x.size for x in ref), dtype=np.int64, count=len(ref))
    for name, sizes in (("policy", m), ("reference", k)):
        if (sizes == 0).any():
            raise ValueError(f"prompt #{int(np.argmin(sizes))} has no {name} rewards")
    fits = np.minimum(m, k)
    too_big = [n for n in ns if n > fits.max()]
    if too_big:
        raise ValueError(
            f"N={too_big} fits no prompt: the largest min(M, K) over prompts is {int(fits.max())}; pick smaller N"
        )
    all_ns = sorted(set(ns) | {1})
    bon = {n: np.full(len(pol), np.nan) for n in all_ns}
    won = {n: np.full(len(pol), np.nan) for n in all_ns}
    # Prompts with the same (M, K) go through the vectorised path together.
    shapes, group = np.unique(np.stack([m, k], axis=1), axis=0, return_inverse=True)
    group = group.reshape(-1)
    for g, (mg, kg) in enumerate(shapes):
        idx = np.flatnonzero(group == g)
        n_fit = [n for n in all_ns if n <= min(mg, kg)]
        b_g, w_g = per_prompt_win_rates(np.stack([pol[i] for i in idx]), np.stack([ref[i] for i in idx]), n_fit)
        for n in n_fit:
            bon[n][idx] = b_g[n]
            won[n][idx] = w_g[n]
    bon = {n: v[~np.isnan(v)] for n, v in bon.items()}
    won = {n: v[~np.isnan(v)] for n, v in won.items()}
    out = summarize(bon, won, len(pol))
    for key in ("bon", "won"):
        out[key] = {str(n): out[key][str(n)] for n in ns}
    return out
