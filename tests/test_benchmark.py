"""The benchmark's command (the full benchmark runs on purpose, never in tests; these run a tiny one)."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("option", ["--steps", "--batch"])
def test_a_benchmark_without_a_timed_batch_is_refused_before_it_measures(tmp_path, option, capsys):
    from handclip.train.benchmark import main

    with pytest.raises(SystemExit) as stop:
        main([option, "0", "--json", str(tmp_path / "rows.json")])
    assert stop.value.code == 2 and f"{option}=0: give at least 1" in capsys.readouterr().err
    assert not (tmp_path / "rows.json").exists()


def _start(tmp_path, *args: str) -> subprocess.Popen:
    """`python -m handclip.benchmark args` in a new process, Ctrl-C handled as in a terminal (a shell's background
    job would start with it ignored)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", COLUMNS="200")
    return subprocess.Popen(
        [sys.executable, "-m", "handclip.benchmark", *args], cwd=tmp_path, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip


def _wait_for(process: subprocess.Popen, pattern: str, timeout: float = 240) -> list[str]:
    lines, start = [], time.monotonic()
    while time.monotonic() - start < timeout:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if re.search(pattern, line):
            return lines
    process.kill()
    raise AssertionError(f"{pattern!r} never came:\n{''.join(lines)}{process.stderr.read()}")


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_ctrl_c_and_sigterm_stop_a_running_benchmark_with_what_it_measured(tmp_path, signum, status):
    # was: under Lightning, Ctrl-C was taken for the run's own (exit 1, later Ctrl-Cs ignored) and SIGTERM noted and
    # dropped, and the benchmark went on to its next row
    process = _start(tmp_path, "--model", "tiny", "--skip-data", "--policies", "full", "--implementations",
                     "plain,handclip", "--batch", "2", "--steps", "100", "--json", "rows.json")  # fmt: skip
    try:
        _wait_for(process, r"full +plain +\d+\.\d\d samples/s")  # the first row measured
        _wait_for(process, r"full +handclip +measuring")
        time.sleep(4)  # inside Lightning's loop (its row times as many batches as the plain loop's, seconds)
        process.send_signal(signum)
        rest, err = process.communicate(timeout=60)
    finally:
        process.kill()
    name = signal.Signals(signum).name
    assert process.returncode == status, err[-3000:]
    # one line (stderr may also hold a library's warning from its import, e.g. torch's about CUDA_HOME)
    assert err.strip().splitlines()[-1] == f"{name}: benchmark stopped; nothing written to rows.json", err[-3000:]
    assert "Traceback" not in err and err.count("stopped") == 1, err[-3000:]
    shown = rest.split("stopped, the rows measured")[-1]
    assert "stopped, the rows measured" in rest and re.search(r"│ full +│ plain +│ +\d+\.\d\d │", shown), rest
    assert not (tmp_path / "rows.json").exists()


def test_the_help_answers_at_once_and_starts_nothing(tmp_path):
    done = subprocess.run(["make", "-s", "-C", str(ROOT), "bench", "ARGS=--help", "VENV=" + str(tmp_path / "venv"),
                           f"PYTHON={sys.executable}"], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage:") and "--steps" in done.stdout
    assert not (tmp_path / "venv").exists()  # no virtual environment made, nothing installed
