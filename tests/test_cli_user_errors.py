"""Bad input a new user tries first gets one line naming what is wrong, no traceback (no Spark started)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cdcflow.cli", *args], capture_output=True, text=True, cwd=REPO)


def one_line(r: subprocess.CompletedProcess) -> str:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    return lines[0]


def test_full_load_from_a_missing_raw_path_fails_naming_it():
    assert "raw path /does/not/exist does not exist" in one_line(run_cli("full-load", "--raw", "/does/not/exist"))


def test_full_load_as_of_is_a_past_time_with_reload():
    assert "--as-of: only with --reload TABLE" in one_line(run_cli("full-load", "--as-of", "2026-12-06T10:15:00Z"))
    bad = one_line(run_cli("full-load", "--reload", "shop.orders", "--as-of", "yesterday"))
    assert "--as-of 'yesterday': not an ISO 8601 time" in bad
    future = one_line(run_cli("full-load", "--reload", "shop.orders", "--as-of", "2999-01-01 00:00:00"))
    assert "--as-of 2999-01-01 00:00:00: after now" in future


def test_warehouse_merge_of_a_missing_or_broken_staging_file(tmp_path):
    missing = one_line(run_cli("warehouse-merge", "--staging", "missing.parquet", "--table", "shop.customers"))
    assert "--staging missing.parquet: no such file or folder" in missing
    (tmp_path / "bad.parquet").write_text("not parquet")
    broken = one_line(run_cli("warehouse-merge", "--staging", str(tmp_path / "bad.parquet"), "--table",
                              "shop.customers"))
    assert "not readable as Parquet" in broken


def test_quarantine_per_rule_in_command_summaries():
    from cdcflow.cdc.quarantine import by_rule

    assert by_rule({}) == "0"
    assert by_rule({"no_ordering": 2, "missing_primary_key": 5}) == "7 (missing_primary_key 5, no_ordering 2)"


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_stack_that_is_not_running_is_one_line_before_spark_starts(tmp_path):
    """The first thing a new user gets wrong: a job started before `cdcflow local up`. Each command
    names the endpoint it couldn't reach, never the warehouse password, and starts no Spark (Spark's
    start-up lines would be more lines on stderr)."""
    import os

    port = _closed_port()
    env = {**os.environ, "CDCFLOW_AWS_ENDPOINT": f"http://127.0.0.1:{port}",
           "CDCFLOW_WAREHOUSE_URL": f"postgresql://cdcflow:s3cret@127.0.0.1:{port}/cdcflow",
           "CDCFLOW_LAKE_ROOT": str(tmp_path / "lake"), "CDCFLOW_CHECKPOINT_ROOT": str(tmp_path / "ck")}
    env.pop("CDCFLOW_RAW_URI", None)  # the sample's s3:// raw prefix

    def run(*args: str) -> str:
        return one_line(subprocess.run([sys.executable, "-m", "cdcflow.cli", *args], capture_output=True,
                                       text=True, cwd=REPO, env=env))

    aws = f"cannot reach the AWS endpoint http://127.0.0.1:{port} (aws.endpoint_url); is the local stack running?"
    assert aws in run("stream", "--until-caught-up")
    assert aws in run("full-load")
    assert aws in run("archive", "--workdir", str(tmp_path / "archiver"))
    warehouse = run("warehouse-merge")
    assert f"port {port} failed" in warehouse and "`cdcflow local up`" in warehouse and "s3cret" not in warehouse


def test_a_kinesis_stream_bucket_or_lake_that_does_not_exist_is_one_line(stack, tmp_path):
    import os

    env = {**os.environ, "CDCFLOW_AWS_ENDPOINT": stack.aws_endpoint, "CDCFLOW_STREAM": "no-such-stream",
           "CDCFLOW_CHECKPOINT_ROOT": str(tmp_path / "ck"), "CDCFLOW_LAKE_ROOT": str(tmp_path / "lake")}
    r = subprocess.run([sys.executable, "-m", "cdcflow.cli", "stream"], capture_output=True, text=True, cwd=REPO,
                       env=env)
    assert "Kinesis stream no-such-stream not found at" in one_line(r)
    r = subprocess.run([sys.executable, "-m", "cdcflow.cli", "stream", "--replay", "s3://no-such-bucket/x"],
                       capture_output=True, text=True, cwd=REPO, env=env)
    assert one_line(r).startswith("error AWS ListObjectsV2: NoSuchBucket:")
    for command in (["status"], ["compact"], ["verify", "--history", str(tmp_path)]):
        (tmp_path / "history.jsonl").write_text("")
        r = subprocess.run([sys.executable, "-m", "cdcflow.cli", *command], capture_output=True, text=True,
                           cwd=REPO, env={**env, "CDCFLOW_LAKE_ROOT": "s3://no-such-lake/lake"})
        assert "lake.root s3://no-such-lake/lake: bucket no-such-lake does not exist" in one_line(r), command


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "sim"
    assert one_line(run_cli("simulate", "--out", str(out))) == f"error Not a directory: {out}"


def test_version():
    from importlib.metadata import version

    r = subprocess.run([sys.executable, "-m", "cdcflow.cli", "--version"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == f"cdcflow {version('cdcflow')}"


def test_brackets_in_an_error_are_printed_as_they_are():
    """The console reads `[word]` as style markup: a path or value in brackets vanished from the line."""
    assert "raw path /does/[not]/exist does not exist" in one_line(run_cli("full-load", "--raw", "/does/[not]/exist"))


@pytest.mark.spark
def test_spark_lines_go_to_a_log_file_by_default(tmp_path):
    """A command that starts Spark (validate runs the transforms on a sample frame) prints cdcflow's
    lines only; Spark's and the JVM's go to .cdcflow/logs/spark.log under the working directory."""
    import os

    env = {**os.environ, "CDCFLOW_CONFIG": str(REPO / "configs")}
    env.pop("CDCFLOW_SPARK_LOG", None)
    r = subprocess.run([sys.executable, "-m", "cdcflow.cli", "validate"], capture_output=True, text=True,
                       cwd=tmp_path, env=env)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr[-2000:]
    assert "sample frame" in r.stdout  # the transforms ran in Spark
    assert (tmp_path / ".cdcflow" / "logs" / "spark.log").stat().st_size > 0


def test_as_of_dms_is_when_the_s3_task_began_its_finished_load(stack, tmp_path, monkeypatch):
    """`--as-of dms` asks DMS when the stack's S3 task began its last full load: refused while the load
    runs, its start once it has finished (a task on the moto server); DMS Serverless's replication
    (moto has none: botocore's Stubber with the API's response shape) the same way."""
    from datetime import UTC, datetime

    from botocore.stub import Stubber

    from cdcflow import aws
    from cdcflow.errors import UserError
    from tests.streaming_helpers import project_in

    project = project_in(tmp_path, CDCFLOW_AWS_ENDPOINT=stack.aws_endpoint)
    dms = aws.project_client(project, "dms")
    task = dms.create_replication_task(
        ReplicationTaskIdentifier=aws.dms_task_id(project.pipeline.name, "s3"), MigrationType="full-load",
        SourceEndpointArn="arn:aws:dms:us-east-1:123456789012:endpoint:src",
        TargetEndpointArn="arn:aws:dms:us-east-1:123456789012:endpoint:s3",
        ReplicationInstanceArn="arn:aws:dms:us-east-1:123456789012:rep:i", TableMappings='{"rules": []}',
    )["ReplicationTask"]["ReplicationTaskArn"]
    with pytest.raises(UserError, match="has not run a full load"):
        aws.dms_full_load_start(project)
    before = datetime.now(UTC).replace(microsecond=0)
    dms.start_replication_task(ReplicationTaskArn=task, StartReplicationTaskType="reload-target")
    with pytest.raises(UserError, match="full load that began .* has not finished"):
        aws.dms_full_load_start(project)
    dms.stop_replication_task(ReplicationTaskArn=task)
    began = aws.dms_full_load_start(project)
    assert before <= began <= datetime.now(UTC) and began.tzinfo

    serverless = aws.project_client(project, "dms")
    with Stubber(serverless) as stub:
        name = aws.dms_task_id(project.pipeline.name, "s3")
        start, end = datetime(2026, 12, 6, 10, 15, tzinfo=UTC), datetime(2026, 12, 6, 11, 0, tzinfo=UTC)
        stats = {"FullLoadStartDate": start, "FullLoadFinishDate": end, "TablesErrored": 0}
        for replications in ([{"ReplicationConfigIdentifier": name, "ReplicationStats": stats}],
                             [{"ReplicationConfigIdentifier": name, "ReplicationStats": {**stats, "TablesErrored": 1}}],
                             []):
            stub.add_client_error("describe_replication_tasks", "ResourceNotFoundFault")
            stub.add_response("describe_replications", {"Replications": replications},
                              {"Filters": [{"Name": "replication-config-id", "Values": [name]}]})
        monkeypatch.setattr(aws, "project_client", lambda *a, **k: serverless)
        assert aws.dms_full_load_start(project) == start
        with pytest.raises(UserError, match="1 table\\(s\\) in error"):  # its snapshot may be partial
            aws.dms_full_load_start(project)
        with pytest.raises(UserError, match=f"no DMS task or replication {name}"):
            aws.dms_full_load_start(project)
