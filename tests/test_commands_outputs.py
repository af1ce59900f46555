"""Every command's outputs and inputs as an adversary gives them: an existing file is replaced only with --overwrite,
never an input (not even with it), a folder given for a file and a file given for a folder are one-line errors, a
store is replaced only when it is one, and a damaged store is named by `store info --verify` with the fix."""

import json
import os

import numpy as np
import pytest

from openrlhf_infalign.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


def one_line_error(capsys, command, *words):
    err = capsys.readouterr().err
    assert err.startswith(f"infalign {command}: error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, err
    return err


@pytest.fixture
def refs(tmp_path, write_jsonl):
    rng = np.random.default_rng(0)
    rows = [{"prompt": f"p{i}", "rewards": rng.normal(size=16).round(3).tolist()} for i in range(6)]
    src = write_jsonl(tmp_path / "refs.jsonl", rows)
    assert main(["store", "import", "--jsonl", str(src), "--out", str(tmp_path / "store"), "--no-progress"]) == 0
    samples = write_jsonl(tmp_path / "samples.jsonl", [{"prompt": f"p{i}", "reward": 0.1 * i} for i in range(6)])
    return tmp_path, src, tmp_path / "store", samples


def test_store_import_replaces_only_a_store_and_never_its_input(refs, capsys):
    tmp, src, store, _ = refs
    capsys.readouterr()
    mine = tmp / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    imp = ["store", "import", "--jsonl", str(src), "--no-progress", "--overwrite", "--out"]
    assert main(imp + [str(mine)]) == 2
    one_line_error(capsys, "store", "mine is not a reference store", "choose another path")
    assert main(imp + [str(tmp)]) == 2  # the folder that holds the input
    one_line_error(capsys, "store", "refs.jsonl is inside the output")
    assert main(imp + [str(src)]) == 2
    one_line_error(capsys, "store", "refs.jsonl is the same path as the output")
    (tmp / "man.json").write_text("{}")
    assert main(imp + [str(tmp / "man.json"), "--manifest", str(tmp / "man.json")]) == 2
    one_line_error(capsys, "store", "man.json is the same path as the output")
    assert (mine / "thesis.tex").read_text() == "mine" and src.is_file() and (tmp / "man.json").read_text() == "{}"
    assert main(imp + [str(store)]) == 0  # a store of ours, with --overwrite: replaced
    capsys.readouterr()
    assert main(["store", "import", "--jsonl", str(mine), "--out", str(tmp / "x")]) == 2
    one_line_error(capsys, "store", f"reference rewards {mine} is a directory; give the file itself")


@pytest.mark.parametrize(
    "content, words",
    [
        (None, "cannot read it (No such file or directory)"),
        ("DIR", "is a directory; give the JSON file"),
        (b'{"a": "\xff"}', "not UTF-8 text (invalid start byte at byte 7)"),
        ('{\n"a": }', "man.json:2: invalid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        ('{"template": "chat"}', "'template' must be an object of settings, got 'chat'"),
        ('{"run_record": {"sampling": [1]}}', "'run_record.sampling' must be an object of settings"),
        ('{"run_record": 3}', "'run_record' must be an object, got int"),
    ],
)
def test_store_import_manifest_errors_name_the_file(refs, capsys, content, words):
    tmp, src, _, _ = refs
    man = tmp / "man.json"
    if content == "DIR":
        man.mkdir()
    elif isinstance(content, bytes):
        man.write_bytes(content)
    elif content is not None:
        man.write_text(content)
    capsys.readouterr()
    argv = ["store", "import", "--jsonl", str(src), "--out", str(tmp / "new"), "--manifest", str(man)]
    assert main(argv + ["--template", "input_key=q"]) == 2
    one_line_error(capsys, "store", f"--manifest {man}", words)
    assert not (tmp / "new").exists()


def test_store_import_manifest_sections_merge_with_the_flags(refs, capsys):
    tmp, src, _, _ = refs
    man = tmp / "man.json"
    man.write_text(json.dumps({"run_record": {"template": {"input_key": "q"}}, "sampling": {"top_p": 1}}))
    argv = ["store", "import", "--jsonl", str(src), "--out", str(tmp / "new"), "--manifest", str(man)]
    assert main(argv + ["--sampling", "temperature=0.7", "--no-progress"]) == 0
    got = json.loads((tmp / "new" / "manifest.json").read_text())
    assert got["sampling"] == {"top_p": 1, "temperature": 0.7}
    assert got["run_record"] == {"template": {"input_key": "q"}, "sampling": {"temperature": 0.7}}


def test_store_info_verify_names_a_missing_cut_or_changed_file(refs, capsys):
    tmp, _, store, _ = refs
    capsys.readouterr()
    assert main(["store", "info", str(store), "--verify"]) == 0
    assert (
        "verify       ok (5 files; every file matches its recorded sha256; every row checked)"
        in capsys.readouterr().out
    )
    assert main(["store", "info", str(store), "--verify", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["verified"] and got["verify"]["files"]["rewards.parquet"] == "sha256 ok"
    data = store / "rewards.parquet"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, one byte changed: only the digest sees it
    data.write_bytes(bytes(raw))
    assert main(["store", "info", str(store)]) == 0
    capsys.readouterr()
    assert main(["store", "info", str(store), "--verify"]) == 2
    one_line_error(capsys, "store", "rewards.parquet is corrupt", "--overwrite")
    data.write_bytes(bytes(raw[:-10]))
    assert main(["store", "info", str(store)]) == 2  # a size check on every open
    one_line_error(capsys, "store", f"{data} has {len(raw) - 10} bytes, {len(raw)} were written")
    data.unlink()
    assert main(["store", "info", str(store), "--verify"]) == 2
    one_line_error(capsys, "store", f"{data} is missing")


def test_store_export_refuses_existing_folders_and_the_store_itself(refs, capsys):
    tmp, _, store, _ = refs
    capsys.readouterr()
    out = tmp / "out.jsonl"
    out.write_text("mine")
    exp = ["store", "export", str(store), "--no-progress", "--jsonl"]
    assert main(exp + [str(out)]) == 2
    one_line_error(capsys, "store", "--jsonl", "out.jsonl exists; pass --overwrite")
    assert main(exp + [str(tmp)]) == 2
    one_line_error(capsys, "store", f"--jsonl {tmp} is a directory")
    assert main(exp + [str(store / "rewards.parquet"), "--overwrite"]) == 2
    one_line_error(capsys, "store", "is inside the input", "would destroy the input")
    assert main(exp + [str(store / "extra.jsonl"), "--overwrite"]) == 2
    one_line_error(capsys, "store", "is inside the input")
    assert out.read_text() == "mine" and not (store / "extra.jsonl").exists()
    assert main(exp + [str(out), "--overwrite"]) == 0 and len(out.read_text().splitlines()) == 6
    (store / "index" / "values.npy").write_bytes(b"\x93NUMPY")  # cut short: named, nothing exported
    capsys.readouterr()
    assert main(exp + [str(tmp / "o2.jsonl")]) == 2
    one_line_error(capsys, "store", "values.npy has 6 bytes")
    assert not (tmp / "o2.jsonl").exists()


def test_score_out_refuses_existing_inputs_and_folders(refs, capsys):
    tmp, src, store, samples = refs
    capsys.readouterr()
    score = ["score", "--store", str(store), "--jsonl", str(samples), "--out"]
    target = tmp / "scored.json"
    assert main(score + [str(target)]) == 0 and json.loads(target.read_text())["num_rows"] == 6
    capsys.readouterr()
    assert main(score + [str(target)]) == 2
    one_line_error(capsys, "score", "--out", "scored.json exists; pass --overwrite")
    assert main(score + [str(samples), "--overwrite"]) == 2
    one_line_error(capsys, "score", "samples.jsonl is the input", "would destroy the input")
    assert main(score + [str(store / "s.json"), "--overwrite"]) == 2
    one_line_error(capsys, "score", "is inside the input")
    assert main(score + [str(tmp)]) == 2
    one_line_error(capsys, "score", "is a directory; give a file path")
    assert main(score + [str(target), "--overwrite"]) == 0
    capsys.readouterr()
    assert main(["score", "--store", str(store), "--jsonl", str(tmp)]) == 2
    one_line_error(capsys, "score", f"--jsonl {tmp} is a directory")


def test_evaluate_plan_and_frontier_plots(refs, capsys, write_jsonl):
    tmp, src, store, _ = refs
    pol = write_jsonl(tmp / "pol.jsonl", [{"prompt": f"p{i}", "rewards": [0.1 * i, 0.2, 0.3, 0.4]} for i in range(6)])
    capsys.readouterr()
    plot = tmp / "w.png"
    plot.write_text("mine")
    ev = ["evaluate", "--policy", str(pol), "--reference", str(src), "--plot"]
    assert main(ev + [str(plot)]) == 2
    one_line_error(capsys, "evaluate", "--plot", "w.png exists; pass --overwrite")
    assert main(ev + [str(pol), "--overwrite"]) == 2
    one_line_error(capsys, "evaluate", "pol.jsonl is the input")
    assert main(ev + [str(tmp)]) == 2
    one_line_error(capsys, "evaluate", "is a directory; give a file path")
    assert plot.read_text() == "mine"
    assert main(ev + [str(plot), "--overwrite", "--json"]) == 0 and plot.read_bytes()[:8] == PNG
    for cmd in (["plan", "--kl-budget", "0.2"], ["frontier", "--kl-budget", "0.2", "--transform", "identity"]):
        capsys.readouterr()
        assert main(cmd + ["--plot", str(plot)]) == 2
        one_line_error(capsys, cmd[0], "w.png exists; pass --overwrite")
        assert main(cmd + ["--plot", str(tmp)]) == 2
        one_line_error(capsys, cmd[0], "is a directory")
        (tmp / "f").write_text("x")
        assert main(cmd + ["--plot", str(tmp / "f" / "p.png")]) == 2
        one_line_error(capsys, cmd[0], "is a file, not a directory")


def test_a_path_the_system_refuses_is_one_line_not_a_traceback(refs, capsys, monkeypatch):
    # The process may run as root (reads every file), so the refusal is staged where the file is opened.
    import errno

    from openrlhf_infalign.store import jsonl

    tmp, src, _, _ = refs
    capsys.readouterr()
    for exc, rc, words in (
        (PermissionError(errno.EACCES, "Permission denied", str(src)), 2, f"error: {src}: Permission denied"),
        (OSError(errno.ENOSPC, "No space left on device"), 2, "error: [Errno 28] No space left on device"),
        (KeyboardInterrupt(), 130, "infalign store: interrupted"),
    ):
        monkeypatch.setattr(jsonl, "read_reference_jsonl", lambda *a, e=exc, **k: (_ for _ in ()).throw(e))
        assert main(["store", "import", "--jsonl", str(src), "--out", str(tmp / "x")]) == rc
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
    assert not (tmp / "x").exists()


@pytest.mark.parametrize(
    "argv, command, words",
    [
        (["store", "info", "{src}"], "store", "refs.jsonl is a file, not a reference store (a directory)"),
        (["score", "--store", "{src}", "--jsonl", "{samples}"], "score", "is a file, not a reference store"),
        (
            ["store", "import", "--jsonl", "{empty}", "--out", "{tmp}/e"],
            "store",
            "empty.jsonl: no rows; a store needs",
        ),
        (["score", "--store", "{store}", "--jsonl", "{empty}"], "score", "empty.jsonl: no rows"),
        (
            ["store", "import", "--jsonl", "{src}", "--out", "{tmp}/e", "--k-min", "0"],
            "store",
            "--k-min 0: the fewest",
        ),
        (["store", "import", "--jsonl", "{src}", "--out", "{tmp}/e", "--template", "=1"], "store import", "(no key)"),
        (["plan", "--plot", ""], "plan", "--plot: an empty path; give a file path"),
        (["score", "--store", "{store}", "--jsonl", "{samples}", "--out", ""], "score", "--out: an empty path"),
        (["report", "{tmp}/nope", "--out", ""], "report", "--out: an empty path; give a directory"),
    ],
)
def test_what_the_commands_fuzz_found(refs, capsys, argv, command, words):
    tmp, src, store, samples = refs
    (tmp / "empty.jsonl").write_text("")
    names = dict(tmp=tmp, src=src, store=store, samples=samples, empty=tmp / "empty.jsonl")
    capsys.readouterr()
    try:
        rc = main([a.format(**names) for a in argv])
    except SystemExit as e:  # argparse's own refusal
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"infalign {command}: error: ") and words in err, err
    assert not (tmp / "e").exists()
