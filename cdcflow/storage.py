"""The lake's S3 settings, in one place for both engines that write it.

Spark reads and writes `s3://` / `s3a://` through Hadoop's S3A (locally: hadoop-aws and the AWS SDK v2
modules it needs, resolved by `make install`), delta-rs through its own object store. Both take the
endpoint, region and credentials from the pipeline config's `aws` block here; both commit to
`_delta_log` with S3 conditional writes (`If-None-Match: *`): Spark through
`cdcflow.delta.S3ConditionalLogStore` (cdcflow/java), delta-rs natively. See docs/design.md
"Commit protocol across processes".

`load_project` calls `use` with the loaded config, so every command (and test) that loads a project
has its S3 settings applied: to the local SparkSession when there is one (and to any created later),
and to every delta-rs call through `rs_options`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from cdcflow.config.models import AwsSettings

LOGSTORE_CLASS = "cdcflow.delta.S3ConditionalLogStore"

_aws: AwsSettings | None = None


def is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://", "s3n://"))


def use(aws: AwsSettings) -> None:
    """Make `aws` the settings of this process's S3 access (Spark's S3A and delta-rs)."""
    global _aws, _s3_client
    _aws, _s3_client = aws, None  # read_object's client follows the settings
    from cdcflow import runtime

    session = runtime._session
    if session is not None and is_local(session):
        apply_to(session)


def _credentials() -> tuple[str, str] | None:
    """Explicit keys only for an emulator (any keys work there, as in cdcflow.aws.client); on AWS the
    default provider chains (role, profile, environment) of S3A and delta-rs find them."""
    if not (_aws and _aws.endpoint_url):
        return None
    return os.environ.get("AWS_ACCESS_KEY_ID", "testing"), os.environ.get("AWS_SECRET_ACCESS_KEY", "testing")


def hadoop_conf() -> dict[str, str]:
    """Hadoop settings for a local SparkSession: `s3://` served by S3A too (as on Glue 5.1), the
    emulator's endpoint with path-style access."""
    conf = {
        "fs.s3.impl": "org.apache.hadoop.fs.s3a.S3AFileSystem",
        "fs.AbstractFileSystem.s3.impl": "org.apache.hadoop.fs.s3a.S3A",
        # Upload blocks buffered off-heap, not in local files: S3A's disk buffer asks for Hadoop's
        # LocalFileSystem class, which the local runs replace (cdcflow.fs.NioLocalFileSystem).
        "fs.s3a.fast.upload.buffer": "bytebuffer",
    }
    if _aws is None:
        return conf
    conf["fs.s3a.endpoint.region"] = _aws.region
    if _aws.endpoint_url:
        conf.update({
            "fs.s3a.endpoint": _aws.endpoint_url,
            "fs.s3a.path.style.access": "true",
            "fs.s3a.connection.ssl.enabled": str(_aws.endpoint_url.startswith("https://")).lower(),
            # An emulator has no region discovery and no bucket probes worth waiting for.
            "fs.s3a.bucket.probe": "0",
            "fs.s3a.change.detection.mode": "none",
        })
        key, secret = _credentials() or ("", "")
        conf.update({
            "fs.s3a.access.key": key,
            "fs.s3a.secret.key": secret,
            "fs.s3a.aws.credentials.provider": "org.apache.hadoop.fs.s3a.SimpleAWSCredentialsProvider",
        })
    return conf


def is_local(spark: SparkSession) -> bool:
    return spark.sparkContext.master.startswith("local")


def apply_to(spark: SparkSession) -> None:
    """Set `hadoop_conf` on a local session (before its first S3 access: S3A caches a file system
    per bucket with the settings it was created with)."""
    hconf = spark.sparkContext._jsc.hadoopConfiguration()  # type: ignore[union-attr]
    for k, v in hadoop_conf().items():
        hconf.set(k, v)


def rs_options(uri: str) -> dict[str, str] | None:
    """delta-rs storage options for `uri` (None for a local path). Commits on S3 use conditional PUT
    (`aws_conditional_put=etag`, delta-rs 1.x's default, set so no default change can undo it);
    `AWS_S3_ALLOW_UNSAFE_RENAME` is never set: it would let two writers overwrite each other."""
    if not is_s3(uri):
        return None
    opts = {"aws_conditional_put": "etag"}
    if _aws is None:
        return opts
    opts["AWS_REGION"] = _aws.region
    if _aws.endpoint_url:
        key, secret = _credentials() or ("", "")
        opts.update({
            "AWS_ENDPOINT_URL": _aws.endpoint_url,
            "AWS_ALLOW_HTTP": str(_aws.endpoint_url.startswith("http://")).lower(),
            "AWS_ACCESS_KEY_ID": key,
            "AWS_SECRET_ACCESS_KEY": secret,
        })
    return opts


_s3_client = None


def read_object(uri: str) -> bytes:
    """The bytes of a small object of the lake: a local path or s3://; FileNotFoundError if absent."""
    if not is_s3(uri):
        with open(uri, "rb") as f:
            return f.read()
    global _s3_client
    from cdcflow.aws import client, split_s3

    if _s3_client is None:  # boto3 clients are thread-safe; a second one made in a race is harmless
        _s3_client = client("s3", _aws.endpoint_url if _aws else None, _aws.region if _aws else None)
    bucket, key = split_s3(uri)
    try:
        return _s3_client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except _s3_client.exceptions.NoSuchKey as e:
        raise FileNotFoundError(uri) from e
