"""Where the built-in engine loses to a plain ``generate`` loop at the same config (issue 27.6).

Each measurement runs in a fresh process (OpenMP defaults unless ``--passive``), interleaved over
``--rounds``, on one batch size and precision:

- ``plain-main``: ``model.generate`` on the main thread, full batches back to back (what a user's loop does);
- ``plain-thread``: the same loop on a second Python thread (the engine runs batches on stream threads);
- ``engine-main``: ``Engine.run_batch`` (the engine's own generate call and first-token clock) on the main thread;
- ``engine-thread``: the same on a second thread;
- ``engine-delay0`` / ``engine-delay20``: the whole harness, ``run_workload`` with a closed loop of
  ``batch`` clients and a 0 / 20 ms batching delay (what a trial measures in-process).

    python bench/engine_vs_generate.py [--model preset:llama-small] [--batch 32] [--precision bf16] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import header, machine, save, spread

MODES = ("plain-main", "plain-thread", "engine-main", "engine-thread", "engine-delay0", "engine-delay20")
NEW_TOKENS = 32
PROMPT_TOKENS = 64
BATCHES = 5


def measure(mode: str, model: str, batch: int, precision: str) -> dict[str, Any]:
    """One measurement, in this (fresh) process: output tokens/s and, for the harness, its mean batch."""
    import torch

    from autotune.config import TrialConfig
    from autotune.engine import Engine
    from autotune.hardware import probe
    from autotune.measure import run_workload
    from autotune.spec import WorkloadSpec
    from autotune.workload import build_requests

    delay = 20.0 if mode == "engine-delay20" else 0.0
    cfg = TrialConfig(batch_size=batch, precision=precision, max_queue_delay_ms=delay)
    engine = Engine.build(model, cfg, probe("cpu"), prompt_pad_to=PROMPT_TOKENS, max_context=PROMPT_TOKENS + NEW_TOKENS)
    spec = WorkloadSpec.model_validate(
        {
            "requests": batch * (BATCHES + 1),
            "prompt_tokens": PROMPT_TOKENS,
            "output_tokens": NEW_TOKENS,
            "max_duration_s": 3600,
            "transport": "in-process",
        }
    )
    reqs = build_requests(spec, engine.info.vocab_size, first_token_id=4)
    chunks = [[r.prompt_ids for r in reqs[i * batch : (i + 1) * batch]] for i in range(BATCHES + 1)]
    out: dict[str, Any] = {}

    def generate(chunk: list[tuple[int, ...]]) -> None:
        ids = torch.tensor(chunk)
        with torch.inference_mode():
            engine.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=engine.pad_id,
            )

    def plain() -> None:
        generate(chunks[0])  # warm-up
        t = time.perf_counter()
        for chunk in chunks[1:]:
            generate(chunk)
        out["tokens_per_s"] = BATCHES * batch * NEW_TOKENS / (time.perf_counter() - t)

    def own() -> None:
        engine.run_batch(chunks[0], NEW_TOKENS)
        t = time.perf_counter()
        for chunk in chunks[1:]:
            engine.run_batch(chunk, NEW_TOKENS)
        out["tokens_per_s"] = BATCHES * batch * NEW_TOKENS / (time.perf_counter() - t)

    if mode.startswith("engine-delay"):
        with engine:
            m = run_workload(engine, spec, vocab_size=engine.info.vocab_size)
        return {"tokens_per_s": m.output_tokens_per_s, "mean_batch_rows": m.mean_batch_rows, **m.breakdown_ms}
    fn = plain if mode.startswith("plain") else own
    if mode.endswith("-thread"):
        worker = threading.Thread(target=fn)
        worker.start()
        worker.join()
    else:
        fn()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="preset:llama-small")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--passive", action="store_true", help="OMP_WAIT_POLICY=PASSIVE, as in trial processes")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one mode in this process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.model, args.batch, args.precision)))
        return

    info = machine()
    header(f"engine vs plain generate: {args.model} b{args.batch} {args.precision}, fresh process each", info)
    env = {**os.environ}
    env.pop("OMP_WAIT_POLICY", None)
    if args.passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for r in range(args.rounds):
        for mode in MODES:  # interleaved: every mode once per round
            cmd = [sys.executable, __file__, "--one", mode, "--model", args.model, "--batch", str(args.batch)]
            done = subprocess.run(
                [*cmd, "--precision", args.precision], capture_output=True, text=True, env=env, check=True
            )
            row = json.loads(done.stdout.strip().splitlines()[-1])
            runs[mode].append(row)
            print(f"round {r} {mode:15s} {row['tokens_per_s']:8.1f} tok/s", flush=True)
    base = statistics.median(x["tokens_per_s"] for x in runs["plain-main"])
    summary = {
        m: {**spread([x["tokens_per_s"] for x in rows]), "ratio_to_plain_main": None} for m, rows in runs.items()
    }
    for m in MODES:
        summary[m]["ratio_to_plain_main"] = summary[m]["median"] / base
    path = save("engine_vs_generate", {"machine": info, "args": vars(args), "runs": runs, "summary": summary})
    print()
    for m in MODES:
        print(f"{m:15s} median {summary[m]['median']:8.1f} tok/s = {summary[m]['ratio_to_plain_main']:.2f}x plain-main")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
