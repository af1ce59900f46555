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
    again = ["report", str(low), str(high), "--out", str(tmp_path / "o"), "--kl-grid", "0.4,2", "--json"]
    assert main(again) == 2  # the first report's files stay unless --overwrite
    assert "bon_4_vs_kl.png exists; pass --overwrite" in capsys.readouterr().err
    assert main(again + ["--overwrite"]) == 0
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
    assert "--label, --k compare several runs: give two or more RUNs" in capsys.readouterr().err
    assert main(["report", runs[0], str(tmp / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def write_log(path, points, transform="exp:t=10"):
    """An evaluation log at exactly this file path (e.g. RUN/infalign_eval_exact.jsonl); points as write_run's."""
    write_run(path.parent, points, transform)
    (path.parent / EVAL_LOG).rename(path)
    return path


@pytest.fixture
def exact_study(tmp_path):
    """Exact logs (stderr 0) of two arms x 2 seeds, and two noise runs reaching 0.2 and 0.25 nats."""
    exact = "infalign_eval_exact.jsonl"
    logs = {
        "ctrl": [
            write_log(tmp_path / f"ctrl_s{i}" / exact, [(0, 0, 0.5, 0), (9, 2.0, 0.5 + w, 0)])
            for i, w in enumerate((0.3, 0.4))
        ],
        "calib": [
            write_log(tmp_path / f"calib_s{i}" / exact, [(0, 0, 0.5, 0), (9, 2.0, 0.5 + w, 0)], "identity")
            for i, w in enumerate((0.2, 0.25))
        ],
    }
    noise = [
        write_log(tmp_path / "noise_s0" / exact, [(0, 0, 0.5, 0), (3, 0.2, 0.5, 0), (9, 0.15, 0.5, 0)], "identity"),
        write_log(tmp_path / "noise_s1" / exact, [(0, 0, 0.5, 0), (3, 0.25, 0.5, 0), (9, 0.1, 0.5, 0)], "identity"),
    ]
    return tmp_path, logs, noise


def test_crossing_sustained_reads_the_floor_held_for_two_evaluations(exact_study, capsys):
    # The study's call adds --crossing sustained: each noise run's spike at step 3 is held only once, so the floor is
    # what they held at steps 3 and 9 together (0.15, 0.1), and the per-run words give the spike beside it.
    tmp, logs, noise = exact_study
    argv = ["report", *map(str, logs["ctrl"]), "--noise", str(noise[0]), "--noise", str(noise[1])]
    argv += ["--crossing", "sustained", "--out", str(tmp / "cmp"), "--json"]
    assert main(argv) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["crossing"] == "sustained" and got["noise_floor"]["crossing"] == "sustained"
    assert got["noise_floor"]["nats"] == 0.15
    assert [(r["floor_kl"], r["max_kl"]) for r in got["noise_floor"]["runs"]] == [(0.15, 0.2), (0.1, 0.25)]
    md = (tmp / "cmp" / "summary.md").read_text()
    assert "Trajectories: sustained crossings" in md and "held for two consecutive evaluations" in md
    assert f"{noise[0]}: 0.15 (one evaluation: 0.2 at step 3)" in md
    with pytest.raises(SystemExit) as bad:
        main(argv[:-1] + ["--crossing", "last"])
    assert bad.value.code == 2


def test_noise_floor_from_noise_runs_in_the_json_markdown_and_default_grid(exact_study, capsys):
    # The study script's call: exact logs, one --label per run, identity the baseline, the noise control's logs.
    tmp, logs, noise = exact_study
    runs = [*logs["ctrl"], *logs["calib"]]
    argv = ["report", *map(str, runs), *sum((["--label", a] for a in ("ctrl", "ctrl", "calib", "calib")), [])]
    argv += ["--baseline", "calib", "--noise", str(noise[0]), "--noise", str(noise[1]), "--out", str(tmp / "cmp")]
    assert main(argv + ["--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    floor = got["noise_floor"]
    assert (
        floor["nats"] == 0.25
        and "largest KL any of the 2 noise runs (rewards independent of the response) reached at any evaluation"
        in floor["source"]
    )
    assert [(r["max_kl"], r["step_of_max"], len(r["trajectory"])) for r in floor["runs"]] == [
        (0.2, 3, 3),
        (0.25, 3, 3),
    ]
    assert got["kl_grid"] == [0.5, 0.875, 1.25, 1.62]  # from twice the floor up to the common 2.0
    assert got["inside_noise_floor"] == [False] * 4 and got["below_twice_noise_floor"] == [False] * 4
    ctrl = got["metrics"]["BoN_4"]["arms"]["ctrl"]
    # Exact logs: the se is the seeds' alone; at KL 0.5 the seeds read 0.575 and 0.6 -> se = 0.0125.
    assert ctrl["win_rate"][0] == pytest.approx(0.5875) and ctrl["stderr"][0] == pytest.approx(0.0125)
    md = (tmp / "cmp" / "summary.md").read_text()
    assert (
        "Noise floor 0.25 nats: the largest KL any of the 2 noise runs (rewards independent of the response) reached at any evaluation"
        in md
    )
    assert (
        f"per run: {noise[0]}: 0.2 at step 3; {noise[1]}: 0.25 at step 3." in md
        and "| arm | seeds | KL | floor | BoN_4 |" in md
    )
    assert "| ctrl | 2 | 0.5 | ≥ 2x | 0.5875 ± 0.0125 |" in md
    # A grid inside the floor is compared only when asked, and every such KL is flagged in JSON and Markdown.
    assert main(argv + ["--kl-grid", "0.2,0.4,1", "--overwrite", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["inside_noise_floor"] == [True, False, False] and got["below_twice_noise_floor"] == [True, True, False]
    assert any("KL 0.2 inside the noise floor (0.25 nats) and KL 0.4 below twice it" in n for n in got["notes"])
    md = (tmp / "cmp" / "summary.md").read_text()
    assert "| ctrl | 2 | 0.2 | inside |" in md and "| ctrl | 2 | 0.4 | < 2x |" in md
    assert "differences there are optimiser noise" in md


def test_a_floor_in_nats_and_the_shaded_figure(three_runs, capsys, monkeypatch):
    from openrlhf_infalign import report

    tmp, runs = three_runs
    drawn, save = {}, report.save_figure

    def keep(fig, path, **kw):  # the figure as drawn, before it is written
        ax = fig.axes[0]
        drawn[path.name] = ([t.get_text() for t in ax.get_legend().get_texts()], ax.get_xlim())
        return save(fig, path, **kw)

    monkeypatch.setattr(report, "save_figure", keep)
    assert main(["report", *runs, "--noise-floor", "0.9", "--out", str(tmp / "o"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["noise_floor"] == {"nats": 0.9, "source": "given (--noise-floor)", "crossing": None, "runs": []}
    legend, xlim = drawn["bon_4_vs_kl.png"]
    assert "noise floor (KL <= 0.9)" in legend and "2x noise floor (1.8)" in legend and xlim[1] >= 1.8
    assert got["kl_grid"] == [] and any("below twice the noise floor (1.8 nats)" in n for n in got["notes"])
    # One run: the evaluation KL plot is shaded too, and the summary says which evaluations lie inside.
    assert main(["report", runs[2], "--noise-floor", "0.9", "--out", str(tmp / "one"), "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["evaluations_inside_noise_floor"] == [0, 10] and one["evaluations_below_twice_noise_floor"] == [
        0,
        10,
        20,
    ]
    assert "noise floor (KL <= 0.9)" in drawn["bon_vs_kl.png"][0]
    md = (tmp / "one" / "summary.md").read_text()
    assert "Noise floor 0.9 nats: given (--noise-floor)." in md and "steps 0, 10 lie inside the floor" in md
    assert "steps 20 below twice it" in md


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--k", "1"], "--k 1: K, the store's reference samples per prompt, is an integer >= 2"),
        (["--k", "-3"], "--k -3: K"),
        (["--noise-floor", "0"], "--noise-floor 0.0: give the floor as a positive KL in nats"),
        (["--noise-floor", "nan"], "--noise-floor nan"),
        (["--noise-floor", "0.2", "--noise", "x"], "give the noise floor one way: --noise RUN"),
    ],
)
def test_flags_are_refused_before_any_run_is_read(tmp_path, capsys, extra, words):
    # The runs do not exist: the flag's error comes first, in one line.
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("infalign report: error: ") and words in err and err.count("\n") == 1, err


def test_report_outputs_refuse_a_file_for_out_and_keep_what_exists(three_runs, capsys):
    tmp, runs = three_runs
    (tmp / "afile").write_text("mine")
    for argv in (["report", *runs], ["report", runs[0]]):
        assert main(argv + ["--out", str(tmp / "afile")]) == 2
        err = capsys.readouterr().err
        assert "--out " in err and "afile is a file; this output is a directory" in err and err.count("\n") == 1
    assert (tmp / "afile").read_text() == "mine"
    out = tmp / "rep"
    out.mkdir()
    (out / "summary.md").write_text("my notes")
    (out / "other.txt").write_text("mine too")
    assert main(["report", runs[0], "--out", str(out)]) == 2
    assert "summary.md exists; pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["other.txt", "summary.md"]  # nothing written at all
    assert main(["report", runs[0], "--out", str(out), "--overwrite"]) == 0
    assert (out / "other.txt").read_text() == "mine too" and (out / "summary.md").read_text().startswith("# InfAlign")
    # A noise run that does not exist, or has no KL, is named.
    assert main(["report", *runs[:2], "--noise", str(tmp / "nope"), "--out", str(tmp / "o3")]) == 2
    assert f"noise run {tmp / 'nope'} does not exist" in capsys.readouterr().err


def test_log_files_as_runs_labels_same_run_and_default_out(exact_study, capsys, monkeypatch):
    tmp, logs, _ = exact_study
    monkeypatch.chdir(tmp)
    a, b = logs["ctrl"][0], logs["calib"][0]
    write_run(a.parent, [(0, 0, 0.5, 0.01), (9, 2.1, 0.8, 0.01)])  # the sampled log beside the exact one
    assert main(["report", str(a), str(b), "--json", "--no-optimal"]) == 0  # labels: the run directories
    assert [x["label"] for x in json.loads(capsys.readouterr().out)["arms"]] == ["ctrl_s0", "calib_s0"]
    for twice in ([str(a.parent), str(a.parent / EVAL_LOG)], [str(a.parent), str(a)]):
        assert main(["report", *twice, "--out", str(tmp / "x")]) == 2
        err = capsys.readouterr().err
        assert "is the same run as" in err or "two evaluation logs of one training run" in err, err
    # One run from its exact log: the report goes beside it, apart from the sampled log's report.
    assert main(["report", str(a), "--no-optimal"]) == 0
    assert (a.parent / "infalign_eval_exact_report" / "bon_vs_kl.png").read_bytes()[:8] == PNG
    assert not (a.parent / "infalign_report").exists()
