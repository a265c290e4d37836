"""Run a class-incremental protocol end to end: python jobs/incremental.py [--preset smoke] [--method mib] ..."""

from __future__ import annotations

import argparse
import sys

from hrhf.cli import add_config_arguments, config_from_args
from hrhf.pipeline import run
from hrhf.report import markdown_report


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run every step, print the Markdown report."""
    parser = add_config_arguments(argparse.ArgumentParser(description=__doc__))
    parser.add_argument("--run-dir", default="runs/default", help="local path or s3:// URI; reruns resume from it")
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    report = run(cfg, run_dir=args.run_dir)
    print(markdown_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
