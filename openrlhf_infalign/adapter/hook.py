"""The adapter's one Ray worker hook, and the runtime env that installs it: what every worker of the job runs first.

Ray imports this module in each worker (``runtime_env.worker_process_setup_hook`` = :data:`SETUP_HOOK`) before
anything else: in a CPU run (:data:`.cpu.ENV` set by :func:`runtime_env`) the CPU mode must be applied before
OpenRLHF is imported in that process; then OpenRLHF's reward-model loader is made to restore mean/std.
"""

from __future__ import annotations

import os
from typing import Optional

__all__ = ["SETUP_HOOK", "runtime_env", "worker_setup"]

#: Ray 2.55 wants the dotted form "pkg.module.function" (it rejects "pkg.module:function").
SETUP_HOOK = "openrlhf_infalign.adapter.hook.worker_setup"
#: cpu.ENV, spelled here so that GPU workers check it without importing the CPU mode (a test keeps the two equal).
CPU_ENV = "INFALIGN_CPU"


def worker_setup() -> None:
    """``worker_process_setup_hook``: runs first in every Ray worker process of the job."""
    if os.environ.get(CPU_ENV) == "1":
        # Only CPU runs import the CPU mode: GPU workers never load it.
        from openrlhf_infalign.adapter import cpu

        cpu.apply()
    # After the CPU mode (it must precede OpenRLHF's import): reward models and critics loaded in this worker get
    # their config's mean/std, as `infalign calibrate` scores them, on CPU and GPU alike.
    from openrlhf_infalign.adapter.upstream.reward_loader import restore_normalization_on_load

    restore_normalization_on_load()


def runtime_env(base: Optional[dict], cpu_mode: bool) -> dict:
    """``base`` (a ``ray.init`` runtime env, e.g. upstream's) plus the worker hook, and the CPU mode's worker
    environment in a CPU run (the user's variables win)."""
    env = dict(base or {})
    env_vars = dict(env.get("env_vars") or {})
    if cpu_mode:
        from openrlhf_infalign.adapter import cpu

        env_vars = {**cpu.worker_env(), **env_vars, cpu.ENV: "1"}
    env["env_vars"] = env_vars
    hook = env.get("worker_process_setup_hook")
    if hook and hook != SETUP_HOOK:
        raise ValueError(f"ray.init already sets worker_process_setup_hook={hook!r}; cannot also load InfAlign's")
    env["worker_process_setup_hook"] = SETUP_HOOK
    return env
