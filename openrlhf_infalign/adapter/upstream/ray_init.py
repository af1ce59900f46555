"""``ray.init`` (Ray 2.55, as OpenRLHF 0.11.2's ``train()`` calls it) with the adapter's worker hook in its runtime env.

Upstream's ``train()`` starts Ray itself; every model and the trainer are Ray actors in other processes, so the only
way our code runs first in each of them is ``runtime_env.worker_process_setup_hook`` (:mod:`..hook`), merged with
upstream's environment. In a CPU run the CPU mode's node settings join the call (:func:`..cpu.ray_init_kwargs`).
"""

from __future__ import annotations

import contextlib
import os

import ray

from openrlhf_infalign.adapter.hook import runtime_env
from openrlhf_infalign.adapter.upstream import patched

__all__ = ["ray_init_with_hook"]


@contextlib.contextmanager
def ray_init_with_hook(cpu_mode: bool):
    """While active, ``ray.init(...)`` loads the worker hook in every worker (and the CPU settings in a CPU run)."""
    real_init = ray.init

    def init(*a, **kw):
        kw["runtime_env"] = runtime_env(kw.get("runtime_env"), cpu_mode)
        if cpu_mode and not a and "address" not in kw and not os.environ.get("RAY_ADDRESS"):
            from openrlhf_infalign.adapter import cpu

            for k, v in cpu.ray_init_kwargs().items():
                kw.setdefault(k, v)
        return real_init(*a, **kw)

    with patched(ray, "init", init):
        yield
