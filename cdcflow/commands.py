"""Subcommands beyond validate/local: each registrar adds its parser and handler.

Registrars are named "module:function"; those modules keep their heavy imports (Spark) inside the
handlers, so building the parser stays cheap for `cdcflow validate`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from importlib import import_module


def register_demo(sub, commands: dict[str, Callable]) -> None:
    p = sub.add_parser("demo", help="run the pipeline end to end on the sample configs and print a summary")
    p.add_argument("--workdir", default=".cdcflow/demo", help="where the demo writes its lake and checkpoints")

    def run(args: argparse.Namespace) -> int:
        from cdcflow.demo import run_demo

        return run_demo(args.config, args.workdir)

    commands["demo"] = run


_REGISTRAR_PATHS = [
    "cdcflow.sim.cli:register_simulate",
    "streaming.cli:register_stream",
    "cdcflow.verify:register_verify",
    "batch.cli:register_full_load",
    "batch.warehouse.cli:register_warehouse_merge",
    "batch.cli:register_compact",
]


def _load(path: str) -> Callable:
    module, name = path.split(":")
    return getattr(import_module(module), name)


REGISTRARS: list[Callable] = [*(_load(p) for p in _REGISTRAR_PATHS), register_demo]
