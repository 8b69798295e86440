"""Apply one stage's configured transforms (`transforms.<stage>` of a table) to a DataFrame.

One implementation for every job: the streaming job and the full load run `raw_to_staging` (through
cdcflow.cdc.changes.TypedChanges), the warehouse merge the later stages (batch.stages.run_stage).
Order: `rename` (old -> new), then every `columns` expression in one projection (new or replaced
columns, each a Spark SQL expression over the renamed row), then the `sql` statements in order, each
over the temp view `input` holding the previous result, then the DataFrame-API `functions` in order
(`module:function`, called as function(df, **params)); the last step's result is the output.
The view name is session-scoped and the streaming job transforms tables in parallel threads, so
creating the view and analysing the statement happen under one lock (the plan is resolved by then).
"""

from __future__ import annotations

import threading

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from cdcflow.config.functions import load_function
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
    for step in tr.functions:
        out = load_function(step.function)(df, **step.params)
        if not isinstance(out, DataFrame):
            raise TypeError(f"transform {step.function} returned {type(out).__name__}, not a DataFrame")
        df = out
    return df
