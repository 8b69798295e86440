"""The long-running streaming job: one Structured Streaming query for all tables, foreachBatch apply.

`run_stream` is what `cdcflow stream` and the Glue entry point call; only the source differs.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass, field

from pyspark.sql import DataFrame, SparkSession

from cdcflow.config import Project, join_uri
from cdcflow.metrics import MetricsSink
from cdcflow.transform_check import require_valid_transforms
from streaming.dq import as_rows
from streaming.processor import BatchProcessor, TableOutcome

log = logging.getLogger("cdcflow.stream")


@dataclass
class StreamSummary:
    batches: int
    rows_read: int
    rows_applied: int
    rows_quarantined: int
    tables: dict[str, TableOutcome]
    quarantined_by_rule: dict[str, dict[str, int]] = field(default_factory=dict)  # table -> rule -> rows
    dq: list[dict] = field(default_factory=list)  # per table and raw->staging rule over the run (streaming.dq)
    dq_reports: list[str] = field(default_factory=list)  # the DQ report files written (_reports/dq/)


def checkpoint_location(project: Project, name: str = "stream") -> str:
    return join_uri(project.checkpoint_root, project.pipeline.name, name)


def run_stream(
    spark: SparkSession,
    project: Project,
    source: DataFrame,
    *,
    until_caught_up: bool = False,
    available_now: bool = False,
    trigger_seconds: int | None = None,
    checkpoint: str | None = None,
    metrics: MetricsSink | None = None,
    processor: BatchProcessor | None = None,
    idle_batches_to_stop: int = 2,
) -> StreamSummary:
    """Run the query. SIGTERM/SIGINT stop it gracefully after the current batch.

    until_caught_up: stop once the source has no new data (file sources use Trigger.AvailableNow;
    Kinesis stops after the source reported no new data for `idle_batches_to_stop` trigger intervals).
    """
    require_valid_transforms(spark, project, ("raw_to_staging",))
    processor = processor or BatchProcessor(spark, project, metrics)
    totals = {"batches": 0, "read": 0, "applied": 0, "quarantined": 0}
    tables: dict[str, TableOutcome] = {}
    by_rule: dict[str, dict[str, int]] = {}

    running = {"batch": -1, "busy": False}  # the batch `on_batch` last entered, and whether it is in it

    def on_batch(df: DataFrame, batch_id: int) -> None:
        running["batch"], running["busy"] = batch_id, True
        try:
            outcomes = processor.process(df, batch_id)
        finally:
            running["busy"] = False
        totals["batches"] += 1
        for o in outcomes:
            totals["read"] += o.read
            totals["applied"] += o.applied
            totals["quarantined"] += o.quarantined
            first = o.table not in tables
            agg = tables.setdefault(o.table, TableOutcome(o.table))
            agg.read += o.read
            agg.applied += o.applied
            agg.quarantined += o.quarantined
            agg.late += o.late
            agg.duplicates += o.duplicates
            agg.isolated = agg.isolated or o.isolated
            agg.shared_plan = o.shared_plan if first else agg.shared_plan and o.shared_plan  # in every batch
            agg.writer = o.writer or agg.writer
            agg.schema_warnings += o.schema_warnings
            agg.reload_warning = o.reload_warning or agg.reload_warning
            rules = by_rule.setdefault(o.table, {})
            for q in o.quarantine_rows:  # (table, rule, ...)
                rules[q[1]] = rules.get(q[1], 0) + 1

    writer = source.writeStream.foreachBatch(on_batch).option(
        "checkpointLocation", checkpoint or checkpoint_location(project)
    )
    if available_now:
        writer = writer.trigger(availableNow=True)
    else:
        secs = project.pipeline.streaming.trigger_seconds if trigger_seconds is None else trigger_seconds
        writer = writer.trigger(processingTime=f"{secs} seconds")
    query = writer.start()

    stop_requested = threading.Event()

    def request_stop(signum, _frame) -> None:
        log.warning("signal %s: stopping after the current batch", signum)
        stop_requested.set()

    old = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            old[sig] = signal.signal(sig, request_stop)

    def between_batches(status: dict) -> bool:
        """No batch in flight: the last one `on_batch` entered is committed (a query's progress is
        reported after its commit). A batch that outlasts the trigger interval is followed at once by the
        next, so "no trigger active" is almost never seen then: stopping on it alone let a signalled
        stream run on to the end of its backlog. `stop()` here interrupts at most the next batch's
        planning, which nothing has been applied from (a restart plans it again)."""
        if running["busy"]:
            return False
        if not status["isTriggerActive"]:
            return True
        last = query.lastProgress
        return last is not None and last["batchId"] >= running["batch"]

    secs = project.pipeline.streaming.trigger_seconds if trigger_seconds is None else trigger_seconds
    idle_for = max(idle_batches_to_stop * secs, 3.0)
    try:
        idle_since: float | None = None
        while query.isActive:
            status = query.status
            if stop_requested.is_set():
                if between_batches(status):
                    query.stop()
                    break
                time.sleep(0.02)  # catch the gap between a commit and the next batch's start
                continue
            # Caught up: no batch running and the source reports nothing new, for a few triggers.
            if until_caught_up and not available_now and query.lastProgress is not None:
                if not status["isTriggerActive"] and not status["isDataAvailable"]:
                    idle_since = idle_since or time.monotonic()
                    if time.monotonic() - idle_since >= idle_for:
                        query.stop()
                        break
                else:
                    idle_since = None
            time.sleep(0.2)
        query.awaitTermination()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        processor.dq.flush()  # the last (partial) window's DQ report
    return StreamSummary(totals["batches"], totals["read"], totals["applied"], totals["quarantined"], tables, by_rule,
                         as_rows(processor.dq.run), list(processor.dq.reports))
