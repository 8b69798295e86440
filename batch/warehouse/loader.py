"""Run a warehouse merge: lock, truncate-and-load staging, merge, all in one transaction, with retries.

    merge_table(conn_or_url, project, "shop.customers", staging_arrow_table) -> MergeResult

One transaction per attempt: the per-table lock, CREATE ... IF NOT EXISTS for the tables, the staging
truncate (as the Glue Redshift connector's `preactions`), the staging COPY, and the merge statements
(its `postactions`). Any failure rolls the whole attempt back, so the warehouse is exactly as it was;
transient errors (serialization failure, deadlock, lost connection, lock timeout) are retried with
exponential backoff on a fresh transaction (a fresh connection when a URL was given).

The connection (batch/warehouse/connection.py) says how: Postgres (embedded locally and in tests)
through psycopg with COPY FROM STDIN; Redshift through redshift_connector with staging from S3 COPY
(Parquet), in one explicit transaction, so a caller's extra statement (the lake job's watermark) commits
with the merge. `redshift_statements().glue_options()` gives the same statements as preactions /
postactions for users who load staging with the Glue Redshift connector instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

from batch.warehouse import scd2
from batch.warehouse.connection import PostgresWarehouse, Warehouse, connect
from batch.warehouse.ddl import Dialect, WarehouseModel, added_columns, model, table_ddl
from cdcflow.cdc.schema import arrow_type
from cdcflow.config.loader import Project

log = logging.getLogger(__name__)


@dataclass
class MergeResult:
    table: str
    kind: str
    rows_staged: int
    versions_inserted: int = 0
    versions_updated: int = 0
    rows_closed: int = 0
    scd1_updated: int = 0
    inferred_members: int = 0
    facts_inserted: int = 0
    facts_updated: int = 0
    facts_deleted: int = 0
    attempts: int = 1
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """`ddl`: idempotent CREATEs for the staging and target tables (and looked-up dimensions);
    `merge`: the SCD2 merge or the fact load, run after staging is loaded."""

    ddl: list[str]
    merge: list[scd2.Step]


def plan(project: Project, table_name: str, dialect: Dialect, schema: str | None = None) -> Plan:
    m = model(project, table_name, schema)
    ddl = table_ddl(m, dialect)
    if m.kind == "dimension":
        return Plan(ddl, scd2.dimension_merge(m, dialect))
    dims = {lk.dimension: model(project, lk.dimension, schema) for lk in m.target.lookups}
    for d in dims.values():
        ddl += [s for s in table_ddl(d, dialect) if s not in ddl]
    return Plan(ddl, scd2.fact_load(m, dims, dialect))


def lock_names(project: Project, table_name: str, schema: str | None = None) -> list[str]:
    m = model(project, table_name, schema)
    return [m.dim, *[model(project, lk.dimension, schema).dim for lk in m.target.lookups]]


def staging_arrow(m: WarehouseModel, staging: pa.Table) -> pa.Table:
    """The staging columns in table order; a missing column is an error, extra columns are ignored. A
    derived column (`warehouse.columns`) the batch lacks is NULL: a staging file merged without Spark
    (`--staging`) has been through no stage transform."""
    cols = scd2.staging_columns(m)
    missing = [c for c in cols if c not in staging.column_names and c not in m.target.columns]
    if missing:
        raise ValueError(f"staging for {m.table.name} lacks columns {missing}")
    for c, ty in m.target.columns.items():
        if c not in staging.column_names:
            staging = staging.append_column(c, pa.nulls(staging.num_rows, arrow_type(ty)))
    t = staging.select(cols)
    bad = pc.sum(pc.invert(pc.is_in(t["_op"], pa.array(["I", "U", "D"])))).as_py() or 0
    if bad or t["_seq"].null_count:
        raise ValueError(f"staging for {m.table.name}: _op must be I/U/D and _seq non-null")
    return t


# ---------------------------------------------------------------- transient errors


def _transient(exc: BaseException) -> bool:
    import psycopg
    from psycopg import errors

    if isinstance(exc, errors.SerializationFailure | errors.DeadlockDetected | errors.LockNotAvailable):
        return True
    if isinstance(exc, psycopg.OperationalError) and not isinstance(exc, errors.QueryCanceled):
        return True
    return type(exc).__name__ in {"OperationalError", "InterfaceError"} and "redshift" in type(exc).__module__


# ---------------------------------------------------------------- the merge transaction


def _run(wh: Warehouse, m: WarehouseModel, p: Plan, locks: list[str], t: pa.Table,
         also: Callable[[Warehouse], None] | None) -> dict:
    """Locks, DDL, staging truncate + load (the `preactions`), merge (the `postactions`), and `also`,
    in one transaction."""
    counts: dict[str, int] = {}
    with wh.transaction():
        for s in pre_statements(m, p, locks, wh.dialect):
            wh.execute(s)
        if m.target.columns:  # derived columns configured after the tables were created
            cur = wh.execute("select table_name, column_name from information_schema.columns where table_schema = "
                             "%s and table_name in (%s, %s)", (m.schema, m.staging_name, m.target_name))
            existing: dict[str, set[str]] = {}
            for table, column in cur.fetchall():
                existing.setdefault(table, set()).add(column)
            for s in added_columns(m, wh.dialect, existing):
                wh.execute(s)
        wh.load_staging(m, t)
        for step in p.merge:
            cur = wh.execute(step.sql)
            if step.name:
                n = cur.fetchone()[0] if cur.description else cur.rowcount
                counts[step.name] = counts.get(step.name, 0) + n
        if also is not None:
            also(wh)
    return counts


def pre_statements(m: WarehouseModel, p: Plan, locks: list[str], dialect: Dialect) -> list[str]:
    """Lock, create, truncate. Postgres takes its advisory locks first (they need no table), so
    concurrent first merges don't race on CREATE; Redshift's LOCK needs the tables to exist."""
    lock = scd2.lock_sql(locks, dialect)
    ordered = [*lock, *p.ddl] if dialect == "postgres" else [*p.ddl, *lock]
    return [*ordered, scd2.truncate_sql(m, dialect)]


def merge_table(
    conn_or_url: Any,
    project: Project,
    table_name: str,
    staging: pa.Table,
    *,
    schema: str | None = None,
    attempts: int = 5,
    wait_max: float = 8.0,
    also: Callable[[Warehouse], None] | None = None,
) -> MergeResult:
    """Load `staging` (rows per docs/design.md "Warehouse staging") and merge it into the table's
    dimension (SCD2) or fact table, atomically; `also(wh)` runs last in the same transaction.

    `conn_or_url`: a warehouse URL (postgresql:// or redshift://; each attempt gets a fresh
    connection), a `Warehouse`, or a psycopg connection."""
    m = model(project, table_name, schema)
    t = staging_arrow(m, staging)
    tries = 0

    @retry(
        retry=retry_if_exception(_transient),
        stop=stop_after_attempt(attempts),
        wait=wait_exponential(multiplier=0.1, max=wait_max),
        reraise=True,
        before_sleep=lambda rs: log.warning(
            "merge %s: transient error, retrying: %s", table_name, rs.outcome.exception()
        ),
    )
    def attempt() -> dict:
        nonlocal tries
        tries += 1
        if isinstance(conn_or_url, str):
            with connect(project, conn_or_url) as wh:
                return _execute(wh)
        wh = conn_or_url if isinstance(conn_or_url, Warehouse) else PostgresWarehouse(conn_or_url)
        if wh.closed:
            raise RuntimeError("the warehouse connection is closed; pass a URL to reconnect on retries")
        return _execute(wh)

    def _execute(wh: Warehouse) -> dict:
        p = plan(project, table_name, wh.dialect, schema)
        return _run(wh, m, p, lock_names(project, table_name, schema), t, also)

    counts = attempt()
    return _result(m, t.num_rows, counts, tries)


def _result(m: WarehouseModel, staged: int, counts: dict[str, int], tries: int) -> MergeResult:
    known = {k: v for k, v in counts.items() if k in MergeResult.__dataclass_fields__}
    return MergeResult(
        table=m.table.name, kind=m.kind, rows_staged=staged, attempts=tries, counts=counts, **known
    )


@dataclass(frozen=True)
class RedshiftStatements:
    """`pre`: lock + DDL + staging delete (Glue `preactions`); `post`: the merge (Glue `postactions`)."""

    pre: list[str]
    post: list[scd2.Step]

    def glue_options(self) -> dict[str, str]:
        """connection_options for a Glue Redshift write of the staging DynamicFrame."""
        return {
            "preactions": ";".join(self.pre),
            "postactions": ";".join(s.sql for s in self.post),
        }


def redshift_statements(project: Project, table_name: str, schema: str | None = None) -> RedshiftStatements:
    m = model(project, table_name, schema)
    p = plan(project, table_name, "redshift", schema)
    return RedshiftStatements(pre=pre_statements(m, p, lock_names(project, table_name, schema), "redshift"),
                              post=p.merge)
