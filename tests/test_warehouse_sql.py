"""Generated DDL and merge SQL: every Redshift statement parses with sqlglot's Redshift dialect, and the
Postgres statements run on the embedded Postgres."""

from __future__ import annotations

import pytest
import sqlglot
from sqlglot import exp
from warehouse_helpers import current_schema, project

from batch.warehouse.ddl import model, table_ddl
from batch.warehouse.loader import plan, redshift_statements

TABLES = ["shop.customers", "shop.products", "shop.orders", "shop.order_items"]


@pytest.mark.parametrize("name", TABLES)
def test_redshift_statements_parse(name):
    st = redshift_statements(project(), name, "analytics")
    for sql in [*st.pre, *[s.sql for s in st.post]]:
        if sql.startswith("lock "):  # sqlglot has no LOCK node; it parses as a Command
            continue
        tree = sqlglot.parse_one(sql, read="redshift", error_level=sqlglot.ErrorLevel.RAISE)
        assert not isinstance(tree, exp.Command), sql
    assert st.pre[-1].startswith("delete from")  # Redshift TRUNCATE would commit the transaction
    opts = st.glue_options()
    assert set(opts) == {"preactions", "postactions"}


def test_redshift_ddl_has_distribution_and_sort_keys():
    m = model(project(), "shop.orders", "analytics")
    ddl = table_ddl(m, "redshift")
    target = [s for s in ddl if "fct_orders" in s][0]
    assert 'diststyle key distkey("customer_id")' in target and 'compound sortkey("order_date")' in target
    assert "shipping_phone" not in target  # PII drop
    dim = table_ddl(model(project(), "shop.customers", "analytics"), "redshift")
    assert any('"customer_sk" bigint identity(1,1)' in s for s in dim)
    assert not any("diststyle" in s for s in table_ddl(m, "postgres"))
    parsed = sqlglot.parse_one(target, read="redshift")
    assert parsed.find(exp.DistKeyProperty) is not None and parsed.find(exp.SortKeyProperty) is not None


@pytest.mark.stack
@pytest.mark.parametrize("name", TABLES)
def test_postgres_ddl_runs(pg, name):
    schema = current_schema(pg)
    p = plan(project(), name, "postgres", schema)
    for sql in p.ddl + p.ddl:  # idempotent
        pg.execute(sql)
    cols = pg.execute(
        "select column_name from information_schema.columns where table_schema = %s and table_name = %s",
        (schema, model(project(), name, schema).target_name),
    ).fetchall()
    assert len(cols) > 5
