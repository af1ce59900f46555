"""Writing files so that a reader never sees half of one: every JSON, text, PNG and shard the project writes.

A file is written to a temporary name in the same directory, flushed to disk, given the usual mode (mkstemp makes
0600) and moved over the target with os.replace, the only atomic step POSIX offers. If anything fails, the target
keeps its old content and the temporary file is removed. A target that is a directory, or lies under a file, is a
one-line OutputPathError (a ValueError) before anything is written; ``overwrite=False`` refuses an existing file.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Callable, Iterator

FIGURE_DPI = 130


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class OutputPathError(ValueError):
    """An output path that cannot be written as asked: a directory given for a file, a file where a directory should
    be, or an existing file without overwrite. The consoles print it as one line."""


def _same_or_inside(path: Path, other: Path) -> bool:
    a, b = Path(os.path.realpath(path)), Path(os.path.realpath(other))
    return a == b or b in a.parents


def check_output_file(path, *, overwrite: bool = True, flag: str | None = None, inputs=()) -> Path:
    """The checks every file output gets before anything is computed or written: not a directory, no file in
    place of a parent directory, with overwrite=False not already there, and never one of ``inputs`` (the
    command's own input files and folders) or inside one, even with overwrite. Returns path as a Path."""
    if str(path) == "":
        raise OutputPathError(f"{flag or 'output'}: an empty path; give a file path")
    p = Path(path)
    name = f"{flag} {p}" if flag else str(p)
    if p.is_dir():
        raise OutputPathError(f"{name} is a directory; give a file path for this output (e.g. {p / 'out'}{p.suffix})")
    for inp in inputs:
        if inp is not None and str(inp) != "" and os.path.exists(inp) and _same_or_inside(p, Path(inp)):
            where = "is" if os.path.realpath(p) == os.path.realpath(inp) else "is inside"
            raise OutputPathError(
                f"{name} {where} the input {inp}: writing it would destroy the input; choose another path"
            )
    if not overwrite and (p.exists() or p.is_symlink()):
        raise OutputPathError(f"{name} exists; pass --overwrite to replace it, or choose another path")
    check_parent_is_dir(p, name)
    return p


def check_parent_is_dir(p: Path, name: str, error: type = None) -> None:
    """The nearest existing ancestor of p is a directory (a file in place of a parent is named, with the fix)."""
    anc = p.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise (error or OutputPathError)(f"{name}: {anc} is a file, not a directory; choose a path inside a directory")


def json_object(
    raw: bytes, where: str, *, utf8_fix: str, json_fix: str, json_line: bool = False, error: type = ValueError
) -> dict:
    """One JSON object from bytes; an error names ``where`` (a file, or file:line) and says the fix. ``json_line``:
    ``where`` is a whole file, and a JSON error names its line too."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text ({e.reason} at byte {e.start}); {utf8_fix}") from None
    except json.JSONDecodeError as e:
        raise error(f"{where}{f':{e.lineno}' if json_line else ''}: invalid JSON ({e.msg}); {json_fix}") from None
    if not isinstance(obj, dict):
        raise error(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def check_input_file(path, what: str = "input") -> Path:
    """A file the command reads: there, and a file (a folder given for it is named as such, not 'no such file')."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{what} {p} is a directory; give the file itself")
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    return p


def check_output_dir(path, *, flag: str | None = None) -> Path:
    """An output folder (the files in it are checked one by one): not a file, and no file in place of a parent."""
    if str(path) == "":
        raise OutputPathError(f"{flag or 'output'}: an empty path; give a directory")
    p = Path(path)
    name = f"{flag} {p}" if flag else str(p)
    if p.exists() and not p.is_dir():
        raise OutputPathError(f"{name} is a file; this output is a directory (its files are written into it)")
    check_parent_is_dir(p, name)
    return p


@contextlib.contextmanager
def _temporary_beside(path: Path, overwrite: bool = True) -> Iterator[tuple[int, str]]:
    """A temporary file beside path; on leaving normally it is synced, given the usual mode and moved over path."""
    check_output_file(path, overwrite=overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        yield fd, tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:  # link + unlink: fails, rather than replaces, when the file appeared meanwhile
                os.link(tmp, path)
            except FileExistsError:
                raise OutputPathError(f"{path} appeared while it was written; not replacing it") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_open(path, mode: str = "w", *, encoding: str | None = "utf-8", overwrite: bool = True) -> Iterator[IO]:
    """``with atomic_open(path) as f: f.write(...)``: the file appears at path whole, or not at all."""
    with _temporary_beside(Path(path), overwrite) as (fd, _):
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f


def atomic_write_with(path, write: Callable[[str], None], *, overwrite: bool = True) -> Path:
    """For writers that want a file name (pyarrow, matplotlib): write(tmp_name), then the same commit as above."""
    with _temporary_beside(Path(path), overwrite) as (fd, tmp):
        os.close(fd)
        write(tmp)
    return Path(path)


def write_text(path, text: str, *, overwrite: bool = True) -> Path:
    with atomic_open(path, "w", overwrite=overwrite) as f:
        f.write(text)
    return Path(path)


def write_json(path, obj, *, indent: int | None = 2, default=None, overwrite: bool = True) -> Path:
    """JSON with a trailing newline; NaN/inf are refused (they are not JSON and other tools choke on them)."""
    with atomic_open(path, "w", overwrite=overwrite) as f:
        json.dump(obj, f, indent=indent, allow_nan=False, default=default)
        f.write("\n")
    return Path(path)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (never a display), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, *, dpi: int = FIGURE_DPI, overwrite: bool = True) -> Path:
    """Write a figure as PNG atomically and close it."""
    try:
        return atomic_write_with(
            path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"), overwrite=overwrite
        )
    finally:
        pyplot().close(fig)
