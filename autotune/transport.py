"""``workload.transport: http``: measure a trial through the HTTP server it will be deployed behind.

In-process, a closed-loop client resubmits within microseconds of its answer, so a 5 ms queue
delay fills every batch. Behind ``autotune serve`` the same clients come back over loopback
HTTP one by one, batches split, and the served figure fell to 0.5-0.8x of the tuned one
(README, "Verify a deployment"). With this transport a trial runs exactly the deployment's
topology: the trial process serves its engine with the real app under uvicorn, and a separate
client process replays the workload over HTTP with :func:`autotune.verify.replay_http`, the
code ``autotune verify --url`` runs. The tuner then picks the queue delay and batch size that
hold up over HTTP, and the tuned figure is the one a deployment can reproduce.

Warm-up (and any compile) still runs in-process first, so its timings stay comparable.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from autotune.errors import AutotuneError

if TYPE_CHECKING:
    from autotune.engines.builtin.engine import Engine
    from autotune.measure import Measurement
    from autotune.spec import WorkloadSpec

#: Seconds the client may take beyond the workload's window (its HTTP warm-up, the stragglers).
CLIENT_GRACE_S = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Server:
    """The real ``autotune serve`` app on a loopback port, on a thread of this process."""

    def __init__(self, engine: Engine) -> None:
        import uvicorn

        from autotune.serve import create_app

        self.port = _free_port()
        app = create_app(engine, manage_engine=False)  # the trial owns the engine's lifecycle
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", backlog=2048)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="autotune-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> _Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise AutotuneError(f"the trial's HTTP server did not start on 127.0.0.1:{self.port}")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def measure_over_http(
    engine: Engine,
    spec: WorkloadSpec,
    *,
    vocab_size: int,
    first_token_id: int,
    build_timings: dict[str, float] | None = None,
    abort_if: Callable[[Measurement], str | None] | None = None,
) -> Measurement:
    """Warm up in-process (stopping there, as in-process, when ``abort_if`` says so), then serve
    ``engine`` and replay ``spec`` from a client process."""
    from autotune.engines.builtin.engine import GenerationResult
    from autotune.measure import early_stop, memory_figures, peak_memory, reset_peak_memory, summarize, warm_up

    timings = dict(build_timings or {})
    warm = warm_up(engine, spec, vocab_size, first_token_id)
    timings.update(warm.timings)
    stopped_early = early_stop(engine, warm, timings, abort_if)
    if stopped_early is not None:
        return stopped_early
    doc = {"config": engine.config.model_dump(mode="json"), "workload": spec.model_dump(mode="json")}
    with tempfile.TemporaryDirectory(prefix="autotune-http-") as tmp, _Server(engine) as server:
        job, out = Path(tmp) / "job.json", Path(tmp) / "run.json"
        job.write_text(json.dumps({"doc": doc, "url": server.url, "vocab_size": vocab_size}))
        reset_peak_memory(engine)
        engine.text_seconds.clear()
        engine.text_calls.clear()
        t = time.perf_counter()
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "autotune.transport", str(job), str(out)],
                capture_output=True,
                text=True,
                timeout=spec.max_duration_s + CLIENT_GRACE_S,
            )
        except subprocess.TimeoutExpired:
            limit = spec.max_duration_s + CLIENT_GRACE_S
            raise AutotuneError(f"the HTTP client did not finish in {limit:g} s") from None
        timings["http_client_s"] = time.perf_counter() - t
        if proc.returncode != 0 or not out.exists():
            raise AutotuneError(f"the HTTP client failed ({proc.returncode}): {proc.stderr.strip()[-1500:]}")
        run = json.loads(out.read_text())
    if run["failures"]:
        raise AutotuneError(f"{len(run['failures'])} request(s) failed over HTTP; first: {run['failures'][0]}")
    results = [GenerationResult(**r) for r in run["results"]]
    mem, kind = peak_memory(engine)
    m = summarize(
        results,
        run["t0"],
        run["t1"],
        peak_memory_mb=mem,
        memory_kind=kind,
        timings=timings,
        stopped_by=run["stopped_by"],
        memory=memory_figures(engine),
    )
    for what, seconds in engine.text_seconds.items():  # the server's share of each request's text work
        m.breakdown_ms[what] = 1000 * seconds / max(1, engine.text_calls[what])
    return m


def _client(job_path: str, out_path: str) -> None:
    """The client process: replay over HTTP, write the per-request timings as JSON."""
    import asyncio
    import dataclasses

    from autotune.verify import replay_http

    job = json.loads(Path(job_path).read_text())
    run = asyncio.run(replay_http(job["doc"], job["url"], vocab_size=job["vocab_size"]))
    Path(out_path).write_text(
        json.dumps(
            {
                "results": [dataclasses.asdict(r) for r in run.results],
                "t0": run.t0,
                "t1": run.t1,
                "stopped_by": run.stopped_by,
                "failures": run.failures,
            }
        )
    )


if __name__ == "__main__":
    _client(sys.argv[1], sys.argv[2])
