"""Calibrate and transform sample rewards against a reference store: what the CTRL training wrapper computes.

Input rows {"prompt": str | "prompt_key": sha1hex, "reward": float}; output, in input order,
{"rows": [{"prompt_key", "reward", "calibrated", "transformed"}, ...]}. calibrated is the mid-rank of the reward
among the prompt's K reference rewards (ties count 1/2), transformed is the transform applied to it.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from openrlhf_infalign import options
from openrlhf_infalign.files import check_input_file, check_output_file, write_json
from openrlhf_infalign.options import option
from openrlhf_infalign.store.format import DIGEST_BYTES
from openrlhf_infalign.store.rows import iter_single_rewards


@dataclass(kw_only=True)
class ScoreSettings:
    """`infalign score`: sample rewards calibrated and transformed against a store."""

    store: str = option(flags=("--store",), help="reference store directory (infalign calibrate / store import)")
    jsonl: str = option(flags=("--jsonl",), help='samples: rows {"prompt"|"prompt_key": ..., "reward": float}')
    transform: str = option(
        "identity",
        flags=("--transform",),
        help="transform of the calibrated reward: identity, exp:t=T, negexp:t=T, log, power:k=K, "
        "or auto/optimal (need --inference and --kl-budget)",
    )
    inference: Optional[str] = option(
        None, flags=("--inference",), help="inference procedure for auto/optimal: bon:N, won:N, standard"
    )
    kl_budget: Optional[float] = option(
        None, flags=("--kl-budget",), metavar="NATS", help="KL budget (nats) for auto/optimal"
    )
    on_missing: str = option(
        "error",
        flags=("--on-missing",),
        choices=("error", "raw"),
        help="a prompt without reference rewards: error, or raw (row gets calibrated/transformed null, missing true)",
    )
    json: bool = option(False, flags=("--json",), help="print the JSON result to stdout instead of a table")
    out: Optional[str] = option(None, flags=("--out",), help="also write the JSON result to this file (atomically)")
    overwrite: bool = option(False, flags=("--overwrite",), help="replace an existing --out file")
    head: int = option(20, flags=("--head",), help="rows shown in the table (text mode)")


def add_arguments(p) -> None:
    options.add_arguments(p, ScoreSettings)


def read_samples(src: Path):
    """(digests (B,20) uint8, rewards float64, line numbers, prompts or None per row)."""
    check_input_file(src, "--jsonl")
    digests = bytearray()
    rewards: list[float] = []
    lines: list[int] = []
    prompts: list[str | None] = []
    with open(src, "rb") as f:
        for lineno, d, prompt, r in iter_single_rewards(src, f):
            digests += d
            rewards.append(r)
            lines.append(lineno)
            prompts.append(prompt)
    if not rewards:
        raise ValueError(f'{src}: no rows; give one row per sample, {{"prompt": ..., "reward": ...}}')
    dig = np.frombuffer(bytes(digests), dtype=np.uint8).reshape(-1, DIGEST_BYTES)
    return dig, np.asarray(rewards, dtype=np.float64), lines, prompts


def _transform(args):
    from openrlhf_infalign.core.planning import resolve_transform

    tr, _beta = resolve_transform(args.transform, args.inference, args.kl_budget)
    return tr


def score(args) -> dict:
    import warnings

    from openrlhf_infalign.store import ReferenceStore

    tr = _transform(args)
    src = Path(args.jsonl)
    dig, rewards, lines, prompts = read_samples(src)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small K is reported in the result instead
        store = ReferenceStore.open(args.store)
    rows = store.rows_for_keys(dig, on_missing="raw")
    missing = np.flatnonzero(rows < 0)
    if missing.size and args.on_missing == "error":
        shown = []
        for i in missing[:3].tolist():
            p = prompts[i]
            txt = f"line {lines[i]} prompt_key {dig[i].tobytes().hex()}"
            if p is not None:
                txt += f" (prompt {p[:60] + '...' if len(p) > 60 else p!r})"
            shown.append(txt)
        raise ValueError(
            f"{src}: {missing.size} row(s) have no reference rewards in {args.store}: {'; '.join(shown)}"
            f"{' ...' if missing.size > 3 else ''}. Add these prompts with `infalign calibrate`, or pass "
            "--on-missing raw"
        )
    cal = store.calibrate(dig, rewards, on_missing="raw")
    ok = ~np.isnan(cal)
    transformed = np.full_like(cal, np.nan)
    if ok.any():
        transformed[ok] = tr(cal[ok])
    out_rows = []
    for i in range(rewards.shape[0]):
        row = {
            "prompt_key": dig[i].tobytes().hex(),
            "reward": float(rewards[i]),
            "calibrated": float(cal[i]) if ok[i] else None,
            "transformed": float(transformed[i]) if ok[i] else None,
        }
        if not ok[i]:
            row["missing"] = True
        out_rows.append(row)
    ks = store.k_stats()
    return {
        "store": str(args.store),
        "samples": str(src),
        "transform": tr.spec,
        "num_rows": len(out_rows),
        "num_missing": int(missing.size),
        "k": ks,
        "mean_calibrated": float(cal[ok].mean()) if ok.any() else None,
        "mean_transformed": float(transformed[ok].mean()) if ok.any() else None,
        "rows": out_rows,
    }


def run(args) -> int:
    if args.out is not None:  # before the work: a bad path fails in a moment, and never over an input
        check_output_file(args.out, overwrite=args.overwrite, flag="--out", inputs=[args.jsonl, args.store])
    res = score(args)
    if args.out:
        write_json(Path(args.out), res, indent=1, overwrite=args.overwrite)
    if args.json:
        json.dump(res, sys.stdout, allow_nan=False)
        sys.stdout.write("\n")
        return 0
    print(
        f"scored {res['num_rows']} samples of {res['samples']} against {res['store']} "
        f"(K {res['k']['min']}..{res['k']['max']}), transform {res['transform']}"
    )
    if res["num_missing"]:
        print(f"  {res['num_missing']} sample(s) without reference rewards (calibrated/transformed: null)")
    print(f"  {'prompt_key':<14}{'reward':>12}{'calibrated':>12}{'transformed':>13}")
    for r in res["rows"][: max(args.head, 0)]:
        c = "-" if r["calibrated"] is None else f"{r['calibrated']:.4f}"
        t = "-" if r["transformed"] is None else f"{r['transformed']:.4f}"
        print(f"  {r['prompt_key'][:12]:<14}{r['reward']:>12.5g}{c:>12}{t:>13}")
    if res["num_rows"] > args.head:
        print(f"  ... {res['num_rows'] - args.head} more rows (use --json or --out for all)")
    if res["mean_calibrated"] is not None:
        print(f"  mean calibrated {res['mean_calibrated']:.4f}, mean transformed {res['mean_transformed']:.4f}")
    return 0
