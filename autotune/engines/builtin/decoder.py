"""Greedy decoding with a static KV cache in autotune's own loop: the ``cuda-graphs`` backend.

``generate()`` spends several milliseconds of Python per new token (logits processors,
stopping criteria, cache bookkeeping) whatever the batch; on an H200 that host time, not the
GPU, set the step time of every eager and compiled trial (bench/FIGURES.md, GPU check run 2). Here the
whole decode step -- the forward pass, the argmax, and the bookkeeping for the next step
(token, position, cache slot, mask column, output column) -- is device work on tensors at
fixed addresses, so on CUDA it is captured once as a CUDA graph and each new token costs one
``graph.replay()``: no compiler, no per-token host work, no per-token sync.

The H200 check then showed the graph of eager kernels bound by its kernel count (~45 small
kernels per layer, ~4.9 ms a step at batch 32, 11% of the bandwidth bound). ``compile=True``
(the ``inductor-cudagraphs`` backend) runs the same step through ``torch.compile`` first, so the
graph holds Inductor's fused kernels instead, at the price of a compile per process.

The prompt (prefill) runs eagerly. On a CPU the same loop runs without the graph, which is how
the tests check it against ``generate()`` token for token.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from typing import Any

#: One capture (or compile) at a time per process: stream workers build their decoders concurrently.
#: Re-entrant: a compiled decoder without a graph holds it for all its work (see ``_serial``).
_CAPTURE_LOCK = threading.RLock()


def _allow_recompiles(limit: int = 64) -> None:
    """Every decoder's step shares one code object, so Dynamo counts each new batch shape as a
    recompile of it and, past its limit (8), silently runs the step uncompiled. A trial process
    that serves many batch sizes (a reused engine) must not hit that."""
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if getattr(dynamo_config, name, limit) < limit:
            setattr(dynamo_config, name, limit)


def _cache_kwarg(model: Any) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); accept both."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def prompt_attention(keep: Any) -> tuple[Any, Any]:
    """For left-padded prompts (``keep``: rows x width, True on real tokens): which prompt keys each
    query sees (rows x width x width, causal over real tokens) and each token's position. Real
    tokens are numbered from 0, as generate() numbers left-padded prompts; a padding query still
    sees itself, so its (unused) keys stay finite and never NaN. Shared by every own decode loop."""
    import torch

    width = keep.shape[1]
    positions = (keep.long().cumsum(-1) - 1).clamp(min=0)
    causal = torch.ones(width, width, dtype=torch.bool, device=keep.device).tril()
    eye = torch.eye(width, dtype=torch.bool, device=keep.device)
    return (causal & keep[:, None, :]) | eye, positions


class StaticDecoder:
    """Greedy generation for ``rows`` prompts of ``width`` tokens (left-padded), up to
    ``max_new_tokens`` new tokens each, on one static KV cache sized ``width + max_new_tokens``.

    Not thread-safe: each stream worker owns one.
    """

    def __init__(
        self, model: Any, rows: int, width: int, max_new_tokens: int, *, use_graph: bool, compile: bool = False
    ) -> None:
        import torch
        from transformers import StaticCache

        self.model = model
        self.rows, self.width, self.max_new_tokens = rows, width, max_new_tokens
        self.length = width + max_new_tokens
        device = next(model.parameters()).device
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        self.device, self.dtype = device, dtype
        self.cache = StaticCache(config=model.config, max_cache_len=self.length)
        self._cache_kw = _cache_kwarg(model)
        self._min = torch.finfo(dtype).min
        # Like generate(min_new_tokens=n): end-of-sequence tokens cannot win, every row runs to n.
        eos = getattr(model.generation_config, "eos_token_id", None)
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        self._eos = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
        # The step's state, at fixed addresses (the graph reads and advances it in place).
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.column = torch.zeros(1, dtype=torch.long, device=device)  # cache slot of this step
        self.step_index = torch.zeros(1, dtype=torch.long, device=device)  # output column of this step
        self.mask = torch.zeros(rows, 1, 1, self.length, dtype=dtype, device=device)
        self.out = torch.zeros(rows, max_new_tokens, dtype=torch.long, device=device)
        self.graph: Any = None
        self.compiled = compile
        # A compiled step without a graph (only a CPU runs one; in tests, as the backend needs CUDA)
        # runs Dynamo on every call, over a code object all decoders share, and Dynamo is not built
        # for one thread compiling while another runs: every stream worker's build, prefill and
        # decode of such a decoder is serialised (``python bench/decoder_race.py``: 67 of 97
        # two-stream builds failed in Dynamo without it, 0 of 160 with it; one CI run failed too).
        self._serial = _CAPTURE_LOCK if compile and not use_graph else contextlib.nullcontext()
        with self._serial:
            # dynamic=False: one shape per decoder; the graph (or the next call) replays what Inductor built.
            self._run_step = torch.compile(self._step, dynamic=False, fullgraph=False) if compile else self._step
            if compile:
                _allow_recompiles()
            # The first forward pass allocates the cache (transformers initialises it lazily).
            self.prefill(torch.zeros(rows, width, dtype=torch.long), torch.ones(rows, width, dtype=torch.long))
            if use_graph:
                with torch.inference_mode():
                    self._capture()
            elif compile:  # compile now, under ``_serial`` (the lock): one thread at a time
                with torch.inference_mode():
                    self._run_step()

    def _next_tokens(self, ids: Any, mask: Any, positions: Any) -> Any:
        kwargs = {self._cache_kw: self.cache}
        logits = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **kwargs
        ).logits[:, -1, :]
        if self._eos is not None:
            logits = logits.index_fill(1, self._eos, float("-inf"))
        return logits.argmax(-1)

    def _step(self) -> None:
        """One new token for every row; only in-place device ops, so it can be captured."""
        self.mask.index_fill_(3, self.column, 0.0)  # this step's own key becomes visible
        nxt = self._next_tokens(self.tokens, self.mask, self.positions)
        self.out.index_copy_(1, self.step_index, nxt.unsqueeze(1))
        self.tokens.copy_(nxt.unsqueeze(1))
        self.positions.add_(1)
        self.column.add_(1)
        self.step_index.add_(1)

    def _capture(self) -> None:
        import torch

        with _CAPTURE_LOCK:
            side = torch.cuda.Stream(device=self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            # Warm-up off the capture: cuBLAS handles, workspaces and, when compiling, the compile
            # itself (a third call proves no recompile is left to happen inside the capture).
            with torch.cuda.stream(side):
                for _ in range(3 if self.compiled else 2):
                    self._run_step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self._run_step()
            torch.cuda.current_stream(self.device).synchronize()

    def prefill(self, ids: Any, attention_mask: Any) -> Any:
        """Reset the cache, run the prompts, set the step state; returns the first new tokens."""
        with self._serial:
            return self._prefill(ids, attention_mask)

    def _prefill(self, ids: Any, attention_mask: Any) -> Any:
        import torch

        rows, width = ids.shape
        if (rows, width) != (self.rows, self.width):
            raise ValueError(f"decoder built for {self.rows}x{self.width} prompts, got {rows}x{width}")
        keep = attention_mask.to(self.device).bool()
        allowed, positions = prompt_attention(keep)
        full = torch.zeros(rows, width, self.length, dtype=torch.bool, device=self.device)
        full[:, :, :width] = allowed
        mask = torch.zeros(rows, 1, width, self.length, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~full[:, None], self._min)
        with torch.inference_mode():
            self.cache.reset()
            first = self._next_tokens(ids.to(self.device), mask, positions)
            # The decode step's state: prompt keys visible where real, generated slots hidden until written.
            self.mask.fill_(self._min)
            self.mask[:, 0, 0, :width].masked_fill_(keep, 0.0)
            self.tokens.copy_(first.unsqueeze(1))
            self.positions.copy_(keep.sum(-1, keepdim=True))
            self.column.fill_(width)
            self.step_index.fill_(1)
            self.out[:, 0] = first
        return first

    def decode(self, new_tokens: int) -> Any:
        """The remaining ``new_tokens - 1`` tokens after :meth:`prefill`; returns rows x new_tokens ids."""
        if not 1 <= new_tokens <= self.max_new_tokens:
            raise ValueError(f"decoder holds {self.max_new_tokens} new tokens, asked for {new_tokens}")
        import torch

        with self._serial, torch.inference_mode():
            for _ in range(new_tokens - 1):
                if self.graph is not None:
                    self.graph.replay()
                else:
                    self._run_step()
        return self.out[:, :new_tokens]
