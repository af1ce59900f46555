"""The work dir ``OUT.partial/``: the finished shards of a run that has not published its store yet.

A shard is a parquet of (prompt_key, prompt, rewards) plus a small JSON manifest carrying the settings hash; both
are written atomically and the manifest goes last, so a kill at any moment leaves only whole shards behind and a
re-run with the same settings hash reuses them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Sequence

import numpy as np

from openrlhf_infalign.files import atomic_write_with, write_json
from openrlhf_infalign.store import Ragged

from .settings import CalibrationError

__all__ = ["WORK_SUFFIX", "SHARD_FORMAT", "write_shard", "shard_done", "assemble"]

WORK_SUFFIX = ".partial"
SHARD_FORMAT = 1


def _shard(work: Path, index: int, ext: str) -> Path:
    return work / f"shard-{index:05d}.{ext}"


def write_shard(work: Path, index: int, keys, prompts, rewards, meta: Dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "prompt_key": pa.array(keys, pa.string()),
            "prompt": pa.array(prompts, pa.string()),
            "rewards": pa.array([np.asarray(r, dtype=np.float32) for r in rewards], pa.list_(pa.float32())),
        }
    )
    atomic_write_with(_shard(work, index, "parquet"), lambda tmp: pq.write_table(table, tmp))
    # The shard manifest goes last: a shard counts as done only once both files are in place.
    write_json(_shard(work, index, "json"), meta, indent=1)


def shard_done(work: Path, index: int, settings_hash: str, keys: Sequence[str]) -> bool:
    meta_path = _shard(work, index, "json")
    if not meta_path.exists() or not _shard(work, index, "parquet").exists():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (
        meta.get("settings_hash") == settings_hash
        and meta.get("num_prompts") == len(keys)
        and meta.get("first_key") == keys[0]
        and meta.get("last_key") == keys[-1]
    )


def assemble(work: Path, shards, keys: Sequence[str]):
    """Keys, prompts and CSR rewards of all shards in order (columnar: no Python object per reward)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for i, sl in shards:
        t = pq.read_table(_shard(work, i, "parquet"))
        if t.column("prompt_key").to_pylist() != keys[sl]:
            raise CalibrationError(f"{work}/shard-{i:05d}.parquet does not hold the expected prompts; delete {work}")
        tables.append(t)
    table = pa.concat_tables(tables)
    rewards = table.column("rewards").combine_chunks()
    offsets = rewards.offsets.to_numpy().astype(np.int64)
    values = rewards.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
    return list(keys), table.column("prompt").to_pylist(), Ragged(values, offsets - offsets[0])
