"""compare.py on synthetic trajectories with known answers: matched-KL interpolation, seed aggregation, differences
to a baseline arm and their standard errors, KL ranges that miss the grid."""

import json
import math
import re

import numpy as np
import pytest

from openrlhf_infalign import compare, report


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


def run(name, records, label="a", path=None):
    return {"run": name, "label": label, "records": records, **({"path": path} if path else {})}


def test_noise_floor_is_the_largest_kl_any_noise_run_reached_with_each_trajectory():
    # KL goes up and back down: the floor is the largest KL at ANY evaluation, not the last one.
    a = [rec(0, 0.0, 0.5), rec(5, 0.2, 0.5), rec(10, 0.35, 0.5), rec(15, 0.3, 0.5)]
    b = [rec(0, 0.0, 0.5), rec(5, 0.25, 0.52), rec(10, None, 0.5)]
    floor = compare.noise_floor([run("na", a), run("nb", b)])
    assert (
        floor["nats"] == 0.35
        and "largest KL any of the 2 noise runs (rewards independent of the response) reached at any evaluation"
        in floor["source"]
    )
    assert [(r["run"], r["max_kl"], r["step_of_max"]) for r in floor["runs"]] == [("na", 0.35, 10), ("nb", 0.25, 5)]
    assert floor["runs"][1]["trajectory"] == [{"step": 0, "kl": 0.0}, {"step": 5, "kl": 0.25}]  # null KL left out
    assert compare.noise_floor(nats=0.3) == {
        "nats": 0.3,
        "source": "given (--noise-floor)",
        "crossing": None,
        "runs": [],
    }
    assert compare.noise_floor() is None
    with pytest.raises(ValueError, match="not both"):
        compare.noise_floor([run("na", a)], nats=0.3)
    for bad in (0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="positive KL in nats"):
            compare.noise_floor(nats=bad)
    with pytest.raises(ValueError, match="noise run nc has no evaluation with a KL above 0"):
        compare.noise_floor([run("nc", [rec(0, None, 0.5), rec(5, None, 0.5)])])
    with pytest.raises(ValueError, match="identical evaluation logs"):
        compare.noise_floor([run("na", a), run("copy", json.loads(json.dumps(a)))])


def test_default_grid_starts_at_twice_the_floor():
    assert compare.default_kl_grid((0.0, 2.0), start=0.5) == [0.5, 0.875, 1.25, 1.62]
    assert compare.default_kl_grid((0.0, 2.0), start=2.0) == [] and compare.default_kl_grid((0.0, 1.0), start=3) == []
    assert (
        compare.default_kl_grid((1.0, 2.0), start=0.5) == compare.default_kl_grid((1.0, 2.0)) == [1.2, 1.4, 1.6, 1.8]
    )


def test_compare_runs_with_a_noise_floor_flags_each_grid_kl_and_says_so():
    ctrl = [rec(0, 0.0, 0.5), rec(10, 2.0, 0.9)]
    calib = [rec(0, 0.0, 0.5), rec(10, 3.0, 0.8)]
    stuck = [rec(0, 0.0, 0.5), rec(10, 0.25, 0.52)]
    runs = [run("x", ctrl, "ctrl"), run("y", calib, "calib")]
    floor = compare.noise_floor(nats=0.3)
    out = compare.compare_runs(runs, noise=floor)
    assert out["noise_floor"] == floor and out["kl_grid"] == [0.6, 0.95, 1.3, 1.65]  # from 2 x 0.3 up
    assert out["inside_noise_floor"] == [False] * 4 and out["below_twice_noise_floor"] == [False] * 4
    assert not any("optimiser noise" in n for n in out["notes"])
    given = compare.compare_runs(runs, kl_grid=[0.3, 0.5, 0.6, 1.0], noise=floor)
    assert given["inside_noise_floor"] == [True, False, False, False]
    assert given["below_twice_noise_floor"] == [True, True, False, False]
    assert (
        "matched KL 0.3 inside the noise floor (0.3 nats) and KL 0.5 below twice it (0.6): differences there are "
        "optimiser noise" in given["notes"]
    )
    # Without a floor the keys are there, null; an arm that never left the floor is named; a common range all below
    # twice the floor compares nothing by default.
    plain = compare.compare_runs(runs)
    assert plain["noise_floor"] is None and plain["inside_noise_floor"] is None and plain["kl_grid"][0] < 0.6
    low = compare.compare_runs(runs + [run("z", stuck, "stuck")], noise=floor)
    assert low["kl_grid"] == []
    assert any("arm 'stuck' never got past the noise floor" in n for n in low["notes"])
    assert any(
        "lies below twice the noise floor (0.6 nats): nothing is compared by default" in n for n in low["notes"]
    )


def test_exact_logs_give_the_standard_error_of_the_seeds_alone():
    # stderr 0 everywhere (exact evaluation): two seeds 0.7 and 0.9 at KL 1 -> se = sqrt(var / 2) = 0.1.
    s0 = [rec(0, 0.0, 0.5, se=0.0), rec(10, 1.0, 0.7, se=0.0)]
    s1 = [rec(0, 0.0, 0.5, se=0.0), rec(10, 1.0, 0.9, se=0.0)]
    one = [rec(0, 0.0, 0.5, se=0.0), rec(10, 2.0, 0.6, se=0.0)]
    out = compare.compare_runs([run("s0", s0, "c"), run("s1", s1, "c"), run("o", one, "b")], kl_grid=[1.0])
    arm = out["metrics"]["BoN_4"]["arms"]["c"]
    assert arm["win_rate"] == [pytest.approx(0.8)] and arm["stderr"] == [pytest.approx(0.1)]
    assert any("arm 'b': one seed, evaluated exactly (stderr 0)" in n for n in out["notes"])
    assert not any("arm 'c': one seed" in n for n in out["notes"])


def test_log_files_label_by_run_directory_and_two_logs_of_one_run_are_refused(tmp_path):
    lines = "\n".join(json.dumps(r) for r in [rec(0, 0.0, 0.5), rec(10, 1.0, 0.7)]) + "\n"
    exact = "\n".join(json.dumps(r) for r in [rec(0, 0.0, 0.5, se=0.0), rec(10, 1.1, 0.71, se=0.0)]) + "\n"
    (tmp_path / "ctrl_s0").mkdir()
    (tmp_path / "ctrl_s0" / "infalign_eval.jsonl").write_text(lines)
    (tmp_path / "ctrl_s0" / "infalign_eval_exact.jsonl").write_text(exact)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "calib_seed1.jsonl").write_text(exact.replace("0.71", "0.6"))
    sampled = compare.load_run(tmp_path / "ctrl_s0")
    exact_run = compare.load_run(tmp_path / "ctrl_s0" / "infalign_eval_exact.jsonl")
    other = compare.load_run(tmp_path / "logs" / "calib_seed1.jsonl")
    assert (sampled["label"], exact_run["label"], other["label"]) == ("ctrl_s0", "ctrl_s0", "calib_seed1")
    with pytest.raises(ValueError, match=r"are two evaluation logs of one training run \(.*ctrl_s0\): give one log"):
        compare.compare_runs([sampled, exact_run])
    with pytest.raises(ValueError, match="is the same run as"):  # a directory and its own log file
        compare.compare_runs([sampled, compare.load_run(tmp_path / "ctrl_s0" / "infalign_eval.jsonl")])
    assert [a["label"] for a in compare.compare_runs([exact_run, other])["arms"]] == ["ctrl_s0", "calib_seed1"]


def test_sustained_crossings_leave_a_one_evaluation_spike_out():
    # Step 10 is a spike (0.7, between 0.1 and 0.2): first crossings read it as the run reaching 0.7 with a low win
    # rate; sustained crossings need two consecutive evaluations at a level and read the lower of them.
    records = [rec(0, 0.0, 0.5), rec(5, 0.1, 0.55), rec(10, 0.7, 0.52), rec(15, 0.2, 0.6), rec(20, 0.3, 0.65)]
    first = compare.crossings(records, "first")
    assert [r["step"] for r in first] == [0, 5, 10]
    sustained = compare.crossings(records, "sustained")
    # pairs (0,5) -> 0, (5,10) -> 5, (10,15) -> 15, (15,20) -> 15 again: never twice; the last alone confirms nothing
    assert [r["step"] for r in sustained] == [0, 5, 15]
    assert compare.run_kl_range(records, "sustained") == (0.0, 0.2)
    steps, kl, win, _ = compare.trajectory(records, "bon:4", "sustained")
    assert steps.tolist() == [0, 5, 15] and kl.tolist() == [0.0, 0.1, 0.2] and win.tolist() == [0.5, 0.55, 0.6]
    # A steady climb loses only its last evaluation.
    climb = [rec(s, s / 100, 0.5 + s / 100) for s in range(0, 25, 5)]
    assert [r["step"] for r in compare.crossings(climb, "sustained")] == [0, 5, 10, 15]
    assert compare.crossings([rec(0, 0.0, 0.5)], "sustained") == []
    with pytest.raises(ValueError, match="crossing 'last'"):
        compare.crossings(records, "last")
    # At matched KL 0.15 the sustained trajectory interpolates between steps 5 and 15, the first one hits the spike.
    out = compare.compare_runs([run("r", records)], kl_grid=[0.15], crossing="sustained")
    assert out["crossing"] == "sustained"
    assert out["metrics"]["BoN_4"]["arms"]["a"]["win_rate"] == [pytest.approx(0.575)]
    out = compare.compare_runs([run("r", records)], kl_grid=[0.15])
    assert out["crossing"] == "first"
    assert out["metrics"]["BoN_4"]["arms"]["a"]["win_rate"][0] < 0.55
    with pytest.raises(ValueError, match="sustained crossings need two"):
        compare.compare_runs([run("one", [rec(0, 0.0, 0.5)])], crossing="sustained")


def test_sustained_noise_floor_is_the_largest_kl_held_for_two_evaluations():
    a = [rec(0, 0.0, 0.5), rec(5, 0.02, 0.5), rec(10, 0.44, 0.5), rec(15, 0.03, 0.5), rec(20, 0.025, 0.5)]
    b = [rec(0, 0.0, 0.5), rec(5, 0.015, 0.5), rec(10, 0.02, 0.5)]
    floor = compare.noise_floor([run("na", a), run("nb", b)], crossing="sustained")
    assert floor["nats"] == 0.03 and floor["crossing"] == "sustained"
    assert "held for two consecutive evaluations" in floor["source"]
    entry = floor["runs"][0]
    assert (entry["floor_kl"], entry["max_kl"], entry["step_of_max"]) == (0.03, 0.44, 10)
    words = report.noise_floor_words(floor)
    assert (
        "na: 0.03 (one evaluation: 0.44 at step 10)" in words
        and "nb: 0.015 (one evaluation: 0.02 at step 10)" in words
    )
    assert compare.noise_floor([run("na", a), run("nb", b)])["nats"] == 0.44  # first: any evaluation
    with pytest.raises(ValueError, match="held for two consecutive evaluations"):
        compare.noise_floor([run("nc", [rec(0, 0.0, 0.5), rec(5, 0.3, 0.5)])], crossing="sustained")
