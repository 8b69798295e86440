"""Symlink manifests for Redshift Spectrum, written by compaction from the Delta log (delta-rs, no Spark):
exactly the current snapshot's files, one manifest per partition, rewritten only when the list changed;
a table with deletion vectors is skipped with its reason."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest
from deltalake import DeltaTable, TableFeatures, write_deltalake

from batch.compaction import DV_SKIP, MANIFEST_DIR, CompactResult, report, write_manifests


def rows(ids: list[int], part: str = "x", status: str = "placed") -> pa.Table:
    return pa.table({"id": pa.array(ids, pa.int64()), "p": [part] * len(ids), "status": [status] * len(ids)})


def manifest(table: Path, folder: str = "") -> list[str]:
    return (table / MANIFEST_DIR / folder / "manifest").read_text().splitlines()


def test_manifest_lists_exactly_the_current_snapshot_after_a_merge_rewrote_a_file(tmp_path):
    table = tmp_path / "orders"
    for batch in ([1, 2], [3, 4], [5]):
        write_deltalake(str(table), rows(batch), mode="append")
    first = set(DeltaTable(str(table)).file_uris())
    m = write_manifests(str(table))
    assert m is not None and m.status == {"": "written"} and m.summary() == "written"
    assert set(manifest(table)) == first and len(first) == 3

    # a MERGE that updates id 3: delta-rs rewrites the file holding it (remove + add)
    dt = DeltaTable(str(table))
    (dt.merge(rows([3], status="shipped"), "t.id = s.id", source_alias="s", target_alias="t")
     .when_matched_update_all().execute())
    current = DeltaTable(str(table)).file_uris()  # computed independently of the writer
    removed = first - set(current)
    assert removed, "the merge removed the file that held id 3"
    assert write_manifests(str(table)).status == {"": "written"}
    listed = manifest(table)
    assert sorted(listed) == sorted(current) and not removed & set(listed)
    assert all(Path(f).is_absolute() and Path(f).exists() for f in listed)  # absolute paths of live files

    # nothing changed: the manifest is not rewritten (same mtime), and no temp file is left behind
    mtime = (table / MANIFEST_DIR / "manifest").stat().st_mtime_ns
    assert write_manifests(str(table)).status == {"": "unchanged"}
    assert (table / MANIFEST_DIR / "manifest").stat().st_mtime_ns == mtime
    assert [f.name for f in (table / MANIFEST_DIR).iterdir()] == ["manifest"]

    # compaction's order: OPTIMIZE, VACUUM, then the manifest. VACUUM leaves the manifest folder alone
    # (a hidden `_` folder), and the rewrite lists only the compacted file
    DeltaTable(str(table)).optimize.compact()
    DeltaTable(str(table)).vacuum(retention_hours=0, dry_run=False, enforce_retention_duration=False)
    assert (table / MANIFEST_DIR / "manifest").exists()
    assert write_manifests(str(table)).status == {"": "written"}
    assert manifest(table) == DeltaTable(str(table)).file_uris() and len(manifest(table)) == 1
    assert Path(manifest(table)[0]).exists()


def test_partitioned_table_has_one_manifest_per_partition_and_a_gone_partition_loses_its_own(tmp_path):
    table = tmp_path / "bronze"
    write_deltalake(str(table), rows([1, 2], "x"), mode="append", partition_by=["p"])
    write_deltalake(str(table), rows([3], "y y"), mode="append", partition_by=["p"])
    write_deltalake(str(table), rows([4], "x"), mode="append", partition_by=["p"])
    m = write_manifests(str(table))
    assert m.status == {"p=x": "written", "p=y%20y": "written"}
    assert m.partitions == ({"p": "x"}, {"p": "y y"})
    dt = DeltaTable(str(table))
    for folder in ("p=x", "p=y%20y"):
        assert sorted(manifest(table, folder)) == sorted(u for u in dt.file_uris() if f"/{folder}/" in u)
    assert not (table / MANIFEST_DIR / "manifest").exists()  # no root manifest for a partitioned table

    # partition y y is deleted (its file removed from the log): its manifest goes, x's is unchanged
    DeltaTable(str(table)).delete("p = 'y y'")
    m = write_manifests(str(table))
    assert m.status == {"p=x": "unchanged", "p=y%20y": "removed"} and m.partitions == ({"p": "x"},)
    assert not (table / MANIFEST_DIR / "p=y%20y" / "manifest").exists()
    assert sorted(manifest(table, "p=x")) == sorted(DeltaTable(str(table)).file_uris())


def test_a_table_with_deletion_vectors_is_skipped_with_its_reason_and_its_old_manifest_removed(tmp_path):
    table = tmp_path / "customers"
    write_deltalake(str(table), rows([1, 2]), mode="append")
    assert write_manifests(str(table)).status == {"": "written"}
    DeltaTable(str(table)).alter.add_feature(TableFeatures.DeletionVectors, allow_protocol_versions_increase=True)
    m = write_manifests(str(table))
    assert m.skipped == DV_SKIP and m.summary().startswith("skipped: deletion vectors")
    assert m.status == {"": "removed"}  # a kept manifest would go stale and then point at vacuumed files
    assert not (table / MANIFEST_DIR / "manifest").exists()
    # in the compaction report: the table is named among those Spectrum can't read
    r = CompactResult("shop.customers", engine="delta-rs", action="skipped: 1 small of 1 files", manifest=m.summary())
    summary = report([r], datetime(2026, 12, 2, tzinfo=UTC), 1.0)
    assert summary["manifests_skipped"] == ["shop.customers"] and summary["manifests_written"] == 0
    assert summary["results"][0]["manifest"] == m.summary()


def test_no_table_no_manifest(tmp_path):
    assert write_manifests(str(tmp_path / "missing")) is None
    assert not (tmp_path / "missing" / MANIFEST_DIR).exists()


@pytest.fixture
def s3(monkeypatch):
    import boto3
    from moto import mock_aws

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
        monkeypatch.setenv(k, v)
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="lake")
        yield client


def test_manifests_on_s3_are_single_puts_and_stale_partitions_are_deleted(tmp_path, s3, monkeypatch):
    """The S3 side of the store, against moto's S3 (the table itself is local: only the manifest
    folder's location differs, so the store is given an s3:// table path with a stubbed snapshot)."""
    import batch.compaction as compaction

    snapshots = iter([
        ({"p=a": ["s3://lake/t/p=a/1.parquet"], "p=b": ["s3://lake/t/p=b/2.parquet"]}, ({"p": "a"}, {"p": "b"})),
        ({"p=a": ["s3://lake/t/p=a/1.parquet"]}, ({"p": "a"},)),
    ])
    monkeypatch.setattr(compaction, "snapshot_files", lambda path: next(snapshots))
    assert write_manifests("s3a://lake/t", s3).status == {"p=a": "written", "p=b": "written"}
    body = s3.get_object(Bucket="lake", Key=f"t/{MANIFEST_DIR}/p=a/manifest")["Body"].read().decode()
    assert body == "s3://lake/t/p=a/1.parquet\n"
    assert write_manifests("s3a://lake/t", s3).status == {"p=a": "unchanged", "p=b": "removed"}
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="lake", Prefix="t/")["Contents"]]
    assert keys == [f"t/{MANIFEST_DIR}/p=a/manifest"]
