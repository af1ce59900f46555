"""Every upstream symbol the adapter replaces, wraps, subclasses or reaches into at run time: an upgrade's checklist.

``UPSTREAM_HOOKS`` has one entry per symbol: where it lives upstream (``module:qualname``), the version it was read
from, how we touch it, the code of ours that does, why, and a digest of its upstream source as read. The test
``tests/test_adapter_upstream.py`` walks the table against the installed packages: a symbol that moved or whose
source changed fails with this checklist, so an OpenRLHF upgrade is a list to re-read, not a search.

This module imports nothing of OpenRLHF: sources are found and read as text (``ast``), never executed.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

__all__ = ["OPENRLHF", "Hook", "UPSTREAM_HOOKS", "patched", "source_digest", "source_of"]

#: The OpenRLHF release every entry below was read from (pyproject pins openrlhf>=0.11.2,<0.12).
OPENRLHF = "openrlhf 0.11.2"

# Kinds of touch, from the most to the least invasive.
REPLACED = "replaced"  # the name upstream looks up is pointed at ours for a while (or for good, in CPU mode)
WRAPPED = "wrapped"  # ours runs around upstream's, which still runs
SUBCLASSED = "overridden"  # a method of upstream's class overridden in our subclass
PRIVATE = "private"  # a private method called or attribute read: no API promise


@dataclass(frozen=True)
class Hook:
    symbol: str  # "package.module:Qual.name" where upstream defines it
    how: str  # REPLACED, WRAPPED, SUBCLASSED or PRIVATE
    ours: str  # "openrlhf_infalign.module:name" that does it
    why: str
    digest: Optional[str] = None  # sha256[:16] of the symbol's source as read (openrlhf symbols only)
    read_from: str = OPENRLHF


_EM = "openrlhf.trainer.ppo_utils.experience_maker:RemoteExperienceMaker"
_PPO = "openrlhf.trainer.ppo_trainer"
_ASYNC = "openrlhf.trainer.ppo_trainer_async"
_UP = "openrlhf_infalign.adapter.upstream"
_CPU = "openrlhf_infalign.adapter.cpu.patches"

UPSTREAM_HOOKS: tuple[Hook, ...] = (
    # -- how a run starts (openrlhf train_ppo) --
    Hook(
        "openrlhf.cli.train_ppo_ray:__main__",
        REPLACED,
        f"{_UP}.train_ppo_ray:intercept",
        "argparse.ArgumentParser.parse_args of the parser built inline under __main__ (found by its calling frame): "
        "our flags are added to upstream's parser before it parses",
        "f482b05bfbd77153",
    ),
    Hook(
        "openrlhf.cli.train_ppo_ray:train",
        WRAPPED,
        f"{_UP}.train_ppo_ray:intercept",
        "the module global the __main__ block calls: launch.run_train prepares the plugin around it",
        "e4fb14095396487e",
    ),
    Hook(
        "ray._private.worker:init",
        WRAPPED,
        f"{_UP}.ray_init:ray_init_with_hook",
        "upstream's ray.init gets the worker hook (and the CPU mode's node settings) in its runtime env",
        read_from="ray 2.55.0",
    ),
    # -- the trainer and the reward seam --
    Hook(
        f"{_PPO}:PPOTrainer",
        REPLACED,
        "openrlhf_infalign.adapter.trainer:use_infalign_trainer",
        "train() looks the name up at call time: our subclass is built with the plugin's state",
        "5d13ed090ca78d6b",
    ),
    Hook(
        f"{_ASYNC}:PPOTrainerAsync",
        REPLACED,
        "openrlhf_infalign.adapter.trainer:use_infalign_trainer",
        "the same in async mode (--train.async_enable)",
        "576117b63be470c2",
    ),
    Hook(
        f"{_ASYNC}:GenerateSamplesActor",
        REPLACED,
        "openrlhf_infalign.adapter.trainer:InfAlignPPOTrainerAsync",
        "PPOTrainerAsync.__init__ builds it by module global: ours ships eval samples and evaluates at step 0",
        "6eacb982685376d6",
    ),
    Hook(
        f"{_ASYNC}:TrainingActor",
        REPLACED,
        "openrlhf_infalign.adapter.trainer:InfAlignPPOTrainerAsync",
        "PPOTrainerAsync.__init__ builds it by module global: ours owns the wrapped experience maker",
        "49680a82ee4aebcf",
    ),
    Hook(
        f"{_EM}.compute_advantages_and_returns",
        WRAPPED,
        f"{_UP}.experience_maker:install_reward_wrapper",
        "the reward seam: every reward path has filled experience.rewards, no baseline, clip or KL term has run",
        "edee114b74af1e79",
    ),
    Hook(
        f"{_EM}.split_rollout_samples",
        PRIVATE,
        "openrlhf_infalign.adapter.wrapper:DirectRewardWrapper",
        "infalign.direct groups the batch by experience.index, which this sets to each sample's position in the "
        "rollout batch (the generator's order, a prompt's n samples consecutive), as compute_advantages_and_returns "
        "groups by it next",
        "aa2097043ae753b5",
    ),
    Hook(
        f"{_EM}.make_experience_batch",
        WRAPPED,
        f"{_UP}.experience_maker:record_rollout_kl",
        "the rollouts' sequence KL (info['kl'] x response length) for the eval log's kl_rollout",
        "ef3ab908cdcef1bd",
    ),
    Hook(
        f"{_EM}._dispatch_forward",
        PRIVATE,
        f"{_UP}.experience_maker:forward",
        "eval scoring and eval KL call the actor / reference / reward-model groups as make_experience does",
        "0e68d18fc36f7e22",
    ),
    Hook(
        f"{_EM}._flatten_results",
        PRIVATE,
        f"{_UP}.experience_maker:forward",
        "the per-micro-batch results of those calls, de-duplicated as make_experience does",
        "d3890f6e74810cd2",
    ),
    Hook(
        "openrlhf.trainer.ray.launcher:RayActorGroup.__init__",
        PRIVATE,
        f"{_UP}.experience_maker:effective_actors",
        "reads group._actor_handlers (set here) to pad micro-batches to one per actor",
        "0876712f4c798e74",
    ),
    Hook(
        f"{_PPO}:PPOTrainer.fit",
        SUBCLASSED,
        "openrlhf_infalign.adapter.trainer:InfAlignPPOTrainer",
        "the step-0 evaluation before upstream's loop",
        "07386c75f2b4bc48",
    ),
    Hook(
        f"{_PPO}:PPOTrainer.evaluate",
        SUBCLASSED,
        "openrlhf_infalign.adapter.evaluation:InfAlignEvalMixin",
        "Best-/Worst-of-N win rates against the eval store, local RM scoring, the eval log",
        "7ac7e3542a429d32",
    ),
    Hook(
        f"{_PPO}:BasePPOTrainer.train_step",
        SUBCLASSED,
        "openrlhf_infalign.adapter.evaluation:InfAlignEvalMixin",
        "tracks the rollout KL and the token-mean KL of each step",
        "629992889f689ddd",
    ),
    Hook(
        f"{_PPO}:BasePPOTrainer._detect_eval_metric_key",
        SUBCLASSED,
        "openrlhf_infalign.adapter.evaluation:InfAlignEvalMixin",
        "accepts the logger's eval/ spelling of our metric keys for --ckpt.best_metric_key",
        "1e8f506cdba64209",
    ),
    Hook(
        f"{_PPO}:BasePPOTrainer.save_best_checkpoint",
        SUBCLASSED,
        "openrlhf_infalign.adapter.trainer:InfAlignTrainingActor",
        "the step-0 evaluation (the base policy) updates no best-checkpoint state in async mode",
        "56a925ff76b79dd7",
    ),
    Hook(
        f"{_ASYNC}:GenerateSamplesActor._run_eval",
        SUBCLASSED,
        "openrlhf_infalign.adapter.trainer:InfAlignGenerateSamples",
        "ships eval samples to the training actor instead of metrics",
        "a5a545f4c3ff0bd2",
    ),
    Hook(
        f"{_ASYNC}:GenerateSamplesActor.fit",
        SUBCLASSED,
        "openrlhf_infalign.adapter.trainer:InfAlignGenerateSamples",
        "queues the step-0 evaluation with upstream's slot-token protocol",
        "2c774b5a07a3bc46",
    ),
    Hook(
        "openrlhf.models.model:get_llm_for_sequence_regression",
        WRAPPED,
        f"{_UP}.reward_loader:restore_normalization_on_load",
        "transformers 5 leaves the RM's mean/std buffers uninitialised; also rebound in openrlhf.models, "
        "trainer.ray.launcher and trainer.ray.ppo_critic",
        "e5ec1d560371102b",
    ),
    # -- CPU mode (adapter/cpu: items of its list) --
    Hook(
        "openrlhf.trainer.ppo_utils.replay_buffer:NaiveReplayBuffer.__init__",
        WRAPPED,
        f"{_CPU}:_patch_replay_buffer",
        "item 3: its device is cuda:current_device()",
        "7cad124520cf7870",
    ),
    Hook(
        "openrlhf.utils.distributed_util:stateless_init_process_group",
        REPLACED,
        f"{_CPU}:_patch_distributed_util",
        "item 4: a pynccl group; a gloo group on CPU (rebound in trainer.ray.ppo_actor too)",
        "0f4de7e6719a9922",
    ),
    Hook(
        "openrlhf.trainer.ray.ppo_actor:stateless_init_process_group",
        REPLACED,
        f"{_CPU}:_patch_ppo_actor",
        "item 4: ppo_actor binds the name with from-import; rebound in case distributed_util was patched late",
        "a972343c53f5f1dd",
    ),
    Hook(
        "openrlhf.trainer.ray.vllm_engine:RolloutRayActor",
        REPLACED,
        f"{_CPU}:_patch_vllm_engine",
        "item 5: its worker_extension_cls argument is swapped for the CPU worker extension",
        "eb61743a7634b22c",
    ),
    Hook(
        "openrlhf.trainer.ray.vllm_worker_wrap:WorkerWrap",
        REPLACED,
        f"{_CPU}:_patch_vllm_engine",
        "item 5: receives weights on cuda one parameter at a time; cpu/vllm_worker.CpuWorkerWrap instead",
        "9a8ddcde2fa64bf8",
    ),
    Hook(
        "openrlhf.utils.deepspeed.deepspeed:DeepspeedStrategy.get_ds_train_config",
        WRAPPED,
        f"{_CPU}:_patch_deepspeed_strategy",
        "item 6: torch_adam instead of a JIT-built FusedAdam",
        "bbd4a8ff33be512a",
    ),
    Hook(
        "deepspeed.comm.torch:build_shm_op",
        REPLACED,
        f"{_CPU}:_patch_deepspeed_comm_torch",
        "item 6: no shared-memory op JIT build",
        read_from="deepspeed 0.19.6",
    ),
    Hook(
        "torch.cuda:set_device",
        REPLACED,
        f"{_CPU}:_patch_torch_cuda",
        "item 2: with synchronize, current_device and current_stream: no-ops without CUDA",
        read_from="torch 2.13.0",
    ),
    Hook(
        "ray._private.services:get_node_ip_address",
        REPLACED,
        f"{_CPU}:_patch_ray_services",
        "item 7: 127.0.0.1, the address OpenRLHF gives DeepSpeed and the weight sync",
        read_from="ray 2.55.0",
    ),
    Hook(
        "torch.distributed.rendezvous:_create_c10d_store",
        WRAPPED,
        f"{_CPU}:_patch_rendezvous",
        "item 7: the rendezvous store's master listens on 127.0.0.1 only",
        read_from="torch 2.13.0",
    ),
)


def _module_file(module: str) -> Path:
    """The source file of ``module`` found without importing it (only its top-level package is located)."""
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        raise LookupError(f"package {top!r} is not installed")
    base = Path(list(spec.submodule_search_locations)[0]).joinpath(*rest)
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    raise LookupError(f"module {module} not found (looked for {base}.py and {base}/__init__.py)")


def source_of(symbol: str) -> str:
    """The source text of ``module:Qual.name`` (``module:__main__``: the module's ``if __name__ == "__main__"`` block)."""
    module, qualname = symbol.split(":")
    text = _module_file(module).read_text(encoding="utf-8")
    body = ast.parse(text).body
    if qualname == "__main__":
        for node in body:
            if isinstance(node, ast.If) and "__main__" in (ast.get_source_segment(text, node.test) or ""):
                return ast.get_source_segment(text, node)
        raise LookupError(f"{module} has no __main__ block")
    node = None
    for part in qualname.split("."):
        found = [
            n
            for n in body
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            and n.name == part
            or isinstance(n, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == part for t in n.targets)
            or isinstance(n, ast.ImportFrom)
            and any((a.asname or a.name) == part for a in n.names)
        ]
        if not found:
            raise LookupError(f"{symbol}: {part!r} not found in {module}")
        node = found[-1]  # the last definition wins, as at import time
        body = getattr(node, "body", [])
    return ast.get_source_segment(text, node)


def source_digest(symbol: str) -> str:
    return hashlib.sha256(source_of(symbol).encode("utf-8")).hexdigest()[:16]


@contextlib.contextmanager
def patched(obj, name: str, value):
    """``obj.name`` is ``value`` while the block runs (yields the original), then the original again.

    How the adapter reaches upstream code without editing it: upstream looks these names up at call time.
    """
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield old
    finally:
        setattr(obj, name, old)
