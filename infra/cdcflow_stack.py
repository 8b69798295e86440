"""The AWS side of cdcflow: storage, stream, Glue jobs, secrets, least-privilege roles and alarms.

What is here (one stack):
- a customer-managed KMS key encrypting every bucket, the Kinesis stream, the secrets and the alarm topic;
- three buckets (raw DMS landing, Delta lake, artifacts = scripts/configs/checkpoints/tmp), all with
  public access blocked, TLS enforced, SSE-KMS and a policy that refuses principals of other accounts;
- the Kinesis stream DMS writes to (on-demand, or provisioned with `shards` from context);
- the IAM role DMS assumes for its Kinesis and S3 targets (put to that stream / that prefix only);
- the Glue 5.1 streaming job and three Glue batch jobs (full load, warehouse merge, compaction), each
  with its own role; warehouse merge and compaction run on Glue schedule triggers;
- Secrets Manager secrets for the PII salt and the Redshift credentials;
- the IAM role Redshift assumes to COPY the warehouse merge's staging files (read-only, that prefix);
- CloudWatch alarms on the job's EMF metrics (namespace "cdcflow") plus Glue job failures -> SNS.

DMS endpoints/tasks, Redshift and networking are out of scope.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from aws_cdk import ArnFormat, CfnOutput, Duration, RemovalPolicy, Stack
from aws_cdk import aws_cloudwatch as cw
from aws_cdk import aws_cloudwatch_actions as cw_actions
from aws_cdk import aws_events as events
from aws_cdk import aws_events_targets as targets
from aws_cdk import aws_glue as glue
from aws_cdk import aws_iam as iam
from aws_cdk import aws_kinesis as kinesis
from aws_cdk import aws_kms as kms
from aws_cdk import aws_s3 as s3
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_sns as sns
from aws_cdk import aws_sns_subscriptions as subs
from constructs import Construct

METRICS_NAMESPACE = "cdcflow"  # cdcflow/metrics.py NAMESPACE
GLUE_VERSION = "5.1"
KINESIS_READ_ACTIONS = [
    "kinesis:DescribeStream",
    "kinesis:DescribeStreamSummary",
    "kinesis:GetRecords",
    "kinesis:GetShardIterator",
    "kinesis:ListShards",
]
PYTHON_MODULES = "pydantic>=2.6,tenacity>=8.2,rich>=13.7,sqlglot>=25"
WAREHOUSE_MODULES = "redshift_connector>=2.1,psycopg[binary]>=3.1"  # warehouse merge: Redshift or Postgres
WAREHOUSE_STAGING = "warehouse-staging"  # artifacts bucket prefix (warehouse.s3_staging)
S3_READ = ["s3:GetObject"]
S3_WRITE = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
KMS_USE = ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey", "kms:DescribeKey"]


# Static Spark settings of the streaming job (the same as cdcflow.runtime.STREAMING_CONF for local
# runs): room in the generated-class cache for every query a micro-batch plans, so steady-state
# batches reuse compiled code instead of recompiling a few hundred classes each.
STREAMING_SPARK_CONF = "spark.sql.codegen.cache.maxEntries=2000"


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
    warehouse_merge_schedule: str = "cron(15 * * * ? *)"  # hourly
    compaction_schedule: str = "cron(30 3 * * ? *)"  # daily 03:30 UTC
    alarm_email: str = ""
    rows_quarantined_threshold: int = 100  # per 5 minutes, all tables
    millis_behind_latest_threshold: int = 300_000  # 5 minutes behind the stream tip
    batch_duration_threshold_seconds: int = 120

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
        self.redshift_secret = secretsmanager.Secret(
            self,
            "RedshiftCredentials",
            description=f"cdcflow {cfg.pipeline}: Redshift user for the warehouse merge (fill in host/dbname)",
            encryption_key=self.key,
            generate_secret_string=secretsmanager.SecretStringGenerator(
                secret_string_template=json.dumps({"username": "cdcflow", "host": "", "port": 5439, "dbname": "dev"}),
                generate_string_key="password",
                exclude_punctuation=True,
                password_length=32,
            ),
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

        full_load_role = self._job_role("full-load", raw=True, lake_write=True)
        self.pii_salt.grant_read(full_load_role)
        self._job("full-load", full_load_role, command="glueetl", script="scripts/glue_full_load.py",
                  workers=cfg.batch_workers, env=env, args={"--pii-salt-secret-id": self.pii_salt.secret_arn})

        # Reads the lake; writes only its DQ quarantine rows and run reports, and the staging files
        # Redshift COPYs (with its own role, which may only read them).
        merge_role = self._job_role("warehouse-merge", lake_write=False, lake_write_paths=("quarantine", "_reports"))
        self.redshift_secret.grant_read(merge_role)
        staging_objects = self.artifacts_bucket.arn_for_objects(f"{WAREHOUSE_STAGING}/*")
        self._allow(merge_role, "WarehouseStaging", S3_WRITE, [staging_objects])
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
        merge_env = {
            **env,
            "CDCFLOW_WAREHOUSE_S3_STAGING": f"s3://{self.artifacts_bucket.bucket_name}/{WAREHOUSE_STAGING}",
            "CDCFLOW_WAREHOUSE_IAM_ROLE": self.redshift_copy_role.role_arn,
        }
        self._job("warehouse-merge", merge_role, command="glueetl", script="scripts/glue_warehouse_merge.py",
                  workers=cfg.batch_workers, env=merge_env, modules=WAREHOUSE_MODULES,
                  args={"--redshift-secret-id": self.redshift_secret.secret_arn})

        compaction_role = self._job_role("compaction", lake_write=True)
        self._job("compaction", compaction_role, command="glueetl", script="scripts/glue_compaction.py",
                  workers=cfg.batch_workers, env=env)

        for job, schedule in (("warehouse-merge", cfg.warehouse_merge_schedule), ("compaction", cfg.compaction_schedule)):
            glue.CfnTrigger(
                self,
                f"Schedule{_camel(job)}",
                name=f"{cfg.pipeline}-{job}-schedule",
                type="SCHEDULED",
                schedule=schedule,
                start_on_creation=True,
                actions=[glue.CfnTrigger.ActionProperty(job_name=self.jobs[job].ref)],
            )

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
        CfnOutput(self, "StreamingJobName", value=self.jobs["stream"].ref)
        CfnOutput(self, "RedshiftCopyRoleArn", value=self.redshift_copy_role.role_arn,
                  description="Associate this IAM role with the Redshift cluster (the merge's COPY uses it)")

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
            ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"],
            [self.format_arn(service="logs", resource="log-group", resource_name="/aws-glue/*",
                             arn_format=ArnFormat.COLON_RESOURCE_NAME)],
        )
        self.roles[job] = role
        return role

    def _job(self, job: str, role: iam.Role, *, command: str, script: str, workers: int, env: dict[str, str],
             args: dict[str, str] | None = None, modules: str = "") -> glue.CfnJob:
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
            "--additional-python-modules": ",".join(m for m in (PYTHON_MODULES, modules) if m),
            "--TempDir": f"s3://{art}/tmp/{job}/",
            "--enable-metrics": "true",
            "--enable-continuous-cloudwatch-log": "true",
            "--enable-observability-metrics": "true",
            **(args or {}),
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
            max_retries=0 if command == "gluestreaming" else 1,
            timeout=None if command == "gluestreaming" else 240,
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


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.replace("_", "-").split("-"))

