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

    # every field is a `makima-tts serve` flag (cli/serve.py: --name-with-dashes, `_s` dropped), its help the
    # description; tests/test_cli.py checks that none is missing
    host: str = Field("127.0.0.1", description="bind address (default 127.0.0.1)")
    port: int = Field(8000, description="port (default 8000)")
    wyoming_port: Optional[int] = Field(None, ge=1, le=65535, description="also serve the Wyoming protocol (Home "
                                        "Assistant) on this TCP port, same host")
    engine: Literal["auto", "qwen3", "piper", "chatterbox"] = Field(
        "auto", description="auto (default: the checkpoint's engine when it loads, Chatterbox for a folder in its "
                            "ONNX layout, else Qwen3-TTS; the embedded engine without one), qwen3, piper or chatterbox")
    checkpoint: Optional[str] = Field(None, description="Qwen3-TTS checkpoint or Chatterbox-Turbo ONNX export: a "
                                                        "folder or Hugging Face repo id")
    onnx_dtype: Literal["auto", "fp32", "fp16", "q8", "q4", "q4f16"] = Field(
        "auto", description="Chatterbox: which variant of the export's graphs (default auto: q4 on the CPU where "
                            "the export has it, fp16 on CUDA, else fp32)")
    device: str = Field("cpu", description="cpu or cuda")
    dtype: str = Field("auto", description="Qwen3's float dtype: auto (default: float32 on the CPU, bfloat16 on "
                                           "CUDA), float32, bfloat16 or float16")
    quantize: Literal["auto", "none", "int8", "int4", "int8-dynamic"] = Field(
        "auto", description="Qwen3 weights: auto (default: int8 on the CPU, the float dtype on CUDA), none "
                            "(the float dtype), int8, int4 (the code predictor in 4 bits, the talker in 8) or int8-dynamic")
    codec_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="the codec decoder: auto (default: bfloat16 with int8 weights on a CPU with bfloat16 "
                            "arithmetic, else the float dtype), float32, bfloat16")
    weights_cache: Optional[Path] = Field(None, description="folder for quantized weights kept between starts "
                                                            "(default ~/.cache/makima-tts/weights)")
    threads: Optional[int] = Field(None, description="CPU threads for the engine")
    batch: bool = Field(True, description="Qwen3: step up to --max-streams concurrent streams together, one batched "
                                          "model step (default on; --no-batch: each stream steps alone)")
    piper_voice: str = Field("joe", description="embedded engine voice (default joe)")
    lazy_load: bool = Field(False, description="load the model on the first request")
    voices_dir: Path = Field(default_factory=default_voices_dir, description="the voice library folder")
    default_voice: Optional[str] = Field(None, description="voice used when a request names none")
    prompt_cache_size: int = Field(64, description="voice prompts kept in memory")
    prompt_cache_ttl_s: float = Field(3600.0, description="seconds a voice prompt stays in memory")
    max_upload_bytes: int = Field(20 * 1024 * 1024, description="largest voice upload")
    max_streams: Union[int, Literal["auto"]] = Field(
        "auto", description="utterances generating at once: a number or auto (default: the real-time capacity "
                            "measured for this engine path)")     # auto: see streams()
    max_queue: int = Field(16, description="utterances waiting for a slot before OVERLOADED")
    max_text_chars: int = Field(5000, description="longest text per request")
    session_idle_timeout_s: float = Field(300.0, description="seconds before an idle WebSocket closes")
    text_idle_timeout_s: float = Field(10.0, description="token mode: seconds without a `text` piece before the open "
                                                         "utterance ends as if flushed (default 10)")
    send_buffer_chunks: int = Field(8, description="audio chunks buffered per stream before it pauses (default 8)")
    api_keys: list[str] = Field(default_factory=list, description="require this API key (repeatable; env "
                                                                  "MAKIMA_TTS_API_KEYS as a JSON list)")
    # bounded work per client (issue 15)
    max_session_queue: int = Field(32, description="utterances queued per WebSocket session (default 32)")
    max_session_queue_chars: int = Field(20000, description="characters queued and pending per WebSocket session "
                                                            "(default 20000)")
    send_timeout_s: float = Field(20.0, description="seconds a client may accept no audio before its utterance is "
                                                    "cancelled (default 20)")
    max_json_bytes: int = Field(1024 * 1024, description="largest JSON request body (default 1 MiB)")
    header_timeout_s: float = Field(10.0, description="seconds for a request's headers to arrive (default 10)")
    body_timeout_s: float = Field(60.0, description="seconds for a request's body to arrive (default 60)")
    drain_timeout_s: float = Field(10.0, description="on SIGTERM, seconds running utterances get to finish before "
                                                     "clients are closed (default 10)")
    allowed_origins: list[str] = Field(default_factory=list, description="an Origin allowed besides the same origin "
                                       "and localhost (repeatable; '*' for any; env MAKIMA_TTS_ALLOWED_ORIGINS as a "
                                       "JSON list)")
    max_decode_seconds: float = Field(60.0, description="longest uploaded clip decoded (default 60)")
    max_decode_rate: int = Field(96000, description="highest sample rate of an uploaded clip (default 96000)")
    max_decode_channels: int = Field(2, description="most channels of an uploaded clip (default 2)")
    max_concurrent_decodes: int = Field(2, description="uploads decoded at once (default 2)")
    log_level: str = Field("info", description="debug, info, warning, error")

    @property
    def wants_chatterbox(self) -> bool:
        """engine = chatterbox, or auto with a checkpoint that is a local folder in the Chatterbox-Turbo ONNX
        layout (what auto looks for)."""
        return self.engine == "chatterbox" or (self.engine == "auto" and bool(self.checkpoint)
                                               and _chatterbox_layout(str(self.checkpoint)))

    def streams(self) -> int:
        """max_streams as a number. auto: for the default Qwen3 path on the CPU, CPU_STREAMS_PER_2_THREADS
        per 2 threads (below); on CUDA 16; without batching 1; the embedded Piper engine one per core."""
        if self.max_streams != "auto":
            return max(1, int(self.max_streams))
        import os

        cores = self.threads or os.cpu_count() or 2
        if self.engine == "piper" or not self.checkpoint:
            return max(2, cores)
        if self.wants_chatterbox:
            return max(1, cores // 2)       # not batched: each stream runs its own graphs
        if self.device.startswith("cuda"):
            return 16
        if not self.batch:
            return 1
        return max(1, CPU_STREAMS_PER_2_THREADS * cores // 2)


def _chatterbox_layout(checkpoint: str) -> bool:
    from ..engine.chatterbox import is_chatterbox_export

    try:
        return is_chatterbox_export(checkpoint)
    except OSError:
        return False


# bench/load.py on a 2-core Xeon (bench/RESULTS.md, 2026-11-29, fourth session): the real-time capacity
# (streams with no gap over 100 ms to a listener) is 0 there, as one stream is already slower than real time.
# 4 streams at once keep first audio at 1.3 s (2: 1.0 s, 8: 2.1 s) and raise the aggregate to 0.84 audio s
# per s (2: 0.54), where with 2 slots the 3rd and 4th stream would queue behind whole utterances. Re-measure
# on a machine that runs faster than real time and put its capacity here.
CPU_STREAMS_PER_2_THREADS = 4

