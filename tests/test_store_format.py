"""Reference reward store: write/open round trip, exact mid-rank calibration, bad input, kill safety, pickling."""

import hashlib
import json
import os
import pickle
import shutil
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from openrlhf_infalign.store import (
    FORMAT_VERSION,
    Ragged,
    ReferenceStore,
    StoreError,
    prompt_key,
    read_manifest,
    write_store,
)
from openrlhf_infalign.store import writer as store_writer


def midrank(r, refs):
    """Eq. 12 written out literally: (1/K) sum_k [1{r > z_k} + 0.5 * 1{r == z_k}]."""
    refs = [float(z) for z in refs]
    return sum((1.0 if r > z else 0.5 if r == z else 0.0) for z in refs) / len(refs)


def make_data(n=50, seed=0, kmax=24):
    rng = np.random.default_rng(seed)
    prompts = [f"Q : question number {i} ?" + (" é" if i % 7 == 0 else "") + " A :" for i in range(n)]
    # Rewards on a coarse grid so ties between policy and reference rewards actually occur.
    refs = [rng.integers(-5, 6, size=int(rng.integers(1, kmax))).astype(np.float32) / 4 for _ in range(n)]
    return prompts, refs


@pytest.fixture
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_prompt_key_is_sha1_of_utf8():
    assert prompt_key("héllo") == hashlib.sha1("héllo".encode("utf-8")).hexdigest()
    assert len(prompt_key("")) == 40


def test_round_trip_and_exact_midrank(tmp_path, quiet):
    prompts, refs = make_data()
    keys = [prompt_key(p) for p in prompts]
    out = write_store(tmp_path / "s", keys, refs, prompts=prompts, manifest={"policy_model": "m", "custom": [1, 2]})
    s = ReferenceStore.open(out)
    assert s.num_prompts == len(prompts)
    assert s.manifest["custom"] == [1, 2] and s.manifest["policy_model"] == "m"
    assert s.manifest["format_version"] == FORMAT_VERSION and s.manifest["num_prompts"] == len(prompts)
    rows = s.rows_for_keys(keys)
    for i, row in enumerate(rows):
        got = s.rewards_for_row(int(row))
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, np.sort(refs[i]))
    rng = np.random.default_rng(1)
    # Several samples per prompt, in a shuffled order, including exact ties with reference rewards.
    idx = rng.integers(0, len(prompts), size=400)
    rewards = rng.integers(-6, 7, size=400) / 4
    cal = s.calibrate([keys[i] for i in idx], rewards)
    expected = np.array([midrank(rewards[j], refs[i]) for j, i in enumerate(idx)])
    np.testing.assert_array_equal(cal, expected)
    assert cal.dtype == np.float64
    # Parquet columns as specified: prompt_key string, prompt string, rewards list<float32> sorted.
    t = pq.read_table(out / "rewards.parquet")
    assert t.column_names == ["prompt_key", "prompt", "rewards"]
    rtype = t.schema.field("rewards").type
    assert pa.types.is_list(rtype) and rtype.value_type == pa.float32()
    for k, p, r in zip(
        t.column("prompt_key").to_pylist(), t.column("prompt").to_pylist(), t.column("rewards").to_pylist()
    ):
        assert k == prompt_key(p)
        assert r == sorted(r)


def test_k_equal_one_is_exact(tmp_path, quiet):
    keys = [prompt_key("a"), prompt_key("b")]
    s = ReferenceStore.open(write_store(tmp_path / "s", keys, [[1.0], [2.0]]))
    got = s.calibrate([keys[0], keys[0], keys[0], keys[1]], [0.5, 1.0, 1.5, 2.0])
    np.testing.assert_array_equal(got, [0.0, 0.5, 1.0, 0.5])


def test_ragged_csr_and_dense_inputs_agree(tmp_path, quiet):
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


def test_keys_accepted_as_hex_bytes_digests_and_uppercase(tmp_path, quiet):
    prompts, refs = make_data(10)
    keys = [prompt_key(p) for p in prompts]
    s = ReferenceStore.open(write_store(tmp_path / "s", keys, refs))
    want = s.rows_for_keys(keys)
    assert sorted(want.tolist()) == list(range(10))
    np.testing.assert_array_equal(s.rows_for_keys([k.upper() for k in keys]), want)
    np.testing.assert_array_equal(s.rows_for_keys([k.encode() for k in keys]), want)
    np.testing.assert_array_equal(s.rows_for_keys([bytes.fromhex(k) for k in keys]), want)
    np.testing.assert_array_equal(s.rows_for_prompts(prompts), want)
    assert set(s.keys()) == set(keys)
    with pytest.raises(StoreError, match="position 1"):
        s.rows_for_keys([keys[0], "xyz"])
    with pytest.raises(StoreError, match="position 0"):
        s.rows_for_keys(["g" * 40])


def test_missing_prompt_error_and_raw(tmp_path, quiet):
    prompts, refs = make_data(5)
    s = ReferenceStore.open(write_store(tmp_path / "s", None, refs, prompts=prompts))
    with pytest.raises(StoreError) as e:
        s.calibrate_prompts([prompts[0], "an unseen prompt"], [0.0, 0.0])
    msg = str(e.value)
    assert prompt_key("an unseen prompt") in msg and "an unseen prompt" in msg
    assert "infalign calibrate" in msg and "--infalign.on_missing raw" in msg
    out = s.calibrate([prompt_key(prompts[0]), prompt_key("nope")], [100.0, 0.0], on_missing="raw")
    assert out[0] == 1.0 and np.isnan(out[1])
    np.testing.assert_array_equal(s.rows_for_keys([prompt_key("nope")], on_missing="raw"), [-1])


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


def test_newer_format_version_is_a_clear_error(tmp_path, quiet):
    out = write_store(tmp_path / "s", [prompt_key("a")], [[1.0]])
    man = json.loads((out / "manifest.json").read_text())
    man["format_version"] = FORMAT_VERSION + 1
    (out / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(StoreError, match=f"format_version {FORMAT_VERSION + 1} is newer.*upgrade"):
        ReferenceStore.open(out)


def test_not_a_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a reference store"):
        ReferenceStore.open(tmp_path)


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


def test_index_rebuilt_from_parquet(tmp_path, quiet):
    prompts, refs = make_data(20)
    out = write_store(tmp_path / "s", None, refs, prompts=prompts)
    ref = ReferenceStore.open(out)
    values, offsets = np.array(ref.values), np.array(ref.offsets)
    shutil.rmtree(out / "index")
    s = ReferenceStore.open(out)
    np.testing.assert_array_equal(s.values, values)
    np.testing.assert_array_equal(s.offsets, offsets)
    assert (out / "index" / "values.npy").exists()
    s.verify()


def test_pickle_by_value_without_the_directory(tmp_path, quiet):
    prompts, refs = make_data(40)
    out = write_store(tmp_path / "s", None, refs, prompts=prompts)
    s = ReferenceStore.open(out)
    keys = [prompt_key(p) for p in prompts]
    rewards = np.linspace(-1.5, 1.5, 40)
    want = s.calibrate(keys, rewards)
    blob = pickle.dumps(s, protocol=5)
    del s
    shutil.rmtree(out)
    # Compact: the arrays' bytes plus a little, not a Python object per prompt.
    n_bytes = sum(len(r) for r in refs) * 4 + 40 * (20 + 8) + 41 * 8
    assert len(blob) < n_bytes + 4096
    s2 = pickle.loads(blob)
    np.testing.assert_array_equal(s2.calibrate(keys, rewards), want)
    assert s2.manifest["num_prompts"] == 40


def test_check_template(tmp_path):
    tmpl = {"input_key": "prompt", "apply_chat_template": True, "input_template": None, "chat_template_sha1": "ab"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = ReferenceStore.open(write_store(tmp_path / "s", [prompt_key("a")], [[1.0]], manifest={"template": tmpl}))
    assert s.check_template({"input_key": "prompt", "apply_chat_template": "True", "input_template": ""}) == []
    with pytest.raises(StoreError, match=r"input_key: store='prompt' training='question'.*allow_mismatch"):
        s.check_template({"input_key": "question", "apply_chat_template": True})
    with pytest.warns(UserWarning, match="chat_template_sha1"):
        diffs = s.check_template({"chat_template_sha1": "cd"}, allow_mismatch=True)
    assert diffs == ["chat_template_sha1: store='ab' training='cd'"]


def test_empty_store(tmp_path):
    s = ReferenceStore.open(write_store(tmp_path / "s", [], []))
    assert s.num_prompts == 0
    assert s.rows_for_keys([prompt_key("a")], on_missing="raw").tolist() == [-1]
    assert s.calibrate([], []).shape == (0,)


def test_keys_sharing_their_first_8_bytes(tmp_path, quiet):
    # The lookup searches on the first 8 bytes, then checks all 20: neighbours with equal prefixes must resolve.
    prefix = "ab" * 8
    keys = [prefix + f"{i:024x}" for i in (5, 1, 9, 3)] + ["00" * 20, "ff" * 20]
    s = ReferenceStore.open(write_store(tmp_path / "s", keys, [[float(i)] for i in range(6)]))
    for i, k in enumerate(keys):
        np.testing.assert_array_equal(s.rewards_for_key(k), [float(i)])
    assert s.rows_for_keys([prefix + f"{2:024x}", prefix + f"{10:024x}"], on_missing="raw").tolist() == [-1, -1]
    s.verify()


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


def test_ragged_rows_permuted_in_chunks(tmp_path, monkeypatch, quiet):
    # Force the chunked gather (normally 1M values per chunk) to cross many chunk boundaries.
    monkeypatch.setattr(store_writer, "_GATHER_CHUNK", 7)
    prompts, refs = make_data(60, seed=5)
    s = ReferenceStore.open(write_store(tmp_path / "s", None, refs, prompts=prompts))
    for p, r in zip(prompts, refs):
        np.testing.assert_array_equal(s.rewards_for_key(prompt_key(p)), np.sort(r))
    s.verify()
