"""Data-quality stages and transforms on real Spark: every rule type, every severity, one pass."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

import pytest

from batch.stages import run_stage, silver_references, write_quarantine
from cdcflow.config.models import Quality, StageTransforms, Transforms
from cdcflow.quality import DataQualityFailure
from cdcflow.transforms import apply_transforms
from tests.streaming_helpers import project_in

pytestmark = [pytest.mark.spark, pytest.mark.glue_compat]

SCHEMA = ("customer_id bigint, segment string, country string, created_at timestamp, score int, "
          "_op string, _seq string, _source_position string")
STAGE = "staging_to_dimension"


def row(cid, segment="consumer", country="DE", created=datetime(2024, 1, 1), score=5, op="I"):
    return (cid, segment, country, created, score, op, f"1{cid:020d}", f"file.parquet#{cid}")


def table_with(project, rules=(), transforms=None, name="shop.customers"):
    t = project.table(name)
    update = {"quality": Quality.model_validate({STAGE: list(rules)})}
    if transforms is not None:
        update["transforms"] = Transforms.model_validate({STAGE: transforms})
    return replace(t, cfg=t.cfg.model_copy(update=update))


ALL_RULES = [
    {"rule": "not_null", "columns": ["segment"]},
    {"rule": "valid_date", "column": "created_at", "min": "2000-01-01", "max": "now+1d"},
    {"rule": "range", "column": "score", "min": 0, "max": 10},
    {"rule": "accepted_values", "column": "segment", "values": ["consumer", "business"]},
    {"rule": "regex", "column": "country", "pattern": "^[A-Z]{2}$"},
    {"rule": "unique", "columns": ["customer_id"]},
    {"rule": "referential", "column": "score", "references": "shop.products.product_id"},
    {"name": "big_ids_only", "rule": "expression", "expression": "customer_id < 1000", "columns": ["customer_id"]},
]


@pytest.fixture()
def project(tmp_path):
    return project_in(tmp_path)


def refs_of(spark, values):
    def lookup(table, column):
        assert (table, column) == ("shop.products", "product_id")
        return spark.createDataFrame([(v,) for v in values], "product_id bigint")

    return lookup


def test_every_rule_type_quarantines_with_rule_reason_and_position(spark, project):
    rows = [
        row(1),  # good
        row(2, segment=None),  # not_null (and nothing else: nulls pass the other rules)
        row(3, created=datetime(1990, 1, 1)),  # valid_date
        row(4, score=11),  # range (11 is also not a product id)
        row(5, segment="vip"),  # accepted_values
        row(6, country="Germany"),  # regex
        row(7), row(7),  # unique (both rows)
        row(8, score=9),  # referential (no product 9)
        row(1001),  # expression
        row(9, segment="??", country="x", op="D"),  # a delete: not checked
    ]
    df = spark.createDataFrame(rows, SCHEMA)
    t = table_with(project, ALL_RULES)
    res = run_stage(spark, project, t, df, STAGE, refs_of(spark, [5, 10, 11]))
    kept = sorted(r["customer_id"] for r in res.good.collect())
    assert kept == [1, 9]
    got = sorted((r[1], r[3]) for r in res.quarantine_rows)
    assert got == [("accepted_values", "file.parquet#5"), ("big_ids_only", "file.parquet#1001"),
                   ("not_null", "file.parquet#2"), ("range", "file.parquet#4"), ("referential", "file.parquet#8"),
                   ("regex", "file.parquet#6"), ("unique", "file.parquet#7"), ("unique", "file.parquet#7"),
                   ("valid_date", "file.parquet#3")]
    reasons = {r[1]: r[2] for r in res.quarantine_rows}
    assert reasons["regex"] == "staging_to_dimension: country does not match pattern"
    assert reasons["referential"] == "staging_to_dimension: score not found in shop.products.product_id"
    assert all(r[0] == "shop.customers" and r[5] for r in res.quarantine_rows)  # table and a record hash
    assert res.report.rows == 11 and res.report.failures[("unique", "quarantine")] == 2
    assert "Germany" not in " ".join(r[2] for r in res.quarantine_rows)  # reasons never quote values

    write_quarantine(spark, project, res.quarantine_rows)
    q = spark.read.format("delta").load(project.path("quarantine"))
    assert q.count() == 9 and q.filter("rule = 'regex'").first()["source_position"] == "file.parquet#6"


def test_warn_is_counted_only_and_fail_raises_over_its_threshold_only(spark, project):
    df = spark.createDataFrame([row(i, segment="vip" if i < 3 else "consumer") for i in range(10)], SCHEMA)
    warn = table_with(project, [{"rule": "accepted_values", "column": "segment", "values": ["consumer"],
                                 "severity": "warn"}])
    res = run_stage(spark, project, warn, df, STAGE)
    assert res.good.count() == 10 and res.quarantine_rows == []
    assert res.report.failures == {("accepted_values", "warn"): 3}

    def fail(threshold):
        return table_with(project, [{"rule": "accepted_values", "column": "segment", "values": ["consumer"],
                                     "severity": "fail", "fail_threshold": threshold}])

    with pytest.raises(DataQualityFailure, match=r"3 of 10 rows"):
        run_stage(spark, project, fail(0.2), df, STAGE)  # 30% > 20%
    ok = run_stage(spark, project, fail(0.3), df, STAGE)  # 30% is not over 30%
    assert ok.good.count() == 10 and ok.report.failures == {("accepted_values", "fail"): 3}


def _jobs(spark, group, fn):
    sc = spark.sparkContext
    sc.setJobGroup(group, group)
    try:
        fn()
    finally:
        sc.setLocalProperty("spark.jobGroup.id", None)
    return len(sc.statusTracker().getJobIdsForGroup(group))


def test_all_rules_of_a_stage_run_in_one_pass(spark, project):
    """The number of Spark jobs of a stage does not grow with the number of (row-level) rules."""
    df = spark.createDataFrame([row(i) for i in range(50)] + [row(100, segment=None), row(101, segment="vip")], SCHEMA)
    row_rules = [r for r in ALL_RULES if r["rule"] not in ("unique", "referential")]
    many = [{**r, "name": f"{r['rule']}_{i}"} for i in range(4) for r in row_rules]  # 24 rules

    def stage(rules):
        return lambda: run_stage(spark, project, table_with(project, rules), df, STAGE).good.count()

    one = _jobs(spark, "dq-one", stage(row_rules[:1]))
    lots = _jobs(spark, "dq-many", stage(many))
    assert one > 0 and lots == one


def test_referential_rule_reads_live_rows_of_the_referenced_silver_table(spark, project):
    path = project.path(project.table("shop.products").delta_path)
    spark.createDataFrame([(5, False), (6, True)], "product_id bigint, _is_deleted boolean").write.format(
        "delta").save(path)
    df = spark.createDataFrame([row(1, score=5), row(2, score=6), row(3, score=None)], SCHEMA)
    t = table_with(project, [r for r in ALL_RULES if r["rule"] == "referential"])
    res = run_stage(spark, project, t, df, STAGE, silver_references(spark, project))
    assert sorted(r["customer_id"] for r in res.good.collect()) == [1, 3]  # 6 is a tombstone; null passes
    assert [r[3] for r in res.quarantine_rows] == ["file.parquet#2"]


def test_transforms_rename_columns_and_sql(spark, project):
    df = spark.createDataFrame([row(1, country=" de "), row(2, country="fr", score=3)], SCHEMA)
    tr = StageTransforms(
        rename={"segment": "customer_segment"},
        columns={"country": "upper(trim(country))", "score_x2": "cast(score * 2 as int)"},
        sql=["select *, customer_segment = 'consumer' as is_consumer from input",
             "select customer_id, country, score_x2, is_consumer from input where score_x2 > 6"],
    )
    out = apply_transforms(df, tr)
    assert [r.asDict() for r in out.collect()] == [
        {"customer_id": 1, "country": "DE", "score_x2": 10, "is_consumer": True}]
    # Through a stage: rules see the declared columns, transforms run on the rows kept.
    t = table_with(project, [{"rule": "range", "column": "score", "min": 4}], {"columns": {"country": "lower(country)"}})
    res = run_stage(spark, project, t, df, STAGE)
    assert [(r["customer_id"], r["country"]) for r in res.good.collect()] == [(1, " de ")]


@pytest.mark.parametrize("stage", ["staging_to_dimension", "dimension_to_fact"])
def test_sql_and_dataframe_transforms_run_after_the_rules_of_each_warehouse_stage(spark, project, stage):
    """A stage's Spark SQL (`columns`, `sql`) and DataFrame-API (`functions`) transforms run on the rows its
    rules kept; the expected rows are written here from the transforms' meaning."""
    rows = [row(1, segment="  Business ", country=" de"), row(2, segment="VIP", country="fr "), row(3, segment=None)]
    t = project.table("shop.customers")
    cfg = t.cfg.model_copy(update={
        "quality": Quality.model_validate({stage: [{"rule": "not_null", "columns": ["segment"]}]}),
        "transforms": Transforms.model_validate({stage: {
            "columns": {"country": "upper(trim(country))"},
            "sql": ["select *, score * 10 as score10 from input"],
            "functions": [{"function": "shop_transforms:normalise_text", "params": {"columns": ["segment"],
                                                                                   "case": "lower"}}]}}),
    })
    res = run_stage(spark, project, replace(t, cfg=cfg), spark.createDataFrame(rows, SCHEMA), stage)
    got = {r["customer_id"]: (r["segment"], r["country"], r["score10"]) for r in res.good.collect()}
    assert got == {1: ("business", "DE", 50), 2: ("vip", "FR", 50)}
    assert [(q[0], q[1]) for q in res.quarantine_rows] == [("shop.customers", "not_null")]
