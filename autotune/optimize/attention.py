"""Attention kernels. Which kernel runs attention changes the cost of every decode step.

``sdpa`` is PyTorch's ``scaled_dot_product_attention`` with its own kernel choice; on Hopper
(H100/H200) PyTorch prefers cuDNN's kernel, which builds a cuDNN graph per new shape, and a
decode step's key length grows by one every step. ``sdpa-no-cudnn`` keeps SDPA but turns the
cuDNN kernel off, so the flash / memory-efficient / math kernels run. ``eager`` is
transformers' plain matmul-softmax-matmul. The GPU check measures all three.

The cuDNN switch is process-global, like the TF32 switch: each trial runs in its own process
and a deployment sets it once at load.
"""

from __future__ import annotations

from typing import Any

from autotune.config import TrialConfig
from autotune.hardware import Hardware
from autotune.optimize.base import Technique, needs_cuda


def _set_implementation(model: Any, name: str) -> None:
    setter = getattr(model, "set_attn_implementation", None)
    if callable(setter):  # transformers >= 4.48 re-dispatches every submodule
        setter(name)
    else:
        model.config._attn_implementation = name


def _sdpa(cudnn: bool) -> Any:
    def apply(model: Any, hw: Hardware) -> Any:
        import torch

        if hw.device_type == "cuda":
            torch.backends.cuda.enable_cudnn_sdp(cudnn)
        _set_implementation(model, "sdpa")
        return model

    return apply


def _eager(model: Any, hw: Hardware) -> Any:
    _set_implementation(model, "eager")
    return model


def _eager_conflict(cfg: TrialConfig, hw: Hardware) -> str | None:
    if cfg.scheduler == "continuous":
        return "continuous batching runs transformers' paged SDPA attention: use attention sdpa"
    return None


ATTENTIONS: dict[str, Technique] = {
    "sdpa": Technique("sdpa", _sdpa(cudnn=True), description="torch SDPA, PyTorch picks the kernel"),
    "sdpa-no-cudnn": Technique(
        "sdpa-no-cudnn",
        _sdpa(cudnn=False),
        needs_cuda(),
        description="torch SDPA without the cuDNN kernel (no per-shape cuDNN graph builds)",
    ),
    "eager": Technique("eager", _eager, conflict=_eager_conflict, description="transformers' matmul + softmax"),
}
