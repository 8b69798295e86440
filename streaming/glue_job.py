"""AWS Glue 5.1 streaming entry point: a thin adapter around the shared processor.

Glue provides the SparkSession (with --datalake-formats delta) and its own Kinesis source; everything
after the source (parse, mask, order, quality, apply, bronze, quarantine, metrics) is the same code
the local `cdcflow stream` runs. The job parameters (--config, --cdcflow-env, --pii-salt-secret-id)
are turned into the loaded Project by `cdcflow.glue.glue_project`, shared with the batch entry scripts.
"""

from __future__ import annotations

import sys


def glue_kinesis_options(project) -> dict[str, str]:
    """connection_options for Glue's Kinesis source; the raw DMS JSON is kept for the shared parser."""
    k = project.pipeline.kinesis
    opts = {
        "streamName": k.stream,
        "startingPosition": {"trim_horizon": "TRIM_HORIZON", "latest": "LATEST", "at_timestamp": "timestamp"}[
            k.starting_position
        ],
        "maxFetchRecordsPerShard": str(k.max_records_per_shard),
        "maxRecordPerRead": str(k.max_records_per_read),
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
    from pyspark.context import SparkContext

    from cdcflow.glue import glue_project
    from cdcflow.runtime import get_spark
    from streaming.job import checkpoint_location
    from streaming.processor import BatchProcessor
    from streaming.sources import from_kinesis_columns

    glue = GlueContext(SparkContext.getOrCreate())
    spark = get_spark(mode="glue")
    project = glue_project(sys.argv)
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
