"""The exported-graph backends (onnxruntime, openvino): the graph decodes exactly what generate()
does, the export is cached on disk and shared by both runtimes, fidelity is measured on the graph,
and a machine without the packages is told why a backend is not offered."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from autotune.config import TrialConfig
from autotune.engines.builtin.engine import Engine
from autotune.engines.builtin.exported import _Graph
from autotune.engines.builtin.optimize.compile import BACKENDS
from autotune.hardware import Hardware, probe
from autotune.space import SearchSpace
from autotune.spec import parse_spec

from ...conftest import make_hw

TINY = "preset:llama-tiny"
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")


@pytest.fixture(scope="module")
def hw() -> Hardware:
    return probe("cpu")


@pytest.fixture(scope="module", autouse=True)
def export_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("autotune-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("AUTOTUNE_CACHE_DIR", str(root))
    yield root
    mp.undo()


def prompts(n: int) -> list[list[int]]:
    return [[10 + (i * 7 + j) % 400 for j in range(4 + i)] for i in range(n)]  # every length differs


RUNTIMES = ["onnxruntime", "openvino"]


@pytest.fixture(params=RUNTIMES)
def runtime(request: pytest.FixtureRequest) -> str:
    pytest.importorskip(request.param, reason=f"the {request.param} extra is not installed")
    return str(request.param)


def test_the_engine_decodes_what_eager_decodes_with_every_shape_dynamic(
    hw: Hardware, export_cache: Path, runtime: str
) -> None:
    ps = prompts(5)
    with Engine.build(TINY, TrialConfig(batch_size=4), hw) as eager:
        want = [r.output_ids for r in eager.generate(ps, 6)]
    cfg = TrialConfig(batch_size=4, backend=runtime, streams=2, max_queue_delay_ms=50)
    before = set(export_cache.glob("onnx/*/step.onnx"))
    engine = Engine.build(TINY, cfg, hw)
    assert engine.exported is not None and not engine.fixed_shapes  # nothing is padded to one shape
    assert engine.exported.runtime == runtime
    first = engine.timings.as_dict()
    # One export serves both runtimes: whichever runs first exports, the other finds it in the cache.
    assert first["export_s"] > 0 and first["export_cached"] == float(engine.exported.path in before)
    with engine:
        results = engine.generate(ps, 6)
        assert [r.output_ids for r in results] == want
        assert len(engine.run_batch(ps[:1], 10)[0]) == 10  # any number of new tokens, no rebuild
    for r in results:
        assert r.t_submit <= r.t_start <= r.t_first_token <= r.t_end
    # A second engine of the same model loads the export from the disk cache instead of exporting.
    again = Engine.build(TINY, cfg.model_copy(update={"batch_size": 2}), hw)
    assert again.timings.export_cached == 1.0
    assert first["export_cached"] or again.timings.export_s < first["export_s"]
    assert again.exported is not None and again.exported.path == engine.exported.path
    other = Engine.build(TINY, cfg, hw, seed=1)  # other weights: another entry, never the cached graph
    assert other.exported is not None and other.exported.path != engine.exported.path
    with other:
        assert [r.output_ids for r in other.generate(ps, 6)] != want


def test_a_real_trial_reports_the_export_apart_from_measuring(hw: Hardware) -> None:
    from autotune.runner import run_trial
    from autotune.spec import load_spec

    from ...conftest import TINY_SPEC

    spec = load_spec(TINY_SPEC)
    m = run_trial(spec, TrialConfig(batch_size=4, backend="onnxruntime"), hw)
    assert m.output_tokens_per_s > 0 and m.requests >= 4
    assert "export_s" in m.timings and m.timings["export_s"] > 0


def test_the_backend_is_offered_only_where_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    import autotune.engines.builtin.exported

    space_spec = {"backend": ["eager", "onnxruntime"]}
    spec = parse_spec({"name": "s", "model": TINY, "slo": {"e2e_ms": {"p95": 1000}}, "space": space_spec})
    cpu = make_hw()
    assert "backend=onnxruntime" not in SearchSpace.from_spec(spec, cpu).dropped
    ort = BACKENDS["onnxruntime"]
    for cfg, words in [
        (TrialConfig(backend="onnxruntime", quantization="int8-dynamic"), "quantization none"),
        (TrialConfig(backend="onnxruntime", precision="bf16"), "precision fp32"),
        (TrialConfig(backend="onnxruntime", scheduler="continuous"), "scheduler static"),
        (TrialConfig(backend="onnxruntime", attention="sdpa-packed"), "sdpa or eager"),
    ]:
        reason = ort.conflict(cfg, cpu)
        assert reason is not None and words in reason
    assert ort.conflict(TrialConfig(backend="onnxruntime", scheduler="bucketed"), cpu) is None
    assert "CPU device only" in (ort.unsupported(make_hw("cuda", cc=(9, 0))) or "")
    monkeypatch.setattr(autotune.engines.builtin.exported, "missing_packages", lambda runtime: [runtime])
    space = SearchSpace.from_spec(spec, cpu)
    assert space.values["backend"] == ["eager"]
    assert space.dropped["backend=onnxruntime"] == "needs onnxruntime (pip install 'autotune[onnxruntime]')"


def test_fidelity_is_measured_on_the_exported_graph(export_cache: Path, runtime: str) -> None:
    """The trial serves ONNX Runtime's numerics, so its fidelity comes from the exported graphs:
    fp32 export is within float noise of the reference, and a broken graph would show."""
    import torch

    from autotune.engines.builtin.exported import ExportedStep
    from autotune.models import load_model
    from autotune.quality import build_eval_set, compute_reference, fidelity
    from autotune.spec import QualitySpec

    q = QualitySpec(sequences=4, tokens=32, greedy_prompt_tokens=8, greedy_tokens=6)
    model, tok, _ = load_model(TINY)
    es = build_eval_set(q, tok)
    ref = compute_reference(model, es, q.top_k)
    step = ExportedStep.load(model, "sdpa", runtime)
    ids = torch.tensor(es.windows[:2])
    with torch.inference_mode():
        want = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.allclose(step.logits(ids), want, atol=1e-4)
    assert (step.path.parent / "logits.onnx").is_file()  # exported on first use, next to the step graph
    served = fidelity(model, es, ref, logits=step.logits, greedy=step.greedy)
    assert served["kl"] < 1e-6 and served["top1_agreement"] == 1.0 and served["greedy_agreement"] == 1.0
    broken = fidelity(model, es, ref, logits=lambda x: step.logits(x).flip(-1) * 10, greedy=step.greedy)
    assert broken["kl"] > 0.1 and broken["top1_agreement"] < 1.0  # the graph's logits are what is scored


def test_the_export_cache_key_is_the_weights_not_their_path(tmp_path: Path) -> None:
    """The same checkpoint in two folders (two checkouts, a moved venv) shares one cached graph;
    other weights do not."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from autotune.engines.builtin.exported import export_key

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "a")
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "other")  # other random weights
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    a, b, other = (AutoModelForCausalLM.from_pretrained(tmp_path / d) for d in ("a", "b", "other"))
    assert a.config._name_or_path != b.config._name_or_path
    assert export_key(a, "sdpa") == export_key(b, "sdpa") != export_key(other, "sdpa")


def test_a_damaged_cache_entry_is_exported_again(hw: Hardware, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cached export cut short (a full disk, a partial copy) is noticed by its sizes and redone."""
    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", str(tmp_path))
    cfg = TrialConfig(batch_size=2, backend="onnxruntime")
    first = Engine.build(TINY, cfg, hw)
    assert first.exported is not None and first.timings.export_cached == 0.0
    entry = first.exported.path.parent
    files = [f for f in entry.iterdir() if f.name.startswith("step.onnx") and f.suffix in (".onnx", ".data")]
    data = max(files, key=lambda f: f.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # the weights, inline or beside the graph
    again = Engine.build(TINY, cfg, hw)
    assert again.timings.export_cached == 0.0  # not trusted: exported again
    with again, Engine.build(TINY, TrialConfig(batch_size=2), hw) as eager:
        assert again.generate(prompts(2), 4)[0].output_ids == eager.generate(prompts(2), 4)[0].output_ids
    assert Engine.build(TINY, cfg, hw).timings.export_cached == 1.0  # and the repaired entry is used


def test_the_step_graph_is_traced_and_checked_on_other_shapes(tmp_path: Path) -> None:
    """The fast exporter (the TorchScript tracer, a second instead of torch.export's ten or more)
    writes the graph when it gives PyTorch's outputs on inputs of other sizes than it traced."""
    from autotune.engines.builtin.exported import export, export_logits
    from autotune.models import load_model

    model, _, _ = load_model(TINY)
    assert export(model, tmp_path / "step.onnx") == "torchscript"
    assert export_logits(model, tmp_path / "logits.onnx") == "torchscript"


def _toy(baked: bool) -> torch.nn.Module:
    class Toy(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # int(): a Python number, which the tracer freezes at the example's width
            return x.sum(1) * (int(x.shape[1]) if baked else x.shape[1])

    return Toy()


TOY = _Graph(["x"], ["y"], ({0: torch.export.Dim("rows"), 1: torch.export.Dim("width")},), {"x": {0: "r", 1: "w"}})


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the warning about the very thing tested
def test_the_check_catches_a_shape_the_tracer_baked_in(tmp_path: Path) -> None:
    """A tracer records one run: a size read as a Python number is frozen into the graph, and the
    probe at other sizes shows it."""
    from autotune.engines.builtin.exported import _agrees

    probe = (torch.randn(4, 5),)
    for baked in (True, False):
        path = tmp_path / f"{baked}.onnx"
        torch.onnx.export(
            _toy(baked),
            (torch.ones(2, 3),),
            str(path),
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes=TOY.dynamic_axes,
        )
        assert _agrees(_toy(baked), probe, path, ["x"]) is not baked


def test_a_graph_the_check_refuses_is_exported_again_with_torch_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the tracer wrote goes, and torch.export writes the graph (external weights and all)."""
    import numpy as np
    import onnxruntime as ort

    from autotune.engines.builtin import exported

    monkeypatch.setattr(exported, "_agrees", lambda *a: False)
    probe = torch.randn(4, 5)
    assert exported._onnx_export(_toy(False), (torch.ones(2, 3),), (probe,), tmp_path / "g.onnx", TOY) == "dynamo"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["g.onnx", "g.onnx.data"]  # nothing traced left
    got = ort.InferenceSession(str(tmp_path / "g.onnx")).run(None, {"x": probe.numpy()})[0]
    np.testing.assert_allclose(got, (probe.sum(1) * 5).numpy(), rtol=1e-5)


def test_openvino_runs_the_graph_in_fp32_on_every_cpu(export_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenVINO's CPU plugin picks bf16 by itself on CPUs with native bf16 (this CI's Xeon has
    AVX512-BF16): without the hint its tokens drift from the fp32 reference the backend promises."""
    ov = pytest.importorskip("openvino")
    from autotune.engines.builtin.exported import ExportedStep
    from autotune.models import load_model

    seen: list[dict[str, object]] = []
    compile_model = ov.Core.compile_model

    def spy(self: object, model: object, device: str, config: dict[str, object]) -> object:
        seen.append(dict(config))
        return compile_model(self, model, device, config)

    monkeypatch.setattr(ov.Core, "compile_model", spy)
    model, _, _ = load_model(TINY)
    step = ExportedStep.load(model, "sdpa", "openvino")
    step.session(0, 2)
    assert seen and all(c.get("INFERENCE_PRECISION_HINT") == "f32" for c in seen)
