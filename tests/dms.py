"""Hand-written DMS Kinesis records for tests (independent of the simulator)."""

from __future__ import annotations

import json
from pathlib import Path


def record(
    table: str,
    op: str,
    data: dict,
    commit: str | None = None,
    txn: int = 0,
    rec: int = 0,
    before: dict | None = None,
    schema: str = "shop",
    pos: str | None = None,
) -> dict:
    meta = {
        "timestamp": "2026-11-25T12:00:00.000000Z",
        "record-type": "data",
        "operation": op,
        "partition-key-type": "schema-table",
        "schema-name": schema,
        "table-name": table,
    }
    if op != "load":
        meta.update(
            {
                "transaction-id": txn,
                "transaction-record-id": rec,
                "prev-transaction-id": max(txn - 1, 0),
                "commit-timestamp": commit,
                "stream-position": pos or f"00000002/{txn:08X}.{rec}.00000002/{txn:08X}",
            }
        )
    out = {"data": data, "metadata": meta}
    if before is not None:
        out["before-image"] = before
    return out


def control(table: str, op: str, columns: dict, ts: str, schema: str = "shop", primary_key: list | None = None) -> dict:
    """A control record as DMS sends it: only `metadata.timestamp` (no commit time), partitioned by task."""
    table_def = {"columns": columns, **({"primary-key": primary_key} if primary_key else {})}
    return {
        "control": {"table-def": table_def},
        "metadata": {
            "timestamp": ts,
            "record-type": "control",
            "operation": op,
            "partition-key-type": "task-id",
            "partition-key-value": "serv-res-id-1722000000000-abcd",
            "schema-name": schema,
            "table-name": table,
        },
    }


def write_batches(folder: Path, batches: list[list[dict | str]]) -> Path:
    """One JSON-lines file per micro-batch (file names sort in delivery order)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, batch in enumerate(batches):
        lines = [r if isinstance(r, str) else json.dumps(r) for r in batch]
        (folder / f"part-{i:05d}.jsonl").write_text("\n".join(lines) + "\n")
    return folder
