"""CLI: prereqs (filled in by prereqs.checks)."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("prereqs", help="check this machine against the appliance requirements")
    p.add_argument("--cloud", choices=["public", "government"], default="public")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--cache-path", default=".", help="where the process server cache lives (free space check)")
    p.add_argument("--retention-path", default=".", help="where the retention drive is mounted (free space check)")
    p.add_argument("--control-port", type=int, default=443)
    p.add_argument("--data-port", type=int, default=9443)
    p.add_argument("--skip-network", action="store_true",
                   help="do not probe the cloud's URLs and time source (offline machines)")
    p.set_defaults(handler=cmd_prereqs)


def cmd_prereqs(args: argparse.Namespace) -> int:
    from .checks import main

    return main(args)
