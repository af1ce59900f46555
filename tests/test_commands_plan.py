import json
import subprocess
import sys

import numpy as np
import pytest

from openrlhf_infalign.adapter.planning import plan_with_flags
from openrlhf_infalign.cli import main
from openrlhf_infalign.core import theory

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_json(capsys):
    p = _json(capsys, ["plan", "--inference", "bon:4", "--kl-budget", "0.5", "--json"])
    assert p["inference"] == "bon:4" and p["kl"] == 0.5
    rec = p["recommended"]
    assert rec["transform"].startswith("exp:t=") and rec["beta"] > 0 and 0.5 < rec["win_rate"] < 1
    assert p["optimal"]["win_rate"] >= rec["win_rate"] - 1e-6 and p["optimal"]["converged"] is True
    assert rec["win_rate"] > p["baselines"]["identity"]["win_rate"] > 0.5
    assert p["baselines"]["log"]["beta"] > 0
    args = p["openrlhf_args"]
    assert args[args.index("--infalign.transform") + 1] == rec["transform"]
    assert float(args[args.index("--algo.kl.init_coef") + 1]) == pytest.approx(rec["beta"], rel=1e-3)
    # the CLI prints what the library computes
    assert p == json.loads(json.dumps(plan_with_flags("bon:4", 0.5)))


def test_plan_table(capsys):
    assert main(["plan", "--inference", "won:4", "--kl-budget", "0.25"]) == 0
    out = capsys.readouterr().out
    p = plan_with_flags("won:4", 0.25)
    assert "Worst-of-4" in out and p["recommended"]["transform"] in out
    assert f"{p['recommended']['win_rate']:.4f}" in out
    for name in ("optimal", "identity", "log"):
        assert f"\n  {name} " in out
    assert " ".join(p["openrlhf_args"]) in out


def test_frontier_json_and_table(capsys):
    f = _json(
        capsys, ["frontier", "--inference", "bon:4", "--transform", "exp:t=10", "--kl-budget", "0.25,0.5,1", "--json"]
    )
    assert f["inference"] == "bon:4" and f["transform"] == "exp:t=10"
    assert [q["kl"] for q in f["points"]] == [0.25, 0.5, 1.0]
    for q in f["points"]:
        assert theory.kl_divergence("exp:t=10", q["beta"]) == pytest.approx(q["kl"], rel=1e-6)
        assert theory.win_rate("bon:4", "exp:t=10", q["beta"]) == pytest.approx(q["win_rate"])
    assert main(["frontier", "--inference", "won:2", "--transform", "auto", "--kl-budget", "0.1,0.5"]) == 0
    out = capsys.readouterr().out
    assert "Worst-of-2" in out and out.count("negexp:t=") == 2


def test_plots_are_written_atomically(tmp_path, capsys):
    png = tmp_path / "sub" / "plan.png"
    assert main(["plan", "--inference", "bon:2", "--kl-budget", "0.3", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    fpng = tmp_path / "frontier.png"
    assert main(["frontier", "--transform", "log", "--kl-budget", "0.2,0.4", "--plot", str(fpng), "--json"]) == 0
    assert fpng.read_bytes()[:8] == PNG_MAGIC
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp-")]
    capsys.readouterr()


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["plan", "--inference", "bon:0"], "N must be >= 1"),
        (["plan", "--inference", "bon:x"], "not an integer"),
        (["plan", "--kl-budget", "0"], "KL budget must be a positive"),
        (["plan", "--kl-budget", "-1"], "KL budget must be a positive"),
        (["frontier", "--transform", "exp:t=-1", "--kl-budget", "0.5"], "t must be a positive"),
        (["frontier", "--transform", "sigmoid", "--kl-budget", "0.5"], "unknown transform"),
        (["frontier", "--kl-budget", "0.5,abc"], "not a number"),
        (["frontier", "--kl-budget", "0.5,-2"], "KL budget must be a positive"),
        (["plan", "--k", "1"], "K (reference samples per prompt) must be an integer >= 2"),
        (["frontier", "--k", "0", "--kl-budget", "0.5"], "K (reference samples per prompt) must be an integer >= 2"),
        (["plan", "--algo.advantage.estimator", "ppo2"], "unknown advantage estimator 'ppo2'"),
        (["plan", "--algo.advantage.estimator", "rloo"], "needs --rollout.n_samples_per_prompt >= 2"),
        (
            ["plan", "--algo.advantage.estimator", "group_norm", "--rollout.n_samples_per_prompt", "4"],
            "no fixed KL coefficient",
        ),
    ],
)
def test_bad_input_exits_nonzero_with_one_line(capsys, argv, fragment):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"infalign {argv[0]}: error:") and fragment in err and "\n" not in err


def test_console_entry_point_subprocess():
    r = subprocess.run(
        [sys.executable, "-m", "openrlhf_infalign", "plan", "--inference", "bon:8", "--kl-budget", "1", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    assert p["inference"] == "bon:8" and p["recommended"]["transform"].startswith("exp:t=")
    bad = subprocess.run(
        [sys.executable, "-m", "openrlhf_infalign", "plan", "--inference", "bon:0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "bon:0" in bad.stderr


def _independent_expected_kl(transform: str, beta: float, k: int, stores: int = 40_000, seed: int = 7) -> tuple:
    # Stores of K uniform base quantiles: bin j (calibrated reward j/K) has Dirichlet(1, ..., 1) probability p_j;
    # the optimum reweights it by exp(Phi(j/K) / beta). Written from scratch, sharing no code with core/finite_k.py.
    from openrlhf_infalign.core.transforms import parse_transform

    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(k + 1), size=stores)
    logw = parse_transform(transform).phi(np.arange(k + 1) / k) / beta
    logw = logw - logw.max()
    q = p * np.exp(logw)
    q /= q.sum(axis=1, keepdims=True)
    kl = (q * (np.log(q) - np.log(p))).sum(axis=1)
    return kl.mean(), kl.std(ddof=1) / np.sqrt(stores)


def test_k_aware_plan_spends_the_budget_on_average_over_stores(capsys):
    p = _json(capsys, ["plan", "--inference", "bon:4", "--kl-budget", "0.5", "--k", "16", "--json"])
    assert p["k"] == 16
    rec = p["recommended"]
    mean, se = _independent_expected_kl(rec["transform"], rec["beta"], 16)
    assert abs(mean - 0.5) < 0.02 and se < 0.005, (mean, se)
    # the continuum beta over-spends with K = 16 (the reason for --k)
    cont = _json(capsys, ["plan", "--inference", "bon:4", "--kl-budget", "0.5", "--json"])["recommended"]
    assert cont["transform"] == rec["transform"] and cont["beta"] < rec["beta"]
    assert _independent_expected_kl(cont["transform"], cont["beta"], 16)[0] > 0.7
    # a larger K returns toward the continuum plan
    p64 = _json(capsys, ["plan", "--inference", "bon:4", "--kl-budget", "0.5", "--k", "64", "--json"])["recommended"]
    assert cont["beta"] < p64["beta"] < rec["beta"]
    assert rec["win_rate"] < p64["win_rate"] < cont["win_rate"]


def test_k_aware_frontier_matches_the_plan(capsys):
    f = _json(
        capsys,
        ["frontier", "--inference", "bon:4", "--transform", "auto", "--kl-budget", "0.5", "--k", "16", "--json"],
    )
    rec = plan_with_flags("bon:4", 0.5, k=16)["recommended"]
    assert f["points"][0]["beta"] == pytest.approx(rec["beta"]) and f["points"][0]["transform"] == rec["transform"]


def test_plan_table_shows_the_direct_row_and_its_flags(capsys):
    argv = ["plan", "--inference", "bon:4", "--kl-budget", "0.5", "--algo.advantage.estimator", "rloo"]
    assert main(argv + ["--rollout.n_samples_per_prompt", "8"]) == 0
    out = capsys.readouterr().out
    d = plan_with_flags("bon:4", 0.5, estimator="rloo", n_samples_per_prompt=8)["direct"]
    assert f"coefficient {d['coef']:.4g} on its reward, --algo.kl.init_coef {d['kl_coef']:.4g}" in out
    assert f"win rate {d['win_rate']:.4f}" in out and " ".join(d["openrlhf_args"]) in out
    assert main(argv + ["--rollout.n_samples_per_prompt", "4"]) == 0
    assert "Direct objective (infalign.direct): refused: " in capsys.readouterr().out
