"""The direct arms beside identity, CTRL and vBoN's log-CDF on the study's tabular policy, at matched KL.

demo/dynamics.py replays the study's optimisation (192 prompts with their own K = 32 stores, 32 prompts x 8 samples
a step, the k1 KL in the reward, ``reinforce_baseline``'s group mean and batch whitening, PPO-clipped Adam updates)
on a softmax over 256 base-quantile cells, with exact KL and win rates. Here the same loop takes any per-group
reward: a transform of the calibrated rewards (identity, the plans' exp / negexp, ``log``: vBoN's log-CDF) or the
direct arm's group estimator (core/direct.py, leave-one-out baseline; its group mean is exactly 0, so
reinforce_baseline's own mean does nothing and ``--algo.kl.init_coef`` is the direct coefficient itself).
Every arm's coefficient is its plan's for the study's budget at K = 32 (transforms: the K-aware beta times (n-1)/n,
architecture section 4; direct: ``direct_kl_coef``). The question of issue 19: which buys more win rate per nat,
and sooner?

``python -m openrlhf_infalign.direct_dynamics --out DIR``: DIR/direct_dynamics.json and a markdown table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from openrlhf_infalign.core import direct as dr
from openrlhf_infalign.core.finite_k import beta_for_kl_k
from openrlhf_infalign.core.planning import plan
from openrlhf_infalign.core.transforms import parse_transform
from openrlhf_infalign.demo.dynamics import Setting, at_kl, exact_metrics
from openrlhf_infalign.files import write_json, write_text

__all__ = [
    "simulate_rewards",
    "transform_rewards",
    "direct_rewards",
    "study_arms",
    "compare",
    "paired_difference",
    "markdown",
    "main",
]
PAIRS = (
    ("direct_bon4", "ctrl_exp_bon4", "bon"),
    ("direct_won4", "ctrl_negexp_won4", "won"),
    ("direct_bon4", "identity", "bon"),
    ("log_cdf", "identity", "bon"),
)

METRICS = ("kl", "standard", "bon", "won")
RewardFn = Callable[[np.ndarray], np.ndarray]  # calibrated rewards (prompts, n) -> rewards (prompts, n)


def transform_rewards(spec: str) -> RewardFn:
    phi = parse_transform(spec)
    return lambda u: phi(u)


def direct_rewards(inference: str) -> RewardFn:
    return lambda u: dr.group_rewards(u, inference, "loo")


def simulate_rewards(reward_fn: RewardFn, kl_coef: float, steps: int, seed: int, s: Setting, eval_every: int = 3):
    """demo/dynamics.simulate with the reward a function of each prompt group's calibrated rewards; the same random
    stream, so a transform arm reproduces dynamics.simulate exactly (tested). Returns [{step, kl, standard, bon,
    won}] every ``eval_every`` steps (and step 0)."""
    rng = np.random.default_rng(seed)
    stores = np.sort(rng.random((s.prompts, s.k)), axis=1)
    size = s.cells
    logits = np.zeros(size)
    m1, m2 = np.zeros(size), np.zeros(size)
    t_adam = 0
    order = rng.permutation(s.prompts)
    pos = 0
    out = [{"step": 0, **exact_metrics(logits, s.n_win)}]
    for step in range(1, steps + 1):
        if pos + s.rollout_batch > s.prompts:
            order, pos = rng.permutation(s.prompts), 0
        batch = order[pos : pos + s.rollout_batch]
        pos += s.rollout_batch
        logp = logits - np.logaddexp.reduce(logits)
        resp = rng.choice(size, size=(s.rollout_batch, s.n_samples), p=np.exp(logp))
        u = (resp + rng.random(resp.shape)) / s.cells
        less = (stores[batch][:, None, :] < u[:, :, None]).sum(-1)
        reward = reward_fn(less / s.k)
        kl = logp[resp] + np.log(size)
        adv = reward - reward.mean(-1, keepdims=True) - kl_coef * kl
        adv = (adv - adv.mean()) / max(adv.std(), 1e-4)
        flat_cells, flat_adv, old_logp = resp.ravel(), adv.ravel(), logp[resp].ravel()
        idx = rng.permutation(flat_cells.size)
        for start in range(0, idx.size, s.train_batch):
            mb = idx[start : start + s.train_batch]
            c, a = flat_cells[mb], flat_adv[mb]
            cur = logits - np.logaddexp.reduce(logits)
            ratio = np.exp(cur[c] - old_logp[mb])
            active = ~(((a > 0) & (ratio > 1 + s.eps_clip)) | ((a < 0) & (ratio < 1 - s.eps_clip)))
            w = -(a * ratio * active) / mb.size
            grad = np.bincount(c, weights=w, minlength=size) - w.sum() * np.exp(cur)
            t_adam += 1
            m1 = 0.9 * m1 + 0.1 * grad
            m2 = 0.95 * m2 + 0.05 * grad**2
            logits -= s.lr * (m1 / (1 - 0.9**t_adam)) / (np.sqrt(m2 / (1 - 0.95**t_adam)) + 1e-8)
        if step % eval_every == 0:
            out.append({"step": step, **exact_metrics(logits, s.n_win)})
    return out


def study_arms(kl: float, k: int, n: int) -> tuple[Dict[str, dict], Dict[str, float]]:
    """(arms, optimal): each arm's reward, its planned coefficient for ``reinforce_baseline`` with groups of n at K
    stored rewards, and its plan's expected win rate on its metric (BoN_4 for identity and log); the plans' optimal
    rows' win rates."""
    self_mean = (n - 1) / n  # reinforce_baseline's group mean includes the sample (kl_coef.py)
    plans = {inf: plan(inf, kl, k=k) for inf in ("bon:4", "won:4")}
    arms = {}
    for name, spec in (("identity", "identity"), ("log_cdf", "log")):
        beta = beta_for_kl_k(spec, kl, k)
        arms[name] = {
            "reward": spec,
            "kl_coef": beta * self_mean,
            "plan": plans["bon:4"]["baselines"][spec]["win_rate"],
        }
    for inf, name in (("bon:4", "ctrl_exp_bon4"), ("won:4", "ctrl_negexp_won4")):
        rec = plans[inf]["recommended"]
        arms[name] = {"reward": rec["transform"], "kl_coef": rec["beta"] * self_mean, "plan": rec["win_rate"]}
    for inf, name in (("bon:4", "direct_bon4"), ("won:4", "direct_won4")):
        coef = dr.direct_kl_coef(plans[inf], "reinforce_baseline", n, k=k)
        arms[name] = {"reward": f"direct:{inf}", "kl_coef": coef, "plan": dr.direct_plan(inf, kl, k)["win_rate"]}
    return arms, {inf: plans[inf]["optimal"]["win_rate"] for inf in plans}


def _reward_fn(reward: str) -> RewardFn:
    return direct_rewards(reward.split(":", 1)[1]) if reward.startswith("direct:") else transform_rewards(reward)


def compare(
    arms: Dict[str, dict], s: Setting, seeds: int, steps: int, long_steps: int, kls: Sequence[float]
) -> Dict[str, dict]:
    """Per arm, over seeds 0..seeds-1 (each seed: the same stores for every arm): the metrics at matched KL (first
    crossing; per seed, mean and se), after ``steps`` and ``long_steps``, and the step at which the seed-mean
    trajectory first reaches each KL."""
    result = {}
    for name, arm in arms.items():
        fn = _reward_fn(arm["reward"])
        entry = dict(arm)
        for label, n_steps in (("short", steps), ("long", long_steps)):
            trajs = [simulate_rewards(fn, arm["kl_coef"], n_steps, seed, s) for seed in range(seeds)]
            mean_traj = [{m: float(np.mean([t[i][m] for t in trajs])) for m in t0} for i, t0 in enumerate(trajs[0])]
            entry[label] = {
                "final": {m: float(np.mean([t[-1][m] for t in trajs])) for m in METRICS},
                "final_se": {m: _se([t[-1][m] for t in trajs]) for m in METRICS},
                "at_kl_per_seed": {
                    f"{x:g}": {m: [at_kl(t, x, m) for t in trajs] for m in ("bon", "won")} for x in kls
                },
                "step_at_kl": {f"{x:g}": _first_step(mean_traj, x) for x in kls},
            }
            entry[label]["at_kl"] = {
                x: {m: _mean_or_none(v) for m, v in per.items()} for x, per in entry[label]["at_kl_per_seed"].items()
            }
        result[name] = entry
    return result


def paired_difference(result: Dict[str, dict], arm: str, other: str, metric: str, kl: float) -> Optional[tuple]:
    """(mean, se) over seeds of arm - other in ``metric`` at matched KL (short runs), seeds where both reach it."""
    a = result[arm]["short"]["at_kl_per_seed"][f"{kl:g}"][metric]
    b = result[other]["short"]["at_kl_per_seed"][f"{kl:g}"][metric]
    d = [x - y for x, y in zip(a, b) if x is not None and y is not None]
    return (float(np.mean(d)), _se(d)) if len(d) >= 2 else None


def _se(xs) -> float:
    return float(np.std(xs, ddof=1) / np.sqrt(len(xs))) if len(xs) > 1 else 0.0


def _mean_or_none(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs)) if xs else None


def _first_step(traj: List[dict], kl: float) -> Optional[float]:
    for a, b in zip(traj, traj[1:]):
        if a["kl"] <= kl <= b["kl"] and b["kl"] > a["kl"]:
            return a["step"] + (kl - a["kl"]) / (b["kl"] - a["kl"]) * (b["step"] - a["step"])
    return None


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3f}"


def markdown(result: Dict[str, dict], kls: Sequence[float], steps: int, long_steps: int) -> str:
    head = [f"BoN_4 / WoN_4 at {x:g} nats (step)" for x in kls]
    lines = [
        "| arm | coef | "
        + " | ".join(head)
        + f" | after {steps} steps: KL, BoN_4 / WoN_4 | after {long_steps} | plan |",
        "|---" * (len(kls) + 5) + "|",
    ]
    for name, e in result.items():
        cells = []
        for x in kls:
            a, st = e["short"]["at_kl"][f"{x:g}"], e["short"]["step_at_kl"][f"{x:g}"]
            cells.append(f"{_fmt(a['bon'])} / {_fmt(a['won'])} ({'-' if st is None else f'{st:.0f}'})")
        sh, lo = e["short"]["final"], e["long"]["final"]
        lines.append(
            f"| {name} | {e['kl_coef']:.4g} | "
            + " | ".join(cells)
            + f" | {sh['kl']:.2f}, {sh['bon']:.3f} / {sh['won']:.3f} | {lo['kl']:.2f}, {lo['bon']:.3f} / {lo['won']:.3f}"
            + f" | {_fmt(e['plan'])} |"
        )
    lines.append("")
    for arm, other, metric in PAIRS:
        if arm in result and other in result:
            diffs = [(x, paired_difference(result, arm, other, metric, x)) for x in kls]
            text = ", ".join(f"{d[0]:+.3f} ± {d[1]:.3f} at {x:g}" for x, d in diffs if d is not None)
            lines.append(f"{arm} - {other}, {metric}: {text or 'no common KL'}")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--kl", type=float, default=0.5, help="the study's KL budget every arm is planned for")
    p.add_argument("--k", type=int, default=Setting.k, help="the train store's K")
    p.add_argument("--steps", type=int, default=18, help="PPO steps of the study's runs")
    p.add_argument("--long-steps", type=int, default=600, help="steps of the long runs")
    p.add_argument("--seeds", type=int, default=8, help="seeds per arm")
    p.add_argument("--matched-kl", default="0.2,0.4", help="KLs of the table")
    args = p.parse_args(argv)
    s = Setting(k=args.k)
    kls = [float(x) for x in args.matched_kl.split(",")]
    arms, optimal = study_arms(args.kl, args.k, s.n_samples)
    result = compare(arms, s, args.seeds, args.steps, args.long_steps, kls)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "direct_dynamics.json", {"setting": vars(s), "optimal": optimal, "result": result}, indent=2)
    table = markdown(result, kls, args.steps, args.long_steps)
    table += f"\nplans' optimal rows (K = {args.k}, {args.kl:g} nats): BoN_4 {optimal['bon:4']:.3f}, WoN_4 "
    table += f"{optimal['won:4']:.3f}\n"
    write_text(out / "direct_dynamics.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
