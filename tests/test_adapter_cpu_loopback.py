"""Loopback only in CPU mode: every address ``--infalign.cpu`` lets OpenRLHF use is 127.0.0.1.

A driver process in CPU mode, as ``openrlhf train_ppo --infalign.cpu`` runs it (:func:`cpu.apply`, then ``ray.init``
with :func:`cpu.ray_init_kwargs` and the worker hook, which applies the CPU mode in every worker), reports what it sees as one
JSON line. Inside a Ray worker, as OpenRLHF's actors are, the real upstream code picks its addresses:
``BaseDistributedActor``
(DeepSpeed's ``MASTER_ADDR``) and DeepSpeed's own ``init_distributed`` rendezvous, ``ActorPPOTrainer.
_init_vllm_sync_group`` (the weight-sync group, joined by a second worker through the real
:class:`CpuWorkerWrap` engine side), and vLLM's ``get_ip``/``get_loopback_ip``. Each address is 127.0.0.1 and no
socket these create listens on anything but 127.0.0.1.
"""

import importlib.util
import ipaddress
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.openrlhf

for _mod in ("ray", "openrlhf", "deepspeed", "vllm", "psutil"):
    if importlib.util.find_spec(_mod) is None:
        pytest.skip(f"{_mod} is not installed", allow_module_level=True)

import ray  # noqa: E402

from openrlhf_infalign.adapter import cpu  # noqa: E402
from openrlhf_infalign.adapter.cpu.loopback import loopback_tcp_store  # noqa: E402
from openrlhf_infalign.adapter.hook import runtime_env  # noqa: E402

LOOPBACK = "127.0.0.1"


def _listening_addresses(port=None):
    import psutil

    def ipv4(ip):  # gRPC listens dual-stack: 127.0.0.1 shows as ::ffff:127.0.0.1
        mapped = ipaddress.ip_address(ip.split("%")[0])
        return str(getattr(mapped, "ipv4_mapped", None) or mapped)

    conns = psutil.Process().net_connections(kind="inet")
    return sorted({ipv4(c.laddr.ip) for c in conns if c.status == "LISTEN" and port in (None, c.laddr.port)})


class EngineSide:
    """The vLLM engine's side of the weight-sync rendezvous: runs the real ``CpuWorkerWrap.init_process_group``."""

    def init_process_group(self, master_address, master_port, rank_offset, world_size, group_name, backend, use_ray):
        from openrlhf_infalign.adapter.cpu.vllm_worker import CpuWorkerWrap

        self.worker = CpuWorkerWrap()
        self.worker.init_process_group(
            master_address, master_port, rank_offset, world_size, group_name, backend=backend, use_ray=use_ray
        )
        self.seen = {"master_address": master_address, "listening": _listening_addresses()}

    def seen_by_engine(self):
        return self.seen


class TrainerSide:
    """Where OpenRLHF's DeepSpeed actor picks its addresses, with the real upstream code."""

    def node_ip(self):
        return ray._private.services.get_node_ip_address()

    def deepspeed_master(self):
        import deepspeed
        import torch.distributed as dist
        from openrlhf.trainer.ray.launcher import BaseDistributedActor

        actor = BaseDistributedActor(world_size=1, rank=0, master_addr=None, master_port=None)
        deepspeed.init_distributed(dist_backend="gloo")  # what DeepspeedStrategy.setup_distributed runs, env://
        out = {
            "master_addr": actor.get_master_addr_port()[0],
            "env_master_addr": os.environ["MASTER_ADDR"],
            "world_size": dist.get_world_size(),
            "listening": _listening_addresses(),
        }
        return out

    def weight_sync(self, engine):
        from openrlhf.trainer.ray.ppo_actor import ActorPPOTrainer

        vllm_args = SimpleNamespace(num_engines=1, tensor_parallel_size=1, sync_with_ray=False)
        strategy = SimpleNamespace(args=SimpleNamespace(vllm=vllm_args))
        trainer = SimpleNamespace(strategy=strategy, vllm_engines=[engine])
        ActorPPOTrainer._init_vllm_sync_group(trainer, "gloo")
        group = trainer._model_update_group
        return {"group": type(group).__name__, "world_size": group.world_size, "listening": _listening_addresses()}

    def vllm_addresses(self):
        from vllm.utils.network_utils import get_ip, get_loopback_ip

        return {"get_ip": get_ip(), "get_loopback_ip": get_loopback_ip()}


def drive() -> dict:
    """The CPU-mode driver (run as ``python tests/test_adapter_cpu_loopback.py``)."""
    from datetime import timedelta

    cpu.apply()
    ray.init(
        **cpu.ray_init_kwargs(num_cpus=3, num_gpus=0),
        runtime_env=runtime_env(None, cpu_mode=True),
        log_to_driver=False,
    )
    try:
        trainer = ray.remote(num_cpus=0)(TrainerSide).remote()
        engine = ray.remote(num_cpus=0)(EngineSide).remote()
        seen = {
            "ray_nodes": sorted({n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}),
            "gcs_host": ray.get_runtime_context().gcs_address.rsplit(":", 1)[0],
            "driver_listening": _listening_addresses(),
            "worker_node_ip": ray.get(trainer.node_ip.remote()),
            "deepspeed": ray.get(trainer.deepspeed_master.remote(), timeout=300),
            "vllm": ray.get(trainer.vllm_addresses.remote(), timeout=300),
        }
        sync_trainer = ray.remote(num_cpus=0)(TrainerSide).remote()
        seen["weight_sync"] = ray.get(sync_trainer.weight_sync.remote(engine), timeout=300)
        seen["weight_sync_engine"] = ray.get(engine.seen_by_engine.remote())
    finally:
        ray.shutdown()
    store = loopback_tcp_store(LOOPBACK, 0, 1, True, timedelta(seconds=30))
    store.set("k", "v")
    with socket.create_connection((LOOPBACK, store.port), timeout=5):
        pass
    seen["store"] = {"value": store.get("k").decode(), "listening": _listening_addresses(store.port)}
    return seen


@pytest.fixture(scope="module")
def seen():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, __file__], capture_output=True, text=True, timeout=900, env=env, cwd=str(root)
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, f"driver failed\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1])


def test_ray_nodes_gcs_and_driver_on_loopback(seen):
    assert seen["ray_nodes"] == [LOOPBACK]
    assert seen["gcs_host"] == LOOPBACK
    assert seen["driver_listening"] and set(seen["driver_listening"]) == {LOOPBACK}, seen["driver_listening"]
    assert seen["worker_node_ip"] == LOOPBACK


def test_deepspeed_master_address_and_rendezvous_on_loopback(seen):
    ds = seen["deepspeed"]
    assert ds["master_addr"] == ds["env_master_addr"] == LOOPBACK
    assert ds["world_size"] == 1
    assert ds["listening"] and set(ds["listening"]) == {LOOPBACK}, ds


def test_weight_sync_group_on_loopback(seen):
    sync, engine = seen["weight_sync"], seen["weight_sync_engine"]
    assert sync["group"] == "GlooBroadcastGroup" and sync["world_size"] == 2
    assert set(sync["listening"]) == {LOOPBACK}, sync
    assert engine["master_address"] == LOOPBACK
    assert set(engine["listening"]) <= {LOOPBACK}, engine


def test_vllm_addresses_on_loopback(seen):
    assert seen["vllm"] == {"get_ip": LOOPBACK, "get_loopback_ip": LOOPBACK}


def test_loopback_tcp_store_listens_on_loopback_only(seen):
    assert seen["store"] == {"value": "v", "listening": [LOOPBACK]}


if __name__ == "__main__":
    print(json.dumps(drive()), flush=True)
