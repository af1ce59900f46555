"""Shared fixtures: reference implementations and data builders used by several test files, and
``two_node_cluster``: two real Ray nodes (raylets) on this machine, bound to 127.0.0.1.

Each node has its own temp directory (its own session, sockets and logs), a custom resource naming it ({"head": 1} or
{"worker": 1}) and fake GPUs for OpenRLHF's {"GPU": 1} bundles. Torn down whatever the test did: ``Cluster.shutdown``
first, then every process the nodes started (raylets, GCS, their workers and the vLLM processes under them) is killed
by pid, so a failed or timed-out test leaves no raylet behind on a machine others share.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np
import pytest

# Tests build their tiny models locally and never reach a hub: without this every transformers config lookup by a
# path that is not a directory yet waits for the hub's timeout (about 23 s each on a machine with no network).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

LOOPBACK = "127.0.0.1"


# ---- reference implementations and data builders -----------------------------------------------------------------


def _midrank(r, refs):
    """Eq. 12 written out literally: (1/K) sum_k [1{r > z_k} + 0.5 * 1{r == z_k}]."""
    refs = [float(z) for z in refs]
    return sum((1.0 if r > z else 0.5 if r == z else 0.0) for z in refs) / len(refs)


@pytest.fixture
def midrank():
    """The calibrated reward of one reward against a list of reference rewards, by the paper's formula."""
    return _midrank


def _make_data(n=50, seed=0, kmax=24):
    rng = np.random.default_rng(seed)
    prompts = [f"Q : question number {i} ?" + (" é" if i % 7 == 0 else "") + " A :" for i in range(n)]
    # Rewards on a coarse grid so ties between policy and reference rewards actually occur.
    refs = [rng.integers(-5, 6, size=int(rng.integers(1, kmax))).astype(np.float32) / 4 for _ in range(n)]
    return prompts, refs


@pytest.fixture
def make_data():
    """make_data(n, seed, kmax) -> (prompts, ragged float32 reference rewards with ties), for store tests."""
    return _make_data


@pytest.fixture
def quiet():
    """Silence warnings (small-K stores warn on purpose) inside one test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


@pytest.fixture
def write_jsonl():
    """write_jsonl(path, rows): one row per line; a str row is written as is (blank or broken lines)."""
    return _write_jsonl


def _ref_rows(n=30, k=20, seed=0):
    from openrlhf_infalign.store import prompt_key

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        rewards = (rng.normal(size=k) * 3).astype(np.float32).astype(float).tolist()
        if i % 3 == 0:
            rows.append({"prompt_key": prompt_key(f"prompt {i}"), "rewards": rewards})
        else:
            rows.append({"prompt": f"prompt {i}", "rewards": rewards})
    return rows


@pytest.fixture
def ref_rows():
    """ref_rows(n, k, seed): reference-store JSONL rows, every third one keyed by prompt_key."""
    return _ref_rows


@pytest.fixture(scope="session")
def upstream_args():
    """A function of flags giving OpenRLHF's own parsed and validated args (upstream's parser and checks through our
    console, stopped at train()), with the two required model paths filled in. A fresh namespace per call: tests
    change it."""

    def parse(*flags: str):
        from openrlhf_infalign.adapter.console import run_train_ppo

        seen = []
        rc = run_train_ppo(
            ["--actor.model_name_or_path", "policy", "--reward.model_name_or_path", "rm", *flags], train=seen.append
        )
        assert rc == 0 and len(seen) == 1
        return seen[0]

    return parse


# ---- two Ray nodes -----------------------------------------------------------------------------------------------


@dataclass
class TwoNodeCluster:
    """What a test gets: the head's address (``RAY_ADDRESS``), the nodes and the figures of their start."""

    cluster: object
    address: str
    nodes: Dict[str, object]  # "head" / "worker" -> ray._private.node.Node
    temp_dirs: Dict[str, str]
    startup_s: float
    rss_mb_after_start: float
    pids: List[int] = field(default_factory=list)
    _monkeypatch: object = None
    lost: list = field(default_factory=list)  # processes of killed nodes, ended at teardown

    def connect(self):
        """``ray.init`` this process to the head. Ray resolves 127.0.0.1 in an address to the outbound address,
        where no node listens; CPU mode's driver answers loopback (adapter/cpu, item 7), and so does this process."""
        import ray

        self._monkeypatch.setattr(ray._private.services, "get_node_ip_address", lambda address=None: LOOPBACK)
        return ray.init(address=self.address, log_to_driver=False)

    def node_ids(self) -> Dict[str, str]:
        """Ray node id (hex) -> "head" / "worker"."""
        return {node.node_id: name for name, node in self.nodes.items()}

    def kill_node(self, name: str) -> int:
        """SIGKILL node ``name``'s raylet and every process under it (its workers, vLLM's), as a lost machine.

        The raylet alone is not enough: its workers outlive it and keep serving their callers until the GCS
        declares the node dead (they finished a 100 s calibration here). Returns the number of processes killed.
        """
        raylet = self.nodes[name].all_processes["raylet"][0].process
        procs = _tree([raylet.pid])
        for proc in procs:
            try:
                proc.send_signal(signal.SIGKILL)
            except Exception:
                pass
        self.lost += procs
        return len(procs)

    def replace_node(self, name: str) -> None:
        """A fresh node with the lost one's resources and its own temp dir, joined to the head (waits for it)."""
        self.cluster.worker_nodes.discard(self.nodes[name])
        temp = tempfile.mkdtemp(prefix=f"ray{name[0]}r", dir="/tmp")
        self.temp_dirs[f"{name}.replacement"] = temp
        node = self.cluster.add_node(**NODE_ARGS[name], temp_dir=temp)
        self.pids += _node_pids(node)
        self.nodes[name] = node
        self.cluster.wait_for_nodes()

    def tree_rss_mb(self) -> float:
        total = 0
        for proc in _tree(self.pids):
            try:
                total += proc.memory_info().rss
            except Exception:
                continue
        return total / 2**20


def _node_pids(node) -> List[int]:
    pids = []
    for infos in node.all_processes.values():
        pids += [info.process.pid for info in infos if info.process is not None]
    return pids


def _tree(pids: List[int]):
    import psutil

    procs = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs += [*root.children(recursive=True), root]
        except psutil.NoSuchProcess:
            continue
    return procs


def _kill(procs, grace_s: float = 5.0) -> None:
    """Terminate, then kill, what is still running (psutil checks each pid still names the process it saw)."""
    import psutil

    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


_COMMON = dict(node_ip_address=LOOPBACK, include_dashboard=False, object_store_memory=200 * 2**20)
NODE_ARGS = {name: dict(_COMMON, num_cpus=4, num_gpus=1, resources={name: 1}) for name in ("head", "worker")}


@pytest.fixture
def two_node_cluster(monkeypatch):
    pytest.importorskip("ray")
    pytest.importorskip("psutil")
    import ray
    from ray.cluster_utils import Cluster

    # Short roots: Ray's Unix socket paths live under them and are capped at 107 bytes.
    temp_dirs = {name: tempfile.mkdtemp(prefix=f"ray{name[0]}", dir="/tmp") for name in ("head", "worker")}
    started = time.perf_counter()
    cluster = handle = None
    nodes: Dict[str, object] = {}
    pids: List[int] = []
    try:
        cluster = Cluster(
            initialize_head=True,
            shutdown_at_exit=True,
            head_node_args=dict(NODE_ARGS["head"], temp_dir=temp_dirs["head"]),
        )
        nodes["head"] = cluster.head_node
        pids += _node_pids(cluster.head_node)
        nodes["worker"] = cluster.add_node(**NODE_ARGS["worker"], temp_dir=temp_dirs["worker"])
        pids += _node_pids(nodes["worker"])
        cluster.wait_for_nodes()
        startup_s = time.perf_counter() - started
        handle = TwoNodeCluster(cluster, cluster.address, nodes, temp_dirs, startup_s, 0.0, pids, monkeypatch)
        handle.rss_mb_after_start = handle.tree_rss_mb()
        yield handle
    finally:
        if ray.is_initialized():
            ray.shutdown()
        # Snapshot the trees first: once a raylet is gone its workers are re-parented and no longer found under it.
        procs = _tree(handle.pids if handle else pids) + (handle.lost if handle else [])
        if cluster is not None:
            try:
                cluster.shutdown()
            except Exception:
                pass
        _kill(procs)
        for path in temp_dirs.values():
            shutil.rmtree(path, ignore_errors=True)
        os.environ.pop("RAY_ADDRESS", None)


# ---- peak memory of process trees --------------------------------------------------------------------------------


def tree_rss_mb(pid: int) -> float:
    """RSS of a process and everything under it (0 once it is gone)."""
    total = 0
    for proc in _tree([pid]):
        try:
            total += proc.memory_info().rss
        except Exception:
            continue
    return total / 2**20


class PeakRss(threading.Thread):
    """Peak of the summed RSS of some process trees, sampled every second until ``stop()``.

    Each source is a pid or a callable giving MiB (e.g. ``TwoNodeCluster.tree_rss_mb``, the raylets' trees).
    """

    def __init__(self, *sources):
        super().__init__(daemon=True)
        self.sources = []
        for source in sources:
            self.add(source)
        self.peak_mb, self._done = 0.0, threading.Event()

    def add(self, source) -> None:
        """Sample one more pid's tree (or callable) from now on."""
        self.sources.append(source if callable(source) else (lambda pid=source: tree_rss_mb(pid)))

    def run(self):
        while not self._done.wait(1.0):
            self.peak_mb = max(self.peak_mb, sum(source() for source in self.sources))

    def stop(self) -> float:
        self._done.set()
        self.join()
        return self.peak_mb


@pytest.fixture(scope="session")
def peak_rss():
    """peak_rss(*pids_or_callables) -> a started PeakRss; every one still running is stopped at teardown (session-wide,
    so module-scoped fixtures that run a job can use it)."""
    started = []

    def start(*sources):
        watch = PeakRss(*sources)
        watch.start()
        started.append(watch)
        return watch

    yield start
    for watch in started:
        if watch.is_alive():
            watch.stop()


# ---- the slow tests' subprocesses ---------------------------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(**extra) -> Dict[str, str]:
    """The environment of a job a slow test starts: this checkout first on the path, one thread per process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    env.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **extra})
    return env


def build_tiny_inputs(out, prompts: int, reward_model: bool = False) -> None:
    """The demo's tiny policy (out/policy), prompts (out/prompts.jsonl) and reward: the rule reward_func
    (out/reward_func.py), or with ``reward_model`` a tiny RM (out/rm); built in a subprocess, as the jobs run."""
    reward = (
        "tiny.build_reward_model(out + '/rm', tok, seed=0)"
        if reward_model
        else ("tiny.write_reward_func(out + '/reward_func.py')")
    )
    code = (
        "import sys\n"
        "from openrlhf_infalign.demo import tiny\n"
        "out = sys.argv[1]\n"
        "tok = tiny.build_tokenizer(out + '/policy')\n"
        "tiny.build_policy(out + '/policy', tok, seed=0)\n"
        f"{reward}\n"
        f"tiny.write_prompts(out + '/prompts.jsonl', {prompts}, seed=1)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="session")
def job_env():
    """job_env(**extra): :func:`subprocess_env`, for test files (conftest is not importable under importlib mode)."""
    return subprocess_env


@pytest.fixture(scope="session")
def tiny_inputs():
    """tiny_inputs(out, prompts, reward_model=False): :func:`build_tiny_inputs`."""
    return build_tiny_inputs
