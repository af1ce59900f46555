"""Several runs at matched KL: trajectories on a common KL grid, seeds aggregated per arm, differences to a baseline.

Used by `infalign report RUN [RUN ...]`; reads records of the evaluation log (schema in evallog.py). numpy only.

Trajectory of one run (a seed): its evaluations in step order, keeping only those whose KL exceeds every earlier
one (the first crossing of each KL level). A run's KL can go back and forth; first crossing makes KL strictly
increasing, so win rate is a function of KL, and each KL level is read when the run first got there (later visits
at a lower KL are left out rather than averaged with earlier steps, which sorting by KL would do). The win rate and
its within-run evaluation standard error are interpolated linearly in KL, only inside [first KL, largest KL] of that
run: outside it the value is NaN (no extrapolation). Records without a measured KL are left out.

Sustained crossing (``crossing="sustained"``, `report --crossing sustained`): a KL level counts as reached only when
two consecutive evaluations reach it, and the crossing is read at the lower of the two. An evaluation whose KL is
above both neighbours' (a one-evaluation spike: the actor really was there, a conditional flipped for one update)
then never defines a crossing; the last evaluation, with no successor, cannot confirm a level and is left out. The
noise floor follows the same rule (the largest KL a noise run held for two consecutive evaluations).

Runs are refused when the same run is given twice (the same evaluation log by path, the sampled and the exact log
of one run directory, or logs with identical records: a copy), and an arm is refused when its runs were trained for
different inference procedures, store K or transforms (they are not seeds of one arm).

Noise floor: the KL the optimiser reaches with no signal at all, measured by runs of the noise control (rewards
independent of the response, every other flag the same). The floor is the largest KL any noise run reached at any
evaluation (or a number of nats given). A matched KL inside the floor, or below twice it, compares optimiser noise,
not methods: the default grid starts at twice the floor, and every grid KL says where it lies.

Arm (runs sharing a label, its seeds): at a grid KL every one of its S seeds must cover it, else NaN. With
x_s the seeds' interpolated win rates and e_s their interpolated within-run standard errors:

    mean = (1/S) sum_s x_s
    se   = sqrt( var_between / S + mean_s(e_s^2) / S ),    var_between = sum_s (x_s - mean)^2 / (S - 1)

and with S = 1, se = e_1 (the within-run standard error). Exact evaluation logs (stderr 0) give the standard error of
the seeds alone. Difference of arm a to the baseline arm b at one KL:
d = mean_a - mean_b with se_d = sqrt(se_a^2 + se_b^2) (arms are independent runs).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np

from openrlhf_infalign.evallog import EVAL_LOG, EXACT_LOG, eval_log_path, load_eval_log

__all__ = [
    "load_run",
    "run_label",
    "noise_floor",
    "records_digest",
    "metric_name",
    "metric_stat",
    "run_kl_range",
    "trajectory",
    "interpolate",
    "aggregate_seeds",
    "difference",
    "common_kl_range",
    "default_kl_grid",
    "arm_at_kl",
    "compared_metrics",
    "compare_runs",
]


def records_digest(records: list[dict]) -> str:
    """sha256 of a run's records in a canonical JSON form: equal for two copies of one log, however written."""
    text = json.dumps(records, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def run_label(log: Path) -> str:
    """The default label of a run from its log's path: the run directory's name for a log the project names
    (infalign_eval.jsonl, infalign_eval_exact.jsonl), else the file's own name without .jsonl."""
    log = Path(log)
    return log.parent.resolve().name if log.name in (EVAL_LOG, EXACT_LOG) else log.stem


def load_run(path, label: str | None = None) -> dict:
    """One run for compare_runs from its save path (or its log file): {"run", "label" (default: run_label),
    "records", "path" (the log's resolved path), "digest" (records_digest)}."""
    log = eval_log_path(path)
    records = load_eval_log(log)
    return {
        "run": str(path),
        "label": label if label is not None else run_label(log),
        "records": records,
        "path": str(Path(os.path.realpath(log))),
        "digest": records_digest(records),
    }


def _check_distinct(runs: list[dict]) -> None:
    """The same run given twice would count as two seeds (and shrink the standard error): refused."""
    by_path: dict[str, str] = {}
    by_dir: dict[str, str] = {}
    by_content: dict[str, str] = {}
    for run in runs:
        if run.get("path"):
            key = os.path.realpath(run["path"])
            if key in by_path:
                raise ValueError(
                    f"run {run['run']} is the same run as {by_path[key]} (both read {key}): give each run once; "
                    "seeds are separate training runs"
                )
            by_path[key] = run["run"]
            # The sampled and the exact log of one run directory are two evaluations of one training run.
            if Path(key).name in (EVAL_LOG, EXACT_LOG):
                folder = os.path.dirname(key)
                if folder in by_dir:
                    raise ValueError(
                        f"runs {by_dir[folder]} and {run['run']} are two evaluation logs of one training run "
                        f"({folder}): give one log per run"
                    )
                by_dir[folder] = run["run"]
        digest = records_digest(run["records"])
        if digest in by_content:
            raise ValueError(
                f"runs {by_content[digest]} and {run['run']} have identical evaluation logs: the same run given twice "
                "(a copy?); give each run once"
            )
        by_content[digest] = run["run"]


def noise_floor(
    noise_runs: list[dict] | None = None, nats: float | None = None, crossing: str = "first"
) -> dict | None:
    """The noise floor, JSON-ready: {"nats", "source", "crossing", "runs"}; None when neither is given.

    noise_runs (load_run dicts): runs of the noise control; the floor is the largest KL any of them reached, at any
    evaluation ("first") or held for two consecutive evaluations ("sustained"); "runs" records each one's
    ({"run", "path", "floor_kl": its KL by that rule, "max_kl" and "step_of_max": its largest at any evaluation,
    "trajectory": [{"step", "kl"}, ...]}). nats: a floor measured elsewhere ("runs" empty). Not both."""
    if noise_runs and nats is not None:
        raise ValueError("give the noise floor one way: --noise RUN (measured here) or --noise-floor NATS, not both")
    if nats is not None:
        if not (isinstance(nats, (int, float)) and math.isfinite(nats) and nats > 0):
            raise ValueError(f"--noise-floor {nats!r}: give the floor as a positive KL in nats, e.g. 0.3")
        return {"nats": float(nats), "source": "given (--noise-floor)", "crossing": None, "runs": []}
    if not noise_runs:
        return None
    _check_distinct(noise_runs)
    entries = []
    for run in noise_runs:
        points = [{"step": r["step"], "kl": float(r["kl"])} for r in run["records"] if r.get("kl") is not None]
        top = max(points, key=lambda p: p["kl"], default=None)
        held = crossings(run["records"], crossing)
        if top is None or top["kl"] <= 0 or not held or held[-1]["kl"] <= 0:
            raise ValueError(
                f"noise run {run['run']} has no evaluation with a KL above 0"
                + (" held for two consecutive evaluations" if crossing == "sustained" else "")
                + ": it cannot measure a floor (was it trained, and its KL measured?); give a run that trained, or "
                "--noise-floor NATS"
            )
        entries.append(
            {
                "run": run["run"],
                "path": run.get("path"),
                "floor_kl": float(held[-1]["kl"]),
                "max_kl": top["kl"],
                "step_of_max": top["step"],
                "trajectory": points,
            }
        )
    n = len(entries)
    reached = "reached at any evaluation" if crossing == "first" else "held for two consecutive evaluations"
    return {
        "nats": max(e["floor_kl"] for e in entries),
        "source": f"the largest KL {'the noise run' if n == 1 else f'any of the {n} noise runs'} (rewards "
        f"independent of the response) {reached}",
        "crossing": crossing,
        "runs": entries,
    }


def floor_flags(grid, floor: dict | None) -> tuple[list | None, list | None]:
    """Per grid KL: inside the noise floor (KL <= floor), below twice it (KL < 2 floor); (None, None) without one."""
    if floor is None:
        return None, None
    f = floor["nats"]
    return [bool(k <= f) for k in grid], [bool(k < 2 * f) for k in grid]


# What runs under one label must share to be seeds of one arm, and its words in the error.
_ARM_FIELDS = (
    ("inference", "inference procedures"),
    ("k", "store K (reference samples per prompt)"),
    ("transform", "transforms"),
)


def _field(records: list[dict], key: str):
    v = records[-1].get(key)
    return v.strip().lower() if isinstance(v, str) else v


def _check_arm(label: str, members: list[dict]) -> None:
    for key, words in _ARM_FIELDS:
        values = {run["run"]: _field(run["records"], key) for run in members}
        if len(set(map(repr, values.values()))) > 1:
            listed = ", ".join(f"{r}: {v if v is not None else 'not recorded'}" for r, v in values.items())
            raise ValueError(
                f"arm {label!r} mixes runs trained for different {words} ({listed}): runs under one label are seeds "
                "of one arm; give each its own --label"
            )


def metric_name(inference: str) -> str:
    """'bon:4' -> 'BoN_4', 'won:4' -> 'WoN_4', 'standard' -> 'standard'."""
    kind, _, n = inference.partition(":")
    return {"bon": f"BoN_{n}", "won": f"WoN_{n}"}.get(kind, "standard")


def metric_stat(record: dict, inference: str) -> dict | None:
    """The record's {'win_rate', 'stderr'} for an inference procedure (standard, bon:N, won:N), None if absent."""
    kind, _, n = inference.partition(":")
    if kind == "standard":
        return record.get("standard")
    return (record.get(kind) or {}).get(n)


CROSSINGS = ("first", "sustained")


def crossings(records: list[dict], crossing: str = "first") -> list[dict]:
    """The records that define a run's trajectory, in step order, KL strictly increasing (module docstring):
    "first": each record whose KL exceeds every earlier one; "sustained": of each two consecutive evaluations the
    lower, when its KL exceeds every earlier such."""
    measured = [r for r in sorted(records, key=lambda r: r["step"]) if r.get("kl") is not None]
    if crossing == "first":
        candidates = measured
    elif crossing == "sustained":
        candidates = [a if a["kl"] <= b["kl"] else b for a, b in zip(measured, measured[1:])]
    else:
        raise ValueError(f"crossing {crossing!r}: give one of {', '.join(CROSSINGS)}")
    kept, top = [], -math.inf
    for r in candidates:
        if r["kl"] > top:
            kept.append(r)
            top = r["kl"]
    return kept


def run_kl_range(records: list[dict], crossing: str = "first") -> tuple[float, float] | None:
    """[first KL, largest KL] of a run's trajectory, or None when no evaluation has a measured KL (or, sustained,
    fewer than two)."""
    kept = crossings(records, crossing)
    return (float(kept[0]["kl"]), float(kept[-1]["kl"])) if kept else None


def trajectory(
    records: list[dict], inference: str, crossing: str = "first"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(step, kl, win_rate, stderr) of a run's trajectory for one metric (first or sustained crossings), KL strictly
    increasing."""
    pts = [(r["step"], r["kl"], metric_stat(r, inference)) for r in crossings(records, crossing)]
    pts = [(s, k, st) for s, k, st in pts if st is not None]
    return (
        np.array([p[0] for p in pts], dtype=int),
        np.array([p[1] for p in pts], dtype=float),
        np.array([p[2]["win_rate"] for p in pts], dtype=float),
        np.array([p[2]["stderr"] for p in pts], dtype=float),
    )


def interpolate(kl: np.ndarray, values: np.ndarray, grid) -> np.ndarray:
    """Piecewise-linear values at the grid KLs, NaN outside [kl[0], kl[-1]] (kl strictly increasing)."""
    grid = np.asarray(grid, dtype=float)
    out = np.full(grid.shape, np.nan)
    if kl.size == 0:
        return out
    inside = (grid >= kl[0]) & (grid <= kl[-1])
    out[inside] = np.interp(grid[inside], kl, values)
    return out


def aggregate_seeds(win: np.ndarray, stderr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, se) across seeds from (S, G) arrays of interpolated win rates and within-run standard errors.

    Formula in the module docstring; a grid point that any seed leaves NaN is NaN.
    """
    win, stderr = np.atleast_2d(np.asarray(win, dtype=float)), np.atleast_2d(np.asarray(stderr, dtype=float))
    s = win.shape[0]
    mean = win.mean(axis=0)
    if s == 1:
        return mean, stderr[0].copy()
    between = win.var(axis=0, ddof=1)
    return mean, np.sqrt(between / s + (stderr**2).mean(axis=0) / s)


def difference(mean_a, se_a, mean_b, se_b) -> tuple[np.ndarray, np.ndarray]:
    """Arm a minus arm b and its standard error sqrt(se_a^2 + se_b^2) (independent arms)."""
    mean_a, se_a, mean_b, se_b = (np.asarray(x, dtype=float) for x in (mean_a, se_a, mean_b, se_b))
    return mean_a - mean_b, np.sqrt(se_a**2 + se_b**2)


def common_kl_range(ranges: list[tuple[float, float]]) -> tuple[float, float] | None:
    """The KL interval every range covers, None when they do not overlap (or meet in a single point)."""
    lo, hi = max(r[0] for r in ranges), min(r[1] for r in ranges)
    return (lo, hi) if hi > lo else None


def default_kl_grid(kl_range: tuple[float, float] | None, points: int = 4, start: float | None = None) -> list[float]:
    """A few KLs strictly inside the common range (at 1/5 ... 4/5 of it), to 3 significant digits when that keeps
    them inside; empty when there is no common range.

    start (twice the noise floor, when known): no KL below it. When it lies inside the range, the grid is start
    itself and points-1 KLs evenly above it (start + i (hi - start) / points); at or past the range's end, empty."""
    if kl_range is None:
        return []
    lo, hi = kl_range
    if start is not None and start > lo:
        if start >= hi:
            return []
        grid = []
        for x in start + (hi - start) * np.arange(points) / points:
            r = float(f"{x:.3g}")
            grid.append(r if start <= r < hi else float(x))
        return grid
    grid = []
    for x in lo + (hi - lo) * np.arange(1, points + 1) / (points + 1):
        r = float(f"{x:.3g}")
        grid.append(r if lo < r < hi else float(x))
    return grid


def arm_at_kl(seeds: list[list[dict]], inference: str, grid, crossing: str = "first") -> tuple[np.ndarray, np.ndarray]:
    """(mean, se) of one arm at the grid KLs: each seed's trajectory interpolated, then aggregated."""
    curves = [trajectory(records, inference, crossing) for records in seeds]
    win = np.array([interpolate(kl, w, grid) for _, kl, w, _ in curves])
    err = np.array([interpolate(kl, e, grid) for _, kl, _, e in curves])
    return aggregate_seeds(win, err)


def compared_metrics(runs: list[list[dict]], default_n: int = 4) -> list[str]:
    """BoN_N and WoN_N for every N the runs trained for (their records' `inference`) and N = default_n, then
    standard; as inference specs, only those some record has."""
    ns = {default_n}
    for records in runs:
        kind, _, n = str(records[-1].get("inference") or "").strip().lower().partition(":")
        if kind in ("bon", "won") and n.isdigit() and int(n) >= 1:
            ns.add(int(n))
    specs = [f"{kind}:{n}" for n in sorted(ns) for kind in ("bon", "won")] + ["standard"]
    return [s for s in specs if any(metric_stat(r, s) is not None for records in runs for r in records)]


def _is_identity(transform) -> bool:
    return str(transform or "").strip().lower() == "identity"


def _json_list(a) -> list:
    return [None if not math.isfinite(x) else float(x) for x in np.asarray(a, dtype=float)]


def compare_runs(
    runs: list[dict],
    baseline: str | None = None,
    kl_grid=None,
    default_n: int = 4,
    noise: dict | None = None,
    crossing: str = "first",
) -> dict:
    """Arms side by side at matched KL, JSON-ready (NaN written as null).

    runs: [{"run": name, "label": arm label, "records": evaluation log records, optional "path": the log's path}]
    (load_run builds one), in the user's order; runs sharing a label are seeds of one arm. A run given twice, or an
    arm whose runs differ in inference procedure, K or transform, is a ValueError. baseline: the arm differences are taken to (default: the arm whose
    transform is identity, else the first arm). kl_grid: matched KLs (default: default_kl_grid of the range
    every arm covers, from twice the noise floor up; empty, with a note, when there is none). noise: noise_floor's
    dict (or None); the result carries it as "noise_floor", and per grid KL "inside_noise_floor" and
    "below_twice_noise_floor" (lists beside "kl_grid"; null without a floor). crossing: which evaluations define
    each run's trajectory ("first" or "sustained", module docstring); the result says which.
    """
    if crossing not in CROSSINGS:
        raise ValueError(f"crossing {crossing!r}: give one of {', '.join(CROSSINGS)}")
    _check_distinct(runs)
    arms: dict[str, list[dict]] = {}
    for run in runs:
        arms.setdefault(run["label"], []).append(run)
    for label, members in arms.items():
        _check_arm(label, members)
    notes = []
    arm_info = []
    for label, members in arms.items():
        ranges = []
        seeds = []
        for run in members:
            rng = run_kl_range(run["records"], crossing)
            if rng is None:
                raise ValueError(
                    f"run {run['run']} has no evaluation with a measured KL"
                    + (" (sustained crossings need two)" if crossing == "sustained" else "")
                    + ": it cannot be put at matched KL"
                )
            ranges.append(rng)
            last = run["records"][-1]
            seeds.append(
                {"run": run["run"], "final_step": last["step"], "final_kl": last.get("kl"), "kl_range": list(rng)}
            )
        arm_range = common_kl_range(ranges) if len(ranges) > 1 else ranges[0]
        if len(members) == 1 and all(r["standard"]["stderr"] == 0 for r in members[0]["records"]):
            # An exact evaluation has no sampling error; one seed says nothing of the seed-to-seed spread.
            notes.append(
                f"arm {label!r}: one seed, evaluated exactly (stderr 0): its se of 0 leaves out the spread between "
                "seeds; run more seeds for a standard error"
            )
        if arm_range is None:
            notes.append(f"arm {label!r}: its seeds' KL ranges do not overlap, so it has no value at any matched KL")
        arm_info.append(
            {
                "label": label,
                "transform": members[0]["records"][-1].get("transform"),
                "inference": members[0]["records"][-1].get("inference"),
                "seeds": len(members),
                "kl_range": None if arm_range is None else list(arm_range),
                "runs": seeds,
            }
        )
    labels = list(arms)
    if baseline is None:
        baseline = next((a["label"] for a in arm_info if _is_identity(a["transform"])), labels[0])
    elif baseline not in arms:
        raise ValueError(f"--baseline {baseline!r} is not an arm; the arms are: {', '.join(labels)}")

    covered = [tuple(a["kl_range"]) for a in arm_info if a["kl_range"] is not None]
    common = common_kl_range(covered) if len(covered) == len(arm_info) else None
    if common is None:
        spans = "; ".join(
            f"{a['label']}: " + ("none" if a["kl_range"] is None else "{:.3g} to {:.3g}".format(*a["kl_range"]))
            for a in arm_info
        )
        notes.append(f"no KL range is common to every arm ({spans}): nothing is compared at matched KL by default")
    grid_source = "given" if kl_grid is not None else "default"
    twice = 2 * noise["nats"] if noise else None
    grid = [float(k) for k in kl_grid] if kl_grid is not None else default_kl_grid(common, start=twice)
    if noise:
        notes += _floor_notes(arm_info, common, grid, grid_source, noise)
    for a in arm_info:
        lo, hi = a["kl_range"] or (math.nan, math.nan)
        outside = [k for k in grid if not lo <= k <= hi]
        if outside and grid_source == "given":
            notes.append(
                f"arm {a['label']!r} covers KL {lo:.3g} to {hi:.3g}: no value at KL "
                + ", ".join(f"{k:g}" for k in outside)
                + " (never extrapolated)"
            )

    metrics = {}
    for spec in compared_metrics([run["records"] for run in runs], default_n):
        values = {label: arm_at_kl([m["records"] for m in arms[label]], spec, grid, crossing) for label in labels}
        base_mean, base_se = values[baseline]
        table = {}
        for label in labels:
            mean, se = values[label]
            entry = {"win_rate": _json_list(mean), "stderr": _json_list(se)}
            if label != baseline:
                d, d_se = difference(mean, se, base_mean, base_se)
                entry.update(diff=_json_list(d), diff_stderr=_json_list(d_se))
            table[label] = entry
        metrics[metric_name(spec)] = {"inference": spec, "arms": table}
    inside, below_twice = floor_flags(grid, noise)
    return {
        "baseline": baseline,
        "kl_grid": grid,
        "kl_grid_source": grid_source,
        "crossing": crossing,
        "noise_floor": noise,
        "inside_noise_floor": inside,
        "below_twice_noise_floor": below_twice,
        "common_kl_range": None if common is None else list(common),
        "arms": arm_info,
        "metrics": metrics,
        "notes": notes,
    }


def _kls(values) -> str:
    return ", ".join(f"{k:.3g}" for k in values)


def _floor_notes(arm_info: list[dict], common, grid: list[float], grid_source: str, noise: dict) -> list[str]:
    """What the noise floor says about this comparison, in words for the summary."""
    f = noise["nats"]
    notes = []
    for a in arm_info:
        if a["kl_range"] is not None and a["kl_range"][1] <= f:
            notes.append(
                f"arm {a['label']!r} never got past the noise floor (its KL reached {a['kl_range'][1]:.3g}, the "
                f"floor is {f:.3g} nats): the optimiser alone explains where it went"
            )
    if grid_source == "default" and common is not None and not grid:
        notes.append(
            f"every KL common to the arms ({common[0]:.3g} to {common[1]:.3g}) lies below twice the noise floor "
            f"({2 * f:.3g} nats): nothing is compared by default; --kl-grid compares there anyway, inside the noise"
        )
    inside = [k for k in grid if k <= f]
    near = [k for k in grid if f < k < 2 * f]
    if inside or near:
        parts = ([f"KL {_kls(inside)} inside the noise floor ({f:.3g} nats)"] if inside else []) + (
            [f"KL {_kls(near)} below twice it ({2 * f:.3g})"] if near else []
        )
        notes.append(f"matched {' and '.join(parts)}: differences there are optimiser noise")
    return notes
