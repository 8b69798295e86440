"""`cdcflow stream --replay s3://...`: the archive objects under the prefix, staged on local disk.

Spark reads the staged folder (gzip by extension, nested folders included). The staging folder is
named after the URI under `<checkpoint root>/replay-staging/`, so a restarted replay of the same URI
finds the same files (the file source's checkpoint remembers them by path) and only new objects
are downloaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cdcflow.config import Project
from cdcflow.errors import UserError


def staging_dir(project: Project, uri: str) -> Path:
    return Path(project.pipeline.checkpoints.root) / "replay-staging" / hashlib.sha256(uri.encode()).hexdigest()[:16]


def stage_s3_replay(project: Project, uri: str, dest: Path | None = None) -> Path:
    from cdcflow.aws import project_client, split_s3

    bucket, prefix = split_s3(uri)
    dest = dest or staging_dir(project, uri)
    s3 = project_client(project, "s3")
    n = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.strip("/")):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix.strip("/")):].lstrip("/") or Path(obj["Key"]).name
            target = dest / rel
            if target.exists() and target.stat().st_size == obj["Size"]:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(target))
            n += 1
    if not dest.exists():
        raise UserError(f"no objects under {uri}")
    return dest
