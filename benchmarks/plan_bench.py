"""Benchmark: `infalign plan` for one case (t search + the exact optimum + baselines), in-process and as a process.

Baselines in the same run: one frontier point (beta_for_kl + win rate for exp:t=10 at the same KL: the unit of work
the t search repeats) and the bare start of a Python process that imports numpy (what any CLI pays). Prints a table
and one JSON line: {"bench": "plan", "seconds": ..., "subprocess_seconds": ..., "baseline_seconds": ..., "ratio": ...}.
The issue's target is < 2 s for one case on a 2-core machine, process start included.

Scale (issue 20): `plan` at K = 16, 1,000 and 100,000 reference samples per prompt and at N = 1,000,000 (with and
without K), each in a fresh process: its time and its peak resident memory (VmHWM), beside the peak of a
process that only imports the planner (the floor), and its CPU time (what a busy shared machine does not inflate).
Targets: <= 10 s and <= 1 GB per case.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from openrlhf_infalign.core import planning


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def run_cli(argv: list[str]) -> None:
    r = subprocess.run([sys.executable, "-m", "openrlhf_infalign", *argv], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"infalign {' '.join(argv)} failed: {r.stderr.strip()}")


SCALE_SNIPPET = r"""
import json, sys, time
from openrlhf_infalign.core import planning
inference, kl, k = sys.argv[1], float(sys.argv[2]), None if sys.argv[3] == "none" else int(sys.argv[3])
start, cpu = time.perf_counter(), time.process_time()
p = planning.plan(inference, kl, k=k) if inference != "-" else None
seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
# VmHWM: this process image's peak resident memory (ru_maxrss would carry a big parent's over exec).
peak = int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")).split()[1]) * 1024
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_bytes": peak,
                  "win_rate": p and p["recommended"]["win_rate"],
                  "transform": p and p["recommended"]["transform"], "optimal": bool(p and "optimal" in p)}))
"""


def scale_cases(spec: str) -> dict:
    """Each inference@kl@k case in a fresh process: plan time, peak RSS, the recommended win rate."""

    def one(inference, kl, k):
        r = subprocess.run([sys.executable, "-c", SCALE_SNIPPET, inference, kl, k], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"plan {inference} kl={kl} k={k} failed: {r.stderr.strip()[-500:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    floor = one("-", "1", "none")["peak_bytes"]
    print(f"scale (each case in its own process; import-only process peak {floor / 2**20:.0f} MiB):")
    print(f"{'case':>26}  {'seconds':>8}  {'cpu s':>6}  {'peak MiB':>9}  {'win rate':>9}  transform")
    rows = {}
    for case in spec.split(","):
        inference, kl, k = case.split("@")
        got = one(inference, kl, k)
        rows[case] = got
        print(
            f"{case:>26}  {got['seconds']:8.2f}  {got['cpu_seconds']:6.2f}  {got['peak_bytes'] / 2**20:9.0f}  "
            f"{got['win_rate']:9.6f}  "
            f"{got['transform']}{'' if got['optimal'] else ' (optimum left out)'}"
        )
    within = all(min(r["seconds"], r["cpu_seconds"]) <= 10 and r["peak_bytes"] <= 2**30 for r in rows.values())
    return {"floor_peak_bytes": floor, "cases": rows, "within_target": within}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument(
        "--cases",
        default="bon:4@0.5,bon:2@0.25,bon:8@1,bon:32@0.5,won:4@0.5,standard@0.5",
        help="comma-separated inference@kl cases timed in-process; the first is also timed as a subprocess",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (the best is reported)")
    parser.add_argument(
        "--scale",
        default="bon:4@0.5@16,bon:4@0.5@1000,bon:4@0.5@100000,bon:32@0.5@100000,won:32@0.5@100000,"
        "bon:1000000@0.5@none,bon:1000000@0.5@100000,bon:10000000@0.5@none",
        help="inference@kl@k cases timed for scale, each in its own process (k 'none': the continuum)",
    )
    parser.add_argument("--scale-only", action="store_true", help="only the scale cases")
    args = parser.parse_args()
    scale = scale_cases(args.scale)
    if args.scale_only:
        print(json.dumps({"bench": "plan_scale", **scale}))
        return
    cases = [(c.split("@")[0], float(c.split("@")[1])) for c in args.cases.split(",")]

    planning.plan(*cases[0])  # first call builds the grid; not what a user waits for twice, but counted below too
    inf0, kl0 = cases[0]
    point = best_of(lambda: planning.frontier(inf0, "exp:t=10", [kl0]), args.repeats * 3)
    rows = []
    for inf, kl in cases:
        full = best_of(lambda: planning.plan(inf, kl), args.repeats)
        fast = best_of(lambda: planning.plan(inf, kl, with_optimal=False), args.repeats)
        p = planning.plan(inf, kl)
        rows.append((inf, kl, full, fast, p))

    argv = ["plan", "--inference", inf0, "--kl-budget", str(kl0), "--json"]
    sub = best_of(lambda: run_cli(argv), args.repeats)
    # The K-aware plan (betas from the expected KL over stores with K = 16 and 64 reference samples per prompt).
    sub_k = {k: best_of(lambda: run_cli(argv + ["--k", str(k)]), args.repeats) for k in (16, 64)}
    start = best_of(
        lambda: subprocess.run([sys.executable, "-c", "import numpy"], check=True, capture_output=True), args.repeats
    )

    print(f"one frontier point (exp:t=10, {inf0}, KL {kl0}): {point * 1e3:7.2f} ms   <- baseline")
    print(f"{'case':>16}  {'plan (s)':>9}  {'no optimum':>10}  {'x point':>8}  {'recommended':>16}  {'gap':>7}  iters")
    for inf, kl, full, fast, p in rows:
        print(
            f"{inf + '@' + format(kl, 'g'):>16}  {full:9.3f}  {fast:10.3f}  {full / point:8.0f}  "
            f"{p['recommended']['transform']:>16}  {p['gap_to_optimal']:7.4f}  {p['optimal']['iterations']}"
        )
    print(f"`infalign plan --inference {inf0} --kl-budget {kl0:g} --json` as a process: {sub:.3f} s")
    for k, sec in sub_k.items():
        print(f"  ... with --k {k}:{' ' * 37}{sec:.3f} s")
    print(f"bare `python -c 'import numpy'` process:                    {start:.3f} s")
    full0 = rows[0][2]
    print(
        json.dumps(
            {
                "bench": "plan",
                "case": f"{inf0}@{kl0:g}",
                "seconds": round(full0, 4),
                "subprocess_seconds": round(sub, 4),
                "subprocess_seconds_k": {str(k): round(v, 4) for k, v in sub_k.items()},
                "process_start_seconds": round(start, 4),
                "baseline_seconds": round(point, 5),
                "ratio": round(full0 / point, 1),
                "all_cases_seconds": {f"{i}@{k:g}": round(f, 4) for i, k, f, _, _ in rows},
                "target_seconds": 2.0,
                "within_target": max(sub, *sub_k.values()) < 2.0 and max(r[2] for r in rows) < 2.0,
                "scale": scale,
            }
        )
    )


if __name__ == "__main__":
    main()
