"""The record processor the KCL MultiLangDaemon runs, one process per shard lease.

Each `process_records` call becomes one gzip JSON-lines object in S3 (masked, see records.py); only
after the PUT succeeds does it checkpoint that batch's last sequence number. A crash between the two
redelivers the batch to the next lease holder (at-least-once; the object key is the same when the
batch is). The daemon passes the environment through, so the configs, credentials and endpoint are
the archiver command's.
"""

from __future__ import annotations

import os
import sys
import time

from amazon_kclpy import kcl
from amazon_kclpy.v3 import processor

from cdcflow.archive.records import RawRecord, archive_line, gzip_lines, object_key


class ArchiveProcessor(processor.RecordProcessorBase):
    def __init__(self, project, s3, bucket: str, base: str, stream: str, salt: str):
        self.project, self.s3, self.bucket, self.base, self.stream, self.salt = project, s3, bucket, base, stream, salt
        self.shard_id = ""

    def initialize(self, initialize_input):
        self.shard_id = initialize_input.shard_id

    def process_records(self, process_records_input):
        records = [
            RawRecord(self.shard_id, r.sequence_number, int(r.sub_sequence_number or 0), r.partition_key,
                      r.timestamp_millis, r.binary_data)
            for r in process_records_input.records
        ]
        if not records:
            return
        key = object_key(self.base, self.stream, records)
        body = gzip_lines(archive_line(r, self.project, self.salt) for r in records)
        self._put(key, body)
        _test_crash_point(key)
        last = records[-1]
        self._checkpoint(process_records_input.checkpointer, last.sequence_number, last.sub_sequence_number)
        _log(f"archived {len(records)} records of {self.shard_id} to s3://{self.bucket}/{key}")

    def _put(self, key: str, body: bytes) -> None:
        for attempt in range(8):
            try:
                self.s3.put_object(Bucket=self.bucket, Key=key, Body=body, ContentType="application/x-ndjson",
                                   ContentEncoding="gzip")
                return
            except Exception as e:  # noqa: BLE001 - retried, then raised: the batch is not checkpointed
                if attempt == 7:
                    raise
                _log(f"put of {key} failed ({type(e).__name__}); retrying")
                time.sleep(min(2**attempt * 0.2, 5))

    def _checkpoint(self, checkpointer, seq=None, sub=None) -> None:
        for attempt in range(5):
            try:
                checkpointer.checkpoint(seq, sub)
                return
            except kcl.CheckpointError as e:
                if e.value == "ShutdownException":  # lease lost: the next holder re-reads from our last checkpoint
                    return
                if e.value in ("ThrottlingException", "KinesisClientLibDependencyException") and attempt < 4:
                    time.sleep(1 + attempt)
                    continue
                _log(f"checkpoint failed: {e.value}")
                return

    def lease_lost(self, lease_lost_input):
        _log(f"lease of {self.shard_id} lost")

    def shard_ended(self, shard_ended_input):
        # Everything of the shard was written before its last checkpoint; ending lets children start.
        self._checkpoint(shard_ended_input.checkpointer)

    def shutdown_requested(self, shutdown_requested_input):
        # Every delivered batch is already written and checkpointed; nothing is buffered.
        pass


def _test_crash_point(key: str) -> None:
    """Tests only: with CDCFLOW_ARCHIVE_TEST_CRASH_FILE set, the first processor to get here dies between
    writing a batch and checkpointing it (once: the file, holding the batch's key, marks that it happened)."""
    marker = os.environ.get("CDCFLOW_ARCHIVE_TEST_CRASH_FILE")
    if marker and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(key)
        _log("test crash point: exiting after the write, before the checkpoint")
        os._exit(1)


def _log(msg: str) -> None:
    sys.stderr.write(f"cdcflow-archive[{os.getpid()}] {msg}\n")
    sys.stderr.flush()


def main() -> None:
    from cdcflow.archive.records import default_archive_uri
    from cdcflow.aws import project_client, split_s3
    from cdcflow.cdc.masking import pii_salt
    from cdcflow.config import load_project

    project = load_project(os.environ.get("CDCFLOW_CONFIG", "configs"))
    uri = os.environ.get("CDCFLOW_ARCHIVE_URI") or default_archive_uri(project)
    bucket, base = split_s3(uri)
    proc = ArchiveProcessor(project, project_client(project, "s3"), bucket, base, project.pipeline.kinesis.stream,
                            pii_salt(project))
    kcl.KCLProcess(proc).run()


if __name__ == "__main__":
    main()
