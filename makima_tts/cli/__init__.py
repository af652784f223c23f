"""`makima-tts serve | say | voices | bench`.

Each subcommand lives in its own module with `register(subparsers)`; the module's
handler is stored as the parser's `func` default.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = ("serve", "say", "voices", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="makima-tts", description="Open streaming text-to-speech server.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"makima_tts.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"makima_tts.cli.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ..errors import MakimaError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MakimaError as exc:
        print(f"error [{exc.code}]: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
