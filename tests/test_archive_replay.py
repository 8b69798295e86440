"""Replaying the raw archive (`cdcflow stream --replay <archive>`) builds what the live stream builds.

Archive lines hold their `hash` columns hashed already (cdcflow.archive.records); the processor must not
hash them again (issue #20). The archive here is written by the archiver's own line and object code from
a simulated history (no KCL: tests/test_archive_kcl.py runs the daemon), then replayed on real Spark +
Delta and checked against the simulator's oracle: silver of a `hash` column in the table's own plan
(shop.customers.email) and in the many-table plan (shop.products.name, made `hash` here), and bronze.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
from pyspark.sql import functions as F

from cdcflow.sim.synthetic import write_configs
from tests.conftest import CONFIGS
from tests.streaming_helpers import keep_on_own_plan, project_in, simulate_to, verify_against_oracle

HASHED = {"shop.customers": "email", "shop.products": "name"}


def _configs(tmp: Path) -> Path:
    """The sample configs with products.name masked by `hash`: products takes the many-table plan
    (customers, given a warn rule, which the many-table plan leaves to a table's own, takes its own)."""
    out = write_configs(CONFIGS, tmp / "configs", 0)
    f = out / "tables" / "shop.products.yaml"
    text = f.read_text()
    assert "  name: {type: string}\n" in text
    f.write_text(text.replace("  name: {type: string}\n", "  name: {type: string, pii: hash}\n"))
    keep_on_own_plan(out, "shop.customers", "{rule: not_null, columns: [customer_id]}", "country")
    return out


def _write_archive(project, records, salt: str, dest: Path) -> None:
    """The records as the archiver writes them: two shards, objects of up to 40 lines per shard."""
    from cdcflow.archive.records import RawRecord, archive_line, gzip_lines, object_key

    shards: dict[str, list[RawRecord]] = {}
    for i, r in enumerate(records):
        shard = f"shardId-{zlib.crc32(r.partition_key.encode()) % 2:012d}"
        shards.setdefault(shard, []).append(
            RawRecord(shard, str(49_600_000_000_000_000_000 + i), 0, r.partition_key, 1_764_633_600_000 + i * 10,
                      r.payload.encode()))
    for recs in shards.values():
        for i in range(0, len(recs), 40):
            batch = recs[i:i + 40]
            path = dest / object_key("", "cdc", batch)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(gzip_lines(archive_line(r, project, salt) for r in batch))


@pytest.mark.spark
def test_a_replayed_archive_hashes_pii_once_in_both_plans_and_bronze(spark, tmp_path: Path):
    from cdcflow.cdc.masking import mask_value, pii_salt
    from streaming.job import run_stream
    from streaming.sources import replay_stream

    project = project_in(tmp_path, _configs(tmp_path))
    assert {c: m for t in HASHED for c, m in project.table(t).pii.items() if m == "hash"} == {
        "email": "hash", "name": "hash"}
    sim = simulate_to(project, tmp_path / "sim", seed=11, events=300, duplicate_rate=0.03, out_of_order_rate=0.05,
                      malformed_json_rate=0.02, pk_change_rate=0.03, dq_failure_rate=0.02)
    salt = pii_salt(project)
    archive = tmp_path / "archive"
    _write_archive(project, sim.kinesis, salt, archive)

    summary = run_stream(spark, project, replay_stream(spark, str(archive), 1000), available_now=True)
    assert summary.tables["shop.products"].shared_plan and not summary.tables["shop.customers"].shared_plan
    bad = [d for d in verify_against_oracle(spark, project, tmp_path / "sim") if not d.ok]
    assert not bad, [(d.table, d.kind, d.missing[:3], d.extra[:3], d.different[:3]) for d in bad]

    # bronze holds each hashed value hashed once, as the live stream writes it, and no raw value
    raw: dict[str, set[str]] = {t: set() for t in HASHED}
    for r in sim.kinesis:
        try:
            record = json.loads(r.payload)
        except ValueError:
            continue
        if not isinstance(record, dict) or r.table not in HASHED:
            continue
        for image in ("data", project.pipeline.dms.before_image_field):
            value = (record.get(image) or {}).get(HASHED[r.table])
            if value is not None:
                raw[r.table].add(value)
    bronze = spark.read.format("delta").load(project.path("bronze"))
    for table, column in HASHED.items():
        rows = bronze.filter(F.col("table") == table).select(
            F.col("data")[column].alias("d"), F.col("before")[column].alias("b")).collect()
        stored = {v for row in rows for v in row if v is not None}
        assert raw[table] and stored, table
        assert stored <= {mask_value(v, "hash", salt) for v in raw[table]}, table  # twice-hashed ones are not
        assert not stored & raw[table], table
