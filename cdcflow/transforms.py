"""Apply one stage's configured transforms (`transforms.<stage>` of a table) to a DataFrame.

Order: `rename` (old -> new), then every `columns` expression in one projection (new or replaced
columns, each a Spark SQL expression over the renamed row), then the `sql` statements in order, each
over the temp view `input` holding the previous result; the last statement's result is the output.
Stages run one after another in a job, so the session-scoped view name `input` is not shared.
"""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from cdcflow.config.models import StageTransforms


def apply_transforms(df: DataFrame, tr: StageTransforms) -> DataFrame:
    if tr.rename:
        df = df.withColumnsRenamed(dict(tr.rename))
    if tr.columns:
        replaced = [F.expr(tr.columns[c]).alias(c) if c in tr.columns else F.col(f"`{c}`") for c in df.columns]
        added = [F.expr(e).alias(c) for c, e in tr.columns.items() if c not in df.columns]
        df = df.select(*replaced, *added)
    for statement in tr.sql:
        df.createOrReplaceTempView("input")
        df = df.sparkSession.sql(statement)
    return df
