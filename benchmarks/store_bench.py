"""Benchmark: the reference reward store at scale (default 1M prompts x K = 64 float32 = 256 MB of rewards).

Each phase runs in its own process so its time and memory are its own:
  write    write_store() from in-memory arrays (the path `infalign calibrate` takes)
  jsonl    a reference JSONL file is generated (not timed as import), then `infalign store import` runs as a process
  open     ReferenceStore.open in a fresh process: open time, RSS growth after open and after touching every array
           page, versus the store's on-disk size; then calibration of a batch of 65,536 samples of random prompts
           (hex keys -> rows -> mid-rank calibrated rewards), against the floor below.
The floor (baseline in the same process, same arrays): ONE bare `np.searchsorted(store.values, r32)` call of the
batch's 65,536 float32 rewards into the store's whole memory-mapped values array (P*K float32): one C binary search
per sample over the same data, with no key lookup and no per-prompt segments (its result is not a calibrated reward;
it is the least work any lookup of a sample among the store's rewards does). Calibration must stay within 3x of it.
Targets from the issue: import in minutes, open < 3 s, RSS growth <= 1.5x on-disk size, calibrate <= 3x floor.
Prints a table and one JSON line {"bench": "store", ...}. Needs ~3x the values' size in free memory for the write.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def prompt_text(i: int) -> str:
    return f"Q : benchmark prompt number {i}, please answer carefully. A :"


def make_data(p: int, k: int, seed: int):
    """Deterministic prompts' digests and (P, K) float32 rewards (same in every phase process)."""
    from openrlhf_infalign.store import prompt_digests

    rng = np.random.default_rng(seed)
    digests = prompt_digests(prompt_text(i) for i in range(p))
    values = rng.standard_normal((p, k), dtype=np.float32)
    return digests, values


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


# ---- phases (each in its own process) ------------------------------------------------------------------------
def phase_write(a) -> dict:
    import warnings

    from openrlhf_infalign.store import write_store

    digests, values = make_data(a.prompts, a.k, a.seed)
    base = rss_bytes()
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_store(Path(a.workdir) / "store_direct", digests, values, overwrite=True, manifest={"bench": True})
    sec = time.perf_counter() - t
    return {"write_seconds": sec, "write_peak_rss_over_inputs": peak_rss_bytes() - base}


def phase_make_jsonl(a) -> dict:
    digests, values = make_data(a.prompts, a.k, a.seed)
    path = Path(a.workdir) / "refs.jsonl"
    t = time.perf_counter()
    with open(path, "w") as f:
        for i in range(a.prompts):
            # float32 -> float -> shortest repr, as `infalign store export` writes it.
            f.write(json.dumps({"prompt": prompt_text(i), "rewards": values[i].tolist()}))
            f.write("\n")
    return {"jsonl_bytes": path.stat().st_size, "jsonl_generate_seconds": time.perf_counter() - t}


def phase_open(a) -> dict:
    import warnings

    from openrlhf_infalign.core.calibration import calibrated_reward
    from openrlhf_infalign.store import ReferenceStore, prompt_digests, prompt_key

    store_dir = Path(a.workdir) / "store_direct"
    disk = dir_bytes(store_dir)
    index_disk = dir_bytes(store_dir / "index")
    rng = np.random.default_rng(a.seed + 1)
    idx = rng.integers(0, a.prompts, size=a.batch)
    prompts = [prompt_text(int(i)) for i in idx]
    keys = [prompt_key(p) for p in prompts]  # what the trainer has after hashing Experience.prompts
    rewards = rng.standard_normal(a.batch)
    r32 = rewards.astype(np.float32)

    rss0 = rss_bytes()
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = ReferenceStore.open(store_dir)
    open_s = time.perf_counter() - t
    rss_open = rss_bytes()
    # Touch every page of every array (what a long training run eventually does).
    touched = float(s.values.sum(dtype=np.float64)) + float(s.offsets[-1]) + int(s._keys.sum()) + int(s._hi[-1])
    rss_touch = rss_bytes()

    s.calibrate(keys[:1024], rewards[:1024])  # warm-up
    cal_s = median_time(lambda: s.calibrate(keys, rewards), a.repeats)
    floor_s = median_time(lambda: np.searchsorted(s.values, r32), a.repeats)
    floor2_s = median_time(
        lambda: (np.searchsorted(s.values, r32), np.searchsorted(s.values, r32, "right")), a.repeats
    )
    rows_s = median_time(lambda: s.rows_for_keys(keys), a.repeats)
    digest_s = median_time(lambda: prompt_digests(prompts), a.repeats)
    rss_cal = rss_bytes()

    # Correctness on a slice: literal mid-rank against the rows read back.
    got = s.calibrate(keys, rewards)
    rows = s.rows_for_keys(keys)
    for j in range(0, a.batch, max(a.batch // 500, 1)):
        ref = s.rewards_for_row(int(rows[j])).astype(np.float64)
        want = ((ref < rewards[j]).sum() + 0.5 * (ref == rewards[j]).sum()) / ref.size
        assert got[j] == want, (j, got[j], want)

    out = {
        "disk_bytes": disk,
        "index_bytes": index_disk,
        "open_seconds": open_s,
        "rss_after_open": rss_open - rss0,
        "rss_after_touch": rss_touch - rss0,
        "rss_after_calibrate": rss_cal - rss0,
        "touch_checksum": touched,
        "calibrate_seconds": cal_s,
        "floor_seconds": floor_s,
        "floor_two_searches_seconds": floor2_s,
        "rows_for_keys_seconds": rows_s,
        "hash_prompts_seconds": digest_s,
    }
    if a.compare_core:
        # The same batch through core.calibrated_reward on the whole store arrays (it converts them to float64).
        rows = s.rows_for_keys(keys)
        out["core_full_arrays_seconds"] = median_time(
            lambda: calibrated_reward(rewards, s.values, s.offsets, rows), max(a.repeats // 2, 1)
        )
    return out


PHASES = {"write": phase_write, "make-jsonl": phase_make_jsonl, "open": phase_open}


def run_phase(name: str, a) -> dict:
    argv = [
        sys.executable, __file__, "--phase", name, "--prompts", str(a.prompts), "--k", str(a.k),
        "--batch", str(a.batch), "--repeats", str(a.repeats), "--seed", str(a.seed), "--workdir", str(a.workdir),
    ] + (["--compare-core"] if a.compare_core else [])  # fmt: skip
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"phase {name} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def run_import(a) -> dict:
    """`infalign store import` as a process; its own wall time and peak RSS (os.wait4)."""
    argv = [
        sys.executable, "-m", "openrlhf_infalign", "store", "import", "--jsonl", str(Path(a.workdir) / "refs.jsonl"),
        "--out", str(Path(a.workdir) / "store_jsonl"), "--overwrite", "--no-progress",
    ]  # fmt: skip
    t = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    sec = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode()
    if proc.returncode != 0:
        raise SystemExit(f"store import failed:\n{err}")
    return {"import_seconds": sec, "import_peak_rss": usage.ru_maxrss * 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=1_000_000, help="prompts in the store (default 1,000,000)")
    ap.add_argument("--k", type=int, default=64, help="reference rewards per prompt (default 64)")
    ap.add_argument("--batch", type=int, default=65536, help="samples per calibration batch (default 65,536)")
    ap.add_argument("--repeats", type=int, default=7, help="timed repetitions, median reported (default 7)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--workdir", default=None, help="where stores/JSONL go (default: a temp dir, removed after)")
    ap.add_argument("--skip-jsonl", action="store_true", help="skip the JSONL generation + import phase")
    ap.add_argument(
        "--compare-core",
        action="store_true",
        help="also time core.calibrated_reward on the whole store arrays (allocates P*K float64)",
    )
    ap.add_argument("--phase", choices=sorted(PHASES), default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.phase:
        print(json.dumps(PHASES[a.phase](a)))
        return

    own_tmp = a.workdir is None
    a.workdir = Path(a.workdir or tempfile.mkdtemp(prefix="store_bench-"))
    a.workdir.mkdir(parents=True, exist_ok=True)
    res: dict = {"bench": "store", "prompts": a.prompts, "k": a.k, "batch": a.batch}
    try:
        res.update(run_phase("write", a))
        if not a.skip_jsonl:
            res.update(run_phase("make-jsonl", a))
            res.update(run_import(a))
            shutil.rmtree(a.workdir / "store_jsonl", ignore_errors=True)
            (a.workdir / "refs.jsonl").unlink()
        res.update(run_phase("open", a))
    finally:
        if own_tmp:
            shutil.rmtree(a.workdir, ignore_errors=True)

    mib = 2**20
    res["rss_ratio"] = res["rss_after_touch"] / res["disk_bytes"]
    res["ratio"] = res["calibrate_seconds"] / res["floor_seconds"]
    res["targets"] = {
        "import_minutes": 10,
        "open_seconds": 3.0,
        "rss_over_disk": 1.5,
        "calibrate_over_floor": 3.0,
    }
    res["within_target"] = bool(
        res["open_seconds"] < 3.0
        and res["rss_ratio"] <= 1.5
        and res["ratio"] <= 3.0
        and res["write_seconds"] < 600
        and res.get("import_seconds", 0) < 600
    )
    print(f"store: {a.prompts:,} prompts x K={a.k} ({a.prompts * a.k * 4 / mib:.0f} MiB of float32 rewards)")
    print(f"  on disk            {res['disk_bytes'] / mib:9.1f} MiB (index {res['index_bytes'] / mib:.1f} MiB)")
    print(f"  write_store        {res['write_seconds']:9.2f} s  (direct path, in-memory arrays)")
    if "import_seconds" in res:
        print(
            f"  JSONL file         {res['jsonl_bytes'] / mib:9.1f} MiB (generated in {res['jsonl_generate_seconds']:.1f} s)"
        )
        print(
            f"  store import       {res['import_seconds']:9.2f} s  (CLI process, peak RSS "
            f"{res['import_peak_rss'] / mib:.0f} MiB)"
        )
    print(f"  open               {res['open_seconds'] * 1e3:9.2f} ms (target < 3 s)")
    print(
        f"  RSS growth         {res['rss_after_open'] / mib:9.1f} MiB after open, {res['rss_after_touch'] / mib:.1f} "
        f"MiB after touching every page = {res['rss_ratio']:.2f}x on-disk size (target <= 1.5x); "
        f"{res['rss_after_calibrate'] / mib:.1f} MiB after the calibration runs"
    )
    print(
        f"  floor              {res['floor_seconds'] * 1e3:9.2f} ms  one np.searchsorted of {a.batch:,} rewards into values  <- baseline"
    )
    print(f"  floor x2 (L+R)     {res['floor_two_searches_seconds'] * 1e3:9.2f} ms")
    print(f"  calibrate          {res['calibrate_seconds'] * 1e3:9.2f} ms  = {res['ratio']:.2f}x floor (target <= 3x)")
    print(f"    of which keys->rows {res['rows_for_keys_seconds'] * 1e3:6.2f} ms")
    print(f"  sha1 of the prompts   {res['hash_prompts_seconds'] * 1e3:6.2f} ms (trainer side, not in calibrate)")
    if "core_full_arrays_seconds" in res:
        print(f"  core.calibrated_reward on whole arrays {res['core_full_arrays_seconds'] * 1e3:.2f} ms")
    print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in res.items()}))


if __name__ == "__main__":
    main()
