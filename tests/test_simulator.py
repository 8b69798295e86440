"""The simulator emits what AWS DMS emits (Kinesis JSON, S3 Parquet), deterministically, with faults. No Spark."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cdcflow.cli import main
from cdcflow.config import load_project
from cdcflow.sim import FaultOptions, GenOptions, S3Options, SimOptions, simulate
from cdcflow.sim.synthetic import write_configs

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
ISO = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")
DMS_TS = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}\.\d{6}$")
POS = re.compile(r"^[0-9A-F]{8}/[0-9A-F]{8}\.\d+\.[0-9A-F]{8}/[0-9A-F]{8}$")
CDC_FILE = re.compile(r"^\d{8}-\d{10}\.parquet$")
LOAD_META = ["timestamp", "record-type", "operation", "partition-key-type", "schema-name", "table-name"]
CDC_META = LOAD_META + ["transaction-id", "transaction-record-id", "prev-transaction-id",
                        "prev-transaction-record-id", "commit-timestamp", "stream-position"]


@pytest.fixture(scope="module")
def project():
    return load_project(CONFIGS)


def lines(out: Path) -> list[str]:
    return [ln for f in sorted((out / "kinesis").glob("*.jsonl")) for ln in f.read_text().splitlines()]


def run(project, out, **kw):
    gen = kw.pop("gen", GenOptions(events=300))
    return simulate(project, out, SimOptions(seed=kw.pop("seed", 7), gen=gen, **kw))


def test_kinesis_records_match_dms_format(project, tmp_path):
    res = run(project, tmp_path, gen=GenOptions(events=300, pk_change_rate=0.1))
    recs = [json.loads(x) for x in lines(tmp_path)]
    assert len(recs) == len(res.changes)  # no faults: one record per change
    ops = [r["metadata"]["operation"] for r in recs]
    assert ops[:4] == ["create-table"] * 4 and "load" in ops and {"insert", "update", "delete"} <= set(ops)
    for r in recs:
        meta = r["metadata"]
        assert ISO.match(meta["timestamp"])
        assert meta["schema-name"] == "shop" and f"shop.{meta['table-name']}" in project.tables
        t = project.tables[f"shop.{meta['table-name']}"]
        if meta["record-type"] == "control":
            assert list(r) == ["control", "metadata"] and meta["partition-key-type"] == "task-id"
            tdef = r["control"]["table-def"]
            assert tdef["primary-key"] == t.primary_key and set(t.columns) <= set(tdef["columns"])
            assert tdef["columns"][t.primary_key[0]]["type"] in ("INT64", "INT32")  # DMS's wire naming
            continue
        assert meta["record-type"] == "data" and meta["partition-key-type"] == "schema-table"
        assert list(r["data"]) == list(t.columns)
        if meta["operation"] == "load":
            assert list(meta) == LOAD_META
        else:
            assert list(meta) == CDC_META
            assert ISO.match(meta["commit-timestamp"]) and POS.match(meta["stream-position"])
            assert isinstance(meta["transaction-id"], int) and meta["transaction-record-id"] >= 1
        if meta["operation"] == "delete":  # PostgreSQL: keys only
            assert all((v is None) == (c not in t.primary_key) for c, v in r["data"].items())
        if meta["operation"] == "update":
            assert set(r["before-image"]) == set(t.primary_key)
        else:
            assert "before-image" not in r
    orders = [r["data"] for r in recs if r["metadata"].get("table-name") == "orders" and "data" in r
              and r["metadata"]["operation"] != "delete"]
    assert all(isinstance(d["order_id"], int) and re.match(r"^\d+\.\d{2}$", d["total_amount"]) for d in orders)
    assert all(re.match(r"^\d{4}-\d{2}-\d{2}$", d["order_date"]) and DMS_TS.match(d["updated_at"]) for d in orders)
    pk_changes = [r for r in recs if "before-image" in r
                  and any(r["before-image"][k] != r["data"][k] for k in r["before-image"])]
    assert pk_changes, "pk_change_rate=0.1 should produce primary-key changes"
    # commit order: stream positions and commit timestamps never go backwards
    cdc = [r["metadata"] for r in recs if r["metadata"]["operation"] in ("insert", "update", "delete")]
    pos = [[int(g, 16) for g in re.split(r"[/.]", m["stream-position"])] for m in cdc]
    assert pos == sorted(pos) and [m["commit-timestamp"] for m in cdc] == sorted(m["commit-timestamp"] for m in cdc)


def test_primary_key_partitioning(project, tmp_path):
    res = run(project, tmp_path, partition_key_type="primary-key")
    for r in res.kinesis:
        body = json.loads(r.payload)
        if body["metadata"]["record-type"] == "control":
            assert r.partition_key == "cdcflow-sim-task"
        else:
            t = project.tables[r.table]
            assert body["metadata"]["partition-key-type"] == "primary-key"
            assert r.partition_key == "_".join(str(body["data"][c]) for c in t.primary_key)


def test_s3_parquet_layout_names_and_types(project, tmp_path):
    res = run(project, tmp_path, gen=GenOptions(events=400, load_rows=60),
              s3=S3Options(max_file_size_kb=1, cdc_max_batch_interval_s=30))
    s3 = tmp_path / "s3" / "shop"
    loads = sorted(p.name for p in (s3 / "order_items").glob("LOAD*"))
    assert len(loads) > 10
    assert loads == [f"LOAD{i:08X}.parquet" for i in range(1, len(loads) + 1)]
    assert "LOAD0000000A.parquet" in loads
    load = pq.read_table(s3 / "orders" / "LOAD00000001.parquet")
    assert load.column_names == ["dms_commit_ts", *project.tables["shop.orders"].columns, "$AR_H_CHANGE_SEQ"]
    expect = {"order_id": pa.int64(), "customer_id": pa.int64(), "status": pa.string(), "order_date": pa.date32(),
              "total_amount": pa.decimal128(12, 2), "updated_at": pa.timestamp("us"), "dms_commit_ts": pa.string()}
    for name, ty in expect.items():
        assert load.schema.field(name).type == ty, name
    assert pq.read_table(s3 / "order_items" / "LOAD00000001.parquet").schema.field("line_no").type == pa.int32()
    cdc_rows = 0
    for table in ("customers", "products", "orders", "order_items"):
        files = sorted(p for p in (s3 / table).glob("*.parquet") if not p.name.startswith("LOAD"))
        assert files and all(CDC_FILE.match(p.name) for p in files)
        seqs: list[str] = []
        for f in files:
            tb = pq.read_table(f)
            assert tb.column_names[:2] == ["Op", "dms_commit_ts"] and tb.column_names[-1] == "$AR_H_CHANGE_SEQ"
            assert set(tb.column("Op").to_pylist()) <= {"I", "U", "D"}
            assert all(DMS_TS.match(v) for v in tb.column("dms_commit_ts").to_pylist())
            seqs += tb.column("$AR_H_CHANGE_SEQ").to_pylist()
            cdc_rows += tb.num_rows
        assert all(len(s) == 35 and s.isdigit() for s in seqs) and seqs == sorted(seqs)
    n_cdc = sum(1 for c in res.changes if c.op in ("insert", "update", "delete"))
    assert cdc_rows == n_cdc


def test_same_seed_same_bytes(project, tmp_path):
    opts = dict(gen=GenOptions(events=200, null_update_rate=0.2, pk_change_rate=0.05, dq_failure_rate=0.05,
                               schema_drift_rate=0.5),
                faults=FaultOptions(duplicate_rate=0.1, out_of_order_rate=0.1, late_rate=0.05,
                                    malformed_json_rate=0.02, type_mismatch_rate=0.02))
    run(project, tmp_path / "a", **opts)
    run(project, tmp_path / "b", **opts)
    run(project, tmp_path / "c", seed=8, **opts)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) > 10
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert (tmp_path / "a" / "history.jsonl").read_bytes() != (tmp_path / "c" / "history.jsonl").read_bytes()


def test_faults_are_logged_where_they_are_delivered(project, tmp_path):
    faults = FaultOptions(duplicate_rate=0.1, out_of_order_rate=0.05, late_rate=0.05, malformed_json_rate=0.03,
                          missing_primary_key_rate=0.03, unknown_table_rate=0.03, type_mismatch_rate=0.03,
                          no_ordering_rate=0.03)
    gen = GenOptions(events=600, change_interval_ms=(1000, 3000))
    clean = run(project, tmp_path / "clean", gen=gen)
    res = run(project, tmp_path / "f", gen=gen, faults=faults)
    assert [c.to_dict() for c in res.changes] == [c.to_dict() for c in clean.changes]  # history unaffected
    delivered = lines(tmp_path / "f")
    log = res.manifest["faults"]["kinesis"]
    kinds = {f["kind"] for f in log}
    assert kinds == {"duplicate", "out_of_order", "late", "malformed_json", "missing_primary_key", "unknown_table",
                     "type_mismatch", "no_ordering"}
    for f in log:
        if f["kind"] in ("duplicate", "out_of_order", "late"):
            continue
        line = delivered[f["position"]]
        assert f["file"] == "kinesis/part-00000.jsonl" and f["line"] == f["position"] + 1
        if f["kind"] == "malformed_json":
            with pytest.raises(json.JSONDecodeError):
                json.loads(line)
            continue
        body = json.loads(line)
        t = project.tables.get(f"shop.{body['metadata']['table-name']}")
        if f["kind"] == "unknown_table":
            assert t is None and f["table"] is None
        elif f["kind"] == "missing_primary_key":
            assert body["data"][t.primary_key[0]] is None
        elif f["kind"] == "type_mismatch":
            assert any(v in ("abc", "maybe", "not-a-date", "not-a-timestamp") for v in body["data"].values())
        elif f["kind"] == "no_ordering":
            assert not {"commit-timestamp", "stream-position"} <= set(body["metadata"])
    # every genuine record is delivered, duplicates exactly as often as logged
    genuine = [r.payload for r in clean.kinesis]
    counts: dict[str, int] = {}
    for ln in delivered:
        counts[ln] = counts.get(ln, 0) + 1
    dups = sum(1 for f in log if f["kind"] == "duplicate")
    assert all(counts.get(p, 0) >= 1 for p in genuine)
    assert sum(counts[p] for p in set(genuine)) == len(genuine) + dups
    # late records arrive after a record committed more than watermark + 1 min later
    commit = {}
    for i, ln in enumerate(delivered):
        try:
            commit[i] = json.loads(ln)["metadata"].get("commit-timestamp")
        except json.JSONDecodeError:
            pass
    late = [f for f in log if f["kind"] == "late" and f["older_than_watermark"]]
    assert late
    for f in late:
        own = res.changes[f["source_seq"]].commit_ts
        pos = delivered.index(genuine[f["source_seq"]])
        ahead = [c for i, c in commit.items() if i < pos and c]
        assert max(ahead) > own
    # the manifest's expected quarantine counts every bad record
    q = {(e["table"], e["rule"]): e["count"] for e in res.manifest["expected_quarantine"]["kinesis"]}
    bad = [f for f in log if f["rule"]]
    assert sum(q.values()) == len(bad)


def test_s3_faults(project, tmp_path):
    faults = FaultOptions(duplicate_rate=0.1, missing_primary_key_rate=0.05, unknown_table_rate=0.05,
                          out_of_order_rate=0.5)
    res = run(project, tmp_path, faults=faults)
    log = res.manifest["faults"]["s3"]
    assert {"duplicate", "missing_primary_key", "unknown_table", "out_of_order"} <= {f["kind"] for f in log}
    for f in log:
        if f["kind"] == "missing_primary_key":
            row = pq.read_table(tmp_path / "s3" / f["file"]).to_pylist()[f["row"]]
            assert row[project.tables[f["table"]].primary_key[0]] is None
        if f["kind"] == "unknown_table":
            assert "/ghost_" in f["file"] and (tmp_path / "s3" / f["file"]).exists()


def test_s3_layouts_and_same_key_changes_in_one_transaction(project, tmp_path):
    """`--s3-layout`: the ordering columns DMS writes (both, the timestamp only, neither); the history
    doesn't depend on it. Without `$AR_H_CHANGE_SEQ` rows stay in commit order (no reordering faults),
    bad-record faults still come. `same_key_in_txn_rate`: a key changed again in its transaction."""
    gen = GenOptions(events=150, same_key_in_txn_rate=0.5)
    faults = FaultOptions(duplicate_rate=0.2, out_of_order_rate=0.5, late_rate=0.1, missing_primary_key_rate=0.05)
    runs = {lay: run(project, tmp_path / lay, gen=gen, faults=faults, s3=S3Options(layout=lay))
            for lay in ("change-seq+timestamp", "timestamp", "none")}
    assert len({(tmp_path / lay / "history.jsonl").read_text() for lay in runs}) == 1
    for lay, res in runs.items():
        orders = tmp_path / lay / "s3" / "shop" / "orders"
        heads = {tuple(pq.read_schema(f).names[:2]) + (pq.read_schema(f).names[-1],) for f in orders.glob("2*")}
        load = pq.read_schema(orders / "LOAD00000001.parquet").names
        ts, seq = lay != "none", lay == "change-seq+timestamp"
        assert ("dms_commit_ts" in load, "$AR_H_CHANGE_SEQ" in load) == (ts, seq)
        assert heads == {("Op", "dms_commit_ts" if ts else "order_id", "$AR_H_CHANGE_SEQ" if seq else "updated_at")}
        kinds = {f["kind"] for f in res.manifest["faults"]["s3"]}
        assert "missing_primary_key" in kinds
        assert bool(kinds & {"duplicate", "out_of_order", "late"}) == seq
        assert res.manifest["s3"]["layout"] == lay
    # the same key changed again in one transaction: one commit time, increasing record ids
    changes = runs["none"].changes
    pairs = [(a, b) for a, b in zip(changes, changes[1:], strict=False)
             if a.txn_id is not None and a.txn_id == b.txn_id and a.table == b.table
             and a.data and b.data and all(a.data[k] == b.data[k] for k in project.tables[a.table].primary_key)]
    assert pairs and all(a.commit_ts == b.commit_ts and a.txn_rec_id < b.txn_rec_id for a, b in pairs)


def test_schema_drift_and_control_records(project, tmp_path):
    res = run(project, tmp_path, gen=GenOptions(events=300, schema_drift_rate=1.0))
    recs = [json.loads(x) for x in lines(tmp_path)]
    ctrl = [r for r in recs if r["metadata"]["record-type"] == "control"]
    ops = [r["metadata"]["operation"] for r in ctrl if r["metadata"]["table-name"] == "customers"]
    assert ops == ["create-table", "add-column", "rename-column", "drop-column"]
    assert {r["metadata"]["operation"] for r in ctrl} >= {"column-type-change"}  # a table with a widenable column
    customers = [r for r in recs if r["metadata"]["table-name"] == "customers"]
    steps = {r["metadata"]["operation"]: customers.index(r) for r in customers if "control" in r}
    add, rename, drop = steps["add-column"], steps["rename-column"], steps["drop-column"]
    cols = [set(customers[i]["control"]["table-def"]["columns"]) for i in (add, rename, drop)]
    assert "drift_note" in cols[0] and ("drift_label" in cols[1] and "drift_note" not in cols[1])
    assert not {"drift_note", "drift_label"} & cols[2]
    # data records carry the column under the name of the moment, and not at all after the drop
    datas = [set(r.get("data") or {}) for r in customers]
    assert any("drift_note" in d for d in datas[add:rename]) and not any("drift_label" in d for d in datas[add:rename])
    assert all("drift_label" in d and "drift_note" not in d for d in datas[rename + 1:drop])
    assert not any({"drift_note", "drift_label"} & d for d in datas[drop + 1:])
    types = {v["type"] for r in ctrl for v in r["control"]["table-def"]["columns"].values()}
    assert {"INT64", "TIMESTAMP", "STRING"} <= types and not {"INT4", "INT8", "DATETIME"} & types  # wire naming
    widened = [c for c in res.changes if c.op == "column-type-change"]
    assert widened and all(c.data["type"] in ("bigint",) or c.data["type"].startswith("decimal") for c in widened)
    # CDC Parquet files follow: the new column, then its new name, then neither
    names = [pq.read_table(f).column_names for f in sorted((tmp_path / "s3" / "shop" / "customers").glob("2*.parquet"))]
    assert any("drift_note" in n for n in names) and any("drift_label" in n for n in names)
    assert not {"drift_note", "drift_label"} & set(names[-1])


def test_control_records_in_the_documentation_naming(project, tmp_path):
    run(project, tmp_path, gen=GenOptions(events=50), dms_type_naming="doc")
    ctrl = [json.loads(x) for x in lines(tmp_path) if '"control"' in x]
    types = {v["type"] for r in ctrl for v in r["control"]["table-def"]["columns"].values()}
    assert {"INT8", "DATETIME", "STRING"} <= types and not {"INT64", "INT32", "TIMESTAMP"} & types


def test_thousand_synthetic_tables(tmp_path):
    cfg = write_configs(CONFIGS, tmp_path / "configs", 1000)
    project = load_project(cfg)
    res = simulate(project, tmp_path / "out", SimOptions(seed=1, gen=GenOptions(events=2000)), cfg)
    assert len(project.tables) == 1004 and "synth.t1000" in project.tables
    assert len({c.table for c in res.changes if c.op == "load"}) == 1004


def test_cli(tmp_path, capsys):
    out = tmp_path / "sim"
    assert main(["--config", str(CONFIGS), "simulate", "--out", str(out), "--events", "40", "--seed", "3",
                 "--duplicate-rate", "0.1", "--tables", "2"]) == 0
    assert (out / "history.jsonl").exists() and (out / "manifest.json").exists()
    assert (out / "configs" / "tables" / "synth.t0002.yaml").exists()
    assert json.loads((out / "manifest.json").read_text())["options"]["faults"]["duplicate_rate"] == 0.1
    with pytest.raises(SystemExit):
        main(["--config", str(CONFIGS), "simulate", "--late-rate", "1.5"])
    assert main(["--config", str(CONFIGS), "simulate", "--out", str(out), "--tables", "1001"]) == 1
    assert main(["--config", str(CONFIGS), "simulate", "--out", str(out), "--events", "5", "--duration", "3"]) == 1
    assert main(["--config", str(CONFIGS), "simulate", "--out", str(out), "--table-skew", "-1"]) == 1
    assert main(["--config", str(CONFIGS), "simulate", "--out", str(out), "--events", "40", "--table-skew", "1.1"]) == 0
    assert json.loads((out / "manifest.json").read_text())["options"]["generator"]["table_skew"] == 1.1
    assert main(["--config", str(CONFIGS), "verify", "--history", str(tmp_path / "nope")]) == 1


@pytest.mark.stack
def test_put_to_kinesis_and_s3(stack, tmp_path, monkeypatch):
    import boto3

    monkeypatch.setenv("CDCFLOW_STREAM", "sim-test-stream")
    monkeypatch.setenv("CDCFLOW_RAW_URI", "s3://sim-test-raw/dms")
    project = load_project(CONFIGS)
    res = simulate(project, tmp_path, SimOptions(seed=5, gen=GenOptions(events=700),
                                                 faults=FaultOptions(duplicate_rate=0.05, malformed_json_rate=0.02),
                                                 send_kinesis=True, upload_s3=True))
    assert len(res.kinesis) > 500  # more than one put_records batch
    endpoint = project.pipeline.aws.endpoint_url
    k = boto3.client("kinesis", endpoint_url=endpoint, region_name="us-east-1")
    got: list[tuple[str, str]] = []
    for shard in k.list_shards(StreamName="sim-test-stream")["Shards"]:
        it = k.get_shard_iterator(StreamName="sim-test-stream", ShardId=shard["ShardId"],
                                  ShardIteratorType="TRIM_HORIZON")["ShardIterator"]
        while it:
            resp = k.get_records(ShardIterator=it, Limit=1000)
            got += [(r["PartitionKey"], r["Data"].decode()) for r in resp["Records"]]
            it = resp.get("NextShardIterator") if resp["Records"] else None
    assert sorted(got) == sorted((r.partition_key, r.payload) for r in res.kinesis)
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    keys = [o["Key"] for p in s3.get_paginator("list_objects_v2").paginate(Bucket="sim-test-raw") for o in p["Contents"]]
    assert sorted(keys) == sorted(f"dms/{rel}" for rel in res.s3_files)
    body = s3.get_object(Bucket="sim-test-raw", Key="dms/shop/customers/LOAD00000001.parquet")["Body"].read()
    assert body == res.s3_files["shop/customers/LOAD00000001.parquet"]


def test_drop_table_control_record_is_last_for_its_table(tmp_path):
    import json

    from cdcflow.config import load_project
    from cdcflow.sim.run import SimOptions, simulate
    from cdcflow.sim.source import GenOptions
    from tests.conftest import CONFIGS

    project = load_project(CONFIGS, env={})
    simulate(project, tmp_path, SimOptions(seed=3, gen=GenOptions(events=60, drop_table_rate=1.0)))
    history = [json.loads(x) for x in (tmp_path / "history.jsonl").read_text().splitlines()]
    for table in project.tables:
        ops = [h["op"] for h in history if h["table"] == table]
        assert ops[-1] == "drop-table" and ops.count("drop-table") == 1
    records = [json.loads(x) for f in sorted((tmp_path / "kinesis").glob("*.jsonl"))
               for x in f.read_text().splitlines()]
    drops = [r for r in records if r.get("metadata", {}).get("operation") == "drop-table"]
    assert len(drops) == len(project.tables)
    for r in drops:
        assert r["metadata"]["record-type"] == "control"
        assert r["metadata"]["partition-key-type"] == "task-id"
        assert set(r) == {"control", "metadata"} and "table-def" in r["control"]


def test_table_skew_makes_a_few_hot_tables_and_a_cold_tail(tmp_path):
    from collections import Counter

    from cdcflow.sim.source import generate_history

    project = load_project(write_configs(CONFIGS, tmp_path / "configs", 1000))
    ranked = sorted(project.tables)  # the skew's rank order: fixed by the table names, not the seed
    n = 10000

    def shares(skew: float, seed: int = 5) -> tuple[Counter, list]:
        changes = generate_history(project, seed, GenOptions(events=n, table_skew=skew)).changes
        return Counter(c.table for c in changes if c.op in ("insert", "update", "delete")), changes

    skewed, changes = shares(1.1)
    top = sum(skewed[t] for t in ranked[:10])  # the top 1% of 1004 tables
    assert top > 0.35 * n, top  # 1/r^1.1 gives them ~48%
    assert skewed[ranked[0]] > skewed[ranked[9]] > skewed[ranked[-1]]
    assert len(skewed) > 600, len(skewed)  # the cold tail still changes (~1 change each for the coldest)
    uniform, _ = shares(0.0)
    assert sum(uniform[t] for t in ranked[:10]) < 0.03 * n and len(uniform) > 990
    assert max(uniform.values()) < 40  # ~10 each
    # same seed, same history; another seed, another one (with the same hot tables)
    again = shares(1.1)[1]
    assert [c.to_dict() for c in again] == [c.to_dict() for c in changes]
    other, _ = shares(1.1, seed=6)
    assert other != skewed and other.most_common(1)[0][0] == ranked[0]
    with pytest.raises(ValueError):
        generate_history(project, 5, GenOptions(events=10, table_skew=-1))
