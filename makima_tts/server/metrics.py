"""Prometheus metrics, one registry per app."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.active_sessions = Gauge("makima_active_sessions", "Open WebSocket sessions", registry=r)
        self.active_streams = Gauge("makima_active_streams", "Utterances generating now", registry=r)
        self.queued = Gauge("makima_queued_requests", "Utterances waiting for a generation slot", registry=r)
        self.utterances = Counter("makima_utterances_total", "Utterances by outcome", ["engine", "outcome"],
                                  registry=r)
        self.ttfa = Histogram("makima_time_to_first_audio_seconds", "Time to first audio of an utterance",
                              buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30), registry=r)
        self.rtf = Histogram("makima_real_time_factor", "Processing time / audio duration",
                             buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20), registry=r)
        self.audio_seconds = Counter("makima_audio_seconds_total", "Audio produced", registry=r)
        self.errors = Counter("makima_errors_total", "Errors by code", ["code"], registry=r)
        self.played_reports = Counter("makima_played_reports_total", "`played` reports from WebSocket clients",
                                      registry=r)
        self.cut_audio_seconds = Counter("makima_cut_audio_seconds_total", "Audio of utterances cut by cancel or "
                                         "interrupt: sent, and played as the client last reported", ["kind"],
                                         registry=r)
        self.wyoming_connections = Gauge("makima_wyoming_connections", "Open Wyoming connections", registry=r)
        self.prompt_computations = Counter("makima_voice_prompt_computations_total",
                                           "Voice prompts computed (not loaded from cache)", registry=r)

    def utterance(self, engine: str, outcome: str, stats=None) -> None:
        """Count one utterance by outcome (ok, cancelled, error); for an ok one, observe its
        time to first audio, real-time factor and audio seconds (server/stream.UtteranceStats)."""
        self.utterances.labels(engine, outcome).inc()
        if outcome != "ok" or stats is None:
            return
        if stats.ttfa_s is not None:
            self.ttfa.observe(stats.ttfa_s)
        if stats.rtf is not None:
            self.rtf.observe(stats.rtf)
        self.audio_seconds.inc(stats.audio_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
