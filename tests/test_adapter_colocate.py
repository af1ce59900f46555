"""The examples' colocated configuration on the CPU path, as far as it runs (marked ``e2e``; minutes).

``openrlhf train_ppo --infalign.cpu --reward_wrapper infalign.ctrl`` with ``--train.colocate_all`` (actor, reference
and the vLLM engine in one placement-group bundle) and, separately, ``--ds.enable_sleep`` (DeepSpeed states offloaded
between steps). ``--vllm.enable_sleep`` is not run: vLLM refuses sleep mode on a CPU (docs/cluster.md, the file and
line). Two PPO steps each on a tiny policy with a reward_func, evaluation at step 0 and after the last step.
"""

import importlib.util
import json
import os
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


def _env():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    env.pop("RAY_ADDRESS", None)
    return env


def _run(cmd, timeout):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=str(ROOT))
    assert proc.returncode == 0, f"{cmd[:4]} failed\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("colocate")
    code = (
        "import sys\n"
        "from openrlhf_infalign.demo import tiny\n"
        "out = sys.argv[1]\n"
        "tok = tiny.build_tokenizer(out + '/policy')\n"
        "tiny.build_policy(out + '/policy', tok, seed=0)\n"
        "tiny.write_reward_func(out + '/reward_func.py')\n"
        "tiny.write_prompts(out + '/prompts.jsonl', 8, seed=1)\n"
    )
    _run([sys.executable, "-c", code, str(out)], timeout=600)
    _run(
        [
            sys.executable, "-m", "openrlhf_infalign", "calibrate", "--backend", "hf", "--k", "4", "--out",
            str(out / "store"), "--no-progress", "--seed", "11",
            "--actor.model_name_or_path", str(out / "policy"),
            "--data.prompt_dataset", str(out / "prompts.jsonl"), "--data.input_key", "input",
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
    return out, plan


@pytest.mark.parametrize("flags", [["--train.colocate_all"], ["--ds.enable_sleep"]], ids=["colocate_all", "ds_sleep"])
def test_train_ppo_two_steps(inputs, flags):
    out, plan = inputs
    run_dir = out / ("run" + "_".join(f.split(".")[-1] for f in flags))
    cmd = [
        sys.executable, "-m", "openrlhf_infalign.train_ppo", "--infalign.cpu", *flags,
        "--actor.model_name_or_path", str(out / "policy"),
        "--reward.remote_url", str(out / "reward_func.py"),
        "--data.prompt_dataset", str(out / "prompts.jsonl"), "--data.input_key", "input",
        "--data.input_template", TEMPLATE, "--data.max_len", "40",
        *plan["openrlhf_args"],
        "--infalign.store", str(out / "store"), "--infalign.eval_n", "1,2",
        "--eval.dataset", str(out / "prompts.jsonl"), "--eval.n_samples_per_prompt", "4",
        "--eval.temperature", "1.0", "--eval.steps", "2",
        "--vllm.num_engines", "1", "--actor.num_gpus_per_node", "1", "--ref.num_gpus_per_node", "1",
        "--algo.advantage.estimator", "reinforce_baseline",
        "--rollout.n_samples_per_prompt", "2", "--rollout.batch_size", "4", "--rollout.micro_batch_size", "8",
        "--train.batch_size", "8", "--train.micro_batch_size", "8",
        "--rollout.max_new_tokens", "8", "--rollout.temperature", "1.0",
        "--train.num_episodes", "1", "--train.seed", "0",
        "--ckpt.output_dir", str(run_dir), "--ckpt.path", str(run_dir / "checkpoints"),
        "--ckpt.best_metric_key", "none",
    ]  # fmt: skip
    started = time.perf_counter()
    proc = _run(cmd, timeout=1500)
    print(f"\n{' '.join(flags)}: train_ppo wall {time.perf_counter() - started:.1f} s")
    text = proc.stdout + proc.stderr
    assert "Global step 2:" in text, text[-4000:]
    records = [json.loads(line) for line in (run_dir / "infalign_eval.jsonl").read_text().splitlines() if line]
    assert [r["step"] for r in records] == [0, 2], records
    for record in records:
        assert 0.0 <= record["bon"]["2"]["win_rate"] <= 1.0, record
