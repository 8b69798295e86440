"""Compaction: fewer files, same live data, hard-delete tombstones GC'd after their retention only."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from batch.compaction import compact
from streaming.processor import BatchProcessor
from streaming.sources import from_replay
from tests.dms import record
from tests.streaming_helpers import project_in

pytestmark = [pytest.mark.spark, pytest.mark.glue_compat]


def order(i: int, **kw) -> dict:
    return {"order_id": i, "customer_id": 1, "status": "placed", "order_date": "2026-11-25", "total_amount": "10.00",
            "shipping_phone": "555-0199", "updated_at": "2026-11-25 10:00:00", **kw}


def test_compaction_reduces_files_keeps_data_and_gcs_old_hard_tombstones(spark, tmp_path):
    import json

    project = project_in(tmp_path)
    proc = BatchProcessor(spark, project)
    batches = [[record("orders", "insert", order(i), f"2026-11-25T10:0{i}:00Z", i, 1)] for i in range(1, 7)]
    batches.append([record("orders", "delete", {"order_id": 1}, "2026-11-25T10:10:00Z", 10, 1),
                    record("orders", "delete", {"order_id": 2}, "2026-11-25T10:50:00Z", 11, 1)])
    for b, recs in enumerate(batches):
        raw = spark.createDataFrame([(json.dumps(r),) for r in recs], "value string")
        proc.process(from_replay(raw), b)
    path = project.path(project.table("shop.orders").delta_path)
    live_before = sorted(map(str, spark.read.format("delta").load(path).filter("not _is_deleted")
                             .drop("_ingested_at").collect()))

    # Retention 168 h: at 10:30 + 168 h the 10:10 delete has expired, the 10:50 one has not.
    now = datetime(2026, 11, 25, 10, 30, tzinfo=UTC) + timedelta(hours=168)
    results = {r.table: r for r in compact(spark, project, now=now, vacuum_hours=0)}
    r = results["shop.orders"]
    assert r.files_before >= 4 and r.files_after == 1
    assert r.tombstones_removed == 1
    rows = spark.read.format("delta").load(path)
    assert sorted(map(str, rows.filter("not _is_deleted").drop("_ingested_at").collect())) == live_before
    assert [x.order_id for x in rows.filter("_is_deleted").collect()] == [2]
    assert results["bronze"].files_after <= results["bronze"].files_before
    history = spark.sql(f"DESCRIBE HISTORY delta.`{path}`").select("operation").collect()
    assert {"OPTIMIZE", "DELETE", "VACUUM END"} <= {h.operation for h in history}
