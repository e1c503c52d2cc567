"""The ``autotune`` command line (typer). Every user error is one line on stderr and exit code 2.

Exit codes: 0 ok, 2 bad input (spec, model, storage, space), 3 no config met the SLO,
130 interrupted (the study resumes when the same command is run again).
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from autotune.config import BASELINE, TrialConfig
from autotune.errors import AutotuneError, NoFeasibleConfig, SpecError, StorageError, TrialFailure
from autotune.spec import StudySpec, load_spec

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain help text: rich markup would take "[default: ...]" in a help string for a style tag.
    rich_markup_mode=None,
    help="Find the fastest LLM inference config that meets your latency SLO, by measuring it.",
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)  # log lines stay whole (grep-able), however narrow the terminal

DEFAULT_SPEC = Path("studies/quickstart.yaml")
StorageOpt = Annotated[
    str | None,
    typer.Option(
        "--storage",
        help="SQLAlchemy URL of the study database [default: sqlite:///studies/autotune.db, relative to the "
        "current folder]",
        show_default=False,
    ),
]


# -- helpers ------------------------------------------------------------------------------------
def _default_spec_path() -> Path:
    if DEFAULT_SPEC.is_file():
        return DEFAULT_SPEC
    return Path(str(resources.files("autotune") / "data" / "quickstart.yaml"))


#: The storage URL this command uses, for naming it (and the fix) in a database error.
_storage_in_use: str | None = None


def _storage_url(storage: str | None, *, for_write: bool) -> str:
    """``--storage`` or the default SQLite file; ``for_write`` creates the default's folder."""
    global _storage_in_use
    from autotune.tuner import DEFAULT_STORAGE

    if storage:
        _storage_in_use = storage
        return storage
    if for_write:
        Path("studies").mkdir(exist_ok=True)
    _storage_in_use = DEFAULT_STORAGE
    return DEFAULT_STORAGE


def _load_study(name: str, storage: str | None) -> Any:
    import optuna

    from autotune.store.failures import sqlite_path
    from autotune.tuner import open_storage, safe_url

    url = _storage_url(storage, for_write=False)
    path = sqlite_path(url)
    if path is not None and not path.exists():  # reading must not create an empty database as a side effect
        raise StorageError(f"no database file at {path}; run `autotune tune` first or pass --storage")
    st = open_storage(url)
    from autotune.store import check_schema

    check_schema(url)  # a database migrated by an older or newer autotune: say which command to run
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.load_study(study_name=name, storage=st, sampler=optuna.samplers.RandomSampler())
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(st, include_best_trial=False)]
        raise StorageError(
            f"no study named {name!r} in {safe_url(url)}; studies there: {', '.join(names) or '(none)'}"
        ) from None


def _fmt(v: float, unit: str = "") -> str:
    return "-" if v != v else f"{v:,.1f}{unit}"


def _print_measurement(title: str, m: Any, spec: StudySpec | None = None) -> None:
    """Latency percentiles as a table, then throughput, memory, build times and the SLO verdict as lines."""
    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("metric")
    for p in ("p50", "p90", "p95", "p99"):
        t.add_column(p, justify="right")
    for name in ("e2e_ms", "ttft_ms", "tpot_ms", "queue_ms"):
        t.add_row(name, *(_fmt(getattr(m, name)[p]) for p in ("p50", "p90", "p95", "p99")))
    out.print(t)
    out.print(
        f"output {m.output_tokens_per_s:,.1f} tok/s · {m.requests_per_s:,.2f} req/s · {m.requests} requests in "
        f"{m.duration_s:.1f} s · mean batch {m.mean_batch_rows:.1f} · peak memory {m.peak_memory_mb:,.0f} MB "
        f"({m.memory_kind})",
        highlight=False,
    )
    steps = ("load_s", "quantize_s", "compile_s", "warmup_s")
    build = " · ".join(f"{k.removesuffix('_s')} {m.timings[k]:.2f} s" for k in steps if k in m.timings)
    if m.timings.get("export_s"):  # the onnxruntime backend's export, or its load from the disk cache
        how = "loaded from the export cache" if m.timings.get("export_cached") else "exported"
        build += f" · ONNX graph {how} in {m.timings['export_s']:.2f} s"
    if build:
        out.print(f"before measuring (not counted): {build}", highlight=False)
    if m.breakdown_ms:
        parts = " · ".join(f"{k} {v:,.1f} ms" for k, v in m.breakdown_ms.items())
        out.print(f"per request (mean): {parts}", highlight=False)
    if m.windows_tokens_per_s:
        ws = ", ".join(f"{w:,.0f}" for w in m.windows_tokens_per_s)
        out.print(
            f"windows: {ws} tok/s ({'stable' if m.stopped_by == 'stable' else 'cap reached'}; "
            f"last two differ by {m.window_spread_pct:.1f}%, pooled above)",
            highlight=False,
        )
    if m.stopped_by.startswith("early-stop"):
        out.print(f"stopped early: {m.stopped_by.removeprefix('early-stop: ')}", highlight=False)
    r = m.roofline or {}
    if r.get("decode_fraction", math.nan) == r.get("decode_fraction"):  # present and not NaN
        out.print(
            f"roofline: decode {r['decode_step_ms']:.2f} ms/step = {r['decode_fraction']:.1%} of the "
            f"memory-bandwidth bound ({r['decode_bound_ms']:.2f} ms) · prefill {_prefill_rate(r)}",
            highlight=False,
        )
    if m.quality:
        out.print(f"fidelity vs the reference: {_quality_text(m.quality)}", highlight=False)
    if spec is not None:
        verdicts = []
        for c in spec.slo:
            v = m.value(c.name)
            verdicts.append(f"{c.describe()}: {_clause_value(c, v)} {'OK' if c.ok(v) else 'MISSED'}")
        out.print("SLO: " + " · ".join(verdicts), highlight=False)


def _clause_value(c: Any, value: float) -> str:
    """A measured value as its SLO clause reads: latencies and memory whole, fidelity to 3 digits."""
    return _fmt(value) if c.percentile or c.metric == "peak_memory_mb" else f"{value:.3g}"


def _quality_text(q: dict[str, float]) -> str:
    return (
        f"KL {q['kl']:.2g} · top-1 agreement {q['top1_agreement']:.1%} · greedy agreement "
        f"{q['greedy_agreement']:.1%} · perplexity {q['perplexity']:,.2f} ({q['perplexity_increase_pct']:+.2f}%)"
    )


def _misses(trial: Any, spec: StudySpec) -> list[str]:
    """Each SLO clause a trial broke, with what was measured: the reason it is infeasible."""
    from autotune.tuner import trial_measurement

    m = trial_measurement(trial)
    out = []
    for c, v in zip(spec.slo, trial.user_attrs.get("constraints", []), strict=False):
        if v > 0:
            out.append(f"{c.describe()} (measured {_clause_value(c, m.value(c.name) if m else math.nan)})")
    return out


def _prefill_rate(r: dict[str, float]) -> str:
    rate = f"{r.get('prefill_tflops', math.nan) * 1e3:,.1f} GFLOP/s"
    frac = r.get("prefill_fraction", math.nan)
    if frac == frac:  # not NaN: the ceiling was measured in this trial's matmul dtype
        return f"{rate} = {frac:.1%} of the measured matmul rate"
    return f"{rate} (no ceiling measured for this dtype)"


def _pareto_table(study: Any, spec: StudySpec) -> Table:
    from autotune.tuner import pareto_front, trial_measurement

    lat = spec.second_objective
    t = Table(title=f"Pareto front: output tokens/s vs {lat}", header_style="bold")
    for col in ("trial", "config", "tok/s", lat, "meets SLO"):
        t.add_column(col, justify="right" if col in ("tok/s", lat) else "left")
    for tr in pareto_front(study, lat):
        m = trial_measurement(tr)
        assert m is not None
        t.add_row(
            str(tr.number),
            _label(tr),
            f"{m.output_tokens_per_s:,.1f}",
            f"{m.value(lat):,.0f}",
            "yes" if tr.user_attrs.get("feasible") else "no",
        )
    return t


def _config_table(cfg: dict[str, Any], title: str, model: str | None) -> Table:
    """The knobs of a config; ``model`` (the study's) stands in for a config that names no variant."""
    t = Table(title=title, show_header=False)
    t.add_column("knob", style="bold")
    t.add_column("value")
    for k, v in {**cfg, "model": cfg.get("model") or model}.items():
        t.add_row(k, escape(str(v)))
    return t


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is: the trial in flight is stopped and marked failed (it is
    measured again on resume), its process is killed, and the command exits 143."""


def _on_sigterm(signum: int, frame: Any) -> None:
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM while stopping ends at once
    raise Terminated()


def _run(fn: Callable[[], None], *, study: bool = True) -> None:
    """Run a command body, mapping our errors to one line and an exit code (``study``: the command
    works on a study, which an interruption leaves resumable)."""
    try:
        fn()
    except AutotuneError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)
        raise typer.Exit(e.exit_code) from None
    except Terminated:
        if study:
            err.print("terminated (SIGTERM); the trial in flight, if any, is marked failed and will be measured "
                      "again: run the same command again to resume the study")  # fmt: skip
        else:
            err.print("stopped (SIGTERM)")
        raise typer.Exit(143) from None
    except KeyboardInterrupt:
        err.print("interrupted; run the same command again to resume the study" if study else "stopped")
        raise typer.Exit(130) from None
    except Exception as e:  # the database failed under us (past the tuner's own retries), or a bug
        from autotune.store.failures import is_storage_failure, storage_error

        if not is_storage_failure(e):
            raise
        err.print(f"[red]error:[/red] {escape(str(storage_error(e, _storage_in_use)))}", highlight=False)
        raise typer.Exit(2) from None


def _preflight(spec: StudySpec) -> tuple[Any, Any, Any]:
    """Hardware, the model's info and each variant's (checked against the model), and every file
    the spec names read once: bad input fails here, before any storage is touched."""
    from autotune.errors import ModelError
    from autotune.models import classify_model_ref
    from autotune.runner import preflight_with_variants

    classify_model_ref(spec.model)  # unknown preset or missing path: fail before starting a child
    if spec.quality.enabled and spec.quality.eval_text is not None:
        from autotune.quality import read_eval_text

        read_eval_text(spec.quality)
    for v in spec.variants:
        try:
            classify_model_ref(v)
        except ModelError as e:
            raise ModelError(f"model variant {v!r}: {e}") from None
    with err.status("probing hardware and model (child process)…"):
        return preflight_with_variants(spec)


def _with_device(spec: StudySpec, device: str | None) -> StudySpec:
    """The spec pinned to ``--device`` (validated like the spec's own ``device`` field)."""
    if device is None:
        return spec
    data = spec.model_dump(mode="json")
    data["device"] = device
    from autotune.spec import parse_spec

    return parse_spec(data, source="--device")


# -- commands -----------------------------------------------------------------------------------
@app.command()
def tune(
    spec_path: Annotated[
        Path | None,
        typer.Argument(
            metavar="SPEC",
            help="study spec YAML [default: studies/quickstart.yaml if it exists here, else the quickstart shipped "
            "with autotune]",
            show_default=False,
        ),
    ] = None,
    trials: Annotated[int | None, typer.Option(min=1, help="trial budget of the study (total, resumes count)")] = None,
    timeout: Annotated[float | None, typer.Option(min=1, help="wall-time budget in seconds")] = None,
    storage: StorageOpt = None,
    study: Annotated[str | None, typer.Option(help="study name [default: the spec's name]")] = None,
    export: Annotated[Path | None, typer.Option(help="write the best config's export JSON here")] = None,
    sampler: Annotated[str | None, typer.Option(help="gp, tpe, nsga2, random, grid [default: the spec's; gp]")] = None,
    seed: Annotated[int | None, typer.Option(help="sampler seed")] = None,
    device: Annotated[str | None, typer.Option(help="run on this device, e.g. cpu, cuda or cuda:1")] = None,
) -> None:
    """Search the spec's space, measuring every trial for real, and report the best feasible config."""

    def body() -> None:
        from autotune.export import check_export_path
        from autotune.spec import check_study_name
        from autotune.store.failures import check_storage
        from autotune.tuner import Tuner, safe_url

        # Everything the command line and the spec name is checked before the storage is written
        # to: bad input never leaves tables, a study or an empty database file behind.
        spec = _with_device(load_spec(spec_path or _default_spec_path()), device)
        if sampler is not None and sampler not in ("tpe", "nsga2", "gp", "random", "grid"):
            raise SpecError(f"--sampler: unknown sampler {sampler!r}; allowed: tpe, nsga2, gp, random, grid")
        if study is not None:
            check_study_name(study)
        if export is not None:
            check_export_path(export)
        url = _storage_url(storage, for_write=False)
        check_storage(url, folder_may_be_created=storage is None)  # fail fast, before the slow preflight
        name = study or spec.name or "study"
        # A device named on the command line is checked by the preflight, even for a finished study.
        finished = _finished_study(url, name, spec, trials) if device is None else None
        if finished is not None:  # nothing to measure: say so at once, not after the preflight
            budget = trials or spec.budget.trials
            out.print(
                f"study {escape(name)!r} has already spent its budget of {budget} trials in {safe_url(url)}; "
                f"its result is below. To measure more, run the same command with --trials N (N > {budget}).",
                highlight=False,
            )
            _report(finished, spec)
            _export_and_next_steps(finished, url, storage, export)
            return
        hw, info, variants = _preflight(spec)
        url = _storage_url(storage, for_write=True)
        out.print(f"[bold]{spec.name}[/bold]: {info.ref} ({info.num_parameters / 1e6:,.1f}M params) on {hw.summary()}")
        tuner = Tuner(
            spec,
            hw,
            info,
            storage_url=url,
            study_name=study,
            trials=trials,
            timeout_s=timeout,
            sampler=sampler,
            seed=seed,
            variants=variants,
        )
        for knob, reason in tuner.space.dropped.items():
            out.print(f"[dim]not searched: {knob}: {reason}[/dim]")
        out.print(
            f"space: {tuner.space.size()} configs · budget {tuner.budget} trials · SLO: "
            + ", ".join(c.describe() for c in spec.slo)
            + f" · storage {safe_url(url)}"
        )
        study_obj = _run_with_progress(tuner)
        try:
            _report(study_obj, spec)
        except NoFeasibleConfig:
            _next_steps(study_obj.study_name, url, storage, None)
            raise
        _export_and_next_steps(study_obj, url, storage, export)

    _run(body)


def _finished_study(url: str, name: str, spec: StudySpec, trials: int | None) -> Any | None:
    """The study ``name`` when it has already spent its budget with this spec and has nothing left
    to re-measure, read without writing anything (else None: the run goes on as usual)."""
    import optuna

    from autotune.store.failures import has_optuna_tables, sqlite_path
    from autotune.tuner import (
        A_CONFIRMATIONS,
        best_feasible,
        confirmation,
        count_spent,
        open_storage,
        spec_differs,
    )

    path = sqlite_path(url)
    if path is not None and not path.exists():
        return None
    try:
        if not has_optuna_tables(url):  # opening Optuna's storage would create them
            return None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        found = optuna.load_study(study_name=name, storage=open_storage(url), sampler=optuna.samplers.RandomSampler())
    except (KeyError, AutotuneError):
        return None
    except Exception:  # the real run reports whatever is wrong with the database
        return None
    stored = found.user_attrs.get("spec")
    if stored is None or spec_differs(stored, spec.model_dump(mode="json")):
        return None
    if count_spent(found.get_trials(deepcopy=False)) < (trials or spec.budget.trials):
        return None
    confirmations = found.user_attrs.get(A_CONFIRMATIONS, {})
    best = best_feasible(found, confirmations=confirmations)
    if spec.budget.confirm_runs and best is not None and confirmation(found, best) is None:
        return None  # its winner still has to be re-measured
    if spec.budget.confirm_runs and any(v.get("not_remeasured") for v in confirmations.values()):
        return None  # configs passed over unmeasured are re-measured now
    return found


def default_export_path(url: str, study: str) -> Path:
    """Where ``autotune tune`` writes the winner's export: beside a SQLite database, else here."""
    import re

    from autotune.store.failures import sqlite_path

    file = re.sub(r"[^A-Za-z0-9._-]+", "_", study).strip("._") or "study"
    db = sqlite_path(url)
    return (db.parent if db is not None else Path(".")) / f"{file}-best.json"


def _export_and_next_steps(study_obj: Any, url: str, storage: str | None, export: Path | None) -> None:
    """Write the winner's export (``--export`` or beside the database), record its version, and end
    with the commands that take it further: the dashboard, serving it, a deployment's config."""
    from autotune.export import export_dict, write_export
    from autotune.store import Repository
    from autotune.store.failures import permanent_cause, storage_error

    doc = export_dict(study_obj)
    path = write_export(doc, export or default_export_path(url, study_obj.study_name))
    try:
        with Repository.open(url) as repo:
            version = repo.record_export(study_obj.study_name, doc["trial"], doc)
        what = f" (export version {version} of study {escape(study_obj.study_name)})"
    except Exception as e:
        if permanent_cause(e) is None:
            raise
        what = f" (not recorded as an export version: {escape(str(storage_error(e, url)))})"
    out.print(f"exported the best config to {escape(str(path))}{what}", highlight=False)
    _next_steps(study_obj.study_name, url, storage, path)


def _next_steps(study: str, url: str, storage: str | None, export: Path | None) -> None:
    import shlex

    at = f" --storage {shlex.quote(storage)}" if storage else ""
    lines = [f"  autotune dashboard{at}    # the Pareto front and every trial, at http://127.0.0.1:8000/"]
    if export is not None:
        cfg = shlex.quote(str(export))
        lines += [
            f"  autotune serve {cfg}    # an OpenAI-compatible server running exactly this config",
            f"  autotune verify {cfg} --url http://127.0.0.1:8001 --runs 3    # replay the workload against it",
            f"  autotune export {shlex.quote(study)}{at} --format vllm|tgi|triton --output PATH"
            "    # the config for another serving stack",
        ]
    out.print("next:\n" + "\n".join(escape(line) for line in lines), highlight=False)


def _run_with_progress(tuner: Any) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from autotune.tuner import TuneEvents, trial_measurement

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=False,
        # A log (not a terminal) gets the per-trial lines only: a bar there is one last line,
        # squeezed to 80 columns.
        disable=not err.is_terminal,
    )
    task = progress.add_task("trials", total=tuner.budget)
    state = {"best": "none yet"}

    def on_start(done: int, total: int) -> None:
        progress.update(task, completed=min(done, total))

    def on_trial_start(number: int, cfg: TrialConfig) -> None:
        progress.update(task, description=f"trial {number}: {cfg.label()} | best feasible {state['best']}")

    def on_trial_end(study: Any, trial: Any, best: Any) -> None:
        if best is not None:
            state["best"] = f"{best.values[0]:,.0f} tok/s"
        done = min(tuner.spent, tuner.budget)
        progress.update(task, completed=done, description=f"{done} trials measured | best feasible {state['best']}")
        m = trial_measurement(trial)
        if "duplicate_of" in trial.user_attrs:
            progress.console.print(
                f"  [dim]trial {trial.number}: same config as trial {trial.user_attrs['duplicate_of']}"
                ", not measured again[/dim]",
                highlight=False,
            )
        elif trial.user_attrs.get("failure"):
            f = trial.user_attrs["failure"]
            progress.console.print(
                f"  trial {trial.number} failed ({f['kind']}): {escape(f['reason'])}", highlight=False
            )
        elif "rejected" in trial.user_attrs:
            progress.console.print(
                f"  [dim]trial {trial.number} rejected before loading: {escape(trial.user_attrs['rejected'])}[/dim]",
                highlight=False,
            )
        elif m is not None:
            misses = _misses(trial, tuner.spec)
            mark = "ok" if trial.user_attrs.get("feasible") else "misses " + ("; ".join(misses) or "the SLO")
            obj = tuner.spec.second_objective
            quality = f", KL {m.quality['kl']:.2g}, top-1 {m.quality['top1_agreement']:.0%}" if m.quality else ""
            progress.console.print(
                f"  trial {trial.number}: {_label(trial)} → "
                f"{m.output_tokens_per_s:,.0f} tok/s, {obj} {m.value(obj):,.0f} ms{quality} ({escape(mark)})"
                + escape(_load_note(trial)),
                highlight=False,
            )

    def on_disturbed(what: str, load: str) -> None:
        if tuner.load_persists:
            wait = "the load had not passed at the last wait: checking once more before measuring again"
        else:
            wait = f"waiting up to {tuner.quiet_wait_s:g} s for the load to pass to measure again"
        progress.console.print(
            f"  [yellow]{escape(what)} was disturbed:[/yellow] {escape(load)}; {wait}", highlight=False
        )

    def on_confirm(trial: Any, record: dict[str, Any]) -> None:
        if record.get("not_remeasured"):
            progress.console.print(
                f"  [dim]trial {trial.number} ({_label(trial)}): {escape(_confirmation_verdict(record))}[/dim]",
                highlight=False,
            )
            return
        runs = []
        for r in record["runs"]:
            if "failure" in r:
                runs.append(r["failure"])
            else:
                obj = tuner.spec.second_objective
                runs.append(f"{r['output_tokens_per_s']:,.0f} tok/s, {obj} {r[obj]:,.0f} ms")
                if r.get("disturbed"):
                    runs[-1] += " (under load)"
        verdict = _confirmation_verdict(record)
        progress.console.print(
            f"  re-measured trial {trial.number} ({_label(trial)}): {escape('; '.join(runs))} → {verdict}",
            highlight=False,
        )

    def on_storage_lost(message: str) -> None:
        progress.console.print(f"  [yellow]waiting for the database:[/yellow] {escape(message)}")

    def on_reference() -> None:
        progress.console.print("  computing the quality reference (reference precision, eager, unquantized)…")

    def on_warm_start(n: int, studies: list[str]) -> None:
        progress.console.print(f"  warm start: {n} best config(s) of {', '.join(studies)} go first", highlight=False)

    def on_outlook(message: str) -> None:
        progress.console.print(f"  [dim]{escape(message)}[/dim]", highlight=False)

    tuner.events = TuneEvents(
        on_start, on_trial_start, on_trial_end, on_confirm, on_storage_lost, on_reference, on_warm_start, on_outlook
    )
    tuner.events.on_disturbed = on_disturbed
    study = tuner.open_study()  # spec/hardware mismatches are reported before any progress output
    with progress:
        done = tuner.run(study)
    if tuner.stop_reason:
        err.print(tuner.stop_reason, highlight=False)
    race = done.user_attrs.get("engine_race")
    if race:
        err.print(_race_summary(race), highlight=False)
    from autotune.tuner import trial_overhead

    share = trial_overhead(done.get_trials(deepcopy=False))
    if share is not None:
        err.print(
            f"time not spent measuring (process start, load, warm-up, fidelity, storage): median "
            f"{share['median']:.0%} of a trial's wall time (max {share['max']:.0%}), {share['total']:.0%} of all "
            f"trials' time; {share['reused']:.0f} of {share['trials']:.0f} trials reused an engine built before",
            highlight=False,
        )
    return done


def _race_summary(race: dict[str, Any]) -> str:
    """One line per engine a study searched: its trials, its best within the SLO, and why it was dropped."""
    lines = ["engines (budget.engine_probes, budget.engine_keep):"]
    for engine, r in sorted(race.items(), key=lambda kv: -(kv[1].get("best_feasible_tokens_per_s") or 0.0)):
        best = r.get("best_feasible_tokens_per_s")
        where = f"best {best:,.1f} tok/s within the SLO (trial {r['best_trial']})" if best else "none met the SLO"
        verdict = f"; dropped: {r['why']}" if r.get("state") == "dropped" else ""
        lines.append(f"  {engine}: {r['trials']} trial(s), {where}{verdict}")
    return "\n".join(lines)


def _label(trial: Any) -> str:
    return TrialConfig.model_validate(trial.user_attrs["config"]).label()


def _report(study_obj: Any, spec: StudySpec) -> None:
    from autotune.tuner import best_feasible, closest_to_feasible, shown_measurement

    best = best_feasible(study_obj)
    if best is None:
        lines = []
        for t in closest_to_feasible(study_obj):
            lines.append(f"  trial {t.number} {_label(t)}: missed " + "; ".join(_misses(t, spec)))
        detail = ("\nclosest configs:\n" + "\n".join(lines)) if lines else " (no trial completed)"
        raise NoFeasibleConfig(f"no configuration met the SLO in study {study_obj.study_name!r}{detail}")
    out.print(_config_table(best.user_attrs["config"], f"best feasible config (trial {best.number})", spec.model))
    _print_measurement(_measurement_title(study_obj, best), shown_measurement(study_obj, best), spec)


def _load_note(trial: Any) -> str:
    """What other processes' load did to a trial's measurement, for its line ('' when nothing)."""
    from autotune.load import describe, is_disturbed

    note = trial.user_attrs.get("disturbed") or {}
    kept = (trial.user_attrs.get("measurement") or {}).get("background")
    if is_disturbed(kept):
        again = "; re-measured, still under load" if note.get("remeasured") else "; the load did not pass"
        return f" [measured under load: {describe(kept)}{again}{_estimate_note(note)}]"
    if note.get("remeasured"):
        return f" [re-measured: the first run measured {note['first_tokens_per_s']:,.0f} tok/s under load]"
    return ""


def _estimate_note(note: dict[str, Any]) -> str:
    """How a measurement under a load that did not pass is ranked ('' when by what it measured)."""
    est = note.get("quiet_estimate")
    if not est:
        return ""
    p95 = (est.get("e2e_ms") or {}).get("p95")
    lat = f", e2e p95 {p95:,.0f} ms" if p95 is not None else ""
    return (
        f"; ranked by its estimate for a quiet machine: {est['output_tokens_per_s']:,.0f} tok/s{lat} "
        f"(x{est['factor']:.2f}, the cores it lacked)"
    )


def _confirmation_verdict(record: dict[str, Any]) -> str:
    """What re-measuring a winner showed: confirmed only when its re-measured median agrees with the
    search's figure within the tolerance (widened to the runs' own spread) on a quiet machine; else by
    how much it moved, or that other processes' load left it unconfirmed."""
    if record.get("not_remeasured"):
        return f"passed over, {record['not_remeasured']}"
    if not record["ok"]:
        loud = " (under other processes' load)" if record.get("disturbed_runs") else ""
        return f"missed the SLO on re-measurement{loud}, passed over"
    new, old, change, tol = (
        record[k] for k in ("remeasured_tokens_per_s", "search_tokens_per_s", "change_pct", "tolerance_pct")
    )
    notes = [r.get("disturbed") for r in record["runs"]]
    if record.get("disturbed_runs") and any(isinstance(n, dict) and "quiet_estimate" in n for n in notes):
        measured = statistics.median(float(r["measurement"]["output_tokens_per_s"]) for r in record["runs"])
        return (
            f"NOT confirmed: re-measured under other processes' load ({record['disturbed_runs']} run(s)): "
            f"{measured:,.0f} tok/s measured, an estimated {new:,.0f} on a quiet machine vs {old:,.0f} in the "
            f"search ({change:+.0f}%); the measured figure is the one shown and exported"
        )
    if record.get("disturbed_runs"):
        return (
            f"NOT confirmed: re-measured {new:,.0f} tok/s vs {old:,.0f} in the search ({change:+.0f}%) while other "
            f"processes loaded the machine ({record['disturbed_runs']} run(s)); the re-measurement is the figure "
            "shown and exported"
        )
    if record["agrees"]:
        return (
            f"confirmed: {new:,.0f} tok/s re-measured vs {old:,.0f} in the search ({change:+.0f}%, within ±{tol:.0f}%)"
        )
    way = "below" if change < 0 else "above"
    return (
        f"NOT confirmed: re-measured {new:,.0f} tok/s, {abs(change):.0f}% {way} the search's {old:,.0f} "
        f"(beyond ±{tol:.0f}%); the re-measurement is the figure shown and exported"
    )


def _measurement_title(study_obj: Any, trial: Any) -> str:
    from autotune.tuner import confirmation

    record = confirmation(study_obj, trial)
    if record is None or record.get("remeasured_tokens_per_s") is None:
        return "its measurement (the search trial's; not re-measured)"
    n = len(record["runs"])
    return (
        f"its measurement: the median of {n} re-measurement{'s' * (n != 1)} "
        f"(the search trial measured {record['search_tokens_per_s']:,.0f} tok/s; {_confirmation_verdict(record)})"
    )


@app.command()
def measure(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="study spec YAML (its model and workload)")],
    config: Annotated[Path | None, typer.Option(help="a TrialConfig JSON, or an export file")] = None,
    baseline: Annotated[bool, typer.Option(help="measure the naive baseline: batch 1, fp32, eager, 1 stream")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the measurement as JSON")] = False,
) -> None:
    """Measure one config under the spec's workload (no search)."""

    def body() -> None:
        from autotune.runner import run_trial
        from autotune.space import SearchSpace

        spec = load_spec(spec_path)
        if baseline == (config is not None):
            raise SpecError("give exactly one of --config FILE or --baseline")
        cfg = BASELINE if baseline else _read_config(config)  # type: ignore[arg-type]
        hw, info, variants = _preflight(spec)
        space = SearchSpace.from_spec(spec, hw, info, variants)
        reason = space.check(cfg)
        if reason:
            raise SpecError(f"config cannot run here: {reason}")
        reference = None
        if spec.quality.enabled:
            from autotune.runner import compute_reference

            with err.status("computing the quality reference (child process)…"):
                reference = compute_reference(spec, hw)
        with err.status(f"measuring {cfg.label()} (child process)…"):
            try:
                m = run_trial(spec, cfg, hw, reference=reference)
            except TrialFailure as e:
                raise AutotuneError(f"measurement failed ({e.kind}): {e.reason}") from None
        if as_json:
            print(json.dumps({"config": cfg.model_dump(mode="json"), "measurement": m.to_dict()}, indent=2))
        else:
            _print_measurement(f"{cfg.label()} on {hw.summary()}", m, spec)

    _run(body)


def _read_config(path: Path) -> TrialConfig:
    from pydantic import ValidationError

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"config file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict) and "config" in data and isinstance(data["config"], dict):
        data = data["config"]
    try:
        return TrialConfig.model_validate(data)
    except ValidationError as e:
        from autotune.spec import _format_validation_error

        raise SpecError(f"{path}: {_format_validation_error(e)}") from None


@app.command()
def best(
    study: Annotated[str, typer.Argument(help="study name")],
    storage: StorageOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the export document instead of a table")] = False,
    pareto: Annotated[
        bool, typer.Option("--pareto", help="also list the tokens/s vs SLO-latency Pareto front")
    ] = False,
) -> None:
    """Show the best feasible config of a study (and its Pareto front with --pareto)."""

    def body() -> None:
        from autotune.export import export_dict
        from autotune.spec import parse_spec
        from autotune.tuner import best_feasible, shown_measurement

        s = _load_study(study, storage)
        if as_json:
            print(json.dumps(export_dict(s), indent=2))
            return
        spec = parse_spec(s.user_attrs["spec"]) if "spec" in s.user_attrs else None
        if pareto and spec is not None:
            out.print(_pareto_table(s, spec))
        b = best_feasible(s)
        if b is None:
            if spec is None:
                raise NoFeasibleConfig(f"study {study!r} has no feasible trial")
            _report(s, spec)
            return
        model = spec.model if spec is not None else None
        out.print(_config_table(b.user_attrs["config"], f"{study}: best feasible config (trial {b.number})", model))
        _print_measurement(_measurement_title(s, b), shown_measurement(s, b), spec)

    _run(body)


@app.command()
def capacity(
    study: Annotated[str, typer.Argument(help="study name")],
    storage: StorageOpt = None,
    top: Annotated[int, typer.Option(min=1, help="how many of the best feasible configs")] = 3,
    steps: Annotated[int, typer.Option(min=1, help="probes to grow the rate, then to bisect it")] = 4,
) -> None:
    """Goodput: the highest Poisson request rate at which each top config still keeps the SLO."""

    def body() -> None:
        from autotune.capacity import find_capacity
        from autotune.spec import parse_spec
        from autotune.tuner import is_feasible, trial_measurement

        s = _load_study(study, storage)
        if "spec" not in s.user_attrs:
            raise SpecError(f"study {study!r} was not made by autotune (no spec stored)")
        spec = parse_spec(s.user_attrs["spec"], f"study {study!r}")
        hw, _, _ = _preflight(spec)
        if s.user_attrs.get("fingerprint") != hw.fingerprint():
            raise SpecError(f"study {study!r} was tuned on other hardware: its capacity must be measured there")
        seen, winners = set(), []
        for t in sorted((t for t in s.trials if is_feasible(t)), key=lambda t: -t.values[0]):
            if t.user_attrs["config_key"] not in seen:
                seen.add(t.user_attrs["config_key"])
                winners.append(t)
        if not winners:
            raise NoFeasibleConfig(f"study {study!r} has no feasible config to load-test")
        from autotune.runner import run_trial

        results = []
        for t in winners[:top]:
            cfg = TrialConfig.model_validate(t.user_attrs["config"])
            m = trial_measurement(t)
            start = m.requests_per_s if m and m.requests_per_s > 0 else 1.0
            with err.status(f"rate search for {cfg.label()} (trial processes)…"):
                cap = find_capacity(spec, cfg, lambda sp, c: run_trial(sp, c, hw), start, steps=steps)
            results.append({"trial": t.number, "closed_loop_requests_per_s": start, **cap.to_dict()})
        s.set_user_attr("capacity", results)
        table = Table(title=f"{study}: capacity (Poisson arrivals, SLO kept)", header_style="bold")
        for col in ("trial", "config", "closed-loop req/s", "capacity req/s", "goodput tok/s", "probes"):
            table.add_column(col, justify="left" if col == "config" else "right")
        for r in results:
            rate = "below the first probe" if r["rate"] is None else f"{r['rate']:,.1f}"
            good = "–" if r["goodput_tokens_per_s"] is None else f"{r['goodput_tokens_per_s']:,.0f}"
            table.add_row(str(r["trial"]), r["label"], f"{r['closed_loop_requests_per_s']:,.1f}", rate, good,
                          str(len(r["probes"])))  # fmt: skip
        out.print(table)

    _run(body)


@app.command("export")
def export_cmd(
    study: Annotated[str, typer.Argument(help="study name")],
    storage: StorageOpt = None,
    output: Annotated[
        Path | None, typer.Option(help="file to write; for triton, the model repository directory [default: stdout]")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="json | vllm | tgi | triton")] = "json",
) -> None:
    """Export the best feasible config: versioned JSON, or a vLLM command, TGI env file or Triton model."""

    def body() -> None:
        from autotune.export import export_dict, write_export
        from autotune.translate import FORMATS, write_text_atomic

        if fmt not in FORMATS:
            raise SpecError(f"--format: unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")
        s = _load_study(study, storage)
        doc = export_dict(s)
        if fmt == "triton" and output is not None:  # a whole model repository entry, not one file
            from autotune.translate import TRITON_EXPORT_FILE, write_triton_repository

            try:
                model_dir = write_triton_repository(doc, output)
            except OSError as e:
                raise SpecError(f"--output {output}: cannot write the Triton model repository there: {e}") from None
            files = f"config.pbtxt, 1/model.py, 1/{TRITON_EXPORT_FILE}"
            serve = f"tritonserver --model-repository {output}"
            out.print(f"wrote {escape(str(model_dir))} ({files}); serve it with: {escape(serve)}", highlight=False)
            return
        if fmt != "json":  # a translation: self-describing text, not recorded as an export version
            if fmt in ("vllm", "tgi"):  # stacks that load folders: a builtin:/preset: model becomes one
                from autotune.checkpoint import servable

                with err.status(f"writing {doc['model']} as a checkpoint folder (once)…"):
                    doc = servable(doc)
            text = FORMATS[fmt](doc)
            if output is None:
                sys.stdout.write(text)
                if fmt == "triton":
                    err.print("config.pbtxt only: --output DIR writes the whole Triton model repository into DIR")
            else:
                out.print(f"wrote {write_text_atomic(text, output)} ({fmt})")
            return
        if output is None:
            print(json.dumps(doc, indent=2))
        else:
            from autotune.store import Repository
            from autotune.store.failures import permanent_cause, storage_error

            path = write_export(doc, output)  # what was asked for, even where the database is read-only
            try:
                with Repository.open(_storage_url(storage, for_write=False)) as repo:
                    version = repo.record_export(study, doc["trial"], doc)
            except Exception as e:
                if permanent_cause(e) is None:
                    raise
                out.print(f"wrote {path}")
                why = escape(str(storage_error(e, _storage_in_use)))
                err.print(f"warning: not recorded as an export version: {why}", highlight=False)
                return
            out.print(f"wrote {path} (export version {version})")

    _run(body)


@app.command()
def worker(
    study: Annotated[str, typer.Argument(help="name of an existing study (made by `autotune tune`)")],
    storage: Annotated[str, typer.Option("--storage", help="the study's database, e.g. postgresql+psycopg://...")],
    device: Annotated[str | None, typer.Option(help="pin this worker to a device, e.g. cuda:1")] = None,
    trials: Annotated[int | None, typer.Option(min=1, help="study budget (total trials) [default: the spec's]")] = None,
    allow_heterogeneous: Annotated[
        bool, typer.Option(help="join even if this machine's hardware fingerprint differs from the study's")
    ] = False,
) -> None:
    """Join an existing study and run its trials until the study's budget is spent (one worker per GPU)."""

    def body() -> None:
        from autotune.spec import parse_spec
        from autotune.tuner import Tuner

        if storage.startswith("sqlite"):
            raise SpecError(
                "workers share a study through a database server: SQLite lets one process write at a time; "
                "use --storage postgresql+psycopg://USER@HOST/DB (or run `autotune tune` alone on SQLite)"
            )
        from autotune.spec import check_study_name

        check_study_name(study, "STUDY")
        s = _load_study(study, storage)
        if "spec" not in s.user_attrs:
            raise SpecError(f"study {study!r} was not created by `autotune tune`: nothing to join")
        spec = _with_device(parse_spec(s.user_attrs["spec"], f"study {study}"), device)
        hw, info, variants = _preflight(spec)
        out.print(f"worker for [bold]{study}[/bold] on {hw.summary()} ({hw.device})")
        tuner = Tuner(
            spec,
            hw,
            info,
            storage_url=storage,
            study_name=study,
            trials=trials,
            allow_heterogeneous=allow_heterogeneous,
            variants=variants,
        )
        _report(_run_with_progress(tuner), spec)

    _run(body)


landscape_app = typer.Typer(
    no_args_is_help=True, help="Recorded landscapes: measure a whole grid once, replay search strategies on it."
)
app.add_typer(landscape_app, name="landscape")


@landscape_app.command("record")
def landscape_record(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="study spec YAML (its grid is measured)")],
    output: Annotated[Path, typer.Option(help="landscape JSON file (an existing one is resumed)")],
    repeat_sample: Annotated[int, typer.Option(min=0, help="configs measured again for the spread")] = 6,
    repeats: Annotated[int, typer.Option(min=1, help="extra runs of each sampled config")] = 2,
) -> None:
    """Measure every runnable config of the spec's grid once, each in its own trial process."""

    def body() -> None:
        from autotune.landscape import record
        from autotune.runner import compute_reference, run_trial
        from autotune.space import SearchSpace
        from autotune.tuner import constraint_values

        spec = load_spec(spec_path)
        hw, info, variants = _preflight(spec)
        space = SearchSpace.from_spec(spec, hw, info, variants)
        reference = compute_reference(spec, hw) if spec.quality.enabled and spec.quality_constraints else None

        def measure(s: StudySpec, cfg: TrialConfig) -> tuple[float, list[float]]:
            m = run_trial(s, cfg, hw, reference=reference)
            return m.output_tokens_per_s, constraint_values(m, s.slo)

        def on_point(i: int, n: int, p: Any) -> None:
            what = p.failure or f"{p.tokens_per_s:,.0f} tok/s, {'feasible' if p.feasible else 'infeasible'}"
            err.print(f"  [{i + 1}/{n}] {p.config.label()}: {escape(what)}", highlight=False)

        def on_start(n: int, builds: int, done: int) -> None:
            what = f"resuming {output}: {n - done} of {n} runnable configs left" if done else f"{n} runnable configs"
            err.print(f"{what}, measured build by build ({builds} model build{'s' * (builds != 1)})", highlight=False)

        land = record(
            spec,
            space,
            output,
            measure,
            repeat_sample=repeat_sample,
            repeats=repeats,
            on_point=on_point,
            on_start=on_start,
        )
        best = land.best_feasible()
        out.print(
            f"{output}: {len(land.points)} configs of {land.grid_size} recorded in {land.recorded_s:,.0f} s; "
            f"run-to-run spread {land.spread():.1%}; best feasible "
            + (f"{best.config.label()} at {best.tokens_per_s:,.0f} tok/s" if best else "none"),
            highlight=False,
        )

    _run(body)


@landscape_app.command("replay")
def landscape_replay(
    path: Annotated[Path, typer.Argument(metavar="FILE", help="a file from `autotune landscape record`")],
    samplers: Annotated[str, typer.Option(help="comma-separated strategies")] = "gp,tpe,nsga2,random,grid,hill-climb",
    seeds: Annotated[int, typer.Option(min=1, help="runs per strategy")] = 30,
    budget: Annotated[
        int | None, typer.Option(min=1, help="measured configs per run [default: 10% of the grid]")
    ] = None,
    plot: Annotated[Path | None, typer.Option(help="write the regret-vs-trials plot (HTML)")] = None,
    patience: Annotated[
        int | None, typer.Option(min=1, help="also evaluate the stopping rule budget.patience=K")
    ] = None,
    warm_start: Annotated[
        Path | None,
        typer.Option(help="measure the 3 best configs of this earlier landscape (same model, same hardware) first"),
    ] = None,
    confirm_runs: Annotated[
        int,
        typer.Option(
            min=0, max=10, help="re-measure would-be winners this many times, as budget.confirm_runs does [default: 0]"
        ),
    ] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Run search strategies against a recorded landscape (lookups plus recorded noise, no measuring)."""

    def body() -> None:
        from autotune.hardware import Hardware
        from autotune.landscape import load_landscape, regret_figure, replay, summarize, warm_configs
        from autotune.space import SearchSpace

        land = load_landscape(path)
        hw = Hardware.model_validate({k: v for k, v in land.hardware.items() if k != "fingerprint"})
        space = SearchSpace.from_spec(land.spec, hw, None)
        best = land.best_feasible()
        if best is None:
            raise AutotuneError(f"{path}: no recorded config is feasible; nothing to search for")
        n = budget or max(1, round(0.1 * land.grid_size))
        names = [s.strip() for s in samplers.split(",") if s.strip()]
        warm = warm_configs(land, load_landscape(warm_start), space) if warm_start is not None else []
        runs = replay(land, space, names, seeds, n, warm, confirm_runs)
        rows = summarize(runs, best.tokens_per_s, n, patience, space, land.spread())
        missing = sum(r["missing"] for r in rows)
        if as_json:
            warm_keys = [c.key() for c in warm]
            doc = {
                "best_tokens_per_s": best.tokens_per_s,
                "budget": n,
                "warm_start": warm_keys,
                "confirm_runs": confirm_runs,
                "rows": rows,
            }
            print(json.dumps(doc, indent=2))
        else:
            t = Table(
                title=f"{path.name}: {len(land.points)} configs, best feasible {best.tokens_per_s:,.0f} tok/s, "
                f"budget {n} measured configs, {seeds} seeds, noise {land.spread():.1%}"
                + (f", winners re-measured {confirm_runs}x" if confirm_runs else ""),
                header_style="bold",
            )
            for col in ("strategy", "to 95%: median", "p90", "reached", "to 99%: median", "p90 ", "reached "):
                t.add_column(col, justify="left" if col == "strategy" else "right", no_wrap=col == "strategy")

            def cell(v: float | None) -> str:
                return f">{n}" if v is None else f"{v:g}"

            if patience is not None:
                t.add_column(f"patience {patience} alone: measured", justify="right")
                t.add_column("reached 99%", justify="right")
                t.add_column("+ model: measured", justify="right")
                t.add_column("reached 99% ", justify="right")
            if confirm_runs:
                t.add_column("re-measured (median)", justify="right")
            baselines = any("below_baselines_from" in r for r in rows)
            if baselines:
                # From which config on the regret stays at or below random's and the hill-climb's
                # (median, mean over seeds), and where it is worse than either beyond the seeds' spread.
                t.add_column("<= baselines from: median", justify="right")
                t.add_column("mean", justify="right")
                t.add_column("worse at", justify="right")
            for r in rows:
                extra = (
                    [
                        f"{r['patience_median_measured']:g}",
                        f"{r['patience_reached_99']:.0%}",
                        f"{r['model_median_measured']:g}",
                        f"{r['model_reached_99']:.0%}",
                    ]
                    if patience is not None
                    else []
                )
                if confirm_runs:
                    extra.append(f"{r['median_confirmations']:g}")
                if baselines:
                    for key in ("below_baselines_from", "mean_below_baselines_from"):
                        first = r.get(key, "")
                        extra.append("-" if first == "" else "never" if first is None else f"{first}")
                    worse = r.get("worse_than_baselines_at")
                    extra.append("-" if worse is None else ",".join(map(str, worse)) or "none")
                t.add_row(
                    r["strategy"],
                    cell(r["median_to_95"]),
                    cell(r["p90_to_95"]),
                    f"{r['reached_95']:.0%}",
                    cell(r["median_to_99"]),
                    cell(r["p90_to_99"]),
                    f"{r['reached_99']:.0%}",
                    *extra,
                )
            # Piped into a log, a console is 80 columns wide and this table's headers would be cut.
            (out if out.is_terminal else Console(soft_wrap=True, width=132, file=out.file)).print(t)
        if missing:
            err.print(f"[yellow]{missing} suggested config(s) were not in the landscape (counted as rejected)[/yellow]")
        if plot is not None:
            import plotly.io as pio

            figure = regret_figure(rows, f"{path.name}: regret over {seeds} seeds")
            pio.write_html(figure, str(plot), include_plotlyjs=True)
            err.print(f"wrote {plot}")

    _run(body)


db_app = typer.Typer(no_args_is_help=True, help="autotune's own tables: migrate and inspect (Alembic).")
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade(
    storage: StorageOpt = None,
    revision: Annotated[str, typer.Option(help="target revision")] = "head",
) -> None:
    """Create or upgrade autotune's tables (Optuna's tables are never touched)."""

    def body() -> None:
        from autotune.store import current_revision, upgrade
        from autotune.tuner import safe_url

        url = _storage_url(storage, for_write=True)
        before = current_revision(url)
        upgrade(url, revision)
        after = current_revision(url)
        what = "already at" if before == after else f"upgraded from {before or 'base'} to"
        out.print(f"{safe_url(url)}: {what} revision {after}", highlight=False)

    _run(body)


@db_app.command("current")
def db_current(storage: StorageOpt = None) -> None:
    """Show the database's schema revision and the one this autotune needs."""

    def body() -> None:
        from autotune.store import current_revision, head_revision
        from autotune.tuner import safe_url

        url = _storage_url(storage, for_write=False)
        current, head = current_revision(url), head_revision()
        state = "up to date" if current == head else "behind: run `autotune db upgrade`"
        if current is not None and current != head:
            from autotune.store import check_schema

            try:
                check_schema(url)
            except AutotuneError as e:
                state = str(e)
        out.print(
            f"{safe_url(url)}: revision {current or 'base (no autotune tables)'}; head {head}; {state}", highlight=False
        )

    _run(body)


@app.command()
def dashboard(
    storage: StorageOpt = None,
    host: Annotated[str, typer.Option(help="address to bind (loopback unless you mean to share it)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="port to listen on")] = 8000,
) -> None:
    """Serve the read-only web dashboard (studies, best config, Pareto fronts, trials, JSON API)."""

    def body() -> None:
        import uvicorn

        from autotune.dashboard import create_app
        from autotune.serve import check_port
        from autotune.store.migrate import safe_url

        url = _storage_url(storage, for_write=False)
        web_app = create_app(url)  # refuses a missing SQLite file or an old schema before binding
        check_port(host, port)  # a port in use: one line and exit 2, before saying it serves
        if host not in ("127.0.0.1", "localhost", "::1"):
            err.print(f"warning: serving on {host}: anyone who can reach it can read these studies", highlight=False)
        err.print(f"autotune dashboard on http://{host}:{port}/ reading {safe_url(url)} (read-only)", highlight=False)
        try:
            uvicorn.run(web_app, host=host, port=port, log_level="warning")
        except SystemExit as e:  # uvicorn exits 1 when it cannot bind (a port taken in between)
            if e.code:
                raise AutotuneError(f"the dashboard stopped: cannot serve on {host}:{port} (see above)") from None

    _run(body, study=False)


@app.command()
def serve(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="the exported config (autotune export)")],
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port")] = 8001,
    device: Annotated[str | None, typer.Option(help="override the exported device (cpu, cuda:1)")] = None,
    strict: Annotated[
        bool, typer.Option(help="refuse to serve on other hardware or other model files than the tuned ones")
    ] = False,
    max_context: Annotated[
        int | None,
        typer.Option(min=2, help="most tokens (prompt + max_tokens) per request [default: the model's context]"),
    ] = None,
) -> None:
    """Serve the exported config: OpenAI-style /v1/completions, /v1/chat/completions, /v1/models, GET /health,
    Prometheus GET /metrics."""

    def body() -> None:
        from autotune.serve import check_port
        from autotune.serve import serve as run_server
        from autotune.verify import build_engine, load_doc

        doc = load_doc(config)
        check_port(host, port)
        if _server_engine(doc):
            _serve_engine_process(doc, host, port)
            return
        with err.status(f"loading {doc['model']} with {TrialConfig.model_validate(doc['config']).label()}…"):
            engine = _loud(lambda: build_engine(doc, device=device, strict=strict))
        err.print(f"serving {doc['model']} on http://{host}:{port} (greedy decoding; Ctrl-C drains and stops)")
        run_server(engine, host=host, port=port, model_name=doc["model"], max_context=max_context)

    _run(body, study=False)


def _server_engine(doc: dict[str, Any]) -> bool:
    """Whether the exported config runs on an engine that is a server of its own (vLLM)."""
    engine = str(doc["config"].get("engine", "builtin"))
    if engine == "builtin":
        return False
    from autotune.engines import get_engine

    return get_engine(engine).kind == "server"


def _serve_engine_process(doc: dict[str, Any], host: str, port: int) -> None:
    """Start the engine with the measured launch on ``host``:``port`` and keep it up until Ctrl-C/SIGTERM."""
    import tempfile
    import time

    from autotune.deploy import engine_launch
    from autotune.engines.server import ServerProcess

    launch = engine_launch(doc, port=port, host=host)
    engine = doc["config"]["engine"]
    log = Path(tempfile.mkdtemp(prefix=f"autotune-serve-{engine}-")) / "engine.log"
    err.print(f"starting {engine}: {' '.join(launch.argv)}", highlight=False, soft_wrap=True)
    err.print(f"its log: {log}", highlight=False)
    with ServerProcess(launch, port=port, log_path=log) as server:
        with err.status(f"waiting for {engine} to answer on http://{host}:{port}…"):
            started = server.start()
        where = f"http://{host}:{port}"
        err.print(f"serving {doc['model']} with {engine} on {where} (ready in {started:.0f} s; Ctrl-C stops)")
        while server.alive():
            time.sleep(1.0)
        server.ensure_alive()


def _start_engine_process(doc: dict[str, Any], stack: contextlib.ExitStack) -> str:
    """Start a server engine's exported config on a free loopback port (stopped when ``stack`` closes)."""
    import tempfile

    from autotune.deploy import engine_launch
    from autotune.engines.server import ServerProcess, free_port

    port = free_port()
    launch = engine_launch(doc, port=port)
    log = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="autotune-verify-"))) / "engine.log"
    server = stack.enter_context(ServerProcess(launch, port=port, log_path=log))
    with err.status(f"starting {doc['config']['engine']} with the measured launch…"):
        server.start()
    return server.url


def _replay(doc: dict[str, Any], url: str | None, device: str | None, runs: int, replays: list[Any]) -> None:
    """Replay the export's workload ``runs`` times: against ``url``, or on an engine in this process."""
    from autotune.verify import build_engine, verify_local, verify_remote

    engine = None if url else _loud(lambda: build_engine(doc, device=device))
    notes: set[str] = set()  # what a replay against a server other than autotune's could not check
    for i in range(runs):
        what = f"replay {i + 1} of {runs}: " if runs > 1 else ""
        with err.status(f"{what}replaying the workload {f'against {url}' if url else 'in this process'}…"):
            replays.append(
                verify_local(doc, engine) if engine is not None else verify_remote(doc, str(url), say=notes.add)
            )
    for note in sorted(notes):
        err.print(f"note: {note}", highlight=False)


def _loud(load: Callable[[], Any]) -> Any:
    """Run ``load``, printing the deployment loader's warnings (other hardware, other model files) as
    one ``warning:`` line each instead of Python's file:line form."""
    import warnings

    from autotune.deploy import HardwareMismatchWarning, ModelMismatchWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", HardwareMismatchWarning)
        warnings.simplefilter("always", ModelMismatchWarning)
        result = load()
    for w in caught:
        if issubclass(w.category, (HardwareMismatchWarning, ModelMismatchWarning)):
            err.print(f"[yellow]warning:[/yellow] {escape(str(w.message))}", highlight=False)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return result


@app.command()
def verify(
    config: Annotated[Path, typer.Argument(metavar="CONFIG", help="the exported config (autotune export)")],
    url: Annotated[
        str | None,
        typer.Option(help="a running OpenAI-compatible server: autotune serve, vLLM... (default: the exported engine)"),
    ] = None,
    tolerance: Annotated[float, typer.Option(min=0, max=1, help="allowed throughput shortfall")] = 0.10,
    device: Annotated[str | None, typer.Option(help="in-process only: override the exported device")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the comparison as JSON")] = False,
    runs: Annotated[
        int,
        typer.Option(
            min=1,
            max=10,
            help="replays of the workload; the one with the median throughput is compared (as the tuned figure "
            "is the median of its re-measurements: one window on a busy machine can be disturbed)",
        ),
    ] = 1,
) -> None:
    """Replay the study's workload against the deployment and compare with the tuned figures (exit 3 if short)."""

    def body() -> None:
        from autotune.verify import VerifyFailed, compare, load_doc, render

        doc = load_doc(config)
        label = TrialConfig.model_validate(doc["config"]).label()
        replays: list[Any] = []
        with contextlib.ExitStack() as stack:
            target = url or (_start_engine_process(doc, stack) if _server_engine(doc) else None)
            _replay(doc, target, device, runs, replays)
        m = sorted(replays, key=lambda r: r.output_tokens_per_s)[(len(replays) - 1) // 2]  # the (lower) median
        if runs > 1:
            each = ", ".join(f"{r.output_tokens_per_s:,.0f}" for r in replays)
            err.print(f"{runs} replays: {each} tok/s; comparing the median one", highlight=False)
        v = compare(doc, m, tolerance=tolerance)
        if as_json:
            print(json.dumps({"config": doc["config"], "measurement": m.to_dict(), **v.to_dict()}, indent=2))
        else:
            out.print(render(v, f"{label}: tuned vs measured ({url or 'in-process'})"))
        if not v.ok:
            raise VerifyFailed("; ".join(v.reasons))
        err.print(f"verified: within {tolerance:.0%} of the tuned throughput and every SLO clause met")

    _run(body)


engines_app = typer.Typer(
    help="The engines autotune can measure and deploy: its own, vLLM, CTranslate2 (`autotune engines` lists them)."
)
app.add_typer(engines_app, name="engines")


@engines_app.callback(invoke_without_command=True)
def engines_list(ctx: typer.Context) -> None:
    """List the engines, whether each is installed here, its version and where it runs from."""
    if ctx.invoked_subcommand is not None:
        return

    def body() -> None:
        from autotune.engines import ENGINES, get_engine

        t = Table("engine", "runs", "version", "where / how to install")
        for name in ENGINES:
            engine = get_engine(name)
            version = engine.version()
            describe = getattr(engine, "describe", None)
            where = str((describe() or {}).get("location", "")) if describe and version else ""
            hint = engine.install_hint() if not version else ""
            t.add_row(name, engine.kind, version or "not installed", where or hint)
        out.print(t)

    _run(body)


@engines_app.command("install")
def engines_install(
    name: Annotated[str, typer.Argument(help="the engine: vllm (its own environment) or ctranslate2")],
    force: Annotated[bool, typer.Option(help="reinstall even where it is installed")] = False,
) -> None:
    """Install an engine where autotune runs it (vLLM: its own Python environment under autotune's cache)."""

    def body() -> None:
        from autotune.engines import ENGINES, get_engine

        if name not in ENGINES:
            raise SpecError(f"unknown engine {name!r}; engines: {', '.join(ENGINES)}")
        engine = get_engine(name)
        install = getattr(engine, "install", None)
        if install is None:
            version = engine.version()
            if version is None:
                raise AutotuneError(f"engine {name} installs into autotune's environment: {engine.install_hint()}")
            out.print(f"{name} {version} is installed ({engine.install_hint()})", highlight=False)
            return
        where = install(force=force)
        out.print(f"{name} {engine.version()} installed in {where}", highlight=False)

    _run(body)


@app.command()
def presets() -> None:
    """List the models that need no download: shipped trained models (builtin:) and presets (random weights)."""
    from autotune.models import BUILTIN_PREFIX, builtin_models, builtin_path
    from autotune.presets import PRESETS

    t = Table("model", "parameters", "description")
    for name in builtin_models():
        path = builtin_path(BUILTIN_PREFIX + name)
        assert path is not None
        meta = json.loads((path / "training.json").read_text()) if (path / "training.json").is_file() else {}
        params = f"{meta['parameters'] / 1e6:,.1f}M" if "parameters" in meta else "?"
        what = "shipped trained model (the quickstart's); real weights, " + (
            f"trained by `{meta['command']}`" if "command" in meta else "trained by autotune's authors"
        )
        t.add_row(f"{BUILTIN_PREFIX}{name}", params, what)
    for name, p in PRESETS.items():
        t.add_row(f"preset:{name}", f"{p.approx_parameters / 1e6:,.1f}M", p.description)
    out.print(t)


@app.command()
def schema() -> None:
    """Print the JSON Schema of the exported config file (what `load_engine` and `serve` accept)."""
    from autotune.deploy import SCHEMA_FILE

    print(SCHEMA_FILE.read_text(encoding="utf-8"), end="")


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, _on_sigterm)  # `kill`, a scheduler, a container stop: as Ctrl-C
    from autotune import devicelock

    devicelock.notify = lambda message: err.print(escape(message), highlight=False)
    try:
        app()
    except SystemExit as e:
        sys.exit(e.code)


if __name__ == "__main__":
    main()
