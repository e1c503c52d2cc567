"""CTranslate2 as an engine: built from a checkpoint, converted once, behind autotune's batcher."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ctranslate2")

from autotune.config import TrialConfig
from autotune.engines import ctranslate2 as ct2
from autotune.engines import get_engine
from autotune.engines.builtin.engine import Engine
from autotune.hardware import Hardware, probe

from ..conftest import make_hw

TINY_LM = "builtin:tiny-lm"  # a trained model: its fidelity figures mean something
FP32 = TrialConfig(batch_size=4, max_queue_delay_ms=50, engine="ctranslate2")
INT8 = FP32.model_copy(update={"quantization": "int8-dynamic"})


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh cache for the module: the first build converts, the later ones find it."""
    root = tmp_path_factory.mktemp("cache")
    before = os.environ.get("AUTOTUNE_CACHE_DIR")
    os.environ["AUTOTUNE_CACHE_DIR"] = str(root)
    yield root
    if before is None:
        os.environ.pop("AUTOTUNE_CACHE_DIR", None)
    else:
        os.environ["AUTOTUNE_CACHE_DIR"] = before


@pytest.fixture(scope="module")
def hw() -> Hardware:
    return probe("cpu")


@pytest.fixture(scope="module")
def fp32(cache: Path, hw: Hardware) -> ct2.CTranslate2Served:
    plugin = get_engine("ctranslate2")
    assert isinstance(plugin, ct2.CTranslate2Engine)  # the registry's entry
    engine = plugin.build_engine(TINY_LM, FP32, hw)
    assert isinstance(engine, ct2.CTranslate2Served)
    return engine


@pytest.fixture(scope="module")
def torch_engine(hw: Hardware) -> Engine:
    return Engine.build(TINY_LM, TrialConfig(batch_size=1), hw)


def prompts(engine: Engine) -> list[list[int]]:
    """Prompts of several lengths, from real text (the tokenizer adds its BOS)."""
    texts = ["def add(a, b):", "Return the number of items in", "import os", "class Queue:\n    def put(self, item"]
    return [engine.encode(t) for t in texts]


def test_generate_gives_exactly_n_tokens_and_the_torch_models_greedy_tokens(
    fp32: ct2.CTranslate2Served, torch_engine: Engine
) -> None:
    ps = prompts(fp32)
    assert len({len(p) for p in ps}) > 1  # unpadded prompts of different lengths in one batch
    with fp32:
        got = fp32.generate(ps, 12)
    with torch_engine:
        want = torch_engine.generate(ps, 12)
    assert [len(r.output_ids) for r in got] == [12] * len(ps)
    assert {r.batch_rows for r in got} == {len(ps)}  # one generate_batch held them all
    assert [r.output_ids for r in got] == [r.output_ids for r in want]
    for r in got:
        assert r.t_submit <= r.t_start <= r.t_first_token <= r.t_end and r.tpot_s > 0


def test_run_batch_and_the_served_greedy_match_generate(fp32: ct2.CTranslate2Served) -> None:
    ps = prompts(fp32)
    with fp32:
        batched = [r.output_ids for r in fp32.generate(ps, 6)]
    assert fp32.run_batch(ps, 6) == batched
    assert fp32.served_greedy(ps, 6) == batched


def test_first_token_times_are_clocked_every_nth_batch_and_estimated_between(
    fp32: ct2.CTranslate2Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fp32, "clock_every", 3)
    monkeypatch.setattr(fp32, "_batches_of_shape", {})
    before = dict(fp32.first_token_clock)
    ps = prompts(fp32)
    with fp32:
        batches = [fp32.generate(ps, 5) for _ in range(4)]  # one batch of one shape each
    assert fp32.first_token_clock["clocked"] - before["clocked"] == 2  # the 1st and the 4th
    assert fp32.first_token_clock["estimated"] - before["estimated"] == 2
    for results in batches:
        assert {r.batch_rows for r in results} == {len(ps)}
        for r in results:
            assert r.t_start < r.t_first_token < r.t_end
    clocked, estimated = batches[0], batches[1]
    assert len({r.t_first_token for r in estimated}) == 1  # one estimate for the batch
    assert len({r.t_first_token for r in clocked}) > 1  # per row: longer prompts come later


def test_the_conversion_is_cached_by_digest(cache: Path, fp32: ct2.CTranslate2Served, hw: Hardware) -> None:
    first = fp32.timings.as_dict()
    assert first["convert_cached"] == 0.0 and first["convert_s"] > 0
    again = ct2.CTranslate2Served.build(TINY_LM, INT8, hw)
    assert again.timings.as_dict()["convert_cached"] == 1.0
    assert again.converted.path == fp32.converted.path
    assert again.generator.compute_type == "int8_float32"  # quantized on load
    converted = list((cache / "ctranslate2").iterdir())
    assert [p.name for p in converted] == [fp32.converted.path.name]
    assert converted[0].name.endswith("-float32")


def test_a_preset_is_written_as_a_checkpoint_then_converted(cache: Path, hw: Hardware) -> None:
    engine = ct2.CTranslate2Served.build("preset:llama-tiny", TrialConfig(batch_size=2), hw)
    assert engine.converted.source.parent == cache / "checkpoints"
    assert engine.timings.as_dict()["convert_cached"] == 0.0
    assert [len(o) for o in engine.run_batch([[1, 5, 6], [1, 7]], 4)] == [4, 4]


def test_run_workload_measures_it(fp32: ct2.CTranslate2Served) -> None:
    from autotune.measure import run_workload
    from autotune.spec import WorkloadSpec

    spec = WorkloadSpec.model_validate({"requests": 16, "prompt_tokens": 8, "output_tokens": 4})
    with fp32:
        m = run_workload(fp32, spec, vocab_size=fp32.info.vocab_size, build_timings=fp32.timings.as_dict())
    assert m.requests == 16 and m.output_tokens == 16 * 4
    assert m.output_tokens_per_s > 0 and m.timings["convert_s"] > 0


def test_fidelity_at_float32_matches_the_reference_and_int8_is_close(
    fp32: ct2.CTranslate2Served, torch_engine: Engine, hw: Hardware
) -> None:
    from autotune.quality import build_eval_set, compute_reference, fidelity
    from autotune.spec import QualitySpec

    q = QualitySpec(sequences=4, tokens=64, greedy_prompt_tokens=16, greedy_tokens=8)
    es = build_eval_set(q, torch_engine.tokenizer)
    ref = compute_reference(torch_engine.model, es, q.top_k)
    exact = fidelity(fp32.model, es, ref, **fp32.served)
    assert exact["top1_agreement"] == pytest.approx(1.0) and exact["greedy_agreement"] == pytest.approx(1.0)
    assert exact["kl"] < 1e-6 and abs(exact["perplexity_increase_pct"]) < 0.01
    int8 = ct2.CTranslate2Served.build(TINY_LM, INT8, hw)
    close = fidelity(int8.model, es, ref, **int8.served)
    assert 0.0 < close["kl"] < 0.05 and close["top1_agreement"] >= 0.9


def test_two_streams_run_two_batches_at_once(cache: Path, hw: Hardware) -> None:
    cfg = TrialConfig(batch_size=2, streams=2, max_queue_delay_ms=20, engine="ctranslate2")
    engine = ct2.CTranslate2Served.build(TINY_LM, cfg, hw)
    assert engine.generator.num_generators == 2  # inter_threads: one replica per stream
    ps = prompts(engine)
    with engine:
        results = engine.generate(ps, 5)
    assert [len(r.output_ids) for r in results] == [5] * len(ps)
    assert {r.stream for r in results} == {0, 1}
    assert engine.run_batch(ps, 5) == [r.output_ids for r in results]
    engine.reconfigure(cfg.model_copy(update={"batch_size": 4, "max_queue_delay_ms": 0}))  # runtime knobs
    for change in ({"streams": 1}, {"engine_args": {"intra_threads": 1}}, {"quantization": "int8-dynamic"}):
        with pytest.raises(ValueError, match="build a new engine"):
            engine.reconfigure(cfg.model_copy(update=change))


def test_knobs_drop_what_the_device_lacks(monkeypatch: pytest.MonkeyPatch, cpu_hw: Hardware) -> None:
    engine = ct2.CTranslate2Engine()
    assert engine.name == "ctranslate2" and engine.kind == "in-process" and engine.version()
    assert engine.runtime_knobs == ("batch_size", "max_queue_delay_ms")
    import ctranslate2

    monkeypatch.setattr(ctranslate2, "get_supported_compute_types", lambda device, index=0: {"float32"})
    k = engine.knobs(cpu_hw)
    assert k.shared["precision"] == ["fp32"] and k.shared["quantization"] == ["none"]
    assert "float32" in k.dropped["quantization=int8-dynamic"] and "bfloat16" in k.dropped["precision=bf16"]
    assert set(k.shared) == {"batch_size", "max_queue_delay_ms", "streams", "precision", "quantization"}
    assert k.own["intra_threads"].values == (None,) and "tf32" in k.dropped["precision=tf32"].lower()
    int8 = TrialConfig(quantization="int8-dynamic")
    assert "int8_float32" in (engine.conflict(int8, cpu_hw) or "")
    assert engine.conflict(TrialConfig(quantization="int8-weight-only"), cpu_hw)
    assert engine.conflict(TrialConfig(backend="inductor"), cpu_hw)
    assert engine.conflict(TrialConfig(engine_args={"intra_threads": 0}), cpu_hw)
    assert engine.conflict(TrialConfig(engine_args={"intra_threads": 1}), cpu_hw) is None

    ampere, volta = make_hw("cuda", cc=(8, 0)), make_hw("cuda", cc=(7, 0))
    assert engine.knobs(ampere).shared["precision"] == ["fp32", "bf16", "fp16"]
    assert engine.knobs(volta).shared["precision"] == ["fp32", "fp16"]
    assert engine.conflict(TrialConfig(precision="bf16", quantization="int8-dynamic"), ampere) is None
    assert engine.conflict(TrialConfig(precision="bf16"), volta)


def test_threads_split_between_streams(cpu_hw: Hardware) -> None:
    assert ct2.intra_threads(TrialConfig(), cpu_hw) == 2
    assert ct2.intra_threads(TrialConfig(streams=2), cpu_hw) == 1
    assert ct2.intra_threads(TrialConfig(streams=2, engine_args={"intra_threads": 2}), cpu_hw) == 2


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch, cpu_hw: Hardware) -> None:
    from importlib import metadata

    from autotune.engines import EngineUnavailable

    def missing(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    engine = ct2.CTranslate2Engine()
    assert engine.version() is None
    with pytest.raises(EngineUnavailable, match=r"pip install 'autotune\[ctranslate2\]'"):
        engine.build_engine(TINY_LM, FP32, cpu_hw)


def test_duplicate_token_strings_get_their_own(tmp_path: Path) -> None:
    (tmp_path / "vocabulary.json").write_text('["<s>", "a", "b", "a"]')
    ct2._unique_vocabulary(tmp_path)
    vocab = ct2.read_vocabulary(tmp_path)
    assert vocab[:3] == ["<s>", "a", "b"] and len(set(vocab)) == 4
