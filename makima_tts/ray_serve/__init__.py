"""`makima-tts serve --ray`: the same server, its engine on Ray Serve replicas (the `ray` extra).

    ingress   the usual FastAPI app under uvicorn (protocol, sessions, auth, limits, voices REST), a Ray
              driver; its engine is a `RayEngine` (engine.py), a SpeechEngine whose stream() runs on a replica
    replicas  the `Engine` deployment (replica.py): each loads the engine as the single-process server does
              (Qwen3 + BatchedEngine, same settings) and streams chunks back through a deployment handle;
              voices are Ray Serve multiplexed models keyed by voice id and prompt key, so an utterance goes
              to a replica that holds its voice's prompt, and each replica loads a voice once
    registry  a small named actor (registry.py) the replicas report to (streams, voices cached); /ready and
              /metrics read it

Nothing here is imported by the plain `serve` path: `import ray` happens only below this package.
"""
APP_NAME = "makima-tts"
DEPLOYMENT = "Engine"
INGRESS = "Ingress"
NAMESPACE = "makima_tts"
REGISTRY = "makima-tts-replicas"
