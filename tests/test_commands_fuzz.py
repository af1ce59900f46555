"""Fuzzing every `infalign` command's arguments: any flags, any values (paths of every kind, numbers, specs, odd
strings) in any combination. The properties: no traceback, the exit code is 0 or 2, an error is one line naming
the command (argparse's own usage lines aside), and no file that was there before changes unless --overwrite was
given and the file was named as an output.

The flags come from the commands' settings dataclasses, so a new flag is fuzzed as soon as it exists. `calibrate`
is left out (it loads models; its --out checks are in test_adapter_calibrate_settings.py). `plan` and `frontier`
always carry one value their checks refuse: their answers take seconds, and their arguments are what is fuzzed.
"""

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import MISSING, fields
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openrlhf_infalign.cli import main
from openrlhf_infalign.commands import evaluate, frontier, plan, report, score, store

SCALE = int(os.environ.get("INFALIGN_FUZZ_SCALE", "1"))


def fuzz(n):
    return settings(max_examples=n * SCALE, deadline=None, derandomize=SCALE == 1, database=None)


PATHS = [
    "st", "st/rewards.parquet", "st/index", "r.jsonl", "s.jsonl", "pol.jsonl", "run", "run/infalign_eval.jsonl",
    "run/infalign_eval_exact.jsonl", "run2", "noise", "noise/infalign_eval.jsonl", "d", "f.txt", "f.txt/x", "bad.bin",
    "empty", "man.json", "nope", "new_out", "new.png", "d/new.json", "", ".", "..", "é 1", "n" * 300, "a\x00b",
]  # fmt: skip
VALUES = [
    "-1", "0", "1", "2", "4", "16", "1e9", "nan", "inf", "-inf", "0.5", "1e-300", "x", "", "bon:4", "won:2",
    "standard", "bon:0", "won:x", "exp:t=10", "exp:t=-1", "identity", "auto", "optimal", "log", "k=v",
    "input_key=q", "é", "9" * 30, "0.25,0.5", "1,,2", "gae", "rloo", "raw", "error",
]  # fmt: skip
PATH_FIELDS = {"out", "plot", "jsonl", "store", "policy", "reference", "manifest", "noise", "run_dir"}
# Values a command accepts, drawn more than half of the time: the fuzz must reach the answers, not only the refusals.
SENSIBLE = {
    "store": ["st"], "jsonl": ["r.jsonl", "s.jsonl", "new.jsonl"], "policy": ["pol.jsonl"], "reference": ["r.jsonl", "st"],
    "manifest": ["man.json"], "run_dir": ["run", "run2/infalign_eval_exact.jsonl", "run2"], "noise": ["noise"],
    "out": ["new_out", "d/new.json"], "plot": ["new.png"], "inference": ["bon:4", "won:2"], "eval_n": ["1,2,4"],
    "kl_grid": ["0.3,0.5"], "k": ["16"], "label": ["a", "b"], "baseline": ["a"],
    "transform": ["identity", "exp:t=10"], "kl_budget": ["0.5"], "on_missing": ["raw"], "head": ["2"],
    "k_min": ["4"], "template": ["input_key=q"], "sampling": ["temperature=1"],
}  # fmt: skip
OUTPUT_FLAGS = {"--out", "--plot"}
# A value each command's checks refuse, for the commands whose answers take seconds.
POISON = {
    "plan": [("--kl-budget", "-1"), ("--inference", "bon:0"), ("--k", "1"), ("--plot", "d")],
    "frontier": [("--kl-budget", "nan"), ("--transform", "exp:t=-1"), ("--k", "0"), ("--plot", "f.txt/x")],
}


def _stat(w, se=0.01):
    return {"win_rate": w, "stderr": se}


def _log(path, points, se=0.01):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for step, kl, w in points:
            table = {"1": _stat(w, se), "4": _stat(w, se)}
            rec = {"step": step, "kl": kl, "inference": "bon:4", "transform": "exp:t=10", "k": 16}
            f.write(json.dumps({**rec, "standard": _stat(w, se), "bon": table, "won": table}) + "\n")


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_template")
    rng = np.random.default_rng(0)
    rows = [{"prompt": f"p{i}", "rewards": rng.normal(size=16).round(3).tolist()} for i in range(4)]
    (root / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "s.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "reward": 0.1 * i}) + "\n" for i in range(4)))
    pol = [{"prompt": f"p{i}", "rewards": rng.normal(size=8).round(3).tolist()} for i in range(4)]
    (root / "pol.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pol))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert (
            main(["store", "import", "--jsonl", str(root / "r.jsonl"), "--out", str(root / "st"), "--no-progress"])
            == 0
        )
    _log(root / "run" / "infalign_eval.jsonl", [(0, None, 0.5), (4, 0.3, 0.6), (8, 0.7, 0.7)])
    _log(root / "run" / "infalign_eval_exact.jsonl", [(0, 0.0, 0.5), (4, 0.31, 0.61)], se=0.0)
    _log(root / "run2" / "infalign_eval.jsonl", [(0, None, 0.5), (4, 0.4, 0.65), (8, 0.9, 0.72)])
    _log(root / "run2" / "infalign_eval_exact.jsonl", [(0, 0.0, 0.5), (4, 0.41, 0.66)], se=0.0)
    _log(root / "noise" / "infalign_eval.jsonl", [(0, None, 0.5), (4, 0.2, 0.5), (8, 0.15, 0.5)])
    (root / "d").mkdir()
    (root / "f.txt").write_text("mine")
    (root / "bad.bin").write_bytes(b"\xff\xfe\x00{")
    (root / "empty").write_text("")
    (root / "man.json").write_text('{"policy_model": "m", "template": {"input_key": "q"}}')
    (root / "é 1").write_text("mine too")
    return root


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@st.composite
def argv_for(draw, command, cls, sub=None):
    argv = [command] + ([sub] if sub else [])
    for f in fields(cls):
        m = f.metadata
        pool = st.sampled_from(PATHS if f.name in PATH_FIELDS else VALUES)
        if f.name in SENSIBLE:
            pool = st.one_of(st.sampled_from(SENSIBLE[f.name]), pool) if draw(st.booleans()) else pool
            pool = st.sampled_from(SENSIBLE[f.name]) if draw(st.floats(0, 1)) < 0.5 else pool
        if m["positional"]:
            argv += draw(st.lists(pool, min_size=1, max_size=3 if m["nargs"] == "+" else 1))
            continue
        if not draw(st.floats(0, 1)) < (0.85 if f.default is MISSING else 0.3):
            continue
        if f.name == "noise_floor" and "--noise" in argv and draw(st.floats(0, 1)) < 0.8:
            continue  # both is one refusal; mostly leave the report something to answer
        flag = m["flags"][0]
        if typing_bool(cls, f):
            argv.append(flag)
        else:
            for _ in range(draw(st.integers(1, 3)) if m["append"] else 1):
                argv += [flag, draw(pool)]
    if command in POISON:
        argv += list(draw(st.sampled_from(POISON[command])))
    return argv


def typing_bool(cls, f) -> bool:
    import typing

    return typing.get_type_hints(cls)[f.name] is bool


def _run_in(template: Path, argv: list[str]) -> None:
    with tempfile.TemporaryDirectory() as d:
        work = Path(d) / "w"
        shutil.copytree(template, work)
        before = _snapshot(work)
        out, err = io.StringIO(), io.StringIO()
        cwd = os.getcwd()
        os.chdir(work)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    rc = main(list(argv))
                except SystemExit as e:  # argparse: usage, then one error line
                    rc = e.code
        finally:
            os.chdir(cwd)
        # tqdm's progress lines (store import/export) are no messages
        lines = [
            x for x in err.getvalue().strip().splitlines() if x.strip() and not re.search(r"\d+%\||\?B/s|it/s\]", x)
        ]
        assert rc in (0, 2), (argv, rc, lines)
        if rc == 2:
            assert lines and lines[-1].startswith(f"infalign {argv[0]}") and "error:" in lines[-1], (argv, lines)
            if not any(line.startswith("usage:") for line in lines):
                assert len(lines) == 1, (argv, lines)
        after = _snapshot(work)
        named = {os.path.normpath(v) for k, v in zip(argv, argv[1:]) if k in OUTPUT_FLAGS | {"--jsonl"} and v}
        for name, data in before.items():
            if after.get(name) != data:
                replaced = "--overwrite" in argv and any(name == n or name.startswith(n + "/") for n in named)
                assert replaced, (argv, f"{name} changed or went missing")


@fuzz(25)
@given(st.data())
def test_store_arguments(template, data):
    sub, cls = data.draw(
        st.sampled_from(
            [
                ("import", store.StoreImportSettings),
                ("info", store.StoreInfoSettings),
                ("export", store.StoreExportSettings),
            ]
        )
    )
    _run_in(template, data.draw(argv_for("store", cls, sub)))


@fuzz(25)
@given(st.data())
def test_score_and_evaluate_arguments(template, data):
    command, cls = data.draw(
        st.sampled_from([("score", score.ScoreSettings), ("evaluate", evaluate.EvaluateSettings)])
    )
    _run_in(template, data.draw(argv_for(command, cls)))


@fuzz(20)
@given(st.data())
def test_report_arguments(template, data):
    _run_in(template, data.draw(argv_for("report", report.ReportSettings)) + ["--no-optimal"])


@fuzz(15)
@given(st.data())
def test_plan_and_frontier_arguments(template, data):
    command, cls = data.draw(st.sampled_from([("plan", plan.PlanSettings), ("frontier", frontier.FrontierSettings)]))
    _run_in(template, data.draw(argv_for(command, cls)))
