"""Glue Data Catalog entries of the lake's Delta tables, kept current as schema drift evolves them.

The CDK stack (infra/) registers every silver table, bronze and quarantine in the pipeline's Glue
database as native Delta tables (`table_type = DELTA`, the form Athena reads; the columns are the
config's). When a job creates a silver table or schema drift adds a column or widens a type, the job
(the stream and the full load alike) calls `sync_silver_table` with the table's columns, which calls
`sync_table_columns`: Glue `UpdateTable` keeps the previous definition as a table version
(GetTableVersions), so the catalog records every schema change.

Redshift Spectrum can't read a Delta log: it reads the symlink manifests compaction writes
(`batch.compaction.write_manifests`) through a second table per lake table, in a separate database
(`spectrum_database`, `<database>_spectrum`): `SymlinkTextInputFormat` + the Parquet SerDe, LOCATION
the table's `_symlink_format_manifest/`. A separate database because Spectrum's external schema maps a
whole database: the Delta entries above read by Spectrum would list every Parquet file ever written
(removed ones too) and return wrong rows; Athena users keep one entry per table. `sync_silver_table`
keeps both entries' columns current; compaction registers a partitioned table's partitions.

Spark-free (boto3 only): the jobs pass Spark's `simpleString()` types, which are Hive types.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cdcflow.cdc.schema import SILVER_META, is_widening
from cdcflow.config import Project, Table

if TYPE_CHECKING:
    from cdcflow.metrics import MetricsSink

log = logging.getLogger("cdcflow.catalog")
# The Glue database the jobs keep current; set by infra/ (unset locally: no catalog calls at all).
CATALOG_DATABASE_ENV = "CDCFLOW_CATALOG_DATABASE"

# What Athena and Glue's Delta crawler use for a native Delta table (schema read from the Delta log).
DELTA_TABLE_PARAMETERS = {
    "table_type": "DELTA",
    "classification": "delta",
    "spark.sql.sources.provider": "delta",
    "EXTERNAL": "TRUE",
}
PARQUET_SERDE = "org.apache.hadoop.hive.ql.io.parquet.serde.ParquetHiveSerDe"
PARQUET_INPUT = "org.apache.hadoop.hive.ql.io.parquet.MapredParquetInputFormat"
PARQUET_OUTPUT = "org.apache.hadoop.hive.ql.io.parquet.MapredParquetOutputFormat"
# Redshift Spectrum over Delta symlink manifests (the Delta Lake docs' table definition): splits come
# from the manifest's file list, the Parquet SerDe reads them; the output format is never used by reads.
SYMLINK_INPUT = "org.apache.hadoop.hive.ql.io.SymlinkTextInputFormat"
SYMLINK_OUTPUT = "org.apache.hadoop.hive.ql.io.HiveIgnoreKeyTextOutputFormat"
MANIFEST_DIR = "_symlink_format_manifest"
SPECTRUM_SUFFIX = "_spectrum"

# cdcflow.cdc.bronze.bronze_rows (partitioned by table, date) and cdcflow.cdc.quarantine.QUARANTINE_ARROW.
BRONZE_COLUMNS = {
    "record_type": "string", "op": "string", "data": "map<string,string>", "before": "map<string,string>",
    "commit_ts": "timestamp", "transaction_id": "string", "transaction_record_id": "string",
    "stream_position": "string", "change_seq": "string", "control": "string", "source_position": "string",
    "arrival_ts": "timestamp", "problem": "string", "record_hash": "string", "feed": "string", "batch_id": "bigint",
    "snapshot_seq": "string",  # from a table's first DMS reload (batch.full_load); null before and elsewhere
}  # fmt: skip
BRONZE_PARTITIONS = {"table": "string", "date": "date"}
QUARANTINE_COLUMNS = {
    "table": "string", "rule": "string", "reason": "string", "source_position": "string", "payload": "string",
    "record_hash": "string", "batch_id": "bigint", "quarantined_at": "timestamp",
}  # fmt: skip


@dataclass(frozen=True)
class SyncResult:
    created: bool  # the table had no catalog entry: it was created
    updated: bool  # columns were added or widened: UpdateTable made a new table version
    added: tuple[str, ...] = ()
    widened: tuple[str, ...] = ()


def glue_table_name(table: Table) -> str:
    """Catalog name of a silver table: `<schema>_<table>` (the Glue database is the pipeline's)."""
    return f"{table.schema}_{table.table}".lower()


def silver_columns(table: Table) -> dict[str, str]:
    """Silver's columns as configured: declared columns (PII `hash`/`redact` hold strings, `drop` is
    absent) in config order, then the metadata columns."""
    out: dict[str, str] = {}
    pii = table.pii
    for name, ty in table.columns.items():
        if pii.get(name) == "drop":
            continue
        out[name] = "string" if name in pii else ty
    return {**out, **SILVER_META}


def delta_table_input(name: str, location: str, columns: Mapping[str, str],
                      partition_keys: Mapping[str, str] | None = None, description: str = "") -> dict[str, Any]:
    """A Glue TableInput for a native Delta table at `location` (the same shape the stack registers)."""
    parts = dict(partition_keys or {})
    return {
        "Name": name,
        "Description": description,
        "TableType": "EXTERNAL_TABLE",
        "Parameters": dict(DELTA_TABLE_PARAMETERS),
        "PartitionKeys": [{"Name": c, "Type": t} for c, t in parts.items()],
        "StorageDescriptor": {
            "Columns": [{"Name": c, "Type": t} for c, t in columns.items() if c not in parts],
            "Location": location,
            "InputFormat": PARQUET_INPUT,
            "OutputFormat": PARQUET_OUTPUT,
            "SerdeInfo": {"SerializationLibrary": PARQUET_SERDE, "Parameters": {"path": location}},
        },
    }


def spectrum_database(database: str) -> str:
    """The Glue database Redshift Spectrum's external schema maps: the manifest tables only."""
    return f"{database}{SPECTRUM_SUFFIX}"


def manifest_location(table_root: str) -> str:
    """Where a table's symlink manifests are (s3://, as Spectrum reads it; compaction writes there)."""
    root = table_root.rstrip("/")
    for prefix in ("s3a://", "s3n://"):
        if root.startswith(prefix):
            root = "s3://" + root[len(prefix):]
    return f"{root}/{MANIFEST_DIR}/"


def spectrum_table_input(name: str, table_root: str, columns: Mapping[str, str],
                         partition_keys: Mapping[str, str] | None = None, description: str = "") -> dict[str, Any]:
    """A Glue TableInput Spectrum reads: a Hive table over the symlink manifests of the Delta table
    at `table_root` (partition keys as the Delta table's; each partition is registered by compaction
    with LOCATION its manifest folder)."""
    parts = dict(partition_keys or {})
    location = manifest_location(table_root)
    return {
        "Name": name,
        "Description": description,
        "TableType": "EXTERNAL_TABLE",
        "Parameters": {"EXTERNAL": "TRUE", "classification": "parquet", "cdcflow.delta_location": table_root},
        "PartitionKeys": [{"Name": c, "Type": t} for c, t in parts.items()],
        "StorageDescriptor": {
            "Columns": [{"Name": c, "Type": t} for c, t in columns.items() if c not in parts],
            "Location": location,
            "InputFormat": SYMLINK_INPUT,
            "OutputFormat": SYMLINK_OUTPUT,
            "SerdeInfo": {"SerializationLibrary": PARQUET_SERDE, "Parameters": {"serialization.format": "1"}},
        },
    }


def _table_input(existing: dict[str, Any]) -> dict[str, Any]:
    """GetTable's Table -> the TableInput UpdateTable takes (only the keys TableInput allows)."""
    keys = ("Name", "Description", "Owner", "Retention", "StorageDescriptor", "PartitionKeys", "TableType",
            "Parameters", "ViewOriginalText", "ViewExpandedText", "TargetTable")
    return {k: existing[k] for k in keys if k in existing}


def sync_table_columns(glue: Any, database: str, name: str, columns: Mapping[str, str], *, location: str,
                       partition_keys: Mapping[str, str] | None = None,
                       table_input: Callable[..., dict[str, Any]] = delta_table_input) -> SyncResult:
    """Make the catalog entry `database.name` hold `columns` ({column: Spark/Hive type}, in table order).

    Columns are only ever added (at the end, in the given order) or widened (`is_widening`); a column
    missing from `columns` is kept (Delta never drops one) and a narrower type is ignored, as silver
    keeps its wider type. When something changed, `UpdateTable` (archive on) keeps the previous
    definition as a table version. A missing entry is created by `table_input` (`location` is the
    Delta table's root).
    Returns what changed; no call is made to UpdateTable when nothing did, so re-running is free.
    """
    try:
        current = glue.get_table(DatabaseName=database, Name=name)["Table"]
    except glue.exceptions.EntityNotFoundException:
        glue.create_table(DatabaseName=database, TableInput=table_input(name, location, columns, partition_keys))
        return SyncResult(created=True, updated=False, added=tuple(columns))
    table_input = _table_input(current)
    sd = table_input.setdefault("StorageDescriptor", {})
    cols: list[dict[str, Any]] = [dict(c) for c in sd.get("Columns", [])]
    partitions = {p["Name"] for p in table_input.get("PartitionKeys", [])}
    by_name = {c["Name"].lower(): c for c in cols}
    added: list[str] = []
    widened: list[str] = []
    for col, ty in columns.items():
        if col.lower() in partitions:
            continue
        have = by_name.get(col.lower())
        if have is None:
            cols.append({"Name": col, "Type": ty})
            added.append(col)
        elif have.get("Type", "").lower() != ty.lower() and is_widening(have.get("Type", ""), ty):
            have["Type"] = ty
            widened.append(col)
    if not added and not widened:
        return SyncResult(created=False, updated=False)
    sd["Columns"] = cols
    glue.update_table(DatabaseName=database, TableInput=table_input, SkipArchive=False)
    return SyncResult(created=False, updated=True, added=tuple(added), widened=tuple(widened))


def sync_silver_table(project: Project, table: str, columns: Mapping[str, str],
                      metrics: MetricsSink | None = None) -> SyncResult | None:
    """Keep silver table `table`'s catalog entries current after a job created or evolved it: the
    Delta one and the Spectrum one (`spectrum_database`, over the symlink manifests).

    `columns` are silver's data columns ({column: Spark/Hive type}, in table order; PII-masked
    columns as strings); the metadata columns are appended. Does nothing without a catalog database
    (env CDCFLOW_CATALOG_DATABASE, set by infra/). The catalog trails the lake, so a failed call is
    logged and alerted (CatalogSyncFailed), never raised: the data is already committed. Called by
    the stream (`BatchProcessor._sync_catalog`) and the full load alike.
    """
    database = os.environ.get(CATALOG_DATABASE_ENV)
    if not database:
        return None
    from cdcflow.aws import project_client

    t = project.table(table)
    columns = {**columns, **SILVER_META}
    location = project.path(t.delta_path)
    parts = {c: columns[c] for c in t.cfg.delta.partition_by if c in columns}
    result = None
    # the Delta entry (Athena, Spark), then the Spectrum one (same columns; partition keys as the Delta
    # table's); each on its own, so one failing doesn't keep the other stale
    for db, kw in ((database, {}),
                   (spectrum_database(database), {"partition_keys": parts, "table_input": spectrum_table_input})):
        try:
            synced = sync_table_columns(project_client(project, "glue"), db, glue_table_name(t), columns,
                                        location=location, **kw)
        except Exception as e:  # noqa: BLE001 - never fail a table whose data is committed for its catalog entry
            log.warning("table %s: catalog %s not updated: %s", table, db, e)
            if metrics is not None:
                metrics.alert("CatalogSyncFailed", table, type(e).__name__)
            continue
        if db == database:
            result = synced
    return result


def sync_partitions(glue: Any, database: str, name: str, partitions: tuple[dict[str, str], ...]) -> tuple[int, int]:
    """Make the Spectrum table `database.name`'s partitions the given ones (each {column: value}, for
    the table's partition keys), each at its manifest folder; returns (added, removed). Spectrum finds a
    partitioned table's files only through registered partitions."""
    table = glue.get_table(DatabaseName=database, Name=name)["Table"]
    keys = [k["Name"] for k in table.get("PartitionKeys", [])]
    if not keys:
        return 0, 0
    sd = table["StorageDescriptor"]
    root = sd["Location"].rstrip("/")
    want = {tuple(p[k] for k in keys) for p in partitions}
    have: set[tuple[str, ...]] = set()
    for page in glue.get_paginator("get_partitions").paginate(DatabaseName=database, TableName=name):
        have |= {tuple(p["Values"]) for p in page["Partitions"]}

    def entry(values: tuple[str, ...]) -> dict[str, Any]:
        from urllib.parse import quote

        folder = "/".join(f"{k}={v if v == '__HIVE_DEFAULT_PARTITION__' else quote(v, safe='')}"
                          for k, v in zip(keys, values, strict=True))
        return {"Values": list(values), "StorageDescriptor": {**sd, "Location": f"{root}/{folder}/"}}

    added, removed = sorted(want - have), sorted(have - want)
    for i in range(0, len(added), 100):  # BatchCreatePartition: 100 per call
        glue.batch_create_partition(DatabaseName=database, TableName=name,
                                    PartitionInputList=[entry(v) for v in added[i:i + 100]])
    for i in range(0, len(removed), 25):  # BatchDeletePartition: 25 per call
        glue.batch_delete_partition(DatabaseName=database, TableName=name,
                                    PartitionsToDelete=[{"Values": list(v)} for v in removed[i:i + 25]])
    return len(added), len(removed)


def sync_spectrum_partitions(project: Project, name: str, table_root: str,
                             partitions: tuple[dict[str, str], ...]) -> tuple[int, int] | None:
    """`sync_partitions` on the Spectrum entry `name` (compaction, after writing the manifests); gated
    by the catalog database like `sync_silver_table`, and never raises (logged)."""
    database = os.environ.get(CATALOG_DATABASE_ENV)
    if not database:
        return None
    from cdcflow.aws import project_client

    try:
        return sync_partitions(project_client(project, "glue"), spectrum_database(database), name, partitions)
    except Exception as e:  # noqa: BLE001 - Spectrum's partitions trail the lake; the next pass retries
        log.warning("%s (%s): Spectrum partitions not updated: %s", name, table_root, e)
        return None
