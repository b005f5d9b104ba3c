"""The ``longattn`` command line: ``longattn info``, ``longattn bench`` and ``longattn auto-table``."""

from __future__ import annotations

import argparse
import logging
import sys


def _info(args) -> int:
    from .info import format_info

    print(format_info())
    return 0


def _auto_table(args) -> int:
    from .bench import autotable

    return autotable.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, device, and which backends can run (and why not)")
    info.set_defaults(func=_info)
    from .bench import autotable
    from .bench import cli as bench_cli

    bench_cli.add_parser(sub)
    table = sub.add_parser("auto-table", help="rebuild backend='auto''s measured table from bench results JSONs",
                           description=autotable.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    autotable.add_arguments(table)
    table.set_defaults(func=_auto_table)
    return parser


def quiet_build_tool_logs() -> None:
    """Silence ``torch.utils.cpp_extension``'s import-time "No CUDA runtime is found, using CUDA_HOME=..."

    longattn never imports build helpers at run time, but torch does on our behalf: Inductor's CPU code
    generation (FlexAttention compiled on a CPU) loads its C++ kernels through ``cpp_extension``, whose import
    logs that line on any machine without a GPU. It is about building CUDA code, which no command here does.
    """
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    quiet_build_tool_logs()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
