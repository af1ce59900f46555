"""Building the infalign.* wrappers from args (adapter/build.py) and the one dotted-args getter (adapter/args.py).

Bare namespaces stand for OpenRLHF's hierarchized args here: the factories must also work on the source patch path
(no console, so no ``args.infalign.explicit_dests``). The real parser is exercised in test_adapter_console.py.
"""

from __future__ import annotations

import pickle
from types import SimpleNamespace as NS

import cloudpickle
import numpy as np
import pytest

from openrlhf_infalign.adapter import build
from openrlhf_infalign.adapter.args import get
from openrlhf_infalign.adapter.planning import ACCEPT_FLAG, kl_coef_for_beta
from openrlhf_infalign.adapter.wrapper import (
    CTRLRewardWrapper,
    make_calibrate_wrapper,
    make_ctrl_wrapper,
    make_direct_wrapper,
)
from openrlhf_infalign.core.direct import direct_coef_k, direct_kl_coef
from openrlhf_infalign.core.finite_k import expected_kl_k, expected_win_rate_k
from openrlhf_infalign.core.planning import resolve_transform
from openrlhf_infalign.store import prompt_digests, prompt_key, write_store

PROMPTS = ["Q : one A :", "Q : two A :"]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("stores") / "train"
    write_store(
        d,
        [prompt_key(p) for p in PROMPTS],
        [rng.normal(size=16) for _ in PROMPTS],
        manifest={"template": {"input_template": "Q : {} A :", "apply_chat_template": False}},
    )
    return str(d)


def make_args(store_dir, kl_init_coef=0.01, **infalign):
    fields = dict(store=store_dir, inference="bon:4", transform="auto", kl_budget=0.5, on_missing="error")
    return NS(
        infalign=NS(**{**fields, **infalign}),
        data=NS(input_template="Q : {} A :", apply_chat_template=False, input_key=None),
        reward=NS(clip_range=None, normalize_enable=False),
        algo=NS(kl=NS(init_coef=kl_init_coef)),
    )


def test_get_reads_namespaces_and_dicts_with_defaults():
    args = NS(a=NS(b={"c": 3, "none": None}), top=0)
    assert get(args, "a.b.c") == 3
    assert get(args, "top", 7) == 0  # a falsy value is a value
    assert get(args, "a.b.none", "d") == "d" and get(args, "a.x.y", "d") == "d" and get(None, "a", 1) == 1


def test_factory_builds_a_complete_wrapper(store_dir, capsys):
    w = make_ctrl_wrapper(make_args(store_dir))
    assert isinstance(w, CTRLRewardWrapper) and w.name == "infalign.ctrl" and len(w.store) == 2
    assert w.inference.spec == "bon:4" and w.kl_budget == 0.5 and w.beta > 0
    assert w.transform.spec.startswith("exp:t=") and w.on_missing == "error"
    # the plan travels with the wrapper to the trainer actor (Ray pickles with cloudpickle)
    w2 = pickle.loads(cloudpickle.dumps(w))
    assert (w2.inference.spec, w2.beta, w2.kl_budget, w2.transform.spec) == (
        w.inference.spec,
        w.beta,
        w.kl_budget,
        w.transform.spec,
    )
    err = capsys.readouterr().err
    assert "reference store" in err and "planned for KL 0.5 nats" in err


def test_calibrate_factory_is_identity_without_a_plan(store_dir):
    w = make_calibrate_wrapper(make_args(store_dir, kl_budget=None))
    assert w.transform.spec == "identity" and w.name == "infalign.calibrate" and w.beta is None


def test_settings_are_the_constructor_arguments(store_dir):
    settings = build.ctrl_settings(make_args(store_dir, transform="exp:t=3", kl_budget=None), "infalign.ctrl")
    keys = {"store", "transform", "inference", "beta", "kl_budget", "on_missing", "name"}
    assert set(settings) == keys | {"kl_coef", "k"}
    assert settings["transform"].spec == "exp:t=3" and settings["kl_budget"] is None


def test_beta_advice_reads_explicit_dests(store_dir, capsys):
    # Source patch path: no explicit dests; upstream's default value counts as not given.
    make_ctrl_wrapper(make_args(store_dir))
    assert "--algo.kl.init_coef was not given" in capsys.readouterr().err
    # The console's hand-off: given explicitly with the default's value.
    make_ctrl_wrapper(make_args(store_dir, explicit_dests=["algo.kl.init_coef"]))
    err = capsys.readouterr().err
    assert "was not given" not in err and "differs from the planned beta" in err
    make_ctrl_wrapper(make_args(store_dir, explicit_dests=[]))
    assert "--algo.kl.init_coef was not given" in capsys.readouterr().err


def test_auto_needs_a_kl_budget_and_store_is_required(store_dir):
    with pytest.raises(ValueError, match="--infalign.kl_budget"):
        make_ctrl_wrapper(make_args(store_dir, kl_budget=None))
    with pytest.raises(ValueError, match="--infalign.store"):
        make_ctrl_wrapper(make_args(None))


def test_wrapper_digests_are_the_store_format_digests(store_dir):
    w = make_ctrl_wrapper(make_args(store_dir, transform="identity"))
    prompts = [PROMPTS[1], PROMPTS[0], PROMPTS[1], "never seen"]
    np.testing.assert_array_equal(w.prompt_digests(prompts), prompt_digests(prompts))
    assert len(w._digest_cache) == 3  # each distinct prompt once
    np.testing.assert_array_equal(w.prompt_digests(prompts[:2]), prompt_digests(prompts[:2]))  # from the cache


def run_args(store_dir, estimator="reinforce_baseline", n=8, kl_init_coef=0.01, kl=None, **infalign):
    """Args of a demo-like run: its advantage estimator, group size and KL settings (upstream's names)."""
    args = make_args(store_dir, kl_init_coef=kl_init_coef, **infalign)
    args.algo.advantage = NS(estimator=estimator)
    args.rollout = NS(n_samples_per_prompt=n)
    for key, value in (kl or {}).items():
        setattr(args.algo.kl, key, value)
    return args


def test_plan_coefficient_is_applied_for_the_estimator_n_and_store_k(store_dir, capsys):
    args = run_args(store_dir, kl_budget=2.0, explicit_dests=[])
    w = make_ctrl_wrapper(args)
    transform, beta = resolve_transform("auto", "bon:4", 2.0, k=16)  # K: the store's median (16 per prompt here)
    assert w.k == 16 and w.transform.spec == transform.spec and w.beta == pytest.approx(beta)
    assert w.kl_coef == pytest.approx(kl_coef_for_beta(beta, "reinforce_baseline", 8)) == pytest.approx(beta * 7 / 8)
    assert args.algo.kl.init_coef == w.kl_coef  # set on args, which upstream's train() reads next
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "KL COEFFICIENT SET BY THE PLAN" in x)
    assert "--algo.kl.init_coef was not given" in line and f"--algo.kl.init_coef {w.kl_coef:.4g}" in line
    assert f"planned beta {beta:.4g}" in line and "estimator reinforce_baseline, n = 8, K = 16" in line
    assert f"expected KL {expected_kl_k(transform, beta, 16):.3g} nats" in line and "expected KL 2 nats" in line
    assert f"bon:4 win rate {expected_win_rate_k('bon:4', transform, beta, 16):.3f}" in line
    # a fixed transform with a KL budget is planned (and applied) alike
    args = run_args(store_dir, estimator="rloo", n=4, transform="exp:t=10", kl_budget=0.5)
    w = make_ctrl_wrapper(args)
    assert args.algo.kl.init_coef == w.kl_coef == pytest.approx(resolve_transform("exp:t=10", None, 0.5, k=16)[1])


def test_explicit_coefficient_wins_with_the_expected_kl_at_it(store_dir, capsys):
    args = run_args(store_dir, kl_init_coef=0.1, kl_budget=2.0, explicit_dests=["algo.kl.init_coef"])
    w = make_ctrl_wrapper(args)
    assert args.algo.kl.init_coef == w.kl_coef == 0.1 and w.beta == pytest.approx(0.1 * 8 / 7)
    err = capsys.readouterr().err
    assert "SET BY THE PLAN" not in err and "differs from the planned beta" in err
    assert f"effective beta {0.1 * 8 / 7:.4g}" in err
    assert f"expected KL {expected_kl_k(w.transform, 0.1 * 8 / 7, 16):.3g} nats" in err


@pytest.mark.parametrize(
    "estimator, kl, reason",
    [
        ("group_norm", {}, "group_norm divides"),
        ("rloo", {"use_loss": True}, "--algo.kl.use_loss"),
        ("reinforce_baseline", {"estimator": "k3"}, "--algo.kl.estimator k3"),
        ("gae", {"target": 0.1}, "--algo.kl.target"),
    ],
)
def test_unplanned_kl_settings_stop_unless_accepted(store_dir, capsys, estimator, kl, reason):
    with pytest.raises(ValueError, match=reason) as e:
        make_ctrl_wrapper(run_args(store_dir, estimator=estimator, kl=kl, kl_budget=0.5))
    msg = str(e.value)
    assert "\n" not in msg and ACCEPT_FLAG in msg and "Supported: --algo.advantage.estimator gae | reinforce" in msg
    args = run_args(store_dir, estimator=estimator, kl=kl, kl_budget=0.5, accept_unplanned_kl=True)
    w = make_ctrl_wrapper(args)
    assert w.transform.spec.startswith("exp:t=") and w.beta is None and w.kl_coef == args.algo.kl.init_coef == 0.01
    assert "the KL will NOT follow the plan" in capsys.readouterr().err
    # without a KL budget nothing is planned, so nothing is refused
    assert make_ctrl_wrapper(run_args(store_dir, estimator=estimator, kl=kl, transform="exp:t=3", kl_budget=None))


def test_store_k_is_the_median_k_per_prompt(store_dir):
    assert build.store_k(build.ReferenceStore.open(store_dir)) == 16
    assert build.store_k(NS(manifest={"k_stats": {"median": 31.5}})) == 32
    assert build.store_k(NS(manifest={"k_stats": {"median": 1}})) is None and build.store_k(NS(manifest={})) is None


# ── infalign.direct: refusals at start-up and its planned coefficient ──


@pytest.mark.parametrize(
    "inference, estimator, n, flags, match",
    [
        ("bon:4", "rloo", 4, {}, r"needs --rollout.n_samples_per_prompt > 4 .* got 4"),
        ("won:2", "reinforce", 1, {}, r"--infalign.inference won:2 needs --rollout.n_samples_per_prompt > 2"),
        ("bon:4", "group_norm", 8, {}, r"cannot train with --algo.advantage.estimator group_norm: .*std.*; use "),
        ("standard", "rloo", 8, {}, r"give --infalign.inference bon:N or won:N"),
        ("bon:4", "rloo", 8, {"transform": "exp:t=5"}, r"drop --infalign.transform exp:t=5"),
    ],
)
def test_direct_refuses_at_start_up_in_one_line(store_dir, inference, estimator, n, flags, match):
    args = run_args(store_dir, estimator=estimator, n=n, inference=inference, **flags)
    with pytest.raises(ValueError, match=match) as e:
        make_direct_wrapper(args)
    assert "\n" not in str(e.value) and "--reward_wrapper infalign.direct" in str(e.value)


@pytest.mark.parametrize("estimator, scale", [("rloo", 8 / 7), ("reinforce_baseline", 1.0), ("flash_reinforce", 1.0)])
def test_direct_plan_coefficient_is_applied(store_dir, capsys, estimator, scale):
    args = run_args(store_dir, estimator=estimator, n=8, inference="won:4", kl_budget=0.5, explicit_dests=[])
    w = make_direct_wrapper(args)
    planned = direct_kl_coef({"inference": "won:4", "kl": 0.5}, estimator, 8, k=16)
    assert args.algo.kl.init_coef == w.kl_coef == pytest.approx(planned)
    assert w.coef == pytest.approx(direct_coef_k("won:4", 0.5, 16)) == pytest.approx(planned / scale)
    assert (w.n, w.k, w.kl_budget, w.objective, w.transform, w.beta) == (8, 16, 0.5, "direct", None, None)
    err = capsys.readouterr().err
    assert "KL COEFFICIENT SET BY THE PLAN" in err and f"--algo.kl.init_coef {planned:.4g}" in err
    assert f"estimator {estimator}, n = 8, K = 16" in err and "leave-one-out baseline" in err


def test_direct_explicit_coefficient_wins_and_no_budget_plans_nothing(store_dir, capsys):
    args = run_args(store_dir, estimator="rloo", n=8, kl_init_coef=0.08, explicit_dests=["algo.kl.init_coef"])
    w = make_direct_wrapper(args)
    assert args.algo.kl.init_coef == w.kl_coef == 0.08 and w.coef == pytest.approx(0.08 * 7 / 8)
    assert "using yours: coefficient 0.07 on the direct reward" in capsys.readouterr().err
    args = run_args(store_dir, estimator="rloo", n=8, kl_budget=None)
    w = make_direct_wrapper(args)
    assert w.kl_coef == args.algo.kl.init_coef == 0.01 and "nothing planned" in capsys.readouterr().err


def test_direct_unplanned_kl_stops_unless_accepted(store_dir, capsys):
    with pytest.raises(ValueError, match="--reward_wrapper infalign.direct with --infalign.kl_budget plans a KL"):
        make_direct_wrapper(run_args(store_dir, estimator="rloo", n=8, kl={"use_loss": True}))
    args = run_args(store_dir, estimator="rloo", n=8, kl={"use_loss": True}, accept_unplanned_kl=True)
    w = make_direct_wrapper(args)
    assert w.coef is None and w.kl_coef == 0.01 and "the KL will NOT follow" in capsys.readouterr().err
