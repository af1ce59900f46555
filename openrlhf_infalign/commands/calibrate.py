"""Build the reference reward store: K samples of the base policy per training prompt, scored by the training reward.

Takes OpenRLHF's own `train_ppo_ray` flags for the policy, the prompt dataset and its templating, the reward source
and the sampling parameters, so one set of flags serves both jobs and every store key equals the templated prompt
the trainer sees (`Experience.prompts`). Work is sharded and resumable: re-run the same command after a kill.

Example:

  infalign calibrate --pretrain sft/ --data.prompt_dataset prompts.jsonl --data.apply_chat_template
    --reward.model_name_or_path rm/ --k 32 --out refs/
"""

from __future__ import annotations

import argparse
import json

from openrlhf_infalign.adapter.calibrate import add_arguments as add_settings_arguments
from openrlhf_infalign.adapter.calibrate import run_calibration, settings_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    groups = add_settings_arguments(parser)
    groups["calibration"].add_argument("--json", action="store_true", help="print only the summary JSON")


def run(args) -> int:
    settings = settings_from_args(args)
    summary = run_calibration(settings, log=(lambda msg: None) if args.json else print)
    if args.json:
        print(json.dumps(summary))
    return 0
