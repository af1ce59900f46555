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

from openrlhf_infalign.core.calibration import _segment_counts, at_precision

__all__ = ["win_rates", "win_rates_dense", "default_ns", "per_prompt_win_rates", "summarize"]

# Elements (prompts x samples) processed at once in the dense path: bounds peak memory for M, K in the thousands.
_CHUNK_ELEMENTS = 1 << 22
# Largest pair table (M * (K+1) * number of N) for the all-N-at-once path; beyond it, one gather pass per N.
_TABLE_ENTRIES = 1 << 20
# Elements per chunk there: small enough that a chunk's temporaries stay in cache.
_TABLE_CHUNK_ELEMENTS = 1 << 16
# Steps a tie is walked one equal neighbour at a time before binary search takes over (heavily tied rewards).
_TIE_WALK = 4


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


def _merged(policy: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """L = #{b < a_(i)} and LE = #{b <= a_(i)} for each row's i-th smallest policy reward, (P, M) int, by one merge,
    and the flat indices of the a's that tie with a b (where L < LE).

    One unstable (SIMD) argsort of [a, b] per row gives the merged order. The a's places in it, in order, are the
    a's in ascending order (ties among a's broken arbitrarily, which no result depends on), and the b's before the
    i-th of them are its place minus i: L = LE = that count wherever the a equals no b. An a that equals a b sits
    next to an equal b in the sorted b's at that count; for those few the equal b's on either side are counted.
    """
    p, m = policy.shape
    k = reference.shape[1]
    width = m + k
    order = np.argsort(np.concatenate([policy, reference], axis=1), axis=1)
    places = np.flatnonzero(order < m)  # flat places of the a's, ascending: exactly m per row
    lt = places.reshape(p, m) - (np.arange(p) * width)[:, None] - np.arange(m)[None, :]
    sa = np.sort(policy, axis=1).reshape(-1)
    # Sorted b's with a NaN at either end of every row: NaN equals no reward, so neighbours need no bounds checks.
    sb = np.full((p, k + 2), np.nan)
    sb[:, 1:-1] = np.sort(reference, axis=1)
    sb = sb.reshape(-1)
    at = (lt + (np.arange(p) * (k + 2) + 1)[:, None]).reshape(-1)  # flat index in sb of the first b after the a
    cand = np.flatnonzero((sb[at - 1] == sa) | (sb[at] == sa))
    if not cand.size:
        return lt, lt, cand
    le = lt.copy()
    x, at = sa[cand], at[cand]
    lt.reshape(-1)[cand] -= _equal_run(sb, at - 1, x, -1, k)
    le.reshape(-1)[cand] += _equal_run(sb, at, x, +1, k)
    return lt, le, cand


def _equal_run(sb: np.ndarray, start: np.ndarray, x: np.ndarray, step: int, k: int) -> np.ndarray:
    """How many values equal x lie at start, start + step, ... in sb (rows of K sorted values between NaN ends).
    Tie runs are short: walked a few at a time; long ones (heavily tied rewards) finish by binary search."""
    count = np.zeros(x.size, dtype=np.int64)
    todo = np.arange(x.size)
    for _ in range(_TIE_WALK):
        todo = todo[sb[start[todo] + step * count[todo]] == x[todo]]
        if not todo.size:
            return count
        count[todo] += 1
    lo = start[todo] // (k + 2) * (k + 2) + 1
    edge = lo + _segment_counts(sb, lo, lo + k, x[todo], strict=step < 0)  # first index past the run's far end
    count[todo] = (start[todo] - edge + 1) if step < 0 else (edge - start[todo])
    return count


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


def _checked_pair(policy, reference, ns) -> tuple[np.ndarray, np.ndarray, list[int]]:
    b_in = np.asarray(reference)
    a = _as_2d(at_precision(policy, b_in.dtype), "policy rewards")
    b = _as_2d(b_in, "reference rewards")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"policy has {a.shape[0]} prompts but reference has {b.shape[0]}")
    if a.shape[0] == 0:
        raise ValueError("no prompts")
    ns = _check_ns(ns)
    if ns[-1] > min(a.shape[1], b.shape[1]):
        raise ValueError(f"N={ns[-1]} exceeds min(M, K) = min({a.shape[1]}, {b.shape[1]})")
    return a, b, ns


def _per_prompt_matrix(a: np.ndarray, b: np.ndarray, ns: list[int]) -> np.ndarray:
    """(P, 2*len(ns)) per-prompt estimates: Best-of-N win rates for ns, then Worst-of-N LOSSES (1 - win rate)."""
    p, m = a.shape
    k = b.shape[1]
    if m * (k + 1) * len(ns) <= _TABLE_ENTRIES:
        return _by_table(a, b, ns)
    # M, K in the thousands: the pair table would be large; one gather pass per N instead.
    tables = {n: (_max_weights(m, n), _below_table(k, n)) for n in ns}
    out = np.empty((p, 2 * len(ns)))
    step = max(1, _CHUNK_ELEMENTS // (m + k))
    for s in range(0, p, step):
        lt, le, _ = _merged(a[s : s + step], b[s : s + step])
        # Worst-of-N reuses the same counts: on negated rewards the i-th smallest is a_(M+1-i), with
        # #{-b < -a} = K - LE and #{-b <= -a} = K - L.
        lt_neg, le_neg = k - le[:, ::-1], k - lt[:, ::-1]
        for c, (n, (w, t)) in enumerate(tables.items()):
            # Only the top M-N+1 order statistics can be a max of N: skip the zero weights.
            w_n = w[n - 1 :]
            out[s : s + step, c] = 0.5 * ((t[lt[:, n - 1 :]] + t[le[:, n - 1 :]]) @ w_n)
            out[s : s + step, len(ns) + c] = 0.5 * ((t[lt_neg[:, n - 1 :]] + t[le_neg[:, n - 1 :]]) @ w_n)
    return out


def per_prompt_win_rates(policy, reference, ns: Sequence[int]) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Per-prompt BoN_N and WoN_N estimates for equal sizes: policy (P, M), reference (P, K).

    Returns ({N: (P,) BoN_N}, {N: (P,) WoN_N}) for every N in ns; every N must be <= min(M, K).
    """
    a, b, ns = _checked_pair(policy, reference, ns)
    t = _per_prompt_matrix(a, b, ns).T
    return {n: t[c].copy() for c, n in enumerate(ns)}, {n: 1.0 - t[len(ns) + c] for c, n in enumerate(ns)}


def _pair_table(m: int, k: int, ns: list[int]) -> np.ndarray:
    """(M*(K+1), 2*len(ns)): row i*(K+1)+L holds, per N, w_i * C(L, N)/C(K, N) (Best-of-N) and
    w_{M-1-i} * C(K-L, N)/C(K, N) (the Worst-of-N loss), with w_i = C(i, N-1)/C(M, N) for the 0-based i-th smallest."""
    table = np.zeros((m, k + 1, 2 * len(ns)))
    for c, n in enumerate(ns):
        log_w = _log_binom_table(m - 1, n - 1) - _log_binom_table(m, n)[m]
        log_t = _log_binom_table(k, n) - _log_binom_table(k, n)[k]
        table[:, :, c] = np.exp(log_w[:, None] + log_t[None, :])
        table[:, :, len(ns) + c] = np.exp(log_w[::-1, None] + log_t[None, ::-1])
    return table.reshape(m * (k + 1), 2 * len(ns))


def _by_table(a: np.ndarray, b: np.ndarray, ns: list[int]) -> np.ndarray:
    """Every N at once (layout of _per_prompt_matrix). Each prompt's value is a sum over its M pairs (i, L_i) and
    (i, LE_i) of pair-table rows: a sparse (prompts x M(K+1)) matrix with one entry per policy reward (halves where it
    ties with reference rewards, plus a second half-entry for those) times the small dense table."""
    from scipy.sparse import csr_matrix

    p, m = a.shape
    k = b.shape[1]
    table = _pair_table(m, k, ns)
    out = np.empty((p, 2 * len(ns)))
    step = max(1, _TABLE_CHUNK_ELEMENTS // (m + k))
    base = (np.arange(m, dtype=np.int32) * (k + 1))[None, :]
    for s in range(0, p, step):
        lt, le, tied = _merged(a[s : s + step], b[s : s + step])
        rows = lt.shape[0]
        cols = (base + lt).reshape(-1)
        weight = np.ones(lt.size)
        indptr = np.arange(0, rows * m + 1, m, dtype=np.int32)
        if tied.size:
            # Each row's M entries, then one more half-entry at (i, LE_i) per tied a of that row.
            weight[tied] = 0.5
            extra = np.searchsorted(tied, indptr)  # tied a's in the rows before
            pos = np.arange(lt.size) + np.repeat(extra[:-1], m)
            tie_pos = (tied // m + 1) * m + np.arange(tied.size)
            indptr = indptr + extra
            all_cols = np.empty(lt.size + tied.size, dtype=np.int32)
            all_w = np.empty(lt.size + tied.size)
            all_cols[pos], all_w[pos] = cols, weight
            all_cols[tie_pos], all_w[tie_pos] = (base + le).reshape(-1)[tied], 0.5
            cols, weight = all_cols, all_w
        out[s : s + rows] = csr_matrix((weight, cols, indptr), shape=(rows, m * (k + 1))) @ table
    return out


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


def _summarize_matrix(mat: np.ndarray, all_ns: list[int], ns: list[int]) -> dict:
    """The result dict straight from _per_prompt_matrix (every prompt counts for every N; mat is used up): column
    means and standard deviations; the Worst-of-N columns hold losses, so their mean is 1 minus it."""
    p = mat.shape[0]
    # Sums of deviations from a first estimate of each mean: two fast passes, no cancellation to speak of.
    mat -= (shift := mat[:1024].mean(axis=0))
    total = mat.sum(axis=0)
    mean = shift + total / p
    if p > 1:
        var = np.maximum(np.einsum("ij,ij->j", mat, mat) - total * total / p, 0.0) / (p - 1)
        se = np.sqrt(var / p)
    else:
        se = np.zeros(mat.shape[1])
    col = {n: c for c, n in enumerate(all_ns)}

    def stat(c: int, loss: bool) -> dict:
        return {"win_rate": float(1.0 - mean[c] if loss else mean[c]), "stderr": float(se[c]), "num_prompts": p}

    out: dict = {"num_prompts": p}
    one = stat(col[1], False)
    out["standard"] = {"win_rate": one["win_rate"], "stderr": one["stderr"]}
    out["bon"] = {str(n): stat(col[n], False) for n in ns}
    out["won"] = {str(n): stat(len(all_ns) + col[n], True) for n in ns}
    return out


def win_rates_dense(policy, reference, ns: Sequence[int]) -> dict:
    """Win rates for equal sizes: policy (P, M) rewards, reference (P, K) rewards (same prompt order), N in ns.

    Returns {"num_prompts": P, "standard": {"win_rate", "stderr"}, "bon": {"N": {"win_rate", "stderr",
    "num_prompts"}}, "won": {...}} with string keys for N. Every N must be <= min(M, K).
    """
    a, b, ns = _checked_pair(policy, reference, ns)
    all_ns = sorted(set(ns) | {1})
    return _summarize_matrix(_per_prompt_matrix(a, b, all_ns), all_ns, ns)


def _ragged(rows: Sequence, name: str, dtypes: bool = False) -> tuple[np.ndarray, np.ndarray, set]:
    """(all values concatenated, per-prompt sizes, the rows' dtypes if asked) of one side, one prompt per row."""
    try:  # 1-D rows (arrays or lists): no Python work per row beyond len and dtype
        sizes = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        values = np.concatenate(rows)
        ok = values.ndim == 1 and values.size == sizes.sum()
    except (TypeError, ValueError):
        ok = False
    if not ok:
        rows = [np.asarray(x).reshape(-1) for x in rows]
        sizes = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        values = np.concatenate(rows)
    if (sizes == 0).any():
        raise ValueError(f"prompt #{int(np.argmin(sizes))} has no {name} rewards")
    found = (
        {np.dtype(np.float64) if d is None else d for d in {getattr(x, "dtype", None) for x in rows}}
        if dtypes
        else set()
    )
    return values.astype(np.float64, copy=False), sizes, found


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
    pol_all, m, _ = _ragged(policy_rewards, "policy")
    ref_all, k, ref_dtypes = _ragged(reference_rewards, "reference", dtypes=True)
    fits = np.minimum(m, k)
    too_big = [n for n in ns if n > fits.max()]
    if too_big:
        raise ValueError(
            f"N={too_big} fits no prompt: the largest min(M, K) over prompts is {int(fits.max())}; pick smaller N"
        )
    all_ns = sorted(set(ns) | {1})
    # Policy rewards are compared at the precision of their prompt's reference rewards (ties at the store's float32).
    if len(ref_dtypes) == 1:
        pol_all = at_precision(pol_all, ref_dtypes.pop())
    else:
        ref_dtype = np.array([np.asarray(x).dtype.char for x in reference_rewards])
        for char in np.unique(ref_dtype):
            sel = np.repeat(ref_dtype == char, m)
            pol_all[sel] = at_precision(pol_all[sel], np.dtype(char))
    m_off = np.concatenate([[0], np.cumsum(m)])
    k_off = np.concatenate([[0], np.cumsum(k)])
    p = m.size
    if (m == m[0]).all() and (k == k[0]).all():  # one shape: the dense path on the same arrays
        a, b, _ = _checked_pair(pol_all.reshape(p, -1), ref_all.reshape(p, -1), all_ns)
        return _summarize_matrix(_per_prompt_matrix(a, b, all_ns), all_ns, ns)
    # Prompts with the same (M, K) go through the vectorised path together.
    shapes, group = np.unique(np.stack([m, k], axis=1), axis=0, return_inverse=True)
    group = group.reshape(-1)

    def block(idx: np.ndarray, size: int, values: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        return values[offsets[idx][:, None] + np.arange(size)[None, :]]

    bon = {n: np.full(p, np.nan) for n in all_ns}
    won = {n: np.full(p, np.nan) for n in all_ns}
    for g, (mg, kg) in enumerate(shapes):
        idx = np.flatnonzero(group == g)
        n_fit = [n for n in all_ns if n <= min(mg, kg)]
        a, b = block(idx, int(mg), pol_all, m_off), block(idx, int(kg), ref_all, k_off)
        b_g, w_g = per_prompt_win_rates(a, b, n_fit)
        for n in n_fit:
            bon[n][idx] = b_g[n]
            won[n][idx] = w_g[n]
    bon = {n: v[~np.isnan(v)] for n, v in bon.items()}
    won = {n: v[~np.isnan(v)] for n, v in won.items()}
    out = summarize(bon, won, p)
    for key in ("bon", "won"):
        out[key] = {str(n): out[key][str(n)] for n in ns}
    return out
