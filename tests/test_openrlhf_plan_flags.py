import json
import subprocess
import sys

import pytest

from openrlhf_infalign.commands.plan import plan_with_flags
from openrlhf_infalign.core.planning import plan
from openrlhf_infalign.openrlhf.plan_flags import openrlhf_args


def test_flags_train_the_recommended_transform():
    p = plan("bon:4", 0.5)
    args = openrlhf_args(p)
    assert args[args.index("--reward_wrapper") + 1] == "infalign.ctrl"
    assert args[args.index("--infalign.transform") + 1] == p["recommended"]["transform"]
    assert float(args[args.index("--algo.kl.init_coef") + 1]) == pytest.approx(p["recommended"]["beta"], rel=1e-3)
    assert args[args.index("--infalign.inference") + 1] == "bon:4"
    assert args[args.index("--infalign.kl_budget") + 1] == "0.5"


def test_plan_json_keeps_its_keys_in_order():
    p = plan_with_flags("bon:4", 0.5)
    keys = ["inference", "kl", "recommended", "optimal", "gap_to_optimal", "baselines", "openrlhf_args", "notes"]
    assert list(p) == keys
    assert p["openrlhf_args"] == openrlhf_args(plan("bon:4", 0.5))


def test_plan_command_imports_no_openrlhf():
    # `infalign plan` must stay quick to start: the flags are strings, OpenRLHF itself is never loaded.
    code = (
        "import json, sys, openrlhf_infalign.commands.plan\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('openrlhf', 'torch'))))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == []
