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

An arm's reward is a transform of the calibrated rewards (identity, the plans' exp / negexp, ``log``: vBoN's
log-CDF) or, spelled ``direct:bon:4`` / ``direct:won:4``, the direct objective's group estimator with its
leave-one-out baseline (``infalign.direct``; its group mean is 0, so reinforce_baseline's own mean does nothing).
Every arm's coefficient is its plan's (``infalign plan --json``: the rows' ``kl_coef``, the ``direct`` entry's).
Issue 19's question, which buys more win rate per nat and sooner, is the paired seed differences of the table.

``python -m openrlhf_infalign.studies.dynamics --plans study_out/plans.json --out study_out/dynamics``: JSON, a
markdown table with the paired differences at matched KL, and a figure (win rate vs KL per arm, the study's 18
steps and a long run, seed means).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from openrlhf_infalign import options
from openrlhf_infalign.core.direct import group_rewards
from openrlhf_infalign.core.transforms import parse_transform
from openrlhf_infalign.files import save_figure, write_json, write_text
from openrlhf_infalign.options import option, parse_floats

__all__ = [
    "PAIRS",
    "Setting",
    "arms_from_plans",
    "at_kl",
    "exact_metrics",
    "main",
    "markdown",
    "paired_difference",
    "reward_fn",
    "simulate",
]

DIRECT = "direct:"  # an arm reward spelled direct:<inference> is the direct objective's, else a transform spec
# (arm, other, metric): the paired seed differences the table reports at each matched KL
PAIRS = (
    ("direct_bon4", "ctrl_exp_bon4", "bon"),
    ("direct_won4", "ctrl_negexp_won4", "won"),
    ("direct_bon4", "identity", "bon"),
    ("log_bon4", "identity", "bon"),
    ("ctrl_exp_bon4", "identity", "bon"),
)


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


def reward_fn(reward: str):
    """Calibrated rewards (prompts, n) -> the arm's rewards: a transform spec, or ``direct:<inference>``."""
    if reward.startswith(DIRECT):
        inference = reward[len(DIRECT) :]
        return lambda u: group_rewards(u, inference, "loo")
    return parse_transform(reward)


def simulate(reward: str, kl_coef: float, steps: int, seed: int, s: Setting, eval_every: int = 3) -> List[dict]:
    """One run: the trajectory [{step, kl, standard, bon, won}] every ``eval_every`` steps (and step 0). ``reward``:
    a transform spec or ``direct:<inference>`` (:func:`reward_fn`)."""
    rng = np.random.default_rng(seed)
    phi = reward_fn(reward)
    stores = np.sort(rng.random((s.prompts, s.k)), axis=1)  # each prompt's K base quantiles
    size = s.cells
    logits = np.zeros(size)
    m1, m2 = np.zeros(size), np.zeros(size)  # Adam moments (OpenRLHF's betas 0.9, 0.95)
    t_adam = 0
    order = rng.permutation(s.prompts)
    pos = 0
    out = [{"step": 0, **_metrics(logits, s)}]
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
    return out


def _metrics(logits: np.ndarray, s: Setting) -> Dict[str, float]:
    return exact_metrics(logits, s.n_win)


def arms_from_plans(plans: dict) -> Dict[str, tuple]:
    """(reward, coefficient) of the study's InfAlign arms, from its plans.json (`infalign plan --json` per
    procedure): identity, CTRL's exp / negexp, vBoN's log-CDF, and the direct arms where the plans carry them."""
    bon, won = plans["bon:4"], plans["won:4"]
    arms = {
        "identity": ("identity", bon["baselines"]["identity"]["kl_coef"]),
        "ctrl_exp_bon4": (bon["recommended"]["transform"], bon["recommended"]["kl_coef"]),
        "ctrl_negexp_won4": (won["recommended"]["transform"], won["recommended"]["kl_coef"]),
    }
    if "log" in bon["baselines"]:
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
    steps: int = option(18, flags=("--steps",), help="PPO steps of the study's runs")
    long_steps: int = option(600, flags=("--long-steps",), help="steps of the long runs")
    seeds: int = option(8, flags=("--seeds",), help="seeds per arm")
    prompts: int = option(Setting.prompts, flags=("--prompts",), help="train prompts (each with its own store)")
    rollout_batch: int = option(Setting.rollout_batch, flags=("--rollout-batch",), help="prompts per step")
    n_samples_per_prompt: int = option(
        Setting.n_samples, flags=("--rollout.n_samples_per_prompt",), help="samples per prompt"
    )
    train_batch: int = option(Setting.train_batch, flags=("--train-batch",), help="samples per optimizer update")
    lr: float = option(Setting.lr, flags=("--lr",), help="Adam learning rate on the logits")
    matched_kl: str = option("0.1,0.2,0.3,0.4,0.5", flags=("--matched-kl",), help="KLs of the table")


def paired_difference(result: dict, arm: str, other: str, metric: str, kl: float) -> Optional[tuple]:
    """(mean, se) over seeds of arm - other in ``metric`` at matched KL (the short runs; seeds where both reach it,
    at least two): each seed has the same stores and prompt order in every arm, so the pairing removes them."""
    a = result["arms"][arm]["short"]["at_kl_per_seed"][f"{kl:g}"][metric]
    b = result["arms"][other]["short"]["at_kl_per_seed"][f"{kl:g}"][metric]
    d = [x - y for x, y in zip(a, b) if x is not None and y is not None]
    if len(d) < 2:
        return None
    return float(np.mean(d)), float(np.std(d, ddof=1) / np.sqrt(len(d)))


def markdown(result: dict, grid: Sequence[float], steps: int, long_steps: int) -> str:
    """The arms at matched KL (short runs, seed means) and after the short and long runs, then the paired
    differences of :data:`PAIRS`."""
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    head = " | ".join(f"BoN_4 / WoN_4 at {x:g} nats" for x in grid)
    lines = [
        f"| arm | reward | coef | {head} | after {steps} steps: KL, BoN_4 / WoN_4 | after {long_steps} |",
        "|---" * (len(grid) + 5) + "|",
    ]
    for name, e in result["arms"].items():
        cells = [
            f"{fmt(e['short']['at_kl'][f'{x:g}']['bon'])} / {fmt(e['short']['at_kl'][f'{x:g}']['won'])}" for x in grid
        ]
        sh, lo = e["short"]["final"], e["long"]["final"]
        lines.append(
            f"| {name} | {e['reward']} | {e['kl_coef']:.4g} | " + " | ".join(cells)
            + f" | {sh['kl']:.2f}, {sh['bon']:.3f} / {sh['won']:.3f} | {lo['kl']:.2f}, {lo['bon']:.3f} / {lo['won']:.3f} |"
        )  # fmt: skip
    lines.append("")
    for arm, other, metric in PAIRS:
        if arm in result["arms"] and other in result["arms"]:
            diffs = [(x, paired_difference(result, arm, other, metric, x)) for x in grid]
            text = ", ".join(f"{d[0]:+.3f} ± {d[1]:.3f} at {x:g}" for x, d in diffs if d is not None)
            lines.append(f"{arm} - {other}, {metric.upper()}_4 (paired seeds): {text or 'no common KL'}")
    return "\n".join(lines) + "\n"


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
        lr=args.lr,
    )
    arms = arms_from_plans(plans)
    grid = parse_floats(args.matched_kl, "--matched-kl")
    result = {"setting": vars(setting), "arms": {}}
    for arm, (reward, coef) in arms.items():
        entry = {"reward": reward, "kl_coef": coef}
        for label, steps in (("short", args.steps), ("long", args.long_steps)):
            trajs = [simulate(reward, coef, steps, seed, setting, eval_every=3) for seed in range(args.seeds)]
            entry[label] = {
                "final": {m: float(np.mean([t[-1][m] for t in trajs])) for m in ("kl", "standard", "bon", "won")},
                "mean_trajectory": [
                    {k: float(np.mean([t[i][k] for t in trajs])) for k in trajs[0][i]} for i in range(len(trajs[0]))
                ],
                "at_kl_per_seed": {
                    f"{kl:g}": {m: [at_kl(t, kl, m) for t in trajs] for m in ("standard", "bon", "won")} for kl in grid
                },
            }
            entry[label]["at_kl"] = {
                x: {m: _mean_or_none(v) for m, v in per.items()} for x, per in entry[label]["at_kl_per_seed"].items()
            }
        result["arms"][arm] = entry
        print(f"{arm}: short final {entry['short']['final']}, long final {entry['long']['final']}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "dynamics.json", result, indent=2)
    write_text(out / "dynamics.md", markdown(result, grid, args.steps, args.long_steps))
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
                tr = entry[label]["mean_trajectory"]
                ax.plot([r["kl"] for r in tr], [r[metric] for r in tr], style, label=f"{arm} ({label})", ms=3)
        ax.set_xlabel("KL(pi || base) (nats)")
        ax.set_ylabel(f"{title} win rate vs base")
        ax.set_title(f"tabular PPO, the study's steps: {title}")
        ax.legend(fontsize=6)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
