"""JSONL rows keyed by prompt, ``{"prompt": str | "prompt_key": sha1hex, ...}``: one reader, errors name file:line.

Three commands read this shape: `infalign store import` and `infalign evaluate` (a "rewards" list per row) and
`infalign score` (one "reward" per row). A row may give both keys; then the prompt must hash to the key.
Files are read in binary, one line at a time, so a line that is not UTF-8 is a row error like any other.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .format import StoreError, key_digest, prompt_digest, prompt_key


def row_error(src: Path, lineno: int, msg: str) -> StoreError:
    return StoreError(f"{src}:{lineno}: {msg}")


def iter_json_objects(src: Path, f, bar=None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of the binary file f read from src; a StoreError naming
    src:line for a line that is not a JSON object. bar (tqdm) advances by the bytes of every line read."""
    for lineno, raw in enumerate(f, start=1):
        if bar is not None:
            bar.update(len(raw))
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise row_error(
                src, lineno, f"not valid JSON ({e.msg}, column {e.colno}); invalid JSON is never skipped"
            ) from None
        except UnicodeDecodeError as e:
            raise row_error(src, lineno, f"not valid JSON ({e}); invalid JSON is never skipped") from None
        if not isinstance(row, dict):
            raise row_error(
                src,
                lineno,
                f"expected a JSON object, got {type(row).__name__}: each line is one row, expected an object with "
                '"prompt" or "prompt_key"',
            )
        yield lineno, row


def parse_prompt_key(src: Path, lineno: int, row: dict) -> tuple[bytes, str | None]:
    """(20-byte sha1 digest, prompt or None) of a row's "prompt" and/or "prompt_key"; a StoreError naming src:line
    if neither is given, either is malformed, or the key is not the prompt's sha1."""
    prompt = row.get("prompt")
    key = row.get("prompt_key")
    if prompt is not None and not isinstance(prompt, str):
        raise row_error(src, lineno, f'"prompt" must be a string, got {type(prompt).__name__}')
    if prompt is not None:
        try:  # JSON can spell a lone surrogate ("\ud800"), which no UTF-8 text, hence no templated prompt, holds
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise row_error(
                src, lineno, f'"prompt" is not valid Unicode text ({e.reason} at character {e.start})'
            ) from None
    if key is not None:
        try:
            digest = key_digest(key)
        except StoreError as e:
            raise row_error(src, lineno, str(e)) from None
        if prompt is not None and prompt_digest(prompt) != digest:
            raise row_error(
                src,
                lineno,
                f'"prompt_key" {key} is not sha1 of "prompt" (expected {prompt_key(prompt)}): a key that is not the '
                "sha1 of its prompt would look up another prompt's rewards",
            )
        return digest, prompt
    if prompt is None:
        raise row_error(
            src,
            lineno,
            "row has neither 'prompt' nor 'prompt_key': it needs \"prompt\" (the exact prompt string) or "
            '"prompt_key" (its sha1 hex)',
        )
    return prompt_digest(prompt), prompt


def check_rewards(src: Path, flat: list, lengths: list, lines: list, dtype=np.float32) -> np.ndarray:
    """The rewards of several rows (concatenated in flat; row i has lengths[i] of them and sits on line lines[i])
    as one `dtype` array, or a StoreError naming the line and position of the first one that is not a finite
    number of that type."""
    off = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    name = np.dtype(dtype).name
    top = float(np.finfo(dtype).max)  # a Python float: compares exactly with huge JSON ints

    def first_bad(test, msg):
        for i, ln in enumerate(lines):
            for j, x in enumerate(flat[off[i] : off[i + 1]]):
                if test(x):
                    raise row_error(src, ln, msg(j, x))

    # json.loads gives int/float for numbers; anything else (bool, str, None, list, dict) is not a reward, and
    # np.array would quietly turn True or "2" into a number.
    if not set(map(type, flat)) <= {float, int}:
        first_bad(
            lambda x: type(x) not in (float, int),
            lambda j, x: f'"rewards" must hold numbers, found {x!r} (rewards[{j}] is not a number)',
        )
    try:
        vals = np.array(flat, dtype=np.float64)
    except OverflowError:
        first_bad(
            lambda x: isinstance(x, int) and abs(x) > top,
            lambda j, x: f"rewards[{j}] {str(x)[:12]}... ({len(str(x))} digits) is not a finite {name} number "
            "(out of range)",
        )
        raise
    bad = np.flatnonzero(~np.isfinite(vals) | (np.abs(vals) > top))
    if bad.size:
        i = int(np.searchsorted(off, bad[0], side="right") - 1)
        j = int(bad[0] - off[i])
        raise row_error(
            src, lines[i], f"rewards[{j}] is {vals[bad[0]]}: not a finite {name} number (NaN/inf or out of range)"
        )
    return vals.astype(dtype, copy=False)


def iter_reward_lists(src: Path, f, bar=None, k_min: int = 1) -> Iterator[tuple[int, bytes, str | None, list]]:
    """(line, digest, prompt or None, rewards as parsed) per row ``{"prompt"|"prompt_key": ..., "rewards": [...]}``
    with at least k_min rewards; the rewards' values are left to `check_rewards` (in chunks of rows, for speed)."""
    for lineno, row in iter_json_objects(src, f, bar):
        digest, prompt = parse_prompt_key(src, lineno, row)
        rewards = row.get("rewards")
        if not isinstance(rewards, list):
            raise row_error(src, lineno, f'"rewards" must be a list of numbers, got {type(rewards).__name__}')
        if not rewards:
            raise row_error(src, lineno, 'an empty "rewards" list; every prompt needs a non-empty list of rewards')
        if len(rewards) < k_min:
            raise row_error(
                src,
                lineno,
                f'{len(rewards)} rewards (< --k-min {k_min}) in its "rewards" list; every prompt needs '
                "reference rewards",
            )
        yield lineno, digest, prompt, rewards


def iter_single_rewards(src: Path, f) -> Iterator[tuple[int, bytes, str | None, float]]:
    """(line, digest, prompt or None, reward) per sample row ``{"prompt"|"prompt_key": ..., "reward": x}``."""
    for lineno, row in iter_json_objects(src, f):
        digest, prompt = parse_prompt_key(src, lineno, row)
        r = row.get("reward")
        if isinstance(r, bool) or not isinstance(r, (int, float)):
            raise row_error(src, lineno, f'"reward" must be a number, got {r!r}')
        try:
            r = float(r)  # a JSON integer can exceed float range
        except OverflowError:
            raise row_error(src, lineno, f'"reward" {str(row["reward"])[:20]}... is out of float range') from None
        if not math.isfinite(r):
            raise row_error(src, lineno, f'"reward" is {r}: NaN/inf rewards have no calibrated rank')
        yield lineno, digest, prompt, r
