"""The many-table plan (cdcflow.cdc.multi_table): tables delta-rs commits are typed, checked, masked
and collapsed in one Spark plan per micro-batch; the others keep their own plan. Both are checked
against the oracle (silver rows and history, quarantine counts per table and rule)."""

from __future__ import annotations

import random
from pathlib import Path

import pyarrow as pa
import pytest
from pyspark.sql import functions as F

from cdcflow.cdc import apply
from cdcflow.cdc.changes import TableShape
from cdcflow.cdc.multi_table import fits
from cdcflow.oracle import load_history
from cdcflow.runtime import to_arrow
from cdcflow.sim.synthetic import write_configs
from streaming.job import run_stream
from streaming.processor import SPREAD_BELOW_TABLES, TableOutcome, biggest_first, tables_worth
from streaming.sources import replay_stream
from tests.conftest import CONFIGS
from tests.streaming_helpers import (
    keep_on_own_plan,
    project_in,
    simulate_to,
    split_replay,
    tidy_customer,
    verify_against_oracle,
)

SYNTH_KEY_RULE = "{rule: not_null, columns: [id]}"  # a synthetic table's first raw_to_staging rule
FAULTS = dict(duplicate_rate=0.05, out_of_order_rate=0.1, late_rate=0.02, malformed_json_rate=0.01,
              missing_primary_key_rate=0.02, unknown_table_rate=0.01, type_mismatch_rate=0.02,
              dq_failure_rate=0.03, pk_change_rate=0.03)


def test_which_tables_the_shared_plan_takes(tmp_path: Path):
    cfg = write_configs(CONFIGS, tmp_path / "configs", 3)
    keep_on_own_plan(cfg, "synth.t0002", SYNTH_KEY_RULE, "name")
    t3 = cfg / "tables" / "synth.t0003.yaml"  # a rename in raw_to_staging (the name brought back): its own plan
    t3.write_text(t3.read_text() + "transforms:\n  raw_to_staging:\n    rename: {name: label}\n"
                  "    columns: {name: upper(label)}\n")
    project = project_in(tmp_path, cfg)
    taken = {name for name, t in project.tables.items() if fits(TableShape(t))}
    # customers' raw_to_staging transforms (a SQL expression and a DataFrame function) run in the plan
    assert taken == {"shop.customers", "shop.order_items", "shop.orders", "shop.products", "synth.t0001"}


def test_a_batch_queues_its_tables_most_records_first():
    outcomes = {name: TableOutcome(name, read=n) for name, n in [("cold", 2), ("hot", 900), ("warm", 40), ("tie", 40)]}
    assert biggest_first(outcomes) == ["hot", "warm", "tie", "cold"]  # ties keep the batch's order


def test_a_batch_of_few_tables_spreads_the_next_one_over_the_cores():
    assert tables_worth([12_500] * 4) == 4 < SPREAD_BELOW_TABLES  # the sample tables: spread
    skewed = [1e6 / rank**1.1 for rank in range(1, 1005)]  # target 2's shares: already even over the shards
    assert SPREAD_BELOW_TABLES < tables_worth(skewed) < 25
    assert tables_worth([1] * 1004) == 1004
    assert tables_worth([10_000, 3, 2]) < 1.01  # one table holds nearly everything: spread


@pytest.mark.spark
@pytest.mark.glue_compat
def test_shared_plan_and_own_plans_in_one_stream_verify_against_oracle(spark, tmp_path: Path):
    cfg = write_configs(CONFIGS, tmp_path / "configs", 3)
    keep_on_own_plan(cfg, "synth.t0003", SYNTH_KEY_RULE, "name")
    project = project_in(tmp_path, cfg)
    sim = tmp_path / "sim"
    simulate_to(project, sim, seed=21, events=500, partial_update_rate=0.5, dirty_value_rate=0.4, **FAULTS)
    changes = load_history(sim).changes
    partial = [c for c in changes if c["table"] == "shop.order_items" and c["op"] == "update"
               and None in c["data"].values()]
    assert len(partial) >= 5  # updates with NULL for "unchanged" reach the table that ignores them
    dirty = [c for c in changes if c["table"] == "shop.customers" and c.get("data")
             and tidy_customer(c["data"]) != c["data"]]
    assert len(dirty) >= 5  # untidy text for customers' transforms
    replay = split_replay(sim, tmp_path / "replay", batches=3)
    summary = run_stream(spark, project, replay_stream(spark, str(replay)), available_now=True)
    assert summary.batches == 3
    shared = {name for name, o in summary.tables.items() if o.shared_plan}
    assert shared == {"shop.customers", "shop.order_items", "shop.orders", "shop.products", "synth.t0001", "synth.t0002"}
    assert summary.tables["synth.t0003"].read and not summary.tables["synth.t0003"].shared_plan
    assert not [name for name, o in summary.tables.items() if o.isolated]
    quarantined = {name: o.quarantined for name, o in summary.tables.items()}
    assert all(quarantined[n] > 0 for n in ("shop.orders", "shop.products")), quarantined  # the faults reached them
    diffs = verify_against_oracle(spark, project, sim, transforms={"shop.customers": tidy_customer})
    bad = [d for d in diffs if not d.ok]
    assert not bad, [(d.table, d.kind, d.missing[:3], d.extra[:3], d.different[:3]) for d in bad]
    # The shared plan words its quarantine reasons as each table's own plan does.
    rows = spark.read.format("delta").load(project.path("quarantine")).filter(
        F.col("table").isin(sorted(shared)) & F.col("rule").isin("missing_primary_key", "type_mismatch")
    ).select("rule", "reason").collect()
    wording = {"missing_primary_key": "primary key (", "type_mismatch": "value does not fit the type of "}
    assert rows and all(r["reason"].startswith(wording[r["rule"]]) for r in rows), rows[:3]


@pytest.mark.spark
@pytest.mark.glue_compat
@pytest.mark.parametrize("seed", range(3))
def test_the_driver_collapse_is_sparks_collapse(spark, tmp_path: Path, seed: int):
    """The shared plan's collapse on the driver (`apply.latest_changes` over `_values` maps) keeps
    `apply.collapse`'s rule column for column: with ignore_null_updates each value the last non-null
    one from the key's latest insert/load/delete, `_partial` without one; for a table without it, the
    latest change as it is. Two tables' rows in one input, with the same keys."""
    rng = random.Random(seed)
    shape = TableShape(project_in(tmp_path, CONFIGS).table("shop.order_items"))
    assert shape.table.cfg.ignore_null_updates
    key, columns = shape.table.primary_key, list(shape.output_columns)
    rows = []
    for i in range(300):
        sparse = i % 2  # half the changes send NULLs, half send whole rows
        values = {c: str(rng.randint(1, 12)) if c in key else rng.choice([None, None, f"v{i}"]) if sparse else f"v{i}"
                  for c in columns}
        op = rng.choices(["update", "insert", "load", "delete"], [6, 2, 1, 1])[0]
        rows.append({**values, "_op": op, "_seq": f"{rng.randint(0, 10**6):012d}", "_commit_ts": None,
                     "_source_position": str(i)})
    schema = ", ".join(f"`{c}` string" for c in [*columns, "_op", "_seq"]) + ", _commit_ts timestamp, _source_position string"
    changes = spark.createDataFrame([tuple(r.values()) for r in rows], schema)
    wanted = [*columns, "_op", "_seq", "_partial"]
    expected = {tuple(r[c] for c in wanted) for r in apply.collapse(changes, shape).collect()}
    plain = {(*(r[c] for c in columns), r["_op"], r["_seq"], False)
             for r in apply.latest_per_key(changes, [F.col(k) for k in key]).collect()}

    def as_maps(table: str, ignore_nulls: bool):
        return changes.select(
            F.lit(table).alias("_table"), F.create_map(*[x for c in columns for x in (F.lit(c), F.col(c))]).alias("_values"),
            "_op", "_seq", "_commit_ts", "_source_position", F.to_json(F.array(*key)).alias("_key"),
            F.lit(ignore_nulls).alias("_ignore_nulls"))

    both = to_arrow(as_maps("t", True).unionByName(as_maps("plain", False)))
    merged = apply.latest_changes(both).to_pylist()
    got = {t: {tuple([*(dict(r["_values"])[c] for c in columns), r["_op"], r["_seq"], r["_partial"]])
               for r in merged if r["_table"] == t} for t in ("t", "plain")}
    latest = {}  # per key: its latest change
    for r in sorted(rows, key=lambda r: r["_seq"]):
        latest[tuple(r[k] for k in key)] = r
    ends_on_null = [r["_op"] == "update" and any(r[c] is None for c in columns) for r in latest.values()]
    assert any(ends_on_null) and not all(ends_on_null)  # keys folded and keys taken whole
    assert len(expected) == len(latest)  # one row a key
    assert any(r[-1] for r in expected) and not all(r[-1] for r in expected)  # partial and whole segments
    assert got["t"] == expected
    assert got["plain"] == plain


@pytest.mark.spark
def test_partial_updates_filled_row_by_row_as_the_collapse_folds_them(spark, tmp_path: Path):
    """`apply.fill_partial_updates` (the warehouse merge keeps every change): each update's NULL is
    the last non-null value of its key's changes from the latest insert/load/delete up to itself, as
    a walk through the changes in `_seq` order computes it; `_base` is that change's `_seq`.
    `apply.collapse` gives each key's latest walked row, `_partial` where the key had no base."""
    rng = random.Random(5)
    shape = TableShape(project_in(tmp_path, CONFIGS).table("shop.order_items"))
    key, columns = shape.table.primary_key, list(shape.output_columns)
    data = [c for c in columns if c not in key]
    seqs = rng.sample(range(10**6), 200)
    rows = [{**{c: str(rng.randint(1, 6)) if c in key else rng.choice([None, None, f"v{i}"]) for c in columns},
             "_op": rng.choices(["update", "insert", "load", "delete"], [6, 2, 1, 1])[0], "_seq": f"{seqs[i]:012d}",
             "_commit_ts": None, "_source_position": str(i)} for i in range(200)]
    schema = ", ".join(f"`{c}` string" for c in [*columns, "_op", "_seq"]) + ", _commit_ts timestamp, _source_position string"
    changes = spark.createDataFrame([tuple(r.values()) for r in rows], schema)

    expected, held = {}, {}  # by _seq: (values, _base); per key: (its last non-null values, _base)
    for r in sorted(rows, key=lambda r: r["_seq"]):
        k = tuple(r[c] for c in key)
        if r["_op"] != "update":
            held[k] = ({c: r[c] for c in data if r[c] is not None}, r["_seq"])
            expected[r["_seq"]] = ({c: r[c] for c in data}, r["_seq"])
            continue
        last, base = held.get(k, ({}, None))
        last = {**last, **{c: r[c] for c in data if r[c] is not None}}
        held[k] = (last, base)
        expected[r["_seq"]] = ({c: last.get(c) for c in data}, base)
    filled = apply.fill_partial_updates(changes, key, data).collect()
    assert {r["_seq"]: ({c: r[c] for c in data}, r["_base"]) for r in filled} == expected
    assert any(b is None for _, b in expected.values()) and any(None in v.values() for v, _ in expected.values())

    latest = {}  # per key: the walk's values at its latest change, and whether it had no base
    for r in sorted(rows, key=lambda r: r["_seq"]):
        values, base = expected[r["_seq"]]
        latest[tuple(r[c] for c in key)] = (*values.values(), r["_seq"], base is None)
    folded = {tuple(r[c] for c in key): tuple(r[c] for c in [*data, "_seq", "_partial"])
              for r in apply.collapse(changes, shape).collect()}
    assert folded == latest


def test_the_driver_collapse_of_nothing_and_of_a_delete_segment():
    """No rows (every shared-plan row of a batch quarantined) give no rows; a key whose segment starts
    at a delete without values folds the updates after it."""
    schema = pa.schema([("_table", pa.string()), ("_key", pa.string()), ("_values", pa.map_(pa.string(), pa.string())),
                        ("_op", pa.string()), ("_seq", pa.string()), ("_ignore_nulls", pa.bool_())])
    empty = apply.latest_changes(schema.empty_table())
    assert empty.num_rows == 0 and "_partial" in empty.column_names and "_key" not in empty.column_names
    rows = [("t", "[1]", None, "delete", "1", True), ("t", "[1]", [("a", "x"), ("b", None)], "update", "2", True),
            ("t", "[1]", [("a", None), ("b", None)], "update", "3", True),
            ("u", "[1]", [("a", None)], "update", "4", False)]
    rows = pa.Table.from_pylist([dict(zip(schema.names, r, strict=True)) for r in rows], schema)
    got = apply.latest_changes(rows)
    assert got.to_pylist() == [
        {"_table": "t", "_values": [("a", "x"), ("b", None)], "_op": "update", "_seq": "3", "_partial": False},
        {"_table": "u", "_values": [("a", None)], "_op": "update", "_seq": "4", "_partial": False},
    ]
