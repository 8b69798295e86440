"""One data-quality + transform stage of a table: raw_to_staging, staging_to_dimension or dimension_to_fact.

    run_stage(spark, project, table, df, stage, references) -> StageResult

All the stage's rules are evaluated in one pass (cdcflow.quality.evaluate: one `_dq` array column),
counted in one aggregate (cdcflow.quality.report, which raises DataQualityFailure when a `fail` rule
passes its threshold, before anything is written). `warn` failures are only counted; rows failing a
`quarantine` rule are removed and returned as quarantine rows (one per failure: rule, reason, source
position, masked payload) for the quarantine Delta table. The stage's transforms then run on the
rows kept. Deletes (`_op` delete / D) carry only their key and are not checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.utils import AnalysisException

from cdcflow import quality
from cdcflow.cdc.quarantine import append_quarantine
from cdcflow.config import Project, Table
from cdcflow.quality import ReferenceLookup, StageReport
from cdcflow.transforms import apply_transforms

META_PREFIX = "_"


@dataclass
class StageResult:
    good: DataFrame  # rows kept (transformed), without `_dq`
    quarantine_rows: list[tuple] = field(default_factory=list)  # QUARANTINE_ARROW rows
    report: StageReport | None = None


def silver_references(spark: SparkSession, project: Project) -> ReferenceLookup:
    """Referential lookups against the referenced table's silver Delta table (live rows only)."""

    def lookup(table: str, column: str) -> DataFrame:
        path = project.path(project.table(table).delta_path)
        try:
            df = spark.read.format("delta").load(path)
        except AnalysisException:  # no silver yet: nothing exists, so every reference fails
            t = project.table(table)
            return spark.createDataFrame([], f"`{column}` {t.columns[column]}")
        return df.filter(~F.col("_is_deleted")).select(column)

    return lookup


def run_stage(
    spark: SparkSession,
    project: Project,
    table: Table,
    df: DataFrame,
    stage: str,
    references: ReferenceLookup | None = None,
    batch_id: int = -1,
) -> StageResult:
    rules = table.cfg.quality.stage(stage)
    transforms = getattr(table.cfg.transforms, stage)
    if not rules:
        return StageResult(apply_transforms(df, transforms), [], StageReport(table.name, stage, 0))
    checked = quality.evaluate(df, rules, references)
    if "_op" in df.columns:
        empty = F.array().cast(f"array<{quality.FAILURE}>")
        checked = checked.withColumn("_dq", F.when(F.col("_op").isin("delete", "D"), empty).otherwise(F.col("_dq")))
    checked = checked.persist()
    try:
        rep = quality.report(checked, table.name, stage, rules)  # raises DataQualityFailure over a threshold
        good, bad = quality.split(checked)
        q_rows = _quarantine_rows(bad, table, stage, batch_id) if _any_quarantine(rep) else []
        kept = good.drop("_dq")
    except BaseException:
        checked.unpersist()
        raise
    return StageResult(apply_transforms(kept, transforms), q_rows, rep)


def _any_quarantine(rep: StageReport) -> bool:
    return any(sev == "quarantine" and n for (_, sev), n in rep.failures.items())


def _quarantine_rows(bad: DataFrame, table: Table, stage: str, batch_id: int) -> list[tuple]:
    data_cols = [c for c in bad.columns if not c.startswith(META_PREFIX)]
    pos = F.col("_source_position") if "_source_position" in bad.columns else F.lit(None).cast("string")
    if "_record_hash" in bad.columns:
        rhash = F.col("_record_hash")
    else:
        rhash = F.xxhash64(*[F.col(f"`{c}`") for c in data_cols],
                           *([F.col("_seq")] if "_seq" in bad.columns else [])).cast("string")
    payload = F.to_json(F.struct(*[F.col(f"`{c}`") for c in data_cols]))
    rows = bad.select(
        F.col("_rule"), F.concat(F.lit(f"{stage}: "), F.col("_reason")).alias("_reason"),
        pos.alias("pos"), payload.alias("payload"), rhash.alias("hash"),
    ).collect()
    now = datetime.now(UTC).replace(tzinfo=None)
    return [(table.name, r[0], r[1], r[2], r[3], r[4], batch_id, now) for r in rows]


def write_quarantine(spark: SparkSession, project: Project, rows: list[tuple]) -> None:
    append_quarantine(project.path("quarantine"), rows)
