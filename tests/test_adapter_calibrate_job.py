"""`infalign calibrate` end to end on CPU (hf backend) with tiny local models built here: prompts, scorers, shards.

The prompt keys are checked against OpenRLHF's real training data path: ``get_strategy`` + ``get_tokenizer`` +
``openrlhf.trainer.ppo_trainer.prepare_datasets`` (the dataloader whose prompts become ``Experience.prompts``).
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openrlhf")

from openrlhf_infalign.adapter.calibrate import (  # noqa: E402
    FAIL_AFTER_ENV,
    CalibrateSettings,
    CalibrationError,
    run_calibration,
)
from openrlhf_infalign.demo import tiny  # noqa: E402
from openrlhf_infalign.store import ReferenceStore, prompt_key, read_manifest  # noqa: E402

pytestmark = pytest.mark.openrlhf

N_PROMPTS = 10
K = 4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("calib_models")
    tok = tiny.build_tokenizer(d / "tok")
    prompts = d / "prompts.jsonl"
    tiny.write_prompts(prompts, N_PROMPTS, seed=1)
    # One prompt twice: the store keeps one row per prompt key.
    with open(prompts, "a") as f:
        f.write(json.dumps({"input": tiny.make_prompts(N_PROMPTS, seed=1)[0]}) + "\n")
    return {
        "policy": tiny.build_policy(d / "policy", tok, seed=0),
        "rm": tiny.build_reward_model(d / "rm", tok, seed=0),
        "rf": tiny.write_reward_func(d / "reward_func.py"),
        "prompts": str(prompts),
        "dir": d,
    }


def _settings(models, out, **kw):
    base = dict(
        policy=models["policy"],
        prompt_dataset=models["prompts"],
        out=str(out),
        k=K,
        backend="hf",
        max_new_tokens=8,
        max_len=256,
        shard_size=4,
        batch_size=4,
        progress=False,
        input_template=tiny.INPUT_TEMPLATE,
        reward_url=models["rf"],
    )
    base.update(kw)
    return CalibrateSettings(**base)


def _training_prompts(models, input_template=None, apply_chat_template=False):
    """The prompt strings OpenRLHF's trainer iterates over, from its own prepare_datasets."""
    from openrlhf_infalign.adapter.cpu.standins import install_flash_attn

    install_flash_attn()
    from openrlhf.trainer.ppo_trainer import prepare_datasets
    from openrlhf.utils.config import hierarchize
    from openrlhf.utils.utils import get_strategy, get_tokenizer

    flat = {
        "data.prompt_dataset": models["prompts"],
        "data.prompt_probs": None,
        "data.prompt_split": "train",
        "data.max_samples": int(1e8),
        "data.input_key": "input",
        "data.label_key": None,
        "data.input_template": input_template,
        "data.apply_chat_template": apply_chat_template,
        "data.dataloader_num_workers": 0,
        "data.disable_fast_tokenizer": False,
        "train.seed": 42,
        "train.batch_size": 1,
        "train.micro_batch_size": 1,
        "train.num_episodes": 1,
        "train.max_epochs": 1,
        "rollout.n_samples_per_prompt": 1,
        "eval.dataset": None,
        "ds.zero_stage": 2,
        "ds.param_dtype": "bf16",
        "use_ms": False,
    }
    args = hierarchize(argparse.Namespace(**flat))
    strategy = get_strategy(args)
    tokenizer = get_tokenizer(models["policy"], None, "left", strategy, use_fast=True)
    loader, _, _ = prepare_datasets(strategy, tokenizer)
    return [p for _, prompts, _, _ in loader for p in prompts]


def test_hf_reward_func_end_to_end_keys_match_training(models, tmp_path):
    out = tmp_path / "refs"
    summary = run_calibration(_settings(models, out), log=lambda m: None)
    assert summary["num_prompts"] == N_PROMPTS and summary["duplicate_prompts"] == 1
    assert summary["shards_total"] == 3 and summary["shards_generated"] == 3
    assert not Path(str(out) + ".partial").exists()  # work dir cleared once the store is published

    store = ReferenceStore.open(out, warn_small_k=False)
    assert len(store) == N_PROMPTS
    assert (np.diff(store.offsets) == K).all()
    training = _training_prompts(models, input_template=tiny.INPUT_TEMPLATE)
    assert len(training) == N_PROMPTS + 1
    assert training[0].startswith("Q : ") and training[0].endswith(" A :")
    assert sorted(store.keys()) == sorted({prompt_key(p) for p in training})
    # Calibration lookups with the trainer's own prompt strings find every prompt.
    assert len(store.rows_for_prompts(training)) == len(training)

    # The rule reward yields multiples of 0.1; values vary across samples.
    vals = np.asarray(store.values, dtype=np.float64)
    assert np.allclose(vals * 10, np.round(vals * 10), atol=1e-4)
    assert vals.std() > 0

    man = read_manifest(out)
    assert man["k"] == K
    assert man["template"] == {
        "input_key": "input",
        "input_template": tiny.INPUT_TEMPLATE,
        "apply_chat_template": False,
        "chat_template_sha1": None,
    }
    assert man["sampling"]["temperature"] == 1.0 and man["sampling"]["max_new_tokens"] == 8
    assert man["sampling"]["top_k"] == -1 and man["sampling"]["backend"] == "hf"
    assert man["policy_model"] == models["policy"]
    assert man["reward_source"]["kind"] == "reward_func"

    # Re-running the same command is a no-op; a different one refuses to clobber the store.
    # A kill between publishing the store and clearing the work dir leaves both: the re-run just clears it.
    leftover = Path(str(out) + ".partial")
    leftover.mkdir()
    (leftover / "settings.json").write_text("{}")
    again = run_calibration(_settings(models, out), log=lambda m: None)
    assert again["up_to_date"] and not leftover.exists()
    with pytest.raises(CalibrationError, match="already exists"):
        run_calibration(_settings(models, out, k=K + 1), log=lambda m: None)


def test_hf_reward_model_chat_template_end_to_end(models, tmp_path):
    import hashlib

    from transformers import AutoTokenizer

    out = tmp_path / "refs_rm"
    s = _settings(
        models, out, input_template=None, apply_chat_template=True, reward_url=None, reward_model=models["rm"]
    )
    summary = run_calibration(s, log=lambda m: None)
    assert summary["num_prompts"] == N_PROMPTS
    store = ReferenceStore.open(out, warn_small_k=False)
    assert (np.diff(store.offsets) == K).all()
    training = _training_prompts(models, apply_chat_template=True)
    assert training[0].startswith("<s>user : ") and training[0].endswith("</s> assistant :")
    assert sorted(store.keys()) == sorted({prompt_key(p) for p in training})

    vals = np.asarray(store.values, dtype=np.float32)
    assert np.isfinite(vals).all() and len(np.unique(vals)) > K
    # The RM runs in bf16 (OpenRLHF's default param_dtype): every stored reward is a bf16 number.
    import torch

    assert np.array_equal(torch.from_numpy(vals).to(torch.bfloat16).float().numpy(), vals)

    man = read_manifest(out)
    chat = AutoTokenizer.from_pretrained(models["policy"]).chat_template
    assert man["template"]["apply_chat_template"] is True
    assert man["template"]["chat_template_sha1"] == hashlib.sha1(chat.encode()).hexdigest()
    assert man["reward_source"]["kind"] == "reward_model"
    assert man["reward_source"]["normalize_reward"] is False


def test_resume_after_failure_generates_only_missing_shards(models, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    run_calibration(_settings(models, clean), log=lambda m: None)

    out = tmp_path / "resumed"
    monkeypatch.setenv(FAIL_AFTER_ENV, "1")
    with pytest.raises(RuntimeError, match="test hook"):
        run_calibration(_settings(models, out), log=lambda m: None)
    work = Path(str(out) + ".partial")
    assert not out.exists()  # nothing published
    assert sorted(p.name for p in work.glob("shard-*.json")) == ["shard-00000.json"]
    first = json.loads((work / "shard-00000.json").read_text())

    monkeypatch.delenv(FAIL_AFTER_ENV)
    # Other settings must not be mixed with the finished shard.
    with pytest.raises(CalibrationError, match="different settings.*sampling"):
        run_calibration(_settings(models, out, temperature=0.7), log=lambda m: None)

    logs = []
    summary = run_calibration(_settings(models, out), log=logs.append)
    assert (summary["shards_resumed"], summary["shards_generated"]) == (1, 2)
    assert any("1 of 3 shard(s) already done" in m for m in logs)
    assert not work.exists()

    a = ReferenceStore.open(clean, warn_small_k=False)
    b = ReferenceStore.open(out, warn_small_k=False)
    assert a.keys() == b.keys()
    # Each shard is seeded by its index, so the resumed store equals a clean run's, value for value.
    assert np.array_equal(np.asarray(a.values), np.asarray(b.values))
    assert np.array_equal(np.asarray(a.offsets), np.asarray(b.offsets))
    assert first["num_prompts"] == 4 and first["k"] == K


def test_kill_mid_run_then_resume(models, tmp_path):
    """A real SIGKILL of the CLI after its first shard: no store at OUT, finished shards reused on re-run."""
    out = tmp_path / "killed"
    work = Path(str(out) + ".partial")
    cmd = [
        sys.executable,
        "-m",
        "openrlhf_infalign.cli",
        "calibrate",
        "--pretrain",
        models["policy"],
        "--data.prompt_dataset",
        models["prompts"],
        "--data.input_template",
        tiny.INPUT_TEMPLATE,
        "--reward.remote_url",
        models["rf"],
        "--backend",
        "hf",
        "--k",
        str(K),
        "--rollout.max_new_tokens",
        "8",
        "--data.max_len",
        "256",
        "--shard-size",
        "1",
        "--batch-size",
        "1",
        "--no-progress",
        "--out",
        str(out),
    ]
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not (work / "shard-00000.json").exists():
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not out.exists()
    done = sorted(p.name for p in work.glob("shard-*.json"))
    assert 1 <= len(done) < N_PROMPTS

    summary = run_calibration(
        _settings(models, out, shard_size=1, batch_size=1), log=lambda m: None
    )  # same settings as the CLI run
    assert summary["shards_resumed"] == len(done)
    assert summary["shards_generated"] == N_PROMPTS - len(done)
    store = ReferenceStore.open(out, warn_small_k=False)
    assert len(store) == N_PROMPTS and (np.diff(store.offsets) == K).all()
    assert not work.exists()


def test_nan_reward_names_the_prompt(models, tmp_path):
    bad = tmp_path / "nan_reward.py"
    bad.write_text(
        "import torch\n"
        "def reward_func(queries, prompts, labels):\n"
        "    bad = [float('nan') if 'fox' in q.split(' A :')[0] else 1.0 for q in queries]\n"
        "    return {'rewards': torch.tensor(bad)}\n"
    )
    # Make sure some prompt mentions a fox.
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        json.dumps({"input": "describe the red cat"}) + "\n" + json.dumps({"input": "tell me about a fox"})
    )
    out = tmp_path / "refs"
    s = _settings(models, out, prompt_dataset=str(prompts), reward_url=str(bad))
    with pytest.raises(CalibrationError, match=r"nan .*prompt 'Q : tell me about a fox A :'"):
        run_calibration(s, log=lambda m: None)
    assert not out.exists()


def test_cli_errors(models, tmp_path, capsys):
    from openrlhf_infalign.cli import main

    base = ["calibrate", "--pretrain", models["policy"], "--out", str(tmp_path / "o"), "--backend", "hf"]
    base += ["--data.max_len", "256"]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc = main(base + ["--data.prompt_dataset", models["prompts"]])
    assert rc == 2 and "exactly one reward source" in capsys.readouterr().err
    rc = main(base + ["--data.prompt_dataset", models["prompts"], "--reward.remote_url", str(tmp_path / "nope.py")])
    assert rc == 2 and "nope.py not found" in capsys.readouterr().err
    rc = main(base + ["--data.prompt_dataset", models["prompts"], "--reward.remote_url", "ftp://x"])
    assert rc == 2 and "neither an http(s) URL" in capsys.readouterr().err
    rc = main(base + ["--data.prompt_dataset", str(tmp_path / "missing.jsonl"), "--reward.remote_url", models["rf"]])
    assert rc == 2 and "missing.jsonl not found" in capsys.readouterr().err
    rc = main(base + ["--data.prompt_dataset", models["prompts"], "--reward.remote_url", models["rf"], "--k", "0"])
    assert rc == 2 and "--k must be >= 1" in capsys.readouterr().err
    rc = main(
        base
        + ["--data.prompt_dataset", models["prompts"], "--reward.remote_url", models["rf"], "--data.input_key", "q"]
    )
    assert rc == 2 and "no column 'q'" in capsys.readouterr().err
    rc = main(base + ["--data.prompt_dataset", str(empty), "--reward.remote_url", models["rf"]])
    assert rc == 2 and "empty" in capsys.readouterr().err
    rc = main(
        base
        + ["--data.prompt_dataset", models["prompts"], "--reward.remote_url", models["rf"], "--data.max_len", "4096"]
    )
    assert rc == 2 and "exceeds the policy's max_position_embeddings 512" in capsys.readouterr().err


def test_remote_http_reward(models, tmp_path):
    """--reward.remote_url http://...: OpenRLHF's own HTTP helper posts {query, prompts, labels} to a live server."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(len(body["query"]))
            # Reward = number of tokens in prompt + response (the query is their decode, joined by spaces).
            rewards = [float(len(q.split())) for q in body["query"]]
            data = json.dumps({"rewards": rewards, "scores": rewards}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        out = tmp_path / "refs_http"
        url = f"http://127.0.0.1:{server.server_address[1]}/get_reward"
        run_calibration(_settings(models, out, reward_url=url, rm_batch_size=6), log=lambda m: None)
    finally:
        server.shutdown()
    assert sum(seen) == N_PROMPTS * K and max(seen) <= 6  # every sample scored, requests capped at the batch size
    store = ReferenceStore.open(out, warn_small_k=False)
    man = read_manifest(out)
    assert man["reward_source"] == {"kind": "remote_url", "urls": [url]}
    for p in tiny.make_prompts(N_PROMPTS, seed=1):
        n_prompt = len(tiny.INPUT_TEMPLATE.format(p).split())
        r = store.rewards_for_key(prompt_key(tiny.INPUT_TEMPLATE.format(p)))
        assert len(r) == K and ((r >= n_prompt + 1) & (r <= n_prompt + 8)).all()  # 1..8 new tokens each
