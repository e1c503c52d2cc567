"""Decode step time of autotune's own loop (autotune/engines/builtin/decoder.py), by batch, attention kernel and
whether the step is compiled, against the bandwidth bound: where the ~40 µs per row of H200 run 3
goes. No serving, no batcher: prefill once, then time ``decode`` with CUDA events.

    python bench/gpu_decode.py [--out DIR] [--budget-s 150] [--batches 32,256]   # on a GPU
    python bench/gpu_decode.py --smoke                                           # tiny, on a CPU

One JSON file; a line per combination: ms per step, fraction of the bound (weights + the KV cache
each step reads), and the build (capture or compile) time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--budget-s", type=float, default=150.0)
    ap.add_argument("--batches", default="32,256")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()

    import torch

    from autotune.engines.builtin.decoder import StaticDecoder
    from autotune.engines.builtin.optimize import ATTENTIONS, PRECISIONS
    from autotune.hardware import probe
    from autotune.models import load_model
    from autotune.roofline import measure_ceilings, weight_bytes

    cuda = torch.cuda.is_available() and not args.smoke
    hw = probe("cuda" if cuda else "cpu")
    ref, prompt, new = ("preset:llama-1b", 128, 64) if cuda else ("preset:llama-tiny", 16, 8)
    batches = [int(b) for b in args.batches.split(",")] if cuda else [2]
    attentions = ["sdpa-no-cudnn", "sdpa-packed"] if cuda else ["sdpa", "sdpa-packed"]
    ceilings = measure_ceilings(hw.device) if cuda else None
    t_end = time.monotonic() + args.budget_s
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    doc: dict[str, Any] = {"recorded_at": stamp, "device": hw.summary(), "model": ref, "rows": [], "errors": []}
    if ceilings is not None:
        doc["memory_gb_s"] = ceilings.memory_gb_s
    out = Path(args.out) / f"gpu_decode{'-smoke' if args.smoke else ''}-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for compiled in (False, True):
        for attention in attentions:
            for rows in batches:
                if time.monotonic() > t_end - (45 if compiled else 10):
                    doc["errors"].append(f"skipped compiled={compiled} {attention} b{rows}: out of budget")
                    continue
                try:
                    model, _, info = load_model(ref, device=hw.device, seed=0)
                    model = PRECISIONS["bf16" if cuda else "fp32"].apply(model, hw)
                    model = ATTENTIONS[attention].apply(model, hw)
                    t = time.perf_counter()
                    dec = StaticDecoder(model, rows, prompt, new, use_graph=cuda, compile=compiled)
                    build_s = time.perf_counter() - t
                    ids = torch.randint(4, info.vocab_size, (rows, prompt))
                    mask = torch.ones_like(ids)
                    steps = []
                    for _ in range(3):
                        dec.prefill(ids, mask)
                        if cuda:
                            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                            a.record()
                            dec.decode(new)
                            b.record()
                            b.synchronize()
                            steps.append(a.elapsed_time(b) / (new - 1))
                        else:
                            t = time.perf_counter()
                            dec.decode(new)
                            steps.append(1000 * (time.perf_counter() - t) / (new - 1))
                    step = sorted(steps)[1]
                    kv = rows * (prompt + new) * info.num_layers * 2 * info.num_kv_heads * info.head_dim * 2
                    bound = None
                    if ceilings is not None:  # the same bound a trial's roofline uses
                        bound = 1000 * (weight_bytes(model)["decode_read"] + kv) / (ceilings.memory_gb_s * 1e9)
                    row = {
                        "compiled": compiled,
                        "attention": attention,
                        "rows": rows,
                        "step_ms": step,
                        "bound_ms": bound,
                        "fraction": bound / step if bound else None,
                        "build_s": build_s,
                    }
                    doc["rows"].append(row)
                    frac = f"{row['fraction']:.1%}" if row["fraction"] else "n/a"
                    label = f"compiled={compiled!s:<5} {attention:<13} b{rows:<4}"
                    print(f"{label} {step:7.3f} ms/step ({frac} of bound), build {build_s:.1f} s", flush=True)
                except Exception as err:  # a failed combination is a finding; the rest still run
                    doc["errors"].append(f"compiled={compiled} {attention} b{rows}: {type(err).__name__}: {err}"[:600])
                    print(doc["errors"][-1], flush=True)
                finally:
                    out.write_text(json.dumps(doc, indent=2) + "\n")
                    if cuda:
                        torch.cuda.empty_cache()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
