"""Delivery faults, each with a rate, applied to the encoded records (never to the true history).

Semantics (the oracle relies on them; see docs/simulator.md):
- duplicate / out_of_order / late: genuine records delivered twice, swapped with a record up to 10
  positions later, or moved after every record committed more than watermark + 1 min after them.
  They never change the expected state or SCD2. Changes that fail a raw_to_staging quality rule are
  never duplicated (so each is quarantined exactly once).
- malformed_json, missing_primary_key, unknown_table, type_mismatch, no_ordering: an EXTRA, broken copy
  of a genuine CDC record, delivered right after it; the genuine record is delivered too. Each extra
  record must produce exactly one quarantine row with that rule (table null for malformed_json and
  unknown_table). The expected state is unaffected.
"""

from __future__ import annotations

import json
import random
from bisect import bisect_right
from dataclasses import dataclass, fields
from typing import Any

from cdcflow.config import Project
from cdcflow.sim.kinesis import KinesisRecord, dumps
from cdcflow.sim.source import Change

BAD_KINDS = ("malformed_json", "missing_primary_key", "unknown_table", "type_mismatch", "no_ordering")
_ORDERING_FIELDS = {"commit_timestamp": "commit-timestamp", "transaction_id": "transaction-id",
                    "transaction_record_id": "transaction-record-id", "stream_position": "stream-position"}
_BAD_VALUE = {"int": "abc", "bigint": "abc", "smallint": "abc", "double": "abc", "float": "abc",
              "boolean": "maybe", "date": "not-a-date", "timestamp": "not-a-timestamp"}


@dataclass(frozen=True)
class FaultOptions:
    duplicate_rate: float = 0.0
    out_of_order_rate: float = 0.0
    late_rate: float = 0.0
    malformed_json_rate: float = 0.0
    missing_primary_key_rate: float = 0.0
    unknown_table_rate: float = 0.0
    type_mismatch_rate: float = 0.0
    no_ordering_rate: float = 0.0
    watermark_minutes: int = 10

    def rate(self, kind: str) -> float:
        return float(getattr(self, f"{kind}_rate"))

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def any(self) -> bool:
        return any(getattr(self, f.name) for f in fields(self) if f.name.endswith("_rate"))


def iso_to_us(ts: str) -> int:
    from cdcflow.sim.kinesis import _iso_to_us

    return _iso_to_us(ts)


def _commit_clock(records: list[KinesisRecord], by_seq: dict[int, Change]) -> list[int]:
    """Per position, the highest commit time seen so far (monotone, for bisecting)."""
    out, high = [], 0
    for r in records:
        ch = by_seq.get(r.source_seq) if r.source_seq is not None else None
        if ch is not None and ch.commit_ts:
            high = max(high, iso_to_us(ch.commit_ts))
        out.append(high)
    return out


def _break(kind: str, rec: KinesisRecord, project: Project, rng: random.Random) -> tuple[str, str | None] | None:
    """The broken payload for an extra record, and the table the quarantine row names (None: unknown)."""
    if kind == "malformed_json":
        return rec.payload[: max(8, len(rec.payload) // 2)], None
    body = json.loads(rec.payload)
    meta = body["metadata"]
    t = project.tables.get(rec.table or "")
    if t is None:
        return None
    if kind == "missing_primary_key":
        body["data"][t.primary_key[0]] = None
    elif kind == "unknown_table":
        meta["table-name"] = f"ghost_{rng.randint(1, 3)}"
        return dumps(body), None
    elif kind == "type_mismatch":
        if rec.op not in ("insert", "update"):
            return None
        cols = [c for c, ty in t.columns.items()
                if c not in t.primary_key and c in body["data"] and (ty in _BAD_VALUE or ty.startswith("decimal"))]
        if not cols:
            return None
        col = rng.choice(cols)
        body["data"][col] = _BAD_VALUE.get(t.columns[col], "abc")
    elif kind == "no_ordering":
        names = [_ORDERING_FIELDS[o] for o in t.ordering if o in _ORDERING_FIELDS]
        if not names:
            return None
        del meta[names[0]]
    return dumps(body), t.name


def inject_kinesis(project: Project, records: list[KinesisRecord], changes: list[Change], opts: FaultOptions,
                   seed: int | str, dq_failing: set[int]) -> tuple[list[KinesisRecord], list[dict[str, Any]]]:
    """Apply the faults to the records (history order); return the delivery order and the fault log.

    Each fault log entry: {"kind", "rule" (quarantine rule or None), "table", "source_seq", "position"}
    where position is the 0-based index in the delivered sequence.
    """
    if not opts.any:
        return list(records), []
    rng = random.Random(f"cdcflow-faults:{seed}")
    by_seq = {c.source_seq: c for c in changes}
    first_cdc = next((i for i, r in enumerate(records) if r.op in ("insert", "update", "delete")), len(records))
    clock = _commit_clock(records, by_seq)
    # sort keys: (position, tie-break); inserted records get fractional positions
    keyed: list[tuple[float, int, KinesisRecord, dict | None]] = [(float(i), 0, r, None) for i, r in enumerate(records)]
    log: list[dict[str, Any]] = []
    tie = 0
    late_us = (opts.watermark_minutes * 60 + 60) * 1_000_000

    def add(pos: float, rec: KinesisRecord, entry: dict[str, Any]) -> None:
        nonlocal tie
        tie += 1
        log.append(entry)
        keyed.append((pos, tie, rec, entry))

    for i, rec in enumerate(records[first_cdc:], start=first_cdc):
        if rec.op not in ("insert", "update", "delete"):
            continue
        for kind in BAD_KINDS:
            if opts.rate(kind) and rng.random() < opts.rate(kind):
                broken = _break(kind, rec, project, rng)
                if broken:
                    payload, table = broken
                    bad = KinesisRecord(payload, rec.partition_key, None, table, rec.op, fault=kind)
                    add(i + 0.5, bad, {"kind": kind, "rule": kind, "table": table, "source_seq": rec.source_seq})
        if opts.duplicate_rate and rec.source_seq not in dq_failing and rng.random() < opts.duplicate_rate:
            dup = KinesisRecord(rec.payload, rec.partition_key, rec.source_seq, rec.table, rec.op, fault="duplicate")
            add(min(i + rng.randint(1, 50), len(records)) + 0.25, dup,
                {"kind": "duplicate", "rule": None, "table": rec.table, "source_seq": rec.source_seq})
    # late: move the genuine record after everything committed watermark + 1 min later
    moved: dict[int, float] = {}
    if opts.late_rate:
        for i, rec in enumerate(records[first_cdc:], start=first_cdc):
            ch = by_seq.get(rec.source_seq) if rec.source_seq is not None else None
            if ch is None or not ch.commit_ts or rec.op not in ("insert", "update", "delete"):
                continue
            if rng.random() < opts.late_rate:
                own = iso_to_us(ch.commit_ts)
                j = bisect_right(clock, own + late_us)
                moved[i] = j - 0.4 if j < len(records) else len(records) + 0.6
                log.append({"kind": "late", "rule": None, "table": rec.table, "source_seq": rec.source_seq,
                            "older_than_watermark": j < len(records)})
    keyed = [(moved.get(int(p), p) if e is None and t == 0 else p, t, r, e) for p, t, r, e in keyed]
    keyed.sort(key=lambda k: (k[0], k[1]))
    out = [k[2] for k in keyed]
    entries = [k[3] for k in keyed]
    if opts.out_of_order_rate:
        n = len(out)
        for i in range(n):
            if i < first_cdc or out[i].op not in ("insert", "update", "delete"):
                continue
            if rng.random() < opts.out_of_order_rate:
                j = min(n - 1, i + rng.randint(1, 10))
                out[i], out[j] = out[j], out[i]
                entries[i], entries[j] = entries[j], entries[i]
                log.append({"kind": "out_of_order", "rule": None, "table": out[j].table,
                            "source_seq": out[j].source_seq})
    for pos, e in enumerate(entries):
        if e is not None:
            e["position"] = pos
    return out, log
