"""Apply (or revert) adapter/patches/openrlhf-0.11.2-reward-wrapper.patch (package data) to an installed OpenRLHF.

    python -m openrlhf_infalign.adapter.patching apply [--check] [--target DIR]
    python -m openrlhf_infalign.adapter.patching revert [--target DIR]
    python -m openrlhf_infalign.adapter.patching status [--target DIR]

``DIR`` is the directory that contains the ``openrlhf`` package (default: where ``import openrlhf`` finds it, e.g.
site-packages). The patch adds a native ``--reward.wrapper`` flag resolved through the ``openrlhf.reward_wrappers``
entry-point group, so plain ``python -m openrlhf.cli.train_ppo_ray --reward.wrapper infalign.ctrl ...`` works.

A small pure-Python applier (no ``patch`` binary needed): every hunk must match exactly (context and removed lines;
its position may move, as with ``patch``'s offset), all files are checked before any is written, and each file is
replaced atomically. ``apply`` on an already patched tree says so and changes nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

__all__ = ["PATCH_NAME", "PatchError", "find_patch", "default_target", "status", "apply_patch", "main"]

PATCH_NAME = "openrlhf-0.11.2-reward-wrapper.patch"
UPSTREAM_VERSION = "0.11.2"


class PatchError(Exception):
    """The patch does not fit the target tree (a hunk's lines are not there)."""


@dataclass
class Hunk:
    old_start: int
    new_start: int
    lines: list = field(default_factory=list)  # (tag, text) with tag in " ", "-", "+"

    def side(self, reverse: bool) -> tuple[list, list]:
        drop, add = ("+", "-") if reverse else ("-", "+")
        old = [t for tag, t in self.lines if tag in (" ", drop)]
        new = [t for tag, t in self.lines if tag in (" ", add)]
        return old, new


@dataclass
class FilePatch:
    old_path: Optional[str]  # None: the file is created
    new_path: str
    hunks: list = field(default_factory=list)


_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def _strip(path: str) -> Optional[str]:
    path = path.split("\t", 1)[0].strip()
    if path == "/dev/null":
        return None
    return path.split("/", 1)[1] if "/" in path else path  # -p1


def parse_patch(text: str) -> list[FilePatch]:
    """Parse a unified diff (text before the first ``---`` is a description and is skipped)."""
    files: list[FilePatch] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            fp = FilePatch(_strip(lines[i][4:]), _strip(lines[i + 1][4:]))
            files.append(fp)
            i += 2
            continue
        m = _HUNK.match(lines[i])
        if m and files:
            old_len = int(m.group(2) or 1)
            new_len = int(m.group(4) or 1)
            hunk = Hunk(int(m.group(1)), int(m.group(3)))
            i += 1
            n_old = n_new = 0
            while i < len(lines) and (n_old < old_len or n_new < new_len):
                line = lines[i]
                tag, body = (line[:1] or " "), line[1:]
                if tag == "\\":  # "\ No newline at end of file"
                    i += 1
                    continue
                if tag not in (" ", "-", "+"):
                    raise PatchError(f"malformed hunk line {i + 1}: {line!r}")
                hunk.lines.append((tag, body))
                n_old += tag in (" ", "-")
                n_new += tag in (" ", "+")
                i += 1
            files[-1].hunks.append(hunk)
            continue
        i += 1
    if not files:
        raise PatchError("no file changes found in the patch")
    return files


def _apply_hunks(src: list[str], hunks: list[Hunk], reverse: bool, where: str) -> list[str]:
    out = list(src)
    delta = 0
    for n, h in enumerate(hunks, 1):
        old, new = h.side(reverse)
        start = h.new_start if reverse else h.old_start
        pos = _find(out, old, max(start - 1 + delta, 0))
        if pos is None:
            raise PatchError(f"{where}: hunk {n} (near line {start}) does not match")
        out[pos : pos + len(old)] = new
        delta += len(new) - len(old)
    return out


def _find(lines: list[str], block: list[str], want: int) -> Optional[int]:
    if not block:
        return min(want, len(lines))
    for off in range(0, len(lines) + 1):
        for pos in (want - off, want + off) if off else (want,):
            if 0 <= pos <= len(lines) - len(block) and lines[pos : pos + len(block)] == block:
                return pos
    return None


def _plan(files: list[FilePatch], target: Path, reverse: bool) -> dict[Path, Optional[str]]:
    """New contents per path (None: delete), or PatchError. Reads only."""
    result: dict[Path, Optional[str]] = {}
    for fp in files:
        creates = fp.old_path is None
        rel = fp.new_path if creates else fp.old_path
        path = target / rel
        if creates and not reverse:  # the file must not exist yet
            if path.exists():
                raise PatchError(f"{path}: exists already (the patch creates it)")
            src: list[str] = []
        else:
            if not path.is_file():
                raise PatchError(f"{path}: not found (is --target the directory containing the openrlhf package?)")
            src = path.read_text(encoding="utf-8").splitlines()
        out = _apply_hunks(src, fp.hunks, reverse, str(path))
        result[path] = None if (creates and reverse) else "\n".join(out) + "\n"
    return result


def _write(plan: dict[Path, Optional[str]]) -> None:
    for path, text in plan.items():
        if text is None:
            path.unlink()
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            if path.exists():
                os.chmod(tmp, path.stat().st_mode & 0o777)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


def find_patch(explicit: Optional[str] = None) -> Path:
    """The patch file: --patch, else the one the package ships (``adapter/patches/``)."""
    candidates = [Path(explicit) if explicit else Path(__file__).resolve().parent / "patches" / PATCH_NAME]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"patch {PATCH_NAME} not found (looked in {', '.join(map(str, candidates))}); pass --patch"
    )


def default_target() -> Path:
    spec = importlib.util.find_spec("openrlhf")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "openrlhf is not installed here; pass --target DIR (the directory containing openrlhf/)"
        )
    return Path(list(spec.submodule_search_locations)[0]).parent


def status(target: Path, patch: Path) -> str:
    """'unpatched' (applies cleanly), 'patched' (reverts cleanly) or 'conflict'."""
    files = parse_patch(patch.read_text(encoding="utf-8"))
    try:
        _plan(files, target, reverse=False)
        return "unpatched"
    except PatchError:
        pass
    try:
        _plan(files, target, reverse=True)
        return "patched"
    except PatchError:
        return "conflict"


def apply_patch(target: Path, patch: Path, reverse: bool = False, check: bool = False) -> str:
    """Apply (or revert) the patch to ``target``; returns what happened. Raises PatchError on a conflict."""
    files = parse_patch(patch.read_text(encoding="utf-8"))
    state = status(target, patch)
    if state == ("unpatched" if reverse else "patched"):
        return "already reverted" if reverse else "already applied"
    if state == "conflict":
        _plan(files, target, reverse)  # raises with the offending file and hunk
    plan = _plan(files, target, reverse)
    if check:
        return f"would {'revert' if reverse else 'apply'} cleanly ({len(plan)} files)"
    _write(plan)
    return f"{'reverted' if reverse else 'applied'} ({len(plan)} files)"


def _installed_version(target: Path) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution("openrlhf")
    except PackageNotFoundError:
        return None
    return dist.version if Path(dist.locate_file("")).resolve() == target.resolve() else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m openrlhf_infalign.adapter.patching",
        description="Add the native --reward.wrapper flag to an installed OpenRLHF 0.11.2 (adapter/patches/).",
    )
    ap.add_argument("action", choices=["apply", "revert", "status"], help="what to do")
    ap.add_argument("--check", action="store_true", help="only report whether it would apply/revert (default: off)")
    ap.add_argument("--target", default=None, help="directory containing the openrlhf package (default: installed)")
    ap.add_argument("--patch", default=None, help=f"patch file (default: the package's adapter/patches/{PATCH_NAME})")
    a = ap.parse_args(argv)
    try:
        target = Path(a.target) if a.target else default_target()
        patch = find_patch(a.patch)
        version = _installed_version(target)
        if version is not None and version != UPSTREAM_VERSION:
            print(f"warning: openrlhf {version} at {target}; the patch is for {UPSTREAM_VERSION}", file=sys.stderr)
        if a.action == "status":
            print(f"{status(target, patch)}: {target / 'openrlhf'}")
            return 0
        print(f"{apply_patch(target, patch, reverse=a.action == 'revert', check=a.check)}: {target / 'openrlhf'}")
        return 0
    except (PatchError, FileNotFoundError) as e:
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
