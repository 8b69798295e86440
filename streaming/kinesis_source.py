"""A Kinesis source for Structured Streaming, written with PySpark's Python Data Source API (pyspark >= 4).

Offsets are per-shard sequence numbers kept in the Spark checkpoint:
    {"shards": {"<shardId>": {"after": "<seq>" | null, "closed": bool}}, "start": {...}}
A batch reads, per shard, the records after `start.after` up to and including `end.after`, so a
restarted query replays exactly the same offset range. Resharding: a child shard is read only once
its parents are closed and read to their end, so per-key order holds across the split or merge.
Throttling and expired iterators are retried with backoff; MillisBehindLatest is reported per shard.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from pyspark.sql.datasource import DataSource, DataSourceStreamReader, InputPartition
from pyspark.sql.types import BinaryType, StringType, StructField, StructType, TimestampType

SCHEMA = StructType(
    [
        StructField("data", BinaryType()),
        StructField("streamName", StringType()),
        StructField("partitionKey", StringType()),
        StructField("sequenceNumber", StringType()),
        StructField("approximateArrivalTimestamp", TimestampType()),
        StructField("shardId", StringType()),
    ]
)
_TRANSIENT = ("ProvisionedThroughputExceededException", "LimitExceededException", "ThrottlingException",
              "InternalFailure", "ServiceUnavailable")  # fmt: skip


def _client(options: dict):
    import boto3
    from botocore.config import Config

    endpoint = options.get("endpointUrl") or None
    if endpoint:
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    return boto3.client(
        "kinesis",
        endpoint_url=endpoint,
        region_name=options.get("region", "us-east-1"),
        config=Config(retries={"max_attempts": 10, "mode": "adaptive"}),
    )


def _call(fn, **kwargs):
    """Call Kinesis, retrying throttling with exponential backoff (boto3 retries first, then we do)."""
    from botocore.exceptions import ClientError

    delay = 0.2
    for attempt in range(8):
        try:
            return fn(**kwargs)
        except ClientError as e:
            if e.response["Error"]["Code"] not in _TRANSIENT or attempt == 7:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")


def _iterator(client, stream: str, shard: str, after: str | None, start: dict) -> str:
    kwargs: dict = {"StreamName": stream, "ShardId": shard}
    if after:
        kwargs.update(ShardIteratorType="AFTER_SEQUENCE_NUMBER", StartingSequenceNumber=after)
    elif start.get("timestamp"):
        kwargs.update(ShardIteratorType="AT_TIMESTAMP", Timestamp=dt.datetime.fromisoformat(start["timestamp"]))
    else:
        kwargs.update(ShardIteratorType="TRIM_HORIZON")
    return _call(client.get_shard_iterator, **kwargs)["ShardIterator"]


def _newest_offset_log(ck: str, options: dict) -> str | None:
    """The text of the checkpoint's newest `offsets/<n>` file: a local folder, or s3:// / s3a:// (read
    with boto3 at the stream's endpoint: this runs in a Python worker, without the JVM's S3A)."""
    if ck.startswith(("s3://", "s3a://")):
        import boto3

        bucket, _, prefix = ck.split("://", 1)[1].partition("/")
        prefix = prefix.rstrip("/") + "/offsets/"
        if options.get("endpointUrl"):
            os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
            os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        s3 = boto3.client("s3", endpoint_url=options.get("endpointUrl") or None, region_name=options.get("region"))
        logs = [(int(name), o["Key"]) for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                for o in page.get("Contents", []) if (name := o["Key"][len(prefix):]).isdigit()]
        return s3.get_object(Bucket=bucket, Key=max(logs)[1])["Body"].read().decode() if logs else None
    offsets = Path(ck.removeprefix("file:")) / "offsets"
    logs = sorted((int(p.name), p) for p in offsets.glob("[0-9]*")) if offsets.exists() else []
    return logs[-1][1].read_text() if logs else None


class ShardRange(InputPartition):
    def __init__(self, shard: str, after: str | None, until: str, start: dict):
        self.shard, self.after, self.until, self.start = shard, after, until, start


class KinesisStreamReader(DataSourceStreamReader):
    def __init__(self, options: dict):
        self.options = options
        self.stream = options["streamName"]
        self.max_records = int(options.get("maxRecordsPerShard", "100000"))
        self.per_read = min(int(options.get("maxRecordsPerRead", "10000")), 10000)
        self.lag: dict[str, int] = {}
        self._last: dict | None = None
        self._client = None

    @property
    def client(self):
        if self._client is None:
            self._client = _client(self.options)
        return self._client

    # -------------------------------------------------------- offsets

    def initialOffset(self) -> dict:
        pos = self.options.get("startingPosition", "trim_horizon").lower()
        start: dict = {}
        if pos == "latest":
            start["timestamp"] = dt.datetime.now(dt.UTC).isoformat()
        elif pos == "at_timestamp":
            start["timestamp"] = self.options["startingTimestamp"]
        return {"shards": {}, "start": start}

    def _recover_last(self) -> dict:
        """After a restart, continue from the newest offset Spark logged in the checkpoint."""
        ck = self.options.get("checkpointLocation")
        text = _newest_offset_log(ck, self.options) if ck else None
        return json.loads(text.strip().splitlines()[-1]) if text else self.initialOffset()

    def latestOffset(self) -> dict:
        last = self._last or self._recover_last()
        shards_state = {k: dict(v) for k, v in last["shards"].items()}
        start = last.get("start", {})
        shards = self._list_shards()
        for shard in shards:
            sid = shard["ShardId"]
            if sid not in shards_state:
                parents = [p for p in (shard.get("ParentShardId"), shard.get("AdjacentParentShardId")) if p]
                # Read a child only after every parent we know of is drained (per-key order).
                known = {s["ShardId"] for s in shards}
                if any(p in known and not shards_state.get(p, {}).get("closed") for p in parents):
                    continue
                shards_state[sid] = {"after": None, "closed": False}
            st = shards_state[sid]
            if st["closed"]:
                continue
            self._advance(sid, st, start)
        self._last = {"shards": shards_state, "start": start}
        return self._last

    def _emit_lag(self, shard: str, millis: int) -> None:
        from cdcflow.metrics import MetricsSink

        MetricsSink(self.options.get("pipeline", "cdcflow"), path=self.options.get("metricsPath")).emit(
            {"MillisBehindLatest": millis}, {"Stream": self.stream, "Shard": shard}, units={"MillisBehindLatest": "Milliseconds"}
        )

    def _list_shards(self) -> list[dict]:
        shards, token = [], None
        while True:
            kw = {"NextToken": token} if token else {"StreamName": self.stream}
            resp = _call(self.client.list_shards, **kw)
            shards += resp["Shards"]
            token = resp.get("NextToken")
            if not token:
                return shards

    def _advance(self, sid: str, st: dict, start: dict) -> None:
        """Move the shard's end offset up to max_records past its last one: GetRecords calls of
        per_read records until the budget is spent or the shard is caught up (or closed)."""
        it = _iterator(self.client, self.stream, sid, st["after"], start)
        budget = self.max_records
        while True:
            limit = min(budget, self.per_read)
            resp = _call(self.client.get_records, ShardIterator=it, Limit=limit)
            records = resp["Records"]
            if records:
                st["after"] = records[-1]["SequenceNumber"]
                budget -= len(records)
            self.lag[sid] = resp.get("MillisBehindLatest", 0)
            it = resp.get("NextShardIterator")
            if it is None:
                st["closed"] = True  # a closed shard read to its end
                break
            # Caught up: a short page at the tip (a full page may have more behind it, whatever the lag says).
            if not records or budget <= 0 or (self.lag[sid] == 0 and len(records) < limit):
                break
        self._emit_lag(sid, self.lag[sid])

    def partitions(self, start: dict, end: dict) -> list[ShardRange]:
        parts = []
        for sid, st in end["shards"].items():
            before = start.get("shards", {}).get(sid, {}).get("after")
            if st["after"] and st["after"] != before:
                parts.append(ShardRange(sid, before, st["after"], end.get("start", {})))
        return parts

    def commit(self, end: dict) -> None:
        pass  # nothing to release: Kinesis keeps records for its retention period

    # -------------------------------------------------------- reading (on executors)

    def read(self, partition: ShardRange) -> Iterator[tuple]:
        from botocore.exceptions import ClientError

        client = _client(self.options)
        until = int(partition.until)
        after = partition.after
        start = partition.start
        it = _iterator(client, self.stream, partition.shard, after, start)
        while True:
            try:
                resp = _call(client.get_records, ShardIterator=it, Limit=self.per_read)
            except ClientError as e:
                if e.response["Error"]["Code"] != "ExpiredIteratorException":
                    raise
                it = _iterator(client, self.stream, partition.shard, after, start)
                continue
            for r in resp["Records"]:
                seq = r["SequenceNumber"]
                if int(seq) > until:
                    return
                after = seq
                yield (r["Data"], self.stream, r["PartitionKey"], seq,
                       r["ApproximateArrivalTimestamp"], partition.shard)  # fmt: skip
                if int(seq) == until:
                    return
            it = resp.get("NextShardIterator")
            if it is None:
                return


class KinesisDataSource(DataSource):
    """`spark.readStream.format("cdcflow_kinesis").option("streamName", ...)`."""

    @classmethod
    def name(cls) -> str:
        return "cdcflow_kinesis"

    def schema(self) -> StructType:
        return SCHEMA

    def streamReader(self, schema: StructType) -> KinesisStreamReader:
        return KinesisStreamReader(self.options)
