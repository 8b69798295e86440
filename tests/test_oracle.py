"""The oracle on small hand-written histories (expected results computed by hand), and verify's comparisons."""

from __future__ import annotations

import hashlib
import json
import random
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from cdcflow.config import load_project
from cdcflow.oracle import (
    HistoryData,
    build_oracle,
    expected_quarantine,
    expected_scd2,
    expected_state,
    failing_rule,
    load_history,
    mask_row,
    op_counts,
)
from cdcflow.sim import FaultOptions, GenOptions, SimOptions, simulate
from cdcflow.verify import Actual, compare_current, compare_quarantine, compare_scd2, normalize, verify

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SALT = "test-salt"
R = "[REDACTED]"


@pytest.fixture(scope="module")
def project():
    return load_project(CONFIGS)


def h(v: str) -> str:
    return hashlib.sha256(f"{SALT}|{v}".encode()).hexdigest()


def T(n: int) -> str:
    return f"2026-11-25T10:00:{n:02d}.000000Z"


class Hist:
    """Builds history.jsonl-shaped changes with increasing source_seq."""

    def __init__(self) -> None:
        self.changes: list[dict] = []

    def add(self, table: str, op: str, data: dict, ts: str | None = None, before: dict | None = None) -> None:
        n = len(self.changes)
        self.changes.append({"source_seq": n, "table": table, "op": op, "data": data, "before": before,
                             "commit_ts": ts, "txn_id": None if ts is None else 100 + n,
                             "txn_rec_id": None if ts is None else 1, "stream_pos": None, "change_seq": None})


def customer(cid: int, email: str, phone: str | None = "+1-555-0001", name: str = "Ann Lee", country: str | None = "US",
             segment: str | None = "consumer", created: str = "2024-01-01 00:00:00.000000") -> dict:
    return {"customer_id": cid, "email": email, "phone": phone, "full_name": name, "country": country,
            "segment": segment, "created_at": created, "updated_at": "2026-11-25 09:00:00.000000"}


def masked_customer(cid: int, email: str, phone: str | None = "x", name: str = "Ann Lee", country: str | None = "US",
                    segment: str | None = "consumer", created: str = "2024-01-01 00:00:00.000000") -> dict:
    return {"customer_id": cid, "email": h(email), "phone": R if phone else None, "full_name": name,
            "country": country, "segment": segment, "created_at": created,
            "updated_at": "2026-11-25 09:00:00.000000", "_is_deleted": False}


def customers_history() -> Hist:
    x = Hist()
    x.add("shop.customers", "load", customer(1, "a@x.com"))
    x.add("shop.customers", "load", customer(2, "b@x.com"))
    x.add("shop.customers", "update", customer(1, "a2@x.com"), T(1))
    x.add("shop.customers", "delete", customer(1, "a2@x.com"), T(2))
    x.add("shop.customers", "insert", customer(1, "a3@x.com", name="Ann Re"), T(3))  # re-insert after delete
    x.add("shop.customers", "update", customer(2, "b@x.com", phone=None, segment=None), T(4))  # NULL update
    x.add("shop.customers", "insert", customer(3, "c@x.com", created="1999-05-05 00:00:00.000000"), T(5))  # bad date
    x.add("shop.customers", "update", customer(3, "c2@x.com"), T(6))  # an update of an unknown key is an upsert
    return x


def test_current_state_delete_reinsert_null_update_and_quality(project):
    state = expected_state(project, customers_history().changes, SALT)["shop.customers"]
    assert state == {
        (1,): masked_customer(1, "a3@x.com", name="Ann Re"),
        (2,): masked_customer(2, "b@x.com", phone=None, segment=None),
        (3,): masked_customer(3, "c2@x.com"),
    }


def test_out_of_order_and_duplicated_input_gives_the_same_answer(project):
    changes = customers_history().changes
    shuffled = changes + [dict(c) for c in changes[2:5]]  # duplicates
    random.Random(3).shuffle(shuffled)
    assert expected_state(project, shuffled, SALT) == expected_state(project, changes, SALT)
    # ... and the answer depends on source order: the same changes in another order differ
    reordered = [dict(c, source_seq=i) for i, c in enumerate([*changes[:3], changes[4], changes[3], *changes[5:]])]
    assert expected_state(project, reordered, SALT)["shop.customers"][(1,)]["_is_deleted"] is True


def test_primary_key_change_and_hard_delete(project):
    x = Hist()
    order = {"order_id": 1, "customer_id": 7, "status": "placed", "order_date": "2026-11-20", "total_amount": "10.00",
             "shipping_phone": "+1-555-0002", "updated_at": "2026-11-25 09:00:00.000000"}
    x.add("shop.orders", "load", order)
    x.add("shop.orders", "update", {**order, "order_id": 2, "status": "paid"}, T(1), before={"order_id": 1})
    x.add("shop.orders", "load", {**order, "order_id": 3})
    x.add("shop.orders", "delete", {**order, "order_id": 3}, T(2))
    state = expected_state(project, x.changes, SALT)["shop.orders"]
    tomb = {"customer_id": None, "status": None, "order_date": None, "total_amount": None, "updated_at": None,
            "_is_deleted": True}
    assert state == {
        (1,): {"order_id": 1, **tomb, "_deleted_at": T(1)},  # old key deleted by the pk change (hard deletes null the columns)
        (2,): {"order_id": 2, "customer_id": 7, "status": "paid", "order_date": "2026-11-20", "total_amount": "10.00",
               "updated_at": "2026-11-25 09:00:00.000000", "_is_deleted": False},  # shipping_phone dropped (PII)
        (3,): {"order_id": 3, **tomb, "_deleted_at": T(2)},
    }
    assert op_counts(x.changes)["shop.orders"] == {"load": 2, "update": 1, "pk_change": 1, "delete": 1}


def test_ignore_null_updates_keeps_previous_values(project):
    x = Hist()
    line = {"order_id": 1, "line_no": 1, "product_id": 5, "quantity": 2, "unit_price": "3.00",
            "updated_at": "2026-11-25 09:00:00.000000"}
    x.add("shop.order_items", "load", line)
    x.add("shop.order_items", "update", {**line, "quantity": None, "unit_price": "4.00"}, T(1))
    x.add("shop.order_items", "update", {**line, "quantity": 2000}, T(2))  # range rule: quarantined, not applied
    state = expected_state(project, x.changes, SALT)["shop.order_items"]
    assert state == {(1, 1): {**line, "unit_price": "4.00", "_is_deleted": False}}
    assert expected_quarantine(project, x.changes, []) == {("shop.order_items", "range"): 1}


def test_scd2_intervals(project):
    x = Hist()
    x.add("shop.customers", "load", customer(1, "a@x.com"))
    x.add("shop.customers", "update", customer(1, "b@x.com"), T(1))  # tracked change: new version
    x.add("shop.customers", "update", customer(1, "b@x.com", phone="+1-555-0009"), T(2))  # scd1 only: none
    x.add("shop.customers", "update", customer(1, "b@x.com", segment=None), T(3))  # value -> NULL: new version
    x.add("shop.customers", "update", customer(1, "b@x.com", segment=None, phone=None), T(4))  # NULL -> NULL: none
    x.add("shop.customers", "delete", customer(1, "b@x.com"), T(5))  # closes the current row
    x.add("shop.customers", "insert", customer(1, "c@x.com"), T(6))  # re-insert opens a new version
    x.add("shop.products", "load", {"product_id": 1, "sku": "SKU-00001", "name": "Lamp", "category": "books",
                                    "price": "1.00", "active": True, "updated_at": "2026-11-25 09:00:00.000000"})
    rows = expected_scd2(project, x.changes, SALT)

    def v(email, segment, vf, vt, cur, deleted):
        return {"customer_id": 1, "email": h(email), "full_name": "Ann Lee", "country": "US", "segment": segment,
                "valid_from": vf, "valid_to": vt, "is_current": cur, "is_deleted": deleted}

    assert rows["shop.customers"] == [
        v("a@x.com", "consumer", None, T(1), False, False),
        v("b@x.com", "consumer", T(1), T(3), False, False),
        v("b@x.com", None, T(3), T(5), False, True),
        v("c@x.com", "consumer", T(6), None, True, False),
    ]
    assert rows["shop.products"] == [{"product_id": 1, "sku": "SKU-00001", "name": "Lamp", "category": "books",
                                      "price": "1.00", "active": True, "valid_from": None, "valid_to": None,
                                      "is_current": True, "is_deleted": False}]
    assert set(rows) == {"shop.customers", "shop.products"}  # only scd_type 2 dimensions


def test_facts_keep_the_latest_change_the_stages_pass_with_referential_rules_on_the_final_silver(project):
    """shop.orders' dimension_to_fact rule: customer_id must be a live shop.customers row once the history
    is applied (the warehouse merge runs after the stream): a deleted customer's orders never reach the
    facts, a fact keeps its last change that passed, and a delete always leaves a tombstone."""
    x = Hist()
    for cid in (1, 2):
        x.add("shop.customers", "load", customer(cid, f"{cid}@x.com"))

    def order(oid: int, cid: int, status: str) -> dict:
        return {"order_id": oid, "customer_id": cid, "status": status, "order_date": "2026-11-25",
                "total_amount": "10.00", "shipping_phone": "555-0101", "updated_at": "2026-11-25 10:00:00"}

    x.add("shop.orders", "insert", order(10, 1, "placed"), T(1))
    x.add("shop.orders", "insert", order(11, 2, "placed"), T(2))
    x.add("shop.orders", "insert", {**order(12, 1, "placed"), "gift_note": "n"}, T(3))  # a drift column
    x.add("shop.orders", "update", order(12, 2, "paid"), T(4))  # moved to the customer deleted below
    x.add("shop.orders", "update", order(10, 1, "paid"), T(5))
    x.add("shop.orders", "delete", order(10, 1, "paid"), T(6))
    x.add("shop.orders", "insert", order(13, 2, "placed"), T(7))
    x.add("shop.orders", "delete", order(13, 2, "placed"), T(8))
    x.add("shop.customers", "delete", customer(2, "2@x.com"), T(9))
    oracle = build_oracle(project, HistoryData(x.changes), SALT)
    facts = oracle.facts["shop.orders"]
    assert facts[(10,)] == {"order_id": 10, "_is_deleted": True}
    assert (11,) not in facts  # its customer is gone from silver
    assert facts[(13,)] == {"order_id": 13, "_is_deleted": True}  # its insert was dropped; the delete is not checked
    assert facts[(12,)]["customer_id"] == 1 and facts[(12,)]["status"] == "placed"  # the change before the move
    assert "gift_note" not in facts[(12,)]  # the fact table has the declared columns only
    assert oracle.state["shop.orders"][(12,)]["customer_id"] == 2  # silver has the move: no referential rule there

    # verify compares the warehouse's facts (rows in silver's shape) with these
    def facts_diff(rows: list[dict]):
        diffs = verify(project, oracle, Actual(current={}, facts={"shop.orders": rows}))
        return {d.table: d for d in diffs if d.kind == "facts"}

    assert set(facts_diff([])) == {"shop.orders", "shop.order_items"}
    assert facts_diff(list(facts.values()))["shop.orders"].ok
    moved = facts_diff([facts[(10,)], {**facts[(12,)], "customer_id": 2}, facts[(13,)]])["shop.orders"]
    assert [d["key"] for d in moved.different] == [(12,)] and not moved.missing


def test_quality_rules(project):
    t = project.tables["shop.products"]
    good = {"product_id": 1, "sku": "SKU-00001", "price": "5.00"}
    assert failing_rule(t, good) is None
    assert failing_rule(t, {**good, "sku": None}) == "not_null"
    assert failing_rule(t, {**good, "price": "100000.01"}) == "range"
    assert failing_rule(t, {**good, "sku": "SKU-1"}) == "regex"
    assert failing_rule(t, {**good, "category": "weapons"}) is None  # staging_to_dimension rule
    assert failing_rule(t, {**good, "category": "weapons"}, "staging_to_dimension") == "accepted_values"
    o = project.tables["shop.orders"]
    assert failing_rule(o, {"order_id": 1, "customer_id": 1, "order_date": "1999-12-31"}) == "valid_date"
    assert failing_rule(o, {"order_id": 1, "customer_id": 1, "status": "lost"}) == "accepted_values"


def test_masking_matches_design(project):
    row = mask_row(project.tables["shop.customers"], customer(9, "e@x.com"), "cdcflow-local-salt")
    assert row["email"] == hashlib.sha256(b"cdcflow-local-salt|e@x.com").hexdigest() and row["phone"] == R
    assert "shipping_phone" not in mask_row(project.tables["shop.orders"], {"shipping_phone": "1"}, SALT)


# ---------------------------------------------------------------- simulator + oracle agree with the delivered records


_ORDER_FIELDS = {"commit_timestamp": "commit-timestamp", "transaction_id": "transaction-id",
                 "transaction_record_id": "transaction-record-id", "stream_position": "stream-position"}


def _type_ok(v, ty: str) -> bool:
    if v is None:
        return True
    if ty in ("int", "bigint", "smallint"):
        return isinstance(v, int) and not isinstance(v, bool)
    if ty.startswith("decimal"):
        return re.fullmatch(r"-?\d+(\.\d+)?", str(v)) is not None
    if ty == "date":
        return re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(v)) is not None
    if ty == "timestamp":
        return re.fullmatch(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(\.\d+)?", str(v)) is not None
    if ty == "boolean":
        return isinstance(v, bool)
    return True


def replay(project, lines: list[str], salt: str) -> tuple[dict[str, list[dict]], list[dict]]:
    """A tiny reference consumer of the delivered Kinesis records (independent of the oracle's history)."""
    quarantine: list[dict] = []
    events: list[tuple] = []
    for ln in lines:
        try:
            body = json.loads(ln)
        except json.JSONDecodeError:
            quarantine.append({"table": None, "rule": "malformed_json"})
            continue
        meta = body["metadata"]
        if meta["record-type"] != "data":
            continue
        t = project.tables.get(f"{meta['schema-name']}.{meta['table-name']}")
        if t is None:
            quarantine.append({"table": None, "rule": "unknown_table"})
            continue
        data, op = body["data"], meta["operation"]
        if any(data.get(c) is None for c in t.primary_key):
            quarantine.append({"table": t.name, "rule": "missing_primary_key"})
            continue
        if not all(_type_ok(data.get(c), ty) for c, ty in t.columns.items()):
            quarantine.append({"table": t.name, "rule": "type_mismatch"})
            continue
        if op != "load" and any(_ORDER_FIELDS[o] not in meta for o in t.ordering if o in _ORDER_FIELDS):
            quarantine.append({"table": t.name, "rule": "no_ordering"})
            continue
        if op != "delete" and (rule := failing_rule(t, data)):
            quarantine.append({"table": t.name, "rule": rule})
            continue
        seq = (0, "", 0, 0) if op == "load" else (1, meta["commit-timestamp"], meta["transaction-id"],
                                                   meta["transaction-record-id"])
        key = tuple(data[c] for c in t.primary_key)
        before = body.get("before-image")
        if before and tuple(before[c] for c in t.primary_key) != key:
            events.append((seq, t.name, tuple(before[c] for c in t.primary_key), "delete", {}))
        events.append((seq, t.name, key, "delete" if op == "delete" else "upsert", data))
    state: dict[str, dict[tuple, tuple]] = {name: {} for name in project.tables}
    for seq, table, key, kind, data in sorted(events, key=lambda e: e[0]):
        t = project.tables[table]
        cur = state[table].get(key)
        if cur is not None and cur[0] >= seq:
            continue  # duplicate delivery
        if kind == "delete":
            state[table][key] = (seq, {**dict(zip(t.primary_key, key, strict=True)), "_is_deleted": True})
            continue
        row = dict(data)
        if t.cfg.ignore_null_updates and cur is not None and not cur[1]["_is_deleted"]:
            row = {**cur[2], **{c: v for c, v in data.items() if v is not None}}
        state[table][key] = (seq, {**mask_row(t, row, salt), "_is_deleted": False}, row)
    return {name: [v[1] for v in rows.values()] for name, rows in state.items()}, quarantine


def test_oracle_agrees_with_a_replay_of_faulty_delivery(project, tmp_path):
    faults = FaultOptions(duplicate_rate=0.1, out_of_order_rate=0.1, late_rate=0.05, malformed_json_rate=0.02,
                          missing_primary_key_rate=0.02, unknown_table_rate=0.02, type_mismatch_rate=0.02,
                          no_ordering_rate=0.02)
    gen = GenOptions(events=800, pk_change_rate=0.05, null_update_rate=0.2, dq_failure_rate=0.03,
                     change_interval_ms=(500, 2000))
    simulate(project, tmp_path, SimOptions(seed=11, gen=gen, faults=faults))
    history = load_history(tmp_path)
    oracle = build_oracle(project, history, SALT)
    lines = (tmp_path / "kinesis" / "part-00000.jsonl").read_text().splitlines()
    current, quarantine = replay(project, lines, SALT)
    diffs = verify(project, oracle, Actual(current=current, quarantine=quarantine))
    assert all(d.ok for d in diffs), [(d.table, d.missing[:2], d.extra[:2], d.different[:2]) for d in diffs]
    assert sum(oracle.quarantine.values()) > 20
    assert any(r["_is_deleted"] for rows in oracle.state.values() for r in rows.values())
    # a pipeline that drops one update shows up as a difference
    broken = [ln for ln in lines if '"operation": "update"' not in ln or '"table-name": "products"' not in ln]
    current2, _ = replay(project, broken, SALT)
    assert not compare_current(oracle.state["shop.products"], current2["shop.products"],
                               project.tables["shop.products"]).ok


# ---------------------------------------------------------------- verify comparisons


def test_compare_current_normalizes_and_reports(project):
    t = project.tables["shop.products"]
    expected = {
        (1,): {"product_id": 1, "sku": "SKU-00001", "name": "Lamp", "category": "books", "price": "5.50",
               "active": True, "updated_at": "2026-11-25 10:00:01.500000", "_is_deleted": False},
        (2,): {"product_id": 2, "sku": None, "name": None, "category": None, "price": None, "active": None,
               "updated_at": None, "_is_deleted": True},
        (3,): {"product_id": 3, "sku": "SKU-00003", "name": "Kite", "category": "toys", "price": "1.00",
               "active": False, "updated_at": None, "_is_deleted": False},
    }
    actual = [
        {"product_id": 1, "sku": "SKU-00001", "name": "Lamp", "category": "books", "price": Decimal("5.5"),
         "active": True, "updated_at": datetime(2026, 11, 25, 10, 0, 1, 500000, tzinfo=UTC), "_is_deleted": False,
         "_seq": "1000", "_op": "update"},
        {"product_id": 2, "sku": "SKU-00002", "name": "old", "_is_deleted": True},  # tombstone: key + flag only
    ]
    d = compare_current(expected, actual, t)
    assert d.missing == [{"key": (3,), "_is_deleted": False}] and not d.extra and not d.different
    actual.append({**expected[(3,)], "price": "1.01"})
    actual.append({**expected[(3,)], "product_id": 4})
    d = compare_current(expected, actual, t)
    assert d.different == [{"key": (3,), "columns": {"price": ("1.00", "1.01")}}] and d.extra == [{"key": (4,)}]
    actual[1]["_is_deleted"] = False
    assert any(x["key"] == (2,) for x in compare_current(expected, actual, t).different)


def test_hard_tombstones_past_their_retention_may_be_collected(project):
    """Compaction removes hard tombstones older than the retention; verify accepts their absence then only."""
    orders, customers = project.tables["shop.orders"], project.tables["shop.customers"]
    assert orders.deletes == "hard" and customers.deletes != "hard"
    tomb = {"_is_deleted": True, "_deleted_at": T(2)}
    deleted = datetime(2026, 11, 25, 10, 0, 2, tzinfo=UTC)
    within = deleted + timedelta(hours=orders.tombstone_retention_hours) - timedelta(seconds=1)
    past = deleted + timedelta(hours=orders.tombstone_retention_hours) + timedelta(seconds=1)
    assert compare_current({(3,): {"order_id": 3, **tomb}}, [], orders, now=within).missing
    assert compare_current({(3,): {"order_id": 3, **tomb}}, [], orders, now=past).ok
    assert compare_current({(3,): {"order_id": 3, **tomb}}, [{"order_id": 3, "_is_deleted": True}], orders,
                           now=past).ok  # not collected yet: also fine
    assert not compare_current({(3,): {"order_id": 3, "_is_deleted": False}}, [], orders, now=past).ok  # live row
    assert compare_current({(3,): {"customer_id": 3, **tomb}}, [], customers, now=past).missing  # soft deletes stay


def test_compare_scd2_and_quarantine(project):
    t = project.tables["shop.customers"]
    exp = [{"customer_id": 1, "email": "e", "valid_from": T(1), "valid_to": None, "is_current": True}]
    act = [{"customer_id": 1, "email": "e", "valid_from": datetime(2026, 11, 25, 10, 0, 1, tzinfo=UTC),
            "valid_to": None, "is_current": True, "customer_sk": 17}]
    assert compare_scd2(exp, act, t).ok
    act[0]["is_current"] = False
    assert compare_scd2(exp, act, t).different
    expected = {(None, "malformed_json"): 2, ("shop.orders", "not_null"): 1}
    rows = [{"table": None, "rule": "malformed_json"}, {"table": "?", "rule": "malformed_json"},
            {"table": "shop.orders", "rule": "not_null"}]
    assert compare_quarantine(expected, rows).ok
    d = compare_quarantine(expected, rows[1:] + [{"table": "shop.orders", "rule": "range"}])
    assert d.missing == [{"table": None, "rule": "malformed_json", "count": 1}]
    assert d.extra == [{"table": "shop.orders", "rule": "range", "count": 1}]
    assert normalize("2026-11-25 10:00:01", "timestamp") == "2026-11-25T10:00:01.000000Z"
