"""The demo's pieces (the whole `cdcflow demo` takes 2-3 minutes of Spark: run by `make demo`, not here):
the DMS split delivery to moto, the SCD2 history shown at the end (read from the embedded Postgres), the
summary rendering, the demo's own warehouse schema, and Spark / JVM output kept off the console."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow as pa
import pytest
from rich.console import Console

from cdcflow import demo
from cdcflow.oracle import load_history, resolve_salt
from tests.conftest import REPO
from tests.streaming_helpers import project_in, simulate_to
from tests.test_verify_warehouse import staging_batches


def test_demo_project_uses_its_own_warehouse_schema():
    project = demo.demo_project(str(REPO / "configs"))
    assert project.pipeline.warehouse.schema_ == demo.DEMO_SCHEMA
    assert project.tables  # the rest of the configs unchanged


def test_summary_and_history_rendering(monkeypatch):
    console = Console(record=True, width=160)
    monkeypatch.setattr(demo, "console", console)
    monkeypatch.setattr("cdcflow.cli.console", console)
    demo.render_summary([demo.StepResult("stream", "1 micro-batches, 414 records read", 41.25),
                         demo.StepResult("verify", "ok: 7 checks match", 6.0)], 150.4)
    demo.render_history(("shop.customers", "7", ["customer_id", "email", "valid_from", "valid_to", "is_current"],
                         [(7, "a" * 64, "1900-01-01 00:00:00", "2026-11-25 10:00:01", False),
                          (7, "b", "2026-11-25 10:00:01", None, True)]))
    demo.render_history(None)
    text = console.export_text()
    assert "cdcflow demo summary (150 s)" in text and "41.2s" in text and "ok: 7 checks match" in text
    assert "SCD2 history of shop.customers, key 7: 2 versions" in text
    assert "(full load)" in text and "aaaaaaaaaaaaaaa..." in text and "a" * 19 not in text
    assert "no SCD2 dimension rows in the warehouse" in text


@pytest.mark.stack
def test_deliver_splits_dms_output_like_dms(stack, tmp_path):
    """LOAD files go to S3 (dms.raw_uri), everything else but load records to Kinesis."""
    from cdcflow.aws import project_client
    from cdcflow.sim.run import SimOptions, simulate
    from cdcflow.sim.source import GenOptions

    run = uuid.uuid4().hex[:8]
    project = project_in(tmp_path, CDCFLOW_STREAM=f"demo-test-{run}", CDCFLOW_RAW_URI=f"s3://cdcflow-raw/t-{run}/dms")
    sim = simulate(project, tmp_path / "sim", SimOptions(seed=3, gen=GenOptions(events=60)))
    files, records = demo.deliver(project, sim)

    s3 = project_client(project, "s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="cdcflow-raw", Prefix=f"t-{run}/")["Contents"]]
    assert files == len(keys) == len(project.tables)
    assert all(k.rsplit("/", 1)[-1].startswith("LOAD") for k in keys)
    assert records == sum(r.op != "load" for r in sim.kinesis) and records < len(sim.kinesis)

    k = project_client(project, "kinesis")
    got = 0
    for shard in k.list_shards(StreamName=project.pipeline.kinesis.stream)["Shards"]:
        it = k.get_shard_iterator(StreamName=project.pipeline.kinesis.stream, ShardId=shard["ShardId"],
                                  ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        recs = k.get_records(ShardIterator=it, Limit=10_000)["Records"]
        assert not any(b'"operation": "load"' in r["Data"] for r in recs)
        got += len(recs)
    assert got == records


@pytest.mark.stack
def test_scd2_history_picks_the_key_with_most_versions(stack, tmp_path):
    from batch.warehouse.loader import merge_table

    schema = f"demo_{uuid.uuid4().hex[:8]}"
    project = project_in(tmp_path, CDCFLOW_WAREHOUSE_URL=stack.pg_url)
    sim = tmp_path / "sim"
    simulate_to(project, sim, events=200)
    history = load_history(sim)
    import dataclasses

    wh = project.pipeline.warehouse.model_copy(update={"schema_": schema})
    project = dataclasses.replace(project, pipeline=project.pipeline.model_copy(update={"warehouse": wh}))
    assert demo.scd2_history(project, stack.pg_url) is None  # nothing in this schema yet
    for name, batches in staging_batches(project, history.changes, resolve_salt(project), batches=2).items():
        for rows in batches:
            if rows:
                merge_table(stack.pg_url, project, name, pa.Table.from_pylist(rows))
    got = demo.scd2_history(project, stack.pg_url, limit=50)
    assert got is not None
    table, key, cols, rows = got
    assert cols[-4:] == ["valid_from", "valid_to", "is_current", "is_deleted"]
    assert len(rows) > 1  # a key with history
    # the most versions of any key, in order, the last one open or deleted
    import psycopg

    from batch.warehouse.ddl import model

    m = model(project, table)
    with psycopg.connect(stack.pg_url) as conn:
        most = conn.execute(f'select max(n) from (select count(*) n from {m.dim} '
                            f'where not coalesce(is_inferred, false) group by {m.key[0]}) x').fetchone()[0]
    assert len(rows) == most
    froms = [r[cols.index("valid_from")] for r in rows]
    assert froms == sorted(froms)
    assert all(r[cols.index("valid_to")] is not None for r in rows[:-1])


SPARK_SCRIPT = """
import sys
from cdcflow.runtime import get_spark, stop_spark
spark = get_spark("log-test")
print("ROWS", spark.range(5).count())
print("to stderr", file=sys.stderr)
stop_spark()
"""


@pytest.mark.spark
def test_spark_and_jvm_output_goes_to_the_log_file(tmp_path):
    """With CDCFLOW_SPARK_LOG (what the demo sets) the console gets our own output only."""
    log = tmp_path / "logs" / "spark.log"
    env = {**os.environ, "CDCFLOW_SPARK_LOG": str(log)}
    env.pop("PYSPARK_GATEWAY_PORT", None)
    p = subprocess.run([sys.executable, "-c", SPARK_SCRIPT], env=env, capture_output=True, text=True, timeout=300,
                       cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == "ROWS 5", p.stdout
    assert p.stderr.strip() == "to stderr", p.stderr  # no JVM warnings, no log4j banner, no WARN lines
    text = Path(log).read_text()
    assert "WARN" in text or "WARNING" in text  # the JVM's own lines landed in the file (NativeCodeLoader etc.)
    assert (log.parent / "spark.log.log4j2.properties").exists()
