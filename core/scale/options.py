"""How ``avatar serve --ray`` lays the live service out on a Ray cluster (importable without Ray)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from ..errors import ConfigError


@dataclass(frozen=True)
class ScaleOptions:
    """Replicas, their resources, autoscaling and failure timing."""

    #: the Ray Serve application's name (and the prefix of the registry actor's)
    app_name: str = "avatar"
    #: replicas kept at least / at most; equal: a fixed number, no autoscaling
    min_replicas: int = 1
    max_replicas: int = 1
    #: autoscaling target: sessions one replica should hold; None: each replica's own capacity
    sessions_per_replica: float | None = None
    #: autoscaling keeps this many free session slots across the replicas (0: scale on demand only)
    spare_sessions: int = 1
    #: GPUs one replica takes (one replica per GPU); 0 for CPU backends: one replica per node
    gpus_per_replica: float = 1.0
    cpus_per_replica: float = 1.0
    #: a replica being removed takes no new session and waits this long for its sessions to end
    drain_timeout_s: float = 300.0
    #: Serve autoscaling reaction times
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 60.0
    look_back_period_s: float = 15.0
    #: where each replica's HTTP server binds on its node (None: the node's IP as Ray knows it)
    replica_host: str | None = None
    replica_port: int = 0
    #: replicas report to the registry this often; one silent for ``dead_after_s`` is checked for death
    beat_s: float = 1.0
    dead_after_s: float = 3.0
    #: the token the front door uses with the replicas (server routes); made per deployment
    internal_token: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)

    def __post_init__(self) -> None:
        if self.min_replicas < 0 or self.max_replicas < 1 or self.min_replicas > self.max_replicas:
            raise ConfigError(f"replicas: need 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1, "
                              f"not {self.min_replicas}..{self.max_replicas}")
        if self.sessions_per_replica is not None and self.sessions_per_replica <= 0:
            raise ConfigError("--sessions-per-replica must be positive")
        if self.gpus_per_replica < 0 or self.cpus_per_replica < 0:
            raise ConfigError("GPUs and CPUs per replica cannot be negative")
        if self.drain_timeout_s < 0:
            raise ConfigError("--drain-timeout-s cannot be negative")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas != self.max_replicas

    @property
    def registry_name(self) -> str:
        return f"{self.app_name}-registry"
