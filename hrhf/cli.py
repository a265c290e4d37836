"""Command-line parsing shared by the jobs and benchmarks: preset, method, YAML file, overrides, progress output."""

from __future__ import annotations

import argparse

from hrhf.config import PRESETS, Config, load_config
from hrhf.methods import METHODS
from hrhf.progress import FORMATS, Progress


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add --preset, --method, --config and --set to a parser."""
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS), help="base configuration")
    parser.add_argument("--method", default=None, choices=sorted(METHODS), help="method preset (default: hrhf)")
    parser.add_argument("--config", default=None, help="YAML file with config sections, applied after the presets")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one setting, e.g. --set train.epochs_step=5 --set inversion.scales=[0.1,0.4]",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """Build the config the parsed arguments describe."""
    return load_config(args.preset, args.config, args.overrides, method=args.method)


def add_progress_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add --quiet and --log-format to a parser."""
    parser.add_argument("--quiet", action="store_true", help="print no progress, only errors and the final report")
    parser.add_argument("--log-format", choices=FORMATS, default="text",
                        help="progress lines as text or as one JSON object per line (the report then as a JSON record)")
    return parser


def progress_from_args(args: argparse.Namespace) -> Progress:
    """The progress reporter the parsed arguments ask for."""
    return Progress(args.log_format, quiet=args.quiet)
