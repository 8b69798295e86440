"""Helpers for the warehouse tests: staging batches as Arrow, an independent SCD2 oracle, table dumps."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from cdcflow.config.loader import Project, load_project

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

T0 = dt.datetime(2024, 1, 1)
LOW = dt.datetime(1900, 1, 1)
_ARROW = {
    "string": pa.string(),
    "bigint": pa.int64(),
    "int": pa.int32(),
    "timestamp": pa.timestamp("us"),
    "date": pa.date32(),
    "boolean": pa.bool_(),
}


def project() -> Project:
    return load_project(CONFIGS)


def seq(minute: int | None, rec: int = 0) -> str:
    """A CDC _seq (phase 1, commit ts, txn, rec) for a change at T0 + minute; None -> a load row."""
    if minute is None:
        return "0" + "0" * 50
    micros = int((T0 + dt.timedelta(minutes=minute)).timestamp() * 1_000_000)
    return f"1{micros:020d}{minute:020d}{rec:010d}"


def ts(minute: int | None) -> dt.datetime | None:
    return None if minute is None else T0 + dt.timedelta(minutes=minute)


@dataclass
class Change:
    op: str  # I U D
    minute: int | None  # None: full-load row
    row: dict[str, Any]
    rec: int = 0

    @property
    def seq(self) -> str:
        return seq(self.minute, self.rec)


def staging(project: Project, table: str, changes: list[Change]) -> pa.Table:
    t = project.tables[table]
    drop = {c for c, how in t.pii.items() if how == "drop"}
    fields = []
    for c, typ in t.columns.items():
        if c in drop:
            continue
        typ = "string" if c in t.pii else typ
        fields.append(pa.field(c, pa.decimal128(12, 2) if typ.startswith("decimal") else _ARROW[typ]))
    fields += [
        pa.field("_op", pa.string()),
        pa.field("_seq", pa.string()),
        pa.field("_commit_ts", pa.timestamp("us")),
    ]
    rows = [
        {
            **{f.name: ch.row.get(f.name) for f in fields[:-3]},
            "_op": ch.op,
            "_seq": ch.seq,
            "_commit_ts": ts(ch.minute),
        }
        for ch in changes
    ]
    return pa.Table.from_pylist(rows, schema=pa.schema(fields))


def cust(cid: int, name: str, minute: int) -> dict:
    """A shop.customers row: hashed email, the given name, updated at `minute`."""
    return {"customer_id": cid, "email": f"h{cid}", "full_name": name, "country": "DE", "segment": "vip",
            "created_at": ts(0), "updated_at": ts(minute)}  # fmt: skip


# Two batches of customer changes: two inserts; then an update, a delete and an insert.
FIRST = [Change("I", 1, cust(1, "a", 1)), Change("I", 1, cust(2, "b", 1), rec=1)]
SECOND = [Change("U", 5, cust(1, "a2", 5)), Change("D", 6, cust(2, "b", 6)), Change("I", 7, cust(3, "c", 7))]


@dataclass
class Version:
    key: tuple
    values: dict[str, Any]
    valid_from: dt.datetime
    valid_to: dt.datetime | None = None
    is_deleted: bool = False
    seqs: list[str] = field(default_factory=list)


def expected_history(
    changes: list[Change], key: list[str], tracked: list[str], scd1: list[str], others: list[str]
) -> list[tuple]:
    """SCD2 history replayed change by change in source order, the plain way (the test's oracle)."""
    by_key: dict[tuple, list[Change]] = {}
    seen = set()
    for ch in changes:
        k = tuple(ch.row[c] for c in key)
        if (k, ch.seq) in seen:  # the same change delivered twice
            continue
        seen.add((k, ch.seq))
        by_key.setdefault(k, []).append(ch)
    out = []
    for k, chs in by_key.items():
        chs.sort(key=lambda c: c.seq)
        versions: list[Version] = []
        current: Version | None = None
        for ch in chs:
            when = ts(ch.minute) or LOW
            if ch.op == "D":
                if current is not None:
                    current.valid_to, current.is_deleted, current = when, True, None
                continue
            vals = {c: ch.row.get(c) for c in tracked}
            if current is None or any(current.values[c] != vals[c] for c in tracked):
                if current is not None:
                    current.valid_to = when
                current = Version(k, {c: ch.row.get(c) for c in tracked + others}, when)
                versions.append(current)
        latest = [c for c in chs if c.op != "D"]
        scd1_vals = {c: latest[-1].row.get(c) for c in scd1} if latest else {}
        for v in versions:
            out.append(
                (
                    *k,
                    *[v.values[c] for c in tracked],
                    *[scd1_vals[c] for c in scd1],
                    *[v.values[c] for c in others],
                    v.valid_from,
                    v.valid_to,
                    v.valid_to is None,
                    v.is_deleted,
                )
            )
    return sorted(out, key=_sort_key)


def _sort_key(row: tuple) -> tuple:
    return tuple((x is None, str(x)) for x in row)


def dimension_rows(conn, schema: str, table: str, key: list[str], cols: list[str]) -> list[tuple]:
    sel = ", ".join(f'"{c}"' for c in [*key, *cols, "valid_from", "valid_to", "is_current", "is_deleted"])
    rows = conn.execute(f"select {sel} from {schema}.{table} where not is_inferred").fetchall()
    return sorted((tuple(r) for r in rows), key=_sort_key)


def dump_schema(conn, schema: str) -> dict[str, list[tuple]]:
    """Every table of a schema, sorted: to compare the whole warehouse before and after."""
    names = [
        r[0]
        for r in conn.execute(
            "select table_name from information_schema.tables where table_schema = %s order by 1", (schema,)
        ).fetchall()
    ]
    return {
        n: sorted(map(tuple, conn.execute(f"select * from {schema}.{n}").fetchall()), key=_sort_key)
        for n in names
    }


def current_schema(conn) -> str:
    return conn.execute("select current_schema()").fetchone()[0]


def redshift_on_postgres(url: str, s3: Any = None, s3_staging: str | None = None):
    """A `RedshiftWarehouse` (the Redshift code path: DB-API, flat transactions, staging by S3 COPY)
    on the embedded Postgres, driven by psycopg with autocommit off. Postgres has no COPY FROM S3, so
    that one statement is done here as Redshift does it: it must parse as Redshift SQL, and the
    Parquet object it names is read from S3 (moto) and loaded by column position."""
    import io

    import psycopg
    import pyarrow.parquet as pq
    import sqlglot
    from sqlglot import exp

    from batch.warehouse.connection import RedshiftWarehouse
    from cdcflow.aws import split_s3

    class RedshiftOnPostgres(RedshiftWarehouse):
        copies: list[str] = []

        def execute(self, sql: str, params: tuple | None = None) -> Any:
            if not sql.startswith("copy ") or " from 's3://" not in sql:
                return super().execute(sql, params)
            tree = sqlglot.parse_one(sql, read="redshift", error_level=sqlglot.ErrorLevel.RAISE)
            assert isinstance(tree, exp.Copy) and tree.find(exp.Credentials) is not None, sql
            self.copies.append(sql)
            bucket, key = split_s3(tree.args["files"][0].name)
            rows = pq.read_table(io.BytesIO(self.s3.get_object(Bucket=bucket, Key=key)["Body"].read()))
            target = tree.this.sql("postgres")
            marks = ", ".join(["%s"] * rows.num_columns)
            cur = self.conn.cursor()
            cur.executemany(f"insert into {target} values ({marks})", [tuple(r.values()) for r in rows.to_pylist()])
            return cur

    iam_role = "arn:aws:iam::123456789012:role/cdcflow-redshift-copy" if s3_staging else None
    return RedshiftOnPostgres(psycopg.connect(url), dialect="postgres", s3_staging=s3_staging,
                              iam_role=iam_role, s3=s3)  # fmt: skip
