"""Fast checks of the CPU mode (openrlhf_infalign/adapter/cpu/, ``--infalign.cpu``) and the worker hook's env.

The patches are process-global, so each check that applies them runs in a fresh interpreter. The full PPO loop
with these patches is exercised by tests/test_e2e_cpu.py (marked ``e2e``).
"""

import socket
import subprocess
import sys
import textwrap

import pytest

from openrlhf_infalign.adapter import cpu, hook
from openrlhf_infalign.adapter.cpu import loopback, patches


def _run(code: str, timeout: int = 240) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_with_cpu_flags_adds_missing_and_keeps_users():
    argv = ["--ds.attn_implementation", "eager", "--vllm.sync_backend=gloo", "--actor.model_name_or_path", "m"]
    out = cpu.with_cpu_flags(argv)
    assert out[: len(argv)] == argv
    assert out.count("--ds.attn_implementation") == 1  # the user's "eager" wins
    assert "--vllm.sync_backend" not in out[len(argv) :]  # given in the = form
    assert "--vllm.enforce_eager" in out
    assert out[out.index("--ds.param_dtype") + 1] == "bf16"


def test_ray_init_kwargs_loopback_fake_gpus_and_the_one_hook():
    kw = cpu.ray_init_kwargs(num_cpus=3)
    assert kw["_node_ip_address"] == "127.0.0.1" and kw["include_dashboard"] is False
    assert kw["num_cpus"] == 3 and kw["num_gpus"] >= 1
    assert "runtime_env" not in kw  # the worker hook's runtime env is merged by hook.runtime_env
    env = hook.runtime_env({"env_vars": {"X": "1"}}, cpu_mode=True)
    assert env["worker_process_setup_hook"] == hook.SETUP_HOOK == "openrlhf_infalign.adapter.hook.worker_setup"
    assert env["env_vars"]["X"] == "1" and env["env_vars"]["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert env["env_vars"][cpu.ENV] == "1" and hook.CPU_ENV == cpu.ENV  # the hook applies the CPU mode in every worker
    assert cpu.ENV not in hook.runtime_env(None, cpu_mode=False)["env_vars"]


def test_ray_init_kwargs_start_a_fresh_local_cluster_unless_ray_address(monkeypatch):
    # Another process's cluster recorded in /tmp/ray must not be joined by a CPU run (it refuses num_cpus there).
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cpu.ray_init_kwargs()["address"] == "local"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    # joining: the cluster's address only (Ray refuses node settings there)
    assert cpu.ray_init_kwargs(num_cpus=3) == {"address": "127.0.0.1:6379"}


def test_rollout_actor_gets_cpu_worker_extension():
    seen = {}

    class FakeActorClass:  # records what Ray would receive; only the argument rewrite is under test here
        def options(self, **o):
            seen["options"] = o
            return self

        def remote(self, *a, **kw):
            seen["kwargs"] = kw
            return "handle"

    wrapped = patches._RolloutActorWithCpuWorker(FakeActorClass())
    upstream = "openrlhf.trainer.ray.vllm_worker_wrap.WorkerWrap"
    assert wrapped.options(num_gpus=1).remote(model="m", worker_extension_cls=upstream) == "handle"
    assert seen["options"] == {"num_gpus": 1}
    assert seen["kwargs"] == {"model": "m", "worker_extension_cls": patches.VLLM_WORKER_EXTENSION}
    # a user's own extension class is left alone
    wrapped.options().remote(worker_extension_cls="my.Ext")
    assert seen["kwargs"]["worker_extension_cls"] == "my.Ext"


@pytest.mark.openrlhf
def test_apply_patches_openrlhf_modules_lazily_and_idempotently():
    out = _run("""
        import sys
        from openrlhf_infalign.adapter import cpu
        cpu.apply(); cpu.apply()
        assert "openrlhf.utils.distributed_util" not in sys.modules  # lazy: nothing heavy imported by apply()
        import torch
        assert torch.cuda.current_device() == "cpu" and torch.cuda.current_stream() is None
        torch.cuda.set_device(0); torch.cuda.synchronize()
        from openrlhf.utils.distributed_util import stateless_init_process_group
        from openrlhf_infalign.adapter.cpu.loopback import gloo_init_process_group
        assert stateless_init_process_group is gloo_init_process_group
        from openrlhf.trainer.ppo_utils import NaiveReplayBuffer
        buf = NaiveReplayBuffer(4)
        assert buf.target_device == torch.device("cpu"), buf.target_device
        assert torch.cuda.current_device() == "cpu"  # restored after the buffer's __init__
        import deepspeed.comm.torch
        assert sys.modules["deepspeed.comm.torch"].build_shm_op() is None
        from openrlhf.utils.deepspeed.deepspeed import DeepspeedStrategy
        import openrlhf.utils.deepspeed.deepspeed_utils  # noqa
        from types import SimpleNamespace as NS
        args = NS(ds=NS(param_dtype="bf16"), train=NS(dynamic_batch_enable=False))
        s = DeepspeedStrategy(args=args)
        cfg = s.get_ds_train_config({"type": "AdamW", "params": {"lr": 1e-3}})
        assert cfg["optimizer"]["params"]["torch_adam"] is True
        cpu.apply()
        assert s.get_ds_train_config({"type": "AdamW", "params": {}})["optimizer"]["params"] == {"torch_adam": True}
        import inspect, openrlhf.utils.distributed_util as du
        assert "def torch_dist_barrier_and_cuda_sync" in inspect.getsource(du)  # real loader kept for getsource
        print("OK")
        """)
    assert out.strip().endswith("OK")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_RECEIVER = """
import json, sys, torch
from openrlhf_infalign.adapter.cpu.loopback import GlooBroadcastGroup
group = GlooBroadcastGroup("127.0.0.1", int(sys.argv[1]), 1, 2, timeout_s=60)
received = torch.empty(3, 4, dtype=torch.bfloat16)
group.broadcast(received, src=0, stream=None)
print(json.dumps(received.float().tolist()))
"""


def test_gloo_group_broadcasts_bf16_between_processes():
    import json

    import torch

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-c", _RECEIVER, str(port)], stdout=subprocess.PIPE, text=True)
    try:
        group = loopback.GlooBroadcastGroup("127.0.0.1", port, 0, 2, timeout_s=60)
        sent = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4) / 4
        group.broadcast(sent, src=0, stream=None)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert json.loads(out.strip().splitlines()[-1]) == sent.float().tolist()


def test_gpu_runs_never_import_the_cpu_mode():
    out = _run("""
        import sys
        import openrlhf_infalign.adapter.console, openrlhf_infalign.adapter.hook, openrlhf_infalign.adapter.planning
        print(sorted(m for m in sys.modules if m.startswith("openrlhf_infalign.adapter.cpu")))
        """)
    assert out.strip() == "[]"
