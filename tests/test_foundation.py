"""CLI behaviour, docker-compose consistency, the local stack, and the Spark + Delta runtime."""

from __future__ import annotations

import subprocess
import sys
from urllib.parse import urlparse

import pytest
import yaml

from cdcflow.cli import main
from cdcflow.config import load_project
from tests.conftest import CONFIGS, REPO


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cdcflow.cli", *args], capture_output=True, text=True, cwd=REPO)


def test_validate_ok_and_help():
    r = run_cli("validate", "--no-spark")  # the transforms' sample-frame check: test_transforms.py
    assert r.returncode == 0 and "4 tables valid" in r.stdout
    for sub in ("validate", "local"):
        assert run_cli(sub, "--help").returncode == 0


def test_user_error_is_one_line_without_traceback(tmp_path):
    r = run_cli("--config", str(tmp_path), "validate")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert lines[0].endswith("pipeline.yaml: file not found")


def test_validate_lists_every_problem(tmp_path, capsys):
    import shutil

    shutil.copytree(CONFIGS, tmp_path / "c")
    (tmp_path / "c" / "tables" / "shop.orders.yaml").write_text("source: {schema: shop, table: orders}\nbogus: 1\n")
    assert main(["--config", str(tmp_path / "c"), "validate"]) == 1
    err = capsys.readouterr().err
    assert "bogus: unknown key" in err and "columns: Field required" in err and "primary_key: Field required" in err
    assert "3 problem(s) found" in err


def test_docker_compose_matches_configs():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"localstack", "postgres"}
    ls = services["localstack"]
    assert "127.0.0.1:4566:4566" in ls["ports"]
    assert set(ls["environment"]["SERVICES"].split(",")) >= {"kinesis", "s3", "dynamodb", "cloudwatch"}
    # The warehouse URL the configs default to must reach compose's Postgres unchanged.
    project = load_project(CONFIGS, env={})
    url = urlparse(project.pipeline.warehouse.url)
    pg = services["postgres"]
    assert f"127.0.0.1:{url.port}:5432" in pg["ports"]
    env = pg["environment"]
    assert (env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"]) == (
        url.username, url.password, url.path.lstrip("/"))
    # And switching the endpoint variable points the configs at LocalStack.
    switched = load_project(CONFIGS, env={"CDCFLOW_AWS_ENDPOINT": "http://127.0.0.1:4566"})
    assert switched.pipeline.aws.endpoint_url == "http://127.0.0.1:4566"


@pytest.mark.stack
def test_local_stack_kinesis_s3_postgres_for_real(stack):
    from cdcflow.aws import client, ensure_bucket, ensure_stream

    kinesis = client("kinesis", stack.aws_endpoint, "us-east-1")
    ensure_stream(kinesis, "smoke", 1)
    kinesis.put_record(StreamName="smoke", Data=b'{"hello": 1}', PartitionKey="k")
    shard = kinesis.list_shards(StreamName="smoke")["Shards"][0]["ShardId"]
    it = kinesis.get_shard_iterator(StreamName="smoke", ShardId=shard, ShardIteratorType="TRIM_HORIZON")
    records = kinesis.get_records(ShardIterator=it["ShardIterator"])["Records"]
    assert [r["Data"] for r in records] == [b'{"hello": 1}']

    s3 = client("s3", stack.aws_endpoint, "us-east-1")
    ensure_bucket(s3, "smoke-bucket")
    s3.put_object(Bucket="smoke-bucket", Key="a/b.txt", Body=b"payload")
    assert s3.get_object(Bucket="smoke-bucket", Key="a/b.txt")["Body"].read() == b"payload"

    import psycopg

    with psycopg.connect(stack.pg_url) as conn:
        assert conn.execute("select 40 + 2").fetchone() == (42,)


@pytest.mark.stack
def test_local_stack_up_is_idempotent_and_down_leaves_nothing(tmp_path):
    from cdcflow import localstack
    from tests.conftest import free_port

    s = localstack.StackSettings(state_dir=tmp_path / "st", moto_port=free_port(), pg_port=free_port())
    first = localstack.up(s)
    again = localstack.up(s)
    assert first == again  # same PIDs: nothing restarted
    st = localstack.status(s)
    assert st["moto"]["running"] and st["postgres"]["running"]
    localstack.down(s)
    assert not localstack._alive(first["moto"]["pid"])
    assert not localstack._alive(first["postgres"]["pid"])
    assert not localstack._port_open(s.moto_port) and not localstack._port_open(s.pg_port)
    assert not s.state_file.exists()


@pytest.mark.spark
def test_spark_delta_round_trip_on_pinned_versions(spark, tmp_path):
    from importlib.metadata import version

    from cdcflow.demo import spark_delta_smoke

    assert spark.version == version("pyspark")
    assert spark.conf.get("spark.sql.ansi.enabled") == "false"
    assert spark_delta_smoke(str(tmp_path / "t")) == 3
    history = spark.sql(f"describe history delta.`{tmp_path / 't'}`").collect()
    assert [h.operation for h in sorted(history, key=lambda h: h.version)] == ["WRITE", "MERGE"]


@pytest.mark.spark
@pytest.mark.glue_compat
def test_glue_mode_pins_the_sql_settings_the_jobs_are_tested_with(spark, monkeypatch):
    """On Glue the session is Glue's: get_spark(mode="glue") sets SESSION_SQL_CONF on it (whole-stage
    codegen off for every job, as in local sessions), instead of each job setting what it needs."""
    from cdcflow import runtime

    monkeypatch.setattr(runtime, "_session", None)  # as in a fresh Glue job: the session is not ours yet
    before = {k: spark.conf.get(k) for k in runtime.SESSION_SQL_CONF}
    assert before == runtime.SESSION_SQL_CONF  # local sessions are created with them
    spark.conf.set("spark.sql.codegen.wholeStage", "true")  # Spark's default, as Glue starts
    spark.conf.set("spark.sql.session.timeZone", "America/New_York")
    try:
        assert runtime.get_spark(mode="glue") is spark
        assert {k: spark.conf.get(k) for k in runtime.SESSION_SQL_CONF} == runtime.SESSION_SQL_CONF
    finally:
        for k, v in before.items():
            spark.conf.set(k, v)


@pytest.mark.spark
@pytest.mark.glue_compat
def test_materialize_keeps_rows_once_and_release_frees_them(spark):
    from cdcflow.runtime import materialize, release

    sc = spark.sparkContext._jsc.sc()
    before = sc.getPersistentRDDs().size()
    df = materialize(spark.range(100).selectExpr("id", "rand() AS r"))  # non-deterministic: kept rows only
    assert sc.getPersistentRDDs().size() == before + 1
    assert df.collect() == df.collect()  # the same rows each time, not recomputed
    release(df)
    assert sc.getPersistentRDDs().size() == before


@pytest.mark.spark
@pytest.mark.glue_compat
def test_sql_in_says_what_isin_says(spark):
    """runtime.sql_in (one SQL expression for a long IN list) against Column.isin, on names that need
    quoting, nulls and an empty list."""
    from pyspark.sql import functions as F

    from cdcflow.runtime import sql_in

    values = ["shop.customers", "o'brien.t", "back\\slash", "tab\tbed", "x"]
    df = spark.createDataFrame([(v,) for v in [*values, "shop.customer", "other", None]], "t string")
    for subset in (values, values[:1], []):
        got = [r[0] for r in df.select(sql_in("t", subset)).collect()]
        assert got == [r[0] for r in df.select(F.col("t").isin(subset)).collect()], subset
    assert [r[0] for r in df.select(sql_in("t", values)).collect()][:6] == [True] * 5 + [False]


@pytest.mark.spark
@pytest.mark.glue_compat
def test_reading_silver_back_leaves_no_table_in_deltas_cache(spark, tmp_path):
    """Each table read keeps ~2.5 MB of driver heap in Delta's DeltaLog cache; verify over 1000 tables
    must not keep them (tests/test_streaming_scale.py ran out of heap before). read_silver reads by
    delta-rs (nothing enters Spark's cache); its Spark fallback forgets each table it read."""
    from cdcflow.actual import _spark_rows, read_silver
    from tests.streaming_helpers import project_in

    project = project_in(tmp_path)
    paths = [project.path(t.delta_path) for t in list(project.tables.values())[:2]]
    for path in paths:
        spark.range(3).selectExpr("id AS k").write.format("delta").save(path)
    delta_log = getattr(getattr(spark.sparkContext._jvm.org.apache.spark.sql.delta, "DeltaLog$"), "MODULE$")
    cached = delta_log.cacheSize()  # the two tables just written are in the cache
    rows = read_silver(spark, project)
    assert sorted(len(r) for r in rows.values())[-2:] == [3, 3]
    assert delta_log.cacheSize() == cached  # the tables never written were not added either
    assert len(_spark_rows(spark, paths[0])) == 3
    assert delta_log.cacheSize() == cached - 1  # the Spark read forgot the table it read
    spark.read.format("delta").load(paths[0]).count()
    assert delta_log.cacheSize() == cached  # a plain read is cached again


@pytest.mark.spark
@pytest.mark.glue_compat
def test_verify_reads_silver_and_quarantine_without_starting_spark(spark, tmp_path):
    """`cdcflow verify` reads through delta-rs (tables Spark wrote, on either runtime) and asks for a
    Spark session only when delta-rs can't read a table: no JVM start for a plain lake. Quarantine
    counts one row per (table, rule, record) of the raw -> staging stage."""
    from cdcflow.verify import read_actual
    from tests.streaming_helpers import project_in

    project = project_in(tmp_path)
    silver = project.path(project.table("shop.customers").delta_path)
    spark.range(4).selectExpr("id AS customer_id").write.format("delta").save(silver)
    quarantine = [("shop.orders", "not_null", "order_id is null", "h1"),
                  ("shop.orders", "not_null", "order_id is null", "h1"),  # the same record delivered twice
                  ("shop.orders", "range", "total_amount < 0", "h2"),
                  ("shop.customers", "not_null", "staging_to_dimension: email is null", "h3")]  # a later stage
    spark.createDataFrame(quarantine, "table string, rule string, reason string, record_hash string") \
        .write.format("delta").save(project.path("quarantine"))

    def no_spark():
        raise AssertionError("verify started Spark for tables delta-rs reads")

    actual = read_actual(project, no_spark)
    assert len(actual.current["shop.customers"]) == 4
    assert actual.current["shop.orders"] == []  # not written yet: no rows, no error
    assert sorted((r["table"], r["rule"]) for r in actual.quarantine) == [
        ("shop.orders", "not_null"), ("shop.orders", "range")]
