"""One writer per run directory, prior and study: a second writer is refused with one line and
exit code 2, the first writer's files stay intact, and a killed writer's lock is taken over."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from difftime.errors import DifftimeError
from difftime.io import exclusive_lock
from difftime.run import LOCK_FILE, load_run

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
CLI = [sys.executable, "-m", "difftime.cli"]


def _wait_for_holder(lock: Path, pid: int, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lock.is_file() and f"process {pid} " in lock.read_text():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"{lock} never named process {pid}")


def test_a_second_trainer_is_refused_and_a_killed_ones_lock_is_taken_over(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    first = subprocess.Popen([*CLI, "train", "--resume", str(run), "--steps", "1000000", "--no-progress"],
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_holder(run / LOCK_FILE, first.pid, first)
        second = subprocess.run([*CLI, "train", "--resume", str(run), "--steps", "1000000"], env=ENV,
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        err = second.stderr.strip()
        assert "\n" not in err and "Traceback" not in err
        assert f"is being written by process {first.pid} " in err and "difftime" in err
    finally:
        first.kill()
        first.wait()
    # The killed writer leaves a complete checkpoint and its lock file; the kernel released the lock.
    assert (run / LOCK_FILE).is_file()
    step = load_run(run).step
    third = subprocess.run([*CLI, "train", "--resume", str(run), "--steps", str(step + 3), "--no-progress"],
                           env=ENV, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr
    assert load_run(run).step == step + 3


def test_the_lock_names_its_holder_and_is_reentrant_in_one_process(tmp_path):
    lock = tmp_path / "x.lock"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from difftime.io import exclusive_lock\n"
        f"with exclusive_lock({str(lock)!r}, 'thing'):\n    print('held', flush=True); time.sleep(600)")],
        env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DifftimeError, match=rf"thing is being written by process {holder.pid} "):
            with exclusive_lock(lock, "thing"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive_lock(lock, "thing"), exclusive_lock(lock, "thing"):  # taken over, then re-entered
        assert f"process {os.getpid()} " in lock.read_text()
