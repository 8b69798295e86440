"""Fact load: point-in-time surrogate keys, inferred members fixed in place, upsert guarded by _seq."""

from __future__ import annotations

import decimal

import pytest
from warehouse_helpers import Change, current_schema, project, staging, ts

from batch.warehouse import merge_table

pytestmark = pytest.mark.stack


def cust(cid: int, segment: str, minute: int) -> dict:
    return {
        "customer_id": cid,
        "email": f"h{cid}",
        "full_name": f"c{cid}",
        "country": "DE",
        "segment": segment,
        "created_at": ts(0),
        "updated_at": ts(minute),
    }


def order(oid: int, cid: int, status: str, minute: int) -> dict:
    return {
        "order_id": oid,
        "customer_id": cid,
        "status": status,
        "order_date": ts(0).date(),
        "total_amount": decimal.Decimal("9.50"),
        "updated_at": ts(minute),
    }


def sk_of(pg, schema: str, cid: int, segment: str | None) -> int:
    where = "is_inferred" if segment is None else f"segment = '{segment}'"
    return pg.execute(
        f"select customer_sk from {schema}.dim_customer where customer_id = {cid} and {where}"
    ).fetchone()[0]


def facts(pg, schema: str) -> dict[int, tuple]:
    rows = pg.execute(f"select order_id, status, customer_sk, is_deleted from {schema}.fct_orders").fetchall()
    return {r[0]: tuple(r[1:]) for r in rows}


def test_point_in_time_lookup_and_inferred_member(pg):
    p = project()
    schema = current_schema(pg)
    dims = [Change("I", 0, cust(1, "consumer", 0)), Change("U", 100, cust(1, "vip", 100))]
    merge_table(pg, p, "shop.customers", staging(p, "shop.customers", dims), schema=schema)

    orders = [
        Change("I", 50, order(10, 1, "placed", 50)),  # before the change at minute 100: first version
        Change("I", 150, order(11, 1, "placed", 150)),  # after: second version
        Change("I", 60, order(12, 2, "placed", 60)),  # customer 2 not in the dimension yet
        Change("I", 61, order(13, 3, "placed", 61)),
        Change("D", 62, order(13, 3, "placed", 61)),  # inserted and deleted in the same batch
    ]
    r = merge_table(pg, p, "shop.orders", staging(p, "shop.orders", orders), schema=schema)
    assert r.inferred_members == 1 and r.facts_inserted == 4
    inferred = sk_of(pg, schema, 2, None)
    assert facts(pg, schema) == {
        10: ("placed", sk_of(pg, schema, 1, "consumer"), False),
        11: ("placed", sk_of(pg, schema, 1, "vip"), False),
        12: ("placed", inferred, False),
        13: ("placed", None, True),  # a tombstone: a late, older change can't resurrect it
    }
    late = [Change("U", 55, order(13, 3, "paid", 55)), Change("U", 40, order(10, 1, "paid", 40))]
    merge_table(pg, p, "shop.orders", staging(p, "shop.orders", late), schema=schema)
    assert facts(pg, schema)[13] == ("placed", None, True)
    assert facts(pg, schema)[10][0] == "placed"  # older than the stored change: ignored

    # The dimension row of customer 2 arrives: the inferred member becomes it, keeping its key.
    merge_table(
        pg,
        p,
        "shop.customers",
        staging(p, "shop.customers", [Change("I", 58, cust(2, "business", 58))]),
        schema=schema,
    )
    row = pg.execute(
        f"select customer_sk, segment, is_inferred, is_current, valid_from from {schema}.dim_customer "
        "where customer_id = 2"
    ).fetchall()
    assert row == [(inferred, "business", False, True, ts(58))]
    assert facts(pg, schema)[12][1] == inferred

    # A later update of order 12 resolves to the same (now real) version; a delete flags the fact.
    upd = [Change("U", 70, order(12, 2, "paid", 70)), Change("D", 171, order(11, 1, "placed", 150))]
    r = merge_table(pg, p, "shop.orders", staging(p, "shop.orders", upd), schema=schema)
    assert (r.facts_updated, r.facts_deleted, r.inferred_members) == (1, 1, 0)
    assert facts(pg, schema)[12] == ("paid", inferred, False)
    assert facts(pg, schema)[11][2] is True


def test_composite_key_fact_with_product_lookup(pg):
    p = project()
    schema = current_schema(pg)
    items = [
        Change(
            "I",
            1,
            {
                "order_id": 1,
                "line_no": 1,
                "product_id": 7,
                "quantity": 2,
                "unit_price": decimal.Decimal("1.25"),
                "updated_at": ts(1),
            },
        ),
        Change(
            "I",
            1,
            {
                "order_id": 1,
                "line_no": 2,
                "product_id": 7,
                "quantity": 1,
                "unit_price": decimal.Decimal("3.00"),
                "updated_at": ts(1),
            },
            rec=1,
        ),
    ]
    r = merge_table(pg, p, "shop.order_items", staging(p, "shop.order_items", items), schema=schema)
    assert (r.facts_inserted, r.inferred_members) == (2, 1)
    rows = pg.execute(f"select distinct product_sk from {schema}.fct_order_items").fetchall()
    assert len(rows) == 1 and rows[0][0] is not None


def test_derived_columns_are_stored_and_added_to_tables_created_before_them(pg):
    """`warehouse.columns` (order_items' line_amount, the staging_to_dimension transform's output): a
    staging batch carrying it stores it; one without it (merged without Spark, no transform ran) leaves
    it NULL; tables created before it was configured get the column (ALTER TABLE ... ADD COLUMN)."""
    import pyarrow as pa

    p = project()
    schema = current_schema(pg)

    def line(no: int, minute: int, amount: str | None) -> pa.Table:
        t = staging(p, "shop.order_items", [Change("I", minute, {
            "order_id": 9, "line_no": no, "product_id": 7, "quantity": 2, "unit_price": decimal.Decimal("1.25"),
            "updated_at": ts(minute)})])
        if amount is None:
            return t
        return t.append_column("line_amount", pa.array([decimal.Decimal(amount)], pa.decimal128(21, 2)))

    merge_table(pg, p, "shop.order_items", line(1, 1, None), schema=schema)
    for table in ("fct_order_items", "stg_order_items"):  # as a deployment from before warehouse.columns
        pg.execute(f"alter table {schema}.{table} drop column line_amount")
    merge_table(pg, p, "shop.order_items", line(2, 2, "2.50"), schema=schema)
    got = pg.execute(f"select line_no, line_amount from {schema}.fct_order_items where order_id = 9 "
                     "order by line_no").fetchall()
    assert got == [(1, None), (2, decimal.Decimal("2.50"))]
