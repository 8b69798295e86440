"""The raw archiver's record handling, without the KCL or Spark (fast; part of `make test`): masking by
the table configs, the object layout, and checkpointing only after the object is written."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest

# The Glue tier's venv has no KCL (the archiver is not a Glue job): skip there, run in the main tier.
pytest.importorskip("amazon_kclpy")

from cdcflow.archive.processor import ArchiveProcessor  # noqa: E402
from cdcflow.archive.records import (
    MALFORMED_MARKER,
    RawRecord,
    archive_line,
    mask_payload,
    object_key,
    read_archive_lines,
)
from cdcflow.cdc.masking import REDACTED
from cdcflow.config import load_project
from tests.conftest import CONFIGS

SALT = "s"


@pytest.fixture(scope="module")
def project():
    return load_project(CONFIGS)


def _record(table: str, data: dict, **extra) -> bytes:
    schema, name = table.split(".")
    return json.dumps({"data": data, "metadata": {"schema-name": schema, "table-name": name,
                                                  "record-type": "data", "operation": "update"}, **extra}).encode()


def test_pii_is_masked_by_the_table_configs_and_the_rest_kept(project):
    out = json.loads(mask_payload(_record("shop.customers", {"customer_id": 7, "email": "a@b.c", "phone": "555",
                                                             "country": "DE"},
                                          **{"before-image": {"customer_id": 6, "email": "old@b.c"}}),
                                  project, SALT))
    assert out["data"] == {"customer_id": 7, "email": hashlib.sha256(b"s|a@b.c").hexdigest(), "phone": REDACTED,
                           "country": "DE"}
    assert out["before-image"] == {"customer_id": 6, "email": hashlib.sha256(b"s|old@b.c").hexdigest()}
    assert out["metadata"]["table-name"] == "customers"
    orders = json.loads(mask_payload(_record("shop.orders", {"order_id": 1, "shipping_phone": "555", "status": "x"}),
                                     project, SALT))
    assert orders["data"] == {"order_id": 1, "status": "x"}  # drop: the column leaves the record


def test_unconfigured_tables_are_fully_redacted_and_nulls_stay_null(project):
    out = json.loads(mask_payload(_record("other.t", {"id": 1, "secret": "x", "n": None}), project, SALT))
    assert out["data"] == {"id": REDACTED, "secret": REDACTED, "n": None}
    out = json.loads(mask_payload(_record("shop.customers", {"customer_id": 1, "email": None}), project, SALT))
    assert out["data"]["email"] is None


def test_a_malformed_record_is_withheld_but_stays_distinct_and_malformed(project):
    raw = b'{"data": {"email": "leak@x"'  # truncated JSON holding PII
    out = mask_payload(raw, project, SALT)
    assert "leak" not in out and out == MALFORMED_MARKER + hashlib.sha256(raw).hexdigest()
    with pytest.raises(ValueError):
        json.loads(out)  # the stream quarantines it as malformed_json, as it would the original
    assert mask_payload(b"[1, 2]", project, SALT).startswith(MALFORMED_MARKER)  # JSON, but not a record


def test_object_key_partitions_by_the_first_arrival_hour_and_names_the_sequence_range():
    recs = [RawRecord("shardId-000000000001", "100", 0, "k", 1_764_633_600_000 + 3_600_000 * 5, b"{}"),
            RawRecord("shardId-000000000001", "105", 0, "k", 1_764_633_600_000 + 3_600_000 * 6, b"{}")]
    assert object_key("arch/", "s", recs) == (
        "arch/s/year=2025/month=12/day=02/hour=05/shardId-000000000001-100-105.jsonl.gz")


class _S3:
    def __init__(self, fail: int = 0):
        self.objects: dict[str, bytes] = {}
        self.fail = fail
        self.log: list[str] = []

    def put_object(self, Bucket, Key, Body, **_):  # noqa: N803 - boto3's names
        if self.fail:
            self.fail -= 1
            raise ConnectionError("boom")
        self.objects[Key] = Body
        self.log.append("put")


class _Checkpointer:
    def __init__(self, s3):
        self.s3, self.calls = s3, []

    def checkpoint(self, seq=None, sub=None):
        self.calls.append(seq)
        self.s3.log.append("checkpoint")


class _Input:
    def __init__(self, records, checkpointer):
        self.records, self.checkpointer = records, checkpointer


class _KclRecord:
    def __init__(self, seq, data: bytes):
        self.sequence_number, self.sub_sequence_number, self.partition_key = seq, 0, "shop.customers"
        self.timestamp_millis = 1_764_633_600_000
        self.binary_data = base64.b64decode(base64.b64encode(data))


class _Init:
    shard_id = "shardId-000000000000"


def test_a_batch_is_written_before_it_is_checkpointed_and_a_failed_write_is_not_checkpointed(project, monkeypatch):
    monkeypatch.setattr("time.sleep", lambda _s: None)
    s3 = _S3(fail=2)  # two transient failures, then the PUT succeeds: retried, then checkpointed
    proc = ArchiveProcessor(project, s3, "b", "arch", "stream", SALT)
    proc.initialize(_Init())
    cp = _Checkpointer(s3)
    recs = [_KclRecord(str(n), _record("shop.customers", {"customer_id": n, "email": f"{n}@x"})) for n in (1, 2, 3)]
    proc.process_records(_Input(recs, cp))
    assert s3.log == ["put", "checkpoint"] and cp.calls == ["3"]
    (key,) = s3.objects
    lines = read_archive_lines(s3.objects[key])
    assert [(x["shard_id"], x["sequence_number"]) for x in lines] == [("shardId-000000000000", s) for s in "123"]
    assert all("@x" not in x["data"] for x in lines)

    s3_down = _S3(fail=100)
    proc = ArchiveProcessor(project, s3_down, "b", "arch", "stream", SALT)
    proc.initialize(_Init())
    cp = _Checkpointer(s3_down)
    with pytest.raises(ConnectionError):
        proc.process_records(_Input(recs, cp))
    assert cp.calls == []  # nothing checkpointed: the KCL redelivers the batch to the next processor


def test_archive_line_keeps_shard_sequence_and_arrival(project):
    text = archive_line(RawRecord("shardId-1", "42", 0, "pk", 1234, b"{}"), project, SALT)
    assert text.startswith('{"shard_id":')  # how streaming.sources.from_replay tells archive lines apart
    line = json.loads(text)
    assert (line["shard_id"], line["sequence_number"], line["arrival_ms"], line["partition_key"]) == (
        "shardId-1", "42", 1234, "pk")


def test_archive_lines_name_the_columns_they_hold_hashed(project):
    """`hashed` tells the replay which values not to hash again (cdcflow.cdc.masking): the table's `hash`
    columns; absent for tables without any, unconfigured tables (redacted) and withheld records."""
    def line(data: bytes) -> dict:
        return json.loads(archive_line(RawRecord("shardId-1", "42", 0, "pk", 1234, data), project, SALT))

    assert line(_record("shop.customers", {"customer_id": 7, "email": "a@b.c"}))["hashed"] == ["email"]
    for data in (_record("shop.orders", {"order_id": 1}), _record("other.t", {"id": 1}), b"not json"):
        assert "hashed" not in line(data)


def test_the_daemon_properties_use_polling_and_the_emulator_endpoints(project):
    from cdcflow.archive.daemon import daemon_command, properties, settings_for

    s = settings_for(project, "s3://b/arch")
    s.endpoint, s.kinesis_endpoint = "http://127.0.0.1:5000", "http://127.0.0.1:5001"
    props = dict(line.split(" = ", 1) for line in properties(s).splitlines())
    assert props["retrievalMode"] == "POLLING"
    assert props["kinesisEndpoint"] == "http://127.0.0.1:5001" and props["dynamoDBEndpoint"] == "http://127.0.0.1:5000"
    assert props["applicationName"] == f"{project.pipeline.name}-archiver"
    assert props["executableName"].endswith("-m cdcflow.archive.processor")
    s.endpoint = s.kinesis_endpoint = None  # AWS: no endpoints, CloudWatch metrics left on
    assert "Endpoint" not in properties(s) and "metricsLevel" not in properties(s)
    from pathlib import Path

    cmd = daemon_command(Path("/tmp/x/archiver.properties"))
    assert "-Daws.cborEnabled=false" in cmd and cmd[cmd.index("-cp") + 2].endswith("MultiLangDaemon")


def test_the_daemon_reads_its_properties_from_a_relative_workdir(project, tmp_path, monkeypatch):
    """`cdcflow archive` defaults to `--workdir .cdcflow/archiver`, a relative path, and the daemon runs
    inside that folder: it must still find its properties file (it exited with "Unable to find property
    file" for any relative workdir). Reads the daemon's log until it has either read the file or exited.
    No emulator: the daemon is stopped once its configuration is read."""
    import os
    import signal
    import time
    from pathlib import Path

    from cdcflow.archive.daemon import settings_for, start_daemon

    monkeypatch.chdir(tmp_path)
    log = tmp_path / "daemon.log"
    s = settings_for(project, "s3://b/arch")
    s.endpoint = "http://127.0.0.1:9"  # nothing listens: the daemon keeps retrying until stopped
    daemon = start_daemon(s, str(Path(project.pipeline_file).parent), Path("rel/archiver"), log)
    try:
        # The configurator logs one line per property as it reads them: wait for the stream's own
        # line (or the failure), not the first line (CI read the log between the two once).
        deadline = time.monotonic() + 120
        text = ""
        while daemon.poll() is None and time.monotonic() < deadline \
                and "streamName" not in text and "Unable to find property file" not in text:
            time.sleep(0.2)
            text = log.read_text()
        text = log.read_text()
        assert "Unable to find property file" not in text, text[-2000:]
        assert "streamName" in text, text[-2000:]  # the properties were read
    finally:
        if daemon.poll() is None:
            os.killpg(daemon.pid, signal.SIGTERM)
            daemon.wait(30)
