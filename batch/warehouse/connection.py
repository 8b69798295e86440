"""Warehouse connections: one transaction shape for Postgres (psycopg) and Redshift (DB-API).

    with connect(project, url) as wh:
        with wh.transaction():          # the outermost one commits, or rolls back on any error
            wh.execute(sql, params)     # %s parameters on both drivers
            wh.load_staging(m, rows)    # staging rows (pyarrow) into the staging table

- `PostgresWarehouse` (psycopg, autocommit on): transactions are psycopg's (a nested one is a
  savepoint); staging is loaded with COPY FROM STDIN.
- `RedshiftWarehouse` (redshift_connector, or any DB-API 2 connection with autocommit off):
  transactions are flat, as Redshift has no savepoints. Staging is loaded by S3 COPY when
  `warehouse.s3_staging` and `warehouse.iam_role` are set: the rows are written as one Parquet
  object under that prefix, Redshift COPYs it inside the open transaction, and the object is deleted
  after commit or rollback. Without them, multi-row INSERTs (fine for small batches only).
"""

from __future__ import annotations

import io
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from batch.warehouse.ddl import Dialect, WarehouseModel
from cdcflow.config.loader import Project
from cdcflow.errors import UserError

log = logging.getLogger(__name__)

INSERT_CHUNK = 1000  # rows per INSERT batch when there is no S3 staging


class Warehouse:
    """A warehouse connection; subclasses say how transactions and staging loads work."""

    dialect: Dialect

    def __init__(self, conn: Any):
        self.conn = conn

    def execute(self, sql: str, params: tuple | None = None) -> Any:
        """Run one statement; returns the DB-API cursor (fetchone, description, rowcount)."""
        cur = self.conn.cursor()
        cur.execute(sql, params)
        return cur

    @contextmanager
    def transaction(self) -> Iterator[None]:
        raise NotImplementedError

    def load_staging(self, m: WarehouseModel, rows: pa.Table) -> None:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        return bool(getattr(self.conn, "closed", False))

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Warehouse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PostgresWarehouse(Warehouse):
    dialect: Dialect = "postgres"

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self.conn.transaction():
            yield

    def load_staging(self, m: WarehouseModel, rows: pa.Table) -> None:
        cols = ", ".join(f'"{c}"' for c in rows.column_names)
        buf = io.BytesIO()
        pacsv.write_csv(rows, buf, pacsv.WriteOptions(include_header=False))  # strings quoted, nulls empty
        with self.conn.cursor() as cur, cur.copy(f"copy {m.staging} ({cols}) from stdin with (format csv)") as cp:
            cp.write(buf.getvalue())


class RedshiftWarehouse(Warehouse):
    def __init__(
        self,
        conn: Any,
        *,
        dialect: Dialect = "redshift",
        s3_staging: str | None = None,
        iam_role: str | None = None,
        s3: Any = None,
    ):
        super().__init__(conn)
        self.dialect = dialect
        self.s3_staging = s3_staging.rstrip("/") if s3_staging else None
        self.iam_role = iam_role
        self.s3 = s3
        self._depth = 0
        self._uploaded: list[tuple[str, str]] = []  # (bucket, key) to delete when the transaction ends

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Flat: only the outermost block commits (or rolls back); inner blocks join it."""
        self._depth += 1
        try:
            yield
            if self._depth == 1:
                self.conn.commit()
        except BaseException:
            if self._depth == 1:
                self.conn.rollback()
            raise
        finally:
            self._depth -= 1
            if self._depth == 0:
                self._delete_uploads()

    def load_staging(self, m: WarehouseModel, rows: pa.Table) -> None:
        if self.s3_staging:
            self._copy_from_s3(m, rows)
            return
        cols = ", ".join(f'"{c}"' for c in rows.column_names)
        marks = ", ".join(["%s"] * rows.num_columns)
        cur = self.conn.cursor()
        for batch in rows.to_batches(max_chunksize=INSERT_CHUNK):
            values = [tuple(r.values()) for r in batch.to_pylist()]
            cur.executemany(f"insert into {m.staging} ({cols}) values ({marks})", values)

    def staging_object(self, m: WarehouseModel) -> tuple[str, str]:
        from cdcflow.aws import split_s3

        bucket, prefix = split_s3(self.s3_staging or "")
        return bucket, f"{prefix.strip('/')}/{m.table.name}/{uuid.uuid4().hex}.parquet".lstrip("/")

    def copy_sql(self, m: WarehouseModel, bucket: str, key: str) -> str:
        # Parquet columns map by position: the object holds exactly the staging columns, in order.
        return f"copy {m.staging} from 's3://{bucket}/{key}' iam_role '{self.iam_role}' format as parquet"

    def _copy_from_s3(self, m: WarehouseModel, rows: pa.Table) -> None:
        bucket, key = self.staging_object(m)
        buf = io.BytesIO()
        pq.write_table(utc_naive(rows), buf)
        self.s3.put_object(Bucket=bucket, Key=key, Body=buf.getvalue())
        self._uploaded.append((bucket, key))
        self.execute(self.copy_sql(m, bucket, key))

    def _delete_uploads(self) -> None:
        for bucket, key in self._uploaded:
            try:
                self.s3.delete_object(Bucket=bucket, Key=key)
            except Exception as e:  # noqa: BLE001 - a leftover staging object is harmless (lifecycle rule)
                log.warning("could not delete staging object s3://%s/%s: %s", bucket, key, type(e).__name__)
        self._uploaded.clear()


def utc_naive(t: pa.Table) -> pa.Table:
    """Zoned Arrow timestamps (Spark's toArrow gives UTC ones) as naive UTC, which is what a Redshift
    TIMESTAMP column holds; the instants are unchanged."""
    fields = [pa.field(f.name, pa.timestamp(f.type.unit), f.nullable) if pa.types.is_timestamp(f.type) and f.type.tz
              else f for f in t.schema]  # fmt: skip
    return t.cast(pa.schema(fields))


def redshift_connect(url: str) -> Any:  # pragma: no cover - needs a Redshift cluster
    """redshift://user:password@host:5439/db, or redshift://user@host:5439/db?iam=true&cluster=c
    (IAM credentials). User and password are percent-decoded (cdcflow.glue.redshift_url encodes them)."""
    from urllib.parse import parse_qs, unquote, urlparse

    try:
        import redshift_connector
    except ImportError:
        raise UserError("a redshift:// warehouse needs redshift_connector: pip install 'cdcflow[redshift]'") from None

    u = urlparse(url)
    opts = {k: v[0] for k, v in parse_qs(u.query).items()}
    iam = opts.get("iam") == "true"
    kwargs: dict[str, Any] = {"cluster_identifier": opts["cluster"]} if iam and "cluster" in opts else {}
    return redshift_connector.connect(
        host=u.hostname,
        port=u.port or 5439,
        database=u.path.lstrip("/"),
        user=unquote(u.username or ""),
        password=unquote(u.password or ""),
        iam=iam,
        **kwargs,
    )


def connect(project: Project, url: str) -> Warehouse:
    """A connection for a warehouse URL: postgresql:// (psycopg) or redshift:// (redshift_connector)."""
    if url.startswith("redshift://"):
        settings = project.pipeline.warehouse
        s3 = None
        if settings.s3_staging:
            from cdcflow.aws import project_client

            s3 = project_client(project, "s3")
        return RedshiftWarehouse(redshift_connect(url), s3_staging=settings.s3_staging,
                                 iam_role=settings.iam_role, s3=s3)  # fmt: skip
    if "://" in url and not url.startswith(("postgresql://", "postgres://")):
        raise UserError(f"warehouse URL scheme {url.split('://')[0]}:// is not supported "
                        "(postgresql:// or redshift://)")  # fmt: skip
    import psycopg

    return PostgresWarehouse(psycopg.connect(url, autocommit=True))
