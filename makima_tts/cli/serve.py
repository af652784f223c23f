"""`makima-tts serve`: the HTTP / WebSocket server under uvicorn."""
from __future__ import annotations

import argparse
import logging
import sys

# flag -> Settings field; every flag also reads MAKIMA_TTS_<FIELD> when not given
_FLAGS = [
    ("--host", "host", str, "bind address (default 127.0.0.1)"),
    ("--port", "port", int, "port (default 8000)"),
    ("--wyoming-port", "wyoming_port", int, "also serve the Wyoming protocol (Home Assistant) on this TCP port, "
                                            "same host"),
    ("--engine", "engine", str, "auto (default: Qwen3-TTS when a checkpoint loads, else the embedded engine), "
                               "qwen3 or piper"),
    ("--checkpoint", "checkpoint", str, "Qwen3-TTS checkpoint folder or Hugging Face repo id"),
    ("--device", "device", str, "cpu or cuda"),
    ("--dtype", "dtype", str, "float32, bfloat16 or float16"),
    ("--quantize", "quantize", str, "Qwen3 weights: auto (default: int8 on the CPU, the float dtype on CUDA), "
                                    "none (float32), int8 or int8-dynamic"),
    ("--codec-dtype", "codec_dtype", str, "the codec decoder: auto (default: bfloat16 with int8 weights on a CPU "
                                          "with bfloat16 arithmetic, else the float dtype), float32, bfloat16"),
    ("--weights-cache", "weights_cache", str, "folder for quantized weights kept between starts "
                                              "(default ~/.cache/makima-tts/weights)"),
    ("--threads", "threads", int, "CPU threads for the engine"),
    ("--piper-voice", "piper_voice", str, "embedded engine voice (default joe)"),
    ("--voices-dir", "voices_dir", str, "the voice library folder"),
    ("--default-voice", "default_voice", str, "voice used when a request names none"),
    ("--max-streams", "max_streams", str, "utterances generating at once: a number or auto (default: the "
                                          "real-time capacity measured for this engine path)"),
    ("--max-queue", "max_queue", int, "utterances waiting for a slot before OVERLOADED"),
    ("--max-text-chars", "max_text_chars", int, "longest text per request"),
    ("--session-idle-timeout", "session_idle_timeout_s", float, "seconds before an idle WebSocket closes"),
    ("--text-idle-timeout", "text_idle_timeout_s", float,
     "token mode: seconds without a `text` piece before the open utterance ends as if flushed (default 10)"),
    ("--prompt-cache-size", "prompt_cache_size", int, "voice prompts kept in memory"),
    ("--prompt-cache-ttl", "prompt_cache_ttl_s", float, "seconds a voice prompt stays in memory"),
    ("--max-upload-bytes", "max_upload_bytes", int, "largest voice upload"),
    ("--max-session-queue", "max_session_queue", int, "utterances queued per WebSocket session (default 32)"),
    ("--max-session-queue-chars", "max_session_queue_chars", int,
     "characters queued and pending per WebSocket session (default 20000)"),
    ("--send-timeout", "send_timeout_s", float,
     "seconds a client may accept no audio before its utterance is cancelled (default 20)"),
    ("--max-json-bytes", "max_json_bytes", int, "largest JSON request body (default 1 MiB)"),
    ("--header-timeout", "header_timeout_s", float, "seconds for a request's headers to arrive (default 10)"),
    ("--body-timeout", "body_timeout_s", float, "seconds for a request's body to arrive (default 60)"),
    ("--drain-timeout", "drain_timeout_s", float,
     "on SIGTERM, seconds running utterances get to finish before clients are closed (default 10)"),
    ("--max-decode-seconds", "max_decode_seconds", float, "longest uploaded clip decoded (default 60)"),
    ("--max-decode-rate", "max_decode_rate", int, "highest sample rate of an uploaded clip (default 96000)"),
    ("--max-decode-channels", "max_decode_channels", int, "most channels of an uploaded clip (default 2)"),
    ("--max-concurrent-decodes", "max_concurrent_decodes", int, "uploads decoded at once (default 2)"),
    ("--log-level", "log_level", str, "debug, info, warning, error"),
]


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the server (WebSocket, OpenAI-compatible HTTP, voices, /speak page)",
                       description="Run the makima-tts server. Every flag can also be set as an environment "
                                   "variable MAKIMA_TTS_<NAME> (e.g. MAKIMA_TTS_CHECKPOINT).")
    for flag, _, typ, help_ in _FLAGS:
        p.add_argument(flag, type=typ, default=None, help=help_)
    p.add_argument("--lazy-load", action="store_true", default=None, help="load the model on the first request")
    p.add_argument("--batch", action=argparse.BooleanOptionalAction, default=None,
                   help="Qwen3: step up to --max-streams concurrent streams together, one batched model step "
                        "(default on; --no-batch: each stream steps alone)")
    p.add_argument("--api-key", action="append", default=None,
                   help="require this API key (repeatable; env MAKIMA_TTS_API_KEYS as a JSON list)")
    p.add_argument("--allowed-origins", action="append", default=None, metavar="ORIGIN",
                   help="an Origin allowed besides the same origin and localhost (repeatable; '*' for any; env "
                        "MAKIMA_TTS_ALLOWED_ORIGINS as a JSON list)")
    from ..ray_serve.cli import add_arguments as add_ray_arguments     # --ray (imports no ray)

    add_ray_arguments(p)
    p.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace):
    from ..server.settings import Settings

    given = {field: getattr(args, flag[2:].replace("-", "_")) for flag, field, _, _ in _FLAGS}
    given = {k: v for k, v in given.items() if v is not None}
    if args.lazy_load:
        given["lazy_load"] = True
    if args.batch is not None:
        given["batch"] = args.batch
    if args.api_key:
        given["api_keys"] = args.api_key
    if args.allowed_origins:
        given["allowed_origins"] = args.allowed_origins
    return Settings(**given)


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
