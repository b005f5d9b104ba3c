"""The ``longattn`` command line: ``longattn info`` and ``longattn bench``."""

from __future__ import annotations

import argparse
import sys


def _info(args) -> int:
    from .info import format_info

    print(format_info())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, device, and which backends can run (and why not)")
    info.set_defaults(func=_info)
    from .bench import cli as bench_cli

    bench_cli.add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
