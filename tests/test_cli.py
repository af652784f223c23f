"""The `makima-tts` command: its four subcommands, and `bench` on the tiny checkpoint."""
from __future__ import annotations

import json
import subprocess
import sys


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "makima_tts", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_every_subcommand():
    out = cli("--help")
    assert out.returncode == 0
    for name in ("serve", "say", "voices", "bench"):
        assert name in out.stdout


def test_bench_times_the_engine(tiny_checkpoint):
    out = cli("bench", "--checkpoint", str(tiny_checkpoint), "--frames", "6", "--threads", "1")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    run = result["runs"][0]
    assert run["frames"] == 6 and run["audio_s"] == 0.48 and run["rtf"] > 0 and run["ttfa_s"] > 0


def test_bench_reports_a_bad_checkpoint(tmp_path):
    out = cli("bench", "--checkpoint", str(tmp_path))
    assert out.returncode == 2 and "error [CHECKPOINT_ERROR]" in out.stderr


def test_serve_rejects_a_bad_setting():
    out = cli("serve", "--engine", "nonsense")
    assert out.returncode == 2 and "INVALID_SETTING" in out.stderr and "engine" in out.stderr


def test_serve_reads_makima_tts_environment_variables():
    import os

    env = {**os.environ, "MAKIMA_TTS_MAX_STREAMS": "not-a-number"}
    out = subprocess.run([sys.executable, "-m", "makima_tts", "serve"], capture_output=True, text=True, timeout=120,
                         env=env)
    assert out.returncode == 2 and "INVALID_SETTING" in out.stderr and "max_streams" in out.stderr


def test_every_setting_is_a_serve_flag_with_help():
    """Each Settings field is a `serve` flag (cli/serve.py builds them from Settings.model_fields), with its
    description as help; a field added without a description, or that no flag sets, fails here."""
    from makima_tts.cli import build_parser
    from makima_tts.cli.serve import flag_name
    from makima_tts.server.settings import Settings

    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    flags = {opt: a for a in serve._actions for opt in a.option_strings}
    help_text = serve.format_help()
    for field, info in Settings.model_fields.items():
        assert info.description, f"Settings.{field} has no description (its --help)"
        flag = flag_name(field)
        assert flag in flags and flags[flag].dest == field, f"Settings.{field} has no flag {flag}"
        assert flag in help_text


def test_serve_flags_reach_settings(monkeypatch):
    from makima_tts.cli import build_parser
    from makima_tts.cli.serve import settings_from_args

    monkeypatch.setenv("MAKIMA_TTS_MAX_QUEUE", "7")          # no flag: the environment applies
    monkeypatch.setenv("MAKIMA_TTS_PORT", "9")               # the flag wins
    args = build_parser().parse_args([
        "serve", "--port", "8100", "--session-idle-timeout", "5", "--no-batch", "--lazy-load", "--api-key", "a",
        "--api-key", "b", "--allowed-origins", "*", "--max-streams", "3", "--wyoming-port", "10200",
        "--weights-cache", "/tmp/w", "--send-buffer-chunks", "4", "--ray", "--replicas", "2"])
    s = settings_from_args(args)
    assert (s.port, s.session_idle_timeout_s, s.batch, s.lazy_load, s.api_keys, s.allowed_origins) == \
        (8100, 5.0, False, True, ["a", "b"], ["*"])
    assert (s.max_streams, s.wyoming_port, str(s.weights_cache), s.send_buffer_chunks, s.max_queue) == \
        (3, 10200, "/tmp/w", 4, 7)
    assert args.ray and args.replicas == 2
    monkeypatch.delenv("MAKIMA_TTS_PORT")
    d = settings_from_args(build_parser().parse_args(["serve"]))
    assert (d.port, d.batch, d.lazy_load, d.api_keys, d.max_streams) == (8000, True, False, [], "auto")


def test_say_chooses_the_engine_as_serve_does(chatterbox_export, ref_clip, tmp_path):
    """`say --engine auto` on a Chatterbox-Turbo export speaks with Chatterbox (server.engines.load_engine);
    `--engine qwen3` on it is a clear error."""
    import soundfile as sf

    ref = tmp_path / "ref.wav"
    sf.write(ref, ref_clip, 24000)
    wav = tmp_path / "out.wav"
    out = cli("say", "Hello there.", "--checkpoint", str(chatterbox_export), "--onnx-dtype", "fp32",
              "--ref-audio", str(ref), "--seed", "1", "-o", str(wav))
    assert out.returncode == 0, out.stderr
    pcm, sr = sf.read(wav)
    assert sr == 24000 and len(pcm) > 0 and f"wrote {wav}" in out.stderr
    out = cli("say", "Hello.", "--engine", "qwen3", "--checkpoint", str(chatterbox_export), "--ref-audio", str(ref),
              "-o", str(tmp_path / "no.wav"))
    assert out.returncode == 2 and "CHECKPOINT_ERROR" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "no.wav").exists()
