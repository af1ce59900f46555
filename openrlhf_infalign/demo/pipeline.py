"""``make demo``: InfAlign end to end on a CPU, with OpenRLHF's real PPO loop and tiny local models.

Phases, each a real process of the real tool (:mod:`openrlhf_infalign.runs.supervise` runs it and measures its wall
time and peak memory): build the tiny models and fit the base policy, write disjoint train / eval prompts,
``infalign calibrate`` both prompt sets, ``infalign plan``, ``python -m openrlhf_infalign.train_ppo --infalign.cpu``
(OpenRLHF's own ``train_ppo_ray``) with the Best-of-N-aware evaluation, and ``infalign report``.

Writes ``<out>/demo_summary.json`` (phase times, per-step train times, eval times, peak memory, first vs final
Best-of-N win rate, calibrated reward statistics) and prints a summary; the logs of every phase are in
``<out>/logs/``. What each phase does, why the defaults are what they are and the figures measured with them:
docs/demo.md.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from openrlhf_infalign import options
from openrlhf_infalign.demo import pairs, tiny
from openrlhf_infalign.evallog import EXACT_LOG, eval_log_path, load_eval_log
from openrlhf_infalign.files import atomic_open, write_text
from openrlhf_infalign.options import option
from openrlhf_infalign.runs import trainer_log
from openrlhf_infalign.runs.supervise import PhaseError, run_phase

__all__ = ["DemoSettings", "main", "parse", "train_command"]

INPUT_TEMPLATE = tiny.INPUT_TEMPLATE  # the fit, the reference stores and the rollouts must template alike
assert pairs.INPUT_TEMPLATE == INPUT_TEMPLATE
#: Per task: response cap and eval prompts (the word-pair task has 256 prompts: 192 train, 64 held out).
TASK_DEFAULTS = {
    "pairs": {"max_new_tokens": 2, "eval_prompts": 64},
    "words": {"max_new_tokens": 16, "eval_prompts": 128},
}


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


# ── the phases ──


@dataclass(kw_only=True)
class DemoSettings:
    """The demo's setting: every phase reads it (the study builds one per run from its own, studies/study.py)."""

    out: str = option("demo_out", flags=("--out",), help="output directory (models, prompts, stores, run, report)")
    task: str = option(
        "pairs",
        flags=("--task",),
        choices=["pairs", "words"],
        help="pairs: two-word answers, exact evaluation (demo/pairs.py); words: 16-token sentences (demo/tiny.py)",
    )
    train_prompts: int = option(
        192, flags=("--train-prompts",), help="training prompts (steps = this / --rollout-batch)"
    )
    eval_prompts: Optional[int] = option(
        None,
        flags=("--eval-prompts",),
        help="evaluation prompts, held out (disjoint from training)",
        doc_default="64 (pairs), 128 (words)",
    )
    k: int = option(32, flags=("--k",), help="reference samples per prompt (infalign calibrate --k)")
    inference: str = option("bon:4", flags=("--inference",), help="inference procedure trained for (bon:N / won:N)")
    kl_budget: float = option(
        0.1,
        flags=("--kl-budget",),
        help="KL budget (nats) the transform and beta are planned for: what the run reaches in its steps",
    )
    rollout_batch: int = option(32, flags=("--rollout-batch",), help="prompts per PPO step (--rollout.batch_size)")
    n_samples_per_prompt: int = option(
        8,
        flags=("--rollout.n_samples_per_prompt",),
        help="samples per prompt; with --rollout-batch: less noise per step",
    )
    train_batch: Optional[int] = option(
        64,
        flags=("--train-batch",),
        help="samples per optimizer update (--train.batch_size; none: one update per step): more updates per "
        "rollout, each with the optimiser noise of its own batch size",
    )
    eval_samples: int = option(
        16, flags=("--eval-samples",), help="eval samples per prompt (--eval.n_samples_per_prompt)"
    )
    eval_n: str = option("1,2,4,8", flags=("--eval-n",), help="N values of the Best-of-N / Worst-of-N win rates")
    max_new_tokens: Optional[int] = option(
        None,
        flags=("--max-new-tokens",),
        help="response length cap (rollouts, eval, calibrate)",
        doc_default="2 (pairs), 16 (words)",
    )
    lr: float = option(5e-4, flags=("--lr",), help="actor learning rate")
    lr_scheduler: str = option(
        "constant_with_warmup",
        flags=("--lr-scheduler",),
        help="--actor.lr_scheduler (upstream's default cosine_with_min_lr decays to 0.1x within a short run)",
    )
    episodes: int = option(16, flags=("--episodes",), help="passes over the training prompts (--train.num_episodes)")
    estimator: str = option(
        "reinforce_baseline",
        flags=("--algo.advantage.estimator",),
        help="advantage estimator (gae adds a critic: slower)",
    )
    fit_steps: int = option(300, flags=("--fit-steps",), help="SFT steps of the base policy")
    base_coupling: float = option(
        1.0,
        flags=("--base-coupling",),
        help="pairs: how much the base's second word depends on its first (0: independent, uniform; demo/pairs.py); "
        "coupled, the model's state at the second word carries the first and CTRL's tilt can form",
    )
    reward: str = option(
        "func", flags=("--reward",), choices=["func", "rm"], help="reward: rule reward_func .py or tiny RM (words)"
    )
    calibrate_backend: str = option(
        "vllm",
        flags=("--calibrate-backend",),
        choices=["hf", "vllm"],
        help="infalign calibrate --backend (vllm: the very sampler the rollouts use; hf: transformers, faster start)",
    )
    eval_every: Optional[int] = option(
        None, flags=("--eval-every",), help="--eval.steps (default: a twelfth of the steps)"
    )
    exact: bool = option(
        True,
        flags=("--no-exact",),
        negated=True,
        help="pairs: save the actor at every evaluation and evaluate it exactly (studies/exact.py) after training",
    )
    seed: int = option(0, flags=("--seed",), help="seed of models, prompts and sampling")
    report: bool = option(True, flags=("--no-report",), negated=True, help="skip the infalign report phase")


def parse(
    argv: Optional[Sequence[str]] = None, cls=DemoSettings, prog: str = "python -m openrlhf_infalign.demo.pipeline"
):
    """Settings of ``cls`` from a command line (its flags generated from the dataclass)."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=(cls.__doc__ or "").split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    options.add_arguments(p, cls)
    settings = options.settings_from_args(cls, p.parse_args(argv))
    if settings.task == "pairs" and settings.reward == "rm":
        p.error("--reward rm: the word-pair task has only its rule reward (--task words has a tiny reward model)")
    return with_task_defaults(settings)


def with_task_defaults(settings):
    """The settings with the task's defaults filled in where a field was left unset (None)."""
    from dataclasses import replace

    fill = {k: v for k, v in TASK_DEFAULTS[settings.task].items() if getattr(settings, k) is None}
    return replace(settings, **fill)


def exact_evaluation(args) -> bool:
    return bool(args.exact) and args.task == "pairs"


def _py(*args: str) -> List[str]:
    return [sys.executable, *args]


def _write_prompts(path: Path, prompts: Sequence[str]) -> None:
    with atomic_open(path) as f:
        for prompt in prompts:
            f.write(json.dumps({"input": prompt}) + "\n")


def _build_and_fit(out: Path, args) -> dict:
    """The tiny models and the fitted base policy, in a child process (keeps torch out of the driver, measures it)."""
    if args.task == "pairs":
        code = (
            "import json, sys\n"
            "from openrlhf_infalign.demo import pairs\n"
            "out, seed, steps, coupling = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])\n"
            "pairs.build_policy(out + '/policy_init', seed=seed)\n"
            "pairs.write_reward_func(out + '/reward_func.py')\n"
            "fitted = pairs.fit_policy(out + '/policy_init', out + '/policy', pairs.make_prompts(256, seed=seed + 1000),"
            " steps=steps, seed=seed, coupling=coupling)\n"
            "print('FIT ' + json.dumps(fitted))\n"
        )
        return run_phase(
            "build_fit",
            _py("-c", code, str(out), str(args.seed), str(args.fit_steps), str(args.base_coupling)),
            out / "logs",
            echo=re.compile(r"^FIT "),
            env={"OMP_NUM_THREADS": "1"},
        )
    code = (
        "import json, sys\n"
        "from openrlhf_infalign.demo import tiny, fit\n"
        "out, seed, steps, reward = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]\n"
        "tok = tiny.build_tokenizer(out + '/policy_init')\n"
        "tiny.build_policy(out + '/policy_init', tok, seed=seed)\n"
        "tiny.write_reward_func(out + '/reward_func.py')\n"
        "if reward == 'rm':\n"
        "    tiny.build_reward_model(out + '/reward_model', tok, seed=seed)\n"
        "print('FIT ' + json.dumps(fit.fit_policy(out + '/policy_init', out + '/policy', steps=steps, seed=seed)))\n"
    )
    return run_phase(
        "build_fit",
        _py("-c", code, str(out), str(args.seed), str(args.fit_steps), args.reward),
        out / "logs",
        echo=re.compile(r"^FIT "),
        env={"OMP_NUM_THREADS": "1"},
    )


def write_prompts(out: Path, args) -> None:
    """The task's train and held-out eval prompts (disjoint), ``<out>/prompts/{train,eval}.jsonl``."""
    task = pairs if args.task == "pairs" else tiny
    prompts = task.make_prompts(args.train_prompts + args.eval_prompts, seed=args.seed + 1)
    (out / "prompts").mkdir(parents=True, exist_ok=True)
    _write_prompts(out / "prompts" / "train.jsonl", prompts[: args.train_prompts])
    _write_prompts(out / "prompts" / "eval.jsonl", prompts[args.train_prompts :])


def _reward_flags(out: Path, args) -> List[str]:
    if args.reward == "rm":
        return ["--reward.model_name_or_path", str(out / "reward_model")]
    return ["--reward.remote_url", str(out / "reward_func.py")]


def _calibrate(out: Path, args, split: str, seed: int) -> dict:
    cmd = _py(
        "-m",
        "openrlhf_infalign",
        "calibrate",
        "--backend",
        args.calibrate_backend,
        "--k",
        str(args.k),
        "--out",
        str(out / "stores" / split),
        "--overwrite",
        "--no-progress",
        "--seed",
        str(seed),
        "--actor.model_name_or_path",
        str(out / "policy"),
        "--data.prompt_dataset",
        str(out / "prompts" / f"{split}.jsonl"),
        "--data.input_key",
        "input",
        "--data.input_template",
        INPUT_TEMPLATE,
        "--data.max_len",
        str(_max_len(args)),
        "--rollout.temperature",
        "1.0",
        "--rollout.top_p",
        "1.0",
        "--rollout.max_new_tokens",
        str(args.max_new_tokens),
        *_reward_flags(out, args),
    )
    if args.calibrate_backend == "vllm":
        cmd += ["--infalign.cpu", "--vllm.enforce_eager", "--vllm.gpu_memory_utilization", "0.5"]
    return run_phase(f"calibrate_{split}", cmd, out / "logs", echo=re.compile(r"error:"), fmt=_format_calibrate_line)


def _format_calibrate_line(line: str) -> Optional[str]:
    if not line.startswith('{"out"'):
        return None
    try:
        d = json.loads(line)
    except ValueError:
        return None
    return f"reference store {d.get('out')}: {d.get('num_prompts')} prompts x K={d.get('k')}"


def _max_len(args) -> int:
    return 32 + args.max_new_tokens  # the demo's templated prompts are at most ~16 tokens


def _plan(out: Path, args) -> dict:
    proc = subprocess.run(
        _py(
            *(
                "-m",
                "openrlhf_infalign",
                "plan",
                "--inference",
                args.inference,
                "--kl-budget",
                str(args.kl_budget),
                "--json",
            ),
            # Planned for the store's K and the run's estimator: the flags then carry the converted init_coef.
            *(
                "--k",
                str(args.k),
                "--algo.advantage.estimator",
                args.estimator,
                "--rollout.n_samples_per_prompt",
                str(args.n_samples_per_prompt),
            ),
        ),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise PhaseError(f"infalign plan failed: {proc.stderr.strip()[-2000:]}")
    plan = json.loads(proc.stdout)
    (out / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    return plan


def train_command(out: Path, args, plan: dict) -> List[str]:
    """The ``openrlhf train_ppo`` command line of the demo (upstream flags + InfAlign's, CPU mode)."""
    steps = max(1, args.train_prompts // args.rollout_batch) * args.episodes
    samples_per_step = args.rollout_batch * args.n_samples_per_prompt
    micro = min(16, samples_per_step)
    eval_every = args.eval_every or max(1, steps // 12)
    # exact evaluation reads the actor as it was evaluated: an HF copy at every evaluation (upstream saves before
    # it evaluates, with no update between), no DeepSpeed states, none deleted
    checkpoints = [
        "--ckpt.save_steps",
        str(eval_every),
        "--ckpt.save_hf",
        "--ckpt.disable_ds",
        "--ckpt.max_num",
        "100000",
    ]
    return _py(
        "-m",
        "openrlhf_infalign.train_ppo",
        "--infalign.cpu",
        # models and data
        "--actor.model_name_or_path",
        str(out / "policy"),
        *_reward_flags(out, args),
        "--data.prompt_dataset",
        str(out / "prompts" / "train.jsonl"),
        "--data.input_key",
        "input",
        "--data.input_template",
        INPUT_TEMPLATE,
        "--data.max_len",
        str(_max_len(args)),
        # InfAlign: CTRL reward for the planned transform, Best-of-N-aware evaluation
        *plan["openrlhf_args"],
        "--infalign.store",
        str(out / "stores" / "train"),
        "--infalign.eval_store",
        str(out / "stores" / "eval"),
        "--infalign.eval_n",
        args.eval_n,
        "--eval.dataset",
        str(out / "prompts" / "eval.jsonl"),
        "--eval.n_samples_per_prompt",
        str(args.eval_samples),
        # the eval store was sampled at temperature 1: eval must sample the same way (upstream default is 0.6)
        "--eval.temperature",
        "1.0",
        "--eval.steps",
        str(eval_every),
        # rollouts and PPO
        "--vllm.num_engines",
        "1",
        "--actor.num_gpus_per_node",
        "1",
        "--ref.num_gpus_per_node",
        "1",
        "--reward.num_gpus_per_node",
        "1",
        "--critic.num_gpus_per_node",
        "1",
        "--algo.advantage.estimator",
        args.estimator,
        "--rollout.n_samples_per_prompt",
        str(args.n_samples_per_prompt),
        "--rollout.batch_size",
        str(args.rollout_batch),
        "--rollout.micro_batch_size",
        str(micro),
        "--train.batch_size",
        str(args.train_batch or samples_per_step),
        "--train.micro_batch_size",
        str(micro),
        "--rollout.max_new_tokens",
        str(args.max_new_tokens),
        "--rollout.temperature",
        "1.0",
        "--actor.adam.lr",
        str(args.lr),
        "--actor.lr_scheduler",
        args.lr_scheduler,
        # vLLM returns its sampling log-probs, so every step logs vllm_kl (rollout engine vs DeepSpeed actor): ~0
        # only if the weight sync really reloads the engine. With synced weights the IS ratio is ~1 and the
        # token mask it adds never fires.
        "--algo.advantage.is_correction_level",
        "token",
        "--train.num_episodes",
        str(args.episodes),
        "--train.seed",
        str(args.seed),
        "--ckpt.output_dir",
        str(out / "run"),
        "--ckpt.path",
        str(out / "run" / "checkpoints"),
        "--ckpt.best_metric_key",
        "none",
        *(checkpoints if exact_evaluation(args) else []),
    )


def exact_command(out: Path, args, runs: Sequence[Path]) -> List[str]:
    """``studies/exact.py`` over run directories of this setting: the base law and rewards cached in ``<out>``."""
    return _py(
        "-m",
        "openrlhf_infalign.studies.exact",
        *[str(r) for r in runs],
        "--base",
        str(out / "policy"),
        "--reward-func",
        str(out / "reward_func.py"),
        "--prompts",
        str(out / "prompts" / "eval.jsonl"),
        "--template",
        INPUT_TEMPLATE,
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--store",
        str(out / "stores" / "eval"),
        "--cache",
        str(out / "exact_cache.npz"),
    )


def _summarise_train(train: dict, args) -> dict:
    parsed = trainer_log.parse_step_logs(train.pop("_lines"))
    steps = parsed["steps"]
    out = {"steps_completed": len(steps), "evals": parsed["evals"]}
    evals = parsed["evals"]
    if evals and evals[0]["step"] == 0:
        # process start -> step-0 evaluation begins: Ray, vLLM engine, DeepSpeed actor + reference model start-up
        out["startup_s"] = round(evals[0]["t"] - evals[0]["seconds"], 1)
    if steps:
        out["first_step_at_s"] = round(steps[0]["t"], 1)  # Ray + vLLM + DeepSpeed start-up, step-0 eval, first step
        out["step_seconds"] = [round(s["metrics"].get("timing/step_total", float("nan")), 3) for s in steps]
        out["step_wall_gaps_s"] = [round(b["t"] - a["t"], 2) for a, b in zip(steps, steps[1:])]
        cal = [s["metrics"].get("infalign/calibrated") for s in steps]
        out["calibrated_mean_per_step"] = cal
        out["raw_reward_mean_per_step"] = [s["metrics"].get("infalign/raw_reward") for s in steps]
        out["transformed_mean_per_step"] = [s["metrics"].get("infalign/transformed") for s in steps]
        out["kl_per_step"] = [s["metrics"].get("kl") for s in steps]
        out["vllm_kl_per_step"] = [s["metrics"].get("vllm_kl") for s in steps]
        out["samples_per_step"] = args.rollout_batch * args.n_samples_per_prompt
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("run", "report", "logs"):
        shutil.rmtree(out / stale, ignore_errors=True)  # a fresh run: the eval log is appended to, never reused
    (out / "prompts").mkdir(exist_ok=True)
    t_start = time.time()
    phases: Dict[str, dict] = {}
    summary: dict = {"out": str(out), "args": asdict(args), "phases": phases}

    def record(name: str, result: dict) -> None:
        result.pop("_lines", None)
        phases[name] = result
        if "peak_tree_rss_mb" in result:
            say(
                f"{name}: {result['seconds']:.1f}s, peak memory of its process tree: PSS "
                f"{result['peak_tree_pss_mb']:.0f} MiB, RSS {result['peak_tree_rss_mb']:.0f} MiB (largest process "
                f"{result['peak_process_rss_mb']:.0f} MiB)"
            )
        else:
            say(f"{name}: {result['seconds']:.1f}s")

    try:
        say(f"output directory {out}")
        record("build_fit", _build_and_fit(out, args))

        t = time.time()
        write_prompts(out, args)
        record("prompts", {"seconds": round(time.time() - t, 2)})

        record("calibrate_train", _calibrate(out, args, "train", seed=args.seed + 11))
        record("calibrate_eval", _calibrate(out, args, "eval", seed=args.seed + 12))

        t = time.time()
        plan = _plan(out, args)
        record("plan", {"seconds": round(time.time() - t, 2)})
        summary["plan"] = {"kl": plan["kl"], "k": plan["k"], **plan["recommended"]}
        say(f"plan: {' '.join(plan['openrlhf_args'])}")

        cmd = train_command(out, args, plan)
        train = run_phase(
            "train",
            cmd,
            out / "logs",
            echo=re.compile(r"Error|error:"),
            fmt=trainer_log.format_train_line,
            keep=trainer_log.keep,
        )
        summary["train"] = _summarise_train(train, args)
        record("train", train)

        # A run that never evaluated has no log: the summary then has no win rates (the report phase says why).
        eval_log = eval_log_path(out / "run")
        try:
            summary["evaluations"] = load_eval_log(eval_log) if eval_log.is_file() else []
        except ValueError as e:
            raise PhaseError(f"the run's evaluation log is unreadable: {e}") from e
        evaluated = out / "run"
        if exact_evaluation(args):
            record("exact", run_phase("exact", exact_command(out, args, [out / "run"]), out / "logs"))
            evaluated = out / "run" / EXACT_LOG
            summary["exact_evaluations"] = load_eval_log(evaluated)
        if args.report:
            rep = run_phase(
                "report",
                _py("-m", "openrlhf_infalign", "report", str(evaluated), "--out", str(out / "report")),
                out / "logs",
            )
            record("report", rep)
            print((out / "logs" / "report.log").read_text().split("\n", 1)[1], flush=True)
    except PhaseError as e:
        summary["error"] = str(e)
        _write_summary(out, summary, t_start)
        print(f"[demo] error: {e}", file=sys.stderr, flush=True)
        return 1
    _write_summary(out, summary, t_start)
    _print_summary(summary, args)
    return 0


def _bon(record: dict, n: int) -> Optional[dict]:
    return (record.get("bon") or {}).get(str(n))


def _write_summary(out: Path, summary: dict, t_start: float) -> None:
    summary["total_seconds"] = round(time.time() - t_start, 1)
    phases = summary["phases"]
    summary["peak_tree_rss_mb"] = max((p.get("peak_tree_rss_mb", 0) for p in phases.values()), default=0)
    summary["peak_tree_pss_mb"] = max((p.get("peak_tree_pss_mb", 0) for p in phases.values()), default=0)
    evals = summary.get("evaluations") or []
    n = _bon_n(summary)
    if evals and n:
        first, last = evals[0], evals[-1]
        summary["bon_win_rate"] = {
            "n": n,
            "first": {"step": first["step"], **(_bon(first, n) or {})},
            "final": {"step": last["step"], "kl": last.get("kl"), **(_bon(last, n) or {})},
        }
    exact, plan = summary.get("exact_evaluations") or [], summary.get("plan")
    if exact and plan:
        # where the run ended, exactly, against where the plan said it would (the demo's promise, docs/demo.md)
        summary["end_vs_plan"] = end_vs_plan(exact, plan, str(summary["args"].get("inference", "")))
    path = out / "demo_summary.json"
    write_text(path, json.dumps(summary, indent=2, default=str) + "\n")


def end_vs_plan(exact: List[dict], plan: dict, inference: str) -> dict:
    """The run's end point against its plan. At its rest point a run's KL still moves from one evaluation to the next
    (+-0.015 nats at the demo's 0.1), so the end point is the mean over the evaluations of the run's last third
    (``window``), beside the last evaluation alone (``last``)."""
    last = exact[-1]
    window = [r for r in exact if r["step"] >= 2 * last["step"] / 3 and r["step"] > 0]
    kl = sum(r["kl"] for r in window) / len(window)
    rates = [_metric(r, inference) for r in window]
    win = None if any(w is None for w in rates) else sum(rates) / len(rates)
    return {
        "steps": [r["step"] for r in window],
        "kl": kl,
        "planned_kl": plan["kl"],
        "kl_ratio": kl / plan["kl"] if plan["kl"] else None,
        "win_rate": win,
        "planned_win_rate": plan["win_rate"],
        "win_rate_gap": None if win is None else win - plan["win_rate"],
        "last": {"step": last["step"], "kl": last["kl"], "win_rate": _metric(last, inference)},
    }


def _metric(record: dict, inference: str) -> Optional[float]:
    kind, _, n = inference.partition(":")
    stat = record.get("standard") if kind == "standard" else (record.get(kind) or {}).get(n)
    return None if stat is None else stat["win_rate"]


def _bon_n(summary: dict) -> Optional[int]:
    inference = str(summary["args"].get("inference", ""))
    if inference.startswith("bon:"):
        return int(inference.split(":")[1])
    return None


def _print_summary(summary: dict, args) -> None:
    tr = summary.get("train", {})
    say("done in {:.1f}s (machine's cores may be shared: timings are pessimistic)".format(summary["total_seconds"]))
    for name, p in summary["phases"].items():
        rss = (
            f"   peak PSS {p['peak_tree_pss_mb']:6.0f} MiB, RSS {p['peak_tree_rss_mb']:6.0f} MiB"
            if "peak_tree_rss_mb" in p
            else ""
        )
        say(f"  {name:16s} {p['seconds']:7.1f}s{rss}")
    if tr.get("steps_completed"):
        st = [s for s in tr.get("step_seconds", []) if not math.isnan(s)]
        say(
            f"  train: {tr['steps_completed']} PPO steps; first step logged at {tr['first_step_at_s']}s; "
            f"step time {min(st):.2f}-{max(st):.2f}s (OpenRLHF timing/step_total)"
        )
        if "startup_s" in tr:
            say(f"  train start-up (Ray, vLLM engine, DeepSpeed actor/ref) until the step-0 eval: {tr['startup_s']}s")
        for e in tr.get("evals", []):
            say(f"  eval at step {e['step']}: {e['seconds']:.1f}s")
        cal = [c for c in tr.get("calibrated_mean_per_step", []) if c is not None]
        if cal:
            shown = cal if len(cal) <= 8 else cal[:4] + ["..."] + cal[-4:]
            say(
                "  calibrated reward (mean per step, in [0,1]): "
                + ", ".join(c if isinstance(c, str) else f"{c:.3f}" for c in shown)
            )
        vkl = [abs(v) for v in tr.get("vllm_kl_per_step", []) if v is not None]
        if vkl:
            say(f"  |vllm_kl| (vLLM engine vs DeepSpeed actor, per token) <= {max(vkl):.1e}: weight sync in effect")
    bon = summary.get("bon_win_rate")
    if bon:
        f, l = bon["first"], bon["final"]
        say(
            f"  BoN_{bon['n']} win rate vs base policy: step {f['step']} {f.get('win_rate', float('nan')):.3f} "
            f"± {f.get('stderr', float('nan')):.3f}  ->  step {l['step']} {l.get('win_rate', float('nan')):.3f} "
            f"± {l.get('stderr', float('nan')):.3f}"
        )
    end = summary.get("end_vs_plan")
    if end:
        steps = end["steps"]
        say(
            f"  exact end point (mean of steps {steps[0]}-{steps[-1]}): KL {end['kl']:.3f} nats (plan "
            f"{end['planned_kl']:g}), {args.inference} win rate {end['win_rate']:.3f} (plan "
            f"{end['planned_win_rate']:.3f}); last evaluation alone: KL {end['last']['kl']:.3f}, "
            f"win rate {end['last']['win_rate']:.3f}"
        )
    say(f"summary: {summary['out']}/demo_summary.json")


if __name__ == "__main__":
    sys.exit(main())
