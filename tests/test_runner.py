"""Trials in child processes: a measurement comes back; OOM, crash, hang and errors are classified."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from autotune.config import TrialConfig
from autotune.errors import ModelError, TrialFailure
from autotune.hardware import Hardware
from autotune.runner import FAULT_ENV, preflight, run_trial
from autotune.spec import StudySpec, load_spec, parse_spec

from .conftest import TINY_SPEC


@pytest.fixture(scope="module")
def spec() -> StudySpec:
    return load_spec(TINY_SPEC)


@pytest.fixture(scope="module")
def hw(spec: StudySpec) -> Hardware:
    hardware, info = preflight(spec)
    assert info.vocab_size == 512 and info.num_layers == 2
    return hardware


def test_trial_returns_a_real_measurement(spec: StudySpec, hw: Hardware) -> None:
    m = run_trial(spec, TrialConfig(batch_size=4, max_queue_delay_ms=5), hw)
    assert m.requests >= 4 and m.output_tokens == m.requests * 8
    assert m.output_tokens_per_s > 0 and 0 < m.e2e_ms["p50"] <= m.e2e_ms["p99"]
    assert m.memory_kind == "process_peak_rss" and m.peak_memory_mb > 50
    assert m.timings["load_s"] > 0 and "warmup_s" in m.timings
    assert m.memory["process_peak_rss_mb"] > 50 and m.mean_prompt_tokens > 0
    assert 0 < m.prefill_ms["p50"] <= m.ttft_ms["p99"]
    assert 0 < m.roofline["decode_fraction"] < 1 and 0 < m.roofline["prefill_fraction"] < 1
    assert m.roofline["decode_step_ms"] == m.tpot_ms["p50"]
    b = m.breakdown_ms  # a request's time: waiting for its batch, its prefill, its decode
    assert set(b) == {"queue", "prefill", "decode"} and b["decode"] > 0
    assert b["queue"] + b["prefill"] + b["decode"] == pytest.approx(m.e2e_ms["mean"], rel=1e-6)
    # Other processes' load while it replayed the workload (issue 27.7); the trial's own CPU is its own.
    assert m.background is not None and m.background["own_cpu_cores"] > 0 and "disturbed" in m.background


def test_preflight_measures_the_device_ceilings(hw: Hardware) -> None:
    c = hw.ceilings()
    assert c is not None and c.memory_gb_s > 0.1 and c.matmul_tflops > 0
    assert hw.fingerprint() == hw.model_copy(update={"memory_gb_s": 1.0}).fingerprint()  # noise is not identity


def test_fork_server_preload_keeps_torchao_out_but_importable() -> None:
    import subprocess
    import sys

    code = (
        "import sys, autotune._preload; assert 'torchao' not in sys.modules, 'preloaded';"
        "import torch; assert not torch.cuda.is_initialized();"
        "import torchao.quantization; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]


@pytest.mark.parametrize(
    ("fault", "kind", "reason"),
    [
        ("oom", "oom", "out of memory"),
        ("crash", "crash", "SIGSEGV"),
        ("error", "error", "injected: compile error"),
    ],
)
def test_injected_failures_are_classified(
    spec: StudySpec, hw: Hardware, monkeypatch: pytest.MonkeyPatch, fault: str, kind: str, reason: str
) -> None:
    monkeypatch.setenv(FAULT_ENV, f"{fault}:batch_size=2")
    with pytest.raises(TrialFailure) as exc:
        run_trial(spec, TrialConfig(batch_size=2), hw)
    assert exc.value.kind == kind and reason in exc.value.reason
    if fault != "crash":
        assert "Traceback" in exc.value.log  # the child's own log excerpt comes back


def test_a_crash_seen_first_as_a_closed_pipe_still_names_the_signal(
    spec: StudySpec, hw: Hardware, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The warm child's pipe can report EOF before its sentinel fires (CI saw exit code None):
    force that order and the signal must still be read."""
    from multiprocessing import connection

    import autotune.runner as runner

    real_wait = connection.wait

    def pipe_first(objects: list, timeout: float | None = None) -> list:
        ready = real_wait(objects, timeout)
        pipes = [o for o in objects if not isinstance(o, int)]
        if pipes and any(isinstance(o, int) for o in ready):
            return real_wait(pipes, 5)  # the process died: report only its closed pipe
        return ready

    monkeypatch.setattr(runner.mp_connection, "wait", pipe_first)
    monkeypatch.setenv(FAULT_ENV, "crash:batch_size=2")
    with pytest.raises(TrialFailure) as exc:
        run_trial(spec, TrialConfig(batch_size=2), hw)
    assert exc.value.kind == "crash" and "SIGSEGV" in exc.value.reason


def test_hang_is_killed_at_the_timeout(spec: StudySpec, hw: Hardware, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULT_ENV, "hang")
    with pytest.raises(TrialFailure) as exc:
        run_trial(spec, TrialConfig(), hw, timeout_s=3)
    assert exc.value.kind == "timeout" and "3 s limit" in exc.value.reason


def test_fault_only_hits_matching_configs(spec: StudySpec, hw: Hardware, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FAULT_ENV, "crash:batch_size=64")
    assert run_trial(spec, TrialConfig(), hw).requests > 0


def test_early_stop_when_warmup_misses_the_slo_by_far(hw: Hardware) -> None:
    s = parse_spec(
        {
            "model": "preset:llama-tiny",
            "device": "cpu",
            "slo": {"e2e_ms": {"p95": 0.01}},
            "workload": {"prompt_tokens": 16, "output_tokens": 8, "max_duration_s": 30},
        }
    )
    m = run_trial(s, TrialConfig(batch_size=2), hw)
    assert m.stopped_by.startswith("early-stop: warm-up p95 e2e_ms") and m.duration_s < 5


def test_preflight_reports_unknown_models() -> None:
    with pytest.raises(ModelError, match=r"unknown model preset .nope.; known presets: preset:llama-tiny"):
        preflight(parse_spec({"model": "preset:nope", "slo": {"e2e_ms": {"p95": 1}}}))


def test_runtime_only_changes_reuse_the_built_engine(spec: StudySpec, hw: Hardware) -> None:
    """Consecutive trials that differ only in batch size / streams / delay skip the rebuild; a model
    knob change, a failure or reuse_engine: false gets a fresh process."""
    from autotune.runner import close_warm_child

    close_warm_child()
    first = run_trial(spec, TrialConfig(batch_size=4), hw)
    second = run_trial(spec, TrialConfig(batch_size=2, streams=2, max_queue_delay_ms=5), hw)
    assert "engine_reused" not in first.timings and first.timings["load_s"] > 0
    assert second.timings["engine_reused"] == 1.0 and second.timings["load_s"] == 0.0
    assert second.mean_batch_rows <= 2 and second.requests >= 4  # the new runtime knobs took effect
    other = run_trial(spec, TrialConfig(batch_size=2, attention="eager"), hw)
    assert "engine_reused" not in other.timings  # attention is a model knob: rebuilt
    isolated = parse_spec({**spec.model_dump(mode="json"), "budget": {"reuse_engine": False}}, "isolated")
    run_trial(isolated, TrialConfig(batch_size=2), hw)
    again = run_trial(isolated, TrialConfig(batch_size=4), hw)
    assert "engine_reused" not in again.timings
    close_warm_child()


def test_alternating_builds_each_keep_their_engine_on_cpu(
    spec: StudySpec, hw: Hardware, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sampler cycling through three builds reuses all three engines on a CPU (three warm
    processes); a fourth build ends the least recently used one; with WARM_ENGINES_CPU = 1, or an
    idle engine taking more than its share of the available memory, every switch rebuilds."""
    from autotune import runner

    runner.close_warm_child()
    assert hw.device_type == "cpu"
    a, b, c, d = (
        TrialConfig(batch_size=2),
        TrialConfig(batch_size=2, attention="eager"),
        TrialConfig(batch_size=2, quantization="int8-dynamic"),
        TrialConfig(batch_size=2, attention="eager", quantization="int8-dynamic"),
    )
    for cfg in (a, b, c):
        run_trial(spec, cfg, hw)
    again = [run_trial(spec, cfg.model_copy(update={"batch_size": 4}), hw) for cfg in (a, b, c)]
    assert all(t.timings.get("engine_reused") == 1.0 for t in again)
    assert len(runner._warm) == 3
    run_trial(spec, d, hw)  # a fourth build: a (least recently used) goes, b and c stay
    assert len(runner._warm) == 3
    assert run_trial(spec, b, hw).timings["engine_reused"] == 1.0
    assert "engine_reused" not in run_trial(spec, a, hw).timings
    for knob, value in (("WARM_ENGINES_CPU", 1), ("WARM_IDLE_MEMORY_SHARE", 0.0)):  # one engine; no memory to spare
        runner.close_warm_child()
        with monkeypatch.context() as m:
            m.setattr(runner, knob, value)
            run_trial(spec, a, hw)
            run_trial(spec, b, hw)
            assert "engine_reused" not in run_trial(spec, a, hw).timings and len(runner._warm) == 1
    runner.close_warm_child()


def test_a_failed_trial_ends_the_warm_process(spec: StudySpec, hw: Hardware, monkeypatch: pytest.MonkeyPatch) -> None:
    from autotune.runner import close_warm_child

    close_warm_child()
    monkeypatch.setenv(FAULT_ENV, "error:batch_size=3")
    run_trial(spec, TrialConfig(batch_size=4), hw)
    with pytest.raises(TrialFailure):
        run_trial(spec, TrialConfig(batch_size=3), hw)
    after = run_trial(spec, TrialConfig(batch_size=4), hw)
    assert "engine_reused" not in after.timings  # the process that failed is gone
    close_warm_child()


def test_trials_measure_below_the_tuners_cpu_priority(spec: StudySpec, hw: Hardware) -> None:
    """Every thread of a trial process (fresh or reused) runs at ``budget.trial_niceness``, so the
    tuner's storage calls are not queued behind measurements; the tuner's own priority is untouched."""
    import os

    from autotune.runner import close_warm_child

    mine = os.getpriority(os.PRIO_PROCESS, 0)
    close_warm_child()
    first = run_trial(spec, TrialConfig(batch_size=4, streams=2), hw)  # two streams: more threads
    reused = run_trial(spec, TrialConfig(batch_size=2), hw)
    assert reused.timings["engine_reused"] == 1.0
    assert first.niceness == reused.niceness == max(spec.budget.trial_niceness, mine) == max(19, mine)
    fresh = parse_spec({**spec.model_dump(mode="json"), "budget": {"reuse_engine": False, "trial_niceness": 12}}, "x")
    assert run_trial(fresh, TrialConfig(batch_size=2), hw).niceness == max(12, mine)
    untouched = parse_spec({**spec.model_dump(mode="json"), "budget": {"trial_niceness": 0}}, "y")
    assert run_trial(untouched, TrialConfig(batch_size=2), hw).niceness == mine
    assert os.getpriority(os.PRIO_PROCESS, 0) == mine
    close_warm_child()


def test_an_idle_warm_process_exits_on_its_own_when_closed(spec: StudySpec, hw: Hardware) -> None:
    """At a study's end (or a new build key) the idle warm process is asked to exit, not killed, so
    its exit handlers run: a killed one left a semaphore the resource tracker warned about."""
    from autotune import runner

    runner.close_warm_child()
    run_trial(spec, TrialConfig(batch_size=2), hw)
    (child,) = runner._warm.values()
    proc = child.proc
    assert proc.is_alive()
    runner.close_warm_child()
    assert proc.exitcode == 0  # not -9 (SIGKILL)


def test_a_trial_waits_while_another_process_measures_on_its_device(
    spec: StudySpec, hw: Hardware, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from autotune import devicelock

    from .test_devicelock import hold, started

    holder = hold("cpu", 3.0, tmp_path / "held.json", tmp_path)
    started(holder)
    monkeypatch.setenv(devicelock.LOCK_DIR_ENV, str(tmp_path))
    said: list[str] = []
    monkeypatch.setattr(devicelock, "notify", said.append)
    run_trial(spec, TrialConfig(batch_size=4), hw)
    done = time.time()
    holder.communicate(timeout=30)
    _, released = json.loads((tmp_path / "held.json").read_text())
    assert released <= done and said and said[0].startswith("waiting for cpu")


def test_an_idle_server_engine_is_stopped_before_another_trial_measures(monkeypatch: pytest.MonkeyPatch) -> None:
    """A warm process holding a vLLM server is reused by the next trial with the same launch, and
    closed (its server stopped) before any other trial runs: its threads would share the cores."""
    from autotune import runner

    closed: list[str] = []

    class FakeWarm:
        def __init__(self, key: str) -> None:
            self.key = key

        def alive(self) -> bool:
            return True

        def rss_mb(self) -> float:
            return 1.0

        def close(self, *, graceful: bool = False) -> None:
            closed.append(self.key)

        def run(self, job: dict[str, object], timeout_s: float) -> dict[str, object]:
            return {"status": "ok"}

    monkeypatch.setattr(runner, "_WarmChild", FakeWarm)
    monkeypatch.setattr(runner, "_warm", {})
    monkeypatch.setattr(runner, "_SERVER_KEYS", set())
    monkeypatch.setattr(runner, "build_key", lambda job: job["key"])
    monkeypatch.setattr(runner, "_with_spawn_fallback", lambda run: run())

    def trial(key: str, engine: str) -> None:
        runner._run_warm({"key": key, "config": {"engine": engine}, "hardware": {"device_type": "cpu"}}, 1.0)

    trial("vllm-a", "vllm")
    trial("vllm-a", "vllm")  # the same launch: the running server is reused
    assert closed == []
    trial("builtin-a", "builtin")
    assert closed == ["vllm-a"]
    trial("builtin-b", "builtin")  # built-in engines stay warm side by side
    assert closed == ["vllm-a"]
