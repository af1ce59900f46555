"""Scoring the samples with the reward source training uses: a local reward model, an HTTP reward or a reward_func.

Each is OpenRLHF's own code path: ``get_llm_for_sequence_regression`` on prompt + response ids (as its
``RewardModelActor``), or ``SingleTurnAgentExecutor``'s loading and calls (the query it builds: prompt + response
decoded with special tokens kept). Under ``--backend vllm`` that executor already ran inside the rollout engines,
and a local reward model runs in Ray actors over the cluster, fed by the engines (:class:`RewardModelActors`).
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import List

import numpy as np

from openrlhf_infalign.adapter.upstream.reward_loader import restore_normalization
from openrlhf_infalign.store import prompt_key

from .settings import CalibrateSettings, CalibrationError

__all__ = [
    "ExecutorScorer",
    "RewardModelActors",
    "RewardModelScorer",
    "RolloutRewards",
    "make_scorer",
    "check_finite",
]


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

        from openrlhf_infalign.adapter.cpu.standins import install_flash_attn

        install_flash_attn()  # no-op where the real flash_attn is installed
        from openrlhf.models import get_llm_for_sequence_regression

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
        # OpenRLHF's loader leaves mean/std uninitialised under transformers 5; training's loaders restore them too.
        restore_normalization(self.model, settings.reward_model)
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


class _RewardModelWorker:
    """Body of one reward-model actor: the in-process scorer, in a Ray worker (CPU patches first in CPU mode)."""

    def __init__(self, settings: CalibrateSettings, pad_id: int):
        if settings.cpu:
            from openrlhf_infalign.adapter import cpu

            cpu.apply()
        self.scorer = RewardModelScorer(settings, SimpleNamespace(pad_token_id=pad_id))

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def score(self, *generations) -> List[List[float]]:
        """Rewards of each prompt's samples; Ray resolved each engine ref into its samples on this node."""
        return self.scorer.score(None, None, [list(g) for g in generations])


class RewardModelActors:
    """A local reward model in Ray actors spread over the cluster's nodes (``--reward.num_actors``).

    Each prompt's ``generate_responses`` ref goes to an actor as its argument, so scoring starts as soon as that
    prompt's samples exist and the samples travel engine -> actor, never through the driver; the driver only
    collects the floats. Actors are dealt round-robin over the alive nodes (soft affinity: a full node spills).
    """

    def __init__(self, settings: CalibrateSettings, tokenizer):
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.s = settings
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        worker = ray.remote(_RewardModelWorker)
        self.actors = [
            worker.options(
                num_cpus=1,
                num_gpus=settings.rm_actor_gpus,
                scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[i % len(nodes)], soft=True),
            ).remote(settings, pad_id)
            for i in range(settings.rm_actors)
        ]
        # Waits for every model load, so a bad RM path fails here, before any generation.
        self.node_ids = ray.get([a.node_id.remote() for a in self.actors])
        self._load = [0] * len(self.actors)

    def score_refs(self, refs: list, progress) -> List[List[float]]:
        """Rewards for each ref (``generate_responses`` of one prompt), in order; progress(n) as prompts finish."""
        import ray

        per_call = max(1, self.s.rm_batch_size // self.s.k)  # about --rm-batch-size sequences per forward
        calls = {}
        for start in range(0, len(refs), per_call):
            chunk = refs[start : start + per_call]
            a = min(range(len(self.actors)), key=self._load.__getitem__)
            self._load[a] += len(chunk)
            calls[self.actors[a].score.remote(*chunk)] = (start, len(chunk), a)
        out: List = [None] * len(refs)
        pending = list(calls)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                start, n, a = calls[ref]
                out[start : start + n] = ray.get(ref)
                self._load[a] -= n
                progress(n)
        return out

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)


class RolloutRewards:
    """``--backend vllm`` with a reward_func or HTTP reward: the engines' executor scored each sample already."""

    def __init__(self, settings: CalibrateSettings):
        self.s = settings

    def score(self, prompts, labels, samples) -> List[List[float]]:
        rewards = []
        for p, ss in zip(prompts, samples):
            if any(smp["reward"] is None for smp in ss):
                raise CalibrationError(
                    f"reward source {self.s.reward_url} gave no reward for a sample of prompt {p[:120]!r}: "
                    "OpenRLHF's rollout executor logs the cause as '[SingleTurnExecutor] Failed to fetch reward'"
                )
            rewards.append([_as_float(smp["reward"]) for smp in ss])
        return rewards


def make_scorer(settings: CalibrateSettings, tokenizer):
    """The scorer of the reward source (``reward_model`` or ``reward_url``) for the generator of ``--backend``."""
    if settings.reward_model:
        return RewardModelActors(settings, tokenizer) if settings.rm_actors else RewardModelScorer(settings, tokenizer)
    if settings.backend == "vllm":
        return RolloutRewards(settings)
    return ExecutorScorer(settings, tokenizer)


def check_finite(prompts, rewards, source: str) -> None:
    for i, rr in enumerate(rewards):
        arr = np.asarray(rr, dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(arr))
        if bad.size:
            raise CalibrationError(
                f"reward source {source} returned {arr[bad[0]]} for sample {int(bad[0])} of prompt "
                f"{prompts[i][:120]!r} (key {prompt_key(prompts[i])}); fix the reward source, rewards must be finite"
            )
