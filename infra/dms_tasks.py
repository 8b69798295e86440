"""DMS table mappings and task settings generated from configs/ (pure functions: no CDK, no AWS).

One replication task per target (`MIGRATION_TYPES`): each change reaches silver through one of them.
- Kinesis, `cdc`: every change after the task starts; a selection rule per configured table; the task's
  BeforeImageSettings put the primary key before-image under `dms.before_image_field` (what the parser
  reads to detect primary-key changes).
- S3, `full-load`: the tables' snapshots as LOAD files (the first load, and reloads) for the full-load
  job; the same selection rules plus, per table, a transformation rule adding the `$AR_H_CHANGE_SEQ`
  column (`batch.full_load.CHANGE_SEQ`) the full load orders CDC rows by, should a task of this target
  carry CDC (DMS's S3 target has no transaction details). BeforeImageSettings apply to JSON targets only,
  so the S3 task has none.
Started in that order (the CDC task first), no change falls between the two: one committed before a
table's snapshot is read is in the snapshot, and full-load rows sort below every change.
"""

from __future__ import annotations

from typing import Any

from cdcflow.config import Project
from cdcflow.sim.s3 import CHANGE_SEQ_COLUMN, DEFAULT_TIMESTAMP_COLUMN

TIMESTAMP_COLUMN = DEFAULT_TIMESTAMP_COLUMN  # S3 TimestampColumnName = batch.full_load ts_column default
CONTROL_SCHEMA = "awsdms_control"
KINESIS, S3 = "kinesis", "s3"
# Both tasks full-load-and-cdc had the stream and the full-load job apply every change once each (two
# `_seq` encodings that agree on commit time only; bronze held each change twice).
MIGRATION_TYPES = {KINESIS: "cdc", S3: "full-load"}


def _tables(project: Project) -> list[tuple[str, str]]:
    return sorted((t.schema, t.table) for t in project.tables.values())


def table_mappings(project: Project, target: str) -> dict[str, Any]:
    """The task's TableMappings: one selection rule per configured table (only those tables are
    replicated; the streaming job would redact and quarantine any other), plus the change-sequence
    column for S3. Rule ids are stable: rules follow the sorted table names."""
    rules: list[dict[str, Any]] = []
    for schema, table in _tables(project):
        rules.append({
            "rule-type": "selection",
            "rule-id": str(len(rules) + 1),
            "rule-name": f"include-{schema}-{table}",
            "object-locator": {"schema-name": schema, "table-name": table},
            "rule-action": "include",
        })
    if target == S3:
        for schema, table in _tables(project):
            rules.append({
                "rule-type": "transformation",
                "rule-id": str(len(rules) + 1),
                "rule-name": f"change-seq-{schema}-{table}",
                "rule-target": "column",
                "object-locator": {"schema-name": schema, "table-name": table},
                "rule-action": "add-column",
                "value": CHANGE_SEQ_COLUMN,
                "expression": CHANGE_SEQ_COLUMN,
                "data-type": {"type": "string", "length": 50},
            })
    elif target != KINESIS:
        raise ValueError(f"unknown DMS target {target!r}")
    return {"rules": rules}


def task_settings(project: Project, target: str, *, log_group_tasks: bool = True) -> dict[str, Any]:
    """ReplicationTaskSettings: CloudWatch logging, the DMS control tables, before-images (Kinesis)."""
    settings: dict[str, Any] = {
        "TargetMetadata": {"SupportLobs": True, "LimitedSizeLobMode": True, "LobMaxSize": 32,
                           "ParallelLoadThreads": 0, "BatchApplyEnabled": False},
        # S3 and Kinesis targets: never drop what is already there (a DROP_AND_CREATE would delete the
        # raw prefix's files); the pipeline's own apply is idempotent.
        "FullLoadSettings": {"TargetTablePrepMode": "DO_NOTHING", "CommitRate": 10000,
                             "MaxFullLoadSubTasks": 8},
        "Logging": {
            "EnableLogging": log_group_tasks,
            "LogComponents": [
                {"Id": c, "Severity": "LOGGER_SEVERITY_DEFAULT"}
                for c in ("SOURCE_UNLOAD", "SOURCE_CAPTURE", "TARGET_LOAD", "TARGET_APPLY", "TASK_MANAGER")
            ],
        },
        "ControlTablesSettings": {
            "ControlSchema": CONTROL_SCHEMA,
            "HistoryTimeslotInMinutes": 5,
            "HistoryTableEnabled": True,
            "SuspendedTablesTableEnabled": True,
            "StatusTableEnabled": True,
        },
        "ChangeProcessingDdlHandlingPolicy": {"HandleSourceTableDropped": True, "HandleSourceTableTruncated": True,
                                              "HandleSourceTableAltered": True},
        "ErrorBehavior": {"DataErrorPolicy": "LOG_ERROR", "TableErrorPolicy": "SUSPEND_TABLE",
                          "RecoverableErrorCount": -1, "RecoverableErrorInterval": 5,
                          "RecoverableErrorThrottling": True, "RecoverableErrorThrottlingMax": 1800},
    }
    if target == KINESIS:
        settings["BeforeImageSettings"] = {
            "EnableBeforeImage": True,
            "FieldName": project.pipeline.dms.before_image_field,
            "ColumnFilter": "pk-only",  # a key change is detected from the key alone
        }
    return settings
