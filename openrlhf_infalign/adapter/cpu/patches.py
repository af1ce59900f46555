"""The CPU mode's patches of OpenRLHF, DeepSpeed, torch and Ray, each installed right after its module is imported.

Items 2-7 of the list in :mod:`openrlhf_infalign.adapter.cpu` (the why of each is there); each patch is idempotent
and marks what it changed. The upstream symbols they replace are listed in ``adapter/upstream``'s ``UPSTREAM_HOOKS``.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from typing import Callable, Dict, List, Optional

from openrlhf_infalign.adapter.cpu.loopback import LOOPBACK, gloo_init_process_group, loopback_tcp_store

__all__ = ["PATCHES", "install", "VLLM_WORKER_EXTENSION"]

#: vLLM worker extension class that receives weights on CPU (item 5).
VLLM_WORKER_EXTENSION = "openrlhf_infalign.adapter.cpu.vllm_worker.CpuWorkerWrap"
_UPSTREAM_WORKER_EXTENSION = "openrlhf.trainer.ray.vllm_worker_wrap.WorkerWrap"

# ---------------------------------------------------------------------------------------------------------------------
# Post-import patching: patch a module right after its first import, or now if already imported.


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Meta-path finder that wraps the loader of a watched module so that patches run right after it executes.

    Patching after execution but before the importer continues matters for ``from mod import name``: the
    importing module then binds the patched object.
    """

    def __init__(self) -> None:
        self.hooks: Dict[str, List[Callable]] = {}
        self._busy = threading.local()

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.hooks:
            return None
        busy = getattr(self._busy, "names", None)
        if busy is None:
            busy = self._busy.names = set()
        if fullname in busy:
            return None
        busy.add(fullname)
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            busy.discard(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _PatchingLoader(spec.loader, self)
        return spec

    def run_hooks(self, module) -> None:
        for fn in self.hooks.pop(module.__name__, []):
            fn(module)


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader, finder: _PostImportFinder) -> None:
        self._loader = loader
        self._finder = finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        # Keep the real loader visible (tracebacks, inspect.getsource, pkgutil use it).
        module.__loader__ = self._loader
        if getattr(module, "__spec__", None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        self._finder.run_hooks(module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


_finder = _PostImportFinder()


def _when_imported(name: str, fn: Callable) -> None:
    module = sys.modules.get(name)
    if module is not None:
        fn(module)
        return
    _finder.hooks.setdefault(name, []).append(fn)
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def _mark(obj, attr: str = "__infalign_cpu__") -> bool:
    """Set a marker once; True if it was not set before (keeps each patch idempotent)."""
    if getattr(obj, attr, False):
        return False
    setattr(obj, attr, True)
    return True


# ---------------------------------------------------------------------------------------------------------------------
# Item 2: torch.cuda


# One distinct function per patched name: torch._dynamo builds a rule map keyed by these objects and rejects one
# object appearing under two names.
def _set_device_noop(*args, **kwargs) -> None:
    return None


def _synchronize_noop(*args, **kwargs) -> None:
    return None


def _current_stream_none(*args, **kwargs) -> None:
    return None


def _current_device_cpu() -> str:
    return "cpu"


def _patch_torch_cuda(torch) -> None:
    cuda = torch.cuda
    if not _mark(cuda):
        return
    if cuda.is_available():
        return  # a real GPU is visible: leave CUDA alone (apply() is meant for CPU-only machines)
    cuda.set_device = _set_device_noop
    cuda.synchronize = _synchronize_noop
    cuda.current_device = _current_device_cpu
    cuda.current_stream = _current_stream_none


# ---------------------------------------------------------------------------------------------------------------------
# Item 3: replay buffer device


def _patch_replay_buffer(module) -> None:
    cls = module.NaiveReplayBuffer
    if not _mark(cls):
        return
    orig_init = cls.__init__

    def __init__(self, *args, **kwargs):
        import torch

        # Upstream builds torch.device(f"cuda:{current_device()}"), which is "cuda:cpu" under item 2 and
        # raises; give it a well-formed index for the duration of the call, then point it at the CPU.
        saved = torch.cuda.current_device
        torch.cuda.current_device = lambda: 0
        try:
            orig_init(self, *args, **kwargs)
        finally:
            torch.cuda.current_device = saved
        self.target_device = torch.device("cpu")

    __init__.__wrapped__ = orig_init
    cls.__init__ = __init__


# ---------------------------------------------------------------------------------------------------------------------
# Item 4: gloo weight-sync group (the group itself: loopback.py)


def _patch_distributed_util(module) -> None:
    if _mark(module):
        module.stateless_init_process_group = gloo_init_process_group


def _patch_ppo_actor(module) -> None:
    # ppo_actor binds the name with ``from ... import``; rebind it in case distributed_util was patched late.
    if _mark(module):
        module.stateless_init_process_group = gloo_init_process_group


# ---------------------------------------------------------------------------------------------------------------------
# Item 5: vLLM worker extension class, substituted where the rollout actors are created


class _RolloutActorWithCpuWorker:
    """Stands in for ``RolloutRayActor`` in ``create_vllm_engines``; only rewrites ``worker_extension_cls``."""

    def __init__(self, actor_class, options: Optional[dict] = None) -> None:
        self._actor_class = actor_class
        self._options = options

    def options(self, **options):
        return _RolloutActorWithCpuWorker(self._actor_class, options)

    def remote(self, *args, **kwargs):
        if kwargs.get("worker_extension_cls") == _UPSTREAM_WORKER_EXTENSION:
            kwargs["worker_extension_cls"] = VLLM_WORKER_EXTENSION
        target = self._actor_class.options(**self._options) if self._options is not None else self._actor_class
        return target.remote(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._actor_class, name)


def _patch_vllm_engine(module) -> None:
    if _mark(module):
        module.RolloutRayActor = _RolloutActorWithCpuWorker(module.RolloutRayActor)


# ---------------------------------------------------------------------------------------------------------------------
# Item 6: DeepSpeed (speed only)


def _no_shm_op():
    return None


def _patch_deepspeed_comm_torch(module) -> None:
    if _mark(module):
        module.build_shm_op = _no_shm_op


def _patch_deepspeed_strategy(module) -> None:
    cls = module.DeepspeedStrategy
    if not _mark(cls):
        return
    orig = cls.get_ds_train_config

    def get_ds_train_config(self, *args, **kwargs):
        config = orig(self, *args, **kwargs)
        optimizer = config.get("optimizer")
        if optimizer and optimizer.get("type", "").lower() in ("adam", "adamw"):
            optimizer.setdefault("params", {})["torch_adam"] = True
        return config

    get_ds_train_config.__wrapped__ = orig
    cls.get_ds_train_config = get_ds_train_config


# ---------------------------------------------------------------------------------------------------------------------
# Item 7: loopback only


def _loopback_node_ip_address(address=None) -> str:
    return LOOPBACK


def _patch_ray_services(module) -> None:
    if _mark(module):
        module.get_node_ip_address = _loopback_node_ip_address


def _patch_rendezvous(module) -> None:
    if not _mark(module):
        return
    orig = module._create_c10d_store

    # The store of upstream's env:// and tcp:// rendezvous (DeepSpeed's init_distributed), its master on loopback.
    def _create_c10d_store(hostname, port, rank, world_size, timeout, use_libuv=True):
        if module._torchelastic_use_agent_store():
            return orig(hostname, port, rank, world_size, timeout, use_libuv)
        return loopback_tcp_store(hostname, port, world_size, rank == 0, timeout, multi_tenant=True)

    _create_c10d_store.__wrapped__ = orig
    module._create_c10d_store = _create_c10d_store


#: module -> patch, in the order apply() installs them.
PATCHES = (
    ("torch", _patch_torch_cuda),
    ("openrlhf.trainer.ppo_utils.replay_buffer", _patch_replay_buffer),
    ("openrlhf.utils.distributed_util", _patch_distributed_util),
    ("openrlhf.trainer.ray.ppo_actor", _patch_ppo_actor),
    ("openrlhf.trainer.ray.vllm_engine", _patch_vllm_engine),
    ("deepspeed.comm.torch", _patch_deepspeed_comm_torch),
    ("openrlhf.utils.deepspeed.deepspeed", _patch_deepspeed_strategy),
    ("ray._private.services", _patch_ray_services),
    ("torch.distributed.rendezvous", _patch_rendezvous),
)


def install() -> None:
    """Queue every patch of :data:`PATCHES` (or run it now for a module already imported)."""
    for name, fn in PATCHES:
        _when_imported(name, fn)
