"""SQL for the SCD2 dimension merge and the fact load: one portable statement list per dialect.

Every statement is plain SQL that Redshift and Postgres both run (no MERGE, DISTINCT ON, IS DISTINCT
FROM or ON COMMIT DROP); only the lock, the staging truncate, ANALYZE and SET LOCAL tuning differ.

How the dimension merge works (one transaction, under a per-table lock):

0. Fast path (`_fast_path`): a key with exactly one staged change, newer than everything stored for it,
   and a current version needs no history rebuild: the current version is closed (or folded into) and
   a new version inserted, straight from one join of staging with the current rows. This is the result
   the steps below give for such a key; every other key goes through them.

1. The affected keys are the staged keys the fast path did not take. Their stored versions are turned
   back into change events: each version is an upsert at its `_seq` / `valid_from`, and a version closed by a delete
   also yields a delete at its `_end_seq` / `valid_to`.
2. New staged changes are added, except a change whose (key, `_seq`) is already stored (as a version's
   opening or closing change): re-running a batch is a no-op.
3. All events of a key are ordered by `_seq` and classified with NULL-safe change detection over the
   tracked columns (NULL -> NULL is no change): an upsert opens a version when it is the key's first
   event, follows a delete, or changes a tracked column; a delete closes the open version; other
   events fold into the version before them.
4. Each version's `valid_to` / `is_current` / `is_deleted` comes from the next significant event
   (`lead` over the significant events), so several changes to one key in one batch become several
   versions, and a late change (older than stored versions) lands at its place in history: the
   version before it is re-closed at the late change's time. Stored versions keep their surrogate key
   (a version whose start moved earlier keeps its key); an inferred member becomes the key's first
   version in place, so facts attached to it stay attached. A run holds at most one stored version
   (added events can extend a run backwards but never join two runs), so no stored version is dropped.

dbt's snapshot can't do (4): it compares the current source state with the current snapshot row only,
so it sees at most one change per key per run, stamps versions in arrival order, and a late change
either becomes the newest version (wrong order) or is lost. It also rescans the whole source table on
every run; this merge reads only the staged changes and the stored versions of their keys.

Limitation: changes folded into a version (no tracked change) are not stored one by one, so a late
delete that falls inside such a stretch closes the version but cannot reopen it at the folded
change's time.

SCD1 columns are overwritten on every version of the key with the value of the key's latest change
by `_seq` (stored `_last_seq` guards against a late, older change).
"""

from __future__ import annotations

from dataclasses import dataclass

from batch.warehouse.ddl import LOW_TS, Dialect, WarehouseModel, q, sql_type


@dataclass(frozen=True)
class Step:
    """One statement; `name` marks statements whose row count goes into the MergeResult."""

    sql: str
    name: str | None = None


def same(a: str, b: str) -> str:
    """NULL-safe equality that is always true/false (Redshift has no IS NOT DISTINCT FROM)."""
    return f"(coalesce({a} = {b}, false) or ({a} is null and {b} is null))"


def _on(cols: list[str], left: str, right: str) -> str:
    return " and ".join(f"{left}.{q(c)} = {right}.{q(c)}" for c in cols)


def _drop_temp(name: str) -> Step:
    return Step(f"drop table if exists {name}")


def _analyze(dialect: Dialect, name: str) -> list[Step]:
    # Postgres has no statistics on fresh temp tables; without them it picks nested loops.
    return [Step(f"analyze {name}")] if dialect == "postgres" else []


def lock_sql(names: list[str], dialect: Dialect) -> list[str]:
    """Serialize merges per table: a transaction-scoped advisory lock (Postgres) or LOCK (Redshift).

    Locks are taken in sorted order so a fact load (fact + its dimensions) can't deadlock with a
    dimension merge.
    """
    names = sorted(set(names))
    if dialect == "postgres":
        return [f"select pg_advisory_xact_lock(hashtext('cdcflow.warehouse:{n}'))" for n in names]
    return [f"lock {n}" for n in names]


def truncate_sql(m: WarehouseModel, dialect: Dialect) -> str:
    # Redshift's TRUNCATE commits the open transaction; DELETE keeps truncate + load + merge atomic.
    return f"truncate table {m.staging}" if dialect == "postgres" else f"delete from {m.staging}"


def staging_columns(m: WarehouseModel) -> list[str]:
    return [*m.columns, "_op", "_seq", "_commit_ts"]


def dimension_merge(m: WarehouseModel, dialect: Dialect) -> list[Step]:
    """The SCD2 merge of staging into the dimension (see the module docstring)."""
    key = m.key
    cols = list(m.value_columns)
    keys = ", ".join(q(k) for k in key)
    low = f"cast('{LOW_TS}' as timestamp)"
    sk = q(m.sk)
    in_keys = f"exists (select 1 from w_keys k where {_on(key, 'k', 'd')})"
    kcols = ", ".join(f"d.{q(k)}" for k in key)
    vcols = ", ".join(f"d.{q(c)}" for c in cols)
    nulls = ", ".join(f"cast(null as {_cast_type(m, c, dialect)}) as {q(c)}" for c in cols)
    vsel = (vcols + ", ") if cols else ""
    nsel = (nulls + ", ") if cols else ""
    s_vcols = ", ".join(f"s.{q(c)}" for c in cols)
    s_vsel = (s_vcols + ", ") if cols else ""
    changed = " or ".join(f"not {same(q(c), q('p_' + c))}" for c in m.tracked) or "false"
    lags = ", ".join(
        f"lag({q(c)}) over (partition by {keys} order by w_seq) as {q('p_' + c)}" for c in m.tracked
    )
    steps: list[Step] = [
        *_tuning(dialect),
        # SCD1 values are computed from the stored rows before any of them is rewritten.
        *(_scd1_values(m) if m.scd1 else []),
        *_fast_path(m, dialect),
        _drop_temp("w_keys"),
        # The general path takes every other staged key: late data, several changes per key, deletes of
        # and re-inserts after deleted keys, new keys, inferred members, re-runs.
        Step(
            f"create temp table w_keys as select distinct {keys} from {m.staging} s "
            f"where not exists (select 1 from w_fast f where {_on(key, 'f', 's')})"
        ),
        *_analyze(dialect, "w_keys"),
        _drop_temp("w_old"),
        # The stored versions of the affected keys, read once.
        Step(f"create temp table w_old as select d.* from {m.dim} d where not d.is_inferred and {in_keys}"),
        *_analyze(dialect, "w_old"),
        _drop_temp("w_ev"),
        # (1) + (2): stored versions and delete markers of the affected keys, plus the new changes.
        Step(
            f"create temp table w_ev as "
            f"select {kcols}, d._seq as w_seq, d.valid_from as w_ts, 'U' as w_op, {vsel}"
            f"d.{sk} as w_sk, d._last_seq as w_last_seq "
            f"from w_old d "
            f"union all "
            f"select {kcols}, d._end_seq as w_seq, d.valid_to as w_ts, 'D' as w_op, {nsel}"
            f"cast(null as bigint) as w_sk, cast(null as {_seq_type(dialect)}) as w_last_seq "
            f"from w_old d where d.is_deleted "
            f"union all "
            f"select {', '.join('s.' + q(k) for k in key)}, s._seq as w_seq, coalesce(s._commit_ts, {low}) as w_ts, "
            f"case when s._op = 'D' then 'D' else 'U' end as w_op, {s_vsel}"
            f"cast(null as bigint) as w_sk, s._seq as w_last_seq "
            f"from (select t.*, row_number() over (partition by {keys}, _seq order by _op) as rn "
            f"from {m.staging} t where exists (select 1 from w_keys k where {_on(key, 'k', 't')})) s "
            f"where s.rn = 1 and not exists (select 1 from w_old d where {_on(key, 'd', 's')} "
            f"and d._seq = s._seq) and not exists (select 1 from w_old d "
            f"where {_on(key, 'd', 's')} and d._end_seq = s._seq)"
        ),
        *_analyze(dialect, "w_ev"),
        _drop_temp("w_sig"),
        # (3): classify events; `w_run` numbers the versions of a key (0 = before its first upsert).
        Step(
            f"create temp table w_sig as "
            f"select e.*, sum(case when e.w_op = 'U' and e.w_sig then 1 else 0 end) over "
            f"(partition by {keys} order by e.w_seq rows unbounded preceding) as w_run "
            f"from (select l.*, case when l.w_op = 'D' then (l.w_prev_op is not null and l.w_prev_op <> 'D') "
            f"else (l.w_prev_op is null or l.w_prev_op = 'D' or {changed}) end as w_sig "
            f"from (select w.*, lag(w_op) over (partition by {keys} order by w_seq) as w_prev_op"
            f"{', ' + lags if lags else ''} from w_ev w) l) e"
        ),
        _drop_temp("w_ver"),
        # (4): one row per version: the opening event's values, bounds from the next significant event,
        # the surrogate key of the stored version in the w_run (or the key's inferred member for w_run 1).
        Step(
            f"create temp table w_ver as "
            f"select {', '.join('o.' + q(k) for k in key)}, {''.join('o.' + q(c) + ', ' for c in cols)}"
            f"o.w_ts as valid_from, o.w_next_ts as valid_to, o.w_next_seq is null as is_current, "
            f"coalesce(o.w_next_op = 'D', false) as is_deleted, o.w_seq as _seq, o.w_next_seq as _end_seq, "
            f"r.w_last_seq as _last_seq, coalesce(r.w_sk, case when o.w_run = 1 then i.{sk} end) as w_sk "
            f"from (select g.*, lead(g.w_ts) over (partition by {keys} order by g.w_seq) as w_next_ts, "
            f"lead(g.w_seq) over (partition by {keys} order by g.w_seq) as w_next_seq, "
            f"lead(g.w_op) over (partition by {keys} order by g.w_seq) as w_next_op "
            f"from w_sig g where g.w_sig) o "
            f"join (select {keys}, w_run, min(w_sk) as w_sk, max(coalesce(w_last_seq, w_seq)) as w_last_seq from w_sig "
            f"where w_op = 'U' group by {keys}, w_run) r on {_on(key, 'r', 'o')} and r.w_run = o.w_run "
            f"left join {m.dim} i on {_on(key, 'i', 'o')} and i.is_inferred "
            f"where o.w_op = 'U'"
        ),
        *_analyze(dialect, "w_ver"),
        Step(
            f"select count(*) from w_ver v join w_old d on d.{sk} = v.w_sk "
            f"where d.valid_to is null and d.is_current and not v.is_current",
            "rows_closed",
        ),
        # Versions with a stored surrogate key: rewrite only what changed.
        Step(
            f"update {m.dim} set "
            + ", ".join(
                f"{q(c)} = v.{q(c)}" for c in [*cols, "valid_from", "valid_to", "is_current", "is_deleted"]
            )
            + ", is_inferred = false, _seq = v._seq, _end_seq = v._end_seq, _last_seq = v._last_seq "
            f"from w_ver v where {m.dim}.{sk} = v.w_sk and ({m.dim}.is_inferred or "
            + " or ".join(
                f"not {same(f'{m.dim}.{q(c)}', f'v.{q(c)}')}"
                for c in [
                    *cols,
                    "valid_from",
                    "valid_to",
                    "is_current",
                    "is_deleted",
                    "_seq",
                    "_end_seq",
                    "_last_seq",
                ]
            )
            + ")",
            "versions_updated",
        ),
        Step(
            f"insert into {m.dim} ({keys}, {''.join(q(c) + ', ' for c in cols)}valid_from, valid_to, "
            f"is_current, is_deleted, is_inferred, _seq, _end_seq, _last_seq) "
            f"select {keys}, {''.join(q(c) + ', ' for c in cols)}valid_from, valid_to, is_current, "
            f"is_deleted, false, _seq, _end_seq, _last_seq from w_ver where w_sk is null",
            "versions_inserted",
        ),
    ]
    if m.scd1:
        steps.append(_scd1_update(m))
    return steps


def _tuning(dialect: Dialect) -> list[Step]:
    # Postgres only, for this transaction: memory for the hash joins and sorts of the merge, and a smaller
    # ANALYZE sample for the temp tables (their row counts matter to the planner, fine histograms don't).
    if dialect != "postgres":
        return []
    return [Step("set local work_mem = '256MB'"), Step("set local default_statistics_target = 10")]


def _index_join(dialect: Dialect, on: bool) -> list[Step]:
    """Postgres only: the close UPDATE touches about one row in ten of the dimension; the planner prefers a
    hash join over a full scan of it, while primary-key lookups measured faster (benchmarks/warehouse_scd2).
    Switched on just for that statement, back to the defaults after it."""
    if dialect != "postgres":
        return []
    if on:
        return [Step("set local enable_hashjoin = off"), Step("set local enable_mergejoin = off")]
    return [Step("set local enable_hashjoin to default"), Step("set local enable_mergejoin to default")]


def _fast_path(m: WarehouseModel, dialect: Dialect) -> list[Step]:
    """The common case without a history rebuild: a key with exactly one staged change that is newer than
    everything stored for the key (its current version's `_seq` and `_last_seq`), and a current version.

    For such a key the general path (module docstring) would re-derive the stored versions unchanged and
    then classify one event after the current version, so its result is just: a tracked change (NULL-safe)
    closes the current version at the change (`_end_seq`, `valid_to`; `_last_seq` = the version's last
    folded change) and opens a new current version; a delete closes the current version as deleted; any
    other change folds into the current version (`_last_seq` = the change). `w_fast` holds these keys, and
    the general path takes all others. SCD1 columns are handled afterwards for every staged key.
    """
    key = m.key
    keys = ", ".join(q(k) for k in key)
    cols = list(m.value_columns)
    sk = q(m.sk)
    low = f"cast('{LOW_TS}' as timestamp)"
    changed = " or ".join(f"not {same('s.' + q(c), 'd.' + q(c))}" for c in m.tracked) or "false"
    vcols = "".join(f"s.{q(c)}, " for c in cols)
    insert_cols = f"{keys}, {''.join(q(c) + ', ' for c in cols)}"
    return [
        _drop_temp("w_fast"),
        Step(
            f"create temp table w_fast as select {', '.join('s.' + q(k) for k in key)}, {vcols}"
            f"s._seq, coalesce(s._commit_ts, {low}) as w_ts, s._op = 'D' as w_del, "
            f"(s._op = 'D' or {changed}) as w_close, d.{sk} as w_sk, "
            f"coalesce(d._last_seq, d._seq) as w_prev_last "
            f"from {m.staging} s "
            f"join (select {keys} from {m.staging} group by {keys} having count(*) = 1) o on {_on(key, 'o', 's')} "
            f"join {m.dim} d on {_on(key, 'd', 's')} and d.is_current and d.valid_to is null "
            f"and not d.is_inferred "
            f"where s._seq > d._seq and (d._last_seq is null or s._seq > d._last_seq)"
        ),
        *_analyze(dialect, "w_fast"),
        Step("select count(*) from w_fast where w_close", "rows_closed"),
        *_index_join(dialect, True),
        Step(
            f"update {m.dim} set "
            f"valid_to = case when f.w_close then f.w_ts else {m.dim}.valid_to end, "
            f"is_current = not f.w_close, is_deleted = f.w_del, "
            f"_end_seq = case when f.w_close then f._seq else {m.dim}._end_seq end, "
            f"_last_seq = case when f.w_close then f.w_prev_last else f._seq end "
            f"from w_fast f where {m.dim}.{sk} = f.w_sk",
            "versions_updated",
        ),
        *_index_join(dialect, False),
        Step(
            f"insert into {m.dim} ({insert_cols}valid_from, valid_to, is_current, is_deleted, is_inferred, "
            f"_seq, _end_seq, _last_seq) "
            f"select {insert_cols}w_ts, cast(null as timestamp), true, false, false, _seq, "
            f"cast(null as {_seq_type(dialect)}), _seq from w_fast where w_close and not w_del",
            "versions_inserted",
        ),
    ]


def _scd1_values(m: WarehouseModel) -> list[Step]:
    """SCD1 columns: the latest change of the key by _seq (stored before this merge, or staged) wins;
    computed before the versions are written, applied to every version of the key after."""
    key = m.key
    keys = ", ".join(q(k) for k in key)
    scd1 = ", ".join(q(c) for c in m.scd1)
    return [
        _drop_temp("w_scd1"),
        Step(
            f"create temp table w_scd1 as select {keys}, {scd1}, w_seq from ("
            f"select x.*, row_number() over (partition by {keys} order by w_seq desc) as rn from ("
            f"select {keys}, {scd1}, coalesce(_last_seq, _seq) as w_seq from {m.dim} d where not is_inferred "
            f"and exists (select 1 from {m.staging} k where {_on(key, 'k', 'd')}) "
            f"union all select {keys}, {scd1}, _seq as w_seq from {m.staging} where _op <> 'D') x) y "
            f"where rn = 1"
        ),
    ]


def _scd1_update(m: WarehouseModel) -> Step:
    return Step(
        f"update {m.dim} set "
        + ", ".join(f"{q(c)} = s.{q(c)}" for c in m.scd1)
        + f", _last_seq = s.w_seq from w_scd1 s where {_on(m.key, 's', m.dim)} and not {m.dim}.is_inferred and ("
        + " or ".join(
            [f"not {same(f'{m.dim}.{q(c)}', f's.{q(c)}')}" for c in m.scd1]
            + [f"not {same(f'{m.dim}._last_seq', 's.w_seq')}"]
        )
        + ")",
        "scd1_updated",
    )


def fact_load(m: WarehouseModel, dims: dict[str, WarehouseModel], dialect: Dialect) -> list[Step]:
    """Upsert the latest staged change per fact key, with point-in-time surrogate keys.

    For each lookup: a natural key with no dimension row at all gets an inferred member (natural key
    only, valid from the beginning of time); the dimension merge later turns it into the real first
    version in place, keeping its surrogate key. The surrogate key chosen for a fact is the version
    valid at the fact's event time: the latest version with valid_from <= event time (so after a delete
    the last version before it); before the first version, the first version; with a null event time,
    the latest version.
    """
    key = m.key
    keys = ", ".join(q(k) for k in key)
    et = q(m.event_time)
    cols = list(m.columns)
    steps: list[Step] = [
        _drop_temp("w_f"),
        Step(
            f"create temp table w_f as select {', '.join(q(c) for c in staging_columns(m))} from ("
            f"select s.*, row_number() over (partition by {keys} order by _seq desc) as rn from {m.staging} s) x "
            f"where rn = 1"
        ),
        *_analyze(dialect, "w_f"),
    ]
    sk_select = []
    joins = []
    for i, lk in enumerate(m.target.lookups):
        d = dims[lk.dimension]
        (nk,) = d.key
        col = q(lk.column)
        steps.append(
            Step(
                f"insert into {d.dim} ({q(nk)}, valid_from, valid_to, is_current, is_deleted, is_inferred) "
                f"select distinct f.{col}, cast('{LOW_TS}' as timestamp), cast(null as timestamp), true, false, true "
                f"from w_f f where f.{col} is not null and f._op <> 'D' "
                f"and not exists (select 1 from {d.dim} d where d.{q(nk)} = f.{col})",
                "inferred_members",
            )
        )
        before = f"(f.{et} is null or d.valid_from <= f.{et})"
        alias = f"l{i}"
        joins.append(
            f"left join (select {keys}, w_sk from (select {', '.join('f.' + q(k) for k in key)}, d.{q(d.sk)} as w_sk, "
            f"row_number() over (partition by {', '.join('f.' + q(k) for k in key)} order by "
            f"case when {before} then 0 else 1 end, case when {before} then d.valid_from end desc, "
            f"d.valid_from, d._seq desc) as rn "
            f"from w_f f join {d.dim} d on d.{q(nk)} = f.{col}) p where rn = 1) {alias} "
            f"on {_on(key, alias, 's')}"
        )
        sk_select.append(f"{alias}.w_sk as {q(lk.surrogate_column)}")
    sks = [lk.surrogate_column for lk in m.target.lookups]
    steps += [
        _drop_temp("w_fr"),
        Step(
            f"create temp table w_fr as select s.*{''.join(', ' + x for x in sk_select)} from w_f s "
            + " ".join(joins)
        ),
        *_analyze(dialect, "w_fr"),
        Step(
            f"update {m.dim} set "
            + ", ".join(f"{q(c)} = s.{q(c)}" for c in [*cols, *sks, "_seq", "_commit_ts"])
            + f", is_deleted = false from w_fr s where {_on(key, 's', m.dim)} and s._op <> 'D' "
            f"and s._seq > {m.dim}._seq",
            "facts_updated",
        ),
        Step(
            f"update {m.dim} set is_deleted = true, _seq = s._seq, _commit_ts = s._commit_ts "
            f"from w_fr s where {_on(key, 's', m.dim)} and s._op = 'D' and s._seq > {m.dim}._seq",
            "facts_deleted",
        ),
        Step(
            f"insert into {m.dim} ({', '.join(q(c) for c in [*cols, *sks, '_seq', '_commit_ts'])}, is_deleted) "
            f"select {', '.join('s.' + q(c) for c in [*cols, *sks, '_seq', '_commit_ts'])}, s._op = 'D' "
            f"from w_fr s where not exists (select 1 from {m.dim} t where {_on(key, 's', 't')})",
            "facts_inserted",
        ),
    ]
    return steps


def _seq_type(dialect: Dialect) -> str:
    return "text" if dialect == "postgres" else "varchar(65535)"


def _cast_type(m: WarehouseModel, column: str, dialect: Dialect) -> str:
    return sql_type(m.columns[column], dialect)
