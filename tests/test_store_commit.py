"""store/commit.py: a store replaces only a store, atomically; never a file, a foreign folder or its own input."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from openrlhf_infalign.store import ReferenceStore, StoreError, check_target, commit, prompt_key, write_store
from openrlhf_infalign.store import writer as store_writer
from openrlhf_infalign.store.jsonl import import_jsonl


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _store(path, key="a", rewards=(1.0, 2.0), **kw):
    return write_store(path, [prompt_key(key)], [list(rewards)], **kw)


def test_overwrite_replaces_a_store_and_nothing_else(tmp_path, quiet):
    out = _store(tmp_path / "s")
    _store(out, "b", overwrite=True)
    assert ReferenceStore.open(out).keys() == [prompt_key("b")]
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # nothing left beside it

    # A store with anything else in it is no longer only ours: refused, with or without overwrite.
    (out / "notes.txt").write_text("mine")
    before = _tree(out)
    for overwrite in (False, True):
        with pytest.raises(StoreError, match=r"not a reference store \(it holds files that are not part of a store: "):
            _store(out, "c", overwrite=overwrite)
    assert _tree(out) == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_of_user_files_is_never_replaced(tmp_path, quiet, overwrite):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "thesis.tex").write_text("years of work")
    (docs / "sub" / "data.csv").write_text("1,2")
    before = _tree(docs)
    with pytest.raises(StoreError, match=r"docs is not a reference store \(it has no manifest.json\).*choose another"):
        _store(docs, overwrite=overwrite)
    assert _tree(docs) == before
    # A folder whose manifest.json is the user's own JSON (not a store manifest) is not a store either.
    (docs / "manifest.json").write_text('{"name": "my app"}')
    with pytest.raises(StoreError, match="is not a reference store manifest"):
        _store(docs, overwrite=overwrite)
    assert (docs / "thesis.tex").read_text() == "years of work"


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_plain_file_is_never_replaced(tmp_path, quiet, overwrite):
    f = tmp_path / "results.json"
    f.write_text("{}")
    with pytest.raises(StoreError, match="is a file, not a store directory"):
        _store(f, overwrite=overwrite)
    assert f.read_text() == "{}"
    with pytest.raises(StoreError, match="is a file, not a directory"):
        _store(f / "store", overwrite=overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_empty_directory_is_used_without_overwrite(tmp_path, quiet):
    (tmp_path / "s").mkdir()
    _store(tmp_path / "s")
    assert ReferenceStore.open(tmp_path / "s").num_prompts == 1


def test_inputs_inside_or_around_the_output_are_refused(tmp_path, quiet, write_jsonl):
    out = _store(tmp_path / "s")
    # The store's own manifest given as an input (e.g. `--manifest s/manifest.json --out s`).
    with pytest.raises(StoreError, match=r"input .*manifest.json is inside the output .*s: writing the store there"):
        check_target(out, overwrite=True, inputs=[out / "manifest.json"])
    with pytest.raises(StoreError, match="is the same path as the output"):
        check_target(out, overwrite=True, inputs=[out])
    # An output inside an input folder (a dataset directory) is refused too.
    data = tmp_path / "dataset"
    data.mkdir()
    (data / "train.jsonl").write_text("{}\n")
    with pytest.raises(StoreError, match="is inside the input folder .*dataset"):
        check_target(data / "store", overwrite=True, inputs=[data])
    # Through a symbolic link as well; hub ids that are no local path are skipped.
    (tmp_path / "link").symlink_to(out)
    with pytest.raises(StoreError, match="inside the output"):
        check_target(tmp_path / "link", overwrite=True, inputs=[out / "index"])
    assert check_target(out, overwrite=True, inputs=["Qwen/Qwen2.5-0.5B", None, ""]) == out.resolve()

    # `store import --jsonl s/rows.jsonl --out s --overwrite`: the input would be deleted with the store.
    rows = tmp_path / "rows.jsonl"
    write_jsonl(rows, [{"prompt": "p", "rewards": [1.0, 2.0]}])
    inside = out / "rows.jsonl"
    inside.write_bytes(rows.read_bytes())
    with pytest.raises(StoreError, match="rows.jsonl is inside the output"):
        import_jsonl(inside, out, overwrite=True, progress=False)
    assert inside.exists() and (out / "manifest.json").exists()
    inside.unlink()
    import_jsonl(rows, out, overwrite=True, progress=False)
    assert ReferenceStore.open(out).keys() == [prompt_key("p")]


def test_symlinked_output_replaces_the_target_and_keeps_the_link(tmp_path, quiet):
    real = _store(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real)
    _store(link, "b", overwrite=True)
    assert link.is_symlink() and ReferenceStore.open(real).keys() == [prompt_key("b")]
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(StoreError, match="symbolic link to a missing path"):
        _store(tmp_path / "dangling")


def test_content_that_appears_during_the_write_is_not_replaced(tmp_path, monkeypatch, quiet):
    out = _store(tmp_path / "s")
    real_write_index = store_writer.write_index

    def and_user_file(index_dir, *a, **k):
        (out / "notes.txt").write_text("written while the store was being built")
        return real_write_index(index_dir, *a, **k)

    monkeypatch.setattr(store_writer, "write_index", and_user_file)
    with pytest.raises(StoreError, match="not a reference store .*notes.txt"):
        _store(out, "b", overwrite=True)
    assert (out / "notes.txt").exists() and ReferenceStore.open(out).keys() == [prompt_key("a")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_swap_puts_back_what_is_not_a_store(tmp_path, monkeypatch, quiet):
    # The last check before the move passed, then something foreign got in: the swap is undone.
    out = _store(tmp_path / "s")
    real_exchange = commit.exchange
    calls = []

    def exchange_after_intrusion(a, b):
        if not calls:
            (Path(b) / "late.txt").write_text("x")
        calls.append(1)
        return real_exchange(a, b)

    monkeypatch.setattr(commit, "exchange", exchange_after_intrusion)
    with pytest.raises(StoreError, match="changed while the store was written"):
        _store(out, "b", overwrite=True)
    assert (out / "late.txt").exists() and ReferenceStore.open(out).keys() == [prompt_key("a")]


def test_exchange_is_atomic_and_reported_when_unsupported(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if commit.exchange(a, b):
        assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"
    with pytest.raises(OSError):
        if not commit.exchange(a, tmp_path / "missing"):
            raise OSError("unsupported here")


WRITER = r"""
import sys, warnings
import numpy as np
from openrlhf_infalign.store import commit, prompt_key, write_store

warnings.simplefilter("ignore")
out, fallback, rounds = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
if fallback:
    commit.exchange = lambda a, b: False
keys = {v: [prompt_key(f"{v}{i}") for i in range(300)] for v in "AB"}
vals = {v: np.full((300, 16), 1.0 if v == "A" else 2.0) + np.arange(16) for v in "AB"}
for r in range(rounds):
    v = "AB"[r % 2]
    write_store(out, keys[v], vals[v], manifest={"version": v}, overwrite=True)
"""


@pytest.mark.parametrize("fallback", [False, True], ids=["exchange", "two-renames"])
def test_a_reader_always_finds_a_whole_store_while_it_is_replaced(tmp_path, quiet, fallback):
    if not fallback and not commit.exchange(*_two_dirs(tmp_path)):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    out = tmp_path / "s"
    keys = {v: sorted(prompt_key(f"{v}{i}") for i in range(300)) for v in "AB"}
    write_store(out, keys["A"], np.ones((300, 16)) + np.arange(16), manifest={"version": "A"})
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out), "1" if fallback else "0", "60"])
    seen = {"A": 0, "B": 0}
    try:
        while proc.poll() is None:
            s = ReferenceStore.open(out)  # never "not a store", never a mix of two stores
            v = s.manifest["version"]
            assert s.keys() == keys[v]
            np.testing.assert_array_equal(s.values[:16], np.arange(16) + (1.0 if v == "A" else 2.0))
            seen[v] += 1
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == 0
    assert seen["A"] and seen["B"], seen
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("x")) == ["s"]


def _two_dirs(tmp_path):
    a, b = tmp_path / "xa", tmp_path / "xb"
    a.mkdir()
    b.mkdir()
    return a, b


def test_recover_after_a_kill_between_the_two_renames(tmp_path, quiet):
    # The fallback's window: the old store moved aside, the writer killed before the new one went in.
    out = _store(tmp_path / "s")
    aside = tmp_path / f".s.old-{2**22 + 7}-abc"
    os.rename(out, aside)
    assert not commit.wait_for_writer(out, timeout=0.1)  # no live writer: no waiting
    commit.recover(out)
    assert not aside.exists() and ReferenceStore.open(out).keys() == [prompt_key("a")]


def test_index_rebuild_replaces_only_an_index(tmp_path, quiet):
    out = _store(tmp_path / "s")
    (out / "index" / "values.npy").unlink()
    (out / "index" / "mine.txt").write_text("x")
    with pytest.raises(StoreError, match="not part of a store's index: mine.txt"):
        ReferenceStore.open(out)
    assert (out / "index" / "mine.txt").exists()


def test_manifest_checksums_cover_every_data_file(tmp_path, quiet):
    out = _store(tmp_path / "s")
    man = json.loads((out / "manifest.json").read_text())
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert sorted(man["checksums"]) == files
    for rel, info in man["checksums"].items():
        assert info["size"] == (out / rel).stat().st_size and len(info["sha256"]) == 64
    # A manifest carried over from another store (store import --manifest) gets this store's checksums.
    other = _store(tmp_path / "t", "b", manifest=man)
    assert json.loads((other / "manifest.json").read_text())["checksums"] != man["checksums"]


def test_timing_of_the_checks_is_small(tmp_path, quiet):
    out = write_store(tmp_path / "s", [prompt_key(str(i)) for i in range(2000)], np.ones((2000, 64)))
    t = time.perf_counter()
    for _ in range(20):
        ReferenceStore.open(out).quick_check()
    assert (time.perf_counter() - t) / 20 < 0.05
