"""Calibration throughput against bare vLLM generation, side by side in one run (samples per second).

The same prompts, K and sampling on the same OpenRLHF vLLM engines (``create_vllm_engines``, CPU mode on a CPU
machine), timed after a warm-up pass:
  bare         generation only: engines without a reward, samples fetched into the driver (the baseline);
  rm_actors    generation + the local reward model in Ray actors fed by the engines' refs (what calibrate does);
  rm_driver    generation, then the same RM in the driver process (the path before the actors, for reference);
  reward_func  engines built with a reward_func .py (a second set, alive beside the first): OpenRLHF's executor
               scores each sample inside the engine.
The modes run interleaved, --repeats rounds; medians are taken. ``ratio`` = mode / bare samples/s
(the issue's target: >= 0.9). With RAY_ADDRESS set it joins that cluster (one engine and one RM actor per node
with --engines 2 on a two-node cluster; it needs 2 x engines GPUs); otherwise it starts a local CPU-mode Ray.
Prints a table and one JSON line {"bench": "calibrate_throughput", ...}.
Usage: python benchmarks/calibrate_throughput_bench.py [--prompts 64] [--k 8] [--engines 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path


def build_inputs(root: Path, n_prompts: int):
    from openrlhf_infalign.demo import tiny

    tok = tiny.build_tokenizer(root / "policy")
    policy = tiny.build_policy(root / "policy", tok, seed=0)
    rm = tiny.build_reward_model(root / "rm", tok, seed=0)
    func = tiny.write_reward_func(root / "reward_func.py")
    prompts = [tiny.INPUT_TEMPLATE.format(p) for p in tiny.make_prompts(n_prompts, seed=3)]
    return tok, policy, rm, func, prompts


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=64, help="prompts per pass")
    ap.add_argument("--k", type=int, default=8, help="samples per prompt")
    ap.add_argument("--engines", type=int, default=1, help="vLLM engines (and reward-model actors)")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="response length cap")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per mode (medians)")
    args = ap.parse_args(argv)

    import ray
    import torch

    from openrlhf_infalign.adapter.calibrate import CalibrateSettings
    from openrlhf_infalign.adapter.calibrate.generate import VLLMGenerator
    from openrlhf_infalign.adapter.calibrate.score import RewardModelActors, RewardModelScorer

    root = Path(tempfile.mkdtemp(prefix="calib_bench_"))
    tok, policy, rm, func, prompts = build_inputs(root, args.prompts)
    labels = [""] * len(prompts)
    base = CalibrateSettings(
        policy=policy,
        prompt_dataset="-",
        out=str(root / "unused"),
        k=args.k,
        max_new_tokens=args.max_new_tokens,
        max_len=64,
        num_engines=args.engines,
        reward_model=rm,
        reward_num_actors=args.engines,
        cpu=not torch.cuda.is_available(),
        enforce_eager=True,
        gpu_memory_utilization=0.5,
        progress=False,
    )
    samples = len(prompts) * args.k
    noop = lambda n: None  # noqa: E731
    times = {"bare": [], "rm_actors": [], "rm_driver": [], "reward_func": []}

    t0 = time.perf_counter()
    if base.cpu:  # room for both engine sets (OpenRLHF's placement groups outlive a killed engine)
        from openrlhf_infalign.adapter import cpu
        from openrlhf_infalign.adapter.hook import runtime_env

        cpu.apply()
        node = cpu.ray_init_kwargs(num_cpus=3 * args.engines + 1, num_gpus=2 * args.engines)
        ray.init(**node, runtime_env=runtime_env(None, cpu_mode=True))
    gen = VLLMGenerator(base, tok)
    func_gen = VLLMGenerator(replace(base, reward_model=None, reward_url=func, reward_num_actors=None), tok)
    actors = RewardModelActors(base, tok)
    driver_rm = RewardModelScorer(base, tok)
    startup_s = time.perf_counter() - t0
    print(f"engines on {gen.node_ids()}, reward-model actors on {actors.node_ids}; start-up {startup_s:.1f} s")

    def bare():
        gen.generate(prompts, labels, seed=0, progress=noop)

    def rm_actors():
        refs = gen.submit(prompts, labels)
        actors.score_refs(refs, progress=noop)
        for ref in refs:
            gen.done(ref)

    def rm_driver():
        driver_rm.score(prompts, labels, gen.generate(prompts, labels, seed=0, progress=noop))

    def reward_func():
        out = func_gen.generate(prompts, labels, seed=0, progress=noop)
        assert all(s["reward"] is not None for ss in out for s in ss)

    modes = {"bare": bare, "rm_actors": rm_actors, "rm_driver": rm_driver, "reward_func": reward_func}
    for fn in modes.values():  # warm-up: first-call costs out of the timings
        fn()
    for _ in range(args.repeats):
        for name, fn in modes.items():
            times[name].append(timed(fn))
    actors.close()
    func_gen.close()
    gen.close()
    ray.shutdown()

    rate = {name: samples / statistics.median(ts) for name, ts in times.items()}
    result = {
        "bench": "calibrate_throughput",
        "prompts": len(prompts),
        "k": args.k,
        "engines": args.engines,
        "repeats": args.repeats,
        "startup_s": round(startup_s, 1),
        "samples_per_s": {k: round(v, 2) for k, v in rate.items()},
        "ratio": {
            "rm_actors": round(rate["rm_actors"] / rate["bare"], 3),
            "rm_driver": round(rate["rm_driver"] / rate["bare"], 3),
            "reward_func": round(rate["reward_func"] / rate["bare"], 3),
        },
        "seconds": {k: [round(t, 2) for t in v] for k, v in times.items()},
    }
    print(f"{'mode':<12} {'samples/s':>10} {'ratio':>7}")
    for name in modes:
        print(f"{name:<12} {rate[name]:>10.2f} {rate[name] / rate['bare']:>7.3f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
