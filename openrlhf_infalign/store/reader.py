"""Opening a reference reward store: memory-mapped arrays, vectorised key lookup, calibration, pickling by value."""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.calibration import calibrated_reward
from .format import (
    DIGEST_BYTES,
    FORMAT_VERSION,
    INDEX_DIR,
    INDEX_FILES,
    K_WARN,
    MANIFEST,
    PARQUET,
    StoreError,
    digests_from_keys,
    hex_strings,
    k_summary,
    key_hi,
    prompt_digests,
    sort_order,
)
from .writer import _commit_dir, write_index, write_store

logger = logging.getLogger(__name__)

ON_MISSING = ("error", "raw")


def read_manifest(path) -> dict:
    """manifest.json of a store, checked for a readable format version."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        hint = ""
        olds = sorted(path.parent.glob(f".{path.name}.old-*")) if path.name else []
        if olds:
            hint = f"; a previous version was left aside at {olds[0]} by an interrupted write"
        elif path.is_dir() and (path / PARQUET).exists():
            hint = "; the directory has data but no manifest (an interrupted or foreign copy?)"
        raise FileNotFoundError(
            f"{path} is not a reference store (no {MANIFEST}){hint}; build one with `infalign calibrate` or "
            "`infalign store import`"
        )
    try:
        with open(mf) as f:
            man = json.load(f)
    except json.JSONDecodeError as e:
        raise StoreError(f"{mf}: not valid JSON ({e})") from None
    check_format_version(man, mf)
    return man


def check_format_version(man: dict, where) -> None:
    v = man.get("format_version")
    if not isinstance(v, int):
        raise StoreError(f"{where}: manifest has no integer format_version (got {v!r})")
    if v > FORMAT_VERSION:
        raise StoreError(
            f"{where}: store format_version {v} is newer than this openrlhf-infalign reads (<= {FORMAT_VERSION}); "
            "upgrade openrlhf-infalign (pip install -U openrlhf-infalign)"
        )


def _load_index(index_dir: Path, man: dict):
    arrays = []
    for name in INDEX_FILES:
        arrays.append(np.asarray(np.load(index_dir / name, mmap_mode="r", allow_pickle=False)))
    keys, hi, values, offsets = arrays
    p, n = man.get("num_prompts"), man.get("num_rewards")
    ok = (
        keys.ndim == 2
        and keys.shape == (p, DIGEST_BYTES)
        and keys.dtype == np.uint8
        and hi.shape == (p,)
        and hi.dtype == np.uint64
        and values.shape == (n,)
        and values.dtype == np.float32
        and offsets.shape == (p + 1,)
        and offsets.dtype == np.int64
        and int(offsets[0]) == 0
        and int(offsets[-1]) == n
    )
    if not ok:
        raise StoreError(
            f"{index_dir}: index arrays do not match the manifest ({p} prompts, {n} rewards); delete {index_dir} "
            "and open the store again to rebuild it from the Parquet data"
        )
    return keys, hi, values, offsets


def _index_from_parquet(path: Path, man: dict):
    """Rebuild the index arrays from the Parquet data (rows are stored in key order)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path / PARQUET)
    keys, vals, lens = [], [], []
    for rg in range(pf.num_row_groups):
        t = pf.read_row_group(rg, columns=["prompt_key", "rewards"])
        keys.append(digests_from_keys(t.column("prompt_key").to_numpy(zero_copy_only=False).astype("U40")))
        col = t.column("rewards").combine_chunks()
        vals.append(col.flatten().to_numpy().astype(np.float32, copy=False))
        off = np.asarray(col.offsets, dtype=np.int64)
        lens.append(np.diff(off))
    digests = np.concatenate(keys) if keys else np.zeros((0, DIGEST_BYTES), np.uint8)
    values = np.concatenate(vals) if vals else np.zeros(0, np.float32)
    lengths = np.concatenate(lens) if lens else np.zeros(0, np.int64)
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if digests.shape[0] != man.get("num_prompts"):
        raise StoreError(f"{path / PARQUET} has {digests.shape[0]} rows, manifest says {man.get('num_prompts')}")
    if digests.shape[0] > 1:
        h = key_hi(digests)
        if (np.diff(h.astype(np.float64)) < 0).any():
            raise StoreError(f"{path / PARQUET}: rows are not in prompt_key order (not written by write_store?)")
    return digests, key_hi(digests), values, offsets


class ReferenceStore:
    """A reference reward store opened for lookups: per prompt, the ascending rewards of K base-policy samples.

    Attributes: path, manifest (dict), num_prompts, values (float32, each row ascending), offsets (int64, P+1).
    Arrays are memory-mapped read-only: opening costs O(1) and pages are read on use. Pickling (Ray object store,
    multiprocessing) carries the arrays by value, so the unpickled store works on a node without the directory.
    """

    def __init__(self, manifest: dict, keys: np.ndarray, key_hi: np.ndarray, values, offsets, path=None):
        self.manifest = manifest
        self._keys = keys
        self._hi = key_hi
        self.values = values
        self.offsets = offsets
        self.path = Path(path) if path is not None else None
        self.num_prompts = int(keys.shape[0])
        self._keys32 = np.ascontiguousarray(keys).view(np.uint32)  # (P, 5) view of the same bytes for compares
        # Every row has the same K (the usual case): rows are then fixed-stride slices of values.
        k = manifest.get("k")
        self._uniform_k = (
            int(k)
            if isinstance(k, int) and k > 0 and self.num_prompts and values.shape[0] == k * self.num_prompts
            else 0
        )

    # ---- opening -------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path, *, rebuild_index: bool = True, warn_small_k: bool = True) -> "ReferenceStore":
        """Open the store at `path` (memory-mapped). A missing index is rebuilt from the Parquet data (saved into
        the store when the directory is writable, else kept in memory) unless rebuild_index=False."""
        path = Path(path)
        man = read_manifest(path)
        index_dir = path / INDEX_DIR
        if all((index_dir / f).is_file() for f in INDEX_FILES):
            arrays = _load_index(index_dir, man)
        elif not rebuild_index:
            raise StoreError(f"{path}: no index/ directory (rebuild_index=False)")
        else:
            logger.warning("reference store %s has no index; rebuilding it from %s", path, PARQUET)
            arrays = _index_from_parquet(path, man)
            if os.access(path, os.W_OK):
                try:
                    _commit_dir(index_dir, True, lambda tmp: write_index(tmp, *arrays[:1], *arrays[2:]))
                    arrays = _load_index(index_dir, man)
                except OSError as e:  # read-only mounts etc.: keep the in-memory arrays
                    logger.warning("could not save the rebuilt index into %s: %s", index_dir, e)
        store = cls(man, *arrays, path=path)
        if warn_small_k and store.num_prompts:
            ks = man.get("k_stats") or {}
            kmin = ks.get("min", man.get("k") if isinstance(man.get("k"), int) else None)
            if isinstance(kmin, int) and kmin < K_WARN:
                warnings.warn(
                    f"reference store {path}: K min={kmin} < {K_WARN}; calibrated rewards are coarse (steps of 1/K)",
                    stacklevel=2,
                )
        return store

    @classmethod
    def from_arrays(cls, prompt_keys, rewards, manifest: dict | None = None) -> "ReferenceStore":
        """An in-memory store (tests, small jobs): same validation as write_store, nothing written."""
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            p = write_store(Path(d) / "store", prompt_keys, rewards, manifest=manifest)
            s = cls.open(p, warn_small_k=False)
            return cls(s.manifest, *(np.array(a) for a in (s._keys, s._hi, s.values, s.offsets)))

    # ---- pickling by value ---------------------------------------------------------------------------------
    def __reduce__(self):
        # The arrays themselves, not the path: the receiving node may not see the directory. Under pickle protocol
        # 5 (Ray) numpy arrays travel as out-of-band buffers, so this is a zero-copy put from the mmap.
        return (
            _rebuild,
            (self.manifest, self._keys, self._hi, self.values, self.offsets, str(self.path) if self.path else None),
        )

    def __repr__(self) -> str:
        return f"ReferenceStore({self.path}, prompts={self.num_prompts}, k={self.manifest.get('k')})"

    def __len__(self) -> int:
        return self.num_prompts

    # ---- lookups -------------------------------------------------------------------------------------------
    def rows_for_keys(self, keys, on_missing: str = "error", *, prompts: Sequence[str] | None = None) -> np.ndarray:
        """Row index (int64) of each prompt key; -1 where missing when on_missing="raw".

        keys: hex strings, 20-byte digests or a (B, 20) uint8 array. With on_missing="error" a missing key raises
        StoreError naming it (and its prompt text, if `prompts` is given).
        """
        if on_missing not in ON_MISSING:
            raise ValueError(f"on_missing must be one of {ON_MISSING}, got {on_missing!r}")
        q = digests_from_keys(keys)
        b = q.shape[0]
        if b == 0:
            return np.zeros(0, dtype=np.int64)
        if self.num_prompts == 0:
            rows = np.full(b, -1, dtype=np.int64)
        else:
            qh = key_hi(q)
            # Searching the queries in ascending order lets numpy's binary search reuse the previous bounds: ~3x
            # faster than random order on a million keys (the sort of B keys is cheap next to it).
            order = np.argsort(qh)
            pos = np.empty(b, dtype=np.int64)
            pos[order] = np.searchsorted(self._hi, qh[order])
            pos_c = np.minimum(pos, self.num_prompts - 1)
            found = self._hi[pos_c] == qh
            # Full 20-byte check, compared as 5 uint32 words per key.
            found &= (self._keys32[pos_c] == np.ascontiguousarray(q).view(np.uint32)).all(axis=1)
            rows = np.where(found, pos_c, -1).astype(np.int64)
            # Two stored keys sharing their first 8 bytes (~1e-8 chance per million prompts): finish by a scan.
            retry = np.flatnonzero(~found & (self._hi[pos_c] == qh))
            for i in retry.tolist():
                j = int(pos_c[i]) + 1
                while j < self.num_prompts and self._hi[j] == qh[i]:
                    if (self._keys[j] == q[i]).all():
                        rows[i] = j
                        break
                    j += 1
        if on_missing == "error":
            missing = np.flatnonzero(rows < 0)
            if missing.size:
                raise self._missing_error(q, missing, prompts)
        return rows

    def _missing_error(self, q: np.ndarray, missing: np.ndarray, prompts) -> StoreError:
        shown = []
        for i in missing[:3].tolist():
            s = q[i].tobytes().hex()
            if prompts is not None:
                p = str(prompts[i])
                s += f" (prompt {p[:80] + '...' if len(p) > 80 else p!r})"
            shown.append(s)
        n = np.unique(q[missing], axis=0).shape[0]
        where = self.path or "the reference store"
        return StoreError(
            f"{n} prompt(s) of this batch are not in {where}: {'; '.join(shown)}"
            f"{' ...' if missing.size > 3 else ''}. Build references for every training prompt with "
            "`infalign calibrate` (same dataset and template flags as training), or pass `--infalign.on_missing raw` "
            "to train those prompts on the raw reward"
        )

    def rows_for_prompts(self, prompts: Sequence[str], on_missing: str = "error") -> np.ndarray:
        """rows_for_keys over sha1 of the prompt strings (errors quote the prompt text)."""
        return self.rows_for_keys(prompt_digests(prompts), on_missing, prompts=prompts)

    def calibrate(self, keys, rewards, on_missing: str = "error", *, prompts=None) -> np.ndarray:
        """Mid-rank calibrated reward (float64 in [0, 1]) of each reward against its prompt's reference rewards.

        Rows missing from the store give NaN with on_missing="raw" (the caller falls back to the raw reward).
        """
        r = np.asarray(rewards, dtype=np.float64).reshape(-1)
        rows = self.rows_for_keys(keys, on_missing, prompts=prompts)
        if rows.shape[0] != r.shape[0]:
            raise ValueError(f"{rows.shape[0]} prompt keys but {r.shape[0]} rewards")
        if on_missing == "error" or (rows >= 0).all():
            return self._calibrate_rows(r, rows)
        out = np.full(r.shape[0], np.nan)
        ok = rows >= 0
        if ok.any():
            out[ok] = self._calibrate_rows(r[ok], rows[ok])
        return out

    def _calibrate_rows(self, r: np.ndarray, rows: np.ndarray) -> np.ndarray:
        # calibrated_reward compares at the store's float32 precision: hand it only this batch's rows (B*K values,
        # gathered once, kept float32) rather than the whole store, so cost and memory scale with the batch.
        if r.shape[0] == 0:
            return np.zeros(0, dtype=np.float64)
        uniq, inv = np.unique(rows, return_inverse=True)
        k = self._uniform_k
        if k:
            sub = self.values.reshape(-1, k)[uniq].reshape(-1)
            sub_offsets = np.arange(uniq.size + 1, dtype=np.int64) * k
        else:
            lo = self.offsets[uniq]
            lengths = self.offsets[uniq + 1] - lo
            sub_offsets = np.zeros(uniq.size + 1, dtype=np.int64)
            np.cumsum(lengths, out=sub_offsets[1:])
            idx = np.repeat(lo - sub_offsets[:-1], lengths)
            idx += np.arange(int(sub_offsets[-1]), dtype=np.int64)
            sub = self.values[idx]
        return calibrated_reward(r, sub, sub_offsets, inv.reshape(-1))

    def calibrate_prompts(self, prompts: Sequence[str], rewards, on_missing: str = "error") -> np.ndarray:
        return self.calibrate(prompt_digests(prompts), rewards, on_missing, prompts=prompts)

    def rewards_for_row(self, row: int) -> np.ndarray:
        """The ascending float32 reference rewards of row `row` (a view)."""
        if not -self.num_prompts <= row < self.num_prompts:
            raise IndexError(f"row {row} out of range for {self.num_prompts} prompts")
        row %= max(self.num_prompts, 1)
        return self.values[self.offsets[row] : self.offsets[row + 1]]

    def rewards_for_key(self, key: str) -> np.ndarray:
        return self.rewards_for_row(int(self.rows_for_keys([key])[0]))

    def __contains__(self, key) -> bool:
        return bool(self.rows_for_keys([key], on_missing="raw")[0] >= 0)

    def keys(self) -> list[str]:
        """All prompt keys (hex) in row order. One Python string per prompt: for tools, not for hot paths."""
        return hex_strings(self._keys)

    def digests(self) -> np.ndarray:
        """(P, 20) uint8 sha1 digests in row order (memory-mapped)."""
        return self._keys

    def k_stats(self) -> dict:
        """min/median/max/mean of K (reference rewards per prompt)."""
        return k_summary(np.diff(self.offsets))

    def verify(self) -> None:
        """Full consistency check (touches every page): offsets monotone, rows sorted, keys sorted, values finite."""
        if (np.diff(self.offsets) < 1).any():
            raise StoreError(f"{self.path}: a row has no rewards")
        if not np.isfinite(self.values).all():
            raise StoreError(f"{self.path}: non-finite reward values")
        if self.values.size > 1:
            d = np.diff(self.values)
            boundary = np.zeros(self.values.size - 1, dtype=bool)
            starts = self.offsets[1:-1] - 1
            boundary[starts[(starts >= 0) & (starts < boundary.size)]] = True
            if ((d < 0) & ~boundary).any():
                raise StoreError(f"{self.path}: a row's rewards are not ascending")
        if self.num_prompts > 1:
            if not np.array_equal(sort_order(np.asarray(self._keys)), np.arange(self.num_prompts)):
                raise StoreError(f"{self.path}: prompt keys are not sorted")
            if (np.asarray(self._keys[1:]) == np.asarray(self._keys[:-1])).all(axis=1).any():
                raise StoreError(f"{self.path}: a prompt key appears twice")
            if not np.array_equal(key_hi(self._keys), self._hi):
                raise StoreError(f"{self.path}: index key_hi.npy does not match keys.npy")


def differing_fields(stored: dict, run: dict) -> list[tuple[str, object, object]]:
    """(key, stored value, run value) of each key present on both sides whose values differ, in key order.

    Values from JSON and from argparse compare alike: "True"/True, 1/1.0, None/"".
    """
    return [(k, stored[k], run[k]) for k in sorted(set(stored) & set(run)) if _norm(stored[k]) != _norm(run[k])]


def _norm(v):
    # Template settings from JSON vs argparse: compare "True"/True and 1/1.0 alike, None and "" alike.
    if v is None or v == "":
        return None
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    return v


def _rebuild(manifest, keys, hi, values, offsets, path):
    return ReferenceStore(manifest, keys, hi, values, offsets, path=path)
