"""Writing a reference reward store: validate, sort, write Parquet + index + manifest into a temp dir, then rename.

The move into place is the commit point (commit.py: only over a store this project wrote, in one atomic swap): a
kill at any earlier moment leaves the previous store (or nothing) at ``out_dir`` and at most a hidden
``.NAME.partial-PID-*`` directory beside it, which the next write to the same place removes. The manifest records
each file's size and sha256 (``checksums``), so that readers can tell a damaged file from a good one.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import os
import warnings
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np

from ..files import write_json
from .commit import check_target, commit_dir, recover
from .format import (
    CHECKSUMS,
    FORMAT_VERSION,
    INDEX_DIR,
    INDEX_FILES,
    K_WARN,
    MANIFEST,
    PARQUET,
    StoreError,
    digests_from_keys,
    hex_from_digests,
    k_summary,
    key_hi,
    prompt_digest,
    prompt_digests,
    prompt_key,
    sort_order,
)

logger = logging.getLogger(__name__)

# Rows per Parquet row group: ~16 MB of float32 at K = 64; readers stream group by group.
ROW_GROUP = 65536
_GATHER_CHUNK = 1 << 20  # values per chunk when permuting ragged rows (bounds the temporary index arrays)


class Ragged(NamedTuple):
    """CSR form of per-prompt reward lists: row p is ``values[offsets[p]:offsets[p+1]]`` (offsets has P+1 entries)."""

    values: np.ndarray
    offsets: np.ndarray


def _to_ragged(rewards, n_rows: int) -> Ragged:
    if isinstance(rewards, Ragged):
        values = np.asarray(rewards.values).reshape(-1)
        if values.dtype not in (np.float32, np.float64):
            values = values.astype(np.float64)
        offsets = np.asarray(rewards.offsets, dtype=np.int64).reshape(-1)
        if offsets.shape[0] != n_rows + 1:
            raise StoreError(f"Ragged offsets have {offsets.shape[0]} entries, expected {n_rows + 1} (prompts + 1)")
        if offsets[0] != 0 or offsets[-1] != values.shape[0] or (np.diff(offsets) < 0).any():
            raise StoreError("Ragged offsets must start at 0, be non-decreasing and end at len(values)")
        return Ragged(values, offsets)
    if isinstance(rewards, np.ndarray) and rewards.ndim == 2:
        # A dense (P, K) matrix: every prompt has K rewards.
        p, k = rewards.shape
        if p != n_rows:
            raise StoreError(f"rewards has {p} rows but there are {n_rows} prompt keys")
        values = rewards.reshape(-1) if rewards.dtype in (np.float32, np.float64) else rewards.astype(np.float64)
        return Ragged(values.reshape(-1), np.arange(p + 1, dtype=np.int64) * k)
    try:
        n = len(rewards)
    except TypeError:
        raise StoreError(f"rewards must be a sequence of 1-D arrays or Ragged(values, offsets), got {type(rewards)}")
    if n != n_rows:
        hint = " (for CSR input pass openrlhf_infalign.store.Ragged(values, offsets))" if n == 2 else ""
        raise StoreError(f"got {n} reward lists for {n_rows} prompt keys{hint}")
    lengths = np.fromiter((len(r) for r in rewards), dtype=np.int64, count=n)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.empty(int(offsets[-1]), dtype=np.float64)
    for i, r in enumerate(rewards):
        try:
            values[offsets[i] : offsets[i + 1]] = np.asarray(r, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as e:
            raise StoreError(f"row {i}: rewards must be numbers ({e})") from None
    return Ragged(values, offsets)


def _sort_segments(values: np.ndarray, offsets: np.ndarray) -> None:
    """Sort every row's segment ascending in place, one 2-D np.sort per distinct K (no loop per prompt)."""
    lengths = np.diff(offsets)
    if lengths.size == 0:
        return
    for k in np.unique(lengths):
        if k <= 1:
            continue
        rows = np.flatnonzero(lengths == k)
        if rows.size == lengths.size and offsets[0] == 0:
            values[:] = np.sort(values.reshape(-1, k), axis=1).reshape(-1)
            return
        idx = offsets[rows][:, None] + np.arange(k)
        values[idx] = np.sort(values[idx], axis=1)


def _gather_rows(values: np.ndarray, offsets: np.ndarray, perm: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Rows of a CSR array in the order `perm`, as a new CSR array of `dtype` (chunked to bound memory)."""
    lengths = np.diff(offsets)[perm]
    new_offsets = np.zeros(perm.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    out = np.empty(int(new_offsets[-1]), dtype=dtype)
    if (
        lengths.size
        and (lengths == lengths[0]).all()
        and np.array_equal(offsets, np.arange(offsets.size) * lengths[0])
    ):
        k = int(lengths[0])
        if k:
            out.reshape(-1, k)[:] = values.reshape(-1, k)[perm]
        return out, new_offsets
    start_row = 0
    while start_row < perm.shape[0]:
        # Rows [start_row, end_row) hold about _GATHER_CHUNK values.
        end_row = int(np.searchsorted(new_offsets, new_offsets[start_row] + _GATHER_CHUNK, side="right"))
        end_row = max(end_row - 1, start_row + 1)
        end_row = min(end_row, perm.shape[0])
        seg_len = lengths[start_row:end_row]
        src = np.repeat(offsets[perm[start_row:end_row]] - new_offsets[start_row:end_row], seg_len)
        lo, hi = int(new_offsets[start_row]), int(new_offsets[end_row])
        src += np.arange(lo, hi)
        out[lo:hi] = values[src]
        start_row = end_row
    return out, new_offsets


def _default_row_name(i: int) -> str:
    return f"row {i}"


def _describe(i: int, row_name: Callable[[int], str], prompts, hexkeys: np.ndarray | None = None) -> str:
    text = row_name(i)
    if prompts is not None and prompts[i] is not None:
        p = str(prompts[i])
        text += f" (prompt {p[:80] + '...' if len(p) > 80 else p!r})"
    elif hexkeys is not None:
        text += f" (prompt_key {hexkeys[i].tobytes().decode()})"
    return text


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(arr), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def build_table(digests: np.ndarray, values: np.ndarray, offsets: np.ndarray, prompts=None):
    """pyarrow Table (prompt_key string, [prompt string], rewards list<float32>) with no Python object per row."""
    import pyarrow as pa

    n = digests.shape[0]
    hexbuf = hex_from_digests(digests)
    key_offsets = np.arange(n + 1, dtype=np.int32) * 40
    keys = pa.StringArray.from_buffers(n, pa.py_buffer(key_offsets), pa.py_buffer(hexbuf.tobytes()))
    vals = pa.array(np.asarray(values, dtype=np.float32), type=pa.float32())
    if int(offsets[-1]) < 2**31 - 1:
        rewards = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), vals)
    else:  # beyond 2**31 values the list offsets need 64 bits
        rewards = pa.LargeListArray.from_arrays(pa.array(offsets), vals)
    cols = {"prompt_key": keys}
    if prompts is not None:
        cols["prompt"] = pa.array(prompts, type=pa.string())
    cols["rewards"] = rewards
    return pa.table(cols)


def _write_parquet(path: Path, table) -> None:
    import pyarrow.parquet as pq

    with pq.ParquetWriter(
        path,
        table.schema,
        compression="zstd",
        use_dictionary=False,
        write_statistics=["prompt_key"],
    ) as w:
        for start in range(0, max(table.num_rows, 1), ROW_GROUP):
            w.write_table(table.slice(start, ROW_GROUP))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_index(index_dir: Path, digests: np.ndarray, values: np.ndarray, offsets: np.ndarray) -> None:
    """The memory-mappable copy of the store's arrays (see format.py)."""
    index_dir.mkdir(parents=True, exist_ok=True)
    _save_npy(index_dir / "keys.npy", digests.astype(np.uint8, copy=False))
    _save_npy(index_dir / "key_hi.npy", key_hi(digests))
    _save_npy(index_dir / "values.npy", values.astype(np.float32, copy=False))
    _save_npy(index_dir / "offsets.npy", offsets.astype(np.int64, copy=False))


def write_store(
    out_dir,
    prompt_keys,
    rewards,
    *,
    prompts: Sequence[str | None] | None = None,
    manifest: dict | None = None,
    overwrite: bool = False,
    row_name: Callable[[int], str] | None = None,
    k_min: int = 1,
    verify_prompts: bool = True,
    inputs: Iterable = (),
) -> Path:
    """Write a reference reward store atomically; returns its path.

    prompt_keys: P sha1 hex keys (see `prompt_key`), 20-byte digests, or a (P, 20) uint8 array; if None, computed
    from `prompts`. rewards: a sequence of P 1-D arrays (ragged K), a dense (P, K) array, or ``Ragged(values,
    offsets)`` (CSR; offsets has P+1 entries). Rewards are stored as float32; each list is sorted.
    prompts: optional prompt strings (None entries allowed), stored for tools and error messages; when given with
    keys, every prompt must hash to its key.
    manifest: extra manifest fields (policy_model, reward_source, sampling, template, ... any extra key is kept);
    format_version, k, k_stats, num_prompts, num_rewards, created and files are filled in here.
    Duplicated prompt keys: identical reward sets (as multisets) are merged into one row; different sets raise
    StoreError naming both rows. NaN/inf rewards, an empty reward list, or fewer than `k_min` rewards raise
    StoreError naming the row (`row_name(i)` describes input row i in messages, default "row i").
    K below 16 warns. verify_prompts=False skips the prompt -> key hash check (for callers that checked it already).
    Where it writes (commit.check_target, checked before any work and again before the commit): a new path or an
    empty directory; an existing store only with overwrite=True, swapped in atomically; never a plain file, a
    folder with other content, or a path that is, holds or sits inside one of ``inputs`` (the caller's input files
    and folders, e.g. the JSONL being imported, the dataset and models of a calibration). Returns the real path.
    """
    row_name = row_name or _default_row_name
    out_dir = Path(out_dir)
    if prompt_keys is None:
        if prompts is None:
            raise StoreError("write_store needs prompt_keys or prompts")
        digests = prompt_digests(prompts)
    else:
        digests = digests_from_keys(prompt_keys)
    n = digests.shape[0]
    if prompts is not None:
        prompts = list(prompts)
        if len(prompts) != n:
            raise StoreError(f"got {len(prompts)} prompts for {n} prompt keys")
        if prompt_keys is not None and verify_prompts:
            _check_prompts_match(digests, prompts, row_name)
        if all(p is None for p in prompts):
            prompts = None
    inputs = list(inputs)
    recover(Path(os.path.realpath(out_dir)))  # a store a killed writer left aside is put back first
    check_target(out_dir, overwrite=overwrite, inputs=inputs)  # fail before the work, not after it

    rag = _to_ragged(rewards, n)
    values, offsets = rag.values, rag.offsets
    lengths = np.diff(offsets)
    bad = np.flatnonzero(lengths < max(k_min, 1))
    if bad.size:
        i = int(bad[0])
        what = "an empty reward list" if lengths[i] == 0 else f"{lengths[i]} rewards, fewer than k_min={k_min}"
        raise StoreError(f"{_describe(i, row_name, prompts)} has {what}{_more(bad)}")
    nonfinite = np.flatnonzero(~np.isfinite(values))
    if nonfinite.size:
        rows = np.searchsorted(offsets, nonfinite, side="right") - 1
        i = int(rows[0])
        raise StoreError(
            f"{_describe(i, row_name, prompts)} has a non-finite reward ({values[nonfinite[0]]}); "
            f"rewards must be finite numbers{_more(np.unique(rows))}"
        )
    too_big = np.flatnonzero(np.abs(values) > np.finfo(np.float32).max) if values.dtype != np.float32 else []
    if len(too_big):
        i = int(np.searchsorted(offsets, too_big[0], side="right") - 1)
        raise StoreError(f"{_describe(i, row_name, prompts)} has reward {values[too_big[0]]} beyond float32 range")
    # Sort in float32: the stored values, so duplicate detection compares exactly what would be written.
    values32 = values.astype(np.float32)
    del values
    _sort_segments(values32, offsets)

    order = sort_order(digests)
    sd = digests[order]
    same = np.flatnonzero((sd[1:] == sd[:-1]).all(axis=1))
    keep = np.ones(n, dtype=bool)
    merged = 0
    if same.size:
        hexkeys = hex_from_digests(digests)
        for j in same:
            a, b = int(order[j]), int(order[j + 1])
            ra = values32[offsets[a] : offsets[a + 1]]
            rb = values32[offsets[b] : offsets[b + 1]]
            if ra.shape != rb.shape or not np.array_equal(ra, rb):
                first, second = min(a, b), max(a, b)
                raise StoreError(
                    f"{_describe(second, row_name, prompts, hexkeys)} repeats the prompt of {row_name(first)} with a "
                    f"different reward set (K={lengths[second]} vs K={lengths[first]}); a prompt must have one set of "
                    "reference rewards: remove or merge the duplicate"
                )
            keep[j + 1] = False  # position in sorted order; keep the first occurrence
            merged += 1
        if merged:
            warnings.warn(f"merged {merged} duplicated prompt(s) with identical reward sets", stacklevel=2)
    order = order[keep]
    sd = sd[keep]
    out_values, out_offsets = _gather_rows(values32, offsets, order, np.float32)
    del values32
    out_prompts = [prompts[i] for i in order.tolist()] if prompts is not None else None
    out_lengths = np.diff(out_offsets)

    stats = k_summary(out_lengths)
    if out_lengths.size and stats["min"] < K_WARN:
        warnings.warn(
            f"reference store {out_dir}: K min={stats['min']} (median {stats['median']}) is below {K_WARN}: "
            f"calibrated rewards move in coarse steps of 1/K; generate more reference samples if you can",
            stacklevel=2,
        )
    man = dict(manifest or {})
    uniform = out_lengths.size > 0 and stats["min"] == stats["max"]
    man.update(
        {
            "format_version": FORMAT_VERSION,
            "k": stats["min"] if uniform else {k: stats[k] for k in ("min", "median", "max")},
            "k_stats": stats,
            "num_prompts": int(sd.shape[0]),
            "num_rewards": int(out_offsets[-1]),
            "merged_duplicates": merged,
            "has_prompts": out_prompts is not None,
            "files": {"data": PARQUET, "index": INDEX_DIR},
        }
    )
    for key in ("policy_model", "reward_source"):
        man.setdefault(key, None)
    man.setdefault("sampling", {})
    man.setdefault("template", {})
    man.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    table = build_table(sd, out_values, out_offsets, out_prompts)
    commit_dir(out_dir, overwrite, lambda tmp: _write_all(tmp, table, sd, out_values, out_offsets, man), inputs=inputs)
    logger.info("wrote reference store %s: %d prompts, K %s", out_dir, sd.shape[0], man["k"])
    return out_dir


def _more(idx: np.ndarray) -> str:
    return f" (and {idx.size - 1} more row(s))" if idx.size > 1 else ""


def _check_prompts_match(digests: np.ndarray, prompts: list, row_name) -> None:
    for i, p in enumerate(prompts):
        if p is not None and prompt_digest(p) != digests[i].tobytes():
            raise StoreError(
                f"{row_name(i)}: prompt_key {digests[i].tobytes().hex()} is not sha1 of its prompt {p[:80]!r} "
                f"(expected {prompt_key(p)})"
            )


def file_digest(path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read in 8 MiB blocks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 23):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


STORE_FILES = (PARQUET,) + tuple(f"{INDEX_DIR}/{name}" for name in INDEX_FILES)


def _write_all(tmp: Path, table, digests, values, offsets, manifest: dict) -> None:
    _write_parquet(tmp / PARQUET, table)
    write_index(tmp / INDEX_DIR, digests, values, offsets)
    # Sizes let every open check in microseconds that no file was cut short; digests let verify() find any change.
    sums = {}
    for rel in STORE_FILES:
        size, sha = file_digest(tmp / rel)
        sums[rel] = {"size": size, "sha256": sha}
    write_json(tmp / MANIFEST, {**manifest, CHECKSUMS: sums})
