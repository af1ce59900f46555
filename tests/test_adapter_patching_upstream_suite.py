"""adapter/patches/ must not break OpenRLHF's own tests: upstream's shipped suite, run on a patched copy of OpenRLHF 0.11.2.

The openrlhf wheel ships its tests as a top-level ``tests`` package next to ``openrlhf``; many of them load
``openrlhf/...`` by path relative to ``tests/``, so both are copied into one directory, the patch is applied there
with our own applier, and pytest runs in a subprocess whose cwd and first PYTHONPATH entry is that directory.
Upstream's tests stub flash_attn and vllm themselves; they run on CPU.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest

from openrlhf_infalign.adapter import patching


def _upstream_test_files() -> list[tuple[Path, Path]]:
    """(installed file, path relative to site-packages) of every ``tests/`` file the openrlhf wheel installed."""
    try:
        dist = distribution("openrlhf")
    except PackageNotFoundError:
        return []
    return [
        (Path(dist.locate_file(f)), Path(*f.parts))
        for f in dist.files or ()
        if f.parts[0] == "tests" and f.suffix == ".py" and Path(dist.locate_file(f)).is_file()
    ]


def test_upstream_suite_passes_on_the_patched_copy(tmp_path):
    files = _upstream_test_files()
    if not any(rel.name.startswith("test_") for _, rel in files):
        pytest.skip("OpenRLHF's own tests are not installed (the openrlhf wheel's top-level tests/ package)")
    shutil.copytree(
        patching.default_target() / "openrlhf", tmp_path / "openrlhf", ignore=shutil.ignore_patterns("__pycache__")
    )
    for src, rel in files:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, tmp_path / rel)
    patch = patching.find_patch()
    assert patching.apply_patch(tmp_path, patch).startswith("applied")
    assert patching.status(tmp_path, patch) == "patched"

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    env.pop("PYTEST_ADDOPTS", None)
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = res.stdout.strip().splitlines()[-1] if res.stdout.strip() else ""
    assert res.returncode == 0, f"upstream's suite fails on the patched copy: {summary}\n{res.stdout[-6000:]}"
    assert re.search(r"\b\d+ passed\b", summary) and not re.search(r"failed|error", summary), summary
