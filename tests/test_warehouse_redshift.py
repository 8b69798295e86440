"""The Redshift code path of the warehouse merge (batch/warehouse/connection.py RedshiftWarehouse): flat
DB-API transactions, staging by S3 COPY (Parquet) or INSERT, an extra statement committed with the merge.
There is no Redshift here: the path runs on the embedded Postgres through psycopg with autocommit off,
the S3 staging objects go to the moto server, and the COPY statement is checked as Redshift SQL
(tests/warehouse_helpers.py redshift_on_postgres)."""

from __future__ import annotations

import os
import uuid

import psycopg
import pytest
from warehouse_helpers import (
    FIRST,
    SECOND,
    current_schema,
    dimension_rows,
    dump_schema,
    expected_history,
    project,
    redshift_on_postgres,
    staging,
)

from batch.warehouse import loader, merge_table
from batch.warehouse.connection import connect
from batch.warehouse.scd2 import Step
from cdcflow.aws import client
from cdcflow.config import load_project
from cdcflow.errors import ConfigError, UserError
from tests.conftest import CONFIGS

CUST_COLS = ["email", "full_name", "country", "segment"]




@pytest.fixture()
def s3(stack):
    s3 = client("s3", stack.aws_endpoint, "us-east-1")
    bucket = f"stg-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    return s3, bucket


def staged_objects(s3, bucket: str) -> list[str]:
    return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]


@pytest.mark.stack
def test_redshift_path_with_s3_copy_matches_the_oracle_and_cleans_up(pg, stack, s3):
    s3c, bucket = s3
    p = project()
    schema = current_schema(pg)
    with redshift_on_postgres(stack.pg_url, s3c, f"s3://{bucket}/warehouse-staging") as wh:
        r1 = merge_table(wh, p, "shop.customers", staging(p, "shop.customers", FIRST), schema=schema)
        r2 = merge_table(wh, p, "shop.customers", staging(p, "shop.customers", SECOND), schema=schema)
        assert len(wh.copies) == 2 and all("format as parquet" in c for c in wh.copies)
    assert (r1.rows_staged, r2.rows_staged) == (2, 3)
    got = dimension_rows(pg, schema, "dim_customer", ["customer_id"], CUST_COLS)
    assert got == expected_history(FIRST + SECOND, ["customer_id"], CUST_COLS, [], [])
    assert staged_objects(s3c, bucket) == []  # deleted once each transaction ended


@pytest.mark.stack
def test_redshift_path_with_insert_staging_matches_the_oracle(pg, stack):
    p = project()
    schema = current_schema(pg)
    with redshift_on_postgres(stack.pg_url) as wh:
        for batch in (FIRST, SECOND, SECOND):  # the re-run changes nothing
            merge_table(wh, p, "shop.customers", staging(p, "shop.customers", batch), schema=schema)
    got = dimension_rows(pg, schema, "dim_customer", ["customer_id"], CUST_COLS)
    assert got == expected_history(FIRST + SECOND, ["customer_id"], CUST_COLS, [], [])


@pytest.mark.stack
def test_redshift_path_failure_rolls_back_the_merge_and_the_extra_statement(pg, stack, s3, monkeypatch):
    s3c, bucket = s3
    p = project()
    schema = current_schema(pg)
    pg.execute("create table marks (n int)")
    with redshift_on_postgres(stack.pg_url, s3c, f"s3://{bucket}/stg") as wh:
        merge_table(wh, p, "shop.customers", staging(p, "shop.customers", FIRST), schema=schema,
                    also=lambda w: w.execute(f"insert into {schema}.marks values (1)"))  # fmt: skip
        before = dump_schema(pg, schema)
        real = loader.plan

        def failing(*a, **kw):  # fails after the versions were closed, before the new ones are inserted
            pl = real(*a, **kw)
            i = next(i for i, s in enumerate(pl.merge) if "update " in s.sql) + 1
            return loader.Plan(pl.ddl, [*pl.merge[:i], Step("select 1 / 0"), *pl.merge[i:]])

        monkeypatch.setattr(loader, "plan", failing)
        with pytest.raises(psycopg.errors.DivisionByZero):
            merge_table(wh, p, "shop.customers", staging(p, "shop.customers", SECOND), schema=schema,
                        also=lambda w: w.execute(f"insert into {schema}.marks values (2)"))  # fmt: skip
        # the connection is usable after the rollback
        assert wh.execute(f"select count(*) from {schema}.marks").fetchone()[0] == 1
    assert dump_schema(pg, schema) == before  # staging, dimension and the extra statement
    assert staged_objects(s3c, bucket) == []


@pytest.mark.stack
def test_nested_transactions_are_flat(pg, stack):
    schema = current_schema(pg)
    pg.execute("create table t (n int)")
    with redshift_on_postgres(stack.pg_url) as wh:
        with pytest.raises(RuntimeError):
            with wh.transaction():
                wh.execute(f"insert into {schema}.t values (1)")
                with wh.transaction():  # joins the outer one: its end commits nothing
                    wh.execute(f"insert into {schema}.t values (2)")
                raise RuntimeError("after the inner block")
        with wh.transaction():
            wh.execute(f"insert into {schema}.t values (3)")
    assert pg.execute("select n from t").fetchall() == [(3,)]


def test_s3_staging_needs_an_iam_role_named_in_the_error():
    env = {**os.environ, "CDCFLOW_WAREHOUSE_S3_STAGING": "s3://bucket/stg", "CDCFLOW_WAREHOUSE_IAM_ROLE": ""}
    with pytest.raises(ConfigError) as e:
        load_project(CONFIGS, env=env)
    assert "pipeline.yaml" in str(e.value) and "warehouse" in str(e.value) and "iam_role" in str(e.value)
    env["CDCFLOW_WAREHOUSE_S3_STAGING"] = "/local/path"
    with pytest.raises(ConfigError, match="s3://"):
        load_project(CONFIGS, env=env)


def test_unknown_warehouse_scheme_is_a_one_line_error_without_the_password():
    with pytest.raises(UserError) as e:
        connect(project(), "mysql://admin:s3cret@db:3306/x")
    assert "mysql://" in str(e.value) and "s3cret" not in str(e.value)


def test_staging_parquet_holds_naive_utc_timestamps():
    import datetime as dt

    import pyarrow as pa

    from batch.warehouse.connection import utc_naive

    berlin_noon = dt.datetime(2024, 6, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    t = pa.table({"at": pa.array([berlin_noon, None], pa.timestamp("us", tz="UTC")), "n": [1, 2]})
    out = utc_naive(t)
    assert out.schema.field("at").type == pa.timestamp("us") and out.schema.field("n").type == pa.int64()
    assert out["at"].to_pylist() == [dt.datetime(2024, 6, 1, 10), None]
