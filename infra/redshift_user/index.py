"""Custom resource (cdk deploy): the warehouse merge's least-privilege Redshift user.

Runs as the Redshift Serverless admin through the Redshift Data API and waits for every statement
(a failed statement fails the deployment, unlike a fire-and-forget Data API call):

1. the warehouse schema (`create schema if not exists`);
2. the ETL user (`cdcflow_etl` by default) with the password from its own Secrets Manager secret,
   created or, when it exists, given the secret's current password (on every create/update of this
   resource; the secret has no rotation schedule, see infra/README.md). The password is sent as Redshift's documented MD5 form
   ('md5' + md5(password + user)), so the plain password is never in a statement's text
   (the Data API keeps statement text for 24 hours);
3. its privileges: owner of the warehouse schema (create, alter, drop and load the tables the merge
   generates, DIST/SORT keys included) and CREATE on the database, only because the merge runs
   `create schema if not exists` on every run. Not a superuser; no access to other schemas.
4. when SpectrumSchema is given: the Redshift Spectrum external schema over the Glue database of
   manifest tables (`create external schema if not exists ... from data catalog ... iam_role ...`),
   read with the Spectrum role associated with the namespace. Owned by the admin: who may query it
   is granted by hand (`grant usage on schema`), not to the ETL user, which doesn't read the lake.

On Delete nothing is dropped: the user owns the warehouse's tables (and dropping the external schema
would break whoever was granted it).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

POLL_SECONDS = 1.0
TIMEOUT_SECONDS = 240.0  # well under the Lambda timeout


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def md5_password(user: str, password: str) -> str:
    """Redshift's MD5 password form: 'md5' + md5(password + user name), hex."""
    return "md5" + hashlib.md5((password + user).encode()).hexdigest()  # noqa: S324 - Redshift's format


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def external_schema_statement(schema: str, glue_database: str, role_arn: str) -> str:
    """Spectrum's external schema over a Glue Data Catalog database (same region as the workgroup)."""
    return (f"create external schema if not exists {quote_ident(schema)} from data catalog "
            f"database {quote_literal(glue_database)} iam_role {quote_literal(role_arn)}")


def grant_statements(user: str, database: str, schema: str) -> list[str]:
    u, s = quote_ident(user), quote_ident(schema)
    return [
        f"alter schema {s} owner to {u}",
        f"grant create on database {quote_ident(database)} to {u}",
    ]


class DataApi:
    """Statements on one workgroup/database as the user of `secret_arn`, each awaited."""

    def __init__(self, client: Any, workgroup: str, database: str, secret_arn: str, sleep=None):
        self.client, self.workgroup, self.database, self.secret_arn = client, workgroup, database, secret_arn
        self.sleep = sleep or (lambda seconds: time.sleep(seconds))  # looked up at call time (tests patch it)

    def run(self, sql: str, parameters: list[dict[str, str]] | None = None) -> str:
        kwargs: dict[str, Any] = {"WorkgroupName": self.workgroup, "Database": self.database,
                                  "SecretArn": self.secret_arn, "Sql": sql}
        if parameters:
            kwargs["Parameters"] = parameters
        sid = self.client.execute_statement(**kwargs)["Id"]
        waited = 0.0
        while True:
            d = self.client.describe_statement(Id=sid)
            if d["Status"] == "FINISHED":
                return sid
            if d["Status"] in ("FAILED", "ABORTED"):
                # the error names the statement's problem; the statement text holds no password
                raise RuntimeError(f"Redshift statement {d['Status'].lower()}: {d.get('Error', '')}")
            if waited >= TIMEOUT_SECONDS:
                raise TimeoutError(f"Redshift statement {sid} still {d['Status']} after {TIMEOUT_SECONDS:.0f}s")
            self.sleep(POLL_SECONDS)
            waited += POLL_SECONDS

    def user_exists(self, user: str) -> bool:
        sid = self.run("select count(*) from pg_user where usename = :user", [{"name": "user", "value": user}])
        records = self.client.get_statement_result(Id=sid)["Records"]
        return bool(records and int(records[0][0].get("longValue", 0)) > 0)


def ensure_etl_user(api: DataApi, user: str, password: str, schema: str) -> list[str]:
    """Schema, user (create or set password), privileges; returns the statements' kinds (for tests/logs)."""
    done = []
    api.run(f"create schema if not exists {quote_ident(schema)}")
    done.append("create schema")
    verb = "alter" if api.user_exists(user) else "create"
    api.run(f"{verb} user {quote_ident(user)} password '{md5_password(user, password)}'")
    done.append(f"{verb} user")
    for sql in grant_statements(user, api.database, schema):
        api.run(sql)
        done.append(sql.split(" to ")[0])
    return done


def on_event(event: dict[str, Any], _context: Any = None, clients: dict[str, Any] | None = None) -> dict[str, Any]:
    """The custom resource provider's onEvent handler (CDK custom_resources.Provider)."""
    props = event["ResourceProperties"]
    physical_id = f"{props['WorkgroupName']}/{props['Database']}/{props['UserName']}"
    if event["RequestType"] == "Delete":
        return {"PhysicalResourceId": event.get("PhysicalResourceId", physical_id)}
    if clients is None:
        import boto3

        clients = {"redshift-data": boto3.client("redshift-data"), "secretsmanager": boto3.client("secretsmanager")}
    secret = json.loads(clients["secretsmanager"].get_secret_value(SecretId=props["EtlSecretArn"])["SecretString"])
    if secret.get("username") != props["UserName"]:
        raise ValueError(f"the ETL secret's username is not {props['UserName']}")
    api = DataApi(clients["redshift-data"], props["WorkgroupName"], props["Database"], props["AdminSecretArn"])
    done = ensure_etl_user(api, props["UserName"], secret["password"], props["Schema"])
    if props.get("SpectrumSchema"):
        api.run(external_schema_statement(props["SpectrumSchema"], props["SpectrumDatabase"], props["SpectrumRoleArn"]))
        done.append("create external schema")
    print(json.dumps({"user": props["UserName"], "done": done}))  # no password, no hash
    return {"PhysicalResourceId": physical_id}
