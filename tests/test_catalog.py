"""cdcflow.catalog against moto's Glue API: schema drift becomes a new Glue table version."""

from __future__ import annotations

import boto3
import pytest
from moto import mock_aws

from cdcflow.catalog import (
    BRONZE_COLUMNS,
    DELTA_TABLE_PARAMETERS,
    SILVER_META,
    delta_table_input,
    glue_table_name,
    silver_columns,
    spectrum_database,
    spectrum_table_input,
    sync_partitions,
    sync_table_columns,
)
from cdcflow.config import load_project
from tests.conftest import CONFIGS

DB = "cdcflow_shop"
LOCATION = "s3://lake/lake/silver/shop/customers"


@pytest.fixture
def glue(monkeypatch):
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():  # fmt: skip
        monkeypatch.setenv(k, v)
    with mock_aws():
        client = boto3.client("glue", region_name="us-east-1")
        client.create_database(DatabaseInput={"Name": DB})
        client.create_database(DatabaseInput={"Name": spectrum_database(DB)})
        yield client


def _columns(glue, name: str) -> dict[str, str]:
    t = glue.get_table(DatabaseName=DB, Name=name)["Table"]
    return {c["Name"]: c["Type"] for c in t["StorageDescriptor"]["Columns"]}


def _versions(glue, name: str) -> list[dict[str, str]]:
    """Column maps of every stored version, oldest first."""
    versions = glue.get_table_versions(DatabaseName=DB, TableName=name)["TableVersions"]
    versions.sort(key=lambda v: int(v["VersionId"]))
    return [{c["Name"]: c["Type"] for c in v["Table"]["StorageDescriptor"]["Columns"]} for v in versions]


def test_silver_columns_follow_the_config_and_mask_pii():
    project = load_project(CONFIGS, env={})
    customers = project.table("shop.customers")
    cols = silver_columns(customers)
    assert list(cols)[:3] == ["customer_id", "email", "phone"]
    assert cols["customer_id"] == "bigint" and cols["email"] == "string"  # hashed PII is a string
    assert list(cols)[-len(SILVER_META):] == list(SILVER_META)
    orders = silver_columns(project.table("shop.orders"))
    assert "shipping_phone" not in orders  # pii: drop
    assert orders["total_amount"] == "decimal(12,2)"
    assert glue_table_name(customers) == "shop_customers"


def test_drifted_column_is_a_new_table_version(glue):
    name = "shop_customers"
    base = {"customer_id": "bigint", "email": "string", "loyalty": "int", **SILVER_META}
    glue.create_table(DatabaseName=DB, TableInput=delta_table_input(name, LOCATION, base))
    assert len(_versions(glue, name)) == 1

    # drift: loyalty int -> bigint (widening), a new column `tier` (added at the end, after the metadata
    # columns, as Delta ADD COLUMNS appends it)
    drifted = {**base, "loyalty": "bigint", "tier": "string"}
    result = sync_table_columns(glue, DB, name, drifted, location=LOCATION)
    assert result.updated and not result.created
    assert result.added == ("tier",) and result.widened == ("loyalty",)

    cols = _columns(glue, name)
    assert cols["loyalty"] == "bigint" and list(cols)[-1] == "tier"
    versions = _versions(glue, name)
    assert len(versions) == 2, "UpdateTable archived the previous definition"
    assert "tier" not in versions[0] and versions[0]["loyalty"] == "int"
    assert versions[1] == cols
    t = glue.get_table(DatabaseName=DB, Name=name)["Table"]
    assert t["Parameters"]["table_type"] == "DELTA"  # still a Delta table after the update
    assert t["StorageDescriptor"]["Location"] == LOCATION


def test_no_change_no_version_and_never_narrows_or_drops(glue):
    name = "shop_products"
    base = {"product_id": "bigint", "price": "decimal(12,2)", "legacy": "string"}
    glue.create_table(DatabaseName=DB, TableInput=delta_table_input(name, LOCATION, base))
    # same columns again; a narrower type; a column absent from the new schema
    result = sync_table_columns(glue, DB, name, {"product_id": "int", "price": "decimal(12,2)"}, location=LOCATION)
    assert not result.updated and not result.created
    assert len(_versions(glue, name)) == 1
    assert _columns(glue, name) == base


def test_missing_entry_is_created_as_a_delta_table(glue):
    result = sync_table_columns(glue, DB, "bronze", BRONZE_COLUMNS, location="s3://lake/lake/bronze",
                                partition_keys={"table": "string", "date": "date"})
    assert result.created
    t = glue.get_table(DatabaseName=DB, Name="bronze")["Table"]
    assert {k: t["Parameters"][k] for k in DELTA_TABLE_PARAMETERS} == DELTA_TABLE_PARAMETERS
    assert [p["Name"] for p in t["PartitionKeys"]] == ["table", "date"]
    assert "table" not in _columns(glue, "bronze")
    # a later sync that names the partition columns among the data columns doesn't add them twice
    again = sync_table_columns(glue, DB, "bronze", {**BRONZE_COLUMNS, "table": "string"},
                               location="s3://lake/lake/bronze")
    assert not again.updated


def test_sync_silver_table_is_gated_by_the_catalog_database_and_never_raises(glue, monkeypatch):
    """The one function the stream and the full load call: no database set -> no call; a Glue error ->
    a CatalogSyncFailed alert, not an exception (the data is already committed)."""
    import io
    import json

    from cdcflow.catalog import CATALOG_DATABASE_ENV, sync_silver_table
    from cdcflow.metrics import MetricsSink

    project = load_project(CONFIGS, env={"CDCFLOW_AWS_ENDPOINT": "", "CDCFLOW_LAKE_ROOT": "s3://lake/lake"})
    columns = {"customer_id": "bigint", "email": "string"}
    monkeypatch.delenv(CATALOG_DATABASE_ENV, raising=False)
    assert sync_silver_table(project, "shop.customers", columns) is None
    assert glue.get_tables(DatabaseName=DB)["TableList"] == []

    monkeypatch.setenv(CATALOG_DATABASE_ENV, DB)
    created = sync_silver_table(project, "shop.customers", columns)
    assert created is not None and created.created
    t = glue.get_table(DatabaseName=DB, Name="shop_customers")["Table"]
    assert t["StorageDescriptor"]["Location"] == project.path(project.table("shop.customers").delta_path)
    assert list(_columns(glue, "shop_customers")) == [*columns, *SILVER_META]  # metadata columns appended
    drifted = sync_silver_table(project, "shop.customers", {**columns, "tier": "string"})
    assert drifted is not None and drifted.added == ("tier",)
    assert len(_versions(glue, "shop_customers")) == 2

    out = io.StringIO()
    monkeypatch.setenv(CATALOG_DATABASE_ENV, "no_such_database")
    assert sync_silver_table(project, "shop.orders", columns, MetricsSink("cdcflow-shop", stream=out)) is None
    alert = json.loads(out.getvalue().splitlines()[-1])
    assert alert["CatalogSyncFailed"] == 1 and alert["Table"] == "shop.orders"


def _spectrum(glue, name: str) -> dict:
    return glue.get_table(DatabaseName=spectrum_database(DB), Name=name)["Table"]


def test_sync_silver_table_keeps_the_spectrum_entry_over_the_manifests_current(glue, monkeypatch):
    """Spectrum's entry: its own database (the external schema maps a whole database, and Spectrum would
    read a Delta entry's folder as plain Parquet, removed files included), SymlinkTextInputFormat over
    the manifest folder, the Parquet SerDe, silver's columns; drift makes a new version there too."""
    from cdcflow.catalog import CATALOG_DATABASE_ENV, SYMLINK_INPUT, sync_silver_table

    project = load_project(CONFIGS, env={"CDCFLOW_AWS_ENDPOINT": "", "CDCFLOW_LAKE_ROOT": "s3a://lake/lake"})
    monkeypatch.setenv(CATALOG_DATABASE_ENV, DB)
    columns = {"customer_id": "bigint", "email": "string"}
    assert sync_silver_table(project, "shop.customers", columns).created
    t = _spectrum(glue, "shop_customers")
    sd = t["StorageDescriptor"]
    assert sd["InputFormat"] == SYMLINK_INPUT == "org.apache.hadoop.hive.ql.io.SymlinkTextInputFormat"
    assert sd["SerdeInfo"]["SerializationLibrary"] == "org.apache.hadoop.hive.ql.io.parquet.serde.ParquetHiveSerDe"
    assert sd["Location"] == "s3://lake/lake/silver/shop/customers/_symlink_format_manifest/"  # s3://, not s3a://
    assert [c["Name"] for c in sd["Columns"]] == [*columns, *SILVER_META]
    assert "table_type" not in t["Parameters"]  # a Hive table, not a Delta one
    assert glue.get_table(DatabaseName=DB, Name="shop_customers")["Table"]["Parameters"]["table_type"] == "DELTA"

    sync_silver_table(project, "shop.customers", {**columns, "tier": "string"})
    versions = glue.get_table_versions(DatabaseName=spectrum_database(DB), TableName="shop_customers")["TableVersions"]
    assert len(versions) == 2 and [c["Name"] for c in _spectrum(glue, "shop_customers")["StorageDescriptor"]
                                   ["Columns"]][-1] == "tier"
    assert _spectrum(glue, "shop_customers")["StorageDescriptor"]["InputFormat"] == SYMLINK_INPUT  # kept on update


def test_spectrum_partitions_point_at_their_manifest_folders_and_follow_the_lake(glue):
    root = "s3://lake/lake/bronze"
    glue.create_table(DatabaseName=spectrum_database(DB),
                      TableInput=spectrum_table_input("bronze", root, BRONZE_COLUMNS, {"table": "string", "date": "date"}))
    db = spectrum_database(DB)
    first = ({"table": "shop.orders", "date": "2026-11-25"}, {"table": "shop.orders", "date": "2026-11-26"})
    assert sync_partitions(glue, db, "bronze", first) == (2, 0)
    parts = glue.get_partitions(DatabaseName=db, TableName="bronze")["Partitions"]
    locations = {tuple(p["Values"]): p["StorageDescriptor"]["Location"] for p in parts}
    assert locations[("shop.orders", "2026-11-25")] == \
        f"{root}/_symlink_format_manifest/table=shop.orders/date=2026-11-25/"
    assert all(p["StorageDescriptor"]["InputFormat"].endswith("SymlinkTextInputFormat") for p in parts)
    assert sync_partitions(glue, db, "bronze", first) == (0, 0)  # nothing to do: no calls
    # a day is gone from the lake, another arrived
    later = (first[1], {"table": "shop.customers", "date": "2026-11-26"})
    assert sync_partitions(glue, db, "bronze", later) == (1, 1)
    have = {tuple(p["Values"]) for p in glue.get_partitions(DatabaseName=db, TableName="bronze")["Partitions"]}
    assert have == {("shop.orders", "2026-11-26"), ("shop.customers", "2026-11-26")}
