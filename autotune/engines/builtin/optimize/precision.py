"""Precision: the dtype weights and activations run in. tf32 is fp32 storage with TF32 matmuls."""

from __future__ import annotations

from typing import Any

from autotune.engines.builtin.optimize.base import Technique, needs_cuda
from autotune.hardware import Hardware


def _to(dtype_name: str) -> Any:
    def apply(model: Any, hw: Hardware) -> Any:
        import torch

        torch.set_float32_matmul_precision("highest")
        return model.to(getattr(torch, dtype_name))

    return apply


def _tf32(model: Any, hw: Hardware) -> Any:
    import torch

    # Process-global on purpose: each trial runs in its own process, a deployment sets it once.
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    return model.to(torch.float32)


PRECISIONS: dict[str, Technique] = {
    "fp32": Technique("fp32", _to("float32"), description="full precision"),
    "tf32": Technique("tf32", _tf32, needs_cuda((8, 0)), description="fp32 weights, TF32 tensor-core matmuls"),
    "bf16": Technique("bf16", _to("bfloat16"), description="bfloat16 weights and activations"),
    "fp16": Technique("fp16", _to("float16"), description="float16 weights and activations"),
}


def torch_dtype(precision: str) -> Any:
    """The storage dtype of a precision (tf32 stores fp32)."""
    import torch

    return {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
