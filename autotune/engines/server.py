"""A serving engine as a process of its own: start, ready, measure, stop, clean up.

An external engine (vLLM, or ``autotune serve`` itself) is a command in its own Python
environment that serves the OpenAI-compatible HTTP API on a loopback port. :class:`ServerProcess`
starts it in a process group of its own with its output in a log file, polls it until it answers,
and stops the whole group (SIGTERM, then SIGKILL) and waits for the port to be free again, so the
next trial can start at once. Every way it can go wrong ends in one :class:`EngineProcessError`
whose ``kind`` says what happened and whose message carries the engine's own last log lines, so a
failed trial is recorded with the reason the engine gave, and the study goes on.

A server must never outlive the process that started it: the child asks the kernel for SIGTERM
when its parent dies (``PR_SET_PDEATHSIG``), the process-group id is written beside the log so a
parent can kill what is left (:func:`reap_leftovers`: the engine's own children do not get the
signal), and an ``atexit`` hook stops servers still running at interpreter exit.

:func:`measure_server` replays a study's workload against a running server exactly as
``autotune verify --url`` does (:mod:`autotune.engines.openai_client`, the one replay over HTTP),
and turns a server that dies or stops answering mid-run into an ``EngineProcessError`` within
seconds instead of a request timeout.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autotune.errors import AutotuneError

if TYPE_CHECKING:
    from autotune.config import TrialConfig
    from autotune.measure import Measurement
    from autotune.spec import WorkloadSpec

HOST = "127.0.0.1"
#: ``EngineProcessError.kind`` values.
KINDS = ("start-failed", "port-taken", "start-timeout", "oom", "died", "hung")
#: Log lines an error message carries.
TAIL_LINES = 20
#: Written beside the log: ``<log>.pgid`` holds the group to kill if the parent dies without stopping it.
PGID_SUFFIX = ".pgid"
#: Set in the server's environment, so :func:`reap_leftovers` kills only processes of that launch.
TOKEN_ENV = "AUTOTUNE_SERVER_TOKEN"

_OOM = re.compile(
    r"out of memory|OutOfMemoryError|MemoryError|Cannot allocate memory|std::bad_alloc|oom-kill"
    # vLLM when the KV cache does not fit (the config is infeasible here, not broken)
    r"|available KV cache memory|No available memory for the cache blocks",
    re.IGNORECASE,
)
_PORT_IN_USE = re.compile(r"address already in use|errno 98\b", re.IGNORECASE)
#: A Python exception line in a log: ``RuntimeError: ...`` (after any prefix vLLM's loggers add).
_EXCEPTION = re.compile(r"(?:^|[\s\]|:])((?:[A-Za-z_][\w]*\.)*[A-Z]\w*(?:Error|Exception)): (\S.*)$")
#: Exceptions that only say another one happened (vLLM's API server after its engine core died).
_ECHOES = ("EngineDeadError",)
#: vLLM's API server answering 500 while the engine core behind it is dead.
_ENGINE_DEAD = re.compile(r"EngineDeadError|EngineCore encountered a fatal error")


class EngineProcessError(AutotuneError):
    """A server engine failed: ``kind`` (one of :data:`KINDS`), ``reason``, and the engine's last log lines.

    ``oom`` is a trial the config made infeasible (memory); the other kinds are failures.
    """

    def __init__(self, kind: str, reason: str, log_tail: str = "") -> None:
        if kind not in KINDS:
            raise ValueError(f"EngineProcessError kind {kind!r} is not one of {', '.join(KINDS)}")
        self.kind, self.reason, self.log_tail = kind, reason, log_tail
        message = f"{kind}: {reason}"
        if log_tail.strip():
            message += f"\n--- the engine's last log lines ---\n{log_tail.rstrip()}"
        super().__init__(message)


@dataclass(frozen=True)
class Launch:
    """How to start one server engine: the command, its environment, and how to tell it is ready.

    A literal ``{port}`` in any argument is replaced by the port the server is given (plain text
    replacement, so JSON arguments with braces pass through). ``env`` is added to ``os.environ``.
    ``served_model``: the ``model`` field requests send; None: ask ``/v1/models`` once ready.
    """

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    ready_path: str = "/v1/models"
    start_timeout_s: float = 300.0
    served_model: str | None = None

    def command(self, port: int) -> list[str]:
        """The argv with ``{port}`` filled in."""
        if not self.argv:
            raise AutotuneError("Launch.argv is empty: name the server command to run")
        return [a.replace("{port}", str(port)) for a in self.argv]


def free_port() -> int:
    """A TCP port free on loopback just now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def port_free(port: int) -> bool:
    """Whether a server could listen on 127.0.0.1:``port`` now (SO_REUSEADDR, as servers bind)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def first_error(path: Path, since: int = 0, limit: int = 4 << 20) -> str | None:
    """The first exception line a log holds after byte ``since`` (``RuntimeError: ...``), None if none:
    the root cause, where the tail is often the shutdown's echoes of it."""
    try:
        with path.open("rb") as f:
            f.seek(since)
            text = f.read(limit).decode("utf-8", "replace")
    except OSError:
        return None
    for line in text.splitlines():
        m = _EXCEPTION.search(line.rstrip())
        if m and m.group(1).rsplit(".", 1)[-1] not in _ECHOES:
            return f"{m.group(1)}: {m.group(2)}"[:500]
    return None


def tail(path: Path, lines: int = TAIL_LINES, since: int = 0) -> str:
    """The last ``lines`` lines of a log file written after byte ``since`` ('' when there are none)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(since, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


# -- process groups --------------------------------------------------------------------------------
def _pdeathsig(parent: int) -> Callable[[], None] | None:
    """The child's pre-exec step: SIGTERM when the thread that started it dies (Linux), and exit at once
    if the parent is already gone (it died between fork and prctl). ``prctl`` is looked up here, in
    the parent: the child, forked from a process that may run threads, only calls it."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None  # not Linux: the pgid file and atexit still clean up

    def set_it() -> None:
        prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)

    return set_it


def _group_members(pgid: int) -> list[int]:
    """Pids whose process group is ``pgid`` (from /proc; empty where /proc is missing)."""
    out = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(entry))
    return out


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return bool(_group_members(pgid)) if os.path.isdir("/proc") else True


def _has_token(pid: int, token: str) -> bool:
    try:
        return f"{TOKEN_ENV}={token}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def _kill_group(pgid: int, grace_s: float) -> None:
    """SIGTERM the group, wait up to ``grace_s`` for it to empty, then SIGKILL it."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait_s
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not _group_alive(pgid):
            return


def reap_leftovers(folder: str | Path, grace_s: float = 5.0) -> list[int]:
    """Kill the process groups of servers whose parent died without stopping them; returns their pgids.

    Reads the ``*.pgid`` files :class:`ServerProcess` writes beside its log in ``folder`` and kills a
    group only while a member still carries that launch's token in its environment (a pgid the
    system has since given to someone else is left alone). The files are removed.
    """
    reaped = []
    for path in sorted(Path(folder).glob(f"*{PGID_SUFFIX}")):
        try:
            rec = json.loads(path.read_text())
            pgid, token = int(rec["pgid"]), str(rec["token"])
        except (OSError, ValueError, KeyError, TypeError):
            path.unlink(missing_ok=True)
            continue
        if any(_has_token(pid, token) for pid in _group_members(pgid)):
            _kill_group(pgid, grace_s)
            reaped.append(pgid)
        path.unlink(missing_ok=True)
    return reaped


def _oom_kills() -> int | None:
    """The cgroup's OOM-kill count (v2 memory.events or v1 memory.oom_control), None where unreadable."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    candidates = []
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "":
            candidates.append(Path("/sys/fs/cgroup") / rel.lstrip("/") / "memory.events")
        elif "memory" in controllers.split(","):
            candidates.append(Path("/sys/fs/cgroup/memory") / rel.lstrip("/") / "memory.oom_control")
            candidates.append(Path("/sys/fs/cgroup/memory/memory.oom_control"))
    for p in candidates:
        try:
            for row in p.read_text().splitlines():
                key, _, value = row.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            continue
    return None


_LIVE: weakref.WeakSet[ServerProcess] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop(grace_s=5.0)


# -- the server -------------------------------------------------------------------------------------
class ServerProcess:
    """One server engine process on 127.0.0.1:``port``; its stdout and stderr go to ``log_path``.

    Use it as a context manager (``with ServerProcess(...) as srv: srv.start()``; leaving stops it).
    PR_SET_PDEATHSIG fires when the *thread* that called :meth:`start` exits: start servers from a
    thread that lives as long as they should (the trial's main thread).
    """

    def __init__(self, launch: Launch, *, port: int, log_path: str | Path) -> None:
        if not 0 < port < 65536:
            raise AutotuneError(f"port {port} is not a TCP port (1..65535)")
        self.launch = launch
        self.port = port
        self.log_path = Path(log_path)
        self.pgid_path = self.log_path.with_name(self.log_path.name + PGID_SUFFIX)
        self.served_model: str | None = launch.served_model
        self.startup_s: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._token = uuid.uuid4().hex
        self._oom_before: int | None = None
        self._log_offset = 0
        self._stopping = False

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def first_error(self) -> str | None:
        """The first exception line this start logged (see :func:`first_error`)."""
        return first_error(self.log_path, self._log_offset)

    def log_tail(self, lines: int = TAIL_LINES) -> str:
        """The last lines this start wrote (an earlier run's lines in the same log are not its own)."""
        return tail(self.log_path, lines, self._log_offset)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def alive(self) -> bool:
        """Whether the server's main process is running."""
        return self._proc is not None and self._proc.poll() is None

    def ensure_alive(self) -> None:
        """Raise ``died`` (or ``oom``) with the log tail when the server has exited."""
        if self._proc is None:
            raise AutotuneError("the server was never started")
        if self._proc.poll() is not None:
            raise self._exited("died", "the server exited")

    def start(self) -> float:
        """Start the server and wait until ``ready_path`` answers 200; returns the seconds that took.

        Refuses at once (``port-taken``) when the port is bound; ``start-failed`` (``oom``) when the
        process exits first, ``start-timeout`` when it does not answer within ``start_timeout_s``.
        The process group is stopped before any of these is raised.
        """
        import httpx

        if self._proc is not None:
            raise AutotuneError(f"the server on port {self.port} was already started")
        if not port_free(self.port):
            raise EngineProcessError("port-taken", f"{HOST}:{self.port} is already in use by another process")
        argv = self.launch.command(self.port)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.launch.env, TOKEN_ENV: self._token}
        self._oom_before = _oom_kills()
        t0 = time.perf_counter()
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            log.write(f"$ {' '.join(argv)}\n".encode())
            log.flush()
            try:
                self._proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                    preexec_fn=_pdeathsig(os.getpid()),  # forks, then execs at once
                )
            except OSError as e:
                raise EngineProcessError("start-failed", f"cannot run {argv[0]}: {e.strerror or e}") from None
        _LIVE.add(self)
        self.pgid_path.write_text(json.dumps({"pgid": self._proc.pid, "token": self._token, "argv": argv}))
        deadline = time.monotonic() + self.launch.start_timeout_s
        path = "/" + self.launch.ready_path.lstrip("/")
        pause = 0.05
        with httpx.Client(timeout=httpx.Timeout(5.0, connect=2.0), trust_env=False) as client:  # loopback
            while True:
                if self._proc.poll() is not None:
                    err = self._exited("start-failed", "the server exited before it was ready")
                    self.stop()
                    raise err
                try:
                    r = client.get(self.url + path)
                    if r.status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    log_tail = self.log_tail()
                    self.stop()
                    raise EngineProcessError(
                        "start-timeout",
                        f"the server did not answer {path} on port {self.port} "
                        f"within {self.launch.start_timeout_s:g} s",
                        log_tail,
                    )
                time.sleep(pause)
                pause = min(0.5, pause * 1.5)
            self.startup_s = time.perf_counter() - t0
            if self.served_model is None:
                self.served_model = self._ask_model(client)
        return self.startup_s

    def _ask_model(self, client: Any) -> str | None:
        """The first model ``/v1/models`` lists (None when the server has no such endpoint)."""
        try:
            data = client.get(f"{self.url}/v1/models").json().get("data") or []
            return str(data[0]["id"]) if data else None
        except Exception:  # a server without /v1/models: requests then send no model
            return None

    def _exited(self, kind: str, what: str) -> EngineProcessError:
        """The error for a process that has exited: its exit status, and ``oom`` when memory ran out."""
        assert self._proc is not None
        code = self._proc.wait()
        log_tail = self.log_tail()
        if code < 0:
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            how = f"killed by {name}"
        else:
            how = f"exit status {code}"
        reason = f"{what} ({how})"
        cause = self.first_error()
        if cause is not None and cause not in log_tail:
            reason += f"; first error in its log: {cause}"
        if _OOM.search(log_tail):
            return EngineProcessError("oom", f"{reason}: out of memory", log_tail)
        if code == -signal.SIGKILL:
            after = _oom_kills()
            if after is not None and self._oom_before is not None and after > self._oom_before:
                return EngineProcessError("oom", f"{reason}: the kernel's OOM killer ended it", log_tail)
            if after is None:
                reason += " (the OOM killer, or someone else: the cgroup's OOM count is unreadable here)"
        if kind == "start-failed" and _PORT_IN_USE.search(log_tail):
            return EngineProcessError("port-taken", f"{reason}: port {self.port} is in use", log_tail)
        return EngineProcessError(kind, reason, log_tail)

    def stop(self, grace_s: float = 15.0) -> int | None:
        """SIGTERM the process group, SIGKILL what is left after ``grace_s``, reap, and wait (up to 10 s)
        until the port is free. Returns the exit status (None if never started). Idempotent."""
        proc = self._proc
        if proc is None or self._stopping:
            return None if proc is None else proc.returncode
        self._stopping = True
        try:
            _kill_group(proc.pid, grace_s)
            try:
                code = proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:  # not in its group any more (it called setsid): kill it alone
                proc.kill()
                code = proc.wait(timeout=5.0)
            deadline = time.monotonic() + 10.0
            while not port_free(self.port) and time.monotonic() < deadline:
                time.sleep(0.05)
            self.pgid_path.unlink(missing_ok=True)
            _LIVE.discard(self)
            return code
        finally:
            self._stopping = False

    def memory_mb(self) -> float:
        """The sum of the peak resident memory (VmHWM) of the group's processes, MB (NaN where unknown):
        an upper bound of the server's peak, as each process peaked at its own time."""
        if self._proc is None:
            return math.nan
        total = 0.0
        for pid in _group_members(self._proc.pid):
            with contextlib.suppress(OSError, ValueError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        total += int(line.split()[1]) / 1024
        return total or math.nan


# -- measuring --------------------------------------------------------------------------------------
class RequestsFailed(AutotuneError):
    """Requests of a measured run failed while the server kept running (errors, short outputs)."""

    def __init__(self, failures: list[str], url: str) -> None:
        self.failures = failures
        super().__init__(f"{len(failures)} request(s) failed against {url}; first: {failures[0]}")


def measure_server(
    url: str,
    workload: WorkloadSpec,
    config: TrialConfig,
    *,
    served_model: str | None,
    vocab_size: int,
    first_token_id: int,
    abort_if: Callable[[Measurement], str | None] | None = None,
    process: ServerProcess | None = None,
    exact_length: bool = True,
    stream: bool = True,
    extra_body: Mapping[str, Any] | None = None,
    stall_timeout_s: float = 60.0,
    timings: Mapping[str, float] | None = None,
) -> Measurement:
    """Warm up, then replay ``workload`` against the server at ``url`` and summarize it like a trial.

    The replay is :func:`autotune.engines.openai_client.replay`, the one ``autotune verify --url``
    runs: closed loop of ``workload.arrival.clients`` (or batch_size x streams) clients, or Poisson /
    offline arrivals. Requests stream (``stream_options.include_usage``), so TTFT is the first token's
    arrival (or the server's own figure where it reports one, as ``autotune serve`` does).
    ``exact_length`` sends ``min_tokens`` = ``max_tokens`` and ``ignore_eos`` (vLLM's extensions);
    ``extra_body`` adds fields to every request. ``abort_if`` sees the warm-up round as a
    measurement; when it gives a reason, that round is the result (``stopped_by`` "early-stop: ...").

    With ``process``, a server that exits mid-run is ``died`` (or ``oom``) at once, with its log tail;
    any server that sends nothing for ``stall_timeout_s`` while requests wait is ``hung``. ``timings``
    are kept beside the warm-up's (pass ``{"startup_s": server.startup_s}`` for the trial that started
    the server; a trial on a reused server had none). Requests
    that fail while the server runs (an error status, a short output) raise :class:`RequestsFailed`.
    """
    import asyncio

    from autotune.engines.openai_client import Api, measure_async

    api = Api(
        url=url.rstrip("/"),
        model=served_model,
        stream=stream,
        exact_length=exact_length,
        extra=dict(extra_body or {}),
    )
    try:
        m = asyncio.run(
            measure_async(
                api,
                workload,
                config,
                vocab_size=vocab_size,
                first_token_id=first_token_id,
                abort_if=abort_if,
                alive=process.alive if process is not None else None,
                stall_timeout_s=stall_timeout_s,
                timings=dict(timings or {}),
            )
        )
    except EngineProcessError as e:
        if process is None:
            raise
        if not process.alive():  # exited: the exit status, and oom when that is why
            raise process._exited("died", e.reason) from None
        raise EngineProcessError(e.kind, e.reason, process.log_tail()) from None
    except RequestsFailed as e:
        if process is None:
            raise
        deadline = time.monotonic() + 3.0  # a server whose engine died often exits a moment later
        while process.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not process.alive():
            raise process._exited("died", f"the server exited mid-run after {e}") from None
        log_tail, cause = process.log_tail(), process.first_error()
        if _OOM.search(log_tail) or (cause and _OOM.search(cause)):  # failed for memory: the config is infeasible
            raise EngineProcessError("oom", f"{e} (the server ran out of memory: {cause})", log_tail) from None
        if _ENGINE_DEAD.search(log_tail):  # the API server is up, the engine behind it is not
            why = f"; first error in its log: {cause}" if cause else ""
            raise EngineProcessError("died", f"the engine behind the API server died ({e}){why}", log_tail) from None
        raise
    if process is not None:
        mem = process.memory_mb()
        if mem == mem and m.peak_memory_mb != m.peak_memory_mb:  # NaN: the server did not say
            m.peak_memory_mb, m.memory_kind = mem, "server_group_peak_rss"
    return m
