"""`infalign evaluate`: JSONL / store inputs, missing prompts, bad rows, JSON shape, table and plot."""

import hashlib
import json

import numpy as np
import pytest

from openrlhf_infalign.cli import main
from openrlhf_infalign.core.winrate import win_rates


def sha1(prompt):
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def run_json(capsys, *argv):
    assert main(["evaluate", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def fail(capsys, *argv):
    assert main(["evaluate", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("infalign evaluate: error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def data(tmp_path):
    """12 prompts, ragged sizes, integer rewards (ties); policy rows mix prompt / prompt_key; one prompt split."""
    rng = np.random.default_rng(0)
    prompts = [f"question {i}: ünïcode ok?" for i in range(12)]
    pol = {p: rng.integers(0, 5, size=int(rng.integers(4, 9))).astype(float) for p in prompts}
    ref = {p: rng.integers(0, 4, size=int(rng.integers(4, 12))).astype(float) for p in prompts}
    pol_rows = []
    for i, p in enumerate(prompts):
        key = {"prompt": p} if i % 2 else {"prompt_key": sha1(p)}
        if i == 3:  # one prompt's samples over two rows: pooled
            pol_rows += [{**key, "rewards": pol[p][:2].tolist()}, {"prompt": p, "rewards": pol[p][2:].tolist()}]
        else:
            pol_rows.append({**key, "rewards": pol[p].tolist()})
    ref_rows = [{"prompt": p, "rewards": ref[p].tolist()} for p in reversed(prompts)]  # order does not matter
    return {
        "prompts": prompts,
        "pol": pol,
        "ref": ref,
        "P": write_jsonl(tmp_path / "policy.jsonl", pol_rows),
        "R": write_jsonl(tmp_path / "reference.jsonl", ref_rows),
        "dir": tmp_path,
    }


def test_json_matches_estimator_on_the_matched_prompts(capsys, data):
    out = run_json(capsys, "--policy", data["P"], "--reference", data["R"], "--eval-n", "1,2,4")
    want = win_rates([data["pol"][p] for p in data["prompts"]], [data["ref"][p] for p in data["prompts"]], [1, 2, 4])
    assert out["num_prompts"] == 12 and "skipped_missing" not in out
    assert out["standard"] == pytest.approx(want["standard"])
    for key in ("bon", "won"):
        assert list(out[key]) == ["1", "2", "4"]
        for n in ("1", "2", "4"):
            assert out[key][n] == pytest.approx(want[key][n])
    assert out["policy_samples"]["min"] >= 4 and out["reference_samples"]["max"] <= 11


def test_default_n_is_powers_of_two_up_to_what_every_prompt_has(capsys, data):
    out = run_json(capsys, "--policy", data["P"], "--reference", data["R"])
    top = min(min(len(data["pol"][p]), len(data["ref"][p])) for p in data["prompts"])
    assert [int(n) for n in out["bon"]] == [n for n in (1, 2, 4, 8) if n <= top]
    assert all(v["num_prompts"] == 12 for v in out["bon"].values())


def test_n_larger_than_some_prompts_uses_fewer_prompts(capsys, data):
    assert main(["evaluate", "--policy", data["P"], "--reference", data["R"], "--eval-n", "1,7", "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert "N=[7] use only the prompts" in captured.err
    fits = sum(min(len(data["pol"][p]), len(data["ref"][p])) >= 7 for p in data["prompts"])
    assert 0 < fits < 12 and out["bon"]["7"]["num_prompts"] == fits
    err = fail(capsys, "--policy", data["P"], "--reference", data["R"], "--eval-n", "1,64")
    assert "fits no prompt" in err


def test_prompts_on_one_side_only(capsys, data, tmp_path):
    extra_ref = write_jsonl(
        tmp_path / "r2.jsonl",
        [{"prompt": p, "rewards": data["ref"][p].tolist()} for p in data["prompts"][2:]]
        + [{"prompt": f"only in reference {i}", "rewards": [0.0]} for i in range(7)],
    )
    err = fail(capsys, "--policy", data["P"], "--reference", extra_ref)
    # question 0 is known by its prompt_key only (no text anywhere): its key is shown; question 1 by its text.
    assert "2 prompt(s) of" in err and sha1(data["prompts"][0]) in err and "question 1" in err
    assert "7 prompt(s) of" in err and "only in reference 4" in err and "(2 more)" in err
    assert "--skip-missing" in err
    out = run_json(capsys, "--policy", data["P"], "--reference", extra_ref, "--skip-missing", "--eval-n", "1,2")
    assert out["skipped_missing"] == 9 and out["skipped_policy_only"] == 2 and out["skipped_reference_only"] == 7
    kept = data["prompts"][2:]
    want = win_rates([data["pol"][p] for p in kept], [data["ref"][p] for p in kept], [1, 2])
    assert out["num_prompts"] == 10 and out["bon"]["2"]["win_rate"] == pytest.approx(want["bon"]["2"]["win_rate"])


@pytest.mark.parametrize(
    "line, words",
    [
        ('{"prompt": "a", "rewards": [1, 2', "invalid JSON"),
        ('{"prompt": "a", "rewards": [1, NaN]}', "rewards[1] is nan"),
        ('{"prompt": "a", "rewards": [1, Infinity]}', "rewards[1] is inf"),
        ('{"prompt": "a", "rewards": []}', "non-empty list"),
        ('{"prompt": "a", "rewards": [1, "2"]}', "not a number"),
        ('{"prompt": "a", "rewards": [true]}', "not a number"),
        ('{"rewards": [1.0]}', "neither 'prompt' nor 'prompt_key'"),
        ('{"prompt_key": "abc", "rewards": [1.0]}', "40-character sha1"),
        ('{"prompt": "a", "prompt_key": "' + "0" * 40 + '", "rewards": [1.0]}', "is not the sha1"),
        ("[1, 2]", "expected an object"),
    ],
)
def test_bad_rows_name_file_and_line(capsys, tmp_path, line, words):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "rewards": [1.0]}, "", line])
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "ok", "rewards": [1.0]}])
    err = fail(capsys, "--policy", bad, "--reference", good)
    assert f"{bad}:3: " in err and words in err, err
    err = fail(capsys, "--policy", good, "--reference", bad)
    assert f"{bad}:3: " in err


def test_bad_arguments(capsys, data, tmp_path):
    assert "not an integer" in fail(capsys, "--policy", data["P"], "--reference", data["R"], "--eval-n", "1,x")
    assert "no such file" in fail(capsys, "--policy", str(tmp_path / "nope.jsonl"), "--reference", data["R"])
    assert "not a reference store" in fail(capsys, "--policy", data["P"], "--reference", str(tmp_path))
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    assert "no rows" in fail(capsys, "--policy", empty, "--reference", data["R"])


@pytest.mark.filterwarnings("ignore:.*coarse")  # K < 16 is fine for win rates, it only matters for calibration
def test_reference_store_directory(capsys, data, tmp_path):
    store_mod = pytest.importorskip("openrlhf_infalign.store")
    # Rewards that are not exactly representable in float32: ties must survive the store's float32 precision.
    vals = np.array([0.1, 0.2, 0.3, 0.7])
    rng = np.random.default_rng(1)
    pol = {p: rng.choice(vals, size=6) for p in data["prompts"]}
    ref = {p: rng.choice(vals, size=9) for p in data["prompts"]}
    ref_extra = {**ref, "a prompt only the store has": np.array([0.5])}
    store = store_mod.write_store(tmp_path / "store", [sha1(p) for p in ref_extra], [ref_extra[p] for p in ref_extra])
    p_path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p, "rewards": pol[p].tolist()} for p in pol])
    r_path = write_jsonl(tmp_path / "r.jsonl", [{"prompt": p, "rewards": ref[p].tolist()} for p in ref])
    from_store = run_json(capsys, "--policy", p_path, "--reference", str(store), "--eval-n", "1,2,6")
    from_jsonl = run_json(capsys, "--policy", p_path, "--reference", r_path, "--eval-n", "1,2,6")
    assert from_store["num_prompts"] == 12 and from_store["reference_samples"] == {"min": 9, "max": 9}
    for key in ("bon", "won"):
        for n in ("1", "2", "6"):
            assert from_store[key][n]["win_rate"] == pytest.approx(from_jsonl[key][n]["win_rate"], abs=1e-12)
    # A policy prompt the store lacks: an error naming it, or skipped on request.
    p2 = write_jsonl(
        tmp_path / "p2.jsonl",
        [{"prompt": "unknown prompt", "rewards": [1.0]}] + [{"prompt": p, "rewards": pol[p].tolist()} for p in pol],
    )
    assert "'unknown prompt'" in fail(capsys, "--policy", p2, "--reference", str(store))
    out = run_json(capsys, "--policy", p2, "--reference", str(store), "--skip-missing", "--eval-n", "1")
    assert out["skipped_missing"] == 1 and out["num_prompts"] == 12


def test_table_and_plot(capsys, data, tmp_path):
    png = tmp_path / "plots" / "winrate.png"
    assert main(["evaluate", "--policy", data["P"], "--reference", data["R"], "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "Best-of-N win rate" in out and "Worst-of-N win rate" in out and "standard win rate" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert [p.name for p in png.parent.iterdir()] == ["winrate.png"]  # no temporary file left behind


def test_help_lists_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    out = capsys.readouterr().out
    for flag in ("--policy", "--reference", "--eval-n", "--json", "--plot", "--skip-missing"):
        assert flag in out


def test_integer_reward_beyond_float_range_is_a_row_error(tmp_path, capsys):
    from openrlhf_infalign.cli import main

    (tmp_path / "ref.jsonl").write_text('{"prompt": "a", "rewards": [1.0, 2.0]}\n')
    (tmp_path / "pol.jsonl").write_text('{"prompt": "a", "rewards": [1' + "0" * 400 + "]}\n")
    assert main(["evaluate", "--policy", str(tmp_path / "pol.jsonl"), "--reference", str(tmp_path / "ref.jsonl")]) == 2
    assert "pol.jsonl:1" in capsys.readouterr().err
