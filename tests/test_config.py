"""Config loading and validation: the shipped configs, every error path, interpolation, scale."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from cdcflow.config import load_project
from cdcflow.errors import ConfigError
from tests.conftest import CONFIGS


@pytest.fixture()
def cfg_dir(tmp_path: Path) -> Path:
    shutil.copytree(CONFIGS, tmp_path / "configs")
    return tmp_path / "configs"


def edit(path: Path, fn) -> None:
    data = yaml.safe_load(path.read_text())
    fn(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def problems(cfg_dir: Path, env=None) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_project(cfg_dir, env=env or {})
    return [str(p) for p in e.value.problems]


def test_shipped_configs_load_with_defaults_applied():
    p = load_project(CONFIGS, env={})
    assert set(p.tables) == {"shop.customers", "shop.products", "shop.orders", "shop.order_items"}
    customers = p.table("shop.customers")
    assert customers.primary_key == ["customer_id"]
    assert customers.pii == {"email": "hash", "phone": "redact"}
    assert p.table("shop.orders").deletes == "hard"
    assert p.table("shop.products").ordering == ("stream_position",)
    assert p.table("shop.order_items").ordering == ("commit_timestamp", "transaction_id", "transaction_record_id")
    assert p.table("shop.order_items").tombstone_retention_hours == 168
    assert p.pipeline.aws.endpoint_url == "http://127.0.0.1:5000"
    assert p.pipeline.warehouse.schema_ == "analytics"
    # every rule type appears in the sample configs
    rules = {r.rule for t in p.tables.values() for s in ("raw_to_staging", "staging_to_dimension",
             "dimension_to_fact") for r in t.cfg.quality.stage(s)}
    assert rules == {"not_null", "valid_date", "range", "accepted_values", "regex", "unique", "referential",
                     "expression"}


def test_interpolation_env_default_and_empty():
    env = {"CDCFLOW_STREAM": "prod-stream", "CDCFLOW_AWS_ENDPOINT": "", "CDCFLOW_LAKE_ROOT": ""}
    p = load_project(CONFIGS, env=env)
    assert p.pipeline.kinesis.stream == "prod-stream"
    assert p.pipeline.aws.endpoint_url is None  # ${VAR-default}: set-but-empty means real AWS
    assert p.pipeline.lake.root == ".cdcflow/lake"  # ${VAR:-default}: empty takes the default


def test_missing_variable_without_default_names_file_and_key(cfg_dir: Path):
    edit(cfg_dir / "pipeline.yaml", lambda d: d["kinesis"].update(stream="${NO_SUCH_VAR}"))
    assert problems(cfg_dir) == [
        f"{cfg_dir / 'pipeline.yaml'}: kinesis.stream: environment variable NO_SUCH_VAR is not set and has no default"
    ]


def test_every_problem_reported_at_once_with_file_key_and_reason(cfg_dir: Path):
    tables = cfg_dir / "tables"
    edit(tables / "shop.customers.yaml", lambda d: d.update(colums={}))  # unknown key (typo)
    edit(tables / "shop.products.yaml", lambda d: d["columns"]["price"].update(type=5))  # wrong type
    edit(tables / "shop.orders.yaml", lambda d: d["quality"]["raw_to_staging"].append(
        {"rule": "not_null", "columns": ["no_such_col"]}))  # rule on an undeclared column
    edit(tables / "shop.order_items.yaml", lambda d: d.pop("primary_key"))  # missing primary key
    shutil.copy(tables / "shop.orders.yaml", tables / "shop.orders2.yaml")  # duplicate table
    (tables / "extra.things.yaml").write_text(
        "source: {schema: extra, table: things}\ncolumns: {id: {type: bigint}}\nprimary_key: [id]\n"
        "quality:\n  raw_to_staging:\n    - {rule: is_fancy, column: id}\n"
    )  # unknown rule type
    got = problems(cfg_dir)
    expect = [
        (tables / "shop.customers.yaml", "colums", "unknown key"),
        (tables / "shop.products.yaml", "columns.price.type", "string"),
        (tables / "shop.orders.yaml", "quality.raw_to_staging[4]", "column 'no_such_col' is not declared"),
        (tables / "shop.order_items.yaml", "primary_key", "Field required"),
        (tables / "shop.orders2.yaml", "source", "duplicate table 'shop.orders', also defined in"),
        (tables / "extra.things.yaml", "quality.raw_to_staging[0]", "unknown rule type 'is_fancy'"),
    ]
    for file, key, reason in expect:
        assert any(p.startswith(f"{file}: {key}") and reason in p for p in got), (file, key, reason, got)
    assert len(got) == len(expect)


@pytest.mark.parametrize(
    ("mutate", "key", "reason"),
    [
        (lambda d: d["columns"]["email"].update(type="varchar2"), "columns.email.type", "unknown column type"),
        (lambda d: d.update(primary_key=["nope"]), "primary_key[0]", "column 'nope' is not declared"),
        (lambda d: d["columns"]["customer_id"].update(pii="drop"), "columns.customer_id.pii", "cannot be dropped"),
        (lambda d: d["quality"]["raw_to_staging"].append({"rule": "range", "column": "customer_id"}),
         "quality.raw_to_staging[2]", "needs min, max or both"),
        (lambda d: d["quality"]["raw_to_staging"].append({"rule": "regex", "column": "email", "pattern": "("}),
         "quality.raw_to_staging[2].pattern", "missing )"),
        (lambda d: d["warehouse"].update(tracked_columns=["ghost"]), "warehouse.tracked_columns", "'ghost'"),
        (lambda d: d["transforms"]["raw_to_staging"].update(uses=["ghost"]), "transforms.raw_to_staging.uses",
         "'ghost'"),
        (lambda d: d["delta"].update(zorder_by=["ghost"]), "delta.zorder_by", "'ghost'"),
        (lambda d: d.update(deletes="sometimes"), "deletes", "'soft' or 'hard'"),
        (lambda d: d.update(ordering=["wall_clock"]), "ordering[0]", "commit_timestamp"),
        (lambda d: d["delta"].update(properties={"enableDeletionVectors": True}), "delta.properties",
         "not a Delta table property"),
        (lambda d: d["delta"].update(properties={"delta.appendOnly": True}), "delta.properties", "updated in place"),
        (lambda d: d["delta"].update(properties={"delta.logRetentionDuration": "7 days'"}), "delta.properties",
         "quotes and backslashes"),
    ],
)
def test_each_error_path_names_key_and_reason(cfg_dir: Path, mutate, key, reason):
    f = cfg_dir / "tables" / "shop.customers.yaml"
    edit(f, mutate)
    got = problems(cfg_dir)
    assert any(p.startswith(f"{f}: {key}") and reason in p for p in got), got


def test_referential_rule_must_name_a_configured_table(cfg_dir: Path):
    f = cfg_dir / "tables" / "shop.orders.yaml"
    edit(f, lambda d: d["quality"]["dimension_to_fact"][0].update(references="shop.nobody.id"))
    assert any("no table 'shop.nobody.id' is configured" in p for p in problems(cfg_dir))


def test_invalid_yaml_and_missing_pipeline(cfg_dir: Path, tmp_path: Path):
    (cfg_dir / "tables" / "shop.orders.yaml").write_text("source: [unclosed\n")
    assert any("shop.orders.yaml: line" in p and "invalid YAML" in p for p in problems(cfg_dir))
    assert problems(tmp_path / "nowhere") == [f"{tmp_path / 'nowhere' / 'pipeline.yaml'}: file not found"]


def test_thousand_table_files_load(tmp_path: Path):
    """1000 table files load and validate (load time: benchmarks/config_scale.py, not a timed test)."""
    cfg = tmp_path / "configs"
    (cfg / "tables").mkdir(parents=True)
    shutil.copy(CONFIGS / "pipeline.yaml", cfg / "pipeline.yaml")
    shutil.copytree(CONFIGS / "shop_transforms", cfg / "shop_transforms")  # the customers template's functions
    template = (CONFIGS / "tables" / "shop.customers.yaml").read_text()
    for i in range(1000):
        (cfg / "tables" / f"synth.t{i:04d}.yaml").write_text(
            template.replace("{schema: shop, table: customers}", f"{{schema: synth, table: t{i:04d}}}")
        )
    p = load_project(cfg, env={})
    assert len(p.tables) == 1000 and p.table("synth.t0999").primary_key == p.table("synth.t0000").primary_key


def test_delta_properties_merge_pipeline_defaults_under_the_table_s(cfg_dir: Path):
    edit(cfg_dir / "pipeline.yaml", lambda d: d.setdefault("defaults", {}).update(
        delta_properties={"delta.enableDeletionVectors": True, "delta.logRetentionDuration": "interval 7 days"}))
    edit(cfg_dir / "tables" / "shop.orders.yaml",
         lambda d: d["delta"].update(properties={"delta.enableDeletionVectors": False, "delta.checkpointInterval": 50}))
    p = load_project(cfg_dir, env={})
    assert p.table("shop.orders").delta_properties == {
        "delta.enableDeletionVectors": "false", "delta.logRetentionDuration": "interval 7 days",
        "delta.checkpointInterval": "50"}
    assert p.table("shop.customers").delta_properties == {
        "delta.enableDeletionVectors": "true", "delta.logRetentionDuration": "interval 7 days"}


def test_transform_config_errors_name_file_key_path_and_reason(cfg_dir: Path):
    """DataFrame-API functions must import, exist, be callable and take the configured parameters; key
    and ordering columns can't be renamed or replaced by a transform in any stage."""
    (cfg_dir / "my_tf.py").write_text("LIMIT = 3\ndef two(df, n):\n    return df\n")

    def change(d):
        d["transforms"]["raw_to_staging"]["functions"] = [
            {"function": "no_such_module:f"}, {"function": "shop_transforms:nope"},
            {"function": "my_tf:LIMIT"}, {"function": "my_tf:two", "params": {"m": 1}}, {"function": "not a ref"}]
        d["transforms"]["staging_to_dimension"] = {"rename": {"customer_id": "id", "country": "_seq"},
                                                   "columns": {"customer_id": "customer_id + 1", "_op": "'x'"}}

    edit(cfg_dir / "tables" / "shop.customers.yaml", change)
    got = problems(cfg_dir)
    f = f"{cfg_dir / 'tables' / 'shop.customers.yaml'}: transforms"
    assert f"{f}.raw_to_staging.functions[4].function: Value error, 'not a ref' is not module:function " \
           "(e.g. shop_transforms:normalise_names)" in got  # a malformed reference stops the other checks
    d = cfg_dir / "tables" / "shop.customers.yaml"
    edit(d, lambda d: d["transforms"]["raw_to_staging"]["functions"].pop())
    got = problems(cfg_dir)
    assert got == [
        f"{f}.raw_to_staging.functions[0].function: cannot import module 'no_such_module': No module named "
        "'no_such_module'",
        f"{f}.raw_to_staging.functions[1].function: module 'shop_transforms' has no function 'nope'",
        f"{f}.raw_to_staging.functions[2].function: my_tf:LIMIT is not callable",
        f"{f}.raw_to_staging.functions[3].function: my_tf:two does not accept (df, m): missing a required "
        "argument: 'n'",
        f"{f}.staging_to_dimension.rename.customer_id: a primary key column cannot be renamed",
        f"{f}.staging_to_dimension.rename.country: a column cannot be renamed to a name starting with _ (ordering "
        "and change metadata)",
        f"{f}.staging_to_dimension.columns.customer_id: a primary key column cannot be replaced",
        f"{f}.staging_to_dimension.columns._op: columns starting with _ (ordering and change metadata) cannot be "
        "replaced",
    ]


def test_a_raw_stage_rename_that_takes_a_declared_column_from_silver_is_an_error(cfg_dir: Path):
    """Silver stores the declared columns, so a raw_to_staging rename must leave the name there (a
    `columns` entry bringing it back); before, such a table failed in every micro-batch instead."""
    d = cfg_dir / "tables" / "shop.customers.yaml"
    edit(d, lambda d: d["transforms"].update(raw_to_staging={"rename": {"segment": "customer_segment"}}))
    assert problems(cfg_dir) == [
        f"{d}: transforms.raw_to_staging.rename.segment: silver keeps the declared column segment: derive "
        "customer_segment with a `columns` entry, or rename in a later stage"]
    edit(d, lambda d: d["transforms"]["raw_to_staging"].update(columns={"segment": "upper(customer_segment)"}))
    load_project(cfg_dir, env={})  # the name brought back: fine


def test_warehouse_stage_derived_columns_are_declared_with_a_type_or_an_error(cfg_dir: Path):
    """A warehouse-stage transform that adds a column: its type goes in warehouse.columns and the
    warehouse table stores it (before, it was computed and dropped without a word); a warehouse.columns
    entry no transform produces, or one that repeats a declared column, is an error too."""
    from batch.warehouse.ddl import model

    items = load_project(cfg_dir, env={})
    assert model(items, "shop.order_items").columns["line_amount"] == "decimal(21,2)"
    f = cfg_dir / "tables" / "shop.order_items.yaml"
    edit(f, lambda d: d["warehouse"].pop("columns"))
    assert problems(cfg_dir) == [
        f"{f}: transforms.staging_to_dimension.columns.line_amount: adds column 'line_amount', which the "
        "warehouse table doesn't store: give its type in warehouse.columns"]
    edit(f, lambda d: d["warehouse"].update(columns={"line_amount": "decimal(21,2)", "ghost": "int",
                                                     "quantity": "int"}))
    assert problems(cfg_dir) == [
        f"{f}: warehouse.columns.ghost: no warehouse stage transform produces it (a `columns` entry, a rename or "
        "a function's outputs in transforms.staging_to_dimension / transforms.dimension_to_fact)",
        f"{f}: warehouse.columns.quantity: is a declared column (warehouse.columns are the ones the warehouse "
        "stages' transforms add)"]
    edit(f, lambda d: d["warehouse"].update(columns={"line_amount": "decimal(21,2)"}))
    edit(f, lambda d: d["transforms"]["staging_to_dimension"].update(
        rename={"product_id": "item_id"}, functions=[{"function": "shop_transforms:normalise_text",
                                                      "params": {"columns": ["updated_at"]}, "outputs": ["tidy"]}]))
    assert problems(cfg_dir) == [
        f"{f}: transforms.staging_to_dimension.rename.product_id: adds column 'item_id', which the warehouse "
        "table doesn't store: give its type in warehouse.columns",
        f"{f}: transforms.staging_to_dimension.functions[0].outputs: adds column 'tidy', which the warehouse "
        "table doesn't store: give its type in warehouse.columns"]
    edit(f, lambda d: d["transforms"]["staging_to_dimension"].update(rename={}, functions=[]))
    edit(f, lambda d: d["warehouse"].update(columns={"line_amount": "money"}))
    assert any(p.startswith(f"{f}: warehouse.columns") and "unknown column type" in p for p in problems(cfg_dir))
    edit(f, lambda d: d["warehouse"].update(columns={"line_amount": "decimal(21,2)"}, sort_keys=["line_amount"]))
    load_project(cfg_dir, env={})  # a stored derived column may be a sort key
