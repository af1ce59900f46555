"""`infalign store import|info|export`: round trip, manifest fields, bad rows named by file and line."""

import json
import warnings

import numpy as np
import pytest

from openrlhf_infalign.cli import main
from openrlhf_infalign.store import ReferenceStore, prompt_key


def open_quiet(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ReferenceStore.open(path)


def test_import_info_export_round_trip(tmp_path, capsys, ref_rows, write_jsonl):
    src = write_jsonl(tmp_path / "refs.jsonl", ref_rows() + [""])  # a blank line is skipped
    rc = main(
        [
            "store", "import", "--jsonl", str(src), "--out", str(tmp_path / "st"), "--no-progress",
            "--policy-model", "tiny-sft", "--reward-source", "rm.py",
            "--template", "input_key=prompt", "--template", "apply_chat_template=true",
            "--sampling", "temperature=1.0",
        ]
    )  # fmt: skip
    assert rc == 0
    assert "30 prompts" in capsys.readouterr().out
    s = open_quiet(tmp_path / "st")
    m = s.manifest
    assert m["policy_model"] == "tiny-sft" and m["reward_source"] == "rm.py"
    assert m["template"] == {"input_key": "prompt", "apply_chat_template": True}
    assert m["sampling"] == {"temperature": 1.0} and m["k"] == 20
    for r in ref_rows():
        key = r.get("prompt_key") or prompt_key(r["prompt"])
        np.testing.assert_array_equal(s.rewards_for_key(key), np.sort(np.float32(r["rewards"])))

    assert main(["store", "info", str(tmp_path / "st"), "--json", "--verify"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_prompts"] == 30 and info["k"]["median"] == 20 and info["verified"]
    assert info["manifest"]["policy_model"] == "tiny-sft"
    assert main(["store", "info", str(tmp_path / "st")]) == 0
    text = capsys.readouterr().out
    assert "prompts      30" in text and "min 20 / median 20 / max 20" in text

    out = tmp_path / "back.jsonl"
    assert main(["store", "export", str(tmp_path / "st"), "--jsonl", str(out), "--no-progress"]) == 0
    back = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(back) == 30
    # Re-import the export, carrying the manifest over: identical arrays and user manifest fields.
    rc = main(
        ["store", "import", "--jsonl", str(out), "--out", str(tmp_path / "st2"), "--no-progress",
         "--manifest", str(tmp_path / "st" / "manifest.json")]
    )  # fmt: skip
    assert rc == 0
    s2 = open_quiet(tmp_path / "st2")
    np.testing.assert_array_equal(s2.values, s.values)
    np.testing.assert_array_equal(s2.offsets, s.offsets)
    assert s2.keys() == s.keys()
    for k in ("policy_model", "reward_source", "template", "sampling", "k"):
        assert s2.manifest[k] == s.manifest[k]
    # Prompt text survives the round trip where it was given.
    assert sum("prompt" in r for r in back) == 20
    # Exporting to an existing file needs --overwrite.
    assert main(["store", "export", str(tmp_path / "st"), "--jsonl", str(out), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    "bad_line, pattern",
    [
        ('{"prompt": "x", "rewards": [1.0, NaN]}', "not a finite"),
        ('{"prompt": "x", "rewards": [1.0, Infinity]}', "not a finite"),
        ('{"prompt": "x", "rewards": [1.0, 1e39]}', "not a finite float32"),
        ('{"prompt": "x", "rewards": []}', "empty"),
        ('{"prompt": "x", "rewards": [1, "a"]}', "must hold numbers"),
        ('{"prompt": "x", "rewards": 3}', "must be a list"),
        ('{"prompt": "x", "rewards": [1.0}', "not valid JSON"),
        ('{"prompt_key": "zz", "rewards": [1.0]}', "40-character sha1 hex"),
        ('{"prompt_key": "' + "g" * 40 + '", "rewards": [1.0]}', "not hexadecimal"),
        ('{"prompt": "x", "prompt_key": "' + "0" * 40 + '", "rewards": [1.0]}', "is not sha1 of"),
        ('{"rewards": [1.0]}', 'needs "prompt"'),
        ("[1, 2]", "expected a JSON object"),
        ('{"prompt": "x", "rewards": [true, 1.0]}', "must hold numbers, found True"),
        ('{"prompt": "x", "rewards": [1.0, "2"]}', "must hold numbers, found '2'"),
        ('{"prompt": "x", "rewards": [1.0, null]}', "must hold numbers, found None"),
        ('{"prompt": "x", "rewards": [1' + "0" * 400 + "]}", "out of range"),
        ('{"prompt": 7, "rewards": [1.0]}', '"prompt" must be a string'),
    ],
)
def test_bad_row_is_named_by_file_and_line(tmp_path, capsys, bad_line, pattern, ref_rows, write_jsonl):
    src = write_jsonl(tmp_path / "refs.jsonl", ref_rows(3) + [bad_line] + ref_rows(2, seed=1))
    rc = main(["store", "import", "--jsonl", str(src), "--out", str(tmp_path / "st"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("infalign store: error: ")
    assert f"{src}:4:" in err and pattern in err
    assert not (tmp_path / "st").exists()


def test_duplicate_prompts(tmp_path, capsys, write_jsonl):
    rows = [
        {"prompt": "a", "rewards": [1.0, 2.0]},
        {"prompt": "b", "rewards": [1.0]},
        {"prompt_key": prompt_key("a"), "rewards": [2.0, 1.0]},  # same multiset: merged
        {"prompt": "c", "rewards": [0.0]},
        "",  # blank line: line numbers still count it
        {"prompt": "b", "rewards": [5.0]},  # different: error naming both lines
    ]
    src = write_jsonl(tmp_path / "refs.jsonl", rows)
    assert main(["store", "import", "--jsonl", str(src), "--out", str(tmp_path / "st"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{src}:6 (prompt 'b') repeats the prompt of {src}:2 with a different reward set" in err
    src = write_jsonl(tmp_path / "refs2.jsonl", rows[:4])
    with pytest.warns(UserWarning, match="merged 1 duplicated"):
        assert main(["store", "import", "--jsonl", str(src), "--out", str(tmp_path / "st"), "--no-progress"]) == 0
    assert open_quiet(tmp_path / "st").num_prompts == 3


def test_k_min_and_small_k_warning(tmp_path, capsys, write_jsonl):
    src = write_jsonl(
        tmp_path / "refs.jsonl", [{"prompt": "a", "rewards": [1.0] * 20}, {"prompt": "b", "rewards": [1.0]}]
    )
    assert (
        main(["store", "import", "--jsonl", str(src), "--out", str(tmp_path / "x"), "--k-min", "2", "--no-progress"])
        == 2
    )
    assert f"{src}:2: 1 rewards (< --k-min 2)" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="below 16"):
        assert main(["store", "import", "--jsonl", str(src), "--out", str(tmp_path / "y"), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["store", "info", str(tmp_path / "y")]) == 0
    assert "K below 16" in capsys.readouterr().out


def test_import_refuses_existing_store_without_overwrite(tmp_path, capsys, ref_rows, write_jsonl):
    src = write_jsonl(tmp_path / "refs.jsonl", ref_rows(3))
    args = ["store", "import", "--jsonl", str(src), "--out", str(tmp_path / "st"), "--no-progress"]
    assert main(args) == 0
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0


def test_info_on_missing_and_newer_store(tmp_path, capsys, ref_rows, write_jsonl):
    assert main(["store", "info", str(tmp_path / "nothing")]) == 2
    assert "not a reference store" in capsys.readouterr().err
    src = write_jsonl(tmp_path / "refs.jsonl", ref_rows(3))
    main(["store", "import", "--jsonl", str(src), "--out", str(tmp_path / "st"), "--no-progress"])
    man = json.loads((tmp_path / "st" / "manifest.json").read_text())
    man["format_version"] = 99
    (tmp_path / "st" / "manifest.json").write_text(json.dumps(man))
    capsys.readouterr()
    assert main(["store", "info", str(tmp_path / "st")]) == 2
    assert "format_version 99 is newer" in capsys.readouterr().err


def test_prompt_key_with_spaces_is_not_hexadecimal(tmp_path, capsys):
    # bytes.fromhex skips whitespace: a 40-character key with spaces must not decode to a short digest.
    from openrlhf_infalign.cli import main

    src = tmp_path / "refs.jsonl"
    src.write_text('{"prompt_key": "%s", "rewards": [1.0]}\n' % ("ab" * 19 + "  "))
    assert main(["store", "import", "--jsonl", str(src), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "refs.jsonl:1" in err and "not hexadecimal" in err
