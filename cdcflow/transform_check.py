"""`cdcflow validate`'s check of SQL and DataFrame-API transforms on a sample frame (needs Spark).

Each stage's transforms run on one row of nulls shaped as the stage's input (declared columns and
the change metadata the jobs carry); the output must keep the primary key, the ordering and change
columns (`_op`, `_seq`, `_commit_ts`), every declared column the stage hands on, and each function's
declared `outputs`. The config loader already checked that every function imports and is callable.
"""

from __future__ import annotations

import json

from pyspark.sql import DataFrame, SparkSession

from cdcflow.config import STAGES, Project, Table
from cdcflow.config.functions import load_function
from cdcflow.errors import ConfigError, ConfigProblem
from cdcflow.transforms import apply_transforms

CARRIED = ["_op", "_seq", "_commit_ts"]  # change metadata every stage's output keeps


def stage_input_columns(table: Table, stage: str) -> dict[str, str]:
    """The columns a stage's transforms see: raw_to_staging the typed source values (before masking);
    the warehouse stages bronze's (masked columns as strings, dropped ones absent)."""
    cols = {c: col.type for c, col in table.cfg.columns.items()}
    if stage != "raw_to_staging":
        cols = {c: "string" if col.pii else col.type for c, col in table.cfg.columns.items() if col.pii != "drop"}
    return {**cols, "_op": "string", "_seq": "string", "_commit_ts": "timestamp", "_source_position": "string"}


def _sample(spark: SparkSession, columns: dict[str, str]) -> DataFrame:
    ddl = ", ".join(f"`{c}` {t}" for c, t in columns.items())
    return spark.createDataFrame([tuple(None for _ in columns)], ddl)


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


def check_table(spark: SparkSession, table: Table, stages: tuple[str, ...] = STAGES) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    for stage in stages:
        tr = getattr(table.cfg.transforms, stage)
        if not (tr.sql or tr.functions):
            continue  # rename / columns are checked at load time
        where = f"transforms.{stage}"
        columns = stage_input_columns(table, stage)
        try:
            df = apply_transforms(_sample(spark, columns), tr.model_copy(update={"functions": []}))
            df.columns  # noqa: B018 - analyses the plan
        except Exception as e:  # noqa: BLE001 - the user's SQL: reported, not raised
            problems.append(ConfigProblem(table.file, f"{where}.sql", _why(e)))
            continue
        failed = False
        for i, step in enumerate(tr.functions):
            try:
                out = load_function(step.function)(df, **step.params)
                if not isinstance(out, DataFrame):
                    raise TypeError(f"returned {type(out).__name__}, not a DataFrame")
                out.limit(1).collect()  # runs the function's expressions on the sample row
            except Exception as e:  # noqa: BLE001 - the user's function: reported, not raised
                problems.append(ConfigProblem(table.file, f"{where}.functions[{i}].function", _why(e)))
                failed = True
                break
            missing = [c for c in step.outputs if c not in out.columns]
            if missing:
                problems.append(ConfigProblem(table.file, f"{where}.functions[{i}].outputs",
                                              f"the output has no column {', '.join(missing)}"))
            df = out
        if failed:
            continue
        needed = [c for c in columns if c != "_source_position"]
        lost = [c for c in needed if c not in df.columns]
        if lost:
            keys = [c for c in lost if c in table.primary_key]
            what = "the primary key " if keys else ""
            problems.append(ConfigProblem(table.file, where, f"the transforms drop {what}column(s) {', '.join(lost)}: "
                                          "key, ordering and declared columns must stay"))
    return problems


def check_transforms(spark: SparkSession, project: Project) -> list[ConfigProblem]:
    return [p for t in project.tables.values() for p in check_table(spark, t)]


_PASSED: set[str] = set()  # transform configs already checked in this process (jobs restart often in tests)


def require_valid_transforms(spark: SparkSession, project: Project, stages: tuple[str, ...] = STAGES,
                             names: list[str] | None = None) -> None:
    """Every job's start (the stream and the full load: raw_to_staging; the warehouse merge: every
    stage): the same check as `cdcflow validate`, so SQL or a function that drops the key, an ordering
    column or a declared column stops the job with the file, key path and reason before it reads
    anything, rather than isolating the table in every micro-batch. Only tables with SQL or function
    steps in those stages (of the tables `names`, when given: a job's own tables); `rename` / `columns`
    were checked when the configs loaded."""
    tables = [t for t in project.tables.values() if (names is None or t.name in names)
              and any(getattr(t.cfg.transforms, s).sql or getattr(t.cfg.transforms, s).functions for s in stages)]
    key = json.dumps([stages] + [(t.name, t.file, t.cfg.model_dump(mode="json", include={"columns", "transforms"}))
                                 for t in tables], sort_keys=True, default=str)
    if not tables or key in _PASSED:
        return
    problems = [p for t in tables for p in check_table(spark, t, stages)]
    if problems:
        raise ConfigError(problems)
    _PASSED.add(key)


def needs_spark(project: Project) -> bool:
    return any(getattr(t.cfg.transforms, s).sql or getattr(t.cfg.transforms, s).functions
               for t in project.tables.values() for s in STAGES)
