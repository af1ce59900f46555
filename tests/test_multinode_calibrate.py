"""`infalign calibrate --backend vllm` across two Ray nodes, and a node lost in the middle (marked ``multinode``).

One vLLM engine per node (each node has one fake GPU, OpenRLHF's engines take a {"GPU": 1} bundle each) and the
local reward model in two Ray actors, one per node, fed by the engines as each prompt's samples finish. A clean run
first; then the same command towards another --out, with the worker node's raylet SIGKILLed after the first shard
is written (with every process under it: a lost machine): the run must fail saying how to resume, with nothing at --out; a replacement node joins; the same
command resumes from the kept shards and publishes a store equal to the clean run's. Sampling is greedy here, so
"equal" means the same rewards for every key (vLLM's per-sample sampling cannot be seeded through OpenRLHF's
``generate_responses``: a seed in its SamplingParams would give K identical samples).
"""

import importlib.util
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.multinode, pytest.mark.openrlhf]

for _mod in ("openrlhf", "vllm", "ray", "transformers", "psutil"):
    if importlib.util.find_spec(_mod) is None:
        pytest.skip(f"{_mod} is not installed", allow_module_level=True)

from openrlhf_infalign.store import ReferenceStore, read_manifest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = 96
SHARD = 4


@pytest.fixture
def inputs(tmp_path, tiny_inputs):
    tiny_inputs(tmp_path, PROMPTS, reward_model=True)
    return tmp_path


def _command(inputs: Path, out: Path):
    return [
        sys.executable, "-m", "openrlhf_infalign", "calibrate", "--backend", "vllm", "--infalign.cpu",
        "--vllm.num_engines", "2", "--vllm.enforce_eager", "--vllm.gpu_memory_utilization", "0.5",
        "--actor.model_name_or_path", str(inputs / "policy"),
        "--reward.model_name_or_path", str(inputs / "rm"),
        "--data.prompt_dataset", str(inputs / "prompts.jsonl"), "--data.input_key", "input",
        "--data.input_template", "Q : {} A :", "--data.max_len", "40",
        "--rollout.temperature", "0", "--rollout.max_new_tokens", "8",
        "--k", "4", "--shard-size", str(SHARD), "--out", str(out), "--no-progress", "--json",
    ]  # fmt: skip


def _summary(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


class NeverAt(threading.Thread):
    """Watches a path every 20 ms and records whether anything ever appeared there."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path, self.seen, self._done = path, False, threading.Event()

    def run(self):
        while not self._done.wait(0.02):
            self.seen = self.seen or self.path.exists()

    def stop(self):
        self._done.set()
        self.join()


def test_calibrate_across_two_nodes_survives_a_lost_node(two_node_cluster, inputs, peak_rss, job_env):
    env = job_env(RAY_ADDRESS=two_node_cluster.address)
    names = two_node_cluster.node_ids()

    # 1. A clean run: one engine and one reward-model actor on each node.
    t0 = time.perf_counter()
    peak = peak_rss(two_node_cluster.tree_rss_mb)  # the raylets' trees hold the engines and RM actors; + the driver
    proc = subprocess.Popen(_command(inputs, inputs / "clean"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)  # fmt: skip
    peak.add(proc.pid)
    stdout, stderr = proc.communicate(timeout=900)
    clean = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    clean_s = time.perf_counter() - t0
    clean_peak_mb = peak.stop()
    assert clean.returncode == 0, clean.stderr[-6000:]
    summary = _summary(clean.stdout)
    placement = summary["placement"]
    assert sorted(names.get(n) for n in placement["engines"]) == ["head", "worker"], placement
    assert sorted(names.get(n) for n in placement["reward_model_actors"]) == ["head", "worker"], placement
    assert summary["reward_model_actors"] == 2 and summary["score_s"] == 0.0

    # 2. The same command towards faulty/: the worker's raylet is killed once the first shard is on disk.
    out = inputs / "faulty"
    work = Path(str(out) + ".partial")
    watch = NeverAt(out)
    watch.start()
    log = (inputs / "faulty.log").open("w")
    run = subprocess.Popen(_command(inputs, out), stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.time() + 600
        while not list(work.glob("shard-*.json")) and run.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert run.poll() is None, "the run ended before the first shard was seen: too few shards to interrupt"
        n_killed = two_node_cluster.kill_node("worker")
        t_kill = time.perf_counter()
        rc = run.wait(timeout=600)
        fail_s = time.perf_counter() - t_kill
    finally:
        if run.poll() is None:
            run.kill()
        log.close()
    text = (inputs / "faulty.log").read_text()
    kept = {p.name: p.read_bytes() for p in work.glob("shard-*")}
    assert rc != 0, text[-4000:]
    assert "lost a Ray worker mid-run" in text and "rerun the same command" in text, text[-4000:]
    assert not out.exists() and not watch.seen  # nothing, not even a partial store, was ever at --out
    n_kept = len([k for k in kept if k.endswith(".json")])
    assert 1 <= n_kept < PROMPTS // SHARD, n_kept

    # 3. A replacement node joins; the same command resumes from the kept shards and publishes.
    t0 = time.perf_counter()
    two_node_cluster.replace_node("worker")
    join_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    again = subprocess.run(_command(inputs, out), capture_output=True, text=True, env=env, timeout=900)
    resume_s = time.perf_counter() - t0
    watch.stop()
    assert again.returncode == 0, again.stderr[-6000:]
    resumed = _summary(again.stdout)
    assert resumed["shards_resumed"] == n_kept and resumed["shards_generated"] == PROMPTS // SHARD - n_kept
    assert not work.exists()

    a = ReferenceStore.open(inputs / "clean", warn_small_k=False)
    b = ReferenceStore.open(out, warn_small_k=False)
    assert a.keys() == b.keys() and len(a) == PROMPTS
    assert (np.diff(a.offsets) == 4).all() and (np.diff(b.offsets) == 4).all()
    va, vb = np.asarray(a.values, np.float64), np.asarray(b.values, np.float64)
    assert va.std() > 0  # the reward model scores differ between prompts: equality below is not vacuous
    assert np.array_equal(va, vb), f"{int((va != vb).sum())} of {va.size} rewards differ"
    assert (
        read_manifest(out)["calibration"]["settings_hash"]
        == read_manifest(inputs / "clean")["calibration"]["settings_hash"]
    )
    print(
        f"\ntwo-node start-up {two_node_cluster.startup_s:.1f} s (RSS {two_node_cluster.rss_mb_after_start:.0f} MiB); "
        f"clean calibrate {clean_s:.1f} s, peak RSS of cluster + driver {clean_peak_mb:.0f} MiB "
        f"({summary['samples_per_s']} samples/s in generation+scoring); killed after {n_kept} of "
        f"{PROMPTS // SHARD} shards ({n_killed} processes), run failed {fail_s:.1f} s after the kill; "
        f"replacement node {join_s:.1f} s; "
        f"resumed run {resume_s:.1f} s ({resumed['shards_generated']} shards generated)"
    )
