"""The `appliance` command. Each component registers its own subcommands: a module listed in
COMMAND_MODULES exposes `register(subparsers)`, adds its parsers and sets `handler=` (a
function taking the parsed args and returning the exit code). Adding a component's commands
is one line here."""
from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .common.errors import ApplianceError

COMMAND_MODULES: list[str] = [
    "replication_appliance.control.commands",  # init, serve, passphrase, status, db
    "replication_appliance.prereqs.commands",  # prereqs
    "replication_appliance.apply.commands",  # apply, recovery-points, replica export
    "replication_appliance.push_install.commands",  # push-install, credentials, agents upgrade|jobs
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description="Replication appliance: configuration server, "
                                     "process server and their tools.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except ApplianceError as exc:
        print(f"appliance {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
