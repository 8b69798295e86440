"""`cdcflow verify`: compare what the pipeline produced with the oracle, per table, and print a diff summary.

Comparison rules (docs/design.md): live rows on every column (values normalized: decimals, floats,
timestamps as ISO UTC, dates), tombstones on key + `_is_deleted` only; columns starting with `_` other
than `_is_deleted` (pipeline bookkeeping) are ignored. A hard-delete tombstone whose delete is older than
the table's tombstone retention may be absent: compaction collects exactly those. SCD2 rows are matched on key + valid_from.
Warehouse facts compare like silver (flagged deletes as tombstones), without their surrogate keys.
Quarantine rows are counted per (table, rule); table-less rules (malformed_json, unknown_table) by rule.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from cdcflow.config import Project, Table
from cdcflow.oracle import Key, Oracle, fact_tables, scd2_tables
from cdcflow.sim.values import decimal_spec

TABLELESS_RULES = ("malformed_json", "unknown_table")


# ---------------------------------------------------------------- normalization


def _ts(v: Any) -> str | None:
    if isinstance(v, datetime):
        dt = v.astimezone(UTC) if v.tzinfo else v.replace(tzinfo=UTC)
    elif isinstance(v, date):
        dt = datetime(v.year, v.month, v.day, tzinfo=UTC)
    else:
        s = str(v).strip().replace(" ", "T")
        try:
            dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
        except ValueError:
            return str(v)
        dt = dt.astimezone(UTC) if dt.tzinfo else dt.replace(tzinfo=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def normalize(v: Any, col_type: str | None = None) -> Any:
    """A canonical, comparable form of a value (by declared type when known)."""
    if v is None:
        return None
    spec = decimal_spec(col_type) if col_type else None
    try:
        if spec:
            return str(Decimal(str(v)).quantize(Decimal(1).scaleb(-spec[1])))
        if col_type in ("int", "bigint", "smallint"):
            return int(v)
        if col_type in ("double", "float"):
            return round(float(v), 6)
        if col_type == "boolean":
            return v if isinstance(v, bool) else str(v).lower() in ("true", "t", "1")
        if col_type == "date":
            return (v.date() if isinstance(v, datetime) else v).isoformat() if isinstance(v, date) else str(v)[:10]
        if col_type == "timestamp":
            return _ts(v)
        if col_type == "string":
            return str(v)
    except (InvalidOperation, ValueError, TypeError):
        return str(v)
    if isinstance(v, bool):
        return v
    if isinstance(v, Decimal):
        return str(v.normalize())
    if isinstance(v, float):
        return round(v, 6)
    if isinstance(v, datetime):
        return _ts(v)
    if isinstance(v, date):
        return v.isoformat()
    return v


# ---------------------------------------------------------------- diffs


@dataclass
class Diff:
    table: str
    kind: str  # current | scd2 | facts | quarantine
    expected_count: int = 0
    actual_count: int = 0
    missing: list[dict[str, Any]] = field(default_factory=list)
    extra: list[dict[str, Any]] = field(default_factory=list)
    different: list[dict[str, Any]] = field(default_factory=list)  # {"key", "columns": {col: (exp, act)}}

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.different)


def _types(table: Table) -> dict[str, str]:
    return {**table.columns, "valid_from": "timestamp", "valid_to": "timestamp", "is_current": "boolean",
            "is_deleted": "boolean", "_is_deleted": "boolean"}


def _nkey(table: Table, values: Iterable[Any]) -> Key:
    types = table.columns
    return tuple(normalize(v, types.get(c)) for c, v in zip(table.primary_key, values, strict=True))


def _compare_rows(exp: dict[str, Any], act: dict[str, Any], types: dict[str, str], columns: Iterable[str]) -> dict:
    out = {}
    for c in columns:
        e, a = normalize(exp.get(c), types.get(c)), normalize(act.get(c), types.get(c))
        if e != a:
            out[c] = (e, a)
    return out


def _collectable(exp: dict[str, Any], table: Table, now: datetime) -> bool:
    """True for a hard-delete tombstone compaction may have removed (its delete is past the retention)."""
    deleted_at = exp.get("_deleted_at")
    if not exp.get("_is_deleted") or table.deletes != "hard" or deleted_at is None:
        return False
    cutoff = now.astimezone(UTC) - timedelta(hours=table.tombstone_retention_hours)
    return _ts(deleted_at) < _ts(cutoff)


def compare_current(expected: dict[Key, dict[str, Any]], actual_rows: list[dict[str, Any]], table: Table,
                    now: datetime | None = None) -> Diff:
    """Silver table vs expected state: live rows on every column, tombstones on key + _is_deleted.

    `now` (default: the clock) decides which hard tombstones compaction may already have collected."""
    now = now or datetime.now(UTC)
    types = _types(table)
    diff = Diff(table.name, "current", len(expected), len(actual_rows))
    actual: dict[Key, dict[str, Any]] = {}
    for row in actual_rows:
        k = _nkey(table, (row.get(c) for c in table.primary_key))
        if k in actual:
            diff.extra.append({"key": k, "reason": "duplicate key"})
        actual[k] = row
    seen: set[Key] = set()
    for key, exp in expected.items():
        k = _nkey(table, key)
        seen.add(k)
        act = actual.get(k)
        if act is None:
            if _collectable(exp, table, now):
                continue
            diff.missing.append({"key": k, "_is_deleted": exp.get("_is_deleted")})
            continue
        if exp.get("_is_deleted"):
            cols = ["_is_deleted"]
        else:
            cols = ["_is_deleted"] + [c for c in dict.fromkeys([*exp, *act]) if not c.startswith("_")]
        changed = _compare_rows(exp, {**act, "_is_deleted": bool(act.get("_is_deleted"))}, types, cols)
        if changed:
            diff.different.append({"key": k, "columns": changed})
    diff.extra += [{"key": k} for k in actual if k not in seen]
    return diff


def compare_scd2(expected_rows: list[dict[str, Any]], actual_rows: list[dict[str, Any]], table: Table,
                 ignore: Iterable[str] = ()) -> Diff:
    """Warehouse SCD2 rows vs expected versions, matched on key + valid_from; expected columns compared."""
    types = _types(table)
    skip = set(ignore)

    def k(row: dict[str, Any]) -> tuple:
        return (*_nkey(table, (row.get(c) for c in table.primary_key)), normalize(row.get("valid_from"), "timestamp"))

    diff = Diff(table.name, "scd2", len(expected_rows), len(actual_rows))
    actual: dict[tuple, dict[str, Any]] = {}
    for row in actual_rows:
        if k(row) in actual:
            diff.extra.append({"key": k(row), "reason": "duplicate version"})
        actual[k(row)] = row
    seen = set()
    for exp in expected_rows:
        key = k(exp)
        seen.add(key)
        act = actual.get(key)
        if act is None:
            diff.missing.append({"key": key})
            continue
        changed = _compare_rows(exp, act, types, [c for c in exp if c not in skip])
        if changed:
            diff.different.append({"key": key, "columns": changed})
    diff.extra += [{"key": key} for key in actual if key not in seen]
    return diff


def quarantine_key(table: str | None, rule: str) -> tuple[str | None, str]:
    return (None if rule in TABLELESS_RULES else table, rule)


def compare_quarantine(expected: dict[tuple[str | None, str], int], actual_rows: list[dict[str, Any]]) -> Diff:
    """Quarantine row counts per (table, rule) (table ignored for malformed_json / unknown_table)."""
    exp: dict[tuple[str | None, str], int] = {}
    for (t, r), n in expected.items():
        exp[quarantine_key(t, r)] = exp.get(quarantine_key(t, r), 0) + n
    act: dict[tuple[str | None, str], int] = {}
    for row in actual_rows:
        key = quarantine_key(row.get("table"), str(row.get("rule")))
        act[key] = act.get(key, 0) + 1
    diff = Diff("(all)", "quarantine", sum(exp.values()), sum(act.values()))
    for key in sorted(set(exp) | set(act), key=lambda x: (x[0] or "", x[1])):
        e, a = exp.get(key, 0), act.get(key, 0)
        if e > a:
            diff.missing.append({"table": key[0], "rule": key[1], "count": e - a})
        elif a > e:
            diff.extra.append({"table": key[0], "rule": key[1], "count": a - e})
    return diff


# ---------------------------------------------------------------- actual tables


@dataclass
class Actual:
    """What the pipeline produced, as plain rows. scd2 / quarantine None: not compared."""

    current: dict[str, list[dict[str, Any]]]
    scd2: dict[str, list[dict[str, Any]]] | None = None
    quarantine: list[dict[str, Any]] | None = None
    facts: dict[str, list[dict[str, Any]]] | None = None


def read_actual(project: Project, spark: Any, warehouse: bool = False) -> Actual:
    """Read the silver Delta tables, the quarantine table and (warehouse=True) the SCD2 dimensions and
    the facts. `spark`: a session, or a function making one when a table needs it (cdcflow.actual)."""
    from cdcflow.actual import read_quarantine, read_silver, read_warehouse_facts, read_warehouse_scd2

    return Actual(current=read_silver(spark, project), quarantine=read_quarantine(spark, project),
                  scd2=read_warehouse_scd2(project) if warehouse else None,
                  facts=read_warehouse_facts(project) if warehouse else None)


def verify(project: Project, oracle: Oracle, actual: Actual) -> list[Diff]:
    diffs = [compare_current(oracle.state.get(name, {}), actual.current.get(name, []), t)
             for name, t in sorted(project.tables.items())]
    if actual.scd2 is not None:
        diffs += [compare_scd2(oracle.scd2.get(t.name, []), actual.scd2.get(t.name, []), t)
                  for t in scd2_tables(project)]
    if actual.facts is not None:
        diffs += [replace(compare_current(oracle.facts.get(t.name, {}), actual.facts.get(t.name, []), t), kind="facts")
                  for t in fact_tables(project)]
    if actual.quarantine is not None:
        diffs.append(compare_quarantine(oracle.quarantine, actual.quarantine))
    return diffs


def print_summary(diffs: list[Diff], console: Any | None = None, examples: int = 3) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table as RichTable

    console = console or Console(highlight=False)
    t = RichTable(title="cdcflow verify")
    for c in ("table", "check", "expected", "actual", "missing", "extra", "different", "result"):
        t.add_column(c)
    for d in diffs:
        t.add_row(d.table, d.kind, str(d.expected_count), str(d.actual_count), str(len(d.missing)),
                  str(len(d.extra)), str(len(d.different)), "[green]ok[/green]" if d.ok else "[red]DIFF[/red]")
    console.print(t)
    for d in diffs:
        for label, rows in (("missing", d.missing), ("extra", d.extra), ("different", d.different)):
            for r in rows[:examples]:
                console.print(escape(f"  {d.table} {d.kind} {label}: {r}"), soft_wrap=True)


# ---------------------------------------------------------------- CLI


def register_verify(sub: Any, commands: dict[str, Callable]) -> None:
    p = sub.add_parser("verify", help="compare the Delta / warehouse tables with the simulator's oracle")
    p.add_argument("--history", required=True, help="the `cdcflow simulate --out` folder")
    p.add_argument("--warehouse", action="store_true", help="also compare the warehouse's SCD2 dimensions and facts")
    p.add_argument("--target", choices=["kinesis", "s3"], default="kinesis",
                   help="which delivered output the pipeline consumed (decides the expected quarantine)")

    def run(args: argparse.Namespace) -> int:
        from pathlib import Path

        from cdcflow.cli import console
        from cdcflow.config import load_project
        from cdcflow.errors import UserError
        from cdcflow.oracle import build_oracle, load_history, resolve_salt

        if not (Path(args.history) / "history.jsonl").exists():
            raise UserError(f"{args.history}/history.jsonl not found; run `cdcflow simulate --out {args.history}`")
        project = load_project(args.config)
        from cdcflow.aws import require_lake

        require_lake(project)
        history = load_history(args.history)
        oracle = build_oracle(project, history, resolve_salt(project), args.target)
        try:
            from cdcflow.runtime import get_spark

            actual = read_actual(project, lambda: get_spark("cdcflow-verify"), warehouse=args.warehouse)
        except NotImplementedError as e:
            raise UserError(f"cdcflow verify: {e}") from e
        diffs = verify(project, oracle, actual)
        print_summary(diffs, console)
        return 0 if all(d.ok for d in diffs) else 1

    commands["verify"] = run
