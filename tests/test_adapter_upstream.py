"""The upgrade checklist: every upstream symbol in ``adapter/upstream``'s ``UPSTREAM_HOOKS`` is still where it was
and, for OpenRLHF's, still reads as it did in the version recorded (a digest of its source, read with ``ast``)."""

import ast
from pathlib import Path

import pytest

from openrlhf_infalign.adapter.cpu.patches import PATCHES
from openrlhf_infalign.adapter.upstream import OPENRLHF, UPSTREAM_HOOKS, source_digest, source_of

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.openrlhf


def _top_names(path: Path) -> set:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))} | {
        t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)
    }


def test_every_upstream_symbol_reads_as_recorded():
    pytest.importorskip("openrlhf")
    changed = []
    for hook in UPSTREAM_HOOKS:
        try:
            source_of(hook.symbol)
        except LookupError as e:
            changed.append(f"- {hook.symbol} ({hook.how} by {hook.ours}): GONE ({e}); {hook.why}")
            continue
        if hook.digest is not None and source_digest(hook.symbol) != hook.digest:
            changed.append(
                f"- {hook.symbol} ({hook.how} by {hook.ours}): source changed since {hook.read_from}; {hook.why}"
            )
    assert not changed, (
        "upstream changed under the adapter: re-read each symbol, fix our side, then record the new digest "
        "(openrlhf_infalign.adapter.upstream.source_digest):\n" + "\n".join(changed)
    )


def test_every_openrlhf_entry_has_a_digest_and_names_its_version():
    for hook in UPSTREAM_HOOKS:
        assert hook.read_from, hook
        if hook.symbol.startswith("openrlhf."):
            assert hook.read_from == OPENRLHF and hook.digest, hook
    symbols = [h.symbol for h in UPSTREAM_HOOKS]
    assert len(symbols) == len(set(symbols)), "one entry per upstream symbol"


def test_our_side_of_every_entry_exists():
    for hook in UPSTREAM_HOOKS:
        module, name = hook.ours.split(":")
        base = ROOT.joinpath(*module.split("."))
        path = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        assert path.is_file(), hook
        assert name in _top_names(path), f"{hook.ours} is not defined ({hook.symbol})"


def test_every_cpu_patch_is_in_the_table():
    listed = {h.ours.split(":")[1] for h in UPSTREAM_HOOKS}
    missing = [fn.__name__ for _, fn in PATCHES if fn.__name__ not in listed]
    assert not missing, f"CPU patches without an UPSTREAM_HOOKS entry: {missing}"


def test_private_upstream_members_are_reached_from_one_module():
    upstream = ROOT / "openrlhf_infalign" / "adapter" / "upstream"
    allowed = {upstream / "experience_maker.py", upstream / "__init__.py"}  # the accessors and the table
    members = ("._dispatch_forward", "._flatten_results", "_actor_handlers")
    hits = [
        str(p.relative_to(ROOT))
        for p in (ROOT / "openrlhf_infalign").rglob("*.py")
        if p not in allowed and any(m in p.read_text(encoding="utf-8") for m in members)
    ]
    assert not hits, f"upstream's private experience-maker members used outside upstream/experience_maker.py: {hits}"
