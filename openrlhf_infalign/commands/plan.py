"""Plan a CTRL run: the transform and KL coefficient beta that maximise the inference-time win rate at a KL budget.

For the inference procedure (standard, bon:N = Best-of-N, won:N = Worst-of-N) and the KL budget, searches the
exp:t (Best-of-N) or negexp:t (Worst-of-N) transform family in the calibrated-space theory, and prints the best t,
its beta (= --algo.kl.init_coef for the normalised transform), its win rate, the exact optimum beside it, the
identity / log baselines, and the OpenRLHF flags to train with; then the direct objective's row and flags
(``infalign.direct``), or why it is refused for the run's estimator and samples per prompt.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Optional

from openrlhf_infalign import options
from openrlhf_infalign.adapter.planning import ESTIMATORS, plan_with_flags
from openrlhf_infalign.core import planning
from openrlhf_infalign.core.inference import InferenceProcedure
from openrlhf_infalign.files import check_output_file, pyplot, save_figure
from openrlhf_infalign.options import option


@dataclass(kw_only=True)
class PlanSettings:
    """`infalign plan`: the procedure, the KL budget, and the run's K, estimator and samples per prompt."""

    inference: str = option(
        "bon:4",
        flags=("--inference",),
        help="inference procedure the policy will be used with: standard, bon:N (Best-of-N), won:N (Worst-of-N)",
    )
    kl_budget: float = option(0.5, flags=("--kl-budget",), metavar="NATS", help="KL budget KL(pi || pi_ref) in nats")
    k: Optional[int] = option(
        None,
        flags=("--k",),
        doc_default="the continuum",
        help="reference samples per prompt in the store (`infalign store info` shows its median K): beta is chosen "
        "so that the expected KL over such stores equals the budget",
    )
    estimator: str = option(
        "gae",
        flags=("--algo.advantage.estimator",),
        help="the run's advantage estimator (" + ", ".join(ESTIMATORS) + "): it decides which "
        "--algo.kl.init_coef gives the planned beta",
    )
    n_samples_per_prompt: int = option(
        1,
        flags=("--rollout.n_samples_per_prompt",),
        help="the run's samples per prompt (group size of the group-baseline estimators)",
    )
    json: bool = option(False, flags=("--json",), help="print the plan as JSON instead of a table")
    plot: Optional[str] = option(
        None,
        flags=("--plot",),
        metavar="FILE.png",
        help="also write win rate vs KL curves (recommended exp/negexp, identity, log, optimal) to this PNG",
    )
    overwrite: bool = option(False, flags=("--overwrite",), help="replace an existing --plot file")


def add_arguments(p) -> None:
    options.add_arguments(p, PlanSettings)


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, allow_nan=False)


def format_table(p: dict) -> str:
    inf = InferenceProcedure.parse(p["inference"])
    rec = p["recommended"]
    optimal_what = "exact optimum (tabulated)" if p.get("k") is None else "continuum optimum's shape on K bins"
    rows = [(rec["transform"], rec, "recommended")]
    if "optimal" in p:
        rows.append(("optimal", p["optimal"], optimal_what))
    rows += [(name, b, "baseline") for name, b in p["baselines"].items()]
    best = p["optimal"]["win_rate"] if "optimal" in p else rec["win_rate"]
    coef = any(abs(r["kl_coef"] - r["beta"]) > 1e-12 * r["beta"] for _, r, _ in rows if "kl_coef" in r)
    w = max(len(r[0]) for r in rows) + 2
    k_words = "K = infinity (continuum)" if p.get("k") is None else f"K = {p['k']} reference samples per prompt"
    lines = [
        f"InfAlign plan: {inf.words} ({p['inference']}), KL budget {p['kl']:g} nats, {k_words}",
        f"win rate = {inf.win_rate_words}, at the RLHF optimum "
        + ("(calibrated-space theory)" if p.get("k") is None else "(expected over stores of K reference samples)"),
    ]
    if coef:
        lines.append(
            f"estimator {p['estimator']} with n = {p['n_samples_per_prompt']}: --algo.kl.init_coef = beta * (n-1)/n"
        )
    lines += ["", f"  {'transform':<{w}}{'beta':>10}" + (f"{'init_coef':>11}" if coef else "")]
    lines[-1] += f"  {'win rate':>9}  {'vs optimal':>10}"
    for name, r, what in rows:
        extra = f"{r['kl_coef']:>11.4g}" if coef else ""
        lines.append(
            f"  {name:<{w}}{r['beta']:>10.4g}{extra}  {r['win_rate']:>9.4f}  {r['win_rate'] - best:>+10.4f}  {what}"
        )
    lines += ["", "Train with (add to your OpenRLHF command):", "  " + " ".join(p["openrlhf_args"])]
    lines += ["", *direct_lines(p.get("direct"), best)]
    for note in p.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def direct_lines(d: Optional[dict], best: float) -> list[str]:
    """The direct objective's row and flags (``infalign.direct``), or why it is refused for this run."""
    if not d:
        return []
    if d["refused"]:
        return [f"Direct objective ({d['wrapper']}): refused: {d['refused']}"]
    head = f"Direct objective ({d['wrapper']}: the unbiased group estimator of the win rate, leave-one-out baseline)"
    where = "expected over stores of K" if d["k_aware"] else "continuum"
    return [
        f"{head}:",
        f"  coefficient {d['coef']:.4g} on its reward, --algo.kl.init_coef {d['kl_coef']:.4g} ({d['composition']})",
        f"  KL {d['kl']:.4g} nats, win rate {d['win_rate']:.4f} ({d['win_rate'] - best:+.4f} vs optimal; {where})",
        "Train the direct objective with:",
        "  " + " ".join(d["openrlhf_args"]),
    ]


def plot_plan(p: dict, path: str, overwrite: bool = True) -> None:
    import numpy as np

    inf = InferenceProcedure.parse(p["inference"])
    kl, rec = p["kl"], p["recommended"]
    kls = np.unique(np.concatenate([np.geomspace(kl / 25, 2.5 * kl, 30), [kl]]))
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    curves = [(rec["transform"], rec["transform"] + " (recommended)", "-", 2.2)]
    curves += [("identity", "identity", "--", 1.5), ("log", "log", ":", 1.8)]
    for spec, label, style, lw in curves:
        pts = planning.frontier(inf, spec, kls, k=p.get("k"))["points"]
        ax.plot([q["kl"] for q in pts], [q["win_rate"] for q in pts], style, lw=lw, label=label)
    if "optimal" in p:
        # Each optimum is a fixed-point solve: fewer points, drawn as dots (a chord would dip under the curve).
        pts = planning.frontier(inf, "optimal", np.geomspace(kls[0], kls[-1], 10), k=p.get("k"))["points"]
        ax.plot([q["kl"] for q in pts], [q["win_rate"] for q in pts], "ko", ms=4, label="optimal (exact)")
    ax.axvline(kl, color="grey", lw=0.8, ls="-.")
    ax.plot(
        [kl], [rec["win_rate"]], "r*", ms=14, label=f"plan: beta={rec['beta']:.3g}, win rate={rec['win_rate']:.3f}"
    )
    ax.set_xlabel("KL(pi || pi_ref)  [nats]")
    ax.set_ylabel(f"{inf.words} win rate vs reference")
    ax.set_title(f"infalign plan --inference {p['inference']} --kl-budget {kl:g}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    save_figure(fig, path, overwrite=overwrite)


def run(args) -> int:
    args = options.settings_from_args(PlanSettings, args)
    if args.plot is not None:  # before the work: a bad path fails in a moment
        check_output_file(args.plot, overwrite=args.overwrite, flag="--plot")
    p = plan_with_flags(args.inference, args.kl_budget, args.k, args.estimator, args.n_samples_per_prompt)
    if args.plot:
        plot_plan(p, args.plot, overwrite=args.overwrite)
    print(dumps(p) if args.json else format_table(p))
    if args.plot and not args.json:
        print(f"plot: {args.plot}")
    for note in p["notes"] if args.json else []:
        print(f"note: {note}", file=sys.stderr)
    return 0
