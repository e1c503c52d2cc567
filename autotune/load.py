"""How busy the machine was with OTHER processes while a trial measured.

A trial's figure is only worth comparing with another's when both had the machine to themselves:
on a 2-core CPU one busy process elsewhere takes half the cores the trial was measuring on. The
kernel counts CPU time per CPU (``/proc/stat``) and per process; the CPU time spent on this
process's CPUs minus what this process tree used (its threads, the servers and workers it
started) is what everything else took. On CUDA, NVML names the other processes on the device,
their memory and, where the driver samples it, their share of the SMs.

Use::

    with watch(device="cuda:0") as w:   # own tree: this process and its descendants
        ... measure ...
    w.result()  # {"other_cpu_cores": 0.03, "disturbed": False, ...}

Everything here reads counters before and after; nothing runs during the window.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil

#: A window is disturbed when other processes used at least this many cores on average ...
DISTURBED_MIN_CORES = 0.25
#: ... or this share of the CPUs this process may run on, whichever is larger.
#:
#: Why these: a trial runs its tensor threads on every core it may use, so a process taking x of
#: n cores takes roughly x/n of its throughput. On the 2-4 core machines this runs on, a quarter
#: core is 6-12% of the machine: the size of ``budget.confirm_tolerance_pct`` (10%), the smallest
#: difference the tuner is asked to trust, while a quiet machine's daemons, the tuner's heartbeat
#: and the database stay under 0.1 of a core. On larger machines the same 1/16 of the machine
#: (0.25 at 4 cores, 1 core at 16) keeps that meaning without flagging every cron job.
DISTURBED_SHARE = 1 / 16
#: On a GPU: other processes' mean SM utilization (NVML samples) at or above this is disturbed.
#: Another process that merely holds memory (an idle context) is reported, not flagged.
GPU_DISTURBED_SM_PCT = 10.0
#: How many of the busiest other processes a result names.
TOP_OTHERS = 3

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


def threshold_cores(cores: int) -> float:
    """Other processes' average cores at which a window of a trial using ``cores`` CPUs is disturbed."""
    return max(DISTURBED_MIN_CORES, DISTURBED_SHARE * cores)


def _my_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity): load on other CPUs does not take its cores."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(psutil.cpu_count() or 1))


def _cpu_busy_s(cpus: set[int]) -> tuple[float, float]:
    """(busy, steal) CPU seconds since boot on ``cpus``, all processes and the hypervisor together.

    Busy is user + nice + system + irq + softirq + steal (guest time is already inside user/nice);
    steal is time the hypervisor gave another machine: load from outside this one.
    """
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        t = psutil.cpu_times()
        busy = sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
        return busy, getattr(t, "steal", 0.0)
    busy = steal = 0.0
    for line in lines:
        head, _, rest = line.partition(" ")
        if not head.startswith("cpu") or head == "cpu" or int(head[3:]) not in cpus:
            continue
        f = [int(x) for x in rest.split()] + [0] * 10
        user, nice, system, _idle, _iowait, irq, softirq, st = f[:8]
        busy += (user + nice + system + irq + softirq + st) * _TICK_S
        steal += st * _TICK_S
    return busy, steal


def _tree(roots: Iterable[int]) -> dict[int, psutil.Process]:
    """``roots`` and all their descendants, by pid (processes that are gone are left out)."""
    procs: dict[int, psutil.Process] = {}
    for pid in roots:
        try:
            p = psutil.Process(pid)
            procs[p.pid] = p
            for c in p.children(recursive=True):
                procs[c.pid] = c
        except psutil.Error:
            continue
    return procs


def _cpu_s(p: psutil.Process) -> float:
    """A process's CPU seconds, its reaped children's included (a child that exits mid-window moves
    its time into its parent's ``children_*`` counters, so the tree's total stays whole)."""
    try:
        t = p.cpu_times()
    except psutil.Error:
        return 0.0
    return float(t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0))


def _others(own: set[int]) -> dict[int, tuple[str, float]]:
    """Every other process's (name, own CPU seconds), to name the busiest."""
    out: dict[int, tuple[str, float]] = {}
    for p in psutil.process_iter(["name", "cpu_times"]):
        if p.pid in own or p.info.get("cpu_times") is None:
            continue
        t = p.info["cpu_times"]
        out[p.pid] = (str(p.info.get("name") or "?"), float(t.user + t.system))
    return out


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


# -- GPU (NVML, optional) -------------------------------------------------------------------------
def _nvml() -> Any:
    """pynvml, initialized; None without it or without a driver."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver, no device, a container without NVML
        return None
    return pynvml


def _nvml_handle(nvml: Any, device: str) -> Any:
    """The NVML handle of ``device`` (``cuda`` / ``cuda:N``), through ``CUDA_VISIBLE_DEVICES``
    (indices or UUIDs) since NVML numbers every GPU on the machine; None when it cannot be told."""
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    target = visible[index] if index < len(visible) else str(index) if not visible else None
    if target is None:
        return None
    try:
        if target.isdigit():
            return nvml.nvmlDeviceGetHandleByIndex(int(target))
        return nvml.nvmlDeviceGetHandleByUUID(target)
    except Exception:  # MIG instances and other names NVML does not take this way
        return None


def _gpu(device: str, own: set[int], since_s: float) -> dict[str, Any]:
    """Other processes on ``device`` now, with their memory, and their mean SM use since ``since_s``.

    In a container NVML may report the host's process ids: then this process tree's own ids are
    absent from its list, nothing can be told apart (``gpu_pids_comparable`` false) and nothing is
    flagged from the GPU.
    """
    nvml = _nvml()
    if nvml is None:
        return {}
    try:
        handle = _nvml_handle(nvml, device)
        if handle is None:
            return {}
        procs: dict[int, float] = {}
        for getter in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            try:
                for p in getattr(nvml, getter)(handle):
                    used = getattr(p, "usedGpuMemory", None)
                    procs[int(p.pid)] = float(used) / 2**20 if isinstance(used, int) else 0.0
            except Exception:
                continue
        sm: dict[int, list[float]] = {}
        try:
            for s in nvml.nvmlDeviceGetProcessUtilization(handle, int(since_s * 1e6)):
                sm.setdefault(int(s.pid), []).append(float(s.smUtil))
        except Exception:  # no samples in the window, or not supported here
            sm = {}
        comparable = bool(own & set(procs))
        other = {pid: mb for pid, mb in procs.items() if pid not in own}
        other_sm = sum(sum(v) / len(v) for pid, v in sm.items() if pid not in own and v) if comparable else 0.0
        out: dict[str, Any] = {
            "gpu_other_processes": [
                {
                    "pid": pid,
                    "memory_mb": round(mb, 1),
                    **({"sm_pct": round(sum(sm[pid]) / len(sm[pid]), 1)} if sm.get(pid) else {}),
                }
                for pid, mb in sorted(other.items(), key=lambda x: -x[1])
            ],
            "gpu_other_memory_mb": round(sum(other.values()), 1),
            "gpu_pids_comparable": comparable,
        }
        if sm and comparable:
            out["gpu_other_sm_pct"] = round(other_sm, 1)
        return out
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


# -- the watcher ----------------------------------------------------------------------------------
class Watch:
    """Counters at the start of a window; :meth:`result` compares them with the end's.

    ``own_pids``: the roots of the process tree being measured (default: this process), called at
    the start and at the end, so servers and workers started in between count as own (their
    descendants always do). ``device``: ``cuda[:N]`` to ask NVML about the GPU too.
    """

    def __init__(self, own_pids: Callable[[], Iterable[int]] | None = None, device: str | None = None) -> None:
        self._own_pids = own_pids or (lambda: [os.getpid()])
        self._device = device if device and device.startswith("cuda") else None
        self._result: dict[str, Any] | None = None

    def __enter__(self) -> Watch:
        self._cpus = _my_cpus()
        tree = _tree(self._own_pids())
        self._own_start = {pid: _cpu_s(p) for pid, p in tree.items()}
        self._others_start = _others(set(tree))
        self._load_start = _loadavg()
        self._wall = time.time()
        self._t0 = time.perf_counter()
        self._busy0, self._steal0 = _cpu_busy_s(self._cpus)
        self._result = None
        return self

    def __exit__(self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._result = self._finish()

    def result(self) -> dict[str, Any]:
        """The window's figures (see the module docstring); the window so far when still open."""
        return self._result if self._result is not None else self._finish()

    def _finish(self) -> dict[str, Any]:
        busy1, steal1 = _cpu_busy_s(self._cpus)
        window = max(time.perf_counter() - self._t0, 1e-6)
        tree = _tree(self._own_pids())
        # A start-time process that is gone now was reaped by a tree member, which holds its time now.
        own_s = sum(_cpu_s(p) for p in tree.values()) - sum(self._own_start.values())
        own_s = max(own_s, 0.0)
        other_s = max(busy1 - self._busy0 - own_s, 0.0)
        cores = len(self._cpus)
        other_cores = other_s / window
        limit = threshold_cores(cores)
        out: dict[str, Any] = {
            "window_s": round(window, 3),
            "cores": cores,
            "busy_cpu_cores": round((busy1 - self._busy0) / window, 3),
            "own_cpu_cores": round(own_s / window, 3),
            "other_cpu_cores": round(other_cores, 3),
            "other_cpu_share": round(other_cores / cores, 3) if cores else 0.0,
            "steal_cpu_cores": round((steal1 - self._steal0) / window, 3),
            "threshold_cores": limit,
            "top_other": self._top_other(set(tree), window),
        }
        if self._load_start is not None:
            out["loadavg_start"] = self._load_start
        end = _loadavg()
        if end is not None:
            out["loadavg_end"] = end
        if self._device is not None:
            out.update(_gpu(self._device, set(tree) | set(self._own_start), self._wall))
        reasons = []
        if other_cores >= limit:
            reasons.append(f"other processes used {other_cores:.2f} of {cores} cores")
        if out.get("gpu_other_sm_pct", 0.0) >= GPU_DISTURBED_SM_PCT:
            reasons.append(f"other processes used {out['gpu_other_sm_pct']:.0f}% of the GPU's SMs")
        out["disturbed"] = bool(reasons)
        if reasons:
            out["reason"] = "; ".join(reasons)
        return out

    def _top_other(self, own: set[int], window: float) -> list[dict[str, Any]]:
        """The busiest other processes that lived through the window, as cores each."""
        now = _others(own)
        rows: list[dict[str, Any]] = []
        for pid, (name, s1) in now.items():
            start = self._others_start.get(pid)
            if start is None or start[0] != name:
                continue
            cores = (s1 - start[1]) / window
            if cores >= 0.05:
                rows.append({"pid": pid, "name": name, "cpu_cores": round(cores, 2)})
        return sorted(rows, key=lambda r: -r["cpu_cores"])[:TOP_OTHERS]


def watch(own_pids: Callable[[], Iterable[int]] | None = None, device: str | None = None) -> Watch:
    """A :class:`Watch` to use as a context manager around a measurement."""
    return Watch(own_pids, device)


def is_disturbed(background: Mapping[str, Any] | None) -> bool:
    """Whether a measurement's ``background`` says other processes disturbed it (None: not watched)."""
    return bool(background and background.get("disturbed"))


#: A disturbed measurement whose own process tree got fewer cores than this is not scaled: too
#: little was measured to say what a quiet machine would give.
ESTIMATE_MIN_OWN_CORES = 0.1


def quiet_factor(background: Mapping[str, Any] | None) -> float | None:
    """How many times the CPU time it got a measurement disturbed by other processes' CPU load would
    have had on a quiet machine: (own + other cores) / own cores, at most cores / own. None when the
    measurement was not disturbed on its CPUs (a GPU shared with others has no such estimate).

    An estimate, for ranking configs while a load does not pass (``budget.load_estimate``): a
    trial's CPU-bound work runs at the share of the cores it gets. Checked with ``python
    bench/engines.py --background-load 2`` on 2 cores (2 busy processes took 1.33-1.52 of the
    cores), configs the loaded and quiet studies both measured: CTranslate2 scaled to within 9% of its
    quiet tokens/s and 14% of its quiet p95 (6 configs, b1-b32, 2 streams); the built-in engine (b24 x2)
    came out 12% above its quiet tokens/s and 43% above its quiet p95, and vLLM's server (b32),
    whose scheduler and API server share its two cores, 49% below. Single-stream configs were off
    both ways (CTranslate2 b16: +40%; the built-in engine's b24: -68%).
    """
    if not is_disturbed(background) or background is None:
        return None
    own = float(background.get("own_cpu_cores", 0.0))
    other = float(background.get("other_cpu_cores", 0.0))
    cores = float(background.get("cores", 0) or 0)
    if own < ESTIMATE_MIN_OWN_CORES or other < threshold_cores(int(cores)) or cores <= 0:
        return None
    return max(1.0, min(cores, own + other) / own)


def describe(background: Mapping[str, Any] | None) -> str:
    """One line for logs and the CLI: who took how much."""
    if not background:
        return "not watched"
    text = f"other processes used {background.get('other_cpu_cores', 0.0):.2f} of {background.get('cores', '?')} cores"
    top = background.get("top_other") or []
    if top:
        text += " (" + ", ".join(f"{r['name']} {r['cpu_cores']:.2f}" for r in top) + ")"
    if background.get("loadavg_end"):
        text += f", loadavg {background['loadavg_end'][0]:.2f}"
    if background.get("gpu_other_sm_pct") is not None:
        text += f", GPU SMs {background['gpu_other_sm_pct']:.0f}% by others"
    return text


def wait_for_quiet(
    timeout_s: float,
    *,
    own_pids: Callable[[], Iterable[int]] | None = None,
    device: str | None = None,
    interval_s: float = 1.0,
) -> dict[str, Any]:
    """Watch windows of ``interval_s`` until one is quiet or ``timeout_s`` has passed (at least one).

    Returns the last window's result with ``waited_s`` and ``quiet``. The tuner calls it before
    re-measuring a disturbed trial: re-measuring while the load goes on would measure it again.
    """
    t0 = time.monotonic()
    while True:
        with watch(own_pids, device) as w:
            time.sleep(interval_s)
        r = w.result()
        waited = time.monotonic() - t0
        if not r["disturbed"] or waited >= timeout_s:
            return {**r, "waited_s": round(waited, 2), "quiet": not r["disturbed"]}
