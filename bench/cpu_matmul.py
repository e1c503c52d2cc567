"""What the CPU's math units give each precision: GFLOP/s of one Linear layer of the benchmark model.

Explains the landscape the tuner finds (why int8-dynamic wins and bf16 loses on a CPU without
native bf16), and gives the copy bandwidth that bounds batch-1 decoding.

    python bench/cpu_matmul.py [--rows 1024] [--repeats 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import header, machine, save


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1024, help="tokens in flight (batch x positions)")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()

    import torch

    info = machine()
    header("CPU math: one llama-small MLP Linear (512 -> 1376), per precision", info)
    torch.manual_seed(0)
    fp32 = torch.nn.Linear(512, 1376, bias=False).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        int8 = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(fp32), {torch.nn.Linear}, dtype=torch.qint8)
    bf16 = torch.nn.Linear(512, 1376, bias=False).eval().to(torch.bfloat16)
    x = torch.randn(args.rows, 512)
    cases = {"fp32": (fp32, x), "bf16": (bf16, x.to(torch.bfloat16)), "int8-dynamic": (int8, x)}
    flops = 2 * args.rows * 512 * 1376
    rates: dict[str, float] = {}
    with torch.inference_mode():
        for _ in range(2):  # two interleaved passes; keep the better of each
            for name, (layer, inp) in cases.items():
                for _ in range(3):
                    layer(inp)
                t = time.perf_counter()
                for _ in range(args.repeats):
                    layer(inp)
                rate = flops * args.repeats / (time.perf_counter() - t) / 1e9
                rates[name] = max(rates.get(name, 0.0), rate)
        buf = torch.empty(64 * 2**20 // 4)
        dst = torch.empty_like(buf)
        dst.copy_(buf)
        t = time.perf_counter()
        for _ in range(args.repeats):
            dst.copy_(buf)
        copy_gb_s = 2 * buf.numel() * 4 * args.repeats / (time.perf_counter() - t) / 1e9
    path = save(
        "cpu_matmul",
        {
            "machine": info,
            "args": vars(args),
            "gflops": rates,
            "copy_gb_s": copy_gb_s,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
    )
    print(f"cpu capability: {torch.backends.cpu.get_cpu_capability()}")
    for name, rate in rates.items():
        print(f"{name:14s} {rate:8.1f} GFLOP/s   ({rate / rates['fp32']:.2f}x fp32)")
    print(f"copy bandwidth {copy_gb_s:8.1f} GB/s (read + write, 64 MB buffers); written to {path}")


if __name__ == "__main__":
    main()
