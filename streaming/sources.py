"""Streaming sources, each mapped to the columns the processor needs: payload, source_position, arrival_ts
(and, from archive lines only, prehashed: the columns the archiver hashed; cdcflow.cdc.masking).

- replay: DMS Kinesis JSON-lines files (from `cdcflow simulate`), one record per line, or the raw
  archiver's gzip JSON lines (`cdcflow archive`: shard, sequence number, arrival and the masked record
  per line; cdcflow/archive/records.py), in nested folders (`year=/month=/day=/hour=`). Gzip files
  are read by their `.gz` extension; `s3://` archives are downloaded first (cdcflow.archive.replay).
- kinesis: the Python Data Source in streaming/kinesis_source.py (pyspark >= 4).
- glue: Glue's own Kinesis source (see streaming/glue_job.py).
"""

from __future__ import annotations

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from cdcflow.config import Project


def replay_stream(spark: SparkSession, path: str, files_per_batch: int = 1) -> DataFrame:
    raw = (spark.readStream.format("text").option("maxFilesPerTrigger", files_per_batch)
           .option("recursiveFileLookup", "true").load(path))
    return from_replay(raw)


def from_replay(raw: DataFrame) -> DataFrame:
    """Text lines -> processor input. A DMS record's position is file + line hash (stable across
    re-reads); an archive line's is its shard and sequence number, as read from Kinesis, and its
    arrival time is the record's Kinesis arrival. `prehashed` lists the columns an archive line's
    `hashed` says are hashed already (so the processor doesn't hash them twice); null elsewhere."""
    value = F.col("value")
    shard, seq = F.get_json_object(value, "$.shard_id"), F.get_json_object(value, "$.sequence_number")
    data = F.get_json_object(value, "$.data")
    # archive lines start with their shard id (records.archive_line); the cheap prefix test keeps plain
    # DMS lines from paying for the JSON look-ups (CASE WHEN evaluates a branch only where it is taken)
    archived = value.startswith('{"shard_id":')
    arrival = (F.get_json_object(value, "$.arrival_ms").cast("double") / 1000).cast("timestamp")
    return raw.filter(F.length(F.trim("value")) > 0).select(
        F.when(archived, data).otherwise(value).alias("payload"),
        F.when(archived, F.concat(shard, F.lit(":"), seq))
        .otherwise(F.concat(F.input_file_name(), F.lit("#"), F.xxhash64("value").cast("string")))
        .alias("source_position"),
        F.when(archived, F.coalesce(arrival, F.current_timestamp())).otherwise(F.current_timestamp()).alias("arrival_ts"),
        F.when(archived, F.from_json(F.get_json_object(value, "$.hashed"), "array<string>")).alias("prehashed"),
    )


def from_kinesis_columns(raw: DataFrame) -> DataFrame:
    """Glue's / our Kinesis source columns (data, shardId, sequenceNumber, ...) -> processor input."""
    shard = F.col("shardId") if "shardId" in raw.columns else F.col("partitionKey")
    return raw.select(
        F.col("data").cast("string").alias("payload"),
        F.concat(shard, F.lit(":"), F.col("sequenceNumber")).alias("source_position"),
        F.col("approximateArrivalTimestamp").cast("timestamp").alias("arrival_ts"),
    )


def kinesis_stream(spark: SparkSession, project: Project, checkpoint: str, metrics_path: str | None = None) -> DataFrame:
    from streaming.kinesis_source import KinesisDataSource

    spark.dataSource.register(KinesisDataSource)
    k = project.pipeline.kinesis
    reader = (
        spark.readStream.format(KinesisDataSource.name())
        .option("streamName", k.stream)
        .option("region", project.pipeline.aws.region)
        .option("startingPosition", k.starting_position)
        .option("maxRecordsPerShard", str(k.max_records_per_shard))
        .option("maxRecordsPerRead", str(k.max_records_per_read))
        .option("checkpointLocation", checkpoint)  # lets the reader resume from Spark's offset log
        .option("pipeline", project.pipeline.name)
    )
    if metrics_path:
        reader = reader.option("metricsPath", metrics_path)
    if project.pipeline.aws.endpoint_url:
        reader = reader.option("endpointUrl", project.pipeline.aws.endpoint_url)
    if k.starting_timestamp:
        reader = reader.option("startingTimestamp", k.starting_timestamp)
    return from_kinesis_columns(reader.load())
