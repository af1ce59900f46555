"""store/reader.py: open, exact mid-rank calibration, missing prompts, index rebuild, pickling, template checks."""

import json
import pickle
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from openrlhf_infalign.store import FORMAT_VERSION, ReferenceStore, StoreError, prompt_key, write_store
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
