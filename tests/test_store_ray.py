"""A ReferenceStore shipped to a Ray worker through the object store works without the store directory."""

import shutil
import warnings

import numpy as np
import pytest

from openrlhf_infalign.store import ReferenceStore, prompt_key, write_store

ray = pytest.importorskip("ray")


def test_store_through_ray_object_store(tmp_path):
    rng = np.random.default_rng(0)
    prompts = [f"prompt {i}" for i in range(200)]
    refs = [rng.normal(size=32).astype(np.float32) for _ in prompts]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = write_store(tmp_path / "store", None, refs, prompts=prompts)
    store = ReferenceStore.open(out)
    keys = [prompt_key(p) for p in prompts]
    rewards = rng.normal(size=len(keys))
    want = store.calibrate(keys, rewards)

    started = not ray.is_initialized()  # reuse a Ray another test of this session started
    if started:
        ray.init(
            num_cpus=1,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            object_store_memory=256 * 1024 * 1024,
            log_to_driver=False,
        )
    try:
        ref = ray.put(store)
        del store
        shutil.rmtree(out)  # the worker must not need the directory (no shared filesystem)

        @ray.remote(num_cpus=0)
        def calibrate_remote(s, keys, rewards):
            import os

            return s.calibrate(keys, rewards), s.path is None or not os.path.exists(s.path), s.num_prompts

        got, dir_gone, n = ray.get(calibrate_remote.remote(ref, keys, rewards))
    finally:
        if started:
            ray.shutdown()
    assert dir_gone and n == 200
    np.testing.assert_array_equal(got, want)
