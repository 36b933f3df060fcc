"""The ``unitscale`` command: each sub-command is a module in ``unitscale.commands``.

A command module defines ``NAME`` (defaults to the module name with ``_`` → ``-``), ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int | None``. Modules are discovered, so adding a command
never edits this file. Every option's help shows its default (``HelpFormatter`` adds it where the help
text does not say it). Errors a user can fix (a bad value, a missing or unwritable file) end the command
with one line on stderr and exit status 2; a run stopped by SIGINT/SIGTERM exits with 128 + the signal.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import warnings
from types import ModuleType

from unitscale import commands


def _command_modules() -> dict[str, ModuleType]:
    found: dict[str, ModuleType] = {}
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"unitscale.commands.{info.name}")
        found[getattr(module, "NAME", info.name.replace("_", "-"))] = module
    return found


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or not action.option_strings or action.default is argparse.SUPPRESS:
            return text
        if action.nargs == 0:  # a flag
            return f"{text} (default: {'on' if action.default else 'off'})"
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unitscale", description="Low-precision training out of the box.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module in _command_modules().items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP, formatter_class=HelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def _os_error(err: OSError) -> str:
    """One line for an operating-system error: what failed, on which file, and what would work."""
    where = f" {str(err.filename)!r}" if err.filename is not None else ""
    reason = err.strerror or str(err)
    return f"cannot use{where}: {reason} (accepted: a path this user can read, or write for outputs)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from unitscale.train.rundir import Interrupted

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"unitscale {args.command}: {category.__name__}: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():
            warnings.showwarning = show  # one line per warning, not the source line of the warn() call
            return int(args._run(args) or 0)
    except Interrupted as err:
        print(f"unitscale {args.command}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"unitscale {args.command}: interrupted", file=sys.stderr)
        return 130
    except ValueError as err:
        print(f"unitscale {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        # Our own FileNotFoundError messages carry no errno and are already one clear line.
        text = str(err) if err.errno is None else _os_error(err)
        print(f"unitscale {args.command}: error: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
