"""The Engine on the tiny preset: batching, streams, forced lengths, errors."""

from __future__ import annotations

import threading
import time

import pytest

from autotune.config import TrialConfig
from autotune.engines.builtin.engine import Engine, EngineClosed
from autotune.hardware import Hardware, probe

TINY = "preset:llama-tiny"


@pytest.fixture(scope="module")
def hw() -> Hardware:
    return probe("cpu")


def prompts(n: int, length: int = 12) -> list[list[int]]:
    return [[10 + (i * 7 + j) % 400 for j in range(length)] for i in range(n)]


def test_generate_forces_the_output_length_and_keeps_order(hw: Hardware) -> None:
    with Engine.build(TINY, TrialConfig(batch_size=4), hw) as engine:
        results = engine.generate(prompts(6), max_new_tokens=5)
    assert [len(r.output_ids) for r in results] == [5] * 6
    assert [r.request_id for r in results] == sorted(r.request_id for r in results)
    for r in results:
        assert r.t_submit <= r.t_start <= r.t_first_token <= r.t_end
        assert r.e2e_s >= r.ttft_s > 0 and r.tpot_s > 0


def test_queue_delay_lets_the_batcher_fill_batches(hw: Hardware) -> None:
    with Engine.build(TINY, TrialConfig(batch_size=8, max_queue_delay_ms=200), hw) as engine:
        futures = []
        for p in prompts(8):
            futures.append(engine.submit(p, 3))
            time.sleep(0.005)
        rows = {f.result().batch_rows for f in futures}
    assert rows == {8}


def test_batch_size_caps_rows(hw: Hardware) -> None:
    with Engine.build(TINY, TrialConfig(batch_size=3, max_queue_delay_ms=50), hw) as engine:
        results = engine.generate(prompts(7), max_new_tokens=2)
    assert max(r.batch_rows for r in results) <= 3


def test_batched_greedy_outputs_match_single_requests(hw: Hardware) -> None:
    ps = prompts(4)
    with Engine.build(TINY, TrialConfig(batch_size=1), hw) as single:
        alone = [r.output_ids for r in single.generate(ps, 6)]
    with Engine.build(TINY, TrialConfig(batch_size=4, max_queue_delay_ms=100), hw) as batched:
        together = [r.output_ids for r in batched.generate(ps, 6)]
    assert together == alone


def test_two_streams_run_concurrently(hw: Hardware) -> None:
    with Engine.build(TINY, TrialConfig(batch_size=2, streams=2, max_queue_delay_ms=20), hw) as engine:
        results = engine.generate(prompts(12), 4)
    assert {r.stream for r in results} == {0, 1}


def test_text_prompts_are_tokenized_and_decoded(hw: Hardware) -> None:
    with Engine.build(TINY, TrialConfig(), hw) as engine:
        [r] = engine.generate(["hello world"], 3)
        assert r.prompt_tokens == len(engine.encode("hello world")) and isinstance(engine.decode(r), str)


def test_errors_reach_the_caller_and_the_engine_keeps_serving(hw: Hardware) -> None:
    with Engine.build(TINY, TrialConfig(), hw) as engine:
        bad = engine.submit([10_000_000], 2)  # token id outside the vocabulary
        with pytest.raises(Exception, match="index"):
            bad.result(timeout=30)
        assert len(engine.submit([10, 11], 2).result(timeout=30).output_ids) == 2
    with pytest.raises(EngineClosed):
        engine.submit([10], 1)


def test_build_records_timings(hw: Hardware) -> None:
    engine = Engine.build(TINY, TrialConfig(quantization="int8-dynamic"), hw)
    t = engine.timings.as_dict()
    assert t["load_s"] > 0 and t["quantize_s"] > 0


def test_open_loop_workloads_replay_through_the_engine(hw: Hardware) -> None:
    from autotune.measure import run_workload
    from autotune.spec import WorkloadSpec

    for arrival in ({"type": "poisson", "rate": 40.0}, {"type": "offline"}):
        spec = WorkloadSpec.model_validate(
            {"requests": 12, "prompt_tokens": 8, "output_tokens": 4, "arrival": arrival, "max_duration_s": 30}
        )
        with Engine.build(TINY, TrialConfig(batch_size=4, max_queue_delay_ms=10), hw) as engine:
            m = run_workload(engine, spec, vocab_size=engine.info.vocab_size)
        assert m.requests == 12 and m.output_tokens == 48 and m.stopped_by == "requests"
        if arrival["type"] == "offline":
            assert m.mean_batch_rows > 3  # everything queued at once: full batches
            assert m.queue_ms["max"] > m.queue_ms["p50"] >= 0


def test_inductor_backend_compiles_once_and_matches_eager(hw: Hardware) -> None:
    """torch.compile with a static KV cache: padded to one shape, so warm-up pays the compile once."""
    from autotune.measure import run_workload
    from autotune.spec import WorkloadSpec

    spec = WorkloadSpec.model_validate(
        {
            "requests": 8,
            "prompt_tokens": {"distribution": "uniform", "min": 6, "max": 12},
            "output_tokens": 4,
            "max_duration_s": 30,
        }
    )
    with Engine.build(TINY, TrialConfig(batch_size=2, backend="inductor"), hw, prompt_pad_to=12) as compiled:
        m = run_workload(compiled, spec, vocab_size=compiled.info.vocab_size)
        got = compiled.generate([[10, 11, 12, 13, 14, 15]], 4)[0].output_ids
    assert m.timings["compile_s"] > m.e2e_ms["max"] / 1000  # compile is paid in warm-up, not in the window
    assert m.requests == 8
    assert hasattr(compiled.model, "_compiled_call")  # generate() ran its compiled decode step
    with Engine.build(TINY, TrialConfig(batch_size=2), hw) as eager:
        want = eager.generate([[10, 11, 12, 13, 14, 15]], 4)[0].output_ids
    assert got == want


def test_two_streams_compiling_their_decoders_at_once_do_not_race(hw: Hardware) -> None:
    """Each stream worker builds and compiles its own decoder, all over one shared code object, and
    Dynamo is not built for one thread compiling while another runs compiled code. Without the
    decoders' lock 67 of 97 such builds failed in Dynamo (``python bench/decoder_race.py``)."""
    import torch._dynamo

    ps = [p[: 4 + i] for i, p in enumerate(prompts(5))]
    cfg = TrialConfig(batch_size=4, backend="inductor-cudagraphs", streams=2, max_queue_delay_ms=50)
    for _ in range(4):
        torch._dynamo.reset()  # every round compiles afresh, in both workers at once
        with Engine.build(TINY, cfg, hw, prompt_pad_to=12, max_context=20) as engine:
            assert len(engine.generate(ps, 6)) == len(ps)


@pytest.mark.parametrize("backend", ["cuda-graphs", "inductor-cudagraphs"])
def test_static_decoder_backends_match_generate(hw: Hardware, backend: str) -> None:
    """The CUDA-graph backends' loop (run without the graph on CPU): same tokens, padded shapes, one
    decoder per stream, rebuilt only when a batch needs more new tokens than it holds."""
    ps = [p[: 4 + i] for i, p in enumerate(prompts(5))]
    with Engine.build(TINY, TrialConfig(batch_size=4), hw) as eager:
        want = [r.output_ids for r in eager.generate(ps, 6)]
    cfg = TrialConfig(batch_size=4, backend=backend, streams=2, max_queue_delay_ms=50)
    with Engine.build(TINY, cfg, hw, prompt_pad_to=12, max_context=20) as engine:
        results = engine.generate(ps, 6)
        assert [r.output_ids for r in results] == want
        assert {(d.rows, d.width, d.max_new_tokens) for d in engine._decoders.values()} == {(4, 12, 8)}
        assert all(d.compiled == (backend == "inductor-cudagraphs") for d in engine._decoders.values())
        longer = engine.run_batch(ps[:1], 10)
        assert len(longer[0]) == 10 and engine._decoders[0].max_new_tokens == 10
    engine.reconfigure(cfg.model_copy(update={"batch_size": 2, "streams": 1}))
    assert not engine._decoders  # a reused engine frees the old shape's caches (and graphs)
    with engine:
        assert [r.output_ids for r in engine.generate(ps, 6)] == want
    with pytest.raises(ValueError, match="precision change the built model"):
        engine.reconfigure(cfg.model_copy(update={"precision": "bf16"}))
    for r in results:
        assert r.t_submit <= r.t_start <= r.t_first_token <= r.t_end


def test_continuous_scheduler_matches_static_batches(hw: Hardware) -> None:
    ps = prompts(6)
    with Engine.build(TINY, TrialConfig(batch_size=4), hw, prompt_pad_to=12, max_context=24) as static:
        expected = [r.output_ids for r in static.generate(ps, 6)]
    cfg = TrialConfig(batch_size=4, scheduler="continuous")
    with Engine.build(TINY, cfg, hw, prompt_pad_to=12, max_context=24) as engine:
        results = engine.generate(ps, 6)
        again = engine.run_batch(ps[:2], 6)
    assert [r.output_ids for r in results] == expected and again == expected[:2]
    for r in results:
        assert r.t_submit <= r.t_start <= r.t_first_token <= r.t_end
        assert 1 <= r.batch_rows <= 4


def test_continuous_scheduler_refuses_requests_after_stop(hw: Hardware) -> None:
    engine = Engine.build(TINY, TrialConfig(batch_size=2, scheduler="continuous"), hw, max_context=32).start()
    engine.generate(prompts(1), 2)
    engine.stop()
    with pytest.raises(EngineClosed):
        engine.submit(prompts(1)[0], 2)


def test_first_token_time_is_the_prefill_not_the_whole_batch(hw: Hardware) -> None:
    with Engine.build(TINY, TrialConfig(batch_size=2), hw) as engine:
        (r,) = engine.generate(prompts(1), 24)
    prefill, total = r.t_first_token - r.t_start, r.t_end - r.t_start
    assert 0 < prefill < total / 4  # one forward pass of 24, not the whole generate call


@pytest.mark.parametrize("scheduler", ["static", "continuous"])
def test_a_cancelled_request_never_kills_a_worker(hw: Hardware, scheduler: str) -> None:
    cfg = TrialConfig(batch_size=4, max_queue_delay_ms=200 if scheduler == "static" else 0, scheduler=scheduler)
    with Engine.build(TINY, cfg, hw, prompt_pad_to=12, max_context=24) as engine:
        doomed = engine.submit(prompts(1)[0], 4)
        kept = engine.submit(prompts(2)[1], 4)
        doomed.cancel()  # as asyncio.wrap_future does when the awaiting task is cancelled
        assert len(kept.result(timeout=60).output_ids) == 4
        assert len(engine.submit(prompts(1)[0], 3).result(timeout=60).output_ids) == 3  # still serving


@pytest.mark.parametrize("scheduler", ["static", "bucketed"])
def test_bucketed_scheduler_groups_queued_requests_by_prompt_length(hw: Hardware, scheduler: str) -> None:
    """Requests of lengths 12, 3, 12, 3, ... queued together: static batches them in arrival order
    (every batch mixes lengths and pads 3 to 12); bucketed pairs equal lengths, same outputs."""
    long, short = prompts(4, 12), prompts(4, 3)
    mixed = [p for pair in zip(long, short, strict=True) for p in pair]
    cfg = TrialConfig(batch_size=2, max_queue_delay_ms=300, scheduler=scheduler)
    with Engine.build(TINY, cfg, hw) as engine:
        results = engine.generate(mixed, 4)
    batches: dict[float, list[int]] = {}
    for r in results:
        batches.setdefault(r.t_start, []).append(r.prompt_tokens)
    spreads = [max(b) - min(b) for b in batches.values()]
    if scheduler == "bucketed":
        assert all(s == 0 for s in spreads) and len(batches) == 4
    else:
        assert any(s > 0 for s in spreads)
    with Engine.build(TINY, TrialConfig(batch_size=1), hw) as single:
        assert [r.output_ids for r in results] == [r.output_ids for r in single.generate(mixed, 4)]


# -- pipeline_depth ---------------------------------------------------------------------------------
def _slowed(engine: Engine, seconds: float, log: list[tuple[str, str, float, int]]) -> None:
    """Make every batch run ``seconds`` longer; log (event, thread, time, rows) of each stage."""
    prepare, generate = engine._prepare, engine._generate

    def slow_prepare(batch, **kw):  # type: ignore[no-untyped-def]
        log.append(("prepare", threading.current_thread().name, time.perf_counter(), len(batch)))
        return prepare(batch, **kw)

    def slow_generate(prepared, stream):  # type: ignore[no-untyped-def]
        log.append(("run", threading.current_thread().name, time.perf_counter(), len(prepared.batch)))
        time.sleep(seconds)
        out = generate(prepared, stream)
        log.append(("ran", threading.current_thread().name, time.perf_counter(), len(prepared.batch)))
        return out

    engine._prepare, engine._generate = slow_prepare, slow_generate  # type: ignore[method-assign]


@pytest.mark.parametrize("depth", [1, 2])
def test_a_pipelined_stream_prepares_the_next_batch_while_one_runs(hw: Hardware, depth: int) -> None:
    log: list[tuple[str, str, float, int]] = []
    engine = Engine.build(TINY, TrialConfig(batch_size=2, pipeline_depth=depth), hw)
    _slowed(engine, 0.3, log)
    with engine:
        futures = [engine.submit(p, 3) for p in prompts(4)]
        results = [f.result(timeout=60) for f in futures]
    prepares = [t for what, _, t, _ in log if what == "prepare"]
    first_ran = next(t for what, _, t, _ in log if what == "ran")
    threads = {what: name for what, name, _, _ in log}
    if depth == 2:
        assert prepares[1] < first_ran  # the second batch was ready before the first finished
        assert threads["prepare"] != threads["run"]
    else:
        assert prepares[1] > first_ran and threads["prepare"] == threads["run"]
    with Engine.build(TINY, TrialConfig(batch_size=2), hw) as sync:
        assert [r.output_ids for r in results] == [r.output_ids for r in sync.generate(prompts(4), 3)]


def test_a_batch_prepared_ahead_keeps_filling_until_it_can_run(hw: Hardware) -> None:
    """Queue delay 0: one request runs alone (slowly); the next starts a batch that is ready at once
    and waits in the one prepared slot; the one after that cannot start either, so it keeps taking
    the requests that arrive while the first runs instead of leaving them one by one."""
    log: list[tuple[str, str, float, int]] = []
    engine = Engine.build(TINY, TrialConfig(batch_size=4, pipeline_depth=2), hw)
    _slowed(engine, 0.4, log)
    with engine:
        futures = [engine.submit(prompts(1)[0], 2)]
        time.sleep(0.1)  # the first batch (one row) is running
        for p in prompts(4):
            futures.append(engine.submit(p, 2))
            time.sleep(0.03)
        rows = [f.result(timeout=60).batch_rows for f in futures]
    assert rows[0] == 1 and rows[1] == 1  # the running one, and the one that took the free slot
    assert rows[2:] == [3, 3, 3]  # filled while both slots were busy


def test_a_pipelined_stream_delivers_errors_and_keeps_serving(hw: Hardware) -> None:
    with Engine.build(TINY, TrialConfig(batch_size=2, pipeline_depth=2), hw) as engine:
        bad = engine.submit([10_000_000], 2)  # token id outside the vocabulary: fails when run
        with pytest.raises(Exception, match="index"):
            bad.result(timeout=30)
        assert len(engine.submit([10, 11], 2).result(timeout=30).output_ids) == 2


def test_stopping_a_pipelined_engine_finishes_what_was_queued(hw: Hardware) -> None:
    engine = Engine.build(TINY, TrialConfig(batch_size=2, streams=2, pipeline_depth=3), hw).start()
    futures = [engine.submit(p, 3) for p in prompts(9)]
    engine.stop()
    assert all(f.done() and len(f.result().output_ids) == 3 for f in futures)
    assert not [t for t in threading.enumerate() if t.name.startswith("autotune-stream")]


def test_a_stream_worker_runs_generate_with_the_main_threads_torch_threads(hw: Hardware) -> None:
    """A single-stream engine's worker computes with as many threads as a plain loop on the main thread
    would (torch's count is per thread under OpenMP); after a two-stream config split the cores, a
    reused engine back at one stream gets them all again."""
    import torch

    seen: list[int] = []
    engine = Engine.build(TINY, TrialConfig(batch_size=2), hw)
    generate = engine.model.generate

    def counting(*args: object, **kwargs: object) -> object:
        seen.append(torch.get_num_threads())
        return generate(*args, **kwargs)

    engine.model.generate = counting
    main = torch.get_num_threads()
    with engine:
        engine.generate(prompts(2), 2)
    engine.reconfigure(engine.config.model_copy(update={"streams": 2}))
    with engine:
        engine.generate(prompts(4), 2)
    engine.reconfigure(engine.config.model_copy(update={"streams": 1}))
    with engine:
        engine.generate(prompts(2), 2)
    assert seen[0] == main and seen[-1] == main
    assert torch.get_num_threads() == main
