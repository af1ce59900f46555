"""compare.py on synthetic trajectories with known answers: matched-KL interpolation, seed aggregation, differences
to a baseline arm and their standard errors, KL ranges that miss the grid."""

import json
import math
import re

import numpy as np
import pytest

from openrlhf_infalign import compare


def rec(step, kl, bon4, se=0.01, std=None, inference="bon:4", transform="exp:t=10"):
    stat = {"win_rate": bon4, "stderr": se}
    return {
        "step": step,
        "kl": kl,
        "inference": inference,
        "transform": transform,
        "standard": {"win_rate": bon4 if std is None else std, "stderr": se},
        "bon": {"4": stat},
        "won": {"4": {"win_rate": 1 - bon4, "stderr": se}},
    }


def test_first_crossing_trajectory_and_piecewise_linear_values():
    # KL goes back (0.5 -> 0.3) and forward again: the step-30 record is left out, the grid reads 0->1 and 1->3 lines.
    records = [rec(0, 0.0, 0.5), rec(10, 1.0, 0.6), rec(20, 0.3, 0.9), rec(30, 3.0, 0.8)]
    step, kl, win, se = compare.trajectory(list(reversed(records)), "bon:4")  # any order in: step order used
    assert step.tolist() == [0, 10, 30] and kl.tolist() == [0.0, 1.0, 3.0] and win.tolist() == [0.5, 0.6, 0.8]
    got = compare.interpolate(kl, win, [0.0, 0.5, 1.0, 2.0, 3.0, 3.5, -0.1])
    np.testing.assert_allclose(got[:5], [0.5, 0.55, 0.6, 0.7, 0.8])
    assert np.isnan(got[5]) and np.isnan(got[6])  # never extrapolated
    assert compare.run_kl_range(records) == (0.0, 3.0)


def test_records_without_kl_or_metric_are_left_out():
    records = [rec(0, 0.0, 0.5), rec(5, None, 0.99), rec(10, 2.0, 0.7)]
    del records[2]["won"]["4"]
    _, kl, win, _ = compare.trajectory(records, "bon:4")
    assert kl.tolist() == [0.0, 2.0] and win.tolist() == [0.5, 0.7]
    _, kl, _, _ = compare.trajectory(records, "won:4")
    assert kl.tolist() == [0.0]
    assert compare.run_kl_range([rec(3, None, 0.5)]) is None


def test_seed_aggregation_known_mean_and_se():
    win = np.array([[0.6, 0.7], [0.7, 0.9], [0.8, 0.8]])
    err = np.array([[0.03, 0.0], [0.04, 0.0], [0.0, 0.0]])
    mean, se = compare.aggregate_seeds(win, err)
    np.testing.assert_allclose(mean, [0.7, 0.8])
    # between-seed variance (ddof 1): 0.01 at both; within: mean(e^2) = (9e-4 + 16e-4 + 0) / 3.
    np.testing.assert_allclose(se, [math.sqrt(0.01 / 3 + (25e-4 / 3) / 3), math.sqrt(0.01 / 3)])
    mean, se = compare.aggregate_seeds(win[:1], err[:1])  # one seed: its own within-run stderr
    np.testing.assert_allclose(mean, [0.6, 0.7])
    np.testing.assert_allclose(se, [0.03, 0.0])
    mean, se = compare.aggregate_seeds([[0.5, np.nan], [0.7, 0.2]], [[0.0, 0.0], [0.0, 0.0]])
    assert mean[0] == pytest.approx(0.6) and np.isnan(mean[1]) and np.isnan(se[1])


def test_difference_and_its_se():
    d, se = compare.difference([0.7, 0.6], [0.03, 0.05], [0.6, 0.6], [0.04, 0.12])
    np.testing.assert_allclose(d, [0.1, 0.0], atol=1e-12)
    np.testing.assert_allclose(se, [0.05, 0.13])


def test_compare_runs_end_to_end_known_values():
    # Arm "ctrl": two seeds, straight lines w = 0.5 + 0.2 kl and 0.5 + 0.4 kl (se 0.02, 0.04) up to KL 2 and 1.5.
    # Arm "calib" (identity, the default baseline): one seed, w = 0.5 + 0.1 kl, se 0.03, up to KL 3.
    ctrl1 = [rec(0, 0.0, 0.5, 0.02), rec(10, 2.0, 0.9, 0.02)]
    ctrl2 = [rec(0, 0.0, 0.5, 0.04), rec(10, 1.5, 1.1, 0.04)]
    calib = [rec(s, kl, 0.5 + 0.1 * kl, 0.03, transform="identity") for s, kl in ((0, 0.0), (10, 1.0), (20, 3.0))]
    runs = [
        {"run": "a", "label": "ctrl", "records": ctrl1},
        {"run": "b", "label": "calib", "records": calib},
        {"run": "c", "label": "ctrl", "records": ctrl2},
    ]
    out = compare.compare_runs(runs, kl_grid=[1.0, 1.75])
    assert out["baseline"] == "calib" and out["kl_grid_source"] == "given"
    assert [a["label"] for a in out["arms"]] == ["ctrl", "calib"] and [a["seeds"] for a in out["arms"]] == [2, 1]
    assert out["arms"][0]["kl_range"] == [0.0, 1.5] and [r["final_kl"] for r in out["arms"][0]["runs"]] == [2.0, 1.5]
    assert list(out["metrics"]) == ["BoN_4", "WoN_4", "standard"]
    ctrl, base = out["metrics"]["BoN_4"]["arms"]["ctrl"], out["metrics"]["BoN_4"]["arms"]["calib"]
    # KL 1: seeds 0.7 and 0.9 -> mean 0.8; var 0.02; within mean(e^2) = (4e-4 + 16e-4) / 2 = 1e-3.
    se_ctrl = math.sqrt(0.02 / 2 + 1e-3 / 2)
    assert ctrl["win_rate"][0] == pytest.approx(0.8) and ctrl["stderr"][0] == pytest.approx(se_ctrl)
    assert ctrl["win_rate"][1] is None and ctrl["diff"][1] is None  # seed 2 stops at KL 1.5
    assert base["win_rate"] == pytest.approx([0.6, 0.675]) and base["stderr"] == pytest.approx([0.03, 0.03])
    assert "diff" not in base
    assert ctrl["diff"][0] == pytest.approx(0.2) and ctrl["diff_stderr"][0] == pytest.approx(math.hypot(se_ctrl, 0.03))
    assert any("'ctrl' covers KL 0 to 1.5: no value at KL 1.75" in n for n in out["notes"])
    # Default grid: inside the range every arm covers (0 to 1.5). ctrl's mean is 0.5 + 0.3 kl there.
    out = compare.compare_runs(runs, baseline="ctrl")
    assert out["common_kl_range"] == [0.0, 1.5] and out["kl_grid"] == [0.3, 0.6, 0.9, 1.2]
    assert out["metrics"]["BoN_4"]["arms"]["calib"]["diff"] == pytest.approx([-0.06, -0.12, -0.18, -0.24])  # -0.2 kl
    assert all(v is not None for m in out["metrics"].values() for a in m["arms"].values() for v in a["win_rate"])


def test_no_common_kl_range_is_said_not_extrapolated():
    low = [rec(0, 0.3, 0.55), rec(10, 0.5, 0.6)]
    high = [rec(0, 1.0, 0.6, transform=None), rec(10, 3.0, 0.9, transform=None)]
    runs = [{"run": "x", "label": "ctrl", "records": low}, {"run": "y", "label": "raw", "records": high}]
    out = compare.compare_runs(runs)
    assert out["baseline"] == "ctrl"  # no identity arm: the first
    assert out["common_kl_range"] is None and out["kl_grid"] == []
    want = "no KL range is common to every arm (ctrl: 0.3 to 0.5; raw: 1 to 3)"
    assert any(n.startswith(want) for n in out["notes"])
    assert out["metrics"]["BoN_4"]["arms"]["raw"] == {"win_rate": [], "stderr": [], "diff": [], "diff_stderr": []}


def test_metrics_follow_the_trained_n_and_bad_inputs():
    r8 = [rec(0, 0.0, 0.5, inference="won:8"), rec(1, 1.0, 0.6, inference="won:8")]
    for r in r8:
        r["bon"]["8"] = r["won"]["8"] = {"win_rate": 0.5, "stderr": 0.01}
    assert compare.compared_metrics([r8]) == ["bon:4", "won:4", "bon:8", "won:8", "standard"]
    assert compare.metric_name("won:8") == "WoN_8" and compare.metric_name("standard") == "standard"
    runs = [{"run": "x", "label": "a", "records": r8}]
    with pytest.raises(ValueError, match="--baseline 'zz' is not an arm; the arms are: a"):
        compare.compare_runs(runs, baseline="zz")
    with pytest.raises(ValueError, match="run y has no evaluation with a measured KL"):
        compare.compare_runs(runs + [{"run": "y", "label": "b", "records": [rec(4, None, 0.5)]}])


def test_the_same_run_twice_is_refused_by_path_and_by_content(tmp_path):
    # Given twice, one run would count as two seeds and shrink the standard error.
    a = [rec(0, 0.0, 0.5), rec(10, 1.0, 0.7)]
    b = [rec(0, 0.0, 0.5), rec(10, 1.0, 0.6)]
    copy = json.loads(json.dumps(a))
    with pytest.raises(ValueError, match="runs x and z have identical evaluation logs: the same run given twice"):
        compare.compare_runs(
            [
                {"run": "x", "label": "s", "records": a},
                {"run": "y", "label": "s", "records": b},
                {"run": "z", "label": "s", "records": copy},
            ]
        )
    log = tmp_path / "run" / "infalign_eval.jsonl"
    log.parent.mkdir()
    log.write_text("\n".join(json.dumps(r) for r in a) + "\n")
    (tmp_path / "link").symlink_to(tmp_path / "run")
    one, two = compare.load_run(tmp_path / "run"), compare.load_run(tmp_path / "link", label="run")
    assert one["digest"] == two["digest"] and one["label"] == "run"
    with pytest.raises(ValueError, match=r"run .*link is the same run as .*run \(both read .*infalign_eval.jsonl\)"):
        compare.compare_runs([one, two])


@pytest.mark.parametrize(
    "field, other, words",
    [
        ("inference", "bon:8", "different inference procedures (a: bon:4, b: bon:8)"),
        ("k", 64, "different store K (reference samples per prompt) (a: 16, b: 64)"),
        ("transform", "identity", "different transforms (a: exp:t=10, b: identity)"),
        ("k", None, "different store K (reference samples per prompt) (a: 16, b: not recorded)"),
    ],
)
def test_an_arm_of_runs_trained_differently_is_refused(field, other, words):
    a = [dict(rec(0, 0.0, 0.5), k=16), dict(rec(10, 1.0, 0.7), k=16)]
    b = [dict(rec(0, 0.0, 0.5), k=16), dict(rec(10, 1.5, 0.6), k=16)]
    for r in b:
        r[field] = other
    with pytest.raises(ValueError, match=re.escape(f"arm 'ctrl' mixes runs trained for {words}") + ".*own --label"):
        compare.compare_runs(
            [{"run": "a", "label": "ctrl", "records": a}, {"run": "b", "label": "ctrl", "records": b}]
        )
    # Under two labels they are two arms, compared as such.
    out = compare.compare_runs([{"run": "a", "label": "x", "records": a}, {"run": "b", "label": "y", "records": b}])
    assert [arm["label"] for arm in out["arms"]] == ["x", "y"]
