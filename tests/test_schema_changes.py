"""Control-record table-defs as DMS writes them (wire naming) and as its docs name them: no Spark needed."""

from __future__ import annotations

import json

import pytest

from cdcflow.cdc import schema

# customers as a DMS task on RDS PostgreSQL describes it on Kinesis (the declared types of configs/)
WIRE_CUSTOMERS = {
    "customer_id": {"type": "INT64", "nullable": False}, "email": {"type": "STRING", "length": 255},
    "phone": {"type": "STRING", "length": 32}, "full_name": {"type": "STRING", "length": 200},
    "country": {"type": "STRING", "length": 2}, "segment": {"type": "STRING", "length": 20},
    "created_at": {"type": "TIMESTAMP"}, "updated_at": {"type": "TIMESTAMP"},
}  # fmt: skip
DECLARED = {"customer_id": "bigint", "email": "string", "phone": "string", "full_name": "string",
            "country": "string", "segment": "string", "created_at": "timestamp", "updated_at": "timestamp"}


def change(op: str, columns: dict, ts: str = "2026-11-25T10:00:00Z") -> schema.SchemaChange:
    return schema.parse_control("shop.customers", op, json.dumps({"table-def": {"columns": columns}}), ts)


def test_wire_add_column_adds_only_the_new_column():
    p = schema.plan(DECLARED, change("add-column", {**WIRE_CUSTOMERS, "loyalty": {"type": "INT32"}}))
    assert (p.add, p.widen, p.unsafe, p.warnings) == ({"loyalty": "int"}, {}, [], [])


def test_type_change_restating_every_column_in_wire_naming_widens_only_the_changed_one():
    current = {**DECLARED, "loyalty": "int"}
    p = schema.plan(current, change("column-type-change", {**WIRE_CUSTOMERS, "loyalty": {"type": "INT64"}}))
    assert (p.add, p.widen, p.unsafe, p.warnings) == ({}, {"loyalty": "bigint"}, [], [])
    # the bug this replaced: TIMESTAMP read as string made created_at "timestamp -> string", unsafe


def test_documentation_naming_is_read_too():
    doc = {"customer_id": {"type": "INT8"}, "created_at": {"type": "DATETIME"}, "loyalty": {"type": "INT4"},
           "price": {"type": "NUMERIC", "precision": 12, "scale": 2}}
    c = change("create-table", doc)
    assert {k: d.types for k, d in c.columns.items()} == {
        "customer_id": ("bigint",), "created_at": ("timestamp",), "loyalty": ("int",), "price": ("decimal(12,2)",)}


@pytest.mark.parametrize(("others", "expected"), [
    ({"id": {"type": "INT32"}}, ("smallint",)),  # wire: 8 bits
    ({"id": {"type": "INT4"}}, ("bigint",)),  # documentation: 8 bytes
    ({"id": {"type": "STRING"}}, ("smallint", "bigint")),  # can't tell
])  # fmt: skip
def test_int8_is_resolved_from_the_rest_of_the_table_def(others, expected):
    c = change("create-table", {**others, "n": {"type": "INT8"}})
    assert c.columns["n"].types == expected


def test_ambiguous_int8_is_never_a_narrowing():
    p = schema.plan({"id": "string", "n": "int"}, change("column-type-change", {"id": {"type": "STRING"},
                                                                                "n": {"type": "INT8"}}))
    assert (p.widen, p.unsafe) == ({}, []) and "ambiguous" in p.warnings[0]
    # a new ambiguous column gets the type that holds either meaning
    assert schema.plan({"id": "string"}, change("add-column", {"id": {"type": "STRING"}, "n": {"type": "INT8"}})
                       ).add == {"n": "bigint"}


def test_unknown_type_never_blocks_a_table():
    current = {**DECLARED, "loyalty": "int"}
    cols = {**WIRE_CUSTOMERS, "loyalty": {"type": "GEOMETRY"}, "shape": {"type": "HSTORE_X"}}
    p = schema.plan(current, change("column-type-change", cols))
    assert p.unsafe == [] and p.widen == {} and p.add == {"shape": "string"}
    assert len(p.warnings) == 2 and all("unknown DMS type" in w for w in p.warnings)
    assert schema.spark_type({"type": "NUMERIC", "precision": 99}) is None  # unmappable precision


def test_provable_narrowing_and_incompatible_changes_are_unsafe():
    narrow = schema.plan(DECLARED, change("column-type-change", {**WIRE_CUSTOMERS, "customer_id": {"type": "INT16"}}))
    assert narrow.unsafe == ["customer_id: bigint -> smallint is not a widening change"]
    other = schema.plan(DECLARED, change("column-type-change", {**WIRE_CUSTOMERS, "created_at": {"type": "BOOLEAN"}}))
    assert other.unsafe == ["created_at: timestamp -> boolean is not a widening change"]
    # an older record replayed after a newer one was applied is stale: never "narrowing"
    stale = schema.plan({**DECLARED, "customer_id": "bigint"},
                        change("column-type-change", {**WIRE_CUSTOMERS, "customer_id": {"type": "INT32"}}), stale=True)
    assert stale.unsafe == []


def test_a_restated_column_is_compared_with_the_previous_table_def_not_the_config():
    """The config may declare a column wider than the source (a string for an INT32): when the
    previous table-def said INT32 too, the column did not change."""
    current = {**DECLARED, "segment": "string"}
    cols = {**WIRE_CUSTOMERS, "segment": {"type": "INT32"}, "loyalty": {"type": "INT64"}}
    previous = schema.dms_types(change("create-table", {**cols, "loyalty": {"type": "INT32"}}))
    p = schema.plan({**current, "loyalty": "int"}, change("column-type-change", cols), previous=previous)
    assert (p.widen, p.unsafe) == ({"loyalty": "bigint"}, [])
    # without a previous table-def, what we hold is all we know: string -> int can't be applied
    assert schema.plan({**current, "loyalty": "int"}, change("column-type-change", cols)).unsafe


def test_rename_adds_the_new_name_and_drop_changes_no_type():
    renamed = {**WIRE_CUSTOMERS, "loyalty_points": {"type": "INT32"}}
    assert schema.plan({**DECLARED, "loyalty": "int"}, change("rename-column", renamed)).add == {"loyalty_points": "int"}
    p = schema.plan({**DECLARED, "loyalty": "int"}, change("drop-column", WIRE_CUSTOMERS))
    assert (p.add, p.widen, p.unsafe, p.warnings) == ({}, {}, [], [])
