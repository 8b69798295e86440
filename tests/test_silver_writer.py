"""Who commits silver (cdcflow.cdc.apply.silver_writer): delta-rs for small tables with features it
writes, Spark MERGE otherwise, and either can take over a table the other wrote."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from cdcflow.cdc import apply
from streaming.processor import BatchProcessor
from streaming.sources import from_replay
from tests.dms import record
from tests.streaming_helpers import project_in

pytestmark = [pytest.mark.spark, pytest.mark.glue_compat]

C = {"email": "a@example.com", "phone": "555-0100", "full_name": "A", "country": "US", "segment": "consumer",
     "created_at": "2026-01-01 00:00:00", "updated_at": "2026-01-01 00:00:00"}
T = "2026-11-25T13:{:02d}:00Z".format


def cust(i: int, **kw) -> dict:
    return {"customer_id": i, **C, **kw}


def run_batch(spark, project, batch_id: int, records: list[dict]):
    raw = spark.createDataFrame([(json.dumps(r),) for r in records], "value string")
    proc = BatchProcessor(spark, project)  # a new processor: it reads the table's settings afresh
    try:
        return {o.table: o for o in proc.process(from_replay(raw), batch_id)}
    finally:
        proc.pool.shutdown()


def test_writers_take_turns_on_one_table_by_size_and_config(spark, tmp_path: Path):
    project = project_in(tmp_path)
    name = "shop.customers"
    table = project.table(name)
    path = project.path(table.delta_path)
    assert table.writer == "auto"

    got = run_batch(spark, project, 0, [record("customers", "insert", cust(i), T(1), 1, i) for i in (1, 2, 3)])
    assert got[name].writer == "delta-rs"  # a new table: delta-rs writes it
    # the key NOT NULL and nothing else, as when Spark creates silver (the collect carries no flags of
    # its own here; a NOT NULL data column would refuse a later tombstone's or dropped column's nulls)
    schema = spark.read.format("delta").load(path).schema
    assert [f.name for f in schema.fields if not f.nullable] == ["customer_id"]

    project.tables[name] = replace(table, delta_rs_max_table_mb=0)  # now "too big" for delta-rs
    got = run_batch(spark, project, 1, [record("customers", "update", cust(1, full_name="B"), T(2), 2, 1),
                                        record("customers", "delete", {"customer_id": 2}, T(2), 2, 2)])
    assert got[name].writer == "spark"

    project.tables[name] = replace(table, writer="delta-rs")  # and back, on the table Spark merged into
    got = run_batch(spark, project, 2, [record("customers", "update", cust(1, full_name="old"), T(1), 1, 9),
                                        record("customers", "update", cust(3, full_name="C"), T(3), 3, 1),
                                        record("customers", "insert", cust(4), T(3), 3, 2)])
    assert got[name].writer == "delta-rs"

    rows = {r["customer_id"]: (r["full_name"], r["_is_deleted"]) for r in spark.read.format("delta").load(path).collect()}
    # the late update of 1 (older than batch 1's) did not roll it back, whichever engine held the guard
    assert rows == {1: ("B", False), 2: ("A", True), 3: ("C", False), 4: ("A", False)}


def test_auto_leaves_tables_with_features_delta_rs_does_not_write_to_spark(spark, tmp_path: Path):
    project = project_in(tmp_path)
    table = project.table("shop.products")
    path = project.path(table.delta_path)
    assert apply.silver_writer(path, table)[0] == "delta-rs"
    dv = replace(table, delta_properties={"delta.enableDeletionVectors": "true"})
    assert apply.silver_writer(path, dv) == ("spark", None)
    assert apply.silver_writer(path, replace(table, writer="spark")) == ("spark", None)
    # changes read from more files than the driver should collect (a big table's full load) go to Spark,
    # unless the table is pinned to delta-rs
    big = apply.DELTA_RS_MAX_SOURCE_BYTES + 1
    assert apply.silver_writer(path, table, source_bytes=big) == ("spark", None)
    assert apply.silver_writer(path, table, source_bytes=big - 1)[0] == "delta-rs"
    assert apply.silver_writer(path, replace(table, writer="delta-rs"), source_bytes=big)[0] == "delta-rs"
    # a table whose protocol has a writer feature delta-rs lacks (deletion vectors on an existing table)
    spark.sql(f"CREATE TABLE delta.`{path}` (product_id BIGINT) USING delta "
              "TBLPROPERTIES ('delta.enableDeletionVectors' = 'true')")
    assert apply.silver_writer(path, table) == ("spark", None)
