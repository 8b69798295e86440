"""The AWS side of cdcflow: one stack, one `cdk deploy`, built from the same configs/ the jobs read.

What is here:
- a customer-managed KMS key encrypting every bucket, the Kinesis stream, the secrets, logs and the topic;
- three buckets (raw DMS landing, Delta lake, artifacts = scripts/configs/dist/checkpoints/tmp), all with
  public access blocked, TLS enforced, SSE-KMS and a policy that refuses principals of other accounts;
- the Kinesis stream DMS writes to (on-demand, or provisioned with `shards` from context);
- DMS: a replication instance (or DMS Serverless), its subnet group, the PostgreSQL source endpoint
  (credentials from Secrets Manager), the Kinesis and S3 target endpoints and one task per target (CDC
  to Kinesis, full loads to S3) whose table mappings and settings come from configs/ (`dms_tasks.py`);
- the Glue 5.1 streaming job and three Glue batch jobs (full load, warehouse merge, compaction), each
  with its own role and the stack's security configuration;
- a Step Functions state machine (full load -> warehouse merge -> compaction, .sync, retries, Catch ->
  SNS) started by an EventBridge schedule;
- the Glue Data Catalog database with every silver table, bronze and quarantine as Delta tables;
- Redshift Serverless (namespace + workgroup, the COPY role associated, the admin secret, the schema and
  the merge's least-privilege user made by a custom resource), or an existing cluster by context;
- a Glue NETWORK connection (own security group) through which the warehouse merge reaches Redshift,
  whose security group accepts 5439 from that group only;
- CloudWatch alarms (pipeline EMF metrics, DMS latency, Kinesis, freshness, quarantine rate, heartbeat,
  Glue job failures) -> SNS, and a dashboard;
- the job bundle, entry scripts and configs uploaded to the artifacts bucket as CDK assets.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from archiver import add_archiver
from aws_cdk import (
    ArnFormat,
    CfnOutput,
    CfnParameter,
    CfnResource,
    CustomResource,
    Duration,
    Fn,
    RemovalPolicy,
    Stack,
)
from aws_cdk import aws_cloudwatch as cw
from aws_cdk import aws_cloudwatch_actions as cw_actions
from aws_cdk import aws_dms as dms
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_glue as glue
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kinesis as kinesis
from aws_cdk import aws_kms as kms
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_redshiftserverless as rs
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_s3_deployment as s3d
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subs
from aws_cdk import aws_stepfunctions as sfn
from aws_cdk import aws_stepfunctions_tasks as tasks
from aws_cdk import custom_resources as cr
from constructs import Construct
from dms_tasks import KINESIS, MIGRATION_TYPES, S3, TIMESTAMP_COLUMN, table_mappings, task_settings

from cdcflow.aws import dms_task_id
from cdcflow.catalog import (
    BRONZE_COLUMNS,
    BRONZE_PARTITIONS,
    QUARANTINE_COLUMNS,
    delta_table_input,
    glue_table_name,
    silver_columns,
    spectrum_database,
    spectrum_table_input,
)
from cdcflow.config import load_project

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
BUNDLE_PACKAGES = ("cdcflow", "streaming", "batch")  # dist/cdcflow.zip (--extra-py-files)
ENTRY_SCRIPTS = ("streaming/glue_job.py", "batch/glue_full_load.py", "batch/glue_warehouse_merge.py",
                 "batch/glue_compaction.py")
REDSHIFT_ADMIN = "cdcflow_admin"
REDSHIFT_PORT = 5439
REDSHIFT_USER_HANDLER = Path(__file__).resolve().parent / "redshift_user"  # the ETL user custom resource
# What a Glue job with a NETWORK connection needs to place its ENIs in the subnet (the managed
# AWSGlueServiceRole's EC2 part); the Describe calls have no resource-level permissions.
GLUE_VPC_DESCRIBE = ["ec2:DescribeVpcEndpoints", "ec2:DescribeRouteTables", "ec2:DescribeNetworkInterfaces",
                     "ec2:DescribeSecurityGroups", "ec2:DescribeSubnets", "ec2:DescribeVpcAttribute"]
# Glue API errors worth retrying (throttling, capacity, service faults); a FAILED job run is not retried
# by the state machine (the job has its own MaxRetries, and a DQ failure must stop the flow).
TRANSIENT_GLUE_ERRORS = [
    "Glue.ConcurrentRunsExceededException",
    "Glue.ThrottlingException",
    "Glue.InternalServiceException",
    "Glue.OperationTimeoutException",
    "Glue.ResourceNumberLimitExceededException",
]

METRICS_NAMESPACE = "cdcflow"  # cdcflow/metrics.py NAMESPACE
GLUE_VERSION = "5.1"
KINESIS_READ_ACTIONS = [
    "kinesis:DescribeStream",
    "kinesis:DescribeStreamSummary",
    "kinesis:GetRecords",
    "kinesis:GetShardIterator",
    "kinesis:ListShards",
]
PYTHON_MODULES = "pydantic>=2.6,tenacity>=8.2,rich>=13.7,sqlglot>=25,deltalake~=1.6"
WAREHOUSE_MODULES = "redshift_connector>=2.1,psycopg[binary]>=3.1"  # warehouse merge: Redshift or Postgres
WAREHOUSE_STAGING = "warehouse-staging"  # artifacts bucket prefix (warehouse.s3_staging)
S3_READ = ["s3:GetObject"]
S3_WRITE = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
KMS_USE = ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey", "kms:DescribeKey"]


# Static Spark settings of the streaming job (the same as cdcflow.runtime.STREAMING_CONF for local
# runs): room in the generated-class cache for every query a micro-batch plans, so steady-state
# batches reuse compiled code instead of recompiling a few hundred classes each. SQL settings (no
# whole-stage code generation, ...) every job sets on Glue's session itself (runtime.SESSION_SQL_CONF).
STREAMING_SPARK_CONF = "spark.sql.codegen.cache.maxEntries=2000"
# Every job commits to the lake's Delta tables on S3 through the conditional-PUT log store
# (cdcflow/java/cdcflow/delta, built by `make install`, shipped as dist/cdcflow-logstore.jar with
# --extra-jars): commits are exclusive across jobs and engines (delta-rs commits the same way), with
# nothing but s3:PutObject on the lake; no DynamoDB lock table. See docs/design.md.
LOGSTORE_JAR_NAME = "cdcflow-logstore.jar"
LOGSTORE_SPARK_CONF = " --conf ".join(f"spark.delta.logStore.{scheme}.impl=cdcflow.delta.S3ConditionalLogStore"
                                      for scheme in ("s3", "s3a"))


@dataclass(frozen=True)
class CdcflowSettings:
    """Deployment settings; each field can be set with `cdk -c <field>=<value>` or in cdk.json."""

    pipeline: str = "cdcflow-shop"  # pipeline.yaml `name`: the Pipeline dimension of the metrics
    stream_name: str = "cdcflow-dms-cdc"
    shards: int = 0  # 0 = on-demand capacity; N > 0 = provisioned with N shards
    stream_retention_hours: int = 24
    raw_prefix: str = "dms"  # DMS S3 target BucketFolder (dms.raw_uri = s3://<raw bucket>/<raw_prefix>)
    archive_prefix: str = "archive"  # raw objects under this prefix go to Glacier, then expire
    archive_glacier_days: int = 30
    archive_expire_days: int = 90
    lake_prefix: str = "lake"  # lake.root = s3://<lake bucket>/<lake_prefix>
    streaming_max_workers: int = 4  # with --enable-auto-scaling, NumberOfWorkers is the upper bound
    batch_workers: int = 2
    alarm_email: str = ""
    rows_quarantined_threshold: int = 100  # per 5 minutes, all tables
    millis_behind_latest_threshold: int = 300_000  # 5 minutes behind the stream tip
    batch_duration_threshold_seconds: int = 120
    # --- configs/ (table mappings, catalog tables, packaged as an asset); default: the repo's configs/
    config_dir: str = ""
    # --- networking (DMS and Redshift Serverless): comma-separated ids; empty = CloudFormation parameters
    subnet_ids: str = ""
    security_group_ids: str = ""
    # the VPC of subnet_ids (the stack's security groups for Glue and Redshift); empty = VpcId parameter
    vpc_id: str = ""
    # Glue NETWORK connection (the warehouse merge reaches the private Redshift endpoint through it):
    # its subnet (default: the first of subnet_ids) and that subnet's AZ (empty = GlueAvailabilityZone parameter)
    glue_subnet_id: str = ""
    glue_availability_zone: str = ""
    # existing cluster only: its security group, given ingress on 5439 from the Glue security group
    redshift_security_group_id: str = ""
    # --- DMS
    dms_serverless: int = 0  # 1 = DMS Serverless replication configs instead of an instance + tasks
    dms_instance_class: str = "dms.t3.medium"
    dms_allocated_storage_gb: int = 50
    dms_serverless_max_dcu: int = 4
    create_dms_service_roles: int = 1  # dms-vpc-role / dms-cloudwatch-logs-role (once per account)
    source_secret_arn: str = ""  # existing secret {username,password,host,port}; empty = the stack makes one
    source_database: str = "postgres"
    s3_cdc_max_batch_interval_seconds: int = 60  # CdcMaxBatchInterval
    s3_cdc_min_file_size_kb: int = 10_240  # CdcMinFileSize (KB): 10 MB
    s3_max_file_size_kb: int = 131_072  # MaxFileSize (KB, full load): 128 MB, the Delta target file size
    # --- orchestration: full load -> warehouse merge -> compaction, one Step Functions run per schedule
    batch_schedule: str = "cron(15 * * * ? *)"  # EventBridge, hourly
    batch_job_timeout_minutes: int = 240
    # --- Glue Data Catalog
    catalog_database: str = ""  # default: <pipeline> with - -> _
    # --- Redshift: a Serverless namespace + workgroup, or an existing cluster (redshift_cluster_id)
    redshift_cluster_id: str = ""
    redshift_database: str = "dev"
    redshift_base_rpu: int = 8
    redshift_max_rpu: int = 32
    redshift_etl_user: str = "cdcflow_etl"  # the merge's least-privilege user (never the admin)
    # Redshift Spectrum: the external schema over the Spectrum Glue database (manifest tables)
    redshift_spectrum_schema: str = "lake"
    # --- alarms
    freshness_threshold_seconds: int = 300
    quarantine_rate_percent: int = 5
    heartbeat_minutes: int = 15
    dms_latency_threshold_seconds: int = 300
    kinesis_iterator_age_threshold_ms: int = 300_000

    @classmethod
    def from_context(cls, node: Any) -> CdcflowSettings:
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = node.try_get_context(f.name)
            if raw is None:
                continue
            default = f.default
            values[f.name] = int(raw) if isinstance(default, int) and not isinstance(default, bool) else str(raw)
        return cls(**values)


class CdcflowStack(Stack):
    def __init__(self, scope: Construct, construct_id: str, settings: CdcflowSettings | None = None, **kwargs) -> None:
        super().__init__(scope, construct_id, **kwargs)
        self.settings = cfg = settings or CdcflowSettings()

        # ------------------------------------------------------------ encryption key
        self.key = kms.Key(
            self,
            "Key",
            alias=f"alias/{cfg.pipeline}",
            description=f"cdcflow {cfg.pipeline}: buckets, Kinesis stream, secrets, alarm topic",
            enable_key_rotation=True,
            removal_policy=RemovalPolicy.RETAIN,
        )
        # CloudWatch alarms and EventBridge publish to the KMS-encrypted SNS topic.
        self.key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="AllowAlarmPublishers",
                principals=[
                    iam.ServicePrincipal("cloudwatch.amazonaws.com"),
                    iam.ServicePrincipal("events.amazonaws.com"),
                ],
                actions=["kms:Decrypt", "kms:GenerateDataKey*"],
                resources=["*"],  # in a key policy "*" means this key
                conditions={"StringEquals": {"aws:SourceAccount": self.account}},
            )
        )

        # CloudWatch Logs encrypts the Glue jobs' logs (security configuration) and the state machine's.
        self.key.add_to_resource_policy(
            iam.PolicyStatement(
                sid="AllowLogsEncryption",
                principals=[iam.ServicePrincipal(f"logs.{self.region}.amazonaws.com")],
                actions=["kms:Encrypt", "kms:Decrypt", "kms:ReEncryptFrom", "kms:ReEncryptTo", "kms:GenerateDataKey",
                         "kms:GenerateDataKeyWithoutPlaintext", "kms:DescribeKey"],
                resources=["*"],  # in a key policy "*" means this key
                conditions={"ArnLike": {"kms:EncryptionContext:aws:logs:arn":
                                        f"arn:{self.partition}:logs:{self.region}:{self.account}:*"}},
            )
        )
        # Every Glue job: S3 writes, CloudWatch logs and bookmarks encrypted with the key.
        self.glue_security = glue.CfnSecurityConfiguration(
            self, "GlueSecurity", name=f"{cfg.pipeline}-jobs",
            encryption_configuration=glue.CfnSecurityConfiguration.EncryptionConfigurationProperty(
                s3_encryptions=[glue.CfnSecurityConfiguration.S3EncryptionProperty(
                    s3_encryption_mode="SSE-KMS", kms_key_arn=self.key.key_arn)],
                cloud_watch_encryption=glue.CfnSecurityConfiguration.CloudWatchEncryptionProperty(
                    cloud_watch_encryption_mode="SSE-KMS", kms_key_arn=self.key.key_arn),
                job_bookmarks_encryption=glue.CfnSecurityConfiguration.JobBookmarksEncryptionProperty(
                    job_bookmarks_encryption_mode="CSE-KMS", kms_key_arn=self.key.key_arn),
            ),
        )

        # ------------------------------------------------------------ buckets
        self.raw_bucket = self._bucket(
            "RawBucket",
            versioned=True,
            lifecycle_rules=[
                s3.LifecycleRule(
                    id="archive-to-glacier-then-expire",
                    prefix=f"{cfg.archive_prefix.strip('/')}/",
                    transitions=[
                        s3.Transition(
                            storage_class=s3.StorageClass.GLACIER,
                            transition_after=Duration.days(cfg.archive_glacier_days),
                        )
                    ],
                    expiration=Duration.days(cfg.archive_expire_days),
                    noncurrent_version_expiration=Duration.days(cfg.archive_expire_days),
                ),
                s3.LifecycleRule(id="abort-incomplete-uploads", abort_incomplete_multipart_upload_after=Duration.days(7)),
            ],
        )
        self.lake_bucket = self._bucket(
            "LakeBucket",
            lifecycle_rules=[
                s3.LifecycleRule(id="abort-incomplete-uploads", abort_incomplete_multipart_upload_after=Duration.days(7))
            ],
        )
        # scripts/, configs/, dist/ (read-only for jobs), checkpoints/ (streaming), tmp/ (Glue temp dir),
        # warehouse-staging/ (Parquet the warehouse merge COPYs into Redshift; deleted after each merge).
        self.artifacts_bucket = self._bucket(
            "ArtifactsBucket",
            versioned=True,
            lifecycle_rules=[
                s3.LifecycleRule(id="expire-tmp", prefix="tmp/", expiration=Duration.days(7)),
                s3.LifecycleRule(id="expire-warehouse-staging", prefix=f"{WAREHOUSE_STAGING}/",
                                 expiration=Duration.days(1), noncurrent_version_expiration=Duration.days(1)),
            ],
        )

        # ------------------------------------------------------------ Kinesis stream
        provisioned = cfg.shards > 0
        self.stream = kinesis.Stream(
            self,
            "Stream",
            stream_name=cfg.stream_name,
            encryption=kinesis.StreamEncryption.KMS,
            encryption_key=self.key,
            stream_mode=kinesis.StreamMode.PROVISIONED if provisioned else kinesis.StreamMode.ON_DEMAND,
            shard_count=cfg.shards if provisioned else None,
            retention_period=Duration.hours(cfg.stream_retention_hours),
        )

        # ------------------------------------------------------------ secrets
        self.pii_salt = secretsmanager.Secret(
            self,
            "PiiSalt",
            description=f"cdcflow {cfg.pipeline}: salt for PII hashing (env CDCFLOW_PII_SALT)",
            encryption_key=self.key,
            generate_secret_string=secretsmanager.SecretStringGenerator(password_length=48, exclude_punctuation=True),
            removal_policy=RemovalPolicy.RETAIN,  # a new salt would change every hashed value
        )
        # ------------------------------------------------------------ DMS role
        self.dms_role = iam.Role(
            self,
            "DmsTargetRole",
            description="Assumed by AWS DMS to write CDC to the Kinesis stream and the raw bucket prefix",
            assumed_by=iam.ServicePrincipal(
                "dms.amazonaws.com", conditions={"StringEquals": {"aws:SourceAccount": self.account}}
            ),
        )
        raw_objects = self.raw_bucket.arn_for_objects(f"{cfg.raw_prefix.strip('/')}/*")
        self._allow(
            self.dms_role,
            "DmsPutToStream",
            ["kinesis:PutRecord", "kinesis:PutRecords", "kinesis:DescribeStream"],
            [self.stream.stream_arn],
        )
        self._allow(self.dms_role, "DmsWriteRawPrefix", ["s3:PutObject", "s3:DeleteObject", "s3:PutObjectTagging"],
                    [raw_objects])
        self._list(self.dms_role, "DmsListRawPrefix", self.raw_bucket, cfg.raw_prefix)
        self._allow(self.dms_role, "DmsUseKey", ["kms:GenerateDataKey", "kms:Encrypt", "kms:Decrypt"],
                    [self.key.key_arn])

        # ------------------------------------------------------------ Redshift (COPY role, warehouse)
        staging_objects = self.artifacts_bucket.arn_for_objects(f"{WAREHOUSE_STAGING}/*")
        self.redshift_copy_role = iam.Role(
            self,
            "RedshiftCopyRole",
            description=f"cdcflow {cfg.pipeline}: associate with the Redshift cluster; COPY reads the merge's staging files",
            assumed_by=iam.ServicePrincipal(
                "redshift.amazonaws.com", conditions={"StringEquals": {"aws:SourceAccount": self.account}}
            ),
        )
        self._allow(self.redshift_copy_role, "ReadWarehouseStaging", S3_READ, [staging_objects])
        self._list(self.redshift_copy_role, "ListWarehouseStaging", self.artifacts_bucket, WAREHOUSE_STAGING)
        self._allow(self.redshift_copy_role, "DecryptStaging", ["kms:Decrypt", "kms:DescribeKey"], [self.key.key_arn])
        self.project = load_project(Path(cfg.config_dir) if cfg.config_dir else CONFIG_DIR, env={})
        if self.project.pipeline.name != cfg.pipeline:  # the metrics' Pipeline dimension must match
            raise ValueError(f"context pipeline={cfg.pipeline!r} but pipeline.yaml name={self.project.pipeline.name!r}")
        self.catalog_database = cfg.catalog_database or cfg.pipeline.replace("-", "_")
        self.spectrum_database = spectrum_database(self.catalog_database)
        self._spectrum_role()
        self._network()
        self._redshift()

        # ------------------------------------------------------------ Glue jobs
        self.jobs: dict[str, glue.CfnJob] = {}
        self.roles: dict[str, iam.Role] = {}
        env = {
            "CDCFLOW_ENV": "aws",
            "CDCFLOW_AWS_ENDPOINT": "",  # empty = real AWS (the sample config defaults to the local emulator)
            "AWS_REGION": self.region,
            "CDCFLOW_STREAM": cfg.stream_name,
            "CDCFLOW_RAW_URI": f"s3://{self.raw_bucket.bucket_name}/{cfg.raw_prefix.strip('/')}",
            "CDCFLOW_LAKE_ROOT": f"s3://{self.lake_bucket.bucket_name}/{cfg.lake_prefix.strip('/')}",
            "CDCFLOW_CHECKPOINT_ROOT": f"s3://{self.artifacts_bucket.bucket_name}/checkpoints",
            "CDCFLOW_WAREHOUSE_KIND": "redshift",
            # cdcflow.catalog.sync_table_columns keeps this database's tables current on schema drift
            "CDCFLOW_CATALOG_DATABASE": self.catalog_database,
        }

        stream_role = self._job_role("stream", raw=True, lake_write=True, checkpoints=True, kinesis_read=True)
        self.pii_salt.grant_read(stream_role)
        self._job(
            "stream",
            stream_role,
            command="gluestreaming",
            script="scripts/glue_job.py",
            workers=cfg.streaming_max_workers,
            env=env,
            args={"--pii-salt-secret-id": self.pii_salt.secret_arn, "--enable-auto-scaling": "true",
                  "--conf": STREAMING_SPARK_CONF},
        )

        self._allow_catalog_update(stream_role)
        full_load_role = self._job_role("full-load", raw=True, lake_write=True)
        self._allow_catalog_update(full_load_role)
        self.pii_salt.grant_read(full_load_role)
        # `--reload ... --as_of dms` reads when the S3 task's load began (read-only; DMS's Describe
        # actions take no resource ARN)
        self._allow(full_load_role, "DescribeDmsLoads", ["dms:DescribeReplicationTasks", "dms:DescribeReplications"],
                    ["*"])
        self._job("full-load", full_load_role, command="glueetl", script="scripts/glue_full_load.py",
                  workers=cfg.batch_workers, env=env, args={"--pii-salt-secret-id": self.pii_salt.secret_arn})

        # Reads the lake; writes only its DQ quarantine rows and run reports, and the staging files
        # Redshift COPYs (with its own role, which may only read them).
        merge_role = self._job_role("warehouse-merge", lake_write=False, lake_write_paths=("quarantine", "_reports"))
        self.redshift_secret.grant_read(merge_role)
        self._allow_glue_vpc(merge_role)
        self._allow(merge_role, "WarehouseStaging", S3_WRITE, [staging_objects])
        merge_env = {
            **env,
            "CDCFLOW_WAREHOUSE_S3_STAGING": f"s3://{self.artifacts_bucket.bucket_name}/{WAREHOUSE_STAGING}",
            "CDCFLOW_WAREHOUSE_IAM_ROLE": self.redshift_copy_role.role_arn,
        }
        self._job("warehouse-merge", merge_role, command="glueetl", script="scripts/glue_warehouse_merge.py",
                  workers=cfg.batch_workers, env=merge_env, modules=WAREHOUSE_MODULES,
                  args={"--redshift-secret-id": self.redshift_secret.secret_arn},
                  connections=[self.glue_connection.ref])  # the private Redshift endpoint, through the VPC

        compaction_role = self._job_role("compaction", lake_write=True)
        # compaction registers the partitions of partitioned Spectrum tables (their manifest folders)
        self._allow(compaction_role, "SpectrumPartitions",
                    ["glue:GetTable", "glue:GetPartitions", "glue:BatchCreatePartition", "glue:BatchDeletePartition"],
                    self._glue_database_arns(self.spectrum_database))
        self._job("compaction", compaction_role, command="glueetl", script="scripts/glue_compaction.py",
                  workers=cfg.batch_workers, env=env)

        # ------------------------------------------------------------ alarms
        self.topic = sns.Topic(self, "AlarmTopic", display_name=f"cdcflow {cfg.pipeline} alarms", master_key=self.key)
        if cfg.alarm_email:
            self.topic.add_subscription(subs.EmailSubscription(cfg.alarm_email))
        self.alarms: dict[str, cw.CfnAlarm | cw.Alarm] = {}
        per_table = f"SCHEMA(\"{METRICS_NAMESPACE}\", Pipeline, \"Table\") WHERE Pipeline = '{cfg.pipeline}'"
        self._insights_alarm(
            "TableIsolated",
            f"SELECT MAX(TableIsolated) FROM {per_table}",
            threshold=1,
            description="A table failed after its retries and was isolated: its records go to quarantine.",
        )
        self._insights_alarm(
            "SchemaChangeUnsafe",
            f"SELECT MAX(SchemaChangeUnsafe) FROM {per_table}",
            threshold=1,
            description="A non-widening schema change arrived: the table's records go to quarantine.",
        )
        self._insights_alarm(
            "DataQualityFailed",
            f"SELECT MAX(DataQualityFailed) FROM {per_table}",
            threshold=1,
            description="A fail-severity raw_to_staging rule passed its threshold: the table's records of that "
                        "micro-batch went to quarantine under the rule.",
        )
        self._insights_alarm(
            "LoadAfterChanges",
            f"SELECT MAX(LoadAfterChanges) FROM {per_table}",
            threshold=1,
            description="Full-load records arrived for a table whose silver holds changes (a DMS table reload "
                        "through Kinesis): they reach only keys silver doesn't hold (README, known limits).",
        )
        self._insights_alarm(
            "RowsQuarantined",
            f"SELECT SUM(RowsQuarantined) FROM {per_table}",
            threshold=cfg.rows_quarantined_threshold,
            comparison="GreaterThanThreshold",
            description=f"More than {cfg.rows_quarantined_threshold} rows quarantined in 5 minutes.",
        )
        self._insights_alarm(
            "MillisBehindLatest",
            f"SELECT MAX(MillisBehindLatest) FROM SCHEMA(\"{METRICS_NAMESPACE}\", Pipeline, Shard, Stream) "
            f"WHERE Stream = '{cfg.stream_name}'",
            threshold=cfg.millis_behind_latest_threshold,
            comparison="GreaterThanThreshold",
            evaluation_periods=3,
            description="The streaming job is falling behind the Kinesis stream.",
        )
        batch_duration = cw.Alarm(
            self,
            "AlarmBatchDuration",
            alarm_name=f"{cfg.pipeline}-BatchDuration",
            alarm_description=f"Micro-batches take longer than {cfg.batch_duration_threshold_seconds}s.",
            metric=cw.Metric(
                namespace=METRICS_NAMESPACE,
                metric_name="BatchDuration",
                dimensions_map={"Pipeline": cfg.pipeline},
                statistic="Maximum",
                period=Duration.minutes(5),
            ),
            threshold=cfg.batch_duration_threshold_seconds,
            comparison_operator=cw.ComparisonOperator.GREATER_THAN_THRESHOLD,
            evaluation_periods=3,
            treat_missing_data=cw.TreatMissingData.NOT_BREACHING,
        )
        batch_duration.add_alarm_action(cw_actions.SnsAction(self.topic))
        self.alarms["BatchDuration"] = batch_duration

        events.Rule(
            self,
            "GlueJobFailed",
            description="A cdcflow Glue job run failed, timed out or was stopped",
            event_pattern=events.EventPattern(
                source=["aws.glue"],
                detail_type=["Glue Job State Change"],
                detail={"jobName": [j.ref for j in self.jobs.values()], "state": ["FAILED", "TIMEOUT", "STOPPED"]},
            ),
            targets=[targets.SnsTopic(self.topic)],
        )

        # ------------------------------------------------------------ the rest of the pipeline
        self._dms()
        self._catalog()
        self._orchestration()
        self._monitoring()
        self._packaging()
        # the raw archiver (KCL, ECS Fargate): every stream record, PII-masked, to <raw bucket>/kinesis-archive/
        add_archiver(self, env, self.asset_staging / "dist" / "cdcflow.zip",
                     Path(cfg.config_dir) if cfg.config_dir else CONFIG_DIR, self.asset_staging)

        self._suppress_findings()

        # ------------------------------------------------------------ outputs
        CfnOutput(self, "RawBucketName", value=self.raw_bucket.bucket_name)
        CfnOutput(self, "LakeBucketName", value=self.lake_bucket.bucket_name)
        CfnOutput(self, "ArtifactsBucketName", value=self.artifacts_bucket.bucket_name)
        CfnOutput(self, "StreamArn", value=self.stream.stream_arn)
        CfnOutput(self, "DmsTargetRoleArn", value=self.dms_role.role_arn,
                  description="ServiceAccessRoleArn of the DMS Kinesis and S3 target endpoints")
        CfnOutput(self, "ExpectedBucketOwner", value=self.account,
                  description="DMS S3 target setting ExpectedBucketOwner")
        CfnOutput(self, "AlarmTopicArn", value=self.topic.topic_arn)
        CfnOutput(self, "RedshiftSpectrumRoleArn", value=self.redshift_spectrum_role.role_arn,
                  description=f"Spectrum's role: external schema {cfg.redshift_spectrum_schema} over Glue database "
                              f"{self.spectrum_database} (associate it with an existing cluster)")
        CfnOutput(self, "StreamingJobName", value=self.jobs["stream"].ref)
        CfnOutput(self, "ArchiverServiceName", value=self.archiver_service.attr_name,
                  description="ECS service of the raw archiver (cdcflow archive)")
        CfnOutput(self, "ArchiverLeaseTableName", value=self.archiver_tables["leases"].table_name)
        CfnOutput(self, "RedshiftCopyRoleArn", value=self.redshift_copy_role.role_arn,
                  description="Associate this IAM role with the Redshift cluster (the merge's COPY uses it)")

    # ================================================================ DMS, catalog, warehouse, orchestration

    def _network(self) -> None:
        """Subnets and security groups for DMS and Redshift Serverless: context ids, or stack parameters."""
        cfg = self.settings

        def ids(value: str, name: str, type_: str, description: str) -> list[str]:
            if value:
                return [v.strip() for v in value.split(",") if v.strip()]
            return CfnParameter(self, name, type=type_, description=description).value_as_list

        self.subnet_ids = ids(cfg.subnet_ids, "SubnetIds", "List<AWS::EC2::Subnet::Id>",
                              "Private subnets (two AZs at least) for DMS and Redshift Serverless")
        self.security_group_ids = ids(cfg.security_group_ids, "SecurityGroupIds", "List<AWS::EC2::SecurityGroup::Id>",
                                      "Security groups for DMS (reaches the source DB) and the raw archiver")
        vpc_id = cfg.vpc_id or CfnParameter(self, "VpcId", type="AWS::EC2::VPC::Id",
                                            description="The VPC of SubnetIds (Glue and Redshift security groups)").value_as_string
        glue_subnet = cfg.glue_subnet_id or Fn.select(0, self.subnet_ids)
        glue_az = cfg.glue_availability_zone or CfnParameter(
            self, "GlueAvailabilityZone", type="AWS::EC2::AvailabilityZone::Name",
            description="Availability Zone of the Glue connection's subnet (the first of SubnetIds)").value_as_string

        # Glue: all TCP among its own workers (a Glue requirement: the self-referencing rule), HTTPS out
        # (S3, Glue, Secrets Manager, CloudWatch, KMS, PyPI for --additional-python-modules: NAT or VPC
        # endpoints), Redshift's port out. Listing an egress rule drops the default allow-all.
        https_out = ec2.CfnSecurityGroup.EgressProperty(
            ip_protocol="tcp", from_port=443, to_port=443, cidr_ip="0.0.0.0/0",
            description="HTTPS to AWS APIs (VPC endpoints or NAT)")
        self.glue_sg = ec2.CfnSecurityGroup(
            self, "GlueSecurityGroup", vpc_id=vpc_id,
            group_description=f"cdcflow {cfg.pipeline}: Glue jobs with the VPC connection (warehouse merge)",
            security_group_egress=[https_out])
        glue_sg_id = self.glue_sg.attr_group_id
        ec2.CfnSecurityGroupIngress(
            self, "GlueSelfIngress", group_id=glue_sg_id, source_security_group_id=glue_sg_id,
            ip_protocol="tcp", from_port=0, to_port=65535, description="Glue workers talk to each other")
        ec2.CfnSecurityGroupEgress(
            self, "GlueSelfEgress", group_id=glue_sg_id, destination_security_group_id=glue_sg_id,
            ip_protocol="tcp", from_port=0, to_port=65535, description="Glue workers talk to each other")

        # Redshift Serverless: reachable on 5439 from the Glue security group only.
        self.redshift_sg = None
        redshift_sg_id = cfg.redshift_security_group_id
        if not cfg.redshift_cluster_id:
            self.redshift_sg = ec2.CfnSecurityGroup(
                self, "RedshiftSecurityGroup", vpc_id=vpc_id,
                group_description=f"cdcflow {cfg.pipeline}: Redshift Serverless workgroup",
                security_group_egress=[https_out])  # COPY reads S3 through the VPC (enhanced VPC routing)
            redshift_sg_id = self.redshift_sg.attr_group_id
        if redshift_sg_id:
            ec2.CfnSecurityGroupIngress(
                self, "RedshiftFromGlue", group_id=redshift_sg_id, source_security_group_id=glue_sg_id,
                ip_protocol="tcp", from_port=REDSHIFT_PORT, to_port=REDSHIFT_PORT,
                description="The warehouse merge (Glue) connects to Redshift")
            ec2.CfnSecurityGroupEgress(
                self, "GlueToRedshift", group_id=glue_sg_id, destination_security_group_id=redshift_sg_id,
                ip_protocol="tcp", from_port=REDSHIFT_PORT, to_port=REDSHIFT_PORT, description="Glue to Redshift")
        else:  # an existing cluster whose security group the stack was not told: add its ingress yourself
            ec2.CfnSecurityGroupEgress(
                self, "GlueToRedshift", group_id=glue_sg_id, cidr_ip="0.0.0.0/0",
                ip_protocol="tcp", from_port=REDSHIFT_PORT, to_port=REDSHIFT_PORT, description="Glue to Redshift")

        # The NETWORK connection puts the merge's workers in the subnet (ENIs with the Glue security group).
        self.glue_connection = glue.CfnConnection(
            self, "GlueVpcConnection", catalog_id=self.account,
            connection_input=glue.CfnConnection.ConnectionInputProperty(
                name=f"{cfg.pipeline}-vpc", connection_type="NETWORK",
                description=f"cdcflow {cfg.pipeline}: the warehouse merge's path to the private Redshift endpoint",
                physical_connection_requirements=glue.CfnConnection.PhysicalConnectionRequirementsProperty(
                    subnet_id=glue_subnet, availability_zone=glue_az, security_group_id_list=[glue_sg_id]),
            ),
        )

    def _allow_glue_vpc(self, role: iam.Role) -> None:
        """What a job with the VPC connection needs: read the connection, manage its ENIs in the subnet."""
        self._allow(role, "GlueConnection", ["glue:GetConnection"],
                    [self.format_arn(service="glue", resource="catalog"),
                     self.format_arn(service="glue", resource="connection", resource_name=f"{self.settings.pipeline}-vpc")])
        self._allow(role, "GlueVpcDescribe", GLUE_VPC_DESCRIBE, ["*"])  # no resource-level permissions
        ec2_arn = f"arn:{self.partition}:ec2:{self.region}:{self.account}"
        self._allow(role, "GlueVpcEni", ["ec2:CreateNetworkInterface", "ec2:DeleteNetworkInterface"],
                    [f"{ec2_arn}:network-interface/*", f"{ec2_arn}:subnet/*",
                     Fn.join("", [f"{ec2_arn}:security-group/", self.glue_sg.attr_group_id])])
        self._allow(role, "GlueVpcEniTags", ["ec2:CreateTags", "ec2:DeleteTags"], [f"{ec2_arn}:network-interface/*"],
                    {"ForAllValues:StringEquals": {"aws:TagKeys": ["aws-glue-service-resource"]}})

    def _dms(self) -> None:
        cfg, p = self.settings, self.project
        # Account-wide roles DMS itself requires by name (VPC management, CloudWatch logging).
        service_roles: list[iam.Role] = []
        if cfg.create_dms_service_roles:
            for name, policy in (("dms-vpc-role", "AmazonDMSVPCManagementRole"),
                                 ("dms-cloudwatch-logs-role", "AmazonDMSCloudWatchLogsRole")):
                service_roles.append(iam.Role(
                    self, _camel(name), role_name=name,
                    assumed_by=iam.ServicePrincipal("dms.amazonaws.com"),
                    managed_policies=[iam.ManagedPolicy.from_aws_managed_policy_name(f"service-role/{policy}")],
                ))
        subnet_group = dms.CfnReplicationSubnetGroup(
            self, "DmsSubnetGroup",
            replication_subnet_group_identifier=f"{cfg.pipeline}-dms",
            replication_subnet_group_description=f"cdcflow {cfg.pipeline} DMS",
            subnet_ids=self.subnet_ids,
        )
        for r in service_roles:
            subnet_group.node.add_dependency(r)

        # Source: PostgreSQL, credentials in Secrets Manager (DMS reads them with its own role).
        if cfg.source_secret_arn:
            self.source_secret: secretsmanager.ISecret = secretsmanager.Secret.from_secret_complete_arn(
                self, "SourceDbCredentials", cfg.source_secret_arn)
        else:
            self.source_secret = secretsmanager.Secret(
                self, "SourceDbCredentials",
                description=f"cdcflow {cfg.pipeline}: source PostgreSQL for DMS (fill in host, username, password)",
                encryption_key=self.key,
                generate_secret_string=secretsmanager.SecretStringGenerator(
                    secret_string_template=json.dumps({"username": "dms_cdc", "host": "", "port": 5432}),
                    generate_string_key="password", exclude_punctuation=True, password_length=32),
            )
        secrets_role = iam.Role(
            self, "DmsSecretsRole",
            description="Assumed by AWS DMS to read the source database secret",
            assumed_by=iam.ServicePrincipal(f"dms.{self.region}.amazonaws.com",
                                            conditions={"StringEquals": {"aws:SourceAccount": self.account}}),
        )
        self._allow(secrets_role, "ReadSourceSecret", ["secretsmanager:GetSecretValue", "secretsmanager:DescribeSecret"],
                    [self.source_secret.secret_arn])
        self._allow(secrets_role, "DecryptSourceSecret", ["kms:Decrypt", "kms:DescribeKey"], [self.key.key_arn])

        self.dms_source = dms.CfnEndpoint(
            self, "DmsSource", endpoint_type="source", engine_name="postgres",
            endpoint_identifier=f"{cfg.pipeline}-source", database_name=cfg.source_database, ssl_mode="require",
            postgre_sql_settings=dms.CfnEndpoint.PostgreSqlSettingsProperty(
                secrets_manager_secret_id=self.source_secret.secret_arn,
                secrets_manager_access_role_arn=secrets_role.role_arn,
                capture_ddls=True,  # DDL becomes control records (schema drift)
                heartbeat_enable=True,  # keeps the replication slot's WAL from piling up on idle sources
            ),
        )
        self.dms_kinesis = dms.CfnEndpoint(
            self, "DmsKinesisTarget", endpoint_type="target", engine_name="kinesis",
            endpoint_identifier=f"{cfg.pipeline}-kinesis",
            kinesis_settings=dms.CfnEndpoint.KinesisSettingsProperty(
                message_format="json",
                include_transaction_details=True,  # commit-timestamp, transaction ids, stream-position: _seq
                include_control_details=True,  # table-def in control records: schema drift
                include_table_alter_operations=True,
                include_partition_value=True,
                partition_include_schema_table=True,
                include_null_and_empty=True,
                service_access_role_arn=self.dms_role.role_arn,
                stream_arn=self.stream.stream_arn,
            ),
        )
        self.dms_s3 = dms.CfnEndpoint(
            self, "DmsS3Target", endpoint_type="target", engine_name="s3",
            endpoint_identifier=f"{cfg.pipeline}-s3",
            s3_settings=dms.CfnEndpoint.S3SettingsProperty(
                bucket_name=self.raw_bucket.bucket_name,
                bucket_folder=cfg.raw_prefix.strip("/"),  # dms.raw_uri = s3://<raw bucket>/<raw_prefix>
                data_format="parquet",
                parquet_version="parquet-2-0",
                include_op_for_full_load=True,
                timestamp_column_name=TIMESTAMP_COLUMN,
                cdc_max_batch_interval=cfg.s3_cdc_max_batch_interval_seconds,
                cdc_min_file_size=cfg.s3_cdc_min_file_size_kb,
                max_file_size=cfg.s3_max_file_size_kb,
                expected_bucket_owner=self.account,
                encryption_mode="SSE_KMS",
                server_side_encryption_kms_key_id=self.key.key_arn,
                date_partition_enabled=False,  # the full load lists <schema>/<table>/ directly
                service_access_role_arn=self.dms_role.role_arn,
            ),
        )

        self.dms_tasks: dict[str, Any] = {}
        if not cfg.dms_serverless:
            instance = dms.CfnReplicationInstance(
                self, "DmsInstance",
                replication_instance_identifier=f"{cfg.pipeline}-dms",
                replication_instance_class=cfg.dms_instance_class,
                allocated_storage=cfg.dms_allocated_storage_gb,
                replication_subnet_group_identifier=subnet_group.ref,
                vpc_security_group_ids=self.security_group_ids,
                publicly_accessible=False,
                multi_az=False,
                auto_minor_version_upgrade=True,
                kms_key_id=self.key.key_arn,
            )
            self.dms_instance = instance
        for target, endpoint in ((KINESIS, self.dms_kinesis), (S3, self.dms_s3)):
            mappings = table_mappings(p, target)
            settings = task_settings(p, target)
            ident = dms_task_id(cfg.pipeline, target)
            if cfg.dms_serverless:
                task: Any = dms.CfnReplicationConfig(
                    self, f"DmsReplication{_camel(target)}",
                    replication_config_identifier=ident,
                    replication_type=MIGRATION_TYPES[target],
                    source_endpoint_arn=self.dms_source.ref,
                    target_endpoint_arn=endpoint.ref,
                    table_mappings=mappings,
                    replication_settings=settings,
                    compute_config=dms.CfnReplicationConfig.ComputeConfigProperty(
                        max_capacity_units=cfg.dms_serverless_max_dcu,
                        replication_subnet_group_id=subnet_group.ref,
                        vpc_security_group_ids=self.security_group_ids,
                        kms_key_id=self.key.key_arn,
                        multi_az=False,
                    ),
                )
            else:
                task = dms.CfnReplicationTask(
                    self, f"DmsTask{_camel(target)}",
                    replication_task_identifier=ident,
                    migration_type=MIGRATION_TYPES[target],
                    replication_instance_arn=self.dms_instance.ref,
                    source_endpoint_arn=self.dms_source.ref,
                    target_endpoint_arn=endpoint.ref,
                    table_mappings=json.dumps(mappings),
                    replication_task_settings=json.dumps(settings),
                )
            for r in service_roles:
                task.node.add_dependency(r)
            self.dms_tasks[target] = task

    def _catalog(self) -> None:
        """Glue database with every silver table, bronze and quarantine registered as native Delta tables."""
        cfg = self.settings
        self.glue_database = glue.CfnDatabase(
            self, "CatalogDatabase", catalog_id=self.account,
            database_input=glue.CfnDatabase.DatabaseInputProperty(
                name=self.catalog_database, description=f"cdcflow {cfg.pipeline}: Delta silver, bronze, quarantine"),
        )
        lake = f"s3://{self.lake_bucket.bucket_name}/{cfg.lake_prefix.strip('/')}"
        # silver's partition columns (delta.partition_by) stay among its columns: Athena reads the layout
        # of a native Delta table from its log
        tables: list[tuple[str, str, dict[str, str], dict[str, str]]] = [
            (glue_table_name(t), f"{lake}/{t.delta_path.strip('/')}", silver_columns(t), {})
            for t in sorted(self.project.tables.values(), key=lambda t: t.name)]
        tables += [("bronze", f"{lake}/bronze", BRONZE_COLUMNS, BRONZE_PARTITIONS),
                   ("quarantine", f"{lake}/quarantine", QUARANTINE_COLUMNS, {})]
        self.catalog_tables: dict[str, glue.CfnTable] = {}
        for name, location, columns, partitions in tables:
            ti = delta_table_input(name, location, columns, partitions, description=f"cdcflow {name} (Delta)")
            sd = ti["StorageDescriptor"]
            t = glue.CfnTable(
                self, f"CatalogTable{_camel(name)}", catalog_id=self.account, database_name=self.catalog_database,
                table_input=glue.CfnTable.TableInputProperty(
                    name=name, description=ti["Description"], table_type=ti["TableType"], parameters=ti["Parameters"],
                    partition_keys=[glue.CfnTable.ColumnProperty(name=c["Name"], type=c["Type"])
                                    for c in ti["PartitionKeys"]],
                    storage_descriptor=glue.CfnTable.StorageDescriptorProperty(
                        location=location,
                        columns=[glue.CfnTable.ColumnProperty(name=c["Name"], type=c["Type"]) for c in sd["Columns"]],
                        input_format=sd["InputFormat"], output_format=sd["OutputFormat"],
                        serde_info=glue.CfnTable.SerdeInfoProperty(
                            serialization_library=sd["SerdeInfo"]["SerializationLibrary"],
                            parameters=sd["SerdeInfo"]["Parameters"]),
                    ),
                ),
            )
            t.node.add_dependency(self.glue_database)
            self.catalog_tables[name] = t
        self._spectrum_catalog(tables)

    def _spectrum_catalog(self, tables: list[tuple[str, str, dict[str, str], dict[str, str]]]) -> None:
        """The Glue database Redshift Spectrum's external schema maps: per lake table, a Hive table
        over its symlink manifests (compaction writes them; SymlinkTextInputFormat + Parquet SerDe).
        A database of its own: the Delta entries, read by Spectrum, would list removed files too."""
        cfg = self.settings
        self.spectrum_glue_database = glue.CfnDatabase(
            self, "SpectrumDatabase", catalog_id=self.account,
            database_input=glue.CfnDatabase.DatabaseInputProperty(
                name=self.spectrum_database,
                description=f"cdcflow {cfg.pipeline}: Redshift Spectrum tables over the Delta tables' manifests"),
        )
        partitioned = {t.name: list(t.cfg.delta.partition_by) for t in self.project.tables.values()}
        by_glue_name = {glue_table_name(t): t.name for t in self.project.tables.values()}
        self.spectrum_tables: dict[str, glue.CfnTable] = {}
        for name, location, columns, partitions in tables:
            parts = partitions or {c: columns[c] for c in partitioned.get(by_glue_name.get(name, ""), [])}
            ti = spectrum_table_input(name, location, columns, parts, description=f"cdcflow {name} (Spectrum manifests)")
            sd = ti["StorageDescriptor"]
            t = glue.CfnTable(
                self, f"SpectrumTable{_camel(name)}", catalog_id=self.account, database_name=self.spectrum_database,
                table_input=glue.CfnTable.TableInputProperty(
                    name=name, description=ti["Description"], table_type=ti["TableType"], parameters=ti["Parameters"],
                    partition_keys=[glue.CfnTable.ColumnProperty(name=c["Name"], type=c["Type"])
                                    for c in ti["PartitionKeys"]],
                    storage_descriptor=glue.CfnTable.StorageDescriptorProperty(
                        location=sd["Location"],
                        columns=[glue.CfnTable.ColumnProperty(name=c["Name"], type=c["Type"]) for c in sd["Columns"]],
                        input_format=sd["InputFormat"], output_format=sd["OutputFormat"],
                        serde_info=glue.CfnTable.SerdeInfoProperty(
                            serialization_library=sd["SerdeInfo"]["SerializationLibrary"],
                            parameters=sd["SerdeInfo"]["Parameters"]),
                    ),
                ),
            )
            t.node.add_dependency(self.spectrum_glue_database)
            self.spectrum_tables[name] = t
        if getattr(self, "warehouse_user", None) is not None:  # `create external schema` needs the database
            self.warehouse_user.node.add_dependency(self.spectrum_glue_database)

    def _glue_database_arns(self, database: str) -> list[str]:
        """The catalog, one Glue database and its tables (Glue authorizes a table call on all three)."""
        return [self.format_arn(service="glue", resource="catalog"),
                self.format_arn(service="glue", resource="database", resource_name=database),
                self.format_arn(service="glue", resource="table", resource_name=f"{database}/*")]

    def _allow_catalog_update(self, role: iam.Role) -> None:
        """GetTable / CreateTable / UpdateTable (and versions) on this pipeline's catalog databases only
        (the Delta one and the Spectrum one)."""
        self._allow(role, "CatalogSync",
                    ["glue:GetTable", "glue:GetTableVersions", "glue:CreateTable", "glue:UpdateTable",
                     "glue:GetDatabase"],
                    self._glue_database_arns(self.catalog_database) + self._glue_database_arns(self.spectrum_database)[1:])

    def _spectrum_role(self) -> None:
        """The role Redshift reads the lake with through Spectrum: the Spectrum Glue database's
        definitions and the lake prefix's objects (the manifests and the Parquet files they list),
        decrypted with the stack's key; nothing else (no Glue writes, no other bucket)."""
        cfg = self.settings
        lake = cfg.lake_prefix.strip("/")
        self.redshift_spectrum_role = role = iam.Role(
            self, "RedshiftSpectrumRole",
            description=f"cdcflow {cfg.pipeline}: Redshift Spectrum reads the lake's manifest tables",
            assumed_by=iam.ServicePrincipal(
                "redshift.amazonaws.com", conditions={"StringEquals": {"aws:SourceAccount": self.account}}),
        )
        # GetPartition(s): bronze (and any partitioned silver table) is read through its partitions
        self._allow(role, "ReadSpectrumCatalog",
                    ["glue:GetDatabase", "glue:GetTable", "glue:GetTables", "glue:GetPartition", "glue:GetPartitions"],
                    self._glue_database_arns(self.spectrum_database))
        self._allow(role, "ReadLake", S3_READ, [self.lake_bucket.arn_for_objects(f"{lake}/*")])
        self._list(role, "ListLake", self.lake_bucket, lake)
        self._allow(role, "DecryptLake", ["kms:Decrypt"], [self.key.key_arn])

    def _redshift(self) -> None:
        """Redshift Serverless (namespace + workgroup, COPY role associated) or an existing cluster."""
        cfg = self.settings
        self.redshift_workgroup = None
        if cfg.redshift_cluster_id:
            # Existing cluster: the merge's user is filled into this secret by hand; associate the COPY role.
            self.redshift_secret = secretsmanager.Secret(
                self, "RedshiftCredentials",
                description=f"cdcflow {cfg.pipeline}: Redshift user for the warehouse merge (fill in host/dbname)",
                encryption_key=self.key,
                generate_secret_string=secretsmanager.SecretStringGenerator(
                    secret_string_template=json.dumps({"username": cfg.redshift_etl_user, "host": "", "port": REDSHIFT_PORT,
                                                       "dbname": cfg.redshift_database}),
                    generate_string_key="password", exclude_punctuation=True, password_length=32),
            )
            return
        admin = secretsmanager.Secret(
            self, "RedshiftAdmin",
            description=f"cdcflow {cfg.pipeline}: Redshift Serverless admin user",
            encryption_key=self.key,
            generate_secret_string=secretsmanager.SecretStringGenerator(
                secret_string_template=json.dumps({"username": REDSHIFT_ADMIN}),
                generate_string_key="password", exclude_punctuation=True, password_length=32),
        )
        self.redshift_admin_secret = admin
        namespace = rs.CfnNamespace(
            self, "RedshiftNamespace",
            namespace_name=cfg.pipeline,
            db_name=cfg.redshift_database,
            admin_username=REDSHIFT_ADMIN,
            admin_user_password=admin.secret_value_from_json("password").unsafe_unwrap(),  # dynamic reference
            kms_key_id=self.key.key_arn,
            iam_roles=[self.redshift_copy_role.role_arn, self.redshift_spectrum_role.role_arn],
            default_iam_role_arn=self.redshift_copy_role.role_arn,
            log_exports=["userlog", "connectionlog", "useractivitylog"],
        )
        workgroup = rs.CfnWorkgroup(
            self, "RedshiftWorkgroup",
            workgroup_name=cfg.pipeline,
            namespace_name=namespace.namespace_name,
            base_capacity=cfg.redshift_base_rpu,
            max_capacity=cfg.redshift_max_rpu,
            subnet_ids=self.subnet_ids,
            security_group_ids=[self.redshift_sg.attr_group_id],  # 5439 from the Glue security group only
            publicly_accessible=False,
            enhanced_vpc_routing=True,
        )
        workgroup.node.add_dependency(namespace)
        self.redshift_workgroup = workgroup
        # What the warehouse merge reads (cdcflow/glue.py: username, password, host, port, dbname): the
        # least-privilege ETL user's credentials, never the admin's. The password is generated here; the
        # user itself is created in the database by the custom resource below.
        template = self.to_json_string({"username": cfg.redshift_etl_user, "host": workgroup.attr_workgroup_endpoint_address,
                                        "port": REDSHIFT_PORT, "dbname": cfg.redshift_database})
        self.redshift_secret = secretsmanager.Secret(
            self, "RedshiftCredentials",
            description=f"cdcflow {cfg.pipeline}: Redshift user {cfg.redshift_etl_user} (warehouse merge, not an admin)",
            encryption_key=self.key,
            generate_secret_string=secretsmanager.SecretStringGenerator(
                secret_string_template=template, generate_string_key="password",
                exclude_punctuation=True, password_length=32),
        )
        # The warehouse schema and the ETL user with its grants, run as the admin through the Redshift Data
        # API by a custom resource that waits for each statement (infra/redshift_user/index.py); DIST/SORT
        # keys stay the merge's, generated from the table configs.
        schema = self.project.pipeline.warehouse.schema_
        wg_arn = workgroup.attr_workgroup_workgroup_arn
        handler_role = iam.Role(self, "RedshiftUserHandlerRole", assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
                                description="cdk deploy: creates the warehouse schema and the ETL user in Redshift")
        self._allow(handler_role, "ExecuteAsAdmin", ["redshift-data:ExecuteStatement"], [wg_arn])
        # DescribeStatement / GetStatementResult have no resource ARN; a caller only sees its own statements
        self._allow(handler_role, "StatementResults", ["redshift-data:DescribeStatement", "redshift-data:GetStatementResult"],
                    ["*"])
        self._allow(handler_role, "AdminCredentials", ["redshift-serverless:GetCredentials"], [wg_arn])
        self._allow(handler_role, "ReadSecrets", ["secretsmanager:GetSecretValue"],
                    [admin.secret_arn, self.redshift_secret.secret_arn])
        self._allow(handler_role, "DecryptSecrets", ["kms:Decrypt"], [self.key.key_arn])
        self._allow(handler_role, "Logs", ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"],
                    [self.format_arn(service="logs", resource="log-group", resource_name="/aws/lambda/*",
                                     arn_format=ArnFormat.COLON_RESOURCE_NAME)])
        fixed = handler_role.without_policy_updates()
        handler = lambda_.Function(
            self, "RedshiftUserHandler", runtime=lambda_.Runtime.PYTHON_3_12, handler="index.on_event",
            code=lambda_.Code.from_asset(str(REDSHIFT_USER_HANDLER), exclude=["__pycache__", "*.pyc"]),
            timeout=Duration.minutes(5), role=fixed,
            description="cdcflow: warehouse schema + least-privilege ETL user (Redshift Data API)")
        provider_role = iam.Role(self, "RedshiftUserProviderRole", assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
                                 description="cdk deploy: the custom resource framework calling RedshiftUserHandler")
        self._allow(provider_role, "InvokeHandler", ["lambda:InvokeFunction"],
                    [handler.function_arn, f"{handler.function_arn}:*"])
        self._allow(provider_role, "Logs", ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"],
                    [self.format_arn(service="logs", resource="log-group", resource_name="/aws/lambda/*",
                                     arn_format=ArnFormat.COLON_RESOURCE_NAME)])
        provider = cr.Provider(self, "RedshiftUserProvider", on_event_handler=handler,
                               framework_on_event_role=provider_role.without_policy_updates())
        self.warehouse_user = CustomResource(
            self, "WarehouseUser", service_token=provider.service_token, resource_type="Custom::RedshiftEtlUser",
            properties={"WorkgroupName": workgroup.workgroup_name, "Database": cfg.redshift_database,
                        "Schema": schema, "UserName": cfg.redshift_etl_user,
                        "AdminSecretArn": admin.secret_arn, "EtlSecretArn": self.redshift_secret.secret_arn,
                        # Spectrum: `create external schema` over the Glue database of manifest tables
                        "SpectrumSchema": cfg.redshift_spectrum_schema, "SpectrumDatabase": self.spectrum_database,
                        "SpectrumRoleArn": self.redshift_spectrum_role.role_arn},
        )
        self.warehouse_user.node.add_dependency(workgroup)

    def _orchestration(self) -> None:
        """Step Functions: full load -> warehouse merge -> compaction; Catch -> SNS with the failed step."""
        cfg = self.settings
        tables = sorted(self.project.tables)

        def glue_step(job: str, args: dict[str, str] | None = None) -> tasks.GlueStartJobRun:
            step = tasks.GlueStartJobRun(
                self, f"Run{_camel(job)}",
                state_name=_camel(job),
                glue_job_name=self.jobs[job].ref,
                integration_pattern=sfn.IntegrationPattern.RUN_JOB,  # .sync: waits for the run's end state
                arguments=sfn.TaskInput.from_object(args) if args else None,
                task_timeout=sfn.Timeout.duration(Duration.minutes(cfg.batch_job_timeout_minutes)),  # the run's Timeout
                result_path=f"$.{job.replace('-', '_')}",
                result_selector={"JobRunId.$": "$.Id", "JobRunState.$": "$.JobRunState",
                                 "ExecutionTime.$": "$.ExecutionTime"},
            )
            step.add_retry(errors=TRANSIENT_GLUE_ERRORS, interval=Duration.seconds(30), backoff_rate=2.0,
                           max_attempts=4, max_delay=Duration.minutes(10), jitter_strategy=sfn.JitterType.FULL)
            return step

        notify = tasks.SnsPublish(
            self, "NotifyFailure", state_name="NotifyFailure", topic=self.topic,
            subject=f"cdcflow {cfg.pipeline}: batch run failed",
            message=sfn.TaskInput.from_object({
                "pipeline": cfg.pipeline,
                "failed_step": sfn.JsonPath.string_at("$.failed_step"),
                "error": sfn.JsonPath.string_at("$.error.Error"),
                "cause": sfn.JsonPath.string_at("$.error.Cause"),
                "execution": sfn.JsonPath.string_at("$$.Execution.Id"),
            }),
            result_path=sfn.JsonPath.DISCARD,
        )
        failed = sfn.Fail(self, "BatchFailed", state_name="BatchFailed", error="cdcflow.BatchStepFailed",
                          cause_path="$.failed_step")
        notify.next(failed)

        steps = [glue_step("full-load"), glue_step("warehouse-merge"),
                 # The tables this flow touches (full load and merge work on the configured tables).
                 glue_step("compaction", {"--tables": ",".join(tables)})]
        for job, step in zip(("full-load", "warehouse-merge", "compaction"), steps, strict=True):
            mark = sfn.Pass(self, f"Failed{_camel(job)}", state_name=f"Failed{_camel(job)}",
                            parameters={"failed_step": _camel(job), "error.$": "$.error"})
            mark.next(notify)
            step.add_catch(mark, errors=["States.ALL"], result_path="$.error")
        definition = sfn.Chain.start(steps[0]).next(steps[1]).next(steps[2]).next(
            sfn.Succeed(self, "BatchDone", state_name="BatchDone"))

        log_group = logs.LogGroup(self, "BatchStateMachineLogs", encryption_key=self.key,
                                  retention=logs.RetentionDays.ONE_MONTH, removal_policy=RemovalPolicy.DESTROY)
        self.state_machine = sfn.StateMachine(
            self, "BatchStateMachine",
            state_machine_name=f"{cfg.pipeline}-batch",
            definition_body=sfn.DefinitionBody.from_chainable(definition),
            timeout=Duration.minutes(3 * cfg.batch_job_timeout_minutes + 60),  # three runs + retries
            logs=sfn.LogOptions(destination=log_group, level=sfn.LogLevel.ERROR, include_execution_data=False),
            tracing_enabled=False,
        )
        self._allow(self.state_machine.role, "PublishToEncryptedTopic", ["kms:GenerateDataKey", "kms:Decrypt"],
                    [self.key.key_arn])
        self.batch_schedule = events.Rule(
            self, "BatchSchedule",
            description=f"cdcflow {cfg.pipeline}: full load -> warehouse merge -> compaction",
            schedule=events.Schedule.expression(cfg.batch_schedule),
            targets=[targets.SfnStateMachine(self.state_machine)],
        )

    def _monitoring(self) -> None:
        """DMS / Kinesis / freshness / quarantine-rate / heartbeat alarms, and the pipeline dashboard."""
        cfg = self.settings
        action = cw_actions.SnsAction(self.topic)
        five = Duration.minutes(5)

        def alarm(name: str, metric: cw.IMetric, threshold: float, *, periods: int = 3, missing=None,
                  comparison=cw.ComparisonOperator.GREATER_THAN_THRESHOLD, description: str) -> cw.Alarm:
            a = cw.Alarm(self, f"Alarm{name}", alarm_name=f"{cfg.pipeline}-{name}", alarm_description=description,
                         metric=metric, threshold=threshold, evaluation_periods=periods, comparison_operator=comparison,
                         treat_missing_data=missing or cw.TreatMissingData.NOT_BREACHING)
            a.add_alarm_action(action)
            self.alarms[name] = a
            return a

        # DMS replication lag (seconds), per task that carries changes (the S3 task only loads).
        self.dms_metrics: dict[str, list[cw.Metric]] = {}
        for target in (t for t in self.dms_tasks if "cdc" in MIGRATION_TYPES[t]):
            dims = ({"ReplicationConfigIdentifier": dms_task_id(cfg.pipeline, target)} if cfg.dms_serverless else
                    {"ReplicationInstanceIdentifier": f"{cfg.pipeline}-dms",
                     "ReplicationTaskIdentifier": dms_task_id(cfg.pipeline, target)})
            for m in ("CDCLatencySource", "CDCLatencyTarget"):
                metric = cw.Metric(namespace="AWS/DMS", metric_name=m, dimensions_map=dims, statistic="Maximum",
                                   period=five)
                self.dms_metrics.setdefault(m, []).append(metric)
                alarm(f"{m}{_camel(target)}", metric, cfg.dms_latency_threshold_seconds,
                      description=f"DMS {target} task: {m} above {cfg.dms_latency_threshold_seconds}s (CDC lag).")
        # Kinesis: the streaming job falls behind / DMS is throttled.
        iterator_age = self.stream.metric_get_records_iterator_age_milliseconds(statistic="Maximum", period=five)
        alarm("KinesisIteratorAge", iterator_age, cfg.kinesis_iterator_age_threshold_ms,
              description="Records wait in the stream: the streaming job is falling behind.")
        throttled = self.stream.metric_write_provisioned_throughput_exceeded(statistic="Sum", period=five)
        alarm("KinesisWriteThrottled", throttled, 0, periods=2,
              description="DMS writes to the stream are throttled (shard capacity).")
        # Freshness: seconds from source commit to visible in silver, per table (EMF FreshnessSeconds).
        per_table = f"SCHEMA(\"{METRICS_NAMESPACE}\", Pipeline, \"Table\") WHERE Pipeline = '{cfg.pipeline}'"
        self._insights_alarm(
            "FreshnessSeconds", f"SELECT MAX(FreshnessSeconds) FROM {per_table}",
            threshold=cfg.freshness_threshold_seconds, comparison="GreaterThanThreshold", evaluation_periods=3,
            description=f"A table's changes take more than {cfg.freshness_threshold_seconds}s to reach silver.")
        # Quarantine rate per configured table: RowsQuarantined / RowsRead in percent.
        for name in sorted(self.project.tables):
            dims = {"Pipeline": cfg.pipeline, "Table": name}
            rate = cw.MathExpression(
                expression="IF(r > 0, 100 * q / r, 0)",
                using_metrics={
                    "q": cw.Metric(namespace=METRICS_NAMESPACE, metric_name="RowsQuarantined", dimensions_map=dims,
                                   statistic="Sum", period=five),
                    "r": cw.Metric(namespace=METRICS_NAMESPACE, metric_name="RowsRead", dimensions_map=dims,
                                   statistic="Sum", period=five),
                },
                period=five, label=f"{name} quarantine %",
            )
            alarm(f"QuarantineRate{_camel(name.replace('.', '-'))}", rate, cfg.quarantine_rate_percent, periods=1,
                  description=f"{name}: more than {cfg.quarantine_rate_percent}% of rows quarantined in 5 minutes.")
        # Heartbeat: the streaming job reports BatchDuration every micro-batch; none for N minutes = down.
        heartbeat = cw.Metric(namespace=METRICS_NAMESPACE, metric_name="BatchDuration",
                              dimensions_map={"Pipeline": cfg.pipeline}, statistic="SampleCount",
                              period=Duration.minutes(cfg.heartbeat_minutes))
        alarm("Heartbeat", heartbeat, 1, periods=1, comparison=cw.ComparisonOperator.LESS_THAN_THRESHOLD,
              missing=cw.TreatMissingData.BREACHING,
              description=f"No micro-batch metrics for {cfg.heartbeat_minutes} minutes: the streaming job is not running.")

        # Dashboard: lag, freshness, throughput, quarantine, DMS latency, job runs.
        def insights(title: str, query: str) -> cw.GraphWidget:
            return cw.GraphWidget(title=title, width=12, left=[cw.MathExpression(
                expression=query, using_metrics={}, period=Duration.minutes(1), label=title)])

        jobs = [j.ref for j in self.jobs.values()]
        job_runs = [cw.Metric(namespace="Glue", metric_name=m, statistic="Sum", period=Duration.hours(1),
                              dimensions_map={"JobName": j, "JobRunId": "ALL", "Type": "count"},
                              label=f"{m} {n}")
                    for n, j in zip(self.jobs, jobs, strict=True)
                    for m in ("glue.driver.aggregate.numCompletedTasks", "glue.driver.aggregate.numFailedTasks")]
        self.dashboard = cw.Dashboard(
            self, "Dashboard", dashboard_name=f"{cfg.pipeline}-pipeline",
            widgets=[
                [insights("Lag: MillisBehindLatest (max per shard)",
                          f"SELECT MAX(MillisBehindLatest) FROM SCHEMA(\"{METRICS_NAMESPACE}\", Pipeline, Shard, Stream) "
                          f"WHERE Stream = '{cfg.stream_name}' GROUP BY Shard"),
                 cw.GraphWidget(title="Lag: Kinesis iterator age (ms)", width=12, left=[iterator_age])],
                [insights("Freshness: seconds commit -> silver, per table",
                          f"SELECT MAX(FreshnessSeconds) FROM {per_table} GROUP BY \"Table\""),
                 cw.GraphWidget(title="Micro-batch duration (s)", width=12, left=[cw.Metric(
                     namespace=METRICS_NAMESPACE, metric_name="BatchDuration", dimensions_map={"Pipeline": cfg.pipeline},
                     statistic="Maximum", period=Duration.minutes(1))])],
                [insights("Throughput: rows read per table", f"SELECT SUM(RowsRead) FROM {per_table} GROUP BY \"Table\""),
                 insights("Throughput: rows applied per table",
                          f"SELECT SUM(RowsApplied) FROM {per_table} GROUP BY \"Table\"")],
                [insights("Quarantine: rows per table", f"SELECT SUM(RowsQuarantined) FROM {per_table} GROUP BY \"Table\""),
                 cw.GraphWidget(title="DMS CDC latency (s)", width=12,
                                left=self.dms_metrics["CDCLatencySource"] + self.dms_metrics["CDCLatencyTarget"])],
                [cw.GraphWidget(title="Glue job runs: completed / failed tasks", width=12, left=job_runs),
                 cw.AlarmStatusWidget(title="Alarms", width=12,
                                      alarms=[a for a in self.alarms.values() if isinstance(a, cw.Alarm)])],
            ],
        )

    def _packaging(self) -> None:
        """`cdk deploy` uploads the job bundle (dist/cdcflow.zip), the entry scripts and configs/."""
        cfg = self.settings
        # Staged under .cache/ (git-ignored), rebuilt on every synthesis; CDK copies it into cdk.out.
        staging = self.asset_staging = REPO_ROOT / ".cache" / "cdk-assets" / self.stack_name
        shutil.rmtree(staging, ignore_errors=True)
        for sub in ("dist", "scripts"):
            (staging / sub).mkdir(parents=True)
        config_dir = Path(cfg.config_dir) if cfg.config_dir else CONFIG_DIR
        _write_bundle(staging / "dist" / "cdcflow.zip", config_dir)
        from cdcflow.runtime import LOGSTORE_JAR

        if not LOGSTORE_JAR.exists():
            raise RuntimeError(f"{LOGSTORE_JAR} is missing (the jobs' Delta log store for S3): run `make install`")
        shutil.copyfile(LOGSTORE_JAR, staging / "dist" / LOGSTORE_JAR_NAME)
        for script in ENTRY_SCRIPTS:
            shutil.copyfile(REPO_ROOT / script, staging / "scripts" / Path(script).name)

        art = self.artifacts_bucket
        role = iam.Role(self, "DeployRole", description="cdk deploy: copies code and configs into the artifacts bucket",
                        assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"))
        prefixes = ("dist", "scripts", "configs")
        self._allow(role, "WriteCode", ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
                    [art.arn_for_objects(f"{p}/*") for p in prefixes])
        self._list(role, "ListCode", art, *prefixes)
        self._allow(role, "ReadAssets", ["s3:GetObject"],
                    [f"arn:{self.partition}:s3:::cdk-*-assets-{self.account}-{self.region}/*"])
        self._allow(role, "UseKey", ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey"], [self.key.key_arn])
        self._allow(role, "Logs", ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"],
                    [self.format_arn(service="logs", resource="log-group", resource_name="/aws/lambda/*",
                                     arn_format=ArnFormat.COLON_RESOURCE_NAME)])
        fixed = role.without_policy_updates()  # only the statements above: no grants added by the construct
        self.deployments = {}
        for prefix, source in (("dist", s3d.Source.asset(str(staging / "dist"))),
                               ("scripts", s3d.Source.asset(str(staging / "scripts"))),
                               ("configs", s3d.Source.asset(str(config_dir)))):
            self.deployments[prefix] = s3d.BucketDeployment(
                self, f"Deploy{_camel(prefix)}", destination_bucket=art, destination_key_prefix=f"{prefix}/",
                sources=[source], role=fixed, prune=True, retain_on_delete=False,
                server_side_encryption=s3d.ServerSideEncryption.AWS_KMS,
                server_side_encryption_aws_kms_key_id=self.key.key_id,
            )

    def _suppress_findings(self) -> None:
        """Linter findings we accept, each with its reason, as template metadata (checkov, cfn-lint)."""
        # cfn-lint W3005: CDK writes DependsOn beside a GetAtt/Ref for some of its own constructs (harmless).
        self.template_options.metadata = {"cfn-lint": {"config": {"ignore_checks": ["W3005"]}}}
        lambda_reasons = [
            ("CKV_AWS_115", "CDK deployment-time custom resource handler: runs only during cdk deploy"),
            ("CKV_AWS_116", "CDK custom resource handler: CloudFormation retries and reports its failures; no DLQ"),
            ("CKV_AWS_117", "CDK custom resource handler reaches only S3/Redshift Data APIs; no VPC resources"),
            ("CKV_AWS_173", "CDK custom resource handler environment holds no secrets"),
        ]
        for c in self.node.find_all():
            if not isinstance(c, CfnResource):
                continue
            if c.cfn_resource_type == "AWS::Lambda::Function":
                _checkov_skip(c, lambda_reasons)
            elif c.cfn_resource_type == "AWS::S3::Bucket":
                skips = [("CKV_AWS_18", "S3 server access logs need a separate log bucket; audit via CloudTrail "
                                        "data events on the account trail")]
                if c.node.scope is self.lake_bucket:
                    skips.append(("CKV_AWS_21", "Delta keeps history in its log and VACUUM deletes files on "
                                                "purpose; versioning would keep every rewritten file"))
                _checkov_skip(c, skips)

    # ================================================================ helpers

    def _bucket(self, construct_id: str, **kwargs: Any) -> s3.Bucket:
        bucket = s3.Bucket(
            self,
            construct_id,
            encryption=s3.BucketEncryption.KMS,
            encryption_key=self.key,
            bucket_key_enabled=True,
            block_public_access=s3.BlockPublicAccess.BLOCK_ALL,
            enforce_ssl=True,
            object_ownership=s3.ObjectOwnership.BUCKET_OWNER_ENFORCED,
            removal_policy=RemovalPolicy.RETAIN,
            **kwargs,
        )
        # The policy side of ExpectedBucketOwner: nobody outside this account reads or writes here
        # (DMS is given ExpectedBucketOwner=<this account> so it never writes to a bucket someone else owns).
        bucket.add_to_resource_policy(
            iam.PolicyStatement(
                sid="DenyOtherAccounts",
                effect=iam.Effect.DENY,
                principals=[iam.AnyPrincipal()],
                actions=["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket", "s3:PutObjectAcl"],
                resources=[bucket.bucket_arn, bucket.arn_for_objects("*")],
                conditions={"StringNotEquals": {"aws:PrincipalAccount": self.account}},
            )
        )
        return bucket

    @staticmethod
    def _allow(role: iam.Role, sid: str, actions: list[str], resources: list[str], conditions: dict | None = None) -> None:
        role.add_to_principal_policy(iam.PolicyStatement(sid=sid, actions=actions, resources=resources,
                                                         conditions=conditions))

    def _list(self, role: iam.Role, sid: str, bucket: s3.IBucket, *prefixes: str) -> None:
        """s3:ListBucket on the bucket, limited to the given prefixes."""
        allowed = [f"{p.strip('/')}/*" for p in prefixes] + [p.strip("/") for p in prefixes]
        self._allow(role, sid, ["s3:ListBucket", "s3:GetBucketLocation"], [bucket.bucket_arn],
                    {"StringLike": {"s3:prefix": allowed}})

    def _job_role(self, job: str, *, raw: bool = False, lake_write: bool, checkpoints: bool = False,
                  kinesis_read: bool = False, lake_write_paths: tuple[str, ...] = ()) -> iam.Role:
        cfg = self.settings
        name = _camel(job)
        role = iam.Role(
            self,
            f"JobRole{name}",
            description=f"cdcflow Glue job {cfg.pipeline}-{job}",
            assumed_by=iam.ServicePrincipal(
                "glue.amazonaws.com", conditions={"StringEquals": {"aws:SourceAccount": self.account}}
            ),
        )
        art = self.artifacts_bucket
        self._allow(role, "ReadCode", S3_READ, [art.arn_for_objects(p) for p in ("scripts/*", "configs/*", "dist/*")])
        self._allow(role, "GlueTempDir", S3_WRITE, [art.arn_for_objects("tmp/*")])
        art_prefixes = ["scripts", "configs", "dist", "tmp"]
        if checkpoints:
            self._allow(role, "Checkpoints", S3_WRITE, [art.arn_for_objects("checkpoints/*")])
            art_prefixes.append("checkpoints")
        self._list(role, "ListArtifacts", art, *art_prefixes)
        if raw:
            self._allow(role, "ReadRaw", S3_READ, [self.raw_bucket.arn_for_objects(f"{cfg.raw_prefix.strip('/')}/*")])
            self._list(role, "ListRaw", self.raw_bucket, cfg.raw_prefix)
        lake = self.lake_bucket.arn_for_objects(f"{cfg.lake_prefix.strip('/')}/*")
        self._allow(role, "Lake", S3_WRITE if lake_write else S3_READ, [lake])
        if lake_write_paths and not lake_write:
            base = cfg.lake_prefix.strip("/")
            self._allow(role, "LakeWrite", S3_WRITE,
                        [self.lake_bucket.arn_for_objects(f"{base}/{p}/*") for p in lake_write_paths])
        self._list(role, "ListLake", self.lake_bucket, cfg.lake_prefix)
        if kinesis_read:
            self._allow(role, "ReadStream", KINESIS_READ_ACTIONS, [self.stream.stream_arn])
        self._allow(role, "UseKey", KMS_USE, [self.key.key_arn])
        self._allow(role, "PutMetrics", ["cloudwatch:PutMetricData"], ["*"],  # PutMetricData has no resource ARN
                    {"StringEquals": {"cloudwatch:namespace": METRICS_NAMESPACE}})
        self._allow(
            role,
            "Logs",
            # AssociateKmsKey: the security configuration encrypts the job's log groups with the key
            ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents", "logs:AssociateKmsKey"],
            [self.format_arn(service="logs", resource="log-group", resource_name="/aws-glue/*",
                             arn_format=ArnFormat.COLON_RESOURCE_NAME)],
        )
        self.roles[job] = role
        return role

    def _job(self, job: str, role: iam.Role, *, command: str, script: str, workers: int, env: dict[str, str],
             args: dict[str, str] | None = None, modules: str = "", connections: list[str] | None = None) -> glue.CfnJob:
        cfg = self.settings
        art = self.artifacts_bucket.bucket_name
        default_arguments = {
            "--job-language": "python",
            "--datalake-formats": "delta",
            "--config": f"s3://{art}/configs/",
            "--cdcflow-env": self.to_json_string(env),
            # The cdcflow packages as a zip (not the wheel: its pyspark/delta-spark pins are for local runs;
            # Glue 5.1 brings Spark 3.5 + Delta 3.3) and the pure-Python dependencies Glue lacks.
            "--extra-py-files": f"s3://{art}/dist/cdcflow.zip",
            "--extra-jars": f"s3://{art}/dist/{LOGSTORE_JAR_NAME}",
            "--additional-python-modules": ",".join(m for m in (PYTHON_MODULES, modules) if m),
            "--TempDir": f"s3://{art}/tmp/{job}/",
            "--enable-metrics": "true",
            "--enable-continuous-cloudwatch-log": "true",
            "--enable-observability-metrics": "true",
            **(args or {}),
            # Glue takes one --conf argument: further settings are chained inside its value.
            "--conf": " --conf ".join(c for c in (LOGSTORE_SPARK_CONF, (args or {}).get("--conf")) if c),
        }
        j = glue.CfnJob(
            self,
            f"Job{_camel(job)}",
            name=f"{cfg.pipeline}-{job}",
            description=f"cdcflow {job}",
            role=role.role_arn,
            glue_version=GLUE_VERSION,
            command=glue.CfnJob.JobCommandProperty(
                name=command, python_version="3", script_location=f"s3://{art}/{script}"
            ),
            worker_type="G.1X",
            number_of_workers=workers,
            default_arguments=default_arguments,
            execution_property=glue.CfnJob.ExecutionPropertyProperty(max_concurrent_runs=1),
            security_configuration=self.glue_security.ref,
            connections=glue.CfnJob.ConnectionsListProperty(connections=connections) if connections else None,
            max_retries=0 if command == "gluestreaming" else 1,
            timeout=None if command == "gluestreaming" else cfg.batch_job_timeout_minutes,
        )
        self.jobs[job] = j
        return j

    def _insights_alarm(self, metric: str, query: str, *, threshold: float, comparison: str = "GreaterThanOrEqualToThreshold",
                        evaluation_periods: int = 1, description: str = "") -> cw.CfnAlarm:
        """An alarm over every Table / Shard of the metric: a CloudWatch Metrics Insights query."""
        alarm = cw.CfnAlarm(
            self,
            f"Alarm{metric}",
            alarm_name=f"{self.settings.pipeline}-{metric}",
            alarm_description=description,
            metrics=[cw.CfnAlarm.MetricDataQueryProperty(id="q", expression=query, period=300, return_data=True)],
            threshold=threshold,
            comparison_operator=comparison,
            evaluation_periods=evaluation_periods,
            treat_missing_data="notBreaching",
            alarm_actions=[self.topic.topic_arn],
        )
        self.alarms[metric] = alarm
        return alarm


def _checkov_skip(resource: CfnResource, skips: list[tuple[str, str]]) -> None:
    meta = resource.get_metadata("checkov") or {}
    meta.setdefault("skip", []).extend({"id": i, "comment": reason} for i, reason in skips)
    resource.add_metadata("checkov", meta)


def _write_bundle(dest: Path, config_dir: Path | None = None) -> None:
    """The job bundle: the cdcflow, streaming and batch packages as a zip with fixed timestamps, so the
    asset hash (and a deploy) changes only when the code does. The Python files beside the configs
    (DataFrame-API transform packages, `module:function`) go in at the zip's root, so the driver and
    the executors import them from --extra-py-files."""
    files = [(f, f.relative_to(REPO_ROOT)) for pkg in BUNDLE_PACKAGES for f in sorted((REPO_ROOT / pkg).rglob("*.py"))]
    if config_dir is not None:
        files += [(f, f.relative_to(config_dir)) for f in sorted(config_dir.rglob("*.py"))
                  if f.relative_to(config_dir).parts[0] != "tables"]
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as z:
        for f, name in files:
            if "__pycache__" in f.parts:
                continue
            info = zipfile.ZipInfo(name.as_posix(), date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            z.writestr(info, f.read_bytes(), zipfile.ZIP_DEFLATED)


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.replace("_", "-").split("-"))

