"""The ``ropekern`` command line (also ``python -m ropekern``).

Each subcommand lives in a module exposing ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int`` (the exit code); this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module implementing it
SUBCOMMANDS = {
    "info": "ropekern._cli_info",
    "check": "ropekern._cli_check",
    "check-model": "ropekern._cli_check_model",
    "bench": "ropekern._cli_bench",
    "eval": "ropekern._cli_eval",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ropekern", description="Scaled-RoPE fused attention kernels.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # the command line as typed, recorded by subcommands that write result files (bench); with an
    # explicit argv (tests, embedding) sys.argv belongs to the host program, not to this command
    args._command = None if argv is None else ["ropekern", *argv]
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
