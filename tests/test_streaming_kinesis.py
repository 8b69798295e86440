"""The streaming job reading Kinesis (moto server) through the Python Data Source: restart and resharding."""

from __future__ import annotations

import pytest

from cdcflow.aws import client, ensure_stream
from streaming.job import checkpoint_location, run_stream
from streaming.sources import kinesis_stream
from tests.streaming_helpers import project_in, simulate_to, verify_against_oracle

pytestmark = [pytest.mark.spark, pytest.mark.stack]


def test_kinesis_restart_and_resharding_lose_and_duplicate_nothing(spark, stack, tmp_path):
    from cdcflow.sim.kinesis import send

    stream = "cdc-reshard"
    project = project_in(tmp_path, CDCFLOW_STREAM=stream, CDCFLOW_AWS_ENDPOINT=stack.aws_endpoint)
    sim = simulate_to(project, tmp_path / "sim", events=300, duplicate_rate=0.03, out_of_order_rate=0.05,
                      malformed_json_rate=0.01, pk_change_rate=0.02)
    records = sim.kinesis
    kinesis = client("kinesis", stack.aws_endpoint, "us-east-1")
    ensure_stream(kinesis, stream, 2)
    half = len(records) // 2
    send(kinesis, stream, records[:half])
    ck = checkpoint_location(project)

    def consume():
        return run_stream(spark, project, kinesis_stream(spark, project, ck), until_caught_up=True,
                          trigger_seconds=1, checkpoint=ck)

    first = consume()
    assert first.batches >= 1
    # Reshard in the middle of the stream: split shard 0; the rest goes to the children.
    shards = kinesis.list_shards(StreamName=stream)["Shards"]
    parent = shards[0]
    lo, hi = int(parent["HashKeyRange"]["StartingHashKey"]), int(parent["HashKeyRange"]["EndingHashKey"])
    kinesis.split_shard(StreamName=stream, ShardToSplit=parent["ShardId"], NewStartingHashKey=str((lo + hi) // 2))
    assert len(kinesis.list_shards(StreamName=stream)["Shards"]) == 4
    send(kinesis, stream, records[half:])
    second = consume()  # a new query on the same checkpoint: resumes from the logged offsets
    assert second.batches >= 1

    bronze = spark.read.format("delta").load(project.path("bronze"))
    assert bronze.count() == len(records)  # every record consumed exactly once across restart + reshard
    assert bronze.select("source_position").distinct().count() == len(records)
    bad = [d for d in verify_against_oracle(spark, project, tmp_path / "sim") if not d.ok]
    assert not bad, [(d.table, d.kind, d.missing[:3], d.extra[:3], d.different[:3]) for d in bad]


def test_a_micro_batch_takes_up_to_max_records_per_shard_over_several_get_records_calls(stack, tmp_path):
    """maxRecordsPerShard bounds a micro-batch; maxRecordsPerRead bounds one GetRecords call. A batch
    larger than one call (a job catching up) pages through the shard, and reading the offset range
    yields exactly its records, in order."""
    from streaming.kinesis_source import KinesisStreamReader

    stream = "cdc-paging"
    kinesis = client("kinesis", stack.aws_endpoint, "us-east-1")
    ensure_stream(kinesis, stream, 1)
    for i in range(0, 250, 50):
        kinesis.put_records(StreamName=stream, Records=[
            {"Data": str(n).encode(), "PartitionKey": "k"} for n in range(i, i + 50)])
    calls = []
    reader = KinesisStreamReader({"streamName": stream, "endpointUrl": stack.aws_endpoint,
                                  "maxRecordsPerShard": "200", "maxRecordsPerRead": "60"})
    real = reader.client.get_records
    reader.client.get_records = lambda **kw: calls.append(kw["Limit"]) or real(**kw)

    first = reader.initialOffset()
    end = reader.latestOffset()
    assert calls == [60, 60, 60, 20]  # 200 records in four calls, the last one only what is left
    (part,) = reader.partitions(first, end)
    assert [int(r[0]) for r in reader.read(part)] == list(range(200))
    rest = reader.latestOffset()
    (part,) = reader.partitions(end, rest)
    assert [int(r[0]) for r in reader.read(part)] == list(range(200, 250))
    assert reader.lag == {part.shard: 0}
