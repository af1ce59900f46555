"""Plot training runs' inference-time win rates from RUN/infalign_eval.jsonl: one run, or several side by side.

One run: three files in --out. winrate_vs_n.png: Best-of-N and Worst-of-N win rate vs N at the last evaluation, with
the first evaluation drawn faint beside it. bon_vs_kl.png: the run's BoN_N (or WoN_N) win rate vs training KL
across evaluations, over the calibrated-space theory frontier of the run's transform, the identity (calibration
only) baseline and the optimal-transform ceiling. summary.md: step, KL, standard, BoN_N and WoN_N win rates with
standard errors (also printed). The record schema the training hook writes is documented in
openrlhf_infalign/evallog.py.

Several runs: runs sharing a --label are seeds of one arm, compared at matched KL (openrlhf_infalign/compare.py
says how: first- or sustained-crossing (--crossing) trajectories interpolated linearly, never extrapolated; seed mean and standard error;
differences to the baseline arm). Writes <metric>_vs_kl.png for BoN_N and WoN_N (N = 4 and the N the runs
trained for) and standard, summary.md (also printed) and compare.json (printed with --json).

RUN is a run's save path or an evaluation log file (RUN/infalign_eval_exact.jsonl: the exact evaluation). With
--noise RUN (runs of the noise control: rewards independent of the response) or --noise-floor NATS, the figures shade
the KL inside the noise floor and mark twice it, the tables say where each KL lies against it, and the default
matched KLs start at twice the floor. Existing report files are replaced only with --overwrite.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from openrlhf_infalign import options
from openrlhf_infalign.errors import UserError
from openrlhf_infalign.evallog import EVAL_LOG, eval_log_path, load_eval_log
from openrlhf_infalign.files import check_output_dir, check_output_file, write_json, write_text
from openrlhf_infalign.options import option

GROUPS = {"one": "one or several runs", "noise": "the noise floor", "compare": "several runs"}


@dataclass(kw_only=True)
class ReportSettings:
    """`infalign report`: one run's plots and table, or several runs side by side at matched KL."""

    run_dir: List[str] = option(
        flags=("run_dir",),
        positional=True,
        nargs="+",
        metavar="RUN",
        group="one",
        help="a training run's save path (holds infalign_eval.jsonl) or an evaluation log file (e.g. "
        "RUN/infalign_eval_exact.jsonl); several: compared side by side",
    )
    out: Optional[str] = option(
        None,
        flags=("--out",),
        group="one",
        doc_default="RUN/infalign_report (a log file's: beside it, NAME_report), ./infalign_compare for several",
        help="output directory (its other files are never touched)",
    )
    overwrite: bool = option(
        False,
        flags=("--overwrite",),
        group="one",
        help="replace the report's own files in --out (summary.md, the figures, compare.json) when they exist",
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
    noise: Optional[List[str]] = option(
        None,
        flags=("--noise",),
        append=True,
        metavar="RUN",
        group="noise",
        help="a run of the noise control (rewards independent of the response, every other flag the same), its "
        "save path or log file; repeatable. The noise floor is the largest KL any of them reached at any evaluation",
    )
    noise_floor: Optional[float] = option(
        None,
        flags=("--noise-floor",),
        metavar="NATS",
        group="noise",
        help="the noise floor in nats, measured elsewhere (instead of --noise)",
    )
    crossing: str = option(
        "first",
        flags=("--crossing",),
        choices=("first", "sustained"),
        group="noise",
        help="which evaluations define a run's KL trajectory and the noise floor: 'first', each one above every "
        "earlier KL; 'sustained', a KL counts once two consecutive evaluations reach it (a one-evaluation KL spike "
        "then defines nothing)",
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
        doc_default="a few KLs every arm covers, from 2x the noise floor up",
        help="matched KLs (nats per sequence) for the table, e.g. 0.25,0.5,1",
    )
    k: Optional[int] = option(
        None,
        flags=("--k",),
        group="compare",
        doc_default="the K the runs recorded, when they agree",
        help="the store's K (reference samples per prompt, >= 2) for the K-aware theory curves",
    )


def add_arguments(parser) -> None:
    options.add_arguments(parser, ReportSettings, groups=GROUPS)


def run(args) -> int:
    # Everything that needs no file is checked first: a bad flag costs nothing, and nothing is half written.
    if args.k is not None and args.k < 2:
        raise UserError(f"--k {args.k}: K, the store's reference samples per prompt, is an integer >= 2")
    if args.noise_floor is not None and (args.noise or not (math.isfinite(args.noise_floor) and args.noise_floor > 0)):
        raise UserError(
            f"--noise-floor {args.noise_floor}: give the floor as a positive KL in nats, e.g. 0.3"
            if not args.noise
            else "give the noise floor one way: --noise RUN (measured here) or --noise-floor NATS, not both"
        )
    if args.out is not None:
        check_output_dir(args.out, flag="--out")
    if len(args.run_dir) > 1:
        return run_compare(args)
    flags = {"--label": args.label, "--baseline": args.baseline, "--kl-grid": args.kl_grid, "--k": args.k}
    given = [flag for flag, value in flags.items() if value is not None]
    if given:
        raise UserError(f"{', '.join(given)} compare several runs: give two or more RUNs, or drop the flag")
    return run_single(args, args.run_dir[0])


def _load(path, label=None, what: str = "run") -> dict:
    from openrlhf_infalign.compare import load_run

    if not Path(path).exists():
        raise UserError(f"{what} {path} does not exist: give a run's save path or its evaluation log file")
    return load_run(path, label)


def _noise_floor(args) -> dict | None:
    from openrlhf_infalign.compare import noise_floor

    runs = [_load(p, what="noise run") for p in args.noise or []]
    return noise_floor(runs, args.noise_floor, crossing=args.crossing)


def _outputs(out: Path, names: list[str], args, inputs: list) -> dict[str, Path]:
    """Every file the report will write, checked before any is: none an input, none there unless --overwrite."""
    return {
        name: check_output_file(out / name, overwrite=args.overwrite, flag="--out", inputs=inputs) for name in names
    }


def _steps(records: list[dict], keep) -> list[int]:
    return [r["step"] for r in records if r.get("kl") is not None and keep(r["kl"])]


def run_single(args, run_dir) -> int:
    from openrlhf_infalign import report

    floor = _noise_floor(args)
    run = _load(run_dir)
    log, records = Path(run["path"]), run["records"]
    default = "infalign_report" if log.name == EVAL_LOG else f"{log.stem}_report"
    out = Path(args.out) if args.out is not None else Path(eval_log_path(run_dir)).parent / default
    inputs = [run["path"]] + [r["path"] for r in (floor or {}).get("runs", [])]
    files = _outputs(out, ["winrate_vs_n.png", "bon_vs_kl.png", "summary.md"], args, inputs)
    kind, n, transform = report.run_metric(records)
    label = {"bon": f"BoN_{n}", "won": f"WoN_{n}", "standard": "standard"}[kind]
    first, last = records[0], records[-1]
    nats = floor["nats"] if floor else None

    out.mkdir(parents=True, exist_ok=True)
    vs_n = report.plot_winrate_vs_n(
        last,
        files["winrate_vs_n.png"],
        title=f"Win rate vs N at step {last['step']} ({last.get('num_prompts', '?')} prompts; bars: 95% CI)",
        baseline=first if first is not last else None,
        baseline_label=f"step {first['step']}",
        result_label=f"step {last['step']}",
        transform=transform,
        kl=last.get("kl"),
        overwrite=args.overwrite,
    )
    vs_kl = report.plot_winrate_vs_kl(
        records,
        files["bon_vs_kl.png"],
        kind,
        n,
        transform,
        with_optimal=not args.no_optimal,
        noise_floor=nats,
        overwrite=args.overwrite,
    )
    table = report.summary_markdown(records, kind if kind != "standard" else "bon", n)
    plan = report.planned_point(records, kind, n)
    end = report.end_point(records, kind, n)
    where = ""
    if end and nats and end["kl"] < 2 * nats:
        where = " (inside the noise floor)" if end["kl"] <= nats else " (below twice the noise floor)"
    plan_line = (
        f"plan: KL {plan['kl']:g} nats, {label} {plan['win_rate']:.4f} (planned beta {plan['beta']:.4g}, "
        f"K = {plan['k'] or 'infinity'}); the run ended at "
        + (
            f"KL {end['kl']:.4g}{where}, {label} {end['win_rate']:.4f} (step {end['step']})"
            if end
            else "an unmeasured KL"
        )
        if plan
        else "plan: none recorded (no KL budget)"
    )
    inside = _steps(records, lambda kl: kl <= nats) if nats else []
    near = _steps(records, lambda kl: nats < kl < 2 * nats) if nats else []
    floor_lines = []
    if floor:
        floor_lines = [report.noise_floor_words(floor) + " The figure shades KL inside it and marks twice it."]
        if inside or near:
            parts = ([f"steps {', '.join(map(str, inside))} lie inside the floor"] if inside else []) + (
                [f"steps {', '.join(map(str, near))} below twice it"] if near else []
            )
            floor_lines.append(f"Evaluations: {'; '.join(parts)}: win rates there are within the optimiser's noise.")
        floor_lines.append("")
    header = [
        f"# InfAlign evaluation: {run_dir}",
        "",
        f"inference procedure: `{last.get('inference') or 'unknown'}`, transform: `{transform or 'unknown'}`, "
        f"beta: {'unknown' if last.get('beta') is None else format(last['beta'], '.4g')}, evaluations: {len(records)}",
        "",
        plan_line,
        "",
        *floor_lines,
        "Win rates against the reference (base) policy, ± prompt-level standard error; 0.5 = no change.",
        "",
        "",
    ]
    footer = ["", f"![win rate vs N]({vs_n.name})", "", f"![{label} vs KL]({vs_kl.name})", ""]
    md = write_text(
        files["summary.md"], "\n".join(header) + table + "\n" + "\n".join(footer), overwrite=args.overwrite
    )

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
                    "noise_floor": floor,
                    "evaluations_inside_noise_floor": inside if floor else None,
                    "evaluations_below_twice_noise_floor": sorted(inside + near) if floor else None,
                    "files": {"winrate_vs_n": str(vs_n), "bon_vs_kl": str(vs_kl), "summary": str(md)},
                }
            )
        )
    else:
        print(plan_line)
        for line in floor_lines[:-1]:
            print(line)
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
    grid = _kl_grid(args.kl_grid)
    runs = [_load(p, args.label[i] if args.label is not None else None) for i, p in enumerate(paths)]
    floor = _noise_floor(args)
    result = compare.compare_runs(runs, baseline=args.baseline, kl_grid=grid, noise=floor, crossing=args.crossing)
    if args.label is None:
        by_name: dict[str, set] = {}
        for r in runs:
            by_name.setdefault(r["label"], set()).add(str(Path(r["path"]).parent))
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
    out = Path(args.out) if args.out is not None else Path("infalign_compare")
    figure_names = {name: f"{name.lower()}_vs_kl.png" for name in result["metrics"]}
    inputs = [r["path"] for r in runs] + [r["path"] for r in (floor or {}).get("runs", [])]
    files = _outputs(out, [*figure_names.values(), "summary.md", "compare.json"], args, inputs)

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
                files[figure_names[name]],
                kl_grid=result["kl_grid"],
                with_optimal=not args.no_optimal,
                k=k,
                noise_floor=floor["nats"] if floor else None,
                overwrite=args.overwrite,
                crossing=args.crossing,
            )
        )
    table = report.compare_markdown(result)
    md = files["summary.md"]
    result["files"] = {"figures": figures, "summary": str(md), "json": str(files["compare.json"])}
    header = [
        "# InfAlign runs side by side",
        "",
        f"runs: {', '.join(r['run'] for r in runs)}; baseline arm: `{result['baseline']}`; theory: {result['theory']}",
        "",
        "",
    ]
    footer = [""] + [f"![{name} vs KL]({Path(f).name})" for name, f in figures.items()] + [""]
    write_text(md, "\n".join(header) + table + "\n" + "\n".join(footer), overwrite=args.overwrite)
    write_json(files["compare.json"], result, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(result))
    else:
        print(table)
        print(f"\nwrote {', '.join(figures.values())}, {md}, {files['compare.json']}")
    return 0
