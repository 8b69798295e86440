"""The CDK stack in infra/ synthesizes, and its security properties hold (no AWS needed; jsii needs node)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from cdcflow.runtime import STREAMING_CONF

INFRA = Path(__file__).resolve().parent.parent / "infra"


@pytest.fixture(scope="module")
def template():
    os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "1")
    os.environ.setdefault("JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION", "1")
    sys.path.insert(0, str(INFRA))
    try:
        import aws_cdk as cdk
        from aws_cdk.assertions import Template
        from cdcflow_stack import CdcflowStack

        app = cdk.App()
        stack = CdcflowStack(app, "CdcflowTest", env=cdk.Environment(account="123456789012", region="us-east-1"))
        return Template.from_stack(stack)
    finally:
        sys.path.remove(str(INFRA))


def _resources(template, type_: str) -> dict[str, dict]:
    return template.find_resources(type_)


def _as_list(v):
    return v if isinstance(v, list) else [v]


def _iam_statements(template) -> list[dict]:
    out = []
    for r in _resources(template, "AWS::IAM::Policy").values():
        out += r["Properties"]["PolicyDocument"]["Statement"]
    for r in _resources(template, "AWS::IAM::ManagedPolicy").values():
        out += r["Properties"]["PolicyDocument"]["Statement"]
    for r in _resources(template, "AWS::IAM::Role").values():
        for p in r["Properties"].get("Policies", []):
            out += p["PolicyDocument"]["Statement"]
    return out


def _logical_id(template, type_: str) -> str:
    (lid,) = _resources(template, type_)
    return lid


def test_buckets_are_kms_encrypted_private_and_tls_only(template):
    buckets = _resources(template, "AWS::S3::Bucket")
    assert len(buckets) == 3
    key = _logical_id(template, "AWS::KMS::Key")
    for props in (b["Properties"] for b in buckets.values()):
        (rule,) = props["BucketEncryption"]["ServerSideEncryptionConfiguration"]
        sse = rule["ServerSideEncryptionByDefault"]
        assert sse["SSEAlgorithm"] == "aws:kms"
        assert sse["KMSMasterKeyID"] == {"Fn::GetAtt": [key, "Arn"]}
        assert props["PublicAccessBlockConfiguration"] == {
            "BlockPublicAcls": True, "BlockPublicPolicy": True, "IgnorePublicAcls": True, "RestrictPublicBuckets": True,
        }  # fmt: skip
    policies = {p["Properties"]["Bucket"]["Ref"]: p["Properties"]["PolicyDocument"]["Statement"]
                for p in _resources(template, "AWS::S3::BucketPolicy").values()}  # fmt: skip
    assert set(policies) == set(buckets)
    for statements in policies.values():
        assert any(
            s["Effect"] == "Deny" and s.get("Condition", {}).get("Bool", {}).get("aws:SecureTransport") == "false"
            for s in statements
        ), "every bucket denies requests without TLS"
        assert any(
            s["Effect"] == "Deny" and "aws:PrincipalAccount" in s.get("Condition", {}).get("StringNotEquals", {})
            for s in statements
        ), "every bucket refuses principals of other accounts"
        # s3:* appears only in Deny statements (enforce SSL)
        assert all(s["Effect"] == "Deny" for s in statements if "s3:*" in _as_list(s["Action"]))


def test_raw_bucket_archives_then_expires(template):
    rules = [r for b in _resources(template, "AWS::S3::Bucket").values()
             for r in b["Properties"].get("LifecycleConfiguration", {}).get("Rules", [])]  # fmt: skip
    (archive,) = [r for r in rules if r.get("Prefix") == "archive/"]
    assert archive["Transitions"] == [{"StorageClass": "GLACIER", "TransitionInDays": 30}]
    assert archive["ExpirationInDays"] == 90


def test_stream_is_kms_encrypted(template):
    (stream,) = _resources(template, "AWS::Kinesis::Stream").values()
    assert stream["Properties"]["StreamEncryption"]["EncryptionType"] == "KMS"
    assert stream["Properties"]["StreamModeDetails"] == {"StreamMode": "ON_DEMAND"}


def test_glue_jobs_run_glue_5_1_with_delta(template):
    jobs = {j["Properties"]["Name"]: j["Properties"] for j in _resources(template, "AWS::Glue::Job").values()}
    assert set(jobs) == {f"cdcflow-shop-{n}" for n in ("stream", "full-load", "warehouse-merge", "compaction")}
    for props in jobs.values():
        assert props["GlueVersion"] == "5.1"
        assert props["WorkerType"] == "G.1X"
        assert props["DefaultArguments"]["--datalake-formats"] == "delta"
        assert "--config" in props["DefaultArguments"]
    stream = jobs["cdcflow-shop-stream"]
    assert stream["Command"]["Name"] == "gluestreaming"
    assert stream["DefaultArguments"]["--enable-auto-scaling"] == "true"
    assert stream["DefaultArguments"]["--conf"] == " --conf ".join(f"{k}={v}" for k, v in STREAMING_CONF.items())
    roles = [p["Role"] for p in jobs.values()]
    assert len({str(r) for r in roles}) == len(roles), "one IAM role per job"
    triggers = [t["Properties"] for t in _resources(template, "AWS::Glue::Trigger").values()]
    assert {t["Actions"][0]["JobName"]["Ref"] for t in triggers if t["Type"] == "SCHEDULED"} == {
        lid for lid, j in _resources(template, "AWS::Glue::Job").items()
        if j["Properties"]["Name"].endswith(("warehouse-merge", "compaction"))
    }  # fmt: skip


def test_glue_job_scripts_are_the_entry_scripts_in_the_repo(template):
    """infra/README.md uploads each script under its own file name to s3://<artifacts>/scripts/."""
    scripts = {"stream": "streaming/glue_job.py", "full-load": "batch/glue_full_load.py",
               "warehouse-merge": "batch/glue_warehouse_merge.py", "compaction": "batch/glue_compaction.py"}  # fmt: skip
    jobs = {j["Properties"]["Name"]: j["Properties"] for j in _resources(template, "AWS::Glue::Job").values()}
    for job, path in scripts.items():
        location = jobs[f"cdcflow-shop-{job}"]["Command"]["ScriptLocation"]
        parts = location["Fn::Join"][1] if isinstance(location, dict) else [location]
        assert "".join(p for p in parts if isinstance(p, str)).endswith(f"/scripts/{Path(path).name}"), location
        assert (INFRA.parent / path).is_file(), path


def test_kinesis_permissions_name_only_the_stream(template):
    stream_arn = {"Fn::GetAtt": [_logical_id(template, "AWS::Kinesis::Stream"), "Arn"]}
    kinesis = [s for s in _iam_statements(template) if any(a.startswith("kinesis:") for a in _as_list(s["Action"]))]
    assert kinesis, "some role reads the stream"
    read = [s for s in kinesis if "kinesis:GetRecords" in _as_list(s["Action"])]
    assert len(read) == 1, "only the streaming job reads the stream"
    for s in kinesis:
        assert all(a.startswith("kinesis:") for a in _as_list(s["Action"]))
        assert _as_list(s["Resource"]) == [stream_arn]


def test_no_wildcard_iam_actions(template):
    for s in _iam_statements(template):
        actions = _as_list(s["Action"])
        assert "*" not in actions and "s3:*" not in actions, s
        assert not any(a.endswith(":*") for a in actions), s
        if s["Resource"] == "*":
            # only PutMetricData (no resource ARN exists), and only into the cdcflow namespace
            assert actions == ["cloudwatch:PutMetricData"], s
            assert s["Condition"] == {"StringEquals": {"cloudwatch:namespace": "cdcflow"}}


def test_secrets_are_read_only_by_the_jobs_that_need_them(template):
    secrets = _resources(template, "AWS::SecretsManager::Secret")
    readers: dict[str, set[str]] = {lid: set() for lid in secrets}
    for pol in _resources(template, "AWS::IAM::Policy").values():
        for s in pol["Properties"]["PolicyDocument"]["Statement"]:
            if "secretsmanager:GetSecretValue" in _as_list(s["Action"]):
                for r in _as_list(s["Resource"]):
                    readers[r["Ref"]].add(pol["Properties"]["Roles"][0]["Ref"])
    by_prefix = {lid.rstrip("0123456789ABCDEF"): {r.rstrip("0123456789ABCDEF") for r in rs} for lid, rs in readers.items()}
    assert by_prefix == {"PiiSalt": {"JobRoleStream", "JobRoleFullLoad"}, "RedshiftCredentials": {"JobRoleWarehouseMerge"}}


def test_alarms_on_the_pipeline_metrics(template):
    alarms = [a["Properties"] for a in _resources(template, "AWS::CloudWatch::Alarm").values()]

    def metric_text(a: dict) -> str:
        return a.get("MetricName", "") + " ".join(m.get("Expression", "") for m in a.get("Metrics", []))

    for name in ("TableIsolated", "SchemaChangeUnsafe", "RowsQuarantined", "MillisBehindLatest", "BatchDuration"):
        matching = [a for a in alarms if name in metric_text(a)]
        assert len(matching) == 1, name
        (a,) = matching
        assert a["AlarmActions"], f"{name} notifies the SNS topic"
        assert a.get("Namespace", "cdcflow") == "cdcflow"
        if name in ("TableIsolated", "SchemaChangeUnsafe"):
            assert a["Threshold"] == 1 and a["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
    template.resource_count_is("AWS::SNS::Topic", 1)


def _s3_object_resources(statement: dict) -> list[tuple[str, str]]:
    """(bucket logical id without its hash, object path pattern) of each resource of an S3 statement."""
    out = []
    for r in _as_list(statement["Resource"]):
        parts = r["Fn::Join"][1]
        bucket = next(x["Fn::GetAtt"][0] for x in parts if isinstance(x, dict) and "Fn::GetAtt" in x)
        out.append((bucket.rstrip("0123456789ABCDEF"), "".join(x for x in parts if isinstance(x, str))))
    return out


def _role_statements(template, role_prefix: str) -> list[dict]:
    pols = [p for p in _resources(template, "AWS::IAM::Policy").values()
            if p["Properties"]["Roles"][0]["Ref"].startswith(role_prefix)]  # fmt: skip
    assert len(pols) == 1, role_prefix
    return pols[0]["Properties"]["PolicyDocument"]["Statement"]


def test_warehouse_merge_writes_only_quarantine_reports_and_its_staging_files(template):
    writes = [s for s in _role_statements(template, "JobRoleWarehouseMerge") if "s3:PutObject" in _as_list(s["Action"])]
    written = sorted(r for s in writes for r in _s3_object_resources(s) if "/tmp/" not in r[1])
    assert written == [("ArtifactsBucket", "/warehouse-staging/*"), ("LakeBucket", "/lake/_reports/*"),
                       ("LakeBucket", "/lake/quarantine/*")], written  # fmt: skip
    job = next(j["Properties"] for j in _resources(template, "AWS::Glue::Job").values()
               if j["Properties"]["Name"].endswith("warehouse-merge"))  # fmt: skip
    modules = job["DefaultArguments"]["--additional-python-modules"]
    assert "redshift_connector" in modules and "psycopg[binary]" in modules
    env = json.dumps(job["DefaultArguments"]["--cdcflow-env"])
    assert "CDCFLOW_WAREHOUSE_S3_STAGING" in env and "CDCFLOW_WAREHOUSE_IAM_ROLE" in env


def test_redshift_copy_role_only_reads_the_staging_prefix(template):
    roles = {lid: r for lid, r in _resources(template, "AWS::IAM::Role").items() if lid.startswith("RedshiftCopyRole")}
    (role,) = roles.values()
    (principal,) = [s["Principal"]["Service"] for s in role["Properties"]["AssumeRolePolicyDocument"]["Statement"]]
    assert principal == "redshift.amazonaws.com"
    statements = _role_statements(template, "RedshiftCopyRole")
    actions = sorted(a for s in statements for a in _as_list(s["Action"]))
    assert actions == ["kms:Decrypt", "kms:DescribeKey", "s3:GetBucketLocation", "s3:GetObject", "s3:ListBucket"]
    reads = [s for s in statements if "s3:GetObject" in _as_list(s["Action"])]
    assert [r for s in reads for r in _s3_object_resources(s)] == [("ArtifactsBucket", "/warehouse-staging/*")]
    rules = next(b["Properties"]["LifecycleConfiguration"]["Rules"] for lid, b in
                 _resources(template, "AWS::S3::Bucket").items() if lid.startswith("ArtifactsBucket"))  # fmt: skip
    assert any(r.get("Prefix") == "warehouse-staging/" and r["ExpirationInDays"] == 1 for r in rules)
