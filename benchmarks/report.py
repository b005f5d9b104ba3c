"""Print the README results section from the latest GPU run in ``benchmarks/results/``.

Same as ``longattn bench --report``: ``python benchmarks/report.py [--out FILE] [--results-dir DIR]``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from longattn.bench.report import main

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results-dir", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--out", help="markdown file to write (default: print)")
    args = parser.parse_args()
    sys.exit(main(args.results_dir, args.out))
