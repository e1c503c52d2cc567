"""Replay a workload against an Engine and summarize it as a :class:`Measurement`.

Client threads block on futures (they never spin), so on a 2-core machine the harness does
not steal the CPU it is measuring. Warm-up (and compile) runs before the measured window and
is reported on its own.
"""

from __future__ import annotations

import contextlib
import math
import resource
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autotune.spec import PERCENTILES, QUALITY_METRICS, WorkloadSpec
from autotune.workload import Request, build_requests, concurrency

if TYPE_CHECKING:
    from autotune.engines.builtin.engine import Engine, GenerationResult

LATENCIES = ("e2e_ms", "ttft_ms", "tpot_ms", "queue_ms")
HISTOGRAM_SAMPLES = 2000


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method), q in [0, 100]."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution(values: Sequence[float]) -> dict[str, float]:
    out = {name: percentile(values, q) for name, q in PERCENTILES.items()}
    out["mean"] = sum(values) / len(values) if values else math.nan
    out["max"] = max(values) if values else math.nan
    return out


@dataclass
class Measurement:
    """What one trial measured. Latencies in ms at p50/p90/p95/p99 (plus mean, max)."""

    output_tokens_per_s: float
    requests_per_s: float
    requests: int
    output_tokens: int
    duration_s: float
    e2e_ms: dict[str, float]
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    queue_ms: dict[str, float]
    mean_batch_rows: float
    peak_memory_mb: float
    memory_kind: str
    timings: dict[str, float] = field(default_factory=dict)
    e2e_samples_ms: list[float] = field(default_factory=list)
    stopped_by: str = "requests"
    #: Start of a request's batch to its first token: the prefill itself, without queueing.
    prefill_ms: dict[str, float] = field(default_factory=dict)
    mean_prompt_tokens: float = 0.0
    #: Every memory figure the device offers (MB): CUDA allocated/reserved peaks, NVML device use, RSS.
    memory: dict[str, float] = field(default_factory=dict)
    #: Fractions of the device's measured ceilings (see :mod:`autotune.roofline`); empty without ceilings.
    roofline: dict[str, float] = field(default_factory=dict)
    #: Fidelity against the study's reference (see :mod:`autotune.quality`); empty when not measured.
    quality: dict[str, float] = field(default_factory=dict)
    #: Stability-aware measurement: tokens/s of each back-to-back window; the figures above pool the
    #: last two. ``window_spread_pct``: their difference, % of their mean (empty/NaN without windows).
    windows_tokens_per_s: list[float] = field(default_factory=list)
    window_spread_pct: float = math.nan
    #: Where a request's time goes, mean ms per request: ``queue`` (waiting for a batch), ``prefill``,
    #: ``decode``; ``tokenize`` / ``detokenize`` only where the path has text (a trial over HTTP:
    #: the server turns output ids into text). In-process trials send and receive token ids.
    breakdown_ms: dict[str, float] = field(default_factory=dict)
    #: The trial process's CPU niceness while it measured (``budget.trial_niceness``; 0: not lowered).
    niceness: int = 0
    #: Load from other processes while the trial replayed its workload (:func:`autotune.load.watch`):
    #: their CPU cores, loadavg, NVML's other GPU processes, and ``disturbed``. None: not watched.
    background: dict[str, Any] | None = None

    def value(self, name: str) -> float:
        """Look up ``e2e_ms.p95``-style, plain (``peak_memory_mb``) or fidelity (``kl``) metric names;
        NaN for a fidelity figure that was not measured."""
        if name in QUALITY_METRICS:
            return float(self.quality.get(name, math.nan))
        if "." in name:
            metric, pct = name.split(".", 1)
            return float(getattr(self, metric)[pct])
        return float(getattr(self, name))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def scaled(self, factor: float) -> Measurement:
        """The figures with ``factor`` times the CPU time: rates times it, latencies divided by it.
        An estimate (:func:`autotune.load.quiet_factor`) to rank configs by, never stored as measured."""
        return replace(
            self,
            output_tokens_per_s=self.output_tokens_per_s * factor,
            requests_per_s=self.requests_per_s * factor,
            e2e_ms={k: v / factor for k, v in self.e2e_ms.items()},
            ttft_ms={k: v / factor for k, v in self.ttft_ms.items()},
            tpot_ms={k: v / factor for k, v in self.tpot_ms.items()},
            queue_ms={k: v / factor for k, v in self.queue_ms.items()},
            prefill_ms={k: v / factor for k, v in self.prefill_ms.items()},
            e2e_samples_ms=[v / factor for v in self.e2e_samples_ms],
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Measurement:
        """Inverse of ``to_dict``; keys from newer versions are ignored so old and new records both load."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def overhead(spans: Iterable[tuple[float, float, bool]]) -> dict[str, float] | None:
    """Time not spent measuring, from each measured trial's (wall seconds, window seconds, ran on a
    reused engine): the median and max share of a trial's wall time, ``total`` (all trials' wall time
    together: one slow export weighs in here, not in the median), and how many trials reused an
    engine. None before any trial. `autotune tune` prints it; the dashboard shows it."""
    shares, walls, windows, reused = [], 0.0, 0.0, 0
    for wall, window, was_reused in spans:
        if wall <= 0:
            continue
        window = min(window, wall)
        shares.append(1 - window / wall)
        walls, windows, reused = walls + wall, windows + window, reused + was_reused
    if not shares:
        return None
    return {
        "median": statistics.median(shares),
        "max": max(shares),
        "total": 1 - windows / walls,
        "trials": float(len(shares)),
        "reused": float(reused),
    }


def summarize(
    results: Sequence[GenerationResult],
    t0: float,
    t1: float,
    *,
    peak_memory_mb: float = math.nan,
    memory_kind: str = "none",
    timings: dict[str, float] | None = None,
    stopped_by: str = "requests",
    memory: dict[str, float] | None = None,
) -> Measurement:
    """Turn finished requests and the window [t0, t1] (perf_counter seconds) into a Measurement."""
    if not results:
        raise ValueError("no request finished inside the measurement window")
    duration = max(t1 - t0, 1e-9)
    tokens = sum(r.output_tokens for r in results)
    e2e = [r.e2e_s * 1000 for r in results]
    return Measurement(
        output_tokens_per_s=tokens / duration,
        requests_per_s=len(results) / duration,
        requests=len(results),
        output_tokens=tokens,
        duration_s=duration,
        e2e_ms=distribution(e2e),
        ttft_ms=distribution([r.ttft_s * 1000 for r in results]),
        tpot_ms=distribution([r.tpot_s * 1000 for r in results]),
        queue_ms=distribution([r.queue_s * 1000 for r in results]),
        mean_batch_rows=sum(r.batch_rows for r in results) / len(results),
        peak_memory_mb=peak_memory_mb,
        memory_kind=memory_kind,
        timings=dict(timings or {}),
        e2e_samples_ms=e2e[:HISTOGRAM_SAMPLES],
        stopped_by=stopped_by,
        prefill_ms=distribution([(r.t_first_token - r.t_start) * 1000 for r in results]),
        mean_prompt_tokens=sum(r.prompt_tokens for r in results) / len(results),
        memory=dict(memory or {}),
        breakdown_ms={
            "queue": 1000 * sum(r.t_start - r.t_submit for r in results) / len(results),
            "prefill": 1000 * sum(r.t_first_token - r.t_start for r in results) / len(results),
            "decode": 1000 * sum(r.t_end - r.t_first_token for r in results) / len(results),
        },
    )


# -- memory ---------------------------------------------------------------------------------------
def reset_peak_memory(engine: Engine) -> None:
    """Start the peak over before the measured window: a trial process that served an earlier trial
    (reused engine) must not report that trial's peak. On CPU the kernel's high-water mark is reset
    (``/proc/self/clear_refs``) where Linux allows it."""
    if engine.hardware.device_type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(engine.hardware.device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory(engine: Engine) -> tuple[float, str]:
    """CUDA max allocated on GPU; the process's peak resident set on CPU (whole trial process)."""
    if engine.hardware.device_type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(engine.hardware.device) / 2**20, "cuda_max_allocated"
    return _rss_peak_mb(), "process_peak_rss"


def _rss_peak_mb() -> float:
    """Peak resident set since the last reset (Linux VmHWM), else since the process started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def memory_figures(engine: Engine) -> dict[str, float]:
    """All memory figures at hand: CUDA allocator peaks, NVML's whole-device use when present, peak RSS."""
    out = {"process_peak_rss_mb": _rss_peak_mb()}
    if engine.hardware.device_type != "cuda":
        return out
    import torch

    dev = engine.hardware.device
    out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    out["cuda_max_reserved_mb"] = torch.cuda.max_memory_reserved(dev) / 2**20
    used = nvml_used_mb(str(getattr(torch.cuda.get_device_properties(dev), "uuid", "")), dev)
    if used is not None:
        out["nvml_device_used_mb"] = used
    return out


def nvml_used_mb(uuid: str, device: str) -> float | None:
    """Memory in use on the whole GPU (all processes) from NVML; None without pynvml or a driver."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            handle = None
            if uuid:  # by UUID, so CUDA_VISIBLE_DEVICES renumbering cannot pick the wrong GPU
                try:
                    handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
                except pynvml.NVMLError:
                    handle = None
            if handle is None:
                handle = pynvml.nvmlDeviceGetHandleByIndex(int(device.split(":")[1]) if ":" in device else 0)
            return float(pynvml.nvmlDeviceGetMemoryInfo(handle).used) / 2**20
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # NVML missing or refusing (containers, MIG): the figure is optional
        return None


# -- replay ---------------------------------------------------------------------------------------
@dataclass
class WarmUp:
    """Warm-up timings, and the last round's results (a first, rough look at the config)."""

    timings: dict[str, float]
    results: list[Any]
    t0: float
    t1: float


def warm_up(engine: Engine, spec: WorkloadSpec, vocab_size: int, first_token_id: int) -> WarmUp:
    """Run warm-up rounds of one full batch per stream; the first round includes any compilation."""
    cfg = engine.config
    per_round = spec.warmup_requests if spec.warmup_requests is not None else cfg.batch_size * cfg.streams
    if per_round == 0:
        now = time.perf_counter()
        return WarmUp({"warmup_s": 0.0, "first_batch_s": 0.0}, [], now, now)
    rounds = 2 if engine.fixed_shapes else 1
    reqs = build_requests(spec, vocab_size, first_token_id=first_token_id, count=per_round * rounds, seed_offset=7)
    t = time.perf_counter()
    first, results, t_round = 0.0, [], t
    for r in range(rounds):
        t_round = time.perf_counter()
        chunk = reqs[r * per_round : (r + 1) * per_round]
        results = [f.result() for f in [engine.submit(q.prompt_ids, q.max_new_tokens) for q in chunk]]
        if r == 0:
            first = time.perf_counter() - t
    t1 = time.perf_counter()
    timings = {"warmup_s": t1 - t, "first_batch_s": first}
    if engine.fixed_shapes:
        timings["compile_s"] = first
    return WarmUp(timings, results, t_round, t1)


def _closed_loop(
    engine: Engine, requests: list[Request], clients: int, end: list[float], results: list[Any] | None = None
) -> tuple[list[Any], str]:
    """Clients each keep one request in flight until ``end[0]`` (a watcher may move it) or the
    requests run out; finished requests go to ``results`` as they complete.

    A client sends its next request from its finished request's done-callback, i.e. on the thread
    that delivered the result, before that thread returns to the batcher. Client threads blocking on
    ``result()`` would each have to be woken and get the GIL before resubmitting, so at a 0 ms
    queue delay the batcher started the next batch on the first few comers: batches went out
    partly filled and staggered (b32 bf16: mean 30.1 rows, 560-630 ms queueing, 0.67x a plain
    ``generate`` loop; ``python bench/engine_vs_generate.py``). A zero-think-time client has its
    next request ready the moment the answer arrives; callbacks model exactly that, with no thread.
    A request that fails ends its client; when none finished, its error is raised.
    """
    it = iter(requests)
    lock = threading.Lock()
    done: list[GenerationResult] = results if results is not None else []
    stopped = ["requests"]
    errors: list[BaseException] = []
    in_flight = [0]
    finished = threading.Event()

    def send() -> None:
        """Send one client's next request, or retire the client (the last one ends the loop)."""
        with lock:
            req = None
            if time.perf_counter() >= end[0]:
                stopped[0] = "duration"
            else:
                req = next(it, None)
            if req is None:
                in_flight[0] -= 1
                if in_flight[0] == 0:
                    finished.set()
                return
        try:
            future = engine.submit(req.prompt_ids, req.max_new_tokens)
        except BaseException as err:
            retire(err)
            return
        future.add_done_callback(on_done)

    def retire(err: BaseException) -> None:
        with lock:
            errors.append(err)
            in_flight[0] -= 1
            if in_flight[0] == 0:
                finished.set()

    def on_done(future: Future[GenerationResult]) -> None:
        try:
            res = future.result()
        except BaseException as err:
            retire(err)
            return
        with lock:
            done.append(res)
        send()

    in_flight[0] = clients
    if clients <= 0:
        finished.set()
    for _ in range(clients):
        send()
    finished.wait()
    if errors and not done:
        raise errors[0]
    return done, stopped[0]


def window_throughputs(results: Sequence[GenerationResult], t0: float, window_s: float, n: int) -> list[float]:
    """Output tokens/s of each of ``n`` back-to-back windows from ``t0``, by completion time."""
    tokens = [0] * n
    for r in results:
        k = int((r.t_end - t0) // window_s)
        if 0 <= k < n:
            tokens[k] += r.output_tokens
    return [t / window_s for t in tokens]


def _agree(a: float, b: float, tolerance_pct: float) -> bool:
    mean = (a + b) / 2
    return mean > 0 and 100 * abs(a - b) / mean <= tolerance_pct


def _stable_closed_loop(
    engine: Engine, requests: list[Request], clients: int, t0: float, window_s: float, tolerance_pct: float, cap: int
) -> tuple[list[Any], str, int]:
    """The closed loop in back-to-back windows of ``window_s``: at each boundary from the second on,
    a watcher compares the last two windows and ends the load once they agree, or after ``cap``.
    Returns the results, why the load stopped and how many whole windows it ran."""
    end = [t0 + cap * window_s]
    results: list[Any] = []
    box: dict[str, Any] = {}

    def load() -> None:
        box["out"] = _closed_loop(engine, requests, clients, end, results)

    runner = threading.Thread(target=load, daemon=True)
    runner.start()
    stable = False
    for k in range(2, cap + 1):
        boundary = t0 + k * window_s
        runner.join(timeout=max(0.0, boundary - time.perf_counter()))
        if not runner.is_alive():
            break
        w = window_throughputs(list(results), t0, window_s, k)
        if _agree(w[-2], w[-1], tolerance_pct):
            # A request that ended before the boundary is in ``results`` only once its client thread
            # has woken to append it: look again a moment later before deciding (else the stored
            # windows, counted from every result, can disagree with what stopped the load).
            runner.join(timeout=min(0.2, max(0.02, window_s / 10)))
            w = window_throughputs(list(results), t0, window_s, k)
            if runner.is_alive() and _agree(w[-2], w[-1], tolerance_pct):
                end[0], stable = boundary, True
                break
    runner.join()
    _, stopped = box["out"]
    last = max((r.t_end for r in results), default=t0)
    windows = round((end[0] - t0) / window_s) if stopped == "duration" else max(1, int((last - t0) // window_s))
    return results, ("stable" if stable else stopped), min(windows, cap)


def _open_loop(engine: Engine, requests: Iterable[Request], start: float, deadline: float) -> tuple[list[Any], str]:
    futures: list[Future[GenerationResult]] = []
    stopped = "requests"
    for req in requests:
        at = start + req.arrival_s
        if at >= deadline:
            stopped = "duration"
            break
        delay = at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        futures.append(engine.submit(req.prompt_ids, req.max_new_tokens))
    return [f.result() for f in futures], stopped


def early_stop(
    engine: Engine, warm: WarmUp, timings: dict[str, Any], abort_if: Callable[[Measurement], str | None] | None
) -> Measurement | None:
    """The warm-up round as the trial's measurement when ``abort_if`` finds a reason to stop there
    (say, the SLO missed several times over), else None. Engines with fixed shapes are spared: their
    warm-up includes compiling."""
    if abort_if is None or not warm.results or engine.fixed_shapes:
        return None
    mem, kind = peak_memory(engine)
    rough = summarize(warm.results, warm.t0, warm.t1, peak_memory_mb=mem, memory_kind=kind, timings=timings)
    reason = abort_if(rough)
    if not reason:
        return None
    rough.stopped_by = f"early-stop: {reason}"
    return rough


def run_workload(
    engine: Engine,
    spec: WorkloadSpec,
    *,
    vocab_size: int,
    first_token_id: int = 4,
    build_timings: dict[str, float] | None = None,
    abort_if: Callable[[Measurement], str | None] | None = None,
) -> Measurement:
    """Warm up, then replay the spec's requests (until done or ``max_duration_s``) and summarize.

    ``abort_if`` sees the warm-up round as a measurement; when it returns a reason (say, the
    SLO is missed several times over), the trial stops there and reports the warm-up figures.
    """
    timings = dict(build_timings or {})
    warm = warm_up(engine, spec, vocab_size, first_token_id)
    timings.update(warm.timings)
    stopped_early = early_stop(engine, warm, timings, abort_if)
    if stopped_early is not None:
        return stopped_early
    requests = build_requests(spec, vocab_size, first_token_id=first_token_id)
    reset_peak_memory(engine)
    t0 = time.perf_counter()
    deadline = t0 + spec.max_duration_s
    windows: list[float] = []
    if spec.arrival.type == "closed" and spec.stability is not None:
        clients = concurrency(spec, engine.config.batch_size, engine.config.streams)
        st = spec.stability
        results, stopped, n = _stable_closed_loop(
            engine, requests, clients, t0, spec.max_duration_s, st.tolerance_pct, st.max_windows
        )
        windows = window_throughputs(results, t0, spec.max_duration_s, n)
        if n >= 2:  # the figures pool the last two windows (and whatever finished after them)
            start = t0 + (n - 2) * spec.max_duration_s
            results = [r for r in results if r.t_end >= start]
            t0 = start
    elif spec.arrival.type == "closed":
        clients = concurrency(spec, engine.config.batch_size, engine.config.streams)
        results, stopped = _closed_loop(engine, requests, clients, [deadline])
    else:  # offline: every arrival_s is 0, so all are submitted at once
        results, stopped = _open_loop(engine, requests, t0, deadline)
    t1 = max((r.t_end for r in results), default=time.perf_counter())
    mem, kind = peak_memory(engine)
    m = summarize(
        results,
        t0,
        t1,
        peak_memory_mb=mem,
        memory_kind=kind,
        timings=timings,
        stopped_by=stopped,
        memory=memory_figures(engine),
    )
    if windows:
        m.windows_tokens_per_s = windows
        if len(windows) >= 2:
            a, b = windows[-2], windows[-1]
            m.window_spread_pct = 100 * abs(a - b) / ((a + b) / 2) if a + b > 0 else math.nan
    return m
