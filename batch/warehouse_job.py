"""`cdcflow warehouse-merge` (lake mode): bronze Delta changes -> DQ + transforms -> SCD2 dimensions and facts.

For each table with a `warehouse` target, dimensions first, then facts:

1. Read the table's changes that arrived since the last merged positions from the bronze Delta table
   (`record_type = 'data'`, no parse problem, `batch_id` > the table's watermark for the row's
   `feed`: the streaming job's micro-batches, or `cdcflow full-load`'s file groups). Records the
   stream or the full load quarantined (same table + record hash in the quarantine table) are left
   out, so the warehouse sees exactly the changes silver applied. Bronze values are already
   PII-masked: not masked again.
2. Type them per declared column (masked columns are strings), compute `_seq` from the table's
   ordering (full-load rows: DMS S3's commit time + change_seq + file position) and split primary-key changes (the
   shared `cdcflow.cdc.changes.typed_changes`), drop identical (key, `_seq`) redeliveries, and map
   `_op` load/insert/update/delete -> I/I/U/D.
3. Run the stages: `staging_to_dimension` for dimensions; `staging_to_dimension` then
   `dimension_to_fact` for facts (batch.stages.run_stage: rules in one pass, quarantine / warn /
   fail, then the stage's transforms). Quarantined rows never reach the warehouse.
4. Merge the staging rows (batch/warehouse `merge_table`) and move the watermarks
   (`<schema>.cdcflow_watermarks`, one row per table and feed) in the same warehouse transaction
   (Postgres or Redshift).

A watermark is a bronze position, not a `_seq`: a late change (older `_seq`) that arrives after a
merge is still picked up, and the SCD2 merge puts it at its place in history. A change read twice
(a file group re-applied after a crash) is a no-op: the merge skips a (key, `_seq`) it holds.
"""

from __future__ import annotations

import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from batch.stages import run_stage, silver_references, write_quarantine
from batch.warehouse.connection import Warehouse, connect
from batch.warehouse.ddl import model, q
from batch.warehouse.loader import MergeResult, merge_table
from cdcflow.cdc.bronze import FEEDS
from cdcflow.cdc.changes import SNAPSHOT_SEQ, TableShape, typed_changes
from cdcflow.cdc.sequence import S3_ORDERING
from cdcflow.config import Project, Table
from cdcflow.config.models import Column, Quality
from cdcflow.metrics import MetricsSink
from cdcflow.quality import StageReport
from cdcflow.runtime import read_delta
from cdcflow.transform_check import require_valid_transforms

OPS = {"load": "I", "insert": "I", "update": "U", "delete": "D"}
WATERMARKS = "cdcflow_watermarks"


@dataclass
class TableRun:
    table: str
    changes: int = 0  # changes read from bronze
    staged: int = 0
    quarantined: int = 0
    from_batch: dict[str, int] = field(default_factory=dict)  # feed -> watermark before
    to_batch: dict[str, int] = field(default_factory=dict)  # feed -> watermark after
    merge: MergeResult | None = None
    stages: list[StageReport] = field(default_factory=list)


@dataclass
class WarehouseRun:
    run_id: str
    tables: list[TableRun] = field(default_factory=list)
    report_path: str | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "error": self.error,
            "tables": [
                {
                    "table": t.table, "changes": t.changes, "staged": t.staged, "quarantined": t.quarantined,
                    "from_batch": t.from_batch, "to_batch": t.to_batch,
                    "merge": None if t.merge is None else {k: v for k, v in vars(t.merge).items() if k != "counts"},
                    "stages": [s.as_dict() for s in t.stages],
                }
                for t in self.tables
            ],
        }  # fmt: skip


def warehouse_tables(project: Project, names: list[str] | None = None) -> list[Table]:
    """Tables with a warehouse target, dimensions first (facts look their surrogate keys up)."""
    ts = [t for t in project.tables.values() if t.cfg.warehouse and (not names or t.name in names)]
    return sorted(ts, key=lambda t: (t.cfg.warehouse.kind != "dimension", t.name))


def bronze_table(table: Table) -> Table:
    """The table as its bronze rows hold it: masked columns are strings, dropped ones are absent,
    no PII method (already applied) and no raw_to_staging rules (the stream already ran them)."""
    cols = {
        c: Column(type="string" if col.pii else col.type, nullable=col.nullable)
        for c, col in table.cfg.columns.items() if col.pii != "drop"
    }  # fmt: skip
    cfg = table.cfg.model_copy(update={"columns": cols, "quality": Quality()})
    return replace(table, cfg=cfg)


def staged_changes(spark: SparkSession, project: Project, table: Table,
                   after: dict[str, int]) -> tuple[DataFrame, dict[str, int]]:
    """(typed staging changes of `table` from bronze after the per-feed positions `after`,
    feed -> newest batch id read, for the feeds that had new rows)."""
    bronze = read_delta(spark, project.path("bronze"))
    if bronze is None:
        return spark.createDataFrame([], "x int"), {}
    new = F.lit(False)
    for feed in FEEDS:
        new = new | ((F.col("feed") == feed) & (F.col("batch_id") > after.get(feed, -1)))
    rows = bronze.filter(
        (F.col("table") == table.name) & (F.col("record_type") == "data") & F.col("problem").isNull() & new
    )
    newest = {r[0]: int(r[1]) for r in rows.groupBy("feed").agg(F.max("batch_id")).collect()}
    if not newest:
        return rows, {}
    quarantined = read_delta(spark, project.path("quarantine"))
    if quarantined is not None:
        hashes = quarantined.filter(F.col("table") == table.name).select(F.col("record_hash")).distinct()
        rows = rows.join(F.broadcast(hashes), "record_hash", "left_anti")
    norm = rows.select(
        F.col("table").alias("_table"), F.col("record_type").alias("_record_type"), F.col("op").alias("_op"),
        F.col("data").alias("_data"), F.col("before").alias("_before"), F.col("commit_ts").alias("_commit_ts"),
        F.col("transaction_id").alias("_txn_id"), F.col("transaction_record_id").alias("_txn_rec_id"),
        F.col("stream_position").alias("_stream_pos"), F.col("change_seq").alias("_change_seq"),
        F.col("source_position").alias("_source_position"), F.col("problem").alias("_problem"),
        F.col("record_hash").alias("_record_hash"), F.col("feed"),
        *([F.col("snapshot_seq").alias(SNAPSHOT_SEQ)] if "snapshot_seq" in rows.columns else []),
    )  # fmt: skip
    # Each feed's changes are ordered as that feed orders them (the streaming job: the table's
    # ordering; full-load: DMS S3's commit time, change_seq and file position), with the shared typing
    # rule. Full-load rows without a commit time or change_seq came from files without that column
    # (rows with a null in a column their file has were quarantined): zeros, as the full load counted.
    typed = None
    for feed in newest:
        t = bronze_table(table if feed == "stream" else replace(table, ordering=S3_ORDERING))
        absent = () if feed == "stream" else ("commit_timestamp", "change_seq")
        good, _bad = typed_changes(norm.filter(F.col("feed") == feed), TableShape(t), salt="",  # bad rows were
                                   absent_order=absent)  # quarantined already
        typed = good if typed is None else typed.unionByName(good)
    key = table.primary_key
    if table.cfg.ignore_null_updates:
        typed = _filled(spark, project, table, typed)
    op = F.col("_op")
    staged = (
        typed.drop("_dq")
        .dropDuplicates([*key, "_seq"])
        .withColumn("_op", F.when(op == "update", "U").when(op == "delete", "D").otherwise("I"))
    )
    return staged, newest


def _filled(spark: SparkSession, project: Project, table: Table, typed: DataFrame) -> DataFrame:
    """ignore_null_updates: an update's NULLs mean "unchanged", and the warehouse stores whole rows
    (the stage rules and transforms see them too). Each update takes its key's last values from this
    batch's changes (`apply.fill_partial_updates`); what an update without an insert / load / delete
    before it in the batch leaves NULL comes from silver's row. The stream and the full load write a
    batch's bronze and silver together, so silver holds the key as it was before the batch's changes
    or after them (or later): either way a fact, which takes the key's latest change, gets the key's
    values (newer ones only until the next merge brings them). An SCD2 version between two partial
    updates of one key in one merge may show a value the later one set (README, known limits)."""
    from cdcflow.cdc.apply import fill_partial_updates

    key = table.primary_key
    columns = [c for c in typed.columns if c not in key and not c.startswith("_")]
    rows = fill_partial_updates(typed, key, columns)
    silver = read_delta(spark, project.path(table.delta_path))
    held = [c for c in columns if silver is not None and c in silver.columns]
    if held:
        stored = silver.select(*key, *[F.col(c).alias(f"_stored_{c}") for c in held])
        fill = (F.col("_op") == "update") & F.col("_base").isNull()
        rows = rows.join(stored, key, "left").select(*[
            F.when(fill, F.coalesce(F.col(c), F.col(f"_stored_{c}"))).otherwise(F.col(c)).alias(c) if c in held
            else F.col(c) for c in typed.columns])
    return rows.select(*typed.columns)


def to_arrow(df: DataFrame) -> pa.Table:
    """Spark 4 has DataFrame.toArrow; Spark 3.5 (Glue 5.1) goes through pandas."""
    if hasattr(df, "toArrow"):
        return df.toArrow()
    return pa.Table.from_pandas(df.toPandas(), preserve_index=False)


# ---------------------------------------------------------------- watermarks (in the warehouse)


def _watermark_ddl(schema: str) -> list[str]:
    return [
        f"create schema if not exists {q(schema)}",
        f"create table if not exists {q(schema)}.{WATERMARKS} (table_name varchar(256) not null, "
        f"feed varchar(16) not null, last_batch_id bigint not null, updated_at timestamp, "
        f"primary key (table_name, feed))",
    ]


def read_watermarks(wh: Warehouse, schema: str, table: str) -> dict[str, int]:
    """feed -> the newest bronze batch id of that feed already merged (absent: none yet)."""
    sql = f"select feed, last_batch_id from {q(schema)}.{WATERMARKS} where table_name = %s"
    return {r[0]: int(r[1]) for r in wh.execute(sql, (table,)).fetchall()}


def _set_watermarks(wh: Warehouse, schema: str, table: str, positions: dict[str, int]) -> None:
    now = datetime.now(UTC).replace(tzinfo=None)
    for feed, batch_id in positions.items():
        wh.execute(f"delete from {q(schema)}.{WATERMARKS} where table_name = %s and feed = %s", (table, feed))
        wh.execute(f"insert into {q(schema)}.{WATERMARKS} values (%s, %s, %s, %s)", (table, feed, batch_id, now))


# ---------------------------------------------------------------- the job


def merge_from_lake(
    spark: SparkSession,
    project: Project,
    url: str | Warehouse,
    *,
    tables: list[str] | None = None,
    schema: str | None = None,
    run_id: str | None = None,
    metrics: MetricsSink | None = None,
) -> WarehouseRun:
    """Merge every warehouse table's new bronze changes; write the DQ report (JSON) whatever happens.

    `url`: postgresql:// or redshift:// (batch/warehouse/connection.py), or an open `Warehouse`."""
    require_valid_transforms(spark, project)
    schema = schema or project.pipeline.warehouse.schema_
    run = WarehouseRun(run_id or datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6])
    metrics = metrics or MetricsSink(project.pipeline.name)
    references = silver_references(spark, project)
    try:
        with connect(project, url) if isinstance(url, str) else nullcontext(url) as wh:
            with wh.transaction():
                for s in _watermark_ddl(schema):
                    wh.execute(s)
            for table in warehouse_tables(project, tables):
                tr = TableRun(table.name)
                run.tables.append(tr)
                _merge_one(spark, project, wh, schema, table, tr, references, metrics)
    except Exception as e:
        run.error = f"{type(e).__name__}: {e}"
        raise
    finally:
        run.report_path = write_report(project, run)
    return run


def _merge_one(spark: SparkSession, project: Project, wh: Warehouse, schema: str, table: Table, tr: TableRun,
               references, metrics: MetricsSink) -> None:
    with wh.transaction():
        tr.from_batch = read_watermarks(wh, schema, table.name)
    staged, newest = staged_changes(spark, project, table, tr.from_batch)
    tr.to_batch = dict(tr.from_batch)
    if not newest:
        return
    staged = staged.persist()
    tr.changes = staged.count()
    kind = table.cfg.warehouse.kind
    stages = ["staging_to_dimension"] if kind == "dimension" else ["staging_to_dimension", "dimension_to_fact"]
    quarantine: list[tuple] = []
    df = staged
    for stage in stages:
        res = run_stage(spark, project, table, df, stage, references)
        df = res.good
        quarantine += res.quarantine_rows
        if res.report is not None:
            res.report.rows = res.report.rows or tr.changes
            tr.stages.append(res.report)
            _emit(metrics, res.report)
    m = model(project, table.name, schema)
    cols = [*m.columns, "_op", "_seq", "_commit_ts"]
    arrow = to_arrow(df.select(*cols))
    tr.staged, tr.quarantined = arrow.num_rows, len(quarantine)
    write_quarantine(spark, project, quarantine)
    def move_watermark(w: Warehouse) -> None:
        _set_watermarks(w, schema, table.name, newest)

    if arrow.num_rows:  # the watermark moves in the merge's transaction
        tr.merge = merge_table(wh, project, table.name, arrow, schema=schema, also=move_watermark)
    else:
        with wh.transaction():
            move_watermark(wh)
    tr.to_batch.update(newest)
    staged.unpersist()


def _emit(metrics: MetricsSink, rep: StageReport) -> None:
    by_sev = {"quarantine": 0, "warn": 0, "fail": 0}
    for (_, sev), n in rep.failures.items():
        by_sev[sev] = by_sev.get(sev, 0) + n
    metrics.emit(
        {"DqRowsChecked": rep.rows, "DqQuarantined": by_sev["quarantine"], "DqWarnings": by_sev["warn"],
         "DqFailures": by_sev["fail"]},
        {"Table": rep.table, "Stage": rep.stage},
    )  # fmt: skip


def write_report(project: Project, run: WarehouseRun) -> str:
    """`<lake>/_reports/dq/<run-id>.json` (local folder or s3://)."""
    from cdcflow.reports import write_report as write_json_report

    return write_json_report(project, "dq", run.run_id, run.as_dict())


def summary_rows(run: WarehouseRun) -> list[list[Any]]:
    """One line per table and stage: rows checked, failures per rule and severity, merge outcome."""
    out: list[list[Any]] = []
    for t in run.tables:
        merged = "-" if t.merge is None else f"{t.merge.rows_staged} staged"
        if not t.stages:
            out.append([t.table, "-", t.changes, "-", t.quarantined, merged])
        for s in t.stages:
            fails = ", ".join(f"{r} ({sev}) {n}" for (r, sev), n in sorted(s.failures.items())) or "none"
            out.append([t.table, s.stage, s.rows, fails, t.quarantined, merged])
    return out
