"""`infalign score`: calibrated (exact mid-rank) and transformed rewards in input order; bad rows named."""

import json
import math
import warnings

import numpy as np
import pytest

from openrlhf_infalign.cli import main
from openrlhf_infalign.core.transforms import parse_transform
from openrlhf_infalign.store import prompt_key, write_store


@pytest.fixture
def store(tmp_path):
    rng = np.random.default_rng(0)
    prompts = [f"Q : item {i} A :" for i in range(12)]
    refs = [rng.integers(0, 5, size=int(rng.integers(1, 20))) / 2 for _ in prompts]  # K from 1, with ties
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_store(tmp_path / "st", None, refs, prompts=prompts)
    return tmp_path / "st", prompts, refs


def write_samples(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_score_matches_midrank_in_input_order(store, tmp_path, capsys, midrank):
    st, prompts, refs = store
    rng = np.random.default_rng(1)
    idx = rng.integers(0, len(prompts), size=60)
    rewards = rng.integers(-1, 6, size=60) / 2
    rows = []
    for j, (i, r) in enumerate(zip(idx, rewards)):
        rows.append(
            {"prompt": prompts[i], "reward": float(r)}
            if j % 2
            else {"prompt_key": prompt_key(prompts[i]), "reward": float(r)}
        )
    src = write_samples(tmp_path / "samples.jsonl", rows)
    out_file = tmp_path / "scored.json"
    assert (
        main(
            [
                "score",
                "--store",
                str(st),
                "--jsonl",
                str(src),
                "--transform",
                "exp:t=3",
                "--json",
                "--out",
                str(out_file),
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert json.loads(out_file.read_text()) == res
    assert res["num_rows"] == 60 and res["transform"] == "exp:t=3"
    tr = parse_transform("exp:t=3")
    for j, row in enumerate(res["rows"]):
        i = idx[j]
        assert row["prompt_key"] == prompt_key(prompts[i])
        assert row["reward"] == rewards[j]
        assert row["calibrated"] == midrank(rewards[j], refs[i])
        assert row["transformed"] == pytest.approx(float(tr(np.array([row["calibrated"]]))[0]), abs=0, rel=1e-15)
        # exp:t=3 normalised: (e^{3u} - 1) / (e^3 - 1)
        assert row["transformed"] == pytest.approx(math.expm1(3 * row["calibrated"]) / math.expm1(3), rel=1e-12)
    # Text mode shows a table and the means.
    assert main(["score", "--store", str(st), "--jsonl", str(src)]) == 0
    text = capsys.readouterr().out
    assert "transform identity" in text and "mean calibrated" in text and "40 more rows" in text


def test_default_transform_is_identity(store, tmp_path, capsys, midrank):
    st, prompts, refs = store
    src = write_samples(tmp_path / "s.jsonl", [{"prompt": prompts[0], "reward": 1.0}])
    assert main(["score", "--store", str(st), "--jsonl", str(src), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["transformed"] == row["calibrated"] == midrank(1.0, refs[0])


def test_missing_prompt_error_names_line_and_raw_fallback(store, tmp_path, capsys):
    st, prompts, _ = store
    src = write_samples(
        tmp_path / "s.jsonl", [{"prompt": prompts[0], "reward": 1.0}, {"prompt": "never seen", "reward": 0.5}]
    )
    assert main(["score", "--store", str(st), "--jsonl", str(src)]) == 2
    err = capsys.readouterr().err
    assert (
        "line 2" in err and prompt_key("never seen") in err and "'never seen'" in err and "infalign calibrate" in err
    )
    assert main(["score", "--store", str(st), "--jsonl", str(src), "--on-missing", "raw", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["num_missing"] == 1
    assert res["rows"][1] == {
        "prompt_key": prompt_key("never seen"),
        "reward": 0.5,
        "calibrated": None,
        "transformed": None,
        "missing": True,
    }
    assert res["rows"][0]["calibrated"] is not None


@pytest.mark.parametrize(
    "bad, pattern",
    [
        ('{"prompt": "a", "reward": NaN}', "NaN/inf"),
        ('{"prompt": "a", "reward": "high"}', '"reward" must be a number'),
        ('{"prompt": "a"}', '"reward" must be a number'),
        ('{"reward": 1.0}', 'needs "prompt"'),
        ('{"prompt_key": "abc", "reward": 1.0}', "40-character"),
        ("not json", "not valid JSON"),
    ],
)
def test_bad_sample_rows(store, tmp_path, capsys, bad, pattern):
    st, prompts, _ = store
    src = write_samples(tmp_path / "s.jsonl", [{"prompt": prompts[0], "reward": 1.0}, bad])
    assert main(["score", "--store", str(st), "--jsonl", str(src)]) == 2
    err = capsys.readouterr().err
    assert f"{src}:2:" in err and pattern in err


def test_bad_transform_spec(store, tmp_path, capsys):
    st, prompts, _ = store
    src = write_samples(tmp_path / "s.jsonl", [{"prompt": prompts[0], "reward": 1.0}])
    assert main(["score", "--store", str(st), "--jsonl", str(src), "--transform", "cubic"]) == 2
    assert "unknown transform" in capsys.readouterr().err
    assert main(["score", "--store", str(st), "--jsonl", str(src), "--transform", "auto"]) == 2
    assert "inference" in capsys.readouterr().err


def test_integer_reward_beyond_float_range_is_a_row_error(tmp_path, capsys):
    from openrlhf_infalign.cli import main

    (tmp_path / "refs.jsonl").write_text('{"prompt": "a", "rewards": [1.0, 2.0]}\n')
    assert main(["store", "import", "--jsonl", str(tmp_path / "refs.jsonl"), "--out", str(tmp_path / "s")]) == 0
    (tmp_path / "samples.jsonl").write_text('{"prompt": "a", "reward": 1' + "0" * 400 + "}\n")
    capsys.readouterr()
    assert main(["score", "--store", str(tmp_path / "s"), "--jsonl", str(tmp_path / "samples.jsonl")]) == 2
    assert "samples.jsonl:1" in capsys.readouterr().err
