"""The many-table plan (cdcflow.cdc.multi_table): tables delta-rs commits are typed, checked, masked
and collapsed in one Spark plan per micro-batch; the others keep their own plan. Both are checked
against the oracle (silver rows and history, quarantine counts per table and rule)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pyspark.sql import functions as F

from cdcflow.cdc.changes import TableShape
from cdcflow.cdc.multi_table import fits
from cdcflow.sim.synthetic import write_configs
from streaming.job import run_stream
from streaming.processor import TableOutcome, biggest_first
from streaming.sources import replay_stream
from tests.conftest import CONFIGS
from tests.streaming_helpers import project_in, simulate_to, split_replay, verify_against_oracle

FAULTS = dict(duplicate_rate=0.05, out_of_order_rate=0.1, late_rate=0.02, malformed_json_rate=0.01,
              missing_primary_key_rate=0.02, unknown_table_rate=0.01, type_mismatch_rate=0.02,
              dq_failure_rate=0.03, pk_change_rate=0.03)


def test_which_tables_the_shared_plan_takes(tmp_path: Path):
    project = project_in(tmp_path, write_configs(CONFIGS, tmp_path / "configs", 1))
    taken = {name for name, t in project.tables.items() if fits(TableShape(t))}
    # customers has raw->staging transforms, order_items ignore_null_updates: their own plans.
    assert taken == {"shop.orders", "shop.products", "synth.t0001"}


def test_a_batch_queues_its_tables_most_records_first():
    outcomes = {name: TableOutcome(name, read=n) for name, n in [("cold", 2), ("hot", 900), ("warm", 40), ("tie", 40)]}
    assert biggest_first(outcomes) == ["hot", "warm", "tie", "cold"]  # ties keep the batch's order


@pytest.mark.spark
@pytest.mark.glue_compat
def test_shared_plan_and_own_plans_in_one_stream_verify_against_oracle(spark, tmp_path: Path):
    project = project_in(tmp_path, write_configs(CONFIGS, tmp_path / "configs", 3))
    sim = tmp_path / "sim"
    simulate_to(project, sim, seed=21, events=500, **FAULTS)
    replay = split_replay(sim, tmp_path / "replay", batches=3)
    summary = run_stream(spark, project, replay_stream(spark, str(replay)), available_now=True)
    assert summary.batches == 3
    shared = {name for name, o in summary.tables.items() if o.shared_plan}
    assert shared == {"shop.orders", "shop.products", "synth.t0001", "synth.t0002", "synth.t0003"}
    assert not [name for name, o in summary.tables.items() if o.isolated]
    quarantined = {name: o.quarantined for name, o in summary.tables.items()}
    assert all(quarantined[n] > 0 for n in ("shop.orders", "shop.products")), quarantined  # the faults reached them
    diffs = verify_against_oracle(spark, project, sim)
    bad = [d for d in diffs if not d.ok]
    assert not bad, [(d.table, d.kind, d.missing[:3], d.extra[:3], d.different[:3]) for d in bad]
    # The shared plan words its quarantine reasons as each table's own plan does.
    rows = spark.read.format("delta").load(project.path("quarantine")).filter(
        F.col("table").isin(sorted(shared)) & F.col("rule").isin("missing_primary_key", "type_mismatch")
    ).select("rule", "reason").collect()
    wording = {"missing_primary_key": "primary key (", "type_mismatch": "value does not fit the type of "}
    assert rows and all(r["reason"].startswith(wording[r["rule"]]) for r in rows), rows[:3]
