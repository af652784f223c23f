#!/usr/bin/env bash
# Set up (with test dependencies), lint (ruff), type-check engine/, server/ and voices/ (mypy), run the tests.
# Arguments go to pytest. CI=1 (as .ci/run sets): a skipped test is a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
.venv/bin/ruff check makima_tts bench tests
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
