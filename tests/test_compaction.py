"""Compaction: fewer files, same live data, hard-delete tombstones GC'd after their retention only."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from batch.compaction import Files, compact, log_files
from cdcflow.config.models import CompactionThresholds
from streaming.processor import BatchProcessor
from streaming.sources import from_replay
from tests.dms import record
from tests.streaming_helpers import project_in

pytestmark = [pytest.mark.spark, pytest.mark.glue_compat]


def order(i: int, **kw) -> dict:
    return {"order_id": i, "customer_id": 1, "status": "placed", "order_date": "2026-11-25", "total_amount": "10.00",
            "shipping_phone": "555-0199", "updated_at": "2026-11-25 10:00:00", **kw}


def test_compaction_reduces_files_keeps_data_and_gcs_old_hard_tombstones(spark, tmp_path, monkeypatch):
    import json

    from cdcflow.cdc import apply

    # delta-rs's MERGE, which leaves a file per commit as it does for tables above the copy-on-write
    # size (a small table's rewrite leaves one file: nothing to compact)
    monkeypatch.setattr(apply, "COPY_ON_WRITE_MAX_BYTES", -1)
    project = project_in(tmp_path, CDCFLOW_RAW_URI=str(tmp_path / "raw"))
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
    orders = project.table("shop.orders")
    files = log_files(path)[()]
    assert not files.needs_work(orders.compaction)  # 8 small files at least, by default
    healthy = {(r.table, r.partition): r for r in compact(spark, project, now=now, vacuum_hours=0,
                                                          allow_short_retention=True)}
    assert healthy[("shop.orders", None)].action.startswith("skipped") and log_files(path)[()] == files  # untouched
    # bronze per (table, date): the day is closed (before `now`), so its several files were bin-packed
    bronze = healthy[("bronze", "table=shop.orders/date=2026-11-25")]
    assert bronze.action == "compacted" and bronze.files_before > 1 and bronze.files_after == 1

    project.tables["shop.orders"] = replace(orders, compaction=CompactionThresholds(min_small_files=2))
    results = {(r.table, r.partition): r for r in compact(spark, project, now=now, vacuum_hours=0,
                                                          allow_short_retention=True)}
    r = results[("shop.orders", None)]
    assert r.action == "compacted" and r.engine == "delta-rs"
    assert r.files_before >= 4 and r.files_after == 1 and r.bytes_rewritten > 0
    assert r.tombstones_removed == 1
    rows = spark.read.format("delta").load(path)
    assert sorted(map(str, rows.filter("not _is_deleted").drop("_ingested_at").collect())) == live_before
    assert [x.order_id for x in rows.filter("_is_deleted").collect()] == [2]
    assert results[("bronze", "table=shop.orders/date=2026-11-25")].action == "skipped: closed, one file"
    history = spark.sql(f"DESCRIBE HISTORY delta.`{path}`").select("operation").collect()
    assert {"OPTIMIZE", "DELETE", "VACUUM END"} <= {h.operation for h in history}

    # Redshift Spectrum's manifests, rewritten after VACUUM: exactly the compacted snapshot's files
    from pathlib import Path

    from deltalake import DeltaTable as RsTable

    from batch.compaction import MANIFEST_DIR
    from cdcflow.cdc.apply import rs_uri

    assert healthy[("shop.orders", None)].manifest == "written" and r.manifest == "written"
    listed = Path(rs_uri(path), MANIFEST_DIR, "manifest").read_text().splitlines()
    assert sorted(listed) == sorted(RsTable(rs_uri(path)).file_uris()) and len(listed) == 1
    bronze_manifest = Path(rs_uri(project.path("bronze")), MANIFEST_DIR, "table=shop.orders", "date=2026-11-25",
                           "manifest")
    assert bronze_manifest.read_text().count("\n") == 1  # the one bin-packed file
    assert results[("bronze", "table=shop.orders/date=2026-11-25")].manifest == "unchanged"


def test_vacuum_below_the_retention_floor_is_refused_in_one_line(tmp_path):
    from tests.conftest import REPO

    env = {**os.environ, "CDCFLOW_LAKE_ROOT": str(tmp_path / "lake")}
    out = subprocess.run([sys.executable, "-m", "cdcflow.cli", "compact", "--vacuum-hours", "1"], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 1 and "Traceback" not in out.stderr + out.stdout
    lines = [x for x in (out.stderr + out.stdout).splitlines() if x.strip()]
    assert len(lines) == 1 and "below the 168 h floor" in lines[0] and "--allow-short-retention" in lines[0]


def test_thresholds_decide_from_file_sizes():
    limits = CompactionThresholds(small_file_mb=32, min_small_files=3, small_file_share=0.5)
    mb = 1024 * 1024
    assert Files((mb, mb, mb)).needs_work(limits)
    assert not Files((mb, mb)).needs_work(limits)  # too few small files
    assert not Files((mb, mb, mb, *[100 * mb] * 4)).needs_work(limits)  # 3 of 7: under half
    assert Files((mb, mb, mb, 100 * mb)).needs_work(limits)


def test_archived_raw_files_expire_after_the_configured_days(tmp_path):
    from batch.full_load import RawStore
    from tests.streaming_helpers import project_in

    raw = tmp_path / "raw"
    project = project_in(tmp_path, CDCFLOW_RAW_URI=str(raw))
    now = datetime(2026, 12, 1, tzinfo=UTC)
    files = {}
    for age in (10, 89, 91, 400):
        f = raw / "archive" / "year=2026" / "month=01" / "shop" / "orders" / f"age{age}.parquet"
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"x")
        stamp = (now - timedelta(days=age)).timestamp()
        os.utime(f, (stamp, stamp))
        files[age] = f
    live = raw / "shop" / "orders" / "20260101-000000.parquet"  # not archived yet: never expired
    live.parent.mkdir(parents=True)
    live.write_bytes(b"x")
    os.utime(live, (0, 0))
    days = project.pipeline.dms.archive_expire_days
    assert days == 90
    assert RawStore(project).expire_archive(now - timedelta(days=days)) == 2
    assert {a for a, f in files.items() if f.exists()} == {10, 89} and live.exists()


def test_compact_every_writes_a_report_and_emf_per_run_and_sigterm_ends_it(spark, tmp_path, monkeypatch):
    """`cdcflow compact --every`: each run prints its table, writes `<lake>/_reports/compaction/*.json`
    and EMF metrics; SIGTERM ends the loop between tables with exit 0 (in-process, on the test's
    Spark session, so no second JVM starts)."""
    import json
    import signal
    import threading
    import time
    from pathlib import Path

    import pyarrow as pa
    from deltalake import write_deltalake

    from batch.cli import run_compact
    from batch.compaction import Stop
    from cdcflow.cli import build_parser
    from tests.conftest import CONFIGS

    env = {"CDCFLOW_LAKE_ROOT": str(tmp_path / "lake"), "CDCFLOW_CHECKPOINT_ROOT": str(tmp_path / "ck"),
           "CDCFLOW_RAW_URI": str(tmp_path / "raw")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    project = project_in(tmp_path, **env)
    path = project.path(project.table("shop.customers").delta_path)
    for i in range(9):  # nine one-row commits: past the default small-file thresholds
        write_deltalake(path, pa.table({"customer_id": pa.array([i], pa.int64()), "_is_deleted": [False],
                                        "_deleted_at": pa.array([None], pa.timestamp("us", "UTC"))}), mode="append")
    metrics = tmp_path / "metrics.jsonl"
    reports = Path(project.path("_reports/compaction"))

    def sigterm_after_two_runs() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and len(list(reports.glob("*.json"))) < 2:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    threading.Thread(target=sigterm_after_two_runs, daemon=True).start()
    try:
        args = build_parser().parse_args(["--config", str(CONFIGS), "compact", "--every", "1s",
                                          "--metrics-file", str(metrics)])
        assert run_compact(args) == 0
    finally:
        Stop.requested = False
        for s, h in handlers.items():
            signal.signal(s, h)

    runs = [json.loads(p.read_text()) for p in sorted(reports.glob("*.json"))]
    assert len(runs) >= 2
    first = {(r["table"], r["partition"]): r for r in runs[0]["results"]}
    assert first[("shop.customers", None)]["action"] == "compacted"
    assert (runs[0]["tables_compacted"], runs[0]["files_removed"]) == (1, 9) and runs[0]["bytes_rewritten"] > 0
    again = {(r["table"], r["partition"]): r for r in runs[1]["results"]}
    assert again[("shop.customers", None)]["action"].startswith("skipped")  # one file now: healthy, not rewritten
    emf = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert [m["FilesRemoved"] for m in emf if m.get("Job") == "compaction"][:2] == [9, 0]
    assert all({"BytesRewritten", "TablesSkipped", "TablesCompacted", "CompactionDuration"} <= set(m) for m in emf)
