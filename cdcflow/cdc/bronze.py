"""Bronze: every consumed record, PII-masked, partitioned by table and date, for audit, replay and the
warehouse merge (batch/warehouse_job.py reads its changes from here).

Two feeds write it, each with its own increasing `batch_id`:
- `stream`: the streaming job; `batch_id` is the micro-batch id (idempotent per batch via txnAppId).
- `full_load`: `cdcflow full-load`; `batch_id` numbers the table's applied file groups (the LOAD files
  of one snapshot, or a run of CDC files of one schema). Its rows order by commit time + `change_seq` +
  file position (DMS S3 output).
"""

from __future__ import annotations

import pyarrow as pa
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from cdcflow.cdc.changes import SNAPSHOT_SEQ, VALUES
from cdcflow.cdc.masking import PREHASHED, mask_column, masked_data_map, pii_methods
from cdcflow.config import Project, Table
from cdcflow.runtime import new_table_options, sql_in, to_arrow

FEEDS = ("stream", "full_load")
_METHODS, _KNOWN = "_bronze_pii_methods", "_bronze_known_table"


def _typed_data_map(norm: DataFrame, table: Table, salt: str) -> F.Column:
    """A typed source's `_values` (one known table) as a masked column -> text map, built column by
    column: cheaper than masking a map entry by entry."""
    entries = []
    for name in norm.schema[VALUES].dataType.fieldNames():
        method = table.pii.get(name)
        if method == "drop":
            continue
        value = F.col(VALUES)[name].cast("string")
        entries += [F.lit(name), mask_column(value, method, salt) if method else value]
    return F.create_map(*entries) if entries else F.create_map().cast("map<string,string>")


def bronze_rows(norm: DataFrame, project: Project, salt: str, feed: str, table: Table | None = None) -> DataFrame:
    """Normalized changes (cdcflow.cdc.envelope, or batch.full_load for one `table`) -> bronze rows,
    masked, but for their last column, `batch_id`, which `append_bronze` adds."""
    assert feed in FEEDS, feed
    spare = PREHASHED in norm.columns  # stream records: an archived line's hashed columns stay as they are
    # the row's table's PII methods and whether it is configured, once a row for both maps' entries
    norm = norm.withColumn(_METHODS, pii_methods("_table", project)).withColumn(_KNOWN, sql_in("_table", project.tables))
    methods, known = F.col(_METHODS), F.col(_KNOWN)
    if VALUES in norm.columns:
        assert table is not None, "a typed source holds one table"
        data = _typed_data_map(norm, table, salt)
    else:
        data = masked_data_map(F.col("_data"), methods, known, salt, spare)
    return norm.select(
        F.coalesce(F.col("_table"), F.lit("_unparsed")).alias("table"),
        F.to_date(F.coalesce("_commit_ts", "_arrival_ts")).alias("date"),
        F.col("_record_type").alias("record_type"),
        F.col("_op").alias("op"),
        data.alias("data"),
        masked_data_map(F.col("_before"), methods, known, salt, spare).alias("before"),
        F.col("_commit_ts").alias("commit_ts"),
        F.col("_txn_id").alias("transaction_id"),
        F.col("_txn_rec_id").alias("transaction_record_id"),
        F.col("_stream_pos").alias("stream_position"),
        F.col("_change_seq").alias("change_seq"),
        F.col("_control").alias("control"),
        F.col("_source_position").alias("source_position"),
        F.col("_arrival_ts").alias("arrival_ts"),
        F.col("_problem").alias("problem"),
        F.col("_record_hash").alias("record_hash"),
        F.lit(feed).alias("feed"),
        # a reload's sequence (cdcflow.cdc.changes.SNAPSHOT_SEQ): the column joins bronze with the first one
        *([F.col(SNAPSHOT_SEQ).alias("snapshot_seq")] if SNAPSHOT_SEQ in norm.columns else []),
    )


# A bronze append is one Arrow collect through the driver and a delta-rs commit when the batch is
# small enough for the 2 GB driver: 0.15-0.25 s for 300 records against 1.4-5 s for Spark's append
# (2026-12-03), and about half Spark's time per record at 80-140k records (docs/design.md "Bronze").
# A stream's micro-batch is bounded by its DMS JSON bytes (bronze's masked rows are about that size);
# a full load's file group, whose size as text is unknown, by its records. Bigger ones go through
# Spark, which writes from its tasks.
BRONZE_DRIVER_MAX_BYTES = 128 << 20
BRONZE_DRIVER_MAX_RECORDS = 50_000


def through_driver(records: int | None, payload_bytes: int | None) -> bool:
    if payload_bytes is not None:
        return payload_bytes <= BRONZE_DRIVER_MAX_BYTES
    return records is not None and records <= BRONZE_DRIVER_MAX_RECORDS


def append_bronze(rows: DataFrame, path: str, batch_id: int, records: int | None = None,
                  txn: tuple[str, int] | None = None, payload_bytes: int | None = None) -> None:
    """Append bronze rows (`bronze_rows`) with their `batch_id`: a batch under the driver bound
    (`through_driver`: the stream's DMS JSON `payload_bytes`, or a full load's `records`) through
    delta-rs, else (or with neither) through Spark. `txn` = (app id, version) makes the append
    idempotent (a re-run is skipped, whichever engine wrote the first run).

    On the driver's way `batch_id` is added to the collected rows, not as a literal in the Spark plan:
    a long literal is written into the generated code's text, so the projection's code would be new
    every batch (compiled by Janino and the JIT compilers again; docs/design.md, "Per-batch literals").

    Every column goes to delta-rs as nullable: Spark marks `data` of a full load's rows NOT NULL (a
    map built column by column), and a table delta-rs created with that schema refused the stream's
    malformed records (null `data`) later, in Spark (DELTA_NOT_NULL_CONSTRAINT_VIOLATED) and in
    delta-rs (a panic in arrow-data).

    Spark's append doesn't shuffle by (table, date) first: each task writes its own file per (table,
    date) it holds, so a micro-batch leaves up to one file per input partition in each (table, date)
    rather than one, and `cdcflow compact` bin-packs them. Shuffling every record (map columns
    included) cost about 1 s of a 25k-record batch."""
    from cdcflow.cdc.apply import rs_append

    if through_driver(records, payload_bytes):
        data = to_arrow(rows)
        data = data.append_column("batch_id", pa.array([batch_id] * data.num_rows, pa.int64()))
        data = data.cast(pa.schema([f.with_nullable(True) for f in data.schema]))
        # merge: rows without `snapshot_seq` into a bronze that has it (after a reload), or the reverse
        rs_append(path, data, new_table_options("bronze"), partition_by=["table", "date"], txn=txn,
                  schema_mode="merge")
        return
    rows = rows.withColumn("batch_id", F.lit(batch_id).cast("bigint"))
    w = rows.write.format("delta").mode("append").partitionBy("table", "date").options(**new_table_options("bronze"))
    if "snapshot_seq" in rows.columns:
        w = w.option("mergeSchema", "true")
    if txn is not None:
        w = w.option("txnAppId", txn[0]).option("txnVersion", txn[1])
    w.save(path)


def next_full_load_batch(bronze: DataFrame | None, tables: list[str]) -> dict[str, int]:
    """table -> the next full-load batch id (one more than the newest in bronze), for `tables` only:
    the filter on the partition column keeps other tables' files out of the scan."""
    if bronze is None:
        return {}
    rows = (
        bronze.filter(F.col("table").isin(tables) & (F.col("feed") == "full_load"))
        .groupBy("table").agg(F.max("batch_id")).collect()
    )
    return {r[0]: int(r[1]) + 1 for r in rows}
