"""The Ray Serve application: the `Engine` deployment with its options, deployed or attached to.

`engine_app(settings, replicas=, autoscale=)` is the application; `build(args)` is the same for
`serve run` / a KubeRay RayService (`import_path: makima_tts.ray_serve.app:build`, `args:` the
settings' fields plus `replicas` or `autoscale` "MIN:MAX" and `replica_cpus` / `replica_gpus`).
"""
from __future__ import annotations

from typing import Any, Optional

from ray import serve

from ..server.settings import Settings
from . import APP_NAME, DEPLOYMENT
from .replica import EngineReplica


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
               replica_cpus: Optional[float] = None, replica_gpus: Optional[float] = None):
    """The application: `replicas` fixed, or autoscaled within `autoscale` on ongoing streams with a
    target of one replica's real-time capacity (Settings.streams(): bench/load.py's figure)."""
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
                                         "target_ongoing_requests": per}
    else:
        options["num_replicas"] = max(1, int(replicas))
    deployment: Any = serve.deployment(EngineReplica)
    deployment = deployment.options(**options)
    return deployment.bind(s.model_dump(mode="json"))


def build(args: dict) -> Any:
    """App builder for `serve run makima_tts.ray_serve.app:build key=value ...` and RayService configs."""
    args = dict(args or {})
    replicas = int(args.pop("replicas", 1))
    autoscale = parse_autoscale(args.pop("autoscale", None))
    cpus = args.pop("replica_cpus", None)
    gpus = args.pop("replica_gpus", None)
    settings = Settings(**args)
    return engine_app(settings, replicas, autoscale, float(cpus) if cpus is not None else None,
                      float(gpus) if gpus is not None else None)


def deployed() -> bool:
    """Whether the application runs on the cluster already (a RayService deployed it; another ingress)."""
    try:
        return APP_NAME in serve.status().applications
    except Exception:
        return False


def deploy_or_attach(settings: Settings, replicas: int = 1, autoscale=None, replica_cpus=None, replica_gpus=None,
                     attach: bool = True):
    """(handle, deployed_here): attach to the running application, or deploy it (waits until its
    replicas are up)."""
    if attach and deployed():
        return serve.get_app_handle(APP_NAME), False
    app = engine_app(settings, replicas, autoscale, replica_cpus, replica_gpus)
    return serve.run(app, name=APP_NAME, route_prefix=None), True
