"""store/jsonl.py: the pyarrow fast reader agrees with the checked one; export is atomic and round-trips."""

import json
import warnings

import numpy as np
import pytest

from openrlhf_infalign.store import ReferenceStore, prompt_key, write_store
from openrlhf_infalign.store.jsonl import _read_fast, export_jsonl, import_jsonl, read_reference_jsonl


def test_fast_reader_matches_checked_reader(tmp_path, ref_rows, write_jsonl):
    rows = ref_rows(40) + ["", '{"prompt": "ints", "rewards": [3, 1, 2], "extra": {"ignored": [1]}}', "   "]
    rows += [{"prompt": "both", "prompt_key": prompt_key("both"), "rewards": [0.25]}]
    src = write_jsonl(tmp_path / "refs.jsonl", rows)
    fast = _read_fast(src, False, 1)  # raises _Fallback if it could not judge the file itself
    slow = read_reference_jsonl(src, progress=False, fast=False)
    np.testing.assert_array_equal(fast[0], slow[0])
    np.testing.assert_array_equal(fast[1].values, slow[1].values)
    np.testing.assert_array_equal(fast[1].offsets, slow[1].offsets)
    assert fast[2] == slow[2]
    np.testing.assert_array_equal(fast[3], slow[3])  # line numbers, blank lines skipped
    assert fast[3][-1] == 44 and fast[3][-2] == 42


def test_export_replaces_the_file_whole_and_leaves_no_temporary(tmp_path, monkeypatch, ref_rows, write_jsonl):
    src = write_jsonl(tmp_path / "refs.jsonl", ref_rows(5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store = import_jsonl(src, tmp_path / "st", progress=False)
    out = tmp_path / "out" / "back.jsonl"  # the folder is made
    assert export_jsonl(store, out, progress=False) == 5
    first = out.read_bytes()
    assert [p.name for p in out.parent.iterdir()] == ["back.jsonl"]

    def boom(*a, **k):
        raise RuntimeError("killed while exporting")

    monkeypatch.setattr(json, "dumps", boom)
    with pytest.raises(RuntimeError, match="killed"):
        export_jsonl(store, out, progress=False)
    assert out.read_bytes() == first  # the old export is intact, no half-written file beside it
    assert [p.name for p in out.parent.iterdir()] == ["back.jsonl"]


def test_export_without_prompts_writes_keys_only(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store = write_store(tmp_path / "st", None, [[1.0, 2.0], [0.5]], prompts=["a", "b"])
    out = tmp_path / "keys.jsonl"
    assert export_jsonl(store, out, include_prompts=False, progress=False) == 2
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(r["prompt_key"] for r in rows) == sorted([prompt_key("a"), prompt_key("b")])
    assert all(set(r) == {"prompt_key", "rewards"} for r in rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = ReferenceStore.open(import_jsonl(out, tmp_path / "st2", progress=False))
    np.testing.assert_array_equal(back.rewards_for_key(prompt_key("a")), [1.0, 2.0])


def test_invalid_utf8_inside_a_string_names_file_and_line(tmp_path):
    # pyarrow's reader accepts the bytes and fails only when the string is read: the checked reader names the line.
    src = tmp_path / "refs.jsonl"
    src.write_bytes(b'{"prompt": "a", "rewards": [1.0]}\n{"prompt": "b\xff", "rewards": [1.0]}\n')
    with pytest.raises(ValueError, match=r"refs.jsonl:2: not valid JSON \('utf-8' codec can't decode"):
        import_jsonl(src, tmp_path / "s", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["refs.jsonl"]
