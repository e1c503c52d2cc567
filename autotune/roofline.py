"""Roofline: how close a trial's decode and prefill come to what the device can do at best.

The ceilings are measured on the device itself (a large device-to-device copy and a large
matmul), never taken from a datasheet. A decode step must read every weight once plus the KV
cache of each row in flight, so its floor is ``bytes / copy bandwidth``; the fraction a trial
reaches is that floor over its measured time per output token. Prefill is compute-bound, so
its fraction is its linear-layer FLOPs over (prefill time x matmul rate).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from autotune.measure import Measurement
    from autotune.models import ModelInfo


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
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return int(t.numel() * t.element_size())


def weight_bytes(model: Any) -> dict[str, int]:
    """What a forward pass reads and multiplies: weight bytes and matmul parameter counts.

    ``decode_read`` is every unique weight except the input embedding table, which is a lookup
    (one row per token) unless it is tied to the output head, which reads all of it.
    Dynamic-quantized (fbgemm) modules keep packed int8 weights outside ``parameters()``; they
    count one byte per weight.
    """
    seen: set[int] = set()
    total = params = 0
    for p in list(model.parameters()) + list(model.buffers()):
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += _tensor_bytes(p)
        params += int(p.numel()) if p.dim() >= 2 else 0
    for mod in model.modules():
        packed = getattr(mod, "_packed_params", None)
        if packed is not None and callable(getattr(mod, "weight", None)):
            n = int(mod.weight().numel())
            total, params = total + n, params + n
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is emb
    emb_bytes, emb_params = (0, 0) if tied else (_tensor_bytes(emb), int(emb.numel()))
    return {"total": total, "decode_read": total - emb_bytes, "matmul_params": params - emb_params}


def kv_bytes_per_token(info: ModelInfo, kv_element_size: int) -> int:
    """Bytes of K and V one token of context holds across all layers."""
    return 2 * info.num_layers * info.num_kv_heads * info.head_dim * kv_element_size


def roofline(
    m: Measurement,
    ceilings: Ceilings,
    *,
    weights: dict[str, int],
    info: ModelInfo,
    kv_element_size: int,
    prompt_tokens: float,
    output_tokens: float,
    matmul_dtype: str | None = None,
) -> dict[str, float]:
    """Decode and prefill fractions of the measured ceilings, for one trial's measurement.

    Decode: the bytes one step must read (weights + the KV cache of the mean batch at the
    mean context) at the measured copy bandwidth, over the median time per output token.
    Prefill: 2 x matmul parameters x prompt tokens x rows FLOPs (attention scores left out,
    small at these prompt lengths) over the median prefill time, as a rate (``prefill_tflops``)
    and, when the trial multiplies in the dtype the ceiling was measured in (``matmul_dtype``,
    see :func:`compute_dtype`), as a fraction of it: an int8 or fp32 trial measured against a
    bf16 ceiling would read as a meaningless fraction (even above 100%), so it gets NaN.
    """
    rows = max(m.mean_batch_rows, 1.0)
    context = prompt_tokens + output_tokens / 2
    step_bytes = weights["decode_read"] + kv_bytes_per_token(info, kv_element_size) * context * rows
    bound_ms = step_bytes / (ceilings.memory_gb_s * 1e9) * 1e3
    step_ms = m.tpot_ms.get("p50", math.nan)
    prefill_ms = (m.prefill_ms or {}).get("p50", math.nan)
    flops = 2.0 * weights["matmul_params"] * prompt_tokens * rows
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
