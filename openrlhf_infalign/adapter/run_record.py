"""The run record: every setting that shapes the distribution of a prompt's rewards, built one way everywhere.

Calibration compares a reward with the K reference rewards of its prompt, which only means something when both come
from the same prompt template, sampling, policy and reward (normalised or not). :func:`run_record` builds the record
from a run's flags by OpenRLHF's dotted names (``data.input_key``, ``rollout.temperature``, ...), so `infalign
calibrate` (which writes it into the store manifest under ``run_record``), training and evaluation all build it with
the same code; :func:`check_store` compares a store's record with the run's field by field and refuses a mismatch.

Fingerprints are cheap: config.json plus the safetensors index (or the weight files' names and sizes), never the
weights. Two fine-tunes of one architecture can share one, so the model's directory name is compared as well.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional

from openrlhf_infalign.store import StoreError
from openrlhf_infalign.store.reader import differing_fields

__all__ = [
    "RECORD_KEY",
    "Mismatch",
    "chat_template_sha1",
    "check_run",
    "check_store",
    "compare_records",
    "model_fingerprint",
    "record_from_args",
    "reward_normalization",
    "run_record",
    "store_record",
]

#: The manifest key of the record.
RECORD_KEY = "run_record"

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

#: Each compared field and the flag (or thing) that sets it; eval runs read the temperature from --eval.temperature.
FIELDS = {
    "template.input_key": "--data.input_key",
    "template.input_template": "--data.input_template",
    "template.apply_chat_template": "--data.apply_chat_template",
    "template.chat_template_sha1": "the chat template of the --actor.model_name_or_path tokenizer",
    "sampling.temperature": "--rollout.temperature",
    "sampling.top_p": "--rollout.top_p",
    "sampling.top_k": "top_k (OpenRLHF samples with top_k -1)",
    "sampling.max_new_tokens": "--rollout.max_new_tokens",
    "sampling.max_len": "--data.max_len",
    "policy.name": "--actor.model_name_or_path",
    "policy.fingerprint": "--actor.model_name_or_path",
    "reward.kind": "--reward.model_name_or_path / --reward.remote_url",
    "reward.name": "--reward.model_name_or_path / --reward.remote_url",
    "reward.fingerprint": "--reward.model_name_or_path / --reward.remote_url",
    "normalization.enabled": "--reward.normalize_enable",
    "normalization.mean": "the reward model's config.json mean",
    "normalization.std": "the reward model's config.json std",
}


def chat_template_sha1(tokenizer, apply_chat_template: bool) -> Optional[str]:
    """sha1 of the tokenizer's chat template when ``apply_chat_template`` is on (None otherwise: it then does not
    shape the prompt). Named templates (a dict) are hashed all together, in a stable order."""
    chat = getattr(tokenizer, "chat_template", None) if apply_chat_template else None
    if isinstance(chat, dict):
        chat = json.dumps(chat, sort_keys=True)
    return hashlib.sha1(chat.encode()).hexdigest() if chat else None


def model_fingerprint(path: Optional[str]) -> Optional[str]:
    """sha1 of a model directory's config.json and weight index (or weight file names and sizes), or of a file's
    bytes; None for a hub name or URL (nothing local to hash)."""
    if not path:
        return None
    p = Path(path)
    if p.is_file():
        return hashlib.sha1(p.read_bytes()).hexdigest()
    if not p.is_dir():
        return None
    h = hashlib.sha1()
    cfg = p / "config.json"
    h.update(cfg.read_bytes() if cfg.is_file() else b"")
    index = next((p / n for n in _INDEXES if (p / n).is_file()), None)
    if index is not None:
        h.update(index.read_bytes())
    else:
        for f in sorted(p.iterdir()):
            if f.suffix in _WEIGHT_SUFFIXES and f.is_file():
                h.update(f"{f.name}\0{f.stat().st_size}\n".encode())
    return h.hexdigest()


def _name(path: Optional[str]) -> Optional[str]:
    # A copy of a model keeps its directory name across mounts; a hub id or URL is its own name.
    if not path:
        return None
    if "://" in path or not os.path.isabs(path) and not os.path.exists(path):
        return path
    return Path(path).resolve().name


def reward_normalization(reward_model: str) -> tuple[float, float]:
    """(mean, std) a reward model applies with ``--reward.normalize_enable``: its config's, as OpenRLHF reads them
    (0 and 1 when absent)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(reward_model, trust_remote_code=True)
    return float(getattr(cfg, "mean", 0.0)), float(getattr(cfg, "std", 1.0))


def _reward_kind(url: str) -> str:
    return "reward_func" if url.endswith(".py") else "remote_url"


def run_record(flag: Callable[[str], Any], *, tokenizer=None, role: str = "training") -> Dict:
    """The record of a run from its flags: ``flag("data.input_key")`` etc. give the values of OpenRLHF's dotted
    flag names (None when unset). ``role="eval"`` takes the temperature from ``eval.temperature``, as OpenRLHF's
    evaluation samples. ``tokenizer``: the policy tokenizer, loaded from the policy when needed and not given."""
    if flag("train.agent_func_path"):
        raise StoreError(
            f"--train.agent_func_path {flag('train.agent_func_path')}: an agent's rewards cannot be reproduced by "
            "`infalign calibrate` (it samples one response per prompt and scores it with --reward.model_name_or_path "
            "or --reward.remote_url), so no reference store matches them. Train with a single-turn reward source, "
            "or without --reward_wrapper"
        )
    policy = flag("actor.model_name_or_path")
    apply_chat = bool(flag("data.apply_chat_template"))
    if apply_chat and tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(policy, trust_remote_code=True)
    template = flag("data.input_template") or None
    if template is not None and "{}" not in template:
        template = None  # train_ppo_ray drops such a template (with a warning), and so does calibrate
    top_k = flag("rollout.top_k")
    rm, urls = flag("reward.model_name_or_path"), flag("reward.remote_url") or ""
    # train_ppo_ray's __main__ has split the flag into a list by the time train() (and this check) runs.
    urls = [u.strip() for u in (urls.split(",") if isinstance(urls, str) else urls) if u.strip()]
    if rm:
        reward = {"kind": "reward_model", "path": rm, "name": _name(rm), "fingerprint": model_fingerprint(rm)}
    elif urls and _reward_kind(urls[0]) == "reward_func":
        path = urls[0]
        reward = {"kind": "reward_func", "path": path, "name": _name(path), "fingerprint": model_fingerprint(path)}
    else:
        joined = ",".join(urls) or None
        reward = {"kind": "remote_url" if urls else None, "path": joined, "name": joined, "fingerprint": None}
    try:
        mean, std = reward_normalization(rm) if rm else (None, None)
    except (OSError, ValueError):  # no readable config here (a path of another node): nothing to record
        mean = std = None
    return {
        "template": {
            "input_key": flag("data.input_key"),
            "input_template": template,
            "apply_chat_template": apply_chat,
            "chat_template_sha1": chat_template_sha1(tokenizer, apply_chat),
        },
        "sampling": {
            "temperature": flag("eval.temperature" if role == "eval" else "rollout.temperature"),
            "top_p": flag("rollout.top_p"),
            "top_k": -1 if top_k is None else top_k,
            "max_new_tokens": flag("rollout.max_new_tokens"),
            "max_len": flag("data.max_len"),
        },
        "policy": {"path": policy, "name": _name(policy), "fingerprint": model_fingerprint(policy)},
        "reward": reward,
        "normalization": {"enabled": bool(flag("reward.normalize_enable")), "mean": mean, "std": std},
    }


def record_from_args(args, *, role: str = "training", tokenizer=None) -> Dict:
    """:func:`run_record` of OpenRLHF ``train_ppo_ray`` arguments (nested namespaces ``args.data.input_key``)."""

    def flag(dotted: str):
        node = args
        for part in dotted.split("."):
            node = getattr(node, part, None)
            if node is None:
                return None
        return node

    return run_record(flag, tokenizer=tokenizer, role=role)


def check_run(args, store, *, role: str = "training") -> List[Mismatch]:
    """:func:`check_store` of ``store`` against the record of train_ppo_ray ``args`` (``role="eval"``: the eval
    store against eval sampling), with ``--infalign.allow_mismatch``; what the wrapper builder and eval hook call."""
    allow = bool(getattr(getattr(args, "infalign", None), "allow_mismatch", False))
    return check_store(store, record_from_args(args, role=role), role=role, allow_mismatch=allow)


def _flat(record: Mapping) -> Dict[str, Any]:
    return {f"{sec}.{k}": v for sec, fields in record.items() if isinstance(fields, dict) for k, v in fields.items()}


def store_record(manifest: Mapping) -> Dict:
    """The record of a store: its ``run_record``, or what older manifests hold of it (``template``, ``sampling``,
    ``policy_model``, ``reward_source``); fields they lack are absent (they cannot be checked)."""
    if isinstance(manifest.get(RECORD_KEY), dict):
        return manifest[RECORD_KEY]
    rec: Dict[str, Dict] = {
        "template": dict(manifest.get("template") or {}),
        "sampling": {k: v for k, v in (manifest.get("sampling") or {}).items() if f"sampling.{k}" in FIELDS},
    }
    if manifest.get("policy_model"):
        rec["policy"] = {"path": manifest["policy_model"], "name": _name(manifest["policy_model"])}
    src = manifest.get("reward_source")
    if isinstance(src, dict) and src.get("kind"):  # written by an older `infalign calibrate`
        path = (src.get("model") or src.get("file") or {}).get("path") or ",".join(src.get("urls") or []) or None
        rec["reward"] = {"kind": src["kind"], "path": path, "name": _name(path)}
        if src["kind"] == "reward_model":
            rec["normalization"] = {"enabled": bool(src.get("normalize_reward"))}
    elif isinstance(src, str) and src:  # `infalign store import --reward-source`
        kind = "reward_model" if not src.endswith(".py") and "://" not in src else _reward_kind(src)
        rec["reward"] = {"kind": kind, "path": src, "name": _name(src)}
    return rec


class Mismatch(NamedTuple):
    field: str
    store: Any
    run: Any
    fix: str


def _fix(field: str, store_value, role: str) -> str:
    flag = FIELDS[field]
    if field == "sampling.temperature" and role == "eval":
        flag = "--eval.temperature"
    if field == "template.apply_chat_template":
        return f"{'add' if store_value else 'drop'} --data.apply_chat_template"
    if flag.startswith("--") and not field.startswith(("policy.", "reward.")):
        return f"drop {flag}" if store_value is None else f"pass {flag} {store_value}"
    return f"use what the store was built with ({flag})"


def compare_records(stored: Mapping, run: Mapping, *, role: str = "training") -> tuple[List[Mismatch], List[str]]:
    """Field-by-field comparison: (the differing fields with their fix, the fields the store lacks)."""
    s, r = _flat(stored), _flat(run)
    if not r.get("normalization.enabled"):  # without normalisation the RM's mean/std do not shape the rewards
        for k in ("normalization.mean", "normalization.std"):
            s.pop(k, None)
            r.pop(k, None)
    missing = [f for f in FIELDS if f in r and f not in s]
    diffs = differing_fields({k: s[k] for k in FIELDS if k in s}, {k: r[k] for k in FIELDS if k in r})
    return [Mismatch(k, a, b, _fix(k, a, role)) for k, a, b in diffs], missing


def check_store(store, record: Mapping, *, role: str = "training", allow_mismatch: bool = False) -> List[Mismatch]:
    """Compare ``store``'s record with this run's ``record``: a difference raises StoreError naming each field, store
    value vs run value and the fix (``allow_mismatch``: a warning per field instead); fields the store lacks (older
    stores) warn once that they cannot be checked. Returns the mismatches."""
    where = getattr(store, "path", None) or "the reference store"
    mismatches, missing = compare_records(store_record(store.manifest), record, role=role)
    if missing:
        warnings.warn(
            f"reference store {where} does not record {', '.join(missing)}: these cannot be checked against this "
            f"{role} run (rebuild it with `infalign calibrate` to record them)",
            stacklevel=2,
        )
    if not mismatches:
        return []
    lines = [f"  {m.field}: store {m.store!r}, this run {m.run!r} -> {m.fix}" for m in mismatches]
    if allow_mismatch:
        for line in lines:
            warnings.warn(f"reference store {where} differs from this {role} run (--infalign.allow_mismatch):{line}")
        return mismatches
    raise StoreError(
        f"reference store {where} was built with other settings than this {role} run; its reference rewards would "
        "be compared with rewards from another distribution:\n"
        + "\n".join(lines)
        + "\nChange these flags, or rebuild the store with `infalign calibrate` and this run's flags; "
        "--infalign.allow_mismatch goes on anyway (one warning per field)"
    )
