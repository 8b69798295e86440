"""1000 tables in one streaming job: the replay completes and verifies against the oracle.

Part of `make test` since the many-table plan: one Spark plan per micro-batch for all 1004 tables and
a delta-rs commit per table (2:19 here on 2 cores, against 21-24 minutes with a Spark plan and MERGE
per table). `make test-scale` runs it alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cdcflow.sim.synthetic import write_configs
from streaming.job import run_stream
from streaming.sources import replay_stream
from tests.conftest import CONFIGS
from tests.streaming_helpers import project_in, simulate_to, split_replay, verify_against_oracle

pytestmark = pytest.mark.spark


def test_thousand_table_replay_completes_and_verifies(spark, tmp_path: Path):
    project = project_in(tmp_path, write_configs(CONFIGS, tmp_path / "configs", 1000))
    assert len(project.tables) == 1004
    sim = tmp_path / "sim"
    simulate_to(project, sim, seed=13, events=3000, duplicate_rate=0.05, out_of_order_rate=0.1, late_rate=0.02,
                missing_primary_key_rate=0.005, dq_failure_rate=0.01)
    replay = split_replay(sim, tmp_path / "replay", batches=2)
    summary = run_stream(spark, project, replay_stream(spark, str(replay)), available_now=True)
    assert summary.batches == 2
    assert len(summary.tables) == 1004  # every table was touched (each has at least its full-load rows)
    assert not [t for t, o in summary.tables.items() if o.isolated]
    assert sum(o.duplicates for o in summary.tables.values()) > 0
    # Bronze (after the round of commits at this many tables; the first batch's input spread over the
    # cores) holds every delivered record once. A replayed line's position is its file and its text's
    # hash, which a redelivery in the same file shares.
    files = [f.read_text().splitlines() for f in replay.glob("*.jsonl")]
    bronze = spark.read.format("delta").load(project.path("bronze"))
    assert bronze.count() == sum(len(lines) for lines in files)
    assert bronze.select("source_position").distinct().count() == sum(len(set(lines)) for lines in files)
    # Reading 1004 tables back would keep each one's snapshot state (~2.5 MB of heap) in Delta's
    # DeltaLog cache and exhaust the 2 GB session; read_silver forgets each table after reading it.
    diffs = verify_against_oracle(spark, project, sim)
    bad = [d for d in diffs if not d.ok]
    assert not bad, [(d.table, d.kind, d.missing[:2], d.extra[:2], d.different[:2]) for d in bad[:5]]
    current = [d for d in diffs if d.kind == "current"]
    assert {d.table for d in current} == set(project.tables)  # silver of every table was compared
    assert all(d.expected_count > 0 for d in current)  # and each holds rows: nothing vacuous
