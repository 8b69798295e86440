"""The CDK stack in infra/ synthesizes, and its security properties hold (no AWS needed; jsii needs node)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from cdcflow.runtime import STREAMING_CONF

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"


ACCOUNT = "123456789012"


def _import_infra():
    os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "1")
    os.environ.setdefault("JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION", "1")
    if str(INFRA) not in sys.path:
        sys.path.insert(0, str(INFRA))


@pytest.fixture(scope="module")
def template():
    """The stack synthesized once for the whole module (synthesis is most of this file's time)."""
    _import_infra()
    import aws_cdk as cdk
    from aws_cdk.assertions import Template
    from cdcflow_stack import CdcflowStack

    app = cdk.App()
    stack = CdcflowStack(app, "CdcflowTest", env=cdk.Environment(account=ACCOUNT, region="us-east-1"))
    return Template.from_stack(stack)


@pytest.fixture(scope="module")
def variant(template):
    """DMS Serverless, an existing Redshift cluster, subnets and security groups from context (after
    `template`: a second synthesis in the same process takes a few seconds)."""
    import aws_cdk as cdk
    from aws_cdk.assertions import Template
    from cdcflow_stack import CdcflowSettings, CdcflowStack

    settings = CdcflowSettings(dms_serverless=1, redshift_cluster_id="warehouse", subnet_ids=f"{SUBNETS[0]},{SUBNETS[1]}",
                               security_group_ids=SECURITY_GROUP, vpc_id=VPC, glue_availability_zone="us-east-1a",
                               redshift_security_group_id=CLUSTER_SECURITY_GROUP,
                               s3_cdc_max_batch_interval_seconds=120, s3_cdc_min_file_size_kb=32_768)  # fmt: skip
    stack = CdcflowStack(cdk.App(), "CdcflowVariant", settings=settings,
                         env=cdk.Environment(account=ACCOUNT, region="us-east-1"))  # fmt: skip
    return Template.from_stack(stack)


SUBNETS = ("subnet-0123456789abcdef0", "subnet-0123456789abcdef1")
SECURITY_GROUP = "sg-0123456789abcdef0"
CLUSTER_SECURITY_GROUP = "sg-0fedcba9876543210"
VPC = "vpc-0123456789abcdef0"


@pytest.fixture(scope="module")
def template_file(template, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfn") / "cdcflow.template.json"
    path.write_text(json.dumps(template.to_json(), indent=1))
    return path


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
    logstore = [f"spark.delta.logStore.{s}.impl=cdcflow.delta.S3ConditionalLogStore" for s in ("s3", "s3a")]
    assert stream["DefaultArguments"]["--conf"] == " --conf ".join(
        [*logstore, *(f"{k}={v}" for k, v in STREAMING_CONF.items())])
    # Every job (each writes Delta tables on S3) commits through the conditional-PUT log store, its jar
    # from the artifacts bucket's dist/ (uploaded by the dist deployment).
    for props in jobs.values():
        assert props["DefaultArguments"]["--conf"].split(" --conf ")[:2] == logstore
        jar = props["DefaultArguments"]["--extra-jars"]
        assert jar["Fn::Join"][1][-1].endswith("/dist/cdcflow-logstore.jar"), jar
    roles = [p["Role"] for p in jobs.values()]
    assert len({str(r) for r in roles}) == len(roles), "one IAM role per job"
    template.resource_count_is("AWS::Glue::Trigger", 0)  # Step Functions + EventBridge schedule them now
    (security,) = _resources(template, "AWS::Glue::SecurityConfiguration")
    assert all(p["SecurityConfiguration"] == {"Ref": security} for p in jobs.values())


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
    assert len(read) == 2, "only the streaming job and the raw archiver read the stream"
    for s in kinesis:
        assert all(a.startswith("kinesis:") for a in _as_list(s["Action"]))
        assert _as_list(s["Resource"]) == [stream_arn]


LOG_DELIVERY_ACTIONS = {f"logs:{a}" for a in ("CreateLogDelivery", "GetLogDelivery", "UpdateLogDelivery",
                                               "DeleteLogDelivery", "ListLogDeliveries", "PutResourcePolicy",
                                               "DescribeResourcePolicies", "DescribeLogGroups")}


def test_no_wildcard_iam_actions(template):
    for s in _iam_statements(template):
        actions = _as_list(s["Action"])
        assert "*" not in actions and "s3:*" not in actions, s
        assert not any(a.endswith(":*") for a in actions), s
        if s["Resource"] == "*":
            # only actions that have no resource ARN: PutMetricData (into the cdcflow namespace only) and the
            # state machine's log delivery setup
            if actions == ["cloudwatch:PutMetricData"]:
                # cdcflow's metrics; the archiver's KCL metrics (namespace = its application name)
                assert s["Condition"] in ({"StringEquals": {"cloudwatch:namespace": "cdcflow"}},
                                          {"StringEquals": {"cloudwatch:namespace": "cdcflow-shop-archiver"}})
            elif _as_list(s["Action"]) == ["ecr:GetAuthorizationToken"]:
                pass  # the archiver image pull; this action has no resource ARN
            elif s.get("Sid") == "GlueVpcDescribe":  # the merge's VPC connection: EC2 Describe* calls
                assert all(a.startswith("ec2:Describe") for a in actions), s
            elif s.get("Sid") == "DescribeDmsLoads":  # the full load's `--as_of dms`: read-only DMS Describe calls
                assert set(actions) == {"dms:DescribeReplicationTasks", "dms:DescribeReplications"}
            elif s.get("Sid") == "StatementResults":  # the Redshift user custom resource awaits its statements
                assert set(actions) == {"redshift-data:DescribeStatement", "redshift-data:GetStatementResult"}
            else:
                assert set(actions) <= LOG_DELIVERY_ACTIONS, s


def test_secrets_are_read_only_by_the_jobs_that_need_them(template):
    secrets = _resources(template, "AWS::SecretsManager::Secret")
    readers: dict[str, set[str]] = {lid: set() for lid in secrets}
    for pol in _resources(template, "AWS::IAM::Policy").values():
        for s in pol["Properties"]["PolicyDocument"]["Statement"]:
            if "secretsmanager:GetSecretValue" in _as_list(s["Action"]):
                for r in _as_list(s["Resource"]):
                    readers[r["Ref"]].add(pol["Properties"]["Roles"][0]["Ref"])
    by_prefix = {lid.rstrip("0123456789ABCDEF"): {r.rstrip("0123456789ABCDEF") for r in rs} for lid, rs in readers.items()}
    assert by_prefix == {
        "PiiSalt": {"JobRoleStream", "JobRoleFullLoad", "ArchiverTaskExecutionRole"},  # ECS injects it
        # the ETL user's credentials: the merge, and the custom resource that sets that password in Redshift
        "RedshiftCredentials": {"JobRoleWarehouseMerge", "RedshiftUserHandlerRole"},
        "RedshiftAdmin": {"RedshiftUserHandlerRole"},  # only the custom resource (schema, ETL user, grants)
        "SourceDbCredentials": {"DmsSecretsRole"},
    }


def test_alarms_on_the_pipeline_metrics(template):
    alarms = [a["Properties"] for a in _resources(template, "AWS::CloudWatch::Alarm").values()]

    def metric_text(a: dict) -> str:
        return a.get("MetricName", "") + " ".join(m.get("Expression", "") for m in a.get("Metrics", []))

    for name in ("TableIsolated", "SchemaChangeUnsafe", "DataQualityFailed", "LoadAfterChanges", "RowsQuarantined",
                 "MillisBehindLatest", "BatchDuration"):
        matching = [a for a in alarms if name in metric_text(a) and a.get("Statistic") != "SampleCount"]
        assert len(matching) == 1, name
        (a,) = matching
        assert a["AlarmActions"], f"{name} notifies the SNS topic"
        assert a.get("Namespace", "cdcflow") == "cdcflow"
        if name in ("TableIsolated", "SchemaChangeUnsafe", "DataQualityFailed", "LoadAfterChanges"):
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


# ---------------------------------------------------------------- DMS


def _endpoint(template, engine: str) -> dict:
    (ep,) = [e["Properties"] for e in _resources(template, "AWS::DMS::Endpoint").values() if e["Properties"]["EngineName"] == engine]
    return ep


def _dms_tasks(template) -> dict[str, dict]:
    """Replication tasks by target engine, with TableMappings / ReplicationTaskSettings parsed."""
    endpoints = {lid: e["Properties"]["EngineName"] for lid, e in _resources(template, "AWS::DMS::Endpoint").items()}
    out = {}
    for t in _resources(template, "AWS::DMS::ReplicationTask").values():
        p = dict(t["Properties"])
        p["TableMappings"] = json.loads(p["TableMappings"])
        p["ReplicationTaskSettings"] = json.loads(p["ReplicationTaskSettings"])
        out[endpoints[p["TargetEndpointArn"]["Ref"]]] = p
    return out


def test_dms_kinesis_target_settings(template):
    ep = _endpoint(template, "kinesis")
    assert ep["EndpointType"] == "target"
    assert ep["KinesisSettings"] | {"ServiceAccessRoleArn": None, "StreamArn": None} == {
        "MessageFormat": "json", "IncludeTransactionDetails": True, "IncludeControlDetails": True,
        "IncludeTableAlterOperations": True, "IncludePartitionValue": True, "PartitionIncludeSchemaTable": True,
        "IncludeNullAndEmpty": True, "ServiceAccessRoleArn": None, "StreamArn": None,
    }  # fmt: skip
    assert ep["KinesisSettings"]["StreamArn"] == {"Fn::GetAtt": [_logical_id(template, "AWS::Kinesis::Stream"), "Arn"]}
    assert ep["KinesisSettings"]["ServiceAccessRoleArn"]["Fn::GetAtt"][0].startswith("DmsTargetRole")


def test_dms_s3_target_settings_match_what_the_full_load_reads(template):
    import inspect

    from batch.full_load import run_full_load

    s3 = _endpoint(template, "s3")["S3Settings"]
    key = _logical_id(template, "AWS::KMS::Key")
    assert s3["BucketName"]["Ref"].startswith("RawBucket")
    assert s3["BucketFolder"] == "dms"  # CDCFLOW_RAW_URI = s3://<raw>/dms
    assert s3["DataFormat"] == "parquet" and s3["IncludeOpForFullLoad"] is True
    assert s3["TimestampColumnName"] == inspect.signature(run_full_load).parameters["ts_column"].default
    assert (s3["CdcMaxBatchInterval"], s3["CdcMinFileSize"], s3["MaxFileSize"]) == (60, 10240, 131072)
    assert s3["ExpectedBucketOwner"] == ACCOUNT
    assert s3["EncryptionMode"] == "SSE_KMS" and s3["ServerSideEncryptionKmsKeyId"] == {"Fn::GetAtt": [key, "Arn"]}
    env = json.dumps(next(j["Properties"]["DefaultArguments"]["--cdcflow-env"]
                          for j in _resources(template, "AWS::Glue::Job").values()))  # fmt: skip
    assert '/dms\\"' in env or "/dms" in env  # the jobs read the same prefix


def test_dms_source_is_postgres_with_credentials_from_secrets_manager(template):
    src = _endpoint(template, "postgres")
    assert src["EndpointType"] == "source" and src["SslMode"] == "require"
    pg = src["PostgreSqlSettings"]
    assert pg["SecretsManagerSecretId"]["Ref"].startswith("SourceDbCredentials")
    role = pg["SecretsManagerAccessRoleArn"]["Fn::GetAtt"][0]
    trust = _resources(template, "AWS::IAM::Role")[role]["Properties"]["AssumeRolePolicyDocument"]["Statement"][0]
    assert trust["Principal"]["Service"] == "dms.us-east-1.amazonaws.com"
    (inst,) = [i["Properties"] for i in _resources(template, "AWS::DMS::ReplicationInstance").values()]
    assert inst["PubliclyAccessible"] is False and inst["KmsKeyId"]
    (group,) = [g["Properties"] for g in _resources(template, "AWS::DMS::ReplicationSubnetGroup").values()]
    assert group["SubnetIds"] == {"Ref": "SubnetIds"}  # no subnets in context: a stack parameter
    assert inst["VpcSecurityGroupIds"] == {"Ref": "SecurityGroupIds"}


def test_dms_tasks_per_target_with_mappings_and_settings_from_configs(template):
    sys.path.insert(0, str(INFRA)) if str(INFRA) not in sys.path else None
    from dms_tasks import table_mappings

    from batch.full_load import CHANGE_SEQ
    from cdcflow.config import load_project

    project = load_project(REPO / "configs", env={})
    tasks = _dms_tasks(template)
    assert set(tasks) == {"kinesis", "s3"}
    # each change through one task: CDC to Kinesis (the stream), snapshots to S3 (the full-load job)
    assert {t: task["MigrationType"] for t, task in tasks.items()} == {"kinesis": "cdc", "s3": "full-load"}
    for target, task in tasks.items():
        assert task["TableMappings"] == table_mappings(project, target)
        selected = {(r["object-locator"]["schema-name"], r["object-locator"]["table-name"])
                    for r in task["TableMappings"]["rules"] if r["rule-type"] == "selection"}  # fmt: skip
        assert selected == {(t.schema, t.table) for t in project.tables.values()}
        settings = task["ReplicationTaskSettings"]
        assert settings["Logging"]["EnableLogging"] is True
        assert settings["ControlTablesSettings"]["StatusTableEnabled"] is True
        assert settings["ControlTablesSettings"]["HistoryTableEnabled"] is True
    before = tasks["kinesis"]["ReplicationTaskSettings"]["BeforeImageSettings"]
    assert before == {"EnableBeforeImage": True, "FieldName": project.pipeline.dms.before_image_field,
                      "ColumnFilter": "pk-only"}  # fmt: skip
    assert "BeforeImageSettings" not in tasks["s3"]["ReplicationTaskSettings"]
    adds = [r for r in tasks["s3"]["TableMappings"]["rules"] if r["rule-type"] == "transformation"]
    assert len(adds) == len(project.tables)
    assert all(r["rule-action"] == "add-column" and r["value"] == CHANGE_SEQ and r["expression"] == "$AR_H_CHANGE_SEQ"
               for r in adds)  # fmt: skip
    assert not [r for r in tasks["kinesis"]["TableMappings"]["rules"] if r["rule-type"] == "transformation"]


def test_adding_a_table_file_changes_the_mappings(tmp_path):
    _import_infra()
    import shutil

    from dms_tasks import table_mappings

    from cdcflow.config import load_project

    shutil.copytree(REPO / "configs", tmp_path / "configs")
    before = {t: table_mappings(load_project(tmp_path / "configs", env={}), t) for t in ("kinesis", "s3")}
    text = (tmp_path / "configs/tables/shop.products.yaml").read_text().replace("table: products", "table: suppliers")
    (tmp_path / "configs/tables/shop.suppliers.yaml").write_text(text)
    after = {t: table_mappings(load_project(tmp_path / "configs", env={}), t) for t in ("kinesis", "s3")}
    for target in ("kinesis", "s3"):
        new = [r for r in after[target]["rules"] if r not in before[target]["rules"]]
        assert any(r["rule-type"] == "selection" and r["object-locator"]["table-name"] == "suppliers" for r in new)
        assert len({r["rule-id"] for r in after[target]["rules"]}) == len(after[target]["rules"]), "ids unique"
    assert len(after["s3"]["rules"]) == len(before["s3"]["rules"]) + 2  # selection + change-seq column
    assert len(after["kinesis"]["rules"]) == len(before["kinesis"]["rules"]) + 1


# ---------------------------------------------------------------- orchestration


def _definition(template) -> dict:
    (sm,) = [r["Properties"] for r in _resources(template, "AWS::StepFunctions::StateMachine").values()]
    parts = sm["DefinitionString"]["Fn::Join"][1]
    text = "".join(p if isinstance(p, str) else "#" + json.dumps(p).replace('"', "'") + "#" for p in parts)
    return json.loads(text)


def test_batch_state_machine_runs_full_load_merge_compaction(template):
    d = _definition(template)
    states = d["States"]
    order, name = [], d["StartAt"]
    while states[name]["Type"] == "Task" and "glue:startJobRun" in states[name]["Resource"]:
        order.append(name)
        name = states[name]["Next"]
    assert order == ["FullLoad", "WarehouseMerge", "Compaction"] and states[name]["Type"] == "Succeed"
    for step in order:
        s = states[step]
        assert s["Resource"].endswith(":states:::glue:startJobRun.sync")  # waits for the run's end state
        assert s["Parameters"]["Timeout"] == 240
        (retry,) = s["Retry"]
        assert retry["BackoffRate"] == 2 and retry["MaxAttempts"] >= 2 and retry["IntervalSeconds"] > 0
        assert "Glue.ThrottlingException" in retry["ErrorEquals"] and "States.ALL" not in retry["ErrorEquals"]
        (catch,) = s["Catch"]
        assert catch["ErrorEquals"] == ["States.ALL"]
        mark = states[catch["Next"]]
        assert mark["Parameters"]["failed_step"] == step
        notify = states[mark["Next"]]
        assert notify["Resource"].endswith(":states:::sns:publish")
        assert notify["Parameters"]["Message"]["failed_step.$"] == "$.failed_step"
        assert states[notify["Next"]]["Type"] == "Fail"
    assert states["Compaction"]["Parameters"]["Arguments"]["--tables"] == (
        "shop.customers,shop.order_items,shop.orders,shop.products")
    (sm,) = [r["Properties"] for r in _resources(template, "AWS::StepFunctions::StateMachine").values()]
    assert sm["LoggingConfiguration"]["Level"] == "ERROR"
    sm_id = _logical_id(template, "AWS::StepFunctions::StateMachine")
    rules = [r["Properties"] for r in _resources(template, "AWS::Events::Rule").values() if "ScheduleExpression" in r["Properties"]]
    (rule,) = rules
    assert rule["ScheduleExpression"] == "cron(15 * * * ? *)"
    assert rule["Targets"][0]["Arn"] == {"Ref": sm_id}


# ---------------------------------------------------------------- catalog, warehouse


def test_catalog_registers_silver_bronze_quarantine_as_delta(template):
    dbs = sorted(d["Properties"]["DatabaseInput"]["Name"] for d in _resources(template, "AWS::Glue::Database").values())
    assert dbs == ["cdcflow_shop", "cdcflow_shop_spectrum"]
    tables = {t["Properties"]["TableInput"]["Name"]: t["Properties"] for t in _resources(template, "AWS::Glue::Table").values()
              if t["Properties"]["DatabaseName"] == "cdcflow_shop"}
    assert set(tables) == {"shop_customers", "shop_order_items", "shop_orders", "shop_products", "bronze", "quarantine"}
    for name, props in tables.items():
        assert props["DatabaseName"] == "cdcflow_shop"
        ti = props["TableInput"]
        assert ti["TableType"] == "EXTERNAL_TABLE" and ti["Parameters"]["table_type"] == "DELTA"
        location = "".join(p if isinstance(p, str) else "<bucket>" for p in ti["StorageDescriptor"]["Location"]["Fn::Join"][1])
        suffix = {"bronze": "bronze", "quarantine": "quarantine"}.get(name, "silver/" + name.replace("_", "/", 1))
        assert location == f"s3://<bucket>/lake/{suffix}", location
    customers = {c["Name"]: c["Type"] for c in tables["shop_customers"]["TableInput"]["StorageDescriptor"]["Columns"]}
    assert customers["customer_id"] == "bigint" and customers["_seq"] == "string"
    assert "shipping_phone" not in {c["Name"] for c in tables["shop_orders"]["TableInput"]["StorageDescriptor"]["Columns"]}
    assert [p["Name"] for p in tables["bronze"]["TableInput"]["PartitionKeys"]] == ["table", "date"]
    env = json.dumps(_resources(template, "AWS::Glue::Job"))
    assert "CDCFLOW_CATALOG_DATABASE" in env


def test_redshift_serverless_with_copy_role_and_schema(template):
    (ns,) = [n["Properties"] for n in _resources(template, "AWS::RedshiftServerless::Namespace").values()]
    copy_role = next(lid for lid in _resources(template, "AWS::IAM::Role") if lid.startswith("RedshiftCopyRole"))
    spectrum_role = next(lid for lid in _resources(template, "AWS::IAM::Role") if lid.startswith("RedshiftSpectrumRole"))
    assert ns["IamRoles"] == [{"Fn::GetAtt": [copy_role, "Arn"]}, {"Fn::GetAtt": [spectrum_role, "Arn"]}]
    assert ns["DefaultIamRoleArn"] == {"Fn::GetAtt": [copy_role, "Arn"]}
    assert "resolve:secretsmanager" in json.dumps(ns["AdminUserPassword"])  # never a literal password
    (wg,) = [w["Properties"] for w in _resources(template, "AWS::RedshiftServerless::Workgroup").values()]
    assert wg["PubliclyAccessible"] is False and wg["EnhancedVpcRouting"] is True
    assert wg["SubnetIds"] == {"Ref": "SubnetIds"}
    creds = next(s["Properties"] for lid, s in _resources(template, "AWS::SecretsManager::Secret").items()
                 if lid.startswith("RedshiftCredentials"))  # fmt: skip
    text = json.dumps(creds["GenerateSecretString"]["SecretStringTemplate"])
    assert "Endpoint.Address" in text and "dbname" in text  # the merge's secret points at the workgroup
    assert '"username":"cdcflow_etl"' in "".join(
        p for p in creds["GenerateSecretString"]["SecretStringTemplate"]["Fn::Join"][1] if isinstance(p, str))
    assert "cdcflow_admin" not in text  # the merge never logs in as the admin
    assert creds["GenerateSecretString"]["GenerateStringKey"] == "password"
    (user,) = _resources(template, "Custom::RedshiftEtlUser").values()
    props = user["Properties"]
    assert props["UserName"] == "cdcflow_etl" and props["Schema"] == "analytics" and props["Database"] == "dev"
    assert props["AdminSecretArn"]["Ref"].startswith("RedshiftAdmin")
    assert props["EtlSecretArn"]["Ref"].startswith("RedshiftCredentials")
    template.resource_count_is("Custom::AWS", 0)  # no fire-and-forget Data API call any more
    handler = next(f["Properties"] for lid, f in _resources(template, "AWS::Lambda::Function").items()
                   if lid.startswith("RedshiftUserHandler"))  # fmt: skip
    assert handler["Handler"] == "index.on_event" and handler["Role"]["Fn::GetAtt"][0].startswith("RedshiftUserHandlerRole")
    merge = next(j["Properties"] for j in _resources(template, "AWS::Glue::Job").values()
                 if j["Properties"]["Name"].endswith("warehouse-merge"))  # fmt: skip
    assert merge["DefaultArguments"]["--redshift-secret-id"]["Ref"].startswith("RedshiftCredentials")


def test_warehouse_merge_reaches_the_private_workgroup_through_a_glue_network_connection(template):
    """The workgroup is private: the merge gets there through a NETWORK connection in the VPC, whose
    security group is the only one Redshift accepts on 5439."""
    (conn,) = [c["Properties"] for c in _resources(template, "AWS::Glue::Connection").values()]
    conn_id = _logical_id(template, "AWS::Glue::Connection")
    ci = conn["ConnectionInput"]
    assert ci["ConnectionType"] == "NETWORK" and ci["Name"] == "cdcflow-shop-vpc"
    req = ci["PhysicalConnectionRequirements"]
    assert req["SubnetId"] == {"Fn::Select": [0, {"Ref": "SubnetIds"}]}
    assert req["AvailabilityZone"] == {"Ref": "GlueAvailabilityZone"}
    glue_sg = req["SecurityGroupIdList"][0]["Fn::GetAtt"][0]
    assert glue_sg.startswith("GlueSecurityGroup") and len(req["SecurityGroupIdList"]) == 1

    jobs = {j["Properties"]["Name"]: j["Properties"] for j in _resources(template, "AWS::Glue::Job").values()}
    assert jobs["cdcflow-shop-warehouse-merge"]["Connections"] == {"Connections": [{"Ref": conn_id}]}
    assert [n for n, j in jobs.items() if "Connections" in j] == ["cdcflow-shop-warehouse-merge"]

    groups = _resources(template, "AWS::EC2::SecurityGroup")
    (redshift_sg,) = [lid for lid in groups if lid.startswith("RedshiftSecurityGroup")]
    for lid in (glue_sg, redshift_sg):  # an explicit egress list: no default allow-all
        assert groups[lid]["Properties"]["SecurityGroupEgress"] == [
            {"CidrIp": "0.0.0.0/0", "Description": "HTTPS to AWS APIs (VPC endpoints or NAT)", "FromPort": 443,
             "IpProtocol": "tcp", "ToPort": 443}]  # fmt: skip
        assert "SecurityGroupIngress" not in groups[lid]["Properties"]
    (wg,) = [w["Properties"] for w in _resources(template, "AWS::RedshiftServerless::Workgroup").values()]
    assert wg["SecurityGroupIds"] == [{"Fn::GetAtt": [redshift_sg, "GroupId"]}]

    def rules(type_: str) -> list[tuple]:
        out = []
        for r in _resources(template, type_).values():
            p = r["Properties"]
            peer = p.get("SourceSecurityGroupId") or p.get("DestinationSecurityGroupId") or p.get("CidrIp")
            out.append((p["GroupId"]["Fn::GetAtt"][0], p["IpProtocol"], p["FromPort"], p["ToPort"],
                        peer["Fn::GetAtt"][0] if isinstance(peer, dict) else peer))
        return sorted(out)

    # Redshift: 5439 from the Glue security group, nothing else; Glue: the self-referencing all-TCP rule
    assert rules("AWS::EC2::SecurityGroupIngress") == sorted([
        (redshift_sg, "tcp", 5439, 5439, glue_sg), (glue_sg, "tcp", 0, 65535, glue_sg)])  # fmt: skip
    assert rules("AWS::EC2::SecurityGroupEgress") == sorted([
        (glue_sg, "tcp", 0, 65535, glue_sg), (glue_sg, "tcp", 5439, 5439, redshift_sg)])  # fmt: skip

    by_sid = {s["Sid"]: s for s in _role_statements(template, "JobRoleWarehouseMerge") if "Sid" in s}
    assert _as_list(by_sid["GlueConnection"]["Action"]) == ["glue:GetConnection"]
    assert "connection/cdcflow-shop-vpc" in json.dumps(by_sid["GlueConnection"]["Resource"])
    assert set(_as_list(by_sid["GlueVpcEni"]["Action"])) == {"ec2:CreateNetworkInterface", "ec2:DeleteNetworkInterface"}
    assert by_sid["GlueVpcEniTags"]["Condition"] == {
        "ForAllValues:StringEquals": {"aws:TagKeys": ["aws-glue-service-resource"]}}
    for other in ("JobRoleStream", "JobRoleFullLoad", "JobRoleCompaction"):
        assert not [s for s in _role_statements(template, other) if "ec2:" in json.dumps(s["Action"])], other


class _FakeDataApi:
    """The Redshift Data API calls the ETL-user handler makes: statements run in order; a statement
    whose SQL contains `fail` fails; `pg_user` answers `user_exists`."""

    def __init__(self, user_exists: bool = False, pending: int = 1):
        self.sql: list[str] = []
        self.user_exists, self.pending = user_exists, pending
        self._polls: dict[str, int] = {}

    def execute_statement(self, **kw):
        assert kw["WorkgroupName"] == "cdcflow-shop" and kw["SecretArn"] == "arn:admin"
        self.sql.append(kw["Sql"])
        return {"Id": str(len(self.sql))}

    def describe_statement(self, Id):  # noqa: N803 - boto3's argument name
        self._polls[Id] = self._polls.get(Id, 0) + 1
        if self._polls[Id] <= self.pending:
            return {"Status": "STARTED"}
        if "fail" in self.sql[int(Id) - 1]:
            return {"Status": "FAILED", "Error": "ERROR: permission denied"}
        return {"Status": "FINISHED"}

    def get_statement_result(self, Id):  # noqa: N803
        return {"Records": [[{"longValue": int(self.user_exists)}]]}


class _FakeSecrets:
    def get_secret_value(self, SecretId):  # noqa: N803
        assert SecretId == "arn:etl"
        return {"SecretString": json.dumps({"username": "cdcflow_etl", "password": "Secret123abc", "host": "h"})}


def _user_event(request: str = "Create") -> dict:
    return {"RequestType": request, "ResourceProperties": {
        "WorkgroupName": "cdcflow-shop", "Database": "dev", "Schema": "analytics", "UserName": "cdcflow_etl",
        "AdminSecretArn": "arn:admin", "EtlSecretArn": "arn:etl"}}  # fmt: skip


def test_etl_user_handler_creates_the_user_with_a_hashed_password_and_only_its_grants(monkeypatch):
    import hashlib

    sys.path.insert(0, str(INFRA / "redshift_user"))
    import index

    monkeypatch.setattr(index.time, "sleep", lambda _s: None)
    api = _FakeDataApi()
    out = index.on_event(_user_event(), clients={"redshift-data": api, "secretsmanager": _FakeSecrets()})
    assert out["PhysicalResourceId"] == "cdcflow-shop/dev/cdcflow_etl"
    digest = "md5" + hashlib.md5(b"Secret123abccdcflow_etl").hexdigest()
    assert api.sql == [
        'create schema if not exists "analytics"',
        "select count(*) from pg_user where usename = :user",
        f"create user \"cdcflow_etl\" password '{digest}'",
        'alter schema "analytics" owner to "cdcflow_etl"',
        'grant create on database "dev" to "cdcflow_etl"',
    ]
    assert not any("Secret123abc" in q for q in api.sql), "the plain password is never in a statement"
    assert not any("superuser" in q.lower() or "createuser" in q.lower() for q in api.sql)

    # an existing user gets the secret's password again (alter), a failed statement fails the deploy
    again = _FakeDataApi(user_exists=True)
    index.on_event(_user_event("Update"), clients={"redshift-data": again, "secretsmanager": _FakeSecrets()})
    assert again.sql[2].startswith('alter user "cdcflow_etl" password \'md5')
    failing = index.DataApi(_FakeDataApi(), "cdcflow-shop", "dev", "arn:admin", sleep=lambda _s: None)
    with pytest.raises(RuntimeError, match="permission denied"):
        failing.run("grant fail")
    # Delete drops nothing (the user owns the warehouse's tables)
    assert index.on_event({**_user_event("Delete"), "PhysicalResourceId": "x"}, clients={})["PhysicalResourceId"] == "x"
    assert index.quote_ident('we"ird') == '"we""ird"'


def test_spectrum_reads_manifest_tables_through_an_external_schema_and_a_least_privilege_role(template):
    """Redshift Spectrum: a Glue database of its own with one SymlinkTextInputFormat table per lake
    table at its manifest folder; the external schema created by the custom resource with a role that
    only reads that database, the lake prefix and the key."""
    tables = {t["Properties"]["TableInput"]["Name"]: t for t in _resources(template, "AWS::Glue::Table").values()
              if t["Properties"]["DatabaseName"] == "cdcflow_shop_spectrum"}
    assert set(tables) == {"shop_customers", "shop_order_items", "shop_orders", "shop_products", "bronze", "quarantine"}
    db_id = next(lid for lid in _resources(template, "AWS::Glue::Database") if lid.startswith("SpectrumDatabase"))
    for name, t in tables.items():
        ti = t["Properties"]["TableInput"]
        sd = ti["StorageDescriptor"]
        assert sd["InputFormat"] == "org.apache.hadoop.hive.ql.io.SymlinkTextInputFormat"
        assert sd["OutputFormat"] == "org.apache.hadoop.hive.ql.io.HiveIgnoreKeyTextOutputFormat"
        assert sd["SerdeInfo"]["SerializationLibrary"] == "org.apache.hadoop.hive.ql.io.parquet.serde.ParquetHiveSerDe"
        assert "table_type" not in ti["Parameters"] and db_id in t["DependsOn"]
        location = "".join(p if isinstance(p, str) else "<bucket>" for p in sd["Location"]["Fn::Join"][1])
        suffix = {"bronze": "bronze", "quarantine": "quarantine"}.get(name, "silver/" + name.replace("_", "/", 1))
        assert location == f"s3://<bucket>/lake/{suffix}/_symlink_format_manifest/", location
    bronze = tables["bronze"]["Properties"]["TableInput"]
    assert [p["Name"] for p in bronze["PartitionKeys"]] == ["table", "date"]
    assert "table" not in {c["Name"] for c in bronze["StorageDescriptor"]["Columns"]}
    customers = tables["shop_customers"]["Properties"]["TableInput"]["StorageDescriptor"]["Columns"]
    assert {c["Name"]: c["Type"] for c in customers}["customer_id"] == "bigint"

    (user,) = _resources(template, "Custom::RedshiftEtlUser").values()
    props = user["Properties"]
    assert props["SpectrumSchema"] == "lake" and props["SpectrumDatabase"] == "cdcflow_shop_spectrum"
    role_id = props["SpectrumRoleArn"]["Fn::GetAtt"][0]
    assert role_id.startswith("RedshiftSpectrumRole") and db_id in user["DependsOn"]
    role = _resources(template, "AWS::IAM::Role")[role_id]["Properties"]
    assert role["AssumeRolePolicyDocument"]["Statement"][0]["Principal"] == {"Service": "redshift.amazonaws.com"}
    by_sid = {s["Sid"]: s for s in _role_statements(template, "RedshiftSpectrumRole")}
    assert set(by_sid) == {"ReadSpectrumCatalog", "ReadLake", "ListLake", "DecryptLake"}
    assert set(_as_list(by_sid["ReadSpectrumCatalog"]["Action"])) == {
        "glue:GetDatabase", "glue:GetTable", "glue:GetTables", "glue:GetPartition", "glue:GetPartitions"}
    glue_resources = json.dumps(by_sid["ReadSpectrumCatalog"]["Resource"])
    assert "database/cdcflow_shop_spectrum" in glue_resources and "table/cdcflow_shop_spectrum/*" in glue_resources
    assert "database/cdcflow_shop\"" not in glue_resources  # not the Delta entries
    assert _as_list(by_sid["ReadLake"]["Action"]) == ["s3:GetObject"]
    assert [k for _, k in _s3_object_resources(by_sid["ReadLake"])] == ["/lake/*"]
    assert by_sid["ListLake"]["Condition"] == {"StringLike": {"s3:prefix": ["lake/*", "lake"]}}
    assert _as_list(by_sid["DecryptLake"]["Action"]) == ["kms:Decrypt"]
    # compaction registers partitions of the Spectrum tables only; the jobs sync both databases' columns
    compaction = {s["Sid"]: s for s in _role_statements(template, "JobRoleCompaction") if "Sid" in s}
    assert set(_as_list(compaction["SpectrumPartitions"]["Action"])) == {
        "glue:GetTable", "glue:GetPartitions", "glue:BatchCreatePartition", "glue:BatchDeletePartition"}
    assert "database/cdcflow_shop_spectrum" in json.dumps(compaction["SpectrumPartitions"]["Resource"])
    stream = {s["Sid"]: s for s in _role_statements(template, "JobRoleStream") if "Sid" in s}
    assert "table/cdcflow_shop_spectrum/*" in json.dumps(stream["CatalogSync"]["Resource"])


def test_etl_user_handler_creates_the_spectrum_external_schema(monkeypatch):
    sys.path.insert(0, str(INFRA / "redshift_user"))
    import index

    monkeypatch.setattr(index.time, "sleep", lambda _s: None)
    api = _FakeDataApi()
    event = _user_event()
    event["ResourceProperties"].update(SpectrumSchema="lake", SpectrumDatabase="cdcflow_shop_spectrum",
                                       SpectrumRoleArn="arn:aws:iam::123456789012:role/spectrum")
    index.on_event(event, clients={"redshift-data": api, "secretsmanager": _FakeSecrets()})
    assert api.sql[-1] == ('create external schema if not exists "lake" from data catalog '
                           "database 'cdcflow_shop_spectrum' iam_role 'arn:aws:iam::123456789012:role/spectrum'")
    assert len(api.sql) == 6  # the ETL user's statements first, unchanged
    assert index.quote_literal("it's") == "'it''s'"


# ---------------------------------------------------------------- monitoring


def test_dms_kinesis_freshness_quarantine_heartbeat_alarms(template):
    alarms = {a["Properties"]["AlarmName"]: a["Properties"] for a in _resources(template, "AWS::CloudWatch::Alarm").values()}
    for alarm in alarms.values():
        assert alarm["AlarmActions"], alarm["AlarmName"]
    for m in ("CDCLatencySource", "CDCLatencyTarget"):  # the CDC task's; the S3 task only loads
        a = alarms[f"cdcflow-shop-{m}Kinesis"]
        assert a["Namespace"] == "AWS/DMS" and a["MetricName"] == m
        dims = {d["Name"]: d["Value"] for d in a["Dimensions"]}
        assert dims == {"ReplicationInstanceIdentifier": "cdcflow-shop-dms",
                        "ReplicationTaskIdentifier": "cdcflow-shop-kinesis"}
        assert f"cdcflow-shop-{m}S3" not in alarms
    assert alarms["cdcflow-shop-KinesisIteratorAge"]["MetricName"] == "GetRecords.IteratorAgeMilliseconds"
    assert alarms["cdcflow-shop-KinesisWriteThrottled"]["MetricName"] == "WriteProvisionedThroughputExceeded"
    fresh = alarms["cdcflow-shop-FreshnessSeconds"]
    assert "MAX(FreshnessSeconds)" in fresh["Metrics"][0]["Expression"] and '"Table"' in fresh["Metrics"][0]["Expression"]
    rates = [a for n, a in alarms.items() if "QuarantineRate" in n]
    assert len(rates) == 4
    for a in rates:
        names = {m["MetricStat"]["Metric"]["MetricName"] for m in a["Metrics"] if "MetricStat" in m}
        assert names == {"RowsQuarantined", "RowsRead"} and a["Threshold"] == 5
    hb = alarms["cdcflow-shop-Heartbeat"]
    assert hb["MetricName"] == "BatchDuration" and hb["Statistic"] == "SampleCount"
    assert hb["TreatMissingData"] == "breaching" and hb["ComparisonOperator"] == "LessThanThreshold"
    assert hb["Period"] == 15 * 60


def test_glue_job_failures_notify_the_topic(template):
    topic = _logical_id(template, "AWS::SNS::Topic")
    (rule,) = [r["Properties"] for r in _resources(template, "AWS::Events::Rule").values()
               if r["Properties"].get("EventPattern", {}).get("source") == ["aws.glue"]]  # fmt: skip
    detail = rule["EventPattern"]["detail"]
    assert rule["EventPattern"]["detail-type"] == ["Glue Job State Change"]
    assert set(detail["state"]) == {"FAILED", "TIMEOUT", "STOPPED"}
    assert sorted(j["Ref"] for j in detail["jobName"]) == sorted(_resources(template, "AWS::Glue::Job"))
    assert rule["Targets"][0]["Arn"] == {"Ref": topic}


def test_dashboard_shows_lag_freshness_throughput_quarantine_dms_and_jobs(template):
    (dash,) = [d["Properties"] for d in _resources(template, "AWS::CloudWatch::Dashboard").values()]
    body = json.dumps(dash["DashboardBody"])
    for needle in ("MillisBehindLatest", "IteratorAgeMilliseconds", "FreshnessSeconds", "RowsRead", "RowsApplied",
                   "RowsQuarantined", "CDCLatencySource", "CDCLatencyTarget", "glue.driver.aggregate.numFailedTasks"):
        assert needle in body, needle


# ---------------------------------------------------------------- packaging


def test_deploy_uploads_bundle_scripts_and_configs(template, tmp_path):
    import zipfile

    _import_infra()
    from cdcflow_stack import _write_bundle

    deployments = {d["Properties"]["DestinationBucketKeyPrefix"]: d["Properties"]
                   for d in _resources(template, "Custom::CDKBucketDeployment").values()}  # fmt: skip
    assert set(deployments) == {"dist/", "scripts/", "configs/"}
    for d in deployments.values():
        assert d["DestinationBucketName"]["Ref"].startswith("ArtifactsBucket")
        assert d["Prune"] is True
    configs = Path(__file__).resolve().parent.parent / "configs"
    _write_bundle(tmp_path / "a.zip", configs)
    names = zipfile.ZipFile(tmp_path / "a.zip").namelist()
    # the sample configs' DataFrame-API transforms (shop_transforms:...) at the root, on --extra-py-files
    for must in ("cdcflow/__init__.py", "cdcflow/glue.py", "streaming/processor.py", "batch/full_load.py",
                 "shop_transforms/__init__.py"):
        assert must in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    _write_bundle(tmp_path / "b.zip", configs)
    assert (tmp_path / "a.zip").read_bytes() == (tmp_path / "b.zip").read_bytes(), "deterministic: stable asset hash"
    (fn,) = [f for lid, f in _resources(template, "AWS::Lambda::Function").items() if lid.startswith("CustomCDKBucketDeployment")]
    role = fn["Properties"]["Role"]["Fn::GetAtt"][0]
    assert role.startswith("DeployRole")
    writes = [s for s in _role_statements(template, "DeployRole") if "s3:PutObject" in _as_list(s["Action"])]
    assert sorted(r[1] for s in writes for r in _s3_object_resources(s)) == ["/configs/*", "/dist/*", "/scripts/*"]
    # the log store jar is staged into dist/ beside the bundle, as built by `make install`
    from cdcflow.runtime import LOGSTORE_JAR

    staged = next((REPO / ".cache" / "cdk-assets").glob("*/dist/cdcflow-logstore.jar"))
    assert staged.read_bytes() == LOGSTORE_JAR.read_bytes()


# ---------------------------------------------------------------- linters


def test_archiver_is_one_fargate_task_with_a_least_privilege_role_and_its_kcl_tables(template):
    """The raw archiver (cdcflow archive, KCL): an always-on ECS Fargate service, its role limited to
    reading the stream, writing the archive prefix and using its own three KCL tables."""
    service = next(iter(_resources(template, "AWS::ECS::Service").values()))["Properties"]
    assert service["LaunchType"] == "FARGATE" and service["DesiredCount"] == 1
    assert service["NetworkConfiguration"]["AwsvpcConfiguration"]["AssignPublicIp"] == "DISABLED"
    tables = {r["Properties"]["TableName"]: r["Properties"] for r in _resources(template, "AWS::DynamoDB::Table").values()}
    app = "cdcflow-shop-archiver"
    assert set(tables) >= {app, f"{app}-CoordinatorState", f"{app}-WorkerMetricStats"}
    leases = tables[app]
    assert leases["KeySchema"] == [{"AttributeName": "leaseKey", "KeyType": "HASH"}]
    assert [g["IndexName"] for g in leases["GlobalSecondaryIndexes"]] == ["LeaseOwnerToLeaseKeyIndex"]
    for t in tables.values():
        assert t["SSESpecification"]["SSEEnabled"] and t["SSESpecification"]["SSEType"] == "KMS"
        assert t["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"]

    statements = [s for lid, pol in _resources(template, "AWS::IAM::Policy").items() if lid.startswith("ArchiverTaskRole")
                  for s in pol["Properties"]["PolicyDocument"]["Statement"]]
    by_sid = {s["Sid"]: s for s in statements}
    assert set(by_sid) == {"ReadStream", "WriteArchive", "UseKey", "KclTables", "KclLeaseIndex", "KclMetrics"}
    write = json.dumps(by_sid["WriteArchive"]["Resource"])
    assert "/kinesis-archive/*" in write and _as_list(by_sid["WriteArchive"]["Action"]) == [
        "s3:PutObject", "s3:AbortMultipartUpload"]
    assert not any(a.startswith("s3:") for s in statements if s["Sid"] != "WriteArchive" for a in _as_list(s["Action"]))
    kcl_tables = {r["Fn::GetAtt"][0] for r in _as_list(by_sid["KclTables"]["Resource"])}
    assert kcl_tables == {lid for lid, r in _resources(template, "AWS::DynamoDB::Table").items()
                          if r["Properties"]["TableName"].startswith(app)}
    assert not any("dynamodb:" in a for s in _iam_statements(template) if s.get("Sid") not in ("KclTables", "KclLeaseIndex")
                   for a in _as_list(s["Action"]))  # nothing else touches DynamoDB

    (task,) = _resources(template, "AWS::ECS::TaskDefinition").values()
    (container,) = task["Properties"]["ContainerDefinitions"]
    env = {e["Name"]: e["Value"] for e in container["Environment"]}
    assert env["CDCFLOW_ENV"] == "aws" and env["CDCFLOW_AWS_ENDPOINT"] == ""
    assert "kinesis-archive" in json.dumps(env["CDCFLOW_ARCHIVE_URI"])
    assert [s["Name"] for s in container["Secrets"]] == ["CDCFLOW_PII_SALT"]
    assert container["ReadonlyRootFilesystem"] is True
    # the image installs the same amazon-kclpy as `make install`
    dockerfile = (INFRA / "archiver" / "Dockerfile").read_text()
    makefile = (REPO / "Makefile").read_text()
    version = next(line.split(":=")[1].strip() for line in makefile.splitlines() if line.startswith("KCLPY_VERSION"))
    assert f'"amazon-kclpy=={version}"' in dockerfile


def test_cfn_lint_finds_nothing(template_file):
    from cfnlint.api import ManualArgs, lint

    # the region the fixture synthesizes for (lint_all would check every region: DMS is not in all of them)
    matches = [m for m in lint(template_file.read_text(), config=ManualArgs(regions=["us-east-1"]))
               if m.rule.id[0] in "EW"]
    assert not matches, "\n".join(str(m) for m in matches)


CHECKOV = REPO / ".cache" / "venv-checkov" / "bin" / "checkov"


def test_checkov_finds_nothing(template_file):
    import subprocess

    assert CHECKOV.exists(), "checkov is installed by `make install` (.cache/venv-checkov)"
    out = subprocess.run(
        [str(CHECKOV), "-f", str(template_file), "--framework", "cloudformation", "--quiet", "--compact",
         "--skip-download", "-o", "json"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    report = json.loads(out.stdout)
    failed = report["results"]["failed_checks"] if isinstance(report, dict) else []
    assert not failed, [(f["check_id"], f["resource"]) for f in failed]
    assert report["summary"]["passed"] > 100


def test_dms_serverless_and_existing_cluster_by_context(variant):
    _import_infra()
    from dms_tasks import table_mappings

    from cdcflow.config import load_project

    project = load_project(REPO / "configs", env={})
    variant.resource_count_is("AWS::DMS::ReplicationInstance", 0)
    variant.resource_count_is("AWS::DMS::ReplicationTask", 0)
    variant.resource_count_is("AWS::RedshiftServerless::Namespace", 0)
    variant.resource_count_is("AWS::RedshiftServerless::Workgroup", 0)
    configs = {c["Properties"]["ReplicationConfigIdentifier"]: c["Properties"]
               for c in _resources(variant, "AWS::DMS::ReplicationConfig").values()}  # fmt: skip
    assert set(configs) == {"cdcflow-shop-kinesis", "cdcflow-shop-s3"}
    assert {i: c["ReplicationType"] for i, c in configs.items()} == {"cdcflow-shop-kinesis": "cdc",
                                                                       "cdcflow-shop-s3": "full-load"}
    for ident, c in configs.items():
        assert c["TableMappings"] == table_mappings(project, ident.rsplit("-", 1)[1])
        assert c["ComputeConfig"]["VpcSecurityGroupIds"] == [SECURITY_GROUP]
        assert c["ComputeConfig"]["KmsKeyId"]
    assert "BeforeImageSettings" in configs["cdcflow-shop-kinesis"]["ReplicationSettings"]
    (group,) = [g["Properties"] for g in _resources(variant, "AWS::DMS::ReplicationSubnetGroup").values()]
    assert group["SubnetIds"] == list(SUBNETS)
    assert "Parameters" not in variant.to_json() or "SubnetIds" not in variant.to_json()["Parameters"]
    creds = next(s["Properties"] for lid, s in _resources(variant, "AWS::SecretsManager::Secret").items()
                 if lid.startswith("RedshiftCredentials"))  # fmt: skip
    template = json.loads(creds["GenerateSecretString"]["SecretStringTemplate"])
    assert template["host"] == "" and template["username"] == "cdcflow_etl"  # filled in for the existing cluster
    s3 = _endpoint(variant, "s3")["S3Settings"]  # the DMS S3 batching is configurable by context
    assert (s3["CdcMaxBatchInterval"], s3["CdcMinFileSize"]) == (120, 32_768)
    # the existing cluster's security group gets 5439 from the Glue security group; no parameters asked
    params = variant.to_json().get("Parameters", {})
    assert not {"SubnetIds", "SecurityGroupIds", "VpcId", "GlueAvailabilityZone"} & params.keys()
    (ingress,) = [r["Properties"] for r in _resources(variant, "AWS::EC2::SecurityGroupIngress").values()
                  if r["Properties"]["GroupId"] == CLUSTER_SECURITY_GROUP]  # fmt: skip
    assert (ingress["FromPort"], ingress["ToPort"]) == (5439, 5439)
    assert ingress["SourceSecurityGroupId"]["Fn::GetAtt"][0].startswith("GlueSecurityGroup")
    (conn,) = [c["Properties"]["ConnectionInput"] for c in _resources(variant, "AWS::Glue::Connection").values()]
    assert conn["PhysicalConnectionRequirements"]["SubnetId"] == SUBNETS[0]
    assert conn["PhysicalConnectionRequirements"]["AvailabilityZone"] == "us-east-1a"
    alarms = [a["Properties"] for a in _resources(variant, "AWS::CloudWatch::Alarm").values()
              if a["Properties"].get("Namespace") == "AWS/DMS"]  # fmt: skip
    assert len(alarms) == 2  # the CDC (Kinesis) replication config's latency
    assert all(a["Dimensions"][0]["Name"] == "ReplicationConfigIdentifier" for a in alarms)
    # an existing cluster: the Spectrum role is an output to associate; the external schema is made by hand
    assert "RedshiftSpectrumRoleArn" in variant.to_json()["Outputs"]
    variant.resource_count_is("Custom::RedshiftEtlUser", 0)


def test_context_pipeline_must_match_pipeline_yaml():
    _import_infra()
    import aws_cdk as cdk
    from cdcflow_stack import CdcflowSettings, CdcflowStack

    with pytest.raises(Exception, match="pipeline.yaml name"):
        CdcflowStack(cdk.App(), "Mismatch", settings=CdcflowSettings(pipeline="other"),
                     env=cdk.Environment(account=ACCOUNT, region="us-east-1"))  # fmt: skip
