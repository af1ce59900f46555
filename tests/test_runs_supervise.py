"""The demo's phase supervisor: log and console output, nonzero exits, timeouts, and processes left behind."""

import re
import sys
import time

import pytest

psutil = pytest.importorskip("psutil")

from openrlhf_infalign.runs import supervise  # noqa: E402


def _py(code):
    return [sys.executable, "-c", code]


def test_output_is_logged_echoed_kept_and_measured(tmp_path, capsys):
    code = (
        "import time; print('\\x1b[36m(Actor pid=7)\\x1b[0m hello'); print('keep me'); print('FMT x'); print('quiet');"
        " time.sleep(2)"  # alive for at least one memory sample
    )
    result = supervise.run_phase(
        "ok",
        _py(code),
        tmp_path / "logs",
        echo=re.compile(r"hello"),
        fmt=lambda line: "formatted" if line.startswith("FMT") else None,
        keep=lambda line: line.startswith("keep"),
    )
    log = (tmp_path / "logs" / "ok.log").read_text()
    assert log.startswith("$ " + sys.executable + " -c ") and "quiet" in log
    shown = capsys.readouterr().out
    assert "] hello" in shown and "(Actor pid=7)" not in shown  # colour codes and Ray's prefix are dropped
    assert "] formatted" in shown and "quiet" not in shown and "keep me" not in shown
    assert [line for _, line in result["_lines"]] == ["keep me"]
    assert result["returncode"] == 0 and result["log"] == str(tmp_path / "logs" / "ok.log")
    assert result["peak_tree_rss_mb"] > 0 and result["peak_process_rss_mb"] > 0
    assert result["ended_leftover_processes"] == 0


def test_nonzero_exit_raises_with_the_logs_tail(tmp_path):
    with pytest.raises(supervise.PhaseError, match=r"phase bad failed \(exit 3\)(.|\n)*last words"):
        supervise.run_phase("bad", _py("print('last words'); raise SystemExit(3)"), tmp_path)


def test_processes_left_behind_are_ended_by_pid(tmp_path):
    # The grandchild leaves the child's process tree when the child exits, but stays in its session.
    code = (
        "import subprocess, sys\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'],"
        " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
        "print('grandchild', p.pid)\n"
    )
    result = supervise.run_phase("leftover", _py(code), tmp_path, keep=lambda line: line.startswith("grandchild"))
    pid = int(result["_lines"][0][1].split()[1])
    assert result["ended_leftover_processes"] == 1
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {pid} still running")


def test_timeout_ends_the_phase(tmp_path):
    t0 = time.time()
    with pytest.raises(supervise.PhaseError, match=r"phase slow failed \(timed out after 1s\)"):
        supervise.run_phase("slow", _py("import time; time.sleep(60)"), tmp_path, timeout=1.0)
    assert time.time() - t0 < 30


def test_shorten_drops_rays_prefix_and_cuts_long_lines():
    assert supervise.shorten("(LLMActor pid=12) hello") == "hello"
    assert supervise.shorten("x" * 300, 20) == "x" * 17 + "..."
