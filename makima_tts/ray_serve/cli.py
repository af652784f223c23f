"""`makima-tts serve --ray [--replicas N | --autoscale MIN:MAX]`: the server as a Ray Serve application.

Joins the cluster at RAY_ADDRESS, or starts a local one (loopback). Starts Serve's HTTP proxy on --host /
--port and deploys the application (app.py): the `Ingress` deployment (the server's FastAPI app) and the
`Engine` deployment; returns to waiting once the ingress is up (it waits for an engine replica). On
SIGINT / SIGTERM it drains the ingress (as `serve` does), then removes what it deployed (a local cluster
goes as a whole). A cluster where the application runs already (a RayService) is left alone.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from typing import Any

log = logging.getLogger("makima_tts.ray")
AUTOSCALING_ENV = "MAKIMA_TTS_RAY_AUTOSCALING"    # JSON: more of Serve's autoscaling_config (e.g. upscale_delay_s)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Ray Serve (pip install 'makima-tts[ray]')")
    g.add_argument("--ray", action="store_true", default=False,
                   help="run as a Ray Serve application: an ingress deployment (this server's app) and engine "
                        "replicas, behind Serve's HTTP proxy on --host/--port (joins RAY_ADDRESS, or starts a local "
                        "cluster)")
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
    from . import APP_NAME
    from .app import application, deploy, deployed, parse_autoscale

    try:
        autoscale = parse_autoscale(args.autoscale)
        autoscaling = json.loads(os.environ.get(AUTOSCALING_ENV) or "{}")
        if not isinstance(autoscaling, dict):
            raise ValueError(f"{AUTOSCALING_ENV} is a JSON object of Serve's autoscaling_config fields")
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
    for sig in (signal.SIGINT, signal.SIGTERM):   # (after ray.init, which has its own; SIGINT also where a parent
        signal.signal(sig, _interrupt)            # left it ignored): drain, remove what was deployed, exit
    local = address is None
    handle = None
    try:
        # Serve's HTTP proxy is the address: HTTP and WebSockets go to the Ingress deployment
        serve.start(http_options={"host": settings.host, "port": settings.port},
                    proxy_location="HeadOnly" if local else "EveryNode",
                    logging_config={"log_level": "WARNING" if quiet else "INFO"})
        if not local and deployed():
            print(f"error [ALREADY_DEPLOYED]: the `{APP_NAME}` application already runs on this cluster (a RayService "
                  "or another `serve --ray` deployed it); its address is Serve's HTTP proxy", file=sys.stderr)
            return 2
        app = application(settings, replicas, autoscale, args.replica_cpus, args.replica_gpus,
                          autoscaling=autoscaling or None)
        try:
            handle = deploy(app)          # returns once the ingress is up, which waits for an engine replica
        except KeyboardInterrupt:
            raise
        except Exception as e:
            log.error("ray: the application did not start: %s%s", e, _why_not_started(serve, APP_NAME))
            return 3
        log.info("ray: serving on http://%s:%d (Serve's proxy): the Ingress deployment, the Engine deployment on %s "
                 "replica(s); %s cluster", settings.host, settings.port,
                 f"{autoscale[0]}-{autoscale[1]}" if autoscale else replicas, "a local" if local else "the")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)      # the clean-up runs to its end
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if handle is not None:      # running utterances finish, clients hear SERVER_SHUTDOWN
                try:
                    handle.drain.remote().result(timeout_s=settings.drain_timeout_s + 10.0)
                except Exception as e:
                    log.warning("ray: draining the ingress failed: %s", e)
                if not local:           # a local cluster goes as a whole below
                    serve.delete(APP_NAME)
            if local:
                serve.shutdown()
        finally:
            ray.shutdown()


def _why_not_started(serve, app_name: str) -> str:
    """What Serve says of the application's deployments that failed (a replica's constructor error, with its
    traceback), for the error line: the replicas' own logs may not reach this terminal."""
    try:
        app = serve.status().applications[app_name]
        failed = [f"\n  {name}: {d.message}" for name, d in app.deployments.items()
                  if d.message and str(d.status).upper().endswith(("UNHEALTHY", "DEPLOY_FAILED"))]
        return "".join(failed) or (f"\n  {app.message}" if app.message else "")
    except Exception:
        return ""


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
