"""``longattn bench``: argument parsing and entry point (the benchmark itself lives beside this file)."""

from __future__ import annotations


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="time the backends and baselines")
    parser.set_defaults(func=run)


def run(args) -> int:
    raise SystemExit("longattn bench: not implemented yet")
