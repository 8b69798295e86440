"""Config-driven data quality: every rule of a stage evaluated in one pass over the rows.

Each rule becomes a Spark expression yielding a failure struct (rule, reason, severity) or null;
the failures of a row are one array column `_dq`. Reasons never quote values (they may be PII).
Nulls pass every rule but not_null, as in dbt tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from cdcflow.config.models import Rule
from cdcflow.errors import UserError

FAILURE = "struct<rule:string,reason:string,severity:string>"

# (referenced "<schema>.<table>", column) -> DataFrame with that column holding the valid values
ReferenceLookup = Callable[[str, str], DataFrame]


class DataQualityFailure(UserError):
    """A rule with severity=fail went over its threshold: a batch job stops before applying anything;
    the streaming job isolates the table for the micro-batch instead (its records to quarantine)."""

    def __init__(self, message: str, rule: str = "", report: StageReport | None = None):
        super().__init__(message)
        self.rule, self.report = rule, report


@dataclass
class StageReport:
    table: str
    stage: str
    rows: int
    failures: dict[tuple[str, str], int] = field(default_factory=dict)  # (rule, severity) -> rows

    def as_dict(self) -> dict:
        return {
            "table": self.table,
            "stage": self.stage,
            "rows": self.rows,
            "failures": [{"rule": r, "severity": s, "rows": n} for (r, s), n in sorted(self.failures.items())],
        }


def _failure(rule: Rule, failed: Column, reason: Column | str) -> Column:
    reason_col = F.lit(reason) if isinstance(reason, str) else reason
    return F.when(
        failed, F.struct(F.lit(rule.rule_name).alias("rule"), reason_col.alias("reason"), F.lit(rule.severity).alias("severity"))
    )


def _bound(value: str) -> Column:
    """A date bound: ISO literal, or now / now+Nd / now-Nd."""
    v = value.strip().lower()
    if v.startswith("now"):
        days = int(v[3:].rstrip("d") or 0) if len(v) > 3 else 0
        return F.current_timestamp() + F.expr(f"INTERVAL {days} DAYS")
    return F.lit(value).cast("timestamp")


def rule_failure(rule: Rule, value: Callable[[str], Column] = F.col) -> tuple[Column, tuple[str, Column] | None]:
    """The failure expression of one row-level rule, and the helper column (name, expression) it
    reads when it needs one (a window). Expressions only: they apply to any rows with the columns.

    `value` resolves a column name to its typed value: the rows' column by default; the streaming
    job's many-table plan (cdcflow.cdc.multi_table) reads it from a map of every table's values."""
    r = rule.rule
    if r == "not_null":
        nulls = [F.when(value(c).isNull(), F.lit(c)) for c in rule.columns]
        failed = F.concat_ws(", ", *nulls)
        return _failure(rule, failed != "", F.concat(failed, F.lit(" is null"))), None
    if r == "valid_date":
        col = value(rule.column)
        ts = F.to_timestamp(col, rule.format) if rule.format else col.cast("timestamp")
        bad = col.isNotNull() & ts.isNull()
        out = F.lit(False)
        if rule.min:
            out = out | (ts < _bound(rule.min))
        if rule.max:
            out = out | (ts > _bound(rule.max))
        reason = F.when(bad, F.lit(f"{rule.column} is not a valid date")).otherwise(
            F.lit(f"{rule.column} outside [{rule.min or '-inf'}, {rule.max or '+inf'}]")
        )
        return _failure(rule, bad | F.coalesce(out, F.lit(False)), reason), None
    if r == "range":
        col = value(rule.column)
        out = F.lit(False)
        if rule.min is not None:
            out = out | (col < F.lit(rule.min))
        if rule.max is not None:
            out = out | (col > F.lit(rule.max))
        lo = "-inf" if rule.min is None else f"{rule.min:g}"
        hi = "+inf" if rule.max is None else f"{rule.max:g}"
        return _failure(rule, F.coalesce(out, F.lit(False)), f"{rule.column} outside [{lo}, {hi}]"), None
    if r == "accepted_values":
        col = value(rule.column)
        return _failure(rule, col.isNotNull() & ~col.cast("string").isin([str(v) for v in rule.values]),
                        f"{rule.column} not in accepted values"), None
    if r == "regex":
        col = value(rule.column).cast("string")
        return _failure(rule, col.isNotNull() & ~col.rlike(rule.pattern), f"{rule.column} does not match pattern"), None
    if r == "expression":
        return _failure(rule, ~F.coalesce(F.expr(rule.expression), F.lit(True)), f"failed: {rule.expression}"), None
    if r == "unique":
        flag = f"_dq_dup_{abs(hash(tuple(rule.columns))) % 10**8}"
        duplicated = F.count(F.lit(1)).over(Window.partitionBy(*rule.columns)) > 1
        all_set = F.lit(True)
        for c in rule.columns:
            all_set = all_set & F.col(c).isNotNull()
        return _failure(rule, F.col(flag) & all_set, f"{', '.join(rule.columns)} not unique"), (flag, duplicated)
    raise ValueError(f"rule {r} needs a reference lookup")


def evaluate(df: DataFrame, rules: list[Rule], references: ReferenceLookup | None = None) -> DataFrame:
    """Add `_dq`: the array of failures of each row over all the given rules (one pass, one select)."""
    failures: list[Column] = []
    helpers: list[tuple[str, Column]] = []
    joined: list[str] = []
    for rule in rules:
        if rule.rule == "referential":
            if references is None:
                raise ValueError("referential rules need a reference lookup")
            schema, table, column = rule.references.split(".")
            flag = f"_dq_ref_{len(joined)}"
            ref = references(f"{schema}.{table}", column).select(F.col(column).alias(flag)).distinct()
            df = df.join(F.broadcast(ref), F.col(rule.column) == F.col(flag), "left")
            failed = F.col(rule.column).isNotNull() & F.col(flag).isNull()
            failures.append(_failure(rule, failed, f"{rule.column} not found in {rule.references}"))
            joined.append(flag)
        else:
            failure, helper = rule_failure(rule)
            failures.append(failure)
            helpers += [helper] if helper else []
    return add_checks(df, failure_array(failures), helpers).drop(*joined)


def row_checks(rules: list[Rule], value: Callable[[str], Column] = F.col) -> tuple[Column, list[tuple[str, Column]]]:
    """`_dq` of row-level rules (all but referential) as an expression, with the helper columns it
    reads: built once, then added to any rows with `add_checks`."""
    parts = [rule_failure(rule, value) for rule in rules]
    return failure_array([f for f, _ in parts]), [h for _, h in parts if h]


def failure_array(failures: list[Column]) -> Column:
    return F.filter(F.array(*failures), lambda x: x.isNotNull()) if failures else F.array().cast(f"array<{FAILURE}>")


def add_checks(df: DataFrame, dq: Column, helpers: list[tuple[str, Column]]) -> DataFrame:
    """`df` with the `_dq` column (helper columns are added first, then dropped)."""
    if helpers:
        df = df.withColumns(dict(helpers))
    return df.withColumn("_dq", dq).drop(*[name for name, _ in helpers])


def split(df: DataFrame) -> tuple[DataFrame, DataFrame]:
    """(rows to keep, quarantine rows: one per quarantine-severity failure with rule and reason)."""
    quarantined = F.exists("_dq", lambda x: x["severity"] == "quarantine")
    good = df.filter(~quarantined)
    bad = df.filter(quarantined).withColumn("_f", F.explode("_dq")).filter(F.col("_f.severity") == "quarantine")
    bad = bad.withColumn("_rule", F.col("_f.rule")).withColumn("_reason", F.col("_f.reason")).drop("_f")
    return good, bad


def report(df: DataFrame, table: str, stage: str, rules: list[Rule]) -> StageReport:
    """Count rows and failures per rule in one aggregate; raise when a fail-severity rule passes its threshold."""
    rep = count_failures(df, table, stage)
    check_thresholds(rep, rules)
    return rep


def count_failures(df: DataFrame, table: str, stage: str) -> StageReport:
    """Rows of `df` and its `_dq` failures per (rule, severity), in one aggregate: a marker entry added
    to every row's failures counts the rows."""
    marker = F.struct(*[F.lit(None).cast("string").alias(f) for f in ("rule", "reason", "severity")])
    counts = (df.select(F.explode(F.concat(F.array(marker), F.col("_dq"))).alias("f"))
              .groupBy("f.rule", "f.severity").count().collect())
    rows = sum(r["count"] for r in counts if r["rule"] is None)
    return StageReport(table, stage, rows, {(r["rule"], r["severity"]): r["count"] for r in counts if r["rule"]})


def check_thresholds(rep: StageReport, rules: list[Rule]) -> None:
    """Raise DataQualityFailure for the first fail-severity rule whose failing rows / rows pass its threshold."""
    rows = rep.rows
    for rule in rules:
        if rule.severity == "fail":
            n = rep.failures.get((rule.rule_name, "fail"), 0)
            if rows and n / rows > rule.fail_threshold:
                raise DataQualityFailure(
                    f"{rep.table} {rep.stage}: rule {rule.rule_name} failed on {n} of {rows} rows "
                    f"({n / rows:.1%} > threshold {rule.fail_threshold:.1%})", rule.rule_name, rep)
