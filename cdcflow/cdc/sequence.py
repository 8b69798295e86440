"""The total per-key order of changes, as one fixed-width digit string `_seq` (see docs/design.md).

String order equals source order, so the same guard works in a Delta MERGE (`s._seq > t._seq`),
in Postgres/Redshift SQL and in Python.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from pyspark.sql import Column
from pyspark.sql import functions as F

# Width of each ordering component in digits.
WIDTHS = {
    "commit_timestamp": 20,
    "transaction_id": 20,
    "transaction_record_id": 10,
    "change_seq": 35,
    "file_position": 35,
}
# DMS S3 output has no transaction details: commit time (TimestampColumnName), then $AR_H_CHANGE_SEQ
# (only if a transformation rule adds it), then the row's place in the output: DMS writes a table's
# CDC rows in commit order within a file and names files by time, so file time + row number is a
# valid order when nothing better is present (several changes of one transaction share a commit
# time). A file without the timestamp or change-seq column counts zeros there (`sequence`'s
# `absent`), so every layout's `_seq` has the same width and the same places.
S3_ORDERING = ("commit_timestamp", "change_seq", "file_position")
# `<...>/<yyyyMMdd-HHmmssSSSS>.parquet#<row>`: the time digits of a CDC file's name and the row number
FILE_POSITION = r"(\d{8})-(\d{9,10})\.parquet#(\d{1,15})$"
FILE_TIME_WIDTH = 20
STREAM_POSITION_GROUPS = 5  # PostgreSQL: 00000002/7C007178.3.00000002/7C007178
STREAM_POSITION_WIDTH = 20


def _digits(value: Column, width: int) -> Column:
    """Left-pad a non-negative integer-like column to `width` digits; null stays null."""
    return F.lpad(value.cast("decimal(38,0)").cast("string"), width, "0")


def _stream_position(pos: Column) -> Column:
    """Each hex group of a stream position as a 20-digit decimal; null when unparseable."""
    groups = F.split(pos, "[/.]")
    parts = [
        _digits(F.conv(F.element_at(groups, i + 1), 16, 10), STREAM_POSITION_WIDTH)
        for i in range(STREAM_POSITION_GROUPS)
    ]
    # A position with fewer groups than expected is padded with zeros (still ordered), none is null.
    parts = [F.coalesce(p, F.lit("0" * STREAM_POSITION_WIDTH)) for p in parts]
    return F.when(pos.rlike(r"^[0-9A-Fa-f]+([/.][0-9A-Fa-f]+)*$"), F.concat(*parts))


def _file_position(pos: Column) -> Column:
    """A DMS S3 CDC row's source position as file time (20 digits) + row in the file (15); null when it
    isn't one."""
    def part(i: int) -> Column:
        return F.regexp_extract(pos, FILE_POSITION, i)

    return F.when(pos.rlike(FILE_POSITION), F.concat(
        F.lpad(F.concat(part(1), part(2)), FILE_TIME_WIDTH, "0"),
        F.lpad(part(3), WIDTHS["file_position"] - FILE_TIME_WIDTH, "0"),
    ))


def component(name: str, c: dict[str, Column]) -> Column:
    """The digits of one ordering component, from the normalized change columns."""
    if name == "commit_timestamp":
        return _digits(F.unix_micros(c["commit_ts"]), WIDTHS[name])
    if name == "transaction_id":
        return _digits(c["txn_id"], WIDTHS[name])
    if name == "transaction_record_id":
        return _digits(c["txn_rec_id"], WIDTHS[name])
    if name == "change_seq":
        return F.when(c["change_seq"].rlike(r"^[0-9]{1,35}$"), F.lpad(c["change_seq"], 35, "0"))
    if name == "stream_position":
        return _stream_position(c["stream_pos"])
    if name == "file_position":
        return _file_position(c["source_pos"])
    raise ValueError(f"unknown ordering component {name!r}")


def width(ordering: tuple[str, ...] | list[str]) -> int:
    return 1 + sum(
        STREAM_POSITION_GROUPS * STREAM_POSITION_WIDTH if o == "stream_position" else WIDTHS[o] for o in ordering
    )


def sequence(ordering: tuple[str, ...] | list[str], is_load: Column, c: dict[str, Column],
             absent: tuple[str, ...] | list[str] | set[str] = ()) -> Column:
    """`_seq` for a change: '0' + zeros for full-load rows, '1' + components for CDC; null if unusable.

    `concat` is null when any component is null, which is exactly "no usable order" (quarantined).
    `absent`: components the source doesn't carry at all (a DMS S3 file without the column): zeros,
    where a null in a component the source does carry is no usable order.
    """
    load_seq = F.lit("0" * width(ordering))
    parts = [F.coalesce(component(o, c), F.lit("0" * (width([o]) - 1))) if o in absent else component(o, c)
             for o in ordering]
    cdc_seq = F.concat(F.lit("1"), *parts)
    return F.when(is_load, load_seq).otherwise(cdc_seq)


def at_commit_time(ts: datetime, seq_width: int) -> str:
    """The lowest CDC `_seq` of `seq_width` digits at commit time `ts` (aware): every change committed at
    or after `ts` sorts above it, every one before below, in any ordering that starts with
    commit_timestamp (`cdcflow full-load --reload --as-of`)."""
    micros = (ts - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    head = "1" + str(micros).zfill(WIDTHS["commit_timestamp"])
    return head + "0" * (seq_width - len(head))
