"""The run record: calibrate writes it, training / eval build it from train_ppo_ray args, and a mismatch is refused.

One tiny calibration (hf backend, a normalised tiny RM, chat template on) gives the store; each test changes one
setting of the training run and checks the error names the field, both values and the fix.
"""

import json
import shutil
import warnings
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("openrlhf")

from openrlhf_infalign.adapter.calibrate import CalibrateSettings, run_calibration  # noqa: E402
from openrlhf_infalign.adapter.hook import worker_setup  # noqa: E402
from openrlhf_infalign.adapter.run_record import (  # noqa: E402
    RECORD_KEY,
    check_run,
    check_store,
    record_from_args,
    run_record,
)
from openrlhf_infalign.adapter.upstream.reward_loader import restore_normalization_on_load  # noqa: E402
from openrlhf_infalign.demo import tiny  # noqa: E402
from openrlhf_infalign.store import ReferenceStore, StoreError, prompt_key, read_manifest, write_store  # noqa: E402

pytestmark = pytest.mark.openrlhf

MEAN, STD = 3.0, 2.0


def _set_config(path, **values):
    cfg_path = f"{path}/config.json"
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.update(values)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("run_record")
    tok = tiny.build_tokenizer(d / "tok")
    prompts = tiny.write_prompts(d / "prompts.jsonl", 3, seed=1)
    rm = tiny.build_reward_model(d / "rm", tok, seed=0)
    _set_config(rm, mean=MEAN, std=STD)
    other_rm = tiny.build_reward_model(d / "rm_v2", tok, seed=1)
    policy = tiny.build_policy(d / "policy", tok, seed=0)
    other_policy = tiny.build_policy(d / "policy_v2", tok, seed=1)
    # The same policy (same directory name, same files) with another chat template.
    chat_policy = shutil.copytree(policy, d / "elsewhere" / "policy")
    tok_cfg = f"{chat_policy}/tokenizer_config.json"
    with open(tok_cfg) as f:
        tc = json.load(f)
    tc["chat_template"] = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    with open(tok_cfg, "w") as f:
        json.dump(tc, f)
    (d / "elsewhere" / "policy" / "chat_template.jinja").unlink(missing_ok=True)
    out = d / "refs"
    settings = CalibrateSettings(
        policy=policy,
        prompt_dataset=prompts,
        out=str(out),
        k=2,
        backend="hf",
        max_new_tokens=6,
        max_len=128,
        batch_size=4,
        progress=False,
        apply_chat_template=True,
        reward_model=rm,
        normalize_reward=True,
    )
    run_calibration(settings, log=lambda m: None)
    return dict(
        store=out, policy=policy, other_policy=other_policy, chat_policy=str(chat_policy), rm=rm, other_rm=other_rm
    )


def _args(built, **over):
    """train_ppo_ray's nested args (only what the record reads), matching the calibration unless overridden."""
    flat = {
        "actor.model_name_or_path": built["policy"],
        "data.input_key": "input",
        "data.input_template": None,
        "data.apply_chat_template": True,
        "data.max_len": 128,
        "rollout.temperature": 1.0,
        "rollout.top_p": 1.0,
        "rollout.max_new_tokens": 6,
        "eval.temperature": 1.0,
        "reward.model_name_or_path": built["rm"],
        "reward.remote_url": None,
        "reward.normalize_enable": True,
    }
    flat.update(over)
    ns = SimpleNamespace()
    for dotted, value in flat.items():
        group, name = dotted.split(".")
        if not hasattr(ns, group):
            setattr(ns, group, SimpleNamespace())
        setattr(getattr(ns, group), name, value)
    return ns


def _store(built):
    return ReferenceStore.open(built["store"], warn_small_k=False)


def test_calibrate_writes_the_record_and_training_builds_the_same(built):
    man = read_manifest(built["store"])
    rec = man[RECORD_KEY]
    assert rec["sampling"] == {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 6, "max_len": 128}
    assert rec["normalization"] == {"enabled": True, "mean": MEAN, "std": STD}
    assert rec["template"] == man["template"]  # the older key stays, with the same content
    assert rec["template"]["chat_template_sha1"] and rec["policy"]["fingerprint"] and rec["reward"]["fingerprint"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing missing, nothing different
        assert check_store(_store(built), record_from_args(_args(built))) == []
        assert check_store(_store(built), record_from_args(_args(built), role="eval"), role="eval") == []


@pytest.mark.parametrize(
    "change, field, fix",
    [
        ({"rollout.temperature": 0.7}, "sampling.temperature", "pass --rollout.temperature 1.0"),
        ({"rollout.max_new_tokens": 32}, "sampling.max_new_tokens", "pass --rollout.max_new_tokens 6"),
        ({"data.max_len": 256}, "sampling.max_len", "pass --data.max_len 128"),
        ({"actor.model_name_or_path": "other_policy"}, "policy.name", "--actor.model_name_or_path"),
        ({"reward.model_name_or_path": "other_rm"}, "reward.name", "--reward.model_name_or_path"),
        ({"actor.model_name_or_path": "chat_policy"}, "template.chat_template_sha1", "chat template"),
        ({"reward.normalize_enable": False}, "normalization.enabled", "--reward.normalize_enable"),
        ({"data.input_template": "Q : {} A :"}, "template.input_template", "drop --data.input_template"),
    ],
)
def test_a_mismatch_is_refused_with_field_values_and_fix(built, change, field, fix):
    change = {k: built.get(v, v) if isinstance(v, str) else v for k, v in change.items()}
    record = record_from_args(_args(built, **change))
    with pytest.raises(StoreError) as e:
        check_store(_store(built), record)
    msg = str(e.value)
    assert f"  {field}: store " in msg and fix in msg and "--infalign.allow_mismatch" in msg
    # --infalign.allow_mismatch: one warning per differing field instead.
    with pytest.warns(UserWarning, match=field.replace(".", r"\.")):
        mism = check_store(_store(built), record, allow_mismatch=True)
    assert field in [m.field for m in mism]


def test_another_policy_is_named_with_both_paths(built):
    with pytest.raises(StoreError, match=r"policy\.name: store 'policy', this run 'policy_v2'"):
        record = record_from_args(_args(built, **{"actor.model_name_or_path": built["other_policy"]}))
        check_store(_store(built), record)


def test_eval_store_checked_against_eval_sampling(built):
    # Eval samples at --eval.temperature (upstream default 0.6), not at --rollout.temperature.
    record = record_from_args(_args(built, **{"eval.temperature": 0.6}), role="eval")
    expected = r"sampling\.temperature: store 1\.0, this run 0\.6 -> pass --eval\.temperature 1\.0"
    with pytest.raises(StoreError, match=expected):
        check_store(_store(built), record, role="eval")


def test_old_store_without_record_warns_once_and_checks_what_it_has(tmp_path, built):
    man = {"template": {"input_key": "input", "apply_chat_template": True}, "sampling": {"temperature": 1.0}}
    old = ReferenceStore.open(write_store(tmp_path / "old", [prompt_key("a")], [[1.0] * 16], manifest=man))
    record = record_from_args(_args(built))
    with pytest.warns(UserWarning, match="cannot be checked") as w:
        assert check_store(old, record) == []
    assert len([x for x in w if "cannot be checked" in str(x.message)]) == 1
    assert "policy.fingerprint" in str(w[0].message) and "sampling.temperature" not in str(w[0].message)
    with pytest.raises(StoreError, match="sampling.temperature"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check_store(old, record_from_args(_args(built, **{"rollout.temperature": 0.5})))


def test_store_info_shows_the_record(built, capsys):
    from openrlhf_infalign.commands.store import run

    run(SimpleNamespace(store_command="info", store=str(built["store"]), json=False, verify=False))
    out = capsys.readouterr().out
    assert "run record" in out and '"temperature": 1.0' in out and '"mean": 3.0' in out


def test_reward_func_and_url_sources(tmp_path):
    rf = tiny.write_reward_func(tmp_path / "rf.py")
    flags = {"data.input_key": "input", "reward.remote_url": rf}
    rec = run_record(flags.get)
    assert rec["reward"]["kind"] == "reward_func" and len(rec["reward"]["fingerprint"]) == 40
    assert rec["normalization"] == {"enabled": False, "mean": None, "std": None}
    rec = run_record({"reward.remote_url": "http://rm:5000/get_reward"}.get)
    assert rec["reward"] == {
        "kind": "remote_url",
        "path": "http://rm:5000/get_reward",
        "name": "http://rm:5000/get_reward",
        "fingerprint": None,
    }


@pytest.mark.parametrize("normalize", [False, True])
def test_normalised_rm_scores_alike_in_calibrate_and_training_loading(built, normalize):
    """Same (prompt, response) ids, same reward: calibrate's scorer vs the loader training's RM actors call."""
    import torch

    from openrlhf_infalign.adapter.calibrate.score import RewardModelScorer

    settings = CalibrateSettings(policy=built["policy"], prompt_dataset="x", out="x", reward_model=built["rm"])
    settings.normalize_reward = normalize
    scorer = RewardModelScorer(settings, tokenizer=SimpleNamespace(pad_token_id=0))
    worker_setup()  # what every Ray worker of a run (CPU or GPU) runs first: the RM actors load after it
    from openrlhf.trainer.ray import launcher

    model = launcher.get_llm_for_sequence_regression(
        built["rm"], "reward", normalize_reward=normalize, attn_implementation="sdpa", param_dtype="bf16"
    ).eval()
    assert float(model.mean) == MEAN and float(model.std) == STD
    ids = torch.tensor([[5, 9, 11, 14, 20, 7]])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = scorer.model(ids, mask).float()
        theirs = model(ids, mask).float()
        raw = (ours * STD + MEAN) if normalize else ours
    assert torch.equal(ours, theirs)
    assert launcher.get_llm_for_sequence_regression._infalign_restores_normalization
    restore_normalization_on_load()  # idempotent: not wrapped twice
    assert launcher.get_llm_for_sequence_regression.__wrapped__.__name__ == "get_llm_for_sequence_regression"
    assert not getattr(launcher.get_llm_for_sequence_regression.__wrapped__, "_infalign_restores_normalization", 0)
    assert np.isfinite(raw.numpy()).all()


def test_agent_func_runs_are_refused(built):
    expected = r"--train\.agent_func_path agent\.py: an agent's rewards cannot be reproduced"
    with pytest.raises(StoreError, match=expected):
        record_from_args(_args(built, **{"train.agent_func_path": "agent.py"}))


def test_check_run_reads_allow_mismatch_from_args(built):
    args = _args(built, **{"rollout.temperature": 0.7})
    with pytest.raises(StoreError, match="sampling.temperature"):
        check_run(args, _store(built))
    args.infalign = SimpleNamespace(allow_mismatch=True)
    with pytest.warns(UserWarning, match="sampling.temperature"):
        assert [m.field for m in check_run(args, _store(built))] == ["sampling.temperature"]
