"""Does the measurement harness distort what it measures?

Compares, in one process and interleaved (bare, engine, bare, engine, ...), the end-to-end
latency of batch 1 / one stream / one client through autotune's Engine + closed-loop harness
against a bare ``perf_counter`` loop around the same ``model.generate`` call on the same model.
Target: the harness's median e2e within 5% of the bare loop's.

    python bench/harness_overhead.py [--model preset:llama-small] [--rounds 3] [--requests 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in every trial process (see autotune/runner.py)
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import header, machine, save, spread


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="preset:llama-small")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=8, help="requests per round and side")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=32)
    args = ap.parse_args()

    import torch

    from autotune.config import TrialConfig
    from autotune.engine import Engine
    from autotune.hardware import probe
    from autotune.measure import run_workload
    from autotune.spec import WorkloadSpec
    from autotune.workload import build_requests

    info = machine()
    header("harness overhead: Engine + closed loop vs bare generate loop (batch 1, 1 stream, 1 client)", info)
    engine = Engine.build(args.model, TrialConfig(), probe())
    spec = WorkloadSpec.model_validate(
        {
            "requests": args.requests,
            "prompt_tokens": args.prompt,
            "output_tokens": args.new,
            "max_duration_s": 3600,
            "arrival": {"type": "closed", "clients": 1},
            "warmup_requests": 1,
        }
    )
    prompts = [torch.tensor([r.prompt_ids]) for r in build_requests(spec, engine.info.vocab_size)]

    def bare() -> float:
        times = []
        with torch.inference_mode():
            engine.model.generate(
                prompts[0],
                attention_mask=torch.ones_like(prompts[0]),
                max_new_tokens=args.new,
                min_new_tokens=args.new,
                do_sample=False,
                pad_token_id=engine.pad_id,
            )  # warm
            for ids in prompts:
                t = time.perf_counter()
                engine.model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=args.new,
                    min_new_tokens=args.new,
                    do_sample=False,
                    pad_token_id=engine.pad_id,
                )
                times.append((time.perf_counter() - t) * 1000)
        return statistics.median(times)

    def harness() -> float:
        with engine:
            m = run_workload(engine, spec, vocab_size=engine.info.vocab_size)
        return m.e2e_ms["p50"]

    rows = []
    for r in range(args.rounds):
        b, h = bare(), harness()
        rows.append({"round": r, "bare_ms": b, "harness_ms": h, "ratio": h / b})
        print(f"round {r}: bare {b:8.1f} ms   harness {h:8.1f} ms   harness/bare {h / b:.3f}", flush=True)
    ratios = [x["ratio"] for x in rows]
    summary = spread(ratios)
    path = save("harness_overhead", {"machine": info, "args": vars(args), "rounds": rows, "ratio": summary})
    print(
        f"\nmedian e2e ratio harness/bare: {summary['median']:.3f} "
        f"(min {summary['min']:.3f}, max {summary['max']:.3f}); target within 5% of bare -> "
        f"{'MET' if abs(summary['median'] - 1) <= 0.05 else 'NOT MET'}; written to {path}"
    )


if __name__ == "__main__":
    main()
