"""Atomicity, serialization and retries of a merge, on the embedded Postgres (real errors, no mocks)."""

from __future__ import annotations

import threading

import psycopg
import pytest
from warehouse_helpers import (
    FIRST,
    SECOND,
    Change,
    current_schema,
    cust,
    dimension_rows,
    dump_schema,
    expected_history,
    project,
    staging,
)

from batch.warehouse import loader, merge_table
from batch.warehouse.scd2 import Step

pytestmark = pytest.mark.stack




def inject(monkeypatch, sql: str, after: str) -> None:
    """Insert `sql` into the merge plan right after the first step containing `after`."""
    real = loader.plan

    def patched(*a, **kw):
        p = real(*a, **kw)
        i = next(i for i, s in enumerate(p.merge) if after in s.sql) + 1
        return loader.Plan(p.ddl, [*p.merge[:i], Step(sql), *p.merge[i:]])

    monkeypatch.setattr(loader, "plan", patched)


def test_failure_mid_merge_leaves_warehouse_unchanged(pg, monkeypatch):
    p = project()
    schema = current_schema(pg)
    merge_table(pg, p, "shop.customers", staging(p, "shop.customers", FIRST), schema=schema)
    before = dump_schema(pg, schema)
    # Fails after the versions were updated and before the insert: a half-applied merge if not atomic.
    inject(monkeypatch, "select 1 / 0", after="update ")
    with pytest.raises(psycopg.errors.DivisionByZero):
        merge_table(pg, p, "shop.customers", staging(p, "shop.customers", SECOND), schema=schema)
    assert dump_schema(pg, schema) == before  # staging included


def test_killed_connection_mid_merge_leaves_warehouse_unchanged(pg, stack, monkeypatch):
    p = project()
    schema = current_schema(pg)
    merge_table(pg, p, "shop.customers", staging(p, "shop.customers", FIRST), schema=schema)
    before = dump_schema(pg, schema)
    inject(monkeypatch, "select pg_terminate_backend(pg_backend_pid())", after="update ")
    victim = psycopg.connect(stack.pg_url, autocommit=True)
    with pytest.raises(psycopg.OperationalError):
        merge_table(
            victim, p, "shop.customers", staging(p, "shop.customers", SECOND), schema=schema, attempts=1
        )
    assert dump_schema(pg, schema) == before


def test_transient_error_is_retried(pg, stack, monkeypatch):
    p = project()
    schema = current_schema(pg)
    merge_table(pg, p, "shop.customers", staging(p, "shop.customers", FIRST), schema=schema)
    # A real serialization failure (SQLSTATE 40001) raised by the server in the middle of the first attempt
    # only (a sequence is not rolled back, so it counts attempts).
    pg.execute("create sequence attempts")
    fail_once = (
        f"do $$ begin if nextval('{schema}.attempts') = 1 then "
        "raise exception 'conflict' using errcode = '40001'; end if; end $$"
    )
    inject(monkeypatch, fail_once, after="update ")
    r = merge_table(stack.pg_url, p, "shop.customers", staging(p, "shop.customers", SECOND), schema=schema)
    assert r.attempts == 2
    got = dimension_rows(
        pg, schema, "dim_customer", ["customer_id"], ["email", "full_name", "country", "segment"]
    )
    assert got == expected_history(
        FIRST + SECOND, ["customer_id"], ["email", "full_name", "country", "segment"], [], []
    )


def test_concurrent_merges_into_one_table_serialize(pg, stack, monkeypatch):
    p = project()
    schema = current_schema(pg)
    pg.execute("create table merge_log (who text, at timestamptz)")
    real = loader.plan

    def logged(*a, **kw):  # record when each merge's statements start and end, inside its transaction
        pl = real(*a, **kw)
        who = f"'{threading.current_thread().name}'"
        return loader.Plan(
            pl.ddl,
            [
                Step(f"insert into {schema}.merge_log values ({who} || ':start', clock_timestamp())"),
                Step("select pg_sleep(0.5)"),
                *pl.merge,
                Step(f"insert into {schema}.merge_log values ({who} || ':end', clock_timestamp())"),
            ],
        )

    monkeypatch.setattr(loader, "plan", logged)
    # Either order gives the same history (a late change is placed by _seq), so the oracle is order-free.
    # (Not so for a delete that arrives before its key's first version: it has nothing to close.)
    second = [
        Change("U", 5, cust(1, "a2", 5)),
        Change("U", 6, cust(2, "b2", 6)),
        Change("I", 7, cust(3, "c", 7)),
    ]
    batches = {"t1": FIRST, "t2": second}
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            merge_table(
                stack.pg_url, p, "shop.customers", staging(p, "shop.customers", batches[name]), schema=schema
            )
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(n,), name=n) for n in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    log = dict(pg.execute("select who, at from merge_log").fetchall())
    a, b = sorted(batches, key=lambda n: log[f"{n}:start"])
    assert log[f"{a}:end"] <= log[f"{b}:start"]  # no interleaving
    got = dimension_rows(pg, schema, "dim_customer", ["customer_id"], ["full_name"])
    assert got == expected_history(FIRST + second, ["customer_id"], ["full_name"], [], [])
