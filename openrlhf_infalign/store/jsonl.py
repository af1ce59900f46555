"""JSONL interchange for reference stores: streaming import (`infalign store import`) and export.

One row per prompt: ``{"prompt": str, "rewards": [float, ...]}`` or ``{"prompt_key": sha1hex, "rewards": [...]}``
(both keys allowed; then the prompt must hash to the key). Export writes the same shape, so the two round-trip.
The rows are read and checked by rows.py, which `infalign evaluate` and `infalign score` use too.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from ..files import atomic_open, check_input_file
from .commit import check_target
from .format import DIGEST_BYTES, PARQUET, StoreError, key_digest, prompt_digest
from .reader import ReferenceStore
from .rows import check_rewards, iter_reward_lists
from .writer import Ragged, write_store

_CHUNK_ROWS = 8192
logger = logging.getLogger(__name__)
_F32_MAX = float(np.finfo(np.float32).max)


def _progress(total: int, enabled: bool, desc: str, unit: str = "B"):
    from tqdm import tqdm

    return tqdm(
        total=total, unit=unit, unit_scale=True, desc=desc, disable=not enabled, mininterval=1.0, dynamic_ncols=True
    )


class _Fallback(Exception):
    """The fast reader met something it does not judge itself: re-read with the line-by-line checked parser."""


_FAST_BLOCK = 1 << 24  # bytes per pyarrow JSON block


def _read_fast(src: Path, progress: bool, k_min: int):
    """pyarrow's C JSON reader (several times faster than json.loads per line). Any parse error or invalid row
    raises _Fallback, so every error message comes from the one checked parser, with its line number."""
    import pyarrow as pa
    import pyarrow.json as pj

    schema = pa.schema([("prompt", pa.string()), ("prompt_key", pa.string()), ("rewards", pa.list_(pa.float64()))])
    size = os.path.getsize(src)
    digest_chunks, value_chunks, length_chunks, prompt_chunks = [], [], [], []
    any_prompt = False
    try:
        reader = pj.open_json(
            src,
            read_options=pj.ReadOptions(block_size=_FAST_BLOCK, use_threads=True),
            parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"),
        )
    except (pa.ArrowException, OSError, ValueError) as e:
        raise _Fallback(str(e)) from None
    with _progress(size, progress, f"import {src.name}") as bar:
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except (pa.ArrowException, ValueError) as e:
                raise _Fallback(str(e)) from None
            bar.update(min(_FAST_BLOCK, max(size - bar.n, 0)))
            rewards = batch.column("rewards")
            if rewards.null_count:
                raise _Fallback("a row without a rewards list")
            lengths = np.diff(np.asarray(rewards.offsets, dtype=np.int64))
            if lengths.size and lengths.min() < max(k_min, 1):
                raise _Fallback("a short rewards list")
            vals = rewards.flatten().to_numpy(zero_copy_only=False)
            if vals.size and (~np.isfinite(vals) | (np.abs(vals) > _F32_MAX)).any():
                raise _Fallback("a non-finite reward")
            prompts = batch.column("prompt").to_pylist()
            keys = batch.column("prompt_key")
            if keys.null_count == len(keys):
                if any(p is None for p in prompts):
                    raise _Fallback("a row without prompt or prompt_key")
                dig = b"".join(map(prompt_digest, prompts))
            else:
                key_list = keys.to_pylist()
                parts = []
                for p, k in zip(prompts, key_list):
                    if k is None:
                        if p is None:
                            raise _Fallback("a row without prompt or prompt_key")
                        parts.append(prompt_digest(p))
                    else:
                        try:
                            d = key_digest(k)
                        except StoreError:
                            raise _Fallback("a bad prompt_key") from None
                        if p is not None and prompt_digest(p) != d:
                            raise _Fallback("a prompt_key that is not sha1 of its prompt")
                        parts.append(d)
                dig = b"".join(parts)
            any_prompt = any_prompt or any(p is not None for p in prompts)
            digest_chunks.append(dig)
            value_chunks.append(vals.astype(np.float32))
            length_chunks.append(lengths)
            prompt_chunks.append(prompts)
        bar.update(max(size - bar.n, 0))
    # Row i sits on the i-th non-blank line (one JSON object per line, or pyarrow would have failed).
    with open(src, "rb") as f:
        lines = np.fromiter((n for n, raw in enumerate(f, start=1) if raw.strip()), dtype=np.int64)
    n_rows = sum(len(x) for x in length_chunks)
    if lines.size != n_rows:
        raise _Fallback("row/line count mismatch")
    all_lengths = np.concatenate(length_chunks) if length_chunks else np.zeros(0, np.int64)
    offsets = np.zeros(all_lengths.size + 1, dtype=np.int64)
    np.cumsum(all_lengths, out=offsets[1:])
    values = np.concatenate(value_chunks) if value_chunks else np.zeros(0, np.float32)
    dig = np.frombuffer(b"".join(digest_chunks), dtype=np.uint8).reshape(-1, DIGEST_BYTES)
    prompts = [p for chunk in prompt_chunks for p in chunk] if any_prompt else None
    return dig, Ragged(values, offsets), prompts, lines


def read_reference_jsonl(src, *, progress: bool = True, k_min: int = 1, fast: bool = True):
    """Stream a reference JSONL file into (digests (P,20) uint8, Ragged float32, prompts or None, line numbers).

    fast: try pyarrow's JSON reader first; on anything unusual the file is re-read line by line with json.loads,
    which checks every row and names the bad line.
    """
    src = check_input_file(src, "reference rewards")
    if fast:
        try:
            return _read_fast(src, progress, k_min)
        except (_Fallback, UnicodeError) as e:  # pyarrow keeps bad UTF-8 / lone surrogates until strings are used
            logger.info("%s: checked line-by-line read (%s)", src, e)
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
        for lineno, digest, prompt, rewards in iter_reward_lists(src, f, bar, k_min):
            digests += digest
            prompts.append(prompt)
            any_prompt = any_prompt or prompt is not None
            flat.extend(rewards)
            lengths.append(len(rewards))
            lines.append(lineno)
            if len(lengths) >= _CHUNK_ROWS:
                value_chunks.append(check_rewards(src, flat, lengths, lines))
                length_chunks.append(np.asarray(lengths, dtype=np.int64))
                lines_all.extend(lines)
                flat, lengths, lines = [], [], []
    if lengths:
        value_chunks.append(check_rewards(src, flat, lengths, lines))
        length_chunks.append(np.asarray(lengths, dtype=np.int64))
        lines_all.extend(lines)
    all_lengths = np.concatenate(length_chunks) if length_chunks else np.zeros(0, np.int64)
    offsets = np.zeros(all_lengths.size + 1, dtype=np.int64)
    np.cumsum(all_lengths, out=offsets[1:])
    values = np.concatenate(value_chunks) if value_chunks else np.zeros(0, np.float32)
    dig = np.frombuffer(bytes(digests), dtype=np.uint8).reshape(-1, DIGEST_BYTES)
    return dig, Ragged(values, offsets), (prompts if any_prompt else None), np.asarray(lines_all, dtype=np.int64)


def import_jsonl(
    src,
    out_dir,
    *,
    manifest: dict | None = None,
    k_min: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    inputs=(),
    allow_empty: bool = True,
) -> Path:
    """`infalign store import`: JSONL -> store (validated, atomic). Errors name the file and line.

    The output may replace only an earlier store (with overwrite), never src itself, a folder holding it, or any
    of ``inputs`` (other files the caller read, e.g. a --manifest): checked before the JSONL is read.
    allow_empty=False refuses a file without rows (the command: an empty store is a mistake, found at training)."""
    src = Path(src)
    inputs = [src, *inputs]
    check_target(out_dir, overwrite=overwrite, inputs=inputs)
    dig, rag, prompts, lines = read_reference_jsonl(src, progress=progress, k_min=k_min)
    if not allow_empty and dig.shape[0] == 0:
        raise StoreError(f"{src}: no rows; a store needs the reference rewards of at least one prompt")
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
        inputs=inputs,
    )


def export_jsonl(
    store_dir, out_path, *, include_prompts: bool = True, progress: bool = True, overwrite: bool = True
) -> int:
    """`infalign store export`: store -> JSONL (rows in store order), written atomically. Returns row count.

    The store gets the quick check first (every file's recorded size), so a cut-short store is named, not
    exported in part; overwrite=False refuses an existing out_path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    store_dir, out_path = Path(store_dir), Path(out_path)
    man = ReferenceStore.open(store_dir, warn_small_k=False).manifest
    try:
        return _export_rows(
            pq.ParquetFile(store_dir / PARQUET), man, store_dir, out_path, include_prompts, progress, overwrite
        )
    except pa.ArrowException as e:
        raise StoreError(
            f"{store_dir / PARQUET}: not readable ({e}); check it with `infalign store info --verify`"
        ) from None


def _export_rows(pf, man: dict, store_dir: Path, out_path: Path, include_prompts, progress, overwrite) -> int:
    has_prompt = include_prompts and "prompt" in pf.schema_arrow.names
    cols = ["prompt_key", "rewards"] + (["prompt"] if has_prompt else [])
    n = 0
    with (
        atomic_open(out_path, "w", overwrite=overwrite) as f,
        _progress(man.get("num_prompts", 0), progress, f"export {store_dir.name}", "rows") as bar,
    ):
        for rg in range(pf.num_row_groups):
            t = pf.read_row_group(rg, columns=cols)
            keys = t.column("prompt_key").to_pylist()
            col = t.column("rewards").combine_chunks()
            off = np.asarray(col.offsets, dtype=np.int64)
            off = (off - off[0]).tolist()
            # float32 -> Python float (exact) -> shortest repr: parses back to the identical float32.
            vals = col.flatten().to_numpy().astype(np.float64).tolist()
            texts = t.column("prompt").to_pylist() if has_prompt else [None] * len(keys)
            dumps = json.dumps
            out = []
            for i, key in enumerate(keys):
                rewards = dumps(vals[off[i] : off[i + 1]])
                if texts[i] is None:
                    out.append(f'{{"prompt_key": "{key}", "rewards": {rewards}}}\n')
                else:
                    out.append(
                        f'{{"prompt_key": "{key}", "prompt": {dumps(texts[i], ensure_ascii=False)}, '
                        f'"rewards": {rewards}}}\n'
                    )
            f.write("".join(out))
            n += len(keys)
            bar.update(len(keys))
    return n
