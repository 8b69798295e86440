"""`cdcflow warehouse-merge` reads a Parquet staging batch and merges it (no Spark)."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
from warehouse_helpers import CONFIGS, Change, current_schema, project, staging, ts

from cdcflow.cli import main

pytestmark = pytest.mark.stack


def test_warehouse_merge_cli(pg, stack, tmp_path, capsys):
    p = project()
    row = {"product_id": 1, "sku": "SKU-00001", "name": "n", "category": "toys", "active": True, "updated_at": ts(1)}
    pq.write_table(staging(p, "shop.products", [Change("I", 1, row)]), tmp_path / "b.parquet")
    schema = current_schema(pg)
    args = ["--config", str(CONFIGS), "warehouse-merge", "--table", "shop.products"]
    rc = main([*args, "--staging", str(tmp_path / "b.parquet"), "--url", stack.pg_url, "--schema", schema])
    assert rc == 0 and '"versions_inserted": 1' in capsys.readouterr().out
    assert pg.execute("select count(*) from dim_product where is_current").fetchone()[0] == 1
