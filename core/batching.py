"""One batched call for the concurrent requests of many sessions (the shared audio-encoder front).

A :class:`CallBatcher` wraps a function whose rows are independent
(``fn(x[k, ...]) -> y[k, ...]``, e.g. an audio encoder). Threads call it with
their own rows; requests that arrive together run as ONE call and each caller
gets back exactly its own rows. There is no thread of its own: the first
waiting caller runs the call for everyone waiting (a leader), the others sleep
until their rows are back.

The deadline rule is the inference scheduler's: a partial batch waits at most
``max_wait_s`` for more rows, never past the earliest deadline among its
requests less the call's measured cost, and only while other threads have
used the batcher recently (a lone session never waits).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

#: a thread that called within this many seconds counts as a session that may send more rows
ACTIVE_S = 1.0


@dataclass
class BatcherStats:
    """What the batcher did (for tests, benchmarks and ``/metrics``)."""

    calls: int = 0
    requests: int = 0
    items: int = 0
    #: calls that held the rows of more than one caller
    shared_calls: int = 0
    run_s: float = 0.0
    batch_sizes: dict[int, int] = field(default_factory=dict)

    @property
    def mean_batch(self) -> float:
        return self.items / self.calls if self.calls else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "requests": self.requests, "items": self.items, "shared_calls": self.shared_calls,
                "run_s": self.run_s, "mean_batch": self.mean_batch, "batch_sizes": dict(sorted(self.batch_sizes.items()))}


class _Request:
    __slots__ = ("x", "deadline", "result", "error", "done", "caller")

    def __init__(self, x: np.ndarray, deadline: float | None, caller: int) -> None:
        self.x = x
        self.deadline = deadline
        self.caller = caller
        self.result: np.ndarray | None = None
        self.error: BaseException | None = None
        self.done = False


class CallBatcher:
    """Run the concurrent calls of ``fn`` as one batched call.

    ``fn`` takes rows ``[k, ...]`` and returns ``[k, ...]``, each output row
    depending only on its input row. ``max_batch`` bounds the rows of one call
    (a single larger request still goes alone, whole: ``fn`` splits it).
    ``clock`` is a monotonic seconds function (deadlines are on it).
    """

    def __init__(
        self,
        fn: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch: int = 64,
        max_wait_s: float = 0.003,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fn = fn
        self.max_batch = max(1, int(max_batch))
        self.max_wait_s = max(0.0, float(max_wait_s))
        self._clock = clock
        self._cv = threading.Condition()
        self._pending: list[_Request] = []
        self._running = False
        self._seen: dict[int, float] = {}  # caller thread id -> when it last called
        self._cost: float | None = None  # seconds of one call (moving average)
        self.stats = BatcherStats()

    def __call__(self, x: np.ndarray, deadline: float | None = None) -> np.ndarray:
        """``fn(x)``, run together with the requests of other threads waiting now."""
        me = threading.get_ident()
        req = _Request(x, deadline, me)
        with self._cv:
            now = self._clock()
            self._seen[me] = now
            self._pending.append(req)
            self._cv.notify_all()
            while not req.done:
                if self._running:
                    self._cv.wait(0.05)
                    continue
                self._running = True
                batch = self._gather(me)
                self._cv.release()
                try:
                    self._run(batch)
                finally:
                    self._cv.acquire()
                    self._running = False
                    self._cv.notify_all()
        if req.error is not None:
            raise req.error
        if req.result is None:  # never: a finished request has a result or an error
            raise RuntimeError("the batched call lost a result")
        return req.result

    def _others_active(self, me: int, now: float) -> bool:
        for t in [t for t, at in self._seen.items() if now - at > ACTIVE_S]:
            del self._seen[t]
        return any(t != me for t in self._seen)

    def _gather(self, me: int) -> list[_Request]:
        """(Under the lock, as the leader.) Wait for more rows as the deadline rule allows; take a batch."""
        start = self._clock()
        while self._others_active(me, start) and self.max_wait_s > 0:
            rows = sum(len(r.x) for r in self._pending)
            if rows >= self.max_batch:
                break
            now = self._clock()
            left = self.max_wait_s - (now - start)
            deadlines = [r.deadline for r in self._pending if r.deadline is not None]
            if deadlines:
                left = min(left, min(deadlines) - (self._cost or 0.0) - now)
            if left <= 0:
                break
            self._cv.wait(left)
        batch: list[_Request] = []
        rows = 0
        for r in self._pending:
            if batch and rows + len(r.x) > self.max_batch:
                break
            batch.append(r)
            rows += len(r.x)
        del self._pending[: len(batch)]
        return batch

    def _run(self, batch: list[_Request]) -> None:
        """(Outside the lock.) One call for ``batch``; each request gets its rows or the error."""
        t = time.perf_counter()
        try:
            x = batch[0].x if len(batch) == 1 else np.concatenate([r.x for r in batch])
            y = self._fn(x)
        except BaseException as exc:  # every caller in the batch sees the failure
            with self._cv:
                for r in batch:
                    r.error, r.done = exc, True
            return
        took = time.perf_counter() - t
        with self._cv:
            pos = 0
            for r in batch:
                r.result = y[pos : pos + len(r.x)]
                pos += len(r.x)
                r.done = True
            n = pos
            st = self.stats
            st.calls += 1
            st.requests += len(batch)
            st.items += n
            st.run_s += took
            st.batch_sizes[n] = st.batch_sizes.get(n, 0) + 1
            st.shared_calls += int(len({r.caller for r in batch}) > 1)
            self._cost = took if self._cost is None else 0.7 * self._cost + 0.3 * took
