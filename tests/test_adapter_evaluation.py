"""The Best-of-N-aware evaluation hook (openrlhf_infalign/adapter/evaluation.py) on OpenRLHF 0.11.2's real classes.

Real: upstream's train_ppo_ray argparse + hierarchize, BasePPOTrainer.__init__ (experience maker, KL controller,
TensorboardLogger), PPOTrainer's fit-side helpers (save_best_checkpoint / _detect_eval_metric_key),
compute_eval_metrics, SamplesGenerator._process_response_into_experience and Experience. Stand-in: only the vLLM
engines (the samples generator's generate_eval_samples returns Experiences built by upstream's own
response->Experience code).
The local reward model path (Ray actors) is in test_adapter_evaluation_ray.py.
"""

import json
import math
import os
import warnings
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("openrlhf")
torch = pytest.importorskip("torch")

from openrlhf_infalign.adapter.cpu.standins import install_flash_attn  # noqa: E402

install_flash_attn()

from openrlhf.trainer.ppo_trainer import BasePPOTrainer, PPOTrainer  # noqa: E402
from openrlhf.trainer.ppo_utils.experience import Experience  # noqa: E402
from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator  # noqa: E402
from openrlhf.utils.config import hierarchize  # noqa: E402

from openrlhf_infalign.adapter import evaluation as ev  # noqa: E402
from openrlhf_infalign.adapter.upstream.train_ppo_ray import train_ppo_parser  # noqa: E402
from openrlhf_infalign.core.transforms import parse_transform  # noqa: E402
from openrlhf_infalign.core.winrate import win_rates  # noqa: E402
from openrlhf_infalign.store import ReferenceStore, prompt_key  # noqa: E402

pytestmark = pytest.mark.openrlhf


@pytest.fixture(scope="module")
def parser():
    return train_ppo_parser()


def make_args(parser, tmp_path, *extra):
    argv = [
        "--actor.model_name_or_path", "tiny",
        "--eval.dataset", "eval.jsonl",
        "--eval.n_samples_per_prompt", "4",
        "--eval.temperature", "1.0",
        "--eval.steps", "1",
        "--ckpt.output_dir", str(tmp_path / "run"),
        "--logger.tensorboard_dir", str(tmp_path / "tb"),
        "--logger.wandb.run_name", "evaltest",
        "--algo.kl.init_coef", "0.05",
        *extra,
    ]  # fmt: skip
    return hierarchize(parser.parse_args(argv))


# ---- eval samples the way upstream builds them from rollout-worker responses --------------------------------------
def response(prompt, tokens, reward, label=""):
    """A rollout-worker response dict as openrlhf/utils/agent.py returns it (single turn)."""
    prompt_len = 3
    return {
        "prompt": prompt,
        "label": label,
        "observation_tokens": list(range(1, prompt_len + 1)) + list(tokens),
        "action_ranges": [(prompt_len, prompt_len + len(tokens))],
        "reward": reward,
        "scores": reward,
        "rollout_log_probs": None,
        "truncated": False,
        "extra_logs": {},
    }


def real_experiences(prompts_rewards, args):
    """[(prompt, reward or None)] -> single-sample Experiences via upstream's SamplesGenerator code path."""
    gen = SamplesGenerator(SimpleNamespace(args=args), None, None, None, [])
    out = []
    for i, (p, r) in enumerate(prompts_rewards):
        toks = [5 + (i % 7)] * (2 + i % 5)
        out.append(gen._process_response_into_experience(response(p, toks, r), max_len=64))
    return out


class StubEvalGenerator:
    """Stands in for the vLLM engines behind SamplesGenerator.generate_eval_samples (CUDA vLLM)."""

    def __init__(self, samples_fn):
        self.samples_fn = samples_fn
        self.calls = []

    def generate_eval_samples(self, **kwargs):
        self.calls.append(kwargs)
        return self.samples_fn(kwargs)


class RecordingGroup:
    """Stands in for the DeepSpeed actor group when only save_checkpoint calls are checked."""

    def __init__(self):
        self.calls = []

    def async_run_method(self, method_name, **kwargs):
        self.calls.append((method_name, kwargs))
        return []


TrainerClass = type("EvalTrainer", (ev.InfAlignEvalMixin, PPOTrainer.__ray_actor_class__), {})


def make_trainer(args, store, samples_fn, eval_prompts, infalign_extra=None):
    t = TrainerClass.__new__(TrainerClass)  # upstream __init__ loads a tokenizer and datasets: do the rest by hand
    BasePPOTrainer.__init__(
        t, SimpleNamespace(args=args), RecordingGroup(), None, None, None, None, SimpleNamespace(pad_token_id=0)
    )
    t.eval_dataloader = [(["default"] * len(eval_prompts), list(eval_prompts), [""] * len(eval_prompts), [None])]
    t.samples_generator = StubEvalGenerator(samples_fn)
    t.generate_kwargs = {"do_sample": True, "max_len": 64, "max_new_tokens": 16, "temperature": 0.9, "top_p": 1.0}
    t.infalign = SimpleNamespace(
        store=store, eval_store=store, inference="bon:4", transform=parse_transform("exp:t=4"), eval_at_start=True
    )
    for k, v in (infalign_extra or {}).items():
        setattr(t.infalign, k, v)
    return t


def make_store(prompts, rng, k=16, loc=None, manifest=None):
    loc = loc if loc is not None else {p: float(i % 5) for i, p in enumerate(prompts)}
    rewards = [np.round(rng.normal(loc[p], 1.0, size=k), 1).astype(np.float32) for p in prompts]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        store = ReferenceStore.from_arrays([prompt_key(p) for p in prompts], rewards, manifest=manifest)
    return store, loc, dict(zip(prompts, rewards))


# ---- pure helpers -------------------------------------------------------------------------------------------------
def test_group_rewards_by_prompt_real_experiences(parser, tmp_path):
    args = make_args(parser, tmp_path)
    items = [("p1", 1.0), ("p2", -2.0), ("p1", 3.0), ("p2", 0.5), ("p3", 7.0)]
    exps = real_experiences(items, args)
    prompts, rewards = ev.group_rewards_by_prompt(exps)
    assert prompts == ["p1", "p2", "p3"]
    assert [r.tolist() for r in rewards] == [[1.0, 3.0], [-2.0, 0.5], [7.0]]
    # A batched Experience (upstream's concat) and (B, 1) rewards give the same grouping.
    batched = Experience.concat_experiences(exps[:4], 0)
    assert tuple(batched.rewards.shape) == (4,)
    batched.rewards = batched.rewards.reshape(4, 1)
    p2, r2 = ev.group_rewards_by_prompt([batched, exps[4]])
    assert p2 == prompts and [r.tolist() for r in r2] == [r.tolist() for r in rewards]
    # No reward (a local RM not yet run) or a NaN: a clear error naming the prompt.
    (unscored,) = real_experiences([("lonely prompt", None)], args)
    with pytest.raises(ValueError, match="lonely prompt"):
        ev.group_rewards_by_prompt([unscored])
    (nan,) = real_experiences([("nan prompt", float("nan"))], args)
    with pytest.raises(ValueError, match="nan prompt"):
        ev.group_rewards_by_prompt([nan])


def test_same_distribution_is_consistent_with_half_and_a_better_policy_is_not():
    """Step-0 property: the base policy against its own reference samples scores 0.5 within error, for every N."""
    rng = np.random.default_rng(1)
    prompts = [f"x{i}" for i in range(400)]
    loc = rng.normal(0, 3, size=len(prompts))
    # Rounded rewards: many ties, counted 1/2 on both sides.
    ref = [np.round(rng.normal(m, 1.0, size=16), 1) for m in loc]
    pol = [np.round(rng.normal(m, 1.0, size=8), 1) for m in loc]
    out = ev.win_rate_record(prompts, pol, ref)
    assert sorted(out["bon"], key=int) == ["1", "2", "4", "8"] and out["missing_prompts"] == 0
    for kind in ("bon", "won"):
        for n, v in out[kind].items():
            assert v["num_prompts"] == 400 and 0 < v["stderr"] < 0.05
            assert abs(v["win_rate"] - 0.5) < 4 * v["stderr"], (kind, n, v)
    assert out["standard"]["win_rate"] == out["bon"]["1"]["win_rate"]
    # Power check: a policy shifted up by half a reward sd is detected, more so under Best-of-N selection.
    better = [np.round(rng.normal(m + 0.5, 1.0, size=8), 1) for m in loc]
    up = ev.win_rate_record(prompts, better, ref)
    assert up["standard"]["win_rate"] > 0.5 + 4 * up["standard"]["stderr"]
    assert up["bon"]["8"]["win_rate"] > up["bon"]["1"]["win_rate"]


def test_missing_eval_prompts_error_or_skip():
    ref = [np.array([0.0, 1.0]), None, np.array([2.0, 3.0])]
    pol = [np.array([0.5, 0.7]), np.array([1.0, 2.0]), np.array([2.5, 9.0])]
    prompts = ["a", "the missing one", "c"]
    with pytest.raises(ValueError, match="the missing one.*infalign calibrate.*on_missing raw"):
        ev.win_rate_record(prompts, pol, ref, [1, 2], store_name="evalstore/")
    out = ev.win_rate_record(prompts, pol, ref, [1, 2], on_missing="raw")
    want = win_rates([pol[0], pol[2]], [ref[0], ref[2]], [1, 2])
    assert out["missing_prompts"] == 1 and out["num_prompts"] == 2 and out["bon"] == want["bon"]
    with pytest.raises(ValueError, match="eval_n"):  # N beyond every prompt's min(M, K)
        ev.win_rate_record(prompts, pol, ref, [4], on_missing="raw")
    with pytest.raises(ValueError, match="not in"):  # nothing left to evaluate is always an error
        ev.win_rate_record(["b"], [pol[1]], [None], on_missing="raw")


def test_metric_logs_names():
    res = win_rates([[1.0, 2.0, 3.0, 4.0]] * 3, [[0.0, 2.0, 5.0, 1.0]] * 3, [1, 2, 4])
    logs = ev.metric_logs(res)
    want = {"infalign/standard", "infalign/standard_stderr", "infalign/num_prompts"} | {
        f"infalign/{k}_{n}{s}" for k in ("bon", "won") for n in (1, 2, 4) for s in ("", "_stderr")
    }
    assert set(logs) == want
    assert logs["infalign/bon_4"] == res["bon"]["4"]["win_rate"]
    assert all(isinstance(v, float) and math.isfinite(v) for v in logs.values())


def test_sequence_kl_and_tracking(parser, tmp_path):
    args = make_args(parser, tmp_path)
    exps = real_experiences([("p", 1.0), ("q", 2.0)], args)
    batch = Experience.concat_experiences(exps, 0)
    tokens = batch.action_mask.float().sum(-1)
    batch.info["kl"] = torch.tensor([0.1, 0.3])
    assert ev.sequence_kl([batch]) == pytest.approx(float((torch.tensor([0.1, 0.3]) * tokens).mean()))
    assert ev.sequence_kl([Experience(info={})]) is None

    t = make_trainer(args, None, lambda kw: [], ["p"])
    t.reference_model_group = object()  # a reference model exists: the KL is in the reward and measured
    t.experience_maker.make_experience_batch = lambda rollout: [batch]
    t._infalign_track_kl()
    t._infalign_track_kl()  # idempotent: wrapped once
    assert t.experience_maker.make_experience_batch(None) == [batch]
    assert t._infalign_kl == pytest.approx(ev.sequence_kl([batch]))

    t2 = make_trainer(make_args(parser, tmp_path, "--algo.kl.use_loss"), None, lambda kw: [], ["p"])
    t2.reference_model_group = object()
    t2.experience_maker.make_experience_batch = lambda rollout: [batch]
    t2._infalign_track_kl()
    t2.experience_maker.make_experience_batch(None)
    assert t2._infalign_kl is None  # KL as a loss: make_experience has no per-sample KL to read


# ---- the whole evaluate() on upstream's trainer class --------------------------------------------------------------
def _policy_samples(prompts, loc, rng, args, shift=0.0):
    def fn(kwargs):
        m = kwargs["n_samples_per_prompt"]
        items = [(p, float(np.round(rng.normal(loc[p] + shift, 1.0), 1))) for p in prompts for _ in range(m)]
        rng.shuffle(items)  # completion order, not prompt order
        return real_experiences(items, args)

    return fn


def _tensorboard_scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = [os.path.join(dp) for dp, _, files in os.walk(logdir) if any(f.startswith("events") for f in files)]
    assert runs, f"no tensorboard events under {logdir}"
    acc = EventAccumulator(runs[0])
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_evaluate_logs_jsonl_and_best_checkpoint(parser, tmp_path, monkeypatch):
    rng = np.random.default_rng(7)
    prompts = [f"Q : prompt {i} A :" for i in range(60)]
    store, loc, _ = make_store(prompts, rng, k=8)
    args = make_args(parser, tmp_path, "--ckpt.best_metric_key", "eval/infalign/bon_4")
    seen = {}

    def samples(kwargs):
        exps = _policy_samples(prompts, loc, rng, args, shift=0.0)(kwargs)
        seen["exps"] = exps
        return exps

    t = make_trainer(args, store, samples, prompts)
    t._infalign_kl, t._infalign_kl_token_mean = 1.25, 0.01

    logs = t.evaluate(3, **t._infalign_eval_generate_kwargs())

    # Upstream's own eval metrics are still there, and ours for N = 1, 2, 4 (M = 4 eval samples, K = 8).
    assert "eval_default_pass1" in logs and "eval_default_pass4" in logs
    for n in (1, 2, 4):
        assert f"infalign/bon_{n}" in logs and f"infalign/won_{n}_stderr" in logs
    assert "infalign/bon_8" not in logs
    # The numbers are the estimator's on exactly those rewards, grouped by prompt.
    got_prompts, pol = ev.group_rewards_by_prompt(seen["exps"])
    want = win_rates(pol, [store.rewards_for_key(prompt_key(p)) for p in got_prompts], [1, 2, 4])
    assert logs["infalign/bon_4"] == pytest.approx(want["bon"]["4"]["win_rate"])
    assert logs["infalign/standard"] == pytest.approx(want["standard"]["win_rate"])
    # no reference model here: the evaluated policy's KL is not measured; the last rollouts' estimate is kept
    assert logs["infalign/kl_rollout"] == 1.25 and "infalign/kl" not in logs

    # jsonl record: the schema `infalign report` reads.
    with open(tmp_path / "run" / ev.EVAL_LOG) as f:
        (rec,) = [json.loads(line) for line in f]
    assert rec["step"] == 3 and rec["kl_rollout"] == 1.25 and rec["inference"] == "bon:4"
    assert rec["transform"] == "exp:t=4" and rec["kl"] is None and "no reference model" in rec["kl_reason"]
    assert rec["beta"] == pytest.approx(0.05) and rec["num_prompts"] == 60 and rec["temperature"] == 1.0
    assert rec["bon"]["4"]["win_rate"] == pytest.approx(want["bon"]["4"]["win_rate"])
    assert set(rec["won"]) == {"1", "2", "4"} and rec["standard"]["stderr"] > 0
    try:
        from openrlhf_infalign import report
    except ImportError:
        pass
    else:
        (loaded,) = report.load_eval_log(tmp_path / "run" / ev.EVAL_LOG)
        assert loaded["step"] == 3

    # Through upstream's TensorboardLogger under eval/.
    t.tensorboard_logger.writer.flush()
    scalars = _tensorboard_scalars(tmp_path / "tb")
    assert scalars["eval/infalign/bon_4"] == [(3, pytest.approx(logs["infalign/bon_4"], rel=1e-6))]
    assert "eval/infalign/won_2_stderr" in scalars and "eval/eval_default_pass1" in scalars

    # --ckpt.best_metric_key eval/infalign/bon_4 (the logger's spelling) drives upstream's best checkpoint.
    import openrlhf.trainer.ppo_trainer as upstream

    monkeypatch.setattr(upstream, "ray", SimpleNamespace(get=lambda refs: refs))  # no Ray cluster for a recorder
    t.save_best_checkpoint(logs, 3, {})
    assert t.best_eval_metric_key == "infalign/bon_4"
    assert t.best_eval_metric_value == logs["infalign/bon_4"]
    (call,) = t.actor_model_group.calls
    assert call[0] == "save_checkpoint" and call[1]["tag"] == "best_global_step3"
    assert call[1]["metric_key"] == "infalign/bon_4"


def test_initial_evaluate_step0(parser, tmp_path):
    rng = np.random.default_rng(3)
    prompts = [f"prompt {i}" for i in range(120)]
    store, loc, _ = make_store(prompts, rng, k=16, manifest={"sampling": {"temperature": 1.0}})
    args = make_args(parser, tmp_path, "--eval.n_samples_per_prompt", "8", "--infalign.eval_n", "1,4,8")
    t = make_trainer(args, store, _policy_samples(prompts, loc, rng, args), prompts)
    logs = t.infalign_initial_evaluate()
    # fit()'s eval kwargs: eval temperature and M replace the rollout ones.
    (kw,) = t.samples_generator.calls
    assert kw["temperature"] == 1.0 and kw["n_samples_per_prompt"] == 8 and kw["max_new_tokens"] == 16
    with open(tmp_path / "run" / ev.EVAL_LOG) as f:
        (rec,) = [json.loads(line) for line in f]
    assert rec["step"] == 0 and rec["kl"] == 0.0 and set(rec["bon"]) == {"1", "4", "8"}
    # Untrained policy == base policy: consistent with 0.5 for every N (same sampling distribution on both sides).
    for kind in ("bon", "won"):
        for n, v in rec[kind].items():
            assert abs(v["win_rate"] - 0.5) < 4 * v["stderr"], (kind, n, v)
    assert logs["infalign/bon_8"] == rec["bon"]["8"]["win_rate"]
    assert t.best_eval_metric_value == float("-inf")  # step 0 does not touch best-checkpoint state

    # Switched off, or no eval set: nothing runs.
    t.infalign.eval_at_start = False
    assert t.infalign_initial_evaluate() == {} and len(t.samples_generator.calls) == 1
    t.infalign.eval_at_start = True
    t.eval_dataloader = None
    assert t.infalign_initial_evaluate() == {}


def test_eval_sampling_mismatch_is_refused_before_training(parser, tmp_path):
    # The driver checks the eval store against eval sampling (--eval.temperature) before any trainer exists.
    from openrlhf_infalign.adapter import launch
    from openrlhf_infalign.store import StoreError, write_store

    prompts = [f"prompt {i}" for i in range(10)]
    d = write_store(tmp_path / "eval_refs", [prompt_key(p) for p in prompts], [[0.0] * 16] * 10,
                    manifest={"sampling": {"temperature": 1.0}})  # fmt: skip
    args = make_args(parser, tmp_path, "--eval.temperature", "0.6", "--infalign.eval_store", str(d))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fields this store lacks
        with pytest.raises(StoreError, match=r"sampling\.temperature: store 1\.0, this run 0\.6 -> pass --eval"):
            launch.prepare(args)
        args.infalign.allow_mismatch = True
        with pytest.warns(UserWarning, match="temperature: store 1.0, this run 0.6"):
            assert launch.prepare(args).eval_store is not None


def test_training_the_eval_store_and_the_hook_refuse_a_cut_short_store(parser, tmp_path):
    # The cheap check (every file's recorded size) runs wherever the adapter opens a store: training's store
    # (build.ctrl_settings), the eval store in the driver (launch.prepare) and a store path the eval hook opens.
    from openrlhf_infalign.adapter import build, launch
    from openrlhf_infalign.store import StoreError, write_store

    d = write_store(tmp_path / "refs", [prompt_key(f"p{i}") for i in range(4)], [[0.0] * 16] * 4)
    values = d / "index" / "values.npy"
    values.write_bytes(values.read_bytes()[:-8])
    words = rf"{values} has \d+ bytes, \d+ were written \(truncated or changed\); delete .*index and open the store"
    args = make_args(parser, tmp_path, "--infalign.eval_store", str(d))
    with pytest.raises(StoreError, match=words):
        launch.prepare(args)
    args = make_args(parser, tmp_path, "--reward_wrapper", "infalign.ctrl", "--infalign.store", str(d))
    with pytest.raises(StoreError, match=words):
        build.ctrl_settings(args, "infalign.ctrl")
    hook = SimpleNamespace(infalign=SimpleNamespace(eval_store=str(d), store=None))
    with pytest.raises(StoreError, match=words):
        ev.InfAlignEvalMixin._infalign_eval_store(hook)


def test_no_store_is_plain_upstream(parser, tmp_path):
    rng = np.random.default_rng(5)
    prompts = ["a", "b"]
    args = make_args(parser, tmp_path)
    t = make_trainer(args, None, _policy_samples(prompts, {"a": 0.0, "b": 1.0}, rng, args), prompts)
    logs = t.evaluate(2, **t._infalign_eval_generate_kwargs())
    assert "eval_default_pass1" in logs and not any(k.startswith("infalign/") for k in logs)
    assert not (tmp_path / "run" / ev.EVAL_LOG).exists()


def test_unscored_samples_without_reward_model_fail_clearly(parser, tmp_path):
    args = make_args(parser, tmp_path)
    t = make_trainer(args, None, lambda kw: real_experiences([("a", None)], args), ["a"])
    with pytest.raises(ValueError, match="no local reward model"):
        t.evaluate(1, **t._infalign_eval_generate_kwargs())


def test_infalign_trainer_uses_the_mixin():
    trainer = pytest.importorskip("openrlhf_infalign.adapter.trainer")
    assert issubclass(trainer.InfAlignPPOTrainer, ev.InfAlignEvalMixin)
    mro = trainer.InfAlignPPOTrainer.__mro__
    assert mro.index(ev.InfAlignEvalMixin) < mro.index(PPOTrainer.__ray_actor_class__)


class LogProbGroup:
    """Stands in for an actor / reference model group: ``forward`` returns per-token log-probs (B, A)."""

    def __init__(self, per_token, actors=1):
        self.per_token, self._actor_handlers, self.duplicate_actors, self.calls = per_token, [None] * actors, 1, 0

    def async_run_method_batch(self, method_name, sequences, action_mask, attention_mask):
        assert method_name == "forward" and len(sequences) >= len(self._actor_handlers)
        self.calls += 1
        return [[self.per_token(s, a) for s, a in zip(sequences, action_mask)]]


def test_eval_sequence_kl_from_log_probs():
    lp = [torch.tensor([[0.5, 0.2, 9.0], [0.1, 0.1, 0.1]])]
    ref = [torch.tensor([[0.0, 0.4, 0.0], [0.3, 0.1, 0.1]])]
    mask = [torch.tensor([[1, 1, 0], [1, 1, 1]])]  # padding beyond a response is not counted
    assert ev.eval_sequence_kl(lp, ref, mask) == pytest.approx(((0.5 - 0.2) + (-0.2)) / 2)
    assert ev.eval_sequence_kl([], [], []) is None


def test_kl_stderr_is_the_within_prompt_error_of_the_mean():
    rng = np.random.default_rng(3)
    prompts = [f"p{i}" for i in range(40) for _ in range(8)]
    offsets = {p: 10.0 * rng.random() for p in set(prompts)}  # between-prompt spread must not count
    draws = []
    for _ in range(400):
        values = np.array([offsets[p] + rng.normal() for p in prompts])
        draws.append((values.mean(), ev.kl_stderr(values, prompts)))
    means, ses = np.array(draws).T
    # the mean's spread over repeated eval samples (same prompts) is what the stated error must describe
    assert np.std(means) == pytest.approx(np.mean(ses), rel=0.1)
    assert np.mean(ses) == pytest.approx(1 / np.sqrt(len(prompts)), rel=0.05)
    assert ev.kl_stderr(np.array([1.0, 2.0]), ["a", "b"]) is None  # no prompt with two samples


def test_evaluate_records_the_kl_of_the_evaluated_policy(parser, tmp_path, monkeypatch):
    import openrlhf.trainer.ppo_utils.experience_maker as maker_mod

    monkeypatch.setattr(maker_mod, "ray", SimpleNamespace(get=lambda refs: refs))  # groups answer directly
    rng = np.random.default_rng(5)
    prompts = [f"Q : prompt {i} A :" for i in range(12)]
    store, loc, _ = make_store(prompts, rng, k=8)
    args = make_args(parser, tmp_path, "--rollout.micro_batch_size", "5")
    seen = {}

    def samples(kwargs):
        seen["exps"] = _policy_samples(prompts, loc, rng, args)(kwargs)
        return seen["exps"]

    t = make_trainer(args, store, samples, prompts)
    # log pi - log pi_ref = 0.01 x (the sample's token sum) at every response token
    t.actor_model_group = LogProbGroup(lambda s, a: 0.01 * s.float().sum(-1, keepdim=True) * torch.ones(a.shape))
    t.reference_model_group = LogProbGroup(lambda s, a: torch.zeros(a.shape), actors=2)
    t._infalign_kl = 0.7
    logs = t.evaluate(2, **t._infalign_eval_generate_kwargs())
    want = np.mean([0.01 * float(e.sequences.sum()) * float(e.action_mask.sum()) for e in seen["exps"]])
    assert logs["infalign/kl"] == pytest.approx(want) and logs["infalign/kl_rollout"] == 0.7
    assert t.actor_model_group.calls == t.reference_model_group.calls == 1
    with open(tmp_path / "run" / ev.EVAL_LOG) as f:
        (rec,) = [json.loads(line) for line in f]
    assert rec["kl"] == pytest.approx(want) and rec["kl_estimator"] == ev.KL_EVAL_ESTIMATOR == "k1_seq_eval"
    assert rec["kl_reason"] is None and rec["kl_rollout"] == 0.7
    # eval samples drawn at another temperature than the policy's: not its KL, so not recorded as such
    t.args.eval.temperature = 0.5
    t.evaluate(3, **t._infalign_eval_generate_kwargs())
    with open(tmp_path / "run" / ev.EVAL_LOG) as f:
        rec = json.loads(f.read().splitlines()[-1])
    assert rec["kl"] is None and "--eval.temperature 0.5" in rec["kl_reason"]
