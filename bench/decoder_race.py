"""Two stream workers compiling their static decoders at once: how often a build fails.

Each round resets Dynamo, then builds a two-stream engine on the ``inductor-cudagraphs`` backend
(on a CPU: the compiled step without a graph) and generates five prompts, so both workers compile
their decoder's step at the same time. Prints the rounds and the failures (the reason for each).

    python bench/decoder_race.py [--seconds 150]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=150.0)
    args = ap.parse_args()

    import torch._dynamo

    from autotune.config import TrialConfig
    from autotune.engines.builtin.engine import Engine
    from autotune.hardware import probe

    hw = probe("cpu")
    prompts = [[10 + (k * 7 + j) % 400 for j in range(4 + k)] for k in range(5)]
    cfg = TrialConfig(batch_size=4, backend="inductor-cudagraphs", streams=2, max_queue_delay_ms=50)
    rounds = failures = 0
    end = time.monotonic() + args.seconds
    while time.monotonic() < end:
        rounds += 1
        torch._dynamo.reset()
        try:
            with Engine.build("preset:llama-tiny", cfg, hw, prompt_pad_to=12, max_context=20) as engine:
                engine.generate(prompts, 6)
        except Exception as err:  # the failure is the figure
            failures += 1
            print(f"round {rounds}: {type(err).__name__}: {str(err)[:120]}", flush=True)
    print(f"{rounds} rounds, {failures} failed")


if __name__ == "__main__":
    main()
