"""The Engine on the tiny preset: batching, streams, forced lengths, errors."""

from __future__ import annotations

import time

import pytest

from autotune.config import TrialConfig
from autotune.engine import Engine, EngineClosed
from autotune.hardware import probe

TINY = "preset:llama-tiny"


@pytest.fixture(scope="module")
def hw():
    return probe("cpu")


def prompts(n: int, length: int = 12) -> list[list[int]]:
    return [[10 + (i * 7 + j) % 400 for j in range(length)] for i in range(n)]


def test_generate_forces_the_output_length_and_keeps_order(hw) -> None:
    with Engine.build(TINY, TrialConfig(batch_size=4), hw) as engine:
        results = engine.generate(prompts(6), max_new_tokens=5)
    assert [len(r.output_ids) for r in results] == [5] * 6
    assert [r.request_id for r in results] == sorted(r.request_id for r in results)
    for r in results:
        assert r.t_submit <= r.t_start <= r.t_first_token <= r.t_end
        assert r.e2e_s >= r.ttft_s > 0 and r.tpot_s > 0


def test_queue_delay_lets_the_batcher_fill_batches(hw) -> None:
    with Engine.build(TINY, TrialConfig(batch_size=8, max_queue_delay_ms=200), hw) as engine:
        futures = []
        for p in prompts(8):
            futures.append(engine.submit(p, 3))
            time.sleep(0.005)
        rows = {f.result().batch_rows for f in futures}
    assert rows == {8}


def test_batch_size_caps_rows(hw) -> None:
    with Engine.build(TINY, TrialConfig(batch_size=3, max_queue_delay_ms=50), hw) as engine:
        results = engine.generate(prompts(7), max_new_tokens=2)
    assert max(r.batch_rows for r in results) <= 3


def test_batched_greedy_outputs_match_single_requests(hw) -> None:
    ps = prompts(4)
    with Engine.build(TINY, TrialConfig(batch_size=1), hw) as single:
        alone = [r.output_ids for r in single.generate(ps, 6)]
    with Engine.build(TINY, TrialConfig(batch_size=4, max_queue_delay_ms=100), hw) as batched:
        together = [r.output_ids for r in batched.generate(ps, 6)]
    assert together == alone


def test_two_streams_run_concurrently(hw) -> None:
    with Engine.build(TINY, TrialConfig(batch_size=2, streams=2, max_queue_delay_ms=20), hw) as engine:
        results = engine.generate(prompts(12), 4)
    assert {r.stream for r in results} == {0, 1}


def test_text_prompts_are_tokenized_and_decoded(hw) -> None:
    with Engine.build(TINY, TrialConfig(), hw) as engine:
        [r] = engine.generate(["hello world"], 3)
        assert r.prompt_tokens == len(engine.encode("hello world")) and isinstance(engine.decode(r), str)


def test_errors_reach_the_caller_and_the_engine_keeps_serving(hw) -> None:
    with Engine.build(TINY, TrialConfig(), hw) as engine:
        bad = engine.submit([10_000_000], 2)  # token id outside the vocabulary
        with pytest.raises(Exception, match="index"):
            bad.result(timeout=30)
        assert len(engine.submit([10, 11], 2).result(timeout=30).output_ids) == 2
    with pytest.raises(EngineClosed):
        engine.submit([10], 1)


def test_build_records_timings(hw) -> None:
    engine = Engine.build(TINY, TrialConfig(quantization="int8-dynamic"), hw)
    t = engine.timings.as_dict()
    assert t["load_s"] > 0 and t["quantize_s"] > 0
