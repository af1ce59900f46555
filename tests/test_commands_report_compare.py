"""`infalign report RUN RUN ...`: several synthetic runs side by side, with answers known from straight-line logs."""

import json
import math

import pytest

from openrlhf_infalign.cli import main
from openrlhf_infalign.evallog import EVAL_LOG

PNG = b"\x89PNG\r\n\x1a\n"


def write_run(path, points, transform="exp:t=10", inference="bon:4"):
    """points: (step, kl, win rate, stderr); every metric gets the same win rate."""
    path.mkdir(parents=True, exist_ok=True)
    with open(path / EVAL_LOG, "w") as f:
        for step, kl, w, se in points:
            stat = {"win_rate": w, "stderr": se}
            rec = {"step": step, "kl": kl, "inference": inference, "transform": transform, "standard": stat}
            rec.update(bon={"4": stat}, won={"4": stat})
            f.write(json.dumps(rec) + "\n")
    return path


@pytest.fixture
def three_runs(tmp_path):
    # ctrl: two seeds, w = 0.5 + 0.2 kl and 0.5 + 0.4 kl; calib (identity): w = 0.5 + 0.1 kl.
    a = write_run(tmp_path / "ctrl_s0", [(0, 0.0, 0.5, 0.02), (10, 2.0, 0.9, 0.02)])
    b = write_run(tmp_path / "calib_s0", [(0, 0.0, 0.5, 0.03), (10, 3.0, 0.8, 0.03)], transform="identity")
    c = write_run(tmp_path / "ctrl_s1", [(0, 0.0, 0.5, 0.04), (10, 0.8, 0.82, 0.04), (20, 1.5, 1.1, 0.04)])
    return tmp_path, [str(a), str(b), str(c)]


def test_compare_table_json_and_figures(three_runs, capsys):
    tmp, runs = three_runs
    out = tmp / "cmp"
    argv = ["report", *runs, "--label", "ctrl", "--label", "calib", "--label", "ctrl", "--kl-grid", "1,0.5"]
    assert main(argv + ["--out", str(out), "--k", "16", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got == json.loads((out / "compare.json").read_text())
    assert got["baseline"] == "calib" and got["kl_grid"] == [0.5, 1.0] and got["k"] == 16
    assert got["theory"] == "K-aware frontiers: expected over stores of K = 16 reference samples per prompt"
    assert [(a["label"], a["seeds"]) for a in got["arms"]] == [("ctrl", 2), ("calib", 1)]
    assert [r["final_kl"] for r in got["arms"][0]["runs"]] == [2.0, 1.5]
    ctrl = got["metrics"]["BoN_4"]["arms"]["ctrl"]
    # KL 1: seeds 0.7 and 0.9 (mean 0.8, var 0.02), within mean(e^2) = 1e-3; calib 0.6 ± 0.03.
    se = math.sqrt(0.02 / 2 + 1e-3 / 2)
    assert ctrl["win_rate"][1] == pytest.approx(0.8) and ctrl["stderr"][1] == pytest.approx(se)
    assert ctrl["diff"][1] == pytest.approx(0.2) and ctrl["diff_stderr"][1] == pytest.approx(math.hypot(se, 0.03))
    names = sorted(p.name for p in out.iterdir())
    assert names == ["bon_4_vs_kl.png", "compare.json", "standard_vs_kl.png", "summary.md", "won_4_vs_kl.png"]
    assert (out / "bon_4_vs_kl.png").read_bytes()[:8] == PNG
    md = (out / "summary.md").read_text()
    assert "| arm | seeds | KL | BoN_4 | Δ BoN_4 | WoN_4 | Δ WoN_4 | standard | Δ standard |" in md
    assert f"| ctrl | 2 | 1 | 0.8000 ± {se:.4f} | +0.2000 ± {math.hypot(se, 0.03):.4f} |" in md
    assert "| calib | 1 | 0.5 | 0.5500 ± 0.0300 | (baseline) |" in md
    assert "| ctrl | exp:t=10 | 2 | 2.000, 1.500 | 0.000 to 1.500 |" in md
    assert "![BoN_4 vs KL](bon_4_vs_kl.png)" in md


def test_default_labels_grid_and_markdown_print(three_runs, capsys, monkeypatch):
    tmp, runs = three_runs
    monkeypatch.chdir(tmp)
    assert main(["report", *runs, "--baseline", "ctrl_s0"]) == 0  # labels: directory names, each its own arm
    printed = capsys.readouterr().out
    got = json.loads((tmp / "infalign_compare" / "compare.json").read_text())
    assert [a["label"] for a in got["arms"]] == ["ctrl_s0", "calib_s0", "ctrl_s1"] and got["baseline"] == "ctrl_s0"
    assert got["common_kl_range"] == [0.0, 1.5] and got["kl_grid"] == [0.3, 0.6, 0.9, 1.2]
    assert "| calib_s0 | 1 | 0.3 | 0.5300 ± 0.0300 | -0.0300 ± 0.0361 |" in printed
    assert "wrote " in printed and (tmp / "infalign_compare" / "summary.md").is_file()


def test_no_common_kl_range_is_said_plainly(tmp_path, capsys):
    low = write_run(tmp_path / "ctrl", [(8, 0.36, 0.56, 0.02), (16, 0.50, 0.61, 0.02), (24, 0.31, 0.61, 0.02)])
    high = write_run(tmp_path / "raw", [(8, 1.01, 0.65, 0.02), (48, 2.75, 0.89, 0.02)], transform=None)
    assert main(["report", str(low), str(high), "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "no KL range is common to every arm (ctrl: 0.36 to 0.5; raw: 1.01 to 2.75)" in printed
    got = json.loads((tmp_path / "o" / "compare.json").read_text())
    assert got["kl_grid"] == [] and got["common_kl_range"] is None and got["baseline"] == "ctrl"
    assert "| arm | seeds | KL |" not in printed
    # A grid given anyway is only read where each arm reaches; nothing is extrapolated.
    assert main(["report", str(low), str(high), "--out", str(tmp_path / "o"), "--kl-grid", "0.4,2", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["metrics"]["BoN_4"]["arms"]["ctrl"]["win_rate"][1] is None
    assert got["metrics"]["BoN_4"]["arms"]["raw"]["win_rate"] == [None, pytest.approx(0.65 + 0.24 * 0.99 / 1.74)]
    assert got["metrics"]["BoN_4"]["arms"]["raw"]["diff"] == [None, None]


def test_same_directory_names_elsewhere_are_merged_and_said(tmp_path, capsys):
    a = write_run(tmp_path / "ctrl" / "seed0", [(0, 0.0, 0.5, 0.02), (10, 1.0, 0.7, 0.02)])
    b = write_run(tmp_path / "ctrl2" / "seed0", [(0, 0.0, 0.5, 0.02), (10, 1.0, 0.6, 0.02)])
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "o"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert [(x["label"], x["seeds"]) for x in got["arms"]] == [("seed0", 2)]
    assert any("share the directory name 'seed0'" in n and "--label" in n for n in got["notes"])
    # Runs trained with different transforms are never seeds of one arm, whatever their names.
    c = write_run(tmp_path / "raw" / "seed0", [(0, 0.0, 0.5, 0.02), (10, 1.0, 0.6, 0.02)], transform=None)
    assert main(["report", str(a), str(c), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "arm 'seed0' mixes runs trained for different transforms" in err and "own --label" in err


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--label", "a"], "2 runs but 1 --label: give one --label per run, in run order"),
        (["--label", "a", "--label", "b", "--baseline", "c"], "--baseline 'c' is not an arm; the arms are: a, b"),
        (["--kl-grid", "0.5,x"], "--kl-grid '0.5,x': give KLs in nats per sequence, comma-separated"),
        (["--kl-grid", "-1"], "--kl-grid '-1'"),
    ],
)
def test_bad_compare_input_is_one_line(three_runs, capsys, extra, words):
    _, runs = three_runs
    assert main(["report", *runs[:2], *extra, "--out", str(three_runs[0] / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("infalign report: error: ") and words in err and err.count("\n") == 1, err


def test_one_run_refuses_compare_flags_and_missing_runs(three_runs, capsys):
    tmp, runs = three_runs
    assert main(["report", runs[0], "--label", "x", "--k", "16"]) == 2
    assert "--label, --k compare several runs: give two or more RUN_DIRs" in capsys.readouterr().err
    assert main(["report", runs[0], str(tmp / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
