"""`cdcflow full-load`: DMS S3 Parquet (LOAD files, then timestamp-named CDC files) -> silver Delta tables.

Uses the same apply rule as the streaming job (cdcflow.cdc: type, check, mask, collapse, guarded
MERGE). A manifest Delta table records every applied file, so a re-run or a crash never applies a
file twice (and applying one twice would change nothing anyway: the MERGE is sequence-guarded).
Applied raw files are moved to `<raw>/<archive_prefix>/year=YYYY/month=MM/...` so the raw prefix
only holds work still to do. Full load -> CDC hand-over: LOAD rows carry a sequence below every
CDC change, and CDC files are applied in name (time) order, so changes captured while the full load
ran land after it in source order.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
from delta.tables import DeltaTable
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from cdcflow.catalog import sync_silver_table
from cdcflow.cdc import apply, schema
from cdcflow.cdc.bronze import append_bronze, bronze_rows, next_full_load_batch
from cdcflow.cdc.changes import SNAPSHOT_SEQ, VALUES, TableShape, typed_changes
from cdcflow.cdc.masking import pii_salt
from cdcflow.cdc.quarantine import append_quarantine
from cdcflow.cdc.sequence import S3_ORDERING, at_commit_time
from cdcflow.config import Project, Table
from cdcflow.metrics import MetricsSink
from cdcflow.runtime import new_table_options, read_delta
from cdcflow.transform_check import require_valid_transforms

LOAD_FILE = re.compile(r"(^|/)(SEGMENT\d+_)?LOAD[0-9A-F]{8}\.parquet$")
CDC_FILE = re.compile(r"(^|/)\d{8}-\d{9,10}\.parquet$")
CHANGE_SEQ = "$AR_H_CHANGE_SEQ"
MAX_GROUP_FILES = 200  # CDC files per Spark read and apply (DMS writes one a minute per table)
# The manifest: one row per applied raw file. delta-rs reads and appends it (a few ms, no Spark job;
# through Spark each group's append cost about 0.65 s), with the lake's commit protocol (cdcflow.storage).
# `etag`: the file's content identity (S3's ETag, a local file's MD5), so a file written again under an
# applied name (DMS reloading a table writes LOAD00000001.parquet again) is told from one applied
# before a crash; manifests from before it have none.
MANIFEST_SCHEMA = pa.schema([("table", pa.string()), ("file", pa.string()), ("kind", pa.string()),
                             ("rows", pa.int64()), ("applied_at", pa.timestamp("us", tz="UTC")),
                             ("etag", pa.string())])


@dataclass
class FileRef:
    table: str
    rel: str  # path relative to the raw root: <schema>/<table>/...
    kind: str  # load | cdc


@dataclass
class LoadResult:
    files: int = 0
    rows: int = 0
    quarantined: int = 0
    skipped: int = 0
    per_table: dict[str, int] = field(default_factory=dict)
    quarantined_by_rule: dict[str, dict[str, int]] = field(default_factory=dict)  # table -> rule -> rows
    rewritten: dict[str, list[str]] = field(default_factory=dict)  # table -> applied files written again
    reloaded: dict[str, int] = field(default_factory=dict)  # table -> keys deleted as absent from the reload
    reload_as_of: datetime | None = None

    COLUMNS = ("table", "rows", "quarantined")

    def summary_rows(self) -> list[list]:
        """Per table: rows applied, quarantined rows per rule (as the stream's summary shows them)."""
        from cdcflow.cdc.quarantine import by_rule

        return [[t, n, by_rule(self.quarantined_by_rule.get(t, {}))] for t, n in sorted(self.per_table.items())]

    def reload_lines(self) -> list[str]:
        place = f"as of {self.reload_as_of.isoformat()}" if self.reload_as_of else "after every change silver held"
        return [f"{t}: reload applied {place}, {n} key(s) not in its snapshot deleted"
                for t, n in sorted(self.reloaded.items())]

    def rewritten_problem(self) -> str | None:
        """One line naming the tables left unloaded because an applied file was written again (the CLI
        prints it and exits 1; the Glue job fails with it), or None."""
        if not self.rewritten:
            return None
        return "; ".join(
            f"{table}: {len(rels)} applied file(s) written again since ({rels[0]}; a DMS table reload?), "
            "the table not loaded, its files left in place" for table, rels in sorted(self.rewritten.items())
        ) + ("; once DMS reports the table's reload complete, run the full load with --reload TABLE "
             "(and --as-of dms, or the reload's start time, when its changes come through Kinesis)")


class RawStore:
    """The DMS raw prefix: a local folder, or s3:// (files are staged locally to read with Spark).

    Staged files are deleted by `drop_staged` once their table is applied, so a full load of many
    tables never holds more than one table's files on local disk."""

    def __init__(self, project: Project):
        self.project = project
        self.uri = project.pipeline.dms.raw_uri
        self.is_s3 = self.uri.startswith(("s3://", "s3a://"))
        self._staging: Path | None = None
        self._etags: dict[str, str] = {}  # rel -> S3 ETag, from the listing
        self._modified: dict[str, datetime] = {}  # rel -> last written (S3 LastModified), from the listing

    def require(self) -> None:
        """Fail with one line when the raw location does not exist (a wrong --raw would otherwise load
        nothing and report success)."""
        from cdcflow.errors import UserError

        if not self.is_s3:
            if not Path(self.uri).is_dir():
                raise UserError(f"raw path {self.uri} does not exist (dms.raw_uri or --raw)")
            return
        from cdcflow.aws import require_bucket

        require_bucket(self.project, self.uri, "dms.raw_uri")

    def list(self, table: Table) -> list[str]:
        prefix = f"{table.schema}/{table.table}/"
        if not self.is_s3:
            root = Path(self.uri)
            return sorted(str(p.relative_to(root)) for p in (root / prefix).rglob("*.parquet"))
        from cdcflow.aws import project_client, split_s3

        bucket, base = split_s3(self.uri)
        s3 = project_client(self.project, "s3")
        keys: list[str] = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{base.rstrip('/')}/{prefix}"):
            for o in page.get("Contents", []):
                keys.append(o["Key"][len(base.rstrip("/")) + 1:])
                self._etags[keys[-1]] = o["ETag"].strip('"')
                self._modified[keys[-1]] = o["LastModified"]
        return sorted(k for k in keys if k.endswith(".parquet"))

    def modified(self, rel: str) -> datetime:
        """When the file was last written (S3's LastModified, a local file's mtime), UTC."""
        if self.is_s3:
            return self._modified[rel]
        return datetime.fromtimestamp((Path(self.uri) / rel).stat().st_mtime, UTC)

    def etag(self, rel: str) -> str:
        """The file's content identity: S3's ETag (from the listing), a local file's MD5."""
        if self.is_s3:
            return self._etags[rel]
        import hashlib

        with open(Path(self.uri) / rel, "rb") as f:
            return hashlib.file_digest(f, "md5").hexdigest()

    def local_path(self, rel: str) -> str:
        if not self.is_s3:
            return str(Path(self.uri) / rel)
        from cdcflow.aws import project_client, split_s3

        bucket, base = split_s3(self.uri)
        if self._staging is None:
            self._staging = Path(tempfile.mkdtemp(prefix="cdcflow-raw-"))
        dest = self._staging / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        project_client(self.project, "s3").download_file(bucket, f"{base.rstrip('/')}/{rel}", str(dest))
        return str(dest)

    def drop_staged(self) -> None:
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def archive(self, rel: str, when: datetime) -> None:
        target = f"{self.project.pipeline.dms.archive_prefix}/year={when:%Y}/month={when:%m}/{rel}"
        if not self.is_s3:
            dest = Path(self.uri) / target
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(Path(self.uri) / rel), dest)
            return
        from cdcflow.aws import project_client, split_s3

        bucket, base = split_s3(self.uri)
        s3 = project_client(self.project, "s3")
        src = f"{base.rstrip('/')}/{rel}"
        s3.copy_object(Bucket=bucket, Key=f"{base.rstrip('/')}/{target}", CopySource={"Bucket": bucket, "Key": src})
        s3.delete_object(Bucket=bucket, Key=src)


    def expire_archive(self, older_than: datetime) -> int:
        """Delete archived raw files last written before `older_than`; returns how many. (On AWS the raw
        bucket's lifecycle rule does the same; this keeps local and emulator runs bounded too.)"""
        prefix = self.project.pipeline.dms.archive_prefix.strip("/")
        if not self.is_s3:
            root = Path(self.uri) / prefix
            old = [p for p in root.rglob("*") if p.is_file()
                   and datetime.fromtimestamp(p.stat().st_mtime, UTC) < older_than] if root.exists() else []
            for p in old:
                p.unlink()
            return len(old)
        from cdcflow.aws import project_client, split_s3

        bucket, base = split_s3(self.uri)
        s3 = project_client(self.project, "s3")
        old_keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
                        Bucket=bucket, Prefix=f"{base.strip('/')}/{prefix}/".lstrip("/"))
                    for o in page.get("Contents", []) if o["LastModified"] < older_than]
        for i in range(0, len(old_keys), 1000):
            s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in old_keys[i:i + 1000]]})
        return len(old_keys)


def classify(table: Table, rels: list[str]) -> list[FileRef]:
    """LOAD files first (hex counter order), then CDC files in time order; other files are ignored."""
    loads = [FileRef(table.name, r, "load") for r in rels if LOAD_FILE.search(r)]
    cdc = [FileRef(table.name, r, "cdc") for r in rels if CDC_FILE.search(r)]
    return sorted(loads, key=lambda f: f.rel) + sorted(cdc, key=lambda f: Path(f.rel).name)


def source_position(table: Table) -> Column:
    """`<schema>/<table>/.../<file>.parquet#<row>` of a row read from DMS Parquet files: its path under
    the raw root and its row number in the file (Parquet's row index, not a partition-dependent id),
    which `cdcflow.cdc.sequence`'s `file_position` orders CDC rows by when nothing better is present."""
    folder = f"{table.schema}/{table.table}/"
    # what follows the folder's last occurrence in the path: a string search, not a regex per row
    rel = F.substring_index(F.col("_metadata.file_path"), folder, -1)
    return F.concat(F.lit(folder), rel, F.lit("#"), F.col("_metadata.row_index").cast("string"))


def absent_order(df: DataFrame, ts_column: str) -> tuple[str, ...]:
    """The S3 ordering components a file group's layout lacks (DMS's defaults: both), counted as zeros."""
    return tuple(o for o, column in (("commit_timestamp", ts_column), ("change_seq", CHANGE_SEQ))
                 if column not in df.columns)


def normalize_parquet(df: DataFrame, table: Table, ref: FileRef, ts_column: str) -> DataFrame:
    """DMS Parquet rows (`df` as read by Spark from the files) -> the normalized change shape the
    shared apply logic takes."""
    cols = [c for c in df.columns if c not in ("Op", ts_column, CHANGE_SEQ)]
    if ref.kind == "load":
        op = F.lit("load")
    else:
        op = F.upper(F.col("Op"))
        op = F.when(op == "I", "insert").when(op == "U", "update").when(op == "D", "delete").otherwise(F.lower(op))
    commit = F.col(ts_column).cast("timestamp") if ts_column in df.columns and ref.kind == "cdc" else F.lit(None)
    seq = F.col(f"`{CHANGE_SEQ}`").cast("string") if CHANGE_SEQ in df.columns else F.lit(None).cast("string")
    return df.select(
        F.lit(table.name).alias("_table"),
        F.lit("data").alias("_record_type"),
        op.alias("_op"),
        F.struct(*[F.col(f"`{c}`") for c in cols]).alias(VALUES),  # typed values (no `_data` text map)
        F.lit(None).cast("map<string,string>").alias("_before"),
        commit.cast("timestamp").alias("_commit_ts"),
        F.lit(None).cast("string").alias("_txn_id"),
        F.lit(None).cast("string").alias("_txn_rec_id"),
        F.lit(None).cast("string").alias("_stream_pos"),
        seq.alias("_change_seq"),
        F.lit(None).cast("string").alias("_control"),
        source_position(table).alias("_source_position"),
        F.current_timestamp().alias("_arrival_ts"),
        F.lit(None).cast("string").alias("_problem"),
        F.xxhash64(*[F.col(f"`{c}`") for c in df.columns]).cast("string").alias("_record_hash"),
    )


def _manifest(path: str) -> dict[tuple[str, str], str | None]:
    """(table, file) -> etag (None if recorded without one) of every applied raw file; a file applied
    more than once (a reload's LOAD files) -> its newest."""
    table = apply.rs_table_or_none(path)
    if table is None:
        return {}
    columns = ["table", "file", "applied_at", *(["etag"] if "etag" in table.schema().to_arrow().names else [])]
    held = table.to_pyarrow_table(columns=columns).sort_by("applied_at")
    etags = held["etag"].to_pylist() if "etag" in columns else [None] * held.num_rows
    return dict(zip(zip(held["table"].to_pylist(), held["file"].to_pylist(), strict=True), etags, strict=True))


def run_full_load(spark: SparkSession, project: Project, tables: list[str] | None = None,
                  ts_column: str = "dms_commit_ts", archive: bool = True, progress=None,
                  reload: tuple[str, ...] | list[str] = (), reload_as_of: datetime | None = None) -> LoadResult:
    """Apply every not-yet-applied raw file: a table's LOAD files in one Spark read and one apply (they
    are one snapshot, all at sequence 0), then its CDC files in name (time) order, consecutive files
    of one schema in one read and apply (`cdc_groups`). The manifest records every file with its row
    count and content identity; a table whose applied file was written again is left alone and named
    in `LoadResult.rewritten` (a DMS table reload, which only the user can tell complete).

    `reload`: tables whose LOAD files in the raw prefix are a DMS reload's complete snapshot (`_reload`):
    applied after every change silver holds, keys the snapshot lacks deleted, then the CDC files after it.
    `reload_as_of` (aware): when the reload began (DMS's FullLoadStartTime for the table); the snapshot
    then sorts at that commit time instead, for a table whose changes arrive through another task
    (Kinesis): changes committed after it, applied already or not, stay above the snapshot.

    Each file group's records also go to bronze (feed `full_load`, masked), so `warehouse-merge`
    sees the table's changes. A group re-applied after a crash gets a new bronze batch id: the
    warehouse merge drops changes it already holds (same key and `_seq`)."""
    from cdcflow.errors import UserError

    store = RawStore(project)
    store.require()
    names = tables or sorted(project.tables)
    require_valid_transforms(spark, project, ("raw_to_staging",), names)
    salt = pii_salt(project)
    manifest_path = project.path("_manifests/full_load")
    bronze_path = project.path("bronze")
    done = _manifest(manifest_path)
    next_batch = next_full_load_batch(read_delta(spark, bronze_path), names)
    result = LoadResult(reload_as_of=reload_as_of)
    work = [(name, classify(project.table(name), store.list(project.table(name)))) for name in names]
    etags = {(name, ref.rel): store.etag(ref.rel) for name, files in work for ref in files}  # once: MD5 locally
    # a table whose silver `_seq` doesn't start with the commit time has no place for a timed snapshot
    untimed = [n for n in reload if project.table(n).ordering[0] != "commit_timestamp"]
    if reload_as_of is not None and untimed:
        raise UserError(f"--as-of: {', '.join(untimed)} not ordered by commit_timestamp first")
    for name, files in work:
        loads = [ref for ref in files if ref.kind == "load"]
        if name in reload and not loads:
            raise UserError(f"--reload {name}: no LOAD files under {store.uri}/{name.replace('.', '/', 1)}/")
        if name in reload and all(done.get((name, ref.rel)) == etags[name, ref.rel] for ref in loads):
            # the load already applied (left in place): taken as a snapshot now, it would delete every
            # key inserted since
            raise UserError(f"--reload {name}: its LOAD files were applied before and are unchanged; "
                            "no reload to apply")
    bars = _Bars(progress, sum(len(f) for _, f in work))
    catalogued: dict[str, dict[str, str]] = {}  # silver columns last synced to the Glue catalog, per table
    catalog_alerts = MetricsSink(project.pipeline.name)  # CatalogSyncFailed, as the stream reports it
    for name, files in work:
        try:
            bars.start(name, len(files))
            table = replace(project.table(name), ordering=S3_ORDERING)
            path = project.path(table.delta_path)
            if DeltaTable.isDeltaTable(spark, path):
                apply.sync_properties(spark, path, table)
            # applied before: done holds its identity (None: recorded before identities were kept)
            changed = {ref.rel for ref in files if done.get((name, ref.rel)) not in (None, etags[name, ref.rel])}
            pending = changed | {ref.rel for ref in files if (name, ref.rel) not in done}
            rewritten = [ref.rel for ref in files if ref.rel in changed]
            if rewritten and name not in reload:
                # DMS reloaded the table (or a file changed after it was applied): applying the new
                # snapshot under a LOAD sequence would lose to every change silver holds, and its CDC
                # files without it would be wrong too. Leave the table's files in place, say so.
                result.rewritten[name] = rewritten
                bars.advance(len(files))
                bars.finish()
                continue
            reloading = name in reload
            todo = [ref for ref in files if (reloading and ref.kind == "load") or ref.rel in pending]
            result.skipped += len(files) - len(todo)
            bars.advance(len(files) - len(todo))
            loads = [ref for ref in todo if ref.kind == "load"]
            local = {ref.rel: store.local_path(ref.rel) for ref in todo}
            cdc = [ref for ref in todo if ref.kind == "cdc"]
            before: list[FileRef] = []
            if reloading:
                # CDC files DMS wrote before the reload began (a target preparation that kept the folder)
                # go first: the snapshot already holds their changes, so it must come after them
                began = min(store.modified(ref.rel) for ref in loads)
                before = [ref for ref in cdc if _file_time(ref.rel) < began]
                cdc = [ref for ref in cdc if ref not in before]
            groups = cdc_groups(before, local) + ([loads] if loads else []) + cdc_groups(cdc, local)
            for group in groups:
                local_paths = [local[ref.rel] for ref in group]
                df = spark.read.parquet(*local_paths)
                # Columns the files add, and declared ones the source widened (INT32 -> INT64 ...)
                typed = {c: df.schema[c].dataType.simpleString() for c in df.columns
                         if c not in ("Op", ts_column, CHANGE_SEQ)}
                extra = tuple((c, ty) for c, ty in typed.items() if c not in table.columns
                              or (ty != table.columns[c] and schema.is_widening(table.columns[c], ty)))
                shape = TableShape(table, extra)
                norm = normalize_parquet(df, table, group[0], ts_column)
                if reloading and group[0].kind == "load":
                    norm, result.reloaded[name] = _reload(spark, norm, table, path, reload_as_of)
                good, bad = typed_changes(norm, shape, salt, absent_order(df, ts_column))
                batch_id = next_batch.get(name, 0)
                bronze = bronze_rows(norm, project, salt, feed="full_load", table=table)
                counts = [_parquet_rows(p) for p in local_paths]
                append_bronze(bronze, bronze_path, batch_id, sum(counts))
                next_batch[name] = batch_id + 1
                source_bytes = sum(os.path.getsize(p) for p in local_paths)
                bad_rows = apply.merge(spark, path, good, shape, bad, source_bytes=source_bytes).rejected
                # The table was created or drifted: keep its catalog entry current (once per table per
                # run, then only when a group's columns differ; a no-op without a catalog database)
                columns = {c: shape.output_type(c) for c in shape.output_columns}
                if catalogued.get(name) != columns:
                    sync_silver_table(project, name, columns, catalog_alerts)
                    catalogued[name] = columns
                _record(project, manifest_path, name, group, counts, bad_rows, [etags[name, ref.rel] for ref in group])
                result.files += len(group)
                result.rows += sum(counts)
                result.quarantined += len(bad_rows)
                rules = result.quarantined_by_rule.setdefault(name, {})
                for r in bad_rows:
                    rules[r["_rule"]] = rules.get(r["_rule"], 0) + 1
                result.per_table[name] = result.per_table.get(name, 0) + sum(counts)
                bars.advance(len(group))
            if archive:
                for ref in files:
                    store.archive(ref.rel, datetime.now(UTC))
            bars.finish()
        finally:
            store.drop_staged()  # this table's files, staged from S3
    return result


def _reload(spark: SparkSession, norm: DataFrame, table: Table, path: str,
            as_of: datetime | None = None) -> tuple[DataFrame, int]:
    """A DMS reload's snapshot (`norm`, its LOAD rows) as changes: every row, and a delete for each live
    key the snapshot lacks, carries one `_snapshot_seq`. Without `as_of` it is one above the table's
    largest `_seq`: right when the table's changes come through the reloading task (DMS holds them
    until its load completes, so every change not yet applied sorts above it). With `as_of` (when the
    reload began) it is that commit time's lowest sequence: right whichever task carries the changes,
    as those committed after it sort above the snapshot, applied already or not. Returns them and the
    number of deletes. A table without silver yet takes the snapshot as its first load."""
    from cdcflow.errors import UserError

    silver = read_delta(spark, path)
    newest, latest = silver.agg(F.max("_seq"), F.max("_commit_ts")).first() if silver is not None else (None, None)
    if newest is None:
        return norm, 0
    hashed = [k for k in table.primary_key if k in table.pii]
    if hashed:  # silver holds the key hashed: a delete built from it would be hashed again
        raise UserError(f"--reload {table.name}: its key column(s) {', '.join(hashed)} are masked (pii), so the "
                        "keys the snapshot lacks can't be told; reload needs a key stored as the source sends it")
    if as_of is None:
        snapshot_seq = str(int(newest) + 1).zfill(len(newest))
    else:
        snapshot_seq = at_commit_time(as_of, len(newest))
    key = table.primary_key
    values = norm.schema[VALUES].dataType
    snapshot_keys = norm.select(*[F.col(VALUES)[k].cast(table.columns[k]).alias(k) for k in key])
    # a key whose newest change sorts above the snapshot (inserted after the reload began) stays
    absent = (silver.filter(~F.col("_is_deleted") & (F.col("_seq") < snapshot_seq)).select(*key)
              .join(snapshot_keys, key, "left_anti"))
    # The snapshot's time, for the warehouse's versions: its place in the order. With `as_of`, that
    # time; after every change silver holds, the newest of their times (each was committed before the
    # reload began, each change DMS held after it). Not now: changes that sort above the snapshot were
    # committed before the run (versions would end before they begin).
    place = as_of if as_of is not None else latest
    when = F.lit(place).cast("timestamp") if place is not None else F.current_timestamp()
    given = {
        "_table": F.lit(table.name),
        "_record_type": F.lit("data"),
        "_op": F.lit("delete"),
        VALUES: F.struct(*[(F.col(f.name) if f.name in key else F.lit(None)).cast(f.dataType).alias(f.name)
                           for f in values.fields]),
        "_commit_ts": when,
        "_source_position": F.lit(f"{table.schema}/{table.table}/(reload: not in the snapshot)"),
        "_arrival_ts": F.current_timestamp(),
        "_record_hash": F.xxhash64(*[F.col(k) for k in key], F.lit(snapshot_seq)).cast("string"),
    }
    deletes = absent.select(*[given.get(f.name, F.lit(None)).cast(f.dataType).alias(f.name) for f in norm.schema.fields])
    n = deletes.count()
    rows = norm.withColumn("_commit_ts", when)
    both = rows.unionByName(deletes) if n else rows
    return both.withColumn(SNAPSHOT_SEQ, F.lit(snapshot_seq)), n


def _file_time(rel: str) -> datetime:
    """A DMS CDC file's time from its name (`yyyyMMdd-HHmmssSSSS`, UTC; nine digits read as a leading
    zero dropped, as `cdcflow.cdc.sequence` orders them)."""
    day, clock = Path(rel).name.split(".")[0].split("-")
    return datetime.strptime(day + clock.zfill(10)[:6], "%Y%m%d%H%M%S").replace(tzinfo=UTC)


class _Bars:
    """Rich progress (optional): one bar for all files, one for the table being loaded."""

    def __init__(self, progress, total: int):
        self.progress = progress
        self.all = progress.add_task("all tables", total=total) if progress else None
        self.table = None

    def start(self, name: str, files: int) -> None:
        if self.progress:
            self.table = self.progress.add_task(name, total=files)

    def advance(self, files: int) -> None:
        if self.progress and files:
            self.progress.advance(self.all, files)
            self.progress.advance(self.table, files)

    def finish(self) -> None:
        if self.progress:
            self.progress.remove_task(self.table)


def cdc_groups(files: list[FileRef], local: dict[str, str]) -> list[list[FileRef]]:
    """Consecutive CDC files (time order) with the same Parquet schema, at most MAX_GROUP_FILES each:
    one Spark read and one apply per group. Their changes order by `_seq`, which doesn't depend on
    how files are grouped; a schema change (drift) starts a new group, so one read sees one schema."""
    import pyarrow.parquet as pq

    groups: list[list[FileRef]] = []
    last = None
    for ref in files:
        file_schema = pq.read_schema(local[ref.rel]).remove_metadata()
        if groups and file_schema.equals(last) and len(groups[-1]) < MAX_GROUP_FILES:
            groups[-1].append(ref)
        else:
            groups.append([ref])
        last = file_schema
    return groups


def _parquet_rows(local_path: str) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(local_path).metadata.num_rows


def _record(project: Project, manifest_path: str, name: str, group: list[FileRef],
            counts: list[int], bad_rows: list, etags: list[str]) -> None:
    """Quarantine the group's bad rows, then record its files in the manifest."""
    now = datetime.now(UTC)
    q = [(name, r["_rule"], r["_reason"], r["_source_position"], r["_payload"], r["_record_hash"], -1, now)
         for r in bad_rows]
    append_quarantine(project.path("quarantine"), q)
    rows = [{"table": name, "file": ref.rel, "kind": ref.kind, "rows": n, "applied_at": now, "etag": etag}
            for ref, n, etag in zip(group, counts, etags, strict=True)]
    # schema_mode merge: a manifest written before `etag` existed gains the column
    apply.rs_append(manifest_path, pa.Table.from_pylist(rows, MANIFEST_SCHEMA), new_table_options("manifest"),
                    schema_mode="merge")
