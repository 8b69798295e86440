"""The simulated OLTP source: a seeded full-load snapshot, then transactions of inserts, updates and deletes.

The result is the *true* source history in commit order (one `Change` per row change, plus control
changes for DDL). Delivery faults are applied later (cdcflow.sim.faults) and never change this history.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from itertools import accumulate
from typing import Any

from cdcflow.config import Project, Table
from cdcflow.sim.values import (
    SOURCE_START_US,
    decimal_spec,
    dirty_text,
    dms_ts,
    iso_us,
    value_for,
    violating_value,
)

DATA_OPS = ("load", "insert", "update", "delete")
CONTROL_OPS = ("create-table", "add-column", "column-type-change", "rename-column", "drop-column", "drop-table")
DRIFT_COLUMN = "drift_note"  # added by drift; later renamed to DRIFT_RENAMED, which is later dropped
DRIFT_RENAMED = "drift_label"
TXN_ID_START = 7_340_000
LSN_START = 0x2_7C00_7178  # 00000002/7C007178


@dataclass
class Change:
    """One line of history.jsonl (the layout is fixed by docs/design.md)."""

    source_seq: int
    table: str
    op: str
    data: dict[str, Any] | None
    before: dict[str, Any] | None = None
    commit_ts: str | None = None
    txn_id: int | None = None
    txn_rec_id: int | None = None
    stream_pos: str | None = None
    change_seq: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GenOptions:
    events: int | None = 200  # CDC row changes to generate (None: use duration_s)
    duration_s: float | None = None  # or: generate until this much source time has passed
    load_rows: int = 20  # full-load rows per configured table
    synth_rows: int = 3  # full-load rows per synthetic table (synth.*)
    change_interval_ms: tuple[int, int] = (200, 2000)  # source time between consecutive changes
    hot_keys: int = 3  # per table, a few keys receive `hot_fraction` of the updates and deletes
    hot_fraction: float = 0.5
    reinsert_rate: float = 0.1  # share of inserts that re-insert a previously deleted key
    null_update_rate: float = 0.0  # updates that set nullable columns to NULL (tables without ignore_null_updates)
    # updates of tables with ignore_null_updates that send NULL for the columns they leave unchanged
    partial_update_rate: float = 0.0
    pk_change_rate: float = 0.0  # updates that change the primary key (before-image)
    dq_failure_rate: float = 0.0  # inserts/updates given a value that breaks a raw_to_staging rule
    # loads/inserts/updates whose text columns a raw_to_staging transform cleans hold untidy text
    dirty_value_rate: float = 0.0
    schema_drift_rate: float = 0.0  # per table: add a column (and widen a type), later rename it, then drop it
    drop_table_rate: float = 0.0  # per table: the source drops it after its last change (drop-table control)
    same_key_in_txn_rate: float = 0.0  # changes followed by 1-2 more changes of the same key in the same transaction
    # Zipf-like exponent of the share of changes per table: the table ranked r (table names sorted) gets a
    # share proportional to 1 / r**table_skew. 0: every table alike; ~1.1: a few hot tables, a long cold tail
    table_skew: float = 0.0


class _KeySet:
    """Keys with O(1) add, remove and uniform random choice (`rng.choice(keys)`).

    A removal moves the last key into the gap, so the list stays dense: long histories (a million
    changes) would otherwise spend their time in `list.remove`."""

    def __init__(self) -> None:
        self._keys: list[tuple] = []
        self._index: dict[tuple, int] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, i: int) -> tuple:
        return self._keys[i]

    def add(self, key: tuple) -> None:
        if key not in self._index:
            self._index[key] = len(self._keys)
            self._keys.append(key)

    def discard(self, key: tuple) -> None:
        i = self._index.pop(key, None)
        if i is None:
            return
        last = self._keys.pop()
        if i < len(self._keys):
            self._keys[i] = last
            self._index[last] = i


@dataclass
class _TableState:
    table: Table
    columns: dict[str, str]  # current source columns (declared + drift) -> type
    refs: dict[str, str]  # column -> referenced table name
    rows: dict[tuple, dict[str, Any]] = field(default_factory=dict)
    live: _KeySet = field(default_factory=_KeySet)  # live keys (random choice)
    deleted: _KeySet = field(default_factory=_KeySet)
    hot: list[tuple] = field(default_factory=list)
    counters: dict[tuple, int] = field(default_factory=dict)
    drift_at: int | None = None  # the change count at which drift starts (add-column, type change)
    drift_step: int = 0  # drift steps done: 1 added, 2 renamed, 3 dropped
    drift_every: int = 0  # changes between the steps


@dataclass
class History:
    changes: list[Change]
    dq_injected: list[dict[str, Any]]  # {"source_seq", "table", "rule", "column"} (for the manifest)


def _references(project: Project) -> dict[str, str]:
    """column name -> table whose single-column primary key has that name (orders.customer_id -> customers)."""
    return {t.primary_key[0]: t.name for t in project.tables.values() if len(t.primary_key) == 1}


def _dependency_order(tables: list[_TableState]) -> list[_TableState]:
    done: list[_TableState] = []
    names: set[str] = set()
    pending = list(tables)
    while pending:
        ready = [s for s in pending if all(r in names or r == s.table.name for r in s.refs.values())] or pending[:1]
        for s in ready:
            done.append(s)
            names.add(s.table.name)
            pending.remove(s)
    return done


class SourceModel:
    """Generates the history for a project's tables from a seed (random.Random only: deterministic)."""

    def __init__(self, project: Project, seed: int | str, options: GenOptions | None = None):
        self.project = project
        self.opts = options or GenOptions()
        self.rng = random.Random(f"cdcflow-sim:{seed}")
        refs = _references(project)
        states = []
        for t in project.tables.values():
            own = set(t.primary_key) if len(t.primary_key) == 1 else set()
            r = {c: refs[c] for c in t.columns if c in refs and c not in own and refs[c] != t.name}
            states.append(_TableState(table=t, columns=dict(t.columns), refs=r))
        self.states = {s.table.name: s for s in _dependency_order(states)}
        self.changes: list[Change] = []
        self.dq_injected: list[dict[str, Any]] = []
        self.now_us = SOURCE_START_US
        self.txn_id = TXN_ID_START
        self.lsn = LSN_START
        self.change_no = 0
        self.serial = 0
        self._last_key: tuple | None = None  # the key the last `_one_change` changed
        self._rules = {name: self._value_hints(s.table) for name, s in self.states.items()}

    # ------------------------------------------------------------ helpers

    @staticmethod
    def _value_hints(t: Table) -> dict[str, tuple[list | None, tuple[float | None, float | None]]]:
        allowed: dict[str, list] = {}
        bounds: dict[str, tuple[float | None, float | None]] = {}
        for stage in ("raw_to_staging", "staging_to_dimension", "dimension_to_fact"):
            for rule in t.cfg.quality.stage(stage):
                if rule.severity != "quarantine":
                    continue  # warn / fail rules are expectations the source's values may break
                if rule.rule == "accepted_values":
                    allowed[rule.column] = list(rule.values)
                elif rule.rule == "range":
                    bounds[rule.column] = (rule.min, rule.max)
        return {c: (allowed.get(c), bounds.get(c, (None, None))) for c in t.columns}

    def _emit(self, table: str, op: str, data: dict | None, **kw: Any) -> Change:
        ch = Change(source_seq=len(self.changes), table=table, op=op, data=data, **kw)
        self.changes.append(ch)
        return ch

    def _pick_key(self, st: _TableState) -> tuple | None:
        if not st.live:
            return None
        hot = [k for k in st.hot if k in st.rows]
        if hot and self.rng.random() < self.opts.hot_fraction:
            return self.rng.choice(hot)
        return st.live[self.rng.randrange(len(st.live))]

    def _parent_value(self, parent: str) -> Any:
        ps = self.states.get(parent)
        if ps is None:
            return None
        key = self._pick_key(ps)
        if key is None:
            key = (ps.deleted or [None])[-1]
        return None if key is None else key[0]

    def _new_key(self, st: _TableState) -> tuple | None:
        pk = st.table.primary_key
        prefix: list[Any] = []
        for c in pk[:-1]:
            if c in st.refs:
                v = self._parent_value(st.refs[c])
                if v is None:
                    return None
            else:
                v = self.rng.randint(1, 5)
            prefix.append(v)
        p = tuple(prefix)
        n = st.counters.get(p, 0) + 1
        st.counters[p] = n
        last_type = st.columns[pk[-1]]
        last: Any = n if last_type in ("int", "bigint", "smallint") else f"K{n:07d}"
        return (*p, last)

    def _value(self, st: _TableState, col: str, key_serial: int) -> Any:
        if col in st.refs:
            return self._parent_value(st.refs[col])
        if col in (DRIFT_COLUMN, DRIFT_RENAMED):
            return f"note-{self.rng.randint(0, 9999)}"
        allowed, bounds = self._rules[st.table.name].get(col, (None, (None, None)))
        return value_for(self.rng, col, st.columns[col], self.now_us, key_serial, allowed, bounds)

    def _full_row(self, st: _TableState, key: tuple) -> dict[str, Any]:
        self.serial += 1
        row = dict(zip(st.table.primary_key, key, strict=True))
        for col in st.columns:
            if col not in row:
                row[col] = self._value(st, col, self.serial)
        return row

    def _store(self, st: _TableState, key: tuple, row: dict[str, Any]) -> None:
        st.live.add(key)
        st.rows[key] = row
        st.deleted.discard(key)
        if len(st.hot) < self.opts.hot_keys and key not in st.hot:
            st.hot.append(key)

    def _forget(self, st: _TableState, key: tuple) -> None:
        del st.rows[key]
        st.live.discard(key)
        st.deleted.add(key)

    def _maybe_dirty(self, st: _TableState, row: dict[str, Any]) -> None:
        """With --dirty-value-rate, untidy text (values.dirty_text) in the emitted row's string columns that a
        raw_to_staging transform cleans (a `columns` entry or a function's `outputs`). Like a quality
        failure it is only in the emitted change; the rate draws nothing from the seed when it is 0."""
        if self.opts.dirty_value_rate <= 0:
            return
        cleaned = _transformed_columns(st.table)
        for col in sorted(cleaned):
            if isinstance(row.get(col), str) and self.rng.random() < self.opts.dirty_value_rate:
                row[col] = dirty_text(self.rng, row[col])

    def _maybe_break_quality(self, st: _TableState, row: dict[str, Any]) -> dict[str, Any] | None:
        """With --dq-failure-rate, give the emitted row a value that breaks one raw_to_staging quarantine rule.

        Only the emitted change carries the bad value: the source keeps the good row, so the key's next
        change is clean again (a correction) and failures don't cascade."""
        if self.opts.dq_failure_rate <= 0 or self.rng.random() >= self.opts.dq_failure_rate:
            return None
        pk = set(st.table.primary_key)
        candidates = []
        for rule in st.table.cfg.quality.raw_to_staging:
            if rule.severity != "quarantine":
                continue
            if rule.rule == "not_null":
                cols = [c for c in rule.columns if c not in pk]
            elif rule.rule in ("range", "accepted_values", "regex", "valid_date"):
                cols = [rule.column] if rule.column not in pk else []
                if rule.rule == "valid_date" and not (rule.min or (rule.max and not rule.max.startswith("now"))):
                    cols = []
            else:
                cols = []
            candidates += [(rule, c) for c in cols]
        if not candidates:
            return None
        rule, col = self.rng.choice(candidates)
        row[col] = violating_value(rule, st.columns[col])
        return {"table": st.table.name, "rule": rule.rule_name, "column": col}

    # ------------------------------------------------------------ phases

    def generate(self) -> History:
        for st in self.states.values():
            t = st.table
            cols = {c: {"type": ty, "nullable": t.cfg.columns[c].nullable} for c, ty in t.columns.items()}
            self._emit(t.name, "create-table", {"columns": cols, "primary_key": t.primary_key})
        self._full_load()
        self._cdc()
        for st in self.states.values():  # after the last change: nothing of the table follows a drop
            if self.opts.drop_table_rate > 0 and self.rng.random() < self.opts.drop_table_rate:
                self.now_us += 1000
                self._emit(st.table.name, "drop-table", {}, commit_ts=iso_us(self.now_us))
        return History(self.changes, self.dq_injected)

    def _full_load(self) -> None:
        load_us = SOURCE_START_US - 60_000_000
        for st in self.states.values():
            n = self.opts.synth_rows if st.table.schema == "synth" else self.opts.load_rows
            if st.refs and st.table.primary_key[0] in st.refs:  # child rows: ~2 lines per parent
                n *= 2
            self.now_us = load_us
            for _ in range(n):
                key = self._new_key(st)
                if key is None:
                    break
                row = self._full_row(st, key)
                sent = dict(row)
                self._maybe_dirty(st, sent)
                bad = self._maybe_break_quality(st, sent)
                ch = self._emit(st.table.name, "load", sent)
                if bad:
                    self.dq_injected.append({"source_seq": ch.source_seq, **bad})
                self._store(st, key, row)
        self.now_us = SOURCE_START_US

    def _plan_drift(self, total_events: int) -> None:
        for st in self.states.values():
            if self.opts.schema_drift_rate > 0 and self.rng.random() < self.opts.schema_drift_rate:
                st.drift_at = self.rng.randint(max(1, total_events // 5), max(2, total_events * 4 // 5))
                st.drift_every = max(1, (total_events - st.drift_at) // 3)

    def _drift(self, st: _TableState, done: int) -> None:
        """The table's next drift step once its change count is reached: add (and widen), rename, drop."""
        if st.drift_at is None or st.drift_step >= 3 or done < st.drift_at + st.drift_step * st.drift_every:
            return
        st.drift_step += 1
        ts = iso_us(self.now_us)
        if st.drift_step == 1:
            self._apply_drift(st, ts)
        elif st.drift_step == 2:  # every stored row carries the column under its new name
            ty = st.columns.pop(DRIFT_COLUMN)
            st.columns[DRIFT_RENAMED] = ty
            for row in st.rows.values():
                row[DRIFT_RENAMED] = row.pop(DRIFT_COLUMN, None)
            self._emit(st.table.name, "rename-column", {"column": DRIFT_RENAMED, "old_column": DRIFT_COLUMN,
                                                        "type": ty}, commit_ts=ts)
        else:
            del st.columns[DRIFT_RENAMED]
            for row in st.rows.values():
                row.pop(DRIFT_RENAMED, None)
            self._emit(st.table.name, "drop-column", {"column": DRIFT_RENAMED}, commit_ts=ts)

    def _apply_drift(self, st: _TableState, ts: str) -> None:
        st.columns[DRIFT_COLUMN] = "string"
        self._emit(st.table.name, "add-column", {"column": DRIFT_COLUMN, "type": "string"}, commit_ts=ts)
        for col, ty in st.table.columns.items():
            if col in st.table.primary_key or col in st.refs:
                continue
            spec = decimal_spec(ty)
            new = "bigint" if ty == "int" else (f"decimal({min(38, spec[0] + 2)},{spec[1]})" if spec else None)
            if new:
                st.columns[col] = new
                self._emit(st.table.name, "column-type-change", {"column": col, "type": new, "old_type": ty},
                           commit_ts=ts)
                break

    def _cdc(self) -> None:
        o = self.opts
        total = o.events if o.events is not None else 10**12
        end_us = SOURCE_START_US + int(o.duration_s * 1_000_000) if o.duration_s is not None else None
        if o.events is not None:
            self._plan_drift(o.events)
        pick_table = self._table_picker()
        done = 0
        lo, hi = o.change_interval_ms
        while done < total:
            size = self.rng.randint(1, 5)
            self.now_us += sum(self.rng.randint(lo, hi) for _ in range(size)) * 1000
            if end_us is not None and self.now_us > end_us:
                break
            for st in self.states.values():
                self._drift(st, done)
            self.txn_id += self.rng.randint(1, 3)
            touched: set[tuple] = set()
            rec = 0
            for _ in range(min(size, total - done)):
                st = self.states[pick_table()]
                made = self._one_change(st, touched, rec + 1)
                if made:
                    rec += 1
                    done += 1
                    if o.same_key_in_txn_rate and done < total and self.rng.random() < o.same_key_in_txn_rate:
                        rec, done = self._same_key_again(st, rec, done, total)

    def _table_picker(self) -> Callable[[], str]:
        """The table of the next change: uniform, or by rank with `table_skew` (one draw of `self.rng`
        either way, so a seed still fixes the output). The rank order is the sorted table names, not
        drawn from the seed: which tables are hot depends on the configuration only."""
        skew = self.opts.table_skew
        if skew < 0:
            raise ValueError("table_skew must be >= 0")
        if skew == 0:  # the draw of every earlier version: histories without skew stay byte-identical
            names = list(self.states)
            return lambda: self.rng.choice(names)
        ranked = sorted(self.states)
        cum = list(accumulate(1 / rank**skew for rank in range(1, len(ranked) + 1)))
        return lambda: self.rng.choices(ranked, cum_weights=cum)[0]

    def _same_key_again(self, st: _TableState, rec: int, done: int, total: int) -> tuple[int, int]:
        """1-2 more changes of the key just changed, in the same transaction (one commit time): an
        update, or a delete that ends the key's changes in this transaction."""
        key = self._last_key
        for _ in range(self.rng.randint(1, 2)):
            if done >= total or key not in st.rows:
                break
            rec += 1
            done += 1
            if self.rng.random() < 0.8:
                row = dict(st.rows[key])
                self._mutate(st, row)
                self._emit(st.table.name, "update", dict(row), **self._txn_fields(rec))
                self._store(st, key, row)
            else:
                self._emit(st.table.name, "delete", dict(st.rows[key]), **self._txn_fields(rec))
                self._forget(st, key)
        return rec, done

    def _txn_fields(self, rec: int) -> dict[str, Any]:
        self.change_no += 1
        self.lsn += self.rng.randint(0x28, 0x400)
        commit_lsn = self.lsn + 0x10
        pos = f"{self.lsn >> 32:08X}/{self.lsn & 0xFFFFFFFF:08X}.{rec}.{commit_lsn >> 32:08X}/{commit_lsn & 0xFFFFFFFF:08X}"
        ts = iso_us(self.now_us)
        digits = ts[0:4] + ts[5:7] + ts[8:10] + ts[11:13] + ts[14:16] + ts[17:19] + ts[20:26]
        return {
            "commit_ts": ts,
            "txn_id": self.txn_id,
            "txn_rec_id": rec,
            "stream_pos": pos,
            "change_seq": f"{digits}{self.change_no:015d}",
        }

    def _one_change(self, st: _TableState, touched: set[tuple], rec: int) -> bool:
        name = st.table.name
        r = self.rng.random()
        op = "insert" if not st.live or r < 0.35 else ("update" if r < 0.85 else "delete")
        if op == "insert":
            key = None
            if st.deleted and self.rng.random() < self.opts.reinsert_rate:
                key = self.rng.choice(st.deleted)
            key = key or self._new_key(st)
            if key is None or (name, key) in touched:
                return False
            row = self._full_row(st, key)
            sent = dict(row)
            self._maybe_dirty(st, sent)
            bad = self._maybe_break_quality(st, sent)
            ch = self._emit(name, "insert", sent, **self._txn_fields(rec))
            if bad:
                self.dq_injected.append({"source_seq": ch.source_seq, **bad})
            self._store(st, key, row)
        elif op == "update":
            key = self._pick_key(st)
            if key is None or (name, key) in touched:
                return False
            row = dict(st.rows[key])
            self._mutate(st, row)
            before = None
            if self.opts.pk_change_rate > 0 and self.rng.random() < self.opts.pk_change_rate:
                new_key = self._new_key_like(st, key)
                if new_key is not None and (name, new_key) not in touched:
                    before = dict(zip(st.table.primary_key, key, strict=True))
                    row.update(zip(st.table.primary_key, new_key, strict=True))
                    self._forget(st, key)
                    touched.add((name, new_key))
                    key = new_key
            sent = dict(row)
            if before is None:
                self._maybe_partial(st, sent, st.rows[key])
            self._maybe_dirty(st, sent)
            bad = self._maybe_break_quality(st, sent)
            ch = self._emit(name, "update", sent, before=before, **self._txn_fields(rec))
            if bad:
                self.dq_injected.append({"source_seq": ch.source_seq, **bad})
            self._store(st, key, row)
        else:
            key = self._pick_key(st)
            if key is None or (name, key) in touched:
                return False
            self._emit(name, "delete", dict(st.rows[key]), **self._txn_fields(rec))
            self._forget(st, key)
        touched.add((name, key))
        self._last_key = key
        return True

    def _new_key_like(self, st: _TableState, key: tuple) -> tuple | None:
        """A fresh key for a primary-key change: same prefix, a new last component."""
        p = tuple(key[:-1])
        n = max(st.counters.get(p, 0), 0) + 1
        st.counters[p] = n
        last: Any = n if st.columns[st.table.primary_key[-1]] in ("int", "bigint", "smallint") else f"K{n:07d}"
        new = (*p, last)
        return None if new in st.rows else new

    def _mutate(self, st: _TableState, row: dict[str, Any]) -> None:
        t = st.table
        pk = set(t.primary_key)
        mutable = [c for c in st.columns if c not in pk and c not in st.refs and "created" not in c
                   and c != "updated_at"]
        for col in self.rng.sample(mutable, k=min(len(mutable), self.rng.randint(1, 3))):
            row[col] = self._value(st, col, self.serial)
        if "updated_at" in st.columns:
            row["updated_at"] = dms_ts(self.now_us)
        if (self.opts.null_update_rate > 0 and not t.cfg.ignore_null_updates
                and self.rng.random() < self.opts.null_update_rate):
            not_null = {c for rule in t.cfg.quality.raw_to_staging if rule.rule == "not_null" for c in rule.columns}
            nullable = [c for c in mutable if c in t.cfg.columns and t.cfg.columns[c].nullable and c not in not_null]
            for col in self.rng.sample(nullable, k=min(len(nullable), self.rng.randint(1, 2))):
                row[col] = None

    def _maybe_partial(self, st: _TableState, sent: dict[str, Any], stored: dict[str, Any]) -> None:
        """An update that sends NULL for the columns it leaves unchanged (but the key and the columns
        a not_null rule checks), as a table with ignore_null_updates may receive them."""
        t = st.table
        rate = self.opts.partial_update_rate  # 0: no random draw, so other options' histories stay as they were
        if not t.cfg.ignore_null_updates or rate <= 0 or self.rng.random() >= rate:
            return
        not_null = {c for rule in t.cfg.quality.raw_to_staging if rule.rule == "not_null" for c in rule.columns}
        for col in st.columns:
            if col not in t.primary_key and col not in not_null and sent.get(col) == stored.get(col):
                sent[col] = None


def _transformed_columns(table: Table) -> set[str]:
    """String columns (not the key) that the table's raw_to_staging transforms rewrite."""
    tr = table.cfg.transforms.raw_to_staging
    named = set(tr.columns) | {c for step in tr.functions for c in step.outputs}
    return {c for c in named if table.columns.get(c) == "string" and c not in table.primary_key}


def generate_history(project: Project, seed: int | str, options: GenOptions | None = None) -> History:
    return SourceModel(project, seed, options).generate()
