"""The one SparkSession factory: local Spark 4 + Delta for development, or the session Glue provides.

Local defaults are tuned for a 2-core machine. ANSI mode is set explicitly so that casts behave the
same on Glue 5.1 (Spark 3.5, ANSI off by default) and locally (Spark 4, ANSI on by default): the
pipeline detects type mismatches itself (a non-null value whose cast is null).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

from cdcflow import storage
from cdcflow.errors import UserError

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

REPO_ROOT = Path(__file__).resolve().parent.parent
# Maven jars (Delta) are resolved once into this project-local Ivy cache; `make install` warms it.
IVY_DIR = Path(os.environ.get("CDCFLOW_IVY_DIR", REPO_ROOT / ".cache" / "ivy"))

# Local file system without `chmod`/`readlink` processes (see cdcflow/java); built by `--warm`.
LOCALFS_SOURCES = Path(__file__).resolve().parent / "java"
LOCALFS_JAR = REPO_ROOT / ".cache" / "jars" / "cdcflow-localfs.jar"
# The Delta log store for S3 (cdcflow/java/cdcflow/delta); built by `--warm` once the SDK jars are resolved.
LOGSTORE_JAR = REPO_ROOT / ".cache" / "jars" / "cdcflow-logstore.jar"

_session: SparkSession | None = None


def java_major_version() -> int | None:
    java = shutil.which("java", path=os.path.join(os.environ["JAVA_HOME"], "bin") if "JAVA_HOME" in os.environ else None)
    java = java or shutil.which("java")
    if not java:
        return None
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not m:
        return None
    major = int(m.group(1))
    return int(m.group(2)) if major == 1 and m.group(2) else major


def check_java() -> None:
    major = java_major_version()
    if major is None:
        raise UserError("Java 17 is required for Spark but `java` was not found; install OpenJDK 17 and set JAVA_HOME")
    if major < 17:
        raise UserError(f"Java 17 is required for Spark, found Java {major}; install OpenJDK 17 and set JAVA_HOME")


def delta_package() -> str:
    """The Maven coordinate of the Delta jar matching the installed delta-spark and pyspark."""
    spark_major = int(version("pyspark").split(".")[0])
    scala = "2.13" if spark_major >= 4 else "2.12"
    return f"io.delta:delta-spark_{scala}:{version('delta-spark')}"


# S3 for local sessions: Hadoop's S3A (hadoop-aws, the version of pyspark's Hadoop client) and the AWS
# SDK v2 modules it uses, instead of the ~600 MB SDK `bundle` hadoop-aws depends on. Spark's own netty
# stays (the SDK's async client runs on it). Glue 5.1 ships its own S3A; the Glue tier's pyspark
# (Hadoop 3.3, SDK v1) gets none, so an s3:// lake runs on the main tier locally.
AWS_SDK_VERSION = "2.57.8"
AWS_SDK_MODULES = ("s3", "s3-transfer-manager", "apache-client")
PACKAGE_EXCLUDES = "software.amazon.awssdk:bundle,io.netty:*"
# The jars Ivy resolved for `spark_packages()`, written by the first session that resolved them.
JARS_MANIFEST = IVY_DIR / "cdcflow-jars.txt"


def hadoop_version() -> str | None:
    import pyspark

    found = sorted((Path(pyspark.__file__).parent / "jars").glob("hadoop-client-api-*.jar"))
    return found[-1].name.removeprefix("hadoop-client-api-").removesuffix(".jar") if found else None


def spark_packages() -> list[str]:
    """Maven coordinates every local session loads: Delta, and S3A where pyspark's Hadoop is 3.4+."""
    packages = [delta_package()]
    hadoop = hadoop_version()
    if hadoop and tuple(int(x) for x in hadoop.split(".")[:2]) >= (3, 4):
        packages.append(f"org.apache.hadoop:hadoop-aws:{hadoop}")
        packages += [f"software.amazon.awssdk:{m}:{AWS_SDK_VERSION}" for m in AWS_SDK_MODULES]
    return packages


def _manifest_key() -> str:
    return ",".join(spark_packages()) + " excluding " + PACKAGE_EXCLUDES


def cached_delta_jars() -> list[str] | None:
    """The jars of `spark_packages()` already resolved into the project Ivy cache, so later sessions
    skip Ivy entirely."""
    if not JARS_MANIFEST.exists():
        return None
    key, *jars = JARS_MANIFEST.read_text().splitlines()
    if key != _manifest_key() or not jars or not all(Path(j).exists() for j in jars):
        return None
    return jars


def _remember_jars(spark: SparkSession) -> None:
    """After Ivy resolved `spark_packages()`: note the jars for the next session."""
    jars = [j.removeprefix("file://") for j in spark.sparkContext.getConf().get("spark.jars", "").split(",") if j]
    if jars:
        JARS_MANIFEST.write_text("\n".join([_manifest_key(), *jars]) + "\n")


def build_localfs_jar() -> Path | None:
    """Compile the java.nio local file system (two small classes) against pyspark's Hadoop jar.

    Optional: without a JDK compiler, local runs use Hadoop's default local file system (slower:
    it starts a `chmod` process for every file and folder it writes).
    """
    import pyspark

    javac = shutil.which("javac", path=os.path.join(os.environ["JAVA_HOME"], "bin") if "JAVA_HOME" in os.environ else None)
    javac = javac or shutil.which("javac")
    hadoop = sorted((Path(pyspark.__file__).parent / "jars").glob("hadoop-client-api-*.jar"))
    if not javac or not hadoop:
        return None
    build = LOCALFS_JAR.parent / "localfs-classes"
    shutil.rmtree(build, ignore_errors=True)
    sources = [str(p) for p in sorted((LOCALFS_SOURCES / "cdcflow" / "fs").glob("*.java"))]
    subprocess.run([javac, "--release", "8", "-nowarn", "-cp", str(hadoop[-1]), "-d", str(build), *sources], check=True)
    jar = shutil.which("jar", path=os.path.dirname(javac))
    if jar:
        subprocess.run([jar, "cf", str(LOCALFS_JAR), "-C", str(build), "."], check=True)
    else:
        shutil.make_archive(str(LOCALFS_JAR.with_suffix("")), "zip", build)
        LOCALFS_JAR.with_suffix(".zip").replace(LOCALFS_JAR)
    shutil.rmtree(build, ignore_errors=True)
    return LOCALFS_JAR


def build_logstore_jar() -> Path | None:
    """Compile cdcflow.delta.S3ConditionalLogStore (cdcflow/java/cdcflow/delta) against the resolved
    delta-storage, AWS SDK and pyspark's Hadoop jars, for Java 8 (Glue 5.1 loads it too)."""
    import pyspark

    javac = shutil.which("javac", path=os.path.join(os.environ["JAVA_HOME"], "bin") if "JAVA_HOME" in os.environ else None)
    javac = javac or shutil.which("javac")
    jars = cached_delta_jars() or []
    hadoop = sorted((Path(pyspark.__file__).parent / "jars").glob("hadoop-client-api-*.jar"))
    if not javac or not hadoop or not any("awssdk_s3-" in j for j in jars):
        return None
    build = LOGSTORE_JAR.parent / "logstore-classes"
    shutil.rmtree(build, ignore_errors=True)
    sources = [str(p) for p in sorted((LOCALFS_SOURCES / "cdcflow" / "delta").glob("*.java"))]
    classpath = os.pathsep.join([*jars, str(hadoop[-1])])
    subprocess.run([javac, "--release", "8", "-nowarn", "-cp", classpath, "-d", str(build), *sources], check=True)
    shutil.make_archive(str(LOGSTORE_JAR.with_suffix("")), "zip", build)
    LOGSTORE_JAR.with_suffix(".zip").replace(LOGSTORE_JAR)
    shutil.rmtree(build, ignore_errors=True)
    return LOGSTORE_JAR


def localfs_conf() -> dict[str, str]:
    if not LOCALFS_JAR.exists():
        return {}
    return {
        "spark.driver.extraClassPath": str(LOCALFS_JAR),
        "spark.hadoop.fs.file.impl": "cdcflow.fs.NioLocalFileSystem",
        "spark.hadoop.fs.AbstractFileSystem.file.impl": "cdcflow.fs.NioLocalFs",
    }


def spark_versions() -> dict[str, str]:
    return {"pyspark": version("pyspark"), "delta-spark": version("delta-spark")}


# Static settings the streaming job wants wherever it runs (local runs here; the CDK stack passes
# the same ones to the Glue streaming job with --conf).
# Static settings (fixed when the JVM starts): local sessions set them at creation; the CDK stack
# passes them to the Glue stream job with --conf.
STREAMING_CONF = {
    # Every micro-batch plans the same few hundred queries again (per table: typed changes, the
    # MERGE, Delta's snapshot reads). Spark's generated-class cache holds 100 by default, so it
    # thrashed and every batch recompiled ~240 classes: ~6 s of Janino per batch on 2 cores, about
    # half of a small batch's time. With room for them, a steady-state batch compiles ~12.
    "spark.sql.codegen.cache.maxEntries": "2000",
}

# SQL settings every job relies on, local or on Glue (get_spark sets them on Glue's session too), so
# each Glue job runs with what the tests ran.
SESSION_SQL_CONF = {
    "spark.sql.ansi.enabled": "false",
    "spark.sql.session.timeZone": "UTC",
    # No whole-stage code generation: a micro-batch's plans are small and many, and the fused stage
    # code for wide projections cost more to compile and JIT than it saved. Issue 16's target 3 (4
    # sample tables, 10,000 events/s, same run as the canonical pattern): batches of 55-60k records
    # in 5.5-5.9 s instead of 77-114k in 8.7-11.4 s, p95 freshness 10.2 s instead of 18.1 s. A full
    # load of 1M rows: 25.8 / 26.5 s cold against 30.1 / 28.3 s with it on. Expressions stay
    # compiled (interpreting them too was slower on large batches; the full load took 50.9 s).
    "spark.sql.codegen.wholeStage": "false",
}


# A local batch job's JVM: the parallel (throughput) collector. A full load of 1M rows, fresh JVM,
# 2 cores: 16.9 / 17.3 s against 18.0-19.4 s with G1 (the default), 9.3 s against 10.5 warm
# (docs/design.md "Full-load throughput"). Only the collector: JIT thresholds measured no better.
BATCH_JAVA_OPTIONS = "-XX:+UseParallelGC"


def local_conf(shuffle_partitions: int = 2, driver_memory: str = "2g", ui: bool = False) -> dict[str, str]:
    jars = cached_delta_jars()
    jar_conf = {"spark.jars": ",".join(jars)} if jars else {
        "spark.jars.packages": ",".join(spark_packages()), "spark.jars.excludes": PACKAGE_EXCLUDES,
        "spark.jars.ivy": str(IVY_DIR)}
    if jars and LOGSTORE_JAR.exists() and any("awssdk_s3-" in j for j in jars):
        # Every Spark commit to an s3:// or s3a:// table goes through the conditional-PUT log store.
        jar_conf["spark.jars"] += "," + str(LOGSTORE_JAR)
        jar_conf.update({f"spark.delta.logStore.{scheme}.impl": storage.LOGSTORE_CLASS for scheme in ("s3", "s3a")})
    return {
        **jar_conf,
        **localfs_conf(),
        "spark.master": os.environ.get("CDCFLOW_SPARK_MASTER", "local[2]"),
        "spark.driver.memory": driver_memory,
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "spark.sql.shuffle.partitions": str(shuffle_partitions),
        "spark.default.parallelism": "2",
        **SESSION_SQL_CONF,
        "spark.ui.enabled": str(ui).lower(),
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.adaptive.enabled": "true",
        "spark.sql.streaming.stopGracefullyOnShutdown": "true",
        # Small local tables: avoid writing many tiny files and skip stats collection we never use.
        "spark.databricks.delta.snapshotPartitions": "2",
        "spark.databricks.delta.autoCompact.enabled": "false",
        # The checksum file costs a snapshot state computation per commit: with many small tables
        # (one commit per touched table per batch) it dominates. Readers don't need it.
        "spark.databricks.delta.writeChecksumFile.enabled": "false",
        "spark.databricks.delta.properties.defaults.checkpointInterval": "20",
        "spark.driver.extraJavaOptions": "-Dderby.system.home=" + str(REPO_ROOT / ".cache" / "derby"),
        "spark.sql.warehouse.dir": str(REPO_ROOT / ".cache" / "spark-warehouse"),
        "spark.python.worker.reuse": "true",
        **STREAMING_CONF,
        # PySpark 4 records the Python call site of every DataFrame/Column call (several JVM round
        # trips each); plan building for many tables is dominated by it. Errors still name the query.
        "spark.python.sql.dataFrameDebugging.enabled": "false",
    }


# Delta writes a checkpoint every `delta.checkpointInterval` commits, inside the commit. Tables that
# take one commit per micro-batch reach the same versions together, so with one interval they all
# checkpoint in the same batch (batch 20 of a sustained run took 11.4 s instead of 8). Each table the
# pipeline creates gets a prime interval picked by its name: two tables then checkpoint together
# only every p*q commits. The mean is about 20, Delta's default.
CHECKPOINT_INTERVALS = (13, 17, 19, 23, 29)


def new_table_options(name: str) -> dict[str, str]:
    """Writer options for a Delta table the pipeline creates (Delta applies them only on create)."""
    interval = CHECKPOINT_INTERVALS[zlib.crc32(name.encode()) % len(CHECKPOINT_INTERVALS)]
    return {"delta.checkpointInterval": str(interval)}


# Where the JVM's output goes when set (a file path; `-`: the console): log4j2 lines and anything the
# launcher or the JVM writes to stdout/stderr. The `cdcflow` command defaults it to CLI_SPARK_LOG (the
# demo to its workdir's spark.log), so the console shows cdcflow's own output only.
SPARK_LOG_ENV = "CDCFLOW_SPARK_LOG"
CLI_SPARK_LOG = ".cdcflow/logs/spark.log"  # relative to the working directory

LOG4J2_TEMPLATE = """# Written by cdcflow (runtime.spark_log_conf): every Spark / JVM log line goes to one file.
rootLogger.level = warn
rootLogger.appenderRef.file.ref = file
appender.file.type = File
appender.file.name = file
appender.file.fileName = {path}
appender.file.append = true
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = %d{{yy/MM/dd HH:mm:ss}} %p %c{{1}}: %m%n%ex
# Known-noisy loggers (as in Spark's log4j2-defaults.properties)
logger.jetty.name = org.sparkproject.jetty
logger.jetty.level = warn
logger.parquet.name = org.apache.parquet
logger.parquet.level = error
logger.rdd.name = org.apache.spark.rdd.MapPartitionsRDD
logger.rdd.level = error
"""


def spark_log_file() -> Path | None:
    """The file `SPARK_LOG_ENV` names; None (the console) when unset or `-`."""
    value = os.environ.get(SPARK_LOG_ENV)
    return Path(value).resolve() if value and value != "-" else None


def spark_log_conf(log_file: Path, driver_java_options: str) -> dict[str, str]:
    """Write a log4j2 properties file beside `log_file` routing every logger to it; the driver's
    java options that load it. Spark then skips its default console config (and its "Setting default
    log level" banner), which it only installs when log4j2 has no user configuration."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    props = log_file.with_name(log_file.name + ".log4j2.properties")
    props.write_text(LOG4J2_TEMPLATE.format(path=log_file))
    return {"spark.driver.extraJavaOptions": f"{driver_java_options} -Dlog4j2.configurationFile=file:{props}".strip()}


@contextmanager
def jvm_output_to(log_file: Path | None) -> Iterator[None]:
    """Point this process's stdout/stderr (file descriptors 1 and 2) at `log_file` while the JVM is
    launched: spark-submit's launcher and the JVM inherit them (JVM warnings such as "Using incubator
    modules", Ivy output, Python workers' stderr), then ours are restored."""
    if log_file is None:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(log_file, "ab") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def quiet_python_logging() -> None:
    """py4j logs connection chatter (and an ERROR when the JVM goes away at exit): not the user's concern."""
    logging.getLogger("py4j").setLevel(logging.CRITICAL)


def get_spark(
    app_name: str = "cdcflow",
    mode: str = "local",
    shuffle_partitions: int = 2,
    driver_memory: str = "2g",
    extra_conf: dict[str, str] | None = None,
    batch: bool = False,
) -> SparkSession:
    """Return the process-wide SparkSession (created once; Glue mode takes the active Glue session).
    `batch`: a local job that runs its rows through and exits (the full load) gets the JVM's
    throughput collector (BATCH_JAVA_OPTIONS); the stream keeps G1's short pauses."""
    global _session
    from pyspark.sql import SparkSession

    if _session is not None and not _session.sparkContext._jsc.sc().isStopped():  # type: ignore[union-attr]
        return _session
    if mode == "glue":
        # Glue creates the session (with --datalake-formats delta); only pin what we rely on.
        spark = SparkSession.getActiveSession() or SparkSession.builder.getOrCreate()
        for k, v in SESSION_SQL_CONF.items():
            spark.conf.set(k, v)
        _session = spark
        return spark
    check_java()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    builder = SparkSession.builder.appName(app_name)
    conf = local_conf(shuffle_partitions, driver_memory)
    if batch:
        conf["spark.driver.extraJavaOptions"] += " " + BATCH_JAVA_OPTIONS
    conf.update(extra_conf or {})
    log_file = spark_log_file()
    if log_file is not None:
        conf.update(spark_log_conf(log_file, conf.get("spark.driver.extraJavaOptions", "")))
        quiet_python_logging()
    for k, v in conf.items():
        builder = builder.config(k, v)
    with jvm_output_to(log_file):
        _session = builder.getOrCreate()
    if "spark.jars.packages" in conf:
        _remember_jars(_session)
    storage.apply_to(_session)
    _session.sparkContext.setLogLevel("WARN")
    # Delta MERGE keeps its source with a local checkpoint and unpersists it when done; each time the
    # RDD logs a WARN that the rows can't be recomputed, which is intended there. Not worth a line per MERGE.
    jvm = _session.sparkContext._jvm
    jvm.org.apache.logging.log4j.core.config.Configurator.setLevel(
        "org.apache.spark.rdd.MapPartitionsRDD", jvm.org.apache.logging.log4j.Level.ERROR
    )
    return _session


def sql_text(value: str) -> str:
    """`value` as a Spark SQL string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def sql_in(column: str, values: Iterable[str]) -> Column:
    """`column IN (values)` for a named column, built as one SQL expression. `Column.isin` makes a JVM
    call per value: at 1004 tables the stream's plans spent about 1 s of driver time a micro-batch
    on them (docs/design.md, "Where a micro-batch's time goes")."""
    from pyspark.sql import functions as F

    values = list(values)
    if not values:
        return F.col(column).isin([])
    return F.expr(f"`{column}` IN ({', '.join(sql_text(v) for v in values)})")


def materialize(df: DataFrame) -> DataFrame:
    """Compute `df` once and keep the rows (local checkpoint), cutting its lineage.

    Unlike persist(), the rows are used by every later plan, including the source of a Delta MERGE
    (which, when given a persisted DataFrame, recomputes the plan from scratch). Release with `release`.
    """
    return df.localCheckpoint(eager=True)


def release(df: DataFrame) -> None:
    """Free the rows kept by `materialize` now instead of at the next JVM garbage collection."""
    plan = df._jdf.queryExecution().analyzed()
    if plan.getClass().getSimpleName() == "LogicalRDD":
        # SparkContext.unpersistRDD (what RDD.unpersist calls), without RDD.unpersist's warning
        # that a locally checkpointed RDD can't be recomputed: it is never used again.
        df.sparkSession.sparkContext._jsc.sc().unpersistRDD(plan.rdd().id(), False)


def to_arrow(df: DataFrame):
    """The rows as one pyarrow Table (one Spark job): Spark 4's toArrow, or on Spark 3.5 (Glue 5.1)
    the Arrow batches it collects for toPandas."""
    import pyarrow as pa

    if hasattr(df, "toArrow"):
        return df.toArrow()
    from pyspark.sql.pandas.types import to_arrow_schema

    batches = df._collect_as_arrow()
    return pa.Table.from_batches(batches, schema=to_arrow_schema(df.schema)) if batches else \
        to_arrow_schema(df.schema).empty_table()


def read_delta(spark: SparkSession, path: str) -> DataFrame | None:
    """The Delta table at `path`, or None when there is none yet."""
    from pyspark.sql.utils import AnalysisException

    try:
        return spark.read.format("delta").load(path)
    except AnalysisException:
        return None


def forget_delta_table(spark: SparkSession, path: str) -> None:
    """Drop a table from Delta's process-wide DeltaLog cache (kept up to 60 minutes after last use).

    A table read and not written since keeps its whole snapshot state there: log-replay plans, the
    cached state RDD, broadcast Hadoop configurations, about 2.5 MB of driver heap per table. A step
    that reads many tables once (verify after 1000 tables) forgets each one after reading it, or a
    2 GB driver runs out of heap. The streaming job keeps its tables cached: a write leaves a light
    snapshot, and an evicted table would reload its log every batch.
    """
    jvm = spark.sparkContext._jvm  # type: ignore[union-attr]
    jvm.org.apache.spark.sql.delta.DeltaLog.invalidateCache(spark._jsparkSession, jvm.org.apache.hadoop.fs.Path(path))


def stop_spark() -> None:
    global _session
    if _session is not None:
        _session.stop()
        _session = None


if __name__ == "__main__":
    # `python -m cdcflow.runtime --warm`: check Java and resolve the Delta jars into the project cache.
    if "--warm" in sys.argv:
        LOCALFS_JAR.parent.mkdir(parents=True, exist_ok=True)
        built = build_localfs_jar()
        print(f"local file system: {built or 'Hadoop default (no javac found)'}")
        spark = get_spark("cdcflow-warm")
        print(f"Spark {spark.version} + Delta {version('delta-spark')} ready; jars in {IVY_DIR}")
        stop_spark()
        logstore = build_logstore_jar()
        print(f"S3 log store: {logstore or 'none (no javac, or no S3A jars for this runtime)'}")
