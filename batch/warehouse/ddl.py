"""Warehouse table shapes and DDL, generated from a table's config, for Redshift and Postgres.

Shapes (`<sk>` is the dimension table name without its `dim_` prefix, plus `_sk`):

- staging  `stg_<table>`: declared columns (PII `drop` columns absent, `hash`/`redact` columns are
  strings), `_op` ('I' | 'U' | 'D'), `_seq` (fixed-width digit string, see docs/design.md),
  `_commit_ts` (source commit time; null for full-load rows).
- dimension `dim_<table>`: `<sk>` (identity), the declared columns, `valid_from`, `valid_to`
  (null = open), `is_current`, `is_deleted` (the version was closed by a delete at the source),
  `is_inferred` (placeholder created by a fact load before the dimension row arrived), `_seq`
  (sequence of the change that opened the version), `_end_seq` (sequence of the change that closed
  it), `_last_seq` (latest change folded into the key: guards SCD1 updates against late data).
- fact `fct_<table>`: the declared columns, one bigint per lookup's `surrogate_column`, `_seq`,
  `_commit_ts`, `is_deleted` (deletes are kept as flagged tombstones so a late, older update can't
  resurrect the row; consumers read `where not is_deleted`).

Redshift tables get DISTSTYLE KEY/DISTKEY and COMPOUND SORTKEY from `warehouse.dist_key` /
`warehouse.sort_keys` (DISTSTYLE AUTO without a dist key); Postgres gets indexes instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from cdcflow.config.loader import Project, Table
from cdcflow.config.models import WarehouseTarget

Dialect = Literal["postgres", "redshift"]

# valid_from of full-load rows (no source commit time) and of inferred members.
LOW_TS = "1900-01-01 00:00:00"

_DECIMAL = re.compile(r"^decimal\((\d+),\s*(\d+)\)$")
_TYPES: dict[str, tuple[str, str]] = {  # config type -> (postgres, redshift)
    "string": ("text", "varchar(65535)"),
    "int": ("integer", "integer"),
    "bigint": ("bigint", "bigint"),
    "smallint": ("smallint", "smallint"),
    "double": ("double precision", "double precision"),
    "float": ("real", "real"),
    "boolean": ("boolean", "boolean"),
    "date": ("date", "date"),
    "timestamp": ("timestamp", "timestamp"),
}


def sql_type(config_type: str, dialect: Dialect) -> str:
    m = _DECIMAL.match(config_type)
    if m:
        return f"decimal({m.group(1)},{m.group(2)})"
    pg, rs = _TYPES[config_type]
    return pg if dialect == "postgres" else rs


def q(name: str) -> str:
    """Quote an identifier (config names are validated identifiers; quoting guards reserved words)."""
    return f'"{name}"'


@dataclass(frozen=True)
class WarehouseModel:
    """One configured table resolved into warehouse names and column roles."""

    table: Table
    schema: str
    target: WarehouseTarget
    columns: dict[str, str]  # warehouse columns (declared minus PII drop) -> config type
    key: list[str]

    @property
    def kind(self) -> str:
        return self.target.kind

    @property
    def staging_name(self) -> str:
        return self.target.staging_table or f"stg_{self.table.table}"

    @property
    def target_name(self) -> str:
        return self.target.table or f"{'dim' if self.kind == 'dimension' else 'fct'}_{self.table.table}"

    @property
    def staging(self) -> str:
        return f"{q(self.schema)}.{q(self.staging_name)}"

    @property
    def dim(self) -> str:
        return f"{q(self.schema)}.{q(self.target_name)}"

    @property
    def sk(self) -> str:
        name = self.target_name
        return f"{name[4:] if name.startswith('dim_') else name}_sk"

    @property
    def value_columns(self) -> list[str]:
        return [c for c in self.columns if c not in self.key]

    @property
    def tracked(self) -> list[str]:
        scd1 = set(self.target.scd1_columns)
        chosen = self.target.tracked_columns
        return [c for c in self.value_columns if c not in scd1 and (chosen is None or c in chosen)]

    @property
    def scd1(self) -> list[str]:
        if self.target.scd_type == 1:  # a type-1 dimension: every non-key column is overwritten
            return self.value_columns
        return [c for c in self.value_columns if c in self.target.scd1_columns]

    @property
    def event_time(self) -> str:
        return self.target.event_time_column or "_commit_ts"


def model(project: Project, table_name: str, schema: str | None = None) -> WarehouseModel:
    table = project.tables[table_name]
    target = table.cfg.warehouse
    if target is None:
        raise ValueError(f"table {table_name} has no warehouse section")
    drop = {c for c, how in table.pii.items() if how == "drop"}
    columns = {c: ("string" if c in table.pii else t) for c, t in table.columns.items() if c not in drop}
    columns.update(target.columns)  # the warehouse stages' derived columns
    return WarehouseModel(
        table=table,
        schema=schema or project.pipeline.warehouse.schema_,
        target=target,
        columns=columns,
        key=table.primary_key,
    )


def _physical(m: WarehouseModel, dialect: Dialect, dist_ok: set[str]) -> str:
    if dialect == "postgres":
        return ""
    dist = m.target.dist_key
    out = f" diststyle key distkey({q(dist)})" if dist and dist in dist_ok else " diststyle auto"
    sort = [c for c in m.target.sort_keys if c in dist_ok]
    if sort:
        out += f" compound sortkey({', '.join(q(c) for c in sort)})"
    return out


def _cols(m: WarehouseModel, dialect: Dialect) -> list[str]:
    return [f"{q(c)} {sql_type(t, dialect)}" for c, t in m.columns.items()]


def staging_ddl(m: WarehouseModel, dialect: Dialect) -> list[str]:
    seq = sql_type("string", dialect)
    cols = [
        *_cols(m, dialect),
        f'"_op" {sql_type("string", dialect)}',
        f'"_seq" {seq}',
        '"_commit_ts" timestamp',
    ]
    return [
        f"create table if not exists {m.staging} ({', '.join(cols)}){_physical(m, dialect, set(m.columns))}"
    ]


def dimension_ddl(m: WarehouseModel, dialect: Dialect) -> list[str]:
    identity = "generated by default as identity" if dialect == "postgres" else "identity(1,1)"
    seq = sql_type("string", dialect)
    cols = [
        f"{q(m.sk)} bigint {identity} primary key",
        *_cols(m, dialect),
        '"valid_from" timestamp not null',
        '"valid_to" timestamp',
        '"is_current" boolean not null',
        '"is_deleted" boolean not null',
        '"is_inferred" boolean not null',
        f'"_seq" {seq}',
        f'"_end_seq" {seq}',
        f'"_last_seq" {seq}',
    ]
    out = [f"create table if not exists {m.dim} ({', '.join(cols)}){_physical(m, dialect, set(m.columns))}"]
    if dialect == "postgres":
        keys = ", ".join(q(k) for k in m.key)
        out.append(f'create index if not exists {q(m.target_name + "_nk")} on {m.dim} ({keys}, "valid_from")')
        out.append(f"create index if not exists {q(m.target_name + '_inferred')} on {m.dim} ({keys}) where is_inferred")
    return out


def fact_ddl(m: WarehouseModel, dialect: Dialect) -> list[str]:
    seq = sql_type("string", dialect)
    cols = [
        *_cols(m, dialect),
        *[f"{q(lk.surrogate_column)} bigint" for lk in m.target.lookups],
        f'"_seq" {seq}',
        '"_commit_ts" timestamp',
        '"is_deleted" boolean not null',
        f"primary key ({', '.join(q(k) for k in m.key)})",
    ]
    return [f"create table if not exists {m.dim} ({', '.join(cols)}){_physical(m, dialect, set(m.columns))}"]


def added_columns(m: WarehouseModel, dialect: Dialect, existing: dict[str, set[str]]) -> list[str]:
    """ALTER TABLE ... ADD COLUMN for the derived columns (`warehouse.columns`) a staging or target
    table created before they were configured lacks. `existing`: table name -> its columns, from
    information_schema (Redshift's ADD COLUMN has no IF NOT EXISTS)."""
    return [f"alter table {table} add column {q(c)} {sql_type(t, dialect)}"
            for table, name in ((m.staging, m.staging_name), (m.dim, m.target_name))
            for c, t in m.target.columns.items() if c not in existing.get(name, ())]


def table_ddl(m: WarehouseModel, dialect: Dialect) -> list[str]:
    """Every statement creating the staging and target tables of one configured table (idempotent)."""
    target = dimension_ddl(m, dialect) if m.kind == "dimension" else fact_ddl(m, dialect)
    return [f"create schema if not exists {q(m.schema)}", *staging_ddl(m, dialect), *target]
