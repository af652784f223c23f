"""`makima-tts serve`: the HTTP / WebSocket server under uvicorn."""
from __future__ import annotations

import argparse
import logging
import sys
import types
from typing import Any, Callable, Union, get_args, get_origin

# Every Settings field is a flag: --name-with-dashes (a trailing `_s`, seconds, dropped), its help the field's
# description, and MAKIMA_TTS_<FIELD> applies when the flag is not given (only given flags reach Settings).
# bool fields: --x / --no-x; list fields: repeatable. The exceptions to the naming rule:
_FLAG_NAMES = {"api_keys": "--api-key"}
_METAVARS = {"allowed_origins": "ORIGIN"}


def flag_name(field: str) -> str:
    return _FLAG_NAMES.get(field) or "--" + field.removesuffix("_s").replace("_", "-")


def _arg_type(annotation: Any) -> Callable[[str], Any]:
    """int / float for (Optional) int and float fields; str for the rest (Literal, Path, int | "auto"), which
    Settings validates."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return _arg_type(args[0]) if len(args) == 1 else str
    return annotation if annotation in (int, float) else str


def add_settings_arguments(p: argparse.ArgumentParser) -> None:
    from ..server.settings import Settings

    for field, info in Settings.model_fields.items():
        flag = flag_name(field)
        kw: dict[str, Any] = {"dest": field, "default": None, "help": info.description}
        if info.annotation is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif get_origin(info.annotation) is list:
            kw.update(action="append", metavar=_METAVARS.get(field, flag[2:].upper().replace("-", "_")))
        else:
            kw.update(type=_arg_type(info.annotation), metavar=_METAVARS.get(field, flag[2:].upper().replace("-", "_")))
        p.add_argument(flag, **kw)


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the server (WebSocket, OpenAI-compatible HTTP, voices, /speak page)",
                       description="Run the makima-tts server. Every flag can also be set as an environment "
                                   "variable MAKIMA_TTS_<NAME> (e.g. MAKIMA_TTS_CHECKPOINT).")
    try:
        add_settings_arguments(p)
    except ImportError:             # no `server` extra (pydantic-settings): take any flags, run() says what is missing
        parse = p.parse_known_args
        p.parse_known_args = lambda args=None, namespace=None: (parse([], namespace)[0], [])  # type: ignore
    else:
        from ..ray_serve.cli import add_arguments as add_ray_arguments     # --ray (imports no ray)

        add_ray_arguments(p)
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace):
    from ..server.settings import Settings

    given = {field: getattr(args, field) for field in Settings.model_fields}
    return Settings(**{k: v for k, v in given.items() if v is not None})


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..server.app import create_app
    except ImportError as e:
        print(f"error [MISSING_EXTRA]: the server needs the `server` extra: pip install 'makima-tts[server]' ({e})",
              file=sys.stderr)
        return 2
    from pydantic import ValidationError

    try:
        settings = settings_from_args(args)
    except ValidationError as e:
        err = e.errors()[0]
        print(f"error [INVALID_SETTING]: {'.'.join(map(str, err['loc']))}: {err['msg']}", file=sys.stderr)
        return 2
    if getattr(args, "ray", False):      # the engine on Ray Serve replicas (makima_tts/ray_serve)
        from ..ray_serve.cli import run as run_ray

        return run_ray(args, settings)
    from ..server.serve import make_server

    level = settings.log_level.upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = make_server(create_app(settings))
    server.run()
    # uvicorn reports a failed start-up (e.g. engine = qwen3 with a checkpoint that cannot load) by not
    # having started; exit non-zero so scripts and supervisors see it
    return 0 if server.started else 3
