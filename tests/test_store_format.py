"""store/format.py: prompt keys (sha1 of the exact prompt) and their digests, in every form a caller may pass."""

import hashlib

import numpy as np
import pytest

from openrlhf_infalign.store import ReferenceStore, StoreError, prompt_key, write_store
from openrlhf_infalign.store.format import digests_from_keys, key_digest, prompt_digest, prompt_digests


def test_prompt_key_is_sha1_of_utf8():
    assert prompt_key("héllo") == hashlib.sha1("héllo".encode("utf-8")).hexdigest()
    assert len(prompt_key("")) == 40


def test_keys_accepted_as_hex_bytes_digests_and_uppercase(tmp_path, quiet, make_data):
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


def test_digest_forms_agree_with_prompt_key():
    prompts = ["héllo", "", "Q : 2 + 2 ? A :"]
    assert [prompt_digest(p) for p in prompts] == [hashlib.sha1(p.encode("utf-8")).digest() for p in prompts]
    assert prompt_digests(prompts).tobytes() == b"".join(map(prompt_digest, prompts))
    assert [key_digest(prompt_key(p)) for p in prompts] == [prompt_digest(p) for p in prompts]
    assert key_digest(prompt_key("a").upper()) == prompt_digest("a")
    np.testing.assert_array_equal(digests_from_keys([prompt_key(p) for p in prompts]), prompt_digests(prompts))


@pytest.mark.parametrize(
    "key, pattern",
    [
        ("abc", "40-character sha1 hex"),
        (None, "40-character"),
        ("g" * 40, "not hexadecimal"),
        ("ab" * 19 + "  ", "not hexadecimal"),  # bytes.fromhex skips spaces: 19 bytes, not 20
    ],
)
def test_key_digest_rejects_malformed_keys(key, pattern):
    with pytest.raises(StoreError, match=pattern):
        key_digest(key)
