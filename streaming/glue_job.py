"""AWS Glue 5.1 streaming entry point: a thin adapter around the shared processor.

Glue provides the SparkSession (with --datalake-formats delta) and its own Kinesis source; everything
after the source (parse, mask, order, quality, apply, bronze, quarantine, metrics) is the same code
the local `cdcflow stream` runs. Job parameters:
  --config s3://bucket/configs/      the config folder (pipeline.yaml + tables/)
  --cdcflow-env '{"VAR": "value"}'   environment for ${VAR} interpolation (e.g. CDCFLOW_AWS_ENDPOINT="")
The PII salt comes from the CDCFLOW_PII_SALT environment (set from Secrets Manager by the job).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path


def download_configs(uri: str, dest: Path) -> Path:
    """Copy an s3:// config folder to a local folder (load_project reads local files)."""
    import boto3

    from cdcflow.aws import split_s3

    bucket, prefix = split_s3(uri.rstrip("/") + "/")
    s3 = boto3.client("s3")
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix):]
            if rel.endswith((".yaml", ".yml")):
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, obj["Key"], str(target))
    return dest


def glue_kinesis_options(project) -> dict[str, str]:
    k = project.pipeline.kinesis
    opts = {
        "streamName": k.stream,
        "startingPosition": {"trim_horizon": "TRIM_HORIZON", "latest": "LATEST", "at_timestamp": "timestamp"}[
            k.starting_position
        ],
        "maxFetchRecordsPerShard": str(k.max_records_per_shard),
        "classification": "json",
        "inferSchema": "false",
        "schema": "`data` binary",  # keep the raw DMS JSON: the shared parser reads it
        "emitConsumerLagMetrics": "true",
        "avoidEmptyBatches": "true",
    }
    if k.starting_position == "at_timestamp" and k.starting_timestamp:
        opts["startingTimestamp"] = k.starting_timestamp
    if project.pipeline.aws.endpoint_url:
        opts["endpointUrl"] = project.pipeline.aws.endpoint_url
    return opts


def main() -> None:  # pragma: no cover - runs inside AWS Glue only
    from awsglue.context import GlueContext
    from awsglue.utils import getResolvedOptions
    from pyspark.context import SparkContext

    from cdcflow.config import load_project
    from cdcflow.runtime import get_spark
    from streaming.job import checkpoint_location
    from streaming.processor import BatchProcessor
    from streaming.sources import from_kinesis_columns

    args = getResolvedOptions(sys.argv, ["JOB_NAME", "config"])
    extra = getResolvedOptions(sys.argv, ["cdcflow-env"]) if "--cdcflow-env" in sys.argv else {}
    os.environ.update(json.loads(extra.get("cdcflow_env", "{}")))
    glue = GlueContext(SparkContext.getOrCreate())
    spark = get_spark(mode="glue")
    project = load_project(download_configs(args["config"], Path(tempfile.mkdtemp())))
    frame = glue.create_data_frame.from_options(
        connection_type="kinesis", connection_options=glue_kinesis_options(project)
    )
    processor = BatchProcessor(spark, project)

    def batch(df, batch_id):
        # Glue's source columns (data, partitionKey, sequenceNumber, approximateArrivalTimestamp, ...)
        processor.process(from_kinesis_columns(df), batch_id)

    glue.forEachBatch(
        frame=frame,
        batch_function=batch,
        options={
            "windowSize": f"{project.pipeline.streaming.trigger_seconds} seconds",
            "checkpointLocation": checkpoint_location(project),
        },
    )


if __name__ == "__main__":  # pragma: no cover
    main()
