"""The raw archiver (`cdcflow archive`): a KCL consumer that keeps every DMS Kinesis record, PII-masked, in S3.

records.py   masking and the archive line / object layout (pure Python, shared with tests and replay)
processor.py the record processor the KCL MultiLangDaemon runs (`python -m cdcflow.archive.processor`)
daemon.py    the MultiLangDaemon command, its properties and the `cdcflow archive` command
"""
