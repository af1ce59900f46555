"""Exact evaluation of a policy whose responses can all be listed: KL(pi || pi_ref) and win rates, no sampling.

With a small vocabulary and a cap of L new tokens (the word-pair task: 76 tokens, L = 2), every response is a token
sequence of length L, or shorter when it ends with the end-of-sequence token. This module lists them all, gets every
response's log-probability under a saved checkpoint with transformers (one forward pass per unfinished prefix,
batched over prompts), scores every response with the run's own ``reward_func`` on the very query OpenRLHF builds
(prompt tokens + response tokens, decoded with special tokens kept), and from those computes, per prompt:

* the law vLLM samples from. OpenRLHF 0.11.2 always passes ``min_tokens=1``, so EOS is masked at the first position
  and the rest renormalised: pi'(y) = pi(y) / (1 - pi(EOS first)). KL(pi' || pi_ref') is the KL of the policy as
  it is sampled, the study's KL axis;
* the hook's KL target: the k1 estimate of the evaluation hook averages log pi(y) - log pi_ref(y) with the actor's
  and reference's own (unmasked) log-probs over samples of pi', i.e. it estimates
  sum_y pi'(y) (log pi(y) - log pi_ref(y)) = KL(pi' || pi_ref') - log(1 - p_eos) + log(1 - q_eos)
  (p_eos, q_eos: the masked first-token EOS mass of policy and base). The two differ when a run moves mass onto the
  EOS it can never sample (docs/study.md);
* standard, Best-of-N and Worst-of-N win rates against the base policy (ties 1/2), from the two reward laws: the
  best of N policy responses has CDF F_pi^N, the best of N base responses F_ref^N;
* the expectation of the hook's win-rate estimator given its reference store (the K stored base rewards drawn N at
  a time without replacement in place of the base law), which splits the hook's error into the store's and the
  eval samples'.

``python -m openrlhf_infalign.studies.exact --base POLICY --reward-func F.py --prompts eval.jsonl RUN [RUN ...]``
writes ``<RUN>/infalign_eval_exact.jsonl``: one record per checkpoint (``--ckpt.save_hf`` at every evaluation, and
step 0 = the base policy) in the evaluation log's schema (``evallog.py``; stderr 0, ``kl_estimator`` "exact"),
with the hook's record of the same step and its z-scores against the exact values under ``hook``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import itertools
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from openrlhf_infalign.evallog import EVAL_LOG, EXACT_LOG, load_eval_log
from openrlhf_infalign.files import atomic_open

__all__ = [
    "EXACT_LOG",
    "Responses",
    "enumerate_responses",
    "Policy",
    "kl",
    "win_rates",
    "win_rates_vs_store",
    "reward_matrix",
    "evaluate_runs",
    "main",
]


NS = (1, 2, 4, 8)


@dataclass
class Responses:
    """Every response of at most ``max_new_tokens`` tokens the sampler can give, over ``vocab`` tokens.

    ``tokens[s]``: response s; ``prefixes[l]``: the unfinished prefixes of length l whose next token is scored;
    ``index[l]``: (response, prefix, token) index arrays of the l-th token of every response that has one.
    """

    tokens: List[tuple]
    prefixes: List[List[tuple]]
    index: List[tuple]
    eos_id: int
    min_new_tokens: int


def enumerate_responses(vocab: int, max_new_tokens: int, eos_id: int, min_new_tokens: int = 1) -> Responses:
    """All responses: sequences ending at their first EOS or at the cap, EOS never before ``min_new_tokens``."""
    if vocab ** max_new_tokens > 2_000_000:
        raise ValueError(f"{vocab}^{max_new_tokens} responses are too many to list: exact evaluation needs a short cap")
    prefixes: List[List[tuple]] = [[()]]
    for level in range(1, max_new_tokens):
        prefixes.append([p + (t,) for p in prefixes[level - 1] for t in range(vocab) if t != eos_id])
    where = [{p: i for i, p in enumerate(level)} for level in prefixes]
    tokens, rows = [], [[] for _ in range(max_new_tokens)]
    for length in range(1, max_new_tokens + 1):
        for seq in itertools.product(range(vocab), repeat=length):
            ends_early = length < max_new_tokens
            if eos_id in seq[:-1] or (ends_early and seq[-1] != eos_id):
                continue
            if seq[-1] == eos_id and length <= min_new_tokens:  # vLLM's min_tokens masks EOS there
                continue
            for level in range(length):
                rows[level].append((len(tokens), where[level][seq[:level]], seq[level]))
            tokens.append(seq)
    index = [tuple(np.array(c, dtype=np.int64) for c in zip(*r)) for r in rows]
    return Responses(tokens, prefixes, index, eos_id, min_new_tokens)


class Policy:
    """Log-probabilities of every response under checkpoints of one architecture (the model object is reused)."""

    def __init__(self, model_dir, prompt_ids: Sequence[Sequence[int]], responses: Responses):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.prompt_ids = [list(x) for x in prompt_ids]
        self.responses = responses
        self.vocab = self.model.config.vocab_size

    def load(self, model_dir) -> None:
        from safetensors.torch import load_file

        state = load_file(str(Path(model_dir) / "model.safetensors"))
        missing, unexpected = self.model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        if unexpected or [m for m in missing if "rotary" not in m]:
            raise ValueError(f"{model_dir}: checkpoint does not match the base model ({missing or unexpected})")

    def logprobs(self) -> tuple:
        """(sampling, model) log-probs, float64 [prompts, responses]: the law vLLM samples from (EOS masked before
        min_new_tokens tokens, renormalised) and the model's own, which the actor and reference return."""
        torch, r = self.torch, self.responses
        levels = []
        with torch.no_grad():
            for level in r.prefixes:
                rows = [x + list(p) for x in self.prompt_ids for p in level]
                out = np.empty((len(rows), self.vocab))
                for length, idx in _by_length(rows).items():
                    logits = self.model(input_ids=torch.tensor([rows[i] for i in idx])).logits[:, -1]
                    out[idx] = torch.log_softmax(logits.double(), -1).numpy()
                levels.append(out.reshape(len(self.prompt_ids), len(level), self.vocab))
        sampling = np.zeros((len(self.prompt_ids), len(r.tokens)))
        model = np.zeros_like(sampling)
        for level, lp in enumerate(levels):
            masked = lp
            if level < r.min_new_tokens:
                masked = lp.copy()
                masked[..., r.eos_id] = -np.inf
                masked -= np.logaddexp.reduce(masked, axis=-1, keepdims=True)
            resp, prefix, token = r.index[level]
            sampling[:, resp] += masked[:, prefix, token]
            model[:, resp] += lp[:, prefix, token]
        return sampling, model


def _by_length(rows) -> Dict[int, np.ndarray]:
    groups: Dict[int, List[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(len(row), []).append(i)
    return {k: np.array(v) for k, v in groups.items()}


def load_reward_func(path):
    spec = importlib.util.spec_from_file_location("infalign_exact_reward", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reward_func


def reward_matrix(reward_func, tokenizer, prompts: Sequence[str], prompt_ids, responses: Responses) -> np.ndarray:
    """Every response's reward from ``reward_func`` on the query OpenRLHF builds, float64 [prompts, responses].

    Rounded to float32: rewards travel as float32 tensors through OpenRLHF and the store, and ties are judged there.
    """
    out = np.empty((len(prompts), len(responses.tokens)))
    for p, (prompt, ids) in enumerate(zip(prompts, prompt_ids)):
        queries = [tokenizer.decode(list(ids) + list(r), skip_special_tokens=False) for r in responses.tokens]
        rewards = reward_func(queries, [prompt] * len(queries), [None] * len(queries))["rewards"]
        out[p] = np.asarray(rewards, dtype=np.float32)
    return out


def kl(logp: np.ndarray, ref_logp: np.ndarray, weights_logp: Optional[np.ndarray] = None) -> np.ndarray:
    """Per prompt sum_y w(y) (logp(y) - ref_logp(y)), w = exp(weights_logp) (default exp(logp): KL(pi || pi_ref))."""
    w = np.exp(logp if weights_logp is None else weights_logp)
    diff = np.where(w > 0, logp - ref_logp, 0.0)
    return np.sum(w * diff, axis=1)


def _law(prob: np.ndarray, rewards: np.ndarray):
    """(distinct reward values, CDF at each value boundary [0, F(v_1), ..., 1]) of a discrete reward law."""
    values, inverse = np.unique(rewards, return_inverse=True)
    mass = np.bincount(inverse, weights=prob, minlength=values.size)
    cdf = np.concatenate([[0.0], np.cumsum(mass)])
    return values, cdf / cdf[-1]


def _beats(cdf_a, cdf_b_best, cdf_b_worst, n: int) -> tuple:
    """P(best of n from a beats b's best) and P(worst of n from a beats b's worst), ties 1/2, from CDFs on one grid.

    cdf_b_best / cdf_b_worst: P(b's best <= v) / P(b's worst <= v) at the grid's boundaries."""
    best_a = cdf_a[1:] ** n - cdf_a[:-1] ** n
    bon = np.sum(best_a * (cdf_b_best[:-1] + 0.5 * np.diff(cdf_b_best)))
    worst_a = (1 - cdf_a[:-1]) ** n - (1 - cdf_a[1:]) ** n
    won = np.sum(worst_a * (cdf_b_worst[:-1] + 0.5 * np.diff(cdf_b_worst)))
    return float(bon), float(won)


def win_rates(logp: np.ndarray, ref_logp: np.ndarray, rewards: np.ndarray, ns=NS) -> Dict[str, np.ndarray]:
    """Exact win rates of the policy vs the base per prompt: {'bon': [len(ns), P], 'won': [len(ns), P]}."""
    P = logp.shape[0]
    out = {"bon": np.empty((len(ns), P)), "won": np.empty((len(ns), P))}
    for p in range(P):
        _, ca = _law(np.exp(logp[p]), rewards[p])
        _, cb = _law(np.exp(ref_logp[p]), rewards[p])
        for i, n in enumerate(ns):
            out["bon"][i, p], out["won"][i, p] = _beats(ca, cb**n, 1 - (1 - cb) ** n, n)
    return out


def win_rates_vs_store(logp: np.ndarray, rewards: np.ndarray, store: Sequence[np.ndarray], ns=NS):
    """Per prompt expectation of the hook's estimator given the stored base rewards of each prompt.

    The policy side is the exact law (its eval samples are i.i.d.); the base side is the store's K rewards, of which
    the U-statistic takes N without replacement: P(their best <= v) = C(j, N) / C(K, N) with j stored rewards <= v.
    """
    from scipy.special import comb

    P = logp.shape[0]
    out = {"bon": np.empty((len(ns), P)), "won": np.empty((len(ns), P))}
    for p in range(P):
        ref = np.asarray(store[p], dtype=np.float32).astype(np.float64)
        both = np.concatenate([rewards[p], ref])
        _, ca = _law(np.concatenate([np.exp(logp[p]), np.zeros(ref.size)]), both)
        _, cb = _law(np.concatenate([np.zeros(rewards[p].size), np.ones(ref.size)]), both)
        k = ref.size
        j = np.rint(cb * k)
        for i, n in enumerate(ns):
            best = comb(j, n) / comb(k, n)
            worst = 1 - comb(k - j, n) / comb(k, n)
            out["bon"][i, p], out["won"][i, p] = _beats(ca, best, worst, n)
    return out


# ── evaluating runs ──


def _checkpoints(run: Path) -> List[tuple]:
    """(step, directory) of a run's HF checkpoints (``--ckpt.save_hf``: <ckpt.path>/global_step<N>_hf)."""
    found = []
    for d in run.glob("**/global_step*_hf"):
        m = re.fullmatch(r"global_step(\d+)_hf", d.name)
        if m and (d / "model.safetensors").is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def _stat(v: float) -> dict:
    return {"win_rate": float(v), "stderr": 0.0}


def _record(step: int, klv: float, w: Dict[str, np.ndarray], hook: Optional[dict], extra: dict, ns=NS) -> dict:
    per = {kind: {str(n): {**_stat(w[kind][i].mean()), "num_prompts": int(w[kind].shape[1])} for i, n in enumerate(ns)}
           for kind in ("bon", "won")}
    record = dict(hook or {})
    for key in ("standard", "bon", "won", "kl", "kl_estimator", "kl_reason", "hook", "time"):
        record.pop(key, None)
    record.update(
        step=int(step),
        kl=float(klv),
        kl_estimator="exact",
        kl_reason=None,
        standard=_stat(w["bon"][0].mean()),
        bon=per["bon"],
        won=per["won"],
        num_prompts=int(w["bon"].shape[1]),
        **extra,
    )
    return record


def _hook_check(hook: dict, exact: Dict[str, np.ndarray], given_store: Optional[Dict[str, np.ndarray]],
                kl_target: float, ns=NS) -> dict:
    """The hook's estimates at this step against the exact values: z = (estimate - exact) / stated stderr."""
    out = {"kl": hook.get("kl"), "kl_target": kl_target, "kl_stderr": hook.get("kl_stderr")}
    if hook.get("kl") is not None and hook.get("kl_stderr"):
        out["z_kl"] = (hook["kl"] - kl_target) / hook["kl_stderr"]
    z, z_sampling = {}, {}
    for kind in ("bon", "won"):
        for i, n in enumerate(ns):
            stat = (hook.get(kind) or {}).get(str(n))
            if not stat or not stat.get("stderr"):
                continue
            name = f"{kind}_{n}"
            z[name] = (stat["win_rate"] - exact[kind][i].mean()) / stat["stderr"]
            if given_store is not None:
                z_sampling[name] = (stat["win_rate"] - given_store[kind][i].mean()) / stat["stderr"]
                out[f"{name}_given_store"] = float(given_store[kind][i].mean())
    out["z"], out["z_given_store"] = z, z_sampling
    return out


class Task:
    """What every run of one study shares: prompts, responses, base law and rewards (computed once, cached)."""

    def __init__(self, base: Path, reward_func: Path, prompts: Sequence[str], template: str, max_new_tokens: int,
                 store=None, cache: Optional[Path] = None):
        from transformers import AutoTokenizer

        self.base, self.prompts = Path(base), list(prompts)
        tok = AutoTokenizer.from_pretrained(base)
        self.templated = [template.format(p) for p in prompts]
        ids = [tok(t, add_special_tokens=False)["input_ids"] for t in self.templated]
        self.responses = enumerate_responses(len(tok), max_new_tokens, tok.eos_token_id, min_new_tokens=1)
        self.policy = Policy(base, ids, self.responses)
        key = hashlib.sha1(
            json.dumps([str(self.base.resolve()), str(Path(reward_func).resolve()), self.templated, max_new_tokens])
            .encode()
        ).hexdigest()
        if cache is not None and cache.is_file() and np.load(cache)["key"].item() == key:
            z = np.load(cache)
            self.ref_sampling, self.ref_model, self.rewards = z["ref_sampling"], z["ref_model"], z["rewards"]
        else:
            self.ref_sampling, self.ref_model = self.policy.logprobs()
            self.rewards = reward_matrix(load_reward_func(reward_func), tok, self.templated, ids, self.responses)
            if cache is not None:
                with atomic_open(cache, "wb", encoding=None) as f:
                    np.savez(f, key=np.array(key), ref_sampling=self.ref_sampling, ref_model=self.ref_model,
                             rewards=self.rewards)
        self.store_rewards = None
        if store is not None:
            from openrlhf_infalign.store.reader import ReferenceStore

            st = ReferenceStore.open(store, warn_small_k=False)
            rows = st.rows_for_prompts(self.templated, on_missing="raw")
            if (rows < 0).any():
                raise ValueError(f"{(rows < 0).sum()} eval prompt(s) are not in the store {store}")
            self.store_rewards = [np.asarray(st.rewards_for_row(r), dtype=np.float64) for r in rows.tolist()]

    def evaluate(self, checkpoint: Optional[Path]) -> dict:
        """Exact KL, hook KL target and win rates (per prompt) of a checkpoint (None: the base policy)."""
        if checkpoint is None:
            logp, model = self.ref_sampling, self.ref_model
        else:
            self.policy.load(checkpoint)
            logp, model = self.policy.logprobs()
        out = {
            "kl": float(kl(logp, self.ref_sampling).mean()),
            "kl_target": float(kl(model, self.ref_model, weights_logp=logp).mean()),
            "win": win_rates(logp, self.ref_sampling, self.rewards),
        }
        if self.store_rewards is not None:
            out["given_store"] = win_rates_vs_store(logp, self.rewards, self.store_rewards)
        return out


def evaluate_runs(task: Task, runs: Sequence[Path], progress: bool = True) -> Dict[str, List[dict]]:
    """Exact records of every checkpoint of every run, written to ``<run>/infalign_eval_exact.jsonl``."""
    base = task.evaluate(None)
    result = {}
    for run in runs:
        run = Path(run)
        hooks = {}
        if (run / EVAL_LOG).is_file():
            hooks = {r["step"]: r for r in load_eval_log(run / EVAL_LOG)}
        records = []
        for step, ckpt in [(0, None)] + _checkpoints(run):
            ev = base if ckpt is None else task.evaluate(ckpt)
            hook = hooks.get(step)
            extra = {"kl_hook_target": ev["kl_target"]}
            if hook is not None:
                extra["hook"] = _hook_check(hook, ev["win"], ev.get("given_store"), ev["kl_target"])
            records.append(_record(step, ev["kl"], ev["win"], hook, extra))
            if progress:
                print(f"[exact] {run.name} step {step}: KL {ev['kl']:.4f}, BoN_4 {ev['win']['bon'][2].mean():.4f}, "
                      f"WoN_4 {ev['win']['won'][2].mean():.4f}", flush=True)
        with atomic_open(run / EXACT_LOG) as f:
            for r in records:
                f.write(json.dumps(r, allow_nan=False) + "\n")
        result[str(run)] = records
    return result


def theory_tilt(transform: str, kl_value: float, inference: str = "bon:4", bins: int = 16) -> Optional[List[float]]:
    """The theory's optimum for ``transform`` at KL ``kl_value`` as the same profile: bin means of log g(u)."""
    from openrlhf_infalign.core import theory

    if not transform or kl_value <= 0:
        return None
    if transform == "optimal":  # the exact optimum of the inference procedure at this KL
        transform = theory.optimal_transform_for_kl(inference, kl_value)[0]
    u, g = theory.optimum_density(transform, theory.beta_for_kl(transform, kl_value))
    # the theory's grid is clustered at the ends: bin means over evenly spaced points
    even = (np.arange(bins * 64) + 0.5) / (bins * 64)
    logg = np.interp(even, u, np.log(np.maximum(g, 1e-300)))
    return logg.reshape(bins, 64).mean(axis=1).tolist()


def tilt_at_kl(task: Task, runs: Sequence[Path], target: float, bins: int = 16) -> Dict[str, dict]:
    """Per run: its tilt profile at the checkpoint whose exact KL is nearest ``target``, beside the theory's."""
    result = {}
    for run in runs:
        run = Path(run)
        records = [r for r in load_eval_log(run / EXACT_LOG) if r["step"] > 0]
        ckpts = dict(_checkpoints(run))
        records = [r for r in records if r["step"] in ckpts]
        if not records:
            continue
        r = min(records, key=lambda r: abs(r["kl"] - target))
        task.policy.load(ckpts[r["step"]])
        logp, _ = task.policy.logprobs()
        profile = tilt_profile(logp, task.ref_sampling, task.rewards, bins)
        result[str(run)] = {
            "step": r["step"],
            "kl": r["kl"],
            "transform": r.get("transform"),
            "profile": [None if not np.isfinite(x) else float(x) for x in profile],
            "theory": theory_tilt(r.get("transform"), r["kl"], r.get("inference") or "bon:4", bins),
        }
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m openrlhf_infalign.studies.exact", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (--ckpt.output_dir, checkpoints inside)")
    p.add_argument("--base", required=True, help="the base policy (the run's --actor.model_name_or_path)")
    p.add_argument("--reward-func", required=True, help="the run's reward_func .py")
    p.add_argument("--prompts", required=True, help="the eval prompts (JSONL)")
    p.add_argument("--input-key", default="input", help="--data.input_key")
    p.add_argument("--template", default="Q : {} A :", help="--data.input_template")
    p.add_argument("--max-new-tokens", type=int, default=2, help="--rollout.max_new_tokens")
    p.add_argument("--store", default=None, help="the eval store: the hook's error split into store and sampling")
    p.add_argument("--cache", default=None, help="file caching the base law and rewards across invocations")
    p.add_argument("--tilt-kl", type=float, default=None, help="instead: each run's tilt profile at this KL (JSON)")
    p.add_argument("--tilt-out", default=None, help="with --tilt-kl: the JSON file to write")
    a = p.parse_args(argv)
    prompts = [json.loads(line)[a.input_key] for line in Path(a.prompts).read_text().splitlines() if line.strip()]
    task = Task(Path(a.base), Path(a.reward_func), prompts, a.template, a.max_new_tokens, a.store,
                Path(a.cache) if a.cache else None)
    if a.tilt_kl is not None:
        result = tilt_at_kl(task, [Path(r) for r in a.runs], a.tilt_kl)
        with atomic_open(Path(a.tilt_out)) as f:
            json.dump({"target_kl": a.tilt_kl, "runs": result}, f, indent=2)
        return 0
    evaluate_runs(task, [Path(r) for r in a.runs])
    return 0



def tilt_profile(logp: np.ndarray, ref_logp: np.ndarray, rewards: np.ndarray, bins: int = 16) -> np.ndarray:
    """How the policy reweights the base by calibrated reward: per bin of the base quantile u, the base-weighted mean
    of log pi(y) / pi_ref(y) over responses in that bin, averaged over prompts ([bins]; NaN where a bin is empty).

    The theory's optimum is a tilt by Phi(u) / beta, a function of u alone; this is the run's own tilt on that axis.
    """
    out = np.zeros(bins)
    weight = np.zeros(bins)
    for p in range(logp.shape[0]):
        q = np.exp(ref_logp[p])
        values, inverse = np.unique(rewards[p], return_inverse=True)
        mass = np.bincount(inverse, weights=q, minlength=values.size)
        below = np.concatenate([[0.0], np.cumsum(mass)])[:-1]
        u = (below + 0.5 * mass)[inverse] / mass.sum()  # mid-rank base quantile of each response
        b = np.minimum((u * bins).astype(int), bins - 1)
        out += np.bincount(b, weights=q * (logp[p] - ref_logp[p]), minlength=bins)
        weight += np.bincount(b, weights=q, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return out / weight


if __name__ == "__main__":
    sys.exit(main())
