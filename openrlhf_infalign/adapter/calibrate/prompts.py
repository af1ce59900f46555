"""The training prompts, built by OpenRLHF's own dataset code, so every store key equals ``Experience.prompts``.

``blending_datasets`` -> ``select(max_samples)`` -> ``PromptDataset`` with the same flags as ``train_ppo_ray``; the
store keeps one row per distinct prompt key.
"""

from __future__ import annotations

import logging
import os
import warnings
from types import SimpleNamespace
from typing import Dict, Sequence

from openrlhf_infalign.store import prompt_key

from .settings import CalibrateSettings, CalibrationError

logger = logging.getLogger(__name__)

__all__ = ["load_tokenizer", "load_prompts", "unique_prompts"]


def _strategy_for(settings: CalibrateSettings):
    """The slice of OpenRLHF's strategy object its dataset code reads (args.data.*, print, is_rank_0)."""
    data = SimpleNamespace(
        input_key=settings.input_key,
        label_key=settings.label_key,
        apply_chat_template=settings.apply_chat_template,
        image_key="images",
    )
    args = SimpleNamespace(data=data, use_ms=False)
    return SimpleNamespace(args=args, is_rank_0=lambda: True, print=lambda *a, **k: logger.info(" ".join(map(str, a))))


def load_tokenizer(settings: CalibrateSettings):
    """The policy tokenizer exactly as the trainer loads it (left padding, pad = eos when missing)."""
    from openrlhf.utils.utils import get_tokenizer

    return get_tokenizer(settings.policy, None, "left", None, use_fast=not settings.disable_fast_tokenizer)


def load_prompts(settings: CalibrateSettings, tokenizer):
    """Templated prompt strings and labels, built by OpenRLHF's own dataset code as ``prepare_datasets`` does."""
    from openrlhf.datasets import PromptDataset
    from openrlhf.datasets.utils import blending_datasets

    strategy = _strategy_for(settings)
    for part in settings.prompt_dataset.split(","):
        path = part.split("@")[0].strip()
        if os.path.splitext(path)[1].lower() in (".json", ".jsonl", ".csv", ".parquet", ".arrow"):
            if not os.path.exists(path):
                raise FileNotFoundError(f"--data.prompt_dataset: {path} not found")
            if os.path.getsize(path) == 0:
                raise CalibrationError(f"--data.prompt_dataset: {path} is empty (no prompts to calibrate)")
    try:
        data = blending_datasets(
            settings.prompt_dataset,
            settings.prompt_probs,
            strategy,
            settings.seed,
            max_count=settings.max_samples,
            dataset_split=settings.prompt_split,
        )
    except (CalibrationError, FileNotFoundError):
        raise
    except Exception as e:  # datasets' own errors are long and name no flag: say which input failed
        raise CalibrationError(
            f"--data.prompt_dataset {settings.prompt_dataset}: could not load it ({type(e).__name__}: {e})"
        ) from e
    data = data.select(range(min(settings.max_samples, len(data))))
    if len(data) == 0:
        raise CalibrationError(f"--data.prompt_dataset {settings.prompt_dataset}: no rows (empty dataset)")
    cols = set(data.column_names)
    if settings.input_key not in cols:
        raise CalibrationError(
            f"--data.prompt_dataset {settings.prompt_dataset}: no column {settings.input_key!r} "
            f"(--data.input_key); columns: {sorted(cols)}"
        )
    if settings.label_key and settings.label_key not in cols:
        raise CalibrationError(
            f"--data.prompt_dataset {settings.prompt_dataset}: no column {settings.label_key!r} "
            f"(--data.label_key); columns: {sorted(cols)}"
        )
    ds = PromptDataset(data, tokenizer, strategy, input_template=settings.input_template)
    return list(ds.prompts), list(ds.labels)


def unique_prompts(prompts: Sequence[str], labels: Sequence) -> tuple[list[str], list, list[str], int]:
    """First occurrence of each prompt (the store has one row per prompt key); returns prompts, labels, keys, dups."""
    seen: Dict[str, int] = {}
    up, ul, keys = [], [], []
    for p, lab in zip(prompts, labels):
        key = prompt_key(p)
        if key in seen:
            if ul[seen[key]] != lab:
                warnings.warn(
                    f"prompt {p[:80]!r} appears twice with different labels; calibrating it once with the first "
                    "label (the store holds one reward set per prompt)",
                    stacklevel=2,
                )
            continue
        seen[key] = len(up)
        up.append(p)
        ul.append(lab)
        keys.append(key)
    return up, ul, keys, len(prompts) - len(up)
