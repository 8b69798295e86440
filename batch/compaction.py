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

After each table (compacted or skipped), and for bronze and quarantine, the table's symlink manifests
(`_symlink_format_manifest/`, what Redshift Spectrum reads) are rewritten from the Delta log by
delta-rs, after that table's VACUUM: Spectrum sees the snapshot of the last pass, and a manifest never
lists a file VACUUM deleted while passes run closer together than the VACUUM retention (168 h floor).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from delta.tables import DeltaTable
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from batch.full_load import RawStore
from cdcflow.catalog import glue_table_name
from cdcflow.cdc.apply import retry_commit_conflicts, rs_table, rs_uri, silver_writer
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
    manifest: str = ""  # the Spectrum manifest: "written", "unchanged", "removed" or "skipped: <why>"
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

    try:
        actions = pa.table(rs_table(path).get_add_actions(flatten=True))
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
def optimize(spark: SparkSession, path: str, zorder: list[str], target_mb: int, where: str | None = None) -> tuple[int, int]:
    """OPTIMIZE (or Z-ORDER); (files removed, bytes removed) from its own metrics: a partition of one
    file, or files another writer compacted first, are left as they are and count 0."""
    spark.conf.set("spark.databricks.delta.optimize.maxFileSize", str(target_mb * MB))
    builder = DeltaTable.forPath(spark, path).optimize()
    if where:
        builder = builder.where(where)
    result = builder.executeZOrderBy(*zorder) if zorder else builder.executeCompaction()
    m = result.first()["metrics"]
    return int(m["numFilesRemoved"]), int(m["filesRemoved"]["totalSize"] or 0)


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
    cutoff = (now - timedelta(hours=retention_hours)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    metrics = rs_table(path).delete(f"_is_deleted AND _deleted_at < '{cutoff}'")
    return int(metrics.get("num_deleted_rows") or 0)


@_retry
def _rs_optimize(path: str, zorder: list[str], target_mb: int) -> dict:
    opt = rs_table(path).optimize
    return opt.z_order(zorder, target_size=target_mb * MB) if zorder else opt.compact(target_size=target_mb * MB)


@_retry
def _rs_vacuum(path: str, retention_hours: int) -> None:
    # the floor is checked by `compact` (defaults.vacuum_min_retention_hours), not by delta-rs' own
    rs_table(path).vacuum(retention_hours=retention_hours, dry_run=False, enforce_retention_duration=False)


# ------------------------------------------------------------ symlink manifests (Redshift Spectrum)

MANIFEST_DIR = "_symlink_format_manifest"
HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
DV_SKIP = ("skipped: deletion vectors enabled (reader feature deletionVectors): a manifest lists whole "
           "files, so Spectrum would read rows the table has deleted")


@dataclass(frozen=True)
class Manifests:
    """What `write_manifests` did: per manifest folder ("" unpartitioned, else `col=value/...`), whether
    it was written, unchanged or removed (its partition is gone); or why the table was skipped."""

    status: dict[str, str]
    partitions: tuple[dict[str, str], ...] = ()  # current partitions' values, for the Glue catalog
    skipped: str | None = None

    def summary(self) -> str:
        if self.skipped:
            return self.skipped
        counts: dict[str, int] = defaultdict(int)
        for s in self.status.values():
            counts[s] += 1
        if set(self.status) <= {""}:
            return self.status.get("", "empty")
        return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "empty"


def partition_dir(columns: tuple[str, ...], values: tuple[Any, ...]) -> str:
    """`col=value/...`: the manifest folder of one partition (escaped, so a value never makes a folder)."""
    return "/".join(f"{c}={HIVE_NULL if v is None else quote(str(v), safe='')}"
                    for c, v in zip(columns, values, strict=True))


def snapshot_files(path: str) -> tuple[dict[str, list[str]], tuple[dict[str, str], ...]] | str | None:
    """The current snapshot's data files as absolute URIs, per manifest folder, with the partitions'
    values; a skip reason when a manifest can't express the table; None when there is no table."""
    import pyarrow as pa

    try:
        dt = rs_table(path)
    except Exception:  # noqa: BLE001 - no table (yet)
        return None
    if "deletionVectors" in (dt.protocol().reader_features or []):
        return DV_SKIP
    columns = tuple(dt.metadata().partition_columns)
    actions = pa.table(dt.get_add_actions(flatten=True))
    root = dt.table_uri.rstrip("/") + "/"
    if root.startswith("file://"):
        root = root[len("file://"):]
    groups: dict[str, list[str]] = defaultdict(list)
    partitions: dict[str, dict[str, str]] = {}
    values = [actions[f"partition.{c}"].to_pylist() for c in columns]
    for i, rel in enumerate(actions["path"].to_pylist()):
        rel = unquote(rel)  # the log holds the path URI-encoded
        uri = rel if "://" in rel else root + rel
        key = tuple(v[i] for v in values)
        folder = partition_dir(columns, key)
        groups[folder].append(uri)
        partitions[folder] = {c: HIVE_NULL if v is None else str(v) for c, v in zip(columns, key, strict=True)}
    return {k: sorted(v) for k, v in groups.items()}, tuple(partitions[k] for k in sorted(partitions) if k)


class _ManifestStore:
    """The manifest folder of one table: local files (written to a temp file, then renamed) or S3
    objects (one PUT replaces an object atomically: a reader sees the old list or the new one)."""

    def __init__(self, table_path: str, s3: Any = None):
        self.root = rs_uri(table_path).rstrip("/") + "/" + MANIFEST_DIR
        self.s3 = s3
        if self.root.startswith("s3://"):
            from cdcflow.aws import split_s3

            self.bucket, self.prefix = split_s3(self.root)
            if self.s3 is None:
                import boto3

                self.s3 = boto3.client("s3")

    def _key(self, folder: str) -> str:
        return "/".join(x for x in (self.prefix, folder, "manifest") if x)

    def _file(self, folder: str) -> Path:
        return Path(self.root, folder, "manifest")

    def read(self, folder: str) -> str | None:
        if self.s3 is None:
            f = self._file(folder)
            return f.read_text() if f.exists() else None
        try:
            return self.s3.get_object(Bucket=self.bucket, Key=self._key(folder))["Body"].read().decode()
        except self.s3.exceptions.NoSuchKey:
            return None

    def write(self, folder: str, text: str) -> None:
        if self.s3 is not None:
            self.s3.put_object(Bucket=self.bucket, Key=self._key(folder), Body=text.encode(), ContentType="text/plain")
            return
        f = self._file(folder)
        f.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=f.parent, prefix=".manifest.")
        with os.fdopen(fd, "w") as out:
            out.write(text)
        os.replace(tmp, f)  # atomic on one file system: never a half-written manifest

    def delete(self, folder: str) -> None:
        if self.s3 is not None:
            self.s3.delete_object(Bucket=self.bucket, Key=self._key(folder))
        else:
            self._file(folder).unlink(missing_ok=True)

    def folders(self) -> set[str]:
        """Folders that hold a manifest now."""
        if self.s3 is None:
            root = Path(self.root)
            return {"" if f.parent == root else f.parent.relative_to(root).as_posix() for f in root.rglob("manifest")}
        out = set()
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + "/")
        for page in pages:
            for o in page.get("Contents", []):
                rel = o["Key"][len(self.prefix) + 1:]
                if rel == "manifest" or rel.endswith("/manifest"):
                    out.add(rel[: -len("manifest")].rstrip("/"))
        return out


def write_manifests(path: str, s3: Any = None) -> Manifests | None:
    """Rewrite the table's symlink manifests from its current snapshot (delta-rs reads the log; no
    Spark): one `manifest` per partition folder (at the root when unpartitioned) listing the absolute
    URIs of that partition's live Parquet files, one per line. A manifest is written only when its list
    changed; a partition that no longer has files loses its manifest (an empty one is not valid to
    Spectrum). A table with deletion vectors is skipped and its old manifests removed: they would go
    stale and, after VACUUM, point at deleted files. None when there is no table."""
    snap = snapshot_files(path)
    if snap is None:
        return None
    store = _ManifestStore(path, s3)
    existing = store.folders()
    if isinstance(snap, str):
        for folder in existing:
            store.delete(folder)
        return Manifests({f: "removed" for f in existing}, skipped=snap)
    groups, partitions = snap
    status: dict[str, str] = {}
    for folder, uris in sorted(groups.items()):
        text = "\n".join(uris) + "\n"
        if folder in existing and store.read(folder) == text:
            status[folder] = "unchanged"
        else:
            store.write(folder, text)
            status[folder] = "written"
    for folder in existing - set(groups):
        store.delete(folder)
        status[folder] = "removed"
    return Manifests(status, partitions)


def _refresh_manifests(project: Project, path: str, catalog_name: str | None) -> Manifests | None:
    """`write_manifests`, then the Spectrum table's Glue partitions (partitioned tables; only with a
    catalog database). Never raises: Spectrum's view trails the lake, compaction goes on."""
    try:
        s3 = None
        if rs_uri(path).startswith("s3://"):
            from cdcflow.aws import project_client

            s3 = project_client(project, "s3")
        m = write_manifests(path, s3)
    except Exception as e:  # noqa: BLE001 - a manifest is a derived view: report it, compact the rest
        log.warning("%s: manifest not written: %s", path, e)
        return Manifests({}, skipped=f"failed: {type(e).__name__}: {e}")
    if m is not None and m.partitions and catalog_name:
        from cdcflow.catalog import sync_spectrum_partitions

        sync_spectrum_partitions(project, catalog_name, path, m.partitions)
    return m


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
            # after this table's VACUUM (in _compact_silver): the manifest lists no file VACUUM removed
            m = _refresh_manifests(project, path, glue_table_name(t))
            r.manifest = m.summary() if m is not None else ""
            done(r, started)
    for extra in ("bronze", "quarantine"):
        if Stop.requested:
            break
        partitioned = ("table", "date") if extra == "bronze" else ()
        rows: list[CompactResult] = []
        started = time.perf_counter()
        if tables is None:  # a run for some tables doesn't compact bronze/quarantine, but keeps their manifests
            for r, started in _compact_appended(spark, project, extra, partitioned, now, vacuum_hours):
                done(r, started)
                rows.append(r)
        # the generator has run to its end, VACUUM included, before the manifests are rewritten
        m = _refresh_manifests(project, project.path(extra), extra)
        if m is None:
            continue
        if not rows:
            rows.append(CompactResult(extra, engine="delta-rs", action="skipped: not selected"))
            done(rows[0], started)
        for r in rows:
            r.manifest = m.skipped or m.status.get(r.partition or "", m.summary())
    if tables is None:
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
        r.files_removed, r.bytes_rewritten = optimize(spark, path, zorder, t.target_file_size_mb)
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
            r.files_removed, r.bytes_rewritten = optimize(spark, path, [], target, where)
            rewritten = True
            after = (log_files(path, partitioned) or {}).get(key, Files(()))
            r.files_after, r.bytes_after = len(after.sizes), sum(after.sizes)
            r.action = "compacted"
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
        # Redshift Spectrum's view: manifests rewritten (a list changed) and tables it can't read
        "manifests_written": sum(1 for r in results if r.manifest and "written" in r.manifest),
        "manifests_skipped": sorted({r.table for r in results if r.manifest.startswith(("skipped", "failed"))}),
        "results": [asdict(r) for r in results],
    }  # fmt: skip


def emit_metrics(metrics, summary: dict) -> None:
    """CloudWatch EMF: what a run did, for the compaction dashboard and alarms."""
    metrics.emit({"FilesRemoved": summary["files_removed"], "BytesRewritten": summary["bytes_rewritten"],
                  "TablesSkipped": summary["tables_skipped"], "TablesCompacted": summary["tables_compacted"],
                  "CompactionDuration": summary["seconds"]},
                 {"Job": "compaction"}, units={"BytesRewritten": "Bytes", "CompactionDuration": "Seconds"})
