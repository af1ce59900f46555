"""Fuzzing stores on disk: a manifest rewritten with any JSON, any store file cut, changed, replaced or removed. Open
either works on the store as written or raises StoreError / FileNotFoundError naming the file; what open lets
through, verify() catches; nothing else is ever raised, and nothing of the store is lost by reading it."""

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from openrlhf_infalign.store import ReferenceStore, StoreError, prompt_key, write_store
from openrlhf_infalign.store.writer import STORE_FILES

SCALE = int(os.environ.get("INFALIGN_FUZZ_SCALE", "1"))
FUZZ = settings(max_examples=150 * SCALE, deadline=None, derandomize=SCALE == 1, database=None)

PROMPTS = [f"prompt {i}" for i in range(40)]
KEYS = [prompt_key(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    rng = np.random.default_rng(0)
    refs = [rng.normal(size=int(rng.integers(3, 9))) for _ in PROMPTS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = write_store(tmp_path_factory.mktemp("fuzz") / "store", None, refs, prompts=PROMPTS)
    s = ReferenceStore.open(out, warn_small_k=False)
    want = s.calibrate(KEYS, np.linspace(-2, 2, len(KEYS)))
    return out, want


def _copy(src: Path, d: str) -> Path:
    dst = Path(d) / "store"
    shutil.copytree(src, dst)
    return dst


def _open_and_check(path: Path, want: np.ndarray, damaged: str | None):
    """Open and verify; the only ways out are a good store or a StoreError / FileNotFoundError naming the damage."""
    try:
        s = ReferenceStore.open(path, warn_small_k=False)
    except (StoreError, FileNotFoundError) as e:
        assert "\n" not in str(e) and (damaged is None or damaged in str(e) or "manifest" in str(e)), str(e)
        return "refused"
    try:
        s.verify()
    except StoreError as e:
        assert damaged is None or damaged in str(e) or "manifest" in str(e), str(e)
        return "verify"
    # It opened and verified: what it answers is the store as written.
    np.testing.assert_array_equal(s.calibrate(KEYS, np.linspace(-2, 2, len(KEYS))), want)
    return "ok"


damage = st.sampled_from(["cut", "flip", "delete", "garbage", "empty", "swap"])


@FUZZ
@given(st.sampled_from(STORE_FILES), damage, st.integers(0, 10**9), st.integers(1, 255))
def test_any_damaged_store_file_is_named(pristine, rel, how, where, byte):
    src, want = pristine
    with tempfile.TemporaryDirectory() as d:
        path = _copy(src, d)
        f = path / rel
        data = f.read_bytes()
        i = where % max(len(data), 1)
        if how == "cut":
            f.write_bytes(data[:i])
        elif how == "flip":
            f.write_bytes(data[:i] + bytes([data[i] ^ byte]) + data[i + 1 :])
        elif how == "delete":
            f.unlink()
        elif how == "garbage":
            f.write_bytes(np.random.default_rng(where).bytes(len(data)))
        elif how == "empty":
            f.write_bytes(b"")
        else:  # another store file's bytes under this name
            other = STORE_FILES[(STORE_FILES.index(rel) + 1) % len(STORE_FILES)]
            shutil.copyfile(path / other, f)
        outcome = _open_and_check(path, want, rel.split("/")[-1])
        if how != "delete" and f.read_bytes() != data:
            # Changed bytes never pass both checks (a deleted index is rebuilt from the Parquet data, exactly).
            assert outcome != "ok", (rel, how)
        assert (path / "manifest.json").exists()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
manifest_keys = st.sampled_from(
    ["format_version", "num_prompts", "num_rewards", "k", "k_stats", "checksums", "template", "files", "has_prompts"]
)


@FUZZ
@given(st.lists(st.tuples(manifest_keys, json_values, st.booleans()), min_size=1, max_size=4), st.booleans())
def test_any_manifest_edit_opens_the_store_as_written_or_is_refused(pristine, edits, whole):
    src, want = pristine
    with tempfile.TemporaryDirectory() as d:
        path = _copy(src, d)
        man = json.loads((path / "manifest.json").read_text())
        for key, value, delete in edits:
            if delete:
                man.pop(key, None)
            else:
                man[key] = value
        text = json.dumps(edits[0][1] if whole else man)  # whole: the manifest replaced by one JSON value
        (path / "manifest.json").write_text(text)
        _open_and_check(path, want, None)


@FUZZ
@given(st.binary(max_size=200))
def test_a_manifest_of_any_bytes(pristine, raw):
    src, want = pristine
    with tempfile.TemporaryDirectory() as d:
        path = _copy(src, d)
        (path / "manifest.json").write_bytes(raw)
        _open_and_check(path, want, None)
