"""Why is a decode step slow on the GPU? Per-step time of ``generate`` on the 1.1B preset, by variant.

    python bench/gpu_diag.py [--out DIR]

Variants, for fp32 and bf16 at 1, 16 and 64 rows (128-token prompts, 64 new tokens):
``plain`` (no streamer), ``streamer`` (a transformers streamer: a host copy every step, as the
engine used before), ``engine`` (autotune's Engine.run_batch), and for bf16 ``no-cudnn-sdpa``
(cuDNN attention disabled). Best of two runs each, then a profile of the slowest bf16 variant.
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


class _Sink:
    def put(self, value: Any) -> None:
        pass

    def end(self) -> None:
        pass


def step_ms(model: Any, rows: int, streamer: Any = None) -> float:
    import torch

    ids = torch.randint(10, 30000, (rows, 128), device="cuda")
    mask = torch.ones_like(ids)
    best = float("inf")
    for _ in range(2):
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
        best = min(best, (time.perf_counter() - t) / NEW * 1000)
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    import torch

    from autotune.config import TrialConfig
    from autotune.engine import Engine
    from autotune.hardware import probe

    hw = probe("cuda")
    rows_list = [1, 16, 64]
    res: dict[str, Any] = {"device": hw.device_name, "torch": hw.torch_version, "step_ms": {}}
    for prec in ("fp32", "bf16"):
        eng = Engine.build("preset:llama-1b", TrialConfig(precision=prec, batch_size=64), hw, prompt_pad_to=128)
        model = eng.model
        for rows in rows_list:
            r = {
                "plain": step_ms(model, rows),
                "streamer": step_ms(model, rows, _Sink()),
            }
            prompts = [[11 + i] * 128 for i in range(rows)]
            eng.run_batch(prompts, NEW)
            t = time.perf_counter()
            eng.run_batch(prompts, NEW)
            r["engine"] = (time.perf_counter() - t) / NEW * 1000
            if prec == "bf16":
                torch.backends.cuda.enable_cudnn_sdp(False)
                r["no-cudnn-sdpa"] = step_ms(model, rows)
                torch.backends.cuda.enable_cudnn_sdp(True)
            res["step_ms"][f"{prec} rows={rows}"] = r
            print(prec, rows, {k: round(v, 2) for k, v in r.items()}, flush=True)
        if prec == "bf16":
            from torch.profiler import ProfilerActivity, profile

            ids = torch.randint(10, 30000, (16, 128), device="cuda")
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof, torch.inference_mode():
                model.generate(input_ids=ids, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
            res["profile_bf16_rows16_by_cpu"] = table
            print(table)
            table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=10)
            res["profile_bf16_rows16_by_cuda"] = table
            print(table)
        del eng, model
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu_diag-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(res, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
