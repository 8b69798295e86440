"""The KCL MultiLangDaemon for the archiver: its properties file, its Java command, `cdcflow archive`.

KCL 3.x (amazon-kclpy 3.1.3 bundles amazon-kinesis-client-multilang 3.1.3; its jars come from Maven
Central when `make` installs amazon-kclpy). Polling retrieval; leases and checkpoints in the DynamoDB
table named after the application (KCL 3 adds `<app>-CoordinatorState` and `<app>-WorkerMetricStats`).
Against an emulator the Java SDK's CBOR is switched off (`-Daws.cborEnabled=false`, SDK v2; plus
`-Dcom.amazonaws.sdk.disableCbor` and AWS_CBOR_DISABLE for v1 code paths): moto speaks JSON only.
CloudWatch metrics are off against an emulator (the daemon has no CloudWatch endpoint setting).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cdcflow.errors import UserError

DAEMON_CLASS = "software.amazon.kinesis.multilang.MultiLangDaemon"


@dataclass
class ArchiverSettings:
    stream: str
    application: str
    region: str
    endpoint: str | None
    archive_uri: str
    initial_position: str = "TRIM_HORIZON"
    idle_millis: int = 1000
    max_records: int = 10000
    failover_millis: int = 10000
    lease_assignment_millis: int = 2000
    shard_sync_millis: int = 60000
    worker_id: str | None = None
    kinesis_endpoint: str | None = None  # default: endpoint; the h2c proxy's URL in front of moto
    dynamodb_endpoint: str | None = None  # default: endpoint (LocalStack's DynamoDB needs Java 21: see README)


def kcl_jars() -> list[str]:
    try:
        from amazon_kclpy import kcl
    except ImportError:
        raise UserError("amazon-kclpy is not installed; run `make install`") from None
    jars = sorted((Path(kcl.__file__).parent / "jars").glob("*.jar"))
    if not any("amazon-kinesis-client-multilang" in j.name for j in jars):
        raise UserError("the KCL jars are missing from amazon_kclpy/jars; reinstall with `make install`")
    return [str(j) for j in jars]


def properties(s: ArchiverSettings, python: str = sys.executable) -> str:
    lines = {
        "executableName": f"{python} -m cdcflow.archive.processor",
        "streamName": s.stream,
        "applicationName": s.application,
        "AwsCredentialsProvider": "DefaultCredentialsProvider",
        "processingLanguage": "python/3.11",
        "initialPositionInStream": s.initial_position,
        "regionName": s.region,
        "retrievalMode": "POLLING",
        "idleTimeBetweenReadsInMillis": str(s.idle_millis),
        "maxRecords": str(s.max_records),
        "failoverTimeMillis": str(s.failover_millis),
        "leaseAssignmentIntervalMillis": str(s.lease_assignment_millis),
        "shardSyncIntervalMillis": str(s.shard_sync_millis),
        "parentShardPollIntervalMillis": "1000",
        "cleanupLeasesUponShardCompletion": "true",
        "callProcessRecordsEvenForEmptyRecordList": "false",
    }
    if s.worker_id:
        lines["workerId"] = s.worker_id
    if s.endpoint:
        lines["kinesisEndpoint"] = s.kinesis_endpoint or s.endpoint
        lines["dynamoDBEndpoint"] = s.dynamodb_endpoint or s.endpoint
        lines["metricsLevel"] = "NONE"
    return "".join(f"{k} = {v}\n" for k, v in lines.items())


def daemon_command(props_file: Path, java: str | None = None) -> list[str]:
    java = java or shutil.which("java") or "java"
    cp = os.pathsep.join([*kcl_jars(), str(props_file.parent)])
    return [java, "-Xmx512m", "-Daws.cborEnabled=false", "-Dcom.amazonaws.sdk.disableCbor=true",
            "-cp", cp, DAEMON_CLASS, "--properties-file", str(props_file)]


def daemon_env(s: ArchiverSettings, config_dir: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"CDCFLOW_CONFIG": str(Path(config_dir).resolve()), "CDCFLOW_ARCHIVE_URI": s.archive_uri,
                "AWS_REGION": s.region, "AWS_DEFAULT_REGION": s.region})
    if s.endpoint:
        env["AWS_CBOR_DISABLE"] = "true"
        env.setdefault("AWS_ACCESS_KEY_ID", "testing")
        env.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    # the processor must find the cdcflow package whatever the daemon's working directory
    from cdcflow.runtime import REPO_ROOT

    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO_ROOT), env.get("PYTHONPATH", "")] if p)
    return env


def start_daemon(s: ArchiverSettings, config_dir: str, workdir: Path, log_path: Path | None = None) -> subprocess.Popen:
    """Start the MultiLangDaemon in its own session (so it and its processors stop together)."""
    workdir = workdir.resolve()  # the daemon runs in it: a relative properties path would miss
    workdir.mkdir(parents=True, exist_ok=True)
    props = workdir / "archiver.properties"
    props.write_text(properties(s))
    out = open(log_path, "ab") if log_path else None  # noqa: SIM115 - owned by the child
    return subprocess.Popen(daemon_command(props), env=daemon_env(s, config_dir), cwd=workdir,
                            stdout=out, stderr=subprocess.STDOUT if out else None, start_new_session=True)


def settings_for(project, archive_uri: str | None = None, application: str | None = None, **kw) -> ArchiverSettings:
    from cdcflow.archive.records import default_archive_uri

    return ArchiverSettings(
        stream=project.pipeline.kinesis.stream,
        application=application or f"{project.pipeline.name}-archiver",
        region=project.pipeline.aws.region,
        endpoint=project.pipeline.aws.endpoint_url,
        archive_uri=archive_uri or default_archive_uri(project),
        initial_position=("LATEST" if project.pipeline.kinesis.starting_position == "latest" else "TRIM_HORIZON"),
        **kw,
    )


# ---------------------------------------------------------------- `cdcflow archive`


def register_archive(sub, commands: dict[str, Callable]) -> None:
    p = sub.add_parser("archive", help="run the raw archiver: a KCL consumer writing every Kinesis record "
                                       "(PII masked) to S3 as gzip JSON lines; runs until stopped")
    p.add_argument("--to", metavar="S3_URI", help="archive root (default $CDCFLOW_ARCHIVE_URI, else "
                                                  "s3://<raw bucket>/kinesis-archive)")
    p.add_argument("--application", help="KCL application name = lease table (default <pipeline>-archiver)")
    p.add_argument("--workdir", default=".cdcflow/archiver", help="where the daemon's properties file goes")
    p.add_argument("--dynamodb-endpoint", help="the lease table's endpoint when it differs from the configured one")
    p.add_argument("--h2c-proxy", action="store_true",
                   help="put an HTTP/2 (h2c) front between the KCL's Kinesis client and the endpoint: needed for "
                        "the embedded moto server, not for LocalStack or AWS")
    p.add_argument("--print-command", action="store_true", help="print the daemon command and exit")
    commands["archive"] = run_archive_command


def run_archive_command(args: argparse.Namespace) -> int:
    from cdcflow.cli import console
    from cdcflow.config import load_project

    project = load_project(args.config)
    s = settings_for(project, args.to, args.application)
    s.dynamodb_endpoint = args.dynamodb_endpoint
    if not s.archive_uri.startswith("s3://"):
        raise UserError(f"the archive root must be an s3:// URI, got {s.archive_uri}")
    workdir = Path(args.workdir).resolve()
    if args.print_command:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "archiver.properties").write_text(properties(s))
        print(" ".join(daemon_command(workdir / "archiver.properties")))
        return 0
    from cdcflow.aws import require_stream

    require_stream(project)  # the KCL would retry a missing stream or stack forever, quietly
    proxy = None
    if args.h2c_proxy:
        if not s.endpoint:
            raise UserError("--h2c-proxy needs an emulator endpoint (CDCFLOW_AWS_ENDPOINT)")
        proxy, s.kinesis_endpoint = start_h2c_proxy(s.endpoint)
    console.print(f"archiving Kinesis {s.stream} -> {s.archive_uri}/{s.stream}/ (KCL application {s.application})")
    proc = start_daemon(s, args.config, workdir)

    stopping = []

    def stop(signum, _frame):
        stopping.append(signum)
        os.killpg(proc.pid, signal.SIGTERM)  # the daemon shuts its record processors down

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        code = proc.wait()
        return 0 if stopping else code  # stopped on request: the JVM's 143 is not a failure
    finally:
        if proxy:
            os.killpg(proxy.pid, signal.SIGTERM)


def start_h2c_proxy(upstream: str, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """Start cdcflow.archive.h2c_proxy in front of `upstream`; returns the process and its URL."""
    import socket
    import time

    if port is None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "cdcflow.archive.h2c_proxy", "--port", str(port),
                             "--upstream", upstream], start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    deadline = time.time() + 20
    while time.time() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.3)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}"
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    proc.kill()
    raise UserError(f"the h2c proxy did not start on port {port}")
