"""evallog.py: the evaluation log's writer (whole lines, even from concurrent writers) and reader (validated)."""

import json
import re
import threading

import pytest

from openrlhf_infalign import evallog


def test_append_record_whole_lines_under_concurrency(tmp_path):
    path = str(tmp_path / "deep" / "infalign_eval.jsonl")
    big = {"pad": "x" * 20000}

    def writer(w):
        for i in range(25):
            evallog.append_record(path, {"writer": w, "i": i, **big})

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    with open(path) as f:
        lines = f.read().splitlines()
    recs = [json.loads(line) for line in lines]
    assert sorted((r["writer"], r["i"]) for r in recs) == [(w, i) for w in range(4) for i in range(25)]
    with pytest.raises(ValueError):  # NaN is not JSON: refused before anything is written
        evallog.append_record(path, {"x": float("nan")})
    assert len(open(path).read().splitlines()) == 100


def test_load_eval_log_validates_and_keeps_the_last_record_of_a_step(tmp_path):
    stat = {"win_rate": 0.5, "stderr": 0.01}
    rec = {"step": 0, "kl": None, "standard": stat, "bon": {"1": stat}, "won": {"1": stat}}
    path = tmp_path / evallog.EVAL_LOG
    for r in (rec, {**rec, "step": 4, "kl": 0.2}, {**rec, "step": 4, "kl": 0.3}):
        evallog.append_record(path, r)
    recs = evallog.load_eval_log(evallog.eval_log_path(tmp_path))
    assert [(r["step"], r["kl"]) for r in recs] == [(0, 0.0), (4, 0.3)]  # kl null at step 0 reads 0
    with open(path, "a") as f:
        f.write('{"step": 5, "kl": 0.1, "standard": {"win_rate": 0.5}, "bon": {"1": {}}, "won": {}}\n')
    with pytest.raises(ValueError, match=f"{evallog.EVAL_LOG}:4: 'standard' must be"):
        evallog.load_eval_log(path)
    with pytest.raises(FileNotFoundError, match="written by the training hook"):
        evallog.load_eval_log(tmp_path / "nope.jsonl")
    # A run folder with only its exact evaluation: the error points at that log.
    (tmp_path / "exact").mkdir()
    (tmp_path / "exact" / evallog.EXACT_LOG).write_text(path.read_text())
    with pytest.raises(FileNotFoundError, match=f"has an exact evaluation: pass .*exact/{evallog.EXACT_LOG}"):
        evallog.load_eval_log(evallog.eval_log_path(tmp_path / "exact"))


@pytest.mark.parametrize(
    "change, words",
    [
        ({"k": 1}, "'k' must be an integer >= 2 or null, got 1"),
        ({"k": True}, "'k' must be an integer >= 2 or null"),
        ({"transform": 3}, "'transform' must be a string or null"),
        ({"planned_beta": "0.1"}, "'planned_beta' must be a finite number or null"),
        ({"standard": {"win_rate": float("nan"), "stderr": 0.1}}, "'standard' must be"),
        ({"standard": {"win_rate": 0.5, "stderr": -0.1}}, "'standard' must be"),
        ({"standard": {"win_rate": True, "stderr": 0.1}}, "'standard' must be"),
        ({"kl_stderr": -0.01}, "'kl_stderr' must be a finite number >= 0 or null, got -0.01"),
        ({"kl_stderr": "0.1"}, "'kl_stderr' must be a finite number >= 0 or null"),
    ],
)
def test_plan_fields_and_stats_are_checked_by_line(tmp_path, change, words):
    stat = {"win_rate": 0.5, "stderr": 0.01}
    good = {"step": 0, "kl": 0.0, "standard": stat, "bon": {"1": stat}, "won": {"1": stat}}
    path = tmp_path / "infalign_eval.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "step": 1, **change}) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: {words}")):
        evallog.load_eval_log(path)


def test_a_byte_that_is_not_utf8_names_its_line(tmp_path):
    stat = {"win_rate": 0.5, "stderr": 0.01}
    good = json.dumps({"step": 0, "kl": 0.0, "standard": stat, "bon": {"1": stat}, "won": {"1": stat}})
    path = tmp_path / "infalign_eval.jsonl"
    path.write_bytes(good.encode() + b"\n" + good.encode()[:-1] + b"\xff}\n")
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: not UTF-8 text")):
        evallog.load_eval_log(path)
    path.write_text(good.replace('"step": 0', '"step": 1180591620717411303424') + "\n")
    with pytest.raises(ValueError, match="'step' must be a non-negative integer"):
        evallog.load_eval_log(path)
