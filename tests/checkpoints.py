"""Moved to makima_tts.testing.checkpoints (and makima_tts.testing for the clip); kept for older imports."""
from makima_tts.testing import reference_clip  # noqa: F401
from makima_tts.testing.checkpoints import build_checkpoint  # noqa: F401
