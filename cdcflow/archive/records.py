"""Archive lines and objects.

One archive line per Kinesis record, JSON:

    {"shard_id": "shardId-000000000001", "sequence_number": "4959...", "sub_sequence_number": 0,
     "partition_key": "shop.customers", "arrival_ms": 1764633600123, "data": "<the DMS record, masked>",
     "hashed": ["email"]}

`data` is the record as DMS wrote it, with the PII of its `data` and before-image maps masked by the
table configs' rules (cdcflow.cdc.masking.mask_value; records of unconfigured tables have every value
redacted, as bronze does). `hashed` (absent when empty) names the columns whose values are hashed
already, so a replay (`cdcflow stream --replay`) doesn't hash them again (cdcflow.cdc.masking): the
table's `hash` columns when it was archived. A record that is not a JSON object can't be masked
column by column, so its text is withheld, as in quarantine: `data` becomes a marker with the
record's sha256 that the stream still quarantines as `malformed_json` (redeliveries share it).
Objects are gzip JSON lines, one per KCL batch of one shard:

    <archive uri>/<stream>/year=YYYY/month=MM/day=DD/hour=HH/<shard>-<first seq>-<last seq>.jsonl.gz

the hour being the first record's arrival hour (UTC), so a batch redelivered after a crash lands on
the same key.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from cdcflow.cdc.masking import REDACTED, mask_value
from cdcflow.config import Project

MALFORMED_MARKER = "cdcflow-archive:withheld-malformed-record sha256="


@dataclass(frozen=True)
class RawRecord:
    shard_id: str
    sequence_number: str
    sub_sequence_number: int
    partition_key: str
    arrival_ms: int
    data: bytes


def _mask_map(values: dict, pii: dict[str, str] | None, salt: str) -> dict:
    """One DMS data map, masked. pii None: the table is not configured, every value is redacted."""
    if pii is None:
        return {k: (None if v is None else REDACTED) for k, v in values.items()}
    out = {}
    for k, v in values.items():
        method = pii.get(k)
        if method == "drop":
            continue
        if method and v is not None:
            out[k] = mask_value(_as_text(v), method, salt)
        else:
            out[k] = v
    return out


def _as_text(v) -> str:
    """The value as the stream's parser reads it (JSON scalars as text), so hashes match silver's."""
    if isinstance(v, str):
        return v
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(",", ":"))
    return json.dumps(v)


def mask_payload(data: bytes, project: Project, salt: str) -> str:
    """The DMS record with PII masked (see the module doc); never returns unmasked PII."""
    return _masked(data, project, salt)[0]


def _masked(data: bytes, project: Project, salt: str) -> tuple[str, list[str]]:
    """(the masked record, the columns whose values it holds hashed)."""
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        record = None
    if not isinstance(record, dict):
        return MALFORMED_MARKER + hashlib.sha256(data).hexdigest(), []
    meta = record.get("metadata") if isinstance(record.get("metadata"), dict) else {}
    table = f"{meta.get('schema-name')}.{meta.get('table-name')}"
    pii = project.tables[table].pii if table in project.tables else None
    before_field = project.pipeline.dms.before_image_field
    for field in ("data", before_field):
        if isinstance(record.get(field), dict):
            record[field] = _mask_map(record[field], pii, salt)
    hashed = sorted(c for c, m in (pii or {}).items() if m == "hash")
    return json.dumps(record, separators=(",", ":")), hashed


def archive_line(rec: RawRecord, project: Project, salt: str) -> str:
    data, hashed = _masked(rec.data, project, salt)
    line = {
        "shard_id": rec.shard_id,  # first: streaming.sources tells archive lines by this prefix
        "sequence_number": rec.sequence_number,
        "sub_sequence_number": rec.sub_sequence_number,
        "partition_key": rec.partition_key,
        "arrival_ms": rec.arrival_ms,
        "data": data,
    }
    if hashed:
        line["hashed"] = hashed
    return json.dumps(line, separators=(",", ":"))


def object_key(base: str, stream: str, records: list[RawRecord]) -> str:
    first, last = records[0], records[-1]
    t = datetime.fromtimestamp(first.arrival_ms / 1000, UTC)
    folder = f"{stream}/year={t:%Y}/month={t:%m}/day={t:%d}/hour={t:%H}"
    name = f"{first.shard_id}-{first.sequence_number}-{last.sequence_number}.jsonl.gz"
    return f"{base.strip('/')}/{folder}/{name}" if base.strip("/") else f"{folder}/{name}"


def gzip_lines(lines: Iterable[str]) -> bytes:
    # mtime=0: the same batch gives the same bytes, so a rewrite after a crash is identical
    return gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0)


def read_archive_lines(blob: bytes) -> list[dict]:
    return [json.loads(line) for line in gzip.decompress(blob).decode().splitlines() if line.strip()]


def default_archive_uri(project: Project) -> str:
    """`s3://<raw bucket>/kinesis-archive`: beside the DMS prefix, never under it (the full load lists it)."""
    import os

    from cdcflow.aws import split_s3

    if os.environ.get("CDCFLOW_ARCHIVE_URI"):
        return os.environ["CDCFLOW_ARCHIVE_URI"]
    bucket, _ = split_s3(project.pipeline.dms.raw_uri)
    return f"s3://{bucket}/kinesis-archive"
