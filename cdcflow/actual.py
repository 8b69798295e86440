"""Read what the pipeline produced (silver Delta tables, quarantine, warehouse SCD2) as plain rows for verify."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pyspark.sql import SparkSession
from pyspark.sql.utils import AnalysisException

from cdcflow.config import Project, Table
from cdcflow.runtime import forget_delta_table

# A session, or a function that makes one: `cdcflow verify` reads through delta-rs and starts Spark (a JVM,
# 10-20 s) only for a table delta-rs can't read.
Spark = SparkSession | Callable[[], SparkSession]


def _session(spark: Spark) -> SparkSession:
    return spark if isinstance(spark, SparkSession) else spark()


def read_silver(spark: Spark, project: Project) -> dict[str, list[dict[str, Any]]]:
    """Every silver table's rows: read by delta-rs (1004 tables in seconds, no Spark job per table),
    by Spark where delta-rs can't read the table (a reader feature it lacks)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name, t in project.tables.items():
        path = project.path(t.delta_path)
        try:
            out[name] = _rs_rows(path)
        except Exception:  # noqa: BLE001 - delta-rs can't read it: Spark can
            out[name] = _spark_rows(_session(spark), path)
    return out


def _rs_rows(path: str, columns: list[str] | None = None) -> list[dict[str, Any]]:
    """The table's rows through delta-rs; none when there is no table yet."""
    from cdcflow.cdc.apply import rs_table_or_none

    table = rs_table_or_none(path)
    return table.to_pyarrow_table(columns=columns).to_pylist() if table is not None else []


def _spark_rows(spark: SparkSession, path: str) -> list[dict[str, Any]]:
    """The table's rows through Spark; it leaves Delta's cache once read (1000 tables fit in 2 GB)."""
    try:
        return [r.asDict() for r in spark.read.format("delta").load(path).collect()]
    except AnalysisException:
        return []
    finally:
        forget_delta_table(spark, path)  # (a path without a table is cached too)


def read_quarantine(spark: Spark, project: Project) -> list[dict[str, Any]]:
    """Quarantine rows, one per delivered bad record (redeliveries of one record count once): the
    raw -> staging stage the oracle models (what the streaming job and the full load check; the
    warehouse stages quarantine into the same table with a stage prefix in `reason`)."""
    columns = ["table", "rule", "reason", "record_hash"]
    path = project.path("quarantine")
    try:
        rows = _rs_rows(path, columns)
    except Exception:  # noqa: BLE001 - delta-rs can't read it: Spark can
        rows = _spark_rows(_session(spark), path)
    seen: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        if not str(r["reason"] or "").startswith(("staging_to_dimension: ", "dimension_to_fact: ")):
            seen.setdefault((r["table"], r["rule"], r["record_hash"]), {c: r[c] for c in columns})
    return list(seen.values())


def read_warehouse_scd2(
    project: Project, url: str | None = None, schema: str | None = None
) -> dict[str, list[dict[str, Any]]] | None:
    """SCD2 dimension rows from the warehouse (Postgres / Redshift stand-in), or None when unreachable.

    Full-load versions are stored with valid_from = 1900-01-01 (no source commit time); the oracle
    calls that None. Inferred members (placeholders for facts) are not history and are skipped.
    """
    from batch.warehouse.ddl import LOW_TS
    from cdcflow.oracle import scd2_tables

    out = _warehouse_rows(project, scd2_tables(project), url, schema, "where not coalesce(is_inferred, false)")
    for rows in (out or {}).values():
        for r in rows:
            if r.get("valid_from") is not None and str(r["valid_from"]).startswith(LOW_TS[:10]):
                r["valid_from"] = None
    return out


def read_warehouse_facts(
    project: Project, url: str | None = None, schema: str | None = None
) -> dict[str, list[dict[str, Any]]] | None:
    """Fact rows from the warehouse in silver's shape (the oracle's `expected_facts`): `is_deleted` as
    `_is_deleted`, the surrogate keys and the stage transforms' derived columns (`warehouse.columns`)
    left out (the warehouse tests check both), or None when unreachable."""
    from cdcflow.oracle import fact_tables

    out = _warehouse_rows(project, fact_tables(project), url, schema)
    if out is None:
        return None
    facts = {}
    for name, rows in out.items():
        wh = project.tables[name].cfg.warehouse
        # the surrogate keys, and the stage transforms' derived columns (Spark SQL the oracle doesn't run)
        left_out = {"is_deleted", *wh.columns} | {lk.surrogate_column for lk in wh.lookups}
        facts[name] = [{**{c: v for c, v in r.items() if c not in left_out}, "_is_deleted": r["is_deleted"]}
                       for r in rows]
    return facts


def _warehouse_rows(project: Project, tables: list[Table], url: str | None, schema: str | None,
                    where: str = "") -> dict[str, list[dict[str, Any]]] | None:
    """Each of `tables`' warehouse table as rows (tables not created yet are left out), or None when the
    warehouse is unreachable or holds none of them."""
    import psycopg

    from batch.warehouse.ddl import model

    url = url or project.pipeline.warehouse.url
    schema = schema or project.pipeline.warehouse.schema_
    try:
        conn = psycopg.connect(url, connect_timeout=3)
    except psycopg.OperationalError:
        return None
    out: dict[str, list[dict[str, Any]]] = {}
    with conn:
        for t in tables:
            name = model(project, t.name, schema).target_name
            exists = conn.execute("select to_regclass(%s)", (f'{schema}."{name}"',)).fetchone()[0]
            if not exists:
                continue
            cur = conn.execute(f'select * from {schema}."{name}" {where}')
            cols = [d.name for d in cur.description]
            out[t.name] = [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]
    return out or None
