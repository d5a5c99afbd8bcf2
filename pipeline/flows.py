"""The nightly Prefect flow: the steps of `pipeline.run` as tasks over whole batches.

Why batches, not records: Prefect's overhead is per task run (tens of milliseconds), so a task per
conversation would cost more than the work. Tasks take no cache (inputs are large and every run
is new data) and keep no results: the state database, not Prefect, is what makes runs resumable.
Local runs need no server: Prefect starts a temporary one for the duration of the run.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pipeline.prefect_api  # noqa: F401  (Prefect's environment defaults, before Prefect loads)
import pandas as pd  # noqa: E402
from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from pipeline import run as steps  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402
from pipeline.lock import run_lock  # noqa: E402
from pipeline.process import BatchResult  # noqa: E402
from pipeline.progress import progress  # noqa: E402
from pipeline.schema import Conversation  # noqa: E402
from pipeline.segment import shared_segmenter  # noqa: E402


@task(name="ingest", cache_policy=NO_CACHE, persist_result=False)
def ingest_task(ctx: steps.RunContext) -> steps.IngestResult:
    return steps.ingest(ctx)


@task(name="process-batch", cache_policy=NO_CACHE, persist_result=False)
def process_task(ctx: steps.RunContext, batch: list[Conversation], part: int) -> BatchResult:
    res = steps.process_and_classify(ctx, batch, shared_segmenter(ctx.cfg))
    steps.store(ctx, res.cases, part)
    return res


@task(name="embed-and-index", cache_policy=NO_CACHE, persist_result=False)
def index_task(ctx: steps.RunContext, results: list[BatchResult]) -> dict[str, Any]:
    cases = _all_cases(results)
    return steps.index(ctx, cases) if len(cases) else {"added": 0, "replaced": 0}


@task(name="export", cache_policy=NO_CACHE, persist_result=False)
def export_task(ctx: steps.RunContext) -> dict[str, Any]:
    return steps.export(ctx)


@task(name="library-candidates", cache_policy=NO_CACHE, persist_result=False)
def library_task(ctx: steps.RunContext) -> dict[str, Any]:
    return steps.refresh_library(ctx)


def _all_cases(results: list[BatchResult]) -> pd.DataFrame:
    return pd.concat([r.cases for r in results], ignore_index=True) if results else \
        pd.DataFrame(columns=steps.EMPTY_CASE_COLUMNS)


@task(name="commit", cache_policy=NO_CACHE, persist_result=False)
def commit_task(ctx: steps.RunContext, ing: steps.IngestResult, results: list[BatchResult],
                index_summary: dict[str, Any]) -> dict[str, Any]:
    rejected = [q for r in results for q in r.rejected]
    cases = _all_cases(results)
    pii: Counter = Counter()
    for r in results:
        pii.update(r.pii_counts)
        for k, v in r.seconds.items():
            ctx.seconds[k] = ctx.seconds.get(k, 0.0) + v
    qpath = steps.commit(ctx, ing, rejected, cases)
    progress("commit", 1, 1)
    extra = {"index": index_summary, "classification": steps.classification_summary(cases)}
    if len(cases) or not steps.derived_outputs_current(ctx.out):
        extra["exports"] = export_task(ctx)
        extra["library"] = library_task(ctx)
        steps.mark_derived_current(ctx.out)
    else:
        extra.update(steps.after_commit(ctx, cases))
    return steps.summarize(ctx, ing, rejected, cases, pii, sum(r.chars_segmented for r in results), extra, qpath=qpath)


@flow(name="casemine-nightly", log_prints=False, validate_parameters=False)
def nightly(input_dir: str | None = None, out: str | None = None, config_path: str | None = None,
            overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
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
        ing = ingest_task(ctx)
        parts = steps.batches(ing.accepted, cfg.flow.batch_size)
        futures = [process_task.submit(ctx, batch, n) for n, batch in enumerate(parts)]
        results = []
        for n, f in enumerate(futures):
            results.append(f.result())
            progress("process", sum(map(len, parts[:n + 1])), len(ing.accepted))
        return commit_task(ctx, ing, results, index_task(ctx, results))


def task_runner(cfg: Config):
    """The configured task runner: Prefect's default, or Dask (an existing scheduler, or a
    LocalCluster started for the run)."""
    if cfg.flow.task_runner != "dask":
        return None
    from prefect_dask import DaskTaskRunner

    if cfg.flow.dask_address:
        return DaskTaskRunner(address=cfg.flow.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": cfg.flow.dask_workers, "processes": cfg.flow.dask_processes,
                                          "threads_per_worker": 1, "dashboard_address": ":0"})


def flow_for(cfg: Config):
    """`nightly` with the task runner the config asks for."""
    runner = task_runner(cfg)
    return nightly if runner is None else nightly.with_options(task_runner=runner)


def serve_nightly(config_path: str | None = None) -> None:
    """Register the nightly deployment with its cron schedule and serve it (blocks).

    Against a running `prefect server start` (PREFECT_API_URL set) this schedules real nightly runs;
    against Prefect's temporary server it registers but nothing triggers the schedule.
    """
    from prefect.schedules import Cron

    cfg = load_config(config_path)
    flow_for(cfg).serve(name="nightly", schedule=Cron(cfg.flow.schedule_cron, timezone=cfg.flow.schedule_timezone),
                  parameters={"config_path": config_path})
