"""Putting a store directory in place: only ever over what this project wrote, and never leaving a reader with none.

A store is written whole into a hidden ``.NAME.partial-PID-*`` directory beside its target, then moved into place.
What the target may be, checked before any work (``check_target``) and again just before the move:

* nothing, or an empty directory: the temp directory is renamed onto it;
* a store this project wrote, recognised by its manifest and holding nothing but a store's files, and only with
  ``overwrite``: the two directories are swapped in one step (Linux ``renameat2(RENAME_EXCHANGE)``), so a reader
  opening the path finds the old store or the new one, never neither; the old one is then deleted;
* anything else is refused: a plain file, a folder with other content, a folder holding (or inside) one of the
  writer's own input files.

Where the swap is not available (another OS, a filesystem without it) the old store is moved aside and the new one
renamed in (two renames); readers wait out that gap (``wait_for_writer``). A writer killed between the two renames
leaves the old store aside as ``.NAME.old-PID-*``; ``recover`` puts it back on the next write or open.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import re
import shutil
import tempfile
import time
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable

from ..files import check_parent_is_dir
from .format import INDEX_DIR, INDEX_FILES, MANIFEST, PARQUET, StoreError

__all__ = ["check_target", "commit_dir", "exchange", "index_problem", "recover", "store_problem", "wait_for_writer"]

RENAME_EXCHANGE = 2
_AT_FDCWD = -100
# renameat2's system call number where glibc is too old to wrap it (< 2.28).
_SYS_RENAMEAT2 = {"x86_64": 316, "aarch64": 276, "ppc64le": 357, "s390x": 347}
# Hidden leftovers of our own writers that may sit inside a store: an index rebuild's temp dirs, a manifest's temp.
_OUR_HIDDEN = re.compile(r"^\.(index\.(partial|old)-\d+-.*|manifest\.json\..*\.tmp)$")
# How long a reader waits for a writer that moved a store aside (two-rename fallback) to put the new one in place.
WAIT_FOR_WRITER_S = 10.0


@lru_cache(maxsize=1)
def _renameat2() -> Callable[[bytes, bytes, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        return lambda a, b, flags: fn(_AT_FDCWD, a, _AT_FDCWD, b, flags)
    number = _SYS_RENAMEAT2.get(platform.machine()) if platform.system() == "Linux" else None
    if number is None:
        return None
    sc = libc.syscall
    sc.restype = ctypes.c_long
    return lambda a, b, flags: sc(
        ctypes.c_long(number), ctypes.c_int(_AT_FDCWD), a, ctypes.c_int(_AT_FDCWD), b, ctypes.c_uint(flags)
    )


def exchange(a, b) -> bool:
    """Swap the paths a and b (both must exist) in one atomic step; False when this system or filesystem cannot,
    so the caller falls back to something else. Other failures raise OSError."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(os.fsencode(str(a)), os.fsencode(str(b)), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


# ---- what a directory is --------------------------------------------------------------------------------------


def _listing(names: Iterable[str], limit: int = 5) -> str:
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def index_problem(path: Path) -> str | None:
    """None when path is an index directory (only the index's .npy files); else what else it holds."""
    try:
        foreign = [p.name + ("/" if p.is_dir() else "") for p in Path(path).iterdir() if p.name not in INDEX_FILES]
    except NotADirectoryError:
        return "it is a file"
    return f"it holds files that are not part of a store's index: {_listing(foreign)}" if foreign else None


def store_problem(path: Path) -> str | None:
    """None when path is a store this project wrote: a manifest.json that reads as a store manifest, and no entry
    but the store's own (manifest, Parquet data, index/ with its .npy files, our writers' hidden leftovers).
    Otherwise why it is not, in words for an error message."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        return f"it has no {MANIFEST}"
    try:
        man = json.loads(mf.read_bytes())
    except (OSError, ValueError):
        return f"its {MANIFEST} is not readable JSON"
    if not isinstance(man, dict) or not isinstance(man.get("format_version"), int) or "num_prompts" not in man:
        return f"its {MANIFEST} is not a reference store manifest"
    foreign = []
    for p in path.iterdir():
        if p.name in (MANIFEST, PARQUET):
            if not p.is_file():
                foreign.append(p.name + "/")
        elif p.name == INDEX_DIR:
            problem = index_problem(p)
            if problem:
                foreign.append(f"{INDEX_DIR}/ ({problem})")
        elif not _OUR_HIDDEN.match(p.name):
            foreign.append(p.name + ("/" if p.is_dir() else ""))
    if foreign:
        return f"it holds files that are not part of a store: {_listing(foreign)}"
    return None


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _check_inputs(given: Path, real: Path, inputs: Iterable) -> None:
    for inp in inputs:
        if inp is None or str(inp) == "":
            continue
        p = Path(inp)
        if not (p.exists() or p.is_symlink()):
            continue  # a hub id or URL, not a local file: nothing of it can be deleted here
        for rp in {Path(os.path.abspath(p)), Path(os.path.realpath(p))}:
            if _within(rp, real):
                where = "the same path as" if rp == real else "inside"
                raise StoreError(
                    f"input {inp} is {where} the output {given}: writing the store there would delete it; "
                    "choose another output path"
                )
            if rp.is_dir() and _within(real, rp):
                raise StoreError(
                    f"output {given} is inside the input folder {inp}: the store would be mixed into the input (and "
                    "read as part of it next time); choose an output path outside it"
                )


def check_target(out_dir, *, overwrite: bool, inputs: Iterable = (), problem=store_problem) -> Path:
    """Whether a store may be written at out_dir; returns the real path it will be written to (symbolic links
    resolved) or raises StoreError saying why not and what to do.

    Allowed: a new path, an empty directory, or (with overwrite) a directory that ``problem`` recognises as ours
    (default: a store this project wrote). Refused always: a plain file, a directory with other content, an output
    that is, holds or sits inside one of ``inputs`` (the writer's own input paths; ones that do not exist locally,
    such as hub model ids, are skipped).
    """
    given = Path(out_dir)
    if given.is_symlink() and not given.exists():
        raise StoreError(f"{given} is a symbolic link to a missing path; give the store's real location")
    real = Path(os.path.realpath(given))
    _check_inputs(given, real, inputs)
    if real.exists():
        if not real.is_dir():
            raise StoreError(
                f"{given} is a file, not a store directory; a store never replaces a file: choose a new directory"
            )
        try:
            empty = not any(real.iterdir())
        except OSError as e:
            raise StoreError(f"{given}: cannot list the directory ({e.strerror})") from None
        if not empty:
            why = problem(real)
            if why:
                raise StoreError(
                    f"{given} is not a reference store ({why}); only a new or empty directory or an earlier store "
                    "is written over: choose another path, or move its contents away"
                )
            if not overwrite:
                raise StoreError(f"{given} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    else:
        check_parent_is_dir(real, str(given), StoreError)
    return real


# ---- after a kill ---------------------------------------------------------------------------------------------


def _leftovers(out_dir: Path, kind: str, alive: bool = False) -> list[Path]:
    """`.NAME.<kind>-PID-*` directories beside out_dir whose writer process is gone (alive=True: still running)."""
    found = []
    for p in sorted(out_dir.parent.glob(f".{out_dir.name}.{kind}-*")):
        try:
            pid = int(p.name.rsplit(f".{kind}-", 1)[1].split("-", 1)[0])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
            running = True
        except ProcessLookupError:
            running = False
        except PermissionError:  # another user's live process
            running = True
        if running == alive and (alive or pid != os.getpid()):
            found.append(p)
    return found


def recover(out_dir) -> None:
    """Clean up after writers to out_dir that were killed: drop their temp dirs; if one died between its two
    renames (fallback path), the old complete store it moved aside is put back."""
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return
    for p in _leftovers(out_dir, "partial"):
        shutil.rmtree(p, ignore_errors=True)
    for p in _leftovers(out_dir, "old"):
        if not out_dir.exists():
            try:
                os.rename(p, out_dir)
            except OSError:
                pass  # someone else put a store there first
        else:
            shutil.rmtree(p, ignore_errors=True)


def wait_for_writer(path, timeout: float = WAIT_FOR_WRITER_S) -> bool:
    """path is missing: if a live writer has just moved a store aside (two-rename fallback), wait until something
    is at path again; True when it is. False at once when no writer is at work."""
    path = Path(path)
    if not path.name or not path.parent.is_dir():
        return False
    deadline = time.monotonic() + timeout
    while _leftovers(path, "old", alive=True):
        if path.exists():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return path.exists()


# ---- the commit ----------------------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _swap_in(tmp: Path, real: Path, given: Path, problem) -> None:
    """Put the complete directory tmp at real, where an earlier store of ours is, and delete that one."""
    if exchange(tmp, real):
        # tmp now holds what was at real: a store of ours a moment ago. Should anything else have been put there
        # since the last check, swap it back untouched and stop.
        why = problem(tmp)
        if why:
            exchange(tmp, real)
            raise StoreError(f"{given} changed while the store was written ({why}); not replacing it")
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = real.parent / f".{real.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(real, old)
    why = problem(old)
    if why:
        os.rename(old, real)
        raise StoreError(f"{given} changed while the store was written ({why}); not replacing it")
    try:
        os.rename(tmp, real)
    except BaseException:
        os.rename(old, real)
        raise
    shutil.rmtree(old, ignore_errors=True)


def commit_dir(
    out_dir, overwrite: bool, fill: Callable[[Path], None], *, inputs: Iterable = (), problem=store_problem
) -> Path:
    """Run fill(tmp) on a fresh temp dir beside out_dir, then put it in place (the commit point; see the module
    docstring for what may be replaced). Returns the real path written. Nothing is left behind on failure."""
    given = Path(out_dir)
    inputs = list(inputs)
    real = check_target(given, overwrite=overwrite, inputs=inputs, problem=problem)
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise StoreError(f"{given}: a file stands where one of its parent directories should be") from None
    recover(real)
    tmp = Path(tempfile.mkdtemp(prefix=f".{real.name}.partial-{os.getpid()}-", dir=real.parent))
    try:
        fill(tmp)
        fsync_dir(tmp)
        # The world may have changed during fill (minutes, for a big store): check again right before the move.
        real = check_target(given, overwrite=overwrite, inputs=inputs, problem=problem)
        if real.is_dir() and any(real.iterdir()):
            _swap_in(tmp, real, given, problem)
        else:
            try:
                os.rename(tmp, real)  # onto nothing, or atomically over an empty directory
            except OSError as e:
                if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                    raise StoreError(f"{given} appeared while the store was written; not replacing it") from None
                raise
        fsync_dir(real.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return real
