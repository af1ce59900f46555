"""Fuzzing the evaluation log reader and the comparison built on it: any lines in, either the records a plain
reference reader keeps (the last line of a step wins) or one ValueError naming file:line; comparisons of any logs
either answer or refuse in one line, with no other exception."""

import json
import math
import os
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from openrlhf_infalign import compare, evallog

SCALE = int(os.environ.get("INFALIGN_FUZZ_SCALE", "1"))
FUZZ = settings(max_examples=150 * SCALE, deadline=None, derandomize=SCALE == 1, database=None)

odd = st.sampled_from([None, True, "0.5", float("nan"), float("inf"), -1, 2**70, [], {}])
num = st.one_of(st.floats(0, 1), st.integers(0, 3), odd)


@st.composite
def stat(draw):
    if draw(st.integers(0, 9)) == 0:
        return draw(odd)
    return {"win_rate": draw(num if draw(st.booleans()) else st.floats(0, 1)), "stderr": draw(st.floats(0, 0.1))}


@st.composite
def record(draw):
    step = st.one_of(st.integers(0, 5), st.integers(0, 5), odd)
    rec = {"step": draw(step), "kl": draw(st.one_of(st.floats(0, 3), odd))}
    rec["standard"] = draw(stat())
    for key in ("bon", "won"):
        ns = draw(st.lists(st.sampled_from(["1", "2", "4", "0", "x", "-1"]), min_size=0, max_size=3))
        rec[key] = {n: draw(stat()) for n in ns}
    for key, values in (
        ("k", st.one_of(st.integers(0, 64), odd)),
        ("inference", st.sampled_from(["bon:4", "won:2", "standard", None, 3])),
        ("transform", st.sampled_from(["exp:t=10", "identity", None, 1.5])),
        ("kl_budget", st.one_of(st.floats(0.01, 2), odd)),
    ):
        if draw(st.booleans()):
            rec[key] = draw(values)
    return rec


def _valid(rec) -> bool:
    """The schema of evallog.py, written out plainly."""

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def good_stat(d):
        return isinstance(d, dict) and number(d.get("win_rate")) and number(d.get("stderr")) and d["stderr"] >= 0

    step = rec.get("step")
    ok = isinstance(step, int) and not isinstance(step, bool) and 0 <= step < 2**63
    ok = ok and (rec.get("kl") is None or number(rec["kl"])) and good_stat(rec.get("standard"))
    for key in ("bon", "won"):
        t = rec.get(key)
        ok = (
            ok
            and isinstance(t, dict)
            and bool(t)
            and all(n.isdigit() and int(n) >= 1 and good_stat(s) for n, s in t.items())
        )
    k = rec.get("k")
    ok = ok and (k is None or (isinstance(k, int) and not isinstance(k, bool) and k >= 2))
    ok = ok and all(rec.get(x) is None or isinstance(rec[x], str) for x in ("inference", "transform"))
    return ok and all(rec.get(x) is None or number(rec[x]) for x in ("beta", "kl_budget", "planned_beta"))


@st.composite
def logs(draw):
    lines = [json.dumps(r, allow_nan=True).encode() for r in draw(st.lists(record(), max_size=5))]
    lines += draw(st.lists(st.sampled_from([b"", b"{", b"[]", b"\xff", b'{"step": 0}']), max_size=1))
    raw = b"\n".join(lines[i] for i in draw(st.permutations(range(len(lines)))))
    if raw and draw(st.integers(0, 4)) == 0:
        raw = raw[: draw(st.integers(0, len(raw) - 1))]  # a crash cut the last line
    return raw


@FUZZ
@given(logs())
def test_eval_log_reader_keeps_what_the_schema_allows_or_names_the_line(raw):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / evallog.EVAL_LOG
        path.write_bytes(raw)
        lines = [(i, ln) for i, ln in enumerate(raw.split(b"\n"), 1) if ln.strip()]
        try:
            got = evallog.load_eval_log(path)
        except ValueError as e:
            msg = str(e)
            assert "\n" not in msg
            if msg.endswith("has no evaluation records"):
                assert not lines
                return
            line = int(msg[len(str(path)) + 1 :].split(":", 1)[0])
            text = dict(lines)[line]
            try:
                rec = json.loads(text.decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                return  # not JSON: rightly named
            assert not (isinstance(rec, dict) and _valid(rec)), msg
            return
        want = {}
        for _, text in lines:
            rec = json.loads(text)
            assert _valid(rec)
            if rec.get("kl") is None and rec["step"] == 0:
                rec["kl"] = 0.0
            want[rec["step"]] = rec
        assert got == [want[s] for s in sorted(want)]


@FUZZ
@given(st.lists(st.tuples(logs(), st.sampled_from(["a", "b"])), min_size=1, max_size=3), st.booleans())
def test_comparisons_of_any_logs_answer_or_refuse_in_one_line(runs, grid):
    with tempfile.TemporaryDirectory() as d:
        loaded = []
        for i, (raw, label) in enumerate(runs):
            (Path(d) / f"r{i}").mkdir()
            (Path(d) / f"r{i}" / evallog.EVAL_LOG).write_bytes(raw)
            try:
                loaded.append(compare.load_run(Path(d) / f"r{i}", label=label))
            except ValueError:
                continue
        if not loaded:
            return
        try:
            out = compare.compare_runs(loaded, kl_grid=[0.5, 1.0] if grid else None)
        except ValueError as e:
            assert "\n" not in str(e)
            return
        json.dumps(out, allow_nan=False)  # JSON-ready: NaN written as null
