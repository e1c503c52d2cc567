"""One measurement per device at a time across processes: a second process waits, saying so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autotune import devicelock
from autotune.devicelock import device_key, measuring_on

HOLD = """
import json, sys, time
from autotune.devicelock import measuring_on
device, seconds, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
with measuring_on(device, "test holder"):
    start = time.time()
    print("holding", flush=True)
    time.sleep(seconds)
    end = time.time()
with open(out, "w") as f:
    json.dump([start, end], f)
"""


def hold(device: str, seconds: float, out: Path, lock_dir: Path) -> subprocess.Popen[str]:
    """A process that measures on ``device`` for ``seconds`` and writes when it did to ``out``."""
    env = {**os.environ, devicelock.LOCK_DIR_ENV: str(lock_dir)}
    return subprocess.Popen(
        [sys.executable, "-c", HOLD, device, str(seconds), str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def started(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"


def test_a_second_process_waits_for_the_device_and_says_so(tmp_path: Path) -> None:
    first = hold("cpu", 1.5, tmp_path / "a.json", tmp_path)
    started(first)
    second = hold("cpu", 0.2, tmp_path / "b.json", tmp_path)
    _, err = second.communicate(timeout=30)
    first.communicate(timeout=30)
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert b[0] >= a[1]  # the second measured only once the first had finished
    assert "waiting for cpu: another autotune process is measuring on it (pid" in err and "test holder" in err


def test_other_devices_measure_side_by_side(tmp_path: Path) -> None:
    first = hold("cuda:0", 1.5, tmp_path / "a.json", tmp_path)
    started(first)
    second = hold("cuda:1", 0.2, tmp_path / "b.json", tmp_path)
    _, err = second.communicate(timeout=30)
    first.communicate(timeout=30)
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert b[0] < a[1] and "waiting" not in err


def test_a_killed_holder_frees_the_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = hold("cpu", 60, tmp_path / "a.json", tmp_path)
    started(first)
    first.kill()
    first.wait()
    monkeypatch.setenv(devicelock.LOCK_DIR_ENV, str(tmp_path))
    t = time.monotonic()
    with measuring_on("cpu"):
        pass
    assert time.monotonic() - t < 5


def test_the_lock_is_reentrant_within_a_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(devicelock.LOCK_DIR_ENV, str(tmp_path))
    with measuring_on("cpu"), measuring_on("cpu"):  # a nested hold must not wait on itself
        pass


def test_device_keys_follow_the_physical_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert device_key("cpu") == "cpu" and device_key("cuda") == device_key("cuda:0") == "cuda-0"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert device_key("cuda:0") == "cuda-2" and device_key("cuda:1") == "cuda-3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f3a/../x")
    assert device_key("cuda:0") == "cuda-GPU-8f3a____x"  # a UUID, never a path
