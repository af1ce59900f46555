"""Plot a training run's inference-time win rates from RUN_DIR/infalign_eval.jsonl (PNG plots + Markdown summary).

Writes three files to --out. winrate_vs_n.png: Best-of-N and Worst-of-N win rate vs N at the last evaluation, with
the first evaluation drawn faint beside it. bon_vs_kl.png: the run's BoN_N (or WoN_N) win rate vs training KL
across evaluations, over the calibrated-space theory frontier of the run's transform, the identity (calibration
only) baseline and the optimal-transform ceiling. summary.md: step, KL, standard, BoN_N and WoN_N win rates with
standard errors (also printed). The record schema the training hook writes is documented in
openrlhf_infalign/evallog.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from openrlhf_infalign.errors import UserError
from openrlhf_infalign.evallog import eval_log_path, load_eval_log
from openrlhf_infalign.files import write_text


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the training run's save path (holds infalign_eval.jsonl)")
    parser.add_argument("--out", default=argparse.SUPPRESS, help="output directory (default: RUN_DIR/infalign_report)")
    parser.add_argument(
        "--no-optimal",
        action="store_true",
        help="leave the optimal-transform ceiling off the KL plot (it takes a fixed-point solve, ~1-2 s)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of the Markdown table")


def run(args) -> int:
    from openrlhf_infalign import report

    run_dir = Path(args.run_dir)
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
    header = [
        f"# InfAlign evaluation: {run_dir}",
        "",
        f"inference procedure: `{last.get('inference') or 'unknown'}`, transform: `{transform or 'unknown'}`, "
        f"beta: {'unknown' if last.get('beta') is None else format(last['beta'], '.4g')}, evaluations: {len(records)}",
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
                    "files": {"winrate_vs_n": str(vs_n), "bon_vs_kl": str(vs_kl), "summary": str(md)},
                }
            )
        )
    else:
        print(table)
        print(f"\nwrote {vs_n}, {vs_kl}, {md}")
    return 0
