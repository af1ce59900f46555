"""The K samples per prompt: OpenRLHF's own vLLM rollout engines, or transformers ``generate`` on CPU machines.

Both return, per prompt, K dicts ``{"observation_tokens": prompt + response ids, "reward": ...}`` (OpenRLHF's
rollout words). ``vllm`` is the rollout path of training itself (reward_func / HTTP rewards included, so those
samples come back scored); ``hf`` reproduces its prompt truncation and sampling parameters in this process.
"""

from __future__ import annotations

import logging
from typing import Callable, List, Optional, Sequence

from .settings import CalibrateSettings

logger = logging.getLogger(__name__)

__all__ = ["HFGenerator", "VLLMGenerator", "make_generator", "actor_node_id"]


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
            from openrlhf_infalign.adapter import cpu
            from openrlhf_infalign.adapter.hook import runtime_env

            cpu.apply()
            if not ray.is_initialized():
                n = settings.num_engines * settings.tensor_parallel_size
                node = cpu.ray_init_kwargs(num_cpus=max(2, n + settings.rm_actors + 1), num_gpus=n)
                ray.init(**node, runtime_env=runtime_env(None, cpu_mode=True))
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
        self._engine_of: dict = {}

    def submit(self, prompts: Sequence[str], labels) -> list:
        """One ``generate_responses`` call per prompt, dealt to the least loaded engine; their refs, in order.

        Nothing is fetched here: a reward-model actor can take a ref as its argument, so the samples go from the
        engine to the scorer without passing through this process.
        """
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
        refs = []
        for p, lab in zip(prompts, labels):
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
            refs.append(ref)
            self._engine_of[ref] = e
        return refs

    def done(self, ref) -> None:
        """A submitted prompt has finished: its samples no longer load its engine."""
        self._load[self._engine_of.pop(ref)] -= self.s.k

    def generate(self, prompts: Sequence[str], labels, seed: int, progress: Callable[[int], None]):
        import ray

        refs = self.submit(prompts, labels)
        index = {ref: i for i, ref in enumerate(refs)}
        out: List = [None] * len(prompts)
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                self.done(ref)
                out[index[ref]] = [
                    {"observation_tokens": list(r["observation_tokens"]), "reward": r.get("reward")}
                    for r in ray.get(ref)
                ]
                progress(1)
        return out

    def node_ids(self) -> List[Optional[str]]:
        """The Ray node of each engine (None where Ray's actor table does not say)."""
        return [actor_node_id(e) for e in self.engines]

    def close(self):
        import ray

        for e in self.engines:
            ray.kill(e)
        if self._own_ray:
            ray.shutdown()


def actor_node_id(handle) -> Optional[str]:
    """The node id (hex) a Ray actor runs on, from the GCS actor table."""
    import ray

    try:
        info = ray._private.state.actors(handle._actor_id.hex())
        return (info.get("Address") or {}).get("NodeID")
    except Exception:  # an older/newer Ray without this table layout: placement is only reported, never relied on
        return None


def make_generator(settings: CalibrateSettings, tokenizer):
    """The generator of ``--backend``."""
    return (HFGenerator if settings.backend == "hf" else VLLMGenerator)(settings, tokenizer)
