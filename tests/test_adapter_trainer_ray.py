"""Our trainer as a REAL Ray actor, built the way upstream's train() builds it, on Ray on loopback (CPU).

In a fresh process (so this test owns Ray's runtime_env): the console parses with OpenRLHF's real parser and calls
the plugin's run_train; inside it, exactly upstream's calls: ``ray.init(runtime_env=...)`` (merged with our worker
setup hook + the CPU module, --infalign.cpu), ``get_strategy(args)``, ``from openrlhf.trainer.ppo_trainer import
PPOTrainer; PPOTrainer.remote(pretrain, strategy, ...)``. The upstream constructor runs for real in the actor
(tokenizer from disk, prompt dataset, sample generator, experience maker). The store directory is DELETED before the
actor starts: the store must travel by value. Then, inside the actor, its own experience maker trains on the
calibrated-and-transformed reward of prompts from its own (real, templated) dataloader. The same process then does
it again with ``--reward_wrapper infalign.direct`` (a second ray.init, a second actor): the direct objective's
wrapper, built by its factory in the driver, groups the actor's own prompts and trains on the group estimator.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(r"""
    import json, os, shutil, sys
    import numpy as np
    tmp = sys.argv[1]

    from openrlhf_infalign.demo import tiny
    from openrlhf_infalign.store import prompt_key, write_store
    from openrlhf_infalign.adapter.console import run_train_ppo

    tiny.build_tokenizer(os.path.join(tmp, "tok"))
    prompts_file = tiny.write_prompts(os.path.join(tmp, "prompts.jsonl"), 8)
    prompts = [json.loads(l)["input"] for l in open(prompts_file)]
    templated = ["Q : {} A :".format(p) for p in prompts]
    rng = np.random.default_rng(0)
    store_dir = os.path.join(tmp, "store")
    write_store(store_dir, [prompt_key(p) for p in templated], [rng.normal(size=16) for _ in templated],
                manifest={"template": {"input_template": "Q : {} A :", "apply_chat_template": False}})

    def inside_actor(self):
        import torch, sys
        from openrlhf.trainer.ppo_utils.experience import Experience
        n = self.args.rollout.n_samples_per_prompt
        batches = iter(self.prompts_dataloader)  # upstream's dataset, one prompt per batch (shuffled, no repeats)
        prompts = [next(batches)[1][0] for _ in range(min(4, 8 // n))]  # (datasources, prompts, labels, images)
        ps = [p for p in prompts for _ in range(n)]  # a prompt's n samples consecutive, as the generator emits
        raw = [0.7, -0.2, 1.3, 0.1, 0.4, -1.1, 0.9, 0.0][: len(ps)]
        exps = [Experience(rewards=torch.tensor([r]), prompts=[p], index=[i],
                           action_mask=torch.ones(1, 3, dtype=torch.bool), kl=torch.zeros(1, 3), info={})
                for i, (p, r) in enumerate(zip(ps, raw))]
        exps = exps[::-1]  # handed over in another order: the index decides the groups
        out = self.experience_maker.compute_advantages_and_returns(exps)[::-1]
        key = "infalign/direct" if self.infalign.objective == "direct" else "infalign/transformed"
        fa = sys.modules.get("flash_attn")
        return {
            "cls": type(self).__mro__[1].__qualname__,
            "mro": [c.__module__ + "." + c.__qualname__ for c in type(self).__mro__],
            "has_wrapper": getattr(self.experience_maker, "_infalign_reward_wrapper", None) is self.infalign.wrapper,
            "store_path_exists": os.path.exists(str(self.infalign.store.path)),
            "prompts": ps, "raw": raw,
            "transformed": [float(e.info[key][0]) for e in out],
            "objective": self.infalign.objective,
            "returns": [float(e.returns[0, 0]) for e in out],
            "flash_attn_standin": bool(getattr(fa, "__infalign_standin__", False)),
            "cpu_env": os.environ.get("INFALIGN_CPU"),
            "pid": os.getpid(),
        }

    result = {}

    def train(args):  # stands for upstream's train(): the same calls, up to the trainer actor
        import ray
        from openrlhf.utils import get_strategy
        ray.init(runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
        shutil.copytree(store_dir, store_dir + ".kept")  # for the second run
        shutil.rmtree(store_dir)  # the trainer actor must not need the directory
        strategy = get_strategy(args)
        from openrlhf.trainer.ppo_trainer import PPOTrainer
        trainer = PPOTrainer.remote(args.actor.model_name_or_path, strategy, None, None, None, None, None,
                                    do_sample=True, max_len=64, max_new_tokens=8, temperature=1.0, top_p=1.0)
        result["max_steps"] = ray.get(trainer.get_max_steps.remote())
        result.update(ray.get(trainer.__ray_call__.remote(inside_actor)))
        wrapper = PPOTrainer.state.wrapper  # the driver's copy (its mmap outlives the deleted directory)
        import torch
        new, _ = wrapper(result["prompts"], torch.tensor(result["raw"]))
        result["expected"] = new.tolist()
        result["driver_pid"] = os.getpid()
        ray.shutdown()

    common = [
        "--infalign.cpu",
        "--actor.model_name_or_path", os.path.join(tmp, "tok"),
        "--reward.remote_url", "http://127.0.0.1:9/none",
        "--data.prompt_dataset", prompts_file, "--data.input_template", "Q : {} A :",
        "--infalign.store", store_dir, "--algo.advantage.estimator", "reinforce",
        "--rollout.batch_size", "4", "--train.batch_size", "4",
        "--actor.num_gpus_per_node", "1", "--ref.num_gpus_per_node", "1", "--vllm.num_engines", "0",
    ]
    rc = run_train_ppo(common + ["--reward_wrapper", "infalign.ctrl", "--infalign.transform", "exp:t=5"], train=train)
    print("RESULT" + json.dumps({"rc": rc, **result}))
    shutil.move(store_dir + ".kept", store_dir)
    result.clear()
    rc = run_train_ppo(common + ["--reward_wrapper", "infalign.direct", "--infalign.inference", "bon:2",
                                 "--rollout.n_samples_per_prompt", "4", "--train.batch_size", "16"], train=train)
    print("DIRECT" + json.dumps({"rc": rc, **result}))
    """)


def test_trainer_actor_in_ray_gets_wrapper_and_store_by_value(tmp_path):
    script = tmp_path / "ray_probe.py"
    script.write_text(SCRIPT)
    res = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=900, cwd=tmp_path
    )
    lines = [x for x in res.stdout.splitlines() if x.startswith("RESULT")]
    direct = [x for x in res.stdout.splitlines() if x.startswith("DIRECT")]
    assert res.returncode == 0 and lines and direct, res.stdout[-3000:] + res.stderr[-5000:]
    r = json.loads(lines[-1][len("RESULT") :])
    assert r["rc"] == 0
    assert r["pid"] != r["driver_pid"]  # really another process
    assert r["mro"][0] == "openrlhf_infalign.adapter.trainer.InfAlignPPOTrainer"
    assert "openrlhf.trainer.ppo_trainer.PPOTrainer" in r["mro"]
    assert r["max_steps"] == 8 * 1 // 4  # upstream's prepare_datasets on the real dataset: 8 prompts / batch 4
    assert r["has_wrapper"] is True
    assert r["store_path_exists"] is False  # the actor calibrated without the directory
    assert r["cpu_env"] == "1" and r["flash_attn_standin"] is True  # the worker setup hook ran the CPU module
    assert all(p.startswith("Q : ") and p.endswith(" A :") for p in r["prompts"])  # upstream's templating
    assert r["transformed"] == r["expected"] or max(abs(a - b) for a, b in zip(r["transformed"], r["expected"])) < 1e-6
    assert max(abs(a - b) for a, b in zip(r["returns"], r["expected"])) < 1e-6  # reinforce, no KL: return = reward
    assert all(0.0 <= x <= 1.0 for x in r["transformed"]) and r["transformed"] != r["raw"]
    assert r["objective"] == "ctrl"
    # infalign.direct: built in the driver, shipped by value, grouped by index in the actor (Best-of-2, two groups
    # of 4 handed over in reverse): the driver's copy on the same samples, and each group's rewards sum to 0
    d = json.loads(direct[-1][len("DIRECT") :])
    assert d["rc"] == 0 and d["objective"] == "direct" and d["has_wrapper"] is True and d["store_path_exists"] is False
    assert len(set(d["prompts"][:4])) == len(set(d["prompts"][4:])) == 1 and d["prompts"][0] != d["prompts"][4]
    assert max(abs(a - b) for a, b in zip(d["transformed"], d["expected"])) < 1e-6
    assert max(abs(a - b) for a, b in zip(d["returns"], d["expected"])) < 1e-6
    assert abs(sum(d["transformed"][:4])) < 1e-6 and abs(sum(d["transformed"][4:])) < 1e-6
    assert any(abs(x) > 1e-3 for x in d["transformed"])
