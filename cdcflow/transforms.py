"""Apply one stage's configured transforms (`transforms.<stage>` of a table) to a DataFrame.

Order: `rename` (old -> new), then every `columns` expression in one projection (new or replaced
columns, each a Spark SQL expression over the renamed row), then the `sql` statements in order, each
over the temp view `input` holding the previous result; the last statement's result is the output.
The view name is session-scoped and the streaming job transforms tables in parallel threads, so
creating the view and analysing the statement happen under one lock (the plan is resolved by then).
"""

from __future__ import annotations

import threading

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from cdcflow.config.models import StageTransforms

_VIEW_LOCK = threading.Lock()


def apply_transforms(df: DataFrame, tr: StageTransforms) -> DataFrame:
    if tr.rename:
        df = df.withColumnsRenamed(dict(tr.rename))
    if tr.columns:
        replaced = [F.expr(tr.columns[c]).alias(c) if c in tr.columns else F.col(f"`{c}`") for c in df.columns]
        added = [F.expr(e).alias(c) for c, e in tr.columns.items() if c not in df.columns]
        df = df.select(*replaced, *added)
    for statement in tr.sql:
        with _VIEW_LOCK:
            df.createOrReplaceTempView("input")
            df = df.sparkSession.sql(statement)
    return df
