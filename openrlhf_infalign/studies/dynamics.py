"""The study's optimisation, without the language model: does finite-sample PPO reach the plan in the study's steps?

A diagnostic for ``make study``. The policy is a softmax over M quantile cells of the base policy (cell i holds
base quantiles [i/M, (i+1)/M), base probability 1/M), shared by all prompts as the tiny LM's policy is (it learns
"answer better", not a table per prompt). Every prompt has its own store of K base rewards, so a sample's
calibrated reward is its mid-rank among that prompt's K stored quantiles, transformed as the arm's wrapper does.
Each step is the study's: a batch of prompts (passes over the shuffled train prompts), n samples each, the k1 KL
in the reward with the arm's coefficient, the group-mean baseline and the batch whitening of
``reinforce_baseline`` (OpenRLHF 0.11.2 ``compute_advantages_and_returns``), then PPO's clipped loss in
``train_batch``-sized updates with Adam. KL(pi || base) and the BoN_N / WoN_N win rates against the base are
exact sums over the cells, so every difference between arms is optimisation, not evaluation noise.

``--policy pairs`` replays the word-pair task itself (``demo/pairs.py``) instead: an autoregressive TABULAR policy
over its 16 x 16 answers, log pi(w1, w2) = logsoftmax(theta1)[w1] + logsoftmax(theta2[w1])[w2], shared by all
prompts (store- and topic-blind), the base uniform over the 256 pairs (the fitted LM's is within 0.03 nats of it),
the task's reward tables on the study's prompts, each train prompt with its own store of K uniform base pairs,
per-token k1 KL in the returns (returns-to-go: token 1 carries both tokens' k1, token 2 its own), the group mean and
the token whitening of ``reinforce_baseline``, PPO's clip per token, Adam with the study's warmup and gradient
clipping; exact KL and win rates over the held-out eval prompts. ``--policy pairs-flat`` (one softmax over the 256
pairs, one token) and ``--policy pairs-product`` (theta2 shared by every first word: the second word blind to the
first) take the factorisation out or push it to its extreme (docs/replay.md).

``python -m openrlhf_infalign.studies.dynamics --plans study_out/plans.json --out study_out/dynamics``: JSON and a
figure (win rate vs KL per arm, the study's 18 steps and a long run, seed means).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from openrlhf_infalign import options
from openrlhf_infalign.core.direct import group_rewards
from openrlhf_infalign.core.transforms import parse_transform
from openrlhf_infalign.files import save_figure, write_json
from openrlhf_infalign.options import option, parse_floats

__all__ = ["Setting", "exact_metrics", "simulate", "PairTask", "pair_task", "pair_metrics", "simulate_pairs", "main"]


@dataclass
class Setting:
    prompts: int = 192
    k: int = 32
    cells: int = 256
    rollout_batch: int = 32
    n_samples: int = 8
    train_batch: int = 64
    lr: float = 0.05
    eps_clip: float = 0.2
    n_win: int = 4
    # the pair replay only (the cells policy has neither): OpenRLHF's actor lr warmup and gradient clipping
    warmup_ratio: float = 0.03
    max_norm: float = 1.0


def exact_metrics(logits: np.ndarray, n: int = 4) -> Dict[str, float]:
    """KL(pi || uniform base), standard, BoN_n and WoN_n win rates against the base, exactly over the cells.

    A sample sits uniformly inside its cell, so P(it beats the best of n base samples) averaged over cell i is
    ((i+1)^(n+1) - i^(n+1)) / ((n+1) M^n), and symmetrically for the worst of n.
    """
    m = logits.size
    p = np.exp(logits - logits.max())
    p /= p.sum()
    kl = float(np.sum(p * np.log(np.maximum(p * m, 1e-300))))
    edges = np.arange(m + 1) / m
    cdf = np.concatenate([[0.0], np.cumsum(p)])
    cdf[-1] = 1.0

    def beat_best(nn):  # mean over each cell of P(u > max of nn base draws) = u^nn
        return (edges[1:] ** (nn + 1) - edges[:-1] ** (nn + 1)) * m / (nn + 1)

    def beat_worst(nn):  # mean over each cell of P(u > min of nn base draws) = 1 - (1 - u)^nn
        return 1 - ((1 - edges[:-1]) ** (nn + 1) - (1 - edges[1:]) ** (nn + 1)) * m / (nn + 1)

    best = np.diff(cdf**n)  # P(the best of n policy samples lies in cell i)
    worst = (1 - cdf[:-1]) ** n - (1 - cdf[1:]) ** n  # P(the worst of n policy samples lies in cell i)
    return {
        "kl": kl,
        "standard": float(np.sum(p * beat_best(1))),
        "bon": float(np.sum(best * beat_best(n))),
        "won": float(np.sum(worst * beat_worst(n))),
    }


def simulate(transform, kl_coef: float, steps: int, seed: int, s: Setting, eval_every: int = 3,
             keep_tables: bool = False) -> List[dict]:
    """One run: the trajectory [{step, kl, standard, bon, won}] every ``eval_every`` steps (and step 0); with
    ``keep_tables`` each record also holds ``logits``. ``transform``: a spec or a callable on u."""
    rng = np.random.default_rng(seed)
    phi = reward_fn(transform) if isinstance(transform, str) else transform
    stores = np.sort(rng.random((s.prompts, s.k)), axis=1)  # each prompt's K base quantiles
    size = s.cells
    logits = np.zeros(size)
    m1, m2 = np.zeros(size), np.zeros(size)  # Adam moments (OpenRLHF's betas 0.9, 0.95)
    t_adam = 0
    order = rng.permutation(s.prompts)
    pos = 0
    out = [{"step": 0, **_metrics(logits, s)}]
    if keep_tables:
        out[0]["logits"] = logits.copy()
    for step in range(1, steps + 1):
        if pos + s.rollout_batch > s.prompts:
            order, pos = rng.permutation(s.prompts), 0
        batch = order[pos : pos + s.rollout_batch]
        pos += s.rollout_batch
        logp = logits - np.logaddexp.reduce(logits)
        resp = rng.choice(size, size=(s.rollout_batch, s.n_samples), p=np.exp(logp))
        u = (resp + rng.random(resp.shape)) / s.cells  # the sample's base quantile
        st = stores[batch]
        less = (st[:, None, :] < u[:, :, None]).sum(-1)
        reward = phi(less / s.k)
        kl = logp[resp] + np.log(size)  # k1: log pi(y) - log base(y)
        adv = reward - reward.mean(-1, keepdims=True) - kl_coef * kl
        adv = (adv - adv.mean()) / max(adv.std(), 1e-4)
        flat_cells, flat_adv, old_logp = resp.ravel(), adv.ravel(), logp[resp].ravel()
        idx = rng.permutation(flat_cells.size)
        for start in range(0, idx.size, s.train_batch):
            mb = idx[start : start + s.train_batch]
            c, a = flat_cells[mb], flat_adv[mb]
            cur = logits - np.logaddexp.reduce(logits)
            ratio = np.exp(cur[c] - old_logp[mb])
            # d(-min(ratio a, clip(ratio) a))/d logit: active only where the unclipped term is the minimum
            active = ~(((a > 0) & (ratio > 1 + s.eps_clip)) | ((a < 0) & (ratio < 1 - s.eps_clip)))
            w = -(a * ratio * active) / mb.size  # d loss / d log pi(c)
            grad = np.bincount(c, weights=w, minlength=size) - w.sum() * np.exp(cur)
            t_adam += 1
            m1 = 0.9 * m1 + 0.1 * grad
            m2 = 0.95 * m2 + 0.05 * grad**2
            logits -= s.lr * (m1 / (1 - 0.9**t_adam)) / (np.sqrt(m2 / (1 - 0.95**t_adam)) + 1e-8)
        if step % eval_every == 0:
            out.append({"step": step, **_metrics(logits, s)})
            if keep_tables:
                out[-1]["logits"] = logits.copy()
    return out


def _metrics(logits: np.ndarray, s: Setting) -> Dict[str, float]:
    return exact_metrics(logits, s.n_win)


# ── the word-pair task on a tabular policy (--policy pairs) ──

PAIR_POLICIES = ("pairs", "pairs-flat", "pairs-product")
Q = 16  # quality words (first token) and thing words (second token) of demo/pairs.py


@dataclass
class PairTask:
    """The study's prompts and the task's rewards: ``train`` [P, 16, 16] and ``eval`` [E, 256] (float32 values).

    For the exact metrics the eval rewards are grouped once: per prompt its distinct values ascending (float32
    rewards can tie), flattened over prompts (``group_of`` [E, 256] -> group, ``group_prompt`` [G], ``group_count``).
    """

    train: np.ndarray
    eval: np.ndarray

    def __post_init__(self):
        e, m = self.eval.shape
        groups, prompt_of, start = [], [], 0
        self.group_of = np.empty((e, m), dtype=np.int64)
        for p in range(e):
            values, inverse = np.unique(self.eval[p], return_inverse=True)
            self.group_of[p] = start + inverse
            prompt_of.append(np.full(values.size, p))
            start += values.size
        self.group_prompt = np.concatenate(prompt_of)
        self.group_count = np.bincount(self.group_of.ravel(), minlength=start).astype(np.float64)
        self.first_group = np.searchsorted(self.group_prompt, np.arange(e))


def pair_rewards(prompts: Sequence[str], reward_seed: int = 7) -> np.ndarray:
    """[P, 16, 16] rewards of every (quality, thing) answer, the task's formula (``demo/pairs.py``) at float32."""
    from openrlhf_infalign.demo import pairs

    t = {k: np.asarray(v, dtype=np.float64) for k, v in pairs.reward_tables(reward_seed).items()}
    adjs = {w: i for i, w in enumerate(pairs.TOPIC_ADJECTIVES)}
    nouns = {w: i for i, w in enumerate(pairs.TOPIC_NOUNS)}
    out = np.empty((len(prompts), Q, Q))
    for p, text in enumerate(prompts):
        words = text.split()
        a = next(adjs[w] for w in words if w in adjs)
        n = next(nouns[w] for w in words if w in nouns)
        q = (t["g1"] + t["a"][a])[:, None] + (t["g2"] + t["b"][n])[None, :] + t["c"]
        out[p] = t["s_adj"][a] * t["s_noun"][n] * q + t["o_adj"][a] + t["o_noun"][n]
    return out.astype(np.float32).astype(np.float64)


def pair_task(prompts_dir: Optional[str] = None, train_prompts: int = 192, eval_prompts: int = 64, seed: int = 0,
              reward_seed: int = 7) -> PairTask:
    """The study's train and eval prompts: read from ``<prompts_dir>/{train,eval}.jsonl`` (``--prompts-dir``), or
    made as the study makes them (``demo/pipeline.write_prompts``: make_prompts(train + eval, seed + 1))."""
    if prompts_dir:
        def read(name):
            lines = (Path(prompts_dir) / name).read_text().splitlines()
            return [json.loads(x)["input"] for x in lines if x.strip()]

        train, evals = read("train.jsonl"), read("eval.jsonl")
    else:
        from openrlhf_infalign.demo import pairs

        made = pairs.make_prompts(train_prompts + eval_prompts, seed=seed + 1)
        train, evals = made[:train_prompts], made[train_prompts:]
    return PairTask(pair_rewards(train, reward_seed), pair_rewards(evals, reward_seed).reshape(len(evals), Q * Q))


def pair_metrics(logp: np.ndarray, task: PairTask, n: int = 4) -> Dict[str, float]:
    """Exact KL(pi || uniform base) and standard / BoN_n / WoN_n win rates against the base (ties 1/2, as
    ``studies/exact.py``), averaged over the eval prompts, of a prompt-blind policy over the 256 pairs (``logp``:
    [256] or [16, 16] log-probabilities)."""
    logp = np.asarray(logp, dtype=np.float64).reshape(-1)
    m = logp.size
    p = np.exp(logp)
    kl = float(np.sum(p * (logp + np.log(m))))
    e = task.eval.shape[0]
    mass = np.bincount(task.group_of.ravel(), weights=np.tile(p / p.sum(), e), minlength=task.group_count.size)

    def cdf_bounds(w):  # per group: the prompt's CDF just below and at the group's value
        c = np.cumsum(w)
        before = np.concatenate([[0.0], c])[task.first_group][task.group_prompt]
        return np.concatenate([[0.0], c[:-1]]) - before, c - before

    lo_a, hi_a = cdf_bounds(mass)
    lo_b, hi_b = cdf_bounds(task.group_count / m)

    def beats(nn, best):
        if best:  # P(best of nn policy in the group) x P(best of nn base below it, ties 1/2)
            mine, ref_lo, ref_hi = hi_a**nn - lo_a**nn, lo_b**nn, hi_b**nn
        else:
            mine, ref_lo, ref_hi = (1 - lo_a) ** nn - (1 - hi_a) ** nn, 1 - (1 - lo_b) ** nn, 1 - (1 - hi_b) ** nn
        per = np.bincount(task.group_prompt, weights=mine * 0.5 * (ref_lo + ref_hi), minlength=e)
        return float(per.mean())

    return {"kl": kl, "standard": beats(1, True), "bon": beats(n, True), "won": beats(n, False)}


def pair_tilt(logp: np.ndarray, task: PairTask, bins: int = 16) -> List[float]:
    """``studies/exact.tilt_profile`` of a prompt-blind pair policy on the eval prompts: per bin of the base quantile
    u, the mean of log pi / pi_ref."""
    from openrlhf_infalign.studies import exact

    logp = np.asarray(logp, dtype=np.float64).reshape(-1)
    e, m = task.eval.shape
    prof = exact.tilt_profile(np.tile(logp, (e, 1)), np.full((e, m), -np.log(m)), task.eval, bins)
    return [float(x) for x in prof]


def cell_tilt(logits: np.ndarray, bins: int = 16) -> List[float]:
    """The same profile for the cells policy: mean log pi / base per bin of base quantiles."""
    m = logits.size
    d = logits - np.logaddexp.reduce(logits) + np.log(m)
    return [float(x) for x in d.reshape(bins, m // bins).mean(axis=1)]


def interaction_share(tilt: np.ndarray) -> float:
    """Share of the variance (uniform weights over the pairs) of a [16, 16] log-tilt log pi / pi_ref that is NOT
    additive in the two words: 1 for a pure interaction, 0 for log pi = f(w1) + h(w2) (a product policy)."""
    t = np.asarray(tilt, dtype=np.float64)
    t = t - t.mean()
    add = t.mean(1, keepdims=True) + t.mean(0, keepdims=True)
    total = float(np.sum(t**2))
    return float(np.sum((t - add) ** 2) / total) if total > 0 else 0.0


class PairPolicy:
    """The tabular policies over the 256 answers. ``pairs``: theta1 [16], theta2 [16, 16] (a conditional table per
    first word); ``pairs-product``: theta2 [1, 16] (the second word blind to the first); ``pairs-flat``: one softmax
    over the 256 pairs, answered as ONE token."""

    def __init__(self, kind: str):
        if kind not in PAIR_POLICIES:
            raise ValueError(f"unknown pair policy {kind!r}; choose from {', '.join(PAIR_POLICIES)}")
        self.kind = kind
        if kind == "pairs-flat":
            self.params = [np.zeros(Q * Q)]
        else:
            self.params = [np.zeros(Q), np.zeros((Q if kind == "pairs" else 1, Q))]

    def token_logps(self):
        """Per-token log-prob tables: flat [256]; else (logp1 [16], logp2 [16 or 1, 16])."""
        return [x - np.logaddexp.reduce(x, axis=-1, keepdims=True) for x in self.params]

    def joint(self) -> np.ndarray:
        """log pi(w1, w2) [16, 16]."""
        lp = self.token_logps()
        if self.kind == "pairs-flat":
            return lp[0].reshape(Q, Q)
        return lp[0][:, None] + np.broadcast_to(lp[1], (Q, Q))

    def sample(self, rng, size) -> np.ndarray:
        """[size, 2] answers (w1, w2)."""
        lp = self.token_logps()
        if self.kind == "pairs-flat":
            y = rng.choice(Q * Q, size=size, p=np.exp(lp[0]))
            return np.stack([y // Q, y % Q], axis=1)
        w1 = rng.choice(Q, size=size, p=np.exp(lp[0]))
        c2 = np.cumsum(np.exp(lp[1]), axis=1)
        row = c2[w1 if self.kind == "pairs" else np.zeros(size, dtype=int)]
        w2 = np.minimum((rng.random(size)[:, None] * row[:, -1:] > row).sum(1), Q - 1)
        return np.stack([w1, w2], axis=1)

    def token_index(self, y: np.ndarray) -> List[tuple]:
        """Per token: (param index, row, column) of each answer's token in its log-prob table."""
        if self.kind == "pairs-flat":
            return [(0, None, y[:, 0] * Q + y[:, 1])]
        row2 = y[:, 0] if self.kind == "pairs" else np.zeros(len(y), dtype=int)
        return [(0, None, y[:, 0]), (1, row2, y[:, 1])]

    def logp_tokens(self, y: np.ndarray) -> np.ndarray:
        """[B, T] per-token log-probs of answers y."""
        lp = self.token_logps()
        return np.stack([lp[i][c] if r is None else lp[i][r, c] for i, r, c in self.token_index(y)], axis=1)

    def grads(self, y: np.ndarray, coef: np.ndarray) -> List[np.ndarray]:
        """Gradients on the params of sum_{b,t} coef[b, t] log pi(token t of answer b)."""
        lp = self.token_logps()
        out = [np.zeros_like(x) for x in self.params]
        for t, (i, r, c) in enumerate(self.token_index(y)):
            w = coef[:, t]
            if r is None:
                out[i] += np.bincount(c, weights=w, minlength=lp[i].size) - w.sum() * np.exp(lp[i])
            else:
                rows = lp[i].shape[0]
                np.add.at(out[i], (r, c), w)
                out[i] -= np.bincount(r, weights=w, minlength=rows)[:, None] * np.exp(lp[i])
        return out


DIRECT = "direct:"  # an arm reward spelled direct:<inference> is the direct objective's, else a transform spec


def reward_fn(reward: str):
    """Calibrated rewards (prompts, n) -> the arm's rewards: a transform spec, or ``direct:<inference>`` (core.direct's
    group estimator with its leave-one-out baseline; its group mean is 0, so reinforce_baseline's own does nothing)."""
    if reward.startswith(DIRECT):
        inference = reward[len(DIRECT) :]
        return lambda u: group_rewards(u, inference, "loo")
    return parse_transform(reward)


def _transform(transform: str, plans: Optional[dict] = None, inference: str = "bon:4"):
    """The arm's reward callable; ``optimal`` resolved at the plan's KL budget (as the study's wrapper does)."""
    if transform.startswith(DIRECT):
        return reward_fn(transform)
    if transform == "optimal":
        from openrlhf_infalign.core.planning import resolve_transform

        budget = (plans or {}).get(inference, {}).get("kl", 0.5)
        return resolve_transform("optimal", inference, budget)[0]
    return parse_transform(transform)



def pair_stores(task: PairTask, k: int, store_seed: int = 11) -> np.ndarray:
    """[P, k] ascending rewards of k uniform base pairs per train prompt (the train store)."""
    n = task.train.shape[0]
    draws = np.random.default_rng(store_seed).integers(0, Q * Q, size=(n, k))
    return np.sort(np.take_along_axis(task.train.reshape(n, Q * Q), draws, axis=1), axis=1)


def converged_pairs(transform, beta: float, task: PairTask, k: int = 32, store_seed: int = 11,
                    policy: str = "pairs") -> np.ndarray:
    """The [16, 16] log pi where the pair replay's PPO comes to rest: the KL-regularised optimum of a prompt-blind
    policy, log pi(y) = log base(y) + Rbar(y) / beta - log Z, Rbar(y) = the train prompts' mean of Phi(mid-rank of
    r_p(y) in the store). ``pairs`` and ``pairs-flat`` reach it (the autoregressive table is a complete
    parametrisation, and with per-token k1 in the returns-to-go its stationary point is the joint optimum);
    ``pairs-product`` rests at the best product pi1(w1) pi2(w2) (mean field: log pi1 = E_pi2[Rbar] / beta + c, and
    symmetrically). With reinforce_baseline's group mean over n samples, a run's ``kl_coef`` c rests at
    beta = c n / (n - 1)."""
    phi = parse_transform(transform) if isinstance(transform, str) else transform
    store = pair_stores(task, k, store_seed)
    r = task.train.reshape(task.train.shape[0], Q * Q)
    less = (store[:, None, :] < r[:, :, None]).sum(-1)
    ties = (store[:, None, :] == r[:, :, None]).sum(-1)
    rbar = phi((less + 0.5 * ties) / k).mean(0)
    if policy != "pairs-product":
        x = rbar / beta
        return (x - np.logaddexp.reduce(x)).reshape(Q, Q)
    rb = rbar.reshape(Q, Q) / beta
    l1, l2 = np.full(Q, -np.log(Q)), np.full(Q, -np.log(Q))
    for _ in range(5000):
        n1 = rb @ np.exp(l2)
        n1 -= np.logaddexp.reduce(n1)
        n2 = np.exp(n1) @ rb
        n2 -= np.logaddexp.reduce(n2)
        done = max(np.abs(n1 - l1).max(), np.abs(n2 - l2).max()) < 1e-12
        l1, l2 = 0.5 * (l1 + n1), 0.5 * (l2 + n2)
        l1 -= np.logaddexp.reduce(l1)
        l2 -= np.logaddexp.reduce(l2)
        if done:
            break
    return l1[:, None] + l2[None, :]


def coef_for_rest_kl(transform, kl: float, task: PairTask, k: int = 32, n_samples: int = 8,
                     store_seed: int = 11, policy: str = "pairs") -> float:
    """The run's ``kl_coef`` whose rest point (:func:`converged_pairs`) has exact KL ``kl``."""
    from scipy.optimize import brentq

    def gap(log_beta):
        rest = converged_pairs(transform, math.exp(log_beta), task, k, store_seed, policy)
        return pair_metrics(rest, task)["kl"] - kl

    beta = math.exp(brentq(gap, math.log(1e-4), math.log(1e3), xtol=1e-10))
    return beta * (n_samples - 1) / n_samples

def simulate_pairs(transform, kl_coef: float, steps: int, seed: int, s: "Setting", task: PairTask,
                   eval_every: int = 2, policy: str = "pairs", store_seed: int = 11,
                   keep_tables: bool = False) -> List[dict]:
    """One run of the word-pair replay: [{step, kl, standard, bon, won}] every ``eval_every`` steps (and step 0);
    with ``keep_tables`` each record also holds ``logp``, the [16, 16] log pi of the answers.

    ``transform``: a spec or a callable on u; the stores (K uniform base pairs per train prompt) come from
    ``store_seed``, shared by every arm and seed as the study's train store is; everything else from ``seed``.
    """
    phi = reward_fn(transform) if isinstance(transform, str) else transform
    rng = np.random.default_rng(seed)
    n_prompts = task.train.shape[0]
    store = pair_stores(task, s.k, store_seed)
    pol = PairPolicy(policy)
    m1 = [np.zeros_like(x) for x in pol.params]
    m2 = [np.zeros_like(x) for x in pol.params]
    per_step = s.rollout_batch * s.n_samples // s.train_batch
    warmup = math.ceil(s.warmup_ratio * steps * per_step)  # OpenRLHF's constant_with_warmup over the run's updates
    t_adam = 0
    log_base = np.log(Q) if policy != "pairs-flat" else np.log(Q * Q)  # per token: the base is uniform

    def record(step):
        joint = pol.joint()
        r = {"step": step, **pair_metrics(joint, task, s.n_win)}
        if keep_tables:
            r["logp"] = joint.copy()
        return r

    order, pos = rng.permutation(n_prompts), 0
    out = [record(0)]
    for step in range(1, steps + 1):
        if pos + s.rollout_batch > n_prompts:
            order, pos = rng.permutation(n_prompts), 0
        batch = np.repeat(order[pos : pos + s.rollout_batch], s.n_samples)
        pos += s.rollout_batch
        y = pol.sample(rng, batch.size)
        r = task.train[batch, y[:, 0], y[:, 1]]
        st = store[batch]
        less = (st < r[:, None]).sum(1)
        ties = (st == r[:, None]).sum(1)
        reward = phi(((less + 0.5 * ties) / s.k).reshape(s.rollout_batch, s.n_samples))  # per prompt group
        reward = (reward - reward.mean(-1, keepdims=True)).ravel()  # reinforce_baseline: the group mean
        old = pol.logp_tokens(y)
        kl_tok = old + log_base  # k1 per token
        ret = reward[:, None] - kl_coef * np.cumsum(kl_tok[:, ::-1], axis=1)[:, ::-1]  # returns-to-go, gamma 1
        adv = (ret - ret.mean()) / np.sqrt(max(ret.var(), 1e-8))  # whitening over every token of the batch
        idx = rng.permutation(batch.size)
        for start in range(0, idx.size, s.train_batch):
            mb = idx[start : start + s.train_batch]
            a = adv[mb]
            ratio = np.exp(pol.logp_tokens(y[mb]) - old[mb])
            active = ~(((a > 0) & (ratio > 1 + s.eps_clip)) | ((a < 0) & (ratio < 1 - s.eps_clip)))
            coef = -(a * ratio * active) / a.size  # d (token-mean PPO loss) / d log pi(token)
            grads = pol.grads(y[mb], coef)
            norm = math.sqrt(sum(float(np.sum(g**2)) for g in grads))
            if norm > s.max_norm:
                grads = [g * (s.max_norm / norm) for g in grads]
            t_adam += 1
            lr = s.lr * (min(1.0, (t_adam - 1) / warmup) if warmup else 1.0)
            for i, g in enumerate(grads):
                m1[i] = 0.9 * m1[i] + 0.1 * g
                m2[i] = 0.95 * m2[i] + 0.05 * g**2
                pol.params[i] -= lr * (m1[i] / (1 - 0.9**t_adam)) / (np.sqrt(m2[i] / (1 - 0.95**t_adam)) + 1e-8)
        if step % eval_every == 0:
            out.append(record(step))
    return out


def arms_from_plans(plans: dict, extra: bool = False) -> Dict[str, tuple]:
    """(reward, coefficient) of the study's InfAlign arms, from its plans.json (`infalign plan --json`); with
    ``extra`` also ``optimal_bon4`` (the transform spec ``optimal``: resolve it with the plan), ``log_bon4`` and the
    direct arms ``direct:<inference>`` where the plans carry them (their ``direct`` entry's coefficient)."""
    bon, won = plans["bon:4"], plans["won:4"]
    arms = {
        "identity": ("identity", bon["baselines"]["identity"]["kl_coef"]),
        "ctrl_exp_bon4": (bon["recommended"]["transform"], bon["recommended"]["kl_coef"]),
        "ctrl_negexp_won4": (won["recommended"]["transform"], won["recommended"]["kl_coef"]),
    }
    if extra:
        arms["optimal_bon4"] = ("optimal", bon["optimal"]["kl_coef"])
        arms["log_bon4"] = ("log", bon["baselines"]["log"]["kl_coef"])
        for name, plan in (("direct_bon4", bon), ("direct_won4", won)):
            direct = plan.get("direct") or {}
            if direct.get("openrlhf_args"):  # refused for this estimator / n: no arm
                arms[name] = (DIRECT + plan["inference"], direct["kl_coef"])
    return arms


def at_kl(traj: List[dict], kl: float, metric: str) -> Optional[float]:
    """The metric where the trajectory first reaches ``kl`` (linear between evaluations), None if it never does."""
    for a, b in zip(traj, traj[1:]):
        if a["kl"] <= kl <= b["kl"] and b["kl"] > a["kl"]:
            f = (kl - a["kl"]) / (b["kl"] - a["kl"])
            return a[metric] + f * (b[metric] - a[metric])
    return None


@dataclass(kw_only=True)
class DynamicsSettings:
    """`python -m openrlhf_infalign.studies.dynamics`: the study's optimisation on a tabular policy."""

    plans: str = option(flags=("--plans",), help="the study's plans.json")
    out: str = option(flags=("--out",), help="output directory (dynamics.json, dynamics.png)")
    policy: str = option(
        "cells",
        flags=("--policy",),
        choices=("cells",) + PAIR_POLICIES,
        help="cells: a softmax over base-quantile cells; pairs: the word-pair task on an autoregressive table "
        "(pairs-flat / pairs-product: one softmax over the pairs / the second word blind to the first)",
    )
    steps: int = option(18, flags=("--steps",), help="PPO steps of the study's runs")
    long_steps: int = option(600, flags=("--long-steps",), help="steps of the long runs")
    seeds: int = option(8, flags=("--seeds",), help="seeds per arm")
    prompts: int = option(Setting.prompts, flags=("--prompts",), help="train prompts (each with its own store)")
    rollout_batch: int = option(Setting.rollout_batch, flags=("--rollout-batch",), help="prompts per step")
    n_samples_per_prompt: int = option(
        Setting.n_samples, flags=("--rollout.n_samples_per_prompt",), help="samples per prompt"
    )
    train_batch: int = option(Setting.train_batch, flags=("--train-batch",), help="samples per optimizer update")
    lr: Optional[float] = option(
        None,
        flags=("--lr",),
        help="Adam learning rate on the logits (default: cells 0.05; pairs 0.045, pairs-flat 0.08, pairs-product "
        "0.035, calibrated to the LM's identity KL)",
    )
    matched_kl: str = option("0.1,0.2,0.3,0.4,0.5", flags=("--matched-kl",), help="KLs of the table")
    eval_every: Optional[int] = option(
        None, flags=("--eval-every",), help="steps between evaluations (default: cells 3, pairs 2)"
    )
    arms: str = option(
        "identity,ctrl_exp_bon4,ctrl_negexp_won4",
        flags=("--arms",),
        help="comma-separated arms, from identity, ctrl_exp_bon4, ctrl_negexp_won4, optimal_bon4, log_bon4",
    )
    prompts_dir: Optional[str] = option(
        None,
        flags=("--prompts-dir",),
        help="pairs: the study's prompts (<study out>/prompts); default: made as the study makes them",
    )
    eval_prompts: int = option(64, flags=("--eval-prompts",), help="pairs without --prompts-dir: eval prompts")
    seed: int = option(0, flags=("--seed",), help="pairs without --prompts-dir: the study's --seed (prompts)")
    tilt_kl: float = option(0.15, flags=("--tilt-kl",), help="KL (nats) of the tilt profiles")


#: Adam's rate per policy class that puts the identity arm's exact KL on the LM's (:func:`calibrate_lr` against the
#: study's identity runs, seeds 0-1, steps 4-12: 0.07, 0.18, 0.32, 0.41, 0.42 nats; docs/replay.md).
CALIBRATED_LR = {"cells": 0.08, "pairs": 0.045, "pairs-flat": 0.08, "pairs-product": 0.035}
#: The default --lr per policy: the calibrated rate, except cells, which keeps the study's historical 0.05.
DEFAULT_LR = {**CALIBRATED_LR, "cells": Setting.lr}



def calibrate_lr(policy: str, coef: float, target: Dict[int, float], lrs: Sequence[float], s: Setting,
                 task: Optional[PairTask] = None, seeds: int = 8) -> Dict[str, object]:
    """The rate among ``lrs`` whose identity-arm KL (seed mean; ``coef``: the identity coefficient) is nearest the
    target KL trajectory {step: nats} (least squares), with every rate's error and trajectory."""
    steps = max(target)
    rows = {}
    for lr in lrs:
        st = Setting(**{**vars(s), "lr": lr})
        trajs = run_arm(policy, "identity", coef, steps, seeds, st, task, eval_every=1)
        kl = {k: float(np.mean([t[k]["kl"] for t in trajs])) for k in target}
        rows[f"{lr:g}"] = {"rmse": float(np.sqrt(np.mean([(kl[k] - v) ** 2 for k, v in target.items()]))), "kl": kl}
    best = min(rows, key=lambda k: rows[k]["rmse"])
    return {"lr": float(best), "target": target, "rates": rows}

def run_arm(policy: str, transform, coef: float, steps: int, seeds: int, s: Setting, task: Optional[PairTask],
            eval_every: int, keep_tables: bool = False) -> List[List[dict]]:
    """Every seed's trajectory of one arm."""
    if policy == "cells":
        return [simulate(transform, coef, steps, k, s, eval_every=eval_every, keep_tables=keep_tables)
                for k in range(seeds)]
    return [simulate_pairs(transform, coef, steps, k, s, task, eval_every=eval_every, policy=policy,
                           keep_tables=keep_tables) for k in range(seeds)]


def as_records(traj: List[dict], n: int = 4) -> List[dict]:
    """A trajectory in the evaluation log's schema (stderr 0), for ``compare.arm_at_kl``."""
    return [{"step": r["step"], "kl": r["kl"], "standard": {"win_rate": r["standard"], "stderr": 0.0},
             "bon": {str(n): {"win_rate": r["bon"], "stderr": 0.0}},
             "won": {str(n): {"win_rate": r["won"], "stderr": 0.0}}} for r in traj]


def matched(trajs: List[List[dict]], metric: str, grid, n: int = 4) -> tuple:
    """(mean, se) over seeds at the grid KLs, first crossing (``compare.arm_at_kl``): NaN where a seed misses it."""
    from openrlhf_infalign.compare import arm_at_kl

    spec = "standard" if metric == "standard" else f"{metric}:{n}"
    return arm_at_kl([as_records(t, n) for t in trajs], spec, grid)


def tilt_near(trajs: List[List[dict]], target: float, policy: str, task: Optional[PairTask]) -> dict:
    """Seed-mean tilt profile (16 bins of u) at each seed's evaluation nearest ``target`` KL (as exact.tilt_at_kl),
    with the interaction share of the pair policies' [16, 16] log-tilt."""
    profiles, kls, shares = [], [], []
    for t in trajs:
        r = min(t[1:], key=lambda r: abs(r["kl"] - target))
        kls.append(r["kl"])
        if policy == "cells":
            profiles.append(cell_tilt(r["logits"]))
        else:
            profiles.append(pair_tilt(r["logp"], task))
            shares.append(interaction_share(r["logp"] + np.log(Q * Q)))
    out = {"kl": float(np.mean(kls)), "profile": np.nanmean(np.array(profiles, dtype=float), axis=0).tolist()}
    if shares:
        out["interaction_share"] = float(np.mean(shares))
    return out


def gaps(arms: Dict[str, dict], label: str, grid) -> Dict[str, dict]:
    """CTRL exp - identity on BoN_4 and negexp - identity on WoN_4 (and optimal / log - identity on BoN_4) at the grid
    KLs, seed means with se (independent arms)."""
    out = {}
    if label not in arms.get("identity", {}):
        return out
    ident = arms["identity"][label]["matched"]
    for arm, metric in (("ctrl_exp_bon4", "bon"), ("ctrl_negexp_won4", "won"), ("optimal_bon4", "bon"),
                        ("log_bon4", "bon")):
        if arm not in arms:
            continue
        a, b = arms[arm][label]["matched"][metric], ident[metric]
        out[f"{arm}-identity ({metric})"] = {
            f"{kl:g}": {
                "diff": _num(a["mean"][i] - b["mean"][i]),
                "se": _num(math.sqrt(a["se"][i] ** 2 + b["se"][i] ** 2)),
            }
            for i, kl in enumerate(grid)
        }
    return out


def _num(x) -> Optional[float]:
    return float(x) if x is not None and np.isfinite(x) else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    options.add_arguments(p, DynamicsSettings)
    args = options.settings_from_args(DynamicsSettings, p.parse_args(argv))
    plans = json.loads(Path(args.plans).read_text())
    setting = Setting(
        prompts=args.prompts,
        k=plans["bon:4"].get("k") or Setting.k,
        rollout_batch=args.rollout_batch,
        n_samples=args.n_samples_per_prompt,
        train_batch=args.train_batch,
        lr=args.lr if args.lr is not None else DEFAULT_LR[args.policy],
    )
    task = None
    if args.policy != "cells":
        task = pair_task(args.prompts_dir, args.prompts, args.eval_prompts, args.seed)
        setting.prompts = task.train.shape[0]
    eval_every = args.eval_every or (3 if args.policy == "cells" else 2)
    all_arms = arms_from_plans(plans, extra=True)
    names = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in names if a not in all_arms]
    if unknown:
        p.error(f"unknown arm(s) {', '.join(unknown)}; choose from {', '.join(all_arms)}")
    grid = parse_floats(args.matched_kl, "--matched-kl")
    result = {"policy": args.policy, "setting": vars(setting), "eval_every": eval_every, "arms": {}}
    for arm in names:
        spec, coef = all_arms[arm]
        transform = _transform(spec, plans)
        entry = {"transform": spec, "kl_coef": coef}
        for label, steps in (("short", args.steps), ("long", args.long_steps)):
            if steps <= 0:
                continue
            trajs = run_arm(args.policy, transform, coef, steps, args.seeds, setting, task, eval_every,
                            keep_tables=True)
            entry[label] = {
                "final": {m: float(np.mean([t[-1][m] for t in trajs])) for m in ("kl", "standard", "bon", "won")},
                "mean_trajectory": [
                    {k: float(np.mean([t[i][k] for t in trajs])) for k in ("step", "kl", "standard", "bon", "won")}
                    for i in range(len(trajs[0]))
                ],
                "at_kl": {
                    f"{kl:g}": {m: _mean_or_none([at_kl(t, kl, m) for t in trajs]) for m in ("standard", "bon", "won")}
                    for kl in grid
                },
                "matched": {
                    m: dict(zip(("mean", "se"), (list(map(_num, v)) for v in matched(trajs, m, grid))))
                    for m in ("standard", "bon", "won")
                },
                "tilt": tilt_near(trajs, args.tilt_kl, args.policy, task),
            }
        result["arms"][arm] = entry
        print(f"{arm}: " + ", ".join(f"{label} final {entry[label]['final']}" for label in ("short", "long")
                                     if label in entry), flush=True)
    result["gaps"] = {label: gaps(result["arms"], label, grid) for label in ("short", "long")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "dynamics.json", result, indent=2)
    _figure(result, out / "dynamics.png")
    return 0


def _mean_or_none(xs):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _figure(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric, title in ((axes[0], "bon", "BoN_4"), (axes[1], "won", "WoN_4")):
        for arm, entry in result["arms"].items():
            for label, style in (("long", "-"), ("short", "o")):
                if label not in entry:
                    continue
                tr = entry[label]["mean_trajectory"]
                ax.plot([r["kl"] for r in tr], [r[metric] for r in tr], style, label=f"{arm} ({label})", ms=3)
        ax.set_xlabel("KL(pi || base) (nats)")
        ax.set_ylabel(f"{title} win rate vs base")
        ax.set_title(f"tabular PPO ({result.get('policy', 'cells')}): {title}")
        ax.legend(fontsize=6)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
