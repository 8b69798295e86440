"""`cdcflow status` on small Delta tables written with delta-rs (no Spark): silver numbers, bronze batches per
feed (from the log's statistics, and by reading a file that mixes feeds), quarantine split by stage, the
stream checkpoint, metrics, rendering, JSON and one-line config errors."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake
from rich.console import Console

from cdcflow import status as st
from cdcflow.cli import main
from tests.streaming_helpers import project_in

T0 = datetime(2026, 11, 25, 11, 0, 0, tzinfo=UTC)  # in the past: the CLI measures freshness from now
NOW = T0 + timedelta(hours=1)


def ts(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def silver(path: Path, deleted: list[bool], commits: list[datetime | None]) -> None:
    n = len(deleted)
    write_deltalake(str(path), pa.table({
        "customer_id": pa.array(range(n), pa.int64()),
        "_is_deleted": pa.array(deleted),
        "_commit_ts": pa.array(commits, pa.timestamp("us", tz="UTC")),
        "_ingested_at": pa.array([ts(30)] * n, pa.timestamp("us", tz="UTC")),
    }))


def bronze(path: Path, table: str, feed: str | list[str], batches: list[int]) -> None:
    feeds = feed if isinstance(feed, list) else [feed] * len(batches)
    write_deltalake(str(path), pa.table({
        "table": [table] * len(batches),
        "feed": feeds,
        "batch_id": pa.array(batches, pa.int64()),
    }), partition_by=["table"], mode="append")


def quarantine(path: Path, rows: list[tuple[str | None, str]]) -> None:
    write_deltalake(str(path), pa.table({
        "table": pa.array([t for t, _ in rows], pa.string()),
        "rule": ["r"] * len(rows),
        "reason": [r for _, r in rows],
        "batch_id": pa.array([1] * len(rows), pa.int64()),
    }))


def checkpoint(root: Path, commits: list[int], offsets: list[int]) -> Path:
    ck = root / "cdcflow-shop" / "stream"
    for name, ids in (("commits", commits), ("offsets", offsets)):
        (ck / name).mkdir(parents=True)
        for i in ids:
            (ck / name / str(i)).write_text("v1\n{}\n")
        (ck / name / f".{ids[-1] if ids else 0}.crc").write_text("")  # not a batch file
    return ck


def metrics(path: Path) -> None:
    lines = [
        {"_aws": {"Timestamp": 1_000}, "Pipeline": "cdcflow-shop", "Stream": "s", "Shard": "shard-0",
         "MillisBehindLatest": 5000},
        {"_aws": {"Timestamp": 2_000}, "Pipeline": "cdcflow-shop", "Stream": "s", "Shard": "shard-0",
         "MillisBehindLatest": 1200},
        {"_aws": {"Timestamp": 3_000}, "Pipeline": "cdcflow-shop", "Stream": "s", "Shard": "shard-1",
         "MillisBehindLatest": 300},
        {"_aws": {"Timestamp": 3_000}, "Pipeline": "other", "Stream": "s", "Shard": "shard-1",
         "MillisBehindLatest": 99_999},
        {"_aws": {"Timestamp": 3_000}, "Pipeline": "cdcflow-shop", "Table": "shop.customers",
         "FreshnessSeconds": 4.5, "batch_id": 7},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")


@pytest.fixture()
def lake(tmp_path, monkeypatch):
    """A lake with silver for two of the four tables, bronze, quarantine, a checkpoint and metrics."""
    for k in ("CDCFLOW_AWS_ENDPOINT",):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("CDCFLOW_LAKE_ROOT", str(tmp_path / "lake"))
    monkeypatch.setenv("CDCFLOW_CHECKPOINT_ROOT", str(tmp_path / "ck"))
    root = tmp_path / "lake"
    silver(root / "silver/shop/customers", [False, False, True, False], [None, ts(1), ts(5), ts(3)])
    silver(root / "silver/shop/orders", [False], [None])  # full-load rows only: no commit time
    b = root / "bronze"
    bronze(b, "shop.customers", "full_load", [0, 1])
    bronze(b, "shop.customers", "stream", [3, 4])
    bronze(b, "shop.customers", "stream", [7])
    bronze(b, "shop.orders", ["full_load", "stream"], [2, 5])  # one file, two feeds (a compacted file)
    quarantine(root / "quarantine", [("shop.customers", "not_null: customer_id is null"),
                                     ("shop.customers", "regex: country"),
                                     ("shop.customers", "staging_to_dimension: regex country"),
                                     (None, "malformed JSON"), ("ghost.table", "unknown table")])
    checkpoint(tmp_path / "ck", commits=[0, 1, 2], offsets=[0, 1, 2, 3])
    metrics(tmp_path / "metrics.jsonl")
    return tmp_path


def test_collect_status_reads_the_lake_checkpoint_and_metrics(lake):
    project = project_in(lake)
    s = st.collect_status(project, lake / "metrics.jsonl", now=NOW)
    by = {t.table: t for t in s.tables}
    assert list(by) == sorted(project.tables)

    c = by["shop.customers"]
    assert (c.exists, c.rows, c.deleted, c.version) == (True, 3, 1, 0)
    assert c.newest_change == ts(5) and c.last_ingested == ts(30)
    assert c.freshness_seconds(NOW) == pytest.approx(55 * 60)
    assert c.batches == {"full_load": 1, "stream": 7}
    assert (c.quarantined, c.warehouse_quarantined) == (2, 1)
    assert c.latency_seconds == 4.5
    assert c.last_commit is not None and abs((datetime.now(UTC) - c.last_commit).total_seconds()) < 120

    o = by["shop.orders"]
    assert (o.rows, o.deleted, o.newest_change, o.freshness_seconds(NOW)) == (1, 0, None, None)
    assert o.batches == {"full_load": 2, "stream": 5}  # the mixed file was read
    assert not by["shop.products"].exists and by["shop.products"].batches == {}

    assert s.unattributed_quarantine == 2  # malformed JSON (no table) + an unknown table
    assert s.stream.last_batch == 2 and s.stream.pending_batches == 1
    assert s.stream.millis_behind == {"shard-0": 1200, "shard-1": 300} and s.stream.max_millis_behind == 1200
    assert s.stream.lag_reported_at == datetime.fromtimestamp(3, UTC)


def test_status_of_an_empty_lake_and_without_metrics(tmp_path, monkeypatch):
    monkeypatch.delenv("CDCFLOW_AWS_ENDPOINT", raising=False)
    s = st.collect_status(project_in(tmp_path), now=NOW)
    assert all(not t.exists and t.batches == {} and t.quarantined == 0 for t in s.tables)
    assert s.stream.last_batch is None and s.stream.millis_behind == {} and s.unattributed_quarantine == 0
    console = Console(record=True, width=200)
    st.render(s, console)
    text = console.export_text()
    assert "no table" in text and "no committed micro-batch" in text and "--metrics-file" in text


def test_render_shows_every_column(lake):
    s = st.collect_status(project_in(lake), lake / "metrics.jsonl", now=NOW)
    console = Console(record=True, width=220)
    st.render(s, console)
    text = console.export_text()
    row = next(line for line in text.splitlines() if "shop.customers" in line)
    for cell in ("3", "1", "load 1, stream 7", "11-25 11:05:00", "55m", "4s",
                 "2 (+1 wh)"):
        assert cell in row, (cell, row)
    assert "(no table)" in text
    assert "last micro-batch 2" in text and "1 pending" in text and "lag 1200 ms" in text


def test_silver_numbers_fall_back_to_files_then_to_statistics(lake):
    """What status does with a table delta-rs won't read (typeWidening): the files the log lists, or stats."""
    dt = DeltaTable(str(lake / "lake/silver/shop/customers"))
    parts = st._read_files(dt, ["_is_deleted", "_commit_ts", "_ingested_at", "not_there"])
    assert parts is not None and sum(p.num_rows for p in parts) == 4
    rows, deleted, newest, ingested = st._from_stats(dt)
    assert (rows, deleted, newest, ingested) == (4, None, ts(5), ts(30))


def test_age_formatting():
    assert [st.age(x) for x in (None, 0, 42, 61, 3600, 3660 + 59, 86400 * 3 + 3600 * 4 + 5)] == [
        "-", "0s", "42s", "1m 1s", "1h", "1h 1m", "3d 4h"]


def test_cli_json_and_table(lake, capsys):
    assert main(["status", "--json", "--metrics-file", str(lake / "metrics.jsonl"), "--table", "shop.customers"]) == 0
    out = json.loads(capsys.readouterr().out)
    [t] = out["tables"]
    assert t["table"] == "shop.customers" and t["rows"] == 3 and t["batches"] == {"full_load": 1, "stream": 7}
    assert t["freshness_seconds"] > 0 and out["stream"]["max_millis_behind"] == 1200
    assert out["unattributed_quarantine"] == 2
    assert main(["status"]) == 0
    assert "shop.customers" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["status", "--table", "shop.nope"], "unknown table(s): shop.nope"),
    (["status", "--metrics-file", "/nonexistent/m.jsonl"], "metrics file /nonexistent/m.jsonl not found"),
])
def test_cli_user_errors_are_one_line(lake, capsys, argv, message):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_config_error_is_one_line(tmp_path, capsys):
    bad = tmp_path / "configs"
    (bad / "tables").mkdir(parents=True)
    (bad / "pipeline.yaml").write_text("name: x\nkinesis: {shards: -1}\nunknown_key: 1\n")
    assert main(["--config", str(bad), "status"]) == 1
    cap = capsys.readouterr()
    assert "config error" in cap.err and len(cap.err.strip().splitlines()) == 1 and cap.out == ""
    assert "Traceback" not in cap.err


def test_status_shows_the_stream_s_newest_dq_report(tmp_path):
    """The streaming job's DQ report (streaming/dq.py writes it): the newest window's failures per table and
    rule in the table view, the whole report in --json."""
    project = project_in(tmp_path)
    folder = Path(project.path("_reports/dq"))
    folder.mkdir(parents=True)

    def report(start: datetime, first: int, failed: int) -> dict:
        return {"kind": "stream", "stage": "raw_to_staging", "window_start": start.isoformat(),
                "window_end": (start + timedelta(hours=1)).isoformat(),
                "batches": {"first": first, "last": first + 9, "count": 10},
                "tables": [{"table": "shop.customers", "checked": 40, "rules": [
                    {"rule": "country_tidy", "severity": "warn", "failed": failed, "quarantined": 0},
                    {"rule": "not_null", "severity": "quarantine", "failed": 0, "quarantined": 0}]},
                    {"table": "shop.products", "checked": 8, "rules": [
                        {"rule": "price_cap", "severity": "fail", "failed": 5, "quarantined": 8}]}]}

    for start, first, failed in ((T0, 0, 1), (T0 + timedelta(hours=1), 10, 3), (T0 + timedelta(hours=1), 9, 2)):
        (folder / f"stream-{start:%Y%m%dT%H%M%SZ}-{first}.json").write_text(json.dumps(report(start, first, failed)))
    (folder / "20261125T110000Z-abc123.json").write_text("{}")  # a warehouse-merge run's report
    s = st.collect_status(project, now=NOW)
    assert s.dq == report(T0 + timedelta(hours=1), 10, 3)
    console = Console(record=True, width=300)
    st.render(s, console)
    line = next(x for x in console.export_text().splitlines() if x.startswith("stream DQ"))
    assert line == ("stream DQ (raw_to_staging, 11-25 12:00:00 - 11-25 13:00:00 UTC, 10 batches): shop.customers "
                    "country_tidy (warn) 3 of 40; shop.products price_cap (fail) 5 of 8, 8 quarantined")
    assert st.collect_status(project_in(tmp_path / "empty"), now=NOW).dq is None
