"""The guarded MERGE computed in Arrow, for a small table committed as one rewrite (copy-on-write).

A delta-rs MERGE of a small table costs ~20-30 ms of CPU, most of it DataFusion planning the MERGE;
reading the whole table, computing the same MERGE here and committing the result as one overwrite
costs about two thirds of that (docs/design.md, "Copy-on-write for small tables"); taking the rows
from this process's last rewrite (`apply.REWRITTEN`) saves the read. The rule stays `apply.merge_clauses`:
this module evaluates its SQL fragments over Arrow arrays, with MERGE's semantics: rows join on
the ON clause's key equalities, the first WHEN clause whose condition holds wins, an update keeps
the columns it does not set and an insert leaves them NULL, a source row no clause takes is not
inserted, and a target row no source row matches is kept as it is.

The fragments use a small SQL subset (columns of `s` and `t`, NULL, booleans, string literals,
CAST(NULL AS ...), CASE, coalesce, AND / OR / NOT, IS NULL, =, !=, >); anything else raises, so a
rule that grows past it fails loudly in the tests that compare this with delta-rs's MERGE.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import sqlglot
from sqlglot import exp

if TYPE_CHECKING:
    from cdcflow.cdc.apply import MergeClauses

# SQL NULL before it meets a typed value (Arrow's null type has no kernels to compare or coalesce)
NULL = None
Value = pa.Array | pa.Scalar | None


@lru_cache(maxsize=65536)
def parsed(sql: str) -> exp.Expression:
    return sqlglot.parse_one(sql)


def merge_key(on: str) -> list[str]:
    """The key columns of an ON clause of `t.k = s.k` equalities joined by AND."""
    key = []
    for eq in parsed(on).flatten() if isinstance(parsed(on), exp.And) else [parsed(on)]:
        sides = {eq.this.table: eq.this.name, eq.expression.table: eq.expression.name} if isinstance(eq, exp.EQ) else {}
        if set(sides) != {"s", "t"} or sides["s"] != sides["t"]:
            raise ValueError(f"the Arrow MERGE joins on key equalities only, not {on!r}")
        key.append(sides["t"])
    return key


class _Rows:
    """Joined rows: each side's columns taken at its row indices (a side that is absent is NULL)."""

    def __init__(self, n: int, source: pa.Table, s_idx: pa.Array | None, target: pa.Table, t_idx: pa.Array | None):
        self.n = n
        # each side taken whole, once: one call instead of one per column it reads
        self.sides = {"s": (source.schema, source.take(s_idx) if s_idx is not None else None),
                      "t": (target.schema, target.take(t_idx) if t_idx is not None else None)}
        self.taken: dict[tuple[str, str], pa.Array] = {}
        self.values: dict[str, Value] = {}  # fragment -> its value: the clauses share most of theirs

    def value(self, sql: str) -> Value:
        if sql not in self.values:
            self.values[sql] = evaluate(parsed(sql), self)
        return self.values[sql]

    def column(self, side: str, name: str) -> pa.Array:
        if (side, name) not in self.taken:
            schema, rows = self.sides[side]
            if name not in schema.names:
                raise KeyError(f"the MERGE reads {side}.{name}, which its {side} side lacks")
            self.taken[side, name] = (rows[name].combine_chunks() if rows is not None
                                      else pa.nulls(self.n, schema.field(name).type))
        return self.taken[side, name]


def _typed(value: Value, like: Value) -> Value:
    if value is NULL and like is not NULL:
        return pa.scalar(None, like.type)
    return value


def _condition(value: Value, n: int) -> pa.Array:
    """A WHEN / CASE condition: NULL counts as not true, as in SQL."""
    if value is NULL:
        return pa.array([False] * n, pa.bool_())
    return pc.fill_null(value, False)


def evaluate(e: exp.Expression, rows: _Rows) -> Value:
    """One fragment over the joined rows: an array, a scalar, or NULL."""
    match e:
        case exp.Paren():
            return evaluate(e.this, rows)
        case exp.Column():
            return rows.column(e.table, e.name)
        case exp.Null() | exp.Cast(this=exp.Null()):
            return NULL
        case exp.Boolean():
            return pa.scalar(bool(e.this))
        case exp.Literal(is_string=True):
            return pa.scalar(e.this)
        case exp.And() | exp.Or():
            a, b = evaluate(e.this, rows), evaluate(e.expression, rows)
            a, b = _typed(a, pa.scalar(True)), _typed(b, pa.scalar(True))
            return (pc.and_kleene if isinstance(e, exp.And) else pc.or_kleene)(a, b)
        case exp.Not():
            value = evaluate(e.this, rows)
            return NULL if value is NULL else pc.invert(value)
        case exp.Is(expression=exp.Null()):
            value = evaluate(e.this, rows)
            return pa.scalar(True) if value is NULL else pc.is_null(value)
        case exp.EQ() | exp.NEQ() | exp.GT():
            a, b = evaluate(e.this, rows), evaluate(e.expression, rows)
            if a is NULL or b is NULL:
                return NULL
            compare = {exp.EQ: pc.equal, exp.NEQ: pc.not_equal, exp.GT: pc.greater}[type(e)]
            return compare(a, b)
        case exp.Coalesce():
            values = [v for v in (evaluate(x, rows) for x in [e.this, *e.expressions]) if v is not NULL]
            return pc.coalesce(*values) if values else NULL
        case exp.Case():
            default = e.args.get("default")
            out = evaluate(default, rows) if default is not None else NULL
            for branch in reversed(e.args["ifs"]):
                value = evaluate(branch.args["true"], rows)
                if value is NULL and out is NULL:
                    continue
                out = pc.if_else(_condition(evaluate(branch.this, rows), rows.n), _typed(value, out), _typed(out, value))
            return out
    raise ValueError(f"the Arrow MERGE does not evaluate {e.sql()!r}")


def _assign(values: dict[str, str], rows: _Rows, schema: pa.Schema, unset: Callable[[pa.Field], pa.Array]) -> list[pa.Array]:
    """The target's columns as a clause sets them (`unset(field)` for the ones it does not)."""
    out = []
    for field in schema:
        if field.name not in values:
            out.append(unset(field))
            continue
        value = rows.value(values[field.name])
        if value is NULL:
            out.append(pa.nulls(rows.n, field.type))
        elif isinstance(value, pa.Scalar):
            out.append(pa.array([value.as_py()] * rows.n, field.type))
        else:
            out.append(value if value.type == field.type else value.cast(field.type))
    return out


def _when(clauses: list[tuple[str | None, dict[str, str]]], rows: _Rows, schema: pa.Schema,
          unset: Callable[[pa.Field], pa.Array]) -> tuple[list[pa.Array], pa.Array]:
    """The rows' columns after the first clause that holds for each row, and which rows one held for.
    Most commits of a small table meet a clause that holds for none or all of its rows (no deletes,
    only new keys): such a clause is skipped or taken whole, without a per-row choice per column."""
    if rows.n == 0:
        return [pa.array([], f.type) for f in schema], pa.array([], pa.bool_())
    columns: list[pa.Array] | None = None  # None: no clause holds for any row yet (`unset`)
    taken = pa.array([False] * rows.n, pa.bool_())
    for predicate, values in reversed(clauses):  # an earlier clause overrides a later one
        holds = _condition(rows.value(predicate), rows.n) if predicate else pa.array([True] * rows.n, pa.bool_())
        some, every = pc.any(holds).as_py(), pc.all(holds).as_py()
        if not some:
            continue
        assigned = _assign(values, rows, schema, unset)
        if every:
            columns = assigned
        else:
            held = columns if columns is not None else [unset(f) for f in schema]
            columns = [pc.if_else(holds, a, c) for a, c in zip(assigned, held, strict=True)]
        taken = pc.or_(taken, holds)
    return (columns if columns is not None else [unset(f) for f in schema]), taken


def merge(target: pa.Table, source: pa.Table, m: MergeClauses) -> pa.Table:
    """`target` (the whole table) after the MERGE of `source` (at most one row per key) by `m`."""
    key = merge_key(m.on)
    schema = target.schema
    s_pos = pa.array(range(source.num_rows), pa.int64())
    t_pos = pa.array(range(target.num_rows), pa.int64())
    joined = source.select(key).append_column("_s", s_pos).join(
        target.select(key).append_column("_t", t_pos), keys=key, join_type="full outer", use_threads=False)
    s_idx, t_idx = joined["_s"], joined["_t"]
    both = pc.and_(pc.is_valid(s_idx), pc.is_valid(t_idx))

    kept = target.take(pc.filter(t_idx, pc.is_null(s_idx)))  # no source row: as it is
    parts = [kept]

    m_s, m_t = pc.filter(s_idx, both), pc.filter(t_idx, both)
    matched = _Rows(len(m_s), source, m_s, target, m_t)
    columns, _ = _when(m.when_matched(), matched, schema, lambda f: matched.column("t", f.name))
    parts.append(pa.Table.from_arrays(columns, schema=schema))

    n_s = pc.filter(s_idx, pc.is_null(t_idx))
    inserted = _Rows(len(n_s), source, n_s, target, None)
    columns, taken = _when(m.when_not_matched(), inserted, schema, lambda f: pa.nulls(inserted.n, f.type))
    parts.append(pa.Table.from_arrays(columns, schema=schema).filter(taken))
    return pa.concat_tables(parts)

