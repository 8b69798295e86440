"""The Glue entry scripts' shared setup (cdcflow/glue.py) against moto, and the scripts' wiring.

No Spark and no awsglue: S3 and Secrets Manager are moto's in-process mocks, and the scripts' main()
runs with Glue, Spark and the batch functions replaced by recording fakes.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType, SimpleNamespace
from urllib.parse import quote, unquote, urlsplit

import boto3
import pytest
from moto import mock_aws

from cdcflow import glue
from cdcflow.config import load_project
from cdcflow.errors import UserError

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
ENTRY_SCRIPTS = ["streaming.glue_job", "batch.glue_full_load", "batch.glue_warehouse_merge", "batch.glue_compaction"]
JOB_ENV = {  # what infra/cdcflow_stack.py passes as --cdcflow-env
    "CDCFLOW_ENV": "aws",
    "CDCFLOW_AWS_ENDPOINT": "",
    "AWS_REGION": "us-east-1",
    "CDCFLOW_STREAM": "prod-cdc",
    "CDCFLOW_RAW_URI": "s3://raw-bucket/dms",
    "CDCFLOW_LAKE_ROOT": "s3://lake-bucket/lake",
    "CDCFLOW_CHECKPOINT_ROOT": "s3://artifacts/checkpoints",
    "CDCFLOW_WAREHOUSE_KIND": "redshift",
}
SALT = "s4ltValueNeverLogged0123456789"
PASSWORD = "pw-Secret@/:%x"  # punctuation that must be percent-encoded in the URL
REDSHIFT_SECRET = {"username": "cdcflow", "password": PASSWORD, "host": "wh.example.internal", "port": 5439,
                   "dbname": "analytics_db"}  # fmt: skip


@pytest.fixture
def env(monkeypatch):
    """Every variable the code under test may set is restored afterwards; fake credentials for moto."""
    for name in [*JOB_ENV, "CDCFLOW_WAREHOUSE_URL", "CDCFLOW_PII_SALT", "GLUE_TEST_VAR"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def aws(env):
    with mock_aws():
        yield SimpleNamespace(s3=boto3.client("s3", region_name="us-east-1"),
                              secrets=boto3.client("secretsmanager", region_name="us-east-1"))


@pytest.fixture
def logs(caplog):
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="cdcflow")
    return caplog


def _upload_configs(s3, bucket: str, prefix: str = "configs/") -> None:
    s3.create_bucket(Bucket=bucket)
    for f in CONFIGS.rglob("*"):
        if f.is_file():
            s3.put_object(Bucket=bucket, Key=prefix + f.relative_to(CONFIGS).as_posix(), Body=f.read_bytes())


def _assert_never_shown(logs, capsys, *secrets: str) -> None:
    """Neither the secret nor its URL-encoded form reaches the log records, stdout or stderr."""
    out, err = capsys.readouterr()
    for text in (logs.text, out, err):
        for secret in secrets:
            assert secret not in text and quote(secret, safe="") not in text


# ---------------------------------------------------------------- download_configs


@pytest.mark.parametrize("uri", ["s3://artifacts/configs/", "s3://artifacts/configs"])
def test_download_configs_copies_yaml_and_transform_packages_and_keeps_tables_folder(aws, tmp_path, uri):
    _upload_configs(aws.s3, "artifacts")
    for key in ("configs/README.md", "configs/tables/notes.txt", "configs/tables/extra.yml",
                "configs-old/pipeline.yaml", "elsewhere/tables/x.yaml"):  # fmt: skip
        aws.s3.put_object(Bucket="artifacts", Key=key, Body=b"name: x\n")

    dest = glue.download_configs(uri, tmp_path / "cfg")

    got = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    expected = sorted(["pipeline.yaml", "tables/extra.yml",
                       *(f"tables/{p.name}" for p in (CONFIGS / "tables").glob("*.yaml")),
                       *(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.glob("*/*.py"))])  # fmt: skip
    assert got == expected
    assert (dest / "pipeline.yaml").read_bytes() == (CONFIGS / "pipeline.yaml").read_bytes()


# ---------------------------------------------------------------- apply_job_environment


def test_apply_job_environment_exports_the_json_as_given(env):
    import os

    names = glue.apply_job_environment(json.dumps({"GLUE_TEST_VAR": "x", "CDCFLOW_AWS_ENDPOINT": ""}))
    assert names == ["CDCFLOW_AWS_ENDPOINT", "GLUE_TEST_VAR"]
    assert os.environ["GLUE_TEST_VAR"] == "x"
    assert os.environ["CDCFLOW_AWS_ENDPOINT"] == ""  # empty is meaningful: real AWS, not the emulator
    assert glue.apply_job_environment("") == []
    with pytest.raises(UserError, match="JSON object"):
        glue.apply_job_environment('["CDCFLOW_ENV=aws"]')


# ---------------------------------------------------------------- load_secret_into_env


def test_salt_secret_is_exported_as_is_and_never_logged(aws, logs, capsys):
    import os

    arn = aws.secrets.create_secret(Name="salt", SecretString=SALT)["ARN"]
    glue.load_secret_into_env(arn, "CDCFLOW_PII_SALT", client=aws.secrets)
    assert os.environ["CDCFLOW_PII_SALT"] == SALT
    assert "CDCFLOW_PII_SALT" in logs.text  # the name is logged, the value is not
    _assert_never_shown(logs, capsys, SALT)


def test_redshift_secret_becomes_the_warehouse_url(aws, logs, capsys):
    import os

    arn = aws.secrets.create_secret(Name="redshift", SecretString=json.dumps(REDSHIFT_SECRET))["ARN"]
    glue.load_secret_into_env(arn, "CDCFLOW_WAREHOUSE_URL")  # default client: boto3, intercepted by moto

    url = urlsplit(os.environ["CDCFLOW_WAREHOUSE_URL"])
    assert (url.scheme, url.hostname, url.port, url.path) == ("redshift", "wh.example.internal", 5439, "/analytics_db")
    # decoded as batch.warehouse.loader.redshift_connect decodes it
    assert (unquote(url.username), unquote(url.password)) == ("cdcflow", PASSWORD)
    _assert_never_shown(logs, capsys, PASSWORD)


def test_redshift_url_defaults_and_missing_fields():
    assert glue.redshift_url({"username": "u", "password": "p", "host": "h", "port": None, "dbname": ""}) == (
        "redshift://u:p@h:5439/dev"
    )
    # CDK's generated secret leaves host empty until filled in: a clear error, without the password
    with pytest.raises(UserError, match="host") as err:
        glue.redshift_url({"username": "cdcflow", "password": PASSWORD, "host": "", "port": 5439, "dbname": "dev"})
    assert PASSWORD not in str(err.value)


def test_binary_secret_is_refused(aws):
    arn = aws.secrets.create_secret(Name="bin", SecretBinary=b"\x00\x01")["ARN"]
    with pytest.raises(UserError, match="SecretString"):
        glue.load_secret_into_env(arn, "CDCFLOW_PII_SALT", client=aws.secrets)


# ---------------------------------------------------------------- glue_project


def _argv(**extra: str) -> list[str]:
    argv = ["script.py", "--JOB_NAME", "cdcflow-shop-stream", "--config", "s3://artifacts/configs/",
            "--cdcflow-env", json.dumps(JOB_ENV), "--TempDir", "s3://artifacts/tmp/stream/",
            "--job-bookmark-option", "job-bookmark-disable"]  # fmt: skip
    for k, v in extra.items():
        argv += [f"--{k.replace('_', '-')}", v]
    return argv


def test_glue_project_end_to_end(aws, logs, capsys):
    import os

    _upload_configs(aws.s3, "artifacts")
    salt = aws.secrets.create_secret(Name="salt", SecretString=SALT)["ARN"]
    redshift = aws.secrets.create_secret(Name="redshift", SecretString=json.dumps(REDSHIFT_SECRET))["ARN"]

    project = glue.glue_project(_argv(pii_salt_secret_id=salt, redshift_secret_id=redshift))

    p = project.pipeline
    assert sorted(project.tables) == sorted(f.name.removesuffix(".yaml") for f in (CONFIGS / "tables").glob("*.yaml"))
    assert p.environment == "aws" and not p.aws.endpoint_url  # real AWS, not the local emulator
    assert (p.kinesis.stream, p.dms.raw_uri, p.lake.root) == ("prod-cdc", "s3://raw-bucket/dms", "s3://lake-bucket/lake")
    assert p.warehouse.kind == "redshift"
    assert unquote(urlsplit(p.warehouse.url).password) == PASSWORD  # interpolated from the secret
    assert os.environ[p.pii.salt_env] == SALT
    _assert_never_shown(logs, capsys, SALT, PASSWORD)


def test_glue_project_without_secrets_like_the_compaction_job(aws):
    import os

    _upload_configs(aws.s3, "artifacts")
    project = glue.glue_project(_argv())
    assert project.pipeline.lake.root == "s3://lake-bucket/lake"
    assert "CDCFLOW_PII_SALT" not in os.environ and "CDCFLOW_WAREHOUSE_URL" not in os.environ


def test_glue_project_requires_config_and_extra_options(aws):
    with pytest.raises(SystemExit):
        glue.glue_project(["script.py", "--JOB_NAME", "j"])
    _upload_configs(aws.s3, "artifacts")
    with pytest.raises(SystemExit):
        glue.glue_project(_argv(), extra_options=["tables"])


def test_resolve_options_uses_glue_when_available(monkeypatch):
    calls = []

    def get_resolved_options(args, options):
        calls.append((args, options))
        return {"JOB_NAME": "j", "config": "s3://b/c/"}

    utils = ModuleType("awsglue.utils")
    utils.getResolvedOptions = get_resolved_options
    monkeypatch.setitem(sys.modules, "awsglue", ModuleType("awsglue"))
    monkeypatch.setitem(sys.modules, "awsglue.utils", utils)

    argv = ["script.py", "--JOB_NAME", "j", "--config", "s3://b/c/"]
    assert glue.resolve_options(argv, ["JOB_NAME", "config"]) == {"JOB_NAME": "j", "config": "s3://b/c/"}
    assert calls == [(argv, ["JOB_NAME", "config"])]


# ---------------------------------------------------------------- entry scripts


@pytest.mark.parametrize("name", ENTRY_SCRIPTS)
def test_entry_script_imports_without_awsglue(monkeypatch, name):
    monkeypatch.setitem(sys.modules, "awsglue", None)  # `import awsglue` now raises ImportError
    monkeypatch.delitem(sys.modules, name, raising=False)
    module = importlib.import_module(name)
    assert callable(module.main)


def test_glue_kinesis_options_keep_the_raw_record():
    from streaming.glue_job import glue_kinesis_options

    opts = glue_kinesis_options(load_project(CONFIGS, env={"CDCFLOW_AWS_ENDPOINT": ""}))
    assert opts["streamName"] == "cdcflow-dms-cdc" and opts["startingPosition"] == "TRIM_HORIZON"
    assert opts["schema"] == "`data` binary" and "endpointUrl" not in opts


@pytest.fixture
def fake_glue(monkeypatch):
    """Glue, Spark and cdcflow.runtime replaced by fakes; glue_project returns the sample project."""
    calls: dict[str, list] = {"glue_context": [], "get_spark": [], "glue_project": []}
    spark = object()

    def module(name: str, **attrs) -> ModuleType:
        m = ModuleType(name)
        m.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, m)
        return m

    project = load_project(CONFIGS, env={})  # with the real cdcflow.runtime (storage.use reads it)
    module("awsglue")
    module("awsglue.context", GlueContext=lambda sc: calls["glue_context"].append(sc))
    module("pyspark")  # a fake parent too: the real pyspark's __init__ would bind the fake SparkContext
    module("pyspark.context", SparkContext=SimpleNamespace(getOrCreate=lambda: "spark-context"))
    module("cdcflow.runtime", get_spark=lambda *a, **k: calls["get_spark"].append(k) or spark)

    def glue_project(argv, extra_options=()):
        calls["glue_project"].append(argv)
        return project

    monkeypatch.setattr(glue, "glue_project", glue_project)
    return SimpleNamespace(calls=calls, spark=spark, project=project, module=module)


def _check_glue_setup(fake, argv) -> None:
    assert fake.calls["glue_context"] == ["spark-context"]
    assert fake.calls["get_spark"] == [{"mode": "glue"}]
    assert fake.calls["glue_project"] == [argv]


def test_full_load_main_runs_the_cli_function(fake_glue, capsys):
    calls, problem = [], None

    def run_full_load(spark, project, *args, **kwargs):
        calls.append((spark, project, args, kwargs))
        return SimpleNamespace(files=3, skipped=1, rows=42, quarantined=2, COLUMNS=("table", "rows", "quarantined"),
                               summary_rows=lambda: [["shop.customers", 2, "0"],
                                                     ["shop.orders", 40, "2 (missing_primary_key 2)"]],
                               rewritten_problem=lambda: problem, reload_lines=lambda: [])

    fake_glue.module("batch.full_load", run_full_load=run_full_load)
    from batch.glue_full_load import main

    main(["glue_full_load.py", "--JOB_NAME", "j"])

    _check_glue_setup(fake_glue, ["glue_full_load.py", "--JOB_NAME", "j"])
    assert calls == [(fake_glue.spark, fake_glue.project, (), {"progress": None})]  # the CLI's defaults
    out = capsys.readouterr().out
    assert "shop.customers | 2 | 0\nshop.orders | 40 | 2 (missing_primary_key 2)" in out
    assert "3 files applied, 1 already applied, 42 rows, 2 quarantined" in out
    # a table left unloaded (an applied file written again) fails the run, after the summary
    problem = "shop.customers: 1 applied file(s) written again since (...)"
    with pytest.raises(RuntimeError, match="written again"):
        main(["glue_full_load.py", "--JOB_NAME", "j"])
    assert "3 files applied" in capsys.readouterr().out
    # --reload: a DMS reload's tables, after DMS reported them complete
    problem, calls[:] = None, []
    main(["glue_full_load.py", "--JOB_NAME", "j", "--reload", "shop.customers,shop.orders"])
    assert calls[-1][3] == {"progress": None, "reload": ["shop.customers", "shop.orders"], "reload_as_of": None}
    # --as_of: when DMS began the reload (tables whose changes come through Kinesis)
    main(["glue_full_load.py", "--JOB_NAME", "j", "--reload", "shop.orders", "--as_of", "2026-12-06T10:15:00Z"])
    assert calls[-1][3]["reload_as_of"] == datetime(2026, 12, 6, 10, 15, tzinfo=UTC)
    with pytest.raises(ValueError, match="only with --reload"):
        main(["glue_full_load.py", "--JOB_NAME", "j", "--as_of", "2026-12-06 10:15:00"])
    with pytest.raises(ValueError, match="unknown table"):
        main(["glue_full_load.py", "--JOB_NAME", "j", "--reload", "shop.nope"])


def test_compaction_main_runs_the_cli_function(fake_glue):
    calls = []
    fake_glue.module("batch.cli", run_compaction=lambda *args: calls.append(args) or {})
    from batch.glue_compaction import main

    main(["glue_compaction.py"])
    _check_glue_setup(fake_glue, ["glue_compaction.py"])
    spark, project, tables, hours, allow_short, _metrics, _say = calls[0]
    # every table, the retention floor, never shorter
    assert (spark, project, tables, hours, allow_short) == (fake_glue.spark, fake_glue.project, None, 168, False)
    # the state machine's --tables: the configured ones among them
    main(["glue_compaction.py", "--tables", "shop.orders,shop.gone"])
    assert calls[1][2] == ["shop.orders"]


def test_warehouse_merge_main_runs_the_cli_function(fake_glue, capsys):
    calls = []
    run = SimpleNamespace(run_id="r1", report_path="s3://lake/_reports/dq/r1.json")

    def merge_from_lake(spark, project, url, **kwargs):
        calls.append((spark, project, url, kwargs))
        return run

    fake_glue.module("batch.warehouse_job", merge_from_lake=merge_from_lake,
                     summary_rows=lambda r: [["shop.customers", "staging_to_dimension", 5, "none", 0, "5 staged"]])
    from batch.glue_warehouse_merge import main

    main(["glue_warehouse_merge.py"])

    _check_glue_setup(fake_glue, ["glue_warehouse_merge.py"])
    assert calls == [(fake_glue.spark, fake_glue.project, fake_glue.project.pipeline.warehouse.url, {})]
    out = capsys.readouterr().out
    assert "data quality, run r1" in out and "shop.customers | staging_to_dimension | 5 | none | 0 | 5 staged" in out
    assert "report: s3://lake/_reports/dq/r1.json" in out


def test_warehouse_merge_takes_redshift_and_postgres_urls_and_refuses_others_without_showing_them():
    from batch.glue_warehouse_merge import warehouse_url

    secret_url = glue.redshift_url(REDSHIFT_SECRET)
    assert warehouse_url(load_project(CONFIGS, env={"CDCFLOW_WAREHOUSE_URL": secret_url})) == secret_url
    pg = "postgresql://u:p@h:5432/db"
    assert warehouse_url(load_project(CONFIGS, env={"CDCFLOW_WAREHOUSE_URL": pg})) == pg
    other = f"mysql://cdcflow:{PASSWORD}@h:3306/db"
    with pytest.raises(UserError, match="mysql://") as err:
        warehouse_url(load_project(CONFIGS, env={"CDCFLOW_WAREHOUSE_URL": other}))
    assert PASSWORD not in str(err.value)
