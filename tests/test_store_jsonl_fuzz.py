"""Fuzzing the JSONL row readers (store import, score, evaluate): any bytes in, either the rows a plain reference
parser reads or one StoreError naming file:line; never another exception, never a file lost or half written."""

import hashlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from openrlhf_infalign.store import ReferenceStore, StoreError
from openrlhf_infalign.store.jsonl import import_jsonl, read_reference_jsonl
from openrlhf_infalign.store.rows import iter_single_rewards

# CI runs a fixed sample (derandomized, seconds); INFALIGN_FUZZ_SCALE=50 searches fifty times longer, afresh.
SCALE = int(os.environ.get("INFALIGN_FUZZ_SCALE", "1"))
FUZZ = settings(max_examples=120 * SCALE, deadline=None, derandomize=SCALE == 1, database=None)
FUZZ_SLOW = settings(max_examples=40 * SCALE, deadline=None, derandomize=SCALE == 1, database=None)

# ---------------------------------------------------------------------------------------------------------------
# inputs: mostly well-formed rows, with the odd things real files hold


prompts = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["", " ", "a", "\u00e9", "\u4e2d", "\ud800", "line\nbreak", '"quoted"', "\x00"]),
)
numbers = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.integers(-5, 5),
    st.sampled_from([float("nan"), float("inf"), 1e39, -1e39, 10**400, True, "1.0", None]),
)
rewards = st.lists(numbers, max_size=5)


@st.composite
def rows(draw):
    row = {}
    form = draw(st.sampled_from(["prompt", "key", "both", "neither", "both-wrong"]))
    p = draw(prompts)
    if form in ("prompt", "both", "both-wrong"):
        row["prompt"] = p
    if form in ("key", "both"):
        row["prompt_key"] = draw(st.one_of(st.just(_key(p)), st.text(max_size=41)))
    if form == "both-wrong":
        row["prompt_key"] = _key(p + "x")
    if draw(st.booleans()):
        row["rewards"] = draw(st.one_of(rewards, numbers, st.just({})))
    else:
        row["rewards"] = draw(st.lists(st.floats(-3, 3, width=32), min_size=1, max_size=4))
    return row


def _key(p: str) -> str:
    return hashlib.sha1(p.encode("utf-8", "surrogatepass")).hexdigest()


@st.composite
def files(draw, row_strategy=rows()):
    lines = []
    for row in draw(st.lists(row_strategy, min_size=0, max_size=6)):
        text = json.dumps(row, ensure_ascii=draw(st.booleans()))
        lines.append(text.encode("utf-8", "surrogatepass"))
    lines += draw(st.lists(st.sampled_from([b"", b"   ", b"[1, 2]", b"{", b"\xff\xfe", b'{"prompt": 1}']), max_size=2))
    order = draw(st.permutations(range(len(lines))))
    raw = b"\n".join(lines[i] for i in order) + draw(st.sampled_from([b"", b"\n", b"\r\n"]))
    if raw and draw(st.booleans()):  # one random byte changed or the file cut short
        i = draw(st.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([draw(st.integers(0, 255))]) + raw[i + 1 :] if draw(st.booleans()) else raw[:i]
    return raw


# ---------------------------------------------------------------------------------------------------------------
# the reference: json.loads per line, the rules written out plainly


class Bad(Exception):
    def __init__(self, line):
        self.line = line


def _finite32(x) -> bool:
    if type(x) not in (int, float):
        return False
    try:
        return math.isfinite(float(x)) and abs(float(x)) <= float(np.finfo(np.float32).max)
    except OverflowError:
        return False


def reference_store(raw: bytes) -> dict:
    """{sha1 hex: sorted float32 rewards} as the rules say, or Bad(first line that breaks them)."""
    out, bad = {}, None
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
            p, k, r = row.get("prompt"), row.get("prompt_key"), row.get("rewards")
            assert isinstance(row, dict) and (p is not None or k is not None)
            assert p is None or isinstance(p, str)
            key = _key(p) if p is not None else None
            if p is not None:
                p.encode("utf-8")  # a lone surrogate is no prompt any tokenizer produced
            if k is not None:
                assert isinstance(k, str) and len(k) == 40 and all(c in "0123456789abcdefABCDEF" for c in k)
                assert key is None or key == k.lower()
                key = k.lower()
            assert isinstance(r, list) and r and all(_finite32(x) for x in r)
            vals = sorted(np.float32(x) for x in r)
            if key in out and out[key] != vals:
                raise AssertionError("conflicting duplicate")
            out[key] = vals
        except (AssertionError, ValueError, AttributeError, UnicodeError):
            bad = lineno if bad is None else bad
            return Bad(bad)
    return out


def _bad_lines(raw: bytes) -> set:
    """Every line the rules reject on its own (an error may name any of them: rows are checked in chunks)."""
    found = set()
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        if line.strip() and isinstance(reference_store(line), Bad):
            found.add(lineno)
    return found


# ---------------------------------------------------------------------------------------------------------------
# properties


def _tree(path: Path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@FUZZ_SLOW
@given(files())
def test_store_import_reads_what_the_rules_say_or_names_the_line(raw):
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = Path(d) / "refs.jsonl"
        src.write_bytes(raw)
        want = reference_store(raw)
        try:
            out = import_jsonl(src, Path(d) / "store", progress=False)
        except StoreError as e:
            assert isinstance(want, Bad), f"refused a good file: {e}"
            msg = str(e)
            assert msg.startswith(f"{src}:") or "conflict" in msg or "repeats the prompt" in msg, msg
            if msg.startswith(f"{src}:"):
                line = int(msg[len(str(src)) + 1 :].split(":", 1)[0].split(" ", 1)[0])
                assert line in _bad_lines(raw) or "repeats the prompt" in msg, (line, msg)
            assert src.read_bytes() == raw and sorted(os.listdir(d)) == ["refs.jsonl"]  # nothing lost, nothing left
            return
        assert not isinstance(want, Bad), f"accepted a bad file (line {want.line})"
        s = ReferenceStore.open(out)
        s.verify()
        assert sorted(s.keys()) == sorted(want)
        for key, vals in want.items():
            np.testing.assert_array_equal(s.rewards_for_key(key), np.array(vals, dtype=np.float32))
        assert src.read_bytes() == raw


@FUZZ
@given(files())
def test_fast_and_checked_readers_agree(raw):
    # The pyarrow reader judges nothing itself: whatever it accepts, the line-by-line reader reads the same.
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "refs.jsonl"
        src.write_bytes(raw)
        results = []
        for fast in (True, False):
            try:
                dig, rag, prompts, lines = read_reference_jsonl(src, progress=False, fast=fast)
                results.append((dig.tobytes(), rag.values.tobytes(), rag.offsets.tobytes(), prompts, lines.tolist()))
            except StoreError as e:
                assert str(e).startswith(f"{src}:"), str(e)
                results.append(("error", str(e)))
        assert results[0] == results[1]


@st.composite
def score_rows(draw):
    row = {"prompt": draw(prompts)}
    row["reward"] = draw(numbers)
    return row


@FUZZ
@given(files(score_rows()))
def test_score_rows_are_read_or_name_the_line(raw):
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "samples.jsonl"
        src.write_bytes(raw)
        try:
            with open(src, "rb") as f:
                got = list(iter_single_rewards(src, f))
        except StoreError as e:
            assert str(e).startswith(f"{src}:"), str(e)
            return
        for lineno, digest, prompt, reward in got:
            assert isinstance(reward, float) and math.isfinite(reward) and len(digest) == 20
            row = json.loads(raw.split(b"\n")[lineno - 1])
            assert reward == float(row["reward"]) and prompt == row.get("prompt")


def test_a_lone_surrogate_in_a_prompt_names_the_line(tmp_path):
    # JSON can spell "\ud800", which no UTF-8 text holds: not a prompt any tokenizer produced.
    src = tmp_path / "refs.jsonl"
    src.write_text('{"prompt": "ok", "rewards": [1.0]}\n{"prompt": "\\ud800", "rewards": [1.0]}\n')
    with pytest.raises(StoreError, match=f"{src}:2: "):
        read_reference_jsonl(src, progress=False)
    with open(src, "rb") as f, pytest.raises(StoreError, match=f"{src}:2: "):
        list(iter_single_rewards(src, (line.replace(b"rewards", b"reward").replace(b"[1.0]", b"1.0") for line in f)))
