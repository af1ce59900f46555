"""Win rate against KL for one transform: the beta that puts the RLHF optimum at each KL budget and its win rate.

Calibrated-space theory, no model needed. --transform takes identity, exp:t=T, negexp:t=T, log, power:k=K, or
optimal / auto (re-solved at every KL: the exact optimum / the plan's recommended transform).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

from openrlhf_infalign import options
from openrlhf_infalign.core.inference import InferenceProcedure
from openrlhf_infalign.core.planning import frontier
from openrlhf_infalign.files import check_output_file, pyplot, save_figure
from openrlhf_infalign.options import option, parse_floats


@dataclass(kw_only=True)
class FrontierSettings:
    """`infalign frontier`: one transform's win rate at each KL budget."""

    inference: str = option(
        "bon:4", flags=("--inference",), help="inference procedure: standard, bon:N (Best-of-N), won:N (Worst-of-N)"
    )
    transform: str = option(
        "auto",
        flags=("--transform",),
        help="identity | exp:t=T | negexp:t=T | log | power:k=K | optimal | auto (the plan's pick per KL)",
    )
    kl_budget: str = option(
        "0.1,0.25,0.5,1,2", flags=("--kl-budget",), metavar="NATS,...", help="comma-separated KL budgets in nats"
    )
    k: Optional[int] = option(
        None,
        flags=("--k",),
        doc_default="the continuum",
        help="reference samples per prompt in the store: expected KL and win rates with K-bin calibrated rewards",
    )
    json: bool = option(False, flags=("--json",), help="print JSON instead of a table")
    plot: Optional[str] = option(
        None, flags=("--plot",), metavar="FILE.png", help="also plot win rate vs KL to this PNG"
    )
    overwrite: bool = option(False, flags=("--overwrite",), help="replace an existing --plot file")


def add_arguments(p) -> None:
    options.add_arguments(p, FrontierSettings)


def format_table(f: dict) -> str:
    inf = InferenceProcedure.parse(f["inference"])
    per_point = any("transform" in q for q in f["points"])
    lines = [
        f"InfAlign frontier: transform {f['transform']} under {inf.words} ({f['inference']})",
        f"win rate = {inf.win_rate_words}, at the RLHF optimum for each KL",
        "",
        f"  {'KL':>8}  {'beta':>10}  {'win rate':>9}" + ("  transform" if per_point else ""),
    ]
    for q in f["points"]:
        extra = f"  {q['transform']}" if per_point else ""
        lines.append(f"  {q['kl']:>8g}  {q['beta']:>10.4g}  {q['win_rate']:>9.4f}{extra}")
    return "\n".join(lines)


def plot_frontier(f: dict, path: str, overwrite: bool = True) -> None:
    inf = InferenceProcedure.parse(f["inference"])
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xs = [q["kl"] for q in f["points"]]
    ys = [q["win_rate"] for q in f["points"]]
    ax.plot(xs, ys, "o-", label=f["transform"])
    for q in f["points"]:
        ax.annotate(
            f"beta={q['beta']:.3g}", (q["kl"], q["win_rate"]), fontsize=8, xytext=(4, -10), textcoords="offset points"
        )
    ax.set_xlabel("KL(pi || pi_ref)  [nats]")
    ax.set_ylabel(f"{inf.words} win rate vs reference")
    ax.set_title(f"infalign frontier --inference {f['inference']} --transform {f['transform']}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    save_figure(fig, path, overwrite=overwrite)


def run(args) -> int:
    args = options.settings_from_args(FrontierSettings, args)
    if args.plot is not None:  # before the work: a bad path fails in a moment
        check_output_file(args.plot, overwrite=args.overwrite, flag="--plot")
    f = frontier(args.inference, args.transform, parse_floats(args.kl_budget, "--kl-budget"), k=args.k)
    if args.plot:
        plot_frontier(f, args.plot, overwrite=args.overwrite)
    print(json.dumps(f, indent=2, allow_nan=False) if args.json else format_table(f))
    if args.plot and not args.json:
        print(f"plot: {args.plot}")
    return 0
