"""files.py: every file the project writes appears whole or not at all, with the usual mode."""

import json
import os

import pytest

from openrlhf_infalign import files

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _mode(path) -> int:
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    return mask


def test_write_json_text_bytes_whole_with_the_usual_mode(tmp_path):
    p = files.write_json(tmp_path / "sub" / "a.json", {"x": 1})
    assert p.read_text() == '{\n  "x": 1\n}\n'
    _mode(p)
    assert files.write_text(tmp_path / "t.md", "hi\n").read_text() == "hi\n"


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    p = files.write_json(tmp_path / "a.json", {"x": 1})
    with pytest.raises(ValueError):  # NaN is not JSON: refused, and the good file stays
        files.write_json(p, {"x": float("nan")})
    with pytest.raises(RuntimeError):
        with files.atomic_open(p) as f:
            f.write("half")
            raise RuntimeError("killed mid-write")
    with pytest.raises(OSError):
        files.atomic_write_with(p, lambda tmp: (_ for _ in ()).throw(OSError("disk full")))
    assert p.read_text() == '{\n  "x": 1\n}\n'
    assert sorted(q.name for q in tmp_path.iterdir()) == ["a.json"]


def test_atomic_write_with_and_save_figure(tmp_path):
    p = files.atomic_write_with(tmp_path / "c.bin", lambda tmp: open(tmp, "wb").write(b"hi"))
    assert p.read_bytes() == b"hi"
    _mode(p)
    plt = files.pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    png = files.save_figure(fig, tmp_path / "plots" / "f.png")
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert not plt.get_fignums()  # closed
    assert sorted(q.name for q in png.parent.iterdir()) == ["f.png"]


def test_a_directory_given_for_a_file_is_a_one_line_error(tmp_path):
    d = tmp_path / "plots"
    d.mkdir()
    (d / "keep.png").write_bytes(b"x")
    for write in (
        lambda: files.write_text(d, "x"),
        lambda: files.write_json(d, {}),
        lambda: files.atomic_write_with(d, lambda tmp: None),
    ):
        with pytest.raises(files.OutputPathError, match=r"plots is a directory; give a file path"):
            write()
    assert [p.name for p in d.iterdir()] == ["keep.png"]
    assert issubclass(files.OutputPathError, ValueError)  # the consoles print ValueErrors as one line
    f = tmp_path / "a_file"
    f.write_text("mine")
    with pytest.raises(files.OutputPathError, match="a_file is a file, not a directory"):
        files.write_text(f / "out.txt", "x")
    assert f.read_text() == "mine"


def test_overwrite_false_refuses_an_existing_file(tmp_path):
    p = tmp_path / "out.json"
    files.write_json(p, {"a": 1}, overwrite=False)
    with pytest.raises(files.OutputPathError, match="out.json exists; pass --overwrite"):
        files.write_json(p, {"a": 2}, overwrite=False)
    with pytest.raises(files.OutputPathError, match="exists"):
        files.check_output_file(p, overwrite=False)
    assert json.loads(p.read_text()) == {"a": 1}
    files.write_json(p, {"a": 3}, overwrite=True)
    assert json.loads(p.read_text()) == {"a": 3}
    assert [x.name for x in tmp_path.iterdir()] == ["out.json"]


def test_overwrite_false_does_not_replace_a_file_that_appears_while_writing(tmp_path):
    p = tmp_path / "out.txt"
    with pytest.raises(files.OutputPathError, match="appeared while it was written"):
        with files.atomic_open(p, overwrite=False) as f:
            f.write("new")
            p.write_text("someone else's")
    assert p.read_text() == "someone else's"
    assert [x.name for x in tmp_path.iterdir()] == ["out.txt"]


def test_an_input_is_never_an_output_and_folders_are_told_apart(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("data")
    store = tmp_path / "store"
    store.mkdir()
    for out, words in ((src, "is the input"), (store / "x.json", "is inside the input")):
        with pytest.raises(files.OutputPathError, match=f"--out .*{words} .*would destroy the input"):
            files.check_output_file(out, overwrite=True, flag="--out", inputs=[None, "", src, store, "hub/model"])
    assert files.check_output_file(tmp_path / "new.json", inputs=[src, store]) == tmp_path / "new.json"
    assert files.check_output_dir(tmp_path / "a" / "b", flag="--out") == tmp_path / "a" / "b"
    with pytest.raises(files.OutputPathError, match="--out .*in.jsonl is a file; this output is a directory"):
        files.check_output_dir(src, flag="--out")
    with pytest.raises(files.OutputPathError, match="in.jsonl is a file, not a directory"):
        files.check_output_dir(src / "sub")
    with pytest.raises(ValueError, match="--jsonl .*store is a directory; give the file itself"):
        files.check_input_file(store, "--jsonl")
    with pytest.raises(FileNotFoundError, match="nope: no such file"):
        files.check_input_file(tmp_path / "nope")
