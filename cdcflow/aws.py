"""boto3 clients for AWS or an emulator (moto, LocalStack), and creation of the resources the pipeline uses."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from urllib.parse import urlparse

import boto3
from botocore.config import Config

from cdcflow.config import Project
from cdcflow.errors import UserError

_RETRY = Config(retries={"max_attempts": 8, "mode": "adaptive"}, connect_timeout=5, read_timeout=30)
# A command's check before it starts a job (is the stream / bucket there?): a stopped stack answers in
# a second instead of after eight backed-off attempts.
_CHECK = Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=5, read_timeout=30)


def client(service: str, endpoint_url: str | None, region: str, config: Config = _RETRY):
    if endpoint_url:
        # Emulators accept any credentials; don't let a missing profile stop a local run.
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    return boto3.client(service, endpoint_url=endpoint_url, region_name=region, config=config)


def project_client(project: Project, service: str, check: bool = False):
    """A client for the project's endpoint and region; `check`: few retries, for a check before a job."""
    return client(service, project.pipeline.aws.endpoint_url, project.pipeline.aws.region,
                  _CHECK if check else _RETRY)


def split_s3(uri: str) -> tuple[str, str]:
    p = urlparse(uri)
    if p.scheme not in ("s3", "s3a"):
        raise UserError(f"not an s3:// URI: {uri}")
    return p.netloc, p.path.lstrip("/")


def require_bucket(project: Project, uri: str, key: str) -> None:
    """Fail with one line when the bucket of an s3:// location the config names (`key`, e.g. lake.root)
    doesn't exist or can't be used; a local path passes."""
    if not uri.startswith(("s3://", "s3a://")):
        return
    from botocore.exceptions import ClientError

    bucket, _ = split_s3(uri)
    try:
        project_client(project, "s3", check=True).head_bucket(Bucket=bucket)
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        why = "does not exist" if code in ("404", "NoSuchBucket") else f"is not usable ({code or e})"
        raise UserError(f"{key} {uri}: bucket {bucket} {why}; `cdcflow local up` creates the buckets the "
                        "config names on the embedded stack, infra/ on AWS") from None


def require_lake(project: Project) -> None:
    """The lake's and the checkpoints' buckets, before a command starts Spark or reads a Delta log."""
    require_bucket(project, project.pipeline.lake.root, "lake.root")
    require_bucket(project, project.pipeline.checkpoints.root, "checkpoints.root")


def require_stream(project: Project) -> None:
    """Fail with one line when the configured Kinesis stream isn't there (before a job starts Spark:
    otherwise the first micro-batch fails inside Spark with the query plan printed)."""
    k = project.pipeline.kinesis
    kinesis = project_client(project, "kinesis", check=True)
    try:
        kinesis.describe_stream_summary(StreamName=k.stream)
    except kinesis.exceptions.ResourceNotFoundException:
        where = project.pipeline.aws.endpoint_url or f"AWS {project.pipeline.aws.region}"
        raise UserError(f"Kinesis stream {k.stream} not found at {where} (kinesis.stream): `cdcflow local up` "
                        "creates it on the embedded stack, infra/ on AWS") from None


def ensure_stream(kinesis, name: str, shards: int) -> None:
    try:
        kinesis.create_stream(StreamName=name, ShardCount=shards)
    except kinesis.exceptions.ResourceInUseException:
        return
    for _ in range(100):
        if kinesis.describe_stream_summary(StreamName=name)["StreamDescriptionSummary"]["StreamStatus"] == "ACTIVE":
            return
        time.sleep(0.1)


def ensure_bucket(s3, bucket: str) -> None:
    try:
        s3.create_bucket(Bucket=bucket)
    except (s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
        pass


def bootstrap(project: Project) -> list[str]:
    """Create the Kinesis stream and the S3 buckets named in the config (idempotent); return what exists."""
    p = project.pipeline
    created = []
    ensure_stream(project_client(project, "kinesis"), p.kinesis.stream, p.kinesis.shards)
    created.append(f"kinesis:{p.kinesis.stream}")
    s3 = project_client(project, "s3")
    for uri in (p.dms.raw_uri, p.lake.root, p.checkpoints.root):
        if uri.startswith(("s3://", "s3a://")):
            bucket, _ = split_s3(uri)
            ensure_bucket(s3, bucket)
            created.append(f"s3:{bucket}")
    return created


def dms_task_id(pipeline: str, target: str) -> str:
    """The identifier the stack gives a DMS task (or DMS Serverless replication config): `<pipeline>-<target>`,
    target `kinesis` or `s3`."""
    return f"{pipeline}-{target}"


def dms_full_load_start(project: Project, target: str = "s3") -> datetime:
    """When the stack's DMS `target` task (or replication config) began its last full load, which must
    be finished: the `--as-of dms` of a reload (`cdcflow full-load --reload`). One line if it isn't."""
    from botocore.exceptions import ClientError

    ident = dms_task_id(project.pipeline.name, target)
    dms = project_client(project, "dms", check=True)

    def described(call, key: str, filter_name: str) -> list:
        try:
            return call(Filters=[{"Name": filter_name, "Values": [ident]}])[key]
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") == "ResourceNotFoundFault":  # DMS: nothing matched
                return []
            raise

    tasks = described(dms.describe_replication_tasks, "ReplicationTasks", "replication-task-id")
    if tasks:
        stats = tasks[0].get("ReplicationTaskStats") or {}
    else:  # DMS Serverless (the stack's -c dms_serverless=1)
        found = described(dms.describe_replications, "Replications", "replication-config-id")
        if not found:
            raise UserError(f"--as-of dms: no DMS task or replication {ident}; give the reload's start time instead")
        stats = found[0].get("ReplicationStats") or {}
    began, ended = stats.get("FullLoadStartDate"), stats.get("FullLoadFinishDate")
    if began is None:
        raise UserError(f"--as-of dms: DMS {ident} has not run a full load")
    if ended is None or ended < began:
        raise UserError(f"--as-of dms: DMS {ident}'s full load that began {began.isoformat()} has not finished; "
                        "run the reload once DMS reports it complete")
    if stats.get("TablesErrored"):  # a table's snapshot may be partial: its absent keys would be deleted
        raise UserError(f"--as-of dms: DMS {ident}'s full load that began {began.isoformat()} has "
                        f"{stats['TablesErrored']} table(s) in error; reload them again, or give the time by hand "
                        "for tables whose load completed")
    return began if began.tzinfo else began.replace(tzinfo=UTC)
