"""Benchmark: the exact BoN/WoN win-rate estimator on 100k prompts x 32 samples a side, every N in 1..32 (powers of 2).

Baseline in the same run: a plain `np.sort` of the same two arrays along the sample axis (the least any order-statistic
estimator has to do). Prints a table and one JSON line: {"bench": "winrate", "seconds": ..., "baseline_seconds": ...,
"ratio": ..., ...}. The issue's target is < 5 s on a 2-core machine.
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
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions (the best is reported)")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    # Rounded rewards so that ties (the slow, careful part) occur as they do with real reward models.
    policy = np.round(rng.normal(0.2, 1.0, size=(args.prompts, args.samples)), 2)
    reference = np.round(rng.normal(0.0, 1.0, size=(args.prompts, args.samples)), 2)
    ns = default_ns(args.samples, args.samples)

    baseline = best_of(lambda: (np.sort(policy, axis=1), np.sort(reference, axis=1)), args.repeats)
    dense = best_of(lambda: win_rates_dense(policy, reference, ns), args.repeats)
    # The ragged entry point on the same data (one row per prompt, grouped by (M, K) internally).
    pol_rows, ref_rows = list(policy), list(reference)
    ragged = best_of(lambda: win_rates(pol_rows, ref_rows, ns), 1)
    out = win_rates_dense(policy, reference, ns)

    print(f"{args.prompts} prompts x {args.samples} samples a side, N = {ns}")
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
                "ns": ns,
                "seconds": round(dense, 4),
                "ragged_seconds": round(ragged, 4),
                "baseline_seconds": round(baseline, 4),
                "ratio": round(dense / baseline, 2),
                "target_seconds": 5.0,
                "within_target": dense < 5.0,
            }
        )
    )


if __name__ == "__main__":
    main()
