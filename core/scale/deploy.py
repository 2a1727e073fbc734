"""``avatar serve --ray``: deploy the live replicas on Ray Serve and run the front door.

:func:`deploy` starts (or updates) the Serve application — no Serve HTTP proxy:
the replicas serve their own HTTP on their nodes and the front door (this
process) is the one public address. :func:`serve_ray` is the whole command.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import click

from ..errors import ConfigError
from ..serve.config import ServeConfig
from .options import ScaleOptions

log = logging.getLogger(__name__)


def replica_options(scale: ScaleOptions) -> dict[str, Any]:
    """Serve deployment options: resources, replica count or autoscaling, draining."""
    opts: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": scale.cpus_per_replica, "num_gpus": scale.gpus_per_replica},
        # Serve waits this long for __del__ (the drain) before it kills a replica it removes
        "graceful_shutdown_timeout_s": scale.drain_timeout_s + 20.0,
        "graceful_shutdown_wait_loop_s": 0.5,
    }
    if scale.gpus_per_replica == 0:
        opts["max_replicas_per_node"] = 1  # CPU backends: one replica (one shared backend) per node
    if not scale.autoscaling:
        opts["num_replicas"] = scale.min_replicas
    else:
        opts["autoscaling_config"] = {
            "min_replicas": scale.min_replicas,
            "max_replicas": scale.max_replicas,
            "initial_replicas": max(scale.min_replicas, 1),
            "look_back_period_s": scale.look_back_period_s,
            # (deprecated in Serve, but a look-back window at or below its 10 s default needs it shorter)
            **({"metrics_interval_s": scale.look_back_period_s / 2} if scale.look_back_period_s <= 10 else {}),
            "upscale_delay_s": scale.upscale_delay_s,
            "downscale_delay_s": scale.downscale_delay_s,
            "policy": {"policy_function": "avatar.scale.policy:SessionPolicy",
                       "policy_kwargs": {"sessions_per_replica": scale.sessions_per_replica,
                                         "spare_sessions": scale.spare_sessions}},
        }
    return opts


def replica_application(config: ServeConfig, scale: ScaleOptions) -> Any:
    """The Serve application (one deployment: the live replicas)."""
    from .deployment import AvatarReplica

    return AvatarReplica.options(**replica_options(scale)).bind(config, scale)


def deploy(config: ServeConfig, scale: ScaleOptions) -> Any:
    """Start the registry and the Serve application (Ray must be connected); returns the registry handle."""
    import ray
    from ray import serve

    from .registry import registry_handle

    registry = registry_handle(scale.registry_name)
    ray.get(registry.set_mode.remote("drain"))
    serve.start(proxy_location="Disabled")
    serve.run(replica_application(config, scale), name=scale.app_name, route_prefix=None, blocking=False)
    return registry


def wait_replicas(registry: Any, n: int, timeout: float = 300.0) -> list[dict[str, Any]]:
    """Wait until at least ``n`` replicas report (they load and warm their models first)."""
    import ray

    deadline = time.monotonic() + timeout
    while True:
        snap = [r for r in ray.get(registry.snapshot.remote()) if not r.get("draining")]
        if len(snap) >= n:
            return snap
        if time.monotonic() > deadline:
            raise ConfigError(f"only {len(snap)} of {n} replica(s) started within {timeout:g} s; does the cluster "
                              "have the GPUs/CPUs they ask for? (`ray status`)")
        time.sleep(0.5)


def undeploy(scale: ScaleOptions, registry: Any = None) -> None:
    """Delete the Serve application: replicas end their sessions at once (no drain) and stop."""
    import ray
    from ray import serve

    if registry is not None:
        try:
            ray.get(registry.set_mode.remote("shutdown"), timeout=10)
        except Exception as exc:
            log.warning("could not tell the replicas to shut down: %s", exc)
    serve.delete(scale.app_name)
    if registry is not None:
        ray.kill(registry)


def absolute_paths(config: ServeConfig) -> ServeConfig:
    """Avatar, model and encoder paths made absolute: replicas run in other folders (and on other nodes)."""
    import dataclasses
    from pathlib import Path

    def spec(a: Any) -> Any:
        opts = {k: (str(Path(v).resolve()) if k == "encoder" and v else v) for k, v in a.feature_options.items()}
        return dataclasses.replace(a, path=Path(a.path).resolve(), model=Path(a.model).resolve() if a.model else None,
                                   feature_options=opts)

    return dataclasses.replace(config, avatars=tuple(spec(a) for a in config.avatars))


def serve_ray(config: ServeConfig, scale: ScaleOptions, address: str | None) -> None:
    """``avatar serve --ray [ADDRESS]``: deploy, wait for the first replicas, serve the front door until a signal."""
    from aiohttp import web

    from ..serve import _access_log_class, require_extra
    from . import connect, require_ray
    from .front import build_front_app

    require_extra()
    require_ray()
    config = absolute_paths(config)
    connect(address)
    click.echo(f"avatar serve --ray: deploying {scale.min_replicas}..{scale.max_replicas} replica(s) ...", err=True)
    registry = deploy(config, scale)
    try:
        snap = wait_replicas(registry, max(1, scale.min_replicas))
        app = build_front_app(config, scale, registry)
        url = f"http://{'[' + config.host + ']' if ':' in config.host else config.host}:{config.port}/"

        async def announce(app: Any) -> None:
            nodes = sorted({r.get("node_ip", "?") for r in snap})
            click.echo(f"avatar serve --ray: listening on {url} ({len(snap)} replica(s) on {', '.join(nodes)}; "
                       f"capacity {sum(int(r['capacity']) for r in snap)} session(s))", err=True)

        app.on_startup.append(announce)
        web.run_app(app, host=config.host, port=config.port, print=None, access_log_class=_access_log_class(),
                    handle_signals=True, shutdown_timeout=10.0)
    finally:
        # a private Ray instance (--ray local) ends with this process: a Ctrl-C reached its daemons too
        if address not in (None, "local"):
            _bounded_undeploy(scale, registry)


def _bounded_undeploy(scale: ScaleOptions, registry: Any) -> None:
    """Delete the application, but never hang the exit on a cluster that stopped answering."""
    done = threading.Event()

    def stop() -> None:
        try:
            undeploy(scale, registry)
        finally:
            done.set()

    threading.Thread(target=stop, name="avatar-undeploy", daemon=True).start()
    if not done.wait(60.0):
        log.warning("the Serve application %r did not stop in time; `serve shutdown` removes it", scale.app_name)
