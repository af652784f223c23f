"""Voices: the cloned voices on disk, their computed prompts, and which one speaks a request.

By job, one module each:

* `records`  what a voice is: the id rules, the manifest record (VoiceRecord) and the API's
             pydantic shapes (VoiceOut, VoiceList, VoiceDeleted, VoicePatch);
* `clips`    the checks a reference clip passes before it is stored;
* `store`    the crash-safe library on disk (VoiceLibrary);
* `prompts`  computed voice prompts, in memory and beside each voice (PromptCache);
* `resolve`  a voice name (or none) -> one ResolvedVoice, for any engine;
* `service`  the rules the API and the sessions go through (VoiceService): the built-in guard,
             prompt invalidation, rollback of an upload the engine cannot use, the generated
             `default` voice.
"""
from .prompts import PromptCache
from .records import VoiceDeleted, VoiceList, VoiceOut, VoicePatch, VoiceRecord, slugify, validate_id
from .resolve import GENERATED_VOICE, OPENAI_VOICES, SEED_VOICE, ResolvedVoice
from .service import VoiceService
from .store import VoiceLibrary

__all__ = ["VoiceLibrary", "VoiceRecord", "PromptCache", "ResolvedVoice", "VoiceService", "VoiceOut", "VoiceList",
           "VoiceDeleted", "VoicePatch", "validate_id", "slugify", "OPENAI_VOICES", "SEED_VOICE", "GENERATED_VOICE"]
