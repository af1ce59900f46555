"""The CTRL reward wrapper: calibrate each sample's reward against the reference store, then transform it.

Where it runs. OpenRLHF 0.11.2 has three reward paths (local reward-model actors in
``RemoteExperienceMaker.make_experience``; a remote HTTP RM or a ``reward_func`` .py inside the vLLM rollout
actors). All three have filled ``experience.rewards`` when ``RemoteExperienceMaker.compute_advantages_and_returns``
starts, and nothing has touched them yet: length penalties, group baselines (rloo / reinforce_baseline / group_norm
/ dr_grpo), ``--reward.clip_range`` and the KL penalty all come after. That is the seam: the trainer subclass
(:mod:`.trainer`) or the source patch (``adapter/patches/``) calls :meth:`CTRLRewardWrapper.wrap_experiences` there, so
every advantage estimator trains on Phi(C(x, y)) in place of r(x, y).

What it does, per rollout batch (vectorised over ALL experiences: one store lookup, no Python loop per sample):
raw reward r -> calibrated u = C(x, y) in [0, 1] (mid-rank among the prompt's K reference rewards) ->
transformed Phi(u) in [0, 1]. The reward tensor keeps its shape ((B,) or (B, 1)) and device; its dtype is promoted
to at least float32 exactly as upstream does next. Per-sample ``infalign/raw_reward``, ``infalign/calibrated``,
``infalign/transformed`` go into ``experience.info``, which the policy actor reduces and logs with its own metrics
(wandb / tensorboard ``train/infalign/...``).
Upstream then re-syncs ``info["reward"]`` to the reward trained on (after its length penalties), so its ``reward``
and ``rollout/reward_mean`` read in transformed units; ``infalign/raw_reward`` keeps the reward model's.

The direct objective (:class:`DirectRewardWrapper`, ``infalign.direct``) shares that calibration path and replaces
the transform by a per-group step: each prompt's n calibrated rewards become the unbiased group estimator's rewards
for the Best-/Worst-of-N win rate with its leave-one-out baseline (``core.direct.group_rewards``). Groups are
upstream's: ``experience.index`` orders the batch, consecutive blocks of ``--rollout.n_samples_per_prompt`` are a
prompt's samples (``compute_advantages_and_returns`` groups the same way right after us).

Plugin protocol: :mod:`.registry` (entry-point group ``openrlhf.reward_wrappers``). This module's factories are
``infalign.ctrl`` (calibrate + transform), ``infalign.calibrate`` (identity transform: the paper's calibration
baseline) and ``infalign.direct`` (calibrate + the group estimator); :mod:`.build` reads their arguments.
"""

from __future__ import annotations

import logging
from itertools import chain
from typing import Optional, Sequence

import numpy as np
import torch

from openrlhf_infalign.adapter.build import ctrl_settings, direct_settings
from openrlhf_infalign.adapter.flags import add_infalign_arguments
from openrlhf_infalign.core.direct import group_rewards
from openrlhf_infalign.store.format import DIGEST_BYTES, prompt_digests, prompt_key

__all__ = [
    "CTRLRewardWrapper",
    "DirectRewardWrapper",
    "MissingPromptError",
    "make_ctrl_wrapper",
    "make_calibrate_wrapper",
    "make_direct_wrapper",
    "INFO_RAW",
    "INFO_CALIBRATED",
    "INFO_TRANSFORMED",
    "INFO_DIRECT",
    "INFO_MISSING",
]

logger = logging.getLogger("openrlhf_infalign")

INFO_RAW = "infalign/raw_reward"
INFO_CALIBRATED = "infalign/calibrated"
INFO_TRANSFORMED = "infalign/transformed"
INFO_DIRECT = "infalign/direct"  # the direct objective's per-sample reward (group estimator minus its baseline)
INFO_MISSING = "infalign/missing"  # only logged with --infalign.on_missing raw: fraction of samples kept raw

# Bounds of the prompt -> digest cache: it only has to span a rollout batch (each prompt comes n_samples_per_prompt
# times), while a whole training set of long chat prompts would hold gigabytes of strings.
_KEY_CACHE_ENTRIES = 1 << 17
_KEY_CACHE_CHARS = 1 << 26
_SHOW_PROMPT = 300  # characters of a prompt quoted in an error


class MissingPromptError(LookupError):
    """A training prompt has no reference rewards in the store (``--infalign.on_missing error``)."""


class CTRLRewardWrapper:
    """Calibrate-and-transform rewards against a reference store; usable with or without Ray/OpenRLHF.

    ``store``: an opened :class:`openrlhf_infalign.store.ReferenceStore` (picklable by value, so the wrapper ships
    through Ray to the trainer actor with its data). ``transform``: a callable [0, 1] -> [0, 1] on float64 arrays
    (:mod:`openrlhf_infalign.core.transforms`). ``inference``, ``beta``, ``kl_budget``: the plan the transform
    comes from (an ``InferenceProcedure``, the effective KL coefficient beta in force, the KL budget in nats; None
    when not planned), read by the logs and the evaluation hook. ``kl_coef``: the ``--algo.kl.init_coef`` in force
    (beta converted for the advantage estimator); ``k``: the store's median K the plan was made for.
    ``on_missing``: ``"error"`` (a prompt absent from the store stops training, naming its key and text) or ``"raw"``
    (such samples keep their raw reward; a warning counts them).

    Subclasses change only :meth:`rewards_from_calibrated` (what the calibrated rewards become), ``objective`` and
    ``info_key``; store lookup, missing prompts, shapes, dtypes and logs stay this class's.
    """

    objective = "ctrl"  # what the run optimises, as the eval log records it
    info_key = INFO_TRANSFORMED  # the experience.info key of the reward trained on
    needs_index = False  # whether rewards_from_calibrated needs upstream's sample order (experience.index)

    def __init__(
        self,
        store,
        transform,
        inference=None,
        beta: Optional[float] = None,
        kl_budget: Optional[float] = None,
        on_missing: str = "error",
        name: str = "infalign.ctrl",
        kl_coef: Optional[float] = None,
        k: Optional[int] = None,
    ):
        if on_missing not in ("error", "raw"):
            raise ValueError(f"on_missing must be 'error' or 'raw', got {on_missing!r}")
        self.store = store
        self.transform = transform
        self.inference = inference
        self.beta = beta
        self.kl_budget = kl_budget
        self.kl_coef = kl_coef
        self.k = k
        self.on_missing = on_missing
        self.name = name
        self._digest_cache: dict[str, bytes] = {}
        self._digest_cache_chars = 0  # characters of the prompts the cache holds

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_digest_cache"], state["_digest_cache_chars"] = {}, 0  # a cache, not data: never ship it
        return state

    def __repr__(self) -> str:
        spec = getattr(self.transform, "spec", self.transform)
        return f"CTRLRewardWrapper(name={self.name!r}, transform={spec!r}, on_missing={self.on_missing!r})"

    # ── keys ──

    def prompt_digests(self, prompts: Sequence[str]) -> np.ndarray:
        """(B, 20) uint8 digests of the prompts (``store.format.prompt_digests``); each distinct prompt is hashed once
        while it stays in the cache: a prompt comes n_samples_per_prompt times per batch. The cache is bounded in
        entries and characters; when this batch's new prompts would overflow it, it starts over with this batch."""
        cache = self._digest_cache
        new = {p: None for p in prompts if p not in cache}  # distinct, in order
        if new:
            chars = sum(map(len, new))
            if len(cache) + len(new) > _KEY_CACHE_ENTRIES or self._digest_cache_chars + chars > _KEY_CACHE_CHARS:
                cache.clear()
                new = dict.fromkeys(prompts)
                chars = sum(map(len, new))
                self._digest_cache_chars = 0
            self._digest_cache_chars += chars
            blob = prompt_digests(new).tobytes()
            cache.update(zip(new, [blob[i : i + DIGEST_BYTES] for i in range(0, len(blob), DIGEST_BYTES)]))
        return np.frombuffer(b"".join([cache[p] for p in prompts]), dtype=np.uint8).reshape(-1, DIGEST_BYTES)

    # ── the core call ──

    def __call__(self, prompts: Sequence[str], rewards, index: Optional[np.ndarray] = None) -> tuple:
        """Wrap one batch. Returns (new_rewards, info).

        ``rewards``: torch tensor or array of shape (B,) or (B, 1), one per prompt. ``new_rewards`` has the same
        type, shape and device (torch dtype promoted to >= float32, as OpenRLHF does next). ``info`` maps
        ``infalign/raw_reward``, ``infalign/calibrated``, ``info_key`` (and ``infalign/missing`` in raw mode) to
        float32 (B,) tensors on the rewards' device. ``index``: each sample's position in upstream's order
        (``experience.index``; None: the given order), read by subclasses that need groups.
        """
        is_torch = isinstance(rewards, torch.Tensor)
        raw_t = rewards if is_torch else torch.as_tensor(np.asarray(rewards))
        if raw_t.dim() == 2 and raw_t.shape[1] == 1:
            flat = raw_t.reshape(-1)
        elif raw_t.dim() == 1:
            flat = raw_t
        else:
            raise ValueError(f"rewards must have shape (B,) or (B, 1), got {tuple(raw_t.shape)}")
        if flat.shape[0] != len(prompts):
            raise ValueError(f"{flat.shape[0]} rewards for {len(prompts)} prompts: each sample needs its prompt")
        raw = flat.detach().to("cpu", torch.float64).numpy()

        digests = self.prompt_digests(prompts)
        calibrated = np.asarray(self.store.calibrate(digests, raw, on_missing="raw"), dtype=np.float64)
        missing = np.isnan(calibrated)
        n_missing = int(missing.sum())
        if n_missing:
            self._handle_missing(prompts, missing, n_missing)
        trained = self.rewards_from_calibrated(calibrated, missing if n_missing else None, digests, index)
        if n_missing:
            # Raw mode: keep r for prompts the store lacks; log it in both columns so the means stay finite.
            trained = np.where(missing, raw, trained)
            calibrated = np.where(missing, raw, calibrated)

        out_dtype = torch.promote_types(raw_t.dtype, torch.float32)
        new = torch.from_numpy(np.asarray(trained, dtype=np.float64)).to(device=raw_t.device, dtype=out_dtype)
        new = new.reshape(raw_t.shape)
        dev = raw_t.device
        info = {
            INFO_RAW: flat.detach().to(device=dev, dtype=torch.float32).clone(),
            INFO_CALIBRATED: torch.from_numpy(calibrated.astype(np.float32)).to(dev),
            self.info_key: torch.from_numpy(np.asarray(trained, dtype=np.float32)).to(dev),
        }
        if self.on_missing == "raw":
            info[INFO_MISSING] = torch.from_numpy(missing.astype(np.float32)).to(dev)
        if not is_torch:
            new = new.numpy()
        return new, info

    def rewards_from_calibrated(self, calibrated: np.ndarray, missing, digests, index) -> np.ndarray:
        """Phi(u) per sample (float64 (B,)); ``missing`` (a mask, or None) marks samples whose u is NaN, which
        ``__call__`` gives their raw reward afterwards."""
        if missing is None:
            return self.transform(calibrated)
        out = np.full_like(calibrated, np.nan)
        out[~missing] = self.transform(calibrated[~missing])
        return out

    def _handle_missing(self, prompts, missing: np.ndarray, n_missing: int) -> None:
        first = int(np.flatnonzero(missing)[0])
        prompt = prompts[first]
        key = prompt_key(prompt)
        shown = prompt if len(prompt) <= _SHOW_PROMPT else prompt[:_SHOW_PROMPT] + "..."
        where = getattr(self.store, "path", None) or getattr(self.store, "directory", None) or "the reference store"
        if self.on_missing == "error":
            raise MissingPromptError(
                f"{self.name}: prompt key {key} is not in {where} ({n_missing} of {len(prompts)} samples in this "
                f"batch lack reference rewards). Prompt text: {shown!r}. The key is sha1 of the exact templated "
                "prompt OpenRLHF sees (Experience.prompts): build the store with `infalign calibrate` on the same "
                "prompt dataset and --data.input_template / --data.apply_chat_template settings, or pass "
                "--infalign.on_missing raw to train those samples on their raw reward."
            )
        n_prompts = len({prompts[i] for i in np.flatnonzero(missing).tolist()})
        logger.warning(
            "%s: %d prompt(s) (%d of %d samples) have no reference rewards (first: key %s, prompt %r); they keep "
            "their raw reward, on the reward model's scale and not in [0, 1] like the calibrated rewards they are "
            "trained with (--infalign.on_missing raw)",
            self.name,
            n_prompts,
            n_missing,
            len(prompts),
            key,
            shown[:80],
        )

    # ── the OpenRLHF seam ──

    def wrap_experiences(self, experiences: list) -> list:
        """Replace ``experience.rewards`` by Phi(C(x, y)) for a whole rollout batch, in place; returns it.

        Called at the start of ``RemoteExperienceMaker.compute_advantages_and_returns``. All experiences of the
        batch go through one store lookup (vectorised), then are split back.
        """
        if not experiences:
            return experiences
        rewards = [exp.rewards for exp in experiences]
        for i, r in enumerate(rewards):
            if r is None:
                raise ValueError(f"{self.name}: experience {i} has no rewards (no reward model / reward_func ran)")
        # Per-experience torch calls cost microseconds each: touch every experience as little as possible.
        prompts = list(chain.from_iterable(exp.prompts for exp in experiences))
        sizes = [r.shape[0] for r in rewards]
        dims = {r.dim() for r in rewards}
        if len(prompts) != sum(sizes) or not (dims == {1} or (dims == {2} and all(r.shape[1] == 1 for r in rewards))):
            for i, (exp, r) in enumerate(zip(experiences, rewards)):
                if len(exp.prompts) != r.shape[0] or r.dim() > 2 or (r.dim() == 2 and r.shape[1] != 1):
                    raise ValueError(
                        f"{self.name}: experience {i} has rewards of shape {tuple(r.shape)} for "
                        f"{len(exp.prompts)} prompts; expected (B,) or (B, 1)"
                    )
            rewards = [r.reshape(-1) for r in rewards]  # mixed (B,) and (B, 1) in one batch: flatten each
        all_rewards = torch.cat(rewards) if len(rewards) > 1 else rewards[0]
        index = self._batch_index(experiences, len(prompts)) if self.needs_index else None
        new, info = self(prompts, all_rewards, index)
        new_parts = new.split(sizes)
        info_parts = [(k, v.split(sizes)) for k, v in info.items()]
        mixed = len(dims) > 1
        for i, exp in enumerate(experiences):
            exp.rewards = new_parts[i].reshape(exp.rewards.shape) if mixed else new_parts[i]
            for k, parts in info_parts:
                exp.info[k] = parts[i]
        return experiences

    def _batch_index(self, experiences: list, size: int) -> np.ndarray:
        """Every sample's position in upstream's order: ``experience.index``, set by ``split_rollout_samples``.
        One C-level pass over the batch; the experience at fault is looked for only when it fails."""
        parts = [exp.index for exp in experiences]
        try:
            index = np.fromiter(chain.from_iterable(parts), dtype=np.int64)
        except TypeError:  # an index of None
            index = None
        if index is None or index.size != size:
            for i, (exp, part) in enumerate(zip(experiences, parts)):
                if part is None or len(part) != len(exp.prompts):
                    raise ValueError(
                        f"{self.name}: experience {i} has no sample index for its {len(exp.prompts)} samples "
                        "(experience.index, which OpenRLHF's split_rollout_samples sets): its prompt groups are unknown"
                    )
        return index


class DirectRewardWrapper(CTRLRewardWrapper):
    """The direct objective: calibrate against the store, then replace each prompt group's n calibrated rewards by
    the unbiased group estimator's rewards for the Best-of-N (Worst-of-N) win rate minus the leave-one-out
    baseline (``core.direct.group_rewards``, module docstring there). Trained at its own KL coefficient
    (``core.direct.direct_kl_coef``), not a transform's.

    ``n``: ``--rollout.n_samples_per_prompt``, the group size (> N). ``coef``: the coefficient on the direct reward
    the run trains at (``--algo.kl.init_coef`` / the estimator's reward scale; None when no fixed one applies).
    Other arguments as :class:`CTRLRewardWrapper` (no transform).
    """

    objective = "direct"
    info_key = INFO_DIRECT
    needs_index = True

    def __init__(
        self,
        store,
        inference,
        n: int,
        coef: Optional[float] = None,
        name: str = "infalign.direct",
        baseline: str = "loo",
        **kw,
    ):
        super().__init__(store, transform=None, inference=inference, name=name, **kw)
        self.n = int(n)
        self.coef = coef
        self.baseline = baseline  # "none" has no flag: core.direct's other form, for the composition tests
        group_rewards(np.full((1, self.n), 0.5), inference, baseline)  # refuses n <= N now, not at the first batch

    def __repr__(self) -> str:
        spec = getattr(self.inference, "spec", self.inference)
        return (
            f"DirectRewardWrapper(name={self.name!r}, inference={spec!r}, n={self.n}, on_missing={self.on_missing!r})"
        )

    def rewards_from_calibrated(self, calibrated: np.ndarray, missing, digests, index) -> np.ndarray:
        """Group rewards in upstream's grouping: sample i is at position index[i]; positions g*n .. g*n+n-1 are a
        prompt's group. A group whose prompt is missing (raw mode) gets NaN, then its raw rewards."""
        size, n = calibrated.shape[0], self.n
        if size % n:
            raise ValueError(
                f"{self.name}: a rollout batch of {size} samples does not split into prompt groups of "
                f"--rollout.n_samples_per_prompt {n}: the direct estimator needs every prompt's n samples together"
            )
        if index is None:
            perm = None
        else:
            if index.shape != (size,) or index.min(initial=0) < 0 or index.max(initial=0) >= size:
                raise ValueError(f"{self.name}: sample positions (experience.index) are not 0..{size - 1}")
            perm = np.empty(size, dtype=np.int64)
            perm[index] = np.arange(size)  # upstream's rewards[index] = rewards: position -> sample
            if np.bincount(index, minlength=size).max() > 1:
                raise ValueError(f"{self.name}: sample positions (experience.index) repeat within one batch")
        u = calibrated if perm is None else calibrated[perm]
        groups = (digests if perm is None else digests[perm]).reshape(-1, n, DIGEST_BYTES)
        mixed = (groups != groups[:, :1]).any(axis=(1, 2))
        if mixed.any():
            g = int(np.flatnonzero(mixed)[0])
            raise ValueError(
                f"{self.name}: prompt group {g} (positions {g * n}..{g * n + n - 1} in OpenRLHF's order) holds "
                f"samples of different prompts: the direct estimator needs each prompt's "
                f"--rollout.n_samples_per_prompt {n} samples consecutive, as OpenRLHF's generator emits them"
            )
        u = u.reshape(-1, n)
        if missing is None:
            r = group_rewards(u, self.inference, self.baseline)
        else:
            ok = ~(missing if perm is None else missing[perm]).reshape(-1, n)[:, 0]  # a prompt's group misses whole
            r = np.full_like(u, np.nan)
            r[ok] = group_rewards(u[ok], self.inference, self.baseline)
        r = r.reshape(-1)
        return r if index is None else r[index]


# ── entry-point factories (group openrlhf.reward_wrappers) ──


def make_ctrl_wrapper(args) -> CTRLRewardWrapper:
    """``infalign.ctrl``: calibrate against ``--infalign.store``, then apply ``--infalign.transform``."""
    return CTRLRewardWrapper(**ctrl_settings(args, name="infalign.ctrl"))


def make_calibrate_wrapper(args) -> CTRLRewardWrapper:
    """``infalign.calibrate``: calibrated reward only (identity transform), the paper's calibration baseline."""
    return CTRLRewardWrapper(**ctrl_settings(args, name="infalign.calibrate", transform_spec="identity"))


def make_direct_wrapper(args) -> DirectRewardWrapper:
    """``infalign.direct``: calibrate against ``--infalign.store``, then the group estimator of the
    ``--infalign.inference`` win rate with its leave-one-out baseline, at its planned KL coefficient."""
    return DirectRewardWrapper(**direct_settings(args, name="infalign.direct"))


# The source patch registers each factory's flags on upstream's own parser.
make_ctrl_wrapper.add_arguments = add_infalign_arguments
make_calibrate_wrapper.add_arguments = add_infalign_arguments
make_direct_wrapper.add_arguments = add_infalign_arguments
