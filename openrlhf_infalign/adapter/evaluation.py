"""Best-of-N-aware evaluation inside OpenRLHF's PPO trainer: win rates vs the base policy, for every N, with errors.

``InfAlignEvalMixin`` goes in front of OpenRLHF 0.11.2's plain ``PPOTrainer`` class (``InfAlignPPOTrainer`` in
``trainer.py``). Upstream's ``fit()`` calls ``self.evaluate(global_step, **eval_generate_kwargs)`` after a train step
when ``global_step % --eval.steps == 0`` and passes the returned dict to ``save_best_checkpoint``; this mixin's
``evaluate`` keeps that contract and adds, per evaluation:

1. Eval samples from the vLLM engines exactly as upstream (``samples_generator.generate_eval_samples``, M =
   ``--eval.n_samples_per_prompt`` per prompt, ``--eval.temperature``). Rewards come from the remote RM / reward_func
   when the rollout workers filled them (upstream's only path), else from the LOCAL reward model actors
   (``reward_model_group``), scored in micro-batches with the same ``forward`` call the experience maker uses.
2. The raw rewards of each eval prompt's M samples against the K reference (base policy) rewards of the same prompt
   in the eval store (``--infalign.eval_store``, default the training store): the unbiased Best-of-N and Worst-of-N
   win rate estimators of ``core.winrate`` for N in ``--infalign.eval_n`` (default powers of two up to min(M, K))
   plus the standard win rate, each with its prompt-level standard error.
3. Logged through upstream's own ``log_eval`` (wandb / tensorboard prefix ``eval/``), as ``eval/infalign/standard``,
   ``eval/infalign/bon_4``, ``eval/infalign/bon_4_stderr``, ``eval/infalign/won_4`` ... Upstream's pass@k metrics
   are kept. Every ``infalign/...`` key is a valid ``--ckpt.best_metric_key`` (the ``eval/`` prefix may be given too).
4. One record per evaluation appended to ``<--ckpt.output_dir>/infalign_eval.jsonl`` (schema: ``evallog.py``).
   ``kl`` is the sequence-level KL(pi || pi_ref) in nats of the policy that was EVALUATED: k1 = log pi - log pi_ref
   summed over each eval sample's response tokens, mean over the eval samples (``kl_estimator`` names it), with the
   log-probs from the same actor / reference ``forward`` calls upstream's ``make_experience`` makes. Null, with
   ``kl_reason``, when it cannot be measured (no reference model; eval temperature unlike the rollout's); 0 at step
   0 where not measured. ``kl_rollout`` keeps the last training step's rollout estimate (one update behind).

``infalign_initial_evaluate()`` runs the same evaluation once at step 0, before any update (upstream has none):
the untrained policy IS the base policy, so its win rates must be consistent with 0.5 -- a check that the eval store
matches the eval prompts, template, sampling temperature and reward model. It updates no best-checkpoint state.
"""

from __future__ import annotations

import math
import os
import time
from datetime import timedelta
from typing import Sequence

import numpy as np
import torch

from openrlhf_infalign.adapter.args import get
from openrlhf_infalign.adapter.upstream.experience_maker import effective_actors, forward, record_rollout_kl
from openrlhf_infalign.core.winrate import default_ns, win_rates
from openrlhf_infalign.evallog import EVAL_LOG, append_record
from openrlhf_infalign.options import parse_ns
from openrlhf_infalign.store import ReferenceStore

METRIC_PREFIX = "infalign/"
KL_EVAL_ESTIMATOR = "k1_seq_eval"  # log pi - log pi_ref summed over response tokens, mean over eval samples

__all__ = [
    "EVAL_LOG",
    "METRIC_PREFIX",
    "InfAlignEvalMixin",
    "append_record",
    "eval_sequence_kl",
    "kl_stderr",
    "sequence_kl_values",
    "group_rewards_by_prompt",
    "metric_logs",
    "reference_rewards",
    "win_rate_record",
]


# ---- pure helpers (no trainer state): unit-tested directly ------------------------------------------------------
def _sample_rewards(sample) -> list[float]:
    """Per-sample raw rewards of one (possibly batched) Experience; shapes (B,) and (B, 1) alike."""
    r = sample.rewards
    if r is None:
        raise ValueError(f"eval sample for prompt {sample.prompts[0]!r} has no reward")
    r = torch.as_tensor(r).float().reshape(len(sample.prompts), -1)
    if r.shape[1] != 1:
        raise ValueError(f"expected one reward per sample, got shape {tuple(sample.rewards.shape)}")
    return r[:, 0].tolist()


def group_rewards_by_prompt(samples: Sequence) -> tuple[list[str], list[np.ndarray]]:
    """Eval Experiences -> (unique prompts in first-seen order, per prompt the array of its samples' rewards).

    Grouped by the exact prompt string (what the store is keyed by), not by position: vLLM returns prompts in
    completion order. A prompt listed twice in the eval set simply contributes 2M samples.
    """
    by_prompt: dict[str, list[float]] = {}
    for s in samples:
        for prompt, r in zip(s.prompts, _sample_rewards(s)):
            if not math.isfinite(r):
                raise ValueError(f"eval reward {r} for prompt {prompt!r} is not finite")
            by_prompt.setdefault(prompt, []).append(r)
    prompts = list(by_prompt)
    return prompts, [np.asarray(by_prompt[p], dtype=np.float64) for p in prompts]


def reference_rewards(store, prompts: Sequence[str]) -> tuple[list[np.ndarray | None], list[str]]:
    """Per prompt its K reference rewards from a ``ReferenceStore`` (None where missing), and the missing prompts."""
    rows = store.rows_for_prompts(list(prompts), on_missing="raw")
    refs, missing = [], []
    for prompt, row in zip(prompts, rows.tolist()):
        if row < 0:
            refs.append(None)
            missing.append(prompt)
        else:
            refs.append(np.asarray(store.rewards_for_row(row), dtype=np.float64))
    return refs, missing


def win_rate_record(
    prompts: Sequence[str],
    policy: Sequence[np.ndarray],
    reference: Sequence[np.ndarray | None],
    ns: Sequence[int] | None = None,
    on_missing: str = "error",
    store_name: str = "the eval store",
) -> dict:
    """``core.winrate.win_rates`` of the policy's eval rewards vs the reference rewards of the same prompts.

    Prompts without references raise (listing a few, with the fix) unless on_missing="raw", which leaves them out
    and counts them in ``missing_prompts``. ns=None: powers of two up to min(M, K) over the prompts kept, so every
    N uses every prompt. An explicit N larger than some prompt's min(M, K) uses the prompts it fits (its own
    ``num_prompts``); one that fits no prompt raises.
    """
    keep = [i for i, r in enumerate(reference) if r is not None]
    missing = [prompts[i] for i, r in enumerate(reference) if r is None]
    if missing and (on_missing == "error" or not keep):
        shown = "; ".join(repr(p[:80] + ("..." if len(p) > 80 else "")) for p in missing[:3])
        raise ValueError(
            f"{len(missing)} of {len(prompts)} eval prompt(s) are not in {store_name}: {shown}"
            f"{' ...' if len(missing) > 3 else ''}. Build a store for the eval set with `infalign calibrate` (same "
            "dataset, template and sampling flags as --eval.dataset) and pass it as --infalign.eval_store"
            + ("; or pass --infalign.on_missing raw to skip them" if keep else "")
        )
    pol = [policy[i] for i in keep]
    ref = [reference[i] for i in keep]
    if ns is None:
        ns = default_ns(min(len(p) for p in pol), min(len(r) for r in ref))
    try:
        out = win_rates(pol, ref, ns)
    except ValueError as e:
        raise ValueError(f"--infalign.eval_n: {e}") from None
    out["missing_prompts"] = len(missing)
    return out


def metric_logs(result: dict) -> dict[str, float]:
    """Flat ``infalign/...`` scalars of a win-rate result for OpenRLHF's loggers and ``--ckpt.best_metric_key``."""
    logs = {
        f"{METRIC_PREFIX}standard": result["standard"]["win_rate"],
        f"{METRIC_PREFIX}standard_stderr": result["standard"]["stderr"],
        f"{METRIC_PREFIX}num_prompts": float(result["num_prompts"]),
    }
    for kind in ("bon", "won"):
        for n, v in result[kind].items():
            logs[f"{METRIC_PREFIX}{kind}_{n}"] = v["win_rate"]
            logs[f"{METRIC_PREFIX}{kind}_{n}_stderr"] = v["stderr"]
    if result.get("missing_prompts"):
        logs[f"{METRIC_PREFIX}missing_prompts"] = float(result["missing_prompts"])
    return logs


def _spec(x) -> str | None:
    """Canonical string of an inference procedure / transform object (its .spec or .name), or the string itself."""
    if x is None or isinstance(x, str):
        return x
    for attr in ("spec", "name"):
        v = getattr(x, attr, None)
        if isinstance(v, str):
            return v
    return str(x)


# ---- the mixin ---------------------------------------------------------------------------------------------------
class InfAlignEvalMixin:
    """Adds InfAlign win rates to OpenRLHF's ``PPOTrainer.evaluate`` and a step-0 evaluation.

    Expects the upstream trainer attributes (args, samples_generator, eval_dataloader, reward_model_group,
    experience_maker, tokenizer, kl_ctl, wandb_logger, tensorboard_logger) and optionally ``self.infalign`` with
    ``.eval_store`` / ``.store`` (a ``ReferenceStore``), ``.inference``, ``.transform`` (objects with ``.spec`` or
    strings). Without any store it behaves like upstream plus local-RM scoring.
    """

    _infalign_kl: float | None = None
    _infalign_kl_token_mean: float | None = None

    # -- KL bookkeeping: sequence-level KL of the last training step's rollouts --------------------------------
    def train_step(self, rollout_samples, global_step: int):
        self._infalign_track_kl()
        status, global_step = super().train_step(rollout_samples, global_step)
        kl_tok = status.get("kl") if isinstance(status, dict) else None
        self._infalign_kl_token_mean = float(kl_tok) if isinstance(kl_tok, (int, float)) else None
        return status, global_step

    def _infalign_track_kl(self) -> None:
        """Wrap this trainer's ``experience_maker.make_experience_batch`` (once) to record the rollouts' sequence KL.

        OpenRLHF puts the per-sample token-mean KL to the reference in ``info["kl"]``; times the number of response
        tokens it is the per-sample sequence KL estimate (KL in the reward). It is all zeros when there is no
        reference model or the KL is a loss term (``--algo.kl.use_loss``): then nothing is recorded.
        """
        maker = getattr(self, "experience_maker", None)
        if maker is None:
            return
        measured = getattr(self, "reference_model_group", None) is not None and not get(
            self.args, "algo.kl.use_loss", False
        )
        if measured:
            record_rollout_kl(maker, lambda experiences: setattr(self, "_infalign_kl", sequence_kl(experiences)))

    # -- best checkpoint: accept the logger's "eval/" spelling of our keys ------------------------------------
    def _detect_eval_metric_key(self, eval_metrics):
        key = getattr(self, "best_eval_metric_key", "") or ""
        if key.startswith("eval/") and key not in eval_metrics and key[len("eval/") :] in eval_metrics:
            self.best_eval_metric_key = key[len("eval/") :]
        return super()._detect_eval_metric_key(eval_metrics)

    # -- evaluation -------------------------------------------------------------------------------------------
    def infalign_initial_evaluate(self, global_step: int = 0) -> dict:
        """One evaluation before any update (step 0); skipped without an eval set or with --infalign.eval_at_start
        false. Returns the logs dict ({} when skipped). Best-checkpoint state is left alone."""
        if not getattr(self, "eval_dataloader", None):
            return {}
        at_start = getattr(getattr(self, "infalign", None), "eval_at_start", None)
        if at_start is None:  # the trainer's state decides; a bare args namespace (no state) is read as a fallback
            at_start = get(self.args, "infalign.eval_at_start", True)
        if isinstance(at_start, str):
            at_start = at_start.strip().lower() not in ("false", "0", "no", "off")
        if not at_start:
            return {}
        self._infalign_kl = 0.0 if global_step == 0 else self._infalign_kl
        self._infalign_kl_token_mean = 0.0 if global_step == 0 else self._infalign_kl_token_mean
        return self.evaluate(global_step, **self._infalign_eval_generate_kwargs())

    def _infalign_eval_generate_kwargs(self) -> dict:
        # Same derivation as upstream fit() does before calling evaluate().
        kwargs = dict(getattr(self, "generate_kwargs", {}) or {})
        kwargs["temperature"] = self.args.eval.temperature
        kwargs["n_samples_per_prompt"] = self.args.eval.n_samples_per_prompt
        return kwargs

    @torch.no_grad()
    def evaluate(self, global_step, **generate_kwargs):
        """Upstream's evaluate (generate eval samples, pass@k metrics, log_eval) plus InfAlign win rates."""
        # OpenRLHF's trainer modules are imported where used: the pure helpers above work without them loaded.
        from openrlhf.trainer.ppo_trainer import logger

        start = time.time()
        logger.info(f"⏰ Evaluation start time: {time.strftime('%Y-%m-%d %H:%M:%S')}")
        samples_list = self.samples_generator.generate_eval_samples(**generate_kwargs)
        logs = self.infalign_eval_logs(global_step, samples_list, generate_kwargs, self.eval_dataloader)

        if self.wandb_logger:
            self.wandb_logger.log_eval(global_step, logs)
        if self.tensorboard_logger:
            self.tensorboard_logger.log_eval(global_step, logs)
        took = str(timedelta(seconds=time.time() - start)).split(".")[0]
        logger.info(f"✨ Evaluation completed in {took}, global_step {global_step}, eval_metrics: {logs}")
        return logs

    def infalign_eval_logs(self, global_step, samples_list, generate_kwargs, eval_batches) -> dict:
        """Rewards, upstream's pass@k metrics and the InfAlign win rates of generated eval samples; logs nothing.

        ``eval_batches``: the eval dataloader, or any iterable of its (datasources, prompts, labels, images) batches
        (the async generator actor ships those, the training actor that scores and logs has no eval dataloader).
        """
        from openrlhf.trainer.ppo_trainer import compute_eval_metrics

        self._infalign_fill_rewards(samples_list)
        n = generate_kwargs.get("n_samples_per_prompt", self.args.eval.n_samples_per_prompt)
        logs = compute_eval_metrics(eval_batches, samples_list, n) if samples_list else {}
        logs.update(self._infalign_win_rates(global_step, samples_list, generate_kwargs))
        return logs

    def _infalign_fill_rewards(self, samples_list) -> None:
        """Score eval samples that came back without a reward with the local reward model actors.

        Upstream computes eval rewards only inside the rollout workers (remote RM URL / reward_func); with a local RM
        the samples carry rewards=None. Scored here in micro-batches of --rollout.micro_batch_size through the same
        ``reward_model_group`` ``forward`` the experience maker calls (``pad_sequence=True``, right padding).
        """
        todo = [s for s in samples_list if s.rewards is None]
        if not todo:
            return
        group = getattr(self, "reward_model_group", None)
        if group is None:
            raise ValueError(
                f"{len(todo)} eval sample(s) have no reward and there is no local reward model to score them: pass "
                "--reward.model_name_or_path, or --reward.remote_url (URL or reward_func .py)"
            )
        from openrlhf.trainer.ppo_utils.experience import Experience

        args = self.args
        effective = effective_actors(group)
        # async_run_method_batch needs at least one chunk per reward model actor.
        mb = max(1, min(int(args.rollout.micro_batch_size), math.ceil(len(todo) / effective)))
        batches = [todo[i : i + mb] for i in range(0, len(todo), mb)]
        pad_id = self.tokenizer.pad_token_id if getattr(self, "tokenizer", None) is not None else 0
        merged = [Experience.concat_experiences(b, pad_id) for b in batches]
        padded = merged + [merged[-1]] * max(0, effective - len(merged))
        duplicate = int(args.ds.ring_attn_size) * int(args.ds.tensor_parallel_size)
        results = forward(
            self.experience_maker,
            group,
            args.train.colocate_all,
            duplicate,
            len(batches),
            sequences=[m.sequences for m in padded],
            attention_mask=[m.attention_mask for m in padded],
            pad_sequence=[True] * len(padded),
        )
        for batch, scores in zip(batches, results):
            scores = torch.as_tensor(scores).float().reshape(-1)
            if scores.numel() != len(batch):
                raise ValueError(f"reward model returned {scores.numel()} rewards for {len(batch)} eval samples")
            for s, r in zip(batch, scores.tolist()):
                # Same layout as the rollout workers' rewards: a (1,) tensor, mirrored into info for upstream metrics.
                s.rewards = torch.tensor([r])
                s.info["reward"] = torch.tensor([r])

    def _infalign_eval_store(self):
        inf = getattr(self, "infalign", None)
        store = getattr(inf, "eval_store", None) or getattr(inf, "store", None)
        if isinstance(store, (str, os.PathLike)):
            store = ReferenceStore.open(store)
            inf.eval_store = store
        return store

    def _infalign_win_rates(self, global_step, samples_list, generate_kwargs) -> dict:
        store = self._infalign_eval_store()
        if store is None or not samples_list:
            return {}
        from openrlhf.trainer.ppo_trainer import logger

        args = self.args
        inf = getattr(self, "infalign", None)
        prompts, policy = group_rewards_by_prompt(samples_list)
        reference, _ = reference_rewards(store, prompts)
        on_missing = get(args, "infalign.on_missing", "error")
        result = win_rate_record(
            prompts,
            policy,
            reference,
            parse_ns(get(args, "infalign.eval_n"), "--infalign.eval_n"),
            on_missing=on_missing,
            store_name=str(getattr(store, "path", None) or "the eval store"),
        )
        if result["missing_prompts"]:
            logger.warning(f"InfAlign eval: {result['missing_prompts']} eval prompt(s) not in the eval store, skipped")
        kl_ctl = getattr(self, "kl_ctl", None)
        kl, kl_stderr, kl_reason = self._infalign_eval_kl(samples_list, generate_kwargs)
        estimator = KL_EVAL_ESTIMATOR if kl is not None else None
        if kl is None and int(global_step) == 0:
            kl, estimator = 0.0, "step0_reference"  # before any update the policy is the reference
        record = {
            "step": int(global_step),
            "kl": kl,
            "kl_stderr": kl_stderr,
            "kl_estimator": estimator,
            "kl_reason": kl_reason,
            "kl_rollout": self._infalign_kl,
            "kl_token_mean": self._infalign_kl_token_mean,
            "inference": _spec(getattr(inf, "inference", None) or get(args, "infalign.inference")),
            "objective": getattr(inf, "objective", None),
            # An eval-only state (plain reward) has no transform: null, not the unused flag default "auto".
            "transform": _spec(
                getattr(inf, "transform", None) if inf is not None else get(args, "infalign.transform")
            ),
            "beta": float(kl_ctl.value) if kl_ctl is not None else get(args, "algo.kl.init_coef"),
            # The plan the run trains toward (report marks it beside where the run is).
            "kl_budget": getattr(inf, "kl_budget", None),
            "planned_beta": getattr(inf, "beta", None),
            "k": getattr(inf, "k", None),
            "temperature": generate_kwargs.get("temperature"),
            "num_prompts": result["num_prompts"],
            "num_samples_per_prompt": int(min(len(p) for p in policy)),
            "missing_prompts": result["missing_prompts"],
            "standard": result["standard"],
            "bon": result["bon"],
            "won": result["won"],
            "time": time.time(),
        }
        out_dir = get(args, "ckpt.output_dir")
        if out_dir:
            append_record(os.path.join(out_dir, EVAL_LOG), record)
        logs = metric_logs(result)
        if kl is not None:
            logs[f"{METRIC_PREFIX}kl"] = kl
        if self._infalign_kl is not None:
            logs[f"{METRIC_PREFIX}kl_rollout"] = self._infalign_kl
        return logs

    def _infalign_eval_kl(self, samples_list, generate_kwargs) -> tuple[float | None, float | None, str | None]:
        """(sequence KL of the evaluated policy on its eval samples, its standard error, None) or (None, None, why
        it is not measured).

        The actor and reference log-probs come from upstream's ``make_experience`` calls: micro-batches of
        --rollout.micro_batch_size merged by ``Experience.concat_experiences``, ``forward`` dispatched to
        ``actor_model_group`` and ``reference_model_group`` (at least one chunk per effective actor).
        """
        args = self.args
        ref_group = getattr(self, "reference_model_group", None)
        actor_group = getattr(self, "actor_model_group", None)
        if ref_group is None or actor_group is None:
            return None, None, "no reference model (--algo.kl.init_coef 0): KL(pi || pi_ref) is not measured"
        temps = (generate_kwargs.get("temperature"), get(args, "rollout.temperature", 1.0))
        if temps[0] is not None and float(temps[0]) != float(temps[1]):
            return None, None, (
                f"--eval.temperature {temps[0]:g} differs from --rollout.temperature {temps[1]:g}: eval samples are "
                "not drawn from the policy whose log-probs the actor returns"
            )
        from openrlhf.trainer.ppo_utils.experience import Experience

        maker = self.experience_maker
        mb = max(1, int(get(args, "rollout.micro_batch_size", 1)))
        batches = [samples_list[i : i + mb] for i in range(0, len(samples_list), mb)]
        pad_id = self.tokenizer.pad_token_id if getattr(self, "tokenizer", None) is not None else 0
        merged = [Experience.concat_experiences(b, pad_id) for b in batches]
        need = max(effective_actors(actor_group), effective_actors(ref_group))
        padded = merged + [merged[-1]] * max(0, need - len(merged))
        kwargs = dict(
            sequences=[m.sequences for m in padded],
            action_mask=[m.action_mask for m in padded],
            attention_mask=[m.attention_mask for m in padded],
        )
        sync = bool(get(args, "train.colocate_all", False) or get(args, "train.colocate_actor_ref", False))
        duplicate = int(get(args, "ds.ring_attn_size", 1)) * int(get(args, "ds.tensor_parallel_size", 1))
        log_probs = forward(maker, actor_group, sync, duplicate, len(merged), **kwargs)
        ref_log_probs = forward(maker, ref_group, sync, duplicate, len(merged), **kwargs)
        values = sequence_kl_values(log_probs, ref_log_probs, [m.action_mask for m in merged])
        prompts = [p for m in merged for p in m.prompts]
        return (float(values.mean()) if values.size else None), kl_stderr(values, prompts), None


def sequence_kl_values(log_probs, ref_log_probs, action_masks) -> np.ndarray:
    """k1 sequence KL of each sample: sum over its response tokens of log pi - log pi_ref.

    Each argument: per micro-batch a (B, A) tensor (action log-probs of policy / reference, the action mask).
    """
    out = []
    for lp, ref, mask in zip(log_probs, ref_log_probs, action_masks):
        mask = torch.as_tensor(mask).float()
        diff = torch.as_tensor(lp).float() - torch.as_tensor(ref).float()
        out.append((diff * mask).sum(-1).double().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def eval_sequence_kl(log_probs, ref_log_probs, action_masks) -> float | None:
    """k1 sequence KL: per sample, sum over response tokens of log pi - log pi_ref; mean over samples."""
    values = sequence_kl_values(log_probs, ref_log_probs, action_masks)
    return float(values.mean()) if values.size else None


def kl_stderr(values: np.ndarray, prompts: Sequence[str]) -> float | None:
    """Standard error of the mean k1 KL given the eval prompts: sqrt(sum_p n_p s_p^2) / n, with s_p^2 the sample
    variance among prompt p's eval samples (the error of the estimate of the KL on THESE prompts; None when no
    prompt has two samples)."""
    groups: dict = {}
    for v, p in zip(np.asarray(values, dtype=float).tolist(), prompts):
        groups.setdefault(p, []).append(v)
    spread = [(len(g), np.var(g, ddof=1)) for g in groups.values() if len(g) > 1]
    if not spread or len(values) != len(prompts):
        return None
    return float(math.sqrt(sum(n * var for n, var in spread)) / sum(n for n, _ in spread))


def sequence_kl(experiences) -> float | None:
    """Mean over samples of the sequence-level KL estimate: info["kl"] (per-token mean) x response tokens."""
    total, count = 0.0, 0
    for e in experiences:
        kl = e.info.get("kl") if isinstance(e.info, dict) else None
        if kl is None or e.action_mask is None:
            continue
        tokens = e.action_mask.float().sum(-1).reshape(-1)
        kl = torch.as_tensor(kl).float().reshape(-1)
        if kl.numel() != tokens.numel():
            continue
        total += float((kl * tokens).sum())
        count += tokens.numel()
    return total / count if count else None
