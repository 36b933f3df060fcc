"""``--config FILE.toml``: a command's options from a TOML file whose keys are the options' names.

A key is an option's long name with or without the dashes (``batch-size`` or ``batch_size``); a repeatable
``KEY=VALUE`` option (``set``) may also be a table (``[set]`` then ``d_model = 64``). Flags given on the
command line win over the file. Values are checked as the command line checks them (type, choices); an
unknown key is an error naming it and the accepted ones. Paths in the file are read as on the command
line, relative to the working directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _read_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise ValueError("--config needs the 'tomli' package on Python 3.10: pip install tomli") from None
    if not path.is_file():
        raise FileNotFoundError(f"--config {str(path)!r}: no such file; accepted: a TOML file")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"--config {str(path)!r} is not valid TOML: {err}") from None


def _actions(parser: argparse.ArgumentParser, exclude: set[str]) -> dict[str, argparse.Action]:
    """TOML key (option name, dashes and underscores both) -> its argparse action."""
    table: dict[str, argparse.Action] = {}
    for action in parser._actions:  # argparse has no public list of its actions
        if action.dest in exclude or action.dest == "help":
            continue
        for opt in action.option_strings:
            if opt.startswith("--"):
                name = opt[2:]
                table[name] = table[name.replace("-", "_")] = action
    return table


def _value(key: str, value: Any, action: argparse.Action) -> Any:
    """The value the command line would have produced for ``key = value``."""
    where = f"--config key {key!r}"
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return action.const if value else None
    if isinstance(action, argparse._AppendAction):
        if isinstance(value, dict):
            value = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in value.items()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f'{where}: expected a table or a list of "KEY=VALUE" strings, got {value!r}')
        return value
    kind = action.type
    if kind is not None and not isinstance(value, str):
        ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
        if isinstance(value, bool) or not ok:
            raise ValueError(f"{where}: expected {getattr(kind, '__name__', kind)}, got {value!r}")
        value = kind(value)
    elif kind is not None:
        try:
            value = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected {getattr(kind, '__name__', kind)}, got {value!r}") from None
    elif not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {value!r}")
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def merge_config_file(
    parser: argparse.ArgumentParser, args: argparse.Namespace, path: Path, *, exclude: set[str] = frozenset()
) -> None:
    """Fill the options of ``args`` that the command line left unset (None) from the TOML file; a
    repeatable option gets the file's items first, then the command line's."""
    data = _read_toml(Path(path))
    actions = _actions(parser, set(exclude))
    unknown = sorted(k for k in data if k not in actions)
    if unknown:
        accepted = sorted({a.option_strings[-1].lstrip("-") for a in actions.values()})
        raise ValueError(
            f"--config {str(path)!r}: unknown key(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}"
        )
    for key, raw in data.items():
        action = actions[key]
        value = _value(key, raw, action)
        current = getattr(args, action.dest, None)
        if isinstance(action, argparse._AppendAction):
            setattr(args, action.dest, value + list(current or []))
        elif current is None and value is not None:
            setattr(args, action.dest, value)
