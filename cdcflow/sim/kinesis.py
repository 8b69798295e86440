"""AWS DMS -> Kinesis JSON records (IncludeTransactionDetails, IncludeControlDetails,
IncludeTableAlterOperations and IncludeNullAndEmpty on; optional pk-only before-image), and sending.

Data record:    {"data": {...}, "metadata": {...}} (+ "before-image": {pk} on updates when enabled)
Control record: {"control": {"table-def": {...}}, "metadata": {...}} with partition-key-type "task-id".
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from cdcflow.config import Project
from cdcflow.sim.source import CONTROL_OPS, Change
from cdcflow.sim.values import SOURCE_START_US, decimal_spec, iso_us

TASK_ID = "cdcflow-sim-task"
BEFORE_IMAGE_FIELD = "before-image"
MAX_BATCH_RECORDS = 500
MAX_BATCH_BYTES = 5 * 1024 * 1024

# Column types in a control record's table-def. "wire": as DMS writes them to Kinesis/Kafka (integer
# widths in bits, TIMESTAMP); "doc": the names of DMS's data-type documentation (widths in bytes, DATETIME).
_DMS_TYPES = {
    "wire": {"bigint": "INT64", "int": "INT32", "smallint": "INT16", "double": "REAL8", "float": "REAL4",
             "boolean": "BOOLEAN", "date": "DATE", "timestamp": "TIMESTAMP", "string": "STRING"},
    "doc": {"bigint": "INT8", "int": "INT4", "smallint": "INT2", "double": "REAL8", "float": "REAL4",
            "boolean": "BOOLEAN", "date": "DATE", "timestamp": "DATETIME", "string": "STRING"},
}  # fmt: skip
TYPE_NAMINGS = tuple(_DMS_TYPES)


def dms_type_def(col_type: str, nullable: bool = True, naming: str = "wire") -> dict[str, Any]:
    spec = decimal_spec(col_type)
    if spec:
        return {"type": "NUMERIC", "precision": spec[0], "scale": spec[1], "nullable": nullable}
    d: dict[str, Any] = {"type": _DMS_TYPES[naming][col_type], "nullable": nullable}
    if col_type == "string":
        d["length"] = 255
    return d


@dataclass
class KinesisRecord:
    """One delivered record: the JSON text exactly as put on the stream, its partition key and origin."""

    payload: str
    partition_key: str
    source_seq: int | None  # the history change it carries (None for injected garbage)
    table: str | None
    op: str
    fault: str | None = None  # the fault kind that produced or moved it


def dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(", ", ": "), ensure_ascii=False)


class KinesisEncoder:
    """Encodes history changes as DMS records. Deterministic for a seed (metadata.timestamp jitter)."""

    def __init__(self, project: Project, seed: int | str, partition_key_type: str = "schema-table",
                 before_image: bool = False, type_naming: str = "wire"):
        if partition_key_type not in ("schema-table", "primary-key"):
            raise ValueError("partition_key_type must be schema-table or primary-key")
        if type_naming not in TYPE_NAMINGS:
            raise ValueError(f"type_naming must be one of {', '.join(TYPE_NAMINGS)}")
        self.type_naming = type_naming
        self.project = project
        self.pkt = partition_key_type
        self.before_image = before_image
        self.rng = random.Random(f"cdcflow-dms:{seed}")
        self.prev: tuple[int, int] = (0, 0)  # previous record's transaction id / record id
        self.load_us = SOURCE_START_US - 50_000_000
        self.table_defs: dict[str, dict[str, Any]] = {}

    def partition_key(self, table: str, data: dict[str, Any] | None) -> str:
        if self.pkt == "primary-key" and data is not None and table in self.project.tables:
            return "_".join(str(data.get(c)) for c in self.project.tables[table].primary_key)
        return table

    def _meta(self, ch: Change, ts_us: int, record_type: str, pkt: str) -> dict[str, Any]:
        schema, _, name = ch.table.partition(".")
        return {"timestamp": iso_us(ts_us), "record-type": record_type, "operation": ch.op,
                "partition-key-type": pkt, "schema-name": schema, "table-name": name}

    def encode(self, ch: Change) -> KinesisRecord:
        if ch.op in CONTROL_OPS:
            return self._control(ch)
        if ch.op == "load":
            self.load_us += self.rng.randint(1, 50)
            meta = self._meta(ch, self.load_us, "data", self.pkt)
            body: dict[str, Any] = {"data": ch.data, "metadata": meta}
            return KinesisRecord(dumps(body), self.partition_key(ch.table, ch.data), ch.source_seq, ch.table, ch.op)
        assert ch.commit_ts is not None and ch.txn_id is not None and ch.txn_rec_id is not None
        commit_us = _iso_to_us(ch.commit_ts)
        meta = self._meta(ch, commit_us + self.rng.randint(5_000, 900_000), "data", self.pkt)
        meta.update({
            "transaction-id": ch.txn_id,
            "transaction-record-id": ch.txn_rec_id,
            "prev-transaction-id": self.prev[0],
            "prev-transaction-record-id": self.prev[1],
            "commit-timestamp": ch.commit_ts,
            "stream-position": ch.stream_pos,
        })
        self.prev = (ch.txn_id, ch.txn_rec_id)
        data = dict(ch.data or {})
        if ch.op == "delete":  # PostgreSQL logs the key only: the other columns arrive as null
            pk = set(self.project.tables[ch.table].primary_key) if ch.table in self.project.tables else set(data)
            data = {k: (v if k in pk else None) for k, v in data.items()}
        body = {"data": data, "metadata": meta}
        if self.before_image and ch.op == "update":
            t = self.project.tables.get(ch.table)
            body[BEFORE_IMAGE_FIELD] = ch.before or ({c: data.get(c) for c in t.primary_key} if t else {})
        # a primary-key change is partitioned by its new key, as DMS does
        return KinesisRecord(dumps(body), self.partition_key(ch.table, data), ch.source_seq, ch.table, ch.op)

    def _control(self, ch: Change) -> KinesisRecord:
        d = ch.data or {}
        if ch.op == "create-table":
            cols = {c: dms_type_def(v["type"], v.get("nullable", True), self.type_naming)
                    for c, v in d["columns"].items()}
            self.table_defs[ch.table] = {"columns": cols, "primary-key": list(d["primary_key"]),
                                         "collation-name": "en_US.utf8"}
        elif ch.table in self.table_defs:
            cols = self.table_defs[ch.table]["columns"]
            if ch.op in ("add-column", "column-type-change"):
                cols[d["column"]] = dms_type_def(d["type"], True, self.type_naming)
            elif ch.op == "rename-column":  # same place in the table-def, new name
                cols = {d["column"] if c == d["old_column"] else c: v for c, v in cols.items()}
            elif ch.op == "drop-column":
                cols = {c: v for c, v in cols.items() if c != d["column"]}
            self.table_defs[ch.table]["columns"] = cols
        ts_us = _iso_to_us(ch.commit_ts) + 1000 if ch.commit_ts else self.load_us - 1_000_000
        body = {"control": {"table-def": json.loads(json.dumps(self.table_defs.get(ch.table, {})))},
                "metadata": self._meta(ch, ts_us, "control", "task-id")}
        return KinesisRecord(dumps(body), TASK_ID, ch.source_seq, ch.table, ch.op)


def _iso_to_us(ts: str) -> int:
    from datetime import datetime

    from cdcflow.sim.values import EPOCH

    dt = datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=EPOCH.tzinfo)
    delta = dt - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def encode_history(project: Project, changes: Iterable[Change], seed: int | str, partition_key_type: str,
                   before_image: bool, type_naming: str = "wire") -> list[KinesisRecord]:
    enc = KinesisEncoder(project, seed, partition_key_type, before_image, type_naming)
    return [enc.encode(ch) for ch in changes]


def batches(records: list[KinesisRecord]) -> Iterable[list[KinesisRecord]]:
    """put_records batches: at most 500 records and 5 MiB each, in delivery order."""
    batch: list[KinesisRecord] = []
    size = 0
    for r in records:
        n = len(r.payload.encode()) + len(r.partition_key.encode())
        if batch and (len(batch) >= MAX_BATCH_RECORDS or size + n > MAX_BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(r)
        size += n
    if batch:
        yield batch


def send(kinesis: Any, stream: str, records: list[KinesisRecord], rate: float | None = None,
         progress: Callable[[int], None] | None = None) -> int:
    """put_records in order (retrying throttled entries); `rate` paces to that many records per second."""
    sent = 0
    start = time.monotonic()
    for batch in batches(records):
        if rate:
            # small batches keep a steady load at the requested rate
            step = max(1, int(rate))
            chunks = [batch[i:i + step] for i in range(0, len(batch), step)]
        else:
            chunks = [batch]
        for chunk in chunks:
            entries = [{"Data": r.payload.encode(), "PartitionKey": r.partition_key} for r in chunk]
            for _attempt in range(10):
                resp = kinesis.put_records(StreamName=stream, Records=entries)
                if not resp.get("FailedRecordCount"):
                    break
                entries = [e for e, res in zip(entries, resp["Records"], strict=True) if res.get("ErrorCode")]
                time.sleep(0.2)
            else:
                raise RuntimeError(f"put_records kept failing for {len(entries)} records")
            sent += len(chunk)
            if progress:
                progress(len(chunk))
            if rate:
                ahead = sent / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
    return sent
