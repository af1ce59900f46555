"""Plot training runs' inference-time win rates from RUN_DIR/infalign_eval.jsonl: one run, or several side by side.

One run: three files in --out. winrate_vs_n.png: Best-of-N and Worst-of-N win rate vs N at the last evaluation, with
the first evaluation drawn faint beside it. bon_vs_kl.png: the run's BoN_N (or WoN_N) win rate vs training KL
across evaluations, over the calibrated-space theory frontier of the run's transform, the identity (calibration
only) baseline and the optimal-transform ceiling. summary.md: step, KL, standard, BoN_N and WoN_N win rates with
standard errors (also printed). The record schema the training hook writes is documented in
openrlhf_infalign/evallog.py.

Several runs: runs sharing a --label are seeds of one arm, compared at matched KL (openrlhf_infalign/compare.py
says how: first-crossing trajectories interpolated linearly, never extrapolated; seed mean and standard error;
differences to the baseline arm). Writes <metric>_vs_kl.png for BoN_N and WoN_N (N = 4 and the N the runs
trained for) and standard, summary.md (also printed) and compare.json (printed with --json).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from openrlhf_infalign import options
from openrlhf_infalign.errors import UserError
from openrlhf_infalign.evallog import eval_log_path, load_eval_log
from openrlhf_infalign.files import write_json, write_text
from openrlhf_infalign.options import option

GROUPS = {"one": "one or several runs", "compare": "several runs"}


@dataclass(kw_only=True)
class ReportSettings:
    """`infalign report`: one run's plots and table, or several runs side by side at matched KL."""

    run_dir: List[str] = option(
        flags=("run_dir",),
        positional=True,
        nargs="+",
        metavar="RUN_DIR",
        group="one",
        help="the training run's save path (holds infalign_eval.jsonl); several: compared side by side",
    )
    out: Optional[str] = option(
        None,
        flags=("--out",),
        group="one",
        doc_default="RUN_DIR/infalign_report, ./infalign_compare for several",
        help="output directory",
    )
    no_optimal: bool = option(
        False,
        flags=("--no-optimal",),
        group="one",
        help="leave the optimal-transform ceiling off the KL plot (it takes a fixed-point solve, ~1-2 s)",
    )
    json: bool = option(
        False, flags=("--json",), group="one", help="print a JSON summary instead of the Markdown table"
    )
    label: Optional[List[str]] = option(
        None,
        flags=("--label",),
        append=True,
        group="compare",
        doc_default="the run directory's name",
        help="arm label of each run, repeated in run order; runs sharing a label are seeds of one arm",
    )
    baseline: Optional[str] = option(
        None,
        flags=("--baseline",),
        group="compare",
        doc_default="the identity arm, else the first",
        help="arm the differences are taken to",
    )
    kl_grid: Optional[str] = option(
        None,
        flags=("--kl-grid",),
        group="compare",
        doc_default="a few KLs every arm covers",
        help="matched KLs (nats per sequence) for the table, e.g. 0.25,0.5,1",
    )
    k: Optional[int] = option(
        None,
        flags=("--k",),
        group="compare",
        doc_default="the K the runs recorded, when they agree",
        help="the store's K (reference samples per prompt) for the K-aware theory curves",
    )


def add_arguments(parser) -> None:
    options.add_arguments(parser, ReportSettings, groups=GROUPS)


def run(args) -> int:
    if len(args.run_dir) > 1:
        return run_compare(args)
    flags = {"--label": args.label, "--baseline": args.baseline, "--kl-grid": args.kl_grid, "--k": args.k}
    given = [flag for flag, value in flags.items() if value is not None]
    if given:
        raise UserError(f"{', '.join(given)} compare several runs: give two or more RUN_DIRs, or drop the flag")
    return run_single(args, args.run_dir[0])


def run_single(args, run_dir) -> int:
    from openrlhf_infalign import report

    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise UserError(f"run directory {run_dir} does not exist")
    log = eval_log_path(run_dir)  # RUN_DIR is the run's save path; the log file itself is accepted too
    records = load_eval_log(log)
    out = Path(args.out) if getattr(args, "out", None) else log.parent / "infalign_report"
    out.mkdir(parents=True, exist_ok=True)
    kind, n, transform = report.run_metric(records)
    label = {"bon": f"BoN_{n}", "won": f"WoN_{n}", "standard": "standard"}[kind]
    first, last = records[0], records[-1]

    vs_n = report.plot_winrate_vs_n(
        last,
        out / "winrate_vs_n.png",
        title=f"Win rate vs N at step {last['step']} ({last.get('num_prompts', '?')} prompts; bars: 95% CI)",
        baseline=first if first is not last else None,
        baseline_label=f"step {first['step']}",
        result_label=f"step {last['step']}",
        transform=transform,
        kl=last.get("kl"),
    )
    vs_kl = report.plot_winrate_vs_kl(
        records, out / "bon_vs_kl.png", kind, n, transform, with_optimal=not args.no_optimal
    )
    table = report.summary_markdown(records, kind if kind != "standard" else "bon", n)
    plan = report.planned_point(records, kind, n)
    end = report.end_point(records, kind, n)
    plan_line = (
        f"plan: KL {plan['kl']:g} nats, {label} {plan['win_rate']:.4f} (planned beta {plan['beta']:.4g}, "
        f"K = {plan['k'] or 'infinity'}); the run ended at "
        + (f"KL {end['kl']:.4g}, {label} {end['win_rate']:.4f} (step {end['step']})" if end else "an unmeasured KL")
        if plan
        else "plan: none recorded (no KL budget)"
    )
    header = [
        f"# InfAlign evaluation: {run_dir}",
        "",
        f"inference procedure: `{last.get('inference') or 'unknown'}`, transform: `{transform or 'unknown'}`, "
        f"beta: {'unknown' if last.get('beta') is None else format(last['beta'], '.4g')}, evaluations: {len(records)}",
        "",
        plan_line,
        "",
        "Win rates against the reference (base) policy, ± prompt-level standard error; 0.5 = no change.",
        "",
        "",
    ]
    footer = ["", f"![win rate vs N]({vs_n.name})", "", f"![{label} vs KL]({vs_kl.name})", ""]
    md = out / "summary.md"
    write_text(md, "\n".join(header) + table + "\n" + "\n".join(footer))

    if args.json:
        print(
            json.dumps(
                {
                    "run_dir": str(run_dir),
                    "inference": last.get("inference"),
                    "transform": transform,
                    "metric": label,
                    "evaluations": len(records),
                    "last": {k: last[k] for k in ("step", "kl", "num_prompts", "standard", "bon", "won") if k in last},
                    "plan": plan,
                    "end": end,
                    "files": {"winrate_vs_n": str(vs_n), "bon_vs_kl": str(vs_kl), "summary": str(md)},
                }
            )
        )
    else:
        print(plan_line)
        print(table)
        print(f"\nwrote {vs_n}, {vs_kl}, {md}")
    return 0


def _kl_grid(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        grid = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        grid = []
    if not grid or not all(math.isfinite(k) and k >= 0 for k in grid):
        raise UserError(f"--kl-grid {text!r}: give KLs in nats per sequence, comma-separated, e.g. 0.25,0.5,1")
    return sorted(set(grid))


def run_compare(args) -> int:
    from openrlhf_infalign import compare, report

    paths = [Path(p) for p in args.run_dir]
    if args.label is not None and len(args.label) != len(paths):
        raise UserError(
            f"{len(paths)} runs but {len(args.label)} --label: give one --label per run, in run order "
            f"(or none: each run is labelled with its directory's name)"
        )
    runs, by_name = [], {}
    for i, path in enumerate(paths):
        if not path.exists():
            raise UserError(f"run directory {path} does not exist")
        log = eval_log_path(path)
        label = args.label[i] if args.label is not None else log.parent.name
        by_name.setdefault(label, set()).add(str(log.parent.resolve()))
        runs.append({"run": str(path), "label": label, "records": load_eval_log(log)})
    result = compare.compare_runs(runs, baseline=args.baseline, kl_grid=_kl_grid(args.kl_grid))
    if args.label is None:
        for name, dirs in by_name.items():
            if len(dirs) > 1:
                result["notes"].append(
                    f"{len(dirs)} runs in different places share the directory name {name!r}: they are seeds of one "
                    f"arm; pass --label per run to separate them"
                )
    recorded = {r["records"][-1].get("k") for r in runs}
    k = args.k if args.k is not None else (recorded.pop() if len(recorded) == 1 else None)
    result["k"] = k
    result["theory"] = (
        "continuum (K -> infinity) calibrated-space frontiers"
        if k is None
        else f"K-aware frontiers: expected over stores of K = {k} reference samples per prompt"
    )
    out = Path(args.out) if getattr(args, "out", None) else Path("infalign_compare")
    out.mkdir(parents=True, exist_ok=True)

    arms: dict[str, list[list[dict]]] = {}
    for r in runs:
        arms.setdefault(r["label"], []).append(r["records"])
    transforms = {a["label"]: a["transform"] for a in result["arms"]}
    figures = {}
    for name, metric in result["metrics"].items():
        figures[name] = str(
            report.plot_arms_vs_kl(
                arms,
                transforms,
                metric["inference"],
                out / f"{name.lower()}_vs_kl.png",
                kl_grid=result["kl_grid"],
                with_optimal=not args.no_optimal,
                k=k,
            )
        )
    table = report.compare_markdown(result)
    md = out / "summary.md"
    result["files"] = {"figures": figures, "summary": str(md), "json": str(out / "compare.json")}
    header = [
        "# InfAlign runs side by side",
        "",
        f"runs: {', '.join(r['run'] for r in runs)}; baseline arm: `{result['baseline']}`; theory: {result['theory']}",
        "",
        "",
    ]
    footer = [""] + [f"![{name} vs KL]({Path(f).name})" for name, f in figures.items()] + [""]
    write_text(md, "\n".join(header) + table + "\n" + "\n".join(footer))
    write_json(out / "compare.json", result)
    if args.json:
        print(json.dumps(result))
    else:
        print(table)
        print(f"\nwrote {', '.join(figures.values())}, {md}, {out / 'compare.json'}")
    return 0
