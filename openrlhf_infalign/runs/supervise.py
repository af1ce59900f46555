"""Running one child process as a demo phase: its own session, a log file, echoed lines, a timeout, peak memory.

A phase (``infalign calibrate``, ``train_ppo`` with its Ray workers and vLLM engine, ...) starts processes of its
own. The child runs in a new session so that everything it starts can be found again, by descendance or by session
id; its process tree's memory is sampled every second, and whatever of it is still alive when the phase ends (or
times out) is ended by pid and start time, never by name.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

__all__ = ["PhaseError", "TreeMonitor", "run_phase", "shorten"]


class TreeMonitor:
    """Samples the RSS of a child process and everything it starts (descendants and its session), every second.

    ``peak_tree_rss`` sums RSS over the processes alive at one instant (pages shared between processes, such as
    the torch libraries, count once per process, so it overstates physical use); ``peak_tree_pss`` sums PSS
    (shared pages split between their users: the physical memory the tree holds), where the kernel reports it;
    ``peak_process_rss`` is the largest single process.
    """

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        import psutil

        self._psutil = psutil
        self.pid = pid
        self.interval = interval
        self.peak_tree_rss = 0
        self.peak_tree_pss = 0
        self.peak_process_rss = 0
        self.seen: Dict[int, float] = {}  # pid -> create_time, to end leftovers by id (never reused pids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _members(self):
        psutil = self._psutil
        procs = {}
        try:
            root = psutil.Process(self.pid)
            procs[root.pid] = root
            for child in root.children(recursive=True):
                procs[child.pid] = child
        except psutil.Error:
            pass
        for proc in psutil.process_iter(["pid"]):
            try:
                if proc.pid not in procs and os.getsid(proc.pid) == self.pid:
                    procs[proc.pid] = proc
            except (OSError, psutil.Error):
                continue
        return procs

    def sample(self) -> None:
        total = total_pss = 0
        for pid, proc in self._members().items():
            try:
                self.seen.setdefault(pid, proc.create_time())
                rss = proc.memory_info().rss
                try:
                    pss = proc.memory_full_info().pss  # /proc/PID/smaps_rollup
                except (self._psutil.Error, AttributeError, OSError):
                    pss = rss
            except self._psutil.Error:
                continue
            total += rss
            total_pss += pss
            self.peak_process_rss = max(self.peak_process_rss, rss)
        self.peak_tree_rss = max(self.peak_tree_rss, total)
        self.peak_tree_pss = max(self.peak_tree_pss, total_pss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def end_leftovers(self, grace: float = 5.0) -> List[int]:
        """SIGTERM, then SIGKILL, every process of this phase still alive (matched by pid AND start time)."""
        psutil = self._psutil
        for pid in self._members():
            try:
                self.seen.setdefault(pid, psutil.Process(pid).create_time())
            except psutil.Error:
                pass
        alive = []
        for pid, created in self.seen.items():
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.Error:
                continue
        for proc in alive:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, still = psutil.wait_procs(alive, timeout=grace)
        for proc in still:
            try:
                proc.kill()
            except psutil.Error:
                pass
        return [p.pid for p in alive]


class PhaseError(RuntimeError):
    pass


def run_phase(
    name: str,
    cmd: Sequence[str],
    log_dir: Path,
    echo: Optional[re.Pattern] = None,
    timeout: float = 1800.0,
    fmt: Optional[Callable[[str], Optional[str]]] = None,
    env: Optional[dict] = None,
    keep: Optional[Callable[[str], bool]] = None,
) -> dict:
    """Run ``cmd`` in its own session; log to ``<log_dir>/<name>.log``; echo lines; measure time and memory.

    Each output line goes to the log whole; on the console, ``fmt(line)`` if it returns text, else the line
    shortened if ``echo`` matches it. Lines for which ``keep(line)`` holds come back under ``"_lines"`` as
    ``(seconds since start, line)``. A nonzero exit or a timeout (the phase's processes are then ended) raises
    :class:`PhaseError` with the log's tail.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    full_env = dict(os.environ, **(env or {}))
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    # every model and tokenizer of a demo or study phase is local: never wait on a hub lookup (no network here)
    full_env.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    lines: List[tuple] = []
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(_quote(c) for c in cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(
            list(cmd),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            env=full_env,
            start_new_session=True,
        )
        monitor = TreeMonitor(proc.pid)
        timed_out = threading.Event()

        def end_on_timeout() -> None:
            timed_out.set()
            monitor.end_leftovers(grace=2.0)

        timer = threading.Timer(timeout, end_on_timeout)
        timer.start()
        try:
            for line in proc.stdout:
                log.write(line)
                now = time.time() - t0
                clean = _strip_ansi(line.rstrip("\n"))
                if keep is not None and keep(clean):
                    lines.append((now, clean))
                shown = fmt(clean) if fmt is not None else None
                if shown is None and echo is not None and echo.search(clean):
                    shown = shorten(clean)
                if shown:
                    print(f"  [{name} {now:6.1f}s] {shown}", flush=True)
            rc = proc.wait()
        finally:
            timer.cancel()
            monitor.sample()
            monitor.stop()
            ended = monitor.end_leftovers()
    seconds = time.time() - t0
    result = {
        "seconds": round(seconds, 2),
        "returncode": rc,
        "peak_tree_rss_mb": round(monitor.peak_tree_rss / 2**20, 1),
        "peak_tree_pss_mb": round(monitor.peak_tree_pss / 2**20, 1),
        "peak_process_rss_mb": round(monitor.peak_process_rss / 2**20, 1),
        "log": str(log_path),
        "ended_leftover_processes": len(ended),
        "_lines": lines,
    }
    # psutil may reap the child it ended on timeout; Popen.wait then reads exit status 0, hence the flag.
    if rc != 0 or timed_out.is_set():
        why = f"timed out after {timeout:g}s" if timed_out.is_set() else f"exit {rc}"
        tail = _tail(log_path, 40)
        raise PhaseError(f"phase {name} failed ({why}) after {seconds:.0f}s; log {log_path}:\n{tail}")
    return result


def _quote(s: str) -> str:
    return s if re.fullmatch(r"[\w./:=,+-]+", s) else json.dumps(s)


def _strip_ansi(s: str) -> str:
    # Ray prefixes worker lines with colour codes; tqdm bars leave carriage returns.
    return re.sub(r"\x1b\[[0-9;]*m", "", s).split("\r")[-1]


def shorten(s: str, n: int = 160) -> str:
    """A line for the console: without Ray's ``(Actor pid=N)`` prefix, at most ``n`` characters."""
    s = re.sub(r"^\(\w+ pid=\d+\)\s*", "", s)
    return s if len(s) <= n else s[: n - 3] + "..."


def _tail(path: Path, n: int) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])
