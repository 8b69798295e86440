"""Many small tables' changes in one Spark plan: typed, checked, masked and collapsed together.

A table's own plan (cdcflow.cdc.changes.TypedChanges, then apply.collapse) costs about 0.67 s of
driver time whatever its size: PySpark analyses each step, Catalyst optimizes a projection of a few
hundred expressions, and the collapse runs a job of two stages (docs/design.md, "Silver writer").
At 1000 tables that is minutes per micro-batch. This plan's size does not grow with the tables:
each column's type and PII method, each table's key, ordering and rule set come from a small
table-info frame joined by broadcast (a row per table: its maps column -> type / PII method /
position), and the values travel as text in a map (Spark's own rendering of the
typed value, which Arrow reads back exactly). One Arrow collect then brings every table's changes
to the driver, which collapses them (apply.latest_changes) and delta-rs commits each table's slice
(apply.merge_rows).

The rules are the ones the per-table plan uses, called with the map as their column source:
Spark's cast, `quality.rule_failure`, `masking.mask_column`, `sequence.sequence`, the first-problem
order of `changes`, `apply.collapse`'s rule on the driver (`apply.latest_changes`), and the MERGE of
`apply.merge_clauses`.

Tables it takes (`fits`): committed by delta-rs, raw->staging rules that read only their own row
(not `unique` or `expression`) with severity quarantine (warn / fail rules are counted before the
commit, on the table's own plan: TypedChanges.failures), and column types that Arrow reads back from
Spark's text. A table's raw->staging transforms (cdcflow.transforms, the function its own plan calls)
run on a branch of the checked rows: its typed values as columns, transformed, back into the map, so
the checks see the values as the source sent them and masking sees them transformed, as in the own
plan. A `rename` (silver would lose the column) or a column named like the plan's own (`_...`) keeps
the table on its own plan.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from cdcflow import quality
from cdcflow.cdc.apply import REJECTED, latest_changes, spark_commits
from cdcflow.cdc.changes import TableShape, _first_problem
from cdcflow.cdc.masking import PREHASHED, mask_column, prehashed
from cdcflow.cdc.schema import arrow_type
from cdcflow.cdc.sequence import sequence
from cdcflow.runtime import materialize, release, sql_in, to_arrow
from cdcflow.transforms import apply_transforms

ROW_RULES = {"not_null", "range", "accepted_values", "regex", "valid_date"}

def fits(shape: TableShape) -> bool:
    t = shape.table
    stage = t.cfg.transforms.raw_to_staging
    return not (
        spark_commits(t)
        # transforms: the table's columns become real columns beside the plan's own (`_`) ones
        or (not stage.empty and (bool(stage.rename) or any(c.startswith("_") for c in shape.columns)))
        or any(r.rule not in ROW_RULES or r.severity != "quarantine" for r in t.cfg.quality.raw_to_staging)
        or any(arrow_type(ty) is None for ty in shape.columns.values())
    )


# A row per table, joined to its records by broadcast. Literal maps keyed by `table|column` were
# tried first: at 1000 tables each lookup scans ~8,000 entries (a literal map is searched linearly)
# and every reference repeats the folded literal in the plan's text, which Spark's SQL UI store
# keeps per execution: the 1000-table replay ran the 2 GB driver out of heap in its first batch.
TABLE_INFO = ("_table string, _t_types map<string,string>, _t_pii map<string,string>, "
              "_t_position map<string,string>, _t_keys array<string>, _t_key_reason string, _t_ordering int, "
              "_t_no_order string, _t_rule_set int, _t_ignore_nulls boolean")


def union_all(parts: list[DataFrame]) -> DataFrame:
    """The union of frames with the same columns in the same order, as a balanced tree: a chain is
    analysed again at each step (200 tables' transform branches: a collect's driver time 29 -> 25 s)."""
    while len(parts) > 1:
        parts = [parts[i].union(parts[i + 1]) if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
    return parts[0]


class MultiTableChanges:
    """`collect(norm)` -> per table: (collapsed changes as Arrow with `_values` text map, rejected rows)."""

    def __init__(self, shapes: dict[str, TableShape], salt: str):
        assert all(fits(s) for s in shapes.values())
        self.shapes = shapes
        self._info: tuple[SparkSession, DataFrame] | None = None
        types, pii, position, keys = (F.col(f"_t_{c}") for c in ("types", "pii", "position", "keys"))
        distinct_types = sorted({ty for s in shapes.values() for ty in s.columns.values()})

        def typed_text(v: Column, ty: Column) -> Column:
            """The value cast to its column's type (the per-table plan's cast), as Spark renders it."""
            out = F.when(ty == distinct_types[0], v.cast(distinct_types[0]).cast("string"))
            for name in distinct_types[1:]:
                out = out.when(ty == name, v.cast(name).cast("string"))
            return out

        def masked(k: Column, v: Column, method: Column) -> Column:
            return (F.when(method == "hash", mask_column(v, "hash", salt, prehashed(k)))
                    .when(method == "redact", mask_column(v, "redact", salt)).otherwise(v))

        not_dropped = lambda k, v: F.coalesce(pii[k], F.lit("")) != "drop"  # noqa: E731
        kept = lambda k, v: types[k].isNotNull() & not_dropped(k, v)  # noqa: E731 - configured, not dropped
        data = F.col("_data")
        self.typed_columns = [
            # Over the table's configured columns, whose type is then the lambda's own value: over the
            # record's entries, the type was looked up once per CASE branch until one matched. These
            # lambdas run interpreted, once per entry. A configured column the record lacks is a null
            # value here, which every reader of `_typed` takes as the text's null.
            F.when(data.isNotNull(), F.transform_values(types, lambda k, ty: typed_text(data[k], ty))).alias("_typed"),
            F.transform_values(F.map_filter("_before", lambda k, v: F.array_contains(keys, k)),
                               lambda k, v: typed_text(v, types[k])).alias("_old_key"),
        ]

        # The checks of TypedChanges, table by table from the maps.
        typed = F.col("_typed")
        # `_typed` holds the table's configured columns, so a value that does not fit its type is a null
        # typed value whose text is not null: the text is looked up for null typed values only (three
        # lookups an entry of the record cost ~6% of the tasks' CPU).
        mismatched = F.map_keys(F.map_filter(typed, lambda k, v: v.isNull() & F.col("_data")[k].isNotNull()))
        in_column_order = F.transform(
            F.array_sort(F.transform(mismatched, lambda k: F.concat(position[k], F.lit("|"), k))),
            lambda x: F.substring(x, 7, 1 << 20))
        mismatch_cols = F.array_join(in_column_order, ", ")
        orderings = sorted({s.table.ordering for s in shapes.values()})
        ordering_of = F.col("_t_ordering")
        is_load = F.col("_op") == "load"
        parts = {"commit_ts": F.col("_commit_ts"), "txn_id": F.col("_txn_id"), "txn_rec_id": F.col("_txn_rec_id"),
                 "stream_pos": F.col("_stream_pos"), "change_seq": F.col("_change_seq")}
        seq = F.when(ordering_of == 0, sequence(orderings[0], is_load, parts))
        for i, ordering in enumerate(orderings[1:], start=1):
            seq = seq.when(ordering_of == i, sequence(ordering, is_load, parts))
        rule, reason = _first_problem(
            [
                (F.col("_problem").isNotNull(), "parser", F.col("_problem")),
                (~F.col("_op").isin("load", "insert", "update", "delete"), "unknown_operation",
                 F.concat(F.lit("operation "), F.col("_op"), F.lit(" is not a data change"))),
                (F.exists(keys, lambda k: typed[k].isNull()), "missing_primary_key", F.col("_t_key_reason")),
                (F.size(mismatched) > 0, "type_mismatch", F.concat(F.lit("value does not fit the type of "), mismatch_cols)),
                (seq.isNull(), "no_ordering", F.col("_t_no_order")),
            ]
        )  # fmt: skip
        self.check_columns = [
            "_table", "_typed", "_old_key", "_op", seq.alias("_seq"), "_commit_ts", "_source_position",
            "_record_hash", "_before", "_data", PREHASHED, F.coalesce(F.col("_problem"), rule).alias("_rule"),
            reason.alias("_reason"), "_t_types", "_t_pii", "_t_keys", "_t_rule_set", "_t_ignore_nulls",
        ]  # fmt: skip

        # Data quality: one branch per distinct rule set (tables sharing rules and column types share one).
        empty = F.array().cast("array<" + quality.FAILURE + ">")
        rule_sets: dict[str, int] = {}
        branches: list[Column] = []
        set_of: dict[str, int] = {}
        for name, s in shapes.items():
            rules = s.table.cfg.quality.raw_to_staging
            if not rules:
                continue
            signature = json.dumps([[r.model_dump(mode="json") for r in rules], s.columns], sort_keys=True)
            if signature not in rule_sets:
                rule_sets[signature] = len(branches)
                value: Callable[[str], Column] = lambda c, s=s: typed[c].cast(s.columns[c])  # noqa: E731
                dq, helpers = quality.row_checks(rules, value)
                assert not helpers  # row rules only (fits)
                branches.append(dq)
            set_of[name] = rule_sets[signature]
        dq = empty
        if branches:
            rule_set = F.col("_t_rule_set")
            dq = F.when(rule_set == 0, branches[0])
            for i, branch in enumerate(branches[1:], start=1):
                dq = dq.when(rule_set == i, branch)
            dq = F.coalesce(dq, empty)
        self.dq = F.when(F.col("_op") == "delete", empty).otherwise(dq)

        parsed_ok = F.col("_rule").isNull()
        dq_quarantine = F.exists("_dq", lambda x: x["severity"] == "quarantine")
        self.good_filter = parsed_ok & ~dq_quarantine
        failing = F.filter("_dq", lambda x: x["severity"] == "quarantine")
        payload = F.transform_values(F.map_filter("_data", kept), lambda k, v: masked(k, v, pii[k]))
        self.bad_columns = [
            "_table",
            F.when(parsed_ok, failing[0]["rule"]).otherwise(F.col("_rule")).alias("_rule"),
            F.when(parsed_ok, F.array_join(F.transform(failing, lambda x: x["reason"]), "; "))
            .otherwise(F.col("_reason")).alias("_reason"),
            "_source_position", "_record_hash", F.to_json(payload).alias("_payload"),
        ]  # fmt: skip
        self.bad_filter = ~parsed_ok | dq_quarantine
        # A primary-key change: a delete of the old key at the change's sequence (TypedChanges' rule).
        old = F.col("_old_key")
        changed = F.exists(keys, lambda k: old[k].isNotNull() & ~old[k].eqNullSafe(typed[k]))
        self.key_change_filter = (F.col("_op") == "update") & F.col("_before").isNotNull() & changed
        self.out_columns = [
            "_table",
            F.when(F.size(pii) == 0, F.col("_typed"))  # a table without PII: nothing to mask or drop
            .otherwise(F.transform_values(F.map_filter("_typed", not_dropped), lambda k, v: masked(k, v, pii[k])))
            .alias("_values"),
            "_op", "_seq", "_commit_ts", "_source_position",
            F.to_json(F.transform(keys, lambda k: F.col("_values")[k])).alias("_key"),
            F.col("_t_ignore_nulls").alias("_ignore_nulls"),
        ]  # fmt: skip
        self.info_rows = [
            (name, dict(s.columns), dict(s.table.pii), {c: f"{i:05d}" for i, c in enumerate(s.columns)},
             list(s.table.primary_key), f"primary key ({', '.join(s.table.primary_key)}) has a null value",
             orderings.index(s.table.ordering), f"no usable order ({', '.join(s.table.ordering)})", set_of.get(name),
             s.table.cfg.ignore_null_updates)
            for name, s in shapes.items()
        ]

    def _table_info(self, spark: SparkSession) -> DataFrame:
        if self._info is None or self._info[0] is not spark:
            self._info = (spark, spark.createDataFrame(self.info_rows, TABLE_INFO))
        return F.broadcast(self._info[1])

    def _transformed(self, good: DataFrame, plan: list[str], name: str) -> DataFrame:
        """One table's checked rows through its raw -> staging transforms (cdcflow.transforms, as its own
        plan runs them): its typed values as columns, transformed, then back into `_typed` as text. A
        branch per table, as in its own plan: a `sql` step or a function may read other rows (a window)."""
        columns = self.shapes[name].columns
        typed = F.col("_typed")
        df = good.filter(F.col("_table") == name).select(*plan, *[typed[c].cast(ty).alias(c) for c, ty in columns.items()])
        df = apply_transforms(df, self.shapes[name].table.cfg.transforms.raw_to_staging)
        text = F.create_map(*[x for c, ty in columns.items() for x in (F.lit(c), F.col(c).cast(ty).cast("string"))])
        return df.select(*[text.alias(c) if c == "_typed" else c for c in plan])  # `plan`'s order: union_all

    def collect(self, norm: DataFrame, tables: list[str]) -> dict[str, tuple[pa.Table, list[dict]]]:
        """`norm`'s data records of `tables` (some of these) -> per table (collapsed changes, rejected
        rows): two Spark jobs, whatever the number of tables (the checked rows kept, then one collect)."""
        rows = norm.filter(sql_in("_table", tables) & (F.col("_record_type") == "data")
                           & F.col("_problem").isNull()).join(self._table_info(norm.sparkSession), "_table")
        # Typed and checked once, kept for the three branches that read them (changes, primary-key
        # moves, rejected rows): a union recomputes each branch from its source, and this projection
        # is most of the job (1004 tables, 40k records: 14.7 s as one plan, 4.4 s with the checkpoint).
        checked = materialize(rows.select("*", *self.typed_columns).select(*self.check_columns)
                              .withColumn("_dq", self.dq))
        try:
            good = checked.filter(self.good_filter)
            moved = good.filter(self.key_change_filter).withColumn("_typed", F.col("_old_key")).withColumn(
                "_op", F.lit("delete"))
            # raw -> staging transforms run on the checked values, before masking (TypedChanges' order).
            staged = [name for name in tables if not self.shapes[name].table.cfg.transforms.raw_to_staging.empty]
            if staged:
                plan = good.columns  # `good`'s columns (a JVM call), the order every branch keeps
                good = union_all([good.filter(~sql_in("_table", staged)),
                                  *(self._transformed(good, plan, n) for n in staged)])
            # Collapsed on the driver (apply.latest_changes): a window here shuffled and sorted every row.
            changes = good.unionByName(moved).select(*self.out_columns)
            bad = checked.filter(self.bad_filter).select(*self.bad_columns)
            both = to_arrow(changes.withColumn("_rule", F.lit(None).cast("string"))
                            .unionByName(bad, allowMissingColumns=True))
        finally:
            release(checked)
        # Split by table: the changes sorted by table once, then a zero-copy slice per table (a take
        # and two filters per table cost ~0.5 s of a 1004-table batch, before any commit could start).
        ok = pc.is_null(both["_rule"])
        good = latest_changes(both.filter(ok))  # sorted by table
        counts = pc.value_counts(good["_table"])  # in order of first appearance: the sorted order
        spans, start = {}, 0
        for name, n in zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True):
            spans[name], start = (start, n), start + n
        good = good.select(["_values", "_op", "_seq", "_commit_ts", "_partial"])
        rejected: dict[str, list[dict]] = {}
        for row in both.filter(pc.invert(ok)).select(["_table", *REJECTED]).to_pylist():
            rejected.setdefault(row.pop("_table"), []).append(row)
        return {name: (good.slice(*spans.get(name, (0, 0))), rejected.get(name, [])) for name in tables}
