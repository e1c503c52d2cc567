"""A server engine's lifecycle with ``autotune serve`` started as an external OpenAI-compatible engine (a
real server in its own process): start, ready, measure, stop (port free, nothing left behind); and the
faults a study must survive: a command that exits at once, a port already taken, a server that never
answers, one killed mid-run (``died`` with its log tail, within seconds), one that stops answering
(``hung`` within the stall limit), and a parent SIGKILLed while its server runs (PDEATHSIG, the pgid
file, :func:`reap_leftovers`). Every wait is bounded."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from autotune.config import TrialConfig
from autotune.engines.builtin.engine import GenerationResult
from autotune.engines.openai_client import Api, Replayer
from autotune.engines.server import (
    EngineProcessError,
    Launch,
    ServerProcess,
    _group_members,
    free_port,
    measure_server,
    port_free,
    reap_leftovers,
)
from autotune.errors import AutotuneError
from autotune.measure import Measurement
from autotune.spec import WorkloadSpec

from ..test_serve import write_export

VOCAB = 512  # preset:llama-tiny
PY = sys.executable


def serve_launch(export: Path) -> Launch:
    return Launch([PY, "-m", "autotune", "serve", str(export), "--port", "{port}"], env={"OMP_NUM_THREADS": "1"})


def started(tmp_path: Path) -> tuple[ServerProcess, WorkloadSpec, TrialConfig]:
    """``autotune serve`` on the tiny export, started and ready, with the export's workload and config."""
    export = write_export(tmp_path / "best.json")
    doc = json.loads(export.read_text())
    srv = ServerProcess(serve_launch(export), port=free_port(), log_path=tmp_path / "logs" / "serve.log")
    startup = srv.start()
    assert 0 < startup < 120 and srv.alive() and srv.served_model == "preset:llama-tiny"
    return srv, WorkloadSpec.model_validate(doc["workload"]), TrialConfig.model_validate(doc["config"])


def measure(srv: ServerProcess, spec: WorkloadSpec, cfg: TrialConfig, **kw: Any) -> Measurement:
    return measure_server(
        srv.url, spec, cfg, served_model=srv.served_model, vocab_size=VOCAB, first_token_id=4, process=srv, **kw
    )


def later(seconds: float, action: Callable[[], None]) -> threading.Timer:
    t = threading.Timer(seconds, action)
    t.start()
    return t


def gone(srv: ServerProcess) -> None:
    """Stopped: the port can be bound again and no process of its group is left."""
    assert srv.pid is not None
    assert port_free(srv.port)
    assert _group_members(srv.pid) == []
    assert not srv.pgid_path.exists()


def test_autotune_serve_as_an_external_engine(tmp_path: Path) -> None:
    """Start, measure (streamed, exact length), early stop, hang (SIGSTOP) and recover, stop."""
    srv, spec, cfg = started(tmp_path)
    with srv:
        assert srv.pgid_path.exists() and json.loads(srv.pgid_path.read_text())["pgid"] == srv.pid
        m = measure(srv, spec, cfg, timings={"startup_s": srv.startup_s})
        assert m.requests == 32 and m.output_tokens == 32 * 8 and m.mean_prompt_tokens == 16
        assert m.output_tokens_per_s > 0 and m.e2e_ms["p95"] >= m.ttft_ms["p95"] > 0
        assert m.timings["startup_s"] == srv.startup_s and "warmup_s" in m.timings
        assert m.peak_memory_mb > 0 and m.memory_kind == "server_group_peak_rss"
        rough = measure(srv, spec, cfg, abort_if=lambda m: "SLO missed 10x")
        assert rough.stopped_by == "early-stop: SLO missed 10x" and rough.requests == 4

        # Stops answering mid-run (frozen): hung within the stall limit, then it recovers.
        endless = spec.model_copy(update={"requests": 100_000, "max_duration_s": 60})
        later(0.3, lambda: os.killpg(srv.pid or 0, signal.SIGSTOP))
        t = time.monotonic()
        try:
            with pytest.raises(EngineProcessError) as hung:
                measure(srv, endless, cfg, stall_timeout_s=1.0)
        finally:
            os.killpg(srv.pid or 0, signal.SIGCONT)
        assert hung.value.kind == "hung" and "sent nothing" in str(hung.value) and time.monotonic() - t < 10
        assert "serving preset:llama-tiny" in hung.value.log_tail
        srv.ensure_alive()
        assert httpx.get(f"{srv.url}/v1/models", timeout=10).status_code == 200
        code = srv.stop(grace_s=15)
        assert code is not None and code in (0, 143, -signal.SIGTERM)  # SIGTERM drains, then exits
        gone(srv)
    assert srv.stop() == code  # idempotent


def test_a_server_killed_mid_run_dies_with_its_log_tail(tmp_path: Path) -> None:
    srv, spec, cfg = started(tmp_path)
    with srv:
        killed = [0.0]

        def kill() -> None:
            killed[0] = time.monotonic()
            os.killpg(srv.pid or 0, signal.SIGKILL)

        later(0.5, kill)
        with pytest.raises(EngineProcessError) as died:
            measure(srv, spec.model_copy(update={"requests": 100_000, "max_duration_s": 60}), cfg)
        assert time.monotonic() - killed[0] < 5  # promptly: no request timeout
        assert died.value.kind == "died" and "SIGKILL" in died.value.reason
        assert "serving preset:llama-tiny" in str(died.value)  # the engine's own last lines
        with pytest.raises(EngineProcessError, match="died"):
            srv.ensure_alive()
    gone(srv)


#: vLLM after its engine core died: the API server answers /v1/models and a 500 to every completion.
DEAD_ENGINE = """
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
print("(Worker pid=1) ERROR [executor.py:1] RuntimeError: Unsupported CPU attention configuration: head_dim=16")
print("(EngineCore pid=2) ERROR [core.py:1] EngineCore encountered a fatal error.", flush=True)
class H(BaseHTTPRequestHandler):
    def answer(self, code, doc):
        body = json.dumps(doc).encode()
        self.send_response(code); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        self.answer(200, {"data": [{"id": "m"}]})
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        print("vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue.", flush=True)
        self.answer(500, {"error": {"message": "EngineCore encountered an issue."}})
    def log_message(self, *a):
        pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_an_api_server_whose_engine_died_is_died_with_the_first_error(tmp_path: Path) -> None:
    """The tail is the 500s' echoes; the reason names the root cause, the first exception logged."""
    with ServerProcess(Launch([PY, "-c", DEAD_ENGINE, "{port}"]), port=free_port(), log_path=tmp_path / "a.log") as srv:
        srv.start()
        assert srv.served_model == "m"
        spec = WorkloadSpec.model_validate({"requests": 8, "prompt_tokens": 4, "output_tokens": 2})
        with pytest.raises(EngineProcessError) as e:
            measure(srv, spec, TrialConfig(batch_size=2))
        assert e.value.kind == "died" and "engine behind the API server died" in e.value.reason
        assert "first error in its log: RuntimeError: Unsupported CPU attention configuration" in e.value.reason
        assert "EngineDeadError" in e.value.log_tail


# -- faults at start, with stand-in commands (fast) ------------------------------------------------
def test_a_command_that_exits_fails_to_start_with_its_output(tmp_path: Path) -> None:
    exits = Launch([PY, "-c", "import sys; print('no such model: nowhere/llm', flush=True); sys.exit(1)"])
    srv = ServerProcess(exits, port=free_port(), log_path=tmp_path / "a.log")
    with pytest.raises(EngineProcessError) as e:
        srv.start()
    assert e.value.kind == "start-failed" and "exit status 1" in e.value.reason
    assert "no such model: nowhere/llm" in str(e.value) and not srv.pgid_path.exists()
    oom = Launch([PY, "-c", "print('torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB'); exit(1)"])
    with pytest.raises(EngineProcessError) as e:
        ServerProcess(oom, port=free_port(), log_path=tmp_path / "b.log").start()
    assert e.value.kind == "oom"  # infeasible, not failed
    again = ServerProcess(exits, port=free_port(), log_path=tmp_path / "b.log")  # the log of the OOM above
    with pytest.raises(EngineProcessError) as e:
        again.start()
    assert e.value.kind == "start-failed" and "out of memory" not in str(e.value)  # only this start's lines
    assert "out of memory" in (tmp_path / "b.log").read_text()  # appended, not truncated
    with pytest.raises(EngineProcessError, match="start-failed: cannot run"):
        ServerProcess(Launch(["/nonexistent/vllm"]), port=free_port(), log_path=tmp_path / "c.log").start()
    with pytest.raises(AutotuneError, match="argv is empty"):
        ServerProcess(Launch([]), port=free_port(), log_path=tmp_path / "d.log").start()
    with pytest.raises(ValueError, match="not one of"):
        EngineProcessError("exploded", "?")


def test_a_taken_port_is_refused_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        srv = ServerProcess(Launch([PY, "-c", "raise SystemExit(7)"]), port=port, log_path=tmp_path / "a.log")
        with pytest.raises(EngineProcessError, match="port-taken") as e:
            srv.start()
        assert e.value.kind == "port-taken" and str(port) in e.value.reason and srv.pid is None


def test_a_server_that_never_answers_times_out(tmp_path: Path) -> None:
    slow = Launch(
        [PY, "-c", "import time; print('loading weights...', flush=True); time.sleep(300)"], start_timeout_s=1
    )
    srv = ServerProcess(slow, port=free_port(), log_path=tmp_path / "a.log")
    t = time.monotonic()
    with pytest.raises(EngineProcessError) as e:
        srv.start()
    assert e.value.kind == "start-timeout" and "loading weights..." in e.value.log_tail and time.monotonic() - t < 10
    gone(srv)  # stopped before the error was raised


# -- nothing outlives its parent ------------------------------------------------------------------
PARENT = """
import sys, time
from autotune.engines.server import Launch, ServerProcess
# The server's shell leaves a child behind that PDEATHSIG does not reach (as an engine's workers would).
launch = Launch(["sh", "-c", "sleep 300 & exec {py} -m http.server {{port}} --bind 127.0.0.1"], ready_path="/")
srv = ServerProcess(launch, port={port}, log_path=sys.argv[1])
srv.start()
print(srv.pid, flush=True)
if sys.argv[2] == "wait":
    time.sleep(300)
"""


def _parent(tmp_path: Path, mode: str) -> tuple[subprocess.Popen[str], int]:
    code = PARENT.format(py=PY, port=free_port())
    proc = subprocess.Popen([PY, "-c", code, str(tmp_path / "srv.log"), mode], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # bounded: the parent's start() has its own 300-s limit; http.server is instant
    assert line.strip().isdigit(), line
    return proc, int(line)


def _state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    return stat[stat.rfind(")") + 2]


def test_a_parent_killed_leaves_no_server_behind(tmp_path: Path) -> None:
    proc, pgid = _parent(tmp_path, "wait")
    assert (tmp_path / "srv.log.pgid").exists() and len(_group_members(pgid)) == 2
    proc.kill()
    proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _state(pgid) not in ("gone", "Z") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _state(pgid) in ("gone", "Z")  # the server got SIGTERM from the kernel (PDEATHSIG)
    left = _group_members(pgid)
    assert len(left) == 1  # its own child did not: the pgid file is how a parent finds it
    assert reap_leftovers(tmp_path) == [pgid]
    assert _group_members(pgid) == [] and not (tmp_path / "srv.log.pgid").exists()
    assert reap_leftovers(tmp_path) == []


def test_a_parent_that_exits_without_stopping_stops_its_server(tmp_path: Path) -> None:
    proc, pgid = _parent(tmp_path, "exit")
    assert proc.wait(timeout=30) == 0
    assert _group_members(pgid) == [] and not (tmp_path / "srv.log.pgid").exists()  # atexit stopped the group


def test_reap_leaves_a_reused_pgid_alone(tmp_path: Path) -> None:
    """A pgid file whose group now belongs to someone else (no member carries the launch's token)."""
    other = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        (tmp_path / "old.log.pgid").write_text(json.dumps({"pgid": other.pid, "token": "not-its-token"}))
        (tmp_path / "junk.log.pgid").write_text("{not json")
        assert reap_leftovers(tmp_path) == [] and other.poll() is None
        assert list(tmp_path.glob("*.pgid")) == []
    finally:
        other.kill()
        other.wait()


# -- the client -------------------------------------------------------------------------------------
def _sse(*docs: object) -> bytes:
    return b"".join(f"data: {d if isinstance(d, str) else json.dumps(d)}\n\n".encode() for d in docs)


def _replay_one(
    handler: Callable[[httpx.Request], httpx.Response], max_tokens: int = 3, **api: Any
) -> GenerationResult:
    import asyncio

    async def go() -> GenerationResult:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            return await Replayer(http, Api("http://x", model="m", **api)).one([5, 6], max_tokens)

    return asyncio.run(go())


def test_a_streamed_completion_is_timed_and_its_length_checked() -> None:
    sent: list[dict[str, object]] = []

    def vllm_like(completion_tokens: int) -> Callable[[httpx.Request], httpx.Response]:
        def handler(request: httpx.Request) -> httpx.Response:
            sent.append(json.loads(request.content))
            token = {"choices": [{"index": 0, "text": "a", "finish_reason": None}], "usage": None}
            usage = {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": completion_tokens}}
            return httpx.Response(200, content=_sse(token, token, token, usage, "[DONE]"))

        return handler

    res = _replay_one(vllm_like(3))
    assert res.output_tokens == 3 and res.prompt_tokens == 2 and res.t_submit < res.t_first_token <= res.t_end
    assert sent[0] == {
        "prompt": [5, 6],
        "max_tokens": 3,
        "temperature": 0.0,
        "model": "m",
        "min_tokens": 3,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with pytest.raises(RuntimeError, match="2 tokens generated, not the 3 asked"):
        _replay_one(vllm_like(2))
    _replay_one(vllm_like(3), exact_length=False, stream=True, extra={"temperature": 0})
    assert "min_tokens" not in sent[-1] and sent[-1]["temperature"] == 0
    with pytest.raises(RuntimeError, match=r"HTTP 400: .*unknown field"):
        _replay_one(lambda r: httpx.Response(400, json={"error": {"message": "unknown field"}}))
    with pytest.raises(RuntimeError, match="stream error: engine crashed"):
        _replay_one(lambda r: httpx.Response(200, content=_sse({"error": {"message": "engine crashed"}})))
    with pytest.raises(RuntimeError, match="no usage"):
        _replay_one(lambda r: httpx.Response(200, content=_sse({"choices": [{"text": "a"}]}, "[DONE]")))
