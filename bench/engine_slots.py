"""How many trials of the logged quickstart runs would have reused a warm engine, per number of slots.

A trial reuses an engine when a warm trial process already holds its build (the model knobs:
model, precision, quantization, attention, backend; ``autotune.runner.build_key``). The order of
builds a study visits does not depend on how many engines stay warm, so each log's trial lines
(``trial N: b.. PRECISION QUANTIZATION xS BACKEND ..ms``) replayed through a least-recently-used
cache of 1-4 slots says what each choice of ``WARM_ENGINES_CPU`` would have reused. The count for
the slots the run had matches what the run itself printed ("N of 16 trials reused an engine").

    python bench/engine_slots.py [LOG ...]   # default: every bench/results/quickstart-tiny-lm-*.log
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

TRIAL = re.compile(r"\s+trial \d+: b\d+ (\S+) (\S+) x\d+ (\S+) \d+ms")
REUSED = re.compile(r"(\d+) of (\d+) trials reused an engine")
SLOTS = (1, 2, 3, 4)


def reused(builds: list[tuple[str, ...]], slots: int) -> int:
    """Trials whose build a least-recently-used cache of ``slots`` engines already held."""
    warm: list[tuple[str, ...]] = []
    hits = 0
    for b in builds:
        if b in warm:
            hits += 1
            warm.remove(b)
        warm = [*warm, b][-slots:]
    return hits


def main() -> None:
    logs = [Path(a) for a in sys.argv[1:]] or sorted(Path(__file__).parent.glob("results/quickstart-tiny-lm-*.log"))
    print(f"{'log':66} trials builds " + " ".join(f"{s} slot{'s' if s > 1 else ' '}" for s in SLOTS) + "  printed")
    for log in logs:
        text = log.read_text()
        builds = [m.groups() for m in map(TRIAL.match, text.splitlines()) if m]
        if not builds:
            continue
        said = REUSED.search(text)
        counts = " ".join(f"{reused(builds, s):7}" for s in SLOTS)
        print(f"{log.name:66} {len(builds):6} {len(set(builds)):6} {counts}  {said.group(1) if said else '-':>7}")


if __name__ == "__main__":
    main()
