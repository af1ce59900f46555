"""The calibration job: K samples of the base policy per training prompt, scored by the training reward source.

Builds the reference reward store that CTRL's calibration looks up during RL (DESIGN.md section 1). To make the
lookup key equal what ``Experience.prompts`` holds during training, the prompts are built by OpenRLHF's own code
(``blending_datasets`` -> ``select(max_samples)`` -> ``PromptDataset``, same flags as ``train_ppo_ray``), and the
samples are scored by the same reward source training uses:

* ``--reward.remote_url x.py``: the file is loaded by OpenRLHF's ``SingleTurnAgentExecutor`` and called through its
  own ``_fetch_rewards_via_func`` with the query OpenRLHF builds (prompt + response tokens, decoded with special
  tokens kept).
* ``--reward.remote_url http://...``: OpenRLHF's ``_fetch_rewards_via_http`` (payload ``query/prompts/labels``).
* ``--reward.model_name_or_path``: OpenRLHF's ``get_llm_for_sequence_regression(path, "reward", ...)`` on the
  prompt + response token ids, as its ``RewardModelActor`` does.

Backends: ``vllm`` runs OpenRLHF's own ``create_vllm_engines`` (Ray actors spread over the cluster's GPUs, one per
engine, tensor parallel inside) and its ``generate_responses`` (the rollout path of training, reward_func / HTTP
rewards included); ``hf`` runs transformers ``generate`` in this process with the same prompt tokenisation,
truncation and sampling parameters (for CPU machines and tests).

Resumable: prompts are cut into shards; each finished shard is written atomically into ``OUT.partial/`` with a small
JSON manifest carrying the settings hash. A re-run with the same settings skips finished shards (and refuses a work
dir made with other settings); the final store is written atomically by ``write_store`` and the work dir removed.
A kill at any moment loses at most the shards in flight.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from openrlhf_infalign.store import Ragged, StoreError, prompt_key, read_manifest, write_store

logger = logging.getLogger(__name__)

__all__ = [
    "CalibrateSettings",
    "CalibrationError",
    "load_prompts",
    "template_settings",
    "run_calibration",
    "FAIL_AFTER_ENV",
]

#: Test hook: raise after this many shards have been written in this run (simulates a kill between shards).
FAIL_AFTER_ENV = "INFALIGN_CALIBRATE_FAIL_AFTER_SHARDS"
WORK_SUFFIX = ".partial"
SHARD_FORMAT = 1


class CalibrationError(ValueError):
    """Bad input or a failed reward source; the message names the prompt / file and a fix."""


@dataclass
class CalibrateSettings:
    """Everything that defines a calibration run (flag names are OpenRLHF's ``train_ppo_ray`` ones)."""

    policy: str  # --actor.model_name_or_path
    prompt_dataset: str  # --data.prompt_dataset
    out: str  # --out
    k: int = 32
    prompt_probs: Optional[str] = None
    prompt_split: str = "train"
    input_key: str = "input"
    label_key: Optional[str] = None
    input_template: Optional[str] = None
    apply_chat_template: bool = False
    max_samples: int = int(1e8)
    max_len: int = 2048
    disable_fast_tokenizer: bool = False
    reward_model: Optional[str] = None  # --reward.model_name_or_path
    reward_url: Optional[str] = None  # --reward.remote_url (comma-separated URLs, or one reward_func .py)
    normalize_reward: bool = False
    value_head_prefix: str = "score"
    attn_implementation: str = "sdpa"
    param_dtype: str = "bf16"
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: Optional[int] = None
    backend: str = "vllm"
    num_engines: int = 1
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    enable_prefix_caching: bool = False
    gpu_memory_utilization: float = 0.9
    cpu: bool = False  # --infalign.cpu: OpenRLHF's CPU compatibility module for the vllm backend
    seed: int = 42
    shard_size: int = 256
    batch_size: int = 8  # hf backend: prompts per generate() call (each with K return sequences)
    rm_batch_size: int = 64
    store_prompts: bool = True
    overwrite: bool = False
    progress: bool = True

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

    @property
    def reward_urls(self) -> List[str]:
        return [u.strip() for u in (self.reward_url or "").split(",") if u.strip()]

    @property
    def reward_kind(self) -> str:
        if self.reward_model:
            return "reward_model"
        return "reward_func" if self.reward_urls[0].endswith(".py") else "remote_url"


# ----------------------------------------------------------------------------------------------- prompts


def _strategy_for(settings: CalibrateSettings):
    """The slice of OpenRLHF's strategy object its dataset code reads (args.data.*, print, is_rank_0)."""
    data = SimpleNamespace(
        input_key=settings.input_key,
        label_key=settings.label_key,
        apply_chat_template=settings.apply_chat_template,
        image_key="images",
    )
    args = SimpleNamespace(data=data, use_ms=False)
    return SimpleNamespace(args=args, is_rank_0=lambda: True, print=lambda *a, **k: logger.info(" ".join(map(str, a))))


def load_tokenizer(settings: CalibrateSettings):
    """The policy tokenizer exactly as the trainer loads it (left padding, pad = eos when missing)."""
    from openrlhf.utils.utils import get_tokenizer

    return get_tokenizer(settings.policy, None, "left", None, use_fast=not settings.disable_fast_tokenizer)


def load_prompts(settings: CalibrateSettings, tokenizer):
    """Templated prompt strings and labels, built by OpenRLHF's own dataset code as ``prepare_datasets`` does."""
    from openrlhf.datasets import PromptDataset
    from openrlhf.datasets.utils import blending_datasets

    strategy = _strategy_for(settings)
    for part in settings.prompt_dataset.split(","):
        path = part.split("@")[0].strip()
        if os.path.splitext(path)[1].lower() in (".json", ".jsonl", ".csv", ".parquet", ".arrow"):
            if not os.path.exists(path):
                raise FileNotFoundError(f"--data.prompt_dataset: {path} not found")
            if os.path.getsize(path) == 0:
                raise CalibrationError(f"--data.prompt_dataset: {path} is empty (no prompts to calibrate)")
    try:
        data = blending_datasets(
            settings.prompt_dataset,
            settings.prompt_probs,
            strategy,
            settings.seed,
            max_count=settings.max_samples,
            dataset_split=settings.prompt_split,
        )
    except (CalibrationError, FileNotFoundError):
        raise
    except Exception as e:  # datasets' own errors are long and name no flag: say which input failed
        raise CalibrationError(
            f"--data.prompt_dataset {settings.prompt_dataset}: could not load it ({type(e).__name__}: {e})"
        ) from e
    data = data.select(range(min(settings.max_samples, len(data))))
    if len(data) == 0:
        raise CalibrationError(f"--data.prompt_dataset {settings.prompt_dataset}: no rows (empty dataset)")
    cols = set(data.column_names)
    if settings.input_key not in cols:
        raise CalibrationError(
            f"--data.prompt_dataset {settings.prompt_dataset}: no column {settings.input_key!r} "
            f"(--data.input_key); columns: {sorted(cols)}"
        )
    if settings.label_key and settings.label_key not in cols:
        raise CalibrationError(
            f"--data.prompt_dataset {settings.prompt_dataset}: no column {settings.label_key!r} "
            f"(--data.label_key); columns: {sorted(cols)}"
        )
    ds = PromptDataset(data, tokenizer, strategy, input_template=settings.input_template)
    return list(ds.prompts), list(ds.labels)


def template_settings(input_key, input_template, apply_chat_template, tokenizer) -> Dict:
    """The prompt template settings recorded in the store manifest (and compared with the training run's).

    ``chat_template_sha1`` is the sha1 of the tokenizer's chat template when ``apply_chat_template`` is on (None
    otherwise: the template then does not shape the prompt).
    """
    chat = getattr(tokenizer, "chat_template", None) if apply_chat_template else None
    if isinstance(chat, dict):  # named templates: hash them all, in a stable order
        chat = json.dumps(chat, sort_keys=True)
    return {
        "input_key": input_key,
        "input_template": input_template or None,
        "apply_chat_template": bool(apply_chat_template),
        "chat_template_sha1": hashlib.sha1(chat.encode()).hexdigest() if chat else None,
    }


def _unique(prompts: Sequence[str], labels: Sequence) -> tuple[list[str], list, list[str], int]:
    """First occurrence of each prompt (the store has one row per prompt key); returns prompts, labels, keys, dups."""
    seen: Dict[str, int] = {}
    up, ul, keys = [], [], []
    for p, lab in zip(prompts, labels):
        key = prompt_key(p)
        if key in seen:
            if ul[seen[key]] != lab:
                warnings.warn(
                    f"prompt {p[:80]!r} appears twice with different labels; calibrating it once with the first "
                    "label (the store holds one reward set per prompt)",
                    stacklevel=2,
                )
            continue
        seen[key] = len(up)
        up.append(p)
        ul.append(lab)
        keys.append(key)
    return up, ul, keys, len(prompts) - len(up)


# -------------------------------------------------------------------------------------------- generation


def _truncate_prompt(ids: List[int], max_len: int, max_new_tokens: Optional[int]) -> tuple[List[int], int]:
    """OpenRLHF's SingleTurnAgentExecutor budget: max_tokens (dynamic when None), prompt cut from the left."""
    max_tokens = max_new_tokens if max_new_tokens is not None else max(1, max_len - len(ids))
    keep = max_len - max_tokens
    if len(ids) > keep:
        ids = ids[-keep:] if keep > 0 else []
    return ids, max_tokens


class HFGenerator:
    """transformers ``generate`` with OpenRLHF's rollout semantics (vLLM SamplingParams in HF words).

    vLLM's ``top_k=-1`` is HF's ``top_k=0`` (HF would otherwise apply its default top-k of 50); ``min_tokens=1`` is
    ``min_new_tokens=1``. The response keeps the EOS token, as vLLM's ``token_ids`` do, and nothing after it.
    """

    def __init__(self, settings: CalibrateSettings, tokenizer):
        import torch
        from transformers import AutoModelForCausalLM

        self.s = settings
        self.tok = tokenizer
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[settings.param_dtype]
        self.model = AutoModelForCausalLM.from_pretrained(settings.policy, dtype=dtype).to(self.device).eval()
        eos = self.model.generation_config.eos_token_id
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(self.eos_ids))

    def generate(self, prompts: Sequence[str], labels, seed: int, progress: Callable[[int], None]):
        """Per prompt, K token sequences prompt + response (``observation_tokens`` in OpenRLHF's words)."""
        import torch

        torch.manual_seed(seed)
        out = []
        for start in range(0, len(prompts), self.s.batch_size):
            batch = prompts[start : start + self.s.batch_size]
            ids, budgets = [], []
            for p in batch:
                raw = self.tok(p, add_special_tokens=False)["input_ids"]
                cut, max_tokens = _truncate_prompt(raw, self.s.max_len, self.s.max_new_tokens)
                if len(cut) < len(raw):
                    logger.warning("prompt %r is longer than --data.max_len allows; cut from the left", p[:80])
                ids.append(cut)
                budgets.append(max_tokens)
            width = max(len(x) for x in ids)
            input_ids = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(ids), width), dtype=torch.long)
            for i, x in enumerate(ids):
                if x:
                    input_ids[i, width - len(x) :] = torch.tensor(x)
                    mask[i, width - len(x) :] = 1
            sample = self.s.temperature > 0
            gen = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=mask.to(self.device),
                do_sample=sample,
                temperature=self.s.temperature if sample else None,
                top_p=self.s.top_p if sample else None,
                top_k=0 if sample else None,
                min_new_tokens=1,
                max_new_tokens=max(budgets),
                num_return_sequences=self.s.k,
                eos_token_id=sorted(self.eos_ids),
                pad_token_id=self.pad_id,
            ).cpu()
            for i, x in enumerate(ids):
                samples = []
                for j in range(self.s.k):
                    resp = gen[i * self.s.k + j, width:].tolist()[: budgets[i]]
                    for n, t in enumerate(resp):
                        if t in self.eos_ids:
                            resp = resp[: n + 1]
                            break
                    samples.append({"observation_tokens": list(x) + resp, "reward": None})
                out.append(samples)
            progress(len(batch))
        return out

    def close(self):
        del self.model


class VLLMGenerator:
    """OpenRLHF's own rollout engines: ``create_vllm_engines`` + ``RolloutRayActor.generate_responses``.

    Each engine is a Ray actor holding one vLLM engine (tensor parallel inside, placement group over the
    cluster's GPUs); prompts are dealt to the least loaded engine, as OpenRLHF's ``SamplesGenerator`` does. With a
    reward_func .py or HTTP reward, the engines' ``SingleTurnAgentExecutor`` scores each sample exactly as in
    training.
    """

    def __init__(self, settings: CalibrateSettings, tokenizer):
        import ray

        self.s = settings
        self.tok = tokenizer
        self._own_ray = False
        if settings.cpu:
            from openrlhf_infalign.openrlhf import cpu

            cpu.apply()
            if not ray.is_initialized():
                n = settings.num_engines * settings.tensor_parallel_size
                ray.init(**cpu.ray_init_kwargs(num_cpus=max(2, n + 1), num_gpus=n))
                self._own_ray = True
        elif not ray.is_initialized():
            ray.init()  # joins the cluster named by RAY_ADDRESS, else starts a local one
            self._own_ray = True
        from openrlhf.trainer.ray.vllm_engine import create_vllm_engines

        urls = settings.reward_urls if settings.reward_url else None
        self.engines = create_vllm_engines(
            settings.num_engines,
            settings.tensor_parallel_size,
            settings.policy,
            settings.seed,
            False,  # full_determinism
            settings.enable_prefix_caching,
            settings.enforce_eager,
            settings.max_len,
            None,  # shared placement group: the engines own the GPUs here
            settings.gpu_memory_utilization,
            False,  # sleep mode
            None,  # logprobs mode
            remote_rm_url=urls,
        )
        self._load = [0] * len(self.engines)

    def generate(self, prompts: Sequence[str], labels, seed: int, progress: Callable[[int], None]):
        import ray
        from vllm import SamplingParams

        # The same SamplingParams as SamplesGenerator._dispatch_prompts_to_vllm.
        params = SamplingParams(
            temperature=self.s.temperature,
            top_p=self.s.top_p,
            top_k=-1,
            max_tokens=self.s.max_new_tokens,
            min_tokens=1,
            skip_special_tokens=False,
            logprobs=None,
        )
        refs = {}
        for i, (p, lab) in enumerate(zip(prompts, labels)):
            e = min(range(len(self.engines)), key=self._load.__getitem__)
            self._load[e] += self.s.k
            ref = self.engines[e].generate_responses.remote(
                prompt=p,
                label=lab,
                sampling_params=params,
                max_length=self.s.max_len,
                hf_tokenizer=self.tok,
                num_samples=self.s.k,
            )
            refs[ref] = (i, e)
        out: List = [None] * len(prompts)
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                i, e = refs[ref]
                self._load[e] -= self.s.k
                out[i] = [
                    {"observation_tokens": list(r["observation_tokens"]), "reward": r.get("reward")}
                    for r in ray.get(ref)
                ]
                progress(1)
        return out

    def close(self):
        import ray

        for e in self.engines:
            ray.kill(e)
        if self._own_ray:
            ray.shutdown()


# ------------------------------------------------------------------------------------------------ scoring


def _as_float(value) -> float:
    """One reward from what a reward source returned for one sample (float, 0-d/1-element tensor or list)."""
    if hasattr(value, "detach"):
        value = value.detach().float().flatten().cpu().tolist()
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise CalibrationError(f"expected one reward per query, got {len(value)}")
        value = value[0]
    return float(value)


class ExecutorScorer:
    """reward_func .py or HTTP reward through OpenRLHF's ``SingleTurnAgentExecutor`` (its loading and its calls)."""

    def __init__(self, settings: CalibrateSettings, tokenizer):
        from openrlhf.utils.agent import SingleTurnAgentExecutor

        self.s = settings
        self.tok = tokenizer
        self.executor = SingleTurnAgentExecutor(remote_rm_url=settings.reward_urls)
        self.is_func = self.executor.reward_func is not None

    def score(self, prompts, labels, samples) -> List[List[float]]:
        queries, qp, ql = [], [], []
        for p, lab, ss in zip(prompts, labels, samples):
            for smp in ss:
                # The query OpenRLHF sends: prompt + response token ids, decoded with special tokens kept.
                queries.append(self.tok.decode(smp["observation_tokens"], skip_special_tokens=False))
                qp.append(p)
                ql.append(lab)
        rewards: List[float] = []
        if self.is_func:
            infos = asyncio.run(self.executor._fetch_rewards_via_func(queries, qp, ql))
            for i, info in enumerate(infos):
                rewards.append(self._reward_of(info, qp[i]))
        else:
            step = self.s.rm_batch_size * len(self.executor.reward_endpoints)
            for start in range(0, len(queries), step):
                sl = slice(start, start + step)
                infos = asyncio.run(self.executor._fetch_rewards_via_http(queries[sl], qp[sl], ql[sl]))
                for info in infos:
                    vals = info.get("rewards") if isinstance(info, dict) else None
                    if vals is None:
                        raise CalibrationError(f"remote reward {self.s.reward_url}: response has no 'rewards': {info}")
                    rewards.extend(float(v) for v in (vals if isinstance(vals, list) else [vals]))
            if len(rewards) != len(queries):
                raise CalibrationError(
                    f"remote reward {self.s.reward_url} returned {len(rewards)} rewards for {len(queries)} queries"
                )
        out, pos = [], 0
        for ss in samples:
            out.append(rewards[pos : pos + len(ss)])
            pos += len(ss)
        return out

    def _reward_of(self, info, prompt) -> float:
        if not isinstance(info, dict) or info.get("rewards") is None:
            raise CalibrationError(
                f"reward_func {self.s.reward_url} returned {type(info).__name__} without a 'rewards' entry for "
                f"prompt {prompt[:80]!r}; OpenRLHF expects a dict {{'rewards': tensor, ...}}"
            )
        try:
            return _as_float(info["rewards"])
        except (TypeError, ValueError) as e:
            raise CalibrationError(f"reward_func {self.s.reward_url}: bad 'rewards' for prompt {prompt[:80]!r}: {e}")


class RewardModelScorer:
    """A local reward model loaded by OpenRLHF's ``get_llm_for_sequence_regression``, scored in batches."""

    def __init__(self, settings: CalibrateSettings, tokenizer):
        import torch

        from openrlhf_infalign.openrlhf.standins import install_flash_attn

        install_flash_attn()  # no-op where the real flash_attn is installed
        from openrlhf.models import get_llm_for_sequence_regression
        from transformers import AutoConfig

        self.s = settings
        self.tok = tokenizer
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = get_llm_for_sequence_regression(
            settings.reward_model,
            "reward",
            normalize_reward=settings.normalize_reward,
            attn_implementation=settings.attn_implementation,
            param_dtype=settings.param_dtype,
            value_head_prefix=settings.value_head_prefix,
        )
        # OpenRLHF sets mean/std from config.json inside __init__, but transformers 5 builds the model on the meta
        # device and materialises those non-persistent buffers uninitialised. Restore them from the config, so
        # --reward.normalize_enable means (r - mean) / std as intended.
        cfg = AutoConfig.from_pretrained(settings.reward_model, trust_remote_code=True)
        with torch.no_grad():
            self.model.mean.fill_(float(getattr(cfg, "mean", 0.0)))
            self.model.std.fill_(float(getattr(cfg, "std", 1.0)))
        self.model.to(self.device).eval()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def score(self, prompts, labels, samples) -> List[List[float]]:
        import torch

        seqs = [smp["observation_tokens"][: self.s.max_len] for ss in samples for smp in ss]
        order = np.argsort([len(x) for x in seqs], kind="stable")  # similar lengths together: less padding
        flat = np.empty(len(seqs), dtype=np.float64)
        with torch.no_grad():
            for start in range(0, len(seqs), self.s.rm_batch_size):
                idx = order[start : start + self.s.rm_batch_size]
                width = max(len(seqs[i]) for i in idx)
                ids = torch.full((len(idx), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    ids[row, : len(seqs[i])] = torch.tensor(seqs[i])
                    mask[row, : len(seqs[i])] = 1
                r = self.model(ids.to(self.device), mask.to(self.device))
                flat[idx] = r.float().cpu().numpy()
        out, pos = [], 0
        for ss in samples:
            out.append(flat[pos : pos + len(ss)].tolist())
            pos += len(ss)
        return out


# ------------------------------------------------------------------------------------ shards and the run


def _file_fingerprint(path: str) -> Dict:
    """Identity of a model/file for the settings hash: path plus config/weights sizes (not contents: too slow)."""
    p = Path(path)
    if p.is_file():
        return {"path": str(p.resolve()), "sha1": hashlib.sha1(p.read_bytes()).hexdigest()}
    if not p.exists():
        return {"path": path}  # a hub name or URL
    files = {}
    for f in sorted(p.iterdir()):
        if f.suffix in (".json", ".safetensors", ".bin", ".jinja", ".model"):
            files[f.name] = f.stat().st_size
    cfg = p / "config.json"
    return {
        "path": str(p.resolve()),
        "config_sha1": hashlib.sha1(cfg.read_bytes()).hexdigest() if cfg.exists() else None,
        "files": files,
    }


def _canonical_hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_shard(work: Path, index: int, keys, prompts, rewards, meta: Dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "prompt_key": pa.array(keys, pa.string()),
            "prompt": pa.array(prompts, pa.string()),
            "rewards": pa.array([np.asarray(r, dtype=np.float32) for r in rewards], pa.list_(pa.float32())),
        }
    )
    path = work / f"shard-{index:05d}.parquet"
    tmp = work / f".shard-{index:05d}.parquet.tmp-{os.getpid()}"
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    # The shard manifest goes last: a shard counts as done only once both files are in place.
    _atomic_write_bytes(work / f"shard-{index:05d}.json", json.dumps(meta, indent=1).encode())


def _read_shard(work: Path, index: int):
    import pyarrow.parquet as pq

    return pq.read_table(work / f"shard-{index:05d}.parquet")


def _assemble(work: Path, shards, keys: Sequence[str]):
    """Keys, prompts and CSR rewards of all shards in order (columnar: no Python object per reward)."""
    import pyarrow as pa

    tables = []
    for i, sl in shards:
        t = _read_shard(work, i)
        if t.column("prompt_key").to_pylist() != keys[sl]:
            raise CalibrationError(f"{work}/shard-{i:05d}.parquet does not hold the expected prompts; delete {work}")
        tables.append(t)
    table = pa.concat_tables(tables)
    rewards = table.column("rewards").combine_chunks()
    offsets = rewards.offsets.to_numpy().astype(np.int64)
    values = rewards.values.to_numpy(zero_copy_only=False)[offsets[0] : offsets[-1]]
    return list(keys), table.column("prompt").to_pylist(), Ragged(values, offsets - offsets[0])


def _shard_done(work: Path, index: int, settings_hash: str, keys: Sequence[str]) -> bool:
    meta_path = work / f"shard-{index:05d}.json"
    if not meta_path.exists() or not (work / f"shard-{index:05d}.parquet").exists():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (
        meta.get("settings_hash") == settings_hash
        and meta.get("num_prompts") == len(keys)
        and meta.get("first_key") == keys[0]
        and meta.get("last_key") == keys[-1]
    )


def _check_finite(prompts, rewards, source: str) -> None:
    for i, rr in enumerate(rewards):
        arr = np.asarray(rr, dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            raise CalibrationError(
                f"reward source {source} returned {arr[bad[0]]} for sample {int(bad[0])} of prompt "
                f"{prompts[i][:120]!r} (key {prompt_key(prompts[i])}); fix the reward source, rewards must be finite"
            )


def _describe_reward_source(s: CalibrateSettings) -> Dict:
    if s.reward_model:
        return {
            "kind": "reward_model",
            "model": _file_fingerprint(s.reward_model),
            "normalize_reward": s.normalize_reward,
            "value_head_prefix": s.value_head_prefix,
            "param_dtype": s.param_dtype,
        }
    if s.reward_kind == "reward_func":
        return {"kind": "reward_func", "file": _file_fingerprint(s.reward_urls[0])}
    return {"kind": "remote_url", "urls": s.reward_urls}


def _check_max_len(settings: CalibrateSettings) -> None:
    # vLLM refuses (after a minute of engine start-up) and HF degrades past the policy's positions: fail early.
    from transformers import AutoConfig

    try:
        limit = getattr(AutoConfig.from_pretrained(settings.policy, trust_remote_code=True), "max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return
    if limit and settings.max_len > limit:
        raise CalibrationError(
            f"--data.max_len {settings.max_len} exceeds the policy's max_position_embeddings {limit} "
            f"({settings.policy}); pass --data.max_len {limit} or less (and the same to train_ppo_ray)"
        )


def run_calibration(settings: CalibrateSettings, log: Callable[[str], None] = print) -> Dict:
    """Run (or resume) the calibration job; returns a summary dict (also what `infalign calibrate` prints)."""
    from tqdm import tqdm

    t0 = time.time()
    settings.validate()
    out = Path(settings.out)
    work = Path(str(out) + WORK_SUFFIX)

    tokenizer = load_tokenizer(settings)
    _check_max_len(settings)
    all_prompts, all_labels = load_prompts(settings, tokenizer)
    prompts, labels, keys, dups = _unique(all_prompts, all_labels)
    if dups:
        log(f"{dups} duplicate prompt(s) in the dataset: calibrating each distinct prompt once ({len(prompts)})")

    template = template_settings(settings.input_key, settings.input_template, settings.apply_chat_template, tokenizer)
    sampling = {
        "backend": settings.backend,
        "k": settings.k,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "top_k": -1,
        "max_new_tokens": settings.max_new_tokens,
        "min_new_tokens": 1,
        "max_len": settings.max_len,
        "seed": settings.seed,
    }
    policy = _file_fingerprint(settings.policy)
    reward_source = _describe_reward_source(settings)
    dataset = {
        "prompt_dataset": settings.prompt_dataset,
        "prompt_probs": settings.prompt_probs,
        "prompt_split": settings.prompt_split,
        "max_samples": settings.max_samples,
        "label_key": settings.label_key,
        "rows": len(all_prompts),
        "distinct_prompts": len(prompts),
    }
    keys_digest = hashlib.sha1("".join(keys).encode()).hexdigest()
    hashed = {
        "policy": policy,
        "reward_source": reward_source,
        "sampling": sampling,
        "template": template,
        "shard_size": settings.shard_size,
        "prompt_keys_sha1": keys_digest,
    }
    settings_hash = _canonical_hash(hashed)

    # A finished store from these very settings: a re-run is a no-op (and clears a work dir a kill left behind).
    if out.exists() and not settings.overwrite:
        try:
            done_hash = (read_manifest(out).get("calibration") or {}).get("settings_hash")
        except (StoreError, OSError, ValueError):
            done_hash = None
        if done_hash == settings_hash:
            if work.exists():
                shutil.rmtree(work)
            log(f"{out}: already calibrated with these settings ({len(prompts)} prompts); nothing to do")
            return {"out": str(out), "up_to_date": True, "num_prompts": len(prompts), "k": settings.k}
        raise CalibrationError(
            f"{out} already exists (made with other settings or not by `infalign calibrate`); "
            "pass --overwrite to replace it, or choose another --out"
        )

    work_meta = {"settings_hash": settings_hash, "settings": hashed, "num_prompts": len(prompts)}
    if work.exists():
        try:
            old = json.loads((work / "settings.json").read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        if old.get("settings_hash") != settings_hash:
            # Only finished shards are worth protecting; a work dir without any is simply restarted.
            if not settings.overwrite and any(work.glob("shard-*.json")):
                diffs = sorted(
                    k
                    for k in hashed
                    if _canonical_hash(hashed[k]) != _canonical_hash((old.get("settings") or {}).get(k))
                )
                raise CalibrationError(
                    f"work dir {work} holds shards made with different settings (differs in: "
                    f"{', '.join(diffs) or 'unknown'}); rerun with the original flags to resume, or pass --overwrite "
                    "to discard them"
                )
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    for tmp in work.glob(".*.tmp-*"):  # half-written files of a killed run: never read, just clear them
        tmp.unlink(missing_ok=True)
    _atomic_write_bytes(work / "settings.json", json.dumps(work_meta, indent=1, default=str).encode())

    S = settings.shard_size
    shards = [(i, slice(i * S, min((i + 1) * S, len(prompts)))) for i in range(math.ceil(len(prompts) / S))]
    todo = [(i, sl) for i, sl in shards if not _shard_done(work, i, settings_hash, keys[sl])]
    resumed = len(shards) - len(todo)
    if resumed:
        log(f"resuming from {work}: {resumed} of {len(shards)} shard(s) already done")

    fail_after = int(os.environ.get(FAIL_AFTER_ENV, "0") or 0)
    run_id = uuid.uuid4().hex[:12]
    gen_s = score_s = 0.0
    if todo:
        generator = (HFGenerator if settings.backend == "hf" else VLLMGenerator)(settings, tokenizer)
        # With vllm + reward_func/HTTP, OpenRLHF's rollout executors already scored each sample; else score here.
        prescored = settings.backend == "vllm" and not settings.reward_model
        scorer = None
        if not prescored:
            scorer = (RewardModelScorer if settings.reward_model else ExecutorScorer)(settings, tokenizer)
        source = settings.reward_model or settings.reward_url
        done_prompts = sum(sl.stop - sl.start for i, sl in shards) - sum(sl.stop - sl.start for i, sl in todo)
        bar = tqdm(
            total=len(prompts), initial=done_prompts, desc="calibrate", unit="prompt", disable=not settings.progress
        )
        try:
            for n_written, (i, sl) in enumerate(todo):
                if fail_after and n_written >= fail_after:
                    raise RuntimeError(
                        f"{FAIL_AFTER_ENV}={fail_after}: stopping after {n_written} shard(s) (test hook)"
                    )
                sp, sl_labels, sk = prompts[sl], labels[sl], keys[sl]
                shard_t0 = ts = time.time()
                samples = generator.generate(sp, sl_labels, seed=settings.seed * 1_000_003 + i, progress=bar.update)
                gen_s += time.time() - ts
                ts = time.time()
                if prescored:
                    rewards = []
                    for p, ss in zip(sp, samples):
                        if any(smp["reward"] is None for smp in ss):
                            raise CalibrationError(
                                f"reward source {source} gave no reward for a sample of prompt {p[:120]!r}: "
                                "OpenRLHF's rollout executor logs the cause as '[SingleTurnExecutor] Failed to fetch "
                                "reward'"
                            )
                        rewards.append([_as_float(smp["reward"]) for smp in ss])
                else:
                    rewards = scorer.score(sp, sl_labels, samples)
                score_s += time.time() - ts
                _check_finite(sp, rewards, source)
                for p, rr in zip(sp, rewards):
                    if len(rr) != settings.k:
                        raise CalibrationError(
                            f"got {len(rr)} samples instead of --k {settings.k} for prompt {p[:80]!r}"
                        )
                meta = {
                    "format": SHARD_FORMAT,
                    "shard": i,
                    "num_prompts": len(sp),
                    "k": settings.k,
                    "first_key": sk[0],
                    "last_key": sk[-1],
                    "settings_hash": settings_hash,
                    "run_id": run_id,
                    "pid": os.getpid(),
                    "wall_s": round(time.time() - shard_t0, 3),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
                _write_shard(work, i, sk, sp, rewards, meta)
        finally:
            bar.close()
            generator.close()

    # Assemble the store from the shards (all of them, in order) and publish it atomically.
    store_keys, store_prompts, store_rewards = _assemble(work, shards, keys)
    manifest = {
        "policy_model": settings.policy,
        "reward_source": reward_source,
        "sampling": sampling,
        "template": template,
        "dataset": dataset,
        "calibration": {
            "settings_hash": settings_hash,
            "shard_size": settings.shard_size,
            "num_shards": len(shards),
            "policy": policy,
            "tool": "infalign calibrate",
        },
    }
    write_store(
        out,
        store_keys,
        store_rewards,
        prompts=store_prompts if settings.store_prompts else None,
        manifest=manifest,
        overwrite=settings.overwrite,
    )
    shutil.rmtree(work, ignore_errors=True)
    flat = store_rewards.values
    summary = {
        "out": str(out),
        "num_prompts": len(store_keys),
        "k": settings.k,
        "shards_total": len(shards),
        "shards_resumed": resumed,
        "shards_generated": len(todo),
        "duplicate_prompts": dups,
        "reward_mean": float(flat.mean()) if flat.size else None,
        "reward_std": float(flat.std()) if flat.size else None,
        "generate_s": round(gen_s, 3),
        "score_s": round(score_s, 3),
        "wall_s": round(time.time() - t0, 3),
    }
    log(json.dumps(summary))
    return summary


def settings_from_args(args) -> CalibrateSettings:
    """CalibrateSettings from the `infalign calibrate` namespace (dotted dests, as OpenRLHF's flags)."""
    g = lambda name: getattr(args, name)  # noqa: E731
    return CalibrateSettings(
        policy=g("actor.model_name_or_path"),
        prompt_dataset=g("data.prompt_dataset"),
        out=args.out,
        k=args.k,
        prompt_probs=g("data.prompt_probs"),
        prompt_split=g("data.prompt_split"),
        input_key=g("data.input_key"),
        label_key=g("data.label_key"),
        input_template=g("data.input_template"),
        apply_chat_template=g("data.apply_chat_template"),
        max_samples=g("data.max_samples"),
        max_len=g("data.max_len"),
        disable_fast_tokenizer=g("data.disable_fast_tokenizer"),
        reward_model=g("reward.model_name_or_path"),
        reward_url=g("reward.remote_url"),
        normalize_reward=g("reward.normalize_enable"),
        value_head_prefix=g("ds.value_head_prefix"),
        attn_implementation=g("ds.attn_implementation"),
        param_dtype=g("ds.param_dtype"),
        temperature=g("rollout.temperature"),
        top_p=g("rollout.top_p"),
        max_new_tokens=g("rollout.max_new_tokens"),
        backend=args.backend,
        num_engines=g("vllm.num_engines"),
        tensor_parallel_size=g("vllm.tensor_parallel_size"),
        enforce_eager=g("vllm.enforce_eager"),
        enable_prefix_caching=g("vllm.enable_prefix_caching"),
        gpu_memory_utilization=g("vllm.gpu_memory_utilization"),
        cpu=g("infalign.cpu"),
        seed=args.seed,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        rm_batch_size=args.rm_batch_size,
        store_prompts=not args.no_prompts,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
