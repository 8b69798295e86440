"""CDC simulator: a seeded OLTP source emitting exactly what AWS DMS emits (Kinesis JSON, S3 Parquet),
with fault injection. The oracle (cdcflow.oracle) computes what the pipeline must produce from it."""

from cdcflow.sim.faults import FaultOptions, inject_kinesis
from cdcflow.sim.kinesis import KinesisEncoder, KinesisRecord, encode_history, send
from cdcflow.sim.run import SimOptions, SimResult, simulate
from cdcflow.sim.s3 import S3Options, S3Writer
from cdcflow.sim.source import Change, GenOptions, History, SourceModel, generate_history

__all__ = [
    "Change", "FaultOptions", "GenOptions", "History", "KinesisEncoder", "KinesisRecord", "S3Options", "S3Writer",
    "SimOptions", "SimResult", "SourceModel", "encode_history", "generate_history", "inject_kinesis", "send",
    "simulate",
]
