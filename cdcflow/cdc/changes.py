"""Normalized changes of one table -> typed, ordered, checked, masked rows ready to apply.

Order of work: type the values, detect records that can't be applied (missing key, type mismatch,
no usable order), run the raw->staging data-quality rules on the real values, then mask PII. Nothing
is written before masking, and quarantine reasons never quote values.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from cdcflow import quality
from cdcflow.cdc.masking import mask_column
from cdcflow.cdc.sequence import sequence
from cdcflow.config import Table
from cdcflow.transforms import apply_transforms

META = ["_op", "_seq", "_commit_ts", "_source_position"]
# A typed source (DMS Parquet) gives its values in this struct column instead of the `_data` text map.
VALUES = "_values"


@dataclass(frozen=True)
class TableShape:
    """The columns a table's changes carry: declared ones plus any added by schema drift."""

    table: Table
    extra: tuple[tuple[str, str], ...] = ()  # (name, type) added by drift, in order

    @property
    def columns(self) -> dict[str, str]:
        return {**self.table.columns, **dict(self.extra)}

    @property
    def output_columns(self) -> list[str]:
        """What silver stores: everything but PII `drop` columns."""
        drop = {c for c, m in self.table.pii.items() if m == "drop"}
        return [c for c in self.columns if c not in drop]

    def output_type(self, column: str) -> str:
        return "string" if column in self.table.pii else self.columns[column]


def _first_problem(checks: list[tuple[Column, str, Column | str]]) -> tuple[Column, Column]:
    """(rule, reason) of the first failing check, or nulls."""
    rule = F.lit(None).cast("string")
    reason = F.lit(None).cast("string")
    for failed, name, why in reversed(checks):
        rule = F.when(failed, F.lit(name)).otherwise(rule)
        reason = F.when(failed, why if isinstance(why, Column) else F.lit(why)).otherwise(reason)
    return rule, reason


def typed_changes(norm: DataFrame, shape: TableShape, salt: str) -> tuple[DataFrame, DataFrame]:
    """(good rows: key + columns + META, masked; bad rows: _rule, _reason, _source_position, _payload).

    A primary-key change (update whose before-image key differs) becomes a delete of the old key
    plus the update of the new key, both at the change's sequence.
    """
    t = shape.table
    cols = shape.columns
    source = VALUES if VALUES in norm.columns else "_data"
    raw = source_values(norm, cols)
    typed = {c: raw[c].cast(ty) for c, ty in cols.items()}
    is_load = F.col("_op") == "load"
    seq = sequence(
        t.ordering,
        is_load,
        {
            "commit_ts": F.col("_commit_ts"),
            "txn_id": F.col("_txn_id"),
            "txn_rec_id": F.col("_txn_rec_id"),
            "stream_pos": F.col("_stream_pos"),
            "change_seq": F.col("_change_seq"),
        },
    )
    missing_key = F.lit(False)
    for k in t.primary_key:
        missing_key = missing_key | typed[k].isNull()
    mismatched = [F.when(raw[c].isNotNull() & typed[c].isNull(), F.lit(c)) for c in cols]
    mismatch_cols = F.concat_ws(", ", *mismatched)
    bad_op = ~F.col("_op").isin("load", "insert", "update", "delete")
    rule, reason = _first_problem(
        [
            (F.col("_problem").isNotNull(), "parser", F.col("_problem")),
            (bad_op, "unknown_operation", F.concat(F.lit("operation "), F.col("_op"), F.lit(" is not a data change"))),
            (missing_key, "missing_primary_key", F.lit(f"primary key ({', '.join(t.primary_key)}) has a null value")),
            (mismatch_cols != "", "type_mismatch", F.concat(F.lit("value does not fit the type of "), mismatch_cols)),
            (seq.isNull(), "no_ordering", F.lit(f"no usable order ({', '.join(t.ordering)})")),
        ]
    )
    rows = norm.select(
        *[typed[c].alias(c) for c in cols],
        F.col("_op"),
        seq.alias("_seq"),
        F.col("_commit_ts"),
        F.col("_source_position"),
        F.col("_record_hash"),
        F.col("_before"),
        F.col(source),
        F.coalesce(F.col("_problem"), rule).alias("_rule"),
        reason.alias("_reason"),
    )
    # Data quality (raw -> staging) on rows that parsed; all rules in one pass.
    rows = quality.evaluate(rows, t.cfg.quality.raw_to_staging)
    # A delete carries the key only (PostgreSQL): its other columns are not data to check.
    rows = rows.withColumn("_dq", F.when(F.col("_op") == "delete", F.array().cast("array<" + quality.FAILURE + ">"))
                           .otherwise(F.col("_dq")))
    parsed_ok = F.col("_rule").isNull()
    dq_quarantine = F.exists("_dq", lambda x: x["severity"] == "quarantine")
    good = rows.filter(parsed_ok & ~dq_quarantine)
    # One quarantine row per record, in one pass: a parse problem names it, else the first failing
    # quarantine rule does, and the reason lists every failure.
    failing = F.filter("_dq", lambda x: x["severity"] == "quarantine")
    bad = rows.filter(~parsed_ok | dq_quarantine).select(
        F.when(parsed_ok, failing[0]["rule"]).otherwise(F.col("_rule")).alias("_rule"),
        F.when(parsed_ok, F.array_join(F.transform(failing, lambda x: x["reason"]), "; "))
        .otherwise(F.col("_reason")).alias("_reason"),
        "_source_position",
        "_record_hash",
        masked_payload(shape, salt, rows).alias("_payload"),
    )

    # raw -> staging transforms (standardise values) run on the real values, before masking.
    stage = t.cfg.transforms.raw_to_staging
    if stage.columns or stage.sql or stage.rename:
        good = apply_transforms(good, stage)
    good = _split_key_changes(good, shape)
    out = [mask_column(F.col(c), t.pii[c], salt).alias(c) if c in t.pii else F.col(c) for c in shape.output_columns]
    return good.select(*out, *META, "_dq"), bad


def source_values(df: DataFrame, columns: dict[str, str]) -> dict[str, Column]:
    """Each column's value as the source gave it: from `_values` for typed sources (DMS Parquet: no
    round trip through text), else the text in `_data`. A column the source lacks is null."""
    if VALUES not in df.columns:
        return {c: F.col("_data")[c] for c in columns}
    present = set(df.schema[VALUES].dataType.fieldNames())
    return {c: F.col(VALUES)[c] if c in present else F.lit(None) for c in columns}


def masked_payload(shape: TableShape, salt: str, df: DataFrame) -> Column:
    """The record's data (of `df`) as JSON with PII masked (drop columns removed), for quarantine rows."""
    pii = shape.table.pii
    values = source_values(df, shape.columns)
    entries = []
    for c in shape.columns:
        method = pii.get(c)
        if method == "drop":
            continue
        v = values[c].cast("string")
        entries += [F.lit(c), mask_column(v, method, salt) if method else v]
    return F.to_json(F.create_map(*entries)) if entries else F.lit("{}")


def _split_key_changes(good: DataFrame, shape: TableShape) -> DataFrame:
    """Add a delete of the old key for every update whose before-image names a different key.

    (Where `_before` is a null literal, as for Parquet sources, the optimizer drops the second branch.)
    """
    t = shape.table
    before = F.col("_before")
    old_key = {k: before[k].cast(shape.columns[k]) for k in t.primary_key}
    changed = F.lit(False)
    for k in t.primary_key:
        changed = changed | (old_key[k].isNotNull() & ~old_key[k].eqNullSafe(F.col(k)))
    key_moves = good.filter((F.col("_op") == "update") & before.isNotNull() & changed)
    source = VALUES if VALUES in good.columns else "_data"
    carried = ["_seq", "_commit_ts", "_source_position", "_record_hash", "_before", source, "_rule", "_reason", "_dq"]
    deletes = key_moves.select(
        *[
            old_key[c].alias(c) if c in t.primary_key else F.lit(None).cast(shape.columns[c]).alias(c)
            for c in shape.columns
        ],
        F.lit("delete").alias("_op"),
        *[F.col(c) for c in carried],
    )
    return good.unionByName(deletes)
