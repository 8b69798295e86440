"""`cdcflow compact`: keep the Delta tables fast (run on a schedule, beside the streaming job).

Only what needs it: every table's (and every bronze / quarantine partition's) file sizes come from the
Delta log, so a healthy table is skipped without reading its data. A table with enough small files
(`defaults.compaction`, per table `delta.compaction`) is bin-packed to its target file size (Z-ORDER by
its configured columns), hard-delete tombstones older than their retention are removed, then VACUUM.
Bronze is compacted per (table, date) partition: closed days with more than one file, today's only
with enough small files.

Each table is compacted by the writer that commits it (`cdcflow.cdc.apply.silver_writer`): delta-rs
for the small silver tables it writes, Spark for the others and for bronze and quarantine (appended by
Spark), so every commit to a table goes through one commit protocol. The stream keeps committing
meanwhile; a commit conflict is retried with backoff, so compaction never breaks the stream and the
stream never breaks compaction.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta

from delta.tables import DeltaTable
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from batch.full_load import RawStore
from cdcflow.cdc.apply import retry_commit_conflicts, rs_uri, silver_writer
from cdcflow.config import Project
from cdcflow.config.models import CompactionThresholds
from cdcflow.errors import UserError
from cdcflow.runtime import forget_delta_table

log = logging.getLogger("cdcflow.compact")
MB = 1024 * 1024


_retry = retry_commit_conflicts


@dataclass
class CompactResult:
    table: str
    partition: str | None = None  # "table=<t>/date=<d>" for a bronze / quarantine partition
    engine: str = ""
    action: str = ""  # "compacted" or why it was skipped
    files_before: int = 0
    bytes_before: int = 0
    files_after: int = 0
    bytes_after: int = 0
    files_removed: int = 0
    bytes_rewritten: int = 0
    tombstones_removed: int = 0
    vacuumed: bool = False
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Files:
    """A table's (or partition's) live data files, from the Delta log."""

    sizes: tuple[int, ...]

    def small(self, limits: CompactionThresholds) -> int:
        return sum(1 for s in self.sizes if s < limits.small_file_mb * MB)

    def needs_work(self, limits: CompactionThresholds) -> bool:
        small = self.small(limits)
        return small >= limits.min_small_files and small >= limits.small_file_share * max(1, len(self.sizes))

    def why_healthy(self, limits: CompactionThresholds) -> str:
        return f"skipped: {self.small(limits)} small of {len(self.sizes)} files"


def log_files(path: str, partition_by: tuple[str, ...] = ()) -> dict[tuple, Files] | None:
    """Live files per partition (key () when unpartitioned) read from the log by delta-rs, or None
    when there is no table (or delta-rs can't read it: then the caller compacts with Spark)."""
    import pyarrow as pa
    from deltalake import DeltaTable as RsTable


    try:
        actions = pa.table(RsTable(rs_uri(path)).get_add_actions(flatten=True))
    except Exception:  # noqa: BLE001 - no table, or one delta-rs can't read
        return None
    sizes = actions["size_bytes"].to_pylist()
    keys = list(zip(*[actions[f"partition.{p}"].to_pylist() for p in partition_by], strict=True)) \
        if partition_by else [()] * len(sizes)
    grouped: dict[tuple, list[int]] = defaultdict(list)
    for k, s in zip(keys, sizes, strict=True):
        grouped[tuple(str(v) for v in k)].append(s)
    return {k: Files(tuple(v)) for k, v in grouped.items()}


# ------------------------------------------------------------ Spark (tables Spark writes)


def _files(spark: SparkSession, path: str) -> tuple[int, int]:
    d = spark.sql(f"DESCRIBE DETAIL delta.`{path}`").first()
    return d["numFiles"], d["sizeInBytes"]


@_retry
def optimize(spark: SparkSession, path: str, zorder: list[str], target_mb: int, where: str | None = None) -> None:
    spark.conf.set("spark.databricks.delta.optimize.maxFileSize", str(target_mb * MB))
    builder = DeltaTable.forPath(spark, path).optimize()
    if where:
        builder = builder.where(where)
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


@_retry
def vacuum(spark: SparkSession, path: str, retention_hours: int) -> None:
    DeltaTable.forPath(spark, path).vacuum(retention_hours)


def vacuum_listing_tasks(spark: SparkSession) -> int:
    """Tasks of the Spark job in which VACUUM lists a table's folders. Spark's default, 10,000, meant
    20-30 s of empty tasks per small table on 2 cores (hours for 1000 tables); a task per core lists
    as fast (`benchmarks/compaction.py`)."""
    return spark.sparkContext.defaultParallelism


# ------------------------------------------------------------ delta-rs (small silver tables it writes)


@_retry
def _rs_gc_tombstones(path: str, retention_hours: int, now: datetime) -> int:
    from deltalake import DeltaTable as RsTable


    cutoff = (now - timedelta(hours=retention_hours)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    metrics = RsTable(rs_uri(path)).delete(f"_is_deleted AND _deleted_at < '{cutoff}'")
    return int(metrics.get("num_deleted_rows") or 0)


@_retry
def _rs_optimize(path: str, zorder: list[str], target_mb: int) -> dict:
    from deltalake import DeltaTable as RsTable


    opt = RsTable(rs_uri(path)).optimize
    return opt.z_order(zorder, target_size=target_mb * MB) if zorder else opt.compact(target_size=target_mb * MB)


@_retry
def _rs_vacuum(path: str, retention_hours: int) -> None:
    from deltalake import DeltaTable as RsTable


    # the floor is checked by `compact` (defaults.vacuum_min_retention_hours), not by delta-rs' own
    RsTable(rs_uri(path)).vacuum(retention_hours=retention_hours, dry_run=False, enforce_retention_duration=False)


# ------------------------------------------------------------ the job


class Stop:
    """Set by SIGTERM in `--every` mode: the run ends between tables."""

    requested = False


def check_retention(project: Project, vacuum_hours: int, allow_short_retention: bool) -> None:
    floor = project.pipeline.defaults.vacuum_min_retention_hours
    if vacuum_hours < floor and not allow_short_retention:
        raise UserError(f"VACUUM retention {vacuum_hours} h is below the {floor} h floor that running streams and "
                        f"readers need (defaults.vacuum_min_retention_hours); --allow-short-retention overrides it")


def compact(spark: SparkSession, project: Project, tables: list[str] | None = None, now: datetime | None = None,
            vacuum_hours: int = 168, allow_short_retention: bool = False,
            progress: Callable[[CompactResult], None] | None = None) -> list[CompactResult]:
    """Compact what needs it; returns one result per table and per bronze / quarantine partition."""
    check_retention(project, vacuum_hours, allow_short_retention)
    now = now or datetime.now(UTC)
    spark.conf.set("spark.sql.sources.parallelPartitionDiscovery.parallelism", str(vacuum_listing_tasks(spark)))
    if vacuum_hours < 168:  # allowed above: Delta refuses short retention unless told it's deliberate
        spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
    results: list[CompactResult] = []

    def done(r: CompactResult, started: float) -> None:
        r.seconds = round(time.perf_counter() - started, 3)
        results.append(r)
        if progress:
            progress(r)

    for name in tables or sorted(project.tables):
        if Stop.requested:
            break
        t = project.table(name)
        path = project.path(t.delta_path)
        started = time.perf_counter()
        try:
            r = _compact_silver(spark, path, t, now, vacuum_hours)
        finally:
            forget_delta_table(spark, path)  # one table at a time: 1000 tables must not pile up in heap
        if r is not None:
            done(r, started)
    if tables is None:
        for extra in ("bronze", "quarantine"):
            partitioned = ("table", "date") if extra == "bronze" else ()
            for r, started in _compact_appended(spark, project, extra, partitioned, now, vacuum_hours):
                done(r, started)
        if not Stop.requested:
            started = time.perf_counter()
            days = project.pipeline.dms.archive_expire_days
            r = CompactResult("raw archive", engine="files")
            try:
                r.files_removed = RawStore(project).expire_archive(now - timedelta(days=days))
                r.action = f"{r.files_removed} archived raw files older than {days} days deleted"
            except Exception as e:  # noqa: BLE001 - the raw store is another system: report, don't fail the run
                log.warning("raw archive not expired: %s", e)
                r.action = f"not expired: {type(e).__name__}"
            done(r, started)
    return results


def _compact_silver(spark: SparkSession, path: str, t, now: datetime, vacuum_hours: int) -> CompactResult | None:
    files = log_files(path)
    writer, _ = silver_writer(path, t)
    if files is None and not DeltaTable.isDeltaTable(spark, path):
        return None
    before = files.get((), Files(())) if files is not None else None
    r = CompactResult(t.name, engine=writer)
    if before is not None:
        r.files_before, r.bytes_before = len(before.sizes), sum(before.sizes)
        if not before.needs_work(t.compaction):
            r.action = before.why_healthy(t.compaction)
            r.files_after, r.bytes_after = r.files_before, r.bytes_before
            return r
    zorder = list(t.cfg.delta.zorder_by)
    if writer == "delta-rs":
        if t.deletes == "hard":
            r.tombstones_removed = _rs_gc_tombstones(path, t.tombstone_retention_hours, now)
        m = _rs_optimize(path, zorder, t.target_file_size_mb)
        removed = m.get("filesRemoved") or {}
        removed = json.loads(removed) if isinstance(removed, str) else removed  # a JSON text in delta-rs 1.x
        r.files_removed, r.bytes_rewritten = int(m.get("numFilesRemoved", 0)), int(removed.get("totalSize", 0))
        _rs_vacuum(path, vacuum_hours)
    else:
        if before is None:
            r.files_before, r.bytes_before = _files(spark, path)
        if t.deletes == "hard":
            r.tombstones_removed = gc_tombstones(spark, path, t.tombstone_retention_hours, now)
        optimize(spark, path, zorder, t.target_file_size_mb)
        r.files_removed, r.bytes_rewritten = r.files_before, r.bytes_before
        vacuum(spark, path, vacuum_hours)
    r.vacuumed = True
    after = (log_files(path) or {}).get((), None)
    r.files_after, r.bytes_after = (len(after.sizes), sum(after.sizes)) if after else _files(spark, path)
    r.action = "compacted"
    return r


def _compact_appended(spark: SparkSession, project: Project, name: str, partitioned: tuple[str, ...],
                      now: datetime, vacuum_hours: int):
    """Bronze / quarantine (Spark appends them): per partition, closed days with more than one file and
    open ones with enough small files; one VACUUM for the table when anything was rewritten."""
    path = project.path(name)
    parts = log_files(path, partitioned)
    if parts is None:
        return
    limits = project.pipeline.defaults.compaction
    today = now.astimezone(UTC).date()
    rewritten = False
    target = project.pipeline.defaults.target_file_size_mb
    try:
        for key, files in sorted(parts.items()):
            if Stop.requested:
                break
            started = time.perf_counter()
            label = "/".join(f"{c}={v}" for c, v in zip(partitioned, key, strict=True)) or None
            r = CompactResult(name, partition=label, engine="spark", files_before=len(files.sizes),
                              bytes_before=sum(files.sizes))
            closed = partitioned and date.fromisoformat(key[1]) < today
            if not (closed and len(files.sizes) > 1) and not files.needs_work(limits):
                r.action = "skipped: closed, one file" if closed else files.why_healthy(limits)
                r.files_after, r.bytes_after = r.files_before, r.bytes_before
                yield r, started
                continue
            where = " AND ".join(f"`{c}` = '{v}'" for c, v in zip(partitioned, key, strict=True)) or None
            optimize(spark, path, [], target, where)
            rewritten = True
            after = (log_files(path, partitioned) or {}).get(key, Files(()))
            r.files_after, r.bytes_after = len(after.sizes), sum(after.sizes)
            r.files_removed, r.bytes_rewritten, r.action = r.files_before, r.bytes_before, "compacted"
            yield r, started
        if rewritten:
            vacuum(spark, path, vacuum_hours)
    finally:
        forget_delta_table(spark, path)


def report(results: list[CompactResult], started: datetime, seconds: float) -> dict:
    """The run as JSON (written under `<lake>/_reports/compaction/`)."""
    return {
        "started": started.isoformat(), "seconds": round(seconds, 3),
        "tables_compacted": sum(1 for r in results if r.action == "compacted"),
        "tables_skipped": sum(1 for r in results if r.action.startswith("skipped")),
        "raw_archive_expired": sum(r.files_removed for r in results if r.table == "raw archive"),
        "files_removed": sum(r.files_removed for r in results if r.table != "raw archive"),
        "bytes_rewritten": sum(r.bytes_rewritten for r in results),
        "results": [asdict(r) for r in results],
    }  # fmt: skip


def emit_metrics(metrics, summary: dict) -> None:
    """CloudWatch EMF: what a run did, for the compaction dashboard and alarms."""
    metrics.emit({"FilesRemoved": summary["files_removed"], "BytesRewritten": summary["bytes_rewritten"],
                  "TablesSkipped": summary["tables_skipped"], "TablesCompacted": summary["tables_compacted"],
                  "CompactionDuration": summary["seconds"]},
                 {"Job": "compaction"}, units={"BytesRewritten": "Bytes", "CompactionDuration": "Seconds"})
