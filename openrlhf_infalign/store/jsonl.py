"""JSONL interchange for reference stores: streaming import (`infalign store import`) and export.

One row per prompt: ``{"prompt": str, "rewards": [float, ...]}`` or ``{"prompt_key": sha1hex, "rewards": [...]}``
(both keys allowed; then the prompt must hash to the key). Export writes the same shape, so the two round-trip.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import numpy as np

from .format import DIGEST_BYTES, StoreError
from .writer import Ragged, write_store

_CHUNK_ROWS = 8192


def _progress(total: int, enabled: bool, desc: str, unit: str = "B"):
    from tqdm import tqdm

    return tqdm(
        total=total, unit=unit, unit_scale=True, desc=desc, disable=not enabled, mininterval=1.0, dynamic_ncols=True
    )


def _bad(src: Path, lineno: int, msg: str) -> StoreError:
    return StoreError(f"{src}:{lineno}: {msg}")


def _parse_key(src: Path, lineno: int, row: dict) -> tuple[bytes, str | None]:
    prompt = row.get("prompt")
    key = row.get("prompt_key")
    if prompt is not None and not isinstance(prompt, str):
        raise _bad(src, lineno, f'"prompt" must be a string, got {type(prompt).__name__}')
    if key is not None:
        if not isinstance(key, str) or len(key) != 40:
            raise _bad(src, lineno, f'"prompt_key" must be a 40-character sha1 hex string, got {key!r}')
        try:
            digest = bytes.fromhex(key)
        except ValueError:
            raise _bad(src, lineno, f'"prompt_key" is not hexadecimal: {key!r}') from None
        if prompt is not None and hashlib.sha1(prompt.encode("utf-8")).digest() != digest:
            raise _bad(
                src,
                lineno,
                f'"prompt_key" {key} is not sha1 of "prompt" (expected {hashlib.sha1(prompt.encode("utf-8")).hexdigest()})',
            )
        return digest, prompt
    if prompt is None:
        raise _bad(src, lineno, 'row needs "prompt" (the exact prompt string) or "prompt_key" (its sha1 hex)')
    return hashlib.sha1(prompt.encode("utf-8")).digest(), prompt


def _check_chunk(src: Path, flat: list, lengths: list, lines: list) -> np.ndarray:
    """The chunk's rewards as float32, or a StoreError naming the first bad line."""
    try:
        vals = np.array(flat, dtype=np.float64)
        if vals.ndim != 1:
            raise TypeError
    except (TypeError, ValueError):
        vals = None
    off = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    if vals is None or vals.shape[0] != len(flat):
        for i, ln in enumerate(lines):
            for x in flat[off[i] : off[i + 1]]:
                if isinstance(x, bool) or not isinstance(x, (int, float)):
                    raise _bad(src, ln, f'"rewards" must hold numbers, found {x!r}')
        raise _bad(src, lines[0], '"rewards" must hold numbers')  # pragma: no cover
    bad = np.flatnonzero(~np.isfinite(vals) | (np.abs(vals) > np.finfo(np.float32).max))
    if bad.size:
        i = int(np.searchsorted(off, bad[0], side="right") - 1)
        raise _bad(src, lines[i], f"reward {vals[bad[0]]} is not a finite float32 number (NaN/inf or out of range)")
    return vals.astype(np.float32)


def read_reference_jsonl(src, *, progress: bool = True, k_min: int = 1):
    """Stream a reference JSONL file into (digests (P,20) uint8, Ragged float32, prompts or None, line numbers)."""
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such file")
    digests = bytearray()
    prompts: list[str | None] = []
    any_prompt = False
    lines_all: list[int] = []
    value_chunks: list[np.ndarray] = []
    length_chunks: list[np.ndarray] = []
    flat: list = []
    lengths: list[int] = []
    lines: list[int] = []
    with open(src, "rb") as f, _progress(os.path.getsize(src), progress, f"import {src.name}") as bar:
        for lineno, raw in enumerate(f, start=1):
            bar.update(len(raw))
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise _bad(src, lineno, f"not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise _bad(src, lineno, f"expected a JSON object, got {type(row).__name__}")
            digest, prompt = _parse_key(src, lineno, row)
            rewards = row.get("rewards")
            if not isinstance(rewards, list):
                raise _bad(src, lineno, f'"rewards" must be a list of numbers, got {type(rewards).__name__}')
            if len(rewards) < max(k_min, 1):
                what = "an empty" if not rewards else f"{len(rewards)} rewards (< --k-min {k_min}) in its"
                raise _bad(src, lineno, f'{what} "rewards" list; every prompt needs reference rewards')
            digests += digest
            prompts.append(prompt)
            any_prompt = any_prompt or prompt is not None
            flat.extend(rewards)
            lengths.append(len(rewards))
            lines.append(lineno)
            if len(lengths) >= _CHUNK_ROWS:
                value_chunks.append(_check_chunk(src, flat, lengths, lines))
                length_chunks.append(np.asarray(lengths, dtype=np.int64))
                lines_all.extend(lines)
                flat, lengths, lines = [], [], []
    if lengths:
        value_chunks.append(_check_chunk(src, flat, lengths, lines))
        length_chunks.append(np.asarray(lengths, dtype=np.int64))
        lines_all.extend(lines)
    all_lengths = np.concatenate(length_chunks) if length_chunks else np.zeros(0, np.int64)
    offsets = np.zeros(all_lengths.size + 1, dtype=np.int64)
    np.cumsum(all_lengths, out=offsets[1:])
    values = np.concatenate(value_chunks) if value_chunks else np.zeros(0, np.float32)
    dig = np.frombuffer(bytes(digests), dtype=np.uint8).reshape(-1, DIGEST_BYTES)
    return dig, Ragged(values, offsets), (prompts if any_prompt else None), np.asarray(lines_all, dtype=np.int64)


def import_jsonl(
    src, out_dir, *, manifest: dict | None = None, k_min: int = 1, overwrite: bool = False, progress: bool = True
) -> Path:
    """`infalign store import`: JSONL -> store (validated, atomic). Errors name the file and line."""
    src = Path(src)
    dig, rag, prompts, lines = read_reference_jsonl(src, progress=progress, k_min=k_min)
    man = dict(manifest or {})
    man.setdefault("source", {"imported_from": str(src)})
    return write_store(
        out_dir,
        dig,
        rag,
        prompts=prompts,
        manifest=man,
        overwrite=overwrite,
        row_name=lambda i: f"{src}:{int(lines[i])}",
        k_min=k_min,
        verify_prompts=False,  # each row's prompt/key pair was checked while reading
    )


def _float_list(vals: np.ndarray) -> str:
    # float32 -> Python float -> shortest repr: parses back to the identical float32.
    return json.dumps(vals.tolist())


def export_jsonl(store_dir, out_path, *, include_prompts: bool = True, progress: bool = True) -> int:
    """`infalign store export`: store -> JSONL (rows in store order), written via a temp file. Returns row count."""
    import pyarrow.parquet as pq

    from .format import PARQUET
    from .reader import read_manifest

    store_dir, out_path = Path(store_dir), Path(out_path)
    man = read_manifest(store_dir)
    pf = pq.ParquetFile(store_dir / PARQUET)
    has_prompt = include_prompts and "prompt" in pf.schema_arrow.names
    cols = ["prompt_key", "rewards"] + (["prompt"] if has_prompt else [])
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    n = 0
    try:
        with (
            open(tmp, "w", encoding="utf-8") as f,
            _progress(man.get("num_prompts", 0), progress, f"export {store_dir.name}", "rows") as bar,
        ):
            for rg in range(pf.num_row_groups):
                t = pf.read_row_group(rg, columns=cols)
                keys = t.column("prompt_key").to_pylist()
                col = t.column("rewards").combine_chunks()
                off = np.asarray(col.offsets, dtype=np.int64)
                vals = col.flatten().to_numpy()
                off = off - off[0]
                texts = t.column("prompt").to_pylist() if has_prompt else None
                for i, key in enumerate(keys):
                    f.write('{"prompt_key": "')
                    f.write(key)
                    f.write('"')
                    if texts is not None and texts[i] is not None:
                        f.write(', "prompt": ')
                        f.write(json.dumps(texts[i], ensure_ascii=False))
                    f.write(', "rewards": ')
                    f.write(_float_list(vals[off[i] : off[i + 1]]))
                    f.write("}\n")
                n += len(keys)
                bar.update(len(keys))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return n
