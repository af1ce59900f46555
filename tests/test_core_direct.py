"""core/direct.py: the group estimator of the Best-/Worst-of-N win rate, what its rewards estimate, the direct
arm's optimum and coefficient. Every reference here is computed independently: enumeration over subsets or
tuples, closed forms, or a plain gradient flow."""

import itertools
import math

import numpy as np
import pytest

from openrlhf_infalign.core import direct as dr
from openrlhf_infalign.core import finite_k as fk
from openrlhf_infalign.core import planning
from openrlhf_infalign.core.theory import as_grid, optimal_transform_for_kl

# ---------------------------------------------------------------------------------------------------------------
# brute force: all N-subsets of a group


def _f(m, spec):
    kind, n = spec.split(":")
    return m ** int(n) if kind == "bon" else 1.0 - (1.0 - m) ** int(n)


def _best(values, spec):
    return max(values) if spec.startswith("bon") else min(values)


def _subset_values(group, spec):
    big_n = int(spec.split(":")[1])
    return {s: _f(_best([group[i] for i in s], spec), spec) for s in itertools.combinations(range(len(group)), big_n)}


def _brute_value(group, spec):
    return float(np.mean(list(_subset_values(group, spec).values())))


def _brute_rewards(group, spec, baseline):
    vals = _subset_values(group, spec)
    out = []
    for j in range(len(group)):
        rho = np.mean([v for s, v in vals.items() if j in s])
        loo = np.mean([v for s, v in vals.items() if j not in s]) if baseline == "loo" else 0.0
        out.append(rho - loo)
    return np.array(out)


def _groups(rng, count, n, ties):
    # ties: calibrated rewards on the 5 values j/4 of a K = 4 store, so most groups hold ties
    return rng.integers(0, 5, size=(count, n)) / 4 if ties else rng.random((count, n))


CASES = [(spec, n) for spec in ("bon:1", "bon:2", "bon:4", "won:2", "won:4") for n in range(int(spec[-1]), 8)]


@pytest.mark.parametrize("spec,n", CASES)
@pytest.mark.parametrize("ties", [False, True])
def test_estimator_equals_enumeration_over_all_subsets(spec, n, ties):
    rng = np.random.default_rng(n * 7 + ties)
    u = _groups(rng, 12, n, ties)
    big_n = int(spec[-1])
    value = dr.group_win_rate(u, spec)
    for g, group in enumerate(u):
        assert value[g] == pytest.approx(_brute_value(list(group), spec), abs=1e-12)
    for baseline in ("none", "loo") if n > big_n else ("none",):
        rewards = dr.group_rewards(u, spec, baseline)
        for g, group in enumerate(u):
            np.testing.assert_allclose(rewards[g], _brute_rewards(list(group), spec, baseline), rtol=0, atol=1e-12)


@pytest.mark.parametrize("spec", ["bon:3", "won:3"])
def test_ties_need_no_rule_and_the_order_does_not_matter(spec):
    """Tied samples get the same reward, and permuting a group permutes its rewards (any sort order is exact)."""
    rng = np.random.default_rng(3)
    u = _groups(rng, 200, 6, ties=True)
    r = dr.group_rewards(u, spec)
    perm = rng.permuted(np.tile(np.arange(6), (200, 1)), axis=1)
    permuted = dr.group_rewards(np.take_along_axis(u, perm, 1), spec)
    np.testing.assert_allclose(permuted, np.take_along_axis(r, perm, 1), rtol=0, atol=1e-14)
    same = u[:, :, None] == u[:, None, :]
    diff = np.abs(r[:, :, None] - r[:, None, :])
    assert same.sum() > 1200 and diff[same].max() < 1e-14


@pytest.mark.parametrize("spec", ["bon:4", "won:4", "bon:1"])
def test_loo_rewards_sum_to_zero_per_group_and_rho_averages_to_the_value(spec):
    """The identities behind the composition table: mean_j rho_j = W_hat and mean_j W_hat_{-j} = W_hat."""
    u = np.random.default_rng(1).random((500, 9))
    np.testing.assert_allclose(dr.group_rewards(u, spec, "loo").sum(1), 0.0, atol=1e-14)
    np.testing.assert_allclose(dr.group_rewards(u, spec, "none").mean(1), dr.group_win_rate(u, spec), atol=1e-15)


def test_group_size_errors_are_one_line():
    u = np.full((2, 4), 0.5)
    with pytest.raises(ValueError, match="bon:5 needs n >= 5 samples per prompt group, got 4") as e:
        dr.group_rewards(u, "bon:5", "none")
    with pytest.raises(ValueError, match="leave-one-out baseline for won:4 needs n > 4") as e2:
        dr.group_rewards(u, "won:4", "loo")
    assert dr.group_rewards(u, "won:4", "none").shape == (2, 4)  # n = N works without the baseline
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        dr.group_rewards(np.array([[0.5, 1.5, 0.2]]), "bon:2")
    with pytest.raises(ValueError, match="unknown baseline"):
        dr.group_rewards(u, "bon:2", "mean")
    assert "\n" not in str(e.value) + str(e2.value)


def test_torch_in_torch_out():
    torch = pytest.importorskip("torch")
    u = np.random.default_rng(2).random((5, 6))
    t = torch.tensor(u, dtype=torch.float32)
    out = dr.group_rewards(t, "bon:4")
    assert isinstance(out, torch.Tensor) and out.device == t.device and out.shape == t.shape
    np.testing.assert_allclose(out.numpy(), dr.group_rewards(u.astype(np.float32).astype(np.float64), "bon:4"))
    assert isinstance(dr.group_win_rate(t, "won:2"), torch.Tensor)


def test_ragged_groups_match_their_own_calls():
    rng = np.random.default_rng(4)
    sizes = np.array([5, 8, 5, 6, 8, 5])
    u = rng.random(sizes.sum())
    out = dr.group_rewards_ragged(u, sizes, "bon:4")
    for g, (s, n) in enumerate(zip(np.cumsum(sizes) - sizes, sizes)):
        np.testing.assert_allclose(out[s : s + n], dr.group_rewards(u[s : s + n], "bon:4"), atol=1e-15)
    with pytest.raises(ValueError, match="group #1: .*needs n > 4"):
        dr.group_rewards_ragged(u[:9], [5, 4], "bon:4")


# ---------------------------------------------------------------------------------------------------------------
# unbiasedness on a tabular policy: values with ties, softmax logits theta

VALUES = np.array([0.0, 0.25, 0.25, 0.5, 1.0])  # two responses tie in calibrated reward
THETA = np.array([0.3, -0.2, 0.5, 0.1, -0.4])


def _pi(theta=THETA):
    e = np.exp(theta - theta.max())
    return e / e.sum()


def _exact_win_rate(spec, theta=THETA):
    big_n, pi = int(spec[-1]), _pi(theta)
    return sum(
        np.prod(pi[list(t)]) * _f(_best(VALUES[list(t)], spec), spec)
        for t in itertools.product(range(len(pi)), repeat=big_n)
    )


def _exact_gradient(spec):
    """grad_theta W by enumeration over N-tuples (score function), checked against central differences."""
    big_n, pi = int(spec[-1]), _pi()
    grad = np.zeros(len(pi))
    for t in itertools.product(range(len(pi)), repeat=big_n):
        score = np.bincount(t, minlength=len(pi)) - big_n * pi
        grad += np.prod(pi[list(t)]) * _f(_best(VALUES[list(t)], spec), spec) * score
    h = 1e-6
    fd = [(_exact_win_rate(spec, THETA + h * e) - _exact_win_rate(spec, THETA - h * e)) / (2 * h) for e in np.eye(5)]
    np.testing.assert_allclose(grad, fd, atol=1e-8)
    return grad


def _group_gradients(responses, rewards):
    """sum_j r_j grad log pi(y_j) per group: bincount of r by response, minus (sum_j r_j) pi."""
    pi, b = _pi(), len(VALUES)
    g = np.zeros((len(responses), b))
    for i in range(b):
        g[:, i] = np.where(responses == i, rewards, 0.0).sum(1)
    return g - rewards.sum(1, keepdims=True) * pi


@pytest.mark.parametrize("spec", ["bon:3", "won:3"])
@pytest.mark.parametrize("baseline", ["loo", "none"])
def test_gradient_is_unbiased_exactly_by_enumeration(spec, baseline):
    """E[sum_j r_j grad log pi(y_j)] = (n/N) grad W, summed over all n-tuples of responses."""
    n, big_n, pi = 4, 3, _pi()
    tuples = np.array(list(itertools.product(range(len(pi)), repeat=n)))
    prob = np.prod(pi[tuples], axis=1)
    grads = _group_gradients(tuples, dr.group_rewards(VALUES[tuples], spec, baseline))
    np.testing.assert_allclose(prob @ grads, n / big_n * _exact_gradient(spec), atol=1e-12)


@pytest.mark.parametrize("spec", ["bon:3", "won:3"])
@pytest.mark.parametrize("baseline", ["loo", "none"])
def test_gradient_is_unbiased_monte_carlo(spec, baseline):
    """The Monte Carlo mean of the groups' gradients is within 3 standard errors of (n/N) grad W in every logit;
    the same test rejects the group mean as a baseline (it includes the sample: rescaled by (n-N)/n)."""
    n, big_n, groups = 6, 3, 60_000
    rng = np.random.default_rng(11 if baseline == "loo" else 12)
    responses = rng.choice(len(VALUES), size=(groups, n), p=_pi())
    u = VALUES[responses]
    exact = n / big_n * _exact_gradient(spec)

    def within_3se(rewards):
        g = _group_gradients(responses, rewards)
        se = g.std(0, ddof=1) / math.sqrt(groups)
        return np.all(np.abs(g.mean(0) - exact) < 3 * se)

    assert within_3se(dr.group_rewards(u, spec, baseline))
    rho = dr.group_rewards(u, spec, "none")
    assert not within_3se(rho - dr.group_win_rate(u, spec)[:, None])


# ---------------------------------------------------------------------------------------------------------------
# what rho estimates: H(v) = E[f(best(v, M))], M the best of N-1 policy samples


@pytest.mark.parametrize("spec", ["bon:4", "won:4", "bon:1"])
def test_rho_estimates_h_exactly(spec):
    """E[rho_1 | y_1 = j] over all (n-1)-tuples of group mates is win_rate_reward's H_j, itself checked against
    enumeration over (N-1)-tuples."""
    pi, n, big_n = _pi(), 6, int(spec[-1])
    h = dr.win_rate_reward(VALUES, pi, spec)
    brute = [
        sum(
            np.prod(pi[list(t)]) * _f(_best([VALUES[j], *VALUES[list(t)]], spec), spec)
            for t in itertools.product(range(5), repeat=big_n - 1)
        )
        for j in range(5)
    ]
    np.testing.assert_allclose(h, brute, atol=1e-14)
    mates = np.array(list(itertools.product(range(5), repeat=n - 1)))
    prob = np.prod(pi[mates], axis=1)
    for j in range(5):
        groups = np.concatenate([np.full((len(mates), 1), VALUES[j]), VALUES[mates]], 1)
        assert prob @ dr.group_rewards(groups, spec, "none")[:, 0] == pytest.approx(h[j], abs=1e-13)


@pytest.mark.parametrize("spec", ["bon:4", "won:3"])
def test_h_curve_under_the_base_policy_has_its_closed_form(spec):
    """g = 1: Best-of-N H(v) = v^(2N-1) + (N-1)/(2N-1) (1 - v^(2N-1)); Worst-of-N mirrors it (w = 1 - v)."""
    big_n = int(spec[-1])
    gr = as_grid()
    u, h = dr.win_rate_reward_curve(spec, np.ones_like(gr.u), gr)
    m = 2 * big_n - 1
    w = u if spec.startswith("bon") else 1.0 - u
    closed = w**m + (big_n - 1) / m * (1.0 - w**m)
    np.testing.assert_allclose(h, closed if spec.startswith("bon") else 1.0 - closed, atol=1e-6)


@pytest.mark.parametrize("spec", ["bon:4", "won:4"])
def test_continuum_tilt_by_h_is_the_optimal_transform(spec):
    """At the optimum, (H - H(0)) / (H(1) - H(0)) is theory's normalised optimal transform, and the direct
    coefficient c = beta_w / N equals the optimal beta times H(1) - H(0)."""
    c, info = dr.direct_coef(spec, 0.5)
    tr, _ = optimal_transform_for_kl(spec, 0.5)
    gr = as_grid()
    logits = tr.phi(gr.u) / info["beta"]
    g = np.exp(logits - logits.max())
    g /= gr.integral(g)
    _, h = dr.win_rate_reward_curve(spec, g, gr)
    np.testing.assert_allclose((h - h[0]) / (h[-1] - h[0]), tr.phi(gr.u), atol=2e-6)
    assert c == pytest.approx(info["beta"] * (info["h1"] - info["h0"]), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# the direct arm's optimum with K stored rewards


def _flow(p, spec, coef, steps, step=0.02):
    """The plain gradient flow theta' = log p + H(q) / coef - theta from the base policy (an independent solver)."""
    values = np.arange(p.shape[1]) / (p.shape[1] - 1)
    theta = np.log(p)
    for _ in range(steps):
        q = np.exp(theta - theta.max(1, keepdims=True))
        q /= q.sum(1, keepdims=True)
        r = theta - np.log(p) - dr.win_rate_reward(values, q, spec) / coef
        theta = theta - step * (r - r.mean(1, keepdims=True))
    q = np.exp(theta - theta.max(1, keepdims=True))
    return q / q.sum(1, keepdims=True), np.abs(r - r.mean(1, keepdims=True)).max(1)


@pytest.mark.parametrize("spec,coef", [("bon:4", 0.03), ("won:4", 0.05)])
def test_bin_optimum_is_where_the_flow_from_the_base_policy_ends(spec, coef):
    p = np.array(fk.store_spacings(16, 256, seed=5))
    q = dr.bin_optimum_direct(p, spec, coef)
    values = np.arange(17) / 16
    tilt = p * np.exp(dr.win_rate_reward(values, q, spec) / coef)
    np.testing.assert_allclose(q, tilt / tilt.sum(1, keepdims=True), rtol=1e-8)
    flow, residual = _flow(p, spec, coef, 4000)
    done = residual < 1e-9
    assert done.mean() > 0.9
    np.testing.assert_allclose(q[done], flow[done], atol=1e-7)


@pytest.mark.parametrize("spec", ["bon:4", "won:4"])
def test_direct_coef_k_puts_the_expected_kl_at_the_budget(spec):
    c = dr.direct_coef_k(spec, 0.5, 16)
    assert dr.expected_kl_direct_k(spec, c, 16) == pytest.approx(0.5, rel=1e-6)
    assert dr.direct_coef_k(spec, 0.5, None) == dr.direct_coef(spec, 0.5)[0]


def test_above_the_exact_k_the_continuum_coefficient_is_used_and_is_close():
    """Above DIRECT_K_EXACT the plan takes the continuum's coefficient (the K-aware solve grows as K^3); already at
    that K the continuum's coefficient puts the expected KL within 1% of the budget."""
    big = dr.DIRECT_K_EXACT + 1
    assert dr.direct_coef_k("won:4", 0.5, big) == dr.direct_coef("won:4", 0.5)[0]
    row = dr.direct_plan("won:4", 0.5, big)
    assert row["k"] == big and not row["k_aware"] and row["kl"] == pytest.approx(0.5, rel=1e-6)
    assert dr.direct_plan("won:4", 0.5, 16)["k_aware"]
    at_cap = dr.expected_kl_direct_k("bon:4", dr.direct_coef("bon:4", 0.5)[0], dr.DIRECT_K_EXACT)
    assert at_cap == pytest.approx(0.5, rel=0.01)


def test_a_large_budget_solves_past_bins_the_optimum_empties():
    """Worst-of-4 at 2 nats, K = 32: the warm-started solves see bins whose probability underflowed to 0. (A solve
    from the base policy lands within 0.5%: near such budgets a few stores' optima fold onto another branch.)"""
    c = dr.direct_coef_k("won:4", 2.0, 32)
    assert dr.expected_kl_direct_k("won:4", c, 32) == pytest.approx(2.0, rel=0.005)


def test_rescaled_plan_beta_is_exact_in_the_continuum_only():
    """The plan's optimal beta times H(1) - H(0) is the continuum's coefficient; with K = 16 (Best-of-4) the direct
    optimum at that coefficient spends well under the budget, which is why training uses direct_coef_k."""
    cont = planning.plan("bon:4", 0.5)
    assert dr.rescaled_coef(cont) == pytest.approx(dr.direct_coef("bon:4", 0.5)[0], rel=1e-4)
    at_k = planning.plan("bon:4", 0.5, k=16)
    assert dr.expected_kl_direct_k("bon:4", dr.rescaled_coef(at_k), 16) < 0.9 * 0.5


@pytest.mark.parametrize("spec", ["bon:4", "won:4"])
def test_direct_plan_row(spec):
    """In the continuum the direct arm's row is the exact optimum's; with K = 16 it is at least as good as the
    plan's optimal row (the continuum's optimal shape read at the bins), at the same expected KL."""
    cont = dr.direct_plan(spec, 0.5)
    _, info = optimal_transform_for_kl(spec, 0.5)
    assert cont["win_rate"] == pytest.approx(info["win_rate"], abs=1e-9)
    row = dr.direct_plan(spec, 0.5, k=16)
    assert row["kl"] == pytest.approx(0.5, rel=1e-6)
    assert row["win_rate"] >= planning.plan(spec, 0.5, k=16)["optimal"]["win_rate"] - 0.003


# ---------------------------------------------------------------------------------------------------------------
# composition with OpenRLHF's estimators (proved through upstream's code in test_direct_convergence.py)


def test_composition_table():
    assert dr.composition("rloo", 8, "bon:4").reward_scale == pytest.approx(8 / 7)
    assert dr.composition("rloo", 8, "bon:4", "none").reward_scale == pytest.approx(4 / 7)
    assert dr.composition("reinforce_baseline", 8, "won:4").reward_scale == 1.0
    assert dr.composition("dr_grpo", 8, "won:4", "none").reward_scale == pytest.approx(4 / 8)
    for est in ("reinforce", "gae", "flash_reinforce"):
        assert dr.composition(est, 5, "bon:4").reward_scale == 1.0
    for est, n, baseline in (("group_norm", 8, "loo"), ("flash_reinforce", 8, "none"), ("rloo", 4, "none")):
        comp = dr.composition(est, n, "bon:4", baseline)
        assert comp.refused and est in comp.reason
        with pytest.raises(dr.DirectNotApplicable, match=est):
            dr.direct_kl_coef({"inference": "bon:4", "kl": 0.5}, est, n, baseline)
    assert set(dr.COMPOSITION_RULES) == {
        "reinforce",
        "gae",
        "rloo",
        "reinforce_baseline",
        "dr_grpo",
        "flash_reinforce",
        "group_norm",
    }


def test_direct_kl_coef_is_the_coefficient_times_the_reward_scale():
    plan = {"inference": "won:4", "kl": 0.5}
    c = dr.direct_coef_k("won:4", 0.5, 16)
    assert dr.direct_kl_coef(plan, "rloo", 8, k=16) == pytest.approx(c * 8 / 7)
    assert dr.direct_kl_coef(plan, "reinforce_baseline", 8, k=16) == pytest.approx(c)
