"""Subcommands beyond validate/local: each registrar adds its parser and handler."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def register_demo(sub, commands: dict[str, Callable]) -> None:
    p = sub.add_parser("demo", help="run the pipeline end to end on the sample configs and print a summary")
    p.add_argument("--workdir", default=".cdcflow/demo", help="where the demo writes its lake and checkpoints")

    def run(args: argparse.Namespace) -> int:
        from cdcflow.demo import run_demo

        return run_demo(args.config, args.workdir)

    commands["demo"] = run


def register_simulate(sub, commands: dict[str, Callable]) -> None:
    from cdcflow.sim.cli import register_simulate as register

    register(sub, commands)


def register_verify(sub, commands: dict[str, Callable]) -> None:
    from cdcflow.verify import register_verify as register

    register(sub, commands)


def register_stream(sub, commands: dict[str, Callable]) -> None:
    from streaming.cli import register_stream as register

    register(sub, commands)


def register_warehouse_merge(sub, commands: dict[str, Callable]) -> None:
    from batch.warehouse.cli import register_warehouse_merge as register

    register(sub, commands)


def register_full_load(sub, commands: dict[str, Callable]) -> None:
    from batch.cli import register_full_load as register

    register(sub, commands)


def register_compact(sub, commands: dict[str, Callable]) -> None:
    from batch.cli import register_compact as register

    register(sub, commands)


REGISTRARS: list[Callable] = [register_full_load, register_compact, register_demo, register_simulate, register_verify, register_stream, register_warehouse_merge]
