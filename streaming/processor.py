"""One micro-batch of DMS CDC for all tables: parse, apply per table, bronze, quarantine, metrics.

Shared by every source (Python Kinesis source, Glue's Kinesis source, replay files): the source
only provides `payload` (the DMS JSON text), `source_position` and `arrival_ts`.

Exactly once: bronze and quarantine appends carry Delta's idempotent-write transaction (app id +
version = batch id; Spark's txnAppId / txnVersion for bronze, delta-rs's app transaction for
quarantine), so a batch re-run after a crash is skipped there; silver MERGEs are guarded by
sequence, so re-applying a batch changes nothing.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial

import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from tenacity import Retrying, retry_if_not_exception_type, stop_after_attempt, wait_exponential

from cdcflow.cdc import apply, schema
from cdcflow.cdc.bronze import append_bronze, bronze_rows
from cdcflow.cdc.changes import TableShape, TypedChanges
from cdcflow.cdc.envelope import parse_kinesis_json
from cdcflow.cdc.masking import REDACTED, pii_salt
from cdcflow.cdc.multi_table import MultiTableChanges, fits
from cdcflow.cdc.quarantine import append_quarantine
from cdcflow.config import Project
from cdcflow.metrics import MetricsSink
from cdcflow.quality import DataQualityFailure, StageReport
from cdcflow.runtime import materialize, read_delta, release
from streaming.dq import DqWindow

log = logging.getLogger("cdcflow.stream")

@dataclass
class TableOutcome:
    table: str
    read: int = 0
    applied: int = 0
    quarantined: int = 0
    late: int = 0
    duplicates: int = 0
    isolated: bool = False
    schema_warnings: list[str] = field(default_factory=list)  # control records read with unknown types
    loads: int = 0  # full-load records (DMS `load`) in the batch
    reload_warning: str | None = None  # `load` records after the table's changes: a DMS reload (`_holds_changes`)
    writer: str | None = None  # who committed the batch's changes to silver: "delta-rs" or "spark"
    shared_plan: bool = False  # typed, checked and collapsed in the batch's many-table plan (multi_table)
    visible_at: float | None = None  # wall clock (time.time()) when the batch's changes were committed to silver
    newest_commit: datetime | None = None  # newest source commit time among the batch's records (UTC)
    quarantine_rows: list[tuple] = field(default_factory=list)
    dq: StageReport | None = None  # raw->staging rule counts, for tables with warn / fail rules (streaming.dq)


# A timestamp as fixed-width text in the session's zone (UTC: runtime.SESSION_SQL_CONF), which sorts as
# the time does.
_TIME_TEXT = "yyyy-MM-dd HH:mm:ss.SSSSSS"


def earlier_than(column: str, moment: datetime) -> Column:
    """`column < moment`, compared as text. A timestamp literal is written into the generated code's
    text, so the stats aggregate's code was new every batch (the watermark moves): compiled by Janino,
    then by the JIT compilers, again. A string literal is passed to the code by reference: one class
    for every batch, for one formatting of each record's time (docs/design.md, "Per-batch literals").
    `moment` is naive local time, as Spark's collect gives the batches' maxima."""
    return F.date_format(column, _TIME_TEXT) < F.lit(moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f"))


# Bronze goes beside a batch's applies up to this many tables touched, after them above it. Beside
# the shared plan's Spark work it fills the core that plan leaves idle (4 tables: a 50k batch 2.57 s
# against 2.82-3.08); at ~1000 tables its file per table and its Python side take the driver from the
# plan and the round of commits (9.6-11 s a batch against 8.7). Between the two: not measured.
BRONZE_BESIDE_MAX_TABLES = 8
# A batch's records are spread over PARTITIONS_PER_CORE partitions a core before parsing when the batch
# before it held fewer than SPREAD_BELOW_TABLES tables' worth of records (docs/design.md, "The batch
# spread over the cores"). DMS puts a table's records in one shard, so with few tables the shards'
# partitions are as uneven as the tables (the 4 sample tables in 2 shards: 3 to 1), and every step
# after the parse keeps the parse's partitions: spread, a 50k batch 2.4-2.8 s against 2.9-3.2. With
# many tables the shards are even already and the shuffle only costs (1004 tables: 9.1-9.2 s against
# 8.9). 12 lies between the two shapes measured (4 and ~21 tables' worth).
PARTITIONS_PER_CORE = 2
SPREAD_BELOW_TABLES = 12


def spread(raw: DataFrame) -> DataFrame:
    """`raw` hashed by source position into PARTITIONS_PER_CORE partitions a core: even parts, and no
    sort first (a round-robin repartition sorts each input partition to stay deterministic)."""
    cores = raw.sparkSession.sparkContext.defaultParallelism
    return raw.repartition(PARTITIONS_PER_CORE * cores, "source_position")


def tables_worth(records: list[int]) -> float:
    """How many tables of equal size hold records as evenly as tables with these counts do (the
    inverse of the sum of squared shares): 4 for 4 equal tables, ~21 for 1004 tables with shares
    ~ 1/rank^1.1, 1 when one table holds nearly everything."""
    total = sum(records)
    return total * total / sum(n * n for n in records) if total else 0.0


def biggest_first(outcomes: dict[str, TableOutcome]) -> list[str]:
    """The order in which a batch's tables are queued for the apply pool: most records first. When the
    pool is smaller than the tables touched, most records become visible early instead of waiting
    behind small tables' fixed costs; with skewed tables (a few hot ones, a long cold tail), the hot
    tables' commits come at the start of the round of commits instead of anywhere in it."""
    return sorted(outcomes, key=lambda name: -outcomes[name].read)


class BatchProcessor:
    """What lasts across micro-batches: paths, the watermark, blocked tables, the apply pool."""

    def __init__(self, spark: SparkSession, project: Project, metrics: MetricsSink | None = None):
        self.spark = spark
        self.project = project
        self.salt = pii_salt(project)
        self.metrics = metrics or MetricsSink(project.pipeline.name)
        self.known_tables = sorted(project.tables)
        s = project.pipeline.streaming
        self.watermark_delay = timedelta(minutes=s.watermark_minutes)
        self.retries = s.table_retries
        self.pool = ThreadPoolExecutor(max_workers=s.max_parallel_tables, thread_name_prefix="cdcflow-apply")
        self.bronze_path = project.path("bronze")
        self.quarantine_path = project.path("quarantine")
        self.app_id = f"cdcflow-{project.pipeline.name}"
        self.max_commit_ts: datetime | None = self._recover_watermark()
        self.blocked: dict[str, str] = self._recover_blocked()  # table -> unsafe schema change
        self._silver_cols: dict[str, dict[str, str]] = {}  # table -> silver data columns (cache)
        self._control: dict[str, apply.ControlState] = {}  # table -> control records applied (cache)
        self._typed: dict[tuple, TypedChanges] = {}  # (table, drift columns) -> its typing expressions
        self._multi: MultiTableChanges | None = None  # the many-table plan of every table it has taken so far
        self._spark_written: set[str] = set()  # tables delta-rs declined (size or features): Spark MERGE
        self.fail_tables: set[str] = set()  # tables whose apply is made to fail (tests, chaos drills)
        self.last_outcomes: list[TableOutcome] = []
        self.dq = DqWindow(project, self.metrics)  # DQ counts and reports (streaming.dq)
        self.spread_next = True  # whether the next batch's input is spread over the cores (`spread`)

    # ------------------------------------------------------------ recovery of in-memory state

    def _recover_watermark(self) -> datetime | None:
        """The newest commit time in bronze, from its files' statistics in the Delta log: a restart used
        to scan every bronze file for it. Spark's aggregate only when a file has no statistics. (Stats
        keep milliseconds; the watermark is minutes behind it and only counts late records.)"""
        bronze = apply.rs_table_or_none(self.bronze_path)
        if bronze is None:
            return None
        adds = pa.table(bronze.get_add_actions(flatten=True))
        if "max.commit_ts" in adds.column_names and adds["null_count.commit_ts"].null_count == 0:
            newest = pc.max(adds["max.commit_ts"]).as_py()
            # naive local time, as Spark's collect gives the batches' own maxima (compared with it)
            return datetime.fromtimestamp(newest.timestamp()) if newest is not None else None
        return read_delta(self.spark, self.bronze_path).agg(F.max("commit_ts")).first()[0]

    def _recover_blocked(self) -> dict[str, str]:
        q = read_delta(self.spark, self.quarantine_path)
        if q is None:
            return {}
        rows = q.filter("rule = 'schema_change_unsafe'").groupBy("table").agg(F.first("reason")).collect()
        return {r[0]: r[1] for r in rows}

    # ------------------------------------------------------------ batch

    def process(self, raw: DataFrame, batch_id: int) -> list[TableOutcome]:
        started = time.perf_counter()
        raw = spread(raw) if self.spread_next else raw
        norm = parse_kinesis_json(raw, self.known_tables, self.project.pipeline.dms.before_image_field)
        norm = materialize(norm)
        try:
            outcomes = self._process(norm, batch_id)
        finally:
            release(norm)
        self._emit_metrics(outcomes, batch_id, time.perf_counter() - started)
        self.dq.add(outcomes, batch_id)
        self.last_outcomes = outcomes
        return outcomes

    def _process(self, norm: DataFrame, batch_id: int) -> list[TableOutcome]:
        watermark = self.max_commit_ts - self.watermark_delay if self.max_commit_ts else None
        late = earlier_than("_commit_ts", watermark) if watermark else F.lit(False)
        # One aggregate tells which tables this batch touches, with their counts: cost follows the
        # tables touched, not the tables configured.
        stats = (
            norm.groupBy("_table", "_record_type", "_problem")
            .agg(
                F.count(F.lit(1)).alias("n"),
                F.countDistinct("_record_hash").alias("distinct"),
                F.sum(late.cast("int")).alias("late"),
                F.max("_commit_ts").alias("max_ts"),
                F.sum("_payload_bytes").alias("bytes"),
                F.sum((F.col("_op") == "load").cast("int")).alias("loads"),
            )
            .collect()
        )
        if not stats:
            return []
        controls = []
        if any(r["_record_type"] == "control" and r["_problem"] is None for r in stats):  # rare: saves a job
            controls = norm.filter("_record_type = 'control' AND _problem IS NULL").select(
                "_table", "_op", "_control", "_commit_ts"
            ).collect()

        outcomes: dict[str, TableOutcome] = {}
        quarantine: list[tuple] = []
        for r in stats:
            if r["_problem"] is not None:
                quarantine += self._quarantine_unparsed(norm, r["_problem"], batch_id)
                continue
            if r["_record_type"] != "data":
                continue
            o = outcomes.setdefault(r["_table"], TableOutcome(r["_table"]))
            o.read += r["n"]
            o.duplicates += r["n"] - r["distinct"]
            o.late += r["late"] or 0
            o.loads += r["loads"] or 0
            if r["max_ts"] is not None and (o.newest_commit is None or r["max_ts"] > o.newest_commit):
                o.newest_commit = r["max_ts"]
        self.spread_next = tables_worth([o.read for o in outcomes.values()]) < SPREAD_BELOW_TABLES
        for name, o in outcomes.items():
            if o.loads and name in self.project.tables and self._holds_changes(name):
                o.reload_warning = (f"{o.loads} full-load records after the table's changes (a DMS reload?): "
                                    "applied only to keys silver doesn't hold")
                self.metrics.alert("LoadAfterChanges", name, o.reload_warning)
        changes = self._schema_changes(controls)
        for name, table_changes in changes.items():
            # A source drop never erases the lake: silver keeps its rows; operators get an alert.
            if any(c.op == "drop-table" for c in table_changes):
                self.metrics.alert("SourceTableDropped", name, "DMS reported drop-table; silver kept as is")
            # A table-def without data in this batch still evolves silver now: the next batch's
            # records carry the new columns but not the control record.
            if any(c.columns for c in table_changes):
                outcomes.setdefault(name, TableOutcome(name))
        # Tables delta-rs commits share one plan for their typing, checks, masking and collapse
        # (cdcflow.cdc.multi_table): a plan per table costs ~0.7 s of driver time at any size.
        order = biggest_first(outcomes)
        many = [name for name in order if self._takes_many(name, changes)]
        # Bronze beside the applies when the batch touches few tables, else after them: docs/design.md,
        # "Transforms in the shared plan, and bronze beside it". The batch ends only once both are
        # written; both appends are idempotent and the MERGEs guarded, so a crash anywhere re-runs it.
        write_bronze = partial(self._append_bronze, norm, batch_id, sum(r["n"] for r in stats),
                               sum(r["bytes"] or 0 for r in stats))
        bronze = self.pool.submit(write_bronze) if len(outcomes) <= BRONZE_BESIDE_MAX_TABLES else None
        futures = {
            name: self.pool.submit(self._apply_table, norm, name, changes.get(name, []), batch_id, outcomes[name])
            for name in order if name not in many
        }
        try:
            if many:
                futures.update(self._apply_many(norm, many, changes, batch_id, outcomes))
        finally:
            wait([*futures.values(), *([bronze] if bronze else [])])  # all end before `norm` is released
        if bronze:
            bronze.result()
        for name, fut in futures.items():
            outcomes[name] = fut.result()
            quarantine += outcomes[name].quarantine_rows
        if not bronze:
            write_bronze()
        self._append_quarantine(quarantine, batch_id)

        batch_max = max((r["max_ts"] for r in stats if r["max_ts"] is not None), default=None)
        if batch_max and (self.max_commit_ts is None or batch_max > self.max_commit_ts):
            self.max_commit_ts = batch_max
        return list(outcomes.values())

    # ------------------------------------------------------------ per table

    def _schema_changes(self, controls: list) -> dict[str, list[schema.SchemaChange]]:
        out: dict[str, list[schema.SchemaChange]] = {}
        for c in sorted(controls, key=lambda c: schema.order_key(c["_op"], c["_commit_ts"])):
            ts = c["_commit_ts"].isoformat() if c["_commit_ts"] else None
            out.setdefault(c["_table"], []).append(schema.parse_control(c["_table"], c["_op"], c["_control"], ts))
        return out

    def _silver_columns(self, name: str, path: str) -> dict[str, str] | None:
        """Silver's data columns and types, or None before its first write.

        Cached across batches (this job is the table's only writer); dropped when an apply fails.
        """
        if name not in self._silver_cols:
            meta = apply.silver_metadata(self.spark, path)
            if meta is None:
                return None
            if changed := apply.sync_properties(self.spark, path, self.project.table(name), meta.properties):
                log.info("table %s: table properties set from its config: %s", name, ", ".join(changed))
            if name not in self._control:
                self._control[name] = apply.control_state(self.spark, path, meta.properties)
            self._silver_cols[name] = {c: t for c, t in meta.columns.items() if not c.startswith("_")}
        return self._silver_cols[name]

    def _control_state(self, name: str, path: str, exists: bool) -> apply.ControlState:
        if name not in self._control:
            self._control[name] = apply.control_state(self.spark, path) if exists else apply.ControlState()
        return self._control[name]

    def _shape(self, name: str, changes: list[schema.SchemaChange]) -> tuple[TableShape, str | None, list[str]]:
        """The table's columns now (declared + drift stored in silver + this batch's control records),
        the unsafe change if any, and warnings (types that could not be read: the column kept its type)."""
        table = self.project.table(name)
        path = self.project.path(table.delta_path)
        current = dict(table.columns)
        silver = self._silver_columns(name, path)
        for col, ty in (silver or {}).items():
            if col in table.pii:
                continue  # stored masked, as text
            if col not in current or (ty != current[col] and schema.is_widening(current[col], ty)):
                current[col] = ty  # added or widened by earlier drift
        problems: list[str] = []
        warnings: list[str] = []
        state = self._control_state(name, path, silver is not None) if changes else apply.ControlState()
        previous = state.table_def
        for change in changes:
            stale = bool(state.type_change_ts and change.ts and change.ts <= state.type_change_ts)
            p = schema.plan(current, change, stale, previous)
            current.update(p.add)
            current.update(p.widen)
            problems += p.unsafe
            warnings += p.warnings
            previous = schema.dms_types(change) if change.columns else previous
        shape = TableShape(table, tuple((c, t) for c, t in current.items() if table.columns.get(c) != t))
        # the apply adds and widens silver's columns to the shape's (apply.ensure_silver)
        return shape, "; ".join(problems) or None, warnings

    def _typed_changes(self, shape: TableShape) -> TypedChanges:
        key = (shape.table.name, shape.extra)
        if key not in self._typed:
            self._typed[key] = TypedChanges(shape, self.salt, spare=True)  # parse_kinesis_json gives `_prehashed`
        return self._typed[key]

    def _sync_catalog(self, name: str, shape: TableShape) -> None:
        """Keep the table's Glue catalog entry current after schema drift (when the job has a catalog
        database: CDCFLOW_CATALOG_DATABASE, set by infra/): Glue keeps each schema as a table version.
        The full load calls the same function (cdcflow.catalog.sync_silver_table)."""
        if not os.environ.get("CDCFLOW_CATALOG_DATABASE"):
            return  # local runs: no catalog, nothing to import
        from cdcflow.catalog import sync_silver_table

        sync_silver_table(self.project, name, {c: shape.output_type(c) for c in shape.output_columns}, self.metrics)

    def _remember_control(self, name: str, changes: list[schema.SchemaChange], writer: str | None) -> None:
        """Keep the newest applied type change's time, so a replayed older one is stale (never "narrowing"),
        and the newest table-def's DMS types, so a later type change is compared column by column."""
        path = self.project.path(self.project.table(name).delta_path)
        held = self._control_state(name, path, True)
        newest = max((c.ts for c in changes if c.op in schema.TYPE_CHANGE_OPS and c.ts), default=None)
        table_def = next((schema.dms_types(c) for c in reversed(changes) if c.columns), None)
        state = apply.ControlState(
            newest if newest and (held.type_change_ts is None or newest > held.type_change_ts) else held.type_change_ts,
            table_def if table_def is not None else held.table_def,
        )
        if state != held:
            apply.set_control_state(self.spark, path, state, writer or "spark")
            self._control[name] = state

    def _takes_many(self, name: str, changes: dict[str, list]) -> bool:
        """Whether the table's changes this batch go through the many-table plan: not blocked, a shape
        it handles, and control records (if any) that leave the shape as it is: a create-table or
        table-def of the columns silver has, as every table's first batch carries. Schema drift,
        unsafe changes and unreadable types take the table's own path."""
        if name in self.blocked or name in self._spark_written:
            return False
        shape = self._shape(name, [])[0]
        if name in changes:
            after, unsafe, warnings = self._shape(name, changes[name])
            if unsafe or warnings or after.extra != shape.extra:
                return False
        return fits(shape)

    def _apply_many(self, norm: DataFrame, names: list[str], changes: dict[str, list], batch_id: int,
                    outcomes: dict[str, TableOutcome]) -> dict[str, Future]:
        """One Spark job for these tables' changes, then each table's delta-rs commit in the pool."""
        shapes = {name: self._shape(name, [])[0] for name in names}
        # The plan covers every table it has taken (a superset of this batch's): rebuilt only when a
        # table is new to it or its shape drifted, not whenever a batch touches another subset.
        held = self._multi.shapes if self._multi else {}
        if any(held.get(name) != shape for name, shape in shapes.items()):
            self._multi = MultiTableChanges({**held, **shapes}, self.salt)
        try:
            parts = self._multi.collect(norm, names)
        except Exception as e:  # noqa: BLE001 - each table then tries (and is isolated) on its own
            log.warning("many-table plan failed (%s); applying its %d tables one by one", e, len(names))
            return {n: self.pool.submit(self._apply_table, norm, n, changes.get(n, []), batch_id, outcomes[n])
                    for n in names}
        return {n: self.pool.submit(self._commit_rows, norm, n, shapes[n], *parts[n], changes.get(n, []), batch_id,
                                    outcomes[n])
                for n in names}

    def _commit_rows(self, norm: DataFrame, name: str, shape: TableShape, rows, bad_rows: list,
                     changes: list[schema.SchemaChange], batch_id: int, o: TableOutcome) -> TableOutcome:
        """Commit one table's share of the many-table plan (delta-rs), then remember its control records
        (after the data, as `_apply_table` does), with the retries and isolation of `_apply_table`; a
        table delta-rs declines goes through `_apply_table` instead."""
        path = self.project.path(self.project.table(name).delta_path)
        try:
            for attempt in self._retrying():
                with attempt:
                    if name in self.fail_tables:
                        raise RuntimeError(f"injected failure for {name}")
                    try:
                        declined = apply.merge_rows(path, rows, shape)
                        if changes and not declined:
                            self._remember_control(name, changes, "delta-rs")
                    except Exception:
                        self._silver_cols.pop(name, None)
                        self._control.pop(name, None)
                        raise
        except Exception as e:  # noqa: BLE001 - any failure isolates this table, never the others
            return self._isolate(norm, name, e, batch_id, o)
        if declined:
            if declined == "spark":
                self._spark_written.add(name)
            return self._apply_table(norm, name, changes, batch_id, o)
        o.writer, o.visible_at, o.shared_plan = "delta-rs", time.time(), True
        self._silver_cols[name] = {c: shape.output_type(c) for c in shape.output_columns}
        if changes:
            self._sync_catalog(name, shape)
        return self._finish(name, bad_rows, o)

    def _holds_changes(self, name: str) -> bool:
        """Whether silver holds a CDC change of the table (a `_seq` of a change starts with 1, of a load
        with 0), from the files' statistics in the Delta log: no data read, so a batch of the initial
        load (through Kinesis every batch has `load` records) costs a log read. A table without `_seq`
        statistics (over 32 columns, written by Spark) reads as holding none."""
        table = apply.rs_table_or_none(self.project.path(self.project.table(name).delta_path))
        if table is None:
            return False
        adds = pa.table(table.get_add_actions(flatten=True))
        if "max._seq" not in adds.column_names:
            return False
        return any(v is not None and v.startswith("1") for v in adds["max._seq"].to_pylist())

    def _retrying(self) -> Retrying:
        return Retrying(stop=stop_after_attempt(self.retries + 1), wait=wait_exponential(multiplier=0.5, max=10),
                        retry=retry_if_not_exception_type(DataQualityFailure), reraise=True)

    def _table_rows(self, norm: DataFrame, name: str) -> DataFrame:
        return norm.filter((F.col("_table") == name) & (F.col("_record_type") == "data") & F.col("_problem").isNull())

    def _isolate(self, norm: DataFrame, name: str, e: Exception, batch_id: int, o: TableOutcome) -> TableOutcome:
        log.error("table %s failed after %d attempts: %s", name, self.retries + 1, e)
        self.metrics.alert("TableIsolated", name, type(e).__name__)
        return self._quarantine_table(self._table_rows(norm, name), name, "table_isolated",
                                      f"apply failed: {type(e).__name__}", batch_id, o)

    def _finish(self, name: str, bad_rows: list, o: TableOutcome) -> TableOutcome:
        """Count what was applied; the rows that could not be go to quarantine."""
        _test_kill_point(name)
        o.quarantine_rows = [
            (name, r["_rule"], r["_reason"], r["_source_position"], r["_payload"], r["_record_hash"]) for r in bad_rows
        ]
        o.quarantined = len(o.quarantine_rows)
        o.applied = o.read - len({r["_record_hash"] for r in bad_rows})
        return o

    def _apply_table(self, norm: DataFrame, name: str, changes: list, batch_id: int, o: TableOutcome) -> TableOutcome:
        rows = self._table_rows(norm, name)
        table = self.project.table(name)
        try:
            for attempt in self._retrying():
                with attempt:
                    if name not in self.blocked:
                        shape, unsafe, warnings = self._shape(name, changes)
                        if warnings and not o.schema_warnings:  # once per batch, not per retry
                            o.schema_warnings = warnings
                            self.metrics.alert("SchemaChangeWarning", name, "; ".join(warnings))
                        if unsafe:
                            self.blocked[name] = unsafe
                            self.metrics.alert("SchemaChangeUnsafe", name, unsafe)
                    if name in self.blocked:
                        reason = self.blocked[name]
                        return self._quarantine_table(rows, name, "schema_change_unsafe", reason, batch_id, o)
                    bad_rows = []
                    if name in self.fail_tables:
                        raise RuntimeError(f"injected failure for {name}")
                    try:
                        if o.read:
                            typed = self._typed_changes(shape)
                            if typed.counts_failures:  # warn / fail rules: counted (fail: checked) before commit
                                o.dq = typed.failures(rows)
                            good, bad = typed.apply(rows)
                            applied = apply.merge(self.spark, self.project.path(table.delta_path), good, shape, bad)
                            bad_rows, o.writer = applied.rejected, applied.writer
                            o.visible_at = time.time()
                        else:  # control records only
                            apply.ensure_silver(self.spark, self.project.path(table.delta_path), shape)
                    except Exception:
                        self._silver_cols.pop(name, None)  # re-read what silver holds on the retry
                        self._control.pop(name, None)
                        raise
                    self._silver_cols[name] = {c: shape.output_type(c) for c in shape.output_columns}
                    if changes:
                        self._remember_control(name, changes, o.writer)
                        self._sync_catalog(name, shape)
        except DataQualityFailure as e:  # a fail rule over its threshold: this batch of the table to quarantine
            o.dq = e.report
            self.metrics.alert("DataQualityFailed", name, str(e))
            return self._quarantine_table(rows, name, e.rule, str(e), batch_id, o)
        except Exception as e:  # noqa: BLE001 - any failure isolates this table, never the others
            return self._isolate(norm, name, e, batch_id, o)
        return self._finish(name, bad_rows, o)

    def _quarantine_table(self, rows: DataFrame, name: str, rule: str, reason: str, batch_id: int,
                          o: TableOutcome) -> TableOutcome:
        """Send every record of the table in this batch to quarantine (masked), so nothing is lost."""
        shape = TableShape(self.project.table(name))
        from cdcflow.cdc.changes import masked_payload

        got = rows.select("_source_position", "_record_hash", masked_payload(shape, self.salt, rows).alias("p")).collect()
        o.quarantine_rows = [(name, rule, reason, r[0], r[2], r[1]) for r in got]
        o.quarantined, o.applied, o.isolated = len(got), 0, True
        return o

    # ------------------------------------------------------------ quarantine, bronze, metrics

    def _quarantine_unparsed(self, norm: DataFrame, problem: str, batch_id: int) -> list[tuple]:
        bad = norm.filter(F.col("_problem") == problem)
        if problem == "malformed_json":
            # An unparseable record can't be masked column by column, so its payload is withheld;
            # the source position and hash point at it in the source for an operator.
            rows = bad.select("_source_position", "_record_hash").collect()
            reason = "record is not valid DMS JSON (payload withheld: it cannot be masked)"
            return [(None, problem, reason, r[0], None, r[1]) for r in rows]
        rows = bad.select(
            "_table", "_source_position", "_record_hash",
            F.to_json(F.transform_values("_data", lambda k, v: F.when(v.isNotNull(), F.lit(REDACTED)))),
        ).collect()  # fmt: skip
        reason = "table is not configured (values redacted: its PII columns are unknown)"
        return [(r[0], problem, reason, r[1], r[3], r[2]) for r in rows]

    def _append_quarantine(self, rows: list[tuple], batch_id: int) -> None:
        now = datetime.now()
        rows = [(*r, batch_id, now) for r in rows]
        append_quarantine(self.quarantine_path, rows, txn=(f"{self.app_id}-quarantine", batch_id))

    def _append_bronze(self, norm: DataFrame, batch_id: int, records: int, payload_bytes: int) -> None:
        """Every consumed record, masked, partitioned by table and date, for audit and replay."""
        rows = bronze_rows(norm, self.project, self.salt, feed="stream")
        append_bronze(rows, self.bronze_path, batch_id, records, txn=(f"{self.app_id}-bronze", batch_id),
                      payload_bytes=payload_bytes)

    def _emit_metrics(self, outcomes: list[TableOutcome], batch_id: int, seconds: float) -> None:
        for o in outcomes:
            values = {"RowsRead": o.read, "RowsApplied": o.applied, "RowsQuarantined": o.quarantined,
                      "LateEvents": o.late, "DuplicateEvents": o.duplicates}
            if o.visible_at is not None and o.newest_commit is not None:
                # how far silver trailed the source when this batch's changes became visible
                values["FreshnessSeconds"] = round(o.visible_at - o.newest_commit.replace(tzinfo=UTC).timestamp(), 3)
            self.metrics.emit(values, {"Table": o.table}, units={"FreshnessSeconds": "Seconds"},
                              properties={"batch_id": batch_id})
        self.metrics.emit(
            {"BatchDuration": round(seconds, 3), "TablesTouched": len(outcomes),
             "RowsRead": sum(o.read for o in outcomes)},
            {},
            units={"BatchDuration": "Seconds"},
            properties={"batch_id": batch_id},
        )  # fmt: skip


def _test_kill_point(table: str) -> None:
    """Tests only: with CDCFLOW_STREAM_TEST_KILL_FILE set, the first process to get here (a table's silver
    commit, before the batch's other tables, bronze, quarantine and checkpoint are done) kills itself
    with SIGKILL, as `kill -9` would (once: the file, holding the table's name, marks that it happened).
    A kill from outside has to win a race against the rest of the batch."""
    marker = os.environ.get("CDCFLOW_STREAM_TEST_KILL_FILE")
    if not marker:
        return
    import signal

    try:  # created by one thread only: the tables commit in parallel
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, table.encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)
