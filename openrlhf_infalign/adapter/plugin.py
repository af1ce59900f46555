"""The plugin's hook in every Ray worker: what each worker process of the job runs first.

Ray imports this module in each worker of the job (``runtime_env.worker_process_setup_hook`` = :data:`SETUP_HOOK`,
set by :mod:`.launch`) before anything else: with ``--infalign.cpu`` the CPU module (:mod:`.cpu`) must be applied
before OpenRLHF is imported in that process; then OpenRLHF's reward-model loader is made to restore mean/std.
"""

from __future__ import annotations

import os

__all__ = ["CPU_ENV", "SETUP_HOOK", "worker_setup"]

#: Ray 2.55 wants the dotted form "pkg.module.function" (it rejects "pkg.module:function").
SETUP_HOOK = "openrlhf_infalign.adapter.plugin.worker_setup"
#: Set in every Ray worker's environment when --infalign.cpu is given.
CPU_ENV = "INFALIGN_CPU"


def worker_setup() -> None:
    """``worker_process_setup_hook``: runs first in every Ray worker process of the job."""
    if os.environ.get(CPU_ENV) == "1":
        # Only CPU runs load the CPU module; GPU workers never import it.
        from openrlhf_infalign.adapter import cpu

        cpu.apply()
    # After the CPU module (it must precede OpenRLHF's import): reward models and critics loaded in this worker get
    # their config's mean/std, as `infalign calibrate` scores them, on CPU and GPU alike.
    from openrlhf_infalign.adapter.run_record import restore_normalization_on_load

    restore_normalization_on_load()
