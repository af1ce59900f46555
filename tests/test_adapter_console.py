"""`openrlhf train_ppo` runs OpenRLHF 0.11.2's REAL train_ppo_ray module (its parser, hierarchize, validation) up to
train(), which the test intercepts at exactly that boundary. Only flash_attn is a stand-in (CPU machine)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from openrlhf_infalign.adapter.cpu.standins import install_flash_attn

install_flash_attn()

import openrlhf.trainer.ppo_trainer as upstream_ppo_trainer  # noqa: E402
import openrlhf.trainer.ppo_trainer_async as upstream_async  # noqa: E402
import ray  # noqa: E402

from openrlhf_infalign.adapter.console import main, run_train_ppo  # noqa: E402
from openrlhf_infalign.adapter.hook import runtime_env  # noqa: E402
from openrlhf_infalign.adapter.trainer import (  # noqa: E402
    InfAlignPPOTrainerActor,
    InfAlignPPOTrainerAsyncActor,
)
from openrlhf_infalign.store import prompt_key, write_store  # noqa: E402

BASE = ["--actor.model_name_or_path", "policy", "--reward.model_name_or_path", "rm"]
TEMPLATE = ["--data.input_template", "Q : {} A :"]  # the store below records it: keys depend on it
PROMPTS = ["Q : one A :", "Q : two A :", "Q : three A :"]


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("stores") / "train"
    write_store(
        d,
        [prompt_key(p) for p in PROMPTS],
        [rng.normal(size=16) for _ in PROMPTS],
        prompts=PROMPTS,
        manifest={"template": {"input_template": "Q : {} A :", "apply_chat_template": False}},
    )
    return str(d)


def run(argv, capture=True):
    """Run the console; return (rc, args given to train(), snapshot of what train() saw)."""
    seen = {}

    def fake_train(args):
        seen["args"] = args
        seen["PPOTrainer"] = upstream_ppo_trainer.PPOTrainer
        seen["PPOTrainerAsync"] = upstream_async.PPOTrainerAsync
        seen["ray.init"] = ray.init

    rc = run_train_ppo(argv, train=fake_train)
    return rc, seen


def test_upstream_flags_pass_through_unchanged():
    argv = BASE + [
        "--rollout.n_samples_per_prompt", "4",
        "--algo.advantage.estimator", "group_norm",
        "--reward.clip_range", "-3", "5",
        "--actor.adam.lr", "3e-7",
        "--data.input_template", "Q : {} A :",
    ]  # fmt: skip
    rc, seen = run(argv)
    assert rc == 0
    args = seen["args"]
    assert args.rollout.n_samples_per_prompt == 4
    assert args.algo.advantage.estimator == "group_norm"
    assert list(args.reward.clip_range) == [-3.0, 5.0]
    assert args.actor.adam.lr == 3e-7
    # upstream's own validation ran: eps_clip_low_high filled in, critic dropped for a non-gae estimator,
    # vllm_generate_batch_size defaulted to the rollout batch size
    assert tuple(args.actor.eps_clip_low_high) == (0.2, 0.2)
    assert args.critic.model_name_or_path is None
    assert args.rollout.vllm_generate_batch_size == args.rollout.batch_size
    # no InfAlign flag given: no trainer swap, upstream's classes in place
    assert args.reward.wrapper is None and args.infalign.store is None
    assert seen["PPOTrainer"] is upstream_ppo_trainer.PPOTrainer
    assert not hasattr(seen["PPOTrainer"], "state")


def test_remote_rm_url_is_split_by_upstream():
    rc, seen = run(["--actor.model_name_or_path", "p", "--reward.remote_url", "http://a:1/get,http://b:2/get"])
    assert rc == 0
    assert seen["args"].reward.remote_url == ["http://a:1/get", "http://b:2/get"]
    assert seen["args"].critic.model_name_or_path == "p"  # gae + remote RM: upstream uses the actor as critic


@pytest.mark.parametrize("spelling", ["--reward_wrapper", "--reward.wrapper"])
def test_wrapper_flags_reach_train_and_trainer_is_swapped(spelling, store_dir):
    argv = BASE + [
        spelling, "infalign.ctrl",
        "--infalign.store", store_dir,
        "--infalign.inference", "bon:8",
        "--infalign.transform", "exp:t=7",
        "--data.input_template", "Q : {} A :",
        "--algo.advantage.estimator", "rloo",
        "--rollout.n_samples_per_prompt", "2",
    ]  # fmt: skip
    rc, seen = run(argv)
    assert rc == 0
    args = seen["args"]
    assert args.reward.wrapper == "infalign.ctrl"
    assert args.infalign.store == store_dir and args.infalign.inference == "bon:8"
    assert args.infalign.transform == "exp:t=7" and args.infalign.on_missing == "error"
    assert args.algo.advantage.estimator == "rloo"  # upstream flag unchanged next to ours
    launcher = seen["PPOTrainer"]
    assert launcher.actor_class is InfAlignPPOTrainerActor
    state = launcher.state
    assert state.wrapper.transform.spec == "exp:t=7" and state.inference.spec == "bon:8"
    assert state.store is state.wrapper.store and state.eval_store is state.store and len(state.store) == 3
    assert seen["PPOTrainerAsync"].actor_class is InfAlignPPOTrainerAsyncActor
    assert seen["ray.init"] is not ray.init  # upstream's ray.init call goes through the merge while train() runs
    # everything restored afterwards
    assert isinstance(upstream_ppo_trainer.PPOTrainer, ray.actor.ActorClass)
    assert upstream_ppo_trainer.PPOTrainer.__ray_actor_class__.__module__ == "openrlhf.trainer.ppo_trainer"


def test_runtime_env_merge_keeps_upstream_env_and_adds_hook():
    env = runtime_env({"env_vars": {"NCCL_DEBUG": "WARN", "TOKENIZERS_PARALLELISM": "true"}}, False)
    assert env["worker_process_setup_hook"] == "openrlhf_infalign.adapter.hook.worker_setup"
    assert env["env_vars"] == {"NCCL_DEBUG": "WARN", "TOKENIZERS_PARALLELISM": "true"}
    cpu_env = runtime_env({"env_vars": {"TOKENIZERS_PARALLELISM": "true"}}, True)
    assert cpu_env["env_vars"]["INFALIGN_CPU"] == "1" and cpu_env["env_vars"]["TOKENIZERS_PARALLELISM"] == "true"
    # the dotted hook path resolves to a callable, as Ray 2.55 requires
    mod, _, fn = env["worker_process_setup_hook"].rpartition(".")
    assert callable(getattr(__import__(mod, fromlist=[fn]), fn))


def test_auto_transform_plans_and_reports_beta(store_dir, capsys):
    argv = BASE + ["--reward_wrapper", "infalign.ctrl", "--infalign.store", store_dir, "--infalign.kl_budget", "0.5",
                   "--data.input_template", "Q : {} A :"]  # fmt: skip
    rc, seen = run(argv)
    assert rc == 0
    state = seen["PPOTrainer"].state
    assert state.transform.spec.startswith("exp:t=") and state.beta > 0
    err = capsys.readouterr().err
    assert "--algo.kl.init_coef was not given" in err and f"{state.beta:.4g}" in err
    assert "algo.kl.init_coef" not in seen["args"].infalign.explicit_dests
    assert state.wrapper.beta == state.beta and state.kl_budget == state.wrapper.kl_budget == 0.5
    # given explicitly (with upstream's default value): no advice to pass it; the console hands the dests over on args
    rc, seen = run(argv + ["--algo.kl.init_coef", "0.01"])
    assert "--algo.kl.init_coef was not given" not in capsys.readouterr().err
    assert {"algo.kl.init_coef", "infalign.kl_budget", "reward.wrapper"} <= set(seen["args"].infalign.explicit_dests)


def test_store_without_wrapper_is_reported(store_dir, capsys):
    rc, seen = run(BASE + ["--infalign.store", store_dir])
    assert rc == 0 and seen["PPOTrainer"] is upstream_ppo_trainer.PPOTrainer
    assert "without --reward_wrapper" in capsys.readouterr().err


def test_calibrate_wrapper_uses_identity(store_dir):
    rc, seen = run(BASE + TEMPLATE + ["--reward_wrapper", "infalign.calibrate", "--infalign.store", store_dir])
    assert rc == 0 and seen["PPOTrainer"].state.wrapper.transform.spec == "identity"


def test_unknown_wrapper_lists_known_names(capsys):
    rc, seen = run(BASE + ["--reward_wrapper", "infalign.nope"])
    assert rc == 2 and not seen
    err = capsys.readouterr().err
    assert "infalign.nope" in err and "infalign.ctrl" in err and "infalign.calibrate" in err


def test_missing_store_flag_and_template_mismatch(store_dir, capsys):
    rc, _ = run(BASE + ["--reward_wrapper", "infalign.ctrl", "--infalign.transform", "identity"])
    assert rc == 2 and "--infalign.store" in capsys.readouterr().err
    rc, _ = run(BASE + ["--reward_wrapper", "infalign.ctrl", "--infalign.store", store_dir,
                        "--infalign.transform", "identity",
                        "--data.input_template", "User: {}\nAssistant:"])  # fmt: skip
    assert rc == 2 and "input_template" in capsys.readouterr().err
    rc, _ = run(BASE + ["--reward_wrapper", "infalign.ctrl", "--infalign.store", store_dir,
                        "--infalign.transform", "identity", "--data.input_template", "User: {}\nAssistant:",
                        "--infalign.allow_mismatch"])  # fmt: skip
    assert rc == 0


def test_clip_range_warning(store_dir, capsys):
    rc, _ = run(BASE + TEMPLATE + ["--reward_wrapper", "infalign.ctrl", "--infalign.store", store_dir,
                                   "--infalign.transform", "identity",
                                   "--reward.clip_range", "0.2", "0.8"])  # fmt: skip
    assert rc == 0 and "--reward.clip_range 0.2 0.8 clips transformed rewards" in capsys.readouterr().err


def test_local_rm_eval_dataset_reaches_train(store_dir):
    # Upstream asserts --eval.dataset needs a remote RM; with the plugin active the local RM scores eval samples.
    argv = BASE + TEMPLATE + ["--reward_wrapper", "infalign.ctrl", "--infalign.store", store_dir,
                              "--infalign.transform", "identity", "--eval.dataset", "evalset.jsonl"]  # fmt: skip
    rc, seen = run(argv)
    assert rc == 0 and seen["args"].eval.dataset == "evalset.jsonl"
    assert seen["PPOTrainer"].state.eval_at_start is True
    rc, seen = run(argv + ["--infalign.no_eval_at_start"])
    assert seen["PPOTrainer"].state.eval_at_start is False
    with pytest.raises(AssertionError, match="eval_dataset"):  # without the plugin upstream's check stands
        run(BASE + ["--eval.dataset", "evalset.jsonl"])


def test_local_rm_eval_dataset_reaches_async_train(store_dir):
    # Async mode too: the training actor scores the eval samples its generator actor ships with the local RM.
    argv = BASE + TEMPLATE + ["--reward_wrapper", "infalign.ctrl", "--infalign.store", store_dir,
                              "--infalign.transform", "identity", "--eval.dataset", "evalset.jsonl",
                              "--train.async_enable"]  # fmt: skip
    rc, seen = run(argv)
    assert rc == 0 and seen["args"].eval.dataset == "evalset.jsonl"
    assert seen["PPOTrainerAsync"].state.eval_at_start is True
    with pytest.raises(AssertionError, match="eval_dataset"):
        run(BASE + ["--eval.dataset", "evalset.jsonl", "--train.async_enable"])


def test_help_lists_upstream_and_infalign_flags(capsys):
    rc = main(["train_ppo", "--help"])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.startswith("usage: openrlhf train_ppo")
    for flag in ("--reward.clip_range", "--algo.advantage.estimator", "--vllm.num_engines"):
        assert flag in out
    for flag in ("--reward_wrapper", "--reward.wrapper", "--infalign.store", "--infalign.inference",
                 "--infalign.transform", "--infalign.kl_budget", "--infalign.on_missing",
                 "--infalign.eval_store"):  # fmt: skip
        assert flag in out
    assert "Default: bon:4" in out and "Default: auto" in out and "Default: error" in out


def test_upstream_parse_errors_are_upstreams(capsys):
    rc = main(["train_ppo", "--algo.advantage.estimator", "nonsense"])
    assert rc == 2 and "invalid choice: 'nonsense'" in capsys.readouterr().err


def test_module_entry_point_help_subprocess():
    out = subprocess.run(
        [sys.executable, "-m", "openrlhf_infalign.train_ppo", "--help"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--infalign.store" in out.stdout and "--reward.remote_url" in out.stdout


def test_plan_coefficient_reaches_train_and_unplanned_settings_stop(store_dir, capsys):
    argv = BASE + TEMPLATE + ["--reward_wrapper", "infalign.ctrl", "--infalign.store", store_dir,
                              "--infalign.kl_budget", "2", "--algo.advantage.estimator", "reinforce_baseline",
                              "--rollout.n_samples_per_prompt", "8"]  # fmt: skip
    rc, seen = run(argv)
    state = seen["PPOTrainer"].state
    # set in the driver before upstream's train(args): it creates the reference model only when init_coef > 0
    assert rc == 0 and seen["args"].algo.kl.init_coef == state.kl_coef == pytest.approx(state.beta * 7 / 8)
    assert state.kl_coef > 0
    assert state.k == 16 and "estimator reinforce_baseline, n = 8, K = 16" in capsys.readouterr().err
    rc, seen = run(argv + ["--algo.kl.init_coef", "0.05"])
    assert seen["args"].algo.kl.init_coef == seen["PPOTrainer"].state.kl_coef == 0.05
    assert "using yours: effective beta" in capsys.readouterr().err
    rc, seen = run(argv + ["--algo.kl.use_loss"])
    err = capsys.readouterr().err
    assert rc == 2 and "error:" in err and "--algo.kl.use_loss moves the KL" in err and "accept_unplanned_kl" in err
    rc, seen = run(argv + ["--algo.kl.use_loss", "--infalign.accept_unplanned_kl"])
    assert rc == 0 and seen["args"].algo.kl.init_coef == 0.01 and seen["PPOTrainer"].state.beta is None


def test_direct_wrapper_through_the_console_plans_and_refuses(store_dir, capsys):
    argv = BASE + TEMPLATE + ["--reward_wrapper", "infalign.direct", "--infalign.store", store_dir,
                              "--infalign.inference", "bon:4", "--infalign.kl_budget", "0.5",
                              "--algo.advantage.estimator", "rloo"]  # fmt: skip
    rc, seen = run(argv + ["--rollout.n_samples_per_prompt", "8"])
    state = seen["PPOTrainer"].state
    assert rc == 0 and state.objective == "direct" and state.wrapper.n == 8 and state.transform is None
    assert seen["args"].algo.kl.init_coef == state.kl_coef == pytest.approx(state.wrapper.coef * 8 / 7)
    capsys.readouterr()
    rc, seen = run(argv + ["--rollout.n_samples_per_prompt", "4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not seen and len(err) == 1
    assert "--infalign.inference bon:4 needs --rollout.n_samples_per_prompt > 4" in err[0]
    rc, _ = run(argv[:-1] + ["group_norm", "--rollout.n_samples_per_prompt", "8"])
    assert rc == 2 and "cannot train with --algo.advantage.estimator group_norm" in capsys.readouterr().err
