"""What the bench scripts share: which checkpoint to run on (built once, cached)."""
from __future__ import annotations

import argparse
from pathlib import Path

from makima_tts.testing import REF_TEXT  # noqa: F401  (bench scripts import it from here too)

ROOT = Path(__file__).resolve().parents[1]


def add_checkpoint_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--checkpoint", help="checkpoint folder (default: a random full-size 0.6B-Base built in --cache)")
    ap.add_argument("--tiny", action="store_true", help="the tiny test checkpoint instead (a run of seconds)")
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "bench"), help="where built checkpoints are kept")


def checkpoint(args: argparse.Namespace) -> str:
    """--checkpoint, or the random checkpoint in --cache (built on first use, in the official layout)."""
    if args.checkpoint:
        return args.checkpoint
    from makima_tts.testing.checkpoints import build_checkpoint

    name = "tiny" if args.tiny else "full-0.6b-base"
    return str(build_checkpoint(Path(args.cache) / name, tiny=args.tiny))
