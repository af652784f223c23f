#!/usr/bin/env bash
# Set up makima-tts in ./.venv.
#   scripts/setup.sh          the server and CLI (with the embedded Piper engine)
#   scripts/setup.sh --dev    also what the tests need (the reference packages qwen-tts and chatterbox-tts, clients,
#                             a browser, Ray)
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=0
[ "${1:-}" = "--dev" ] && DEV=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build.
$PIP install "torch==2.13.0"
$PIP install -e ".[server,piper,client,chatterbox]"
if [ "$DEV" = 1 ]; then
  $PIP install -e ".[server,piper,client,chatterbox,ray,test]"
  # The reference package, for parity tests and test checkpoints only: without its heavy
  # extras (gradio), and with torchaudio's CUDA-built extension removed (it cannot load on
  # a CPU machine, and qwen_tts only needs torchaudio's pure-Python import).
  $PIP install --no-deps "qwen-tts==0.1.1" "torchaudio==2.11.0" "sox"
  rm -f .venv/lib/python3*/site-packages/torchaudio/lib/*.so
  # Chatterbox's reference package (parity tests, the test export's T3): its pins (torch 2.6, transformers 5,
  # gradio) are not ours, so it and the modules its Turbo model imports go in without their dependencies.
  $PIP install --no-deps "chatterbox-tts==0.1.7" "conformer==0.3.2" "s3tokenizer==0.3.0" "diffusers==0.29.0" \
    "resemble-perth==1.0.1"
  # browsers for the /speak page tests (Debian's; Playwright drives chromium, Marionette firefox-esr;
  # pulseaudio gives Firefox a null sound sink to play into)
  if [ "${MAKIMA_SKIP_BROWSER:-0}" != 1 ] && { ! command -v chromium || ! command -v firefox-esr || ! command -v pulseaudio; } >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium firefox-esr pulseaudio) >/dev/null 2>&1 \
        || echo "setup: could not install chromium / firefox-esr; browser tests will be skipped (and fail under CI=1)" >&2
    fi
  fi
fi
echo "setup: done (.venv)"
