"""The `cdcflow` command. User errors print one line and exit non-zero, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

from rich.console import Console
from rich.markup import escape
from rich.table import Table as RichTable

from cdcflow.errors import ConfigError, UserError, environment_problem

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

Command = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, Command] = {}


def _project(args: argparse.Namespace):
    from cdcflow.config import load_project

    return load_project(args.config)


# ---------------------------------------------------------------- validate


def cmd_validate(args: argparse.Namespace) -> int:
    from cdcflow.config import load_project

    start = time.perf_counter()
    try:
        project = load_project(args.config)
    except ConfigError as e:
        for p in e.problems:
            err_console.print(f"[red]error[/red] {escape(str(p))}", soft_wrap=True)
        err_console.print(f"{len(e.problems)} problem(s) found")
        return 1
    took = time.perf_counter() - start
    checked = ""
    if not args.no_spark:
        from cdcflow.transform_check import needs_spark

        if needs_spark(project):  # SQL / DataFrame transforms: run them on a sample frame
            from cdcflow.runtime import get_spark
            from cdcflow.transform_check import check_transforms

            problems = check_transforms(get_spark("cdcflow-validate"), project)
            for p in problems:
                err_console.print(f"[red]error[/red] {escape(str(p))}", soft_wrap=True)
            if problems:
                err_console.print(f"{len(problems)} problem(s) found")
                return 1
            checked = ", transforms run on a sample frame"
    console.print(
        f"[green]ok[/green] {project.pipeline_file}: {len(project.tables)} tables valid in {took:.2f}s{checked}"
    )
    return 0


# ---------------------------------------------------------------- local stack


def cmd_local(args: argparse.Namespace) -> int:
    from cdcflow import localstack

    if args.action == "up":
        state = localstack.up()
        _bootstrap_resources()
        console.print(f"[green]up[/green] AWS emulator {state['moto']['endpoint']} (pid {state['moto']['pid']})")
        console.print(f"[green]up[/green] Postgres {_redact_url(state['postgres']['url'])} (pid {state['postgres']['pid']})")
        console.print("Point the configs at it with:  eval $(cdcflow local env)")
    elif args.action == "down":
        localstack.down()
        console.print("[green]down[/green] local stack stopped")
    elif args.action == "env":
        for k, v in localstack.stack_env().items():
            print(f"export {k}={v}")
    else:
        st = localstack.status()
        if args.json:
            print(json.dumps(st))
        else:
            for name, s in st.items():
                state = "[green]running[/green]" if s["running"] else "[red]stopped[/red]"
                where = s.get("endpoint") or _redact_url(s.get("url", ""))
                console.print(f"{name:9} {state} {where} {('pid ' + str(s['pid'])) if s.get('pid') else ''}")
        return 0 if all(s["running"] for s in st.values()) else 3
    return 0


def _bootstrap_resources() -> None:
    """Create the configured stream and buckets on the emulator when the configs load."""
    from cdcflow import localstack
    from cdcflow.aws import bootstrap
    from cdcflow.config import load_project

    os.environ.update({k: v for k, v in localstack.stack_env().items() if k not in os.environ})
    try:
        project = load_project(os.environ.get("CDCFLOW_CONFIG", "configs"))
    except UserError:
        return  # the stack is useful without valid configs; `cdcflow validate` reports them
    if project.pipeline.aws.endpoint_url:
        for r in bootstrap(project):
            console.print(f"[green]ready[/green] {r}")


def _redact_url(url: str) -> str:
    """Never print a password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.split("@", 1)
        return f"{scheme}://{creds.split(':')[0]}:***@{host}"
    return url


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdcflow", description="Config-driven CDC: DMS -> Delta Lake -> Redshift")
    parser.add_argument(
        "--config",
        default=os.environ.get("CDCFLOW_CONFIG", "configs"),
        help="config folder holding pipeline.yaml and tables/ (default: configs, or $CDCFLOW_CONFIG)",
    )
    parser.add_argument("--version", action="version", version=f"cdcflow {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("validate", help="load every config and report every problem (file, key path, reason)")
    p.add_argument("--no-spark", action="store_true",
                   help="skip running SQL / DataFrame transforms on a sample frame (starts Spark)")
    _COMMANDS["validate"] = cmd_validate

    p = sub.add_parser("local", help="start / stop / inspect the embedded stack (moto server + Postgres)")
    p.add_argument("action", choices=["up", "down", "status", "env"])
    p.add_argument("--json", action="store_true", help="status as JSON")
    _COMMANDS["local"] = cmd_local

    for register in _extensions():
        register(sub, _COMMANDS)

    from cdcflow.archive.daemon import register_archive  # light: the KCL is imported when it runs

    register_archive(sub, _COMMANDS)
    from cdcflow.status import register_status  # light: delta-rs is imported when it runs

    register_status(sub, _COMMANDS)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cdcflow")
    except PackageNotFoundError:  # run from a source tree that isn't installed
        return "unknown"


def _extensions() -> list[Callable]:
    """Subcommands contributed by the pipeline modules (simulate, stream, verify, ...)."""
    from cdcflow import commands

    return commands.REGISTRARS


def main(argv: list[str] | None = None) -> int:
    from cdcflow.runtime import CLI_SPARK_LOG, SPARK_LOG_ENV

    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    # Spark's and the JVM's lines go to a file unless the user says where (`-`: the console)
    os.environ.setdefault(SPARK_LOG_ENV, os.path.abspath(CLI_SPARK_LOG))
    try:
        return _COMMANDS[args.command](args) or 0
    except ConfigError as e:
        err_console.print(f"[red]config error[/red] {escape(str(e))}", soft_wrap=True)
        return 1
    except UserError as e:
        err_console.print(f"[red]error[/red] {escape(str(e))}", soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130
    except Exception as e:
        # an unreachable service or a missing path the user named: one line (CDCFLOW_DEBUG=1 keeps
        # the traceback); anything else is a bug and keeps its traceback
        problem = environment_problem(e)
        if problem is None or os.environ.get("CDCFLOW_DEBUG"):
            log = os.environ.get(SPARK_LOG_ENV, "-")
            if log != "-" and os.path.exists(log):
                err_console.print(f"Spark / JVM log: {escape(log)}", soft_wrap=True)
            raise
        err_console.print(f"[red]error[/red] {escape(problem)}", soft_wrap=True)
        return 1


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    t = RichTable(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[str(x) for x in r])
    console.print(t)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

