"""``avatar serve``: live avatar sessions over HTTP/WebSocket/WebRTC (the ``[serve]`` extra)."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import ConfigError, Interrupted


@click.command("serve")
@click.option("--avatar", "avatars", multiple=True, metavar="[NAME=]PATH",
              help="An avatar package to serve (repeatable); NAME defaults to the folder name.")
@click.option("--model", type=click.Path(dir_okay=False, exists=True), help="The UNet-328 ONNX file (default: each package's).")
@click.option("--features", default="ave", show_default=True, help="Feature source for every avatar.")
@click.option("--ave-encoder", type=click.Path(dir_okay=False, exists=True), help="Audio encoder for the ave features.")
@click.option("--demo", is_flag=True, help="Serve the synthetic demo avatar with the shipped demo model (trained on it), built locally.")
@click.option("--tiny", is_flag=True, help="With --demo: the untrained tiny test model instead of the trained demo model.")
@click.option("--workdir", default=".avatar-demo", show_default=True, type=click.Path(file_okay=False),
              help="Where --demo builds its avatar and models (reused next time).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Bind address; anything but loopback needs --token.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option("--token", envvar="AVATAR_SERVE_TOKEN", help="Bearer token for the server routes (env AVATAR_SERVE_TOKEN).")
@click.option("--backend", default="auto", show_default=True, help="auto, cpu, onnx-cuda, openvino, tensorrt, or a plugin's.")
@click.option("--batch", default=8, show_default=True, type=int, help="Largest batch the shared backend runs.")
@click.option("--threads", type=int, help="CPU threads for the backend.")
@click.option("--max-sessions", type=int, help="Admit at most this many sessions (default: measured from the backend).")
@click.option("--ice-server", "ice_servers", multiple=True, metavar="URL",
              help="STUN/TURN server for WebRTC, e.g. stun:stun.l.google.com:19302 or turn:user:pass@host:3478.")
@click.option("--output-dir", type=click.Path(file_okay=False), help="Allow file outputs, written into this folder.")
@click.option("--max-session-s", default=3600.0, show_default=True, type=click.FloatRange(min=1), help="Session lifetime limit.")
@click.option("--client-timeout-s", default=5.0, show_default=True, type=click.FloatRange(min=0.5),
              help="End a session this long after its last client went away.")
@click.option("--max-message-bytes", default=1 << 20, show_default=True, type=click.IntRange(min=1024),
              help="Largest WebSocket message.")
@click.option("--max-ahead-s", default=120.0, show_default=True, type=click.FloatRange(min=1),
              help="Most seconds of pushed audio that may wait to be shown, per session (more is refused).")
@click.option("--max-sockets-per-session", default=4, show_default=True, type=click.IntRange(min=1),
              help="Audio sockets open at once on one session.")
@click.option("--max-peers-per-session", default=4, show_default=True, type=click.IntRange(min=1),
              help="WebRTC peer connections open at once on one session.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="auto", default=None, metavar="[ADDRESS]",
              help="Scale out on a Ray cluster (the [ray] extra; docs/scale-out.md): replicas on its GPUs/nodes, this "
                   "process is the front door. ADDRESS: the cluster's (default: the one this machine joined).")
@click.option("--min-replicas", default=1, show_default=True, type=click.IntRange(0), help="--ray: replicas kept at least.")
@click.option("--max-replicas", type=click.IntRange(1), help="--ray: replicas at most (default: --min-replicas; more: autoscaling on sessions).")
@click.option("--sessions-per-replica", type=click.FloatRange(min=0, min_open=True),
              help="--ray: autoscaling target per replica (default: each replica's capacity).")
@click.option("--gpus-per-replica", default=1.0, show_default=True, type=click.FloatRange(0),
              help="--ray: GPUs one replica takes; 0 for CPU backends (then one replica per node).")
@click.option("--drain-timeout-s", default=300.0, show_default=True, type=click.FloatRange(0),
              help="--ray: how long a replica being removed waits for its sessions to end.")
def serve(avatars: tuple[str, ...], model: str | None, features: str, ave_encoder: str | None, demo: bool, tiny: bool,
          workdir: str, host: str, port: int, token: str | None, backend: str, batch: int, threads: int | None,
          max_sessions: int | None, ice_servers: tuple[str, ...], output_dir: str | None, max_session_s: float,
          client_timeout_s: float, max_message_bytes: int, max_ahead_s: float, max_sockets_per_session: int,
          max_peers_per_session: int, ray_address: str | None, min_replicas: int, max_replicas: int | None,
          sessions_per_replica: float | None, gpus_per_replica: float, drain_timeout_s: float) -> None:
    """Serve live talking-avatar sessions: HTTP API, audio WebSocket, WebRTC video, RTMP out.

    Open http://127.0.0.1:8080/ for the page. The API is in docs/serve.md.
    SIGTERM or Ctrl-C ends every session (file outputs finished) and exits 143 or 130.
    """
    from ..serve import AvatarSpec, Limits, ServeConfig, require_extra, resolve_token
    from ..serve import serve as run

    require_extra()
    token = resolve_token(host, token)
    specs = [_spec(a, model, features, ave_encoder) for a in avatars]
    if demo:
        from ..demo import build_demo, describe_model

        paths = build_demo(workdir, tiny=tiny)
        click.echo(f"demo model: {describe_model(paths['kind'])}", err=True)
        specs.append(AvatarSpec("demo", paths["avatar"], paths["model"], "ave", {"encoder": str(paths["encoder"])}))
    if not specs:
        raise ConfigError("nothing to serve: give --avatar PATH (repeatable) or --demo")
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    config = ServeConfig(
        avatars=tuple(specs), host=host, port=port, token=token, backend=backend, batch=batch, threads=threads,
        max_sessions=max_sessions, ice_servers=tuple(ice_servers),
        output_dir=Path(output_dir).resolve() if output_dir else None,
        limits=Limits(max_message_bytes=max_message_bytes, max_session_s=max_session_s,
                      client_timeout_s=client_timeout_s, max_ahead_s=max_ahead_s,
                      max_sockets_per_session=max_sockets_per_session, max_peers_per_session=max_peers_per_session),
    )
    if ray_address is not None:
        from ..scale.deploy import serve_ray
        from ..scale.options import ScaleOptions

        scale = ScaleOptions(min_replicas=min_replicas, max_replicas=max_replicas or max(min_replicas, 1),
                             sessions_per_replica=sessions_per_replica, gpus_per_replica=gpus_per_replica,
                             drain_timeout_s=drain_timeout_s)
        serve_ray(config, scale, ray_address)
        return
    signum = run(config)
    # the sessions ended cleanly; the exit status says which signal stopped the server (143 SIGTERM, 130 Ctrl-C)
    raise Interrupted(signum)


def _spec(text: str, model: str | None, features: str, ave_encoder: str | None):  # type: ignore[no-untyped-def]
    from ..serve import AvatarSpec

    name, sep, path = text.partition("=")
    if not sep:
        name, path = Path(text).name, text
    if not Path(path).is_dir():
        raise ConfigError(f"--avatar {text}: {path} is not an avatar package folder")
    opts = {"encoder": ave_encoder} if ave_encoder else {}
    return AvatarSpec(name, Path(path), Path(model) if model else None, features, opts)
