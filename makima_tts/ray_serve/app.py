"""The Ray Serve application: the `Ingress` deployment (the server's FastAPI app, ingress.py) in front of the
`Engine` deployment (replica.py), with their options; deployed by `serve --ray`, or by a RayService.

`application(settings, replicas=, autoscale=)` is the application; `build(args)` is the same for
`serve run` / a KubeRay RayService (`import_path: makima_tts.ray_serve.app:build`, `args:` any of the
settings' fields, the rest from MAKIMA_TTS_* in the environment as `serve` reads them, plus `replicas`
or `autoscale` "MIN:MAX" (and `autoscaling_config`: more of Serve's, e.g. upscale_delay_s), `replica_cpus`
/ `replica_gpus`, `ingress_replicas` / `ingress_cpus`).
"""
from __future__ import annotations

from typing import Any, Optional

from ray import serve

from ..server.settings import Settings
from . import APP_NAME, DEPLOYMENT, INGRESS
from .replica import EngineReplica

INGRESS_MAX_ONGOING = 4096     # HTTP requests and WebSocket sessions one ingress replica holds (the app limits work)


def parse_autoscale(text: Optional[str]) -> Optional[tuple[int, int]]:
    """"MIN:MAX" -> (min, max), 0 <= min <= max, max >= 1."""
    if not text:
        return None
    try:
        lo, hi = (int(x) for x in str(text).split(":"))
    except ValueError:
        raise ValueError(f"--autoscale takes MIN:MAX (e.g. 1:4), not {text!r}") from None
    if lo < 0 or hi < 1 or lo > hi:
        raise ValueError(f"--autoscale {text}: need 0 <= MIN <= MAX and MAX >= 1")
    return lo, hi


def replica_settings(settings: Settings) -> Settings:
    """The settings each replica loads with: max_streams fixed to one number (the batch size), so the
    ingress and every replica agree on a replica's capacity."""
    return settings.model_copy(update={"max_streams": settings.streams()})


def engine_app(settings: Settings, replicas: int = 1, autoscale: Optional[tuple[int, int]] = None,
               replica_cpus: Optional[float] = None, replica_gpus: Optional[float] = None,
               autoscaling: Optional[dict] = None):
    """The engine deployment: `replicas` fixed, or autoscaled within `autoscale` on ongoing streams with a
    target of one replica's real-time capacity (Settings.streams(): bench/load.py's figure). `autoscaling`:
    more of Serve's autoscaling_config (upscale_delay_s, downscale_delay_s, look_back_period_s...) over these."""
    s = replica_settings(settings)
    per = s.streams()
    if replica_gpus is None:
        replica_gpus = 1.0 if s.device.startswith("cuda") else 0.0
    actor: dict[str, Any] = {"num_cpus": float(replica_cpus if replica_cpus is not None else (s.threads or 1))}
    if replica_gpus:
        actor["num_gpus"] = float(replica_gpus)
    options: dict[str, Any] = dict(name=DEPLOYMENT, max_ongoing_requests=per, ray_actor_options=actor,
                                   health_check_period_s=2.0, health_check_timeout_s=30.0,
                                   graceful_shutdown_timeout_s=max(1.0, s.drain_timeout_s))
    if autoscale is not None:
        lo, hi = autoscale
        options["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
                                         "target_ongoing_requests": per, **(autoscaling or {})}
    else:
        options["num_replicas"] = max(1, int(replicas))
    deployment: Any = serve.deployment(EngineReplica)
    deployment = deployment.options(**options)
    return deployment.bind(s.model_dump(mode="json"))


def ingress_settings(settings: Settings, replicas: int = 1, autoscale: Optional[tuple[int, int]] = None) -> Settings:
    """The ingress admits as many utterances at once as the engine replicas can take together: one
    replica's streams times the replicas (MAX when autoscaled)."""
    per = replica_settings(settings).streams()
    most = autoscale[1] if autoscale is not None else max(1, int(replicas))
    return settings.model_copy(update={"max_streams": per * most})


def application(settings: Settings, replicas: int = 1, autoscale: Optional[tuple[int, int]] = None,
                replica_cpus: Optional[float] = None, replica_gpus: Optional[float] = None,
                ingress_replicas: int = 1, ingress_cpus: float = 0.0, autoscaling: Optional[dict] = None):
    """The whole application: the `Ingress` deployment (HTTP and WebSockets through Serve's proxy), bound
    to the `Engine` deployment (a deployment handle in the ingress)."""
    from .ingress import Ingress

    engine = engine_app(settings, replicas, autoscale, replica_cpus, replica_gpus, autoscaling)
    s = ingress_settings(settings, replicas, autoscale)
    deployment: Any = serve.deployment(Ingress)
    deployment = deployment.options(
        name=INGRESS, num_replicas=max(1, int(ingress_replicas)), max_ongoing_requests=INGRESS_MAX_ONGOING,
        ray_actor_options={"num_cpus": float(ingress_cpus)},
        graceful_shutdown_timeout_s=max(1.0, s.drain_timeout_s) + 5.0)
    return deployment.bind(engine, s.model_dump(mode="json"))


def build(args: dict) -> Any:
    """App builder for `serve run makima_tts.ray_serve.app:build key=value ...` and RayService configs:
    the settings are `args` over MAKIMA_TTS_* from the environment (as `makima-tts serve` reads them)."""
    args = dict(args or {})
    replicas = int(args.pop("replicas", 1))
    autoscale = parse_autoscale(args.pop("autoscale", None))
    cpus = args.pop("replica_cpus", None)
    gpus = args.pop("replica_gpus", None)
    ingress_replicas = int(args.pop("ingress_replicas", 1))
    ingress_cpus = float(args.pop("ingress_cpus", 0.0))
    autoscaling = args.pop("autoscaling_config", None)
    settings = Settings(**args)
    return application(settings, replicas, autoscale, float(cpus) if cpus is not None else None,
                       float(gpus) if gpus is not None else None, ingress_replicas, ingress_cpus, autoscaling)


def deployed() -> bool:
    """Whether the application runs on the cluster already (a RayService, or another `serve --ray`, deployed it)."""
    try:
        return APP_NAME in serve.status().applications
    except Exception:
        return False


def deploy(app) -> Any:
    """Deploy the application at route / of Serve's proxy; waits until its replicas are up (the ingress
    waits for an engine replica). Returns the ingress deployment's handle."""
    return serve.run(app, name=APP_NAME, route_prefix="/")
