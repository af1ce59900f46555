"""store/reader.py: open, exact mid-rank calibration, missing prompts, index rebuild, pickling, template checks."""

import json
import pickle
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from openrlhf_infalign.store import FORMAT_VERSION, ReferenceStore, StoreError, prompt_key, write_store
from openrlhf_infalign.store.format import INDEX_FILES
from openrlhf_infalign.store.reader import differing_fields


def test_round_trip_and_exact_midrank(tmp_path, quiet, make_data, midrank):
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


def test_missing_prompt_error_and_raw(tmp_path, quiet, make_data):
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


def test_index_rebuilt_from_parquet(tmp_path, quiet, make_data):
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


def test_pickle_by_value_without_the_directory(tmp_path, quiet, make_data):
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


def test_differing_fields_compare_what_both_sides_record_and_tolerate_spellings():
    # The run-record check (adapter/run_record.py) compares store and run through this.
    tmpl = {"input_key": "prompt", "apply_chat_template": True, "input_template": None, "chat_template_sha1": "ab"}
    assert differing_fields(tmpl, {"input_key": "prompt", "apply_chat_template": "True", "input_template": ""}) == []
    assert differing_fields(tmpl, {"input_key": "question"}) == [("input_key", "prompt", "question")]
    assert differing_fields(tmpl, {"chat_template_sha1": "cd"}) == [("chat_template_sha1", "ab", "cd")]


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


def _damage(path, how):
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:  # flip one byte near the end, size unchanged
        data = bytearray(path.read_bytes())
        data[-3] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["delete", "truncate"])
def test_open_refuses_a_missing_or_cut_short_parquet_file(tmp_path, quiet, make_data, how):
    prompts, refs = make_data(20)
    out = write_store(tmp_path / "s", None, refs, prompts=prompts)
    _damage(out / "rewards.parquet", how)
    pattern = "is missing" if how == "delete" else r"has \d+ bytes, \d+ were written"
    with pytest.raises(StoreError, match=f"rewards.parquet {pattern}.*restore the store from a copy, or rebuild it"):
        ReferenceStore.open(out)


@pytest.mark.parametrize("how", ["delete", "truncate"])
def test_open_refuses_a_damaged_index_file_and_the_fix_works(tmp_path, quiet, make_data, how):
    prompts, refs = make_data(20)
    out = write_store(tmp_path / "s", None, refs, prompts=prompts)
    want = np.array(ReferenceStore.open(out).values)
    _damage(out / "index" / "offsets.npy", how)
    if how == "delete":  # an incomplete index is rebuilt from the Parquet data, as a missing one
        s = ReferenceStore.open(out)
    else:
        with pytest.raises(StoreError, match=r"index/offsets.npy has \d+ bytes.*delete .*index and open the store"):
            ReferenceStore.open(out)
        shutil.rmtree(out / "index")
        s = ReferenceStore.open(out)
    np.testing.assert_array_equal(s.values, want)
    assert s.verify().digests


@pytest.mark.parametrize("rel", ["rewards.parquet", "index/values.npy", "index/keys.npy"])
def test_verify_finds_a_corrupt_byte_and_names_the_file(tmp_path, quiet, make_data, rel):
    prompts, refs = make_data(20)
    out = write_store(tmp_path / "s", None, refs, prompts=prompts)
    report = ReferenceStore.open(out).verify()
    assert report.digests and set(report.files) == {"rewards.parquet"} | {f"index/{f}" for f in INDEX_FILES}
    assert "sha256" in report.summary()
    _damage(out / rel, "flip")
    s = ReferenceStore.open(out)  # same sizes: the quick check passes, verify does not
    fix = "delete .*index and open the store again" if rel.startswith("index") else "restore the store"
    with pytest.raises(StoreError, match=f"{rel} is corrupt: its sha256 differs.*{fix}"):
        s.verify()


def test_quick_check_on_an_open_store(tmp_path, quiet):
    out = write_store(tmp_path / "s", [prompt_key("a")], [[1.0, 2.0]])
    s = ReferenceStore.open(out)
    s.quick_check()
    (out / "rewards.parquet").unlink()
    with pytest.raises(StoreError, match="rewards.parquet is missing"):
        s.quick_check()
    ReferenceStore.from_arrays([prompt_key("a")], [[1.0]]).quick_check()  # in memory: nothing to check


def _as_older_store(out):
    man = json.loads((out / "manifest.json").read_text())
    del man["checksums"]
    (out / "manifest.json").write_text(json.dumps(man))


def test_a_store_without_checksums_verifies_what_it_can(tmp_path, quiet, make_data):
    prompts, refs = make_data(20)
    out = write_store(tmp_path / "s", None, refs, prompts=prompts)
    _as_older_store(out)
    report = ReferenceStore.open(out).verify()
    assert not report.digests and "before file digests were recorded" in report.summary()
    # Parquet rows that differ from the index are found by comparing them.
    t = pq.read_table(out / "rewards.parquet")
    vals = t.column("rewards").combine_chunks()
    changed = pa.ListArray.from_arrays(vals.offsets, pa.array(vals.flatten().to_numpy() + 1, pa.float32()))
    pq.write_table(t.set_column(2, "rewards", changed), out / "rewards.parquet")
    with pytest.raises(StoreError, match="rewards.parquet and .*index hold different data"):
        ReferenceStore.open(out).verify()
    # Cut short: the Parquet footer is gone (open), a .npy file shorter than its header says (open).
    _damage(out / "rewards.parquet", "truncate")
    with pytest.raises(StoreError, match="rewards.parquet is truncated or not a Parquet file"):
        ReferenceStore.open(out)
    out2 = write_store(tmp_path / "t", None, refs, prompts=prompts)
    _as_older_store(out2)
    _damage(out2 / "index" / "values.npy", "truncate")
    with pytest.raises(StoreError, match=r"values.npy: \d+ bytes, its header says \d+"):
        ReferenceStore.open(out2)


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda m: [m], "expected a JSON object, got list"),
        (lambda m: {**m, "num_prompts": "20"}, "'num_prompts' must be a non-negative integer"),
        (lambda m: {**m, "num_rewards": -1}, "'num_rewards' must be a non-negative integer"),
        (lambda m: {**m, "format_version": True}, "no integer format_version"),
        (lambda m: {**m, "template": ["x"]}, "'template' must be a JSON object"),
        (lambda m: {**m, "checksums": {"rewards.parquet": {"size": 1}}}, "'checksums' must map file names"),
        (lambda m: {**m, "checksums": {"../etc/passwd": {"size": 1, "sha256": "0" * 64}}}, "not part of a store"),
    ],
)
def test_damaged_manifest_fields_are_named(tmp_path, quiet, edit, pattern):
    out = write_store(tmp_path / "s", [prompt_key("a")], [[1.0]])
    man = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(edit(man)))
    with pytest.raises(StoreError, match=pattern):
        ReferenceStore.open(out)


def test_manifest_that_is_not_utf8(tmp_path, quiet):
    out = write_store(tmp_path / "s", [prompt_key("a")], [[1.0]])
    (out / "manifest.json").write_bytes(b'{"format_version": 1, "x": "\xff"}')
    with pytest.raises(StoreError, match=r"manifest.json: not UTF-8 text"):
        ReferenceStore.open(out)
