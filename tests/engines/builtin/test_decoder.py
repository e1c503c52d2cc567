"""autotune's own static-cache decode loop (the ``cuda-graphs`` backend), checked on CPU against
``generate()``: the CUDA graph replays exactly this step, so its tokens must be generate()'s."""

from __future__ import annotations

import pytest
import torch

from autotune.engines.builtin.decoder import StaticDecoder
from autotune.models import load_model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return load_model("builtin:tiny-lm", device="cpu", seed=0)[0]


def _batch(lengths: list[int], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of the given real lengths (pad id 0), as the engine builds them."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n :] = torch.randint(5, 500, (n,), generator=gen)
        mask[i, width - n :] = 1
    return ids, mask


def _generate(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, new: int) -> torch.Tensor:
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
        )
    return out[:, ids.shape[1] :]


def test_tokens_match_generate_on_a_left_padded_batch(model: torch.nn.Module) -> None:
    ids, mask = _batch([12, 7, 3, 1], 12)
    want = _generate(model, ids, mask, 10)
    decoder = StaticDecoder(model, 4, 12, 10, use_graph=False)
    decoder.prefill(ids, mask)
    assert torch.equal(decoder.decode(10), want)


def test_end_of_sequence_cannot_stop_a_row_early(model: torch.nn.Module) -> None:
    """tiny-lm picks EOS after this prompt; generate(min_new_tokens=n) forbids it, so must the loop."""
    ids = torch.tensor([[102]])
    decoder = StaticDecoder(model, 1, 1, 6, use_graph=False)
    decoder.prefill(ids, torch.ones_like(ids))
    got = decoder.decode(6)
    eos = model.generation_config.eos_token_id
    assert eos not in got.tolist()[0]
    assert torch.equal(got, _generate(model, ids, torch.ones_like(ids), 6))


def test_one_decoder_serves_batch_after_batch(model: torch.nn.Module) -> None:
    decoder = StaticDecoder(model, 2, 8, 8, use_graph=False)
    for lengths, new in (([8, 2], 8), ([3, 5], 4), ([8, 2], 1)):
        ids, mask = _batch(lengths, 8)
        decoder.prefill(ids, mask)
        assert torch.equal(decoder.decode(new), _generate(model, ids, mask, new))


def test_shapes_it_was_not_built_for_are_refused(model: torch.nn.Module) -> None:
    decoder = StaticDecoder(model, 2, 8, 4, use_graph=False)
    with pytest.raises(ValueError, match="built for 2x8"):
        decoder.prefill(*_batch([3, 3, 3], 8))
    decoder.prefill(*_batch([3, 3], 8))
    with pytest.raises(ValueError, match="holds 4 new tokens"):
        decoder.decode(5)


@pytest.mark.parametrize("attention", ["sdpa", "sdpa-packed"])
def test_the_compiled_step_keeps_the_tokens(model: torch.nn.Module, attention: str) -> None:
    """inductor-cudagraphs compiles this step before capturing it; on CPU, compiled without the
    graph, it must trace through transformers' layers (and the packed GQA kernel) and give plain
    SDPA generate()'s tokens, padding and all."""
    from autotune.engines.builtin.optimize import ATTENTIONS
    from autotune.hardware import probe

    tuned = ATTENTIONS[attention].apply(load_model("builtin:tiny-lm", device="cpu", seed=0)[0], probe("cpu"))
    ids, mask = _batch([6, 2], 6)
    want = _generate(model, ids, mask, 5)
    assert torch.equal(_generate(tuned, ids, mask, 5), want)  # generate() with the kernel, too
    decoder = StaticDecoder(tuned, 2, 6, 5, use_graph=False, compile=True)
    # Each batch shape recompiles the one step function: a reused engine must not hit Dynamo's limit of 8.
    assert torch._dynamo.config.recompile_limit >= 64
    decoder.prefill(ids, mask)
    assert torch.equal(decoder.decode(5), want)
    decoder.prefill(ids, mask)  # a second batch reuses the compiled step
    assert torch.equal(decoder.decode(5), want)
