"""Parse DMS output into one normalized change shape, whatever the source (Kinesis JSON or S3 Parquet).

Normalized columns (all sources):
  _table, _record_type (data|control), _op (load|insert|update|delete|<control op>),
  _data map<string,string> (column -> value as text), _before map<string,string> (before-image),
  _commit_ts timestamp, _txn_id, _txn_rec_id, _stream_pos, _change_seq (strings),
  _control (control JSON text), _source_position, _arrival_ts, _problem (rule name or null),
  _record_hash (identifies a delivered record: redeliveries of one change share it).
Kinesis JSON (the stream) also: _prehashed array<string>, the columns whose values the source hashed
already (an archive line's; null for Kinesis: cdcflow.cdc.masking), and _payload_bytes, the record's
size as DMS sent it (what bronze's driver bound counts: cdcflow.cdc.bronze).
"""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import MapType, StringType, StructField, StructType

from cdcflow.cdc.masking import PREHASHED
from cdcflow.runtime import sql_in

NORMALIZED_COLUMNS = [
    "_table", "_record_type", "_op", "_data", "_before", "_commit_ts", "_txn_id", "_txn_rec_id",
    "_stream_pos", "_change_seq", "_control", "_source_position", "_arrival_ts", "_problem", "_record_hash",
]  # fmt: skip

_TEXT_MAP = MapType(StringType(), StringType())
_METADATA_FIELDS = [
    "timestamp", "record-type", "operation", "partition-key-type", "schema-name", "table-name",
    "transaction-id", "transaction-record-id", "prev-transaction-id", "commit-timestamp", "stream-position",
]  # fmt: skip


def _envelope_schema(before_field: str) -> StructType:
    return StructType(
        [
            StructField("data", _TEXT_MAP),
            StructField("metadata", StructType([StructField(f, StringType()) for f in _METADATA_FIELDS])),
            StructField(before_field, _TEXT_MAP),
        ]
    )


def parse_kinesis_json(raw: DataFrame, known_tables: list[str], before_field: str = "before-image") -> DataFrame:
    """DMS Kinesis JSON records -> normalized changes.

    `raw` has: payload (string), source_position (string), arrival_ts (timestamp), and optionally
    prehashed (array<string>: streaming.sources.from_replay).
    Unparseable records keep `_problem = 'malformed_json'`; records for tables that are not
    configured keep `_problem = 'unknown_table'`. Nothing is dropped here.
    """
    env = F.from_json(F.col("payload"), _envelope_schema(before_field))
    meta = env["metadata"]
    table = F.concat_ws(".", meta["schema-name"], meta["table-name"])
    record_type = F.lower(meta["record-type"])
    malformed = env.isNull() | meta.isNull() | record_type.isNull() | meta["operation"].isNull()
    parsed = raw.select(
        F.when(~malformed, table).alias("_table"),
        record_type.alias("_record_type"),
        F.lower(meta["operation"]).alias("_op"),
        env["data"].alias("_data"),
        env[before_field].alias("_before"),
        # Control records carry no commit time; their DMS timestamp orders them among themselves.
        F.when(record_type == "control", F.coalesce(meta["commit-timestamp"], meta["timestamp"]))
        .otherwise(meta["commit-timestamp"]).cast("timestamp").alias("_commit_ts"),
        meta["transaction-id"].alias("_txn_id"),
        meta["transaction-record-id"].alias("_txn_rec_id"),
        meta["stream-position"].alias("_stream_pos"),
        F.lit(None).cast("string").alias("_change_seq"),
        F.when(record_type == "control", F.get_json_object("payload", "$.control")).alias("_control"),
        F.col("source_position").alias("_source_position"),
        F.col("arrival_ts").alias("_arrival_ts"),
        F.when(malformed, F.lit("malformed_json")).alias("_problem"),
        F.xxhash64("payload").cast("string").alias("_record_hash"),
        (F.col("prehashed") if "prehashed" in raw.columns else F.lit(None).cast("array<string>")).alias(PREHASHED),
        F.octet_length("payload").alias("_payload_bytes"),
    )
    # By name, as one SQL expression (runtime.sql_in): `_table` is the record's table when not malformed.
    unknown = F.col("_problem").isNull() & (F.col("_record_type") == "data") & ~sql_in("_table", known_tables)
    return parsed.withColumn("_problem", F.when(unknown, F.lit("unknown_table")).otherwise(F.col("_problem")))

