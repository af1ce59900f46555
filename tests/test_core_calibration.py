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


# Eight 0.1 and eight 0.7 in one float32 row: 0.1 ties with half its row's mass below, 0.7 the same above.
TIED_ROW = np.array([0.1] * 8 + [0.7] * 8, dtype=np.float32)


@pytest.mark.parametrize(
    "rewards",
    [
        [0.1, 0.7],  # Python floats
        np.array([0.1, 0.7], dtype=np.float64),
        np.array([0.1, 0.7], dtype=np.float32),
    ],
    ids=["python", "float64", "float32"],
)
def test_ties_are_exact_at_the_store_precision(rewards):
    # The store keeps float32; a float64 0.1 must tie with a stored 0.1, not rank above it (was [0.0, 1.0]).
    offsets = np.array([0, TIED_ROW.size])
    got = calibrated_reward(rewards, TIED_ROW, offsets, np.array([0, 0]))
    assert got.tolist() == [0.25, 0.75]
    assert calibrate(rewards, [TIED_ROW, TIED_ROW]).tolist() == [0.25, 0.75]


def test_bfloat16_rewards_tie_with_the_same_value_at_every_precision():
    torch = pytest.importorskip("torch")
    # A bfloat16 reward model: calibrate stored its rewards upcast to float32; training sees them as bf16 tensors,
    # float32 or float64 arrays, or Python floats. All are one number, so one calibrated value.
    bf = torch.tensor([0.1, 0.7], dtype=torch.bfloat16)
    row = np.repeat(bf.float().numpy(), 8).astype(np.float32)
    offsets = np.array([0, row.size])
    forms = [bf.float().numpy(), bf.double().numpy(), bf.tolist(), bf.float().numpy().astype(np.float64)]
    got = [calibrated_reward(f, row, offsets, np.array([0, 0])).tolist() for f in forms]
    assert got == [[0.25, 0.75]] * len(forms)
    # and against the plain float32 store of 0.1 / 0.7, 0.1 at every float precision ties
    wide = [np.float64(0.1), np.float32(0.1), 0.1]
    assert {calibrated_reward([w], TIED_ROW, [0, 16], [0])[0] for w in wide} == {0.25}


def test_store_lookup_compares_at_float32(tmp_path):
    from openrlhf_infalign.store import ReferenceStore, prompt_key, write_store

    write_store(tmp_path / "s", [prompt_key("p")], [TIED_ROW])
    store = ReferenceStore.open(tmp_path / "s")
    for r in ([0.1, 0.7], np.array([0.1, 0.7]), np.array([0.1, 0.7], dtype=np.float32)):
        assert store.calibrate_prompts(["p", "p"], r).tolist() == [0.25, 0.75]


def test_rewards_beyond_float32_range_rank_at_the_ends():
    got = calibrated_reward([1e300, -1e300, 0.4], TIED_ROW, [0, 16], [0, 0, 0])
    assert got.tolist() == [1.0, 0.0, 0.5]
