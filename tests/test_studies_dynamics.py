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
