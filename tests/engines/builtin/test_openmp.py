"""The caller's OpenMP pool is freed before the stream workers compute (engines/builtin/openmp.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from autotune.config import TrialConfig
from autotune.engines.builtin import engine as engine_module
from autotune.engines.builtin.engine import Engine
from autotune.hardware import probe

needs_two_cores = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="an OpenMP pool needs 2 cores")

#: A fresh process with OpenMP's default wait policy: the main thread computes (its pool), then a
#: second thread runs many short parallel regions; prints that thread's voluntary context switches.
PROBE = """
import json, resource, sys, threading, torch
from autotune.engines.builtin.openmp import release_thread_pool
torch.set_num_threads(2)
a = torch.ones(1 << 20)
(a + a).sum()                       # the main thread's pool
if sys.argv[1] == "release":
    release_thread_pool()
out = {}
def work():
    (a + a).sum()                   # this thread's pool
    before = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
    for _ in range(2000):
        a.add_(1.0)                 # one parallel region each
    out["switches"] = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - before
t = threading.Thread(target=work)
t.start()
t.join()
print(json.dumps(out))
"""


#: A fresh process: a thread gets a pool by computing, then frees it; prints its thread counts.
FREE = """
import json, os, threading, time, torch
from autotune.engines.builtin.openmp import release_thread_pool
torch.set_num_threads(2)
seen = {}
def threads():
    return len(os.listdir("/proc/self/task"))
def on_a_fresh_thread():
    x = torch.ones(1 << 20)
    (x + x).sum()                   # a parallel region: this thread's pool, one helper thread
    seen["with_pool"] = threads()
    seen["released"] = release_thread_pool()
    deadline = time.monotonic() + 5
    while threads() >= seen["with_pool"] and time.monotonic() < deadline:
        time.sleep(0.01)
    seen["after"] = threads()
t = threading.Thread(target=on_a_fresh_thread)
t.start()
t.join()
print(json.dumps(seen))
"""


def _probe(script: str, *args: str) -> dict[str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, check=True)
    return {k: int(v) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


@needs_two_cores
def test_release_frees_the_calling_threads_pool() -> None:
    seen = _probe(FREE)
    assert seen["released"] == 1
    assert seen["after"] == seen["with_pool"] - 1


@needs_two_cores
def test_a_second_threads_pool_spins_only_once_the_first_is_freed() -> None:
    """The cause, measured: with two pools on two cores each parallel region is a futex sleep."""
    kept, released = _probe(PROBE, "keep")["switches"], _probe(PROBE, "release")["switches"]
    assert kept > 500, f"two pools: expected a sleep per region, saw {kept} switches in 2000 regions"
    assert released < kept / 4, f"one pool: {released} switches vs {kept} with two"


def test_engine_start_frees_the_building_threads_pool_on_a_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(engine_module, "release_thread_pool", lambda: calls.append(threading.current_thread().name))
    engine = Engine.build("preset:llama-tiny", TrialConfig(batch_size=2), probe("cpu"))
    with engine:
        assert calls == [threading.current_thread().name]
        engine.generate([[5, 6, 7]], max_new_tokens=2)
