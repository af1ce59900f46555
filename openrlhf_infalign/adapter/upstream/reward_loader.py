"""OpenRLHF 0.11.2's ``get_llm_for_sequence_regression`` restoring the reward model's mean/std after loading.

OpenRLHF's model ``__init__`` fills the ``mean``/``std`` buffers from the config, but transformers 5 runs ``__init__``
on the meta device and materialises non-persistent buffers uninitialised: a normalised reward model would score with
garbage. Every loader of ours calls :func:`restore_normalization`; upstream's loader is wrapped in every Ray worker
(the worker hook, :mod:`..hook`), so training scores exactly as ``infalign calibrate`` does.
"""

from __future__ import annotations

import functools
import sys

from openrlhf_infalign.adapter.run_record import reward_normalization

__all__ = ["restore_normalization", "restore_normalization_on_load"]


def restore_normalization(model, reward_model: str):
    """Set a loaded reward/critic model's ``mean``/``std`` buffers from its config.json; returns the model."""
    if hasattr(model, "mean") and hasattr(model, "std"):
        import torch

        mean, std = reward_normalization(reward_model)
        with torch.no_grad():
            model.mean.fill_(mean)
            model.std.fill_(std)
    return model


def restore_normalization_on_load() -> None:
    """Make OpenRLHF's ``get_llm_for_sequence_regression`` restore mean/std after loading (idempotent)."""
    from openrlhf.models import model as model_module

    original = model_module.get_llm_for_sequence_regression
    if getattr(original, "_infalign_restores_normalization", False):
        return

    @functools.wraps(original)
    def get_llm_for_sequence_regression(model_name_or_path, model_type, **kwargs):
        return restore_normalization(original(model_name_or_path, model_type, **kwargs), model_name_or_path)

    get_llm_for_sequence_regression._infalign_restores_normalization = True
    # Modules imported before this call hold their own reference to the loader.
    for name in ("openrlhf.models", "openrlhf.trainer.ray.launcher", "openrlhf.trainer.ray.ppo_critic"):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "get_llm_for_sequence_regression", None) is original:
            module.get_llm_for_sequence_regression = get_llm_for_sequence_regression
    model_module.get_llm_for_sequence_regression = get_llm_for_sequence_regression
