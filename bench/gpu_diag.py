"""Why is a decode step slow on the GPU? Time of ``generate`` per new token on the 1.1B preset, by variant.

    python bench/gpu_diag.py [--out DIR]

The first GPU check (bench/results/gpu_check-20261127T101053Z.json) found bf16 three times
slower than fp32 at every batch size. Suspect: on Hopper, PyTorch's SDPA prefers cuDNN's
attention kernel, which builds a cuDNN graph per new shape, and the key length grows every
decode step. So, per new token (128-token prompts, 64 new tokens, prefill included), each run
listed (the first run of a shape pays any graph builds, the second shows what a cache keeps):
fp32 with SDPA; bf16 with each attention knob value (``sdpa``, ``sdpa-no-cudnn``, ``eager``);
bf16 through autotune's Engine (harness cost) and with a transformers streamer (a host copy
per step). Then a short profile of bf16 SDPA. The JSON is rewritten after every figure, so a
timeout keeps what was measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NEW = 64
PROMPT = 128


class _Sink:
    """A streamer that drops what it gets: only the per-step host copy generate() makes for it remains."""

    def put(self, value: Any) -> None:
        pass

    def end(self) -> None:
        pass


def per_token_ms(model: Any, rows: int, runs: int = 2, streamer: Any = None) -> list[float]:
    import torch

    ids = torch.randint(10, 30000, (rows, PROMPT), device="cuda")
    mask = torch.ones_like(ids)
    out = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=NEW,
                min_new_tokens=NEW,
                do_sample=False,
                pad_token_id=0,
                streamer=streamer,
            )
        torch.cuda.synchronize()
        out.append(round((time.perf_counter() - t) / NEW * 1000, 3))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    import torch

    from autotune.config import TrialConfig
    from autotune.engines.builtin.engine import Engine
    from autotune.engines.builtin.optimize import ATTENTIONS
    from autotune.hardware import probe

    hw = probe("cuda")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu_diag-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    res: dict[str, Any] = {
        "device": hw.device_name,
        "torch": hw.torch_version,
        "transformers": hw.transformers_version,
        "cudnn": torch.backends.cudnn.version(),
        "what": f"ms per new token of generate(): {PROMPT}-token prompts, {NEW} new tokens, prefill included; "
        "one figure per run (the first run of a shape pays any graph builds)",
        "per_token_ms": {},
    }

    def record(name: str, value: Any) -> None:
        res["per_token_ms"][name] = value
        print(f"{name:<40} {value}", flush=True)
        path.write_text(json.dumps(res, indent=2))

    fp32 = Engine.build("preset:llama-1b", TrialConfig(precision="fp32"), hw, prompt_pad_to=PROMPT)
    for rows in (1, 64):
        record(f"fp32 sdpa rows={rows}", per_token_ms(fp32.model, rows))
    del fp32
    torch.cuda.empty_cache()

    eng = Engine.build("preset:llama-1b", TrialConfig(precision="bf16", batch_size=64), hw, prompt_pad_to=PROMPT)
    model = eng.model
    for attention in ("sdpa", "sdpa-no-cudnn", "eager"):
        ATTENTIONS[attention].apply(model, hw)
        for rows in (1, 64):
            record(f"bf16 {attention} rows={rows}", per_token_ms(model, rows))
    ATTENTIONS["sdpa-no-cudnn"].apply(model, hw)
    record("bf16 sdpa-no-cudnn rows=16 streamer", per_token_ms(model, 16, streamer=_Sink()))
    prompts = [[11 + i] * PROMPT for i in range(64)]
    runs = []
    for _ in range(2):
        t = time.perf_counter()
        eng.run_batch(prompts, NEW)
        runs.append(round((time.perf_counter() - t) / NEW * 1000, 3))
    record("bf16 sdpa-no-cudnn rows=64 Engine.run_batch", runs)

    from torch.profiler import ProfilerActivity, profile

    ATTENTIONS["sdpa"].apply(model, hw)
    ids = torch.randint(10, 30000, (16, PROMPT), device="cuda")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof, torch.inference_mode():
        model.generate(input_ids=ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    for sort in ("self_cpu_time_total", "self_cuda_time_total"):
        table = prof.key_averages().table(sort_by=sort, row_limit=12)
        res[f"profile_bf16_sdpa_rows16_by_{sort.split('_')[1]}"] = table
        print(table, flush=True)
    path.write_text(json.dumps(res, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
