"""`makima-tts serve --ray`: the same server as a Ray Serve application (the `ray` extra).

    ingress   the `Ingress` deployment (ingress.py): the server's FastAPI app (protocol, sessions, auth,
              limits, voices REST), built by server.app.create_app, as a Serve ingress behind Serve's HTTP
              proxy; its engine is a `RayEngine` (engine.py), a SpeechEngine whose stream() runs on a replica
    replicas  the `Engine` deployment (replica.py): each loads the engine as the single-process server does
              (Qwen3 + BatchedEngine, same settings) and streams chunks back through a deployment handle;
              voices are Ray Serve multiplexed models keyed by voice id and prompt key, so an utterance goes
              to a replica that holds its voice's prompt, and each replica loads a voice once
    registry  a small named actor (registry.py) the replicas report to (streams, voices cached); /ready and
              /metrics read it
    relay     a small named actor (relay.py) carrying token mode's text pieces from the ingress to the replica
    app.py    the application and its options (`build` for `serve run` / a RayService); cli.py: `serve --ray`

Nothing here is imported by the plain `serve` path, and makima_tts.server imports nothing from here: `import
ray` happens only below this package.
"""
APP_NAME = "makima-tts"
DEPLOYMENT = "Engine"
INGRESS = "Ingress"
NAMESPACE = "makima_tts"
REGISTRY = "makima-tts-replicas"
