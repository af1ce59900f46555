"""Prompts of Anthropic HH (helpful-base / harmless-base) as OpenRLHF prompt datasets: JSONL, one chat per line.

Each HH row is a dialogue "\\n\\nHuman: ...\\n\\nAssistant: ..." (the "chosen" side). The prompt is the dialogue up to
its last Assistant turn, as a list of chat messages ending with the user's turn:

    {"input": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ..., {"role": "user", ...}]}

so `--data.input_key input --data.apply_chat_template` renders it with the policy's own chat template, for
`infalign calibrate` and `openrlhf train_ppo` alike (same flags -> same prompt strings -> store keys match).
Duplicate prompts (HH has chosen/rejected pairs sharing a prompt) are written once.

    python examples/prepare_hh_prompts.py --subset helpful-base --out data/ --eval-size 500

writes data/hh_helpful-base_train.jsonl (RL prompts) and data/hh_helpful-base_eval.jsonl (first --eval-size prompts
of the HH test split). Needs `datasets` and network access to the Hugging Face hub (or a local copy: --dataset DIR).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile

_TURN = re.compile(r"\n\n(Human|Assistant):")


def parse_dialogue(text: str) -> list[dict]:
    """HH dialogue text -> chat messages [{"role": "user"|"assistant", "content": str}, ...] (empty turns kept)."""
    parts = _TURN.split("\n\n" + text.lstrip("\n"))
    # split() gives ["", role, content, role, content, ...]; anything before the first turn marker is dropped.
    messages = []
    for role, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if role == "Human" else "assistant", "content": content.strip()})
    return messages


def prompt_messages(text: str) -> list[dict] | None:
    """The prompt of an HH row: every turn before the final Assistant answer; None if it has no user turn."""
    messages = parse_dialogue(text)
    while messages and messages[-1]["role"] == "assistant":
        messages.pop()
    if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"]:
        return None
    return messages


def write_jsonl(path: str, rows) -> int:
    """Write rows atomically (temp file + rename): an interrupted run never leaves a half-written dataset."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".prompts-", suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return n


def unique_prompts(texts, limit: int | None = None) -> list[dict]:
    seen, out = set(), []
    for text in texts:
        msgs = prompt_messages(text)
        if msgs is None:
            continue
        key = json.dumps(msgs, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        out.append({"input": msgs})
        if limit is not None and len(out) >= limit:
            break
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--subset",
        required=True,
        choices=["helpful-base", "harmless-base"],
        help="HH data_dir: helpful-base (helpfulness) or harmless-base (harmlessness)",
    )
    p.add_argument("--dataset", default="Anthropic/hh-rlhf", help="hub name or local directory of the HH data")
    p.add_argument("--out", required=True, help="output directory for the two JSONL files")
    p.add_argument("--eval-size", type=int, default=500, help="prompts taken from the test split for evaluation")
    p.add_argument("--max-train", type=int, default=None, help="cap on training prompts (default: all)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from datasets import load_dataset

    data = load_dataset(args.dataset, data_dir=args.subset)
    train = unique_prompts(data["train"]["chosen"], args.max_train)
    evals = unique_prompts(data["test"]["chosen"], args.eval_size)
    name = args.subset
    n_train = write_jsonl(os.path.join(args.out, f"hh_{name}_train.jsonl"), train)
    n_eval = write_jsonl(os.path.join(args.out, f"hh_{name}_eval.jsonl"), evals)
    print(json.dumps({"subset": name, "train_prompts": n_train, "eval_prompts": n_eval, "out": args.out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
