"""Knob implementations applied to a real (tiny) model: each changes what it claims to change."""

from __future__ import annotations

import pytest
import torch

from autotune.config import TrialConfig
from autotune.engines.builtin.optimize import ATTENTIONS, BACKENDS, PRECISIONS, QUANTIZERS
from autotune.hardware import probe
from autotune.models import load_model

TINY = "preset:llama-tiny"


def _generate(model: torch.nn.Module) -> list[int]:
    ids = torch.arange(10, 26).unsqueeze(0)
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=4,
            min_new_tokens=4,
            do_sample=False,
            pad_token_id=3,
        )
    return out[0, 16:].tolist()


def test_registries_are_importable_without_torch_side_effects() -> None:
    assert set(PRECISIONS) == {"fp32", "tf32", "bf16", "fp16"}
    assert set(QUANTIZERS) == {"none", "int8-dynamic", "int8-weight-only", "int4-weight-only", "fp8"}
    assert set(BACKENDS) == {
        "eager",
        "inductor",
        "inductor-cudagraphs",
        "cuda-graphs",
        "onnxruntime",
        "openvino",
        "tensorrt",
    }
    assert set(ATTENTIONS) == {"sdpa", "sdpa-no-cudnn", "eager", "sdpa-packed"}


def test_eager_attention_switches_every_layer_and_keeps_greedy_tokens() -> None:
    hw = probe("cpu")
    model, _, _ = load_model(TINY)
    reference = _generate(model)
    model = ATTENTIONS["eager"].apply(model, hw)
    assert model.config._attn_implementation == "eager"
    assert all(layer.self_attn.config._attn_implementation == "eager" for layer in model.model.layers)
    assert _generate(model) == reference  # same math, another kernel: same greedy tokens
    model = ATTENTIONS["sdpa"].apply(model, hw)
    assert model.config._attn_implementation == "sdpa"


def test_packed_gqa_attention_keeps_greedy_tokens() -> None:
    """sdpa-packed folds a KV head's query heads into one short query at decode: same math, no K/V repeat."""
    hw = probe("cpu")
    model, _, _ = load_model(TINY)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # the preset is GQA
    reference = _generate(model)
    model = ATTENTIONS["sdpa-packed"].apply(model, hw)
    assert model.config._attn_implementation == "autotune_sdpa_packed"
    assert _generate(model) == reference


def test_attention_rules_on_cpu() -> None:
    hw = probe("cpu")
    assert ATTENTIONS["sdpa-no-cudnn"].unsupported(hw) == "needs an NVIDIA GPU"
    continuous_eager = TrialConfig(scheduler="continuous", attention="eager")
    assert "paged SDPA" in (ATTENTIONS["eager"].conflict(continuous_eager, hw) or "")
    assert ATTENTIONS["eager"].conflict(TrialConfig(attention="eager"), hw) is None


@pytest.mark.parametrize("backend", ["cuda-graphs", "inductor-cudagraphs"])
def test_cuda_graph_backends_rules(backend: str) -> None:
    hw = probe("cpu")
    assert BACKENDS[backend].unsupported(hw) == "needs an NVIDIA GPU"
    continuous = TrialConfig(scheduler="continuous", backend=backend)
    assert f"{backend} needs scheduler static" in (BACKENDS[backend].conflict(continuous, hw) or "")
    assert BACKENDS[backend].conflict(TrialConfig(backend=backend), hw) is None


def test_precision_changes_dtype() -> None:
    hw = probe("cpu")
    model, _, _ = load_model(TINY)
    model = PRECISIONS["bf16"].apply(model, hw)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert len(_generate(model)) == 4


def test_int8_dynamic_replaces_linear_layers_on_cpu() -> None:
    hw = probe("cpu")
    model, _, _ = load_model(TINY)
    model = QUANTIZERS["int8-dynamic"].apply(model, hw)
    dynamic = torch.ao.nn.quantized.dynamic.Linear
    assert isinstance(model.model.layers[0].self_attn.q_proj, dynamic)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert len(_generate(model)) == 4


def test_int8_weight_only_quantizes_weights() -> None:
    hw = probe("cpu")
    model, _, _ = load_model(TINY)
    before = model.model.layers[0].mlp.up_proj.weight
    model = QUANTIZERS["int8-weight-only"].apply(model, hw)
    after = model.model.layers[0].mlp.up_proj.weight
    assert type(after) is not type(before)  # a torchao tensor subclass holding int8 data
    assert len(_generate(model)) == 4


def test_int4_uses_tinygemm_packing_that_needs_no_extra_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchao's default int4 layout needs the mslk package; the tile-packed one runs on tinygemm."""
    import torchao.quantization as tq

    seen = []
    monkeypatch.setattr(tq, "quantize_", lambda model, config: seen.append(config))
    QUANTIZERS["int4-weight-only"].apply(object(), probe("cpu"))
    assert isinstance(seen[0], tq.Int4WeightOnlyConfig) and seen[0].group_size == 128
    assert seen[0].int4_packing_format == "tile_packed_to_4d"


def test_tensorrt_is_offered_only_on_a_gpu_where_torch_tensorrt_imports(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util
    import sys
    import types

    from ...conftest import make_hw

    trt = BACKENDS["tensorrt"]
    assert "NVIDIA GPU" in (trt.unsupported(make_hw()) or "")
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args: object) -> object:
        return None if name == "torch_tensorrt" else real_find_spec(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert "pip install torch-tensorrt" in (trt.unsupported(make_hw("cuda", (9, 0))) or "")
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    monkeypatch.setitem(sys.modules, "torch_tensorrt", types.ModuleType("torch_tensorrt"))  # installed
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "torch_tensorrt" else real_find_spec(name, *a)
    )
    gpu = make_hw("cuda", (9, 0))
    assert trt.unsupported(gpu) is None
    assert "quantization none" in (
        trt.conflict(TrialConfig(backend="tensorrt", quantization="int8-weight-only"), gpu) or ""
    )
    assert "scheduler static" in (trt.conflict(TrialConfig(backend="tensorrt", scheduler="continuous"), gpu) or "")
    model, _, _ = load_model("preset:llama-tiny", device="cpu")
    trt.apply(model, gpu)  # generate() compiles its decode step with Torch-TensorRT's torch.compile backend
    cfg = model.generation_config
    assert cfg.compile_config.backend == "torch_tensorrt" and cfg.cache_implementation == "static"
    assert not cfg.compile_config.dynamic
