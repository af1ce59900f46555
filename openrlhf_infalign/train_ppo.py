"""``python -m openrlhf_infalign.train_ppo ...``: the same as ``openrlhf train_ppo ...`` (OpenRLHF's own
``train_ppo_ray`` with InfAlign's flags and reward wrappers loaded; see openrlhf_infalign/adapter/console.py)."""

import sys

from openrlhf_infalign.adapter.console import run_train_ppo

if __name__ == "__main__":
    sys.exit(run_train_ppo(sys.argv[1:], prog="python -m openrlhf_infalign.train_ppo"))
