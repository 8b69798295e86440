"""Normalized changes of one table -> typed, ordered, checked, masked rows ready to apply.

Order of work: type the values, detect records that can't be applied (missing key, type mismatch,
no usable order), run the raw->staging data-quality rules on the real values, then mask PII. Nothing
is written before masking, and quarantine reasons never quote values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from cdcflow import quality
from cdcflow.cdc.masking import PREHASHED, mask_column, prehashed
from cdcflow.cdc.sequence import sequence
from cdcflow.config import Table
from cdcflow.transforms import apply_transforms

log = logging.getLogger("cdcflow.dq")

META = ["_op", "_seq", "_commit_ts", "_source_position"]
# A typed source (DMS Parquet) gives its values in this struct column instead of the `_data` text map.
VALUES = "_values"
# A DMS table reload's rows (and the deletes of keys its snapshot lacks) carry their whole `_seq` here:
# the snapshot's place among the table's changes (batch.full_load._reload). Bronze keeps it as `snapshot_seq`.
SNAPSHOT_SEQ = "_snapshot_seq"


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


class TypedChanges:
    """How one table's normalized changes become typed rows: `apply(norm)` -> (good, bad).

    good: key + columns + META + `_dq`, masked. bad: `_rule`, `_reason`, `_source_position`,
    `_record_hash`, `_payload` (masked). A primary-key change (update whose before-image key differs)
    becomes a delete of the old key plus the update of the new key, both at the change's sequence.

    The expressions are built once per table shape and source kind: that is about a thousand JVM
    calls, which the streaming job would otherwise repeat for every table in every micro-batch.
    `apply` only adds a few DataFrame steps over them.
    """

    def __init__(self, shape: TableShape, salt: str, value_fields: list[str] | None = None,
                 absent_order: tuple[str, ...] = (), spare: bool = False, snapshot_seq: bool = False):
        """`value_fields`: the fields of a typed source's `_values` struct; None for `_data` text.
        `absent_order`: ordering components the source doesn't carry (zeros: `sequence`'s `absent`).
        `spare`: the source carries `_prehashed` (the stream's), whose columns `hash` keeps as they are.
        `snapshot_seq`: the source carries `_snapshot_seq`, a whole `_seq` given to a reload's rows
        (`batch.full_load`), which wins over the one computed from the components."""
        t = shape.table
        cols = shape.columns
        self.shape = shape
        self.source = "_data" if value_fields is None else VALUES
        raw = _source_values(cols, value_fields)
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
                "source_pos": F.col("_source_position"),
            },
            absent_order,
        )
        if snapshot_seq:
            seq = F.coalesce(F.col(SNAPSHOT_SEQ), seq)
        missing_key = F.lit(False)
        for k in t.primary_key:
            missing_key = missing_key | typed[k].isNull()
        mismatched = [F.when(raw[c].isNotNull() & typed[c].isNull(), F.lit(c)) for c in cols]
        mismatch_cols = F.concat_ws(", ", *mismatched)
        bad_op = ~F.col("_op").isin("load", "insert", "update", "delete")
        rule, reason = _first_problem(
            [
                (F.col("_problem").isNotNull(), "parser", F.col("_problem")),
                (bad_op, "unknown_operation",
                 F.concat(F.lit("operation "), F.col("_op"), F.lit(" is not a data change"))),
                (missing_key, "missing_primary_key",
                 F.lit(f"primary key ({', '.join(t.primary_key)}) has a null value")),
                (mismatch_cols != "", "type_mismatch",
                 F.concat(F.lit("value does not fit the type of "), mismatch_cols)),
                (seq.isNull(), "no_ordering", F.lit(f"no usable order ({', '.join(t.ordering)})")),
            ]
        )  # fmt: skip
        self.row_columns = [
            *[typed[c].alias(c) for c in cols],
            F.col("_op"),
            seq.alias("_seq"),
            F.col("_commit_ts"),
            F.col("_source_position"),
            F.col("_record_hash"),
            F.col("_before"),
            F.col(self.source),
            *([F.col(PREHASHED)] if spare else []),
            F.coalesce(F.col("_problem"), rule).alias("_rule"),
            reason.alias("_reason"),
        ]
        # Data quality (raw -> staging) on rows that parsed; all rules in one pass. A delete carries
        # the key only (PostgreSQL): its other columns are not data to check.
        dq, self.dq_helpers = quality.row_checks(t.cfg.quality.raw_to_staging)
        self.dq = F.when(F.col("_op") == "delete", F.array().cast("array<" + quality.FAILURE + ">")).otherwise(dq)
        parsed_ok = F.col("_rule").isNull()
        dq_quarantine = F.exists("_dq", lambda x: x["severity"] == "quarantine")
        self.good_filter = parsed_ok & ~dq_quarantine
        self.bad_filter = ~parsed_ok | dq_quarantine
        # One quarantine row per record, in one pass: a parse problem names it, else the first failing
        # quarantine rule does, and the reason lists every failure.
        failing = F.filter("_dq", lambda x: x["severity"] == "quarantine")
        self.bad_columns = [
            F.when(parsed_ok, failing[0]["rule"]).otherwise(F.col("_rule")).alias("_rule"),
            F.when(parsed_ok, F.array_join(F.transform(failing, lambda x: x["reason"]), "; "))
            .otherwise(F.col("_reason")).alias("_reason"),
            F.col("_source_position"),
            F.col("_record_hash"),
            _masked_payload(shape, salt, raw, spare).alias("_payload"),
        ]
        self.key_change_filter, self.key_change_columns = _key_change_deletes(shape, self.source, spare)
        self.out_columns = [
            *[mask_column(F.col(c), t.pii[c], salt, prehashed(c) if spare else None).alias(c) if c in t.pii
              else F.col(c) for c in shape.output_columns],
            *[F.col(c) for c in META],
            F.col("_dq"),
        ]

    @property
    def counts_failures(self) -> bool:
        """Whether the table has warn / fail raw->staging rules (counted by `failures` before applying)."""
        return any(r.severity != "quarantine" for r in self.shape.table.cfg.quality.raw_to_staging)

    def failures(self, norm: DataFrame) -> quality.StageReport:
        """The raw->staging rules over `norm`'s records that parsed (deletes count as rows, unchecked): rows
        and failures per (rule, severity), one aggregate. Raises quality.DataQualityFailure when a fail
        rule passes its threshold (the report rides on the exception)."""
        rows = quality.add_checks(norm.select(*self.row_columns), self.dq, self.dq_helpers)
        return quality.report(rows.filter(F.col("_rule").isNull()), self.shape.table.name, "raw_to_staging",
                              self.shape.table.cfg.quality.raw_to_staging)

    def apply(self, norm: DataFrame) -> tuple[DataFrame, DataFrame]:
        rows = quality.add_checks(norm.select(*self.row_columns), self.dq, self.dq_helpers)
        good = rows.filter(self.good_filter)
        bad = rows.filter(self.bad_filter).select(*self.bad_columns)
        # raw -> staging transforms (standardise values) run on the real values, before masking.
        stage = self.shape.table.cfg.transforms.raw_to_staging
        if not stage.empty:
            good = apply_transforms(good, stage)
        # (Where `_before` is a null literal, as for Parquet sources, the optimizer drops the deletes.)
        good = good.unionByName(good.filter(self.key_change_filter).select(*self.key_change_columns))
        return good.select(*self.out_columns), bad


def typed_changes(norm: DataFrame, shape: TableShape, salt: str,
                  absent_order: tuple[str, ...] = ()) -> tuple[DataFrame, DataFrame]:
    """(good, bad) rows of `norm` (one table's normalized changes): see TypedChanges. A table with warn /
    fail raw->staging rules is counted first (one aggregate): warn failures are logged, and a fail rule
    over its threshold raises quality.DataQualityFailure before anything is applied (the full load)."""
    typed = TypedChanges(shape, salt, value_fields(norm), absent_order, PREHASHED in norm.columns,
                         SNAPSHOT_SEQ in norm.columns)
    if typed.counts_failures:
        rep = typed.failures(norm)
        for (rule, severity), n in sorted(rep.failures.items()):
            if severity != "quarantine":
                log.info("%s raw_to_staging: rule %s (%s) failed on %d of %d rows", rep.table, rule, severity, n,
                         rep.rows)
    return typed.apply(norm)


def value_fields(df: DataFrame) -> list[str] | None:
    """The fields of a typed source's `_values` struct (DMS Parquet), or None for `_data` text."""
    return df.schema[VALUES].dataType.fieldNames() if VALUES in df.columns else None


def _source_values(columns: dict[str, str], value_fields: list[str] | None) -> dict[str, Column]:
    """Each column's value as the source gave it: from `_values` for typed sources (no round trip
    through text), else the text in `_data`. A column the source lacks is null."""
    if value_fields is None:
        return {c: F.col("_data")[c] for c in columns}
    present = set(value_fields)
    return {c: F.col(VALUES)[c] if c in present else F.lit(None) for c in columns}


def masked_payload(shape: TableShape, salt: str, df: DataFrame) -> Column:
    """The record's data (of `df`) as JSON with PII masked (drop columns removed), for quarantine rows."""
    return _masked_payload(shape, salt, _source_values(shape.columns, value_fields(df)), PREHASHED in df.columns)


def _masked_payload(shape: TableShape, salt: str, values: dict[str, Column], spare: bool) -> Column:
    pii = shape.table.pii
    entries = []
    for c in shape.columns:
        method = pii.get(c)
        if method == "drop":
            continue
        v = values[c].cast("string")
        entries += [F.lit(c), mask_column(v, method, salt, prehashed(c) if spare else None) if method else v]
    return F.to_json(F.create_map(*entries)) if entries else F.lit("{}")


def _key_change_deletes(shape: TableShape, source: str, spare: bool) -> tuple[Column, list[Column]]:
    """(which good rows change their key, the delete of the old key each one adds: its columns)."""
    t = shape.table
    before = F.col("_before")
    old_key = {k: before[k].cast(shape.columns[k]) for k in t.primary_key}
    changed = F.lit(False)
    for k in t.primary_key:
        changed = changed | (old_key[k].isNotNull() & ~old_key[k].eqNullSafe(F.col(k)))
    moves = (F.col("_op") == "update") & before.isNotNull() & changed
    carried = ["_seq", "_commit_ts", "_source_position", "_record_hash", "_before", source,
               *([PREHASHED] if spare else []), "_rule", "_reason", "_dq"]
    columns = [
        *[
            old_key[c].alias(c) if c in t.primary_key else F.lit(None).cast(shape.columns[c]).alias(c)
            for c in shape.columns
        ],
        F.lit("delete").alias("_op"),
        *[F.col(c) for c in carried],
    ]
    return moves, columns
