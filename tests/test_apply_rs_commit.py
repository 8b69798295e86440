"""delta-rs commits of the many-table plan's rows (cdcflow.cdc.apply.merge_rows), without Spark: one
open of the table per commit, and a commit that loses to a concurrent one re-reads the newest
version, so the `_seq` guard compares with what is there now. Each by both ways delta-rs commits:
its MERGE, and a small table's rewrite (copy-on-write)."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable as RsTable
from deltalake import Field as DeltaField
from deltalake import write_deltalake

from cdcflow.cdc import apply
from cdcflow.cdc.changes import TableShape
from tests.conftest import CONFIGS
from tests.streaming_helpers import project_in


def _changes(*rows: tuple[int, str, str]) -> pa.Table:
    """(product_id, name, _seq) updates of shop.products, as the many-table plan collects them."""
    return pa.table({
        "_values": pa.array([[("product_id", str(k)), ("sku", "SKU-00001"), ("name", n)] for k, n, _ in rows],
                            pa.map_(pa.string(), pa.string())),
        "_op": ["update"] * len(rows),
        "_seq": [s for _, _, s in rows],
        "_commit_ts": pa.array([datetime(2026, 1, 1, tzinfo=UTC)] * len(rows), pa.timestamp("us", tz="UTC")),
    })  # fmt: skip


@pytest.fixture(params=["merge", "copy_on_write"])
def products(tmp_path: Path, monkeypatch, request):
    monkeypatch.setattr(apply, "COPY_ON_WRITE_MAX_BYTES", 1 << 40 if request.param == "copy_on_write" else -1)
    t = project_in(tmp_path, CONFIGS).table("shop.products")
    path = str(tmp_path / "silver")
    shape = TableShape(t)
    assert apply.merge_rows(path, _changes((1, "a", "1001"), (2, "x", "1001")), shape) is None
    return path, shape


def _rows(path: str) -> list[dict]:
    table = apply.rs_table(path).to_pyarrow_table(columns=["product_id", "name", "_seq"])
    return sorted(table.to_pylist(), key=lambda r: r["product_id"])


def _counting_opens(monkeypatch) -> list[str]:
    opens: list[str] = []
    real = apply.rs_table
    monkeypatch.setattr(apply, "rs_table", lambda p: opens.append(p) or real(p))
    return opens


def test_a_commit_opens_the_table_once(products, monkeypatch):
    path, shape = products
    apply.HANDLES.take(path)  # as in a process that has not committed to the table yet
    opens = _counting_opens(monkeypatch)
    assert apply.merge_rows(path, _changes((1, "b", "1002")), shape) is None
    assert opens == [path]
    assert _rows(path)[0] == {"product_id": 1, "name": "b", "_seq": "1002"}


def _recreate(path: str, rows: list[tuple[int, str, str]], versions: int) -> None:
    """Drop the table and create it again at the same path (another process), `versions` commits long."""
    held = apply.rs_table(path).to_pyarrow_table()
    shutil.rmtree(path)
    new = pa.Table.from_pylist([{**held.slice(0, 1).to_pylist()[0], "product_id": k, "name": n, "_seq": q}
                                for k, n, q in rows], schema=held.schema)
    write_deltalake(path, new)
    for _ in range(versions - 1):
        write_deltalake(path, new.slice(0, 0), mode="append")


@pytest.mark.parametrize("versions", [1, 8])  # fewer log entries than the held table's, and more
def test_a_held_table_is_used_while_its_log_entry_is_its_last_commit(products, monkeypatch, versions):
    """The next commit brings the table this process committed last up to date instead of opening it,
    another writer's commits included; a table dropped and created again at the same path is opened
    afresh, not read as the old one's next versions."""
    path, shape = products
    opens = _counting_opens(monkeypatch)
    assert apply.merge_rows(path, _changes((1, "b", "1002")), shape) is None
    assert opens == []
    apply.rs_table(path).optimize.z_order(["product_id"])  # another writer between two commits
    opens.clear()
    assert apply.merge_rows(path, _changes((2, "y", "1003")), shape) is None
    assert opens == []
    assert {r["product_id"]: (r["name"], r["_seq"]) for r in _rows(path)} == {1: ("b", "1002"), 2: ("y", "1003")}

    _recreate(path, [(5, "r", "2000"), (1, "q", "2000")], versions)
    opens.clear()
    assert apply.merge_rows(path, _changes((1, "d", "3000"), (6, "n", "3000")), shape) is None
    assert opens == [path]
    assert {r["product_id"]: (r["name"], r["_seq"]) for r in _rows(path)} == {
        5: ("r", "2000"), 1: ("d", "3000"), 6: ("n", "3000")}


def test_a_held_table_keeps_its_files_as_plain_values(products):
    """The files a held table read are its newest version's, after another writer's commit too, and are
    kept as Python values: delta-rs's Arrow add actions hold ~160 KB of its memory each (1,024 held tables)."""
    path, shape = products
    apply.rs_table(path).optimize.z_order(["product_id"])  # another writer's files
    assert apply.merge_rows(path, _changes((3, "z", "1002")), shape) is None
    held = apply.HANDLES.take(path)
    fresh = pa.table(apply.rs_table(path).get_add_actions(flatten=True))
    files = apply.table_files(held)
    assert (files.version, files.paths, files.size_bytes) == (
        apply.rs_table(path).version(), tuple(sorted(fresh["path"].to_pylist())), sum(fresh["size_bytes"].to_pylist()))
    kept = [v for v in vars(held).values() if type(v).__module__.split(".")[0] in ("pyarrow", "arro3")]
    assert kept == []


@pytest.mark.parametrize(("late", "expected"), [
    ((1, "c", "1002"), {1: ("b", "1003"), 2: ("y", "1003")}),  # older than what won: the guard keeps it out
    ((1, "c", "1004"), {1: ("c", "1004"), 2: ("y", "1003")}),  # newer: applied on top, key 2 kept
])  # fmt: skip
def test_a_commit_that_loses_to_a_concurrent_one_reads_the_newest_version(products, monkeypatch, late, expected):
    path, shape = products
    stale = apply.rs_table(path)  # what silver_writer opened before another writer committed
    assert apply.merge_rows(path, _changes((1, "b", "1003"), (2, "y", "1003")), shape) is None
    monkeypatch.setattr(apply, "silver_writer", lambda p, t, **held: ("delta-rs", stale))
    opens = _counting_opens(monkeypatch)
    assert apply.merge_rows(path, _changes(late), shape) is None
    assert opens == [path]  # the commit on the stale version failed; the retry opened the table again
    assert {r["product_id"]: (r["name"], r["_seq"]) for r in _rows(path)} == expected


def test_a_rewrite_reads_back_only_what_it_did_not_write(tmp_path: Path, monkeypatch):
    """A small table's next commit takes the rows this process last wrote while the table holds just
    that commit's files under the same schema; after another writer's commit it reads the table."""
    monkeypatch.setattr(apply, "COPY_ON_WRITE_MAX_BYTES", 1 << 40)
    t = project_in(tmp_path, CONFIGS).table("shop.products")
    path, shape = str(tmp_path / "silver"), TableShape(t)
    reads = []
    real = RsTable.to_pyarrow_table
    monkeypatch.setattr(RsTable, "to_pyarrow_table", lambda self, *a, **k: reads.append(1) or real(self, *a, **k))

    assert apply.merge_rows(path, _changes((1, "a", "1001"), (2, "x", "1001")), shape) is None
    assert apply.merge_rows(path, _changes((1, "b", "1002")), shape) is None
    assert not reads  # the new table's rows and the second commit's were this process's own

    apply.rs_table(path).optimize.z_order(["product_id"])  # another writer: the same rows in a new file
    assert apply.merge_rows(path, _changes((2, "y", "1003")), shape) is None
    assert len(reads) == 1
    # a column added without rewriting a file: same files, another schema
    apply.rs_table(path).alter.add_columns(DeltaField("note", "string"))
    assert apply.merge_rows(path, _changes((1, "c", "1004")), shape) is None
    assert len(reads) == 2
    assert apply.merge_rows(path, _changes((3, "n", "1005")), shape) is None
    assert len(reads) == 2
    assert {r["product_id"]: (r["name"], r["_seq"]) for r in _rows(path)} == {
        1: ("c", "1004"), 2: ("y", "1003"), 3: ("n", "1005")}
    assert "note" in apply.rs_table(path).schema().to_arrow().names


def test_a_new_table_is_created_with_its_first_changes_in_one_commit(products):
    path, _ = products
    table = apply.rs_table(path)
    assert table.version() == 0
    assert {r["product_id"]: (r["name"], r["_seq"]) for r in _rows(path)} == {1: ("a", "1001"), 2: ("x", "1001")}
    assert table.metadata().configuration == apply.silver_options(project_in(Path(path).parent, CONFIGS).table("shop.products"))


def test_a_table_another_writer_creates_first_is_merged_into(tmp_path: Path, monkeypatch):
    """Both writers saw no table; the other one's create lands first: ours is refused and our changes go
    through the guarded MERGE into its table (its newer row for key 1 stays)."""
    t = project_in(tmp_path, CONFIGS).table("shop.products")
    path, shape = str(tmp_path / "silver"), TableShape(t)
    real_writer = apply.silver_writer
    raced = []

    def racing(p, table, source_bytes=0, opened=None):
        if not raced:  # as if checked just before the other writer's create
            raced.append(1)
            other = _changes((1, "theirs", "2000"))
            assert apply.merge_rows(p, other, shape) is None
            return "delta-rs", None
        return real_writer(p, table, source_bytes, opened)

    monkeypatch.setattr(apply, "silver_writer", racing)
    assert apply.merge_rows(path, _changes((1, "ours", "1001"), (2, "x", "1001")), shape) is None
    assert {r["product_id"]: (r["name"], r["_seq"]) for r in _rows(path)} == {1: ("theirs", "2000"), 2: ("x", "1001")}
