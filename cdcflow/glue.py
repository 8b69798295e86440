"""What every AWS Glue entry script needs before it can call the same code as the CLI.

A Glue job has no config folder, no environment and no secrets of its own: the CDK stack
(infra/cdcflow_stack.py) passes them as job parameters. `glue_project(sys.argv)` turns those into what
`load_project` expects:

  --config s3://bucket/configs/      copied to a local folder (load_project reads local files)
  --cdcflow-env '{"VAR": "value"}'   exported to os.environ (the ${VAR} interpolation in the configs)
  --redshift-secret-id ARN           the Redshift credentials -> CDCFLOW_WAREHOUSE_URL (redshift://...)
  --pii-salt-secret-id ARN           the PII salt -> the env var named by pii.salt_env

Pure Python (boto3 + the config loader): awsglue is imported only when resolving the arguments, so
this module is importable and testable anywhere. Secret values are never logged or put in errors.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from cdcflow.config import Project, load_project
from cdcflow.errors import UserError

log = logging.getLogger("cdcflow.glue")

# configs/pipeline.yaml: `warehouse.url: ${CDCFLOW_WAREHOUSE_URL:-...}`
WAREHOUSE_URL_ENV = "CDCFLOW_WAREHOUSE_URL"
# Parameters the stack passes to some jobs only: resolved when present (getResolvedOptions has no optionals).
OPTIONAL_OPTIONS = ("cdcflow-env", "pii-salt-secret-id", "redshift-secret-id")


def _region() -> str | None:
    """--cdcflow-env sets AWS_REGION; botocore itself only reads AWS_DEFAULT_REGION."""
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def download_configs(uri: str, dest: Path) -> Path:
    """Copy the *.yaml / *.yml files of an s3:// config folder (tables/ included) to `dest`, and the
    Python files of the transform packages beside them (`module:function` transforms)."""
    import boto3

    from cdcflow.aws import split_s3

    bucket, prefix = split_s3(uri.rstrip("/") + "/")
    s3 = boto3.client("s3", region_name=_region())
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix):]
            if rel.endswith((".yaml", ".yml")) or (rel.endswith(".py") and "__pycache__" not in rel):
                target = dest / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, obj["Key"], str(target))
    return dest


def apply_job_environment(cdcflow_env_json: str) -> list[str]:
    """Export --cdcflow-env into os.environ, so the configs' ${VAR}s resolve as the stack intends.

    Values are kept as given: an empty CDCFLOW_AWS_ENDPOINT means real AWS. Returns the names set.
    """
    env = json.loads(cdcflow_env_json or "{}")
    if not isinstance(env, dict):
        raise UserError("--cdcflow-env must be a JSON object of environment variables")
    os.environ.update({str(k): "" if v is None else str(v) for k, v in env.items()})
    log.info("job environment: %s", ", ".join(sorted(env)))
    return sorted(env)


def redshift_url(secret: Mapping[str, Any]) -> str:
    """redshift://user:password@host:port/dbname from a CDK-style Redshift secret (the loader's format).

    User and password are percent-encoded, so punctuation in a rotated password can't break the URL.
    """
    missing = [k for k in ("username", "password", "host") if not secret.get(k)]
    if missing:
        raise UserError(f"the Redshift secret has no {', '.join(missing)}: fill it in (Secrets Manager)")
    user, password = quote(str(secret["username"]), safe=""), quote(str(secret["password"]), safe="")
    port, dbname = secret.get("port") or 5439, secret.get("dbname") or "dev"
    return f"redshift://{user}:{password}@{secret['host']}:{port}/{dbname}"


def load_secret_into_env(secret_id: str, env_var: str, client: Any = None) -> None:
    """Read a Secrets Manager secret into `env_var`, so the config reads it like any other variable.

    A plain string (the PII salt) is exported as is. A JSON object with username and password (the
    Redshift credentials) becomes a redshift:// URL, which is what `warehouse.url` takes. Only the
    secret's id and the variable's name are logged.
    """
    if client is None:
        import boto3

        client = boto3.client("secretsmanager", region_name=_region())
    value = client.get_secret_value(SecretId=secret_id).get("SecretString")
    if not value:
        raise UserError(f"secret {secret_id} has no SecretString")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and {"username", "password"} <= parsed.keys():
        value = redshift_url(parsed)
    os.environ[env_var] = value
    log.info("loaded secret %s into $%s", secret_id, env_var)


def resolve_options(argv: Sequence[str], names: list[str]) -> dict[str, str]:
    """Glue's getResolvedOptions when running in Glue; otherwise the same parsing with argparse.

    Keys come back with '-' turned into '_' (--cdcflow-env -> cdcflow_env), as Glue returns them.
    """
    try:
        from awsglue.utils import getResolvedOptions
    except ImportError:
        import argparse

        parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
        for name in names:
            parser.add_argument(f"--{name}", required=True)
        return vars(parser.parse_known_args(list(argv[1:]))[0])
    return getResolvedOptions(list(argv), names)


def glue_project(argv: Sequence[str], extra_options: Sequence[str] = ()) -> Project:
    """Job parameters -> loaded Project, with the environment and secrets in place.

    `extra_options`: further parameters the script requires (the job fails early if one is missing).
    Order matters: the environment and the Redshift URL must be set before `load_project` interpolates
    the configs; the salt's variable name comes from the loaded project (pii.salt_env), and the salt is
    read at processing time, so it is loaded last.
    """
    present = [o for o in OPTIONAL_OPTIONS if f"--{o}" in argv]
    args = resolve_options(argv, ["JOB_NAME", "config", *extra_options, *present])
    apply_job_environment(args.get("cdcflow_env", "{}"))
    if args.get("redshift_secret_id"):
        load_secret_into_env(args["redshift_secret_id"], WAREHOUSE_URL_ENV)
    with tempfile.TemporaryDirectory(prefix="cdcflow-configs-") as configs:  # read once, at load
        project = load_project(download_configs(args["config"], Path(configs)))
    if args.get("pii_salt_secret_id"):
        load_secret_into_env(args["pii_salt_secret_id"], project.pipeline.pii.salt_env)
    return project


def print_rows(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """The CLI's summary table as plain lines: Glue's log stream is no terminal for rich tables."""
    print(title)
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(x) for x in row))
