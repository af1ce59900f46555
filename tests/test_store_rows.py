"""store/rows.py: the one reader of prompt-keyed JSONL rows: keys, reward lists, single rewards, file:line errors."""

import io
import json
from pathlib import Path

import numpy as np
import pytest

from openrlhf_infalign.store import StoreError, prompt_key
from openrlhf_infalign.store.format import prompt_digest
from openrlhf_infalign.store.rows import (
    check_rewards,
    iter_json_objects,
    iter_reward_lists,
    iter_single_rewards,
    parse_prompt_key,
)

SRC = Path("rows.jsonl")


def lines(*rows):
    return io.BytesIO("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode("utf-8"))


def test_objects_skip_blank_lines_and_count_them():
    got = list(iter_json_objects(SRC, lines({"a": 1}, "", "  ", {"b": 2})))
    assert got == [(1, {"a": 1}), (4, {"b": 2})]


@pytest.mark.parametrize(
    "raw, pattern",
    [(b"{nope\n", "not valid JSON"), (b"[1]\n", "expected a JSON object"), (b'{"a": "\xff"}\n', "not valid JSON")],
)
def test_objects_errors_name_file_and_line(raw, pattern):
    with pytest.raises(StoreError, match=f"rows.jsonl:2: .*{pattern}"):
        list(iter_json_objects(SRC, io.BytesIO(b'{"ok": 1}\n' + raw)))


def test_prompt_key_from_prompt_key_or_both():
    assert parse_prompt_key(SRC, 1, {"prompt": "é"}) == (prompt_digest("é"), "é")
    assert parse_prompt_key(SRC, 1, {"prompt_key": prompt_key("é").upper()}) == (prompt_digest("é"), None)
    assert parse_prompt_key(SRC, 1, {"prompt": "é", "prompt_key": prompt_key("é")}) == (prompt_digest("é"), "é")
    for row, pattern in [
        ({"prompt": "a", "prompt_key": prompt_key("b")}, "is not sha1 of"),
        ({"prompt_key": "ab" * 19 + "  "}, "not hexadecimal"),
        ({"prompt": 3}, '"prompt" must be a string'),
        ({}, 'needs "prompt"'),
    ]:
        with pytest.raises(StoreError, match=f"rows.jsonl:7: .*{pattern}"):
            parse_prompt_key(SRC, 7, row)


def test_reward_lists_and_their_checks():
    f = lines({"prompt": "a", "rewards": [1, 2.5]}, {"prompt_key": prompt_key("b"), "rewards": [0.0]})
    got = list(iter_reward_lists(SRC, f))
    assert got == [
        (1, prompt_digest("a"), "a", [1, 2.5]),
        (2, prompt_digest("b"), None, [0.0]),
    ]
    with pytest.raises(StoreError, match=r"rows.jsonl:1: 1 rewards \(< --k-min 2\)"):
        list(iter_reward_lists(SRC, lines({"prompt": "a", "rewards": [1.0]}), k_min=2))
    # float32 for the store, float64 for win rates: 1e39 fits only the second.
    np.testing.assert_array_equal(check_rewards(SRC, [1.0, 1e39], [2], [3], np.float64), [1.0, 1e39])
    with pytest.raises(StoreError, match=r"rows.jsonl:3: rewards\[1\] is 1e\+39: not a finite float32"):
        check_rewards(SRC, [1.0, 1e39], [2], [3])
    with pytest.raises(StoreError, match=r"rows.jsonl:9: .*rewards\[0\] \S+ \(401 digits\) .* float64 .*out of range"):
        check_rewards(SRC, [1.0, 10**400], [1, 1], [8, 9], np.float64)


def test_single_rewards():
    f = lines({"prompt": "a", "reward": 1}, {"prompt_key": prompt_key("b"), "reward": -0.5})
    want = [(1, prompt_digest("a"), "a", 1.0), (2, prompt_digest("b"), None, -0.5)]
    assert list(iter_single_rewards(SRC, f)) == want
    for row, pattern in [
        ('{"prompt": "a", "reward": true}', '"reward" must be a number'),
        ('{"prompt": "a", "reward": 1' + "0" * 400 + "}", "out of float range"),
        ('{"prompt": "a", "reward": Infinity}', "NaN/inf"),
    ]:
        with pytest.raises(StoreError, match=f"rows.jsonl:1: .*{pattern}"):
            list(iter_single_rewards(SRC, lines(row)))
