"""One decode step of the shipped model: PyTorch eager against the exported graph on each runtime.

The same step function (``autotune.engines.builtin.exported``: token ids, positions, mask and key/value cache in;
next ids and the grown cache out) is timed in PyTorch and, exported once (disk cache), in ONNX
Runtime and OpenVINO, at one batch size and cached length, on this machine's cores.

    python bench/exported_step.py [--batch 8] [--cached 70] [--steps 200]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import header, machine, save


def per_step_ms(fn: Any, steps: int) -> float:
    for _ in range(10):
        fn()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t) / steps * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin:tiny-lm")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cached", type=int, default=70, help="tokens already in the cache")
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args()
    info = machine()
    header(f"exported decode step: {args.model}, batch {args.batch}, {args.cached} cached tokens", info)

    import numpy as np
    import torch

    from autotune.engines.builtin.exported import RUNTIMES, ExportedStep, _cache_shape, _step_module, missing_packages
    from autotune.models import load_model

    model, _, _ = load_model(args.model)
    b, p = args.batch, args.cached
    threads = torch.get_num_threads()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.config.vocab_size, (b, 1), generator=gen)
    positions = torch.full((b, 1), p)
    mask = torch.zeros(b, 1, 1, p + 1)
    cache = [torch.randn(_cache_shape(model, b, p), generator=gen) for _ in range(2 * model.config.num_hidden_layers)]
    step = _step_module(model)
    with torch.inference_mode():
        want = step(ids, positions, mask, *cache)[0].numpy()
        rows = {"pytorch eager": per_step_ms(lambda: step(ids, positions, mask, *cache), args.steps)}
    feed = {"input_ids": ids.numpy(), "position_ids": positions.numpy(), "mask": mask.numpy()}
    feed.update({f"cache.{i}": c.numpy() for i, c in enumerate(cache)})
    for runtime in RUNTIMES:
        if missing_packages(runtime):
            print(f"{runtime}: not installed ({', '.join(missing_packages(runtime))})")
            continue
        exported = ExportedStep.load(model, "sdpa", runtime)
        session = exported.session(0, threads)
        assert np.array_equal(session.run(feed)[0], want), f"{runtime} disagrees with PyTorch"
        rows[runtime] = per_step_ms(lambda s=session: s.run(feed), args.steps)
    for name, ms in rows.items():
        print(f"{name:16} {ms:7.2f} ms a step")
    doc = {"machine": info, "model": args.model, "batch": b, "cached": p, "threads": threads, "step_ms": rows}
    print(f"written to {save('exported-step', doc)}")


if __name__ == "__main__":
    main()
