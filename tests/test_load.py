"""The load watcher (autotune/load.py): real busy processes, bounded to a second or two each.

These machines are shared: other processes may load them while the tests run, so the tests assert
what a busy process of their own adds (or does not add), never that the machine is quiet.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from typing import Any

import pytest

from autotune import load
from autotune.load import threshold_cores, wait_for_quiet, watch
from autotune.measure import Measurement

SPIN = "import time\nend = time.time() + {s}\nwhile time.time() < end:\n    pass\n"


def spin_elsewhere(seconds: float) -> int:
    """A busy process that is not this one's descendant (started by a shell that exits at once, so it
    is re-parented): another user's job, as far as the watcher can tell. It ends itself."""
    out = subprocess.run(
        ["sh", "-c", '"$0" -c "$1" >/dev/null 2>&1 & echo $!', sys.executable, SPIN.format(s=seconds)],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(out.stdout.strip())
    time.sleep(0.15)  # let it start spinning
    return pid


def test_a_busy_process_elsewhere_disturbs_the_window() -> None:
    pid = spin_elsewhere(1.5)
    with watch() as w:
        time.sleep(0.8)
    r = w.result()
    # One spinning process gets at least a good part of a core even on a loaded 2-core machine.
    assert r["other_cpu_cores"] >= 0.3 and r["disturbed"]
    assert "other processes used" in r["reason"]
    assert r["own_cpu_cores"] < 0.2  # this process slept
    assert pid in [p["pid"] for p in r["top_other"]] or len(r["top_other"]) == load.TOP_OTHERS
    assert len(r["loadavg_start"]) == 3 and len(r["loadavg_end"]) == 3
    assert load.is_disturbed(r) and "cores" in load.describe(r)


def test_own_children_and_their_children_are_not_other() -> None:
    """A server the trial starts (here a shell running a spinning Python: a grandchild) is the trial's own."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with watch() as w:
        proc = subprocess.Popen(["sh", "-c", '"$0" -c "$1"', sys.executable, SPIN.format(s=0.8)])
        time.sleep(0.4)
        live = [c.pid for c in load._tree([os.getpid()]).values()]
        proc.wait()
    r = w.result()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    spent = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert proc.pid in live and len(live) >= 3  # this process, the shell, and the spinner below it
    assert spent > 0.2
    # Everything the tree spent is its own (clock ticks of slack), none of it "other".
    assert r["own_cpu_cores"] * r["window_s"] >= 0.8 * spent - 0.05
    assert proc.pid not in [p["pid"] for p in r["top_other"]]


def test_the_threshold_is_a_quarter_core_on_small_machines_and_a_sixteenth_on_large() -> None:
    assert threshold_cores(2) == threshold_cores(4) == load.DISTURBED_MIN_CORES == 0.25
    assert threshold_cores(16) == 1.0 and threshold_cores(64) == 4.0


def test_waiting_for_quiet_gives_up_after_its_limit_while_the_load_goes_on() -> None:
    spin_elsewhere(1.5)
    t = time.monotonic()
    r = wait_for_quiet(0.5, interval_s=0.25)
    assert not r["quiet"] and r["disturbed"] and r["waited_s"] >= 0.5
    assert time.monotonic() - t < 1.2


def test_waiting_for_quiet_returns_at_the_first_quiet_window(monkeypatch: pytest.MonkeyPatch) -> None:
    script = iter([True, True, False, True])

    class Fake:
        def __enter__(self) -> Fake:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def result(self) -> dict[str, Any]:
            return {"disturbed": next(script), "other_cpu_cores": 0.0}

    monkeypatch.setattr(load, "watch", lambda *a, **k: Fake())
    r = wait_for_quiet(10.0, interval_s=0.01)
    assert r["quiet"] and r["waited_s"] < 1.0 and next(script) is True  # the fourth window never ran


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A pynvml with one GPU: this process (2 GiB, 70% SMs) and another (1 GiB, 30% SMs)."""
    state: dict[str, Any] = {"procs": [(os.getpid(), 2 << 30), (999_999, 1 << 30)], "sm": {999_999: 30.0}}
    state["sm"][os.getpid()] = 70.0
    mod = types.ModuleType("pynvml")
    proc = types.SimpleNamespace
    mod.nvmlInit = lambda: None  # type: ignore[attr-defined]
    mod.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    mod.nvmlDeviceGetHandleByIndex = lambda i: ("gpu", i)  # type: ignore[attr-defined]
    mod.nvmlDeviceGetComputeRunningProcesses = lambda h: [  # type: ignore[attr-defined]
        proc(pid=pid, usedGpuMemory=mem) for pid, mem in state["procs"]
    ]
    mod.nvmlDeviceGetGraphicsRunningProcesses = lambda h: []  # type: ignore[attr-defined]
    mod.nvmlDeviceGetProcessUtilization = lambda h, since: [  # type: ignore[attr-defined]
        proc(pid=pid, smUtil=sm, timeStamp=since + 1) for pid, sm in state["sm"].items()
    ]
    monkeypatch.setitem(sys.modules, "pynvml", mod)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    yield state


def test_gpu_other_processes_come_from_nvml(fake_nvml: dict[str, Any]) -> None:
    with watch(device="cuda:0") as w:
        pass
    r = w.result()
    assert r["gpu_pids_comparable"] and r["gpu_other_memory_mb"] == 1024.0
    assert r["gpu_other_processes"] == [{"pid": 999_999, "memory_mb": 1024.0, "sm_pct": 30.0}]
    assert r["gpu_other_sm_pct"] == 30.0 and r["disturbed"] and "GPU" in r["reason"]


def test_gpu_processes_that_cannot_be_told_apart_flag_nothing(fake_nvml: dict[str, Any]) -> None:
    """In a container NVML may give the host's pids: this process is not in its list, so every process
    would look like another's; the GPU is then reported, never flagged."""
    fake_nvml["procs"] = [(123_456, 2 << 30)]
    fake_nvml["sm"] = {123_456: 90.0}
    with watch(device="cuda:0") as w:
        pass
    r = w.result()
    assert not r["gpu_pids_comparable"] and "gpu_other_sm_pct" not in r
    assert "GPU" not in r.get("reason", "")


def test_without_pynvml_the_gpu_is_skipped_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    with watch(device="cuda:0") as w:
        pass
    assert not any(k.startswith("gpu_") for k in w.result())


def test_the_background_round_trips_through_the_measurement_and_the_store() -> None:
    from autotune.store import measurement_columns
    from autotune.store.models import Trial

    with watch() as w:
        pass
    lat = {k: 1.0 for k in ("p50", "p90", "p95", "p99", "mean", "max")}
    m = Measurement(1.0, 1.0, 1, 1, 1.0, lat, lat, lat, lat, 1.0, 1.0, "none", background=w.result())
    assert Measurement.from_dict(m.to_dict()) == m
    from autotune.store import measurement_dict

    row = Trial(**{k: v for k, v in measurement_columns(m.to_dict()).items()})
    assert measurement_dict(row)["background"] == m.background  # type: ignore[index]
    unwatched = Measurement(1.0, 1.0, 1, 1, 1.0, lat, lat, lat, lat, 1.0, 1.0, "none")
    assert "background" not in measurement_columns(unwatched.to_dict())["metrics"]


def test_the_quiet_estimate_gives_back_the_cores_others_took() -> None:
    """Own tree 0.66 of 2 cores, others 1.34: x3.03. Not disturbed, too little own time to scale,
    or a GPU-only disturbance: no estimate."""
    bg = {"own_cpu_cores": 0.66, "other_cpu_cores": 1.34, "cores": 2, "disturbed": True}
    assert load.quiet_factor(bg) == pytest.approx(2 / 0.66)
    assert load.quiet_factor({**bg, "other_cpu_cores": 3.0}) == pytest.approx(2 / 0.66)  # at most cores / own
    assert load.quiet_factor({**bg, "disturbed": False}) is None
    assert load.quiet_factor({**bg, "own_cpu_cores": 0.05}) is None
    assert load.quiet_factor({**bg, "other_cpu_cores": 0.1, "gpu_other_sm_pct": 50.0}) is None
    assert load.quiet_factor(None) is None
    lat = {k: 300.0 for k in ("p50", "p90", "p95", "p99", "mean", "max")}
    m = Measurement(100.0, 3.0, 9, 90, 1.0, lat, lat, lat, lat, 8.0, 1.0, "none", e2e_samples_ms=[300.0])
    est = m.scaled(3.0)
    assert (est.output_tokens_per_s, est.requests_per_s, est.e2e_ms["p95"], est.tpot_ms["p50"]) == (300, 9, 100, 100)
    assert est.e2e_samples_ms == [100.0] and est.output_tokens == 90  # counts are what was measured
    assert m.output_tokens_per_s == 100.0  # the measurement itself is left as measured
