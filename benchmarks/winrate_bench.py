"""Benchmark: the exact BoN/WoN win-rate estimator on 100k prompts x 32 samples a side, every N in 1..32.

Baseline in the same run: a plain `np.sort` of the same two arrays along the sample axis (the least any order-statistic
estimator has to do). The dense entry point and the ragged one (a list of one array per prompt, as the eval hook and
`infalign evaluate` pass) are timed against it, interleaved, best of --repeats each, so load on a shared machine hits
all three alike. Prints a table and one JSON line: {"bench": "winrate", "seconds": ..., "baseline_seconds": ...,
"ratio": ..., "ragged_ratio": ...}. Target (issue 20): both within 20x of the baseline.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from openrlhf_infalign.core.winrate import default_ns, win_rates, win_rates_dense


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--prompts", type=int, default=100_000, help="number of prompts P")
    parser.add_argument("--samples", type=int, default=32, help="samples per prompt on each side (M = K)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (the best is reported)")
    parser.add_argument("--ns", default="all", help="'all' (every N in 1..samples) or 'pow2' (1, 2, 4, ...)")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    # Rounded rewards so that ties (the slow, careful part) occur as they do with real reward models.
    policy = np.round(rng.normal(0.2, 1.0, size=(args.prompts, args.samples)), 2)
    reference = np.round(rng.normal(0.0, 1.0, size=(args.prompts, args.samples)), 2)
    ns = list(range(1, args.samples + 1)) if args.ns == "all" else default_ns(args.samples, args.samples)
    pol_rows, ref_rows = list(policy), list(reference)

    runs = {
        "baseline": lambda: (np.sort(policy, axis=1), np.sort(reference, axis=1)),
        "dense": lambda: win_rates_dense(policy, reference, ns),
        "ragged": lambda: win_rates(pol_rows, ref_rows, ns),
    }
    times = {name: [] for name in runs}
    for _ in range(args.repeats):  # interleaved: a burst of load elsewhere hits all three alike
        for name, fn in runs.items():
            times[name].append(best_of(fn, 1))
    baseline, dense, ragged = (min(times[name]) for name in runs)
    out = win_rates_dense(policy, reference, ns)

    print(f"{args.prompts} prompts x {args.samples} samples a side, N = {ns[0]}..{ns[-1]} ({len(ns)} values)")
    print(f"  np.sort baseline     {baseline:8.3f} s")
    print(f"  win_rates_dense      {dense:8.3f} s   ({dense / baseline:.1f}x the baseline)")
    print(f"  win_rates (ragged)   {ragged:8.3f} s   ({ragged / baseline:.1f}x the baseline)")
    print(f"  BoN_{ns[-1]} = {out['bon'][str(ns[-1])]['win_rate']:.4f} +- {out['bon'][str(ns[-1])]['stderr']:.4f}")
    print(
        json.dumps(
            {
                "bench": "winrate",
                "prompts": args.prompts,
                "samples": args.samples,
                "ns": len(ns),
                "seconds": round(dense, 4),
                "ragged_seconds": round(ragged, 4),
                "baseline_seconds": round(baseline, 4),
                "ratio": round(dense / baseline, 2),
                "ragged_ratio": round(ragged / baseline, 2),
                "target_ratio": 20.0,
                "within_target": max(dense, ragged) / baseline < 20.0,
            }
        )
    )


if __name__ == "__main__":
    main()
