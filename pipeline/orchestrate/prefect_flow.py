"""The nightly Prefect flow: the declared steps of `pipeline.orchestrate.nightly` (`NIGHTLY`) as tasks.

Why batches, not records: Prefect's overhead is per task run (tens of milliseconds), so a task per
conversation would cost more than the work. Tasks take no cache (inputs are large and every run
is new data) and keep no results: the state database, not Prefect, is what makes runs resumable.
Local runs need no server: Prefect starts a temporary one for the duration of the run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pipeline.orchestrate.prefect_api  # noqa: F401  (Prefect's environment defaults, before Prefect loads)

# isort: split
from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from pipeline.config import Config, FlowConfig, load_config  # noqa: E402
from pipeline.orchestrate import nightly as steps  # noqa: E402
from pipeline.orchestrate.batch import BatchResult  # noqa: E402
from pipeline.orchestrate.lock import run_lock  # noqa: E402
from pipeline.orchestrate.steps import Components  # noqa: E402
from pipeline.text.segment import shared_segmenter  # noqa: E402


def _task(step: steps.RunStep):
    # No cache (inputs are large and every run is new data) and no stored results: the state
    # database, not Prefect, is what makes runs resumable.
    return task(name=step.name, cache_policy=NO_CACHE, persist_result=False)(step.run)


_COMPONENTS: dict[str, Components] = {}


def _components(ctx: steps.RunContext) -> Components:
    """The run's components, built once per worker process (a Dask worker is another process)
    and reused by every batch task of the run; the segmenter's pool is shared per process."""
    if ctx.run not in _COMPONENTS:
        _COMPONENTS.clear()
        _COMPONENTS[ctx.run] = Components.from_config(ctx.cfg, shared_segmenter(ctx.cfg))
    return _COMPONENTS[ctx.run]


def _process_part(ctx: steps.RunContext, part: steps.Part, n: int) -> BatchResult:
    return steps.process_part(ctx, _components(ctx), part, n)


def _each_batch(ctx: steps.RunContext, step: steps.RunStep, parts: list[steps.Part]) -> Iterator[BatchResult]:
    """One task per batch, all submitted at once (a parallel task runner runs them side by side),
    results in part order."""
    run_part = task(name=f"{step.name}-batch", cache_policy=NO_CACHE, persist_result=False)(_process_part)
    futures = [run_part.submit(ctx, part, n) for n, part in enumerate(parts)]
    return (f.result() for f in futures)


def run_declared(ctx: steps.RunContext) -> dict[str, Any]:
    """`steps.NIGHTLY` as Prefect tasks, through the loop the plain runner uses."""
    return steps.run_declared(
        ctx, lambda step, night: _task(step)(night), lambda step, chunk, parts: _each_batch(chunk, step, parts)
    )


@flow(name="casemine-nightly", log_prints=False, validate_parameters=False)
def nightly(
    input_dir: str | None = None,
    out: str | None = None,
    config_path: str | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Process the transcripts that arrived since the last run and store their cases.

    `overrides` replaces config fields per section, e.g. {"flow": {"batch_size": 500}}. Holds the
    output root's lock for the whole run (re-entrant: `casemine run` already holds it)."""
    cfg: Config = load_config(config_path)
    if overrides:
        cfg = cfg.with_overrides(**overrides)
    if cfg.flow.task_runner == "dask":
        # Dask already runs batches in parallel; a process pool per batch inside a worker would
        # oversubscribe the cores (and daemonic worker processes cannot start one).
        cfg = cfg.with_overrides(segment={"processes": 1})
    input_path = Path(input_dir) if input_dir else cfg.resolve(cfg.paths.input)
    out_path = Path(out) if out else cfg.resolve(cfg.paths.out)
    with run_lock(out_path, command="casemine-nightly flow"):
        ctx = steps.start_run(cfg, input_path, out_path, runner=f"Prefect flow ({cfg.flow.task_runner} task runner)")
        try:
            return run_declared(ctx)
        finally:
            ctx.close()


def task_runner(fc: FlowConfig):
    """The configured task runner: Prefect's default, or Dask (an existing scheduler, or a
    LocalCluster started for the run)."""
    if fc.task_runner != "dask":
        return None
    from prefect_dask import DaskTaskRunner

    if fc.dask_address:
        return DaskTaskRunner(address=fc.dask_address)
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": fc.dask_workers,
            "processes": fc.dask_processes,
            "threads_per_worker": 1,
            "dashboard_address": ":0",
        }
    )


def flow_for(cfg: Config):
    """`nightly` with the task runner the config asks for."""
    runner = task_runner(cfg.flow)
    return nightly if runner is None else nightly.with_options(task_runner=runner)


def serve_nightly(config_path: str | None = None) -> None:
    """Register the nightly deployment with its cron schedule and serve it (blocks).

    Against a running `prefect server start` (PREFECT_API_URL set) this schedules real nightly runs;
    against Prefect's temporary server it registers but nothing triggers the schedule.
    """
    from prefect.schedules import Cron

    cfg = load_config(config_path)
    flow_for(cfg).serve(
        name="nightly",
        schedule=Cron(cfg.flow.schedule_cron, timezone=cfg.flow.schedule_timezone),
        parameters={"config_path": config_path},
    )
