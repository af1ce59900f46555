"""The reference reward store: per training prompt, the sorted rewards of K samples of the base policy.

Written once, offline (`infalign calibrate`, `infalign store import`), read during RL for calibration lookups.
Format: see openrlhf_infalign/store/format.py. Never imports openrlhf.
"""

from .commit import check_target
from .format import FORMAT_VERSION, StoreError, digests_from_keys, prompt_digests, prompt_key
from .reader import ReferenceStore, VerifyReport, read_manifest
from .writer import Ragged, write_json, write_store

__all__ = [
    "FORMAT_VERSION",
    "Ragged",
    "ReferenceStore",
    "StoreError",
    "VerifyReport",
    "check_target",
    "digests_from_keys",
    "prompt_digests",
    "prompt_key",
    "read_manifest",
    "write_json",
    "write_store",
]
