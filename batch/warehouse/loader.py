"""Run a warehouse merge: lock, truncate-and-load staging, merge, all in one transaction, with retries.

    merge_table(conn_or_url, project, "shop.customers", staging_arrow_table) -> MergeResult

One transaction per attempt: the per-table lock, CREATE ... IF NOT EXISTS for the tables, the staging
truncate (as the Glue Redshift connector's `preactions`), the staging COPY, and the merge statements
(its `postactions`). Any failure rolls the whole attempt back, so the warehouse is exactly as it was;
transient errors (serialization failure, deadlock, lost connection, lock timeout) are retried with
exponential backoff on a fresh transaction (a fresh connection when a URL was given).

Postgres (embedded locally and in tests) runs through psycopg with COPY FROM STDIN. Redshift runs the
same statements through redshift_connector (`redshift_connect`); staging then comes from S3 COPY in
production (the Glue connection with preactions / postactions, or the Data API). That path is thin and
has not been run here: there is no AWS in this environment.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

from batch.warehouse import scd2
from batch.warehouse.ddl import Dialect, WarehouseModel, model, table_ddl
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
    """The staging columns in table order; a missing column is an error, extra columns are ignored."""
    cols = scd2.staging_columns(m)
    missing = [c for c in cols if c not in staging.column_names]
    if missing:
        raise ValueError(f"staging for {m.table.name} lacks columns {missing}")
    t = staging.select(cols)
    bad = pc.sum(pc.invert(pc.is_in(t["_op"], pa.array(["I", "U", "D"])))).as_py() or 0
    if bad or t["_seq"].null_count:
        raise ValueError(f"staging for {m.table.name}: _op must be I/U/D and _seq non-null")
    return t


def _csv(t: pa.Table) -> bytes:
    buf = io.BytesIO()
    pacsv.write_csv(t, buf, pacsv.WriteOptions(include_header=False))  # strings quoted, nulls empty
    return buf.getvalue()


# ---------------------------------------------------------------- transient errors


def _transient(exc: BaseException) -> bool:
    import psycopg
    from psycopg import errors

    if isinstance(exc, errors.SerializationFailure | errors.DeadlockDetected | errors.LockNotAvailable):
        return True
    if isinstance(exc, psycopg.OperationalError) and not isinstance(exc, errors.QueryCanceled):
        return True
    return type(exc).__name__ in {"OperationalError", "InterfaceError"} and "redshift" in type(exc).__module__


# ---------------------------------------------------------------- Postgres (psycopg)


def _run_postgres(conn: Any, m: WarehouseModel, p: Plan, locks: list[str], t: pa.Table) -> dict:
    counts: dict[str, int] = {}
    with conn.transaction():
        for s in [*scd2.lock_sql(locks, "postgres"), *p.ddl]:
            conn.execute(s)
        conn.execute(scd2.truncate_sql(m, "postgres"))
        cols = ", ".join(f'"{c}"' for c in t.column_names)
        with conn.cursor() as cur:
            with cur.copy(f"copy {m.staging} ({cols}) from stdin with (format csv)") as cp:
                cp.write(_csv(t))
            for step in p.merge:
                cur.execute(step.sql)
                if step.name:
                    n = cur.fetchone()[0] if cur.description else cur.rowcount
                    counts[step.name] = counts.get(step.name, 0) + n
    return counts


def merge_table(
    conn_or_url: Any,
    project: Project,
    table_name: str,
    staging: pa.Table,
    *,
    schema: str | None = None,
    attempts: int = 5,
    wait_max: float = 8.0,
) -> MergeResult:
    """Load `staging` (rows per docs/design.md "Warehouse staging") and merge it into the table's
    dimension (SCD2) or fact table, atomically. `conn_or_url`: a psycopg connection or a postgresql://
    URL (Postgres / embedded), or a redshift:// URL (redshift_connector; not exercised here)."""
    m = model(project, table_name, schema)
    t = staging_arrow(m, staging)
    if isinstance(conn_or_url, str) and conn_or_url.startswith("redshift://"):
        return _merge_redshift(conn_or_url, project, table_name, t, schema)
    p = plan(project, table_name, "postgres", schema)
    locks = lock_names(project, table_name, schema)
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
            import psycopg

            with psycopg.connect(conn_or_url, autocommit=True) as conn:
                return _run_postgres(conn, m, p, locks, t)
        if conn_or_url.closed:
            raise RuntimeError("the warehouse connection is closed; pass a URL to reconnect on retries")
        return _run_postgres(conn_or_url, m, p, locks, t)

    counts = attempt()
    return _result(m, t.num_rows, counts, tries)


def _result(m: WarehouseModel, staged: int, counts: dict[str, int], tries: int) -> MergeResult:
    known = {k: v for k, v in counts.items() if k in MergeResult.__dataclass_fields__}
    return MergeResult(
        table=m.table.name, kind=m.kind, rows_staged=staged, attempts=tries, counts=counts, **known
    )


# ---------------------------------------------------------------- Redshift (thin, untested here)


def redshift_connect(url: str) -> Any:  # pragma: no cover - needs a Redshift cluster
    """redshift://user:password@host:5439/db, or redshift://host:5439/db?iam=true (IAM credentials).
    User and password are percent-decoded (cdcflow.glue.redshift_url encodes them)."""
    from urllib.parse import parse_qs, unquote, urlparse

    import redshift_connector

    u = urlparse(url)
    opts = parse_qs(u.query)
    return redshift_connector.connect(
        host=u.hostname,
        port=u.port or 5439,
        database=u.path.lstrip("/"),
        user=unquote(u.username or ""),
        password=unquote(u.password or ""),
        iam=opts.get("iam", ["false"])[0] == "true",
    )


def _merge_redshift(
    url: str, project: Project, table_name: str, t: pa.Table, schema: str | None
) -> MergeResult:  # pragma: no cover - needs a Redshift cluster
    """Same transaction shape on Redshift. Staging rows go in by multi-row INSERT, fine for small
    batches; large batches belong in S3 + COPY (the Glue connector does that with preactions)."""
    m = model(project, table_name, schema)
    statements = redshift_statements(project, table_name, schema)
    conn = redshift_connect(url)
    counts: dict[str, int] = {}
    try:
        cur = conn.cursor()
        for s in statements.pre:
            cur.execute(s)
        rows = t.to_pylist()
        cols = ", ".join(f'"{c}"' for c in t.column_names)
        marks = ", ".join(["%s"] * len(t.column_names))
        for i in range(0, len(rows), 1000):
            chunk = rows[i : i + 1000]
            cur.executemany(
                f"insert into {m.staging} ({cols}) values ({marks})", [tuple(r.values()) for r in chunk]
            )
        for step in statements.post:
            cur.execute(step.sql)
            if step.name:
                n = cur.fetchone()[0] if cur.description else cur.rowcount
                counts[step.name] = counts.get(step.name, 0) + n
        conn.commit()
    except BaseException:
        conn.rollback()
        raise
    finally:
        conn.close()
    return _result(m, t.num_rows, counts, 1)


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
    locks = scd2.lock_sql(lock_names(project, table_name, schema), "redshift")
    return RedshiftStatements(pre=[*p.ddl, *locks, scd2.truncate_sql(m, "redshift")], post=p.merge)
