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
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from delta.tables import DeltaTable
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.utils import AnalysisException
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_random_exponential

from cdcflow.cdc.changes import TableShape
from cdcflow.cdc.schema import SILVER_META, is_widening
from cdcflow.config import Table
from cdcflow.runtime import new_table_options, to_arrow
from cdcflow.storage import rs_options


def silver_options(table: Table) -> dict[str, str]:
    """Table properties a new silver table is created with: ours, then the configured ones."""
    return {**new_table_options(table.name), **table.delta_properties}


@dataclass(frozen=True)
class SilverMetadata:
    columns: dict[str, str]  # every column -> Spark type
    properties: dict[str, str]


def silver_metadata(spark: SparkSession, path: str) -> SilverMetadata | None:
    """Silver's columns and table properties, or None before its first write. Read from the log by
    delta-rs (a few ms, no JVM: at 1000 tables Spark's three metadata queries each cost minutes);
    by Spark when delta-rs can't read the table (a feature it lacks)."""
    try:
        rs = rs_table(path)
        schema = pa.schema(rs.schema().to_arrow())
        return SilverMetadata({f.name: _spark_type_of(f.type) for f in schema}, dict(rs.metadata().configuration))
    except Exception as e:  # noqa: BLE001 - no table, or one delta-rs can't read
        if type(e).__name__ == "TableNotFoundError":
            return None
    if not DeltaTable.isDeltaTable(spark, path):
        return None
    fields = spark.read.format("delta").load(path).schema.fields
    props = spark.sql(f"DESCRIBE DETAIL delta.{_q(path)}").first()["properties"] or {}
    return SilverMetadata({f.name: f.dataType.simpleString() for f in fields}, dict(props))


def sync_properties(spark: SparkSession, path: str, table: Table, held: dict[str, str] | None = None) -> list[str]:
    """Set configured properties an existing silver table lacks or holds other values for (one commit
    when something changed); returns the properties set. Properties no longer configured are kept."""
    if held is None:
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
    if not t.cfg.ignore_null_updates:
        return latest_per_key(changes, [F.col(k) for k in key])
    # each change filled as the rule says, then the key's latest one; without an insert/load/delete
    # (`_base` NULL) it is a pure partial update: silver keeps its stored values for the NULLs
    filled = fill_partial_updates(changes, key, [c for c in shape.output_columns if c not in key])
    return (
        latest_per_key(filled, [F.col(k) for k in key])
        .select(*shape.output_columns, "_op", "_seq", "_commit_ts", "_source_position",
                F.col("_base").isNull().alias("_partial"))
    )


def fill_partial_updates(changes: DataFrame, key: list[str], columns: list[str]) -> DataFrame:
    """The ignore_null_updates rule row by row (`collapse` takes each key's latest row; the warehouse
    merge keeps every change): each update's NULL in `columns` becomes the last non-null value among
    its key's changes from the latest insert / load / delete before it (in `_seq` order) up to itself.
    Adds `_base`: that change's `_seq`, NULL when the key has none in `changes` (what is left NULL
    then was unchanged from before these changes)."""
    upto = Window.partitionBy(*key).orderBy("_seq").rowsBetween(Window.unboundedPreceding, Window.currentRow)
    based = changes.withColumn("_base", F.max(F.when(F.col("_op") != "update", F.col("_seq"))).over(upto))
    segment = Window.partitionBy(*key, "_base").orderBy("_seq").rowsBetween(Window.unboundedPreceding,
                                                                            Window.currentRow)
    update = F.col("_op") == "update"
    return based.select(*[F.when(update, F.last(c, ignorenulls=True).over(segment)).otherwise(F.col(c)).alias(c)
                          if c in columns else F.col(c) for c in based.columns])


def latest_per_key(changes: DataFrame, key: list[Column]) -> DataFrame:
    """The change with the highest `_seq` per key (the collapse without ignore_null_updates)."""
    latest = Window.partitionBy(*key).orderBy(F.col("_seq").desc())
    return changes.withColumn("_rn", F.row_number().over(latest)).filter("_rn = 1").drop("_rn")


def latest_changes(changes: pa.Table) -> pa.Table:
    """`collapse` on the driver, for the many-table plan's collected changes (cdcflow.cdc.multi_table):
    per key (`_table`, `_key`: the key as text) its latest change by `_seq`, with `_partial` for a key
    whose table ignores NULL updates (`_ignore_nulls`) and that has no insert, load or delete (a pure
    partial update: silver keeps its stored values for the NULLs). The rows come back sorted by
    `_table`, without `_key` and `_ignore_nulls`.

    With ignore_null_updates a key whose latest change sends no NULL takes that change's values as
    they are (each column's last non-null value is its own); when it sends a NULL, the key's segment
    (its changes from its latest non-update on) is folded by `collapse`'s rule: in `_seq` order each
    value of `_values` the last non-null one, the rest the latest change's. A sort and a few
    vectorized passes on the driver, where Spark's window shuffled and sorted every row
    (docs/design.md, "The shared plan's collapse on the driver")."""
    rows = changes.take(pc.sort_indices(changes, [("_table", "ascending"), ("_key", "ascending"),
                                                  ("_seq", "ascending")])).combine_chunks()
    n = rows.num_rows
    if n == 0:
        return rows.append_column("_partial", pa.array([], pa.bool_())).drop_columns(["_key", "_ignore_nulls"])
    first = np.ones(n, dtype=bool)  # the row starts a key
    if n > 1:
        same = pc.and_(pc.equal(rows["_table"][1:], rows["_table"][:-1]), pc.equal(rows["_key"][1:], rows["_key"][:-1]))
        first[1:] = ~same.to_numpy()
    starts = np.flatnonzero(first)
    lasts = np.append(starts[1:] - 1, n - 1).astype(np.int64)
    update = pc.equal(rows["_op"], "update").to_numpy()
    # per key: the position of its latest insert, load or delete, where its segment starts (-1: none)
    segment = np.maximum.reduceat(np.where(update, -1, np.arange(n)), starts)
    ignore = pc.fill_null(rows["_ignore_nulls"], False).to_numpy()[lasts]
    partial = ignore & (segment < 0)
    ends_on_update = np.flatnonzero(ignore & update[lasts])
    fold = ends_on_update[_sends_null(rows["_values"].take(pa.array(lasts[ends_on_update])).combine_chunks())]
    whole = np.ones(len(starts), dtype=bool)
    whole[fold] = False
    out = rows.take(pa.array(lasts[whole])).append_column("_partial", pa.array(partial[whole]))
    if len(fold):
        begin = np.maximum(segment[fold], starts[fold])
        spans = [np.arange(b, e + 1) for b, e in zip(begin, lasts[fold], strict=True)]
        changes_of = iter(rows.take(pa.array(np.concatenate(spans))).to_pylist())
        folded = [{**_fold([next(changes_of) for _ in span]), "_partial": bool(partial[k])}
                  for span, k in zip(spans, fold, strict=True)]
        out = pa.concat_tables([out, pa.Table.from_pylist(folded, schema=out.schema)])
        out = out.take(pc.sort_indices(out["_table"]))
    return out.drop_columns(["_key", "_ignore_nulls"])


def _sends_null(maps: pa.MapArray) -> np.ndarray:
    """Per map: whether one of its values is NULL (`maps` freshly taken: its offsets start at 0)."""
    nulls = np.concatenate([[0], np.cumsum(maps.items.is_null().to_numpy(zero_copy_only=False))])
    offsets = maps.offsets.to_numpy()
    return nulls[offsets[1:]] > nulls[offsets[:-1]]


def _fold(segment: list[dict]) -> dict:
    """One key's segment (in `_seq` order) as one change: the latest change with each value the last
    non-null one of the segment."""
    values: dict = {}
    for change in segment:
        for column, value in change["_values"] or ():
            if value is not None or column not in values:
                values[column] = value
    return {**segment[-1], "_values": list(values.items())}


REJECTED = ["_rule", "_reason", "_source_position", "_record_hash", "_payload"]


@dataclass
class Applied:
    writer: str  # "delta-rs" or "spark" (see `silver_writer`)
    rejected: list  # the rows of `rejected`, as mappings of REJECTED columns


def merge(spark: SparkSession, path: str, changes: DataFrame, shape: TableShape,
          rejected: DataFrame | None = None, source_bytes: int = 0) -> Applied:
    """Collapse `changes` (key, output columns, _op, _seq, _commit_ts) and MERGE them into silver.

    `rejected`: the same records' rows that can't be applied (REJECTED columns), collected in the
    same Spark job as the changes when delta-rs commits, so a small table costs one job.
    `source_bytes`: the size of the files the changes come from, when known (the full load)."""
    src = collapse(changes, shape)
    if "_partial" not in src.columns:
        src = src.withColumn("_partial", F.lit(False))
    writer, table = silver_writer(path, shape.table, source_bytes, HANDLES.take(path))
    if table is not None and _evolves(table, shape):
        ensure_silver(spark, path, shape)  # rare (schema drift): adds / widens columns through Spark
        writer, table = silver_writer(path, shape.table, source_bytes)  # widening may add a feature delta-rs can't write
    if writer == "delta-rs":
        return Applied(writer, _merge_delta_rs(spark, path, table, src, shape, rejected))
    src = src.withColumn("_ingested_at", F.current_timestamp())
    bad = rejected.collect() if rejected is not None else []
    if not DeltaTable.isDeltaTable(spark, path):
        # First batch of a table: nothing to merge with, so write the collapsed rows directly (one
        # commit instead of create + MERGE). A crash-replay then finds the table and MERGEs, guarded.
        _append_first(first_rows(src, shape).write.format("delta"), path, shape.table)
        return Applied(writer, bad)
    absent = ensure_silver(spark, path, shape)
    # One SQL statement rather than the Python merge builder: the builder makes a JVM call for every
    # expression and assignment (about 270 per table and micro-batch), the statement one.
    # The view lives in the source's session: in a foreachBatch that is the micro-batch's own session.
    session = src.sparkSession
    view = f"cdcflow_merge_source_{threading.get_ident()}"  # one MERGE at a time per thread
    src.createOrReplaceTempView(view)
    try:
        _spark_sql(session, merge_sql(path, view, shape, absent))
    finally:
        session.catalog.dropTempView(view)
    return Applied(writer, bad)


# Writer features delta-rs commits to (protocol writer 7); anything else (deletion vectors, type
# widening, column mapping, row tracking, ...) leaves the table to Spark.
DELTA_RS_WRITER_FEATURES = {"appendOnly", "invariants", "checkConstraints", "changeDataFeed", "generatedColumns",
                            "timestampNtz"}


def spark_commits(table: Table) -> bool:
    """Whether the config alone sends the table to Spark MERGE (`writer: spark`, or deletion vectors)."""
    return table.writer == "spark" or (
        table.writer == "auto" and table.delta_properties.get("delta.enableDeletionVectors") == "true")


# delta-rs takes the changes on the driver (one Arrow collect through the 2 GB driver heap): changes
# read from more Parquet than this (a big table's full load) go to Spark, which writes them from its
# tasks. 1M rows of shop.customers are 40 MB of Parquet and 137 MB of Arrow; their collect ran the
# driver out of heap once in two runs.
DELTA_RS_MAX_SOURCE_BYTES = 16 * 1024 * 1024


def silver_writer(path: str, table: Table, source_bytes: int = 0, opened=None):
    """("delta-rs", its open table or None before the first write) or ("spark", None). `opened`:
    the table already open at its newest version (`HANDLES.take`), else it is opened here.

    `writer: auto` picks delta-rs while silver is at most `delta_rs_max_table_mb` and uses only
    features delta-rs writes: a small MERGE costs it ~15-50 ms against ~0.7 s (9.5 Spark jobs) in
    Spark; above the size, Spark's distributed rewrite wins (docs/design.md, "Silver writer").
    Changes from more than DELTA_RS_MAX_SOURCE_BYTES of files (`source_bytes`) go to Spark too.
    """
    if spark_commits(table) or (table.writer == "auto" and source_bytes > DELTA_RS_MAX_SOURCE_BYTES):
        return "spark", None
    try:
        rs = opened if opened is not None else rs_table_or_none(path)
    except Exception:  # noqa: BLE001 - a table delta-rs can't read
        return ("delta-rs", None) if table.writer == "delta-rs" else ("spark", None)
    if rs is None:
        return "delta-rs", None
    if table.writer == "delta-rs":
        return "delta-rs", rs
    proto = rs.protocol()
    features = set(proto.writer_features or ())
    if proto.min_writer_version in (5, 6) or not features <= DELTA_RS_WRITER_FEATURES:
        return "spark", None
    size = table_files(rs).size_bytes
    return ("delta-rs", rs) if size <= table.delta_rs_max_table_mb * 1024 * 1024 else ("spark", None)


def rs_uri(path: str) -> str:
    """delta-rs reads s3:// (not s3a://) and plain local paths."""
    for prefix in ("s3a://", "s3n://"):
        if path.startswith(prefix):
            return "s3://" + path[len(prefix):]
    return path[len("file:"):] if path.startswith("file:") else path


def rs_table(path: str):
    """The delta-rs table at `path`, with the lake's S3 settings (cdcflow.storage) on S3."""
    from deltalake import DeltaTable as RsTable

    return RsTable(rs_uri(path), storage_options=rs_options(path))


def rs_table_or_none(path: str):
    """The delta-rs table at `path`, or None when there is none yet (other errors raise)."""
    from deltalake.exceptions import TableNotFoundError

    try:
        return rs_table(path)
    except TableNotFoundError:
        return None


def rs_append(path: str, data: pa.Table, configuration: dict[str, str], partition_by: list[str] | None = None,
              txn: tuple[str, int] | None = None, schema_mode: str | None = None) -> None:
    """Append `data` by delta-rs (`configuration`: properties a new table is created with). `txn` =
    (app id, version) makes it idempotent: skipped when the table already holds that version of the
    app, as Delta's txnAppId / txnVersion writer options do in Spark (the same `txn` log action, so
    either engine sees the other's). One writer per app id (one stream), so the check and the commit
    need no lock between them."""
    from deltalake import CommitProperties, Transaction, write_deltalake

    table = None
    if txn is not None:
        table = rs_table_or_none(path)  # the append reuses this read of the log (one per micro-batch on S3)
        held = table.transaction_version(txn[0]) if table is not None else None
        if held is not None and held >= txn[1]:
            return
    commit = CommitProperties(app_transactions=[Transaction(txn[0], txn[1])]) if txn is not None else None
    write_deltalake(table if table is not None else rs_uri(path), data, mode="append", partition_by=partition_by, configuration=configuration,
                    storage_options=rs_options(path), commit_properties=commit, schema_mode=schema_mode)


def _collect_with_rejected(rows: DataFrame, rejected: DataFrame | None) -> tuple[pa.Table, list]:
    """(rows, rejected rows) from one Spark job: both sides of a union, told apart by `_rule`."""
    if rejected is None:
        return to_arrow(rows), []
    both = to_arrow(rows.withColumn("_rule", F.lit(None).cast("string"))
                    .unionByName(rejected.select(*REJECTED), allowMissingColumns=True))
    good = pc.is_null(both["_rule"])
    bad = both.filter(pc.invert(good)).select(REJECTED).to_pylist()
    return both.filter(good).select(rows.columns), bad


def _evolves(rs, shape: TableShape) -> bool:
    """Whether the shape has columns silver (read by delta-rs) lacks or holds narrower."""
    types = _spark_types(rs.schema().to_json())
    return any(c not in types or (types[c] != shape.output_type(c) and is_widening(types[c], shape.output_type(c)))
               for c in shape.output_columns)


def _merge_delta_rs(spark: SparkSession, path: str, rs, src: DataFrame, shape: TableShape,
                    rejected: DataFrame | None) -> list:
    """The same collapse and guarded MERGE as Spark's, committed by delta-rs: the collapsed rows come
    to the driver as Arrow (one Spark job) and delta-rs rewrites the touched files (no JVM)."""
    from deltalake import write_deltalake

    if rs is None:
        rows, bad = _collect_with_rejected(first_rows(src, shape), rejected)
        rows = ingested_now(rows)
        t = shape.table
        # The key NOT NULL and nothing else, as when Spark (`ensure_silver`) or `merge_rows` creates
        # silver, whatever nullability the collect carries (a NOT NULL data column would refuse a later
        # tombstone's or dropped column's nulls; bronze met that with delta-rs, design.md "Bronze").
        rows = rows.cast(pa.schema([f.with_nullable(f.name not in t.primary_key) for f in rows.schema]))
        write_deltalake(rs_uri(path), rows, mode="append", partition_by=t.cfg.delta.partition_by or None,
                        configuration=silver_options(t), storage_options=rs_options(path))
        return bad
    source, bad = _collect_with_rejected(src, rejected)
    if source.num_rows == 0:
        return bad
    held = pa.schema(rs.schema().to_arrow())
    absent = [c for c in held.names if c not in shape.output_columns and c not in SILVER_META]
    # the source in silver's types: a narrower shape type (older files) is cast up, as Spark does
    source = source.select([c for c in source.schema.names if c in held.names or c == "_partial"])
    source = source.cast(pa.schema([held.field(c) if c in held.names else source.schema.field(c)
                                    for c in source.schema.names]))
    partial = pc.any(source["_partial"]).as_py() is True
    source = ingested_now(source, held.field("_ingested_at").type)
    _rs_merge(path, source, merge_clauses(shape, absent, _dq, partial), rs)
    return bad


def ingested_now(rows: pa.Table, type_: pa.DataType | None = None) -> pa.Table:
    """`rows` with `_ingested_at` (set or added) = now. delta-rs's writes stamp the collected rows: as
    `current_timestamp()` in the Spark plan the time is a literal once optimized, written into the
    generated code's text, so the projection's code was new every batch (docs/design.md, "Per-batch
    literals"). Spark's own writes keep `current_timestamp()`."""
    names = rows.column_names
    at = names.index("_ingested_at") if "_ingested_at" in names else None
    type_ = type_ or (rows.schema.field(at).type if at is not None else pa.timestamp("us", "UTC"))
    now = pa.repeat(pa.scalar(datetime.now(UTC), type_), rows.num_rows)
    return rows.set_column(at, "_ingested_at", now) if at is not None else rows.append_column("_ingested_at", now)


def silver_schema(shape: TableShape) -> pa.Schema:
    """A new silver table's Arrow schema: the output columns (only the key NOT NULL), then SILVER_META."""
    from cdcflow.cdc.schema import arrow_type

    fields = [pa.field(c, arrow_type(shape.output_type(c)), nullable=c not in shape.table.primary_key)
              for c in shape.output_columns]
    return pa.schema(fields + [pa.field(c, arrow_type(ty)) for c, ty in SILVER_META.items()])


def merge_rows(path: str, changes: pa.Table, shape: TableShape) -> str | None:
    """Commit collapsed changes that are already on the driver (cdcflow.cdc.multi_table: `_values`,
    a column -> text map, with `_op`, `_seq`, `_commit_ts`, optionally `_partial`) by delta-rs, with
    the same MERGE as `merge`; None when committed. Without writing, "spark" when delta-rs should not take the table
    (`silver_writer`) and "evolve" when silver needs a column added or widened first (Spark does
    that): the caller then applies these changes through `merge`."""
    from deltalake import DeltaTable as RsTable

    writer, rs = silver_writer(path, shape.table, opened=HANDLES.take(path))
    if writer != "delta-rs":
        return "spark"
    if rs is not None and _evolves(rs, shape):
        return "evolve"
    if changes.num_rows == 0:
        if rs is None:  # a new table with nothing to apply yet: created empty
            t = shape.table
            RsTable.create(rs_uri(path), silver_schema(shape), partition_by=t.cfg.delta.partition_by or None,
                           configuration=silver_options(t), mode="ignore", storage_options=rs_options(path))
        return None
    held = pa.schema(rs.schema().to_arrow()) if rs is not None else silver_schema(shape)
    values = changes["_values"]
    source = {c: _from_text(pc.map_lookup(values, c, "first"), held.field(c).type)
              for c in shape.output_columns if c in held.names}
    source.update({
        "_op": changes["_op"], "_seq": changes["_seq"],
        "_commit_ts": changes["_commit_ts"].cast(held.field("_commit_ts").type),
    })  # fmt: skip
    absent = [c for c in held.names if c not in shape.output_columns and c not in SILVER_META]
    # partial updates (ignore_null_updates: latest_changes) need the MERGE's CASEs; others don't
    partial = "_partial" in changes.column_names and pc.any(changes["_partial"]).as_py() is True
    if partial:
        source["_partial"] = changes["_partial"]
    source = ingested_now(pa.table(source), held.field("_ingested_at").type)
    m = merge_clauses(shape, absent, _dq, partial)
    if rs is None:
        if not _create_with(path, source, m, shape):  # another writer created it first: merge into theirs
            return merge_rows(path, changes, shape)
        return None
    _rs_merge(path, source, m, rs)
    return None


def _create_with(path: str, source: pa.Table, m: MergeClauses, shape: TableShape) -> bool:
    """Create silver with its first changes in one commit: the same MERGE, into no rows (a create and
    then the MERGE cost two commits, ~3 ms more a new table). False, and nothing written, when the
    table exists by the time this commits (another writer created it): the caller merges into it."""
    from deltalake import write_deltalake

    from cdcflow.cdc import arrow_merge

    t = shape.table
    merged = arrow_merge.merge(silver_schema(shape).empty_table(), source, m)
    commit_id, commit = _commit_id()
    try:
        write_deltalake(rs_uri(path), merged, mode="error", partition_by=t.cfg.delta.partition_by or None,
                        configuration=silver_options(t), storage_options=rs_options(path), commit_properties=commit)
    except Exception:
        if rs_table_or_none(path) is None:
            raise
        return False
    # held for the next commit, as `_rs_merge` does; the rows kept only if no other commit came between
    table = rs_table(path)
    files = table_files(table)
    if table.version() == 0 and copies_on_write(table, files.size_bytes):
        REWRITTEN.put(path, files.paths, table.schema().to_json(), merged)
    HANDLES.give(path, table, commit_id)
    return True


def _from_text(text, to: pa.DataType):
    """Spark's text of a typed value back to the type. Spark writes timestamps in the session time
    zone (UTC, `cdcflow.runtime`) without an offset, which Arrow reads as naive and then labels UTC."""
    if pa.types.is_timestamp(to) and to.tz is not None:
        return text.cast(pa.timestamp(to.unit)).cast(to)
    return text.cast(to)


def is_commit_conflict(exc: BaseException) -> bool:
    """A commit lost to a concurrent one (compaction beside the stream, two jobs on one table): retry it."""
    text = f"{type(exc).__name__} {exc}"
    return any(s in text for s in ("Concurrent", "ProtocolChanged", "MetadataChanged", "CommitFailed",
                                   "concurrent transaction", "Version mismatch"))


# Each attempt reads the table's newest version again, so the guarded MERGE stays correct.
retry_commit_conflicts = retry(retry=retry_if_exception(is_commit_conflict), stop=stop_after_attempt(10),
                               wait=wait_random_exponential(multiplier=0.3, max=10), reraise=True)


# A table of at most this many bytes of Parquet is merged in Arrow and rewritten whole (copy-on-write,
# cdcflow.cdc.arrow_merge) instead of by delta-rs's MERGE. benchmarks/silver_commit.py: the rewrite
# costs 0.65-0.9x the MERGE's CPU up to 100k rows (2.6 MB) and 1.1-1.2x at 400k rows (8 MB).
COPY_ON_WRITE_MAX_BYTES = 2 * 1024 * 1024


def copies_on_write(table, size_bytes: int) -> bool:
    """Whether a commit to this delta-rs table (`size_bytes`: its data files' size) rewrites it whole:
    small, unpartitioned, without the change data feed (a rewrite would feed every row as changed)
    and without generated columns (delta-rs's MERGE computes them for inserted rows; a rewrite would have to)."""
    meta = table.metadata()
    if meta.partition_columns or meta.configuration.get("delta.enableChangeDataFeed") == "true":
        return False
    if "generatedColumns" in (table.protocol().writer_features or ()):
        return False
    return size_bytes <= COPY_ON_WRITE_MAX_BYTES


@dataclass(frozen=True)
class TableFiles:
    """An open table's data files at one version: their paths (sorted) and total size."""

    version: int
    paths: tuple[str, ...]
    size_bytes: int


def table_files(table) -> TableFiles:
    """The open table's data files at its version, read once per open table and version (a commit
    reads them for the writer's size check, copy-on-write's size and file set, and after its write).
    Kept as plain Python values: the Arrow add actions delta-rs hands over hold their Rust allocation,
    about 160 KB a table whatever their rows (a `/tmp` probe of 500 held tables: 81 MB against none),
    so 1,024 held tables kept them at ~160 MB of the driver."""
    held = getattr(table, "_cdcflow_files", None)
    if held is None or held.version != table.version():
        adds = table.get_add_actions(flatten=False)  # arro3: two columns read, no pyarrow table built
        held = TableFiles(table.version(), tuple(sorted(adds.column("path").to_pylist())),
                          sum(adds.column("size_bytes").to_pylist()))
        table._cdcflow_files = held
    return held


class Rewritten:
    """The rows of the small tables this process last rewrote, by table path, for as long as the table
    holds exactly the files that rewrite wrote, under the same schema: a Delta data file never changes
    once written, so those rows are the table's and the next commit need not read them back (about
    2 ms of a small table's ~13 ms commit). Another writer's commit changes the files (a miss).
    At most `max_bytes` of Arrow are held, the least recently written dropped first."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._held: OrderedDict[str, tuple[tuple[str, ...], str, pa.Table, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, path: str, files: tuple[str, ...], schema: str) -> pa.Table | None:
        with self._lock:
            held = self._held.get(path)
        return held[2] if held is not None and held[:2] == (files, schema) else None

    def put(self, path: str, files: tuple[str, ...], schema: str, rows: pa.Table) -> None:
        with self._lock:
            self._drop(path)
            size = rows.nbytes  # once: summing a table's buffers is not free at ~1000 puts a batch
            self._held[path] = (files, schema, rows, size)
            self._bytes += size
            while self._bytes > self.max_bytes and self._held:
                self._drop(next(iter(self._held)))

    def _drop(self, path: str) -> None:
        held = self._held.pop(path, None)
        if held is not None:
            self._bytes -= held[3]


# What this process last rewrote: small tables only, at most 1004 x a few hundred rows in the scale
# targets; the bound keeps a lake of bigger small tables from growing the driver.
REWRITTEN = Rewritten(max_bytes=256 * 1024 * 1024)


class Handles:
    """The delta-rs tables this process committed last, kept open at the version of that commit, by
    path: the next commit brings one up to date with `update_incremental()` when the log has an entry
    after it (another writer's), instead of opening the table again (the log read from its last
    checkpoint: about 3 of a small table's ~13 ms commit, more on S3).

    An open table knows its versions, not the table behind them: a table dropped and created again
    at the same path would be read as the old one's later versions (or as unchanged), and a commit
    over that would corrupt the new one. So each commit carries a random id in its commitInfo
    (`cdcflow.commit`), and a held table is used only while the log's entry at its version still
    holds that id; otherwise, and whenever a commit fails, the table is opened afresh. `take`
    hands a table to one caller at a time."""

    def __init__(self, max_tables: int):
        self.max_tables = max_tables
        self._held: OrderedDict[str, tuple[object, str]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, path: str):
        """The held table of `path` at its newest version, or None (then open it)."""
        with self._lock:
            held = self._held.pop(path, None)
        if held is None:
            return None
        table, commit_id = held
        try:
            if not _log_entry_holds(path, table.version(), commit_id):
                return None
            if _log_entry(path, table.version() + 1) is not None:  # another writer committed since
                table.update_incremental()  # a listing of the log (~0.4 ms locally) only then
        except Exception:  # noqa: BLE001 - opening the table afresh is always right
            return None
        return table

    def give(self, path: str, table, commit_id: str) -> None:
        """Hold `table`, just committed with `commit_id`, for the next commit."""
        with self._lock:
            self._held.pop(path, None)
            self._held[path] = (table, commit_id)
            while len(self._held) > self.max_tables:
                self._held.popitem(last=False)


# One per silver table the process commits to (1004 in the scale targets). A held table costs the
# driver's Python about 150 KB of delta-rs state (a `/tmp` probe: 500 held 13-column tables, 75 MB),
# so at most 1,024 are held, the least recently used dropped first: a job committing to more tables
# each batch than that opens the rest as before.
HANDLES = Handles(max_tables=1024)


def _log_entry(path: str, version: int) -> bytes | None:
    """The table's log entry `version`, or None if there is none."""
    from cdcflow.storage import read_object

    try:
        return read_object(f"{rs_uri(path).rstrip('/')}/_delta_log/{version:020d}.json")
    except FileNotFoundError:
        return None


def _log_entry_holds(path: str, version: int, commit_id: str) -> bool:
    """Whether the table's log entry `version` is there and holds `commit_id`."""
    entry = _log_entry(path, version)
    if entry is None:
        return False
    infos = [json.loads(line).get("commitInfo") or {} for line in entry.splitlines() if b'"commitInfo"' in line]
    return any(info.get("cdcflow.commit") == commit_id for info in infos)


def _commit_id() -> tuple[str, object]:
    """A new commit id and the commit properties that write it into the commitInfo."""
    import uuid

    from deltalake import CommitProperties

    commit_id = uuid.uuid4().hex
    return commit_id, CommitProperties(custom_metadata={"cdcflow.commit": commit_id})


def _rs_merge(path: str, source: pa.Table, m: MergeClauses, rs=None) -> None:
    """The guarded MERGE by delta-rs. `rs`: the table as `silver_writer` opened it for this commit, so
    a commit reads the log once. A small table is read whole (or taken from what this process last
    wrote to it, while the table still holds just those files), merged in Arrow and rewritten by one
    overwrite whose predicate covers the table, so any commit since the version read conflicts; a
    bigger one gets delta-rs's MERGE, which fails on a conflicting commit (a concurrent transaction
    added or removed data it read). Each retry opens the table again at its newest version, so the
    `_seq` guard compares with what is there now (tests/test_apply_rs_commit.py)."""
    from deltalake import write_deltalake

    from cdcflow.cdc import arrow_merge

    opened = [rs] if rs is not None else []

    @retry_commit_conflicts
    def attempt() -> None:
        # the first attempt's table: given, or held from this process's last commit; a retry's: opened
        table = opened.pop() if opened else HANDLES.take(path) or rs_table(path)
        commit_id, commit = _commit_id()
        files = table_files(table)
        if copies_on_write(table, files.size_bytes):
            schema = table.schema().to_json()
            current = REWRITTEN.get(path, files.paths, schema)
            merged = arrow_merge.merge(table.to_pyarrow_table() if current is None else current, source, m)
            write_deltalake(table, merged, mode="overwrite", predicate="true", storage_options=rs_options(path),
                            commit_properties=commit)
            REWRITTEN.put(path, table_files(table).paths, schema, merged)  # the handle is at the new version
        else:
            builder = table.merge(source, predicate=m.on, source_alias="s", target_alias="t", commit_properties=commit)
            for condition, values in m.when_matched():
                builder = builder.when_matched_update(updates=values, predicate=condition)
            for condition, values in m.when_not_matched():
                builder = builder.when_not_matched_insert(updates=values, predicate=condition)
            builder.execute()
        HANDLES.give(path, table, commit_id)

    attempt()


@retry_commit_conflicts
def _spark_sql(session: SparkSession, statement: str) -> None:
    session.sql(statement)


@lru_cache(maxsize=4096)
def _spark_types(delta_schema_json: str) -> dict[str, str]:
    """Column -> Spark type of a Delta schema (its JSON, as delta-rs gives it): read once per schema."""
    from deltalake import Schema as DeltaSchema

    return {f.name: _spark_type_of(f.type) for f in pa.schema(DeltaSchema.from_json(delta_schema_json).to_arrow())}


def _spark_type_of(t: pa.DataType) -> str:
    from pyspark.sql.pandas.types import from_arrow_type

    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    return from_arrow_type(t).simpleString()


def _q(name: str) -> str:
    """A Spark SQL identifier."""
    return "`" + name.replace("`", "``") + "`"


def _dq(name: str) -> str:
    """A DataFusion (delta-rs) SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class MergeClauses:
    """The guarded MERGE as SQL fragments, rendered by Spark (`merge_sql`) and delta-rs alike."""

    on: str
    match_delete: str
    update_delete: dict[str, str]
    match_upsert: str
    update_upsert: dict[str, str]
    insert_delete: dict[str, str]
    insert: dict[str, str]

    def when_matched(self) -> list[tuple[str, dict[str, str]]]:
        """(condition, assignments) of WHEN MATCHED, in order: the first that holds applies."""
        return [(self.match_delete, self.update_delete), (self.match_upsert, self.update_upsert)]

    def when_not_matched(self) -> list[tuple[str | None, dict[str, str]]]:
        """(condition or None, values) of WHEN NOT MATCHED (by source), in order."""
        return [("s._op = 'delete'", self.insert_delete), (None, self.insert)]


def merge_clauses(shape: TableShape, absent: list[str], q, partial: bool = True) -> MergeClauses:
    """The one MERGE rule (collapsed source `s`: output columns, _op, _seq, _commit_ts, _partial,
    _ingested_at; silver `t`). A change applies only if its `_seq` is newer than the row's.

    `absent`: silver columns the changes don't carry (dropped at the source): a full change sets them
    NULL, as the source row has no value; a partial update keeps them. `partial=False` when no source
    row is a partial update: the same rule without its CASEs, which cost delta-rs about 7% of a small
    table's MERGE (docs/design.md, "Silver writer")."""
    t = shape.table
    key = t.primary_key
    data_cols = [c for c in shape.output_columns if c not in key]
    newer = "(t._seq IS NULL OR s._seq > t._seq)"
    if partial:
        upsert = {c: f"CASE WHEN s._partial THEN coalesce(s.{q(c)}, t.{q(c)}) ELSE s.{q(c)} END" for c in data_cols}
        upsert.update({c: f"CASE WHEN s._partial THEN t.{q(c)} END" for c in absent})
    else:
        upsert = {c: f"s.{q(c)}" for c in data_cols} | {c: "NULL" for c in absent}
    upsert_meta = {
        "_is_deleted": "false",
        "_seq": "s._seq",
        "_op": "s._op",
        "_commit_ts": "s._commit_ts",
        "_deleted_at": "CAST(NULL AS TIMESTAMP)",
        "_ingested_at": "s._ingested_at",
    }
    tombstone = {
        "_is_deleted": "true",
        "_seq": "s._seq",
        "_op": "s._op",
        "_commit_ts": "s._commit_ts",
        "_deleted_at": "s._commit_ts",
        "_ingested_at": "s._ingested_at",
    }
    if t.deletes == "hard":
        tombstone = {**{c: "NULL" for c in [*data_cols, *absent]}, **tombstone}
    from_source = {c: f"s.{q(c)}" for c in shape.output_columns}
    keep = key if t.deletes == "hard" else shape.output_columns
    return MergeClauses(
        on=" AND ".join(f"t.{q(k)} = s.{q(k)}" for k in key),
        match_delete=f"{newer} AND s._op = 'delete'",
        update_delete=tombstone,
        match_upsert=f"{newer} AND s._op != 'delete'",
        update_upsert={**upsert, **upsert_meta},
        insert_delete={**{c: from_source[c] for c in keep}, **tombstone},
        insert={**from_source, **upsert_meta},
    )


def merge_sql(path: str, source_view: str, shape: TableShape, absent: list[str] = ()) -> str:
    """The guarded MERGE of a collapsed source view, as one Spark SQL statement."""
    m = merge_clauses(shape, list(absent), _q)

    def assign(values: dict[str, str]) -> str:
        return ", ".join(f"{_q(c)} = {v}" for c, v in values.items())

    def insert_values(values: dict[str, str]) -> str:
        return f"({', '.join(_q(c) for c in values)}) VALUES ({', '.join(values.values())})"

    def when(condition: str | None) -> str:
        return f" AND {condition}" if condition else ""

    return "\n".join([
        f"MERGE INTO delta.{_q(path)} AS t USING {source_view} AS s ON {m.on}",
        *(f"WHEN MATCHED{when(c)} THEN UPDATE SET {assign(v)}" for c, v in m.when_matched()),
        *(f"WHEN NOT MATCHED{when(c)} THEN INSERT {insert_values(v)}" for c, v in m.when_not_matched()),
    ])


def first_rows(src: DataFrame, shape: TableShape) -> DataFrame:
    """A new table's rows from the collapsed changes: nothing to merge with (one commit, no MERGE)."""
    t = shape.table
    data_cols = [c for c in shape.output_columns if c not in t.primary_key]
    deleted = F.col("_op") == "delete"
    hard = t.deletes == "hard"
    cols = [
        (F.when(deleted, F.lit(None)).otherwise(F.col(_q(c))) if hard and c in data_cols else F.col(_q(c)))
        .cast(shape.output_type(c)).alias(c)
        for c in shape.output_columns
    ]
    return src.select(
        *cols,
        deleted.alias("_is_deleted"),
        F.col("_seq"),
        F.col("_op"),
        F.col("_commit_ts"),
        F.when(deleted, F.col("_commit_ts")).cast("timestamp").alias("_deleted_at"),
        # delta-rs's writes stamp it on the collected rows (ingested_now)
        F.col("_ingested_at") if "_ingested_at" in src.columns else F.lit(None).cast("timestamp").alias("_ingested_at"),
    )


def _append_first(writer, path: str, t: Table) -> None:
    writer = writer.mode("append").options(**silver_options(t))
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


def control_state(spark: SparkSession, path: str, props: dict[str, str] | None = None) -> ControlState:
    if props is None:
        props = spark.sql(f"DESCRIBE DETAIL delta.{_q(path)}").first()["properties"] or {}
    table_def = props.get(TABLE_DEF_PROPERTY)
    return ControlState(props.get(CONTROL_TS_PROPERTY), json.loads(table_def) if table_def else None)


def control_properties(state: ControlState) -> dict[str, str]:
    props = {CONTROL_TS_PROPERTY: state.type_change_ts,
             TABLE_DEF_PROPERTY: json.dumps(state.table_def, sort_keys=True) if state.table_def is not None else None}
    return {k: v for k, v in props.items() if v is not None}


def set_control_state(spark: SparkSession, path: str, state: ControlState, writer: str = "spark") -> None:
    """Store the control state as table properties, by the engine that writes the table (a Spark
    ALTER on a delta-rs table costs ~0.3 s and a Spark commit; delta-rs's ~10 ms)."""
    props = control_properties(state)
    if not props:
        return
    if writer == "delta-rs":

        rs_table(path).alter.set_table_properties(props, raise_if_not_exists=False)
        return
    assigned = ", ".join(f"'{k}' = {_sql_string(v)}" for k, v in props.items())
    spark.sql(f"ALTER TABLE delta.{_q(path)} SET TBLPROPERTIES ({assigned})")


def _sql_string(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
