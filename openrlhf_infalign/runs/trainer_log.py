"""Reading OpenRLHF's console output: the per-step metrics, the evaluations, and one short line each for the console.

``train_ppo`` prints ``Global step N: {...}`` (a Python dict repr of the step's logged metrics) after every PPO step,
and ``Evaluation start time: ...`` / ``Evaluation completed in H:MM:SS, global_step N, eval_metrics: {...}`` around
every evaluation. The demo keeps these lines of the train phase (``keep``), turns them into per-step series and
evaluation durations (``parse_step_logs``) and shows each as one line (``format_train_line``).
"""

from __future__ import annotations

import ast
import re
from typing import Optional, Sequence

from openrlhf_infalign.runs.supervise import shorten

__all__ = ["keep", "format_train_line", "parse_step_logs"]

STEP_RE = re.compile(r"Global step (\d+): (\{.*\})\s*$")
EVAL_RE = re.compile(r"Evaluation completed in (\d+):(\d+):(\d+), global_step (\d+)")


def keep(line: str) -> bool:
    """The lines :func:`parse_step_logs` reads."""
    return "Global step" in line or "Evaluation completed" in line or "Evaluation start time" in line


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
        return shorten(line, 200)
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
