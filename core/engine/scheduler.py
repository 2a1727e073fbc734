"""Shared inference: ready windows from every session, one backend call per batch.

One :class:`InferenceScheduler` (and one thread) per loaded backend. Sessions
submit :class:`WorkItem` s (a frame's audio window); the scheduler orders the
pending items by deadline (earliest first; items without a deadline — unpaced
offline renders — in submission order), takes up to ``batch_size`` of them,
waits at most ``max_wait_s`` for more to fill the batch (never past the
earliest deadline), drops the items that would be done too late (skipping
*before* inference), builds the visual inputs of each item from its own
session's avatar, and runs one call. Results go back to each session.

A failing backend call fails the sessions whose frames were in it; the
scheduler goes on serving the others.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from ..contract import ModelContract, check_output
from ..interfaces import Backend
from .pacing import REALTIME, Clock

log = logging.getLogger(__name__)


class Client(Protocol):
    """What the scheduler needs from a session."""

    def deadline(self, item: "WorkItem") -> float | None: ...
    def avatar_index(self, item: "WorkItem") -> int: ...
    def visual_inputs(self, indices: Sequence[int]) -> np.ndarray: ...
    def on_faces(self, items: list["WorkItem"], av_idx: list[int], faces: np.ndarray, seconds: tuple[float, float]) -> None: ...
    def on_skipped(self, item: "WorkItem") -> None: ...
    def on_failure(self, exc: BaseException) -> None: ...


@dataclass
class WorkItem:
    client: Any
    index: int  # frame index within its utterance
    window: np.ndarray
    generation: int  # the session's utterance generation (stale items are discarded)
    last: bool = False
    seq: int = 0
    skippable: bool = True
    utterance: Any = None
    submitted: float = 0.0


@dataclass
class SchedulerStats:
    calls: int = 0
    items: int = 0
    skipped: int = 0
    run_s: float = 0.0
    #: calls whose batch held frames of more than one session
    shared_calls: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)

    @property
    def mean_batch(self) -> float:
        return self.items / self.calls if self.calls else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "items": self.items, "skipped": self.skipped, "run_s": self.run_s,
                "shared_calls": self.shared_calls,
                "mean_batch": self.mean_batch, "batch_sizes": dict(sorted(self.batch_sizes.items()))}


class InferenceScheduler:
    """Earliest-deadline-first batching over one backend, on one thread."""

    def __init__(
        self,
        backend: Backend,
        contract: ModelContract,
        *,
        batch_size: int = 8,
        max_wait_s: float = 0.005,
        clock: Clock = REALTIME,
        name: str = "inference",
    ) -> None:
        self.backend = backend
        self.contract = contract
        self.batch_size = max(1, int(batch_size))
        self.max_wait_s = max(0.0, float(max_wait_s))
        self.clock = clock
        self.stats = SchedulerStats()
        self._pending: list[WorkItem] = []
        self._cv = threading.Condition()
        self._seq = 0
        self._closed = False
        self._run_est: dict[int, float] = {}
        self._pool: Any = None  # the backend's native threads (found by warm()), for the inference CPU
        self._pool_cpu = 0.0
        vis = contract.visual.name
        # the backend may have converted the model (e.g. uint8_visual): ask it, not the file
        vis_info = next((t for t in backend.inputs if t.name == vis), contract.visual)
        self._uint8 = np.dtype(vis_info.dtype) == np.uint8
        self._thread = threading.Thread(target=self._loop, name=f"avatar-{name}", daemon=True)
        self._thread.start()

    # -- sessions' side ----------------------------------------------------------

    def submit(self, item: WorkItem) -> None:
        with self._cv:
            closed = self._closed
            if not closed:
                self._seq += 1
                item.seq = self._seq
                item.submitted = self.clock.now()
                self._pending.append(item)
                self._cv.notify_all()
        if closed:  # (sessions are closed before their scheduler: only a failed scheduler gets here)
            from ..errors import BackendError

            _safe(item.client.on_failure, BackendError("the shared inference has stopped"))

    def cancel(self, client: Any, below_generation: int | None = None) -> int:
        """Drop ``client``'s pending items (those of older generations only, if given)."""
        with self._cv:
            keep = [
                it for it in self._pending
                if it.client is not client or (below_generation is not None and it.generation >= below_generation)
            ]
            dropped = len(self._pending) - len(keep)
            self._pending = keep
            return dropped

    def estimate_s(self, n: int = 1) -> float:
        """Expected seconds of one call of ``n`` items (0 before anything was measured)."""
        est = self._run_est
        if n in est:
            return est[n]
        if not est:
            return 0.0
        sizes = sorted(est)
        top = sizes[-1]
        if n > top:  # beyond what was measured: the largest batch's cost per item
            return est[top] * n / top
        return float(np.interp(n, sizes, [est[k] for k in sizes]))

    def warm(self) -> None:
        """Run the backend on zeros at the full batch, then at 1, measuring both (before any session waits).

        The first call at a batch size pays for allocations; the estimates the
        deadline rule uses should not.
        """
        from ..contract import FEATURE_SHAPES

        vis = next((t for t in self.backend.inputs if t.name == self.contract.visual.name), self.contract.visual)
        vshape = tuple(d if isinstance(d, int) else 320 for d in vis.shape[1:])
        from .cpu import NativeThreads

        fixed = self.contract.fixed_batch
        sizes = [fixed] if fixed is not None else [self.batch_size, self.batch_size, 1]
        for k, n in enumerate(sizes):
            feeds = {self.contract.visual.name: np.zeros((n, *vshape), np.dtype(vis.dtype)),
                     self.contract.audio.name: np.zeros((n, *FEATURE_SHAPES[self.contract.feature_type]), np.float32)}
            t = self.clock.now()
            if k == 0:  # nothing else runs yet: the threads that work now are the backend's own
                _, self._pool = NativeThreads.discover(lambda: self.backend.run(feeds))
            else:
                self.backend.run(feeds)
            self._run_est[n] = self.clock.now() - t
        self._pool_cpu = self._pool.cpu_s() if self._pool is not None else 0.0
        st = self.backend.stats
        st.calls = st.items = 0
        st.run_s = 0.0
        st.call_s.clear()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._pending.clear()
            self._cv.notify_all()
        self._thread.join(timeout=10.0)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- the loop ----------------------------------------------------------------

    def _pick(self) -> list[WorkItem] | None:
        """Wait for a batch; None when closed."""
        with self._cv:
            while not self._pending:
                if self._closed:
                    return None
                self._cv.wait(0.1)
            # A partial batch waits for more. Paced items (with deadlines): at most
            # max_wait_s after the oldest arrived, and never so long that the batch
            # would miss the earliest deadline. Unpaced items (offline): while they
            # keep coming, max_wait_s per gap.
            last_count = -1
            last_change = self.clock.now()
            while 0 < len(self._pending) < self.batch_size and not self._closed:
                now = self.clock.now()
                if len(self._pending) != last_count:
                    last_count, last_change = len(self._pending), now
                    soonest = self._soonest(now)
                    oldest = min(it.submitted for it in self._pending)
                if soonest is None:
                    left = self.max_wait_s - (now - last_change)
                else:
                    # never so long that the batch would miss the earliest deadline
                    left = min(self.max_wait_s - (now - oldest),
                               soonest - self.estimate_s(len(self._pending) + 1) - 0.002 - now)
                if left <= 0:
                    break
                self._cv.wait(max(0.0005, left / self.clock.speed))  # a submit wakes it sooner
            if self._closed:
                return None
            now = self.clock.now()
            order = sorted(self._pending, key=lambda it: self._key(it))
            # skip (before inference) what cannot be done in time even alone; then take as many
            # as can all be done by the earliest deadline among them
            batch: list[WorkItem] = []
            dropped: list[WorkItem] = []
            first: float | None = None
            for it in order:
                if len(batch) >= self.batch_size:
                    break
                d = it.client.deadline(it)
                if d is not None and it.skippable and d < now + self.estimate_s(1):
                    dropped.append(it)
                    continue
                if d is not None:
                    first = d if first is None else min(first, d)
                if batch and first is not None and first < now + self.estimate_s(len(batch) + 1):
                    break
                batch.append(it)
            taken = {id(it) for it in batch} | {id(it) for it in dropped}
            self._pending = [it for it in self._pending if id(it) not in taken]
        self.stats.skipped += len(dropped)
        for it in dropped:
            _safe(it.client.on_skipped, it)
        return batch

    def _key(self, it: WorkItem) -> tuple[float, int]:
        d = it.client.deadline(it)
        return (float("inf") if d is None else d, it.seq)

    def _soonest(self, now: float) -> float | None:
        ds = [d for d in (it.client.deadline(it) for it in self._pending) if d is not None]
        return min(ds) if ds else None

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # a bug here must not leave sessions waiting forever
            log.exception("the inference scheduler failed")
            with self._cv:
                self._closed = True
                pending, self._pending = self._pending, []
            for c in {id(it.client): it.client for it in pending}.values():
                _safe(c.on_failure, exc)

    def _serve(self) -> None:
        from ..vision import normalize

        fixed = self.contract.fixed_batch
        vis_name, aud_name = self.contract.visual.name, self.contract.audio.name
        while True:
            batch = self._pick()
            if batch is None:
                return
            if not batch:
                continue
            clients: list[Any] = []
            try:
                t0, c0 = time.perf_counter(), time.thread_time()
                # each session binds its frames to its own avatar walk and package
                groups: dict[int, list[int]] = {}
                av_idx: list[int] = []
                for k, it in enumerate(batch):
                    if it.client not in clients:
                        clients.append(it.client)
                    groups.setdefault(id(it.client), []).append(k)
                    av_idx.append(it.client.avatar_index(it))
                # each session's avatar gives its rows; one session's rows are the batch as they are
                parts = [(ks, batch[ks[0]].client.visual_inputs([av_idx[k] for k in ks])) for ks in groups.values()]
                if len(parts) == 1:
                    visual = parts[0][1]
                else:
                    visual = np.empty((len(batch), *parts[0][1].shape[1:]), parts[0][1].dtype)
                    for ks, v in parts:
                        visual[ks] = v
                feed_visual = visual if self._uint8 else normalize(visual)
                audio = np.stack([it.window for it in batch]).astype(np.float32, copy=False)
                n = len(batch)
                if fixed is not None and n < fixed:  # a fixed-batch model: pad, then drop the padding
                    feed_visual = np.concatenate([feed_visual, np.repeat(feed_visual[-1:], fixed - n, axis=0)])
                    audio = np.concatenate([audio, np.repeat(audio[-1:], fixed - n, axis=0)])
                t1, cpu1 = time.perf_counter(), time.thread_time()
                c1 = self.clock.now()
                feeds = {vis_name: feed_visual, aud_name: audio}
                if self._pool is None:  # not warmed: the first call finds the backend's threads
                    from .cpu import NativeThreads

                    result, self._pool = NativeThreads.discover(lambda: self.backend.run(feeds))
                else:
                    result = self.backend.run(feeds)
                faces = check_output(self.contract, result, len(feed_visual))[:n]
                t2, cpu2 = time.perf_counter(), time.thread_time()
                c2 = self.clock.now()  # estimates are in the sessions' clock (it may run scaled)
                infer_cpu = cpu2 - cpu1 + self._pool_delta()
            except BaseException as exc:  # the sessions in this batch end; the others go on
                log.debug("inference failed", exc_info=True)
                for c in clients or {id(it.client): it.client for it in batch}.values():
                    _safe(c.on_failure, exc)
                continue
            self._measure(n, c2 - c1)
            st = self.stats
            st.calls += 1
            st.items += n
            st.run_s += t2 - t1
            st.batch_sizes[n] = st.batch_sizes.get(n, 0) + 1
            st.shared_calls += int(len(clients) > 1)
            for c in clients:
                ks = groups[id(c)]
                share = len(ks) / n
                _safe(c.on_faces, [batch[k] for k in ks], [av_idx[k] for k in ks], faces[ks],
                      ((t1 - t0) * share, (t2 - t1) * share, (cpu1 - c0) * share, infer_cpu * share))

    def _pool_delta(self) -> float:
        """CPU the backend's own threads used since the last call ended (their spinning between calls included)."""
        if self._pool is None:
            return 0.0
        now = self._pool.cpu_s()
        delta, self._pool_cpu = now - self._pool_cpu, now
        return delta

    def _measure(self, n: int, seconds: float) -> None:
        old = self._run_est.get(n)
        self._run_est[n] = seconds if old is None else 0.7 * old + 0.3 * seconds


def _safe(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception:  # a session's own failure must not stop the scheduler
        log.warning("a session callback failed", exc_info=True)
