"""Read what the pipeline produced (silver Delta tables, quarantine, warehouse SCD2) as plain rows for verify."""

from __future__ import annotations

from typing import Any

from pyspark.sql import SparkSession
from pyspark.sql.utils import AnalysisException

from cdcflow.config import Project


def read_silver(spark: SparkSession, project: Project) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for name, t in project.tables.items():
        try:
            df = spark.read.format("delta").load(project.path(t.delta_path))
        except AnalysisException:
            out[name] = []
            continue
        out[name] = [r.asDict() for r in df.collect()]
    return out


def read_quarantine(spark: SparkSession, project: Project) -> list[dict[str, Any]]:
    """Quarantine rows, one per delivered bad record (redeliveries of one record count once)."""
    try:
        df = spark.read.format("delta").load(project.path("quarantine"))
    except AnalysisException:
        return []
    return [r.asDict() for r in df.dropDuplicates(["table", "rule", "record_hash"]).collect()]
