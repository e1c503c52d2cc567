"""Roofline: how close a trial's decode and prefill come to what the device can do at best.

The ceilings are measured on the device itself (a large device-to-device copy and a large
matmul), never taken from a datasheet. A decode step must read every weight once plus the KV
cache of each row in flight, so its floor is ``bytes / copy bandwidth``; the fraction a trial
reaches is that floor over its measured time per output token. Prefill is compute-bound, so
its fraction is its matmul and attention FLOPs over (prefill time x matmul rate). Bytes and FLOPs
are counted from the model's own modules and config (:func:`count_model`), so GPT-2's Conv1D,
OPT's learned positions or Qwen2's grouped KV heads count as what they are.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from autotune.measure import Measurement


@dataclass(frozen=True)
class Ceilings:
    """Measured device limits. ``memory_gb_s`` counts bytes read plus bytes written per second."""

    memory_gb_s: float
    matmul_tflops: float
    matmul_dtype: str
    matmul_n: int
    copy_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _timed(fn: Any, sync: Any, repeats: int) -> float:
    """Best wall time of ``repeats`` calls after one warm-up call (the best run is the least disturbed)."""
    fn()
    sync()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def _time_copy(torch: Any, nbytes: int, device: str, sync: Any, repeats: int) -> float:
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return _timed(lambda: dst.copy_(src), sync, repeats)


def _time_matmul(torch: Any, n: int, dtype: Any, device: str, sync: Any, repeats: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return _timed(lambda: a @ b, sync, repeats)


def measure_ceilings(device: str, *, copy_mb: int | None = None, matmul_n: int | None = None) -> Ceilings:
    """Copy bandwidth and matmul rate of ``device`` (``cpu`` or ``cuda:N``); ~1 s on either."""
    import torch

    gpu = device.startswith("cuda")
    copy_mb = copy_mb or (2048 if gpu else 256)
    matmul_n = matmul_n or (8192 if gpu else 1024)
    dtype = torch.bfloat16 if gpu else torch.float32  # the dtype each device serves fastest in this tool
    sync = (lambda: torch.cuda.synchronize(device)) if gpu else (lambda: None)
    nbytes = copy_mb * 2**20
    t_copy = _time_copy(torch, nbytes, device, sync, 5 if gpu else 3)
    t_mm = _time_matmul(torch, matmul_n, dtype, device, sync, 10 if gpu else 3)
    if gpu:
        torch.cuda.empty_cache()
    return Ceilings(
        memory_gb_s=2 * nbytes / t_copy / 1e9,
        matmul_tflops=2 * matmul_n**3 / t_mm / 1e12,
        matmul_dtype=str(dtype).removeprefix("torch."),
        matmul_n=matmul_n,
        copy_bytes=nbytes,
    )


def _tensor_bytes(t: Any) -> int:
    """Storage bytes of a tensor, looking inside tensor subclasses (torchao's quantized weights)."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is not None and type(t).__name__ not in ("Tensor", "Parameter"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(inner) for n in names if (inner := getattr(t, n, None)) is not None)
    return int(t.numel() * t.element_size())


@dataclass(frozen=True)
class ModelCounts:
    """What one token costs a model, counted from its modules and its config (never a Llama formula).

    ``decode_read_bytes`` is every unique weight a decode step multiplies or applies: all parameters
    and buffers at their storage size, except embedding tables that are only looked up (one row per
    token; a table tied to the output head is read whole and counted once) and boolean masks.
    ``matmul_params`` is the multiply-add count of one token through every matmul module (nn.Linear,
    GPT-2's Conv1D, quantized linears, the output head), at the logical weight shape whatever the
    storage; ``head_params`` is the output head's share, which a prefill runs for one token per row.
    """

    total_bytes: int
    decode_read_bytes: int
    matmul_params: int
    head_params: int
    kv_elements_per_token: int  # K and V across all layers: 2 x layers x kv heads x head dim
    attention_width: int  # layers x query heads x head dim (a query's score and value FLOPs are 4 x this x keys)

    def kv_bytes_per_token(self, kv_element_size: int) -> int:
        """Bytes of K and V one token of context holds across all layers."""
        return self.kv_elements_per_token * kv_element_size


def _matmul_elements(mod: Any) -> int | None:
    """Weight elements one token multiplies through ``mod`` if it is a matmul module, else None.

    nn.Linear and the modules that replace it (torch.ao's dynamic-quantized Linear, bitsandbytes',
    GPTQ's ``infeatures``) say their logical shape; transformers' Conv1D (GPT-2) says ``nx``/``nf``.
    """
    ins = getattr(mod, "in_features", None) or getattr(mod, "infeatures", None)
    outs = getattr(mod, "out_features", None) or getattr(mod, "outfeatures", None)
    if isinstance(ins, int) and isinstance(outs, int):
        return ins * outs
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    if isinstance(mod, Conv1D):
        return int(mod.nx) * int(mod.nf)
    return None


def _matmul_modules(model: Any) -> list[tuple[Any, int]]:
    """Each outermost matmul module with its weight elements (a wrapper's inner Linear is not counted again)."""
    found: list[tuple[Any, int]] = []

    def walk(mod: Any) -> None:
        n = _matmul_elements(mod)
        if n is not None:
            found.append((mod, n))
            return
        for child in mod.children():
            walk(child)

    walk(model)
    return found


def _attention_shape(config: Any) -> tuple[int, int, int, int]:
    """Layers, query heads, KV heads and head dim from a transformers config (GPT-2's ``n_head``, OPT, GQA).

    Zeros where the config does not say (the KV cache and attention FLOPs then count as nothing:
    the fractions err low, never above the bound).
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config

    def first(*names: str) -> Any:
        for name in names:
            value = getattr(text, name, None)
            if value is not None:
                return value
        return None

    layers = int(first("num_hidden_layers", "n_layer", "num_layers") or 0)
    heads = int(first("num_attention_heads", "n_head", "num_heads") or 0)
    hidden = int(first("hidden_size", "n_embd", "d_model") or 0)
    if getattr(text, "multi_query", False) and not getattr(text, "new_decoder_architecture", False):
        kv_heads = 1  # GPT-BigCode, Falcon-7B: one K/V head whatever else the config says
    else:
        kv_heads = first("num_key_value_heads", "num_kv_heads", "n_head_kv", "multi_query_group_num") or heads
    head_dim = int(first("head_dim") or (hidden // heads if heads else 0))
    return layers, heads, int(kv_heads), head_dim


def count_model(model: Any) -> ModelCounts:
    """Bytes and FLOPs per token of ``model``, from its modules and ``model.config``."""
    import torch

    tensors: dict[int, Any] = {}
    for p in model.parameters():
        tensors.setdefault(id(p), p)
    masks: set[int] = set()
    for b in model.buffers():
        tensors.setdefault(id(b), b)
        if b.dtype == torch.bool:
            masks.add(id(b))
    total = sum(_tensor_bytes(t) for t in tensors.values())
    # Dynamic-quantized (fbgemm) modules keep packed int8 weights outside parameters(): count them here.
    for mod in model.modules():
        if getattr(mod, "_packed_params", None) is not None and callable(getattr(mod, "weight", None)):
            total += _tensor_bytes(mod.weight())
            bias = mod.bias() if callable(getattr(mod, "bias", None)) else None
            total += _tensor_bytes(bias) if bias is not None else 0
    matmuls = _matmul_modules(model)
    multiplied = {id(t) for mod, _ in matmuls for t in mod.parameters()}
    lookups = {
        id(mod.weight)
        for mod in model.modules()
        if isinstance(mod, torch.nn.Embedding) and id(mod.weight) not in multiplied
    }
    skipped = sum(_tensor_bytes(tensors[i]) for i in (lookups | masks) if i in tensors)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layers, heads, kv_heads, head_dim = _attention_shape(model.config)
    return ModelCounts(
        total_bytes=total,
        decode_read_bytes=total - skipped,
        matmul_params=sum(n for _, n in matmuls),
        head_params=sum(n for mod, n in matmuls if mod is head),
        kv_elements_per_token=2 * layers * kv_heads * head_dim,
        attention_width=layers * heads * head_dim,
    )


def weight_bytes(model: Any) -> dict[str, int]:
    """:func:`count_model`'s weight figures as a dict (``total``, ``decode_read``, ``matmul_params``)."""
    c = count_model(model)
    return {"total": c.total_bytes, "decode_read": c.decode_read_bytes, "matmul_params": c.matmul_params}


def prefill_flops(counts: ModelCounts, prompt_tokens: float, rows: float) -> float:
    """FLOPs of a prefill of ``rows`` prompts of ``prompt_tokens`` real tokens.

    Each prompt token runs every matmul but the output head (2 FLOPs per weight element); the head
    runs for the last token only (transformers' ``logits_to_keep=1``, as generate() and the static
    decoder call it); and token ``i`` of the prompt scores and weights ``i`` keys, causally:
    ``4 x attention_width x i`` FLOPs, summed to ``2 x attention_width x P x (P + 1)``. Padding
    is not useful work and is not counted.
    """
    p = prompt_tokens
    body = 2.0 * (counts.matmul_params - counts.head_params) * p
    head = 2.0 * counts.head_params
    attention = 2.0 * counts.attention_width * p * (p + 1)
    return (body + head + attention) * rows


def roofline(
    m: Measurement,
    ceilings: Ceilings,
    *,
    counts: ModelCounts,
    kv_element_size: int,
    prompt_tokens: float,
    output_tokens: float,
    matmul_dtype: str | None = None,
) -> dict[str, float]:
    """Decode and prefill fractions of the measured ceilings, for one trial's measurement.

    Decode: the bytes one step must read (weights + the KV cache of the mean batch at the
    mean context) at the measured copy bandwidth, over the median time per output token.
    Prefill: :func:`prefill_flops` over the median prefill time, as a rate (``prefill_tflops``)
    and, when the trial multiplies in the dtype the ceiling was measured in (``matmul_dtype``,
    see :func:`compute_dtype`), as a fraction of it: an int8 or fp32 trial measured against a
    bf16 ceiling would read as a meaningless fraction (even above 100%), so it gets NaN.
    """
    rows = max(m.mean_batch_rows, 1.0)
    context = prompt_tokens + output_tokens / 2
    step_bytes = counts.decode_read_bytes + counts.kv_bytes_per_token(kv_element_size) * context * rows
    bound_ms = step_bytes / (ceilings.memory_gb_s * 1e9) * 1e3
    step_ms = m.tpot_ms.get("p50", math.nan)
    prefill_ms = (m.prefill_ms or {}).get("p50", math.nan)
    flops = prefill_flops(counts, prompt_tokens, rows)
    tflops = flops / (prefill_ms / 1e3) / 1e12 if prefill_ms > 0 else math.nan
    comparable = matmul_dtype is None or _same_rate(matmul_dtype, ceilings.matmul_dtype)
    return {
        "decode_bytes_per_step": float(step_bytes),
        "decode_bound_ms": bound_ms,
        "decode_step_ms": step_ms,
        "decode_fraction": bound_ms / step_ms if step_ms > 0 else math.nan,
        "prefill_flops": flops,
        "prefill_ms": prefill_ms,
        "prefill_tflops": tflops,
        "prefill_fraction": tflops / ceilings.matmul_tflops if comparable else math.nan,
    }


def compute_dtype(precision: str, quantization: str) -> str:
    """The dtype a trial's matmuls run in: the quantized one, else the precision's (tf32 apart from fp32)."""
    quantized = {"int8-dynamic": "int8", "int8-weight-only": "int8-weight-only", "int4-weight-only": "int4"}
    if quantization == "fp8":
        return "float8"
    if quantization in quantized:
        return quantized[quantization]
    return {"fp32": "float32", "tf32": "tf32", "bf16": "bfloat16", "fp16": "float16"}[precision]


def _same_rate(trial_dtype: str, ceiling_dtype: str) -> bool:
    """bf16 and fp16 share the tensor cores' rate; everything else must match exactly."""
    half = {"bfloat16", "float16"}
    return trial_dtype == ceiling_dtype or (trial_dtype in half and ceiling_dtype in half)
