"""The lake and the checkpoints on an s3:// root, against the embedded moto server (issue 17).

Spark reaches S3 through Hadoop's S3A (the jars `make install` resolves), delta-rs through its object
store; both take the endpoint and credentials from the pipeline config (cdcflow.storage) and both commit
with S3 conditional writes (If-None-Match: *): Spark through cdcflow.delta.S3ConditionalLogStore.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, REPO
from tests.streaming_helpers import FAST_JVM, simulate_to, wait_for

pytestmark = [pytest.mark.stack]

BUCKET = "cdcflow-s3-lake"


def s3_env(run: str) -> dict[str, str]:
    # The stream reads the test's ~150 changes in several micro-batches (20 records per shard each): the
    # signalled restart stops with changes left for the stream after it, and bronze's appends (delta-rs:
    # one file per table and date a batch) leave partitions with several files for compaction to rewrite.
    return {"CDCFLOW_LAKE_ROOT": f"s3://{BUCKET}/{run}/lake", "CDCFLOW_CHECKPOINT_ROOT": f"s3a://{BUCKET}/{run}/ck",
            "CDCFLOW_STREAM": f"s3-lake-{run}", "CDCFLOW_RAW_URI": f"s3://{BUCKET}/{run}/dms",
            "CDCFLOW_KINESIS_MAX_RECORDS_PER_SHARD": "20"}


def s3_project(run: str, schema: str | None = None):
    from cdcflow.aws import bootstrap
    from cdcflow.config import load_project

    project = load_project(CONFIGS, env={**os.environ, **s3_env(run)})
    if schema:  # a warehouse schema of the test's own
        wh = project.pipeline.warehouse.model_copy(update={"schema_": schema})
        project = dataclasses.replace(project, pipeline=project.pipeline.model_copy(update={"warehouse": wh}))
    bootstrap(project)
    return project


def keys(project, prefix: str) -> list[str]:
    from cdcflow.aws import project_client

    s3 = project_client(project, "s3")
    return [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
            for o in page.get("Contents", [])]


def log_versions(project, table_uri: str) -> list[int]:
    prefix = table_uri.split(f"{BUCKET}/", 1)[1].rstrip("/") + "/_delta_log/"
    return sorted(int(k[len(prefix):-5]) for k in keys(project, prefix)
                  if k.endswith(".json") and k[len(prefix):-5].isdigit())


def silver_commits(project) -> dict[str, int]:
    return {name: len(log_versions(project, project.path(t.delta_path))) for name, t in project.tables.items()}


def stream_batches(project, log: str) -> set[str]:
    """The stream's batch ids in its S3 checkpoint's `offsets` (started) or `commits` (finished) log."""
    from streaming.job import checkpoint_location

    ck = checkpoint_location(project).split(f"{BUCKET}/", 1)[1]
    return {k.rsplit("/", 1)[-1] for k in keys(project, f"{ck}/{log}/") if k.rsplit("/", 1)[-1].isdigit()}


def stream_cli(run: str, metrics: Path, **extra_env: str) -> subprocess.Popen:
    """`cdcflow stream` from Kinesis onto the S3 lake, until a signal stops it."""
    env = {**os.environ, **s3_env(run), "JDK_JAVA_OPTIONS": FAST_JVM, **extra_env}
    return subprocess.Popen(
        [sys.executable, "-m", "cdcflow.cli", "stream", "--trigger-seconds", "1",
         "--metrics-file", str(metrics)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


@pytest.mark.spark
def test_sample_pipeline_on_an_s3_lake_with_a_kill_9_and_compaction_beside_the_stream(spark, stack, tmp_path):
    """Full load from S3 -> stream from Kinesis (kill -9 mid-batch; a restart stopped by SIGTERM inside
    the re-run batch, beside a `compact` pass on the same tables; the rest in this process) -> warehouse
    merge -> verify silver, quarantine, the warehouse SCD2 history and facts against the oracle, with the lake
    and the stream's checkpoint on s3:// (moto). The stream processes' JVM starts are most of its time,
    so this one test holds the crash, the signal and the concurrent compaction."""
    import psycopg

    from batch.compaction import compact
    from batch.full_load import run_full_load
    from batch.warehouse_job import merge_from_lake
    from cdcflow.config.models import CompactionThresholds
    from cdcflow.demo import deliver
    from cdcflow.metrics import MetricsSink
    from cdcflow.oracle import build_oracle, load_history, resolve_salt
    from cdcflow.verify import read_actual, verify
    from streaming.job import checkpoint_location, run_stream
    from streaming.sources import kinesis_stream

    run = uuid.uuid4().hex[:8]
    schema = f"s3lake_{run}"
    project = s3_project(run, schema)
    sim = simulate_to(project, tmp_path / "sim", events=160, duplicate_rate=0.05, out_of_order_rate=0.1,
                      malformed_json_rate=0.02)
    _, put = deliver(project, sim)  # DMS's split: LOAD Parquet to S3, the changes to Kinesis

    loaded = run_full_load(spark, project)
    assert loaded.files and loaded.rows
    after_load = silver_commits(project)
    assert all(after_load.values()), after_load  # every silver table is on S3

    # kill -9 as soon as a silver table takes a commit of the stream's first batch: the batch is half
    # applied and not checkpointed. The process does it itself at that point (the processor's test kill
    # point): a kill from here raced the rest of the batch and lost it on a busy machine (CI, session 49).
    metrics = tmp_path / "metrics.jsonl"
    killed_at = tmp_path / "killed-at"
    proc = stream_cli(run, metrics, CDCFLOW_STREAM_TEST_KILL_FILE=str(killed_at))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, out[-3000:])
    assert killed_at.read_text() in project.tables, killed_at.read_text()
    assert any(n > after_load[t] for t, n in silver_commits(project).items())  # a silver table took the batch
    assert stream_batches(project, "offsets") - stream_batches(project, "commits"), "the kill should land inside a batch"

    # The restart re-runs the killed batch; SIGTERM as soon as it commits to silver, so the signal lands
    # inside that batch: the batch finishes (silver, bronze, quarantine, checkpoint) and the process exits
    # cleanly. A `compact` pass (this process) rewrites the same S3 tables beside the rest of that batch:
    # silver by delta-rs and bronze / quarantine by Spark, against the stream's delta-rs commits. Every
    # table qualifies for a rewrite on every pass (its few files are all small).
    for name, t in project.tables.items():
        project.tables[name] = dataclasses.replace(t, compaction=CompactionThresholds(min_small_files=1,
                                                                                       small_file_share=0))
    killed = silver_commits(project)
    restarted = stream_cli(run, metrics)
    # (up to 10 minutes: the whole test took 324-411 s in CI beside the Glue tier; 240 s is too close)
    wait_for(lambda: restarted.poll() is not None or silver_commits(project) != killed, timeout=600, poll=0.1)
    done = stream_batches(project, "commits")
    in_flight = stream_batches(project, "offsets") - done
    restarted.send_signal(signal.SIGTERM)
    beside = restarted.poll() is None
    passes = [compact(spark, project)]
    out, _ = restarted.communicate(timeout=600)
    assert restarted.returncode == 0, out[-3000:]
    assert "Traceback" not in out and "stopping after the current batch" in out, out[-3000:]
    assert beside, "the stream ended before the compaction pass started"
    # The batch in flight at the signal finished; it stopped then (a batch that outlasts the 1 s trigger is
    # followed at once by the next: at most that one ran too), with changes left for the stream below.
    ran = stream_batches(project, "commits") - done
    assert in_flight and in_flight <= ran and len(ran) <= len(in_flight) + 1, (in_flight, ran)

    # The rest of the changes: the same stream in this process (its JVM is warm; a third process would
    # cost another JVM start), until the source has nothing new, then a pass after it.
    summary = run_stream(spark, project, kinesis_stream(spark, project, checkpoint_location(project)),
                         until_caught_up=True, trigger_seconds=1,
                         metrics=MetricsSink(project.pipeline.name, path=str(metrics)))
    assert summary.batches, "the signalled stream should stop with changes left"
    assert not [t for t in summary.tables.values() if t.isolated]
    passes.append(compact(spark, project))
    assert {r.table for p in passes for r in p if r.action == "compacted" and r.files_removed} >= {
        "shop.customers", "bronze"}
    # Bronze holds every record put to Kinesis once: the killed batch re-run and the signalled one were
    # not appended twice, and nothing the signal interrupted is missing.
    bronze = spark.read.format("delta").load(project.path("bronze")).filter("feed = 'stream'")
    assert bronze.count() == put
    stream_metrics = [json.loads(x) for x in metrics.read_text().splitlines() if x.startswith("{")]
    assert not [m for m in stream_metrics if "TableIsolated" in m or "SchemaChangeUnsafe" in m]

    url = project.pipeline.warehouse.url or ""
    try:
        wh = merge_from_lake(spark, project, url)
        assert wh.error is None and sum(t.staged for t in wh.tables), wh.error
        oracle = build_oracle(project, load_history(tmp_path / "sim"), resolve_salt(project), "kinesis")
        bad = [d for d in verify(project, oracle, read_actual(project, spark, warehouse=True)) if not d.ok]
        assert not bad, [(d.table, d.kind, d.missing[:3], d.extra[:3], d.different[:3]) for d in bad]
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'drop schema if exists "{schema}" cascade')

    # Every Spark commit went through the conditional-PUT log store (a data file or a log entry that
    # S3A wrote by rename would show as a temp object).
    assert not [k for k in keys(project, f"{run}/") if "/_delta_log/." in k or ".tmp" in k.rsplit("/", 1)[-1]]


def workers(run: str, table: str, engines: tuple[str, ...], n: int, gate: Path, logstore: str | None = None):
    env = {**os.environ, **s3_env(run), "JDK_JAVA_OPTIONS": FAST_JVM}
    letters = "abcdefgh"[: len(engines)]
    procs = []
    for w, engine in zip(letters, engines, strict=True):
        args = [sys.executable, "-m", "tests.s3_commit_worker", engine, table, w, letters, str(n), str(gate)]
        procs.append(subprocess.Popen([*args, *([logstore] if logstore else [])], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    wait_for(lambda: all(Path(f"{gate}.{w}.ready").exists() for w in letters)
             or any(p.poll() is not None for p in procs), timeout=300)
    gate.write_text("")
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]


@pytest.mark.spark  # the Spark writers run in processes of their own (main tier)
def test_three_processes_commit_to_one_s3_table_at_once(stack, tmp_path):
    """Many small appends from three processes at the same time, two through Spark's log store and one
    through delta-rs: every commit lands once, the log's versions are contiguous, no row is lost or
    doubled, and every pair of writers' commits interleave (Spark against Spark, and each against
    delta-rs: one race for each pair, for the price of two JVM starts rather than four)."""
    import pyarrow as pa
    from deltalake import DeltaTable, write_deltalake

    from cdcflow.storage import rs_options

    run = uuid.uuid4().hex[:8]
    project = s3_project(run)
    table = f"s3://{BUCKET}/{run}/race"
    schema = pa.schema([("writer", pa.string()), ("i", pa.int32())])
    write_deltalake(table, schema.empty_table(), storage_options=rs_options(table))  # version 0
    n = 8
    workers(run, table, ("spark", "spark", "delta-rs"), n, tmp_path / "go")

    versions = log_versions(project, table)
    assert versions == list(range(3 * n + 1))
    dt = DeltaTable(table, storage_options=rs_options(table))
    rows = sorted(zip(*dt.to_pyarrow_table().to_pydict().values(), strict=True))
    assert rows == sorted((w, i) for w in "abc" for i in range(n))
    # Which writer made each commit, in version order: each pair overlapped (its race was real).
    writers = [_writer_of(project, table, v) for v in range(1, 3 * n + 1)]
    for pair in ("ab", "ac", "bc"):
        mine = [w for w in writers if w in pair]
        switches = sum(1 for x, y in zip(mine, mine[1:], strict=False) if x != y)
        assert switches >= 2, (pair, writers)


def _writer_of(project, table: str, version: int) -> str:
    """The writer whose row version `version`'s commit added (from its add action's stats)."""
    from cdcflow.aws import project_client

    key = f"{table.split(f'{BUCKET}/', 1)[1]}/_delta_log/{version:020d}.json"
    body = project_client(project, "s3").get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()
    for line in body.splitlines():
        add = json.loads(line).get("add")
        if add:
            return json.loads(add["stats"])["minValues"]["writer"]
    raise AssertionError(f"no add action in version {version}")


def test_log_store_compiles_against_the_glue_delta_api(tmp_path):
    """The log store jar Glue 5.1 loads (Delta 3.3.2) is built against Delta 4's delta-storage here:
    compile its source against 3.3.2's LogStore API too (the Glue tier's Ivy cache)."""
    import shutil

    from cdcflow.runtime import LOCALFS_SOURCES, cached_delta_jars

    glue_storage = sorted((REPO / ".cache" / "ivy-glue" / "jars").glob("io.delta_delta-storage-3.3.*.jar"))
    javac = shutil.which("javac")
    jars = [j for j in cached_delta_jars() or [] if "awssdk" in j or "hadoop-aws" in j]
    if not glue_storage or not javac or not jars:
        pytest.skip("needs javac, the Glue tier's Ivy cache and the resolved SDK jars (make install-all)")
    import pyspark

    hadoop = sorted((Path(pyspark.__file__).parent / "jars").glob("hadoop-client-api-*.jar"))
    sources = [str(p) for p in (LOCALFS_SOURCES / "cdcflow" / "delta").glob("*.java")]
    cp = os.pathsep.join([str(glue_storage[-1]), *jars, str(hadoop[-1])])
    done = subprocess.run([javac, "--release", "8", "-nowarn", "-cp", cp, "-d", str(tmp_path), *sources],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "cdcflow" / "delta" / "S3ConditionalLogStore.class").exists()


def test_moto_refuses_a_second_conditional_put(stack):
    """What the protocol rests on, checked on the emulator the tests use: PutObject with
    If-None-Match: * stores the object only if the key is new (412 otherwise)."""
    from botocore.exceptions import ClientError

    from cdcflow.aws import client, ensure_bucket

    s3 = client("s3", os.environ["CDCFLOW_AWS_ENDPOINT"], "us-east-1")
    ensure_bucket(s3, BUCKET)
    key = f"{uuid.uuid4().hex}/_delta_log/00000000000000000000.json"
    s3.put_object(Bucket=BUCKET, Key=key, Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"second", IfNoneMatch="*")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"first"


def test_a_held_table_is_checked_against_its_s3_log_entry(stack, monkeypatch):
    """On S3 the check of a table held from the last commit reads its log entry through the lake's
    S3 settings: the next commit opens nothing; a table dropped and created again at the same path
    is opened afresh, and the commit lands on the new table."""
    import pyarrow.compute as pc
    from deltalake import write_deltalake

    from cdcflow.aws import project_client
    from cdcflow.cdc import apply
    from cdcflow.cdc.changes import TableShape
    from cdcflow.storage import rs_options
    from tests.test_apply_rs_commit import _changes, _counting_opens, _rows

    run = uuid.uuid4().hex[:8]
    project = s3_project(run)
    shape = TableShape(project.table("shop.products"))
    path = project.path(shape.table.delta_path)
    assert apply.merge_rows(path, _changes((1, "a", "1001"), (2, "x", "1001")), shape) is None
    opens = _counting_opens(monkeypatch)
    assert apply.merge_rows(path, _changes((1, "b", "1002")), shape) is None
    assert opens == []

    held = apply.rs_table(path).to_pyarrow_table()
    s3 = project_client(project, "s3")
    prefix = path.split(f"{BUCKET}/", 1)[1].rstrip("/") + "/"
    for key in keys(project, prefix):
        s3.delete_object(Bucket=BUCKET, Key=key)
    write_deltalake(apply.rs_uri(path), held.filter(pc.equal(held["product_id"], 2)), storage_options=rs_options(path))
    opens.clear()
    assert apply.merge_rows(path, _changes((3, "n", "1003")), shape) is None
    assert opens == [path]
    assert {r["product_id"]: r["name"] for r in _rows(path)} == {2: "x", 3: "n"}
