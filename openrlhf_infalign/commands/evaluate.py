"""Best-of-N / Worst-of-N win rates of a policy against the reference policy, from per-prompt rewards.

Inputs are JSONL files with one row per prompt, {"prompt": "...", "rewards": [r1, r2, ...]} or
{"prompt_key": "<sha1 hex of the UTF-8 prompt>", "rewards": [...]}; rows that repeat a prompt are pooled.
--reference may also be a reference store directory (`infalign calibrate` / `infalign store`); its rewards are
float32, so policy rewards are compared at float32 precision then (ties with stored rewards stay ties).
The estimates are exact U-statistics over all N-subsets of both sides (unbiased; ties count 1/2), averaged over
prompts, with a prompt-level standard error. A prompt counts for N only if both sides have >= N rewards for it.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from openrlhf_infalign import options
from openrlhf_infalign.errors import UserError
from openrlhf_infalign.files import check_input_file, check_output_file
from openrlhf_infalign.options import option, parse_ns
from openrlhf_infalign.store import ReferenceStore
from openrlhf_infalign.store.rows import check_rewards, iter_reward_lists

_SHOW = 5  # missing prompts listed in an error


@dataclass(kw_only=True)
class EvaluateSettings:
    """`infalign evaluate`: policy rewards against reference rewards, per N."""

    policy: str = option(flags=("--policy",), metavar="P.jsonl", help="policy rewards, one JSON row per prompt")
    reference: str = option(
        flags=("--reference",),
        metavar="R.jsonl|STORE",
        help="reference (base policy) rewards: a JSONL file like --policy, or a reference store directory",
    )
    eval_n: str = option(
        "auto",
        flags=("--eval-n",),
        metavar="N1,N2,...",
        help="comma-separated N for Best-of-N / Worst-of-N; auto = powers of two up to the largest N that every "
        "prompt has samples for on both sides",
    )
    json: bool = option(False, flags=("--json",), help="print the result as one JSON object instead of a table")
    plot: Optional[str] = option(None, flags=("--plot",), metavar="OUT.png", help="also plot win rate vs N (PNG)")
    overwrite: bool = option(False, flags=("--overwrite",), help="replace an existing --plot file")
    skip_missing: bool = option(
        False,
        flags=("--skip-missing",),
        help="drop prompts found on one side only (their count is reported) instead of failing",
    )


def add_arguments(parser) -> None:
    options.add_arguments(parser, EvaluateSettings)


def _short(prompt: str, width: int = 60) -> str:
    return repr(prompt if len(prompt) <= width else prompt[:width] + "...")


def read_rewards_jsonl(path) -> tuple[dict[str, list[np.ndarray]], dict[str, str]]:
    """{prompt_key: [reward arrays, one per row]} in file order, and {prompt_key: prompt} where the prompt is given.

    A bad row raises StoreError naming its file and line (the row checks of `infalign store import`).
    """
    path = check_input_file(path, "rewards")
    rewards: dict[str, list[np.ndarray]] = {}
    prompts: dict[str, str] = {}
    from tqdm import tqdm

    with open(path, "rb") as f:
        lines = tqdm(f, desc=f"reading {path.name}", unit=" rows", disable=None, leave=False, file=sys.stderr)
        for lineno, digest, prompt, values in iter_reward_lists(path, lines):
            key = digest.hex()
            if prompt is not None:
                prompts[key] = prompt
            rewards.setdefault(key, []).append(check_rewards(path, values, [len(values)], [lineno], np.float64))
    if not rewards:
        raise UserError(f"{path}: no rows")
    return rewards, prompts


def _describe(keys: list[str], prompts: dict[str, str]) -> str:
    shown = [_short(prompts[k]) if k in prompts else k for k in keys[:_SHOW]]
    return "; ".join(shown) + (f"; ... ({len(keys) - _SHOW} more)" if len(keys) > _SHOW else "")


def _is_store(path: Path) -> bool:
    return path.is_dir() and (path / "manifest.json").is_file()


def load_pairs(policy_path, reference_path, skip_missing: bool):
    """(keys, policy arrays, reference arrays, info) for the prompts on both sides, in policy file order."""
    pol, prompts = read_rewards_jsonl(policy_path)
    ref_path = Path(reference_path)
    info: dict = {}
    if ref_path.is_dir():
        if not _is_store(ref_path):
            raise UserError(f"{ref_path} is a directory but not a reference store (no manifest.json)")
        store = ReferenceStore.open(ref_path, warn_small_k=False)  # small K is a calibration concern only
        keys = list(pol)
        rows = store.rows_for_keys(keys, on_missing="raw")
        policy_only = [k for k, r in zip(keys, rows.tolist()) if r < 0]
        reference_only: list[str] = []  # a store usually covers more prompts (the whole training set): not an error
        ref = {
            k: [np.asarray(store.rewards_for_row(r), dtype=np.float64)] for k, r in zip(keys, rows.tolist()) if r >= 0
        }
        # The store holds float32: compare policy rewards at that precision so equal rewards still tie.
        pol = {k: [v.astype(np.float32).astype(np.float64) for v in vs] for k, vs in pol.items()}
        info["reference_store"] = str(ref_path)
    else:
        ref, ref_prompts = read_rewards_jsonl(ref_path)
        prompts = {**ref_prompts, **prompts}
        policy_only = [k for k in pol if k not in ref]
        reference_only = [k for k in ref if k not in pol]
    if policy_only or reference_only:
        if not skip_missing:
            parts = []
            if policy_only:
                parts.append(
                    f"{len(policy_only)} prompt(s) of {policy_path} have no reference rewards: "
                    f"{_describe(policy_only, prompts)}"
                )
            if reference_only:
                parts.append(
                    f"{len(reference_only)} prompt(s) of {reference_path} are not in {policy_path}: "
                    f"{_describe(reference_only, prompts)}"
                )
            raise UserError(". ".join(parts) + ". Score the same prompts on both sides, or pass --skip-missing")
        info.update(
            skipped_missing=len(policy_only) + len(reference_only),
            skipped_policy_only=len(policy_only),
            skipped_reference_only=len(reference_only),
        )
    keys = [k for k in pol if k in ref]
    if not keys:
        raise UserError(f"no prompt of {policy_path} is in {reference_path}: are they rewards of the same prompts?")
    policy = [np.concatenate(pol[k]) for k in keys]
    reference = [np.concatenate(ref[k]) for k in keys]
    return keys, policy, reference, info


def run(args) -> int:
    from openrlhf_infalign.core.winrate import default_ns, win_rates

    if args.plot is not None:  # before the work: a bad path fails in a moment, and never over an input
        check_output_file(args.plot, overwrite=args.overwrite, flag="--plot", inputs=[args.policy, args.reference])
    keys, policy, reference, info = load_pairs(args.policy, args.reference, args.skip_missing)
    m = np.array([len(x) for x in policy])
    k = np.array([len(x) for x in reference])
    ns = parse_ns(args.eval_n, "--eval-n") or default_ns(int(np.minimum(m, k).min()), int(np.minimum(m, k).min()))
    result = win_rates(policy, reference, ns)
    partial = [n for n in ns if result["bon"][str(n)]["num_prompts"] < len(keys)]
    if partial:
        print(
            f"infalign evaluate: note: N={partial} use only the prompts with at least N samples on both sides "
            f"(see num_prompts per N)",
            file=sys.stderr,
        )
    if "skipped_missing" in info:
        result["skipped_missing"] = info["skipped_missing"]
        result["skipped_policy_only"] = info["skipped_policy_only"]
        result["skipped_reference_only"] = info["skipped_reference_only"]
    result["policy_samples"] = {"min": int(m.min()), "max": int(m.max())}
    result["reference_samples"] = {"min": int(k.min()), "max": int(k.max())}
    if args.plot:
        from openrlhf_infalign.report import plot_winrate_vs_n

        plot_winrate_vs_n(
            result,
            args.plot,
            title=f"{Path(args.policy).name} vs {Path(args.reference).name}: {len(keys)} prompts (bars: 95% CI)",
            overwrite=args.overwrite,
        )
    if args.json:
        print(json.dumps(result))
    else:
        from openrlhf_infalign.report import winrate_table

        print(
            f"policy {args.policy} (M = {m.min()}..{m.max()}) vs reference {args.reference} (K = {k.min()}..{k.max()})"
        )
        if "skipped_missing" in info:
            print(f"skipped {info['skipped_missing']} prompt(s) found on one side only")
        print(winrate_table(result))
        if args.plot:
            print(f"wrote {os.fspath(args.plot)}")
    return 0
