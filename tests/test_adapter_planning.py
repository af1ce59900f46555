import json
import subprocess
import sys

import pytest

from openrlhf_infalign.adapter.planning import (
    beta_for_kl_coef,
    direct_entry,
    openrlhf_args,
    plan_with_flags,
    unplanned_reason,
)
from openrlhf_infalign.core.direct import direct_kl_coef, direct_plan
from openrlhf_infalign.core.planning import plan
from openrlhf_infalign.errors import UserError


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
    keys = ["inference", "kl", "k", "estimator", "n_samples_per_prompt", "recommended", "optimal", "gap_to_optimal"]
    assert list(p) == keys + ["baselines", "openrlhf_args", "direct", "notes"]
    assert (p["k"], p["estimator"], p["n_samples_per_prompt"]) == (None, "gae", 1)
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


@pytest.mark.parametrize(
    "estimator, n, factor",
    [("gae", 1, 1.0), ("reinforce", 1, 1.0), ("rloo", 4, 1.0), ("reinforce_baseline", 4, 0.75), ("dr_grpo", 8, 7 / 8)],
)
def test_init_coef_gives_the_planned_beta_under_each_estimator(estimator, n, factor):
    p = plan_with_flags("bon:4", 0.5, estimator=estimator, n_samples_per_prompt=n)
    beta = p["recommended"]["beta"]
    assert p["recommended"]["kl_coef"] == pytest.approx(beta * factor, rel=1e-12)
    for b in p["baselines"].values():
        assert b["kl_coef"] == pytest.approx(b["beta"] * factor, rel=1e-12)
    flags = p["openrlhf_args"]
    assert float(flags[flags.index("--algo.kl.init_coef") + 1]) == pytest.approx(beta * factor, rel=1e-3)
    assert beta_for_kl_coef(p["recommended"]["kl_coef"], estimator, n) == pytest.approx(beta, rel=1e-12)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"estimator": "group_norm", "n_samples_per_prompt": 4}, "group_norm divides the rewards"),
        ({"estimator": "ppo2"}, "unknown advantage estimator 'ppo2'"),
        ({"estimator": "reinforce_baseline", "n_samples_per_prompt": 1}, "needs --rollout.n_samples_per_prompt >= 2"),
    ],
)
def test_plan_refuses_what_no_coefficient_can_plan(kwargs, words):
    with pytest.raises((UserError, ValueError), match=words):
        plan_with_flags("bon:4", 0.5, **kwargs)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"kl_use_loss": True}, "--algo.kl.use_loss"),
        ({"kl_estimator": "k3"}, "--algo.kl.estimator k3"),
        ({"kl_target": 0.1}, "--algo.kl.target"),
    ],
)
def test_kl_settings_that_break_the_mapping_are_named(kwargs, words):
    assert words in unplanned_reason("rloo", 4, **kwargs)
    assert unplanned_reason("rloo", 4) is None


def test_the_estimator_table_is_typed_data():
    from openrlhf_infalign.adapter.planning import ESTIMATORS, PLANNED, NotPlanned, Planned

    assert all(isinstance(e, (Planned, NotPlanned)) for e in ESTIMATORS.values())
    assert [name for name, e in ESTIMATORS.items() if isinstance(e, NotPlanned)] == ["group_norm"]
    assert set(PLANNED) == set(ESTIMATORS) - {"group_norm"}
    assert ESTIMATORS["group_norm"].reason == unplanned_reason("group_norm", 4)
    assert ESTIMATORS["reinforce_baseline"].words() == "beta * (n-1)/n" and ESTIMATORS["rloo"].words() == "beta"


@pytest.mark.parametrize("estimator, scale", [("rloo", 8 / 7), ("reinforce_baseline", 1.0)])
def test_plan_carries_the_direct_entry_with_its_flags(estimator, scale):
    """The ``direct`` entry the study reads: its coefficient for the estimator and its train flags."""
    p = plan_with_flags("won:4", 0.5, k=16, estimator=estimator, n_samples_per_prompt=8)
    d = p["direct"]
    assert (d["wrapper"], d["baseline"], d["refused"], d["k"], d["k_aware"]) == (
        "infalign.direct",
        "loo",
        None,
        16,
        True,
    )
    assert d["kl_coef"] == pytest.approx(direct_kl_coef({"inference": "won:4", "kl": 0.5}, estimator, 8, k=16))
    assert d["kl_coef"] == pytest.approx(d["coef"] * scale) and d["reward_scale"] == pytest.approx(scale)
    row = direct_plan("won:4", 0.5, 16)
    assert (d["kl"], d["win_rate"]) == (row["kl"], row["win_rate"])
    assert d["openrlhf_args"] == ["--reward_wrapper", "infalign.direct", "--infalign.inference", "won:4",
                                  "--infalign.kl_budget", "0.5", "--algo.kl.init_coef", f"{d['kl_coef']:.4g}"]  # fmt: skip


@pytest.mark.parametrize(
    "inference, estimator, n, words",
    [("bon:4", "gae", 1, "needs --rollout.n_samples_per_prompt > 4"), ("standard", "rloo", 8, "bon:N or won:N"),
     ("bon:2", "group_norm", 8, "cannot train with --algo.advantage.estimator group_norm")],
)  # fmt: skip
def test_plan_says_why_the_direct_objective_is_refused(inference, estimator, n, words):
    if estimator == "group_norm":  # the CTRL plan refuses it first; the direct entry on its own
        d = direct_entry(inference, 0.5, None, estimator, n)
    else:
        d = plan_with_flags(inference, 0.5, estimator=estimator, n_samples_per_prompt=n)["direct"]
    assert set(d) == {"wrapper", "baseline", "refused"} and words in d["refused"]
