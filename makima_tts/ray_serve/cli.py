"""`makima-tts serve --ray [--replicas N | --autoscale MIN:MAX]`: the ingress here, the engine on Ray Serve.

Joins the cluster at RAY_ADDRESS, or starts a local one (loopback). Deploys the `Engine` application
(or attaches to it when a RayService deployed it already), waits for a replica, then serves the
usual app under uvicorn with a RayEngine as its engine. On exit it removes what it deployed.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

log = logging.getLogger("makima_tts.ray")


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray Serve (pip install 'makima-tts[ray]')")
    g.add_argument("--ray", action="store_true", default=False,
                   help="run the engine on Ray Serve replicas (joins RAY_ADDRESS, or starts a local cluster); "
                        "this process is the ingress")
    g.add_argument("--replicas", type=int, default=None, help="with --ray: engine replicas (default 1)")
    g.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                   help="with --ray: scale the engine replicas between MIN and MAX on ongoing streams (target: "
                        "one replica's --max-streams)")
    g.add_argument("--replica-cpus", type=float, default=None,
                   help="with --ray: CPUs each replica reserves (default --threads, or 1)")
    g.add_argument("--replica-gpus", type=float, default=None,
                   help="with --ray: GPUs each replica reserves (default 1 with --device cuda, else 0)")


def run(args: argparse.Namespace, settings) -> int:
    try:
        import ray
        from ray import serve
    except ImportError as e:
        print(f"error [MISSING_EXTRA]: --ray needs the `ray` extra: pip install 'makima-tts[ray]' ({e})",
              file=sys.stderr)
        return 2
    from .app import deploy_or_attach, parse_autoscale, replica_settings

    try:
        autoscale = parse_autoscale(args.autoscale)
    except ValueError as e:
        print(f"error [INVALID_SETTING]: {e}", file=sys.stderr)
        return 2
    if autoscale is not None and args.replicas is not None:
        print("error [INVALID_SETTING]: give --replicas or --autoscale, not both", file=sys.stderr)
        return 2
    replicas = args.replicas if args.replicas is not None else 1
    if replicas < 1:
        print("error [INVALID_SETTING]: --replicas must be at least 1", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    address = os.environ.get("RAY_ADDRESS") or None
    quiet = settings.log_level.lower() not in ("debug", "info")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    local_opts: dict[str, Any] = {"_node_ip_address": "127.0.0.1"} if address is None else {}   # a local cluster: loopback only
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING if quiet else logging.INFO,
             log_to_driver=not quiet, configure_logging=True, **local_opts)
    local = address is None
    deployed_here = False
    try:
        serve.start(proxy_location="Disabled", logging_config={"log_level": "WARNING" if quiet else "INFO"})
        settings = replica_settings(settings)
        handle, deployed_here = deploy_or_attach(settings, replicas, autoscale, args.replica_cpus, args.replica_gpus)
        from .engine import RayEngine, metrics_collector

        engine = RayEngine.connect(handle)
        per = int(engine.info.get("max_streams") or settings.streams())
        most = autoscale[1] if autoscale is not None else replicas
        # the ingress admits as many utterances at once as the replicas can take together
        ingress = settings.model_copy(update={"max_streams": per * most})
        log.info("ray: %s engine %s on %s replica(s) (%d streams each); %s cluster", engine.name, engine.model_id,
                 f"{autoscale[0]}-{autoscale[1]}" if autoscale else replicas, per, "a local" if local else "the")
        from ..server.app import create_app
        from ..server.serve import make_server

        app = create_app(ingress, engine=engine)
        app.state.ctx.metrics.registry.register(metrics_collector(engine))
        server = make_server(app)
        server.run()
        return 0 if server.started else 3
    finally:
        try:
            if deployed_here and not local:     # a local cluster goes as a whole below
                serve.delete(_app_name())
            if local:
                serve.shutdown()
        finally:
            ray.shutdown()


def _app_name() -> str:
    from . import APP_NAME

    return APP_NAME
