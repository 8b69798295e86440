"""Schema evolution from DMS control records: only adding columns and widening types is safe.

A narrowing or incompatible type change must never reach the table: the caller quarantines the
table's records and raises an alert instead.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

# DMS data types (table-def "type") -> Spark SQL types.
_DMS_TYPES = {
    "INT1": "smallint", "INT2": "smallint", "INT4": "int", "INT8": "bigint", "REAL4": "float", "REAL8": "double",
    "STRING": "string", "WSTRING": "string", "CLOB": "string", "NCLOB": "string", "BOOLEAN": "boolean",
    "DATE": "date", "DATETIME": "timestamp", "TIME": "string", "UINT1": "smallint", "UINT2": "int",
    "UINT4": "bigint", "UINT8": "decimal(20,0)",
}  # fmt: skip
_INT_RANK = {"smallint": 1, "int": 2, "bigint": 3}
_DEC = re.compile(r"^decimal\((\d+),\s*(\d+)\)$")


def spark_type(dms: dict) -> str:
    t = str(dms.get("type", "STRING")).upper()
    if t == "NUMERIC":
        return f"decimal({int(dms.get('precision', 38))},{int(dms.get('scale', 0))})"
    return _DMS_TYPES.get(t, "string")


def is_widening(old: str, new: str) -> bool:
    """True when every value of `old` fits `new` unchanged (same rule as Delta type widening)."""
    old, new = old.lower(), new.lower()
    if old == new:
        return True
    if old in _INT_RANK and new in _INT_RANK:
        return _INT_RANK[new] >= _INT_RANK[old]
    if old == "float" and new == "double":
        return True
    mo, mn = _DEC.match(old), _DEC.match(new)
    if mo and mn:
        (p1, s1), (p2, s2) = map(int, mo.groups()), map(int, mn.groups())
        return s2 >= s1 and (p2 - s2) >= (p1 - s1)
    if old in _INT_RANK and mn:
        digits = {"smallint": 5, "int": 10, "bigint": 20}[old]
        p, s = map(int, mn.groups())
        return p - s >= digits
    if old == "date" and new == "timestamp":
        return True
    return False


@dataclass(frozen=True)
class SchemaChange:
    table: str
    op: str  # add-column | column-type-change | create-table | drop-table | ...
    columns: dict[str, str]  # column -> new Spark type (for add / type change)
    ts: str | None = None  # DMS timestamp of the control record (ISO), orders control records


def parse_control(table: str, op: str, control_json: str | None, ts: str | None = None) -> SchemaChange:
    """Read the table-def of a control record into the columns it declares."""
    try:
        ctl = json.loads(control_json or "{}") or {}
    except ValueError:
        ctl = {}
    cols = (ctl.get("table-def") or {}).get("columns") or {}
    return SchemaChange(table, op, {name: spark_type(d or {}) for name, d in cols.items()}, ts)


TYPE_CHANGE_OPS = ("column-type-change", "change-columns")
_OP_RANK = {"create-table": 0, "add-column": 1, "change-columns": 2, "column-type-change": 2}


def order_key(op: str, ts) -> tuple:
    """Control records in source order: by DMS timestamp, then create < add < type change."""
    return (ts is None, ts, _OP_RANK.get(op, 3))


def plan(current: dict[str, str], change: SchemaChange, stale: bool = False) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """(columns to add, columns to widen, unsafe problems) for a control record against current types.

    A control record carries the whole table-def. create-table / add-column only add the columns not
    present yet (the other types are a snapshot, maybe older than what we hold). A type change widens
    or is unsafe; a `stale` record (older than the last one applied to the table) can't narrow.
    """
    add: dict[str, str] = {}
    widen: dict[str, str] = {}
    unsafe: list[str] = []
    if change.op not in ("add-column", "column-type-change", "create-table", "change-columns"):
        return add, widen, unsafe
    for col, new in change.columns.items():
        old = current.get(col)
        if old is None:
            add[col] = new
        elif old != new and change.op in TYPE_CHANGE_OPS:
            if is_widening(old, new):
                widen[col] = new
            elif not stale:
                unsafe.append(f"{col}: {old} -> {new} is not a widening change")
    return add, widen, unsafe
