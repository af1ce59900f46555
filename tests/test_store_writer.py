"""store/writer.py: input forms, bad rewards and duplicates named by row, overwrite, kill safety, chunked gather."""

import os
import warnings

import numpy as np
import pytest

from openrlhf_infalign.store import Ragged, ReferenceStore, StoreError, prompt_key, read_manifest, write_store
from openrlhf_infalign.store import writer as store_writer


def test_ragged_csr_and_dense_inputs_agree(tmp_path, quiet, make_data, midrank):
    prompts, refs = make_data(30)
    keys = [prompt_key(p) for p in prompts]
    lengths = np.array([len(r) for r in refs])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    a = ReferenceStore.open(write_store(tmp_path / "a", keys, refs))
    b = ReferenceStore.open(write_store(tmp_path / "b", keys, Ragged(np.concatenate(refs), offsets)))
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    dense = np.random.default_rng(3).normal(size=(30, 5)).astype(np.float32)
    c = ReferenceStore.open(write_store(tmp_path / "c", keys, dense))
    for i, k in enumerate(keys):
        np.testing.assert_array_equal(c.rewards_for_key(k), np.sort(dense[i]))
    # Uniform-K stores take a strided fast path in calibrate: still the exact mid-rank, ties included.
    r = np.concatenate([dense[:, 2], dense[:, 0] - 1, dense[:, 4] + 1]).astype(np.float64)
    idx = np.tile(np.arange(30), 3)
    want = np.array([midrank(r[j], dense[i]) for j, i in enumerate(idx)])
    np.testing.assert_array_equal(c.calibrate([keys[i] for i in idx], r), want)
    assert c._uniform_k == 5 and a._uniform_k == 0
    # A 2-tuple is a sequence of 2 lists, not CSR: a clear hint when the count does not match.
    with pytest.raises(StoreError, match="Ragged"):
        write_store(tmp_path / "d", keys, (np.concatenate(refs), offsets))


@pytest.mark.parametrize(
    "rewards, pattern",
    [
        ([[1.0, 2.0], [float("nan")]], r"row 1 .*non-finite"),
        ([[1.0, float("inf")], [1.0]], r"row 0 .*non-finite"),
        ([[1.0], []], r"row 1 .*empty reward list"),
    ],
)
def test_bad_rewards_name_the_row(tmp_path, rewards, pattern):
    with pytest.raises(StoreError, match=pattern):
        write_store(tmp_path / "s", None, rewards, prompts=["p0", "p1"])
    assert not (tmp_path / "s").exists()
    assert list(tmp_path.iterdir()) == []


def test_duplicates(tmp_path):
    with pytest.raises(StoreError, match=r"row 2 \(prompt 'a'\) repeats the prompt of row 0 with a different"):
        write_store(tmp_path / "s", None, [[1.0, 2.0], [3.0], [2.0, 1.5]], prompts=["a", "b", "a"])
    with pytest.warns(UserWarning, match="merged 1 duplicated"):
        out = write_store(tmp_path / "t", None, [[1.0, 2.0], [3.0], [2.0, 1.0]], prompts=["a", "b", "a"])
    s = ReferenceStore.open(out, warn_small_k=False)
    assert s.num_prompts == 2 and s.manifest["merged_duplicates"] == 1
    np.testing.assert_array_equal(s.rewards_for_key(prompt_key("a")), [1.0, 2.0])


def test_prompt_must_hash_to_key(tmp_path):
    with pytest.raises(StoreError, match="row 1: prompt_key .* is not sha1 of its prompt 'b'"):
        write_store(tmp_path / "s", [prompt_key("a"), prompt_key("c")], [[1.0], [2.0]], prompts=["a", "b"])


def test_small_k_warns_and_manifest_k(tmp_path):
    keys = [prompt_key(str(i)) for i in range(3)]
    with pytest.warns(UserWarning, match="below 16"):
        out = write_store(tmp_path / "s", keys, [np.arange(8.0)] * 3)
    assert read_manifest(out)["k"] == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # K = 16 does not warn
        out = write_store(tmp_path / "t", keys, [np.arange(16.0), np.arange(20.0), np.arange(30.0)])
        s = ReferenceStore.open(out)
    assert s.manifest["k"] == {"min": 16, "median": 20, "max": 30}
    assert s.k_stats()["max"] == 30


def test_existing_store_needs_overwrite(tmp_path, quiet):
    out = write_store(tmp_path / "s", [prompt_key("a")], [[1.0]])
    with pytest.raises(StoreError, match="already exists"):
        write_store(out, [prompt_key("a")], [[2.0]])
    write_store(out, [prompt_key("b")], [[2.0]], overwrite=True)
    s = ReferenceStore.open(out)
    assert s.keys() == [prompt_key("b")]
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_failure_midway_keeps_old_store_intact(tmp_path, monkeypatch, quiet):
    out = write_store(tmp_path / "s", [prompt_key("a")], [[1.0, 2.0]])
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def boom(*a, **k):
        raise RuntimeError("killed while writing the index")

    monkeypatch.setattr(store_writer, "write_index", boom)
    with pytest.raises(RuntimeError, match="killed"):
        write_store(out, [prompt_key("b")], [[3.0]], overwrite=True)
    after = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no partial directory left beside it
    assert ReferenceStore.open(out).keys() == [prompt_key("a")]


def test_stale_partial_and_old_dirs_are_recovered(tmp_path, quiet):
    # What a `kill -9` leaves: a partial temp dir (dead pid), or the old store moved aside between two renames.
    dead_pid = 2**22 + 12345
    out = write_store(tmp_path / "s", [prompt_key("a")], [[1.0]])
    partial = tmp_path / f".s.partial-{dead_pid}-x"
    partial.mkdir()
    (partial / "rewards.parquet").write_bytes(b"half")
    os.rename(out, tmp_path / f".s.old-{dead_pid}-y")
    with pytest.raises(FileNotFoundError, match="left aside"):
        ReferenceStore.open(out)
    # The next write to the same place cleans up: the old store is put back, the partial removed.
    with pytest.raises(StoreError, match="already exists"):
        write_store(out, [prompt_key("b")], [[2.0]])
    assert not partial.exists()
    assert ReferenceStore.open(out).keys() == [prompt_key("a")]


KILL_SCRIPT = r"""
import sys, time, warnings
from pathlib import Path
import numpy as np
from openrlhf_infalign.store import writer, prompt_key

def stall(index_dir, *a, **k):
    # The Parquet file is written; signal the parent and wait to be killed mid-write.
    Path(sys.argv[2]).write_text("parquet written")
    time.sleep(60)

writer.write_index = stall
warnings.simplefilter("ignore")
writer.write_store(sys.argv[1], [prompt_key("new")], [[9.0, 8.0]], overwrite=True)
"""


def test_sigkill_midway_leaves_old_store_complete(tmp_path, quiet):
    import signal
    import subprocess
    import sys
    import time

    out = write_store(tmp_path / "s", [prompt_key("old")], [[1.0, 2.0]])
    flag = tmp_path / "flag"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(out), str(flag)])
    try:
        deadline = time.time() + 60
        while not flag.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert flag.exists(), "writer did not reach the midpoint"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    # The complete old store is where it was; the half-written new one only in a hidden temp dir beside it.
    s = ReferenceStore.open(out)
    assert s.keys() == [prompt_key("old")]
    s.verify()
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".s.partial-")]
    assert len(partial) == 1 and (partial[0] / "rewards.parquet").exists()
    # The next write to that place removes the leftover of the dead writer.
    write_store(out, [prompt_key("newer")], [[3.0]], overwrite=True)
    assert [p.name for p in tmp_path.iterdir() if p.name != "flag"] == ["s"]
    assert ReferenceStore.open(out).keys() == [prompt_key("newer")]


def test_ragged_rows_permuted_in_chunks(tmp_path, monkeypatch, quiet, make_data):
    # Force the chunked gather (normally 1M values per chunk) to cross many chunk boundaries.
    monkeypatch.setattr(store_writer, "_GATHER_CHUNK", 7)
    prompts, refs = make_data(60, seed=5)
    s = ReferenceStore.open(write_store(tmp_path / "s", None, refs, prompts=prompts))
    for p, r in zip(prompts, refs):
        np.testing.assert_array_equal(s.rewards_for_key(prompt_key(p)), np.sort(r))
    s.verify()
