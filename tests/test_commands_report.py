"""`infalign report`: plots + Markdown from a synthetic infalign_eval.jsonl whose evaluations are sampled from the
calibrated-space RLHF optimum, so the estimator and the theory curve must agree."""

import json

import numpy as np
import pytest

from openrlhf_infalign import report
from openrlhf_infalign.cli import main
from openrlhf_infalign.core import theory
from openrlhf_infalign.core.winrate import win_rates_dense

TRANSFORM = "exp:t=10"
PNG = b"\x89PNG\r\n\x1a\n"


def sample_optimum(transform, beta, size, rng):
    """Calibrated rewards of the RLHF optimum for (transform, beta): inverse-CDF sampling of its density."""
    u, g = theory.optimum_density(transform, beta)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (g[1:] + g[:-1]) * np.diff(u))])
    return np.interp(rng.uniform(size=size), cdf / cdf[-1], u)


def synthetic_run(run_dir, inference="bon:4", transform=TRANSFORM, kls=(None, 0.1, 0.3, 0.6), prompts=300, m=8):
    rng = np.random.default_rng(0)
    records = []
    for i, kl in enumerate(kls):
        if kl is None:  # step 0: the policy is the reference
            beta, policy = None, rng.uniform(size=(prompts, m))
        else:
            beta = theory.beta_for_kl(transform, kl)
            policy = sample_optimum(transform, beta, (prompts, m), rng)
        reference = rng.uniform(size=(prompts, 16))
        rates = win_rates_dense(policy, reference, [1, 2, 4, 8])
        rec = {"step": 10 * i, "kl": kl, "inference": inference, "transform": transform, "beta": beta, **rates}
        records.append(rec)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / report.EVAL_LOG, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return records


def test_estimator_on_the_theory_optimum_matches_the_theory_win_rate():
    # Cross-check of core/winrate against core/theory: samples from the optimum's density must give its win rates.
    rng = np.random.default_rng(1)
    beta = theory.beta_for_kl(TRANSFORM, 0.5)
    out = win_rates_dense(sample_optimum(TRANSFORM, beta, (3000, 8), rng), rng.uniform(size=(3000, 8)), [1, 2, 4, 8])
    for n in (2, 4, 8):
        for key in ("bon", "won"):
            want = theory.win_rate(f"{key}:{n}", TRANSFORM, beta)
            got = out[key][str(n)]
            assert abs(got["win_rate"] - want) < 4 * got["stderr"], (key, n, got, want)
    assert (
        abs(out["standard"]["win_rate"] - theory.win_rate("standard", TRANSFORM, beta)) < 4 * out["standard"]["stderr"]
    )


def test_report_writes_plots_and_summary(tmp_path, capsys):
    records = synthetic_run(tmp_path / "run")
    assert main(["report", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "run" / "infalign_report"
    assert sorted(p.name for p in out.iterdir()) == ["bon_vs_kl.png", "summary.md", "winrate_vs_n.png"]
    for name in ("bon_vs_kl.png", "winrate_vs_n.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG and len(data) > 20_000
    md = (out / "summary.md").read_text()
    assert "| step | KL | prompts | standard | BoN_4 | WoN_4 |" in md and "exp:t=10" in md
    for r in records:
        row = (
            f"| {r['step']} | {(r['kl'] or 0.0):.4f} | 300 | {r['standard']['win_rate']:.4f} ± "
            f"{r['standard']['stderr']:.4f} | {r['bon']['4']['win_rate']:.4f} ± {r['bon']['4']['stderr']:.4f} "
            f"| {r['won']['4']['win_rate']:.4f} ± {r['won']['4']['stderr']:.4f} |"
        )
        assert row in md and row in printed
    # The step-0 (untrained) evaluation is consistent with 0.5; the last is well above.
    assert abs(records[0]["bon"]["4"]["win_rate"] - 0.5) < 4 * records[0]["bon"]["4"]["stderr"]
    assert records[-1]["bon"]["4"]["win_rate"] > 0.8


def test_report_out_dir_json_and_resumed_steps(tmp_path, capsys):
    records = synthetic_run(tmp_path / "run", inference="won:2", transform="negexp:t=5", kls=(None, 0.2))
    # A resumed run re-evaluates step 10: the later line wins.
    redo = {**records[1], "kl": 0.25}
    with open(tmp_path / "run" / report.EVAL_LOG, "a") as f:
        f.write(json.dumps(redo) + "\n\n")
    assert main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "elsewhere"), "--json", "--no-optimal"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["metric"] == "WoN_2" and out["evaluations"] == 2 and out["last"]["kl"] == 0.25
    assert out["last"]["won"]["2"] == pytest.approx(records[1]["won"]["2"])
    assert (tmp_path / "elsewhere" / "bon_vs_kl.png").read_bytes()[:8] == PNG
    assert "| 10 | 0.2500 |" in (tmp_path / "elsewhere" / "summary.md").read_text()


def test_report_without_transform_or_kl_still_plots(tmp_path, capsys):
    records = synthetic_run(tmp_path / "run", transform=TRANSFORM, kls=(None, 0.2))
    with open(tmp_path / "run" / report.EVAL_LOG, "w") as f:
        for r in records:
            f.write(json.dumps({**r, "transform": None, "kl": None, "inference": None}) + "\n")
    assert main(["report", str(tmp_path / "run" / report.EVAL_LOG)]) == 0  # the log file itself is accepted
    assert "| 10 | - |" in capsys.readouterr().out
    assert (tmp_path / "run" / "infalign_report" / "bon_vs_kl.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize(
    "line, words",
    [
        ('{"step": 1, "kl": 0.1', "invalid JSON"),
        ('{"step": -1}', "'step' must be a non-negative integer"),
        ('{"step": 1, "kl": "big"}', "'kl' must be a finite number or null"),
        ('{"step": 1, "kl": 0.1, "standard": {"win_rate": 0.5}}', "'standard' must be"),
        ('{"step": 1, "kl": 0.1, "standard": {"win_rate": 0.5, "stderr": 0}, "bon": {"x": {}}, "won": {}}', "'bon'"),
    ],
)
def test_bad_log_lines_name_the_line(tmp_path, capsys, line, words):
    synthetic_run(tmp_path, kls=(None,), prompts=20)
    with open(tmp_path / report.EVAL_LOG, "a") as f:
        f.write(line + "\n")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{report.EVAL_LOG}:2: " in err and words in err, err


def test_missing_log_or_run_dir(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "infalign_eval.jsonl not found" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_report_marks_the_plan_beside_where_the_run_ended(tmp_path, capsys):
    # A run planned for bon:4 at 0.5 nats with a K = 16 store: the report states the plan's KL and expected BoN_4
    # (the K-aware theory at the planned beta) beside the last measured point.
    from openrlhf_infalign.core.finite_k import expected_win_rate_k
    from openrlhf_infalign.core.planning import resolve_transform

    tr, beta = resolve_transform("auto", "bon:4", 0.5, k=16)
    stat = {"win_rate": 0.5, "stderr": 0.01}
    recs = []
    for step, kl, wr in ((0, None, 0.5), (4, 0.2, 0.6), (8, 0.35, 0.7)):
        table = {str(n): {"win_rate": wr, "stderr": 0.01, "num_prompts": 10} for n in (1, 2, 4)}
        recs.append(
            {"step": step, "kl": kl, "inference": "bon:4", "transform": tr.spec, "beta": beta * 7 / 8}
            | {"kl_budget": 0.5, "planned_beta": beta, "k": 16, "standard": stat, "bon": table, "won": table}
        )
    run = tmp_path / "run"
    run.mkdir()
    with open(run / "infalign_eval.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    assert main(["report", str(run), "--json", "--no-optimal"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["kl"] == 0.5 and out["plan"]["k"] == 16
    assert out["plan"]["win_rate"] == pytest.approx(expected_win_rate_k("bon:4", tr, beta, 16))
    assert out["end"] == {"step": 8, "kl": 0.35, "win_rate": 0.7, "stderr": 0.01}
    md = (run / "infalign_report" / "summary.md").read_text()
    assert f"plan: KL 0.5 nats, BoN_4 {out['plan']['win_rate']:.4f}" in md and "ended at KL 0.35, BoN_4 0.7000" in md


def test_a_null_kl_after_step_0_never_makes_an_earlier_step_the_end():
    from openrlhf_infalign import report

    stat = {"win_rate": 0.6, "stderr": 0.01}
    base = {"standard": stat, "bon": {"4": stat}, "won": {"4": stat}}
    records = [dict(base, step=0, kl=0.0), dict(base, step=10, kl=0.8), dict(base, step=20, kl=None)]
    assert report.end_point(records, "bon", 4) is None  # the run ended at step 20, at an unmeasured KL
    records[2]["kl"] = 1.1
    assert report.end_point(records, "bon", 4) == {"step": 20, "kl": 1.1, "win_rate": 0.6, "stderr": 0.01}


@pytest.mark.parametrize("k", [1, 0])
def test_no_theory_curve_for_k_below_two(tmp_path, k):
    from openrlhf_infalign import report

    stat = {"win_rate": 0.6, "stderr": 0.01}
    records = [
        {"step": s, "kl": kl, "standard": stat, "bon": {"4": stat}, "won": {"4": stat}}
        for s, kl in ((0, 0.0), (5, 1.0))
    ]
    with pytest.raises(ValueError, match="K .* must be an integer >= 2"):
        report.plot_arms_vs_kl({"a": [records]}, {"a": "exp:t=10"}, "bon:4", tmp_path / "x.png", k=k)
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(ValueError, match="K .* must be an integer >= 2"):
        report._frontier_to("bon:4", "identity", 1.0, k=k)
