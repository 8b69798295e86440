"""`cdcflow compact`: keep the Delta tables fast (run on a schedule, beside the streaming job).

Per silver table: OPTIMIZE (bin-packing to the table's target file size, Z-ORDER by its configured
columns), garbage-collect tombstones of hard-delete tables older than their retention, then VACUUM.
Bronze and quarantine are optimized too. The streaming job keeps committing meanwhile; a commit
conflict (ConcurrentAppendException and friends) is retried with backoff, so compaction never breaks
the stream and the stream never breaks compaction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from delta.tables import DeltaTable
from pyspark.sql import SparkSession
from pyspark.sql import functions as F
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

from cdcflow.config import Project
from cdcflow.runtime import forget_delta_table

log = logging.getLogger("cdcflow.compact")


def _conflict(exc: BaseException) -> bool:
    return any(s in f"{type(exc).__name__} {exc}" for s in ("Concurrent", "ProtocolChanged", "MetadataChanged"))


_retry = retry(retry=retry_if_exception(_conflict), stop=stop_after_attempt(6),
               wait=wait_exponential(multiplier=0.5, max=15), reraise=True)  # fmt: skip


@dataclass
class CompactResult:
    table: str
    files_before: int = 0
    files_after: int = 0
    tombstones_removed: int = 0
    vacuumed: bool = False
    notes: list[str] = field(default_factory=list)


def _files(spark: SparkSession, path: str) -> int:
    return spark.sql(f"DESCRIBE DETAIL delta.`{path}`").first()["numFiles"]


@_retry
def optimize(spark: SparkSession, path: str, zorder: list[str], target_mb: int) -> None:
    spark.conf.set("spark.databricks.delta.optimize.maxFileSize", str(target_mb * 1024 * 1024))
    builder = DeltaTable.forPath(spark, path).optimize()
    if zorder:
        builder.executeZOrderBy(*zorder)
    else:
        builder.executeCompaction()


@_retry
def gc_tombstones(spark: SparkSession, path: str, retention_hours: int, now: datetime) -> int:
    """Remove tombstones whose delete is older than the retention (hard-delete tables only)."""
    cutoff = (now - timedelta(hours=retention_hours)).replace(tzinfo=None)
    table = DeltaTable.forPath(spark, path)
    old = table.toDF().filter(F.col("_is_deleted") & (F.col("_deleted_at") < F.lit(cutoff)))
    n = old.count()
    if n:
        table.delete(F.col("_is_deleted") & (F.col("_deleted_at") < F.lit(cutoff)))
    return n


def vacuum(spark: SparkSession, path: str, retention_hours: int) -> None:
    DeltaTable.forPath(spark, path).vacuum(retention_hours)


def vacuum_listing_tasks(spark: SparkSession) -> int:
    """Tasks of the Spark job in which VACUUM lists a table's folders. Spark's default, 10,000, meant
    20-30 s of empty tasks per small table on 2 cores (hours for 1000 tables); a task per core lists
    as fast (`benchmarks/compaction.py`)."""
    return spark.sparkContext.defaultParallelism


def compact(spark: SparkSession, project: Project, tables: list[str] | None = None, now: datetime | None = None,
            vacuum_hours: int = 168) -> list[CompactResult]:
    now = now or datetime.now(UTC)
    spark.conf.set("spark.sql.sources.parallelPartitionDiscovery.parallelism", str(vacuum_listing_tasks(spark)))
    if vacuum_hours < 168:  # Delta refuses short retention unless told it's deliberate
        spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
    results = []
    targets = [(n, project.table(n)) for n in (tables or sorted(project.tables))]
    for name, t in targets:
        path = project.path(t.delta_path)
        try:
            if not DeltaTable.isDeltaTable(spark, path):
                continue
            r = CompactResult(name, files_before=_files(spark, path))
            if t.deletes == "hard":
                r.tombstones_removed = gc_tombstones(spark, path, t.tombstone_retention_hours, now)
            optimize(spark, path, list(t.cfg.delta.zorder_by), t.target_file_size_mb)
            vacuum(spark, path, vacuum_hours)
            r.vacuumed = True
            r.files_after = _files(spark, path)
            results.append(r)
        finally:
            forget_delta_table(spark, path)  # one table at a time: 1000 tables must not pile up in heap
    for extra in ("bronze", "quarantine"):
        path = project.path(extra)
        if tables is None and DeltaTable.isDeltaTable(spark, path):
            r = CompactResult(extra, files_before=_files(spark, path))
            optimize(spark, path, [], project.pipeline.defaults.target_file_size_mb)
            vacuum(spark, path, vacuum_hours)
            r.vacuumed = True
            r.files_after = _files(spark, path)
            results.append(r)
    return results
