"""AWS DMS -> S3 Parquet: `<schema>/<table>/LOAD00000001.parquet` (hex counter) for the full load, then
time-named CDC files (`20261125-1000010000.parquet`) with `Op` (I/U/D) first, the TimestampColumnName
column (string `yyyy-MM-dd HH:mm:ss.SSSSSS`, source commit time) and `$AR_H_CHANGE_SEQ` last.

Which of the two ordering columns the files carry is `S3Options.layout` (LAYOUTS): both (a transformation
rule adds `$AR_H_CHANGE_SEQ`, TimestampColumnName set), the timestamp only, or neither (DMS's defaults).
Rows are always written in commit order within a file, as DMS does. Without `$AR_H_CHANGE_SEQ` the
delivery order is the only order a reader has (file time + row), so the reordering faults (duplicate,
out_of_order, late) are injected only into the layout that has it.

Batching mimics the S3 endpoint: MaxFileSize (KB, full load), CdcMaxBatchInterval (s of source time)
and CdcMinFileSize (KB): a CDC file is closed when either CDC limit is reached, and at schema changes.
Sizes are estimated from the JSON size of the rows (deterministic, not the compressed Parquet size).
"""

from __future__ import annotations

import io
import json
import random
from bisect import bisect_right
from dataclasses import dataclass, replace
from datetime import date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cdcflow.config import Project
from cdcflow.sim.faults import FaultOptions, iso_to_us
from cdcflow.sim.source import Change
from cdcflow.sim.values import SOURCE_START_US, decimal_spec, dms_ts, us_to_dt

CHANGE_SEQ_COLUMN = "$AR_H_CHANGE_SEQ"
DEFAULT_TIMESTAMP_COLUMN = "dms_commit_ts"
_OPS = {"insert": "I", "update": "U", "delete": "D"}
LAYOUTS = ("change-seq+timestamp", "timestamp", "none")  # the ordering columns DMS writes


@dataclass(frozen=True)
class S3Options:
    timestamp_column: str = DEFAULT_TIMESTAMP_COLUMN
    max_file_size_kb: int = 1_048_576  # MaxFileSize (full load)
    cdc_max_batch_interval_s: int = 60  # CdcMaxBatchInterval
    cdc_min_file_size_kb: int = 32_000  # CdcMinFileSize
    include_op_for_full_load: bool = False  # IncludeOpForFullLoad
    layout: str = LAYOUTS[0]  # ordering columns in the files: LAYOUTS

    @property
    def has_timestamp(self) -> bool:
        return self.layout != "none"

    @property
    def has_change_seq(self) -> bool:
        return self.layout == "change-seq+timestamp"


def arrow_type(col_type: str) -> pa.DataType:
    spec = decimal_spec(col_type)
    if spec:
        return pa.decimal128(spec[0], spec[1])
    return {"string": pa.string(), "int": pa.int32(), "bigint": pa.int64(), "smallint": pa.int16(),
            "double": pa.float64(), "float": pa.float32(), "boolean": pa.bool_(), "date": pa.date32(),
            "timestamp": pa.timestamp("us")}[col_type]


def _to_arrow_value(v: Any, col_type: str) -> Any:
    if v is None:
        return None
    if decimal_spec(col_type):
        return Decimal(str(v))
    if col_type == "date":
        return date.fromisoformat(str(v)[:10])
    if col_type == "timestamp":
        return datetime.fromisoformat(str(v).replace("Z", ""))
    return v


@dataclass
class _Row:
    values: dict[str, Any]
    commit_us: int
    version: int  # schema version of the table when the change happened
    source_seq: int | None
    entry: dict[str, Any] | None = None  # fault log entry when this row is a fault


def _name_for(us: int) -> str:
    dt = us_to_dt(us)
    return dt.strftime("%Y%m%d-%H%M%S") + f"{dt.microsecond // 100:04d}"


def _size(values: dict[str, Any]) -> int:
    return len(json.dumps(values, default=str))


def _table_bytes(rows: list[dict[str, Any]], schema: list[tuple[str, str]], head: list[str],
                 tail: tuple[str, ...] = (CHANGE_SEQ_COLUMN,)) -> bytes:
    arrays = [pa.array([r.get(c) for r in rows], type=pa.string()) for c in head]
    fields = [pa.field(c, pa.string()) for c in head]
    for col, ty in schema:
        arrays.append(pa.array([_to_arrow_value(r.get(col), ty) for r in rows], type=arrow_type(ty)))
        fields.append(pa.field(col, arrow_type(ty)))
    for col in tail:
        arrays.append(pa.array([r.get(col) for r in rows], type=pa.string()))
        fields.append(pa.field(col, pa.string()))
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_arrays(arrays, schema=pa.schema(fields)), buf, compression="snappy")
    return buf.getvalue()


class S3Writer:
    """Builds the DMS S3 Parquet files for a history: {relative path: bytes} plus the fault log."""

    def __init__(self, project: Project, seed: int | str, options: S3Options, faults: FaultOptions,
                 dq_failing: set[int]):
        self.project, self.opts, self.faults, self.dq_failing = project, options, faults, dq_failing
        self.rng = random.Random(f"cdcflow-s3:{seed}")
        self.files: dict[str, bytes] = {}
        self.log: list[dict[str, Any]] = []
        self.tail = (CHANGE_SEQ_COLUMN,) if options.has_change_seq else ()
        self.ts_head = [options.timestamp_column] if options.has_timestamp else []

    def build(self, changes: list[Change]) -> tuple[dict[str, bytes], list[dict[str, Any]]]:
        schemas: dict[str, list[list[tuple[str, str]]]] = {}  # table -> schema versions
        loads: dict[str, list[dict[str, Any]]] = {}
        cdc: dict[str, list[_Row]] = {}
        for ch in changes:
            if ch.op == "create-table":
                schemas[ch.table] = [[(c, v["type"]) for c, v in (ch.data or {})["columns"].items()]]
            elif ch.op in ("add-column", "column-type-change", "rename-column", "drop-column"):
                d = ch.data or {}
                cur = dict(schemas[ch.table][-1])
                if ch.op == "rename-column":
                    cur = {d["column"] if c == d["old_column"] else c: ty for c, ty in cur.items()}
                elif ch.op == "drop-column":
                    cur.pop(d["column"], None)
                else:
                    cur[d["column"]] = d["type"]
                schemas[ch.table].append(list(cur.items()))
            elif ch.op == "load":
                loads.setdefault(ch.table, []).append(dict(ch.data or {}))
            elif ch.op in _OPS:
                cdc.setdefault(ch.table, []).extend(self._cdc_rows(ch, len(schemas[ch.table]) - 1))
        for table in schemas:
            self._write_load(table, schemas[table][0], loads.get(table, []))
            rows = self._inject(table, cdc.get(table, []))
            self._write_cdc(table, schemas[table], rows)
        return dict(sorted(self.files.items())), self.log

    def _cdc_rows(self, ch: Change, version: int) -> list[_Row]:
        commit_us = iso_to_us(ch.commit_ts or "")
        base = {"Op": _OPS[ch.op], self.opts.timestamp_column: dms_ts(commit_us), CHANGE_SEQ_COLUMN: ch.change_seq}
        rows = []
        if ch.op == "update" and ch.before:  # primary-key change: delete the old key, then the new row
            old = {**(ch.data or {}), **ch.before}
            rows.append(_Row({**base, **old, "Op": "D"}, commit_us, version, ch.source_seq))
        rows.append(_Row({**base, **(ch.data or {})}, commit_us, version, ch.source_seq))
        return rows

    def _folder(self, table: str) -> str:
        schema, _, name = table.partition(".")
        return f"{schema}/{name}"

    def _write_load(self, table: str, schema: list[tuple[str, str]], rows: list[dict[str, Any]]) -> None:
        head = (["Op"] if self.opts.include_op_for_full_load else []) + self.ts_head
        limit = self.opts.max_file_size_kb * 1024
        chunks: list[list[dict[str, Any]]] = [[]]
        size = 0
        for i, r in enumerate(rows):
            n = _size(r)
            if chunks[-1] and size + n > limit:
                chunks.append([])
                size = 0
            transfer = dms_ts(SOURCE_START_US - 40_000_000 + i * 1000)
            chunks[-1].append({**r, "Op": "I", self.opts.timestamp_column: transfer, CHANGE_SEQ_COLUMN: None})
            size += n
        for k, chunk in enumerate(c for c in chunks if c):
            self.files[f"{self._folder(table)}/LOAD{k + 1:08X}.parquet"] = _table_bytes(chunk, schema, head, self.tail)

    def _inject(self, table: str, rows: list[_Row]) -> list[_Row]:
        f = self.faults
        if not f.any or not rows:
            return rows
        if not self.opts.has_change_seq:  # delivery order is the only order: see the module docstring
            f = replace(f, duplicate_rate=0.0, out_of_order_rate=0.0, late_rate=0.0)
        keyed: list[tuple[float, int, _Row]] = [(float(i), 0, r) for i, r in enumerate(rows)]
        tie = 0
        late_us = (f.watermark_minutes * 60 + 60) * 1_000_000
        t = self.project.tables.get(table)
        commits = [r.commit_us for r in rows]
        for i, r in enumerate(rows):
            if f.duplicate_rate and r.source_seq not in self.dq_failing and self.rng.random() < f.duplicate_rate:
                tie += 1
                e = {"kind": "duplicate", "rule": None, "table": table, "source_seq": r.source_seq}
                keyed.append((min(i + self.rng.randint(1, 50), len(rows)) + 0.25, tie, _Row(dict(r.values),
                              r.commit_us, r.version, r.source_seq, e)))
            if t and f.missing_primary_key_rate and self.rng.random() < f.missing_primary_key_rate:
                tie += 1
                e = {"kind": "missing_primary_key", "rule": "missing_primary_key", "table": table,
                     "source_seq": r.source_seq}
                bad = {**r.values, t.primary_key[0]: None}
                keyed.append((i + 0.5, tie, _Row(bad, r.commit_us, r.version, None, e)))
            if t and f.unknown_table_rate and self.rng.random() < f.unknown_table_rate:
                self._ghost_file(table, r)
            if f.late_rate and self.rng.random() < f.late_rate:
                j = bisect_right(commits, r.commit_us + late_us)
                keyed[i] = (j - 0.4 if j < len(rows) else len(rows) + 0.6, 0, r)
                self.log.append({"kind": "late", "rule": None, "table": table, "source_seq": r.source_seq,
                                 "older_than_watermark": j < len(rows)})
        keyed.sort(key=lambda k: (k[0], k[1]))
        return [k[2] for k in keyed]

    def _ghost_file(self, table: str, r: _Row) -> None:
        schema, _, name = table.partition(".")
        ghost = f"{schema}/ghost_{self.rng.randint(1, 3)}"
        cols = [(c, ty) for c, ty in (self.project.tables[table].columns.items()) if c in r.values]
        path = f"{ghost}/{_name_for(r.commit_us)}.parquet"
        while path in self.files:
            path = path.replace(".parquet", "0.parquet")
        self.files[path] = _table_bytes([r.values], cols, ["Op", *self.ts_head], self.tail)
        self.log.append({"kind": "unknown_table", "rule": "unknown_table", "table": None,
                         "source_seq": r.source_seq, "file": path, "row": 0})

    def _write_cdc(self, table: str, versions: list[list[tuple[str, str]]], rows: list[_Row]) -> None:
        head = ["Op", *self.ts_head]
        files: list[list[_Row]] = []
        cur: list[_Row] = []
        size = 0
        start = clock = 0
        for r in rows:
            if cur and (size >= self.opts.cdc_min_file_size_kb * 1024
                        or r.commit_us - start > self.opts.cdc_max_batch_interval_s * 1_000_000
                        or r.version > max(x.version for x in cur)):
                files.append(cur)
                cur, size = [], 0
            if not cur:
                start = max(r.commit_us, clock)
            cur.append(r)
            size += _size(r.values)
            clock = max(clock, r.commit_us)
        if cur:
            files.append(cur)
        last = ""
        clock = 0
        shuffle = self.faults.out_of_order_rate if self.opts.has_change_seq else 0.0
        for rows_in_file in files:
            if shuffle and self.rng.random() < shuffle:
                self.rng.shuffle(rows_in_file)
                self.log.append({"kind": "out_of_order", "rule": None, "table": table, "source_seq": None})
            clock = max([clock] + [r.commit_us for r in rows_in_file])
            name = _name_for(clock)
            while name <= last:
                clock += 100
                name = _name_for(clock)
            last = name
            path = f"{self._folder(table)}/{name}.parquet"
            schema = versions[max(r.version for r in rows_in_file)]
            self.files[path] = _table_bytes([r.values for r in rows_in_file], schema, head, self.tail)
            for k, r in enumerate(rows_in_file):
                if r.entry is not None:
                    r.entry.update({"file": path, "row": k})
                    self.log.append(r.entry)


def write_local(files: dict[str, bytes], root: Path) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def upload(s3: Any, uri_bucket: str, prefix: str, files: dict[str, bytes]) -> int:
    for rel, data in files.items():
        key = f"{prefix.strip('/')}/{rel}" if prefix.strip("/") else rel
        s3.put_object(Bucket=uri_bucket, Key=key, Body=data)
    return len(files)
