"""Peer check: our SCD2 history equals dbt's snapshot (dbt-postgres, check strategy, hard_deletes=invalidate)
on the same inputs, row for row, on the same embedded Postgres.

How the comparison is made faithful: dbt snapshots *states*, we merge *changes*. The test builds a
sequence of source states S1..Sn at times T1..Tn where each key changes at most once between two states
(dbt can't see more), and derives our changes from consecutive states: a new key is an insert at its
`updated_at`, a changed row an update at its `updated_at`, a missing key a delete at Ti. dbt is given
`updated_at='updated_at'`, so dbt_valid_from is the source change time (as our valid_from), and the
project overrides `postgres__snapshot_get_time` to return Ti, so the valid_to of an invalidated
(hard-deleted) row is the state's time, as our delete's commit time. Compared: natural key, tracked
columns, the untracked `updated_at` a version opened with, valid_from and valid_to; surrogate keys and
dbt's bookkeeping columns are ignored.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from decimal import Decimal

import pytest
from warehouse_helpers import Change, current_schema, project, staging

from batch.warehouse import merge_table

pytestmark = pytest.mark.stack

dbt_main = pytest.importorskip(
    "dbt.cli.main", reason="dbt-postgres is not installed (pip install -e '.[peer]')"
)

TRACKED = ["sku", "name", "category", "price", "active"]
T0 = dt.datetime(2024, 3, 1)


def states(n_states: int = 6, n_keys: int = 25, seed: int = 7) -> list[tuple[dt.datetime, dict[int, dict]]]:
    rnd = random.Random(seed)
    t = T0

    def row(pid: int, when: dt.datetime) -> dict:
        return {
            "product_id": pid,
            "sku": f"SKU-{pid:05d}",
            "name": rnd.choice(["a", "b", None]),
            "category": rnd.choice(["books", "toys", None]),
            "price": Decimal(rnd.choice(["1.00", "2.50"])),
            "active": rnd.choice([True, False, None]),
            "updated_at": when,
        }

    current = {pid: row(pid, t) for pid in range(1, n_keys + 1)}
    out = [(t, {k: dict(v) for k, v in current.items()})]
    for _ in range(n_states - 1):
        t += dt.timedelta(hours=1)
        for pid in range(1, n_keys + 6):
            when = t - dt.timedelta(minutes=rnd.randint(1, 50))
            r = rnd.random()
            if pid in current and r < 0.15:
                del current[pid]
            elif pid in current and r < 0.45:
                new = {**row(pid, when), "sku": current[pid]["sku"]}
                if rnd.random() < 0.3:  # only the untracked column changes
                    new = {**current[pid], "updated_at": when}
                current[pid] = new
            elif pid not in current and r < 0.4:
                current[pid] = row(pid, when)
        out.append((t, {k: dict(v) for k, v in current.items()}))
    return out


def changes_between(prev: dict[int, dict], cur: dict[int, dict], at: dt.datetime) -> list[Change]:
    out = []
    for pid, r in cur.items():
        if pid not in prev:
            out.append(Change("I", None, r))
        elif r != prev[pid]:
            out.append(Change("U", None, r))
    out += [Change("D", None, {**prev[pid]}) for pid in prev if pid not in cur]
    for ch in out:  # commit time: the row's updated_at, or the state's time for a delete
        when = at if ch.op == "D" else ch.row["updated_at"]
        ch.minute = int((when - dt.datetime(2024, 1, 1)).total_seconds() // 60)
    return out


def write_dbt_project(root, pg_port: int, schema: str) -> None:
    (root / "snapshots").mkdir()
    (root / "macros").mkdir()
    (root / "dbt_project.yml").write_text(
        "name: peer\nversion: '1.0'\nconfig-version: 2\nprofile: peer\nsnapshot-paths: [snapshots]\n"
        "macro-paths: [macros]\n"
    )
    (root / "profiles.yml").write_text(
        "peer:\n  target: t\n  outputs:\n    t:\n      type: postgres\n      host: 127.0.0.1\n"
        f"      port: {pg_port}\n      user: cdcflow\n      password: cdcflow\n      dbname: cdcflow\n"
        f"      schema: {schema}\n      threads: 1\n"
    )
    # The time dbt stamps on invalidated rows: the state's time instead of the wall clock.
    (root / "macros" / "snapshot_time.sql").write_text(
        "{% macro postgres__snapshot_get_time() -%}\n"
        "  '{{ var(\"snapshot_time\") }}'::timestamp without time zone\n{%- endmacro %}\n"
    )
    (root / "snapshots" / "snap_products.sql").write_text(
        "{% snapshot snap_products %}\n"
        f"{{{{ config(target_schema='{schema}', unique_key='product_id', strategy='check', "
        f"check_cols={TRACKED!r}, updated_at='updated_at', hard_deletes='invalidate') }}}}\n"
        f"select * from {schema}.src_products\n{{% endsnapshot %}}\n"
    )


def test_scd2_history_matches_dbt_snapshot(pg, stack, tmp_path):
    p = project()
    schema = current_schema(pg)
    write_dbt_project(tmp_path, stack.pg_port, schema)
    pg.execute(
        "create table src_products (product_id bigint, sku text, name text, category text, price decimal(10,2), "
        "active boolean, updated_at timestamp)"
    )
    runner = dbt_main.dbtRunner()
    prev: dict[int, dict] = {}
    for at, state in states():
        with pg.transaction():
            pg.execute("delete from src_products")
            with pg.cursor().copy("copy src_products from stdin") as cp:
                for r in state.values():
                    cp.write_row([r[c] for c in ["product_id", *TRACKED, "updated_at"]])
        res = runner.invoke(
            [
                "snapshot",
                "--project-dir",
                str(tmp_path),
                "--profiles-dir",
                str(tmp_path),
                "--quiet",
                "--vars",
                json.dumps({"snapshot_time": at.isoformat(sep=" ")}),
            ]
        )
        assert res.success, res.exception
        chs = changes_between(prev, state, at)
        merge_table(pg, p, "shop.products", staging(p, "shop.products", chs), schema=schema)
        prev = state

    cols = ", ".join(["product_id", *TRACKED, "updated_at"])
    ours = pg.execute(
        f"select {cols}, valid_from, valid_to from dim_product order by 1, valid_from"
    ).fetchall()
    theirs = pg.execute(
        f"select {cols}, dbt_valid_from, dbt_valid_to from snap_products order by 1, dbt_valid_from"
    ).fetchall()
    assert len(ours) > 40 and any(r[-1] is not None for r in ours)
    assert ours == theirs
    deleted = pg.execute("select count(*) from dim_product where is_deleted").fetchone()[0]
    reopened = pg.execute(
        "select count(*) from (select product_id from dim_product group by 1 having bool_or(is_deleted) "
        "and bool_or(is_current)) x"
    ).fetchone()[0]
    assert deleted > 0 and reopened > 0  # the inputs exercise deletes and re-inserts
