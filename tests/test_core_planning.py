import numpy as np
import pytest

from openrlhf_infalign.core.planning import frontier, plan, resolve_transform
from openrlhf_infalign.core.theory import beta_for_kl, kl_divergence, win_rate

# ---------------------------------------------------------------------------------------------------------------
# plan and frontier


@pytest.mark.parametrize("n", [2, 3, 4, 8])
@pytest.mark.parametrize("kl", [0.25, 0.5, 1.0])
def test_plan_exp_is_near_optimal_for_bon(n, kl):
    p = plan(f"bon:{n}", kl)
    rec = p["recommended"]
    assert rec["transform"].startswith("exp:t=")
    assert p["optimal"]["win_rate"] - rec["win_rate"] < 0.005
    assert p["optimal"]["win_rate"] >= rec["win_rate"] - 1e-6
    assert rec["win_rate"] > p["baselines"]["identity"]["win_rate"]
    assert rec["win_rate"] > p["baselines"]["log"]["win_rate"]
    # the recommended spec and beta really put the optimum at the budget with that win rate
    assert kl_divergence(rec["transform"], rec["beta"]) == pytest.approx(kl, rel=1e-6)
    assert win_rate(f"bon:{n}", rec["transform"], rec["beta"]) == pytest.approx(rec["win_rate"], abs=1e-12)


def test_plan_t_grows_with_n_and_kl():
    t = {(n, kl): plan(f"bon:{n}", kl, with_optimal=False)["recommended"]["t"] for n in (2, 8) for kl in (0.25, 1)}
    assert t[(2, 0.25)] < t[(8, 0.25)] and t[(2, 0.25)] < t[(2, 1)] and t[(8, 0.25)] < t[(8, 1)]


@pytest.mark.parametrize("n", [2, 4, 8])
def test_plan_worst_of_n_recommends_negexp(n):
    p = plan(f"won:{n}", 0.25)
    rec = p["recommended"]
    assert rec["transform"].startswith("negexp:t=")
    assert rec["win_rate"] > p["baselines"]["identity"]["win_rate"] + 0.01
    assert p["optimal"]["win_rate"] - rec["win_rate"] < 0.005
    # a BoN-shaped exp transform is worse than identity for WoN
    assert win_rate(f"won:{n}", "exp:t=10", beta_for_kl("exp:t=10", 0.25)) < p["baselines"]["identity"]["win_rate"]


def test_plan_json_shape():
    p = plan("bon:4", 0.5)
    assert p["inference"] == "bon:4" and p["kl"] == 0.5
    assert set(p["recommended"]) >= {"transform", "beta", "win_rate"}
    assert set(p["baselines"]) == {"identity", "log"}
    assert set(p["baselines"]["log"]) >= {"beta", "win_rate"}
    assert "openrlhf_args" not in p  # OpenRLHF's flag names are the adapter's (adapter/planning.py)


def test_plan_standard_recommends_identity_which_is_optimal():
    p = plan("standard", 0.5)
    assert p["recommended"]["transform"] == "identity"
    assert p["optimal"]["win_rate"] == pytest.approx(p["recommended"]["win_rate"], abs=1e-6)


def test_frontier_shape_and_monotone():
    f = frontier("bon:4", "exp:t=10", [0.25, 0.5, 1])
    assert f["inference"] == "bon:4" and f["transform"] == "exp:t=10"
    assert [p["kl"] for p in f["points"]] == [0.25, 0.5, 1]
    wins = [p["win_rate"] for p in f["points"]]
    assert wins == sorted(wins) and wins[0] > 0.5
    assert f["points"][1]["beta"] == pytest.approx(beta_for_kl("exp:t=10", 0.5))
    opt = frontier("bon:4", "optimal", [0.25, 0.5])
    auto = frontier("bon:4", "auto", [0.25, 0.5])
    for o, a, e in zip(opt["points"], auto["points"], f["points"]):
        assert o["win_rate"] >= a["win_rate"] - 1e-6 and a["win_rate"] >= e["win_rate"] - 1e-9
    assert auto["points"][0]["transform"].startswith("exp:t=")
    with pytest.raises(ValueError, match="KL budget"):
        frontier("bon:4", "exp:t=10", [0.5, -1])


# ---------------------------------------------------------------------------------------------------------------
# resolving a run's --transform


def test_resolve_fixed_auto_and_optimal():
    tr, beta = resolve_transform("exp:t=10")
    assert tr.spec == "exp:t=10" and beta is None
    tr, beta = resolve_transform("exp:t=10", "bon:4", 0.5)
    assert beta == pytest.approx(beta_for_kl("exp:t=10", 0.5))

    auto, beta_auto = resolve_transform("auto", "bon:4", 0.5)
    assert auto.name == "exp" and kl_divergence(auto, beta_auto) == pytest.approx(0.5, rel=1e-6)
    auto_won, _ = resolve_transform("auto", "won:4", 0.5)
    assert auto_won.name == "negexp"
    assert resolve_transform("auto", "standard", 0.5)[0].name == "identity"

    opt, beta_opt = resolve_transform("optimal", "bon:4", 0.5)
    assert opt.name == "optimal"
    u = np.linspace(0, 1, 1001)
    v = opt(u)
    assert v[0] == pytest.approx(0) and v[-1] == pytest.approx(1) and np.all(np.diff(v) >= 0)
    assert kl_divergence(opt, beta_opt) == pytest.approx(0.5, rel=1e-4)
    # the optimum beats the best exp transform at the same KL (by a little) and identity (by a lot)
    assert win_rate("bon:4", opt, beta_opt) >= win_rate("bon:4", auto, beta_auto) - 1e-6
    assert win_rate("bon:4", opt, beta_opt) > win_rate("bon:4", "identity", beta_for_kl("identity", 0.5)) + 0.05

    with pytest.raises(ValueError, match="KL budget"):
        resolve_transform("auto")
    with pytest.raises(ValueError, match="unknown transform"):
        resolve_transform("nope", "bon:4", 0.5)


# ---------------------------------------------------------------------------------------------------------------
# any N and K: answered, or refused in words


def test_plan_for_huge_n_leaves_out_the_optimum_and_says_so():
    from openrlhf_infalign.core.planning import N_OPTIMAL_MAX

    p = plan(f"bon:{10**7}", 0.5)
    assert "optimal" not in p and "gap_to_optimal" not in p
    assert any("exact optimum is left out" in n for n in p["notes"])
    for w in [p["recommended"]["win_rate"]] + [b["win_rate"] for b in p["baselines"].values()]:
        assert 0.5 <= w <= 1.0
    with pytest.raises(ValueError, match=f"N <= {N_OPTIMAL_MAX:,} only"):
        frontier(f"bon:{N_OPTIMAL_MAX + 1}", "optimal", [0.5])
    with pytest.raises(ValueError, match="optimal transform is computed for N"):
        resolve_transform("optimal", f"won:{N_OPTIMAL_MAX + 1}", 0.5)
    assert "optimal" in plan(f"bon:{N_OPTIMAL_MAX}", 0.5)


@pytest.mark.parametrize("k", [10**6 + 1, 10**12])
def test_k_beyond_the_stated_range_is_refused(k):
    with pytest.raises(ValueError, match="leave K out"):
        plan("bon:4", 0.5, k=k)
    with pytest.raises(ValueError, match="leave K out"):
        resolve_transform("exp:t=10", "bon:4", 0.5, k=k)


def test_a_saturating_optimum_on_k_bins_is_reported_not_an_error():
    # The Worst-of-N optimum is flat at the top: on K bins it cannot spend the budget; the plan says it saturates.
    p = plan("won:32", 0.5, k=16)
    assert p["optimal"]["saturated"] and p["optimal"]["kl"] < 0.5
    assert any("saturates" in n for n in p["notes"])
