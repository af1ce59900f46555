"""The calibration job: K samples of the base policy per training prompt, scored by the training reward source.

It builds the reference reward store CTRL's calibration looks up during RL, in four phases:

1. plan the work: the prompts (OpenRLHF's dataset code), their keys, and the hash of every setting that shapes the
   store; a store already published with that hash makes the run a no-op;
2. generate and score, shard by shard, into ``OUT.partial/`` (a re-run with the same hash skips finished shards and
   refuses a work dir made with other settings; a kill loses at most the shards in flight);
3. assemble the shards, in order, into one columnar table;
4. publish the store atomically with ``write_store`` and remove the work dir.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

from openrlhf_infalign.adapter.run_record import RECORD_KEY, run_record
from openrlhf_infalign.files import write_json
from openrlhf_infalign.store import StoreError, read_manifest, write_store
from openrlhf_infalign.store.commit import check_target

from .generate import make_generator
from .prompts import load_prompts, load_tokenizer, unique_prompts
from .score import RewardModelActors, check_finite, make_scorer
from .settings import CalibrateSettings, CalibrationError
from .shards import SHARD_FORMAT, WORK_SUFFIX, assemble, shard_done, write_shard

__all__ = ["WorkPlan", "plan_work", "run_calibration", "FAIL_AFTER_ENV"]

#: Test hook: raise after this many shards have been written in this run (simulates a kill between shards).
FAIL_AFTER_ENV = "INFALIGN_CALIBRATE_FAIL_AFTER_SHARDS"


def _file_fingerprint(path: str) -> Dict:
    """Identity of a model/file for the settings hash: path plus config/weights sizes (not contents: too slow)."""
    p = Path(path)
    if p.is_file():
        return {"path": str(p.resolve()), "sha1": hashlib.sha1(p.read_bytes()).hexdigest()}
    if not p.exists():
        return {"path": path}  # a hub name or URL
    files = {}
    for f in sorted(p.iterdir()):
        if f.suffix in (".json", ".safetensors", ".bin", ".jinja", ".model"):
            files[f.name] = f.stat().st_size
    cfg = p / "config.json"
    return {
        "path": str(p.resolve()),
        "config_sha1": hashlib.sha1(cfg.read_bytes()).hexdigest() if cfg.exists() else None,
        "files": files,
    }


def _canonical_hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _describe_reward_source(s: CalibrateSettings) -> Dict:
    if s.reward_model:
        return {
            "kind": "reward_model",
            "model": _file_fingerprint(s.reward_model),
            "normalize_reward": s.normalize_reward,
            "value_head_prefix": s.value_head_prefix,
            "param_dtype": s.param_dtype,
        }
    if s.reward_kind == "reward_func":
        return {"kind": "reward_func", "file": _file_fingerprint(s.reward_urls[0])}
    return {"kind": "remote_url", "urls": s.reward_urls}


def _check_max_len(settings: CalibrateSettings) -> None:
    # vLLM refuses (after a minute of engine start-up) and HF degrades past the policy's positions: fail early.
    from transformers import AutoConfig

    try:
        limit = getattr(AutoConfig.from_pretrained(settings.policy, trust_remote_code=True), "max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return
    if limit and settings.max_len > limit:
        raise CalibrationError(
            f"--data.max_len {settings.max_len} exceeds the policy's max_position_embeddings {limit} "
            f"({settings.policy}); pass --data.max_len {limit} or less (and the same to train_ppo_ray)"
        )


@dataclass
class WorkPlan:
    """What a run will produce: its distinct prompts, their shards, and the hash of the settings that shape them.

    ``hashed`` holds exactly what ``settings_hash`` covers; its layout is part of the work dir and store format (a
    resumed run finds its shards by this hash), so change it only together with a format bump.
    """

    settings: CalibrateSettings
    tokenizer: object
    prompts: List[str]
    labels: list
    keys: List[str]
    duplicates: int
    dataset: Dict
    hashed: Dict
    record: Dict  # the run record (run_record.py), written into the manifest
    settings_hash: str
    shards: list  # (index, slice of prompts)

    @property
    def out(self) -> Path:
        return Path(self.settings.out)

    @property
    def work(self) -> Path:
        return Path(str(self.out) + WORK_SUFFIX)  # "refs/" -> "refs.partial"


def plan_work(settings: CalibrateSettings, log: Callable[[str], None]) -> WorkPlan:
    tokenizer = load_tokenizer(settings)
    _check_max_len(settings)
    all_prompts, all_labels = load_prompts(settings, tokenizer)
    prompts, labels, keys, dups = unique_prompts(all_prompts, all_labels)
    if dups:
        log(f"{dups} duplicate prompt(s) in the dataset: calibrating each distinct prompt once ({len(prompts)})")
    record = run_record(settings.flag, tokenizer=tokenizer)
    hashed = {
        "policy": _file_fingerprint(settings.policy),
        "reward_source": _describe_reward_source(settings),
        "sampling": {
            "backend": settings.backend,
            "k": settings.k,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "top_k": -1,
            "max_new_tokens": settings.max_new_tokens,
            "min_new_tokens": 1,
            "max_len": settings.max_len,
            "seed": settings.seed,
        },
        "template": record["template"],
        "shard_size": settings.shard_size,
        "prompt_keys_sha1": hashlib.sha1("".join(keys).encode()).hexdigest(),
    }
    dataset = {
        "prompt_dataset": settings.prompt_dataset,
        "prompt_probs": settings.prompt_probs,
        "prompt_split": settings.prompt_split,
        "max_samples": settings.max_samples,
        "label_key": settings.label_key,
        "rows": len(all_prompts),
        "distinct_prompts": len(prompts),
    }
    S = settings.shard_size
    shards = [(i, slice(i * S, min((i + 1) * S, len(prompts)))) for i in range(math.ceil(len(prompts) / S))]
    return WorkPlan(
        settings=settings,
        tokenizer=tokenizer,
        prompts=prompts,
        labels=labels,
        keys=keys,
        duplicates=dups,
        dataset=dataset,
        hashed=hashed,
        record=record,
        settings_hash=_canonical_hash(hashed),
        shards=shards,
    )


def _inputs(settings: CalibrateSettings) -> list[str]:
    """The job's local inputs (policy, datasets, reward model or reward_func file): the store may never be written
    over or around one of them. Hub ids and URLs do not exist locally and are skipped by the check."""
    datasets = [part.split("@")[0].strip() for part in (settings.prompt_dataset or "").split(",")]
    return [settings.policy, settings.reward_model, *settings.reward_urls, *datasets]


def check_out(settings: CalibrateSettings) -> None:
    """--out and its work dir, before any model or dataset is loaded: what commit.check_target allows (a new or
    empty directory, or a store of ours; never a file, a folder with other content, or around an input), and a
    work dir OUT.partial that is ours (settings.json and shards) or absent. Whether an existing store may be
    replaced is decided once the settings hash is known (_published)."""
    out = Path(settings.out)
    check_target(out, overwrite=True, inputs=_inputs(settings))
    work = Path(str(out) + WORK_SUFFIX)
    if work.exists():
        foreign = (
            [p.name for p in work.iterdir() if not (p.name == "settings.json" or p.name.startswith(("shard-", ".")))]
            if work.is_dir()
            else [work.name]
        )
        if foreign:
            raise CalibrationError(
                f"{work} is where `infalign calibrate --out {out}` keeps its shards, but it holds other files "
                f"({', '.join(sorted(foreign)[:5])}); move them away or choose another --out"
            )


def _published(plan: WorkPlan, log: Callable[[str], None]) -> bool:
    """True when OUT is a store from these very settings (and clears a work dir a kill left behind)."""
    out, work = plan.out, plan.work
    if not out.exists() or plan.settings.overwrite:
        return False
    try:
        done_hash = (read_manifest(out).get("calibration") or {}).get("settings_hash")
    except (StoreError, OSError, ValueError):
        done_hash = None
    if done_hash == plan.settings_hash:
        if work.exists():
            shutil.rmtree(work)
        log(f"{out}: already calibrated with these settings ({len(plan.prompts)} prompts); nothing to do")
        return True
    raise CalibrationError(
        f"{out} already exists (made with other settings or not by `infalign calibrate`); "
        "pass --overwrite to replace it, or choose another --out"
    )


def _open_work_dir(plan: WorkPlan, log: Callable[[str], None]) -> list:
    """Make or reuse OUT.partial/ for this plan; returns the shards still to generate."""
    work, hashed = plan.work, plan.hashed
    if work.exists():
        try:
            old = json.loads((work / "settings.json").read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        if old.get("settings_hash") != plan.settings_hash:
            # Only finished shards are worth protecting; a work dir without any is simply restarted.
            if not plan.settings.overwrite and any(work.glob("shard-*.json")):
                old_hashed = old.get("settings") or {}
                diffs = sorted(k for k in hashed if _canonical_hash(hashed[k]) != _canonical_hash(old_hashed.get(k)))
                raise CalibrationError(
                    f"work dir {work} holds shards made with different settings (differs in: "
                    f"{', '.join(diffs) or 'unknown'}); rerun with the original flags to resume, or pass --overwrite "
                    "to discard them"
                )
            shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    for tmp in work.glob(".*.tmp*"):  # half-written files of a killed run: never read, just clear them
        tmp.unlink(missing_ok=True)
    work_meta = {"settings_hash": plan.settings_hash, "settings": hashed, "num_prompts": len(plan.prompts)}
    write_json(work / "settings.json", work_meta, indent=1, default=str)
    todo = [(i, sl) for i, sl in plan.shards if not shard_done(work, i, plan.settings_hash, plan.keys[sl])]
    if len(todo) < len(plan.shards):
        log(f"resuming from {work}: {len(plan.shards) - len(todo)} of {len(plan.shards)} shard(s) already done")
    return todo


def _generate_and_score(plan: WorkPlan, todo: list, placement: Dict) -> tuple[float, float]:
    """Each shard still to do: K samples per prompt, their rewards, checked, written; returns (generate_s, score_s).

    ``placement`` gets the Ray node of each engine and reward-model actor when the RM runs in actors.
    """
    from tqdm import tqdm

    s = plan.settings
    fail_after = int(os.environ.get(FAIL_AFTER_ENV, "0") or 0)
    run_id = uuid.uuid4().hex[:12]
    gen_s = score_s = 0.0
    generator = make_generator(s, plan.tokenizer)
    scorer = None
    source = s.reward_model or s.reward_url
    done_prompts = len(plan.prompts) - sum(sl.stop - sl.start for i, sl in todo)
    bar = tqdm(total=len(plan.prompts), initial=done_prompts, desc="calibrate", unit="prompt", disable=not s.progress)
    n_written = 0
    try:
        scorer = make_scorer(s, plan.tokenizer)
        pipelined = isinstance(scorer, RewardModelActors)
        if pipelined:
            placement["engines"] = generator.node_ids()
            placement["reward_model_actors"] = list(scorer.node_ids)
        for n_written, (i, sl) in enumerate(todo):
            if fail_after and n_written >= fail_after:
                raise RuntimeError(f"{FAIL_AFTER_ENV}={fail_after}: stopping after {n_written} shard(s) (test hook)")
            sp, sl_labels, sk = plan.prompts[sl], plan.labels[sl], plan.keys[sl]
            shard_t0 = ts = time.time()
            if pipelined:  # generation and scoring overlap: one wall time for both
                refs = generator.submit(sp, sl_labels)
                rewards = scorer.score_refs(refs, progress=bar.update)
                for ref in refs:
                    generator.done(ref)
                gen_s += time.time() - ts
            else:
                samples = generator.generate(sp, sl_labels, seed=s.seed * 1_000_003 + i, progress=bar.update)
                gen_s += time.time() - ts
                ts = time.time()
                rewards = scorer.score(sp, sl_labels, samples)
                score_s += time.time() - ts
            check_finite(sp, rewards, source)
            for p, rr in zip(sp, rewards):
                if len(rr) != s.k:
                    raise CalibrationError(f"got {len(rr)} samples instead of --k {s.k} for prompt {p[:80]!r}")
            meta = {
                "format": SHARD_FORMAT,
                "shard": i,
                "num_prompts": len(sp),
                "k": s.k,
                "first_key": sk[0],
                "last_key": sk[-1],
                "settings_hash": plan.settings_hash,
                "run_id": run_id,
                "pid": os.getpid(),
                "wall_s": round(time.time() - shard_t0, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            write_shard(plan.work, i, sk, sp, rewards, meta)
    except Exception as e:
        if not _is_lost_worker(e):
            raise
        kept = len(plan.shards) - len(todo) + n_written
        raise CalibrationError(
            f"lost a Ray worker mid-run ({type(e).__name__}: {str(e).splitlines()[0][:200]}); {kept} of "
            f"{len(plan.shards)} shard(s) are kept in {plan.work} and nothing was written to {plan.out}: rerun the "
            "same command (once the cluster has its nodes back) to resume"
        ) from e
    finally:
        bar.close()
        if scorer is not None and hasattr(scorer, "close"):
            scorer.close()
        generator.close()
    return gen_s, score_s


def _is_lost_worker(e: BaseException) -> bool:
    """A dead actor/node/worker (a lost raylet, an OOM kill): the work is resumable, so say so."""
    try:
        from ray import exceptions as rex
    except ImportError:
        return False
    lost = tuple(
        getattr(rex, name)
        for name in ("RayActorError", "ActorDiedError", "NodeDiedError", "WorkerCrashedError", "ObjectLostError")
        if hasattr(rex, name)
    )
    return isinstance(e, lost)


def _publish(plan: WorkPlan, keys, prompts, rewards) -> None:
    s, hashed = plan.settings, plan.hashed
    manifest = {
        "policy_model": s.policy,
        "reward_source": hashed["reward_source"],
        "sampling": hashed["sampling"],
        "template": hashed["template"],
        RECORD_KEY: plan.record,
        "dataset": plan.dataset,
        "calibration": {
            "settings_hash": plan.settings_hash,
            "shard_size": s.shard_size,
            "num_shards": len(plan.shards),
            "policy": hashed["policy"],
            "tool": "infalign calibrate",
        },
    }
    write_store(
        plan.out,
        keys,
        rewards,
        prompts=prompts if s.store_prompts else None,
        manifest=manifest,
        overwrite=s.overwrite,
        inputs=_inputs(s),
    )
    shutil.rmtree(plan.work, ignore_errors=True)


def run_calibration(settings: CalibrateSettings, log: Callable[[str], None] = print) -> Dict:
    """Run (or resume) the calibration job; returns a summary dict (also what `infalign calibrate` prints)."""
    t0 = time.time()
    settings.validate()
    check_out(settings)  # seconds, not after the whole job: a bad --out fails before any model is loaded
    plan = plan_work(settings, log)
    if _published(plan, log):
        return {"out": str(plan.out), "up_to_date": True, "num_prompts": len(plan.prompts), "k": settings.k}
    check_target(plan.out, overwrite=settings.overwrite, inputs=_inputs(settings))
    todo = _open_work_dir(plan, log)
    placement: Dict = {}
    gen_s, score_s = _generate_and_score(plan, todo, placement) if todo else (0.0, 0.0)
    keys, prompts, rewards = assemble(plan.work, plan.shards, plan.keys)
    _publish(plan, keys, prompts, rewards)

    flat = rewards.values
    generated = sum(sl.stop - sl.start for _, sl in todo)
    summary = {
        "out": str(plan.out),
        "num_prompts": len(keys),
        "k": settings.k,
        "shards_total": len(plan.shards),
        "shards_resumed": len(plan.shards) - len(todo),
        "shards_generated": len(todo),
        "duplicate_prompts": plan.duplicates,
        "reward_mean": float(flat.mean()) if flat.size else None,
        "reward_std": float(flat.std()) if flat.size else None,
        "generate_s": round(gen_s, 3),
        "score_s": round(score_s, 3),
        # with reward-model actors scoring overlaps generation: generate_s holds both, score_s is 0
        "reward_model_actors": settings.rm_actors,
        "placement": placement or None,
        "samples_per_s": round(generated * settings.k / (gen_s + score_s), 2) if gen_s + score_s > 0 else None,
        "wall_s": round(time.time() - t0, 3),
    }
    log(json.dumps(summary))
    return summary
