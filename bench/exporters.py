"""The two ONNX exporters of ``autotune.engines.builtin.exported``, side by side: time to export, and the step's speed.

The tuner exports with the TorchScript tracer and falls back to torch.export (``dynamo=True``) when
the traced graph disagrees with PyTorch on a probe. This measures both on one model: each
exporter's wall time for the step graph and the fidelity (logits) graph, whether their step graphs
decode the same tokens as PyTorch eager at several batch sizes and prompt widths, and ONNX Runtime's
time per decode step with each graph (interleaved rounds, the median kept, so a drift of the
machine hits both).

    python bench/exporters.py [--model builtin:tiny-lm] [--batches 1,8,32] [--cached 48] [--rounds 5]
    python bench/exporters.py --architectures qwen2,mistral,gemma,phi3,qwen3,gpt2,olmo2,granite,llama

The second form checks the tracer beyond the shipped Llama: for each transformers architecture, a
two-layer model with random weights (no download) is exported as the tuner exports it, and its step
graph, run by ONNX Runtime through the tuner's decode loop, must give ``generate()``'s greedy tokens
for left-padded prompts; it prints which exporter wrote each graph.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import header, machine, save

EXPORTERS = {"torchscript": True, "dynamo": False}  # name -> export(fast=...)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:tiny-lm")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--cached", type=int, default=48, help="tokens in the cache for the timed steps")
    ap.add_argument("--steps", type=int, default=100, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--architectures", help="comma-separated transformers model types to check instead")
    args = ap.parse_args()
    info = machine()
    if args.architectures:
        header("ONNX export of other architectures", info)
        archs = {"machine": info, "architectures": [_architecture(a) for a in args.architectures.split(",")]}
        print(f"written to {save('exporters-architectures', archs)}")
        return
    header(f"ONNX exporters: {args.model}", info)

    import numpy as np
    import torch

    from autotune.engines.builtin.exported import _cache_shape, _step_module, export, export_logits
    from autotune.models import load_model

    model, _, _ = load_model(args.model)
    threads = torch.get_num_threads()
    folder = Path(tempfile.mkdtemp(prefix="exporters-"))
    doc: dict[str, Any] = {"machine": info, "model": args.model, "threads": threads, "exporters": {}}
    steps: dict[str, Any] = {}
    for name, fast in EXPORTERS.items():
        out = folder / name
        out.mkdir()
        t = time.perf_counter()
        got = export(model, out / "step.onnx", fast=fast)
        step_s = time.perf_counter() - t
        t = time.perf_counter()
        got_logits = export_logits(model, out / "logits.onnx", fast=fast)
        logits_s = time.perf_counter() - t
        assert got == got_logits == name, f"asked for {name}, got {got} / {got_logits}"
        size = sum(f.stat().st_size for f in out.iterdir() if f.name.startswith("step.onnx"))
        doc["exporters"][name] = {"step_export_s": step_s, "logits_export_s": logits_s, "step_bytes": size}
        print(f"{name:12} step graph {step_s:6.1f} s, logits graph {logits_s:6.1f} s, {size / 1e6:.1f} MB")
        steps[name] = _Step(out / "step.onnx", model, threads)

    # Same tokens as PyTorch eager, through the tuner's own decode loop, at several shapes.
    gen = torch.Generator().manual_seed(0)
    eager = _step_module(model)
    agree = {}
    for rows, width in [(1, 5), (3, 9), (8, 32), (32, 32)]:
        ids = torch.randint(5, model.config.vocab_size, (rows, width), generator=gen)
        mask = torch.ones(rows, width, dtype=torch.long)
        mask[0, : width // 3] = 0  # one left-padded row
        tokens = {n: _decode(s, ids, mask, 16) for n, s in steps.items()}
        agree[f"{rows}x{width}"] = len({t.tobytes() for t in tokens.values()}) == 1
    doc["same_tokens"] = agree
    print(f"same tokens from both graphs: {agree}")

    # ONNX Runtime's decode step with each graph, interleaved.
    timed: dict[str, dict[str, float]] = {n: {} for n in steps}
    for b in (int(x) for x in args.batches.split(",")):
        feed = {"input_ids": torch.randint(5, 100, (b, 1), generator=gen).numpy()}
        feed["position_ids"] = np.full((b, 1), args.cached, dtype=np.int64)
        feed["mask"] = np.zeros((b, 1, 1, args.cached + 1), dtype=np.float32)
        shape = _cache_shape(model, b, args.cached)
        for i in range(2 * model.config.num_hidden_layers):
            feed[f"cache.{i}"] = torch.randn(shape, generator=gen).numpy()
        with torch.inference_mode():
            want = eager(*(torch.from_numpy(v) for v in feed.values()))[0].numpy()
        rounds: dict[str, list[float]] = {n: [] for n in steps}
        for _ in range(args.rounds):
            for n, s in steps.items():
                assert np.array_equal(s.session.run(feed)[0], want), f"{n} disagrees with PyTorch at batch {b}"
                rounds[n].append(_per_step_ms(s.session, feed, args.steps))
        for n in steps:
            timed[n][str(b)] = statistics.median(rounds[n])
        print(f"batch {b:3}: " + ", ".join(f"{n} {timed[n][str(b)]:.3f} ms a step" for n in steps))
    doc["step_ms"] = timed
    doc["cached"], doc["rounds"], doc["steps"] = args.cached, args.rounds, args.steps
    print(f"written to {save('exporters', doc)}")


class _Step:
    """An exported step graph on ONNX Runtime, as :class:`GraphDecoder` reads it."""

    def __init__(self, path: Path, model: Any, threads: int) -> None:
        import torch

        from autotune.engines.builtin.exported import RUNTIMES, _cache_shape

        self.session = RUNTIMES["onnxruntime"](path, threads)
        _, self.heads, _, self.head_dim = _cache_shape(model, 1, 1)
        self.layers = model.config.num_hidden_layers
        self.dtype_min = torch.finfo().min


def _decode(step: _Step, ids: Any, mask: Any, new_tokens: int) -> Any:
    from autotune.engines.builtin.exported import GraphDecoder

    decoder = GraphDecoder(step, step.session)  # type: ignore[arg-type]
    decoder.prefill(ids, mask)
    return decoder.decode(new_tokens).numpy()


def _architecture(model_type: str) -> dict[str, Any]:
    """Export a small random model of ``model_type``; its graph's greedy tokens against ``generate()``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from autotune.engines.builtin.exported import export

    sizes: dict[str, Any] = {"vocab_size": 256, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if model_type == "gpt2":
        sizes |= {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256}
    else:
        sizes |= {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
        sizes |= {"num_key_value_heads": 2, "max_position_embeddings": 256}
    row: dict[str, Any] = {"model_type": model_type}
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **sizes)).eval()
        with tempfile.TemporaryDirectory(prefix=f"exporters-{model_type}-") as tmp:
            t = time.perf_counter()
            row["exporter"] = export(model, Path(tmp) / "step.onnx")
            row["export_s"] = time.perf_counter() - t
            ids = torch.randint(5, 250, (3, 9), generator=torch.Generator().manual_seed(0))
            mask = torch.ones(3, 9, dtype=torch.long)
            mask[0, :3] = 0  # one left-padded row
            with torch.inference_mode():
                want = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=8,
                    min_new_tokens=8,
                    do_sample=False,
                    pad_token_id=0,
                )[:, 9:]
            got = _decode(_Step(Path(tmp) / "step.onnx", model, torch.get_num_threads()), ids, mask, 8)
            row["same_tokens_as_generate"] = bool((got == want.numpy()).all())
    except Exception as err:  # one architecture's failure is a row, not the end of the check
        row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
    print(row, flush=True)
    return row


def _per_step_ms(session: Any, feed: dict[str, Any], steps: int) -> float:
    for _ in range(5):
        session.run(feed)
    t = time.perf_counter()
    for _ in range(steps):
        session.run(feed)
    return (time.perf_counter() - t) / steps * 1000


if __name__ == "__main__":
    main()
