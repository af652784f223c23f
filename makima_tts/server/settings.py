"""Server settings: flags or MAKIMA_TTS_* environment variables (pydantic-settings)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from platformdirs import user_data_dir
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_voices_dir() -> Path:
    return Path(user_data_dir("makima-tts")) / "voices"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MAKIMA_TTS_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    wyoming_port: Optional[int] = Field(None, ge=1, le=65535)   # also serve Wyoming (Home Assistant) on host:this
    engine: Literal["auto", "qwen3", "piper"] = "auto"
    checkpoint: Optional[str] = None          # folder or Hugging Face repo id (Qwen3-TTS)
    device: str = "cpu"
    dtype: str = "float32"
    # Qwen3 weights: auto = int8 (our kernel) on the CPU, the float dtype on CUDA; none = float32
    quantize: Literal["auto", "none", "int8", "int8-dynamic"] = "auto"
    # the codec decoder: auto = bfloat16 with int8 weights on a CPU with bfloat16 arithmetic, else the float dtype
    codec_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    weights_cache: Optional[Path] = None      # where quantized weights are kept between starts (None: user cache)
    threads: Optional[int] = None
    batch: bool = True                        # Qwen3: step concurrent streams together (BatchedEngine); --no-batch
    piper_voice: str = "joe"
    lazy_load: bool = False                   # load the model on first request instead of at start-up
    voices_dir: Path = Field(default_factory=default_voices_dir)
    default_voice: Optional[str] = None
    prompt_cache_size: int = 64
    prompt_cache_ttl_s: float = 3600.0
    max_upload_bytes: int = 20 * 1024 * 1024
    max_streams: Union[int, Literal["auto"]] = "auto"   # utterances generating at once (auto: see streams())
    max_queue: int = 16                       # utterances waiting for a slot
    max_text_chars: int = 5000
    session_idle_timeout_s: float = 300.0
    text_idle_timeout_s: float = 10.0         # token mode: an open `text` utterance with no new text this long ends
    send_buffer_chunks: int = 8               # audio chunks buffered per stream before it pauses
    api_keys: list[str] = Field(default_factory=list)
    # bounded work per client (issue 15)
    max_session_queue: int = 32               # utterances queued in one WebSocket session
    max_session_queue_chars: int = 20000      # characters queued (and pending) in one WebSocket session
    send_timeout_s: float = 20.0              # a client that accepts no audio this long loses its utterance
    max_json_bytes: int = 1024 * 1024         # largest JSON request body
    header_timeout_s: float = 10.0            # request headers must arrive within this
    body_timeout_s: float = 60.0              # a request body must arrive within this
    drain_timeout_s: float = 10.0             # on SIGTERM, running utterances get this long to finish
    allowed_origins: list[str] = Field(default_factory=list)   # besides the same origin and localhost; "*": any
    max_decode_seconds: float = 60.0          # longest reference clip decoded (from the container's header)
    max_decode_rate: int = 96000              # highest sample rate decoded
    max_decode_channels: int = 2              # most channels decoded
    max_concurrent_decodes: int = 2           # uploads decoded at once
    log_level: str = "info"

    def streams(self) -> int:
        """max_streams as a number. auto: for the default Qwen3 path on the CPU, CPU_STREAMS_PER_2_THREADS
        per 2 threads (below); on CUDA 16; without batching 1; the embedded Piper engine one per core."""
        if self.max_streams != "auto":
            return max(1, int(self.max_streams))
        import os

        cores = self.threads or os.cpu_count() or 2
        if self.engine == "piper" or not self.checkpoint:
            return max(2, cores)
        if self.device.startswith("cuda"):
            return 16
        if not self.batch:
            return 1
        return max(1, CPU_STREAMS_PER_2_THREADS * cores // 2)


# bench/load.py on a 2-core Xeon (bench/RESULTS.md, 2026-11-29): the real-time capacity (streams with no
# gap over 100 ms to a listener) is 0 there, as one stream is already slower than real time; 2 streams keep
# first audio under 2 s while batching raises the aggregate (0.27 -> 0.42 audio s per s). Re-measure on a
# machine that runs faster than real time and put its capacity here.
CPU_STREAMS_PER_2_THREADS = 2

