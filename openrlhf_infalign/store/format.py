"""On-disk format of the reference reward store, prompt keys and their vectorised hex/digest conversions.

A store is a directory:

    DIR/manifest.json          format version, K, policy model, reward source, sampling, template settings, row count,
                               each data file's size and sha256 (CHECKSUMS)
    DIR/rewards.parquet        the interchange data: prompt_key (sha1 hex), prompt (optional), rewards list<float32>
    DIR/index/keys.npy         (P, 20) uint8   sha1 digests, ascending (byte order) = the Parquet row order
    DIR/index/key_hi.npy       (P,)    uint64  first 8 digest bytes as a big-endian integer: the searchsorted column
    DIR/index/values.npy       (N,)    float32 all reference rewards, each row's segment ascending (CSR values)
    DIR/index/offsets.npy      (P+1,)  int64   CSR offsets: row p is values[offsets[p]:offsets[p+1]]

The index is the same data as the Parquet file in a layout `np.load(mmap_mode="r")` opens in constant time; it is
derived from the Parquet file when missing (e.g. a store copied without it).
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import numpy as np

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PARQUET = "rewards.parquet"
INDEX_DIR = "index"
INDEX_FILES = ("keys.npy", "key_hi.npy", "values.npy", "offsets.npy")
# Manifest key: {relative path: {"size": bytes, "sha256": hex}} of every data file, recorded at write time (stores
# written before it existed lack it: they are checked for internal consistency instead).
CHECKSUMS = "checksums"
DIGEST_BYTES = 20
HEX_CHARS = 2 * DIGEST_BYTES
# Below this many reference samples per prompt the calibrated reward is coarse (steps of 1/K): warn.
K_WARN = 16


class StoreError(ValueError):
    """A reference store (or its input) is malformed, incompatible, or lacks a prompt."""


def prompt_key(prompt: str) -> str:
    """sha1 hex of the exact prompt string the trainer sees (OpenRLHF's ``Experience.prompts``, after templating)."""
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()


def prompt_digest(prompt: str) -> bytes:
    """The 20-byte sha1 digest of a prompt: `prompt_key` before its hex encoding."""
    return hashlib.sha1(prompt.encode("utf-8")).digest()


def prompt_digests(prompts: Iterable[str]) -> np.ndarray:
    """(B, 20) uint8 sha1 digests of prompts (same keys as `prompt_key`, without the hex round trip)."""
    return np.frombuffer(b"".join(map(prompt_digest, prompts)), dtype=np.uint8).reshape(-1, DIGEST_BYTES)


def key_digest(key) -> bytes:
    """One prompt key (40-character sha1 hex, either case) -> its 20-byte digest; StoreError if it is malformed."""
    if not isinstance(key, str) or len(key) != HEX_CHARS:
        raise StoreError(f'"prompt_key" must be a 40-character sha1 hex string, got {key!r}')
    try:
        digest = bytes.fromhex(key)
    except ValueError:
        digest = b""
    if len(digest) != DIGEST_BYTES:  # fromhex skips spaces: a 40-character key with some gives < 20 bytes
        raise StoreError(f'"prompt_key" is not hexadecimal: {key!r}')
    return digest


# ASCII code -> nibble value, 255 for "not a hex digit". Upper and lower case are both accepted.
_NIBBLE = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _NIBBLE[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _NIBBLE[_c] = 10 + _i
_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _bad_key_error(keys: Sequence, bad: np.ndarray, what: str = "prompt key") -> StoreError:
    i = int(bad[0])
    shown = keys[i] if not isinstance(keys, np.ndarray) else keys[i].tolist()
    return StoreError(
        f"{what} at position {i} is not a 40-character sha1 hex string: {shown!r}"
        f"{f' (and {bad.size - 1} more)' if bad.size > 1 else ''}; keys are sha1(prompt.encode('utf-8')).hexdigest()"
    )


def digests_from_keys(keys) -> np.ndarray:
    """Prompt keys -> (B, 20) uint8 digests, vectorised (no Python loop per key).

    Accepts a sequence/array of 40-char hex strings (str or bytes), a sequence of 20-byte digests, or a (B, 20) uint8
    array (returned as is). Raises StoreError naming the first malformed key.
    """
    if isinstance(keys, np.ndarray) and keys.dtype == np.uint8 and keys.ndim == 2 and keys.shape[1] == DIGEST_BYTES:
        return keys
    if isinstance(keys, (str, bytes)):
        raise StoreError("expected a sequence of prompt keys, got a single string")
    if isinstance(keys, (list, tuple)) and keys and isinstance(keys[0], (bytes, bytearray)) and len(keys[0]) == 20:
        # Raw 20-byte digests (numpy's S dtype would strip trailing NUL bytes, so join the buffers instead).
        if any(len(k) != DIGEST_BYTES for k in keys):
            bad = np.flatnonzero(np.fromiter((len(k) != DIGEST_BYTES for k in keys), bool, len(keys)))
            raise _bad_key_error(keys, bad, "prompt digest")
        return np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, DIGEST_BYTES)
    if isinstance(keys, (list, tuple)) and keys and isinstance(keys[0], str):
        # Fast path for the common case (a list of hex str): one C-level hex decode of the joined string.
        # bytes.fromhex skips whitespace, hence the length checks; anything odd goes to the checked path below.
        try:
            if set(map(len, keys)) == {HEX_CHARS}:
                raw = bytes.fromhex("".join(keys))
                if len(raw) == DIGEST_BYTES * len(keys):
                    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, DIGEST_BYTES)
        except (TypeError, ValueError):
            pass
    arr = np.asarray(keys)
    if arr.ndim == 0:
        raise StoreError(f"expected a sequence of prompt keys, got {type(keys).__name__}")
    arr = arr.reshape(-1)
    n = arr.shape[0]
    if n == 0:
        return np.zeros((0, DIGEST_BYTES), dtype=np.uint8)
    kind = arr.dtype.kind
    if kind == "U":
        width = arr.dtype.itemsize // 4
        codes = arr.view(np.uint32).reshape(n, width)
        if width != HEX_CHARS:
            lens = np.char.str_len(arr)
            raise _bad_key_error(keys, np.flatnonzero(lens != HEX_CHARS))
        big = codes > 255
        chars = codes.astype(np.uint8)
        nib = _NIBBLE[chars]
        nib[big] = 255
    elif kind == "S":
        width = arr.dtype.itemsize
        if width != HEX_CHARS:
            lens = np.char.str_len(arr)
            raise _bad_key_error(keys, np.flatnonzero(lens != HEX_CHARS))
        chars = np.frombuffer(arr.tobytes(), dtype=np.uint8).reshape(n, HEX_CHARS)
        nib = _NIBBLE[chars]
    elif kind == "O":
        return digests_from_keys([k if not isinstance(k, (bytes, bytearray)) else bytes(k) for k in arr.tolist()])
    else:
        raise StoreError(f"prompt keys must be hex strings, got an array of {arr.dtype}")
    bad_rows = np.flatnonzero((nib == 255).any(axis=1))
    if bad_rows.size:
        raise _bad_key_error(keys, bad_rows)
    return ((nib[:, 0::2] << 4) | nib[:, 1::2]).astype(np.uint8, copy=False)


def hex_from_digests(digests: np.ndarray) -> np.ndarray:
    """(B, 20) uint8 -> (B, 40) uint8 lowercase ASCII hex (vectorised)."""
    d = np.asarray(digests, dtype=np.uint8)
    out = np.empty((d.shape[0], HEX_CHARS), dtype=np.uint8)
    out[:, 0::2] = _HEX_DIGITS[d >> 4]
    out[:, 1::2] = _HEX_DIGITS[d & 0x0F]
    return out


def hex_strings(digests: np.ndarray) -> list[str]:
    """(B, 20) uint8 digests -> list of hex strings (one Python object per key: for tools, not hot paths)."""
    h = hex_from_digests(digests)
    return [s.decode("ascii") for s in h.view(f"S{HEX_CHARS}").reshape(-1).tolist()]


def key_hi(digests: np.ndarray) -> np.ndarray:
    """First 8 bytes of each digest as a big-endian integer (native uint64), so integer order = byte order."""
    d = np.ascontiguousarray(np.asarray(digests, dtype=np.uint8)[:, :8])
    return d.view(">u8").reshape(-1).astype(np.uint64)


def sort_order(digests: np.ndarray) -> np.ndarray:
    """Stable permutation sorting digests by byte order (lexsort on three integer columns: fast for millions)."""
    d = np.ascontiguousarray(np.asarray(digests, dtype=np.uint8))
    hi = d[:, :8].copy().view(">u8").reshape(-1)
    mid = d[:, 8:16].copy().view(">u8").reshape(-1)
    lo = d[:, 16:20].copy().view(">u4").reshape(-1)
    return np.lexsort((lo, mid, hi))


def k_summary(lengths: np.ndarray) -> dict:
    """min/median/max/mean of the per-prompt reference counts K."""
    if lengths.size == 0:
        return {"min": 0, "median": 0, "max": 0, "mean": 0.0}
    med = float(np.median(lengths))
    return {
        "min": int(lengths.min()),
        "median": int(med) if med.is_integer() else med,
        "max": int(lengths.max()),
        "mean": float(lengths.mean()),
    }
