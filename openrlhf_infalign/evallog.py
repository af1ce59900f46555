"""The evaluation log: ``<--ckpt.output_dir>/infalign_eval.jsonl``, one home for its name, schema, writer and reader.

The training hook (``openrlhf/evaluation.py``) appends one JSON object per evaluation, and one at step 0 before any
update; ``infalign report`` and the demo read it. Schema (one object per line; extra keys are allowed and ignored):

    {
      "step": 0,                       # int, global training step of the evaluation (0 = before any update)
      "kl": 0.0,                       # float or null: KL(pi || pi_ref) per SEQUENCE of the EVALUATED policy
                                       #   (summed over response tokens), mean over the eval samples; null at step 0
                                       #   is read as 0, null elsewhere leaves the point off the KL plot
      "kl_stderr": 0.01,               # float or null: its standard error given the eval prompts (pooled
                                       #   within-prompt spread of the per-sample k1 sums)
      "kl_estimator": "k1_seq_eval",   # how "kl" was measured: "k1_seq_eval" (log pi - log pi_ref on the eval
                                       #   samples), "step0_reference" (step 0, not measured: pi = pi_ref), or null
      "kl_reason": null,               # string or null: why "kl" is null (no reference model, eval temperature
                                       #   unlike the rollout's)
      "kl_rollout": 0.0,               # float or null: the same KL estimated on the last training step's rollouts
                                       #   (before that step's update); null when not measured (KL as loss)
      "kl_token_mean": 0.0,            # float or null: upstream's logged per-token mean KL of the same step
      "inference": "bon:4",            # the run's inference procedure: standard | bon:N | won:N
      "objective": "ctrl",             # what trained: "ctrl" (a transform of the calibrated reward), "direct" (the
                                       #   group estimator of the win rate, infalign.direct), or null (no wrapper)
      "transform": "exp:t=10",         # the RESOLVED transform the run trains with (never "auto"), or null
      "beta": 0.05,                    # float or null: --algo.kl.init_coef in force (kl_ctl.value)
      "kl_budget": 0.5,                # float or null: the KL budget the run was planned for
      "planned_beta": 0.06,            # float or null: the plan's effective beta (what init_coef gives under the
                                       #   run's estimator; normalised-transform convention)
      "k": 16,                         # int or null: the training store's median K the plan used (null: continuum)
      "temperature": 1.0,              # eval sampling temperature
      "num_prompts": 512,              # int, eval prompts scored
      "num_samples_per_prompt": 16,    # int, M policy samples per eval prompt
      "missing_prompts": 0,            # int, eval prompts absent from the eval store (left out, and counted)
      "standard": {"win_rate": 0.5, "stderr": 0.01},
      "bon": {"1": {"win_rate": ..., "stderr": ..., "num_prompts": ...}, "2": {...}, ...},
      "won": {"1": {...}, ...}
    }

``standard`` / ``bon`` / ``won`` / ``num_prompts`` are exactly the output of ``core.winrate.win_rates`` (policy eval
samples against the reference store's rewards). Lines that repeat a step (a resumed run re-evaluating) replace the
earlier record of that step. Appends are one O_APPEND write each, so a reader never sees half a line.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from openrlhf_infalign.files import json_object

EVAL_LOG = "infalign_eval.jsonl"
#: The exact evaluation of a run's checkpoints (studies/exact.py), same schema, beside EVAL_LOG.
EXACT_LOG = "infalign_eval_exact.jsonl"

__all__ = ["EVAL_LOG", "EXACT_LOG", "append_record", "load_eval_log", "eval_log_path"]


def eval_log_path(run_dir) -> Path:
    """The log of a run directory (or the file itself when given one)."""
    run_dir = Path(run_dir)
    return run_dir if run_dir.is_file() else run_dir / EVAL_LOG


def append_record(path, record: dict) -> None:
    """Append one record as one line with a single O_APPEND write (a reader never sees half a line)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    line = (json.dumps(record, sort_keys=False, allow_nan=False) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, line)
        if written != len(line):  # only on a full disk or an odd filesystem: say so rather than leave a torn line
            raise OSError(f"short write to {path}: {written} of {len(line)} bytes")
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_stat(d, where: str, what: str) -> None:
    # Finite numbers (JSON's NaN and Infinity, and true/false, are not), a standard error never negative.
    ok = isinstance(d, dict) and all(_is_number(d.get(k)) for k in ("win_rate", "stderr"))
    if not ok or d["stderr"] < 0:
        raise ValueError(f"{where}: {what} must be {{'win_rate': number, 'stderr': number >= 0}}, got {str(d)[:120]}")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_fields(rec: dict, where: str) -> None:
    """The plan fields reports and comparisons read: each null or of its type (a K below 2 has no theory)."""
    k = rec.get("k")
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 2):
        raise ValueError(f"{where}: 'k' must be an integer >= 2 or null, got {k!r}")
    for key in ("inference", "transform"):
        if rec.get(key) is not None and not isinstance(rec[key], str):
            raise ValueError(f"{where}: {key!r} must be a string or null, got {rec[key]!r}")
    for key in ("beta", "kl_budget", "planned_beta"):
        if rec.get(key) is not None and not _is_number(rec[key]):
            raise ValueError(f"{where}: {key!r} must be a finite number or null, got {rec[key]!r}")
    se = rec.get("kl_stderr")
    if se is not None and not (_is_number(se) and se >= 0):
        raise ValueError(f"{where}: 'kl_stderr' must be a finite number >= 0 or null, got {se!r}")


def load_eval_log(path) -> list[dict]:
    """Records of an infalign_eval.jsonl, validated, one per step (the last line for a step wins), by step."""
    path = Path(path)
    if not path.is_file():
        if path.name == EVAL_LOG and (path.parent / EXACT_LOG).is_file():
            raise FileNotFoundError(
                f"{path} not found; the folder has an exact evaluation: pass {path.parent / EXACT_LOG}"
            )
        raise FileNotFoundError(
            f"{path} not found: it is written by the training hook at each evaluation "
            f"(train with --reward_wrapper infalign.ctrl and --eval.steps), or pass the run's save path"
        )
    by_step: dict[int, dict] = {}
    with open(path, "rb") as f:  # line by line in binary: a byte that is not UTF-8 is named by its line too
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            rec = json_object(
                raw,
                where,
                utf8_fix="delete or fix the line",
                json_fix="a crashed run may leave a cut line: delete it",
            )
            step = rec.get("step")
            if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step < 2**63:
                raise ValueError(f"{where}: 'step' must be a non-negative integer, got {str(step)[:30]}")
            kl = rec.get("kl")
            if kl is not None and (not isinstance(kl, (int, float)) or not math.isfinite(kl)):
                raise ValueError(f"{where}: 'kl' must be a finite number or null, got {kl!r}")
            if kl is None and step == 0:
                rec["kl"] = 0.0  # before any update the policy is the reference
            _check_fields(rec, where)
            _check_stat(rec.get("standard"), where, "'standard'")
            for key in ("bon", "won"):
                table = rec.get(key)
                if not isinstance(table, dict) or not table:
                    raise ValueError(f"{where}: {key!r} must be a non-empty object keyed by N, got {table!r}")
                for n, stat in table.items():
                    if not str(n).isdigit() or int(n) < 1:
                        raise ValueError(f"{where}: {key!r} has key {n!r}; keys are N as strings: '1', '2', ...")
                    _check_stat(stat, where, f"{key}[{n!r}]")
            by_step[step] = rec
    if not by_step:
        raise ValueError(f"{path} has no evaluation records")
    return [by_step[s] for s in sorted(by_step)]
