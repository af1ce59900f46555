"""adapter/patches/: the native --reward.wrapper flag, applied to a COPY of the installed OpenRLHF 0.11.2 and checked there.

The patched copy is put first on PYTHONPATH of a subprocess (so ``import openrlhf`` is the copy); the same probe
runs against the untouched installed OpenRLHF for comparison. Only flash_attn is a stand-in.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from openrlhf_infalign.adapter import patching

REPO = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent(r'''
    import argparse, json, runpy, sys
    import numpy as np, torch
    from openrlhf_infalign.adapter.cpu.standins import install_flash_attn
    install_flash_attn()
    import openrlhf
    out = {"openrlhf_file": openrlhf.__file__}

    def parse(argv):
        """Run train_ppo_ray as __main__ (real parser + validation), stop at train(), return flat args."""
        seen = {}
        real = argparse.ArgumentParser.parse_args
        def spy(self, args=None, namespace=None):
            g = sys._getframe(1).f_globals
            ns = real(self, argv, namespace)
            def fake_train(a):
                seen["args"] = a
            g["train"] = fake_train
            seen["options"] = sorted(self._option_string_actions)
            return ns
        argparse.ArgumentParser.parse_args = spy
        try:
            runpy.run_module("openrlhf.cli.train_ppo_ray", run_name="__main__", alter_sys=False)
        except SystemExit as e:
            return {"exit": str(e.code)}
        finally:
            argparse.ArgumentParser.parse_args = real
        def flat(ns, prefix=""):
            d = {}
            for k, v in vars(ns).items():
                if hasattr(v, "__dict__") and not isinstance(v, (str, int, float, list, tuple)) and v is not None:
                    d.update(flat(v, prefix + k + "."))
                else:
                    d[prefix + k] = v if isinstance(v, (str, int, float, bool, type(None))) else list(v)
            return d
        return {"args": flat(seen["args"]), "options": seen["options"]}

    base = ["--actor.model_name_or_path", "p", "--reward.model_name_or_path", "rm", "--logger.wandb.run_name", "r",
            "--algo.advantage.estimator", "rloo", "--rollout.n_samples_per_prompt", "2"]
    out["plain"] = parse(base)
    out["wrapped"] = parse(base + ["--reward.wrapper", "infalign.ctrl", "--infalign.store", sys.argv[1],
                                   "--infalign.transform", "exp:t=3"])
    # Our console on top of this openrlhf: on a patched one both register the same flags; no clash, one wrapper.
    from openrlhf_infalign.adapter.console import run_train_ppo
    got = []
    rc = run_train_ppo(base + ["--reward_wrapper", "infalign.ctrl", "--infalign.store", sys.argv[1],
                               "--infalign.transform", "exp:t=3"], train=got.append)
    out["console"] = {"rc": rc, "wrapper": got[0].reward.wrapper if got else None}
    out["unknown"] = None
    try:
        from openrlhf.utils.reward_wrapper import load_reward_wrapper
        from types import SimpleNamespace
        load_reward_wrapper("nope", SimpleNamespace())
    except ImportError:
        out["unknown"] = "no module"
    except ValueError as e:
        out["unknown"] = str(e)

    # The seam: the maker of this openrlhf, with and without a wrapper passed the native way.
    from openrlhf.trainer.ppo_utils.experience import Experience
    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
    from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController
    from openrlhf.utils.config import hierarchize
    from openrlhf_infalign.core.transforms import parse_transform
    from openrlhf_infalign.adapter.wrapper import CTRLRewardWrapper
    from openrlhf_infalign.store import ReferenceStore
    args = hierarchize(argparse.Namespace(**out["plain"]["args"]))
    class S:
        pass
    strategy = S(); strategy.args = args
    prompts = ["Q : a A :", "Q : b A :"]
    rewards = [0.4, -0.3, 1.2, 0.0]
    def exps():
        g = torch.Generator().manual_seed(0)
        return [Experience(rewards=torch.tensor([r]), prompts=[prompts[i // 2]], index=[i],
                           action_mask=torch.ones(1, 4, dtype=torch.bool), kl=torch.rand(1, 4, generator=g) * 0.1,
                           info={}) for i, r in enumerate(rewards)]
    def adv(maker):
        return torch.cat([e.advantages.flatten() for e in maker.compute_advantages_and_returns(exps())]).tolist()
    out["adv_plain"] = adv(RemoteExperienceMaker(None, None, None, None, FixedKLController(0.05), strategy, None))
    w = CTRLRewardWrapper(ReferenceStore.open(sys.argv[1]), parse_transform("exp:t=3"))
    try:
        kl_ctl = FixedKLController(0.05)
        maker = RemoteExperienceMaker(None, None, None, None, kl_ctl, strategy, None, reward_wrapper=w)
        out["native_attr"] = maker.reward_wrapper is w
        out["adv_wrapped"] = adv(maker)
    except AttributeError:
        out["native_attr"] = False
    # The trainer constructor passes the wrapper down (data plumbing replaced: no model on disk here).
    import openrlhf.trainer.ppo_trainer as pt
    import inspect
    plain_cls = pt.PPOTrainer.__ray_actor_class__
    out["trainer_accepts"] = "reward_wrapper" in inspect.signature(plain_cls.__init__).parameters
    if out["trainer_accepts"]:
        pt.get_tokenizer = lambda *a, **k: None
        pt.prepare_datasets = lambda s, t: ([], None, 1)
        pt.SamplesGenerator = lambda **kw: None
        args.ckpt.best_metric_key = ""
        tr = plain_cls("p", strategy, None, None, None, None, None, reward_wrapper=w, max_len=8)
        out["trainer_maker_has_wrapper"] = tr.experience_maker.reward_wrapper is w
        out["trainer_generate_kwargs"] = tr.generate_kwargs
    print("PROBE" + json.dumps(out))
    ''')


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    import numpy as np

    from openrlhf_infalign.store import prompt_key, write_store

    d = tmp_path_factory.mktemp("patchstore") / "s"
    rng = np.random.default_rng(1)
    write_store(d, [prompt_key(p) for p in ("Q : a A :", "Q : b A :")], [rng.normal(size=16) for _ in range(2)])
    return str(d)


@pytest.fixture(scope="module")
def patched_copy(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    shutil.copytree(
        patching.default_target() / "openrlhf", target / "openrlhf", ignore=shutil.ignore_patterns("__pycache__")
    )
    assert patching.status(target, patching.find_patch()) == "unpatched"
    assert patching.main(["apply", "--check", "--target", str(target)]) == 0
    assert patching.status(target, patching.find_patch()) == "unpatched"  # --check wrote nothing
    assert patching.main(["apply", "--target", str(target)]) == 0
    return target


def probe(store_dir, pythonpath=None):
    env = dict(os.environ)
    script = Path(store_dir).parent / "probe.py"
    script.write_text(PROBE)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    res = subprocess.run(
        [sys.executable, str(script), store_dir], capture_output=True, text=True, env=env, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    line = [x for x in res.stdout.splitlines() if x.startswith("PROBE")][-1]
    return json.loads(line[len("PROBE") :])


@pytest.fixture(scope="module")
def results(store_dir, patched_copy):
    return probe(store_dir, patched_copy), probe(store_dir)


def test_apply_is_idempotent_and_revertible(patched_copy, tmp_path):
    patch = patching.find_patch()
    assert patching.status(patched_copy, patch) == "patched"
    assert patching.apply_patch(patched_copy, patch) == "already applied"
    assert (patched_copy / "openrlhf" / "utils" / "reward_wrapper.py").is_file()
    # revert on a second copy gives back the installed source byte for byte
    other = tmp_path / "site"
    shutil.copytree(patched_copy / "openrlhf", other / "openrlhf", ignore=shutil.ignore_patterns("__pycache__"))
    assert patching.main(["revert", "--target", str(other)]) == 0
    installed = patching.default_target() / "openrlhf"
    for f in (other / "openrlhf").rglob("*.py"):
        assert f.read_bytes() == (installed / f.relative_to(other / "openrlhf")).read_bytes(), f
    assert not (other / "openrlhf" / "utils" / "reward_wrapper.py").exists()


def test_conflict_names_the_file(tmp_path):
    (tmp_path / "openrlhf" / "cli").mkdir(parents=True)
    (tmp_path / "openrlhf" / "cli" / "train_ppo_ray.py").write_text("something else\n")
    assert patching.status(tmp_path, patching.find_patch()) == "conflict"
    with pytest.raises(patching.PatchError, match="train_ppo_ray.py"):
        patching.apply_patch(tmp_path, patching.find_patch())


def test_patched_parser_accepts_reward_wrapper(results, patched_copy):
    patched, upstream = results
    assert patched["openrlhf_file"].startswith(str(patched_copy))
    assert not upstream["openrlhf_file"].startswith(str(patched_copy))
    w = patched["wrapped"]
    assert "args" in w, w
    assert w["args"]["reward.wrapper"] == "infalign.ctrl"
    assert w["args"]["infalign.transform"] == "exp:t=3"  # the wrapper's own flags, registered by its factory
    assert "--reward_wrapper" in w["options"] and "--infalign.store" in w["options"]
    # the unpatched upstream rejects the flag (argparse error, exit 2)
    assert upstream["wrapped"] == {"exit": "2"}
    assert "infalign.ctrl" in patched["unknown"] and "nope" in patched["unknown"]
    # our console works on both (adds only what the parser lacks)
    assert patched["console"] == upstream["console"] == {"rc": 0, "wrapper": "infalign.ctrl"}
    assert upstream["unknown"] == "no module"


def test_without_the_flag_behaviour_is_unchanged(results):
    patched, upstream = results
    p, u = patched["plain"]["args"], upstream["plain"]["args"]
    added = set(p) - set(u)
    assert added and all(k == "reward.wrapper" or k.startswith("infalign.") for k in added)
    assert p["reward.wrapper"] is None
    assert {k: p[k] for k in u} == u  # every upstream arg identical after upstream's own validation
    assert set(upstream["plain"]["options"]) <= set(patched["plain"]["options"])
    # the seam is a no-op without a wrapper: same advantages as the untouched upstream
    assert patched["adv_plain"] == upstream["adv_plain"]


def test_native_seam_applies_the_wrapper(results, store_dir):
    patched, upstream = results
    assert patched["native_attr"] is True and patched["trainer_accepts"] is True
    assert upstream["trainer_accepts"] is False
    assert patched["trainer_maker_has_wrapper"] is True and patched["trainer_generate_kwargs"] == {"max_len": 8}
    assert patched["adv_wrapped"] != patched["adv_plain"]

    # Same numbers as this package's own installation (trainer subclass path) on the untouched upstream.
    import argparse

    import torch

    from openrlhf_infalign.adapter.cpu.standins import install_flash_attn

    install_flash_attn()
    from openrlhf.trainer.ppo_utils.experience import Experience
    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
    from openrlhf.trainer.ppo_utils.kl_controller import FixedKLController
    from openrlhf.utils.config import hierarchize

    from openrlhf_infalign.adapter.upstream.experience_maker import install_reward_wrapper
    from openrlhf_infalign.adapter.wrapper import CTRLRewardWrapper
    from openrlhf_infalign.core.transforms import parse_transform
    from openrlhf_infalign.store import ReferenceStore

    class S:
        args = hierarchize(argparse.Namespace(**upstream["plain"]["args"]))

    g = torch.Generator().manual_seed(0)
    prompts = ["Q : a A :", "Q : b A :"]
    exps = [
        Experience(rewards=torch.tensor([r]), prompts=[prompts[i // 2]], index=[i],
                   action_mask=torch.ones(1, 4, dtype=torch.bool), kl=torch.rand(1, 4, generator=g) * 0.1, info={})
        for i, r in enumerate([0.4, -0.3, 1.2, 0.0])
    ]  # fmt: skip
    maker = RemoteExperienceMaker(None, None, None, None, FixedKLController(0.05), S(), None)
    install_reward_wrapper(maker, CTRLRewardWrapper(ReferenceStore.open(store_dir), parse_transform("exp:t=3")))
    ours = torch.cat([e.advantages.flatten() for e in maker.compute_advantages_and_returns(exps)]).tolist()
    assert ours == pytest.approx(patched["adv_wrapped"], abs=1e-6)
