"""The Best-of-N / Worst-of-N win-rate estimators are exact U-statistics: checked against brute-force enumeration."""

import itertools

import numpy as np
import pytest

from openrlhf_infalign.core.winrate import default_ns, per_prompt_win_rates, win_rates, win_rates_dense


def brute_force(a, b, n, worst=False):
    """Average over every pair of N-subsets of P(best/worst of policy beats best/worst of reference), ties 1/2."""
    pick = min if worst else max
    total, count = 0.0, 0
    for s in itertools.combinations(a, n):
        for t in itertools.combinations(b, n):
            x, y = pick(s), pick(t)
            total += 1.0 if x > y else 0.5 if x == y else 0.0
            count += 1
    return total / count


def test_exact_against_brute_force_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(150):
        m, k = rng.integers(1, 8, size=2)
        # Few distinct integer values: many ties within each side and across sides.
        a = rng.integers(0, 4, size=m).astype(float)
        b = rng.integers(0, 4, size=k).astype(float)
        ns = list(range(1, min(m, k) + 1))
        bon, won = per_prompt_win_rates(a[None], b[None], ns)
        for n in ns:
            assert bon[n][0] == pytest.approx(brute_force(a, b, n), abs=1e-12), (a, b, n)
            assert won[n][0] == pytest.approx(brute_force(a, b, n, worst=True), abs=1e-12), (a, b, n)


def test_ragged_matches_brute_force_and_counts_prompts_per_n():
    rng = np.random.default_rng(1)
    pol, ref = [], []
    for _ in range(25):
        m, k = rng.integers(1, 7, size=2)
        pol.append(rng.integers(-2, 3, size=m).astype(float))
        ref.append(rng.integers(-2, 3, size=k).astype(float))
    top = max(min(len(a), len(b)) for a, b in zip(pol, ref))
    ns = list(range(1, top + 1))
    out = win_rates(pol, ref, ns)
    assert out["num_prompts"] == 25
    for n in ns:
        fit = [(a, b) for a, b in zip(pol, ref) if n <= min(len(a), len(b))]
        for key, worst in (("bon", False), ("won", True)):
            exact = [brute_force(a, b, n, worst) for a, b in fit]
            got = out[key][str(n)]
            assert got["num_prompts"] == len(fit)
            assert got["win_rate"] == pytest.approx(np.mean(exact), abs=1e-12)
            want_se = np.std(exact, ddof=1) / np.sqrt(len(exact)) if len(exact) > 1 else 0.0
            assert got["stderr"] == pytest.approx(want_se, abs=1e-12)
    assert out["standard"]["win_rate"] == out["bon"]["1"]["win_rate"] == pytest.approx(out["won"]["1"]["win_rate"])


def test_standard_is_pairwise_comparison():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 6, size=(40, 5)).astype(float)
    b = rng.integers(0, 6, size=(40, 9)).astype(float)
    cmp = (a[:, :, None] > b[:, None, :]) + 0.5 * (a[:, :, None] == b[:, None, :])
    per_prompt = cmp.mean(axis=(1, 2))
    out = win_rates_dense(a, b, [1, 2])
    assert out["standard"]["win_rate"] == pytest.approx(per_prompt.mean(), abs=1e-12)
    assert out["standard"]["stderr"] == pytest.approx(per_prompt.std(ddof=1) / np.sqrt(40), abs=1e-12)


def test_swapping_sides_gives_complement_and_identical_sides_give_half():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 5, size=(30, 8)).astype(float)
    b = rng.integers(0, 5, size=(30, 8)).astype(float)
    ns = [1, 2, 3, 5, 8]
    ab_bon, ab_won = per_prompt_win_rates(a, b, ns)
    ba_bon, ba_won = per_prompt_win_rates(b, a, ns)
    same_bon, same_won = per_prompt_win_rates(a, a.copy(), ns)
    for n in ns:
        np.testing.assert_allclose(ab_bon[n] + ba_bon[n], 1.0, atol=1e-12)
        np.testing.assert_allclose(ab_won[n] + ba_won[n], 1.0, atol=1e-12)
        # The same samples on both sides: exactly 0.5 by symmetry, whatever the ties.
        np.testing.assert_allclose(same_bon[n], 0.5, atol=1e-12)
        np.testing.assert_allclose(same_won[n], 0.5, atol=1e-12)


def test_same_distribution_is_consistent_with_half():
    rng = np.random.default_rng(4)
    out = win_rates_dense(rng.normal(size=(3000, 16)), rng.normal(size=(3000, 16)), default_ns(16, 16))
    for key in ("bon", "won"):
        for n, r in out[key].items():
            assert abs(r["win_rate"] - 0.5) < 4 * r["stderr"], (key, n, r)
            assert 0 < r["stderr"] < 0.02


def test_unbiased_for_a_known_population_win_rate():
    # Policy rewards with CDF G(u) = u^c against Uniform[0,1] reference rewards:
    # BoN_N = 1 - N * int u^(N-1) u^(cN) du = c / (1 + c) for every N (the BoN formula of docs/architecture.md).
    rng = np.random.default_rng(5)
    c = 2.0
    policy = rng.uniform(size=(4000, 8)) ** (1 / c)
    reference = rng.uniform(size=(4000, 8))
    out = win_rates_dense(policy, reference, [1, 2, 4, 8])
    for n, r in out["bon"].items():
        assert abs(r["win_rate"] - c / (1 + c)) < 4 * r["stderr"], (n, r)


def test_dominating_policy_wins_every_n():
    rng = np.random.default_rng(6)
    reference = rng.normal(size=(20, 6))
    policy = reference.max() + 1 + rng.uniform(size=(20, 4))
    out = win_rates_dense(policy, reference, [1, 2, 3, 4])
    for key in ("bon", "won"):
        for r in out[key].values():
            assert r["win_rate"] == pytest.approx(1.0, abs=1e-12) and r["stderr"] == pytest.approx(0.0, abs=1e-12)
    assert win_rates_dense(reference[:, :4] - 100, reference, [4])["bon"]["4"]["win_rate"] == pytest.approx(0.0)


def test_large_n_no_overflow():
    rng = np.random.default_rng(7)
    a = rng.integers(0, 50, size=(3, 1024)).astype(float)
    b = rng.integers(0, 50, size=(3, 1024)).astype(float)
    ns = [1, 2, 64, 512, 1023, 1024]
    bon, won = per_prompt_win_rates(a, b, ns)
    for n in ns:
        assert np.isfinite(bon[n]).all() and np.isfinite(won[n]).all()
        assert ((bon[n] >= 0) & (bon[n] <= 1)).all()
    # N = M = K: the only subsets are the whole sides.
    want = (a.max(1) > b.max(1)) + 0.5 * (a.max(1) == b.max(1))
    np.testing.assert_allclose(bon[1024], want, atol=1e-12)
    want = (a.min(1) > b.min(1)) + 0.5 * (a.min(1) == b.min(1))
    np.testing.assert_allclose(won[1024], want, atol=1e-12)
    # N = M - 1 against brute force over the M leave-one-out subsets on each side (M^2 pairs).
    for p in range(3):
        subs_a = np.array([np.delete(a[p], i).max() for i in range(1024)])
        subs_b = np.array([np.delete(b[p], i).max() for i in range(1024)])
        exact = ((subs_a[:, None] > subs_b[None]) + 0.5 * (subs_a[:, None] == subs_b[None])).mean()
        assert bon[1023][p] == pytest.approx(exact, abs=1e-10)


def test_chunking_does_not_change_results(monkeypatch):
    import openrlhf_infalign.core.winrate as wr

    rng = np.random.default_rng(8)
    a, b = rng.integers(0, 9, size=(50, 6)), rng.integers(0, 9, size=(50, 5))
    whole = wr.win_rates_dense(a, b, [1, 2, 5])
    monkeypatch.setattr(wr, "_CHUNK_ELEMENTS", 30)  # 2-3 prompts per chunk
    monkeypatch.setattr(wr, "_TABLE_CHUNK_ELEMENTS", 30)
    assert wr.win_rates_dense(a, b, [1, 2, 5]) == whole
    monkeypatch.setattr(wr, "_TABLE_ENTRIES", 0)  # the one-pass-per-N path gives the same numbers
    other = wr.win_rates_dense(a, b, [1, 2, 5])
    for key in ("bon", "won"):
        for n in ("1", "2", "5"):
            assert other[key][n]["win_rate"] == pytest.approx(whole[key][n]["win_rate"], abs=1e-14)
            assert other[key][n]["stderr"] == pytest.approx(whole[key][n]["stderr"], abs=1e-14)


@pytest.mark.parametrize("levels", [2, 3, 40, None])
def test_many_prompts_against_brute_force_ties_at_every_density(monkeypatch, levels):
    # Binary rewards tie in long runs (the walk gives way to binary search); a few levels tie at row ends; None:
    # continuous rewards with +-inf mixed in. Small chunks put row boundaries everywhere.
    import openrlhf_infalign.core.winrate as wr

    monkeypatch.setattr(wr, "_TABLE_CHUNK_ELEMENTS", 37)
    rng = np.random.default_rng(levels or 0)
    m, k = 6, 7
    if levels is None:
        a, b = rng.normal(size=(40, m)), rng.normal(size=(40, k))
        a[::7, 0], b[::5, -1], b[::9, 0] = np.inf, -np.inf, np.inf
    else:
        a, b = rng.integers(0, levels, size=(40, m)) * 1.0, rng.integers(0, levels, size=(40, k)) * 1.0
    ns = list(range(1, 7))
    bon, won = per_prompt_win_rates(a, b, ns)
    for p in range(40):
        for n in (1, 3, 6):
            assert bon[n][p] == pytest.approx(brute_force(a[p], b[p], n), abs=1e-12)
            assert won[n][p] == pytest.approx(brute_force(a[p], b[p], n, worst=True), abs=1e-12)


def test_long_tie_runs_use_binary_search(monkeypatch):
    import openrlhf_infalign.core.winrate as wr

    a = np.array([[1.0] * 20 + [0.0] * 5])
    b = np.array([[1.0] * 30 + [2.0] * 3])
    want = per_prompt_win_rates(a, b, [1, 4, 20])
    monkeypatch.setattr(wr, "_TIE_WALK", 1)
    got = per_prompt_win_rates(a, b, [1, 4, 20])
    for side in (0, 1):
        for n in (1, 4, 20):
            assert got[side][n][0] == pytest.approx(want[side][n][0], abs=1e-15)
    assert want[0][1][0] == pytest.approx(brute_force(a[0], b[0], 1), abs=1e-12)


def test_ragged_input_forms_agree():
    # Lists of lists, lists of arrays, a 2-D array, rows of shape (1, M): one answer.
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 5, size=(9, 4)) * 1.0, rng.integers(0, 5, size=(9, 6)) * 1.0
    want = win_rates_dense(a, b, [1, 2, 4])
    for pol, ref in ((a.tolist(), b.tolist()), (list(a), list(b)), (a, b), ([r[None] for r in a], list(b))):
        assert win_rates(pol, ref, [1, 2, 4]) == want


def test_default_ns_and_bad_input():
    assert default_ns(32, 32) == [1, 2, 4, 8, 16, 32]
    assert default_ns(8, 5) == [1, 2, 4]
    assert default_ns(1, 9) == [1]
    with pytest.raises(ValueError, match="fits no prompt"):
        win_rates([[1.0, 2.0]], [[1.0, 2.0, 3.0]], [1, 4])
    with pytest.raises(ValueError, match="exceeds"):
        win_rates_dense(np.zeros((2, 2)), np.zeros((2, 3)), [3])
    with pytest.raises(ValueError, match="NaN"):
        win_rates([[1.0, np.nan]], [[1.0]], [1])
    with pytest.raises(ValueError, match="no policy rewards"):
        win_rates([[1.0], []], [[1.0], [2.0]], [1])
    with pytest.raises(ValueError, match="positive integer"):
        win_rates([[1.0]], [[1.0]], [0])
    with pytest.raises(ValueError, match="prompts"):
        win_rates([[1.0]], [[1.0], [2.0]], [1])
    with pytest.raises(ValueError, match="no prompts"):
        win_rates_dense(np.zeros((0, 3)), np.zeros((0, 3)), [1])


def test_single_prompt_stderr_is_zero_and_output_shape():
    out = win_rates([[1.0, 3.0]], [[2.0, 2.0, 0.0]], [2, 1])
    assert out["num_prompts"] == 1
    assert set(out) == {"num_prompts", "standard", "bon", "won"}
    assert list(out["bon"]) == ["1", "2"] and out["bon"]["2"]["stderr"] == 0.0
    # max of both policy samples is 3 > any reference pair's max.
    assert out["bon"]["2"]["win_rate"] == 1.0
    # worst of both: 1 vs worst of a reference pair: {2,2}->2 (lose), {2,0}x2 -> 0 (win): 2/3.
    assert out["won"]["2"]["win_rate"] == pytest.approx(2 / 3)


def test_win_rates_tie_at_the_store_precision():
    # A store row of eight 0.1 and eight 0.7 (float32, as the store keeps it): a policy reward of 0.1 ties with the
    # stored 0.1 whatever precision it arrives in, as calibration does.
    ref32 = np.array([0.1] * 8 + [0.7] * 8, dtype=np.float32)
    results = []
    for pol in ([0.1, 0.7], np.array([0.1, 0.7], dtype=np.float64), np.array([0.1, 0.7], dtype=np.float32)):
        ragged = win_rates([pol], [ref32], ns=[1, 2])
        dense = win_rates_dense(np.asarray(pol, dtype=np.asarray(pol).dtype)[None, :], ref32[None, :], ns=[1, 2])
        assert ragged == dense
        results.append(ragged)
    assert results[0] == results[1] == results[2]
    assert results[0]["standard"]["win_rate"] == pytest.approx(0.5)  # (0.25 + 0.75) / 2


# ---------------------------------------------------------------------------------------------------------------
# property: any small input, every N, against the brute force (hypothesis)

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

values = st.sampled_from([-np.inf, -1.0, 0.0, 0.0, 0.5, 1.0, 1.0, 2.0, np.inf])
prompt_rows = st.tuples(st.lists(values, min_size=1, max_size=6), st.lists(values, min_size=1, max_size=6))


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(st.lists(prompt_rows, min_size=1, max_size=4))
def test_any_small_input_matches_the_brute_force(prompts):
    pol = [np.array(a) for a, _ in prompts]
    ref = [np.array(b) for _, b in prompts]
    top = max(min(len(a), len(b)) for a, b in zip(pol, ref))
    ns = list(range(1, top + 1))
    out = win_rates(pol, ref, ns)
    for n in ns:
        fit = [(a, b) for a, b in zip(pol, ref) if n <= min(len(a), len(b))]
        for key, worst in (("bon", False), ("won", True)):
            exact = [brute_force(a, b, n, worst) for a, b in fit]
            assert out[key][str(n)]["win_rate"] == pytest.approx(np.mean(exact), abs=1e-12)
            assert out[key][str(n)]["num_prompts"] == len(fit)
