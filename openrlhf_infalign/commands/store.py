"""Reference reward stores: import from JSONL, show info, export to JSONL.

`import` builds a store from rows {"prompt": str, "rewards": [float, ...]} or {"prompt_key": sha1 hex, "rewards":
[...]}; `info` prints counts, K min/median/max and the manifest; `export` writes the rows back as JSONL (it
round-trips with import). See `infalign store ACTION --help`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from openrlhf_infalign import options
from openrlhf_infalign.errors import UserError
from openrlhf_infalign.files import json_object
from openrlhf_infalign.options import option


def _kv(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    k, v = text.split("=", 1)
    if not k.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r} (no key)")
    try:
        val = json.loads(v)  # numbers, true/false, null, quoted strings
    except json.JSONDecodeError:
        val = v
    return k.strip(), val


@dataclass(kw_only=True)
class StoreImportSettings:
    """`infalign store import`: a store from a JSONL file of reference rewards."""

    jsonl: str = option(flags=("--jsonl",), help='input rows {"prompt"|"prompt_key": ..., "rewards": [float, ...]}')
    out: str = option(flags=("--out",), help="store directory to create (written atomically)")
    k_min: int = option(1, flags=("--k-min",), help="error on a prompt with fewer reference rewards than this")
    policy_model: Optional[str] = option(
        None, flags=("--policy-model",), help="base (reference) policy the rewards were sampled from"
    )
    reward_source: Optional[str] = option(
        None, flags=("--reward-source",), help="reward model / URL / reward_func file that scored them"
    )
    template: Optional[List[tuple]] = option(
        None,
        flags=("--template",),
        append=True,
        parse=_kv,
        metavar="KEY=VALUE",
        help="prompt template setting recorded in the manifest (input_key, apply_chat_template, input_template, ...)"
        "; training compares these against its own flags; repeatable",
    )
    sampling: Optional[List[tuple]] = option(
        None,
        flags=("--sampling",),
        append=True,
        parse=_kv,
        metavar="KEY=VALUE",
        help="sampling parameter recorded in the manifest (temperature, top_p, max_new_tokens, ...); repeatable",
    )
    manifest: Optional[str] = option(
        None,
        flags=("--manifest",),
        help="JSON file of extra manifest fields (e.g. another store's manifest.json, to carry its settings over)",
    )
    overwrite: bool = option(False, flags=("--overwrite",), help="replace an existing store at --out")
    progress: bool = option(True, flags=("--no-progress",), negated=True, help="no tqdm progress bar")


@dataclass(kw_only=True)
class StoreInfoSettings:
    """`infalign store info`: counts, K and manifest."""

    store: str = option(flags=("store",), positional=True, help="store directory")
    json: bool = option(False, flags=("--json",), help="print one JSON object instead of text")
    verify: bool = option(
        False,
        flags=("--verify",),
        help="also check every byte of every file against the digests recorded at write time, and every row "
        "(reads the whole store); exit code 2 naming the bad file and the fix",
    )


@dataclass(kw_only=True)
class StoreExportSettings:
    """`infalign store export`: a store back out as JSONL."""

    store: str = option(flags=("store",), positional=True, help="store directory")
    jsonl: str = option(flags=("--jsonl",), help="output file (written via a temp file, then renamed)")
    prompts: bool = option(
        True, flags=("--no-prompts",), negated=True, help="write prompt_key only, not the prompt text"
    )
    overwrite: bool = option(False, flags=("--overwrite",), help="replace an existing output file")
    progress: bool = option(True, flags=("--no-progress",), negated=True, help="no tqdm progress bar")


ACTIONS = {
    "import": ("build a store from a JSONL file of reference rewards", StoreImportSettings),
    "info": ("counts, K min/median/max and manifest of a store", StoreInfoSettings),
    "export": ("write a store back out as JSONL", StoreExportSettings),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="store_command", metavar="ACTION")
    sub.required = True
    for name, (help_, cls) in ACTIONS.items():
        p = sub.add_parser(name, help=help_, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        options.add_arguments(p, cls)


def run(args) -> int:
    return {"import": _import, "info": _info, "export": _export}[args.store_command](args)


def _read_manifest_arg(path: str) -> dict:
    """--manifest: a JSON object; every way it can fail names the file and what to give instead."""
    try:
        raw = Path(path).read_bytes()
    except IsADirectoryError:
        raise UserError(f"--manifest {path} is a directory; give the JSON file (e.g. {Path(path) / 'manifest.json'})")
    except OSError as e:
        raise UserError(f"--manifest {path}: cannot read it ({e.strerror})") from None
    return json_object(
        raw,
        f"--manifest {path}",
        utf8_fix="give a JSON file",
        json_fix="give a JSON object",
        json_line=True,
        error=UserError,
    )


def _import(args) -> int:
    from openrlhf_infalign.store.jsonl import import_jsonl

    if args.k_min < 1:
        raise UserError(f"--k-min {args.k_min}: the fewest reference rewards a prompt may have, an integer >= 1")

    man: dict = _read_manifest_arg(args.manifest) if args.manifest else {}
    if args.policy_model is not None:
        man["policy_model"] = args.policy_model
    if args.reward_source is not None:
        man["reward_source"] = args.reward_source
    record = man.get("run_record")
    if record is not None and not isinstance(record, dict):
        raise UserError(f"--manifest {args.manifest}: 'run_record' must be an object, got {type(record).__name__}")
    for section, given in (("template", args.template), ("sampling", args.sampling)):
        # What is given here overrides what --manifest carried, in the run record too (training reads that).
        for where, holder in (("", man), ("run_record.", record or {})):
            have = holder.get(section)
            if have is not None and not isinstance(have, dict):
                raise UserError(
                    f"--manifest {args.manifest}: '{where}{section}' must be an object of settings, got {have!r:.60}"
                )
            if given:
                holder[section] = {**(have or {}), **dict(given)}
    for k in ("format_version", "created"):  # this new store's, not the source's
        man.pop(k, None)
    man["source"] = {"imported_from": str(Path(args.jsonl).resolve())}
    out = import_jsonl(
        args.jsonl,
        args.out,
        manifest=man,
        k_min=args.k_min,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        inputs=[args.manifest],
        allow_empty=False,
    )
    from openrlhf_infalign.store import read_manifest

    m = read_manifest(out)
    print(f"wrote {out}: {m['num_prompts']} prompts, {m['num_rewards']} rewards, K {_k_text(m['k_stats'])}")
    return 0


def _k_text(ks: dict) -> str:
    return f"min {ks['min']} / median {ks['median']} / max {ks['max']}"


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def _info(args) -> int:
    import warnings

    from openrlhf_infalign.store import ReferenceStore
    from openrlhf_infalign.store.format import K_WARN

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reported below as a field
        s = ReferenceStore.open(args.store)
    report = s.verify() if args.verify else None  # a bad store raises StoreError: one line, exit code 2
    ks = s.k_stats()
    info = {
        "store": str(Path(args.store)),
        "num_prompts": s.num_prompts,
        "num_rewards": int(s.values.shape[0]),
        "k": ks,
        "small_k": bool(s.num_prompts and ks["min"] < K_WARN),
        "has_prompts": bool(s.manifest.get("has_prompts")),
        "disk_bytes": _dir_size(Path(args.store)),
        "verified": bool(args.verify),
        "verify": (
            None if report is None else {"summary": report.summary(), "files": report.files, "notes": report.notes}
        ),
        "manifest": s.manifest,
    }
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    m = s.manifest
    print(f"reference store {info['store']} (format {m.get('format_version')}, created {m.get('created')})")
    print(f"  prompts      {info['num_prompts']}")
    print(f"  rewards      {info['num_rewards']}")
    print(f"  K            {_k_text(ks)}, mean {ks['mean']:.2f}")
    if info["small_k"]:
        print(f"  warning      K below {K_WARN}: calibrated rewards move in coarse steps of 1/K")
    print(f"  prompts text {'stored' if info['has_prompts'] else 'not stored (keys only)'}")
    print(f"  disk         {_human(info['disk_bytes'])}")
    print(f"  policy model {m.get('policy_model')}")
    print(f"  reward       {m.get('reward_source')}")
    print(f"  sampling     {json.dumps(m.get('sampling') or {})}")
    print(f"  template     {json.dumps(m.get('template') or {})}")
    _print_record(m)
    if report is not None:
        print(f"  verify       {report.summary()}")
    return 0


def _print_record(manifest: dict) -> None:
    """The run record training and eval check the store against (fields an older store lacks are named)."""
    from openrlhf_infalign.adapter.run_record import FIELDS, RECORD_KEY, store_record

    record = store_record(manifest)
    origin = "" if RECORD_KEY in manifest else " (older store: read from its template/sampling/policy/reward keys)"
    print(f"  run record{origin}")
    for section, values in record.items():
        if values:
            print(f"    {section:<13} {json.dumps(values)}")
    absent = [f for f in FIELDS if f.split(".")[1] not in (record.get(f.split(".")[0]) or {})]
    if absent:
        print(f"    not recorded  {', '.join(absent)} (cannot be checked against a run)")


def _export(args) -> int:
    from openrlhf_infalign.files import check_output_file
    from openrlhf_infalign.store.jsonl import export_jsonl

    # Checked before any row is read; never into the store itself (its own files, or a stranger among them).
    out = check_output_file(args.jsonl, overwrite=args.overwrite, flag="--jsonl", inputs=[args.store])
    n = export_jsonl(
        args.store, out, include_prompts=not args.no_prompts, progress=not args.no_progress, overwrite=args.overwrite
    )
    print(f"wrote {out}: {n} prompts")
    return 0
