"""Attention kernels. Which kernel runs attention changes the cost of every decode step.

``sdpa`` is PyTorch's ``scaled_dot_product_attention`` with its own kernel choice; on Hopper
(H100/H200) PyTorch prefers cuDNN's kernel, which builds a cuDNN graph per new shape, and a
decode step's key length grows by one every step. ``sdpa-no-cudnn`` keeps SDPA but turns the
cuDNN kernel off, so the flash / memory-efficient / math kernels run. ``eager`` is
transformers' plain matmul-softmax-matmul. ``sdpa-packed`` is SDPA with grouped-query attention
packed for decode: transformers (5.17, and any compiled step) repeats each key/value head for
every query head it serves whenever a mask is passed, which at 32 rows of a 1.1B Llama copies
~3 MB per row per layer each new token; packing the query heads of a KV head as one short query
reads the cache once instead. Prefill and non-GQA models fall through to plain SDPA.

The cuDNN switch is process-global, like the TF32 switch: each trial runs in its own process
and a deployment sets it once at load.
"""

from __future__ import annotations

from typing import Any

from autotune.config import TrialConfig
from autotune.engines.builtin.optimize.base import Technique, needs_cuda
from autotune.hardware import Hardware


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


PACKED_NAME = "autotune_sdpa_packed"


def packed_sdpa_attention(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """transformers' attention-function signature; one decode token: GQA heads packed, no K/V repeat."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = int(getattr(module, "num_key_value_groups", 1))
    if query.shape[2] != 1 or groups == 1 or dropout:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    import torch.nn.functional as F

    rows, heads, _, dim = query.shape
    # Query head h reads KV head h // groups (repeat_kv's order): the heads of one KV head become
    # that head's `groups` query positions, all allowed the same keys (the mask broadcasts).
    packed = query.reshape(rows, key.shape[1], groups, dim)
    mask = attention_mask[:, :, :, : key.shape[2]] if attention_mask is not None else None
    out = F.scaled_dot_product_attention(packed, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(rows, heads, 1, dim).transpose(1, 2).contiguous(), None


def _sdpa_packed(model: Any, hw: Hardware) -> Any:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(PACKED_NAME, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_NAME, sdpa_mask)  # else a custom name gets no mask at all
    if hw.device_type == "cuda":
        import torch

        torch.backends.cuda.enable_cudnn_sdp(False)  # as sdpa-no-cudnn: no per-shape cuDNN graphs
    _set_implementation(model, PACKED_NAME)
    return model


def _eager(model: Any, hw: Hardware) -> Any:
    _set_implementation(model, "eager")
    return model


def _not_with_continuous(cfg: TrialConfig, hw: Hardware) -> str | None:
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
    "eager": Technique("eager", _eager, conflict=_not_with_continuous, description="transformers' matmul + softmax"),
    "sdpa-packed": Technique(
        "sdpa-packed",
        _sdpa_packed,
        conflict=_not_with_continuous,
        description="torch SDPA, grouped-query heads packed at decode (no K/V repeat), no cuDNN",
    ),
}
