"""The raw archiver end to end on the embedded stack: the KCL 3 MultiLangDaemon (amazon-kclpy) reads a
moto Kinesis stream with its leases in moto DynamoDB and writes gzip JSON lines to moto S3.

Every record put is archived at least once and nothing else is; the archiver is killed with SIGKILL
mid-stream and restarted; a shard is split mid-stream; PII is masked in every object; then the archive
is replayed through the streaming processor and silver + quarantine verify against the simulator's
oracle.

Slow (the KCL takes 30-50 s to start and hand out leases; two starts): `make test-archive` runs it,
`make test` does not (CDCFLOW_TEST_TIER=kcl).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from cdcflow.aws import client, ensure_bucket, ensure_stream
from tests.streaming_helpers import project_in, simulate_to, verify_against_oracle

pytestmark = [
    pytest.mark.stack,
    pytest.mark.skipif(os.environ.get("CDCFLOW_TEST_TIER") != "kcl",
                       reason="slow KCL tier: make test-archive (CDCFLOW_TEST_TIER=kcl)"),
]

BUCKET = "cdcflow-archive-test"


def _put(kinesis, stream: str, records, sink: dict, pause: float = 0.0) -> None:
    """put_records in small batches, remembering each record's (shard, sequence number) -> payload."""
    for i in range(0, len(records), 25):
        chunk = records[i:i + 25]
        resp = kinesis.put_records(StreamName=stream, Records=[
            {"Data": r.payload.encode(), "PartitionKey": r.partition_key} for r in chunk])
        assert not resp.get("FailedRecordCount"), resp
        for r, res in zip(chunk, resp["Records"], strict=True):
            sink[(res["ShardId"], res["SequenceNumber"])] = r.payload
        if pause:
            time.sleep(pause)


def _archived(s3, prefix: str) -> tuple[list[dict], int]:
    from cdcflow.archive.records import read_archive_lines

    lines, objects = [], 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            objects += 1
            lines += read_archive_lines(s3.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read())
    return lines, objects


def _wait_for(s3, prefix: str, wanted: set, timeout: float, daemon) -> list[dict]:
    deadline = time.time() + timeout
    while True:
        lines, _ = _archived(s3, prefix)
        if wanted <= {(x["shard_id"], x["sequence_number"]) for x in lines}:
            return lines
        if time.time() > deadline:
            got = {(x["shard_id"], x["sequence_number"]) for x in lines}
            raise AssertionError(f"{len(wanted - got)} of {len(wanted)} records not archived after {timeout:.0f} s")
        assert daemon.poll() is None, "the KCL daemon exited"
        time.sleep(2)


def _kill9(proc) -> None:
    os.killpg(proc.pid, signal.SIGKILL)  # the JVM and its record processors (one session)
    proc.wait()


def test_archiver_archives_every_record_through_kill9_and_reshard_and_replay_verifies(
        stack, spark, tmp_path, monkeypatch):
    from cdcflow.archive.daemon import settings_for, start_daemon, start_h2c_proxy
    from cdcflow.archive.records import mask_payload
    from cdcflow.archive.replay import stage_s3_replay
    from cdcflow.cdc.masking import pii_salt
    from streaming.job import checkpoint_location, run_stream
    from streaming.sources import replay_stream

    stream = "cdc-archive"
    archive_uri = f"s3://{BUCKET}/kinesis-archive"
    env = {"CDCFLOW_STREAM": stream, "CDCFLOW_ARCHIVE_URI": archive_uri,
           "CDCFLOW_LAKE_ROOT": str(tmp_path / "lake"), "CDCFLOW_CHECKPOINT_ROOT": str(tmp_path / "ck")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)  # the daemon's record processors load the configs from the environment
    project = project_in(tmp_path, CDCFLOW_STREAM=stream, CDCFLOW_AWS_ENDPOINT=stack.aws_endpoint)
    sim = simulate_to(project, tmp_path / "sim", events=300, duplicate_rate=0.03, out_of_order_rate=0.05,
                      malformed_json_rate=0.02, pk_change_rate=0.02)
    records = sim.kinesis
    kinesis = client("kinesis", stack.aws_endpoint, "us-east-1")
    s3 = client("s3", stack.aws_endpoint, "us-east-1")
    ensure_stream(kinesis, stream, 2)
    ensure_bucket(s3, BUCKET)
    put: dict[tuple[str, str], str] = {}
    third = len(records) // 3
    _put(kinesis, stream, records[:third], put)

    proxy, h2c = start_h2c_proxy(stack.aws_endpoint)
    settings = settings_for(project, archive_uri, application="cdc-archive-test", shard_sync_millis=1000,
                            failover_millis=5000, idle_millis=500, max_records=40)
    settings.kinesis_endpoint = h2c
    work = tmp_path / "archiver"
    started = time.time()
    daemon = start_daemon(settings, str(Path(project.pipeline_file).parent), work, tmp_path / "daemon-1.log")
    prefix = f"kinesis-archive/{stream}/"
    try:
        _wait_for(s3, prefix, set(put), 180, daemon)
        first_start = time.time() - started
        # kill -9 mid-stream: records keep arriving while the archiver is killed
        sender = threading.Thread(target=_put, args=(kinesis, stream, records[third:2 * third], put, 0.3))
        sender.start()
        time.sleep(3)
        _kill9(daemon)
        sender.join()
        # restart (a new worker: the dead one's leases expire after failoverTimeMillis), then reshard
        daemon = start_daemon(settings, str(Path(project.pipeline_file).parent), work, tmp_path / "daemon-2.log")
        shards = kinesis.list_shards(StreamName=stream)["Shards"]
        parent = shards[0]
        lo, hi = int(parent["HashKeyRange"]["StartingHashKey"]), int(parent["HashKeyRange"]["EndingHashKey"])
        kinesis.split_shard(StreamName=stream, ShardToSplit=parent["ShardId"], NewStartingHashKey=str((lo + hi) // 2))
        _put(kinesis, stream, records[2 * third:], put)
        # moto keeps routing puts to the closed parent (its get_shard_for_key does not skip closed shards)
        # and never ends a shard's iterator, so the children stay empty here: the split checks that the
        # archiver goes on without a gap. A reshard with records in the children runs on LocalStack's
        # Kinesis (tests/test_localstack_host.py).
        lines = _wait_for(s3, prefix, set(put), 240, daemon)
    finally:
        if daemon.poll() is None:
            os.killpg(daemon.pid, signal.SIGTERM)
            daemon.wait(30)
        os.killpg(proxy.pid, signal.SIGTERM)

    # at least once, nothing extra, every line the masked form of the record put at its position
    keys = [(x["shard_id"], x["sequence_number"]) for x in lines]
    assert set(keys) == set(put)
    salt = pii_salt(project)
    for x in lines:
        assert x["data"] == mask_payload(put[(x["shard_id"], x["sequence_number"])].encode(), project, salt)
    # PII never reaches the archive: no simulated email, phone or shipping phone appears in it
    raw = "\n".join(x["data"] for x in lines)
    for payload in put.values():
        try:
            data = json.loads(payload).get("data") or {}
        except ValueError:
            continue
        for col in ("email", "phone", "shipping_phone"):
            if data.get(col):
                assert json.dumps(data[col]) not in raw, col
    # the lease table: each shard is checkpointed at the last record put on it (moto: the parent
    # never ends, so the split's children get no leases; see above)
    ddb = client("dynamodb", stack.aws_endpoint, "us-east-1")
    leases = {i["leaseKey"]["S"]: i.get("checkpoint", {}).get("S")
              for i in ddb.scan(TableName="cdc-archive-test")["Items"]}
    last = {}
    for shard, seq in put:
        last[shard] = max(last.get(shard, 0), int(seq))
    assert {s: int(c) for s, c in leases.items()} == last, (leases, last)

    print(f"archiver: first start to fully archived {first_start:.0f} s; {len(put)} records put, "
          f"{len(lines)} archived ({len(lines) - len(set(keys))} redelivered after the kill)")

    # replay the archive (downloaded from S3) through the streaming processor, then verify
    local = stage_s3_replay(project, f"{archive_uri}/{stream}/", tmp_path / "staged")
    assert list(local.rglob("*.jsonl.gz"))
    ck = checkpoint_location(project, "replay")
    run_stream(spark, project, replay_stream(spark, str(local), 1000), until_caught_up=True, available_now=True,
               checkpoint=ck)
    # the archive holds `hash` columns hashed already; the replay keeps them so (no workaround: issue #20)
    bad = [d for d in verify_against_oracle(spark, project, tmp_path / "sim") if not d.ok]
    assert not bad, [(d.table, d.kind, d.missing[:3], d.extra[:3], d.different[:3]) for d in bad]


def test_a_batch_written_but_not_checkpointed_is_archived_again(stack, tmp_path, monkeypatch):
    """At least once, deterministically: a record processor dies after writing a batch and before
    checkpointing it (the processor's test crash point). The MultiLangDaemon shuts down when a record
    processor dies ("Child process exited ... will initiate shutdown"), so the archiver exits non-zero;
    restarted (as ECS restarts the task), it resumes from the last checkpoint: that batch is archived
    again and nothing is missing. No Spark."""
    from cdcflow.archive.daemon import settings_for, start_daemon, start_h2c_proxy

    stream, archive_uri = "cdc-archive-crash", f"s3://{BUCKET}/crash"
    crash = tmp_path / "crashed"
    for k, v in {"CDCFLOW_STREAM": stream, "CDCFLOW_ARCHIVE_URI": archive_uri,
                 "CDCFLOW_ARCHIVE_TEST_CRASH_FILE": str(crash)}.items():
        monkeypatch.setenv(k, v)
    project = project_in(tmp_path, CDCFLOW_STREAM=stream, CDCFLOW_AWS_ENDPOINT=stack.aws_endpoint)
    records = simulate_to(project, tmp_path / "sim", events=120).kinesis
    kinesis = client("kinesis", stack.aws_endpoint, "us-east-1")
    s3 = client("s3", stack.aws_endpoint, "us-east-1")
    ensure_stream(kinesis, stream, 1)
    ensure_bucket(s3, BUCKET)
    put: dict[tuple[str, str], str] = {}
    _put(kinesis, stream, records, put)
    proxy, h2c = start_h2c_proxy(stack.aws_endpoint)
    settings = settings_for(project, archive_uri, application="cdc-archive-crash", shard_sync_millis=1000,
                            failover_millis=5000, idle_millis=500, max_records=30)
    settings.kinesis_endpoint = h2c
    daemon = start_daemon(settings, str(Path(project.pipeline_file).parent), tmp_path / "archiver",
                          tmp_path / "daemon.log")
    try:
        assert daemon.wait(180) != 0  # the processor died at the crash point; the daemon followed
        assert crash.exists(), "the crash point was reached"
        daemon = start_daemon(settings, str(Path(project.pipeline_file).parent), tmp_path / "archiver",
                              tmp_path / "daemon-2.log")
        lines = _wait_for(s3, f"crash/{stream}/", set(put), 240, daemon)
    finally:
        if daemon.poll() is None:
            os.killpg(daemon.pid, signal.SIGTERM)
            daemon.wait(30)
        os.killpg(proxy.pid, signal.SIGTERM)
    keys = [(x["shard_id"], x["sequence_number"]) for x in lines]
    assert set(keys) == set(put)
    # the batch written before the crash was not checkpointed, so the restarted archiver got it again
    # and wrote it again, to the same key (same records, same bytes: no duplicate object)
    crashed_key = crash.read_text()
    assert f"/{crashed_key}" in (tmp_path / "daemon-2.log").read_text(), crashed_key
    ddb = client("dynamodb", stack.aws_endpoint, "us-east-1")
    (lease,) = ddb.scan(TableName="cdc-archive-crash")["Items"]
    assert int(lease["checkpoint"]["S"]) == max(int(seq) for _, seq in put)
