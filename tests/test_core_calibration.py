"""The mid-rank calibrated reward (paper's Eq. 12) against brute force, ties and K = 1 included."""

import numpy as np
import pytest

from openrlhf_infalign.core.calibration import calibrate, calibrated_reward, ragged_from_lists


def _brute(r, refs):
    refs = np.asarray(refs, dtype=np.float64)
    return (np.sum(r > refs) + 0.5 * np.sum(r == refs)) / len(refs)


def test_matches_mid_rank_formula_with_ties_and_ragged_k():
    rng = np.random.default_rng(0)
    refs = [rng.integers(0, 6, rng.integers(1, 40)).astype(np.float32) for _ in range(500)]
    rewards = rng.integers(-1, 7, 500).astype(np.float64)
    got = calibrate(rewards, refs)
    want = np.array([_brute(r, b) for r, b in zip(rewards, refs)])
    np.testing.assert_array_equal(got, want)


def test_k_equals_one():
    assert calibrate([0.0, 1.0, 2.0], [[1.0], [1.0], [1.0]]).tolist() == [0.0, 0.5, 1.0]


def test_many_samples_share_a_row_and_rows_are_looked_up():
    values, offsets = ragged_from_lists([[3.0, 1.0, 2.0], [10.0, 20.0]])
    rows = np.array([1, 0, 1, 0, 0])
    rewards = np.array([15.0, 2.0, 25.0, 0.0, 3.0])
    got = calibrated_reward(rewards, values, offsets, rows)
    np.testing.assert_array_equal(got, [0.5, 0.5, 1.0, 0.0, 5 / 6])


def test_invariant_to_increasing_transform_of_the_reward():
    rng = np.random.default_rng(1)
    refs = [rng.normal(size=rng.integers(1, 30)) for _ in range(200)]
    rewards = rng.normal(size=200)
    base = calibrate(rewards, refs)
    np.testing.assert_array_equal(base, calibrate(np.exp(3 * rewards), [np.exp(3 * b) for b in refs]))


def test_float32_store_ties_are_exact():
    # A training reward equal to a stored float32 reward must count as a tie, not a win or loss.
    refs = [np.array([0.1, 0.2, 0.3], dtype=np.float32)]
    assert calibrate([np.float32(0.2)], refs)[0] == 0.5


def test_nan_and_empty_rows_are_errors():
    with pytest.raises(ValueError, match="NaN"):
        calibrate([float("nan")], [[1.0]])
    values, offsets = ragged_from_lists([[1.0], []])
    with pytest.raises(ValueError, match="K = 0"):
        calibrated_reward(np.array([1.0]), values, offsets, np.array([1]))
