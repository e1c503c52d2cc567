"""Quantization schemes. CPU int8-dynamic uses torch's fbgemm dynamic quantization (fast on
x86 in eager mode); the rest go through torchao's ``quantize_`` with its config classes."""

from __future__ import annotations

import warnings
from typing import Any

from autotune.config import TrialConfig
from autotune.engines.builtin.optimize.base import Technique, first_reason, needs_cuda, needs_torchao
from autotune.hardware import Hardware


def _none(model: Any, hw: Hardware) -> Any:
    return model


def _torchao(config_name: str, **kwargs: Any) -> Any:
    def apply(model: Any, hw: Hardware) -> Any:
        import torchao.quantization as tq

        tq.quantize_(model, getattr(tq, config_name)(**kwargs))
        return model

    return apply


def _int8_dynamic(model: Any, hw: Hardware) -> Any:
    if hw.device_type == "cuda":
        return _torchao("Int8DynamicActivationInt8WeightConfig")(model, hw)
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


def _int8_dynamic_unsupported(hw: Hardware) -> str | None:
    return needs_torchao(hw) if hw.device_type == "cuda" else None


def _int8_dynamic_conflict(cfg: TrialConfig, hw: Hardware) -> str | None:
    if hw.device_type == "cpu" and cfg.precision != "fp32":
        return "int8-dynamic on CPU (fbgemm) quantizes fp32 Linear layers: use precision fp32"
    return None


def _needs_half(cfg: TrialConfig, hw: Hardware) -> str | None:
    if cfg.precision not in ("bf16", "fp16"):
        return f"{cfg.quantization} runs on bf16/fp16 activations: use precision bf16"
    return None


QUANTIZERS: dict[str, Technique] = {
    "none": Technique("none", _none, description="no quantization"),
    "int8-dynamic": Technique(
        "int8-dynamic",
        _int8_dynamic,
        _int8_dynamic_unsupported,
        _int8_dynamic_conflict,
        description="int8 weights and dynamically quantized int8 activations",
    ),
    "int8-weight-only": Technique(
        "int8-weight-only",
        _torchao("Int8WeightOnlyConfig"),
        needs_torchao,
        description="int8 weights, activations in the model precision (torchao)",
    ),
    "int4-weight-only": Technique(
        "int4-weight-only",
        # tinygemm's tile-packed layout: torchao's default (plain) needs the separate mslk kernels,
        # which the H200 check lacked ("Requires mslk >= 1.0.0").
        _torchao("Int4WeightOnlyConfig", group_size=128, int4_packing_format="tile_packed_to_4d"),
        lambda hw: first_reason(needs_cuda((8, 0))(hw), needs_torchao(hw)),
        _needs_half,
        description="int4 grouped weights (torchao, CUDA tinygemm kernels)",
    ),
    "fp8": Technique(
        "fp8",
        _torchao("Float8DynamicActivationFloat8WeightConfig"),
        lambda hw: first_reason(needs_cuda((8, 9))(hw), needs_torchao(hw)),
        _needs_half,
        description="fp8 weights and dynamic fp8 activations (torchao, Ada/Hopper and newer)",
    ),
}
