"""The study's optimisation on a tabular policy (studies/dynamics.py): exact metrics, and it reaches the plan."""

import json
import subprocess
import sys

import numpy as np
import pytest

from openrlhf_infalign.studies import dynamics


def test_exact_metrics_of_the_base_and_of_a_point_mass():
    base = dynamics.exact_metrics(np.zeros(256), n=4)
    assert base["kl"] == pytest.approx(0.0, abs=1e-12)
    for m in ("standard", "bon", "won"):
        assert base[m] == pytest.approx(0.5, abs=1e-4)
    top = np.full(256, -1e9)
    top[-1] = 0.0  # all mass in the top cell: KL log M, beats every base draw but inside its own cell
    m = dynamics.exact_metrics(top, n=4)
    assert m["kl"] == pytest.approx(np.log(256), rel=1e-9)
    assert m["standard"] > 0.99 and m["bon"] > 0.98 and m["won"] > 0.99


@pytest.fixture(scope="module")
def plans():
    out = {}
    for inference in ("bon:4", "won:4"):
        cmd = [sys.executable, "-m", "openrlhf_infalign", "plan", "--inference", inference, "--kl-budget", "0.5"]
        cmd += [
            "--k",
            "32",
            "--algo.advantage.estimator",
            "reinforce_baseline",
            "--rollout.n_samples_per_prompt",
            "8",
            "--json",
        ]
        out[inference] = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return out


def test_long_runs_land_on_the_plan_and_ctrl_leads_at_matched_kl(plans):
    arms = dynamics.arms_from_plans(plans)
    s = dynamics.Setting()
    ident, ctrl = arms["identity"], arms["ctrl_exp_bon4"]
    long_id = dynamics.simulate(*ident, steps=600, seed=0, s=s, eval_every=30)
    # the converged end point is the plan's (identity's expected KL and BoN_4 win rate at its coefficient, K = 32)
    end = long_id[-1]
    assert end["kl"] == pytest.approx(plans["bon:4"]["kl"], abs=0.06)
    assert end["bon"] == pytest.approx(plans["bon:4"]["baselines"]["identity"]["win_rate"], abs=0.02)
    # within the study's 18 steps, CTRL's BoN_4 is ahead at matched KL (seed means over 3 seeds)
    short = {name: [dynamics.simulate(*arm, steps=18, seed=k, s=s) for k in range(3)] for name, arm in
             (("identity", ident), ("ctrl", ctrl))}  # fmt: skip
    at = {name: np.mean([dynamics.at_kl(t, 0.25, "bon") for t in ts]) for name, ts in short.items()}
    assert at["ctrl"] > at["identity"] + 0.03, at


# ── --policy pairs: the word-pair task on tabular policies ──


@pytest.fixture(scope="module")
def task():
    return dynamics.pair_task(None, train_prompts=192, eval_prompts=64, seed=0)


def _brute_win(p_vals, q_vals, values, n):
    """Brute force over every n-tuple of reward values: P(best / worst of n policy draws beats the base's), ties
    1/2."""
    import itertools

    bon = won = 0.0
    for a in itertools.product(range(len(values)), repeat=n):
        pa = np.prod([p_vals[i] for i in a])
        for b in itertools.product(range(len(values)), repeat=n):
            w = pa * np.prod([q_vals[i] for i in b])
            hi_a, hi_b = max(values[i] for i in a), max(values[i] for i in b)
            lo_a, lo_b = min(values[i] for i in a), min(values[i] for i in b)
            bon += w * (1.0 if hi_a > hi_b else 0.5 if hi_a == hi_b else 0.0)
            won += w * (1.0 if lo_a > lo_b else 0.5 if lo_a == lo_b else 0.0)
    return bon, won


def test_pair_metrics_against_brute_force_with_ties():
    rng = np.random.default_rng(3)
    levels = [np.array([0.0, 1.0, 2.5]), np.array([-1.0, 0.0, 0.5, 3.0])]
    evals = np.stack([lv[rng.integers(0, lv.size, 256)] for lv in levels])  # heavy ties
    tiny = dynamics.PairTask(train=np.zeros((1, 16, 16)), eval=evals)
    x = rng.normal(size=256)
    logp = x - np.logaddexp.reduce(x)
    got = dynamics.pair_metrics(logp, tiny, n=2)
    p = np.exp(logp)
    assert got["kl"] == pytest.approx(float(np.sum(p * np.log(p * 256))), rel=1e-12)
    bon, won, std = [], [], []
    for row, lv in zip(evals, levels):
        pv = np.array([p[row == v].sum() for v in lv])
        qv = np.array([(row == v).mean() for v in lv])
        b, w = _brute_win(pv, qv, lv, 2)
        bon.append(b), won.append(w), std.append(_brute_win(pv, qv, lv, 1)[0])
    assert got["bon"] == pytest.approx(np.mean(bon), abs=1e-12)
    assert got["won"] == pytest.approx(np.mean(won), abs=1e-12)
    assert got["standard"] == pytest.approx(np.mean(std), abs=1e-12)


def test_pair_metrics_agree_with_the_studys_exact_evaluation(task):
    from openrlhf_infalign.studies import exact

    x = np.random.default_rng(0).normal(size=256)
    logp = x - np.logaddexp.reduce(x)
    e = task.eval.shape[0]
    w = exact.win_rates(np.tile(logp, (e, 1)), np.full((e, 256), -np.log(256)), task.eval, ns=(1, 4))
    got = dynamics.pair_metrics(logp, task)
    assert got["standard"] == pytest.approx(w["bon"][0].mean(), abs=1e-12)
    assert got["bon"] == pytest.approx(w["bon"][1].mean(), abs=1e-12)
    assert got["won"] == pytest.approx(w["won"][1].mean(), abs=1e-12)
    base = dynamics.pair_metrics(np.full(256, -np.log(256)), task)
    assert base["kl"] == pytest.approx(0.0, abs=1e-12) and base["bon"] == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("kind", dynamics.PAIR_POLICIES)
def test_pair_policy_gradients_match_finite_differences(kind):
    rng = np.random.default_rng(1)
    pol = dynamics.PairPolicy(kind)
    pol.params = [rng.normal(size=x.shape) for x in pol.params]
    y = pol.sample(rng, 40)
    coef = rng.normal(size=(40, len(pol.token_index(y))))
    grads = pol.grads(y, coef)
    f = lambda: float(np.sum(coef * pol.logp_tokens(y)))  # noqa: E731
    for i, g in enumerate(grads):
        for j in rng.choice(g.size, 5, replace=False):
            orig = pol.params[i].flat[j]
            pol.params[i].flat[j] = orig + 1e-6
            up = f()
            pol.params[i].flat[j] = orig - 1e-6
            down = f()
            pol.params[i].flat[j] = orig
            assert g.flat[j] == pytest.approx((up - down) / 2e-6, abs=1e-6)
    joint = pol.joint()
    assert np.exp(joint).sum() == pytest.approx(1.0)
    if kind == "pairs-product":
        assert dynamics.interaction_share(joint) == pytest.approx(0.0, abs=1e-12)


def test_pair_runs_are_reproducible_by_seed(task, plans):
    arm = dynamics.arms_from_plans(plans)["ctrl_exp_bon4"]
    s = dynamics.Setting(lr=dynamics.CALIBRATED_LR["pairs"])
    a = dynamics.simulate_pairs(*arm, steps=4, seed=5, s=s, task=task, eval_every=2)
    b = dynamics.simulate_pairs(*arm, steps=4, seed=5, s=s, task=task, eval_every=2)
    c = dynamics.simulate_pairs(*arm, steps=4, seed=6, s=s, task=task, eval_every=2)
    assert a == b
    assert a[-1]["kl"] != c[-1]["kl"] and a[-1]["kl"] > 0.01


def test_pair_identity_run_comes_to_rest_at_the_regularised_optimum(task, plans):
    spec, coef = dynamics.arms_from_plans(plans)["identity"]
    s = dynamics.Setting(lr=dynamics.CALIBRATED_LR["pairs"])
    rest = dynamics.pair_metrics(dynamics.converged_pairs(spec, coef * 8 / 7, task, k=s.k), task)
    ends = [dynamics.simulate_pairs(spec, coef, 150, k, s, task, eval_every=150)[-1] for k in range(2)]
    # PPO's own sampling noise keeps a few hundredths of a nat above the rest point
    assert np.mean([e["kl"] for e in ends]) == pytest.approx(rest["kl"], abs=0.08)
    assert np.mean([e["bon"] for e in ends]) == pytest.approx(rest["bon"], abs=0.015)


def test_rest_points_the_product_policy_keeps_ctrls_gap_small(task):
    """At rest and matched KL (0.15), CTRL exp's BoN_4 lead over identity is the theory's ~0.05 for the complete
    (autoregressive) table and ~0.017 for a product policy pi1(w1) pi2(w2), the LM's shape early on."""
    exp = "exp:t=12.63"

    def lead(policy):
        out = {}
        for spec in ("identity", exp):
            c = dynamics.coef_for_rest_kl(spec, 0.15, task, policy=policy)
            out[spec] = dynamics.pair_metrics(dynamics.converged_pairs(spec, c * 8 / 7, task, policy=policy), task)
            assert out[spec]["kl"] == pytest.approx(0.15, abs=1e-6)
        return out[exp]["bon"] - out["identity"]["bon"]

    assert lead("pairs") > 0.04
    assert 0.005 < lead("pairs-product") < 0.025


def test_cli_pairs_writes_gaps_and_tilts(tmp_path, plans):
    path = tmp_path / "plans.json"
    path.write_text(json.dumps(plans))
    out = tmp_path / "out"
    argv = ["--plans", str(path), "--out", str(out), "--policy", "pairs", "--steps", "4", "--long-steps", "0"]
    rc = dynamics.main(argv + ["--seeds", "2", "--matched-kl", "0.01,0.02"])
    assert rc == 0
    result = json.loads((out / "dynamics.json").read_text())
    assert result["policy"] == "pairs" and result["setting"]["lr"] == dynamics.CALIBRATED_LR["pairs"]
    assert set(result["arms"]) == {"identity", "ctrl_exp_bon4", "ctrl_negexp_won4"}
    tilt = result["arms"]["identity"]["short"]["tilt"]
    assert len(tilt["profile"]) == 16 and 0 <= tilt["interaction_share"] <= 1
    assert "ctrl_exp_bon4-identity (bon)" in result["gaps"]["short"]


def test_the_direct_reward_is_the_group_estimator_and_trains():
    """``direct:won:4`` is core.direct's estimator with its leave-one-out baseline (group mean 0, so
    reinforce_baseline's own mean does nothing); a short run spends KL and raises its own metric."""
    from openrlhf_infalign.core.direct import group_rewards
    from openrlhf_infalign.core.transforms import parse_transform

    u = np.random.default_rng(0).random((32, 8))
    np.testing.assert_array_equal(dynamics.reward_fn("direct:won:4")(u), group_rewards(u, "won:4", "loo"))
    np.testing.assert_array_equal(dynamics.reward_fn("exp:t=3")(u), parse_transform("exp:t=3")(u))
    traj = dynamics.simulate("direct:bon:4", 0.05, 9, 0, dynamics.Setting())
    assert traj[0]["kl"] == pytest.approx(0.0, abs=1e-12) and traj[-1]["kl"] > 0.1
    assert traj[-1]["bon"] > traj[0]["bon"] + 0.05


def test_arms_from_plans_carry_the_direct_and_log_arms_coefficients(plans):
    from openrlhf_infalign.core.direct import direct_coef_k

    arms = dynamics.arms_from_plans(plans, extra=True)
    assert arms["direct_bon4"] == ("direct:bon:4", plans["bon:4"]["direct"]["kl_coef"])
    assert arms["direct_won4"] == ("direct:won:4", plans["won:4"]["direct"]["kl_coef"])
    assert arms["log_bon4"] == ("log", plans["bon:4"]["baselines"]["log"]["kl_coef"])
    # reinforce_baseline with the leave-one-out baseline: the direct coefficient itself (core.direct)
    assert arms["direct_won4"][1] == pytest.approx(direct_coef_k("won:4", 0.5, 32))
    refused = {
        inf: {**p, "direct": {"wrapper": "infalign.direct", "refused": "n too small"}} for inf, p in plans.items()
    }
    assert "direct_bon4" not in dynamics.arms_from_plans(refused, extra=True)
