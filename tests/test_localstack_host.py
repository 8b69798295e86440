"""The pipeline against a real LocalStack, started in host mode (no Docker) from its own venv.

`make test-localstack` installs LocalStack (.cache/venv-localstack, Python 3.13) and runs this module
(CDCFLOW_TEST_TIER=localstack). The configs point at it the way a user would: CDCFLOW_AWS_ENDPOINT.
The `cdcflow` commands run as the user runs them: simulate into LocalStack's Kinesis -> stream ->
verify; simulate to LocalStack's S3 -> full-load -> verify. LocalStack is stopped afterwards and the
test checks that its port is closed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port

pytestmark = pytest.mark.skipif(os.environ.get("CDCFLOW_TEST_TIER") != "localstack",
                                reason="LocalStack tier: make test-localstack (CDCFLOW_TEST_TIER=localstack)")

CLI = [sys.executable, "-m", "cdcflow.cli"]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def localstack(tmp_path_factory):
    """LocalStack (Kinesis, S3) in host mode on a free port; stopped afterwards, nothing left running."""
    python = os.environ.get("CDCFLOW_LOCALSTACK_PYTHON", str(REPO / ".cache" / "venv-localstack" / "bin" / "python"))
    assert Path(python).exists(), "LocalStack's venv is installed by `make test-localstack`"
    port = free_port()
    work = tmp_path_factory.mktemp("localstack")
    log = open(work / "localstack.log", "wb")  # noqa: SIM115 - closed below
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PYTHON"))}
    env.update({
        "GATEWAY_LISTEN": f"127.0.0.1:{port}",
        "GATEWAY_SERVER": "hypercorn",  # the twisted server needs service_identity, which the runtime extra lacks
        "SERVICES": "kinesis,s3",
        "LOCALSTACK_VOLUME_DIR": str(work / "volume"),
        "AWS_DEFAULT_REGION": "us-east-1",
        "SKIP_SSL_CERT_DOWNLOAD": "1",
        "DISABLE_EVENTS": "1",  # no analytics calls home
    })
    proc = subprocess.Popen([python, "-m", "localstack.runtime.main"], stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=work, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            health = json.load(urllib.request.urlopen(f"{endpoint}/_localstack/health", timeout=2))
            if all(health["services"].get(s) in ("available", "running") for s in ("kinesis", "s3")):
                break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            log.close()
            pytest.fail(f"LocalStack did not start: {(work / 'localstack.log').read_text()[-3000:]}")
        time.sleep(1)
    yield endpoint
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    log.close()
    for _ in range(50):
        if not _port_open(port):
            break
        time.sleep(0.1)
    assert not _port_open(port), "LocalStack still listens after stopping"


def _run(args: list[str], env: dict[str, str], timeout: int = 600) -> str:
    out = subprocess.run(CLI + args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"cdcflow {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def test_kinesis_stream_and_s3_full_load_against_localstack_verify(localstack, tmp_path):
    base = {**os.environ, "CDCFLOW_AWS_ENDPOINT": localstack, "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
            # short-lived JVMs: C1 only (C2's compile threads took the cores the other lane's tests need)
            "JDK_JAVA_OPTIONS": "-XX:TieredStopAtLevel=1"}
    sim = tmp_path / "sim"

    # Kinesis: simulate onto LocalStack's stream (kinesis-mock), stream until caught up, verify
    k_env = {**base, "CDCFLOW_STREAM": "cdc-localstack", "CDCFLOW_LAKE_ROOT": str(tmp_path / "lake-kinesis"),
             "CDCFLOW_CHECKPOINT_ROOT": str(tmp_path / "ck-kinesis"), "CDCFLOW_RAW_URI": "s3://cdcflow-ls-raw/dms"}
    out = _run(["simulate", "--out", str(sim), "--events", "300", "--seed", "11", "--duplicate-rate", "0.03",
                "--out-of-order-rate", "0.05", "--malformed-json-rate", "0.01", "--kinesis", "--s3"], k_env)
    assert "sent" in out
    _run(["stream", "--until-caught-up", "--trigger-seconds", "1"], k_env)
    print(_run(["verify", "--history", str(sim), "--target", "kinesis"], k_env))

    # S3: the DMS Parquet files simulate uploaded to LocalStack's S3 -> full load -> verify
    s_env = {**base, "CDCFLOW_LAKE_ROOT": str(tmp_path / "lake-s3"), "CDCFLOW_CHECKPOINT_ROOT": str(tmp_path / "ck-s3"),
             "CDCFLOW_RAW_URI": "s3://cdcflow-ls-raw/dms"}
    _run(["full-load"], s_env)
    print(_run(["verify", "--history", str(sim), "--target", "s3"], s_env))


def test_archiver_through_a_real_reshard_on_localstack_kinesis(localstack, tmp_path, monkeypatch):
    """The KCL archiver against LocalStack's Kinesis (kinesis-mock: a split closes the parent, new
    records go to the children, the parent's iterator ends), with its lease table on the embedded moto
    server (LocalStack's DynamoDB needs a Java 21 it downloads at first use; see the README). Every
    record is archived, the children's records included, and the parent is checkpointed at SHARD_END."""
    from cdcflow import localstack as embedded
    from cdcflow.archive.daemon import settings_for, start_daemon
    from cdcflow.archive.records import read_archive_lines
    from cdcflow.aws import client, ensure_bucket, ensure_stream
    from tests.streaming_helpers import project_in, simulate_to

    moto = embedded.StackSettings(state_dir=tmp_path / "moto", moto_port=free_port(), pg_port=free_port())
    moto.state_dir.mkdir()
    moto_pid = embedded._start_moto(moto)
    stream, bucket = "cdc-ls-archive", "cdcflow-ls-archive"
    env = {"CDCFLOW_STREAM": stream, "CDCFLOW_AWS_ENDPOINT": localstack, "CDCFLOW_ARCHIVE_URI": f"s3://{bucket}/arch",
           "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    daemon = None
    try:
        project = project_in(tmp_path, **env)
        records = simulate_to(project, tmp_path / "sim", events=150, duplicate_rate=0.03).kinesis
        kinesis = client("kinesis", localstack, "us-east-1")
        s3 = client("s3", localstack, "us-east-1")
        ensure_stream(kinesis, stream, 2)
        ensure_bucket(s3, bucket)
        put: dict[tuple[str, str], str] = {}

        def send(chunk):
            for i in range(0, len(chunk), 25):
                part = chunk[i:i + 25]
                resp = kinesis.put_records(StreamName=stream, Records=[
                    {"Data": r.payload.encode(), "PartitionKey": r.partition_key} for r in part])
                assert not resp.get("FailedRecordCount"), resp
                for r, res in zip(part, resp["Records"], strict=True):
                    put[(res["ShardId"], res["SequenceNumber"])] = r.payload

        def archived() -> set:
            keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="arch/")
                    for o in page.get("Contents", [])]
            lines = [x for k in keys for x in read_archive_lines(s3.get_object(Bucket=bucket, Key=k)["Body"].read())]
            return {(x["shard_id"], x["sequence_number"]) for x in lines}

        def wait_all(timeout: float) -> None:
            deadline = time.time() + timeout
            while not set(put) <= archived():
                assert daemon.poll() is None, "the KCL daemon exited"
                assert time.time() < deadline, f"{len(set(put) - archived())} of {len(put)} records not archived"
                time.sleep(2)

        half = len(records) // 2
        send(records[:half])
        settings = settings_for(project, env["CDCFLOW_ARCHIVE_URI"], application="ls-archive-test",
                                shard_sync_millis=1000, failover_millis=5000, idle_millis=500, max_records=40)
        settings.dynamodb_endpoint = moto.aws_endpoint
        daemon = start_daemon(settings, str(Path(project.pipeline_file).parent), tmp_path / "archiver",
                              tmp_path / "daemon.log")
        wait_all(180)
        shards = kinesis.list_shards(StreamName=stream)["Shards"]
        parent = shards[0]
        lo, hi = int(parent["HashKeyRange"]["StartingHashKey"]), int(parent["HashKeyRange"]["EndingHashKey"])
        kinesis.split_shard(StreamName=stream, ShardToSplit=parent["ShardId"], NewStartingHashKey=str((lo + hi) // 2))
        for _ in range(60):
            if kinesis.describe_stream_summary(StreamName=stream)["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE":
                break
            time.sleep(0.5)
        send(records[half:])
        children = {s for s, _ in put} - {s["ShardId"] for s in shards}
        assert children, "records after the split went to the children"
        wait_all(180)
        assert {s for s, _ in archived()} >= children
        ddb = client("dynamodb", moto.aws_endpoint, "us-east-1")
        leases = {i["leaseKey"]["S"]: i.get("checkpoint", {}).get("S") for i in ddb.scan(TableName="ls-archive-test")["Items"]}
        assert leases.get(parent["ShardId"]) in (None, "SHARD_END"), leases  # ended (or cleaned up once its children ran)
    finally:
        if daemon is not None and daemon.poll() is None:
            os.killpg(daemon.pid, signal.SIGTERM)
            daemon.wait(30)
        os.killpg(moto_pid, signal.SIGTERM)
