"""Calibrated reward (InfAlign, Eq. 12): the mid-rank quantile of a reward among the base policy's rewards.

C(x, y) = (1/K) * sum_k [ 1{r(x,y) > r(x,z_k)} + 0.5 * 1{r(x,y) == r(x,z_k)} ],  z_k ~ pi_ref(.|x).

Reference rewards are held as one ragged (CSR) array: ``ref_values[ref_offsets[p]:ref_offsets[p+1]]`` are the
ascending rewards of prompt row ``p``. Lookups are a vectorised binary search over those segments, so a batch of
any size costs ~log2(K) numpy passes and no Python loop per sample.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["at_precision", "calibrated_reward", "calibrate", "ragged_from_lists"]


def _segment_counts(values: np.ndarray, lo: np.ndarray, hi: np.ndarray, x: np.ndarray, strict: bool) -> np.ndarray:
    """Per query i: #{v in values[lo_i:hi_i] : v < x_i} (strict) or v <= x_i, for ascending segments."""
    left, right = lo.copy(), hi.copy()
    last = max(len(values) - 1, 0)
    # Fixed iteration count = ceil(log2(max K)) + 1 keeps every step a whole-batch numpy pass.
    steps = int(np.ceil(np.log2(max(int((hi - lo).max(initial=1)), 1) + 1))) + 1
    for _ in range(steps):
        active = left < right
        mid = (left + right) >> 1
        v = values[np.minimum(mid, last)]
        below = (v < x) if strict else (v <= x)
        go_right = active & below
        left = np.where(go_right, mid + 1, left)
        right = np.where(active & ~below, mid, right)
    return left - lo


def at_precision(rewards: np.ndarray, dtype) -> np.ndarray:
    """Rewards rounded to the reference rewards' float dtype (the store's float32), as float64 for the arithmetic.

    A float64 reward of 0.1 must tie with a stored float32 0.1; float32 holds every bfloat16/float16 value exactly,
    so the same reward given as a Python float, float64, float32 or bfloat16 value compares the same way. Used by
    calibration and by the win-rate estimators, so training, `infalign score`, evaluate and the eval hook agree.
    """
    r = np.asarray(rewards, dtype=np.float64)
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.floating) and dtype.itemsize < 8:
        with np.errstate(over="ignore"):  # beyond float32's range rounds to +-inf: still above/below every value
            r = r.astype(dtype).astype(np.float64)
    return r


def calibrated_reward(
    rewards: np.ndarray, ref_values: np.ndarray, ref_offsets: np.ndarray, rows: np.ndarray
) -> np.ndarray:
    """Mid-rank calibrated reward in [0, 1] (float64) of each reward against its prompt's reference rewards.

    rewards: (B,) rewards of the policy samples. rows: (B,) int, the reference row (prompt) of each sample.
    ref_values: ascending within each row; ref_offsets: (P+1,) CSR offsets. Every used row must have K >= 1.
    Rewards are compared at ref_values' precision (rounded to its dtype, e.g. the store's float32), so the same
    reward given as a Python float, float64, float32 or bfloat16-representable value has one calibrated value.
    NaN rewards are rejected: they have no rank.
    """
    r = np.asarray(rewards, dtype=np.float64).reshape(-1)
    rows = np.asarray(rows, dtype=np.int64).reshape(-1)
    if r.shape != rows.shape:
        raise ValueError(f"rewards ({r.shape[0]}) and rows ({rows.shape[0]}) differ in length")
    if r.size == 0:
        return np.zeros(0, dtype=np.float64)
    bad = np.flatnonzero(np.isnan(r))
    if bad.size:
        raise ValueError(f"reward is NaN at batch position(s) {bad[:5].tolist()}: a NaN reward has no calibrated rank")
    offsets = np.asarray(ref_offsets, dtype=np.int64)
    lo, hi = offsets[rows], offsets[rows + 1]
    k = hi - lo
    if (k <= 0).any():
        empty = rows[k <= 0][:5].tolist()
        raise ValueError(f"reference row(s) {empty} have no reference rewards (K = 0); rebuild the reference store")
    # The store itself is never upcast (a 512 MB temporary at 1M x 64); the rewards are rounded to its precision.
    values = np.asarray(ref_values)
    if np.issubdtype(values.dtype, np.floating) and values.dtype.itemsize < 8:
        r = at_precision(r, values.dtype).astype(values.dtype)
    n_less = _segment_counts(values, lo, hi, r, strict=True)
    n_less_equal = _segment_counts(values, lo, hi, r, strict=False)
    return (n_less + 0.5 * (n_less_equal - n_less)) / k


def ragged_from_lists(reference_rewards: Sequence[Sequence[float]], dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) CSR arrays with every row sorted ascending."""
    lengths = np.fromiter((len(b) for b in reference_rewards), dtype=np.int64, count=len(reference_rewards))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.empty(int(offsets[-1]), dtype=dtype)
    for i, b in enumerate(reference_rewards):
        values[offsets[i] : offsets[i + 1]] = np.sort(np.asarray(b, dtype=dtype))
    return values, offsets


def calibrate(rewards: Sequence[float], reference_rewards: Sequence[Sequence[float]]) -> np.ndarray:
    """Convenience form: rewards[i] calibrated against the list reference_rewards[i].

    Compared at the lists' precision: float32 arrays behave as a float32 store, Python floats as float64.
    """
    rows = [np.asarray(b) for b in reference_rewards]
    values, offsets = ragged_from_lists(rows, dtype=np.result_type(np.float32, *{b.dtype for b in rows}))
    return calibrated_reward(np.asarray(rewards, dtype=np.float64), values, offsets, np.arange(len(reference_rewards)))
