"""``avatar serve``: live avatar sessions over HTTP/WebSocket/WebRTC (the ``[serve]`` extra)."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import ConfigError


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
def serve(avatars: tuple[str, ...], model: str | None, features: str, ave_encoder: str | None, demo: bool, tiny: bool,
          workdir: str, host: str, port: int, token: str | None, backend: str, batch: int, threads: int | None,
          max_sessions: int | None, ice_servers: tuple[str, ...], output_dir: str | None, max_session_s: float,
          client_timeout_s: float, max_message_bytes: int) -> None:
    """Serve live talking-avatar sessions: HTTP API, audio WebSocket, WebRTC video, RTMP out.

    Open http://127.0.0.1:8080/ for the page. The API is in docs/serve.md.
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
                      client_timeout_s=client_timeout_s),
    )
    run(config)


def _spec(text: str, model: str | None, features: str, ave_encoder: str | None):  # type: ignore[no-untyped-def]
    from ..serve import AvatarSpec

    name, sep, path = text.partition("=")
    if not sep:
        name, path = Path(text).name, text
    if not Path(path).is_dir():
        raise ConfigError(f"--avatar {text}: {path} is not an avatar package folder")
    opts = {"encoder": ave_encoder} if ave_encoder else {}
    return AvatarSpec(name, Path(path), Path(model) if model else None, features, opts)
