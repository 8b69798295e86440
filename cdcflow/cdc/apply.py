"""Apply ordered changes to a silver Delta table: the one CDC apply rule, shared by streaming and batch.

1. Collapse the changes to the latest per key (by `_seq`), so MERGE never sees two source rows
   for one target row.
2. MERGE guarded by the stored sequence: a change is applied only if its `_seq` is newer than the
   row's, so duplicates, replays and late events can never roll a row back.
3. Deletes leave a tombstone (`_is_deleted`) that keeps the delete's sequence, so a late, older
   update can't resurrect the key. Hard-delete tables null the tombstone's non-key columns.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

from delta.tables import DeltaTable
from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.utils import AnalysisException

from cdcflow.cdc.changes import TableShape
from cdcflow.cdc.schema import is_widening
from cdcflow.config import Table
from cdcflow.runtime import new_table_options

SILVER_META = {
    "_is_deleted": "boolean",
    "_seq": "string",
    "_op": "string",
    "_commit_ts": "timestamp",
    "_deleted_at": "timestamp",
    "_ingested_at": "timestamp",
}


def silver_options(table: Table) -> dict[str, str]:
    """Table properties a new silver table is created with: ours, then the configured ones."""
    return {**new_table_options(table.name), **table.delta_properties}


def sync_properties(spark: SparkSession, path: str, table: Table) -> list[str]:
    """Set configured properties an existing silver table lacks or holds other values for (one commit
    when something changed); returns the properties set. Properties no longer configured are kept."""
    held = dict(spark.sql(f"SHOW TBLPROPERTIES delta.`{path}`").collect())  # metadata only, no job
    changed = {k: v for k, v in table.delta_properties.items() if held.get(k) != v}
    if changed:
        props = ", ".join(f"'{k}' = '{v}'" for k, v in changed.items())
        spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ({props})")
    return sorted(changed)


def ensure_silver(spark: SparkSession, path: str, shape: TableShape) -> list[str]:
    """Create the silver table if missing; add columns that schema drift introduced and widen the
    ones it widened (never narrows: a narrower shape type is cast on write). Returns the data
    columns silver holds that the shape lacks (dropped at the source: the change leaves them NULL)."""
    t = shape.table
    try:
        table = DeltaTable.forPath(spark, path)
    except AnalysisException:
        builder = DeltaTable.createIfNotExists(spark).location(path)
        for c in shape.output_columns:
            builder = builder.addColumn(c, shape.output_type(c), nullable=c not in t.primary_key)
        for c, ty in SILVER_META.items():
            builder = builder.addColumn(c, ty)
        if t.cfg.delta.partition_by:
            builder = builder.partitionedBy(*t.cfg.delta.partition_by)
        for key, value in silver_options(t).items():
            builder = builder.property(key, value)
        builder.execute()
        return []
    existing = {f.name: f.dataType.simpleString() for f in table.toDF().schema.fields}
    missing = [c for c in shape.output_columns if c not in existing]
    if missing:
        cols = ", ".join(f"{_q(c)} {shape.output_type(c)}" for c in missing)
        spark.sql(f"ALTER TABLE delta.{_q(path)} ADD COLUMNS ({cols})")
    wider = {c: shape.output_type(c) for c in shape.output_columns if c in existing
             and existing[c] != shape.output_type(c) and is_widening(existing[c], shape.output_type(c))}
    widen_columns(spark, path, wider)
    wanted = set(shape.output_columns) | set(SILVER_META)
    return [c for c in existing if c not in wanted]


def collapse(changes: DataFrame, shape: TableShape) -> DataFrame:
    """The latest change per key in `_seq` order (ties: identical duplicates, any one is right).

    With ignore_null_updates, a NULL in an update means "unchanged": each column takes its last
    non-null value among the updates after the key's latest insert/load/delete in this batch.
    """
    t = shape.table
    key = t.primary_key
    by_key = Window.partitionBy(*key)
    latest = Window.partitionBy(*key).orderBy(F.col("_seq").desc())
    if not t.cfg.ignore_null_updates:
        return changes.withColumn("_rn", F.row_number().over(latest)).filter("_rn = 1").drop("_rn")

    # Segment start: the last non-update change of the key; only later updates merge their values.
    seg_start = F.max(F.when(F.col("_op") != "update", F.col("_seq"))).over(by_key)
    segment = changes.withColumn("_seg", seg_start).filter(F.col("_seg").isNull() | (F.col("_seq") >= F.col("_seg")))
    ordered = Window.partitionBy(*key).orderBy("_seq").rowsBetween(Window.unboundedPreceding, Window.unboundedFollowing)
    values = [
        F.last(F.col(c), ignorenulls=True).over(ordered).alias(c) if c not in key else F.col(c)
        for c in shape.output_columns
    ]
    merged = segment.select(*values, "_op", "_seq", "_commit_ts", "_source_position", "_seg")
    return (
        merged.withColumn("_rn", F.row_number().over(latest))
        .filter("_rn = 1")
        # a segment without insert/load/delete is a pure partial update: keep stored values for NULLs
        .withColumn("_partial", F.col("_seg").isNull())
        .drop("_rn", "_seg")
    )


def merge(spark: SparkSession, path: str, changes: DataFrame, shape: TableShape) -> None:
    """Collapse `changes` (key, output columns, _op, _seq, _commit_ts) and MERGE them into silver."""
    src = collapse(changes, shape)
    if "_partial" not in src.columns:
        src = src.withColumn("_partial", F.lit(False))
    if not DeltaTable.isDeltaTable(spark, path):
        # First batch of a table: nothing to merge with, so write the collapsed rows directly (one
        # commit instead of create + MERGE). A crash-replay then finds the table and MERGEs, guarded.
        _first_write(src, path, shape)
        return
    absent = ensure_silver(spark, path, shape)
    # One SQL statement rather than the Python merge builder: the builder makes a JVM call for every
    # expression and assignment (about 270 per table and micro-batch), the statement one.
    # The view lives in the source's session: in a foreachBatch that is the micro-batch's own session.
    session = src.sparkSession
    view = f"cdcflow_merge_source_{threading.get_ident()}"  # one MERGE at a time per thread
    src.createOrReplaceTempView(view)
    try:
        session.sql(merge_sql(path, view, shape, absent))
    finally:
        session.catalog.dropTempView(view)


def _q(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def merge_sql(path: str, source_view: str, shape: TableShape, absent: list[str] = ()) -> str:
    """The guarded MERGE of a collapsed source view (output columns, _op, _seq, _commit_ts, _partial).

    `absent`: silver columns the changes don't carry (dropped at the source): a full change sets them
    NULL, as the source row has no value; a partial update keeps them."""
    t = shape.table
    key = t.primary_key
    data_cols = [c for c in shape.output_columns if c not in key]
    newer = "(t._seq IS NULL OR s._seq > t._seq)"
    upsert = {c: f"CASE WHEN s._partial THEN coalesce(s.{_q(c)}, t.{_q(c)}) ELSE s.{_q(c)} END" for c in data_cols}
    upsert.update({c: f"CASE WHEN s._partial THEN t.{_q(c)} END" for c in absent})
    upsert_meta = {
        "_is_deleted": "false",
        "_seq": "s._seq",
        "_op": "s._op",
        "_commit_ts": "s._commit_ts",
        "_deleted_at": "CAST(NULL AS TIMESTAMP)",
        "_ingested_at": "current_timestamp()",
    }
    tombstone = {
        "_is_deleted": "true",
        "_seq": "s._seq",
        "_op": "s._op",
        "_commit_ts": "s._commit_ts",
        "_deleted_at": "s._commit_ts",
        "_ingested_at": "current_timestamp()",
    }
    if t.deletes == "hard":
        tombstone = {**{c: "NULL" for c in [*data_cols, *absent]}, **tombstone}
    from_source = {c: f"s.{_q(c)}" for c in shape.output_columns}
    insert = {**from_source, **upsert_meta}
    keep = key if t.deletes == "hard" else shape.output_columns
    insert_tombstone = {**{c: from_source[c] for c in keep}, **tombstone}

    def assign(values: dict[str, str]) -> str:
        return ", ".join(f"{_q(c)} = {v}" for c, v in values.items())

    def insert_values(values: dict[str, str]) -> str:
        return f"({', '.join(_q(c) for c in values)}) VALUES ({', '.join(values.values())})"

    on = " AND ".join(f"t.{_q(k)} = s.{_q(k)}" for k in key)
    return f"""MERGE INTO delta.{_q(path)} AS t USING {source_view} AS s ON {on}
WHEN MATCHED AND {newer} AND s._op = 'delete' THEN UPDATE SET {assign(tombstone)}
WHEN MATCHED AND {newer} AND s._op != 'delete' THEN UPDATE SET {assign({**upsert, **upsert_meta})}
WHEN NOT MATCHED AND s._op = 'delete' THEN INSERT {insert_values(insert_tombstone)}
WHEN NOT MATCHED THEN INSERT {insert_values(insert)}"""


def _first_write(src: DataFrame, path: str, shape: TableShape) -> None:
    t = shape.table
    data_cols = [c for c in shape.output_columns if c not in t.primary_key]
    deleted = F.col("_op") == "delete"
    hard = t.deletes == "hard"
    cols = [
        (F.when(deleted, F.lit(None)).otherwise(F.col(f"`{c}`")) if hard and c in data_cols else F.col(f"`{c}`"))
        .cast(shape.output_type(c)).alias(c)
        for c in shape.output_columns
    ]
    out = src.select(
        *cols,
        deleted.alias("_is_deleted"),
        F.col("_seq"),
        F.col("_op"),
        F.col("_commit_ts"),
        F.when(deleted, F.col("_commit_ts")).cast("timestamp").alias("_deleted_at"),
        F.current_timestamp().alias("_ingested_at"),
    )
    writer = out.write.format("delta").mode("append").options(**silver_options(t))
    if t.cfg.delta.partition_by:
        writer = writer.partitionBy(*t.cfg.delta.partition_by)
    writer.save(path)


def widen_columns(spark: SparkSession, path: str, columns: dict[str, str]) -> None:
    """Widen column types in place with Delta type widening (int -> bigint, decimal precision, ...)."""
    if not columns:
        return
    try:
        spark.sql(f"ALTER TABLE delta.`{path}` SET TBLPROPERTIES ('delta.enableTypeWidening' = 'true')")
        for c, ty in columns.items():
            spark.sql(f"ALTER TABLE delta.`{path}` ALTER COLUMN `{c}` TYPE {ty}")
    except AnalysisException:
        # Older Delta (Glue 5.1's 3.3) widens only some types in place: rewrite the table once with
        # the wider type instead. Every old value fits the new type, so nothing changes but the schema.
        df = spark.read.format("delta").load(path)
        widened = df.select(*[F.col(f"`{f}`").cast(columns[f]).alias(f) if f in columns else F.col(f"`{f}`")
                              for f in df.columns])
        widened.write.format("delta").mode("overwrite").option("overwriteSchema", "true").save(path)


CONTROL_TS_PROPERTY = "cdcflow.lastControlTs"
TABLE_DEF_PROPERTY = "cdcflow.sourceTableDef"


@dataclass(frozen=True)
class ControlState:
    """What the table holds of the DMS control records applied to it (table properties)."""

    type_change_ts: str | None = None  # DMS timestamp of the newest type change applied
    table_def: dict[str, str] | None = None  # column -> DMS type text of the newest table-def


def control_state(spark: SparkSession, path: str) -> ControlState:
    props = spark.sql(f"DESCRIBE DETAIL delta.{_q(path)}").first()["properties"] or {}
    table_def = props.get(TABLE_DEF_PROPERTY)
    return ControlState(props.get(CONTROL_TS_PROPERTY), json.loads(table_def) if table_def else None)


def set_control_state(spark: SparkSession, path: str, state: ControlState) -> None:
    props = {CONTROL_TS_PROPERTY: state.type_change_ts,
             TABLE_DEF_PROPERTY: json.dumps(state.table_def, sort_keys=True) if state.table_def is not None else None}
    assigned = ", ".join(f"'{k}' = {_sql_string(v)}" for k, v in props.items() if v is not None)
    if assigned:
        spark.sql(f"ALTER TABLE delta.{_q(path)} SET TBLPROPERTIES ({assigned})")


def _sql_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
