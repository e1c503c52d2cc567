"""Run one trial (or the hardware/model preflight) in a fresh child process.

Each child is forked from a fork server that has already imported torch and transformers
(and done nothing else), so isolation costs milliseconds, not seconds. The child gets a JSON
job, writes a JSON result file, and sends its stdout/stderr to a log file whose tail becomes
the trial's log excerpt. A CUDA OOM, a segfault, a hang or a leaked global setting ends with the child; the
parent only waits on it (blocking, never polling in a loop) and classifies what happened.

Testing hook: ``AUTOTUNE_INJECT_FAULT=KIND[:knob=value,...]`` (KIND one of oom, crash, hang,
error) makes matching trials fail that way inside the child, to exercise the failure paths;
``perturb`` instead adds noise to their weights: a config that runs fast but breaks the model.
"""

from __future__ import annotations

import atexit
import json
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autotune.config import TrialConfig
from autotune.devicelock import measuring_on
from autotune.errors import AutotuneError, ModelError, SpecError, TrialFailure
from autotune.hardware import Hardware
from autotune.measure import Measurement
from autotune.models import ModelInfo
from autotune.spec import StudySpec

LOG_TAIL_CHARS = 4000
#: A trial whose warm-up already misses a latency SLO by this factor stops there (infeasible).
EARLY_STOP_FACTOR = 3.0
FAULT_ENV = "AUTOTUNE_INJECT_FAULT"


# -- parent side ----------------------------------------------------------------------------------
#: Modules the fork server imports once, so each trial process starts in milliseconds instead of
#: paying ~7 s of torch + transformers imports. Nothing runs in the server: no threads, no CUDA.
PRELOAD = ["autotune._preload"]
_ctx: Any = None


def _context() -> Any:
    global _ctx
    if _ctx is None:
        # OpenMP's default wait policy (a short spin, then sleep): the engine frees the building
        # thread's pool before its workers compute (engines/builtin/openmp.py), so one pool spins.
        # PASSIVE (set here until 2026-12-07) made every parallel region a futex wake-up: 0.81x.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        methods = mp.get_all_start_methods()
        _ctx = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
        if "forkserver" in methods:
            _ctx.set_forkserver_preload(PRELOAD)
    return _ctx


def _tail(path: Path) -> str:
    try:
        data = path.read_bytes()[-LOG_TAIL_CHARS:]
    except OSError:
        return ""
    return data.decode("utf-8", "replace")


_FORK_CUDA_ERROR = "Cannot re-initialize CUDA in forked subprocess"


def run_child(job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run a job in a fresh child process; return its result or raise TrialFailure."""
    return _with_spawn_fallback(lambda: _run_child(job, timeout_s))


def _with_spawn_fallback(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Should the fork server ever come up with CUDA initialized (an import that queries the GPU),
    forked children cannot use the GPU; the job is then rerun once with, and every later job
    uses, fresh spawned processes (slower to start, always CUDA-safe)."""
    global _ctx
    try:
        return run()
    except TrialFailure as err:
        if _FORK_CUDA_ERROR not in err.reason or _ctx is None or _ctx.get_start_method() == "spawn":
            raise
        _ctx = mp.get_context("spawn")
        return run()


def _with_files(job: dict[str, Any], tmp: str) -> tuple[dict[str, Any], Path, Path]:
    """The job with its result and log paths (and the fault hook, which travels in the job: the
    fork server's environment is frozen at its start)."""
    result_path, log_path = Path(tmp) / "result.json", Path(tmp) / "log.txt"
    paths = {"result_path": str(result_path), "log_path": str(log_path), "fault": os.environ.get(FAULT_ENV, "")}
    return {**job, **paths}, result_path, log_path


def _timeout(timeout_s: float, log_path: Path) -> TrialFailure:
    return TrialFailure("timeout", f"trial exceeded its {timeout_s:g} s limit and was killed", _tail(log_path))


def _outcome(result_path: Path, log_path: Path, exitcode: int | None) -> dict[str, Any]:
    """The child's result, or the TrialFailure its result file (or its exit) says."""
    log_text = _tail(log_path)
    if result_path.exists():
        result: dict[str, Any] = json.loads(result_path.read_text())
        if result.get("status") == "ok":
            return result
        raise TrialFailure(result.get("kind", "error"), result.get("reason", "unknown error"), log_text)
    if exitcode is not None and exitcode < 0:
        sig = signal.Signals(-exitcode).name
        hint = " (likely the kernel's out-of-memory killer)" if sig == "SIGKILL" else ""
        raise TrialFailure("crash", f"trial process died with {sig}{hint}", log_text)
    raise TrialFailure("crash", f"trial process exited with code {exitcode} without a result", log_text)


def _run_child(job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="autotune-trial-") as tmp:
        job, result_path, log_path = _with_files(job, tmp)
        proc = _context().Process(target=_child_entry, args=(json.dumps(job),), daemon=False)
        proc.start()
        try:
            finished = bool(mp_connection.wait([proc.sentinel], timeout_s))  # blocks; no polling
        except BaseException:  # Ctrl-C in the parent: take the child down with us
            _kill(proc)
            raise
        if not finished:
            _kill(proc)
            raise _timeout(timeout_s, log_path)
        proc.join()
        return _outcome(result_path, log_path, proc.exitcode)


def _kill(proc: Any) -> None:
    proc.kill()
    proc.join()


def preflight(spec: StudySpec, timeout_s: float = 300.0) -> tuple[Hardware, ModelInfo]:
    """Probe the hardware and resolve the model (config only) in a child process."""
    hw, info, _ = preflight_with_variants(spec, timeout_s)
    return hw, info


def preflight_with_variants(
    spec: StudySpec, timeout_s: float = 300.0
) -> tuple[Hardware, ModelInfo, dict[str, ModelInfo]]:
    """:func:`preflight`, plus each model variant's info once it is checked against the reference."""
    job = {"mode": "preflight", "spec": spec.model_dump(mode="json")}
    res = _setup_job(job, timeout_s, "hardware/model preflight")
    variants = {ref: ModelInfo.from_dict(v) for ref, v in res.get("variants", {}).items()}
    hw = Hardware.model_validate(res["hardware"])
    # The ceilings are a measurement: in their own child, once the device is known and free.
    with measuring_on(hw.device, f"{spec.name}: measuring the device's ceilings"):
        c = _setup_job({"mode": "ceilings", "device": hw.device}, timeout_s, "measuring the device's ceilings")
    hw = hw.model_copy(update={k: c[k] for k in ("memory_gb_s", "matmul_tflops", "matmul_dtype")})
    return hw, ModelInfo.from_dict(res["model"]), variants


def run_trial(
    spec: StudySpec,
    config: TrialConfig,
    hardware: Hardware,
    timeout_s: float | None = None,
    *,
    reference: str | None = None,
) -> Measurement:
    """Measure ``config`` under the spec's workload in a child process; with a ``reference``
    (:meth:`autotune.quality.Reference.to_b64`), also its fidelity."""
    job = {
        "mode": "trial",
        "spec": spec.model_dump(mode="json"),
        "config": config.model_dump(mode="json"),
        "hardware": hardware.model_dump(mode="json"),
        "reference": reference,
        "model_dir": _model_dir(spec, config),
    }
    limit = timeout_s or spec.budget.trial_timeout_s
    with measuring_on(hardware.device, f"study {spec.name}, {config.label()}"):
        res = _run_warm(job, limit) if spec.budget.reuse_engine else run_child(job, limit)
    return Measurement.from_dict(res["measurement"])


def _model_dir(spec: StudySpec, config: TrialConfig) -> str | None:
    """The checkpoint folder an engine other than the built-in one loads (presets written once, here in
    the parent, so that the trial process starts none of its own), or None for the built-in engine."""
    if config.engine == "builtin":
        return None
    from autotune.checkpoint import checkpoint_dir

    ref = config.model or spec.model
    folder = checkpoint_dir(ref, spec.model_seed)
    return str(folder) if folder is not None else ref


# -- reuse across trials ----------------------------------------------------------------------------
def build_key(job: dict[str, Any]) -> str:
    """What a trial process's built engine depends on: the spec, the device and the model knobs
    (and whether the test hook perturbs this config's weights, which it may tie to any knob).
    Trials with the same key differ only in runtime knobs."""
    import hashlib

    from autotune.config import MODEL_KNOBS

    cfg = job["config"]
    perturbed = _fault_for(TrialConfig.model_validate(cfg), os.environ.get(FAULT_ENV, "")) == "perturb"
    what = {
        "spec": job["spec"],
        "hardware": job["hardware"],
        "build": {k: cfg.get(k) for k in MODEL_KNOBS},
        "engine_args": _build_args(TrialConfig.model_validate(cfg)),
        "perturbed": perturbed,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _build_args(cfg: TrialConfig) -> dict[str, Any]:
    """The engine's own knobs that need a new start (all of them, for a server engine), and the
    shared runtime knobs the engine cannot change while running."""
    from autotune.config import RUNTIME_KNOBS
    from autotune.engines import get_engine

    if cfg.engine == "builtin":
        return {}
    runtime = get_engine(cfg.engine).runtime_knobs
    fixed = {k: getattr(cfg, k) for k in RUNTIME_KNOBS if k not in runtime}
    return {**fixed, **{k: v for k, v in cfg.engine_args if k not in runtime}}


class _WarmChild:
    """A trial process that stays up between trials sharing a :func:`build_key`, so the next one
    skips load, precision, quantization and compile (and, with the same reference, the fidelity
    check). Any failure, a timeout or a different key ends it; the next trial gets a fresh one."""

    def __init__(self, key: str) -> None:
        ctx = _context()
        self.key = key
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=_warm_entry, args=(child_conn,), daemon=False)  # inductor forks workers
        self.proc.start()
        child_conn.close()

    def alive(self) -> bool:
        return bool(self.proc.is_alive())

    def run(self, job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="autotune-trial-") as tmp:
            job, result_path, log_path = _with_files({**job, "build_key": self.key}, tmp)
            try:
                self.conn.send(json.dumps(job))
                ready = mp_connection.wait([self.conn, self.proc.sentinel], timeout_s)
            except BaseException:  # Ctrl-C in the parent (or a broken pipe): take the child down
                self.close()
                raise
            if not ready:
                self.close()
                raise _timeout(timeout_s, log_path)
            died = self.conn not in ready
            if not died:
                try:
                    self.conn.recv()
                except EOFError:  # the pipe closed before the sentinel fired: it died mid-trial
                    died = True
            if died:  # reap it, so the exit code (the signal) is known
                self.proc.join(timeout=5)
            try:
                return _outcome(result_path, log_path, self.proc.exitcode)
            except TrialFailure:
                self.close()  # a failed trial may leave the process in a bad state
                raise

    def close(self, *, graceful: bool = False) -> None:
        """End the process: killed (after a failure or a timeout), or ``graceful`` for an idle one,
        asked to exit by closing its pipe so that its exit handlers run (a killed process that had
        quantized with int8-dynamic left a semaphore behind, and the resource tracker warned about
        it when the CLI exited); killed if it has not exited within :data:`GRACEFUL_EXIT_S`."""
        if graceful and self.proc.is_alive():
            self.conn.close()
            self.proc.join(GRACEFUL_EXIT_S)
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()
        self.conn.close()

    def rss_mb(self) -> float | None:
        """Resident memory of the process, or None where it cannot be read."""
        import psutil

        try:
            return float(psutil.Process(self.proc.pid).memory_info().rss) / 2**20
        except (psutil.Error, ValueError):
            return None


#: Warm trial processes, least recently used first (build key -> process).
_warm: dict[str, _WarmChild] = {}
#: How long an idle warm trial process gets to exit on its own before it is killed.
GRACEFUL_EXIT_S = 5.0
#: How many built engines a CPU study keeps warm. A model-based sampler often alternates between
#: builds (fp32 on onnxruntime, bf16 on eager, int8-dynamic on eager, in the quickstart): with one
#: warm process each switch rebuilt (1 of 16 trials reused its engine), with two a run that cycled
#: through three builds reused 4 of 16; three slots would have reused 11-13 of 16 in every logged
#: quickstart run (``python bench/engine_slots.py``). Idle processes take memory, not CPU, and
#: :data:`WARM_IDLE_MEMORY_SHARE` bounds that. A GPU keeps one: a second process holds another
#: CUDA context and copy of the weights in the memory the trials measure against.
WARM_ENGINES_CPU = 3
#: An idle engine is kept only while it takes under this share of the memory still available.
WARM_IDLE_MEMORY_SHARE = 0.25


def _available_mb() -> float:
    import psutil

    return float(psutil.virtual_memory().available) / 2**20


def _keep_idle(child: _WarmChild) -> bool:
    """Whether an idle warm process may stay up beside the one about to run."""
    if not child.alive():
        return False
    rss = child.rss_mb()
    return rss is not None and rss < WARM_IDLE_MEMORY_SHARE * _available_mb()


def _run_warm(job: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Run a trial job in the warm child holding its build key, else in a new warm child; idle
    children of other keys stay up while :data:`WARM_ENGINES_CPU` and memory allow."""
    key = build_key(job)
    capacity = WARM_ENGINES_CPU if job["hardware"].get("device_type") == "cpu" else 1

    def run() -> dict[str, Any]:
        child = _warm.pop(key, None)
        if child is not None and not child.alive():
            child.close()
            child = None
        for other in list(_warm):  # least recently used first; the one about to run takes a slot
            if len(_warm) > capacity - 1 or not _keep_idle(_warm[other]) or other in _SERVER_KEYS:
                _warm.pop(other).close(graceful=True)  # an idle server engine's threads would share the cores
                _SERVER_KEYS.discard(other)
        if child is None:
            child = _WarmChild(key)
        _warm[key] = child  # most recently used
        if _is_server_job(job):
            _SERVER_KEYS.add(key)
        try:
            return child.run(job, timeout_s)
        except BaseException:
            if not child.alive():  # a failed trial ended it (``run`` closes it)
                _warm.pop(key, None)
            raise

    return _with_spawn_fallback(run)


#: Build keys of warm processes that run a server engine: kept only while their own trials run (an
#: idle vLLM server is a process group with threads of its own, beside the next trial's measurement).
_SERVER_KEYS: set[str] = set()


def _is_server_job(job: dict[str, Any]) -> bool:
    engine = str(job["config"].get("engine", "builtin"))
    if engine == "builtin":
        return False
    from autotune.engines import get_engine

    return get_engine(engine).kind == "server"


def close_warm_child() -> None:
    """End the warm trial processes (a study's end; also at interpreter exit)."""
    while _warm:
        _warm.pop(next(iter(_warm))).close(graceful=True)


atexit.register(close_warm_child)


def reference_key(spec: StudySpec, hardware: Hardware) -> str:
    """What a study's reference depends on: model, weights seed, quality spec, device kind."""
    import hashlib

    what = {
        "model": spec.model,
        "model_seed": spec.model_seed,
        "quality": spec.quality.model_dump(mode="json"),
        "device": hardware.fingerprint(),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def compute_reference(spec: StudySpec, hardware: Hardware, timeout_s: float | None = None) -> str:
    """The reference outputs (base64 payload) of the spec's model at its reference precision, eager,
    unquantized, on the spec's evaluation set; bad eval input raises SpecError before any trial."""
    job = {"mode": "reference", "spec": spec.model_dump(mode="json"), "hardware": hardware.model_dump(mode="json")}
    with measuring_on(hardware.device, f"study {spec.name}, quality reference"):
        res = _setup_job(job, timeout_s or max(spec.budget.trial_timeout_s, 300.0), "computing the quality reference")
    return str(res["reference"])


def write_checkpoint(ref: str, seed: int, folder: Path, timeout_s: float = 600.0) -> None:
    """Write ``ref``'s weights (drawn on the CPU from ``seed``), tokenizer and config to ``folder``, in a
    child process; the folder appears whole (written beside it, then renamed) or not at all."""
    job = {"mode": "checkpoint", "ref": ref, "seed": seed, "folder": str(folder)}
    _setup_job(job, timeout_s, f"writing {ref} as a checkpoint folder")


def _setup_job(job: dict[str, Any], timeout_s: float, what: str) -> dict[str, Any]:
    """A job that runs before any trial (preflight, reference): a failure is the user's input
    (spec, model, device) or one line saying ``what`` failed, never a TrialFailure."""
    try:
        return run_child(job, timeout_s)
    except TrialFailure as err:
        kinds: dict[str, type[AutotuneError]] = {"spec": SpecError, "model": ModelError, "device": AutotuneError}
        if err.kind in kinds:
            raise kinds[err.kind](err.reason) from None
        raise AutotuneError(f"{what} failed: {err.reason}") from None


# -- child side -----------------------------------------------------------------------------------
def _fault_for(config: TrialConfig, raw: str) -> str | None:
    """The injected fault's kind if it applies to ``config``."""
    if not raw:
        return None
    kind, _, cond = raw.partition(":")
    for clause in filter(None, cond.split(",")):
        knob, _, value = clause.partition("=")
        if str(getattr(config, knob.strip(), None)) != value.strip():
            return None
    return kind


def _perturb(model: Any) -> None:
    """Add seeded noise (half each weight matrix's own std) to every Linear layer."""
    import torch

    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                w = mod.weight
                noise = torch.randn(w.shape, generator=gen, dtype=torch.float32).to(w.device, w.dtype)
                w.add_(noise * (0.5 * float(w.float().std())))


def _inject_fault(config: TrialConfig, raw: str) -> None:
    kind = _fault_for(config, raw)
    if kind == "oom":
        import torch

        raise torch.OutOfMemoryError("injected: CUDA out of memory. Tried to allocate 20.00 GiB")
    if kind == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if kind == "hang":
        time.sleep(10**6)
    if kind == "error":
        raise RuntimeError("injected: compile error in inductor")


def _classify(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".lower()
    if isinstance(err, MemoryError) or "out of memory" in text or "outofmemory" in text:
        return "oom"
    return "error"


#: The warm child's built engine and its fidelity result, by build key (see _WarmChild).
_BUILT: dict[str, Any] = {}


def _release_built() -> None:
    """Forget the warm process's built engine, stopping it first when it is a server."""
    server = _BUILT.get("server")
    if server is not None:
        import shutil

        server.stop()
        shutil.rmtree(server.log_path.parent, ignore_errors=True)
    _BUILT.clear()


def _child_trial(job: dict[str, Any]) -> dict[str, Any]:
    from autotune.measure import run_workload

    spec = StudySpec.model_validate(job["spec"])
    config = TrialConfig.model_validate(job["config"])
    hw = Hardware.model_validate(job["hardware"])
    _inject_fault(config, job.get("fault", ""))
    if config.engine != "builtin":
        from autotune.engines import get_engine

        if get_engine(config.engine).kind == "server":
            return _child_server_trial(job, spec, config, hw)
    pad = spec.workload.prompt_tokens.upper
    ctx = pad + spec.workload.output_tokens.upper
    ref = config.model or spec.model
    key = job.get("build_key")
    reused = key is not None and _BUILT.get("key") == key
    if reused:
        engine = _BUILT["engine"]
        engine.reconfigure(config)
        engine.timings = type(engine.timings)()  # nothing was loaded, converted or quantized this time
    else:
        _release_built()
        build = _builder(config.engine)
        engine = build(ref, config, hw, seed=spec.model_seed, prompt_pad_to=pad, max_context=ctx)
        if _fault_for(config, job.get("fault", "")) == "perturb":
            _perturb(engine.model)
        if key is not None:
            _BUILT.update(key=key, engine=engine)
    first_id = len(getattr(engine.tokenizer, "all_special_ids", []) or [0])
    common: dict[str, Any] = {"vocab_size": engine.info.vocab_size, "first_token_id": first_id}
    common["build_timings"] = engine.timings.as_dict()
    from autotune.load import watch

    # The load from other processes while it measured (this process and its children, a server
    # included, are its own): the tuner re-measures a disturbed trial (issue 27.7).
    with engine, watch(device=hw.device) as load:
        if spec.workload.transport == "http":
            from autotune.transport import measure_over_http

            m = measure_over_http(engine, spec.workload, **common, abort_if=_early_stop(spec))
        else:
            m = run_workload(engine, spec.workload, **common, abort_if=_early_stop(spec))
    m.background = load.result()
    ceilings = hw.ceilings()
    if ceilings is not None and m.requests and config.engine == "builtin":
        from autotune.engines.builtin.optimize.precision import torch_dtype
        from autotune.roofline import compute_dtype, count_model, roofline

        m.roofline = roofline(
            m,
            ceilings,
            counts=count_model(engine.model),
            kv_element_size=torch_dtype(config.precision).itemsize,
            prompt_tokens=m.mean_prompt_tokens,
            output_tokens=m.output_tokens / m.requests,
            matmul_dtype=compute_dtype(config.precision, config.quantization),
        )
    if job.get("reference") and spec.quality.enabled:
        from autotune.quality import Reference, build_eval_set, fidelity

        # Fidelity depends on the built model only: a reused engine's result stands.
        cached = _BUILT.get("quality") if reused and _BUILT.get("reference") == job["reference"] else None
        t = time.perf_counter()
        # What is served is measured: the exported graph's numerics for the onnxruntime backend, the
        # engine's own for another in-process engine.
        served = {"logits": engine.exported.logits, "greedy": engine.exported.greedy} if engine.exported else {}
        if getattr(engine, "served_logits", None) is not None:
            served = {"logits": engine.served_logits, "greedy": engine.served_greedy}
        m.quality = cached or fidelity(
            engine.model,
            build_eval_set(spec.quality, engine.tokenizer),
            Reference.from_b64(job["reference"]),
            **served,
        )
        m.timings["quality_s"] = time.perf_counter() - t
        if key is not None:
            _BUILT.update(quality=m.quality, reference=job["reference"])
    if reused:
        m.timings["engine_reused"] = 1.0
    m.niceness = _niceness()
    return {"status": "ok", "measurement": m.to_dict()}


def _builder(engine: str) -> Any:
    """The engine's ``build_engine`` (the built-in one's is ``Engine.build``)."""
    from autotune.engines import get_engine

    return get_engine(engine).build_engine


def _child_server_trial(job: dict[str, Any], spec: StudySpec, config: TrialConfig, hw: Hardware) -> dict[str, Any]:
    """A trial of a server engine: start it with the config's launch (or reuse the running one with the
    same launch), replay the workload over its OpenAI-compatible API, measure fidelity the same way."""
    from transformers import AutoTokenizer

    from autotune.engines import get_engine
    from autotune.engines.server import EngineProcessError, ServerProcess, free_port, measure_server
    from autotune.space import server_context

    plugin = get_engine(config.engine)
    model_dir = Path(job["model_dir"])
    key = job.get("build_key")
    server = _BUILT.get("server") if key is not None and _BUILT.get("key") == key else None
    reused = server is not None and server.alive()
    timings: dict[str, float] = {}
    try:
        if not reused:
            _release_built()
            port = free_port()
            context = int(config.arg("max_model_len") or server_context(spec))
            launch = plugin.launch(config, model_dir, hw, port=port, max_model_len=context)
            logs = Path(tempfile.mkdtemp(prefix=f"autotune-{config.engine}-"))
            server = ServerProcess(launch, port=port, log_path=logs / "engine.log")
            _BUILT.update(key=key, server=server)
            timings["engine_start_s"] = server.start()
        assert server is not None
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        first_id = len(getattr(tokenizer, "all_special_ids", []) or [0])
        from autotune.load import watch

        with watch(device=hw.device) as load:  # the server is this process's child: its own load
            m = measure_server(
                server.url,
                spec.workload,
                config,
                served_model=server.served_model,
                vocab_size=len(tokenizer),
                first_token_id=first_id,
                abort_if=_early_stop(spec),
                process=server,
                timings=timings,
            )
        m.background = load.result()
        if job.get("reference") and spec.quality.enabled:
            from autotune.quality import Reference, build_eval_set

            cached = _BUILT.get("quality") if reused and _BUILT.get("reference") == job["reference"] else None
            t = time.perf_counter()
            es = build_eval_set(spec.quality, tokenizer)
            m.quality = cached or plugin.fidelity_over_http(
                server.url, server.served_model, es, Reference.from_b64(job["reference"])
            )
            m.timings["quality_s"] = time.perf_counter() - t
            _BUILT.update(quality=m.quality, reference=job["reference"])
    except EngineProcessError as err:  # the engine's own last lines go to the trial's log excerpt
        print(f"engine {config.engine}: {err.kind}: {err.reason}\n{err.log_tail}", file=sys.stderr)
        _release_built()
        kind = "oom" if err.kind == "oom" else "error"
        return {"status": "error", "kind": kind, "reason": f"engine {config.engine} {err.kind}: {err.reason}"[:500]}
    except BaseException:
        _release_built()
        raise
    finally:
        if key is None:  # a one-off trial process: nothing reuses the server
            _release_built()
    if reused:
        m.timings["engine_reused"] = 1.0
    m.niceness = _niceness()
    return {"status": "ok", "measurement": m.to_dict()}


def _child_reference(job: dict[str, Any]) -> dict[str, Any]:
    from autotune.engines.builtin.engine import Engine
    from autotune.quality import build_eval_set, compute_reference

    spec = StudySpec.model_validate(job["spec"])
    hw = Hardware.model_validate(job["hardware"])
    q = spec.quality
    try:
        engine = Engine.build(spec.model, TrialConfig(precision=q.reference_precision), hw, seed=spec.model_seed)
    except ModelError as err:
        return {"status": "error", "kind": "model", "reason": str(err)}
    try:
        es = build_eval_set(q, engine.tokenizer)
    except SpecError as err:
        return {"status": "error", "kind": "spec", "reason": str(err)}
    return {"status": "ok", "reference": compute_reference(engine.model, es, q.top_k).to_b64()}


def _early_stop(spec: StudySpec) -> Any:
    def check(m: Measurement) -> str | None:
        for c in spec.latency_constraints:
            v = m.value(c.name)
            if c.max is not None and v > EARLY_STOP_FACTOR * c.max:
                return f"warm-up {c.percentile} {c.metric} {v:,.0f} > {EARLY_STOP_FACTOR:g} x {c.max:g}"
        return None

    return check


def _child_preflight(job: dict[str, Any]) -> dict[str, Any]:
    from autotune.hardware import probe
    from autotune.models import check_variant, resolve_model

    spec = StudySpec.model_validate(job["spec"])
    try:
        hw = probe(spec.device)
    except RuntimeError as err:
        return {"status": "error", "kind": "device", "reason": str(err)}
    try:
        info = resolve_model(spec.model)
        variants = {v: check_variant(spec.model, v).to_dict() for v in spec.variants}
    except ModelError as err:
        return {"status": "error", "kind": "model", "reason": str(err)}
    return {"status": "ok", "hardware": hw.model_dump(mode="json"), "model": info.to_dict(), "variants": variants}


def _child_checkpoint(job: dict[str, Any]) -> dict[str, Any]:
    import shutil

    from autotune.models import load_model

    folder = Path(job["folder"])
    try:
        model, tokenizer, _ = load_model(job["ref"], device="cpu", seed=job["seed"])
    except ModelError as err:
        return {"status": "error", "kind": "model", "reason": str(err)}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if folder.exists():  # another process wrote it meanwhile: same seed, same weights
            shutil.rmtree(tmp)
        else:
            tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return {"status": "ok", "folder": str(folder)}


def _child_ceilings(job: dict[str, Any]) -> dict[str, Any]:
    from autotune.roofline import measure_ceilings

    c = measure_ceilings(job["device"])
    return {
        "status": "ok",
        "memory_gb_s": c.memory_gb_s,
        "matmul_tflops": c.matmul_tflops,
        "matmul_dtype": c.matmul_dtype,
    }


def _niceness() -> int:
    """The highest priority (lowest niceness) among this process's threads: on Linux niceness is
    per thread, and one thread left at the tuner's priority would undo :func:`lower_priority`."""
    try:
        stats = [p.read_text() for p in Path("/proc/self/task").glob("*/stat")]
        return min(int(s.rsplit(")", 1)[1].split()[16]) for s in stats)  # field 19: nice
    except (OSError, ValueError, IndexError):
        return os.getpriority(os.PRIO_PROCESS, 0) if hasattr(os, "getpriority") else 0


def lower_priority(niceness: int) -> None:
    """Run this process at CPU niceness ``niceness`` or lower priority (never raises it back).

    Trials measure at a lower priority than the tuner so that, when trials fill every core (several
    workers on one machine), the tuner's and the database's short storage calls run at once instead
    of queueing behind the measurement. Threads started afterwards (torch's) inherit it; on Linux
    it applies to the calling thread, so it must come before any are started.
    """
    if niceness > 0 and hasattr(os, "setpriority") and _niceness() < niceness:
        os.setpriority(os.PRIO_PROCESS, 0, niceness)


def _warm_entry(conn: Any) -> None:
    """Warm child body: run trial jobs from the pipe one after another, each with its own log and
    result file, until the parent closes the pipe or kills the process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        try:
            job_json = conn.recv()
        except (EOFError, OSError):
            return
        _child_entry(job_json)
        conn.send("done")


def _child_entry(job_json: str) -> None:
    """Child process body: output to the log file, result to the result file."""
    import logging
    import traceback
    import warnings

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it kills this process
    job = json.loads(job_json)
    lower_priority(job.get("spec", {}).get("budget", {}).get("trial_niceness", 0))  # before torch starts threads
    log_fd = os.open(job["log_path"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    warnings.filterwarnings("ignore")
    logging.getLogger("torchao").setLevel(logging.ERROR)
    out = Path(job["result_path"])
    try:
        modes = {
            "preflight": _child_preflight,
            "ceilings": _child_ceilings,
            "checkpoint": _child_checkpoint,
            "reference": _child_reference,
            "trial": _child_trial,
        }
        result = modes[job["mode"]](job)
    except BaseException as err:
        traceback.print_exc()
        result = {"status": "error", "kind": _classify(err), "reason": f"{type(err).__name__}: {err}"[:500]}
    out.write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
