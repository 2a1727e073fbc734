"""CPU time per stage, per delivered frame: what one more session costs the machine.

Wall time says how long a stage took; on a machine shared by many sessions
the question is how much CPU it took. :class:`StageCpu` adds up **thread CPU
time** (:func:`time.thread_time`, the calling thread only, so concurrent
sessions do not inflate each other's figures) by stage and by the kind of
frame it was spent on: ``speech`` (rendered through the model) or ``idle``
(the avatar's own frames). Stages: ``decode`` (avatar frames), ``features``
(audio → windows, the encoder included), ``visual`` (model inputs),
``inference`` (the backend call), ``composite`` (pasting faces), ``encode``
(the sinks: H.264, WebRTC, files).

A backend runs its call on a pool of native threads that
:func:`time.thread_time` on the calling thread does not see.
:class:`NativeThreads` finds those threads once (the CPU they burn during a
call made while nothing else runs, e.g. the warm-up) and reads their CPU time
from ``/proc`` afterwards; the inference figure is the calling thread's CPU
plus theirs. Where ``/proc`` is missing it is the calling thread's only.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

#: stages in report order
CPU_STAGES = ("decode", "features", "visual", "inference", "composite", "encode")
KINDS = ("speech", "idle")

T = TypeVar("T")


class StageCpu:
    """CPU seconds by (kind, stage); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, dict[str, float]] = {k: {s: 0.0 for s in CPU_STAGES} for k in KINDS}

    def add(self, stage: str, seconds: float, kind: str = "speech") -> None:
        with self._lock:
            row = self.seconds.setdefault(kind, {})
            row[stage] = row.get(stage, 0.0) + seconds

    @contextmanager
    def measure(self, stage: str, kind: str = "speech") -> Iterator[None]:
        """Add the calling thread's CPU time inside the block to ``stage``."""
        t = time.thread_time()
        try:
            yield
        finally:
            self.add(stage, time.thread_time() - t, kind)

    def merge(self, other: "StageCpu") -> None:
        for kind, row in other.snapshot().items():
            for stage, s in row.items():
                self.add(stage, s, kind)

    def snapshot(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {k: dict(v) for k, v in self.seconds.items()}

    def per_frame_ms(self, frames: Mapping[str, int]) -> dict[str, dict[str, float]]:
        """CPU ms per delivered frame of each kind, by stage, with a ``total`` (kinds without frames are left out)."""
        out: dict[str, dict[str, float]] = {}
        for kind, row in self.snapshot().items():
            n = int(frames.get(kind, 0))
            if n <= 0:
                continue
            ms = {s: 1000.0 * v / n for s, v in row.items()}
            ms["total"] = sum(ms.values())
            out[kind] = ms
        return out


def cpu_per_frame(cpu: StageCpu, speech_frames: int, idle_frames: int) -> dict[str, dict[str, float]]:
    """The report's ``cpu_ms_per_frame``: ``{"speech": {stage: ms, "total": ms}, "idle": {...}}``."""
    return cpu.per_frame_ms({"speech": speech_frames, "idle": idle_frames})


# --------------------------------------------------------------------------- native threads


_TASKS = Path("/proc/self/task")


def _tick_s() -> float:
    try:
        return 1.0 / os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError, AttributeError):
        return 0.01


_TICK = _tick_s()


def _task_cpu(tid: int) -> float | None:
    """CPU seconds (user + system) of thread ``tid`` of this process; None when it is gone."""
    try:
        stat = (_TASKS / str(tid) / "stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after the command name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) * _TICK  # utime, stime (fields 14 and 15 of the line)


def _all_tasks() -> dict[int, float]:
    out: dict[int, float] = {}
    try:
        tids = [int(p.name) for p in _TASKS.iterdir()]
    except OSError:
        return out
    for tid in tids:
        c = _task_cpu(tid)
        if c is not None:
            out[tid] = c
    return out


class NativeThreads:
    """The native (non-Python) threads a library used during a call, and their CPU time since.

    >>> result, pool = NativeThreads.discover(lambda: backend.run(feeds))   # doctest: +SKIP
    >>> pool.cpu_s()   # CPU the backend's own threads used since the discovery
    """

    def __init__(self, tids: dict[int, float]) -> None:
        self._base = tids  # tid -> CPU seconds when found

    @property
    def available(self) -> bool:
        return _TASKS.is_dir()

    @property
    def threads(self) -> int:
        return len(self._base)

    @classmethod
    def discover(cls, fn: Callable[[], T], *, min_cpu_s: float = 0.0) -> tuple[T, "NativeThreads"]:
        """Run ``fn`` and find the non-Python threads whose CPU time grew meanwhile (run it while nothing else does)."""
        before = _all_tasks()
        result = fn()
        after = _all_tasks()
        python = {t.native_id for t in threading.enumerate()}
        grew = {tid: c for tid, c in after.items()
                if tid not in python and c - before.get(tid, 0.0) > min_cpu_s}
        return result, cls(grew)

    def cpu_s(self) -> float:
        """CPU seconds these threads used since they were found (a thread that has ended counts no more)."""
        total = 0.0
        for tid, base in self._base.items():
            c = _task_cpu(tid)
            if c is not None:
                total += max(0.0, c - base)
        return total

    def to_dict(self) -> dict[str, Any]:
        return {"threads": self.threads, "cpu_s": self.cpu_s()}
