"""direct_dynamics.py: the study's tabular optimisation with the direct arms beside the transforms."""

import numpy as np
import pytest

from openrlhf_infalign import direct_dynamics as dd
from openrlhf_infalign.core import direct as dr
from openrlhf_infalign.core.finite_k import beta_for_kl_k
from openrlhf_infalign.demo import dynamics


def test_a_transform_arm_is_exactly_demo_dynamics():
    s = dynamics.Setting()
    for spec, coef, seed in (("exp:t=10", 0.02, 3), ("log", 0.03, 1)):
        assert dd.simulate_rewards(dd.transform_rewards(spec), coef, 12, seed, s) == dynamics.simulate(
            spec, coef, 12, seed, s
        )


def test_the_direct_arm_trains_on_the_group_estimator():
    """The direct reward is the group estimator's (its group mean 0: reinforce_baseline's mean does nothing), and a
    short run spends KL and raises its own metric."""
    u = np.random.default_rng(0).random((32, 8))
    np.testing.assert_array_equal(dd.direct_rewards("won:4")(u), dr.group_rewards(u, "won:4", "loo"))
    traj = dd.simulate_rewards(dd.direct_rewards("bon:4"), 0.05, 9, 0, dynamics.Setting())
    assert traj[0]["kl"] == pytest.approx(0.0, abs=1e-12) and traj[-1]["kl"] > 0.1
    assert traj[-1]["bon"] > traj[0]["bon"] + 0.05


def test_study_arms_carry_their_plans_coefficients():
    arms, optimal = dd.study_arms(0.5, 32, 8)
    assert arms["identity"]["kl_coef"] == pytest.approx(beta_for_kl_k("identity", 0.5, 32) * 7 / 8)
    assert arms["log_cdf"]["kl_coef"] == pytest.approx(beta_for_kl_k("log", 0.5, 32) * 7 / 8)
    assert arms["direct_won4"]["kl_coef"] == pytest.approx(dr.direct_coef_k("won:4", 0.5, 32))
    assert arms["ctrl_exp_bon4"]["reward"].startswith("exp:") and arms["ctrl_negexp_won4"]["reward"].startswith(
        "negexp"
    )
    assert set(optimal) == {"bon:4", "won:4"}


def test_comparison_table_and_paired_differences(tmp_path):
    arms = {
        "identity": {"reward": "identity", "kl_coef": 0.2, "plan": 0.79},
        "direct_bon4": {"reward": "direct:bon:4", "kl_coef": 0.05, "plan": 0.86},
    }
    s = dynamics.Setting(prompts=64)
    result = dd.compare(arms, s, seeds=2, steps=9, long_steps=12, kls=[0.05, 0.1])
    table = dd.markdown(result, [0.05, 0.1], 9, 12)
    assert "| direct_bon4 | 0.05 |" in table and "direct_bon4 - identity, bon:" in table
    diff = dd.paired_difference(result, "direct_bon4", "identity", "bon", 0.05)
    per = result["direct_bon4"]["short"]["at_kl_per_seed"]["0.05"]["bon"]
    ref = result["identity"]["short"]["at_kl_per_seed"]["0.05"]["bon"]
    assert diff[0] == pytest.approx(np.mean(np.subtract(per, ref)))
    assert dd.main(["--out", str(tmp_path), "--seeds", "2", "--steps", "3", "--long-steps", "3"]) == 0
    assert (tmp_path / "direct_dynamics.md").read_text().count("\n| ") == 6
