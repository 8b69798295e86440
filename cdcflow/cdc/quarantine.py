"""The quarantine Delta table: one row per rejected record, with its rule, reason and masked payload."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cdcflow.runtime import new_table_options

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

QUARANTINE_SCHEMA = (
    "table string, rule string, reason string, source_position string, payload string, record_hash string, "
    "batch_id bigint, quarantined_at timestamp"
)


def append_quarantine(spark: SparkSession, path: str, rows: list[tuple], txn: tuple[str, int] | None = None) -> None:
    """Append QUARANTINE_SCHEMA rows; `txn` = (txnAppId, txnVersion) makes the append idempotent."""
    if not rows:
        return
    writer = spark.createDataFrame(rows, QUARANTINE_SCHEMA).write.format("delta").mode("append")
    writer = writer.options(**new_table_options("quarantine"))
    if txn is not None:
        writer = writer.option("txnAppId", txn[0]).option("txnVersion", txn[1])
    writer.save(path)


def by_rule(counts: dict[str, int]) -> str:
    """A table's quarantined rows for a command's summary: `7 (missing_primary_key 5, no_ordering 2)`;
    the stream and the full load print it alike."""
    total = sum(counts.values())
    if not total:
        return "0"
    rules = ", ".join(f"{rule} {n}" for rule, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n)
    return f"{total} ({rules})"
