"""A thread budget: the model's threads, the encoder's and the sessions' sized together for the machine.

Left alone, every library sizes its own pool to the whole machine: the
model's backend, the audio encoder (another ONNX Runtime session), OpenCV
(compositing, colour conversion) and each session's video encoder. On a
small CPU they then take turns on the same cores, and an intra-op pool whose
threads wait for a preempted sibling runs a call at half speed or worse (on
2 cores: 93 ms per frame live against 43 ms for the same call alone).

The policy, in two sentences: **the model call is the bulk of the work, so its
backend gets the cores and its threads do not spin between calls; every
other pool (audio encoder, OpenCV, video encoders) gets one thread, because
its parallelism comes from the sessions, not from inside one call.** On a GPU
the backend needs one host thread and the cores go to the sessions.

On a CPU the backend's cores are split into two *lanes* where the backend
can run calls in parallel (OpenVINO's streams): two calls in flight, each on
half the cores. A call that runs on all the cores at once stalls whenever
the sessions' own work takes one of them (its threads wait for the slowest);
two half-size calls each lose only what is taken from their half
(``benchmarks/openvino_lanes.py`` measures it).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, replace
from typing import Any, Mapping

from ..interfaces import BackendOptions


def machine_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ThreadBudget:
    """How many threads each pool gets (see the module doc for the policy)."""

    cores: int
    #: intra-op threads of the model's backend
    backend: int
    #: intra-op threads of the audio encoder (the ``ave`` source's backend)
    encoder: int = 1
    #: OpenCV's pool (colour conversion, crops, compositing)
    opencv: int = 1
    #: whether the backend's pool may spin while it waits for work (only when nothing else needs the cores)
    spin: bool = False
    #: model calls in flight at once, each on ``backend / lanes`` threads, where the backend runs calls in
    #: parallel (OpenVINO's streams; other backends run one call at a time whatever this says)
    lanes: int = 1
    #: rows per audio-encoder call in a real-time stream (the ``ave`` source's ``min_rows``): 2 on a CPU, where
    #: a call re-reads the encoder's weights the model call evicted (~15 % less CPU per row, ≤ 40 ms later)
    encoder_rows: int = 1

    @classmethod
    def plan(cls, cores: int | None = None, *, gpu: bool = False) -> "ThreadBudget":
        """The budget for ``cores`` (default: this process's) and a CPU or GPU backend."""
        n = machine_cores() if cores is None else max(1, int(cores))
        return cls(cores=n, backend=1 if gpu else n, lanes=1 if gpu else min(2, n), encoder_rows=1 if gpu else 2)

    def backend_options(self, backend: str, base: BackendOptions | None = None) -> BackendOptions:
        """``base`` with the backend's threads (an explicit ``threads`` in ``base`` wins), spinning off
        where the backend ``backend`` has the ``spin`` option (ONNX Runtime's), and the lanes as streams
        where it has ``streams`` (OpenVINO's; an explicit ``streams`` or ``performance_hint`` wins)."""
        b = base or BackendOptions()
        extra: dict[str, Any] = dict(b.extra)
        threads = b.threads if b.threads is not None else self.backend
        known = _backend_extras(backend)
        if not self.spin and "spin" in known:
            extra.setdefault("spin", "0")
        if self.lanes > 1 and "streams" in known and "performance_hint" in known and "performance_hint" not in extra:
            extra.setdefault("streams", str(self.lanes))
            extra["performance_hint"] = "THROUGHPUT"
        return replace(b, threads=threads, extra=extra)

    def feature_options(self, name: str, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Feature-source options with the encoder's threads and rows per call (for the sources that take them)."""
        out = dict(options or {})
        if name == "ave":  # the built-in source with an encoder that takes a thread count
            out.setdefault("threads", self.encoder)
            if self.encoder_rows > 1:
                out.setdefault("min_rows", self.encoder_rows)
        return out

    def apply_process_wide(self) -> None:
        """Size OpenCV's pool (process-wide: call once, from the composition root)."""
        import cv2

        cv2.setNumThreads(self.opencv)

    def to_dict(self) -> dict[str, Any]:
        return {"cores": self.cores, "backend": self.backend, "encoder": self.encoder, "opencv": self.opencv,
                "spin": self.spin, "lanes": self.lanes, "encoder_rows": self.encoder_rows}


#: backends whose model runs on a GPU (their budget: one host thread, one lane)
GPU_BACKENDS = ("onnx-cuda", "tensorrt")


def resolve_budget(threads: "ThreadBudget | str | None", backend: str) -> "ThreadBudget | None":
    """``threads`` as a budget: ``"auto"`` planned here for ``backend``, a budget as it is, None for none."""
    from ..errors import ConfigError

    if threads is None or isinstance(threads, ThreadBudget):
        return threads
    if threads != "auto":
        raise ConfigError(f"threads must be 'auto', a ThreadBudget or None, not {threads!r}")
    return ThreadBudget.plan(gpu=backend in GPU_BACKENDS)


def _backend_extras(name: str) -> Mapping[str, str]:
    """The ``extra`` options a registered backend understands (none known for ``auto`` or an unknown name)."""
    from ..plugins import get_plugin_manager

    try:
        cls = get_plugin_manager().backend_class(name)
    except Exception:  # auto, or a plugin that is not loaded: no extra options are assumed
        return {}
    return getattr(cls, "_extra", {}) or {}


def thread_counts() -> dict[str, int]:
    """Python threads and all threads (native pools included, from ``/proc`` where it exists) of this process."""
    python = threading.active_count()
    try:
        total = len(os.listdir("/proc/self/task"))
    except OSError:
        total = python
    return {"python": python, "total": total}
