"""SCD2 dimension merge on the embedded Postgres, checked against an independent replay of the changes."""

from __future__ import annotations

import pytest
from warehouse_helpers import Change, current_schema, dimension_rows, expected_history, project, staging

from batch.warehouse import merge_table

pytestmark = pytest.mark.stack

KEY = ["customer_id"]
TRACKED = ["email", "full_name", "country", "segment"]
SCD1 = ["phone"]
OTHERS = ["created_at", "updated_at"]


def cust(
    cid: int,
    name: str,
    country: str | None = "DE",
    segment: str | None = "consumer",
    phone: str | None = None,
    minute: int = 0,
) -> dict:
    from warehouse_helpers import ts

    return {
        "customer_id": cid,
        "email": f"h{cid}",
        "phone": phone,
        "full_name": name,
        "country": country,
        "segment": segment,
        "created_at": ts(0),
        "updated_at": ts(minute),
    }


def check(pg, changes: list[Change]) -> list[tuple]:
    got = dimension_rows(pg, current_schema(pg), "dim_customer", KEY, TRACKED + SCD1 + OTHERS)
    want = expected_history(changes, KEY, TRACKED, SCD1, OTHERS)
    assert got == want
    return got


BATCH1 = [  # full load
    Change("I", None, cust(1, "Ann")),
    Change("I", None, cust(2, "Bob")),
    Change("I", None, cust(3, "Cid", segment=None)),
    Change("I", None, cust(4, "Dee", segment=None)),
    Change("I", None, cust(5, "Eve")),
]
BATCH2 = [
    Change("U", 10, cust(1, "Ann", country="FR", minute=10)),  # tracked change
    Change("U", 20, cust(1, "Ann", country="IT", minute=20)),  # several changes to one key in one batch
    Change("U", 30, cust(1, "Ann B", country="IT", minute=30)),
    Change("U", 11, cust(2, "Bob", phone="+1", minute=11)),  # only SCD1 + untracked: no new version
    Change("U", 12, cust(3, "Cid", segment=None, minute=12)),  # NULL -> NULL: no change
    Change("U", 13, cust(4, "Dee", segment="vip", minute=13)),  # NULL -> value: change
    Change("D", 14, cust(5, "Eve")),  # delete closes
    Change("I", 15, cust(6, "Fay", minute=15)),  # new key
]
BATCH3 = [
    Change("I", 40, cust(5, "Eve", minute=40)),  # re-insert after delete opens a new version
    Change("U", 41, cust(4, "Dee", segment=None, minute=41)),  # value -> NULL: change
    Change("U", 25, cust(1, "Ann", country="ES", minute=25)),  # late: between stored versions 20 and 30
    Change("U", 5, cust(2, "Bob", phone="+0", minute=5)),  # late SCD1 change: older, must not win
    Change("U", 42, cust(6, "Fay", country="NL", minute=42)),
    Change("D", 43, cust(6, "Fay")),  # insert + delete of a new version in one batch
]


def test_scd2_history_matches_replay(pg):
    p = project()
    schema = current_schema(pg)
    seen: list[Change] = []

    r1 = merge_table(pg, p, "shop.customers", staging(p, "shop.customers", BATCH1), schema=schema)
    seen += BATCH1
    assert (r1.rows_staged, r1.versions_inserted, r1.rows_closed) == (5, 5, 0)
    check(pg, seen)

    r2 = merge_table(pg, p, "shop.customers", staging(p, "shop.customers", BATCH2), schema=schema)
    seen += BATCH2
    rows = check(pg, seen)
    assert r2.versions_inserted == 5  # 1@10, 1@20, 1@30, 4@13, 6@15
    assert r2.rows_closed == 3  # 1 (load), 4 (load), 5 (deleted)
    assert [r for r in rows if r[0] == 2][0][5] == "+1"  # SCD1 in place

    sks_before = {r[0] for r in pg.execute(f"select customer_sk from {schema}.dim_customer").fetchall()}
    merge_table(pg, p, "shop.customers", staging(p, "shop.customers", BATCH3), schema=schema)
    seen += BATCH3
    rows = check(pg, seen)
    assert [r for r in rows if r[0] == 2][0][5] == "+1"  # the late, older phone did not win
    sks_after = {r[0] for r in pg.execute(f"select customer_sk from {schema}.dim_customer").fetchall()}
    assert sks_before <= sks_after  # stored versions keep their surrogate keys

    # Re-running any batch changes nothing, not even a row version.
    before = pg.execute(f"select *, xmin::text from {schema}.dim_customer order by 1").fetchall()
    for batch in (BATCH1, BATCH2, BATCH3, BATCH2 + BATCH3):
        r = merge_table(pg, p, "shop.customers", staging(p, "shop.customers", batch), schema=schema)
        assert (r.versions_inserted, r.versions_updated, r.rows_closed, r.scd1_updated) == (0, 0, 0, 0)
    assert pg.execute(f"select *, xmin::text from {schema}.dim_customer order by 1").fetchall() == before


def test_all_batches_at_once_equals_batch_by_batch(pg):
    p = project()
    schema = current_schema(pg)
    merge_table(
        pg, p, "shop.customers", staging(p, "shop.customers", BATCH1 + BATCH2 + BATCH3), schema=schema
    )
    check(pg, BATCH1 + BATCH2 + BATCH3)


def test_late_change_identical_to_next_version_moves_its_start(pg):
    p = project()
    schema = current_schema(pg)
    first = [Change("I", 1, cust(1, "A", minute=1)), Change("U", 30, cust(1, "B", minute=30))]
    merge_table(pg, p, "shop.customers", staging(p, "shop.customers", first), schema=schema)
    sk_b = pg.execute(f"select customer_sk from {schema}.dim_customer where full_name = 'B'").fetchone()[0]
    late = [Change("U", 20, cust(1, "B", minute=20))]  # B really started at minute 20
    merge_table(pg, p, "shop.customers", staging(p, "shop.customers", late), schema=schema)
    check(pg, first + late)
    assert (
        pg.execute(f"select customer_sk from {schema}.dim_customer where full_name = 'B'").fetchone()[0]
        == sk_b
    )


def test_scd_type_for_untracked_columns_keeps_opening_values(pg):
    """created_at/updated_at are neither tracked nor SCD1: a version keeps the values it opened with."""
    p = project()
    schema = current_schema(pg)
    chs = [Change("I", 1, cust(1, "A", minute=1)), Change("U", 2, cust(1, "A", minute=2))]
    merge_table(pg, p, "shop.customers", staging(p, "shop.customers", chs), schema=schema)
    check(pg, chs)
    (n,) = pg.execute(f"select count(*) from {schema}.dim_customer").fetchone()
    assert n == 1
