"""The `speed-kernels` command. Each subcommand lives next to the code it drives:
`analyze` in speed_kernels.analysis, `train` / `sample` / `compare` in speed_train.cli."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="speed-kernels",
        description="SpeeD time-step sampling and weighting for diffusion training.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    from speed_kernels.analysis import add_analyze_command

    add_analyze_command(sub)
    from speed_train.cli import add_commands

    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except (ValueError, KeyError, FileNotFoundError, TypeError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"speed-kernels {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
