"""``workload.transport: http``: a trial measured through the real server and a client process."""

from __future__ import annotations

import pytest

from autotune.config import TrialConfig
from autotune.engines.builtin.engine import Engine
from autotune.hardware import Hardware, probe
from autotune.runner import preflight, run_trial
from autotune.spec import StudySpec, WorkloadSpec, load_spec, parse_spec
from autotune.transport import measure_over_http

from .conftest import TINY_SPEC


def _workload(**extra: object) -> WorkloadSpec:
    data = {"requests": 24, "prompt_tokens": 8, "output_tokens": 4, "max_duration_s": 20, "transport": "http"}
    return WorkloadSpec.model_validate({**data, **extra})


def test_requests_go_through_the_server_and_come_back_measured() -> None:
    hw = probe("cpu")
    engine = Engine.build("preset:llama-tiny", TrialConfig(batch_size=4, max_queue_delay_ms=20), hw, prompt_pad_to=8)
    with engine:
        m = measure_over_http(engine, _workload(), vocab_size=engine.info.vocab_size, first_token_id=4)
    assert m.requests == 24 and m.output_tokens == 24 * 4  # every request answered, none lost
    assert 1 <= m.mean_batch_rows <= 4 and m.output_tokens_per_s > 0
    assert m.timings["http_client_s"] > 0 and "warmup_s" in m.timings  # warm-up ran in-process first
    assert m.e2e_ms["p50"] > 0 and m.queue_ms["p50"] >= 0
    b = m.breakdown_ms  # the server turned each output into text: that time is part of the request
    assert b["detokenize"] > 0 and b["queue"] + b["prefill"] + b["decode"] > 0


def test_a_trial_over_http_runs_in_its_child_process() -> None:
    base = load_spec(TINY_SPEC).model_dump(mode="json")
    base["workload"].update(transport="http", requests=16, max_duration_s=10)
    spec: StudySpec = parse_spec(base, "http spec")
    hw, _ = preflight(spec)
    assert isinstance(hw, Hardware)
    m = run_trial(spec, TrialConfig(batch_size=4, max_queue_delay_ms=10), hw)
    assert m.requests == 16 and "http_client_s" in m.timings


def test_stability_windows_are_refused_over_http() -> None:
    with pytest.raises(ValueError, match="leave them out with transport http"):
        _workload(stability={"tolerance_pct": 3, "max_windows": 4})
