"""`cdcflow warehouse-merge` from the lake: simulate -> stream (replay) into bronze/silver -> merge from bronze
-> the warehouse SCD2 dimensions equal the oracle's; incremental runs, re-runs change nothing, facts get
surrogate keys. Real Spark, real Delta, the embedded Postgres."""

from __future__ import annotations

import json
import shutil
import uuid
from decimal import Decimal
from pathlib import Path

import psycopg
import pytest
import yaml
from pyspark.sql import functions as F

from batch.full_load import run_full_load
from batch.warehouse_job import merge_from_lake
from cdcflow.actual import read_warehouse_facts, read_warehouse_scd2
from cdcflow.aws import client
from cdcflow.oracle import build_oracle, load_history, resolve_salt, scd2_tables
from cdcflow.verify import compare_current, compare_scd2, read_actual, verify
from streaming.job import run_stream
from streaming.sources import replay_stream
from tests.conftest import CONFIGS
from tests.streaming_helpers import project_in, simulate_to, split_replay
from tests.warehouse_helpers import redshift_on_postgres

# The Glue 5.1 tier runs the lake test only: it takes merge_from_lake (bronze read by Spark, both
# warehouse drivers) through Spark 3.5. The others add feeds (the full load's, proved on 3.5 by
# tests/test_full_load.py) and CLI wiring, none a Spark path of its own (CI's 20-minute budget).
pytestmark = [pytest.mark.spark, pytest.mark.stack]


def config_with_schema(tmp: Path, schema: str) -> Path:
    """The sample configs with a private warehouse schema (the embedded Postgres is shared by the session)."""
    dest = tmp / "configs"
    shutil.copytree(CONFIGS, dest)
    p = dest / "pipeline.yaml"
    p.write_text(p.read_text().replace("schema: analytics", f"schema: {schema}"))
    return dest


def snapshot(url: str, schema: str) -> dict[str, list[tuple]]:
    with psycopg.connect(url) as conn:
        names = [r[0] for r in conn.execute(
            "select table_name from information_schema.tables where table_schema = %s and "
            "(table_name like 'dim_%%' or table_name like 'fct_%%')", (schema,)).fetchall()]
        return {n: sorted(map(repr, conn.execute(f'select * from {schema}."{n}"').fetchall())) for n in names}


# Warehouse-stage transforms, a Spark SQL one (`columns`) and a DataFrame-API one in each stage, and the
# oracle's reading of them (from their meaning, on the masked values the stages see).
STAGE_TRANSFORMS = {
    ("shop.customers", "staging_to_dimension"): {
        "columns": {"segment": "upper(segment)"},
        "functions": [{"function": "shop_transforms:normalise_text", "params": {"columns": ["country"], "case": "lower"}}]},
    ("shop.orders", "dimension_to_fact"): {
        "columns": {"total_amount": "cast(total_amount * 2 as decimal(12,2))"},
        "functions": [{"function": "shop_transforms:normalise_text", "params": {"columns": ["status"], "case": "upper"}}]},
}


def _customer_dim(row: dict) -> dict:
    return {**row, "segment": row["segment"] and row["segment"].upper(),
            "country": row["country"] and " ".join(row["country"].split()).lower()}


def _order_fact(row: dict) -> dict:
    return {**row, "total_amount": row["total_amount"] and Decimal(str(row["total_amount"])) * 2,
            "status": row["status"] and " ".join(row["status"].split()).upper()}


def with_stage_transforms(cfg: Path) -> None:
    for (table, stage), tr in STAGE_TRANSFORMS.items():
        f = cfg / "tables" / f"{table}.yaml"
        data = yaml.safe_load(f.read_text())
        data.setdefault("transforms", {})[stage] = tr
        if stage == "dimension_to_fact":  # referential rules look up silver at merge time: not in the oracle
            data["quality"].pop(stage, None)
        f.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.mark.glue_compat
def test_warehouse_merge_from_lake_matches_oracle_incrementally_and_reruns_are_noops(spark, stack, tmp_path):
    schema = f"wh_{uuid.uuid4().hex[:8]}"
    cfg = config_with_schema(tmp_path, schema)
    with_stage_transforms(cfg)
    project = project_in(tmp_path, cfg, CDCFLOW_WAREHOUSE_URL=stack.pg_url)
    sim = tmp_path / "sim"
    simulate_to(project, sim, events=300, duplicate_rate=0.05, out_of_order_rate=0.1, late_rate=0.03,
                pk_change_rate=0.03, missing_primary_key_rate=0.01, dq_failure_rate=0.02)
    # Three batches (a stream batch costs several seconds): the second merge reads two of them at once.
    replay = split_replay(sim, tmp_path / "replay", batches=3)
    # The first batch, a merge, then the rest and a second merge: watermarks carry the position.
    first, rest = tmp_path / "in1", tmp_path / "in2"
    first.mkdir()
    files = sorted(replay.glob("*.jsonl"))
    for f in files[:1]:
        shutil.copy2(f, first)
    run_stream(spark, project, replay_stream(spark, str(first)), available_now=True)
    run1 = merge_from_lake(spark, project, stack.pg_url)
    assert run1.error is None and all(t.to_batch == {"stream": 0} for t in run1.tables if t.changes)
    rest.mkdir()
    for f in files:
        shutil.copy2(f, rest)
    # The same checkpoint: the stream continues with the files it has not read yet (batch ids 1, 2).
    shutil.rmtree(first)
    first.symlink_to(rest, target_is_directory=True)
    run_stream(spark, project, replay_stream(spark, str(first)), available_now=True)
    run2 = merge_from_lake(spark, project, stack.pg_url)
    assert {t.table: t.from_batch for t in run2.tables if t.changes} and all(
        t.from_batch == {"stream": 0} and t.to_batch == {"stream": 2} for t in run2.tables if t.changes)

    stage_transforms = {("shop.customers", "staging_to_dimension"): _customer_dim,
                        ("shop.orders", "dimension_to_fact"): _order_fact}
    oracle = build_oracle(project, load_history(sim), resolve_salt(project), "kinesis",
                          stage_transforms=stage_transforms)
    actual = read_warehouse_scd2(project, stack.pg_url)
    assert actual is not None
    for t in scd2_tables(project):
        diff = compare_scd2(oracle.scd2[t.name], actual[t.name], t)
        assert diff.ok, (t.name, diff.missing[:3], diff.extra[:3], diff.different[:3])
        assert len(actual[t.name]) > len({tuple(r[k] for k in t.primary_key) for r in actual[t.name]})
    # The stage transforms changed what the warehouse holds (and the oracle saw it).
    assert any(r["segment"] and r["segment"].isupper() for r in actual["shop.customers"])
    orders = project.table("shop.orders")
    facts = compare_current(oracle.facts["shop.orders"], read_warehouse_facts(project, stack.pg_url)["shop.orders"],
                            orders)
    assert facts.ok and facts.expected_count >= 40, (facts.missing[:3], facts.extra[:3], facts.different[:3])
    assert any(r.get("status", "").isupper() for r in oracle.facts["shop.orders"].values() if not r["_is_deleted"])

    # Facts landed with point-in-time surrogate keys.
    with psycopg.connect(stack.pg_url) as conn:
        n, missing = conn.execute(f"select count(*), count(*) filter (where customer_sk is null and customer_id "
                                  f"is not null) from {schema}.fct_orders").fetchone()
        items, no_sk = conn.execute(f"select count(*), count(*) filter (where product_sk is null and product_id "
                                    f"is not null) from {schema}.fct_order_items").fetchone()
    assert n > 0 and missing == 0 and items > 0 and no_sk == 0

    # The DQ report: JSON per run with every stage of every warehouse table.
    report = json.loads(Path(run2.report_path).read_text())
    stages = {(t["table"], s["stage"]) for t in report["tables"] for s in t["stages"]}
    assert ("shop.customers", "staging_to_dimension") in stages and ("shop.orders", "dimension_to_fact") in stages

    # Re-running: nothing new to read; forgetting the watermarks re-merges everything and changes nothing.
    before = snapshot(stack.pg_url, schema)
    again = merge_from_lake(spark, project, stack.pg_url)
    assert all(t.changes == 0 for t in again.tables)
    if spark.version.startswith("3."):
        # The Glue tier stops here: the two merges below read the lake with the Spark code the merges
        # above ran; what they check (the watermarks, the Redshift DB-API and COPY path) is not Spark's.
        return
    with psycopg.connect(stack.pg_url) as conn:
        conn.execute(f"delete from {schema}.cdcflow_watermarks")
    merge_from_lake(spark, project, stack.pg_url)
    assert snapshot(stack.pg_url, schema) == before

    # The Redshift code path (flat DB-API transactions, staging COPYed from S3 Parquet) into a fresh
    # schema, on the embedded Postgres + moto (tests/warehouse_helpers.py): the same history.
    rs_schema = f"{schema}_rs"
    s3 = client("s3", stack.aws_endpoint, "us-east-1")
    bucket = f"stg-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    with redshift_on_postgres(stack.pg_url, s3, f"s3://{bucket}/warehouse-staging") as wh:
        rs_run = merge_from_lake(spark, project, wh, schema=rs_schema)
        assert rs_run.error is None and len(wh.copies) == sum(1 for t in rs_run.tables if t.staged)
    rs_actual = read_warehouse_scd2(project, stack.pg_url, schema=rs_schema)
    for t in scd2_tables(project):
        diff = compare_scd2(oracle.scd2[t.name], rs_actual[t.name], t)
        assert diff.ok, ("redshift path", t.name, diff.missing[:3], diff.extra[:3], diff.different[:3])
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_warehouse_merge_cli_reads_the_lake(spark, stack, tmp_path, capsys, monkeypatch):
    from cdcflow.cli import main

    schema = f"wh_{uuid.uuid4().hex[:8]}"
    cfg = config_with_schema(tmp_path, schema)
    project = project_in(tmp_path, cfg, CDCFLOW_WAREHOUSE_URL=stack.pg_url)
    sim = tmp_path / "sim"
    simulate_to(project, sim, events=60)
    run_stream(spark, project, replay_stream(spark, str(split_replay(sim, tmp_path / "replay", 1))),
               available_now=True)
    monkeypatch.setenv("CDCFLOW_LAKE_ROOT", str(tmp_path / "lake"))
    monkeypatch.setenv("CDCFLOW_WAREHOUSE_URL", stack.pg_url)
    rc = main(["--config", str(cfg), "warehouse-merge", "--table", "shop.products"])
    out = capsys.readouterr().out
    assert rc == 0 and "shop.products" in out and "staging_to_dimension" in out and "_reports/dq" in out
    with psycopg.connect(stack.pg_url) as conn:
        assert conn.execute(f"select count(*) from {schema}.dim_product where is_current").fetchone()[0] > 0


def test_tables_loaded_by_full_load_reach_the_warehouse_and_a_reload_changes_nothing(spark, stack, tmp_path):
    """DMS S3 output (LOAD + CDC files, with duplicates and reordering) -> `full-load` in two runs, each
    followed by a merge -> the warehouse SCD2 history equals the oracle's. Then a crash after the
    second run's bronze writes but before its manifest writes, at its worst: its files are applied
    again, bronze holds their changes twice, and the next merge changes nothing."""
    from delta.tables import DeltaTable

    schema = f"wh_{uuid.uuid4().hex[:8]}"
    raw = tmp_path / "raw"
    project = project_in(tmp_path, config_with_schema(tmp_path, schema), CDCFLOW_WAREHOUSE_URL=stack.pg_url,
                         CDCFLOW_RAW_URI=str(raw))
    sim = tmp_path / "sim"
    simulate_to(project, sim, events=250, duplicate_rate=0.05, out_of_order_rate=0.1, pk_change_rate=0.03,
                dq_failure_rate=0.02, missing_primary_key_rate=0.01)
    files = sorted(p.relative_to(sim / "s3") for p in (sim / "s3").rglob("*.parquet"))
    cdc = sorted((p for p in files if not p.name.startswith("LOAD")), key=lambda p: p.name)
    first = [p for p in files if p.name.startswith("LOAD")] + cdc[: len(cdc) // 2]
    second = cdc[len(cdc) // 2:]

    def deliver(rels):
        for rel in rels:
            (raw / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(sim / "s3" / rel, raw / rel)

    deliver(first)
    run_full_load(spark, project)
    run1 = merge_from_lake(spark, project, stack.pg_url)
    assert run1.error is None and all(set(t.to_batch) == {"full_load"} for t in run1.tables if t.changes)
    deliver(second)
    run_full_load(spark, project)
    run2 = merge_from_lake(spark, project, stack.pg_url)
    moved = [t for t in run2.tables if t.changes]
    assert moved and all(t.to_batch["full_load"] > t.from_batch["full_load"] >= 0 for t in moved)

    oracle = build_oracle(project, load_history(sim), resolve_salt(project), "s3")
    actual = read_warehouse_scd2(project, stack.pg_url)
    for t in scd2_tables(project):
        diff = compare_scd2(oracle.scd2[t.name], actual[t.name], t)
        assert diff.ok, (t.name, diff.missing[:3], diff.extra[:3], diff.different[:3])
        assert len(actual[t.name]) > len({tuple(r[k] for k in t.primary_key) for r in actual[t.name]})

    before = snapshot(stack.pg_url, schema)
    names = [str(p) for p in second]
    DeltaTable.forPath(spark, project.path("_manifests/full_load")).delete(F.col("file").isin(names))
    deliver(second)
    again = run_full_load(spark, project)
    assert again.files == len(second)  # the first run's files were archived: not seen again
    rerun = merge_from_lake(spark, project, stack.pg_url)
    assert sum(t.changes for t in rerun.tables) > 0
    assert snapshot(stack.pg_url, schema) == before


def test_partial_updates_reach_the_facts_as_whole_rows(spark, stack, tmp_path):
    """shop.order_items ignores NULL updates (a NULL means "unchanged"): its facts get whole rows,
    whether an update's other values came earlier in the same merge or in an earlier one, and its
    stage transform's `line_amount` is computed from them and stored. DMS S3 files -> full-load ->
    merge, twice; the facts equal the oracle's, which applies the updates."""
    schema = f"wh_{uuid.uuid4().hex[:8]}"
    raw = tmp_path / "raw"
    project = project_in(tmp_path, config_with_schema(tmp_path, schema), CDCFLOW_WAREHOUSE_URL=stack.pg_url,
                         CDCFLOW_RAW_URI=str(raw))
    sim = tmp_path / "sim"
    simulate_to(project, sim, events=300, partial_update_rate=0.6)
    history = load_history(sim)
    partial = [c for c in history.changes if c["table"] == "shop.order_items" and c["op"] == "update"
               and None in (c.get("data") or {}).values()]
    assert len(partial) >= 5
    files = sorted(p.relative_to(sim / "s3") for p in (sim / "s3").rglob("*.parquet"))
    cdc = sorted((p for p in files if not p.name.startswith("LOAD")), key=lambda p: p.name)
    for part in ([p for p in files if p.name.startswith("LOAD")] + cdc[: len(cdc) // 2], cdc[len(cdc) // 2:]):
        for rel in part:
            (raw / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(sim / "s3" / rel, raw / rel)
        run_full_load(spark, project)
        assert merge_from_lake(spark, project, stack.pg_url).error is None

    items = project.table("shop.order_items")
    oracle = build_oracle(project, history, resolve_salt(project), "s3")
    actual = read_warehouse_facts(project, stack.pg_url)[items.name]
    facts = compare_current(oracle.facts[items.name], actual, items)
    assert facts.ok, (facts.missing[:3], facts.extra[:3], facts.different[:3])
    # the stage transform's derived column (warehouse.columns) is stored, computed from the whole rows
    with psycopg.connect(stack.pg_url) as conn:
        stored = conn.execute(f"select quantity, unit_price, line_amount from {schema}.fct_order_items "
                              "where not is_deleted").fetchall()
    assert len(stored) >= 20 and all(amount == (q * p if None not in (q, p) else None) for q, p, amount in stored)


@pytest.mark.parametrize("changes_first", [False, True], ids=["load-first", "changes-first"])
def test_full_load_from_s3_and_cdc_from_kinesis_reach_the_warehouse_together(spark, stack, tmp_path, changes_first):
    """The usual DMS split (the stack's): the full load lands in S3 (LOAD files -> `full-load`), the
    ongoing changes come through Kinesis (the stream, without DMS's load records). One merge reads both
    feeds, orders the load before every change, and the SCD2 history equals the oracle's; so does silver.
    `changes_first`: the stream applies the changes before the full load runs (a stream started
    before the deploy order says): full-load rows sort below every change, so silver and the history
    still equal the oracle's, but for the `ignore_null_updates` table (shop.order_items), whose partial
    updates' NULLs the later snapshot can't fill: why the stream starts last (README, "Deploy")."""
    schema = f"wh_{uuid.uuid4().hex[:8]}"
    raw = tmp_path / "raw"
    project = project_in(tmp_path, config_with_schema(tmp_path, schema), CDCFLOW_WAREHOUSE_URL=stack.pg_url,
                         CDCFLOW_RAW_URI=str(raw))
    sim = tmp_path / "sim"
    simulate_to(project, sim, events=300, out_of_order_rate=0.1, duplicate_rate=0.05, partial_update_rate=0.5)
    for p in (sim / "s3").rglob("LOAD*.parquet"):
        dest = raw / p.relative_to(sim / "s3")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dest)
    if not changes_first:
        run_full_load(spark, project)
    replay = split_replay(sim, tmp_path / "replay", batches=1)
    for f in replay.glob("*.jsonl"):
        cdc = [x for x in f.read_text().splitlines() if json.loads(x)["metadata"].get("operation") != "load"]
        f.write_text("\n".join(cdc) + "\n")
    run_stream(spark, project, replay_stream(spark, str(replay)), available_now=True)
    if changes_first:
        run_full_load(spark, project)
    run = merge_from_lake(spark, project, stack.pg_url)
    assert {f for t in run.tables for f in t.to_batch} == {"stream", "full_load"}

    oracle = build_oracle(project, load_history(sim), resolve_salt(project), "kinesis")
    bad = [d for d in verify(project, oracle, read_actual(project, spark)) if not d.ok]
    if changes_first:  # only NULLs where the source has a value, in the ignore_null_updates table
        (partial,) = [d for d in bad if d.table == "shop.order_items"]
        assert partial.different and not partial.missing and not partial.extra
        assert all(got is None for d in partial.different for _, got in d["columns"].values())
        bad.remove(partial)
    assert not bad, [(d.table, d.kind, d.missing[:3], d.extra[:3], d.different[:3]) for d in bad]
    actual = read_warehouse_scd2(project, stack.pg_url)
    for t in scd2_tables(project):
        diff = compare_scd2(oracle.scd2[t.name], actual[t.name], t)
        assert diff.ok, (t.name, diff.missing[:3], diff.extra[:3], diff.different[:3])
