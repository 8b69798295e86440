"""The copy-on-write commit of small tables (cdcflow.cdc.arrow_merge, chosen in apply._rs_merge)
against delta-rs's own MERGE of the same clauses, on random tables and changes: new, older, equal
and newer sequences, deletes of present and absent keys, tombstones, partial updates, a column
silver has and the changes lack, NULLs. Without Spark."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import TableFeatures, write_deltalake

from cdcflow.cdc import apply, arrow_merge
from cdcflow.cdc.changes import TableShape
from cdcflow.cdc.schema import arrow_type
from tests.conftest import CONFIGS
from tests.streaming_helpers import project_in

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _value(rng: random.Random, t: pa.DataType):
    if rng.random() < 0.15:
        return None
    if pa.types.is_integer(t):
        return rng.randint(-5, 10**6)
    if pa.types.is_decimal(t):
        return Decimal(rng.randint(0, 10**6)) / 100
    if pa.types.is_boolean(t):
        return rng.random() < 0.5
    if pa.types.is_timestamp(t):
        return T0 + timedelta(seconds=rng.randint(0, 10**6))
    if pa.types.is_date(t):
        return date(2026, 1, 1) + timedelta(days=rng.randint(0, 300))
    return rng.choice(["a", "b", "é", "", "x y"])


def _key(rng: random.Random, key: list[str], limit: int) -> tuple:
    """One of about `limit` keys, whatever the key's width."""
    side = max(2, round(limit ** (1 / len(key))))
    return tuple(rng.randint(0, side) for _ in key)


def _silver(rng: random.Random, shape: TableShape, n: int, legacy: bool) -> pa.Table:
    t = shape.table
    rows = []
    for k in {_key(rng, t.primary_key, n): None for _ in range(n)}:
        deleted = rng.random() < 0.2
        row = {c: _value(rng, arrow_type(shape.output_type(c))) for c in shape.output_columns}
        row |= dict(zip(t.primary_key, k, strict=True))
        row |= {"_is_deleted": deleted, "_seq": f"{rng.randint(0, 30):04d}", "_op": "delete" if deleted else "update",
                "_commit_ts": T0, "_deleted_at": T0 if deleted else None, "_ingested_at": T0}
        if legacy:
            row["legacy"] = rng.choice([None, "kept?"])
        rows.append(row)
    schema = apply.silver_schema(shape)
    return pa.Table.from_pylist(rows, schema.append(pa.field("legacy", pa.string())) if legacy else schema)


def _changes(rng: random.Random, shape: TableShape, n: int, silver: pa.Schema, partial: bool) -> pa.Table:
    """Collapsed changes (one per key) in silver's types, as _merge_delta_rs hands them over."""
    t = shape.table
    rows = []
    for k in {_key(rng, t.primary_key, n + n // 2): None for _ in range(n)}:
        row = {c: _value(rng, silver.field(c).type) for c in shape.output_columns}
        row |= dict(zip(t.primary_key, k, strict=True))
        row |= {"_op": rng.choice(["insert", "update", "delete", "load"]), "_seq": f"{rng.randint(0, 30):04d}",
                "_commit_ts": T0 + timedelta(hours=rng.randint(1, 9)), "_ingested_at": T0 + timedelta(days=1)}
        if partial:
            row["_partial"] = rng.random() < 0.5
        rows.append(row)
    fields = [silver.field(c) for c in shape.output_columns]
    fields += [pa.field(c, silver.field(c).type) for c in ("_op", "_seq", "_commit_ts", "_ingested_at")]
    fields += [pa.field("_partial", pa.bool_())] if partial else []
    return pa.Table.from_pylist(rows, pa.schema(fields))


def _merged(path: str, source: pa.Table, m: apply.MergeClauses, key: list[str], copy_on_write: bool, monkeypatch):
    monkeypatch.setattr(apply, "COPY_ON_WRITE_MAX_BYTES", 1 << 40 if copy_on_write else -1)
    apply._rs_merge(path, source, m)
    rows = apply.rs_table(path).to_pyarrow_table().to_pylist()
    return sorted(rows, key=lambda r: tuple(r[k] for k in key))


@pytest.mark.parametrize("name", ["shop.customers", "shop.order_items", "shop.orders"])
@pytest.mark.parametrize("seed", range(4))
def test_the_arrow_merge_is_delta_rs_merge(tmp_path: Path, monkeypatch, name: str, seed: int):
    rng = random.Random(f"{name}-{seed}")
    table = project_in(tmp_path, CONFIGS).table(name)
    if seed % 2:
        table = replace(table, deletes="hard" if table.deletes == "soft" else "soft")
    shape = TableShape(table)
    legacy = seed >= 2
    silver = _silver(rng, shape, 40, legacy)
    partial = table.cfg.ignore_null_updates
    source = _changes(rng, shape, 25, silver.schema, partial)
    m = apply.merge_clauses(shape, ["legacy"] if legacy else [], apply._dq, partial)
    keys = {c: set(zip(*(t[k].to_pylist() for k in table.primary_key), strict=True)) for c, t in (("s", source), ("t", silver))}
    assert keys["s"] & keys["t"] and keys["s"] - keys["t"]  # changes to present keys and new ones
    got = {}
    for copy_on_write in (False, True):
        path = str(tmp_path / f"silver-{copy_on_write}")
        write_deltalake(path, silver)
        got[copy_on_write] = _merged(path, source, m, table.primary_key, copy_on_write, monkeypatch)
    assert got[True] == got[False]


def test_the_arrow_merge_refuses_sql_it_does_not_know():
    with pytest.raises(ValueError, match="does not evaluate"):
        arrow_merge.evaluate(arrow_merge.parsed("upper(s.x)"), None)
    with pytest.raises(ValueError, match="key equalities"):
        arrow_merge.merge_key("t.a = s.b")


def _rewrites(path: str) -> bool:
    table = apply.rs_table(path)
    return apply.copies_on_write(table, apply.table_files(table).size_bytes)


def test_only_small_unpartitioned_tables_without_the_change_feed_are_rewritten(tmp_path: Path, monkeypatch):
    data = pa.table({"k": [1, 2], "day": ["a", "b"]})
    write_deltalake(tmp_path / "plain", data)
    write_deltalake(tmp_path / "partitioned", data, partition_by=["day"])
    write_deltalake(tmp_path / "feed", data, configuration={"delta.enableChangeDataFeed": "true"})
    assert _rewrites(str(tmp_path / "plain"))
    assert not _rewrites(str(tmp_path / "partitioned"))
    assert not _rewrites(str(tmp_path / "feed"))
    generated = apply.rs_table(str(tmp_path / "plain"))
    generated.alter.add_feature(TableFeatures.GeneratedColumns, allow_protocol_versions_increase=True)
    assert not _rewrites(str(tmp_path / "plain"))
    write_deltalake(tmp_path / "small", data)
    assert _rewrites(str(tmp_path / "small"))
    monkeypatch.setattr(apply, "COPY_ON_WRITE_MAX_BYTES", 100)  # the table's file is bigger
    assert not _rewrites(str(tmp_path / "small"))
