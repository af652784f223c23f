"""`makima-tts voices list | add ID FILE --transcript T | remove ID` on the voices folder."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..engine.types import LANGUAGES


def default_voices_dir() -> Path:
    """Settings().voices_dir, so MAKIMA_TTS_VOICES_DIR (and the server's default) apply."""
    try:
        from ..server.settings import Settings

        return Path(Settings().voices_dir)
    except ImportError:  # the server extra is not installed
        env = os.environ.get("MAKIMA_TTS_VOICES_DIR")
        if env:
            return Path(env)
        from platformdirs import user_data_dir

        return Path(user_data_dir("makima-tts")) / "voices"


def _dir_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--voices-dir", default=None,
                   help="voices folder (default: MAKIMA_TTS_VOICES_DIR or the user data folder)")


def register(sub) -> None:
    p = sub.add_parser("voices", help="list, add and remove cloned voices",
                       description="Manage the voices folder the server clones voices from.")
    vsub = p.add_subparsers(dest="voices_command", required=True)

    ls = vsub.add_parser("list", help="list the voices")
    ls.add_argument("--json", action="store_true", help="print JSON")
    _dir_flag(ls)
    ls.set_defaults(func=run, action="list")

    add = vsub.add_parser("add", help="add a voice from a reference clip",
                          description="Add a voice from a 3-10 s reference clip (wav, flac, mp3, ogg/opus, m4a).")
    add.add_argument("voice_id", metavar="ID", help="voice id: a-z, 0-9, '_' and '-' (e.g. makima)")
    add.add_argument("file", metavar="FILE", help="reference clip")
    add.add_argument("--transcript", default=None, help="exact transcript of the clip (needed unless --x-vector-only)")
    add.add_argument("--name", default=None, help="display name (default: the id)")
    add.add_argument("--language", default="auto", help=f"one of: {', '.join(LANGUAGES)}")
    add.add_argument("--x-vector-only", action="store_true", help="clone from the speaker embedding alone")
    add.add_argument("--license", default=None, help="licence or origin note stored with the voice")
    add.add_argument("--replace", action="store_true", help="replace the voice if it exists")
    _dir_flag(add)
    add.set_defaults(func=run, action="add")

    rm = vsub.add_parser("remove", help="remove a voice")
    rm.add_argument("voice_id", metavar="ID")
    _dir_flag(rm)
    rm.set_defaults(func=run, action="remove")


def run(args: argparse.Namespace) -> int:
    """Errors (MakimaError) are reported by the dispatcher as `error [CODE]: message`, exit 2."""
    from ..errors import EmptyText, InvalidAudio
    from ..voices import VoiceLibrary

    root = Path(args.voices_dir) if args.voices_dir else default_voices_dir()
    lib = VoiceLibrary(root)
    if args.action == "list":
        records = lib.list()
        if args.json:
            print(json.dumps({"voices_dir": str(root), "voices": [r.to_json() for r in records],
                              "broken": lib.broken}, indent=2, ensure_ascii=False))
            return 0
        print(f"voices in {root}:")
        for r in records:
            clip = f"{r.duration_s:5.1f} s" if r.has_audio and r.duration_s else "no clip"
            mode = "x-vector" if r.x_vector_only else "icl"
            text = (r.transcript or "")
            text = text if len(text) <= 50 else text[:47] + "..."
            print(f"  {r.voice_id:<20} {r.name[:24]:<24} {r.language:<10} {clip:<8} {mode:<8} {text}")
        for name, reason in sorted(lib.broken.items()):
            print(f"  {name:<20} BROKEN: {reason}", file=sys.stderr)
        return 0
    if args.action == "add":
        lib.validate_id(args.voice_id)
        if not args.x_vector_only and not (args.transcript and args.transcript.strip()):
            raise EmptyText("--transcript is needed (the exact words of the clip), or use --x-vector-only")
        try:
            data = Path(args.file).read_bytes()
        except OSError as e:
            raise InvalidAudio(f"cannot read {args.file}: {e.strerror or e}") from None
        record = lib.add_file(args.voice_id, data, source_name=os.path.basename(args.file), name=args.name,
                              transcript=args.transcript, language=args.language, x_vector_only=args.x_vector_only,
                              license=args.license, replace=args.replace)
        print(f"added voice {record.voice_id!r} ({record.duration_s:.1f} s) in {root / record.voice_id}")
        if record.warning:
            print(f"warning: {record.warning}", file=sys.stderr)
        return 0
    if args.action == "remove":
        lib.remove(args.voice_id)
        print(f"removed voice {args.voice_id!r}")
        return 0
    raise AssertionError(args.action)
