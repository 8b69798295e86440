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

import numpy as np
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
            self.values[sql] = compiled(sql)(self)
        return self.values[sql]

    def column(self, side: str, name: str) -> pa.Array:
        if (side, name) not in self.taken:
            schema, rows = self.sides[side]
            if name not in schema.names:
                raise KeyError(f"the MERGE reads {side}.{name}, which its {side} side lacks")
            if rows is None:
                self.taken[side, name] = pa.nulls(self.n, schema.field(name).type)
            else:
                chunks = rows[name]
                self.taken[side, name] = chunks.chunk(0) if chunks.num_chunks == 1 else chunks.combine_chunks()
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


Fragment = Callable[[_Rows], Value]
_TRUE = pa.scalar(True)


def evaluate(e: exp.Expression, rows: _Rows) -> Value:
    """One fragment over the joined rows: an array, a scalar, or NULL."""
    return _compile(e)(rows)


@lru_cache(maxsize=65536)
def compiled(sql: str) -> Fragment:
    """A fragment's SQL as a function of the joined rows, built once: walking the syntax tree for every
    commit cost about a quarter of a small table's merge."""
    return _compile(parsed(sql))


def _compile(e: exp.Expression) -> Fragment:
    """The fragment as closures over its compiled parts (the SQL subset in the module's docstring)."""
    match e:
        case exp.Paren():
            return _compile(e.this)
        case exp.Column():
            side, name = e.table, e.name
            return lambda rows: rows.column(side, name)
        case exp.Null() | exp.Cast(this=exp.Null()):
            return lambda rows: NULL
        case exp.Boolean():
            constant = pa.scalar(bool(e.this))
            return lambda rows: constant
        case exp.Literal(is_string=True):
            constant = pa.scalar(e.this)
            return lambda rows: constant
        case exp.And() | exp.Or():
            a, b = _compile(e.this), _compile(e.expression)
            kernel = pc.and_kleene if isinstance(e, exp.And) else pc.or_kleene
            return lambda rows: kernel(_typed(a(rows), _TRUE), _typed(b(rows), _TRUE))
        case exp.Not():
            inner = _compile(e.this)

            def negated(rows: _Rows) -> Value:
                value = inner(rows)
                return NULL if value is NULL else pc.invert(value)
            return negated
        case exp.Is(expression=exp.Null()):
            inner = _compile(e.this)

            def is_null(rows: _Rows) -> Value:
                value = inner(rows)
                return _TRUE if value is NULL else pc.is_null(value)
            return is_null
        case exp.EQ() | exp.NEQ() | exp.GT():
            a, b = _compile(e.this), _compile(e.expression)
            compare = {exp.EQ: pc.equal, exp.NEQ: pc.not_equal, exp.GT: pc.greater}[type(e)]

            def compared(rows: _Rows) -> Value:
                left, right = a(rows), b(rows)
                return NULL if left is NULL or right is NULL else compare(left, right)
            return compared
        case exp.Coalesce():
            parts = [_compile(x) for x in [e.this, *e.expressions]]

            def coalesced(rows: _Rows) -> Value:
                values = [v for v in (part(rows) for part in parts) if v is not NULL]
                return pc.coalesce(*values) if values else NULL
            return coalesced
        case exp.Case():
            default = _compile(e.args["default"]) if e.args.get("default") is not None else (lambda rows: NULL)
            branches = [(_compile(b.this), _compile(b.args["true"])) for b in reversed(e.args["ifs"])]

            def case(rows: _Rows) -> Value:
                out = default(rows)
                for condition, then in branches:
                    value = then(rows)
                    if value is NULL and out is NULL:
                        continue
                    out = pc.if_else(_condition(condition(rows), rows.n), _typed(value, out), _typed(out, value))
                return out
            return case
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


def _matches(source: pa.Table, target: pa.Table, key: list[str]) -> tuple[pa.Array, pa.Array, pa.Array, pa.Array]:
    """(source rows matched, their target rows, source rows unmatched, target rows unmatched) as row
    indices, by the key's equality (a NULL key matches nothing, as in SQL). Both sides hold a key at
    most once. A one-column key (most tables) by a hash lookup, a wider one by a hash join."""
    if len(key) == 1:
        s_key, t_key = source[key[0]].combine_chunks(), target[key[0]].combine_chunks()
        at = pc.index_in(s_key, value_set=t_key, skip_nulls=True)  # per source row: its target row or NULL
        found = pc.is_valid(at)
        s_all = pa.array(np.arange(source.num_rows))
        return (s_all.filter(found), at.filter(found).cast(pa.int64()), s_all.filter(pc.invert(found)),
                pa.array(np.arange(target.num_rows)).filter(pc.invert(pc.is_in(t_key, value_set=s_key, skip_nulls=True))))
    joined = source.select(key).append_column("_s", pa.array(np.arange(source.num_rows))).join(
        target.select(key).append_column("_t", pa.array(np.arange(target.num_rows))), keys=key,
        join_type="full outer", use_threads=False)
    s_idx, t_idx = joined["_s"], joined["_t"]
    both = pc.and_(pc.is_valid(s_idx), pc.is_valid(t_idx))
    return (pc.filter(s_idx, both), pc.filter(t_idx, both), pc.filter(s_idx, pc.is_null(t_idx)),
            pc.filter(t_idx, pc.is_null(s_idx)))


def merge(target: pa.Table, source: pa.Table, m: MergeClauses) -> pa.Table:
    """`target` (the whole table) after the MERGE of `source` (at most one row per key) by `m`."""
    schema = target.schema
    m_s, m_t, n_s, kept = _matches(source, target, merge_key(m.on))
    parts = [target.take(kept)]  # no source row: as it is

    matched = _Rows(len(m_s), source, m_s, target, m_t)
    columns, _ = _when(m.when_matched(), matched, schema, lambda f: matched.column("t", f.name))
    parts.append(pa.Table.from_arrays(columns, schema=schema))

    inserted = _Rows(len(n_s), source, n_s, target, None)
    columns, taken = _when(m.when_not_matched(), inserted, schema, lambda f: pa.nulls(inserted.n, f.type))
    parts.append(pa.Table.from_arrays(columns, schema=schema).filter(taken))
    return pa.concat_tables(parts)
