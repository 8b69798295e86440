"""`cdcflow status`: per table, what the lake holds and how current it is, read without Spark.

From the lake (delta-rs reads the Delta logs and a few columns):
- silver: live rows and tombstones (`_is_deleted`), the newest Delta commit, the newest source commit
  applied (`_commit_ts`, hence freshness) and the newest apply time (`_ingested_at`);
- bronze: the last applied batch per feed (the stream's micro-batch id, the full load's file group),
  from the file statistics in the Delta log (data files are read only when a file mixes feeds);
- quarantine: rows per table (table-less rules such as malformed JSON on a line of their own);
- the stream's checkpoint: the last committed micro-batch, when, and batches planned but not committed;
- the stream's newest DQ report (`_reports/dq/stream-*.json`): failures per table and raw_to_staging rule.

From the metrics (the EMF lines `cdcflow stream --metrics-file` writes), when given: the stream's
MillisBehindLatest per shard and each table's FreshnessSeconds (source commit -> visible in silver)
of its last batch.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from cdcflow.config import Project, join_uri
from cdcflow.errors import UserError

# The metrics file can grow for as long as a stream runs: only its tail holds the latest values.
METRICS_TAIL_BYTES = 4 * 2**20


@dataclass
class TableStatus:
    table: str
    exists: bool = False
    rows: int | None = None  # live rows
    deleted: int | None = None  # tombstones (soft deletes)
    version: int | None = None  # silver's Delta version
    last_commit: datetime | None = None  # silver's newest Delta commit
    newest_change: datetime | None = None  # newest source commit applied (max _commit_ts)
    last_ingested: datetime | None = None  # newest apply time (max _ingested_at)
    batches: dict[str, int] = field(default_factory=dict)  # bronze feed -> last applied batch id
    quarantined: int = 0  # rows the stream / full load quarantined
    warehouse_quarantined: int = 0  # rows the warehouse stages (staging_to_dimension, dimension_to_fact) quarantined
    latency_seconds: float | None = None  # metrics: FreshnessSeconds of the table's last batch
    error: str | None = None

    def freshness_seconds(self, now: datetime) -> float | None:
        """How old the newest applied source change is."""
        return None if self.newest_change is None else max(0.0, (now - self.newest_change).total_seconds())


@dataclass
class StreamStatus:
    checkpoint: str
    last_batch: int | None = None  # newest committed micro-batch
    last_batch_at: datetime | None = None
    pending_batches: int = 0  # planned (offsets written) but not committed
    millis_behind: dict[str, int] = field(default_factory=dict)  # metrics: shard -> MillisBehindLatest
    lag_reported_at: datetime | None = None

    @property
    def max_millis_behind(self) -> int | None:
        return max(self.millis_behind.values()) if self.millis_behind else None


@dataclass
class Status:
    generated_at: datetime
    lake: str
    tables: list[TableStatus]
    stream: StreamStatus
    unattributed_quarantine: int = 0  # rows with no table (malformed JSON, unknown tables)
    metrics_file: str | None = None
    dq: dict[str, Any] | None = None  # the stream's newest DQ report (_reports/dq/stream-*.json), as written

    def as_dict(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            if isinstance(v, datetime):
                return v.isoformat()
            if isinstance(v, dict):
                return {k: plain(x) for k, x in v.items()}
            if isinstance(v, list):
                return [plain(x) for x in v]
            return v

        out = plain(asdict(self))
        for t, d in zip(self.tables, out["tables"], strict=True):
            d["freshness_seconds"] = t.freshness_seconds(self.generated_at)
        out["stream"]["max_millis_behind"] = self.stream.max_millis_behind
        return out


# ---------------------------------------------------------------- lake


def _open(project: Project, path: str):
    """The delta-rs table at `path`, or None when there is none."""
    from deltalake import DeltaTable

    from cdcflow.cdc.apply import rs_uri
    from cdcflow.storage import rs_options

    uri = rs_uri(path)
    try:
        return DeltaTable(uri, storage_options=rs_options(uri))
    except Exception as e:  # noqa: BLE001 - delta-rs raises TableNotFoundError (or an OSError on S3) for "none"
        if type(e).__name__ == "TableNotFoundError" or (not uri.startswith("s3://") and not Path(uri).exists()):
            return None
        raise


def _utc(v: Any) -> datetime | None:
    if v is None:
        return None
    if isinstance(v, int | float):  # Delta commit timestamps: epoch milliseconds
        return datetime.fromtimestamp(v / 1000, UTC)
    return v.astimezone(UTC) if v.tzinfo else v.replace(tzinfo=UTC)


def _max(column) -> Any:
    import pyarrow.compute as pc

    return pc.max(column).as_py() if len(column) else None


def silver_status(project: Project, name: str) -> TableStatus:
    st = TableStatus(name)
    dt = _open(project, project.path(project.table(name).delta_path))
    if dt is None:
        return st
    st.exists = True
    st.version = dt.version()
    history = dt.history(1)
    st.last_commit = _utc(history[0]["timestamp"]) if history else None
    st.rows, st.deleted, st.newest_change, st.last_ingested = _silver_numbers(dt)
    return st


SilverNumbers = tuple[int | None, int | None, datetime | None, datetime | None]


def _silver_numbers(dt) -> SilverNumbers:
    """(live rows, tombstones, max _commit_ts, max _ingested_at) from three columns.

    delta-rs refuses to read tables with reader features it lacks (typeWidening, which the Spark
    silver writer enables when a column widens): those are read file by file from the files the log
    lists, when local and without deletion vectors; otherwise from the log's statistics alone."""
    import pyarrow.compute as pc

    wanted = [c for c in ("_is_deleted", "_commit_ts", "_ingested_at") if c in dt.schema().to_arrow().names]
    try:
        parts = [dt.to_pyarrow_table(columns=wanted)]
    except Exception as e:  # noqa: BLE001 - delta-rs' DeltaProtocolError: an unsupported reader feature
        if type(e).__name__ != "DeltaProtocolError":
            raise
        parts = _read_files(dt, wanted)
        if parts is None:
            return _from_stats(dt)
    rows = deleted = 0
    newest: list[Any] = []
    ingested: list[Any] = []
    for data in parts:
        gone = pc.sum(pc.fill_null(data["_is_deleted"], False).cast("int64")).as_py() or 0 \
            if "_is_deleted" in data.column_names else 0
        rows, deleted = rows + data.num_rows - gone, deleted + gone
        if "_commit_ts" in data.column_names:
            newest.append(_utc(_max(data["_commit_ts"])))
        if "_ingested_at" in data.column_names:
            ingested.append(_utc(_max(data["_ingested_at"])))
    return rows, deleted, max(filter(None, newest), default=None), max(filter(None, ingested), default=None)


def _read_files(dt, columns: list[str]) -> list | None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = rs_root(dt)
    if root is None or "deletionVectors" in set(dt.protocol().reader_features or ()):
        return None
    out = []
    for rel in pa.table(dt.get_add_actions(flatten=True))["path"].to_pylist():
        path = Path(unquote(rel)) if rel.startswith("/") else root / unquote(rel)
        present = [c for c in columns if c in pq.read_schema(path).names]
        out.append(pq.read_table(path, columns=present))
    return out


def rs_root(dt) -> Path | None:
    """The local folder of a delta-rs table (None on object stores)."""
    uri = dt.table_uri
    if uri.startswith("file://"):
        return Path(unquote(uri[len("file://"):]))
    return None if "://" in uri else Path(uri)


def _from_stats(dt) -> SilverNumbers:
    """Rows (tombstones included; not told apart) and newest times from the per-file statistics."""
    import pyarrow as pa

    files = pa.table(dt.get_add_actions(flatten=True))
    names = files.column_names

    def newest(col: str) -> datetime | None:
        return _utc(_max(files[f"max.{col}"])) if f"max.{col}" in names else None

    return sum(files["num_records"].to_pylist()), None, newest("_commit_ts"), newest("_ingested_at")


def bronze_batches(project: Project) -> dict[str, dict[str, int]]:
    """table -> feed -> last batch id in bronze. From the Delta log's per-file min/max statistics; a
    file whose feed is not one value there (a compacted file mixing feeds) is read (two columns)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    dt = _open(project, project.path("bronze"))
    if dt is None:
        return {}
    files = pa.table(dt.get_add_actions(flatten=True)).to_pylist()
    out: dict[str, dict[str, int]] = {}
    mixed: list[dict[str, Any]] = []

    def note(table: str, feed: str, batch: int | None) -> None:
        if batch is not None:
            feeds = out.setdefault(table, {})
            feeds[feed] = max(batch, feeds.get(feed, batch))

    for f in files:
        feed, batch = f.get("min.feed"), f.get("max.batch_id")
        if feed is not None and feed == f.get("max.feed"):
            note(f["partition.table"], feed, batch)
        else:
            mixed.append(f)
    if mixed:
        data = dt.to_pyarrow_table(columns=["table", "feed", "batch_id"],
                                   filters=[("table", "in", sorted({f["partition.table"] for f in mixed}))])
        grouped = data.group_by(["table", "feed"]).aggregate([("batch_id", "max")])
        for r in grouped.filter(pc.is_valid(grouped["feed"])).to_pylist():
            note(r["table"], r["feed"], r["batch_id_max"])
    return out


WAREHOUSE_STAGES = ("staging_to_dimension: ", "dimension_to_fact: ")


def quarantine_counts(project: Project) -> tuple[dict[str | None, int], dict[str | None, int]]:
    """(table -> rows the stream / full load quarantined, table -> rows the warehouse stages quarantined);
    table None: records with no table (malformed JSON, unknown tables)."""
    import pyarrow.compute as pc

    dt = _open(project, project.path("quarantine"))
    if dt is None:
        return {}, {}
    data = dt.to_pyarrow_table(columns=["table", "reason"])
    reason = pc.fill_null(data["reason"], "")
    later = pc.or_(*(pc.starts_with(reason, p) for p in WAREHOUSE_STAGES))

    def counts(rows) -> dict[str | None, int]:
        return dict(Counter(rows["table"].to_pylist()))

    return counts(data.filter(pc.invert(later))), counts(data.filter(later))


# ---------------------------------------------------------------- stream checkpoint and metrics


def _batch_files(project: Project, uri: str) -> list[tuple[int, datetime | None]]:
    """(batch id, last modified) of the numbered files in a checkpoint folder (local or S3)."""
    names: list[tuple[str, datetime | None]] = []
    if uri.startswith(("s3://", "s3a://")):
        from cdcflow.aws import project_client, split_s3

        bucket, prefix = split_s3(uri.replace("s3a://", "s3://", 1))
        s3 = project_client(project, "s3")
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
            names += [(o["Key"].rsplit("/", 1)[-1], _utc(o["LastModified"])) for o in page.get("Contents", [])]
    else:
        folder = Path(uri.removeprefix("file:"))
        if folder.is_dir():
            names = [(p.name, datetime.fromtimestamp(p.stat().st_mtime, UTC)) for p in folder.iterdir()]
    return sorted((int(n), m) for n, m in names if n.isdigit())


def stream_dq_report(project: Project) -> dict[str, Any] | None:
    """The streaming job's newest DQ report (`<lake>/_reports/dq/stream-<window start>-<batch>.json`,
    streaming/dq.py), or None. Names sort by window start, then first batch."""
    folder = project.path("_reports/dq")

    def order(name: str) -> tuple[str, int]:
        stem = name.removesuffix(".json").split("-")
        return stem[1], int(stem[2]) if len(stem) > 2 and stem[2].isdigit() else -1

    if folder.startswith(("s3://", "s3a://")):
        from cdcflow.aws import project_client, split_s3

        bucket, prefix = split_s3(folder.replace("s3a://", "s3://", 1))
        s3 = project_client(project, "s3")
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
                    Bucket=bucket, Prefix=prefix.rstrip("/") + "/stream-") for o in page.get("Contents", [])]
        if not keys:
            return None
        key = max(keys, key=lambda k: order(k.rsplit("/", 1)[-1]))
        return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    files = list(Path(folder).glob("stream-*.json")) if Path(folder).is_dir() else []
    return json.loads(max(files, key=lambda f: order(f.name)).read_text()) if files else None


def stream_status(project: Project) -> StreamStatus:
    from streaming.job import checkpoint_location

    ck = checkpoint_location(project)
    st = StreamStatus(ck)
    try:
        commits = _batch_files(project, join_uri(ck, "commits"))
        offsets = _batch_files(project, join_uri(ck, "offsets"))
    except Exception as e:  # noqa: BLE001 - an unreachable checkpoint store: the lake part still answers
        raise UserError(f"cannot read the stream checkpoint {ck}: {e}") from e
    if commits:
        st.last_batch, st.last_batch_at = commits[-1]
    if offsets:
        st.pending_batches = max(0, offsets[-1][0] - (st.last_batch if st.last_batch is not None else -1))
    return st


def _tail_lines(path: Path, limit: int = METRICS_TAIL_BYTES) -> Iterable[str]:
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - limit))
        data = f.read()
    lines = data.decode("utf-8", "replace").splitlines()
    return lines[1:] if size > limit else lines  # the first line of a tail may be cut


def read_metrics(path: Path, pipeline: str) -> tuple[dict[str, int], datetime | None, dict[str, float]]:
    """(shard -> latest MillisBehindLatest, when reported, table -> latest FreshnessSeconds)."""
    lag: dict[str, int] = {}
    lag_at: datetime | None = None
    freshness: dict[str, float] = {}
    for line in _tail_lines(path):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict) or rec.get("Pipeline") != pipeline:
            continue
        if "MillisBehindLatest" in rec and "Shard" in rec:
            lag[rec["Shard"]] = int(rec["MillisBehindLatest"])
            lag_at = _utc(rec.get("_aws", {}).get("Timestamp"))
        if "FreshnessSeconds" in rec and "Table" in rec:
            freshness[rec["Table"]] = float(rec["FreshnessSeconds"])
    return lag, lag_at, freshness


# ---------------------------------------------------------------- collect and render


def collect_status(project: Project, metrics_file: str | Path | None = None, tables: list[str] | None = None,
                   now: datetime | None = None) -> Status:
    names = tables or sorted(project.tables)
    batches = bronze_batches(project)
    quarantine, warehouse_quarantine = quarantine_counts(project)
    stream = stream_status(project)
    freshness: dict[str, float] = {}
    if metrics_file is not None:
        path = Path(metrics_file)
        if not path.is_file():
            raise UserError(f"metrics file {metrics_file} not found")
        stream.millis_behind, stream.lag_reported_at, freshness = read_metrics(path, project.pipeline.name)
    out = []
    for name in names:
        try:
            st = silver_status(project, name)
        except Exception as e:  # noqa: BLE001 - one unreadable table must not hide the others
            st = TableStatus(name, exists=True, error=f"{type(e).__name__}: {e}")
        st.batches = batches.get(name, {})
        st.quarantined = quarantine.get(name, 0)
        st.warehouse_quarantined = warehouse_quarantine.get(name, 0)
        st.latency_seconds = freshness.get(name)
        out.append(st)
    known = set(project.tables)
    unattributed = sum(n for t, n in quarantine.items() if t not in known)
    return Status(now or datetime.now(UTC), project.lake_root, out, stream, unattributed,
                  str(metrics_file) if metrics_file else None, stream_dq_report(project))


def age(seconds: float | None) -> str:
    """A short age: 42s, 5m 3s, 2h 10m, 3d 4h."""
    if seconds is None:
        return "-"
    s = int(round(seconds))
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if s >= size:
            rest = (s % size) // sub_size
            return f"{s // size}{unit} {rest}{sub}" if rest else f"{s // size}{unit}"
    return f"{s}s"


def _when(v: datetime | None, year: bool = False) -> str:
    return "-" if v is None else v.strftime("%Y-%m-%d %H:%M:%S" if year else "%m-%d %H:%M:%S")


FEED_LABELS = {"full_load": "load"}


def render(status: Status, console: Any) -> None:
    from rich.markup import escape
    from rich.table import Table as RichTable

    now = status.generated_at
    t = RichTable(title=f"cdcflow status  (lake {status.lake}, {_when(now, year=True)} UTC)")
    t.add_column("table", no_wrap=True)
    for c in ("rows", "deleted", "last batch", "committed", "newest change", "freshness", "latency", "quarantined"):
        t.add_column(c, justify="right" if c in ("rows", "deleted", "quarantined") else "left")
    for st in status.tables:
        quarantined = str(st.quarantined) + (f" (+{st.warehouse_quarantined} wh)" if st.warehouse_quarantined else "")
        if st.error or not st.exists:
            t.add_row(st.table, "[red]error[/red]" if st.error else "[dim]no table[/dim]", "", "", "", "", "", "",
                      quarantined)
            continue
        deleted = "-" if st.deleted is None else str(st.deleted)
        batch = ", ".join(f"{FEED_LABELS.get(feed, feed)} {n}" for feed, n in sorted(st.batches.items())) or "-"
        t.add_row(st.table, str(st.rows), deleted, batch, _when(st.last_commit), _when(st.newest_change),
                  age(st.freshness_seconds(now)), age(st.latency_seconds), quarantined)
    if status.unattributed_quarantine:
        t.add_row("[dim](no table)[/dim]", "", "", "", "", "", "", "", str(status.unattributed_quarantine))
    console.print(t)
    s = status.stream
    if s.last_batch is None:
        line = f"stream: no committed micro-batch (checkpoint {s.checkpoint})"
    else:
        line = (f"stream: last micro-batch {s.last_batch} committed {_when(s.last_batch_at)} UTC "
                f"({age((now - s.last_batch_at).total_seconds()) if s.last_batch_at else '-'} ago), "
                f"{s.pending_batches} pending")
    if s.max_millis_behind is not None:
        line += (f"; lag {s.max_millis_behind} ms behind the stream tip (max over {len(s.millis_behind)} shards, "
                 f"reported {_when(s.lag_reported_at)} UTC)")
    elif status.metrics_file is None:
        line += "; lag: pass --metrics-file (the stream's EMF lines) for MillisBehindLatest"
    console.print(line, soft_wrap=True)
    for st in status.tables:
        if st.error:
            console.print(f"[red]{st.table}[/red]: {escape(str(st.error))}", soft_wrap=True)
    if status.dq is not None:
        d = status.dq
        failures = [f"{t['table']} {r['rule']} ({r['severity']}) {r['failed']} of {t['checked']}"
                    + (f", {r['quarantined']} quarantined" if r["quarantined"] else "")
                    for t in d["tables"] for r in t["rules"] if r["failed"] or r["quarantined"]]
        start, end = (datetime.fromisoformat(d[k]) for k in ("window_start", "window_end"))
        console.print(f"stream DQ (raw_to_staging, {_when(start)} - {_when(end)}"
                      f" UTC, {d['batches']['count']} batches): " + ("; ".join(failures) or "no failures"),
                      soft_wrap=True)
    console.print("times UTC; last batch: bronze feed and batch id; committed: silver's newest Delta commit; "
                  "freshness: age of the newest source change applied; wh: rows the warehouse stages quarantined; latency: source commit -> visible in "
                  "silver, the table's last micro-batch (metrics)", style="dim")


# ---------------------------------------------------------------- CLI


def register_status(sub: Any, commands: dict[str, Callable]) -> None:
    p = sub.add_parser("status", help="per table: rows, last applied batch and commit, freshness, quarantine, "
                                      "stream lag (from the lake, no Spark)")
    p.add_argument("--table", action="append", help="only this table (schema.table); repeatable")
    p.add_argument("--metrics-file", default=os.environ.get("CDCFLOW_METRICS_FILE"),
                   help="the stream's EMF metrics file, for lag and latency (default: $CDCFLOW_METRICS_FILE)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    commands["status"] = run_status


def run_status(args: argparse.Namespace) -> int:
    from cdcflow.cli import console
    from cdcflow.config import load_project

    project = load_project(args.config)
    unknown = [t for t in args.table or [] if t not in project.tables]
    if unknown:
        raise UserError(f"unknown table(s): {', '.join(unknown)}")
    from cdcflow.aws import require_lake

    require_lake(project)
    status = collect_status(project, args.metrics_file, args.table)
    if args.json:
        print(json.dumps(status.as_dict(), indent=2, default=str))
    else:
        render(status, console)
    return 0
