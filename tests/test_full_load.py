"""Batch full load from DMS S3 Parquet with the shared apply logic: oracle-checked, idempotent, archived."""

from __future__ import annotations

import shutil

import pytest

from batch.full_load import run_full_load
from tests.streaming_helpers import project_in, simulate_to

# The S3 test is main tier only: its staging is boto3 and local files, and what Spark does with them
# is what the other two Spark tests here prove on the Glue 5.1 tier (CI's 20-minute budget).
pytestmark = [pytest.mark.spark]


# DMS S3 layouts (ordering columns in the files), one per table in the full-load test
LAYOUTS = {"shop.customers": "none", "shop.orders": "timestamp", "shop.order_items": "change-seq+timestamp",
           "shop.products": "change-seq+timestamp"}


def simulate_layouts(project, tmp_path, raw, layouts: dict[str, str]):
    """One source history encoded once per S3 layout; each table's files from its layout's encoding
    (the unknown-table files from the first). Returns the history folder and the S3 fault log."""
    import json

    from cdcflow.sim.faults import FaultOptions
    from cdcflow.sim.run import SimOptions, simulate
    from cdcflow.sim.s3 import S3Options
    from cdcflow.sim.source import GenOptions

    gen = GenOptions(events=200, pk_change_rate=0.03, same_key_in_txn_rate=0.3)
    faults = FaultOptions(duplicate_rate=0.05, out_of_order_rate=0.2, late_rate=0.05, missing_primary_key_rate=0.03,
                          unknown_table_rate=0.02)
    texts, log = set(), []
    for i, layout in enumerate(dict.fromkeys(layouts.values())):
        sim = tmp_path / layout
        simulate(project, sim, SimOptions(seed=7, gen=gen, faults=faults,
                                          s3=S3Options(layout=layout, cdc_max_batch_interval_s=20)))
        texts.add((sim / "history.jsonl").read_text())
        manifest = json.loads((sim / "manifest.json").read_text())
        tables = [t for t, lay in layouts.items() if lay == layout]
        for table in tables:
            shutil.copytree(sim / "s3" / table.replace(".", "/"), raw / table.replace(".", "/"))
        log += [f for f in manifest["faults"]["s3"] if f["table"] in tables or (i == 0 and f["table"] is None)]
        if i == 0:
            for ghost in (sim / "s3" / "shop").glob("ghost_*"):
                shutil.copytree(ghost, raw / "shop" / ghost.name)
    assert len(texts) == 1  # one source history, encoded per layout
    return tmp_path / layout, log


def check_layouts(project, raw, history, layouts: dict[str, str]) -> None:
    """Each table's files have its layout's columns, a key changed twice in one file, a key changed in
    several files, and several changes of one key in one transaction."""
    import pyarrow.parquet as pq

    for table, layout in layouts.items():
        t = project.table(table)
        cdc = sorted((raw / table.replace(".", "/")).glob("2*.parquet"))
        names = pq.read_schema(cdc[0]).names
        assert ("dms_commit_ts" in names, "$AR_H_CHANGE_SEQ" in names) == {
            "none": (False, False), "timestamp": (True, False), "change-seq+timestamp": (True, True)}[layout]
        keys_per_file = [[tuple(r[k] for k in t.primary_key) for r in pq.read_table(f).to_pylist()] for f in cdc]
        assert any(len(keys) > len(set(keys)) for keys in keys_per_file), (table, "a key twice in one file")
        files_of: dict = {}
        for i, keys in enumerate(keys_per_file):
            for k in keys:
                files_of.setdefault(k, set()).add(i)
        assert any(len(f) > 1 for f in files_of.values()), (table, "a key in several files")
        per_txn: dict = {}
        for ch in history.changes:
            if ch["table"] == table and ch["txn_id"] is not None:
                key = (ch["txn_id"], tuple(ch["data"][k] for k in t.primary_key))
                per_txn[key] = per_txn.get(key, 0) + 1
        assert max(per_txn.values()) > 1, (table, "several changes of one key in one transaction")


@pytest.mark.glue_compat
def test_full_load_and_cdc_files_match_oracle_and_rerun_is_a_noop(spark, tmp_path):
    """The three DMS S3 layouts (one per table, LAYOUTS): with `$AR_H_CHANGE_SEQ` and the timestamp
    column (delivery faults: duplicates, shuffled files, late rows), the timestamp only, and neither
    (DMS's defaults). The oracle orders by the true source order, never by a column."""
    from cdcflow.oracle import HistoryData, build_oracle, load_history, resolve_salt
    from cdcflow.verify import read_actual, verify

    raw = tmp_path / "raw"
    project = project_in(tmp_path, CDCFLOW_RAW_URI=str(raw))
    sim, s3_faults = simulate_layouts(project, tmp_path, raw, LAYOUTS)
    history = load_history(sim)
    check_layouts(project, raw, history, LAYOUTS)
    assert {f["kind"] for f in s3_faults} >= {"duplicate", "late", "out_of_order", "missing_primary_key"}
    files = sorted(p.relative_to(raw) for p in raw.rglob("*.parquet") if "ghost" not in str(p))
    assert any(p.name.startswith("LOAD0000000") for p in files) and any("-" in p.name for p in files)

    result = run_full_load(spark, project)
    assert result.files == len(files) and result.skipped == 0
    oracle = build_oracle(project, HistoryData(history.changes, {"faults": {"s3": s3_faults}}),
                          resolve_salt(project), "s3")
    # the summary's quarantined rows per table and rule: the injected missing keys
    injected: dict = {}
    for f in s3_faults:
        if f["rule"] == "missing_primary_key":
            injected.setdefault(f["table"], {}).setdefault(f["rule"], 0)
            injected[f["table"]][f["rule"]] += 1
    assert len(injected) >= 3 and {t: r for t, r in result.quarantined_by_rule.items() if r} == injected
    diffs = verify(project, oracle, read_actual(project, spark))
    assert {d.kind for d in diffs} >= {"current", "quarantine"}
    for d in diffs:
        # The unknown table's files are not read at all (they stay in the raw prefix, checked below),
        # so its rows are not in quarantine; every other quarantine row the oracle expects is.
        missing = [m for m in d.missing if not (d.kind == "quarantine" and m["rule"] == "unknown_table")]
        assert not (missing or d.extra or d.different), (d.table, d.kind, missing[:3], d.extra[:3], d.different[:3])
    assert any(d.kind == "quarantine" and d.actual_count > 0 for d in diffs)  # missing keys were quarantined
    # Silver created by the first file group holds only its key NOT NULL, whatever the Parquet or Spark
    # marked required: a later tombstone or dropped column writes nulls into the others.
    for t in project.tables.values():
        schema = spark.read.format("delta").load(project.path(t.delta_path)).schema
        assert [f.name for f in schema.fields if not f.nullable] == list(t.primary_key), t.name

    # Every applied record is in bronze (feed full_load), and no PII value appears unmasked in the lake.
    import json

    bronze = spark.read.format("delta").load(project.path("bronze"))
    assert bronze.filter("feed = 'full_load'").count() == result.rows
    pii = set()
    for line in (sim / "history.jsonl").read_text().splitlines():
        data = json.loads(line).get("data") or {}
        pii |= {str(data[c]) for c in ("email", "phone", "shipping_phone") if data.get(c)}
    assert len(pii) > 50
    blobs = [f.read_bytes() for f in (tmp_path / "lake").rglob("*") if f.is_file()]
    leaked = [v for v in pii if any(v.encode() in b for b in blobs)]
    assert not leaked, leaked[:5]

    # Applied files were archived; the raw prefix only holds what is left (the unknown table's files).
    left = [p for p in raw.rglob("*.parquet") if "archive" not in p.parts]
    assert all("ghost" in str(p) for p in left)
    archived = list((raw / "archive").rglob("*.parquet"))
    assert len(archived) == len(files) and all("year=" in str(p) and "month=" in str(p) for p in archived)

    # Re-running (files put back as if a crash happened before archiving) applies nothing twice.
    silver_before = {n: sorted(map(str, spark.read.format("delta").load(project.path(t.delta_path))
                                   .drop("_ingested_at").collect())) for n, t in project.tables.items()}
    for p in archived:
        rel = p.relative_to(raw / "archive")
        dest = raw / "/".join(rel.parts[2:])
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dest)
    from cdcflow.errors import UserError

    with pytest.raises(UserError, match="applied before and are unchanged"):  # no reload happened
        run_full_load(spark, project, reload=["shop.customers"])
    again = run_full_load(spark, project)
    assert again.files == 0 and again.skipped == len(files)
    silver_after = {n: sorted(map(str, spark.read.format("delta").load(project.path(t.delta_path))
                                  .drop("_ingested_at").collect())) for n, t in project.tables.items()}
    assert silver_after == silver_before

    # A table's LOAD file written again under its applied name, other content (DMS reloading the table
    # writes LOAD00000001.parquet again): not skipped as applied, not applied, not archived: reported.
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    reloaded = next(p for p in archived if p.name.startswith("LOAD") and "customers" in p.parts)
    put_back = []
    for p in archived:
        rel = p.relative_to(raw / "archive")
        if rel.parts[2:4] == reloaded.relative_to(raw / "archive").parts[2:4]:  # the table's files
            put_back.append(raw / "/".join(rel.parts[2:]))
            put_back[-1].parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, put_back[-1])
    load_file = raw / "/".join(reloaded.relative_to(raw / "archive").parts[2:])
    snapshot = pq.read_table(load_file)
    pq.write_table(snapshot.set_column(snapshot.schema.get_field_index("country"), "country",
                                       pc.if_else(pc.is_valid(snapshot["country"]), "ZZ", None)), load_file)
    reload = run_full_load(spark, project)
    assert reload.rewritten == {"shop.customers": [str(load_file.relative_to(raw))]} and reload.files == 0
    assert all(p.exists() for p in put_back)  # left in the raw prefix
    silver_reload = {n: sorted(map(str, spark.read.format("delta").load(project.path(t.delta_path))
                                   .drop("_ingested_at").collect())) for n, t in project.tables.items()}
    assert silver_reload == silver_before


@pytest.mark.glue_compat
def test_cdc_files_are_grouped_by_schema_in_time_order(tmp_path):
    """Consecutive CDC files with one schema are read together; a schema change (drift) starts a new group."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batch.full_load import FileRef, cdc_groups

    narrow = pa.table({"Op": ["I"], "id": [1]})
    wide = pa.table({"Op": ["U"], "id": [1], "note": ["x"]})
    names = ["20240101-000000001", "20240101-000000002", "20240101-000000003", "20240101-000000004"]
    for name, t in zip(names, [narrow, narrow, wide, narrow], strict=True):
        pq.write_table(t, tmp_path / f"{name}.parquet")
    refs = [FileRef("s.t", f"s/t/{n}.parquet", "cdc") for n in names]
    local = {r.rel: str(tmp_path / r.rel.rsplit("/", 1)[1]) for r in refs}
    assert [[r.rel[4:22] for r in g] for g in cdc_groups(refs, local)] == [names[:2], names[2:3], names[3:]]


@pytest.mark.glue_compat
def test_progress_shows_all_files_and_the_table_being_loaded():
    import io

    from rich.console import Console
    from rich.progress import Progress

    from batch.full_load import _Bars

    with Progress(console=Console(file=io.StringIO())) as progress:
        bars = _Bars(progress, total=5)
        bars.start("shop.customers", 3)
        bars.advance(1)  # already applied
        bars.advance(2)  # one group of two files
        assert [(t.description, t.completed, t.total) for t in progress.tasks] == [
            ("all tables", 3, 5), ("shop.customers", 3, 3)]
        bars.finish()
        bars.start("shop.orders", 2)
        bars.advance(2)
        bars.finish()
        assert [(t.description, t.completed) for t in progress.tasks] == [("all tables", 5)]
    assert _Bars(None, 5).advance(1) is None  # no progress display: a no-op


@pytest.mark.stack
def test_full_load_from_s3_stages_one_table_at_a_time_and_archives_in_the_bucket(spark, stack, tmp_path, monkeypatch):
    import tempfile
    import uuid

    from batch import full_load
    from cdcflow.aws import client
    from cdcflow.oracle import build_oracle, load_history, resolve_salt
    from cdcflow.verify import read_actual, verify

    bucket = f"raw-{uuid.uuid4().hex[:8]}"
    project = project_in(tmp_path, CDCFLOW_RAW_URI=f"s3://{bucket}/dms")
    sim = tmp_path / "sim"
    simulate_to(project, sim, events=120, out_of_order_rate=0.2, duplicate_rate=0.05)
    s3 = client("s3", stack.aws_endpoint, "us-east-1")
    s3.create_bucket(Bucket=bucket)
    files = sorted(str(p.relative_to(sim / "s3")) for p in (sim / "s3").rglob("*.parquet"))
    for rel in files:
        s3.upload_file(str(sim / "s3" / rel), bucket, f"dms/{rel}")

    # Watch the local staging folder: while a table is applied, only that table's files are staged.
    staging = tmp_path / "tmp"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    staged_tables: list[set[str]] = []
    real_merge = full_load.apply.merge

    def watching_merge(*args, **kwargs):
        # staging/<mkdtemp>/<schema>/<table>/...
        staged_tables.append({p.relative_to(staging).parts[2] for p in staging.rglob("*.parquet")})
        return real_merge(*args, **kwargs)

    monkeypatch.setattr(full_load.apply, "merge", watching_merge)
    result = run_full_load(spark, project)

    assert result.files == len(files) > 0
    assert len(staged_tables) >= len(project.tables) and all(len(t) == 1 for t in staged_tables), staged_tables
    assert list(staging.rglob("*")) == []  # nothing staged is left behind
    oracle = build_oracle(project, load_history(sim), resolve_salt(project), "s3")
    bad = [d for d in verify(project, oracle, read_actual(project, spark)) if not d.ok]
    assert not bad, [(d.table, d.kind, d.missing[:3], d.extra[:3], d.different[:3]) for d in bad]
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket) for o in page["Contents"]]
    assert sorted(k.split("/", 4)[-1] for k in keys if k.startswith("dms/archive/")) == files
    assert all(k.startswith("dms/archive/year=") for k in keys)

    # An applied file uploaded again unchanged (a crash before archiving) is skipped; written again with
    # other content (a DMS reload) its ETag differs: the table is reported, its files left in the bucket.
    load = next(f for f in files if "/LOAD" in f)
    s3.upload_file(str(sim / "s3" / load), bucket, f"dms/{load}")
    assert run_full_load(spark, project).skipped == 1
    s3.put_object(Bucket=bucket, Key=f"dms/{load}", Body=(sim / "s3" / load).read_bytes() + b"\0")
    again = run_full_load(spark, project)
    assert again.rewritten == {project_table(project, load): [load]} and again.files == 0
    assert again.rewritten_problem().startswith(f"{project_table(project, load)}: 1 applied file(s) written "
                                                 f"again since ({load}; a DMS table reload?)")
    assert s3.head_object(Bucket=bucket, Key=f"dms/{load}")["ContentLength"] > 0  # still there


def project_table(project, rel: str) -> str:
    schema, table = rel.split("/")[:2]
    return f"{schema}.{table}"


@pytest.mark.glue_compat
def test_full_load_follows_columns_added_widened_renamed_and_dropped_in_the_parquet_files(spark, tmp_path,
                                                                                        monkeypatch):
    """DMS S3 output after source DDL: files gain a column, widen one, rename it, then lose it. The
    full load keeps the Glue catalog current as it creates and drifts tables (moto's Glue API): each
    schema change is a new table version, as the stream's are."""
    import boto3
    import pyarrow.parquet as pq
    from moto import mock_aws

    from cdcflow.oracle import build_oracle, load_history, resolve_salt
    from cdcflow.verify import read_actual, verify

    sim = tmp_path / "sim"
    raw = tmp_path / "raw"
    # CDCFLOW_AWS_ENDPOINT empty = real AWS endpoints, which moto intercepts in-process
    project = project_in(tmp_path, CDCFLOW_RAW_URI=str(raw), CDCFLOW_AWS_ENDPOINT="")
    # seed 1 at this rate drifts order_items only: each drifted table adds three schema groups to the load
    # (one apply each; every table drifting doubled the test's time), and the others' loads still verify
    simulate_to(project, sim, seed=1, events=150, schema_drift_rate=0.3)
    shutil.copytree(sim / "s3", raw)
    names = [pq.read_schema(f).names for f in sorted((raw / "shop" / "order_items").glob("2*.parquet"))]
    assert any("drift_note" in n for n in names) and any("drift_label" in n for n in names)
    widened = [pq.read_schema(f).field("quantity").type for f in sorted((raw / "shop" / "order_items").glob("2*"))]
    assert str(widened[0]) == "int32" and str(widened[-1]) == "int64"

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "CDCFLOW_CATALOG_DATABASE": "cdcflow_shop"}.items():  # fmt: skip
        monkeypatch.setenv(k, v)
    with mock_aws():
        glue = boto3.client("glue", region_name=project.pipeline.aws.region)
        glue.create_database(DatabaseInput={"Name": "cdcflow_shop"})
        glue.create_database(DatabaseInput={"Name": "cdcflow_shop_spectrum"})  # Redshift Spectrum's entries
        run_full_load(spark, project)
        versions = glue.get_table_versions(DatabaseName="cdcflow_shop", TableName="shop_order_items")["TableVersions"]
        tables = {t["Name"] for t in glue.get_tables(DatabaseName="cdcflow_shop")["TableList"]}
        spectrum = {t["Name"]: t for t in glue.get_tables(DatabaseName="cdcflow_shop_spectrum")["TableList"]}
    oracle = build_oracle(project, load_history(sim), resolve_salt(project), "s3")
    bad = [d for d in verify(project, oracle, read_actual(project, spark)) if not d.ok]
    assert not bad, [(d.table, d.kind, d.missing[:3], d.extra[:3], d.different[:3]) for d in bad]
    items = spark.read.format("delta").load(project.path(project.table("shop.order_items").delta_path))
    types = {f.name: f.dataType.simpleString() for f in items.schema.fields}
    assert types["quantity"] == "bigint" and {"drift_note", "drift_label"} <= types.keys()

    # the catalog: every loaded table has an entry; order_items' first version is the LOAD snapshot's
    # schema, the newest holds the added and widened columns (never dropped: Delta keeps them too)
    assert tables == {"shop_customers", "shop_order_items", "shop_orders", "shop_products"}
    versions.sort(key=lambda v: int(v["VersionId"]))
    cols = [{c["Name"]: c["Type"] for c in v["Table"]["StorageDescriptor"]["Columns"]} for v in versions]
    assert len(cols) >= 2, "a drifted column is a new table version"
    assert cols[0]["quantity"] == "int" and "drift_note" not in cols[0]
    assert cols[-1]["quantity"] == "bigint" and {"drift_note", "drift_label"} <= cols[-1].keys()
    # the Spectrum entry (over the manifests) follows the same drift
    assert set(spectrum) == tables
    sd = spectrum["shop_order_items"]["StorageDescriptor"]
    assert sd["InputFormat"].endswith("SymlinkTextInputFormat")
    assert {c["Name"]: c["Type"] for c in sd["Columns"]} == cols[-1]
    assert {c: t for c, t in cols[-1].items() if c in types} == {c: types[c] for c in cols[-1] if c in types}


def test_a_manifest_from_before_file_identities_gains_them(tmp_path):
    """Manifests written before the `etag` column: their files count as applied whatever their
    content (None), new appends add the column (no Spark)."""
    from datetime import UTC, datetime

    import pyarrow as pa
    from deltalake import write_deltalake

    from batch.full_load import MANIFEST_SCHEMA, _manifest
    from cdcflow.cdc.apply import rs_append

    path = str(tmp_path / "manifest")
    now = datetime.now(UTC)
    old = pa.schema([f for f in MANIFEST_SCHEMA if f.name != "etag"])
    write_deltalake(path, pa.Table.from_pylist([{"table": "s.t", "file": "s/t/LOAD1.parquet", "kind": "load",
                                                 "rows": 3, "applied_at": now}], old))
    assert _manifest(path) == {("s.t", "s/t/LOAD1.parquet"): None}
    rs_append(path, pa.Table.from_pylist([{"table": "s.t", "file": "s/t/2.parquet", "kind": "cdc", "rows": 1,
                                           "applied_at": now, "etag": "abc"}], MANIFEST_SCHEMA), {},
              schema_mode="merge")
    assert _manifest(path) == {("s.t", "s/t/LOAD1.parquet"): None, ("s.t", "s/t/2.parquet"): "abc"}


@pytest.mark.glue_compat  # a reload runs in the Glue full-load job
@pytest.mark.parametrize("kinesis", [False, True], ids=["changes-through-s3", "changes-through-kinesis"])
def test_a_dms_reload_resyncs_tables_that_lost_changes(spark, stack, tmp_path, kinesis):
    """DMS reloads two tables after part of their capture was lost: the run first leaves them alone
    (their LOAD file was written again), then `reload=` applies the snapshot after everything silver
    held, deletes the keys it lacks and applies the CDC files after it: silver equals the oracle's
    (the source's true history, lost changes included), and so do the warehouse's facts and current
    dimension rows after a merge (bronze carries the reload's sequence to it). The SCD2 history
    keeps what the warehouse saw: the lost versions are not invented.

    `kinesis`: the changes committed after the reload began come through another task (the stack's
    Kinesis CDC task), so silver holds them before the reload is applied; `reload_as_of` (when the
    reload began) keeps them above the snapshot, and keys inserted after it live. Without it the
    snapshot would overwrite them with older rows and delete those keys."""
    import json
    import os
    import uuid
    from dataclasses import replace
    from datetime import UTC, datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    from batch.full_load import CHANGE_SEQ
    from batch.warehouse_job import merge_from_lake
    from cdcflow.oracle import build_oracle, fact_tables, load_history, resolve_salt, scd2_tables
    from cdcflow.sim.s3 import _table_bytes
    from cdcflow.verify import compare_current, compare_scd2, read_actual, verify
    from tests.test_warehouse_job import config_with_schema

    raw, sim = tmp_path / "raw", tmp_path / "sim"
    schema = f"wh_{uuid.uuid4().hex[:8]}"
    project = project_in(tmp_path, config_with_schema(tmp_path, schema), CDCFLOW_WAREHOUSE_URL=stack.pg_url,
                         CDCFLOW_RAW_URI=str(raw))
    simulate_to(project, sim, events=400)
    reloaded = ["shop.customers", "shop.orders"]  # soft deletes, PII and transforms; hard deletes
    shutil.copytree(sim / "s3", raw)
    history = [json.loads(line) for line in (sim / "history.jsonl").read_text().splitlines()]
    held_back: dict[str, list] = {}
    cut: dict[str, str] = {}
    for name in reloaded:
        folder = raw / name.replace(".", "/")
        cdc = sorted(folder.glob("2*.parquet"))
        k = len(cdc) * 2 // 3
        # the snapshot is the source as of the last change in the first two thirds of the files
        cut[name] = max(max(pq.read_table(f, columns=["dms_commit_ts"])["dms_commit_ts"].to_pylist())
                        for f in cdc[:k])
        held_back[name] = [f.read_bytes() for f in cdc[k:]], [f.name for f in cdc[k:]]
        for f in cdc[k:]:
            f.unlink()
        for f in cdc[1:k:2]:  # lost capture: every other file of the applied part
            f.unlink()
    first = run_full_load(spark, project)
    assert first.files > 0
    oracle = build_oracle(project, load_history(sim), resolve_salt(project), "s3")
    diverged = {d.table for d in verify(project, oracle, read_actual(project, spark)) if not d.ok}
    assert set(reloaded) <= diverged  # the lost files show

    if kinesis:  # the changes committed after the reloads began reach silver first (the stream's)
        for name in reloaded:
            for data, file_name in zip(*held_back[name], strict=True):
                (raw / name.replace(".", "/") / file_name).write_bytes(data)
        assert run_full_load(spark, project).files == sum(len(held_back[n][0]) for n in reloaded)
    snapshot_rows = {}
    for name in reloaded:
        t = project.table(name)
        state = _source_state(history, t, cut[name])
        snapshot_rows[name] = len(state)
        folder = raw / name.replace(".", "/")
        load = folder / "LOAD00000001.parquet"
        original = pq.read_schema(next((raw / "archive").rglob(f"{t.table}/LOAD00000001.parquet")))
        head = [c for c in original.names if c not in t.columns and c != CHANGE_SEQ]
        tail = (CHANGE_SEQ,) if CHANGE_SEQ in original.names else ()
        # DMS stamps LOAD rows with when it transferred them (during the load, after changes that sort
        # above the snapshot when those come through Kinesis); the full load doesn't take it as a time
        transferred = (max(pq.read_table(pa.BufferReader(held_back[name][0][0]))["dms_commit_ts"].to_pylist())
                       if kinesis else cut[name])
        rows = [{**r, "Op": "I", "dms_commit_ts": transferred} for r in state.values()]
        load.write_bytes(_table_bytes(rows, list(t.columns.items()), head, tail))
        began = datetime.strptime(cut[name][:19], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()
        os.utime(load, (began, began))  # DMS wrote it once the reload began
        for data, file_name in zip(*held_back[name], strict=True):
            assert file_name[:15] >= datetime.fromtimestamp(began, UTC).strftime("%Y%m%d-%H%M%S")
            if not kinesis:
                (folder / file_name).write_bytes(data)

    refused = run_full_load(spark, project)
    assert set(refused.rewritten) == set(reloaded) and refused.files == 0

    if kinesis:  # each table's snapshot as of its reload's start (DMS's FullLoadStartTime for it)
        runs = [run_full_load(spark, project, tables=[n], reload=[n],
                              reload_as_of=datetime.fromisoformat(cut[n]).replace(tzinfo=UTC)) for n in reloaded]
        assert [r.files for r in runs] == [1, 1] and not any(r.rewritten for r in runs)
        deleted = {n: k for r in runs for n, k in r.reloaded.items()}
    else:
        result = run_full_load(spark, project, reload=reloaded)
        assert result.files == sum(1 + len(held_back[n][0]) for n in reloaded) and not result.rewritten
        deleted = result.reloaded
    assert deleted["shop.customers"] > 0 and deleted["shop.orders"] > 0  # keys deleted meanwhile
    bad = [d for d in verify(project, oracle, read_actual(project, spark)) if not d.ok]
    assert not bad, [(d.table, d.kind, d.missing[:3], d.extra[:3], d.different[:3]) for d in bad]
    bronze = spark.read.format("delta").load(project.path("bronze")).filter("snapshot_seq IS NOT NULL")
    counts = {r["table"]: r["count"] for r in bronze.groupBy("table").count().collect()}
    assert counts == {n: snapshot_rows[n] + deleted[n] for n in reloaded}
    for n in reloaded:  # a reload deletes keys gone from the source only, none that silver keeps live
        t = project.table(n)
        gone = {tuple(r["data"][k] for k in t.primary_key)
                for r in bronze.filter(f"`table` = '{n}' AND op = 'delete'").collect()}
        live = {tuple(str(r[k]) for k in t.primary_key)
                for r in spark.read.format("delta").load(project.path(t.delta_path)).filter("NOT _is_deleted").collect()}
        assert gone and not gone & live, (n, sorted(gone & live)[:3])

    assert merge_from_lake(spark, project, stack.pg_url).error is None
    actual = read_actual(project, spark, warehouse=True)
    # live facts: a tombstone the oracle keeps for a key whose stages dropped its later changes needs
    # the history the lost files held (order 15: deleted and inserted again inside the lost files)
    for t in fact_tables(project):
        diff = compare_current({k: r for k, r in oracle.facts[t.name].items() if not r["_is_deleted"]},
                               [r for r in actual.facts[t.name] if not r["_is_deleted"]], t)
        assert diff.ok, (t.name, diff.missing[:3], diff.extra[:3], diff.different[:3])
    for t in scd2_tables(project):  # current versions: the source's rows (valid_from is when we learnt them)
        inverted = [r for r in actual.scd2[t.name]
                    if None not in (r.get("valid_to"), r.get("valid_from")) and r["valid_to"] < r["valid_from"]]
        assert not inverted, (t.name, inverted[:2])  # the snapshot's versions sit at its place in time

        def current(rows):
            return [{**r, "valid_from": None} for r in rows if r.get("valid_to") is None]
        diff = compare_scd2(current(oracle.scd2[t.name]), current(actual.scd2[t.name]), replace(t))
        assert diff.ok, (t.name, diff.missing[:3], diff.extra[:3], diff.different[:3])


def _source_state(history: list[dict], table, until: str) -> dict:
    """The source table's rows once every change committed at or before `until` (DMS's
    `yyyy-MM-dd HH:mm:ss.SSSSSS`) was made: what a reload's snapshot holds."""
    rows: dict = {}
    for ch in sorted(history, key=lambda c: c["source_seq"]):
        commit = (ch["commit_ts"] or "").replace("T", " ").rstrip("Z")
        if ch["table"] != table.name or ch["op"] not in ("load", "insert", "update", "delete") or commit > until:
            continue
        data = ch["data"] or {}
        key = tuple(data.get(k) for k in table.primary_key)
        before = ch.get("before") or {}
        old = tuple(before.get(k, data.get(k)) for k in table.primary_key)
        if ch["op"] == "update" and before and old != key:
            rows.pop(old, None)
        if ch["op"] == "delete":
            rows.pop(key, None)
        else:
            rows[key] = {**rows.get(key, {}), **data}
    return rows


@pytest.mark.glue_compat
def test_bronze_gains_snapshot_seq_from_either_writer_and_takes_rows_without_it(spark, tmp_path):
    """A reload's bronze rows add `snapshot_seq` to bronze; every other append (the stream's, the full
    load's) goes on without it, through delta-rs or Spark."""
    from pyspark.sql import functions as F

    from cdcflow.cdc.bronze import append_bronze

    path = str(tmp_path / "bronze")
    rows = spark.range(3).select(F.lit("t").alias("table"), F.current_date().alias("date"),
                                 F.col("id").cast("string").alias("op"))
    driver, spark_append = 10, 10**9  # records: delta-rs below the bound, Spark above it
    append_bronze(rows, path, 0, driver)
    append_bronze(rows.withColumn("snapshot_seq", F.lit("9")), path, 1, spark_append)
    append_bronze(rows, path, 2, spark_append)
    append_bronze(rows, path, 3, driver)
    append_bronze(rows.withColumn("snapshot_seq", F.lit("8")), path, 4, driver)
    held = spark.read.format("delta").load(path).select("batch_id", "snapshot_seq").distinct().collect()
    assert sorted((r.batch_id, r.snapshot_seq) for r in held) == [(0, None), (1, "9"), (2, None), (3, None), (4, "8")]


def test_cdc_file_times_from_dms_names():
    """What a reload compares with its first LOAD file's write time (no Spark)."""
    from datetime import UTC, datetime

    from batch.full_load import _file_time

    assert _file_time("shop/orders/20261125-1000550320.parquet") == datetime(2026, 11, 25, 10, 0, 55, tzinfo=UTC)
    assert _file_time("shop/orders/20261125-900550320.parquet") == datetime(2026, 11, 25, 9, 0, 55, tzinfo=UTC)
