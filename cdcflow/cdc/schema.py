"""Schema evolution from DMS control records: adding columns and widening types apply; only a
provably narrowing or incompatible change to an existing column is unsafe.

DMS names column types two ways. Its data-type documentation says INT1/INT2/INT4/INT8 (bytes),
REAL4/REAL8 and DATETIME; the table-def of a Kinesis or Kafka control record says INT8/INT16/INT32/
INT64 (bits), TIMESTAMP, BYTES and so on. `INT8` (and `UINT8`) is in both, meaning 1 byte in the wire
naming and 8 bytes in the documentation's, so a table-def's naming is read off its other columns; when
they don't tell, `INT8` stays ambiguous and is never taken as a narrowing. A name in neither naming is
unknown: the column keeps the type it has and the caller reports a warning, never blocks the table.

A narrowing or incompatible change must never reach the table: the caller quarantines the
table's records and raises an alert instead.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import pyarrow as pa

_ARROW = {"string": pa.string(), "int": pa.int32(), "bigint": pa.int64(), "smallint": pa.int16(),
          "tinyint": pa.int8(), "double": pa.float64(), "float": pa.float32(), "boolean": pa.bool_(),
          "date": pa.date32(), "timestamp": pa.timestamp("us", "UTC")}


def arrow_type(spark_type: str) -> pa.DataType | None:
    """The Arrow type silver holds for a Spark type whose text Arrow reads back exactly, else None."""
    if spark_type.startswith("decimal(") and spark_type.endswith(")"):
        precision, scale = (int(x) for x in spark_type[len("decimal("):-1].split(","))
        return pa.decimal128(precision, scale)
    return _ARROW.get(spark_type)


# Silver's metadata columns, after the data columns (cdcflow.cdc.apply writes them, cdcflow.catalog
# registers them).
SILVER_META = {
    "_is_deleted": "boolean",
    "_seq": "string",
    "_op": "string",
    "_commit_ts": "timestamp",
    "_deleted_at": "timestamp",
    "_ingested_at": "timestamp",
}

# Names that mean the same in both namings.
_COMMON = {
    "STRING": "string", "WSTRING": "string", "CLOB": "string", "NCLOB": "string", "BOOLEAN": "boolean",
    "DATE": "date", "TIME": "string", "REAL4": "float", "REAL8": "double", "BLOB": "binary",
}  # fmt: skip
# Kinesis / Kafka control records (integer widths in bits).
_WIRE = {
    **_COMMON, "INT8": "smallint", "INT16": "smallint", "INT32": "int", "INT64": "bigint",
    "UINT8": "smallint", "UINT16": "int", "UINT32": "bigint", "UINT64": "decimal(20,0)",
    "TIMESTAMP": "timestamp", "DATETIME": "timestamp", "BYTES": "binary", "FLOAT": "float",
    "FLOAT32": "float", "FLOAT64": "double", "DOUBLE": "double",
}  # fmt: skip
# The DMS data-type documentation (integer widths in bytes).
_DOC = {
    **_COMMON, "INT1": "smallint", "INT2": "smallint", "INT4": "int", "INT8": "bigint",
    "UINT1": "smallint", "UINT2": "int", "UINT4": "bigint", "UINT8": "decimal(20,0)",
    "DATETIME": "timestamp", "BYTE": "binary",
}  # fmt: skip
_WIRE_ONLY = {"INT16", "INT32", "INT64", "UINT16", "UINT32", "UINT64", "TIMESTAMP", "BYTES"}
_DOC_ONLY = {"INT1", "INT2", "INT4", "UINT1", "UINT2", "UINT4", "BYTE"}
_NUMERIC = {"NUMERIC", "DECIMAL"}
_INT_RANK = {"smallint": 1, "int": 2, "bigint": 3}
_DEC = re.compile(r"^decimal\((\d+),\s*(\d+)\)$")


def naming(type_names: list[str]) -> str | None:
    """'wire', 'doc', or None when the names don't tell (or contradict each other)."""
    names = {str(n).upper() for n in type_names}
    wire, doc = bool(names & _WIRE_ONLY), bool(names & _DOC_ONLY)
    return "wire" if wire and not doc else "doc" if doc and not wire else None


def candidates(dms: dict, table_naming: str | None) -> tuple[str, ...]:
    """The Spark types a DMS column definition can mean: one when known, two for an ambiguous
    `INT8`/`UINT8` (narrow first), none when the name is unknown or unmappable."""
    t = str(dms.get("type", "")).upper()
    if t in _NUMERIC:
        try:
            p, s = int(dms.get("precision") or 38), int(dms.get("scale") or 0)
        except (TypeError, ValueError):
            return ()
        return (f"decimal({p},{s})",) if 0 < p <= 38 and 0 <= s <= p else ()
    if table_naming == "wire":
        return (_WIRE[t],) if t in _WIRE else ()
    if table_naming == "doc":
        return (_DOC[t],) if t in _DOC else ()
    return tuple(dict.fromkeys(x for x in (_WIRE.get(t), _DOC.get(t)) if x))  # wire's (narrower) first


def spark_type(dms: dict, table_naming: str | None = None) -> str | None:
    """The one Spark type of a DMS column definition, or None (unknown, or ambiguous)."""
    c = candidates(dms, table_naming)
    return c[0] if len(c) == 1 else None


def is_widening(old: str, new: str) -> bool:
    """True when every value of `old` fits `new` unchanged (the rule of Delta type widening)."""
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
class ColumnDef:
    """One column of a control record's table-def: its DMS type as written, the Spark types it can mean."""

    dms: str  # e.g. "INT32", "NUMERIC(12,2)": compared to tell a restated column from a changed one
    types: tuple[str, ...]  # () unknown, (t,) known, (narrow, wide) ambiguous


@dataclass(frozen=True)
class SchemaChange:
    table: str
    op: str  # add-column | column-type-change | create-table | drop-table | rename-column | ...
    columns: dict[str, ColumnDef] = field(default_factory=dict)
    ts: str | None = None  # DMS timestamp of the control record (ISO), orders control records


def _signature(d: dict) -> str:
    t = str(d.get("type", "")).upper()
    extra = [str(d[k]) for k in ("precision", "scale", "length") if d.get(k) is not None]
    return f"{t}({','.join(extra)})" if extra else t


def parse_control(table: str, op: str, control_json: str | None, ts: str | None = None) -> SchemaChange:
    """Read the table-def of a control record into the columns it declares."""
    try:
        ctl = json.loads(control_json or "{}") or {}
    except ValueError:
        ctl = {}
    cols = (ctl.get("table-def") or {}).get("columns") or {}
    cols = {name: d if isinstance(d, dict) else {} for name, d in cols.items()}
    table_naming = naming([d.get("type", "") for d in cols.values()])
    return SchemaChange(
        table, op, {name: ColumnDef(_signature(d), candidates(d, table_naming)) for name, d in cols.items()}, ts
    )


TYPE_CHANGE_OPS = ("column-type-change", "change-columns")
ADD_OPS = ("create-table", "add-column", "rename-column")
_OP_RANK = {"create-table": 0, "add-column": 1, "rename-column": 1, "change-columns": 2, "column-type-change": 2}


def order_key(op: str, ts) -> tuple:
    """Control records in source order: by DMS timestamp, then create < add/rename < type change."""
    return (ts is None, ts, _OP_RANK.get(op, 3))


@dataclass
class Plan:
    add: dict[str, str] = field(default_factory=dict)  # new column -> Spark type
    widen: dict[str, str] = field(default_factory=dict)  # existing column -> wider Spark type
    unsafe: list[str] = field(default_factory=list)  # provable narrowings / incompatible changes
    warnings: list[str] = field(default_factory=list)  # unknown or ambiguous types: column kept as is


def plan(current: dict[str, str], change: SchemaChange, stale: bool = False,
         previous: dict[str, str] | None = None) -> Plan:
    """What a control record does to the table's current column types.

    A control record carries the whole table-def. create-table / add-column / rename-column add the
    columns not present yet (the other types are a snapshot, maybe older than what we hold). A type
    change looks at the columns whose DMS type differs from `previous` (the last table-def seen, by
    DMS type text; all columns when unknown): it widens, or is unsafe when provably narrowing or
    incompatible. A `stale` record (older than the last one applied) can't narrow. An unknown type
    never blocks the table: the column is added as string or keeps its type, with a warning.
    """
    out = Plan()
    if change.op not in (*ADD_OPS, *TYPE_CHANGE_OPS):
        return out
    for col, d in change.columns.items():
        old = current.get(col)
        if old is None:
            if not d.types:
                out.warnings.append(f"{col}: unknown DMS type {d.dms}, added as string")
            out.add[col] = d.types[-1] if d.types else "string"  # ambiguous: the wide one holds either
            continue
        if change.op not in TYPE_CHANGE_OPS or (previous is not None and previous.get(col) == d.dms):
            continue  # restated, not changed
        if not d.types:
            out.warnings.append(f"{col}: unknown DMS type {d.dms}, column kept as {old}")
        elif old in d.types:
            continue
        elif len(d.types) > 1:
            out.warnings.append(f"{col}: ambiguous DMS type {d.dms} ({' or '.join(d.types)}), column kept as {old}")
        elif is_widening(old, d.types[0]):
            out.widen[col] = d.types[0]
        elif not stale:
            out.unsafe.append(f"{col}: {old} -> {d.types[0]} is not a widening change")
    return out


def dms_types(change: SchemaChange) -> dict[str, str]:
    """column -> DMS type text of a control record's table-def (what `plan` compares as `previous`)."""
    return {c: d.dms for c, d in change.columns.items()}
