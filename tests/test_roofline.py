"""Roofline: measured ceilings, the bytes a decode step must read, and the fractions a trial reaches.

The counts are checked on Llama (the presets) and on GPT-2, OPT and Qwen2 checkpoints built here from tiny
random configs, against independent counts: parameter bytes, hand formulas per architecture, and the K/V
tensors a real forward pass leaves in its cache.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from autotune.measure import Measurement
from autotune.models import build_tokenizer, load_model
from autotune.roofline import (
    Ceilings,
    ModelCounts,
    compute_dtype,
    count_model,
    measure_ceilings,
    prefill_flops,
    roofline,
    weight_bytes,
)

VOCAB = 2048


def test_ceilings_are_measured_on_the_cpu() -> None:
    c = measure_ceilings("cpu", copy_mb=32, matmul_n=256)
    assert c.memory_gb_s > 0.1 and c.matmul_tflops > 0 and c.matmul_dtype == "float32"
    assert c.copy_bytes == 32 * 2**20


def _gpt2(vocab: int = VOCAB) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=vocab, n_positions=256, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


def _opt(vocab: int = VOCAB) -> Any:
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        ffn_dim=256,
        vocab_size=vocab,
        max_position_embeddings=256,
        word_embed_proj_dim=32,  # OPT-350m's shape: embeddings narrower than the model, projected in and out
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    return OPTForCausalLM(cfg).eval()


def _qwen2(vocab: int = VOCAB) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # GQA
        intermediate_size=96,
        vocab_size=vocab,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    return Qwen2ForCausalLM(cfg).eval()


def _param_bytes(model: Any) -> int:
    """Sum of unique parameter and buffer bytes (``parameters()`` yields a tied tensor once)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _cache_elements_per_token(model: Any, tokens: int = 7) -> int:
    """K and V elements one token leaves in a real forward pass's cache, across all layers."""
    import torch

    ids = torch.randint(4, model.config.vocab_size, (1, tokens))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    total = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers)
    assert total % tokens == 0
    return total // tokens


def test_weight_bytes_skip_the_untied_embedding_lookup() -> None:
    model, _, _ = load_model("preset:llama-tiny")
    c = count_model(model)
    w = weight_bytes(model)
    assert w == {"total": c.total_bytes, "decode_read": c.decode_read_bytes, "matmul_params": c.matmul_params}
    params = sum(p.numel() for p in model.parameters())
    buffers = sum(b.numel() for b in model.buffers())  # rotary frequencies
    assert w["total"] == (params + buffers) * 4  # fp32
    emb = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight is emb
    assert w["decode_read"] == (w["total"] if tied else w["total"] - emb.numel() * 4)
    # What the Llama-shaped count gave and got right: every 2-D weight but an untied embedding.
    two_d = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    assert w["matmul_params"] == two_d - (0 if tied else emb.numel())
    assert c.head_params == model.get_output_embeddings().weight.numel()
    cfg = model.config
    assert c.kv_elements_per_token == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
    assert c.kv_elements_per_token == _cache_elements_per_token(model)
    import torch

    half = weight_bytes(model.to(dtype=torch.bfloat16))
    assert half["decode_read"] < w["decode_read"] * 0.51 and half["matmul_params"] == w["matmul_params"]


def test_weight_bytes_count_fbgemm_packed_int8_weights() -> None:
    import torch

    model, _, _ = load_model("preset:llama-tiny")
    fp32 = count_model(model)
    q = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    int8 = count_model(q)
    assert int8.matmul_params == fp32.matmul_params and int8.head_params == fp32.head_params
    # Every Linear (no biases in Llama) went from 4 bytes a weight to 1, packed outside parameters().
    assert int8.decode_read_bytes == fp32.decode_read_bytes - 3 * fp32.matmul_params


def test_gpt2_counts_conv1d_the_tied_head_once_and_skips_position_lookups() -> None:
    model = _gpt2()
    cfg, c = model.config, count_model(model)
    h, layers, v = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
    assert model.lm_head.weight is wte
    every = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False)) * 4
    assert c.total_bytes == _param_bytes(model) == every - wte.numel() * 4  # tied: counted once
    assert c.decode_read_bytes == c.total_bytes - wpe.numel() * 4  # positions are looked up, the head reads wte
    # c_attn (h x 3h), attn c_proj (h x h), c_fc (h x 4h), mlp c_proj (4h x h); the head v x h
    assert c.matmul_params == layers * 12 * h * h + v * h
    assert c.head_params == v * h
    assert c.kv_elements_per_token == 2 * layers * cfg.n_head * (h // cfg.n_head) == 2 * layers * h  # no GQA
    assert c.kv_elements_per_token == _cache_elements_per_token(model)
    assert c.attention_width == layers * h


def test_opt_counts_its_projections_and_skips_learned_positions() -> None:
    model = _opt()
    cfg, c = model.config, count_model(model)
    h, layers, v, ffn, proj = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.ffn_dim, 32
    positions = model.model.decoder.embed_positions.weight
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    assert c.total_bytes == _param_bytes(model)
    assert c.decode_read_bytes == c.total_bytes - positions.numel() * 4
    # q, k, v, out (h x h each), fc1 and fc2 (h x ffn each), project_in/out (proj x h each), the head (v x proj)
    assert c.matmul_params == layers * (4 * h * h + 2 * h * ffn) + 2 * proj * h + v * proj
    assert c.head_params == v * proj
    assert c.kv_elements_per_token == 2 * layers * h == _cache_elements_per_token(model)


def test_qwen2_counts_grouped_kv_heads_and_an_untied_head() -> None:
    model = _qwen2()
    cfg, c = model.config, count_model(model)
    h, layers, v, inter = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.intermediate_size
    d, kv = h // cfg.num_attention_heads, cfg.num_key_value_heads
    emb = model.model.embed_tokens.weight
    assert c.total_bytes == _param_bytes(model)
    assert c.decode_read_bytes == c.total_bytes - emb.numel() * 4  # untied: the input table is a lookup
    attention = h * h + 2 * h * kv * d + h * h  # q, k, v (kv heads only), o
    assert c.matmul_params == layers * (attention + 3 * h * inter) + v * h
    assert c.head_params == v * h
    assert c.kv_elements_per_token == 2 * layers * kv * d == _cache_elements_per_token(model)
    assert c.kv_elements_per_token * 2 == 2 * layers * h  # half of what a head-per-query count would say
    assert c.attention_width == layers * h


def test_multi_query_models_hold_one_kv_head() -> None:
    from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

    cfg = GPTBigCodeConfig(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, multi_query=True)
    model = GPTBigCodeForCausalLM(cfg).eval()
    c = count_model(model)
    assert c.kv_elements_per_token == 2 * cfg.n_layer * 1 * (64 // 4) == _cache_elements_per_token(model)
    assert c.attention_width == cfg.n_layer * 64  # the queries keep all their heads


def test_torchao_weights_count_their_real_storage() -> None:
    pytest.importorskip("torchao")
    import torchao.quantization as tq

    model = _gpt2()
    fp32 = count_model(model)
    h, v = model.config.n_embd, model.config.vocab_size
    tq.quantize_(model, tq.Int8WeightOnlyConfig())  # nn.Linear only: GPT-2's head, not its Conv1D layers
    int8 = count_model(model)
    assert model.lm_head.weight is not model.transformer.wte.weight  # quantizing the head untied it
    assert int8.matmul_params == fp32.matmul_params and int8.head_params == v * h
    # The fp32 table is now a lookup only; the head reads int8 weights plus per-row scales.
    head_bytes = int8.decode_read_bytes - (fp32.decode_read_bytes - 4 * v * h)
    assert v * h <= head_bytes <= v * h + 16 * v
    assert int8.total_bytes == fp32.total_bytes + head_bytes


def test_prefill_runs_the_head_once_per_row_and_attends_causally() -> None:
    c = ModelCounts(
        total_bytes=0,
        decode_read_bytes=0,
        matmul_params=1000,
        head_params=300,
        kv_elements_per_token=0,
        attention_width=10,
    )
    p, rows = 8, 3
    scores_and_values = sum(4 * 10 * i for i in range(1, p + 1))  # query i sees i keys
    assert prefill_flops(c, p, rows) == rows * (2 * 700 * p + 2 * 300 + scores_and_values)
    # A head-heavy GPT-2 (its vocab table outweighs its layers): the Llama-shaped count, every matmul weight
    # for every prompt token, said over 10x the work the prefill does.
    model = _gpt2(vocab=50257)
    g = count_model(model)
    assert 2 * g.matmul_params * 64 > 10 * prefill_flops(g, 64, 1)


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


#: A model's counts without a head or attention share: the prefill is 2 x matmul weights per prompt token.
COUNTS = ModelCounts(
    total_bytes=10_000_000,
    decode_read_bytes=9_000_000,
    matmul_params=4_000_000,
    head_params=0,
    kv_elements_per_token=2 * 2 * 2 * 16,  # 2 layers x 2 kv heads x head dim 16, K and V
    attention_width=0,
)


def test_fractions_follow_bytes_over_bandwidth_and_flops_over_rate() -> None:
    assert COUNTS.kv_bytes_per_token(2) == 2 * 2 * 2 * 16 * 2
    counts = ModelCounts(**{**COUNTS.__dict__, "head_params": 1_000_000, "attention_width": 128})
    ceilings = Ceilings(memory_gb_s=100.0, matmul_tflops=1.0, matmul_dtype="float32", matmul_n=0, copy_bytes=0)

    def at(tpot_ms: float) -> dict[str, float]:
        m = _measurement(tpot_p50=tpot_ms, prefill_p50=10.0, rows=4)
        return roofline(m, ceilings, counts=counts, kv_element_size=2, prompt_tokens=100, output_tokens=20)

    r = at(1.0)
    step_bytes = 9_000_000 + 256 * 110 * 4
    assert r["decode_bytes_per_step"] == step_bytes
    assert r["decode_bound_ms"] == pytest.approx(step_bytes / 100e9 * 1e3)
    assert r["decode_fraction"] == pytest.approx(r["decode_bound_ms"] / 1.0)
    flops = 4 * (2 * 3_000_000 * 100 + 2 * 1_000_000 + 2 * 128 * 100 * 101)  # body per token, head once, attention
    assert r["prefill_flops"] == pytest.approx(flops) == prefill_flops(counts, 100, 4)
    assert r["prefill_fraction"] == pytest.approx(flops / (0.010 * 1e12))
    slow = at(4.0)
    assert slow["decode_fraction"] == pytest.approx(r["decode_fraction"] / 4)


def test_fractions_are_nan_without_timings() -> None:
    m = _measurement(tpot_p50=0.0, prefill_p50=0.0, rows=1)
    r = roofline(
        m, Ceilings(1.0, 1.0, "float32", 0, 0), counts=COUNTS, kv_element_size=4, prompt_tokens=1, output_tokens=1
    )
    assert math.isnan(r["decode_fraction"]) and math.isnan(r["prefill_fraction"])


def test_prefill_fraction_only_against_a_ceiling_of_the_same_dtype() -> None:
    m = _measurement(tpot_p50=1.0, prefill_p50=10.0, rows=4)

    def run(trial_dtype: str, ceiling_dtype: str) -> dict[str, float]:
        ceilings = Ceilings(100.0, 1.0, ceiling_dtype, 0, 0)
        kw: dict[str, Any] = {"counts": COUNTS, "kv_element_size": 2, "prompt_tokens": 100, "output_tokens": 20}
        return roofline(m, ceilings, matmul_dtype=trial_dtype, **kw)

    same = run("float32", "float32")
    assert same["prefill_tflops"] == pytest.approx(2 * 4_000_000 * 100 * 4 / 0.010 / 1e12)
    assert same["prefill_fraction"] == pytest.approx(same["prefill_tflops"] / 1.0)
    assert run("float16", "bfloat16")["prefill_fraction"] == same["prefill_fraction"]  # same tensor-core rate
    int8 = run(compute_dtype("fp32", "int8-dynamic"), "float32")  # fbgemm int8 outruns the fp32 ceiling
    assert math.isnan(int8["prefill_fraction"]) and int8["prefill_tflops"] == same["prefill_tflops"]
    assert compute_dtype("bf16", "fp8") == "float8" and compute_dtype("tf32", "none") == "tf32"


@pytest.fixture(scope="module")
def cpu_with_ceilings() -> Any:
    """This CPU with its ceilings measured as a study's preflight measures them."""
    from autotune.hardware import probe

    c = measure_ceilings("cpu")
    return probe("cpu").model_copy(
        update={"memory_gb_s": c.memory_gb_s, "matmul_tflops": c.matmul_tflops, "matmul_dtype": c.matmul_dtype}
    )


@pytest.mark.parametrize(
    ("build", "vocab"),
    [(_gpt2, 50257), (_opt, VOCAB), (_qwen2, VOCAB)],  # GPT-2 at its real vocab: a head-heavy tiny checkpoint
    ids=["gpt2", "opt", "qwen2"],
)
def test_a_trial_on_a_local_checkpoint_stays_under_its_roofline(
    build: Any, vocab: int, tmp_path: Path, cpu_with_ceilings: Any
) -> None:
    """A real decode and prefill, measured by a trial process on a local checkpoint, reach at most 100%."""
    import torch

    from autotune.config import TrialConfig
    from autotune.runner import run_trial
    from autotune.spec import parse_spec

    torch.manual_seed(0)
    build(vocab).save_pretrained(tmp_path / "ckpt")
    build_tokenizer(vocab).save_pretrained(tmp_path / "ckpt")
    spec = parse_spec(
        {
            "name": "local",
            "model": str(tmp_path / "ckpt"),
            "device": "cpu",
            "workload": {"requests": 8, "prompt_tokens": 64, "output_tokens": 8, "max_duration_s": 1.0},
            "slo": {"e2e_ms": {"p95": 60_000}},
            "quality": {"enabled": False},
            "budget": {"trials": 1, "trial_timeout_s": 120},
        }
    )
    m = run_trial(spec, TrialConfig(batch_size=4, max_queue_delay_ms=5), cpu_with_ceilings)
    r = m.roofline
    assert 0 < r["decode_fraction"] <= 1 and 0 < r["prefill_fraction"] <= 1, r
    # The trial counted the checkpoint's own modules: the same counts as here, in the same formulas.
    model, _, _ = load_model(str(tmp_path / "ckpt"))
    c = count_model(model)
    rows = max(m.mean_batch_rows, 1.0)
    context = m.mean_prompt_tokens + m.output_tokens / m.requests / 2
    assert r["decode_bytes_per_step"] == pytest.approx(c.decode_read_bytes + c.kv_bytes_per_token(4) * context * rows)
    assert r["prefill_flops"] == pytest.approx(prefill_flops(c, m.mean_prompt_tokens, rows))
