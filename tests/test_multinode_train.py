"""Training across two Ray nodes: ``openrlhf train_ppo --infalign.cpu --reward_wrapper infalign.ctrl`` (marked
``multinode``; minutes).

The driver connects to the head of :func:`two_node_cluster` (``RAY_ADDRESS``). Each node has one fake GPU, and
``--train.colocate_actor_ref`` makes the actor (and reference) one {"GPU": 1} bundle: OpenRLHF creates it before the
vLLM engine's, so the actor/trainer and the engine can only land on different nodes (which node gets which is Ray's
choice: upstream passes no custom resource to either, see docs/cluster.md). The reference stores are readable by the
driver only: a thin driver wrapper moves them away right after the plugin opened them, so a worker reading the path
would fail. Two PPO steps, evaluation at step 0 and at the end, win rates in ``infalign_eval.jsonl``.
"""

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.multinode, pytest.mark.openrlhf]

for _mod in ("openrlhf", "vllm", "ray", "deepspeed", "transformers", "psutil"):
    if importlib.util.find_spec(_mod) is None:
        pytest.skip(f"{_mod} is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "Q : {} A :"

# Runs the console exactly as `openrlhf train_ppo` does, with launch.prepare wrapped: once the driver has opened the
# stores, their directories are moved away (only the driver ever had them).
DRIVER = """
import os, sys
from openrlhf_infalign.adapter import console, cpu

cpu.apply()  # before launch imports OpenRLHF (the console does the same before it imports launch)
from openrlhf_infalign.adapter import launch

real_prepare = launch.prepare

def prepare(args):
    state = real_prepare(args)
    for path in {args.infalign.store, args.infalign.eval_store}:
        os.rename(path, path + ".moved")
    print("[test] stores moved away after the driver opened them", flush=True)
    return state

launch.prepare = prepare
sys.exit(console.run_train_ppo(sys.argv[1:]))
"""


def _py(*args):
    return [sys.executable, *args]


def _run(cmd, timeout, env):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
    assert proc.returncode == 0, f"{cmd[:4]} failed\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture
def inputs(tmp_path, tiny_inputs, job_env):
    tiny_inputs(tmp_path, 8)
    for split, seed in (("train", 11), ("eval", 12)):
        _run(
            _py(
                "-m", "openrlhf_infalign", "calibrate", "--backend", "hf", "--k", "4", "--out",
                str(tmp_path / "stores" / split), "--no-progress", "--seed", str(seed),
                "--actor.model_name_or_path", str(tmp_path / "policy"),
                "--data.prompt_dataset", str(tmp_path / "prompts.jsonl"), "--data.input_key", "input",
                "--data.input_template", TEMPLATE, "--data.max_len", "40",
                "--rollout.temperature", "1.0", "--rollout.top_p", "1.0", "--rollout.max_new_tokens", "8",
                "--reward.remote_url", str(tmp_path / "reward_func.py"),
            ),
            timeout=900,
            env=job_env(),
        )  # fmt: skip
    plan = json.loads(_run(_py("-m", "openrlhf_infalign", "plan", "--inference", "bon:2", "--kl-budget", "2", "--json"),
                           timeout=300, env=job_env()).stdout)  # fmt: skip
    return tmp_path, plan


def test_train_ppo_across_two_nodes(two_node_cluster, inputs, peak_rss, job_env):
    out, plan = inputs
    run_dir = out / "run"
    cmd = _py(
        "-c", DRIVER,
        "--infalign.cpu",
        "--actor.model_name_or_path", str(out / "policy"),
        "--reward.remote_url", str(out / "reward_func.py"),
        "--data.prompt_dataset", str(out / "prompts.jsonl"), "--data.input_key", "input",
        "--data.input_template", TEMPLATE, "--data.max_len", "40",
        *plan["openrlhf_args"],
        "--infalign.store", str(out / "stores" / "train"),
        "--infalign.eval_store", str(out / "stores" / "eval"),
        "--infalign.eval_n", "1,2",
        "--eval.dataset", str(out / "prompts.jsonl"), "--eval.n_samples_per_prompt", "4",
        "--eval.temperature", "1.0", "--eval.steps", "2",
        "--vllm.num_engines", "1",
        "--actor.num_gpus_per_node", "1", "--ref.num_gpus_per_node", "1", "--train.colocate_actor_ref",
        "--algo.advantage.estimator", "reinforce_baseline",
        "--rollout.n_samples_per_prompt", "2", "--rollout.batch_size", "4", "--rollout.micro_batch_size", "8",
        "--train.batch_size", "8", "--train.micro_batch_size", "8",
        "--rollout.max_new_tokens", "8", "--rollout.temperature", "1.0",
        "--train.num_episodes", "1", "--train.seed", "0",
        "--ckpt.output_dir", str(run_dir), "--ckpt.path", str(run_dir / "checkpoints"),
        "--ckpt.best_metric_key", "none",
    )  # fmt: skip
    started = time.perf_counter()
    log = (out / "driver.log").open("w")
    driver = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=str(ROOT),
        env=job_env(RAY_ADDRESS=two_node_cluster.address),
    )  # fmt: skip
    peak = peak_rss(two_node_cluster.tree_rss_mb, driver.pid)
    try:
        rc = driver.wait(timeout=1500)
    finally:
        if driver.poll() is None:
            driver.kill()
        peak.stop()
        log.close()
    wall_s = time.perf_counter() - started
    text = (out / "driver.log").read_text()
    print(
        f"\ntwo-node start-up {two_node_cluster.startup_s:.1f} s (RSS {two_node_cluster.rss_mb_after_start:.0f} MiB);"
        f" train_ppo wall {wall_s:.1f} s; peak RSS of cluster + driver {peak.peak_mb:.0f} MiB"
    )
    assert rc == 0, text[-6000:]
    assert "[test] stores moved away after the driver opened them" in text
    assert not (out / "stores" / "train").exists() and (out / "stores" / "train.moved").exists()

    records = [json.loads(line) for line in (run_dir / "infalign_eval.jsonl").read_text().splitlines() if line]
    steps = [r["step"] for r in records]
    assert steps[0] == 0 and steps[-1] == 2, steps
    for record in records:
        for kind in ("bon", "won"):
            for n in ("1", "2"):
                assert 0.0 <= record[kind][n]["win_rate"] <= 1.0, (kind, n, record)

    # Where upstream put its actors: the trainer and the engine on different nodes.
    placed = {}
    for actor in two_node_cluster.cluster.global_state.actor_table(None).values():
        placed.setdefault(actor["ActorClassName"], set()).add(actor["Address"]["NodeID"])
    names = two_node_cluster.node_ids()
    policy = {names.get(n) for cls, ids in placed.items() if cls.endswith("PolicyModelActor") for n in ids}
    engine = {names.get(n) for cls, ids in placed.items() if cls.endswith("RolloutRayActor") for n in ids}
    print(f"actor/trainer on {sorted(map(str, policy))}, vLLM engine on {sorted(map(str, engine))}")
    assert len(policy) == 1 and len(engine) == 1 and policy != engine and None not in policy | engine, placed
