"""Opening a reference reward store: memory-mapped arrays, vectorised key lookup, calibration, pickling by value.

Opening reads every file through one handle on the store directory (``openat``), so a store swapped in by a writer
while it is opened is read whole, old or new, never a mix; opening checks each file's size against the manifest
(``quick_check``, microseconds), and ``verify`` checks every byte against the recorded sha256.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core.calibration import calibrated_reward
from .commit import commit_dir, index_problem, wait_for_writer
from .format import (
    CHECKSUMS,
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
from .writer import STORE_FILES, file_digest, write_index, write_store

logger = logging.getLogger(__name__)

ON_MISSING = ("error", "raw")
# Opening retries when the directory it holds was swapped out by a writer mid-open (then the new one is read).
_OPEN_ATTEMPTS = 5
_REBUILD_FIX = "delete {index} and open the store again to rebuild it from {parquet}"
_DATA_FIX = (
    "restore the store from a copy, or rebuild it (`infalign calibrate` or `infalign store import`, with --overwrite)"
)


def _not_a_store(path: Path) -> FileNotFoundError:
    hint = ""
    olds = sorted(path.parent.glob(f".{path.name}.old-*")) if path.name else []
    if olds:
        hint = f"; a previous version was left aside at {olds[0]} by an interrupted write"
    elif path.is_dir() and (path / PARQUET).exists():
        hint = "; the directory has data but no manifest (an interrupted or foreign copy?)"
    what = (
        "a file, not a reference store (a directory)" if path.is_file() else f"not a reference store (no {MANIFEST})"
    )
    return FileNotFoundError(f"{path} is {what}{hint}; build one with `infalign calibrate` or `infalign store import`")


def _parse_manifest(raw: bytes, mf) -> dict:
    try:
        man = json.loads(raw)
    except UnicodeDecodeError as e:
        raise StoreError(f"{mf}: not UTF-8 text ({e.reason} at byte {e.start}); the manifest is damaged") from None
    except json.JSONDecodeError as e:
        raise StoreError(f"{mf}: not valid JSON ({e})") from None
    check_manifest(man, mf)
    return man


def read_manifest(path) -> dict:
    """manifest.json of a store, checked for a readable format version and well-formed fields."""
    path = Path(path)
    mf = path / MANIFEST
    for _ in range(_OPEN_ATTEMPTS):
        try:
            with open(mf, "rb") as f:
                return _parse_manifest(f.read(), mf)
        except (FileNotFoundError, NotADirectoryError):
            if not wait_for_writer(path):
                break
        except IsADirectoryError:
            break
    raise _not_a_store(path)


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def check_manifest(man, where) -> None:
    """StoreError naming the manifest and field when it is not a store manifest this version can read."""
    if not isinstance(man, dict):
        raise StoreError(f"{where}: expected a JSON object, got {type(man).__name__}; the manifest is damaged")
    check_format_version(man, where)
    for key in ("num_prompts", "num_rewards"):
        if not _is_count(man.get(key)):
            raise StoreError(
                f"{where}: {key!r} must be a non-negative integer, got {man.get(key)!r}; the manifest is damaged: "
                f"{_DATA_FIX}"
            )
    k = man.get("k")
    if not (k is None or _is_count(k) or isinstance(k, dict)):
        raise StoreError(f"{where}: 'k' must be an integer or {{min, median, max}}, got {k!r}")
    for key in ("k_stats", "template", "sampling"):
        if man.get(key) is not None and not isinstance(man[key], dict):
            raise StoreError(f"{where}: {key!r} must be a JSON object, got {type(man[key]).__name__}")
    sums = man.get(CHECKSUMS)
    if sums is not None:
        ok = isinstance(sums, dict) and all(
            isinstance(rel, str)
            and isinstance(v, dict)
            and _is_count(v.get("size"))
            and isinstance(v.get("sha256"), str)
            and len(v["sha256"]) == 64
            for rel, v in sums.items()
        )
        if not ok:
            raise StoreError(
                f"{where}: {CHECKSUMS!r} must map file names to {{size, sha256}}; the manifest is damaged"
            )
        odd = [rel for rel in sums if rel not in STORE_FILES]
        if odd:
            raise StoreError(f"{where}: {CHECKSUMS!r} names files that are not part of a store: {', '.join(odd)}")


def check_format_version(man: dict, where) -> None:
    v = man.get("format_version")
    if not isinstance(v, int) or isinstance(v, bool):
        raise StoreError(f"{where}: manifest has no integer format_version (got {v!r})")
    if v > FORMAT_VERSION:
        raise StoreError(
            f"{where}: store format_version {v} is newer than this openrlhf-infalign reads (<= {FORMAT_VERSION}); "
            "upgrade openrlhf-infalign (pip install -U openrlhf-infalign)"
        )


class _Replaced(Exception):
    """The directory being opened was swapped out by a writer: open the new one."""


class _Dir:
    """A store directory read through one open handle (openat), so every file comes from the same directory."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)

    def close(self) -> None:
        os.close(self.fd)

    def replaced(self) -> bool:
        """True when the path now names another directory (or none) than the one held."""
        try:
            st = os.stat(self.path)
        except OSError:
            return True
        mine = os.fstat(self.fd)
        return (st.st_dev, st.st_ino) != (mine.st_dev, mine.st_ino)

    def open(self, rel: str):
        return open(rel, "rb", opener=lambda p, flags: os.open(p, flags, dir_fd=self.fd))

    def size(self, rel: str) -> int | None:
        try:
            return os.stat(rel, dir_fd=self.fd).st_size
        except (FileNotFoundError, NotADirectoryError):
            return None

    def exists(self, rel: str) -> bool:
        return self.size(rel) is not None


def _npy_at(d: _Dir, rel: str):
    """Memory-map one .npy file of the held directory (np.load cannot map an open handle)."""
    with d.open(rel) as f:
        try:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
        except Exception as e:  # numpy parses the header with ast: a damaged one raises SyntaxError and the like
            why = (str(e).splitlines() or [type(e).__name__])[0][:100]
            raise StoreError(f"{d.path / rel}: not a readable .npy file ({why}); {_fix_for(d.path, rel)}") from None
        if dtype.hasobject:
            raise StoreError(f"{d.path / rel}: holds Python objects, never loaded; {_fix_for(d.path, rel)}")
        offset = f.tell()
        n = int(np.prod(shape, dtype=np.int64))
        want = offset + n * dtype.itemsize
        have = os.fstat(f.fileno()).st_size
        if have != want:
            raise StoreError(
                f"{d.path / rel}: {have} bytes, its header says {want} (truncated or damaged); {_fix_for(d.path, rel)}"
            )
        if n == 0:
            return np.zeros(shape, dtype=dtype)
        return np.memmap(f, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def _fix_for(path: Path, rel: str) -> str:
    if rel.startswith(INDEX_DIR + "/"):
        return _REBUILD_FIX.format(index=path / INDEX_DIR, parquet=PARQUET)
    return _DATA_FIX


def _size_problems(d: _Dir, man: dict, index_too: bool) -> list[str]:
    """The quick check: every file the manifest records has its recorded size (stores without sizes: the Parquet
    file ends with its magic bytes). One message per bad file, naming it and the fix."""
    out = []
    sums = man.get(CHECKSUMS)
    if sums:
        for rel, info in sums.items():
            if rel.startswith(INDEX_DIR + "/") and not index_too:
                continue
            have = d.size(rel)
            if have is None:
                out.append(f"{d.path / rel} is missing; {_fix_for(d.path, rel)}")
            elif have != info["size"]:
                out.append(
                    f"{d.path / rel} has {have} bytes, {info['size']} were written (truncated or changed); "
                    f"{_fix_for(d.path, rel)}"
                )
        return out
    have = d.size(PARQUET)
    if have is None:
        return [f"{d.path / PARQUET} is missing; {_DATA_FIX}"]
    tail = b""
    if have >= 12:
        with d.open(PARQUET) as f:
            f.seek(-4, os.SEEK_END)
            tail = f.read(4)
    if tail != b"PAR1":
        out.append(f"{d.path / PARQUET} is truncated or not a Parquet file ({have} bytes); {_DATA_FIX}")
    return out


def _load_index(d: _Dir, man: dict):
    arrays = [np.asarray(_npy_at(d, f"{INDEX_DIR}/{name}")) for name in INDEX_FILES]
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
            f"{d.path / INDEX_DIR}: index arrays do not match the manifest ({p} prompts, {n} rewards); "
            + _REBUILD_FIX.format(index=d.path / INDEX_DIR, parquet=PARQUET)
        )
    return keys, hi, values, offsets


def _read_parquet(d: _Dir, man: dict):
    """(digests, values, offsets) of the Parquet data (rows are stored in key order); StoreError if unreadable."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    where = d.path / PARQUET
    keys, vals, lens = [], [], []
    try:
        with d.open(PARQUET) as f:
            pf = pq.ParquetFile(f)
            for rg in range(pf.num_row_groups):
                t = pf.read_row_group(rg, columns=["prompt_key", "rewards"])
                keys.append(digests_from_keys(t.column("prompt_key").to_numpy(zero_copy_only=False).astype("U40")))
                col = t.column("rewards").combine_chunks()
                vals.append(col.flatten().to_numpy().astype(np.float32, copy=False))
                off = np.asarray(col.offsets, dtype=np.int64)
                lens.append(np.diff(off))
    except (pa.ArrowException, OSError, KeyError) as e:
        raise StoreError(f"{where}: not readable as the store's Parquet data ({e}); {_DATA_FIX}") from None
    except StoreError as e:
        raise StoreError(f"{where}: {e}; {_DATA_FIX}") from None
    digests = np.concatenate(keys) if keys else np.zeros((0, DIGEST_BYTES), np.uint8)
    values = np.concatenate(vals) if vals else np.zeros(0, np.float32)
    lengths = np.concatenate(lens) if lens else np.zeros(0, np.int64)
    offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if digests.shape[0] != man.get("num_prompts") or values.shape[0] != man.get("num_rewards"):
        raise StoreError(
            f"{where} has {digests.shape[0]} rows and {values.shape[0]} rewards, the manifest says "
            f"{man.get('num_prompts')} and {man.get('num_rewards')}; {_DATA_FIX}"
        )
    return digests, values, offsets


def _index_from_parquet(d: _Dir, man: dict):
    """Rebuild the index arrays from the Parquet data."""
    digests, values, offsets = _read_parquet(d, man)
    if digests.shape[0] > 1:
        h = key_hi(digests)
        if (np.diff(h.astype(np.float64)) < 0).any():
            raise StoreError(f"{d.path / PARQUET}: rows are not in prompt_key order (not written by write_store?)")
    return digests, key_hi(digests), values, offsets


@dataclass
class VerifyReport:
    """What ``ReferenceStore.verify`` checked: per file how, whether every file had a recorded digest, notes."""

    path: str
    files: dict = field(default_factory=dict)
    digests: bool = True
    notes: list = field(default_factory=list)

    def summary(self) -> str:
        how = "every file matches its recorded sha256" if self.digests else "; ".join(self.notes)
        return f"ok ({len(self.files)} files; {how}; every row checked)"


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
        """Open the store at `path` (memory-mapped), after the quick check (every file's size as recorded; a
        StoreError names a missing or cut-short file and the fix). A missing index is rebuilt from the Parquet
        data (saved into the store when the directory is writable, else kept in memory) unless
        rebuild_index=False. A store replaced by a writer meanwhile is read whole: the old one or the new one."""
        path = Path(path)
        for _ in range(_OPEN_ATTEMPTS):
            try:
                d = _Dir(path)
            except NotADirectoryError:
                raise _not_a_store(path) from None  # a file (or a path through one): nothing to wait for
            except FileNotFoundError:
                if wait_for_writer(path):
                    continue
                raise _not_a_store(path) from None
            try:
                man, arrays = cls._read(d, rebuild_index)
                break
            except (_Replaced, OSError, StoreError, ValueError):
                if d.replaced():
                    continue  # swapped for a new store while we read: read that one
                raise
            finally:
                d.close()
        else:
            raise StoreError(f"{path} was replaced {_OPEN_ATTEMPTS} times while being opened; try again")
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
    def _read(cls, d: _Dir, rebuild_index: bool):
        try:
            with d.open(MANIFEST) as f:
                raw = f.read()
        except FileNotFoundError:
            if d.replaced():
                raise _Replaced() from None
            raise _not_a_store(d.path) from None
        man = _parse_manifest(raw, d.path / MANIFEST)
        have_index = all(d.exists(f"{INDEX_DIR}/{name}") for name in INDEX_FILES)
        problems = _size_problems(d, man, index_too=have_index)
        if problems:
            if d.replaced():
                raise _Replaced()
            raise StoreError(problems[0] + (f" (and {len(problems) - 1} more file(s))" if len(problems) > 1 else ""))
        if have_index:
            return man, _load_index(d, man)
        if not rebuild_index:
            raise StoreError(f"{d.path}: no index/ directory (rebuild_index=False)")
        logger.warning("reference store %s has no index; rebuilding it from %s", d.path, PARQUET)
        arrays = _index_from_parquet(d, man)
        if os.access(d.path, os.W_OK):
            try:
                commit_dir(
                    d.path / INDEX_DIR,
                    True,
                    lambda tmp: write_index(tmp, arrays[0], arrays[2], arrays[3]),
                    problem=index_problem,
                )
                problems = _size_problems(d, man, index_too=True)
                if problems:  # a deterministic rebuild of intact data gives the recorded bytes back
                    raise StoreError(f"the index rebuilt from {PARQUET} does not match the manifest: {problems[0]}")
                arrays = _load_index(d, man)
            except OSError as e:  # read-only mounts etc.: keep the in-memory arrays
                logger.warning("could not save the rebuilt index into %s: %s", d.path / INDEX_DIR, e)
        return man, arrays

    def quick_check(self) -> None:
        """The cheap check before trusting the store again (training, scoring and evaluation run it through open):
        every file at self.path has the size recorded when it was written. StoreError names the file and the fix.
        A store built in memory (no path) has nothing to check."""
        if self.path is None:
            return
        d = _Dir(self.path)
        try:
            problems = _size_problems(d, self.manifest, index_too=True)
            if not self.manifest.get(CHECKSUMS):
                for name in INDEX_FILES:
                    _npy_at(d, f"{INDEX_DIR}/{name}")  # header-implied size vs the file's
        finally:
            d.close()
        if problems:
            raise StoreError(problems[0])

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

    def verify(self) -> VerifyReport:
        """Full check of the store at self.path (reads every byte): each file against the size and sha256 recorded
        when it was written, then every invariant of the arrays (offsets, rows ascending, keys sorted and unique,
        values finite). A store written before digests were recorded has its Parquet data compared row by row with
        the index instead, and the report says so. StoreError names the first bad file or invariant and the fix."""
        report = VerifyReport(str(self.path))
        if self.path is not None:
            self.quick_check()
            sums = self.manifest.get(CHECKSUMS)
            if sums:
                for rel, info in sums.items():
                    size, sha = file_digest(self.path / rel)
                    if size != info["size"] or sha != info["sha256"]:
                        raise StoreError(
                            f"{self.path / rel} is corrupt: its sha256 differs from the one recorded when it was "
                            f"written; {_fix_for(self.path, rel)}"
                        )
                    report.files[rel] = "sha256 ok"
            else:
                report.digests = False
                report.notes.append(
                    "written before file digests were recorded: Parquet data compared row by row with the index"
                )
                d = _Dir(self.path)
                try:
                    keys, values, offsets = _read_parquet(d, self.manifest)
                finally:
                    d.close()
                if not (
                    np.array_equal(keys, self._keys)
                    and np.array_equal(offsets, self.offsets)
                    and np.array_equal(values, self.values)
                ):
                    raise StoreError(
                        f"{self.path / PARQUET} and {self.path / INDEX_DIR} hold different data; if the Parquet file "
                        f"is the good one, {_REBUILD_FIX.format(index=self.path / INDEX_DIR, parquet=PARQUET)}; "
                        f"else {_DATA_FIX}"
                    )
                report.files.update({rel: "consistent" for rel in STORE_FILES})
        self._check_arrays()
        return report

    def _check_arrays(self) -> None:
        where = self.path or "the reference store"
        if (np.diff(self.offsets) < 1).any():
            raise StoreError(f"{where}: a row has no rewards")
        if not np.isfinite(self.values).all():
            raise StoreError(f"{where}: non-finite reward values")
        if self.values.size > 1:
            d = np.diff(self.values)
            boundary = np.zeros(self.values.size - 1, dtype=bool)
            starts = self.offsets[1:-1] - 1
            boundary[starts[(starts >= 0) & (starts < boundary.size)]] = True
            if ((d < 0) & ~boundary).any():
                raise StoreError(f"{where}: a row's rewards are not ascending")
        if self.num_prompts > 1:
            if not np.array_equal(sort_order(np.asarray(self._keys)), np.arange(self.num_prompts)):
                raise StoreError(f"{where}: prompt keys are not sorted")
            if (np.asarray(self._keys[1:]) == np.asarray(self._keys[:-1])).all(axis=1).any():
                raise StoreError(f"{where}: a prompt key appears twice")
            if not np.array_equal(key_hi(self._keys), self._hi):
                raise StoreError(f"{where}: index key_hi.npy does not match keys.npy")


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
