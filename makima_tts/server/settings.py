"""Server settings: flags or MAKIMA_TTS_* environment variables (pydantic-settings)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from platformdirs import user_data_dir
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_voices_dir() -> Path:
    return Path(user_data_dir("makima-tts")) / "voices"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAKIMA_TTS_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    engine: Literal["auto", "qwen3", "piper"] = "auto"
    checkpoint: Optional[str] = None          # folder or Hugging Face repo id (Qwen3-TTS)
    device: str = "cpu"
    dtype: str = "float32"
    quantize: Literal["none", "int8", "int8-dynamic"] = "none"   # Qwen3 weights (int8: CPU, smaller, faster)
    threads: Optional[int] = None
    batch: bool = False                       # Qwen3: step concurrent streams together (BatchedEngine)
    piper_voice: str = "joe"
    lazy_load: bool = False                   # load the model on first request instead of at start-up
    voices_dir: Path = Field(default_factory=default_voices_dir)
    default_voice: Optional[str] = None
    prompt_cache_size: int = 64
    prompt_cache_ttl_s: float = 3600.0
    max_upload_bytes: int = 20 * 1024 * 1024
    max_streams: int = 2                      # utterances generating at once
    max_queue: int = 16                       # utterances waiting for a slot
    max_text_chars: int = 5000
    session_idle_timeout_s: float = 300.0
    send_buffer_chunks: int = 8               # audio chunks buffered per stream before it pauses
    api_keys: list[str] = Field(default_factory=list)
    log_level: str = "info"
