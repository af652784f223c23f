"""Speech engines behind one streaming interface (see types.SpeechEngine)."""
from .types import (AudioChunk, CancelToken, GenerationSettings, LANGUAGES, SamplingParams, SpeechEngine,
                    VoiceInfo, VoicePrompt)

__all__ = ["AudioChunk", "CancelToken", "GenerationSettings", "LANGUAGES", "SamplingParams", "SpeechEngine",
           "VoiceInfo", "VoicePrompt"]
