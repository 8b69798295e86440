"""Data quality and raw->staging transforms in the streaming job and the full load, against the oracle:
one history with untidy text (the simulator's dirty values) and rule failures, consumed by the stream
as one micro-batch and by the full load from the DMS S3 files. Every severity of the raw stage is in
it: quarantine (the sample rules), warn (customers' country before it is tidied), fail under its
threshold (orders) and over it (products: the stream isolates the table, the full load stops), plus
a Spark SQL and a DataFrame-API transform on customers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from cdcflow.metrics import MetricsSink
from cdcflow.oracle import build_oracle, expected_dq, load_history, resolve_salt
from cdcflow.quality import DataQualityFailure
from cdcflow.sim.synthetic import write_configs
from cdcflow.verify import read_actual, verify
from streaming.job import run_stream
from streaming.sources import replay_stream
from tests.conftest import CONFIGS
from tests.streaming_helpers import project_in, simulate_to, split_replay, tidy_customer

RULES = {  # table -> raw_to_staging rules added to the sample ones
    "shop.customers": [{"name": "country_tidy", "rule": "regex", "column": "country", "pattern": "^[A-Z]{2}$",
                        "severity": "warn"}],
    "shop.orders": [{"name": "total_cap", "rule": "range", "column": "total_amount", "max": 950, "severity": "fail",
                     "fail_threshold": 0.5}],
    "shop.products": [{"name": "price_cap", "rule": "range", "column": "price", "max": 500, "severity": "fail",
                       "fail_threshold": 0.05}],
}


def _configs(tmp: Path) -> Path:
    cfg = write_configs(CONFIGS, tmp / "configs", 1)  # synth.t0001: the many-table plan's quarantine-only rules
    for table, rules in RULES.items():
        f = cfg / "tables" / f"{table}.yaml"
        data = yaml.safe_load(f.read_text())
        data["quality"]["raw_to_staging"] += rules
        f.write_text(yaml.safe_dump(data, sort_keys=False))
    return cfg


@pytest.mark.spark
@pytest.mark.glue_compat
def test_every_severity_and_transform_in_stream_and_full_load_match_oracle(spark, tmp_path: Path):
    cfg = _configs(tmp_path)
    project = project_in(tmp_path, cfg, CDCFLOW_RAW_URI=str(tmp_path / "raw"))
    sim = tmp_path / "sim"
    simulate_to(project, sim, seed=5, events=300, dq_failure_rate=0.05, dirty_value_rate=0.4, pk_change_rate=0.03)
    history = load_history(sim)
    dirty = [ch["data"] for ch in history.changes if ch["table"] == "shop.customers" and ch["op"] != "delete"
             and ch.get("data") and tidy_customer(ch["data"]) != ch["data"]]
    assert len(dirty) > 10  # input the transforms change

    metrics = tmp_path / "metrics.jsonl"
    replay = split_replay(sim, tmp_path / "replay", batches=1)  # the oracle's fail rules: one micro-batch
    summary = run_stream(spark, project, replay_stream(spark, str(replay)), available_now=True,
                         metrics=MetricsSink(project.pipeline.name, path=str(metrics)))
    assert summary.batches == 1
    assert [n for n, o in summary.tables.items() if o.isolated] == ["shop.products"]
    assert summary.tables["synth.t0001"].shared_plan and not summary.tables["shop.orders"].shared_plan

    oracle = build_oracle(project, history, resolve_salt(project), "kinesis", transforms={"shop.customers": tidy_customer})
    assert not oracle.state["shop.products"] and oracle.state["shop.orders"]  # isolated / applied with failures
    bad = [d for d in verify(project, oracle, read_actual(project, spark)) if not d.ok]
    assert not bad, [(d.table, d.kind, d.missing[:3], d.extra[:3], d.different[:3]) for d in bad]

    # The DQ report (one window: the run) and the run's summary hold the oracle's counts.
    expected = expected_dq(project, history.changes)
    (path,) = summary.dq_reports
    report = json.loads(Path(path).read_text())
    assert Path(path).parent == Path(project.path("_reports/dq")) and report["batches"]["count"] == 1
    got = {t["table"]: {"checked": t["checked"], "rules": {r["rule"]: (r["severity"], r["failed"], r["quarantined"])
                                                         for r in t["rules"]}} for t in report["tables"]}
    assert got == expected
    assert report["tables"] == summary.dq
    assert expected["shop.customers"]["rules"]["country_tidy"][1] > 0  # warned, and applied (tidied) above
    assert 0 < expected["shop.orders"]["rules"]["total_cap"][1] < expected["shop.orders"]["checked"] / 2
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [m["reason"] for m in lines if "DataQualityFailed" in m][0].startswith(
        "shop.products raw_to_staging: rule price_cap failed on ")
    warned = {(m["Table"], m["Rule"]): m["DqWarnings"] for m in lines if "DqWarnings" in m}
    assert warned == {("shop.customers", "country_tidy"): expected["shop.customers"]["rules"]["country_tidy"][1]}

    # The full load applies the same transforms and rules from the DMS S3 files; its fail rule stops the
    # run at products (tables go in name order), before anything of products is applied.
    load = project_in(tmp_path / "fl", cfg, CDCFLOW_RAW_URI=str(tmp_path / "raw"))
    shutil.copytree(sim / "s3", tmp_path / "raw")
    from batch.full_load import run_full_load

    with pytest.raises(DataQualityFailure, match="shop.products raw_to_staging: rule price_cap failed"):
        run_full_load(spark, load)
    oracle = build_oracle(load, history, resolve_salt(load), "s3", transforms={"shop.customers": tidy_customer})
    done = ("shop.customers", "shop.order_items", "shop.orders")
    diffs = [d for d in verify(load, oracle, read_actual(load, spark)) if d.table in done and d.kind == "current"]
    assert len(diffs) == 3 and all(d.ok for d in diffs), [(d.table, d.missing[:3], d.different[:3]) for d in diffs]


def test_dq_window_writes_one_report_per_window_and_counts_from_outcomes(tmp_path: Path):
    """No Spark: the counts come from the batch outcomes (quarantine rows, the warn/fail aggregate), and
    a report is written once the window has passed, then at the stop for the rest."""
    from types import SimpleNamespace

    from cdcflow.quality import StageReport
    from streaming.dq import DqWindow

    project = project_in(tmp_path, _configs(tmp_path))
    now = [1_800_000_000.0]
    emitted = tmp_path / "m.jsonl"
    window = DqWindow(project, MetricsSink("p", path=str(emitted)), clock=lambda: now[0])

    def outcome(table, read, rules, dq=None, isolated=False):
        return SimpleNamespace(table=table, read=read, dq=dq, isolated=isolated,
                               quarantine_rows=[(table, r, "why", "pos", "{}", "h") for r in rules])

    customers = StageReport("shop.customers", "raw_to_staging", 9, {("country_tidy", "warn"): 2,
                                                                    ("not_null", "quarantine"): 1})
    window.add([outcome("shop.customers", 10, ["type_mismatch", "not_null"], customers),
                outcome("shop.order_items", 5, ["missing_primary_key", "range"])], 0)
    now[0] += 59 * 60
    window.add([outcome("shop.order_items", 3, [])], 1)
    assert window.reports == []  # 59 minutes: still the first window
    now[0] += 60
    window.add([], 2)
    (first,) = window.reports
    body = json.loads(Path(first).read_text())
    assert body["batches"] == {"first": 0, "last": 2, "count": 3} and Path(first).name.startswith("stream-")
    assert body["tables"] == [
        {"table": "shop.customers", "checked": 9, "rules": [
            {"rule": "country_tidy", "severity": "warn", "failed": 2, "quarantined": 0},
            {"rule": "not_null", "severity": "quarantine", "failed": 1, "quarantined": 1},
            {"rule": "type_mismatch", "severity": "quarantine", "failed": 1, "quarantined": 1},
            {"rule": "valid_date", "severity": "quarantine", "failed": 0, "quarantined": 0}]},
        {"table": "shop.order_items", "checked": 7, "rules": [  # 5 + 3 read, one failed to parse
            {"rule": "missing_primary_key", "severity": "quarantine", "failed": 1, "quarantined": 1},
            {"rule": "not_null", "severity": "quarantine", "failed": 0, "quarantined": 0},
            {"rule": "range", "severity": "quarantine", "failed": 1, "quarantined": 1}]},
    ]
    assert window.flush() is None  # nothing since the last report
    window.add([outcome("shop.order_items", 1, [])], 3)
    assert window.flush() and len(window.reports) == 2
    lines = [json.loads(line) for line in emitted.read_text().splitlines()]
    assert [(m["Table"], m["Rule"], m["DqWarnings"], m["DqRowsChecked"]) for m in lines] == [
        ("shop.customers", "country_tidy", 2, 9)]


@pytest.mark.spark
@pytest.mark.glue_compat
def test_validate_runs_transforms_on_a_sample_frame_and_names_what_they_break(spark, tmp_path: Path, capsys):
    """`cdcflow validate`: the sample configs' transforms pass; a function dropping the primary key, one
    whose declared output is missing, one that raises and a failing SQL statement are each reported with
    file, key path and reason."""
    from cdcflow.cli import main
    from cdcflow.transform_check import check_transforms

    cfg = tmp_path / "configs"
    shutil.copytree(CONFIGS, cfg, ignore=shutil.ignore_patterns("__pycache__"))
    assert check_transforms(spark, project_in(tmp_path, cfg)) == []
    (cfg / "bad_tf.py").write_text(
        "def drop_key(df):\n    return df.drop('order_id')\n\n"
        "def keep(df, column):\n    return df\n\n"
        "def boom(df):\n    raise ValueError('no luck')\n")
    f = cfg / "tables" / "shop.orders.yaml"
    data = yaml.safe_load(f.read_text())
    data["transforms"] = {
        "raw_to_staging": {"functions": [{"function": "bad_tf:keep", "params": {"column": "x"}, "outputs": ["band"]},
                                         {"function": "bad_tf:drop_key"}]},
        "staging_to_dimension": {"sql": ["select nope from input"]},
        "dimension_to_fact": {"functions": [{"function": "bad_tf:boom"}]},
    }
    f.write_text(yaml.safe_dump(data, sort_keys=False))
    got = [str(p) for p in check_transforms(spark, project_in(tmp_path, cfg))]
    where = f"{f}: transforms."
    assert got[0] == f"{where}raw_to_staging.functions[0].outputs: the output has no column band"
    assert got[1] == (f"{where}raw_to_staging: the transforms drop the primary key column(s) order_id: key, "
                      "ordering and declared columns must stay")
    assert got[2].startswith(f"{where}staging_to_dimension.sql: AnalysisException: ") and "nope" in got[2]
    assert got[3] == f"{where}dimension_to_fact.functions[0].function: ValueError: no luck"
    assert len(got) == 4
    capsys.readouterr()
    assert main(["--config", str(cfg), "validate"]) == 1  # the CLI reports them, one line each
    err = capsys.readouterr().err
    assert "4 problem(s) found" in err and "Traceback" not in err

    # Every job makes the same check before it reads anything, for the stages it runs: the stream and
    # the full load raw_to_staging's, the warehouse merge all three.
    from batch.full_load import run_full_load
    from batch.warehouse_job import merge_from_lake
    from cdcflow.errors import ConfigError
    from streaming.job import run_stream

    (tmp_path / "raw").mkdir()
    bad = project_in(tmp_path, cfg, CDCFLOW_RAW_URI=str(tmp_path / "raw"))
    for job in (lambda: run_stream(spark, bad, spark.range(0), available_now=True), lambda: run_full_load(spark, bad)):
        with pytest.raises(ConfigError) as e:
            job()
        assert [str(p) for p in e.value.problems] == got[:2]
    with pytest.raises(ConfigError) as e:
        merge_from_lake(spark, bad, "postgresql://nobody@127.0.0.1:9/none")
    assert [str(p) for p in e.value.problems] == got
    assert not (tmp_path / "lake").exists() and not (tmp_path / "ck").exists()  # stopped before writing
    # a full load of other tables checks their transforms only: shop.orders' don't stop it
    assert run_full_load(spark, bad, ["shop.products"]).files == 0
