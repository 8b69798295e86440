"""The raw archiver as an always-on ECS Fargate service (`cdcflow archive`, cdcflow/archive/).

One task (1 vCPU, 2 GB) runs the KCL 3 MultiLangDaemon and one Python record processor per shard it
leases; more tasks would share the shards through the lease table. The stack creates the KCL's three
DynamoDB tables (the lease table with its LeaseOwnerToLeaseKeyIndex, <app>-CoordinatorState,
<app>-WorkerMetricStats), so the task role reaches only those names. The task role may:

- read the stream (polling: DescribeStream*, ListShards, GetShardIterator, GetRecords), decrypt with the key;
- put objects under `<raw bucket>/kinesis-archive/` only (SSE-KMS with the key);
- use its three tables (and Query the lease table's index);
- put KCL metrics into the namespace named after the application.

The execution role pulls the image, writes the log group and reads the PII salt secret (injected as
CDCFLOW_PII_SALT). The image (infra/archiver/Dockerfile) is built by `cdk deploy` (needs Docker on the
deploying machine; synthesis does not). The subnets must reach Kinesis, DynamoDB, S3, ECR, CloudWatch
Logs and Secrets Manager (NAT or VPC endpoints).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_dynamodb as ddb
from aws_cdk import aws_ecr_assets as ecr_assets
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_iam as iam
from aws_cdk import aws_logs as logs

ARCHIVE_PREFIX = "kinesis-archive"  # cdcflow.archive.records.default_archive_uri: s3://<raw bucket>/kinesis-archive
LEASE_INDEX = "LeaseOwnerToLeaseKeyIndex"
DOCKERFILE = Path(__file__).resolve().parent / "archiver" / "Dockerfile"


def add_archiver(stack: Any, env: dict[str, str], bundle: Any, config_dir: Path, staging: Path) -> None:
    """Add the archiver service to `stack` (a CdcflowStack, after its buckets, stream, key, salt and network)."""
    cfg = stack.settings
    app = f"{cfg.pipeline}-archiver"

    # ------------------------------------------------------------ the KCL's tables
    def table(construct_id: str, name: str, key: str) -> ddb.Table:
        return ddb.Table(
            stack, construct_id, table_name=name,
            partition_key=ddb.Attribute(name=key, type=ddb.AttributeType.STRING),
            billing_mode=ddb.BillingMode.PAY_PER_REQUEST,
            encryption=ddb.TableEncryption.CUSTOMER_MANAGED, encryption_key=stack.key,
            point_in_time_recovery_specification=ddb.PointInTimeRecoverySpecification(point_in_time_recovery_enabled=True),
            # leases and checkpoints only: lost, the archiver starts again from the stream's horizon (duplicates, no gaps)
            removal_policy=RemovalPolicy.DESTROY,
        )

    leases = table("ArchiverLeases", app, "leaseKey")
    leases.add_global_secondary_index(index_name=LEASE_INDEX,
                                      partition_key=ddb.Attribute(name="leaseOwner", type=ddb.AttributeType.STRING),
                                      projection_type=ddb.ProjectionType.KEYS_ONLY)
    coordinator = table("ArchiverCoordinatorState", f"{app}-CoordinatorState", "key")
    worker_metrics = table("ArchiverWorkerMetrics", f"{app}-WorkerMetricStats", "wid")
    stack.archiver_tables = {"leases": leases, "coordinator": coordinator, "worker_metrics": worker_metrics}

    # ------------------------------------------------------------ task role: least privilege
    role = iam.Role(
        stack, "ArchiverTaskRole",
        description=f"cdcflow {cfg.pipeline} raw archiver (KCL): read the stream, write the archive prefix",
        assumed_by=iam.ServicePrincipal("ecs-tasks.amazonaws.com",
                                        conditions={"StringEquals": {"aws:SourceAccount": stack.account}}),
    )
    allow = stack._allow
    allow(role, "ReadStream", ["kinesis:DescribeStream", "kinesis:DescribeStreamSummary", "kinesis:GetRecords",
                               "kinesis:GetShardIterator", "kinesis:ListShards"], [stack.stream.stream_arn])
    allow(role, "WriteArchive", ["s3:PutObject", "s3:AbortMultipartUpload"],
          [stack.raw_bucket.arn_for_objects(f"{ARCHIVE_PREFIX}/*")])
    allow(role, "UseKey", ["kms:Decrypt", "kms:Encrypt", "kms:GenerateDataKey", "kms:DescribeKey"], [stack.key.key_arn])
    table_arns = [t.table_arn for t in (leases, coordinator, worker_metrics)]
    allow(role, "KclTables", ["dynamodb:CreateTable", "dynamodb:DescribeTable", "dynamodb:UpdateTable",
                              "dynamodb:Scan", "dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem",
                              "dynamodb:DeleteItem"], table_arns)
    allow(role, "KclLeaseIndex", ["dynamodb:Query"], [f"{leases.table_arn}/index/*"])
    allow(role, "KclMetrics", ["cloudwatch:PutMetricData"], ["*"],  # PutMetricData has no resource ARN
          {"StringEquals": {"cloudwatch:namespace": app}})
    stack.roles["archiver"] = role

    # ------------------------------------------------------------ image, logs, task definition
    context = staging / "archiver"
    shutil.rmtree(context, ignore_errors=True)
    context.mkdir(parents=True)
    shutil.copyfile(DOCKERFILE, context / "Dockerfile")
    shutil.copyfile(bundle, context / "cdcflow.zip")
    shutil.copytree(config_dir, context / "configs")
    image = ecr_assets.DockerImageAsset(stack, "ArchiverImage", directory=str(context),
                                        platform=ecr_assets.Platform.LINUX_AMD64)

    log_group = logs.LogGroup(stack, "ArchiverLogs", log_group_name=f"/cdcflow/{cfg.pipeline}/archiver",
                              retention=logs.RetentionDays.ONE_YEAR, encryption_key=stack.key,
                              removal_policy=RemovalPolicy.RETAIN)
    task = ecs.FargateTaskDefinition(stack, "ArchiverTask", cpu=1024, memory_limit_mib=2048, task_role=role,
                                     family=app, volumes=[ecs.Volume(name="tmp")])
    container = task.add_container(
        "archiver",
        image=ecs.ContainerImage.from_docker_image_asset(image),
        logging=ecs.LogDrivers.aws_logs(stream_prefix="archiver", log_group=log_group),
        environment={**env, "CDCFLOW_ARCHIVE_URI": f"s3://{stack.raw_bucket.bucket_name}/{ARCHIVE_PREFIX}"},
        secrets={"CDCFLOW_PII_SALT": ecs.Secret.from_secrets_manager(stack.pii_salt)},
        readonly_root_filesystem=True,
        stop_timeout=Duration.seconds(60),
    )
    container.add_mount_points(ecs.MountPoint(container_path="/tmp", source_volume="tmp", read_only=False))

    # ------------------------------------------------------------ cluster and service (no VPC lookup:
    # the stack's subnets and security groups, as for DMS and Redshift)
    cluster = ecs.CfnCluster(stack, "ArchiverCluster", cluster_name=app,
                             cluster_settings=[ecs.CfnCluster.ClusterSettingsProperty(name="containerInsights",
                                                                                       value="enabled")])
    service = ecs.CfnService(
        stack, "ArchiverService", cluster=cluster.ref, service_name=app, task_definition=task.task_definition_arn,
        launch_type="FARGATE", platform_version="LATEST", desired_count=1,
        # one worker at a time during deploys: the old task's leases move to the new one (failover)
        deployment_configuration=ecs.CfnService.DeploymentConfigurationProperty(
            minimum_healthy_percent=0, maximum_percent=100),
        network_configuration=ecs.CfnService.NetworkConfigurationProperty(
            awsvpc_configuration=ecs.CfnService.AwsVpcConfigurationProperty(
                subnets=stack.subnet_ids, security_groups=stack.security_group_ids, assign_public_ip="DISABLED")),
    )
    stack.archiver_service = service
