"""Roofline: measured ceilings, the bytes a decode step must read, and the fractions a trial reaches."""

from __future__ import annotations

import math
from typing import Any

import pytest

from autotune.measure import Measurement
from autotune.models import ModelInfo, load_model
from autotune.roofline import Ceilings, compute_dtype, kv_bytes_per_token, measure_ceilings, roofline, weight_bytes


def _measurement(tpot_p50: float, prefill_p50: float, rows: float) -> Measurement:
    dist = {"p50": 1.0, "p90": 1.0, "p95": 1.0, "p99": 1.0, "mean": 1.0, "max": 1.0}
    return Measurement(
        output_tokens_per_s=1.0,
        requests_per_s=1.0,
        requests=1,
        output_tokens=1,
        duration_s=1.0,
        e2e_ms=dist,
        ttft_ms=dist,
        tpot_ms={**dist, "p50": tpot_p50},
        queue_ms=dist,
        mean_batch_rows=rows,
        peak_memory_mb=1.0,
        memory_kind="none",
        prefill_ms={**dist, "p50": prefill_p50},
    )


def test_ceilings_are_measured_on_the_cpu() -> None:
    c = measure_ceilings("cpu", copy_mb=32, matmul_n=256)
    assert c.memory_gb_s > 0.1 and c.matmul_tflops > 0 and c.matmul_dtype == "float32"
    assert c.copy_bytes == 32 * 2**20


def test_weight_bytes_skip_the_untied_embedding_lookup() -> None:
    model, _, _ = load_model("preset:llama-tiny")
    w = weight_bytes(model)
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for b in model.buffers())  # rotary frequencies
    assert w["total"] == (params + buffers) * 4  # fp32
    emb = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is emb
    assert w["decode_read"] == (w["total"] if tied else w["total"] - emb.numel() * 4)
    assert 0 < w["matmul_params"] <= params
    import torch

    half = weight_bytes(model.to(dtype=torch.bfloat16))
    assert half["decode_read"] < w["decode_read"] * 0.51 and half["matmul_params"] == w["matmul_params"]


def test_weight_bytes_count_fbgemm_packed_int8_weights() -> None:
    import torch

    model, _, _ = load_model("preset:llama-tiny")
    fp32 = weight_bytes(model)
    q = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    int8 = weight_bytes(q)
    assert int8["matmul_params"] == fp32["matmul_params"]
    assert int8["decode_read"] < fp32["decode_read"] / 2  # linear weights went from 4 bytes to 1


def test_fractions_follow_bytes_over_bandwidth_and_flops_over_rate() -> None:
    info = ModelInfo("preset:x", "preset", "llama", 0, 100, 256, 64, 2, 2, 16)
    assert kv_bytes_per_token(info, 2) == 2 * 2 * 2 * 16 * 2
    weights = {"total": 10_000_000, "decode_read": 9_000_000, "matmul_params": 4_000_000}
    ceilings = Ceilings(memory_gb_s=100.0, matmul_tflops=1.0, matmul_dtype="float32", matmul_n=0, copy_bytes=0)

    def at(tpot_ms: float) -> dict[str, float]:
        m = _measurement(tpot_p50=tpot_ms, prefill_p50=10.0, rows=4)
        return roofline(m, ceilings, weights=weights, info=info, kv_element_size=2, prompt_tokens=100, output_tokens=20)

    r = at(1.0)
    step_bytes = 9_000_000 + 256 * 110 * 4
    assert r["decode_bytes_per_step"] == step_bytes
    assert r["decode_bound_ms"] == pytest.approx(step_bytes / 100e9 * 1e3)
    assert r["decode_fraction"] == pytest.approx(r["decode_bound_ms"] / 1.0)
    flops = 2 * 4_000_000 * 100 * 4
    assert r["prefill_fraction"] == pytest.approx(flops / (0.010 * 1e12))
    slow = at(4.0)
    assert slow["decode_fraction"] == pytest.approx(r["decode_fraction"] / 4)


def test_fractions_are_nan_without_timings() -> None:
    info = ModelInfo("preset:x", "preset", "llama", 0, 100, 256, 64, 2, 2, 16)
    m = _measurement(tpot_p50=0.0, prefill_p50=0.0, rows=1)
    r = roofline(
        m,
        Ceilings(1.0, 1.0, "float32", 0, 0),
        weights={"total": 1, "decode_read": 1, "matmul_params": 1},
        info=info,
        kv_element_size=4,
        prompt_tokens=1,
        output_tokens=1,
    )
    assert math.isnan(r["decode_fraction"]) and math.isnan(r["prefill_fraction"])


def test_prefill_fraction_only_against_a_ceiling_of_the_same_dtype() -> None:
    info = ModelInfo("preset:x", "preset", "llama", 0, 100, 256, 64, 2, 2, 16)
    weights = {"total": 10_000_000, "decode_read": 9_000_000, "matmul_params": 4_000_000}
    m = _measurement(tpot_p50=1.0, prefill_p50=10.0, rows=4)

    def run(trial_dtype: str, ceiling_dtype: str) -> dict[str, float]:
        ceilings = Ceilings(100.0, 1.0, ceiling_dtype, 0, 0)
        kw: dict[str, Any] = {
            "weights": weights,
            "info": info,
            "kv_element_size": 2,
            "prompt_tokens": 100,
            "output_tokens": 20,
        }
        return roofline(m, ceilings, matmul_dtype=trial_dtype, **kw)

    same = run("float32", "float32")
    assert same["prefill_tflops"] == pytest.approx(2 * 4_000_000 * 100 * 4 / 0.010 / 1e12)
    assert same["prefill_fraction"] == pytest.approx(same["prefill_tflops"] / 1.0)
    assert run("float16", "bfloat16")["prefill_fraction"] == same["prefill_fraction"]  # same tensor-core rate
    int8 = run(compute_dtype("fp32", "int8-dynamic"), "float32")  # fbgemm int8 outruns the fp32 ceiling
    assert math.isnan(int8["prefill_fraction"]) and int8["prefill_tflops"] == same["prefill_tflops"]
    assert compute_dtype("bf16", "fp8") == "float8" and compute_dtype("tf32", "none") == "tf32"
