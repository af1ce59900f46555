"""The study's command building (arms -> flags) and its resumability check; no training."""

import json
import numpy as np
import pytest

from openrlhf_infalign.evallog import append_record
from openrlhf_infalign.store.writer import write_store
from openrlhf_infalign.studies import study

PLANS = {
    "bon:4": {
        "kl": 1.0,
        "recommended": {"transform": "exp:t=17.32", "kl_coef": 0.2443},
        "optimal": {"kl_coef": 0.2405},
        "baselines": {"identity": {"kl_coef": 0.1226}, "log": {"kl_coef": 0.0212}},
        "direct": {
            "openrlhf_args": [
                "--reward_wrapper",
                "infalign.direct",
                "--infalign.inference",
                "bon:4",
                "--infalign.kl_budget",
                "1",
                "--algo.kl.init_coef",
                "0.0544",
            ]
        },
        "openrlhf_args": [
            "--reward_wrapper",
            "infalign.ctrl",
            "--infalign.inference",
            "bon:4",
            "--infalign.transform",
            "exp:t=17.32",
            "--infalign.kl_budget",
            "1",
            "--algo.kl.init_coef",
            "0.2443",
        ],
    },
    "won:4": {
        "kl": 1.0,
        "recommended": {"transform": "negexp:t=15.96"},
        "optimal": {"kl_coef": 0.0069},
        "baselines": {"identity": {"kl_coef": 0.1226}},
        "direct": {"wrapper": "infalign.direct", "refused": "n must exceed N"},
        "openrlhf_args": [
            "--reward_wrapper",
            "infalign.ctrl",
            "--infalign.inference",
            "won:4",
            "--infalign.transform",
            "negexp:t=15.96",
            "--infalign.kl_budget",
            "1",
            "--algo.kl.init_coef",
            "2.431e-05",
        ],
    },
}


def flag(cmd, name):
    return cmd[cmd.index(name) + 1] if name in cmd else None


def test_arm_flags():
    raw = study.arm_flags("raw", PLANS, raw_scale=2.0)
    assert "--reward_wrapper" not in raw
    assert float(flag(raw, "--algo.kl.init_coef")) == pytest.approx(0.2452)
    ident = study.arm_flags("identity", PLANS, 2.0)
    assert flag(ident, "--reward_wrapper") == "infalign.calibrate"
    assert float(flag(ident, "--algo.kl.init_coef")) == pytest.approx(0.1226)
    assert study.arm_flags("ctrl_exp_bon4", PLANS, 2.0) == PLANS["bon:4"]["openrlhf_args"]
    opt = study.arm_flags("optimal_bon4", PLANS, 2.0)
    assert flag(opt, "--infalign.transform") == "optimal" and flag(opt, "--infalign.inference") == "bon:4"
    assert float(flag(opt, "--algo.kl.init_coef")) == pytest.approx(0.2405)
    assert study.arm_flags("ctrl_negexp_won4", PLANS, 2.0) == PLANS["won:4"]["openrlhf_args"]
    assert study.arm_flags("direct_bon4", PLANS, 2.0) == PLANS["bon:4"]["direct"]["openrlhf_args"]
    with pytest.raises(ValueError, match="refuses the direct objective here: n must exceed N"):
        study.arm_flags("direct_won4", PLANS, 2.0)
    log = study.arm_flags("log_bon4", PLANS, 2.0)
    assert flag(log, "--infalign.transform") == "log" and float(flag(log, "--algo.kl.init_coef")) == 0.0212
    noise = study.arm_flags("noise", PLANS, 2.0)
    assert "--reward_wrapper" not in noise and "--infalign.allow_mismatch" in noise
    assert float(flag(noise, "--algo.kl.init_coef")) == pytest.approx(0.1226)  # identity's: no spread to scale by
    with pytest.raises(ValueError, match="unknown arm"):
        study.arm_flags("nope", PLANS, 2.0)


def test_run_command_same_setting_per_arm(tmp_path):
    args = study.parse(["--out", str(tmp_path)])
    cmds = {arm: study.run_command(tmp_path, args, arm, 1, PLANS, 2.0) for arm in study.ARMS if arm != "direct_won4"}
    for arm, cmd in cmds.items():
        run_dir = study.run_path(tmp_path, arm, 1)
        assert flag(cmd, "--ckpt.output_dir") == str(run_dir)
        assert flag(cmd, "--ckpt.path") == str(run_dir / "checkpoints")
        assert flag(cmd, "--train.seed") == "1"
        assert flag(cmd, "--infalign.eval_store") == str(tmp_path / "stores" / "eval")
        assert cmd.count("--algo.kl.init_coef") == 1
        # the same prompts, sampling and evaluation for every arm
        for shared in (
            "--data.prompt_dataset",
            "--eval.dataset",
            "--rollout.n_samples_per_prompt",
            "--eval.steps",
            "--eval.n_samples_per_prompt",
            "--rollout.batch_size",
            "--train.num_episodes",
            "--infalign.eval_n",
            "--algo.advantage.estimator",
            "--train.batch_size",
            "--actor.lr_scheduler",
        ):
            assert flag(cmd, shared) == flag(cmds["raw"], shared), (arm, shared)
    assert "--infalign.store" not in cmds["raw"] and "--reward_wrapper" not in cmds["raw"]
    assert flag(cmds["identity"], "--infalign.store") == str(tmp_path / "stores" / "train")
    assert flag(cmds["raw"], "--eval.steps") == "2"
    # the word-pair task, its two-token answers, and the actor saved at every evaluation for the exact evaluation
    assert flag(cmds["raw"], "--rollout.max_new_tokens") == "2" and "--ckpt.save_hf" in cmds["raw"]
    assert flag(cmds["raw"], "--ckpt.save_steps") == flag(cmds["raw"], "--eval.steps")
    # 32 prompts x 8 samples a step in updates of 64: four optimizer updates per PPO step, at a constant rate
    assert flag(cmds["raw"], "--train.batch_size") == "64" and cmds["raw"].count("--train.batch_size") == 1
    assert flag(cmds["raw"], "--actor.lr_scheduler") == "constant_with_warmup"
    assert "--data.max_samples" not in cmds["raw"]
    noise = study.run_command(tmp_path, args, "noise", 1, PLANS, 2.0)
    assert flag(noise, "--reward.remote_url") == str(tmp_path / "noise_reward_func.py")
    assert "--infalign.store" not in noise and flag(noise, "--eval.dataset") == flag(cmds["raw"], "--eval.dataset")


def test_max_steps_trims_with_one_pass(tmp_path):
    args = study.parse(["--out", str(tmp_path), "--max-steps", "2"])
    assert study.run_steps(args) == 2
    cmd = study.run_command(tmp_path, args, "identity", 0, PLANS, 1.0)
    assert flag(cmd, "--train.num_episodes") == "1" and flag(cmd, "--data.max_samples") == str(2 * 32)


def test_run_finished(tmp_path):
    run = tmp_path / "run"
    assert not study.run_finished(run, 24)
    for step in (0, 4, 8):
        stat = {"win_rate": 0.5, "stderr": 0.01}
        record = {"step": step, "kl": 0.1 * step, "standard": stat, "bon": {"4": stat}, "won": {"4": stat}}
        append_record(run / "infalign_eval.jsonl", record)
    assert not study.run_finished(run, 24)  # stopped part way: re-run
    assert study.run_finished(run, 8)
    (run / "infalign_eval.jsonl").write_text("not json\n")
    assert not study.run_finished(run, 8)  # unreadable log: re-run


def test_report_command_labels_each_run(tmp_path):
    runs = [("raw", tmp_path / "a"), ("identity", tmp_path / "b"), ("identity", tmp_path / "c")]
    cmd = study.report_command(tmp_path, runs, noise=[tmp_path / "n0", tmp_path / "n1"])
    # the exact logs are compared, the noise control's exact logs give the floor
    logs = [str(r / "infalign_eval_exact.jsonl") for _, r in runs]
    assert cmd[cmd.index("report") + 1 : cmd.index("report") + 4] == logs
    assert [cmd[i + 1] for i, c in enumerate(cmd) if c == "--label"] == ["raw", "identity", "identity"]
    assert [cmd[i + 1] for i, c in enumerate(cmd) if c == "--noise"] == [
        str(tmp_path / n / "infalign_eval_exact.jsonl") for n in ("n0", "n1")
    ]
    assert flag(cmd, "--baseline") == "identity" and flag(cmd, "--out") == str(tmp_path / "compare")
    assert "--overwrite" in cmd  # a resumed study writes its report again over its own
    assert flag(cmd, "--crossing") == "sustained"  # a one-evaluation KL spike sets neither a crossing nor the floor


def test_hook_check_summarises_z_over_runs(tmp_path):
    stat = {"win_rate": 0.5, "stderr": 0.0}
    for i, run in enumerate(("a", "b")):
        for step, z in ((0, 9.0), (2, 1.0 + i), (4, -1.0 - 3 * i)):  # step 0 (the base policy) is left out
            hook = {"z": {"bon_4": z}, "z_given_store": {"bon_4": z / 2}, "z_kl": 0.5}
            record = {"step": step, "kl": 0.0, "standard": stat, "bon": {"4": stat}, "won": {"4": stat}, "hook": hook}
            append_record(tmp_path / run / "infalign_eval_exact.jsonl", record)
    got = study.hook_check([tmp_path / "a", tmp_path / "b", tmp_path / "missing"])
    z = got["z"]["bon_4"]
    assert z["n"] == 4 and z["mean"] == pytest.approx(-0.5) and z["max_abs"] == 4.0 and z["beyond_3"] == 1
    assert z["beyond_3_if_normal"] == pytest.approx(4 * 0.0027, abs=0.005)
    assert z["sd"] == pytest.approx(np.std([1.0, -1.0, 2.0, -4.0], ddof=1))
    assert got["z_given_store"]["bon_4"]["max_abs"] == 2.0 and got["z"]["kl"]["n"] == 4
    assert study.hook_check([tmp_path / "missing"]) is None


def test_raw_coef_scale(tmp_path):
    rewards = [np.array([0.0, 2.0, 4.0, 6.0]), np.array([1.0, 3.0, 5.0, 7.0])]
    write_store(tmp_path / "store", None, rewards, prompts=["p0", "p1"])
    got = study.raw_coef_scale(tmp_path / "store")
    assert got["raw_within_prompt_sd"] == pytest.approx(np.std([0, 2, 4, 6]))
    assert got["calibrated_within_prompt_sd"] == pytest.approx(np.std([0, 0.25, 0.5, 0.75]))
    assert got["scale"] == pytest.approx(8.0)


def test_last_eval_step():
    args = study.parse([])
    assert study.run_steps(args) == 66 and study.last_eval_step(args) == 66
    args = study.parse(["--max-steps", "3"])
    assert study.last_eval_step(args) == 2  # upstream evaluates every --eval.steps, not at the end


def test_shared_fingerprint_tells_a_rebuilt_base_or_store_from_the_one_a_run_trained_on(tmp_path):
    # A resumed study reuses a finished run only when it trained on these very models and stores: a shared phase
    # rebuilt since (a new setting field, a different fit) gives another fingerprint, and the run is trained again.
    out = tmp_path / "study"
    (out / "policy").mkdir(parents=True)
    (out / "policy" / "model.safetensors").write_bytes(b"weights")
    for name in ("prompts/train.jsonl", "stores/train/rewards.parquet", "stores/eval/rewards.parquet"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(name.encode())
    first = study.shared_fingerprint(out)
    assert study.shared_fingerprint(out) == first and len(first) == 40
    (out / "stores" / "eval" / "rewards.parquet").write_bytes(b"resampled")
    assert study.shared_fingerprint(out) != first
    (out / "stores" / "eval" / "rewards.parquet").write_bytes(b"stores/eval/rewards.parquet")
    assert study.shared_fingerprint(out) == first
    (out / "policy" / "model.safetensors").write_bytes(b"refit")
    assert study.shared_fingerprint(out) != first
    run = out / "runs" / "identity_s0"
    run.mkdir(parents=True)
    assert study.trained_on(run) is None  # no record: not reused
    (run / "study_run.json").write_text(json.dumps({"shared_fingerprint": first}))
    assert study.trained_on(run) == first
