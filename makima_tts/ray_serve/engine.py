"""`RayEngine`: a SpeechEngine in the ingress whose work runs on the `Engine` deployment's replicas.

The FastAPI app, sessions, limits and voices REST use it exactly as they use a local engine; it
blocks like one (stream() is iterated on the server's worker threads). A voice of the library goes
as its multiplexed model id (`voice_id@prompt_key`) and the replica loads it from the shared
library; other voices go as they are. A replica lost before the utterance's first chunk: the
utterance is sent again (to another replica: nothing was played); lost after: `ReplicaLost`
(TTS_UNAVAILABLE, recoverable, with retry_after_ms), and the session's next utterance runs elsewhere.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any, Iterator, Optional

import numpy as np
import ray
from ray.exceptions import RayActorError, RayTaskError, TaskCancelledError
from ray.serve.exceptions import DeploymentUnavailableError, RequestCancelledError

from ..bridge import CancelToken
from ..engine.generate import TextFeed
from ..engine.types import AudioChunk, GenerationSettings, VoiceInfo
from ..errors import EngineUnavailable, MakimaError
from .registry import REPORT_S, get_registry

log = logging.getLogger("makima_tts.ray")
RETRY_AFTER_MS = 500          # the hint given with ReplicaLost: Serve routes the retry to a live replica
RESEND_BEFORE_AUDIO = 2       # a replica lost before any audio: send the utterance again this many times
INFO_TIMEOUT_S = 600.0        # waiting for the first replica's info (the model loads)

try:                                               # not in every Ray version
    from ray.exceptions import ActorUnavailableError
    _LOST: tuple = (RayActorError, ActorUnavailableError)
except ImportError:  # pragma: no cover
    _LOST = (RayActorError,)
try:
    from ray.serve.exceptions import ReplicaUnavailableError
    _LOST += (ReplicaUnavailableError,)
except ImportError:  # pragma: no cover
    pass


class ReplicaLost(EngineUnavailable):
    """The engine replica speaking this utterance went away mid-stream. Recoverable: the session goes
    on, and the next utterance (or a retry of this one after retry_after_ms) runs on another replica."""

    recoverable = True

    def __init__(self, message: str, retry_after_ms: int = RETRY_AFTER_MS):
        super().__init__(message)
        self.retry_after_ms = int(retry_after_ms)


def voice_ref(voice) -> tuple[Optional[tuple], str]:
    """(what the replica is sent, the multiplexed model id) for a voice as engine.stream takes it."""
    if voice is None or isinstance(voice, str):
        return (("builtin", voice) if voice else None), ""
    meta = getattr(voice, "meta", None) or {}
    voice_id, key = meta.get("voice_id"), meta.get("voice_key")
    if voice_id and key:
        model_id = f"{voice_id}@{key}"
        return ("library", model_id), model_id
    return ("prompt", voice), ""


class RayEngine:
    """Stands for the engine of the `Engine` deployment (its name, rate, voices) in the ingress."""

    def __init__(self, handle, info: dict, registry=None):
        self.handle = handle
        self.info = info
        self.name: str = info["name"]
        self.model_id: str = info["model_id"]
        self.sample_rate: int = int(info["sample_rate"])
        self.supports_cloning: bool = bool(info["supports_cloning"])
        self.fingerprint: str = info.get("fingerprint", "")
        self.defaults: GenerationSettings = info.get("defaults") or GenerationSettings()
        self._builtin: list[VoiceInfo] = list(info.get("builtin_voices") or [])
        self.registry = registry                  # the replicas' registry (looked up by the poll thread)
        self._replicas: list[dict] = []
        self._lock = threading.Lock()
        self.lost = 0                   # utterances that lost their replica mid-stream
        self.resent = 0                 # utterances sent again after a replica was lost before audio
        self._stop = threading.Event()
        threading.Thread(target=self._poll_loop, name="makima-ray-registry", daemon=True).start()

    @classmethod
    def create(cls, handle, info: dict) -> "RayEngine":
        """A RayEngine for what a replica said it serves: a RayTokenEngine where the replicas take text token
        by token (Qwen3), so the ingress offers token mode."""
        return RayTokenEngine(handle, info) if info.get("tokenizer") is not None else cls(handle, info)

    @classmethod
    def connect(cls, handle, timeout: float = INFO_TIMEOUT_S) -> "RayEngine":
        """Ask a replica what it serves (waits for one to be up)."""
        return cls.create(handle, handle.info.remote().result(timeout_s=timeout))

    # ------------------------------------------------------------------ SpeechEngine

    def builtin_voices(self) -> list[VoiceInfo]:
        return list(self._builtin)

    def create_voice_prompt(self, audio: np.ndarray, sample_rate: int, transcript: Optional[str] = None,
                            x_vector_only: bool = False):
        """Computed on a replica (uploads; a voice with no saved prompt); the ingress saves it to the
        shared library, where every replica loads it from."""
        try:
            return self.handle.create_voice_prompt.remote(np.asarray(audio, dtype=np.float32), int(sample_rate),
                                                          transcript, bool(x_vector_only)).result()
        except RayTaskError as e:
            raise _cause(e) from None
        except _LOST + (DeploymentUnavailableError,) as e:
            raise ReplicaLost(f"the engine replica computing the voice prompt went away ({type(e).__name__}); "
                              "retry") from None

    def stream(self, text: str, voice=None, language: str = "auto", settings: Optional[GenerationSettings] = None,
               cancel: Optional[CancelToken] = None) -> Iterator[AudioChunk]:
        cancel = cancel if cancel is not None else CancelToken()
        ref, model_id = voice_ref(voice)
        if isinstance(text, TextFeed):             # token mode: the pieces go on through the relay as they come
            sender = self._feed_sender(text)
            try:
                yield from self._stream(sender.ref, ref, model_id, language, settings, cancel)
            finally:
                sender.done()
            return
        if not text or not isinstance(text, str):
            raise EngineUnavailable("no text to speak")
        yield from self._stream(text, ref, model_id, language, settings, cancel)

    def _feed_sender(self, feed: TextFeed) -> "_FeedSender":
        raise EngineUnavailable("the engine replicas do not take text token by token; use sentence mode")

    def _stream(self, text, ref, model_id: str, language: str, settings: Optional[GenerationSettings],
                cancel: CancelToken) -> Iterator[AudioChunk]:
        attempts = 0
        while True:
            if cancel.cancelled:
                return
            response = self.handle.options(stream=True, multiplexed_model_id=model_id).generate.remote(
                text, ref, language, settings or self.defaults)
            forget = cancel.on_cancel(response.cancel)
            got_audio = False
            done = False
            try:
                for pcm, index, frame_index, num_frames, is_last in response:
                    got_audio = True
                    yield AudioChunk(pcm=pcm, sample_rate=self.sample_rate, index=index, frame_index=frame_index,
                                     num_frames=num_frames, is_last=is_last)
                    if cancel.cancelled:
                        return
                done = True
                return
            except (RequestCancelledError, TaskCancelledError):
                if cancel.cancelled:
                    return
                raise ReplicaLost("the engine replica cancelled this utterance; retry") from None
            except RayTaskError as e:
                cause = _cause(e)
                if not isinstance(cause, ReplicaLost) or cancel.cancelled:
                    raise cause from None
                lost: BaseException = e
            except _LOST + (DeploymentUnavailableError,) as e:
                if cancel.cancelled:
                    return
                lost = e
            finally:
                forget()
                if not done:
                    response.cancel()
            if got_audio or attempts >= RESEND_BEFORE_AUDIO:
                with self._lock:
                    self.lost += 1
                log.warning("an engine replica was lost mid-utterance (%s)", type(lost).__name__)
                raise ReplicaLost("the engine replica speaking this utterance went away; the next utterance "
                                  "goes to another replica (retry this one)")
            attempts += 1
            with self._lock:
                self.resent += 1
            log.info("an engine replica was lost before the first audio (%s); sending the utterance again",
                     type(lost).__name__)
            time.sleep(0.05 * attempts)

    def close(self) -> None:
        self._stop.set()

    # ------------------------------------------------------------------ replicas (/ready, /metrics)

    def replicas(self) -> list[dict]:
        with self._lock:
            return list(self._replicas)

    def cluster_status(self) -> dict:
        """Merged into GET /ready: ready only with at least one replica up."""
        replicas = self.replicas()
        out: dict = {"ray": {"replicas": len(replicas), "app": _app_name(),
                             "streams": sum(r.get("streams", 0) for r in replicas),
                             "replica": [{k: r.get(k) for k in ("replica_id", "pid", "streams", "served",
                                                                "max_streams", "prompts_cached", "prompts_computed",
                                                                "prompts_from_disk", "voices", "voice_loads")}
                                         for r in replicas],
                             "lost_mid_stream": self.lost, "resent": self.resent}}
        if not replicas:
            out["ready"] = False
            out["reason"] = "no engine replica is up (yet)"
        return out

    def _poll(self) -> None:
        try:
            if self.registry is None:
                self.registry = get_registry()
            snapshot = ray.get(self.registry.snapshot.remote(), timeout=5.0)
        except Exception as e:        # the registry is restarting: keep the last view a little longer
            log.debug("registry poll failed: %s", e)
            return
        with self._lock:
            self._replicas = snapshot

    def _poll_loop(self) -> None:
        self._poll()
        while not self._stop.wait(REPORT_S):
            self._poll()


class RayTokenEngine(RayEngine):
    """A RayEngine whose replicas take text token by token (Qwen3): the ingress offers token mode. Its
    TextFeeds tokenize as the replicas do (their tokenizer, sent with their info), so the session's limits
    and `tokens_needed` are the single process's; the pieces reach the replica through the text relay."""

    def __init__(self, handle, info: dict, registry=None):
        super().__init__(handle, info, registry)
        self.tokenizer = info["tokenizer"]
        self._relay: Any = None

    def new_feed(self, max_chars: Optional[int] = None) -> TextFeed:
        return TextFeed(self.tokenizer.encode, max_chars)

    def tokens_needed(self, voice) -> int:
        """Text tokens a streamed utterance in this voice needs before it can start (Qwen3Engine's rule)."""
        from ..engine.generate import tokens_needed
        from ..engine.qwen3 import _ref_chat

        icl = bool(getattr(voice, "icl", False) and getattr(voice, "ref_text", None))
        return tokens_needed(voice, self.tokenizer.encode(_ref_chat(voice.ref_text))[3:-2] if icl else None)

    def _feed_sender(self, feed: TextFeed) -> "_FeedSender":
        if self._relay is None:
            from .relay import get_relay

            self._relay = get_relay()
        return _FeedSender(self._relay, feed)


class _FeedSender:
    """Sends a TextFeed's pieces to the relay as they are pushed (its listener), then its close."""

    def __init__(self, relay, feed: TextFeed):
        self.relay = relay
        self.feed = feed
        self.ref = ("feed", uuid.uuid4().hex)
        self._lock = threading.Lock()
        self._sent = 0
        self._closed = False
        self._done = False
        feed.listen(self.update)
        self.update()

    def update(self) -> None:
        with self._lock:
            if self._done:
                return
            closed = self.feed.closed             # first: once closed, the text read after it is all of it
            text = self.feed.text
            if len(text) > self._sent:
                self.relay.put.remote(self.ref[1], self._sent, text[self._sent:])
                self._sent = len(text)
            if closed and not self._closed:
                self.relay.close.remote(self.ref[1], self._sent)
                self._closed = True

    def done(self) -> None:
        with self._lock:
            self._done = True
        self.relay.drop.remote(self.ref[1])


def _cause(e: RayTaskError) -> BaseException:
    """The replica's own exception (a MakimaError passes as it is)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, MakimaError):
        return cause
    if isinstance(cause, _LOST):
        return ReplicaLost("the engine replica went away; retry")
    from ..errors import SynthesisError

    log.error("engine replica failed: %s", e)
    return SynthesisError("synthesis failed on an engine replica (its log has the details)")


def _app_name() -> str:
    from . import APP_NAME

    return APP_NAME


def metrics_collector(engine: RayEngine):
    """A prometheus collector of the replicas, registered on the app's registry."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    class _Collector:
        def collect(self):
            replicas = engine.replicas()
            up = GaugeMetricFamily("makima_ray_replicas", "Engine replicas up (reporting)")
            up.add_metric([], len(replicas))
            yield up
            streams = GaugeMetricFamily("makima_ray_replica_streams", "Utterances generating on a replica",
                                        labels=["replica"])
            cached = GaugeMetricFamily("makima_ray_replica_prompts_cached", "Voice prompts a replica holds",
                                       labels=["replica"])
            computed = CounterMetricFamily("makima_ray_replica_prompts_computed", "Voice prompts a replica computed",
                                           labels=["replica"])
            served = CounterMetricFamily("makima_ray_replica_utterances", "Utterances a replica took up",
                                         labels=["replica"])
            for r in replicas:
                rid = str(r.get("replica_id"))
                streams.add_metric([rid], r.get("streams", 0))
                cached.add_metric([rid], r.get("prompts_cached", 0))
                computed.add_metric([rid], r.get("prompts_computed", 0))
                served.add_metric([rid], r.get("served", 0))
            yield from (streams, cached, computed, served)
            lost = CounterMetricFamily("makima_ray_lost_mid_stream", "Utterances whose replica went away mid-stream")
            lost.add_metric([], engine.lost)
            yield lost

    return _Collector()


__all__ = ["RayEngine", "RayTokenEngine", "ReplicaLost", "metrics_collector", "voice_ref"]
