"""The Ray Serve autoscaling policy of the live replicas: scale on the session count.

Every replica reports ``sessions`` (open sessions) and ``capacity`` (sessions it
admits) through ``record_autoscaling_stats``. The policy asks for enough
replicas that ``sessions + spare_sessions`` fit at ``sessions_per_replica``
each (default: the replicas' own capacity). Serve applies the min/max bounds
and the up/down-scaling delays around it.
"""

from __future__ import annotations

import math
from typing import Any


class SessionPolicy:
    """``policy_function`` of the deployment's autoscaling config (``policy_kwargs`` go to ``__init__``)."""

    def __init__(self, sessions_per_replica: float | None = None, spare_sessions: int = 1) -> None:
        self.per = sessions_per_replica
        self.spare = max(0, int(spare_sessions))

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        sessions = metrics.get("sessions") or {}
        capacity = metrics.get("capacity") or {}
        if not sessions and ctx.current_num_replicas > 0:
            return ctx.current_num_replicas, {}  # no report yet (replicas starting): keep the count
        return desired_replicas(sum(sessions.values()), list(capacity.values()), self.per, self.spare), {}


def desired_replicas(sessions: float, capacities: list[float], per: float | None, spare: int) -> int:
    """Replicas needed for ``sessions`` (plus ``spare`` free slots) at ``per`` sessions each."""
    if per is None:
        per = sum(capacities) / len(capacities) if capacities else 1.0
    per = max(per, 1e-9)
    # the reported counts are averaged over the look-back window: round away float noise first
    need = round(sessions + spare, 6)
    return max(1, math.ceil(need / per)) if need > 0 else 0
