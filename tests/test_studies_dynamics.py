"""The study's optimisation on a tabular policy (studies/dynamics.py): exact metrics, and it reaches the plan."""

import json
import subprocess
import sys

import numpy as np
import pytest

from openrlhf_infalign.core.direct import direct_coef_k, group_rewards
from openrlhf_infalign.core.transforms import parse_transform
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


def test_the_direct_reward_is_the_group_estimator_and_trains():
    """``direct:won:4`` is core.direct's estimator with its leave-one-out baseline (group mean 0, so
    reinforce_baseline's own mean does nothing); a short run spends KL and raises its own metric."""
    u = np.random.default_rng(0).random((32, 8))
    np.testing.assert_array_equal(dynamics.reward_fn("direct:won:4")(u), group_rewards(u, "won:4", "loo"))
    np.testing.assert_array_equal(dynamics.reward_fn("exp:t=3")(u), parse_transform("exp:t=3")(u))
    traj = dynamics.simulate("direct:bon:4", 0.05, 9, 0, dynamics.Setting())
    assert traj[0]["kl"] == pytest.approx(0.0, abs=1e-12) and traj[-1]["kl"] > 0.1
    assert traj[-1]["bon"] > traj[0]["bon"] + 0.05


def test_arms_from_plans_carry_the_direct_and_log_arms_coefficients(plans):
    arms = dynamics.arms_from_plans(plans)
    assert arms["direct_bon4"] == ("direct:bon:4", plans["bon:4"]["direct"]["kl_coef"])
    assert arms["direct_won4"] == ("direct:won:4", plans["won:4"]["direct"]["kl_coef"])
    assert arms["log_bon4"] == ("log", plans["bon:4"]["baselines"]["log"]["kl_coef"])
    # reinforce_baseline with the leave-one-out baseline: the direct coefficient itself (core.direct)
    assert arms["direct_won4"][1] == pytest.approx(direct_coef_k("won:4", 0.5, 32))
    refused = {
        inf: {**p, "direct": {"wrapper": "infalign.direct", "refused": "n too small"}} for inf, p in plans.items()
    }
    assert "direct_bon4" not in dynamics.arms_from_plans(refused)


def test_main_writes_the_table_with_paired_differences(plans, tmp_path):
    (tmp_path / "plans.json").write_text(json.dumps(plans))
    out = tmp_path / "out"
    argv = ["--plans", str(tmp_path / "plans.json"), "--out", str(out), "--seeds", "2", "--steps", "6"]
    assert dynamics.main(argv + ["--long-steps", "3", "--prompts", "64", "--matched-kl", "0.01,0.02"]) == 0
    result = json.loads((out / "dynamics.json").read_text())
    table = (out / "dynamics.md").read_text()
    assert set(result["arms"]) == {"identity", "ctrl_exp_bon4", "ctrl_negexp_won4", "log_bon4", "direct_bon4",
                                   "direct_won4"}  # fmt: skip
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + 6  # the header and one row per arm
    assert "direct_bon4 - ctrl_exp_bon4, BON_4 (paired seeds):" in table
    diff = dynamics.paired_difference(result, "direct_bon4", "identity", "bon", 0.01)
    a = result["arms"]["direct_bon4"]["short"]["at_kl_per_seed"]["0.01"]["bon"]
    b = result["arms"]["identity"]["short"]["at_kl_per_seed"]["0.01"]["bon"]
    assert diff[0] == pytest.approx(np.mean(np.subtract(a, b)))
