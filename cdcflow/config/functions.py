"""DataFrame-API transforms named `module:function` in the table configs.

The module is imported with the config folder first on `sys.path`, so a package shipped beside the
configs (`configs/shop_transforms/`) is found locally; on Glue the deploy puts the same package in
the job bundle (`--extra-py-files`, infra/cdcflow_stack.py), which is on `sys.path` already.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from collections.abc import Callable
from pathlib import Path


def add_config_path(config_dir: Path) -> None:
    folder = str(Path(config_dir).resolve())
    if folder not in sys.path:
        sys.path.insert(0, folder)


def load_function(ref: str) -> Callable:
    """The callable `module:function` names; ValueError with a one-line reason when it can't be used."""
    module_name, _, name = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import module {module_name!r}: {e}") from None
    except Exception as e:  # noqa: BLE001 - any error while importing the user's module
        raise ValueError(f"importing module {module_name!r} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise ValueError(f"module {module_name!r} has no function {name!r}")
    if not callable(fn):
        raise ValueError(f"{ref} is not callable")
    return fn


def check_params(fn: Callable, ref: str, params: dict) -> None:
    """The function must take the DataFrame first and accept the configured parameters by name."""
    try:
        inspect.signature(fn).bind(None, **params)
    except TypeError as e:
        raise ValueError(f"{ref} does not accept (df, {', '.join(params) or ''}): {e}") from None
    except ValueError:  # builtins without a signature: nothing to check
        pass
