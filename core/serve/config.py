"""What ``avatar serve`` is configured with, and the checks that keep it safe by default."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError

#: the environment variable that may carry the server's bearer token
TOKEN_ENV = "AVATAR_SERVE_TOKEN"


@dataclass(frozen=True)
class AvatarSpec:
    """One avatar the server offers: a package, its model and feature source."""

    name: str
    path: Path
    model: Path | None = None
    features: str = "ave"
    feature_options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Limits:
    """Every size and time a client controls is bounded."""

    #: largest WebSocket message (binary PCM or text), bytes
    max_message_bytes: int = 1 << 20
    #: largest request body (an audio file for /speak), bytes
    max_body_bytes: int = 32 << 20
    #: largest JSON request body (session requests, SDP offers), bytes
    max_json_bytes: int = 64 << 10
    min_sample_rate: int = 8000
    max_sample_rate: int = 96000
    #: how much pushed audio may wait to be shown, seconds (a leaky bucket that drains at
    #: real time; idle time is no credit)
    max_ahead_s: float = 120.0
    #: audio sockets open at once on one session
    max_sockets_per_session: int = 4
    #: WebRTC peer connections open at once on one session (each new one takes the tracks)
    max_peers_per_session: int = 4
    #: events waiting to be sent on one socket; a socket that falls this far behind is closed
    #: (a newer ``stats`` event replaces an unsent one and does not count)
    max_queued_events: int = 64
    #: longest a SIGTERM/SIGINT shutdown waits for sessions to end and sockets to close, seconds
    shutdown_timeout_s: float = 15.0
    #: a session ends after this long, seconds
    max_session_s: float = 3600.0
    #: a session with no client (socket, peer or request) ends after this long, seconds
    client_timeout_s: float = 5.0
    #: a session that never gets a client ends after this long, seconds
    attach_timeout_s: float = 30.0
    #: WebSocket ping interval; a peer whose pong is not back within half of it is gone
    #: (3 s: a busy client on a loaded machine still answers; a cut network is noticed in 4.5 s)
    heartbeat_s: float = 3.0


@dataclass(frozen=True)
class ServeConfig:
    avatars: tuple[AvatarSpec, ...]
    host: str = "127.0.0.1"
    port: int = 8080
    token: str | None = None
    backend: str = "auto"
    batch: int = 8
    threads: int | None = None
    #: None: measured at start from the backend's batch throughput
    max_sessions: int | None = None
    ice_servers: tuple[str, ...] = ()
    #: where ``{"type": "file"}`` outputs may write (relative names only); None: refused
    output_dir: Path | None = None
    stats_interval_s: float = 1.0
    limits: Limits = field(default_factory=Limits)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_token(host: str, token: str | None) -> str | None:
    """The bearer token the server requires: ``--token``, else the environment.

    Loopback binds may run without one; any other bind address must have one,
    so a server reachable from the network is never open by accident.
    """
    token = token or os.environ.get(TOKEN_ENV) or None
    if token is not None and len(token) < 16:
        raise ConfigError("the server token must be at least 16 characters (e.g. `python -c 'import secrets; print(secrets.token_urlsafe())'`)")
    if token is None and not is_loopback(host):
        raise ConfigError(
            f"binding to {host} makes the server reachable from other machines: give it a bearer token "
            f"with --token or the {TOKEN_ENV} environment variable"
        )
    return token


def parse_ice_server(text: str) -> dict[str, str]:
    """``stun:host:port`` or ``turn:user:pass@host:port`` → aiortc ``RTCIceServer`` fields."""
    text = text.strip()
    scheme, sep, rest = text.partition(":")
    if not sep or scheme not in ("stun", "turn", "turns"):
        raise ConfigError(f"an ICE server must look like stun:HOST:PORT or turn:USER:PASS@HOST:PORT, not {text!r}")
    if "@" in rest:
        cred, _, hostport = rest.rpartition("@")
        user, _, password = cred.partition(":")
        return {"urls": f"{scheme}:{hostport}", "username": user, "credential": password}
    return {"urls": text}
