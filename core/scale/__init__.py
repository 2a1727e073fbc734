"""Scale-out on Ray: live sessions on many replicas, batch renders on many workers.

Needs the ``[ray]`` extra (``ray[serve]``), imported lazily; see docs/scale-out.md.

* :mod:`.replica` — one Ray Serve replica: the unchanged ``avatar serve`` app
  (:mod:`avatar.serve`) on its node, with its own :class:`~avatar.engine.AvatarService`;
  it reports its sessions and capacity to the :mod:`.registry` and drains before it
  is removed.
* :mod:`.front` — the front door: today's ``/v1`` API, ``/health``, ``/metrics`` and
  the page; it places each new session on the replica with the most free capacity
  and forwards the session's later requests (and its audio socket) to that replica.
  WebRTC media flows between the client and the replica's node directly.
* :mod:`.policy` — the Ray Serve autoscaling policy on the session count.
* :mod:`.deploy` — builds the Serve application and runs ``avatar serve --ray``.
* :mod:`.batch` — ``avatar run-batch``: jobs on Ray actors (or locally), retries,
  atomic outputs, reports.
"""

from __future__ import annotations

from ..errors import MissingDependency

#: the Ray namespace of everything this package starts on a cluster
NAMESPACE = "avatar"


def require_ray() -> None:
    """One clear error when the ``[ray]`` extra is missing."""
    import importlib.util

    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        raise MissingDependency("ray[serve]", "ray", feature="scale-out on Ray")


def connect(address: str | None) -> None:
    """Join the Ray cluster at ``address`` (``auto``: the one this machine is part of; None: a local one)."""
    import ray

    from ..errors import ConfigError

    if ray.is_initialized():
        return
    try:
        ray.init(address=None if address in (None, "local") else address, namespace=NAMESPACE,
                 include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    except ConnectionError as exc:
        raise ConfigError(f"no Ray cluster at {address}: start one with `ray start --head` (docs/scale-out.md), "
                          f"or give its address ({exc})") from None
