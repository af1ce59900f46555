"""Building the infalign.* wrappers from args (openrlhf/build.py) and the one dotted-args getter (openrlhf/args.py).

Bare namespaces stand for OpenRLHF's hierarchized args here: the factories must also work on the source patch path
(no console, so no ``args.infalign.explicit_dests``). The real parser is exercised in test_openrlhf_console.py.
"""

from __future__ import annotations

import pickle
from types import SimpleNamespace as NS

import cloudpickle
import numpy as np
import pytest

from openrlhf_infalign.openrlhf import build
from openrlhf_infalign.openrlhf.args import get
from openrlhf_infalign.openrlhf.wrapper import CTRLRewardWrapper, make_calibrate_wrapper, make_ctrl_wrapper
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
    assert set(settings) == {"store", "transform", "inference", "beta", "kl_budget", "on_missing", "name"}
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
