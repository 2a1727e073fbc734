"""Shared inference: ready windows from every session, one backend call per batch.

One :class:`InferenceScheduler` per loaded backend, with one thread per call the
backend runs at once (its :attr:`~avatar.interfaces.Backend.concurrency`: OpenVINO's
streams; 1 for most backends), so that many batches are in flight. The policy,
in two sentences: *a batch holds the frames that the backend can finish by their
deadlines at the batch size that finishes the most of them per second of
backend time (earliest deadline first, the least-served session first among
frames that fit); frames that batch would finish too late are skipped before
inference.* Unpaced work (offline renders, no deadline) fills what paced frames
leave of a batch, and gets one slot per batch when it has waited too long, so it
never starves and never makes a paced frame late.

* Sessions :meth:`~InferenceScheduler.submit` :class:`WorkItem` s whose
  ``deadline`` (the clock time the face must be back to be composited and shown
  in time) is fixed at submission; the pending frames are a heap, so a pick is
  O(batch · log n), not a sort of everything pending.
* A partial batch waits for more frames at most ``max_wait_s`` after its first
  frame arrived and never past the latest start of its earliest deadline.
* The cost model ``t(B)`` is measured per batch size (warm-up, then a running
  average), interpolated and extrapolated linearly (``a + b·B``).
* Failures are isolated: a session whose avatar input fails ends alone; a
  backend exception on a batch shared by several sessions is retried once split
  by session; model output is checked row by row (a NaN row ends its session
  only); a scheduler thread that dies is replaced (``stats.restarts``) and every
  item in hand gets its faces or its failure.
* The scheduler keeps no reference to a session after its items are served or
  cancelled (served-share counts are weak references).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from ..contract import ModelContract, check_output_rows
from ..errors import BackendError, ModelError
from ..interfaces import Backend
from .pacing import REALTIME, Clock

log = logging.getLogger(__name__)

#: a replaced scheduler thread more often than this many times in a minute gives up (a bug, not a glitch)
MAX_RESTARTS_PER_MINUTE = 5


class Client(Protocol):
    """What the scheduler needs from a session (all called on the scheduler thread, without its lock)."""

    def avatar_index(self, item: "WorkItem") -> int:
        """The avatar frame (walk position bound to the item) whose visual input the item runs with."""

    def visual_inputs(self, indices: Sequence[int]) -> np.ndarray:
        """uint8 visual inputs ``[n, 6, 320, 320]`` for avatar frames ``indices``."""

    def on_faces(self, items: list["WorkItem"], av_idx: list[int], faces: np.ndarray, seconds: tuple[float, float]) -> None:
        """The model's faces for ``items`` (``seconds``: this client's share of input building and inference)."""

    def on_skipped(self, item: "WorkItem") -> None:
        """``item`` was dropped before inference: it could not be done by its deadline."""

    def on_failure(self, exc: BaseException) -> None:
        """The client's frames cannot be made (its row was bad, its input failed, the backend failed)."""


@dataclass(eq=False)
class WorkItem:
    client: Any
    index: int  # frame index within its utterance
    window: np.ndarray
    generation: int  # the session's utterance generation (stale items are cancelled)
    #: clock time by which the face must be back; None: unpaced (offline), served in submission order
    deadline: float | None = None
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
    #: shared calls that failed and were retried split by session
    split_retries: int = 0
    #: rows the model returned with NaN/Inf (each ended its session)
    bad_rows: int = 0
    #: scheduler threads that died and were replaced
    restarts: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)

    @property
    def mean_batch(self) -> float:
        return self.items / self.calls if self.calls else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "items": self.items, "skipped": self.skipped, "run_s": self.run_s,
                "shared_calls": self.shared_calls, "split_retries": self.split_retries, "bad_rows": self.bad_rows,
                "restarts": self.restarts, "mean_batch": self.mean_batch,
                "batch_sizes": dict(sorted(self.batch_sizes.items()))}


class InferenceScheduler:
    """Deadline-aware batching over one backend, on one (supervised) thread.

    ``thread=False`` runs no thread: a driver calls :meth:`select` and
    :meth:`run_batch` itself (discrete-event simulations, unit tests).
    """

    def __init__(
        self,
        backend: Backend,
        contract: ModelContract,
        *,
        batch_size: int = 8,
        max_wait_s: float = 0.005,
        clock: Clock = REALTIME,
        name: str = "inference",
        starve_s: float = 0.5,
        margin_s: float = 0.002,
        thread: bool = True,
    ) -> None:
        self.backend = backend
        self.contract = contract
        self.batch_size = max(1, int(batch_size))
        self.max_wait_s = max(0.0, float(max_wait_s))
        self.clock = clock
        self.name = name
        #: an unpaced item that waited this long gets a slot in the next batch
        self.starve_s = starve_s
        #: safety margin added to the cost model when judging a deadline
        self.margin_s = margin_s
        self.stats = SchedulerStats()
        self._paced: list[tuple[float, int, WorkItem]] = []  # heap by (deadline, seq)
        self._unpaced: list[tuple[int, WorkItem]] = []  # heap by seq (FIFO)
        self._cv = threading.Condition()
        self._seq = itertools.count(1)
        self._closed = False
        self._run_est: dict[int, float] = {}
        self._served: weakref.WeakKeyDictionary[Any, list[float]] = weakref.WeakKeyDictionary()
        #: the paced sessions present (open, speaking or not) and their frame rates
        self._present: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self._rate_window = [0.0, 0, 0.0]  # [window start, paced items in it, items/s of the last window]
        self._restart_times: list[float] = []
        #: batches in flight, by the thread running them (if a thread dies, its items get their failure)
        self._in_hand: dict[int, list[WorkItem]] = {}
        #: batches the backend runs at once (one scheduler thread each)
        self.lanes = max(1, min(16, int(getattr(backend, "concurrency", 1) or 1)))
        self._stat_lock = threading.Lock()  # stats and the cost model, updated by every lane
        self._discovering = threading.Lock()  # one lane finds the backend's threads
        self._recent_batch = (1, 0.0)  # the largest batch run lately, and when
        #: process CPU seconds per frame the backend used while warming (≈0 on a GPU)
        self.cpu_per_frame_s = 0.0
        self._pool: Any = None  # the backend's native threads (found by warm() or the first call), for its CPU
        self._pool_cpu = 0.0
        vis = contract.visual.name
        # the backend may have converted the model (e.g. uint8_visual): ask it, not the file
        vis_info = next((t for t in backend.inputs if t.name == vis), contract.visual)
        self._uint8 = np.dtype(vis_info.dtype) == np.uint8
        self._threads: list[threading.Thread] = []
        if thread:
            self._start_threads()

    def _start_threads(self) -> None:
        for lane in range(self.lanes):
            suffix = f"-{lane}" if self.lanes > 1 else ""
            t = threading.Thread(target=self._loop, name=f"avatar-{self.name}{suffix}", daemon=True)
            self._threads.append(t)
            t.start()

    # -- sessions' side ----------------------------------------------------------

    def submit(self, item: WorkItem) -> None:
        with self._cv:
            closed = self._closed
            if not closed:
                item.seq = next(self._seq)
                item.submitted = now = self.clock.now()
                if item.deadline is None:
                    heapq.heappush(self._unpaced, (item.seq, item))
                else:
                    heapq.heappush(self._paced, (item.deadline, item.seq, item))
                    self._count_paced(now)
                self._cv.notify_all()
        if closed:  # (sessions are closed before their scheduler: only a failed scheduler gets here)
            _safe(item.client.on_failure, BackendError("the shared inference has stopped"))

    def attach(self, client: Any, fps: float) -> None:
        """``client`` (a paced session) is open and may submit ``fps`` frames a second from now on.

        The start budget plans for every session present, speaking or not: one
        that starts speaking during another's utterance must not make it late.
        :meth:`cancel` without a generation detaches it.
        """
        with self._cv:
            self._present[client] = max(0.0, float(fps))

    def fair_share_fps(self) -> float:
        """Frames/s each attached session gets when every one of them speaks at the bound (0 before a measurement)."""
        with self._cv:
            n = len(self._present)
        return self.bound_fps() / max(1, n)

    def present_fps(self) -> float:
        """Frames per second the attached sessions submit when they all speak."""
        with self._cv:
            return float(sum(list(self._present.values())))

    def cancel(self, client: Any, below_generation: int | None = None) -> int:
        """Drop ``client``'s pending items (those of older generations only, if given); returns how many."""

        def gone(it: WorkItem) -> bool:
            return it.client is client and (below_generation is None or it.generation < below_generation)

        with self._cv:
            n = len(self._paced) + len(self._unpaced)
            self._paced = [e for e in self._paced if not gone(e[2])]
            self._unpaced = [e for e in self._unpaced if not gone(e[1])]
            heapq.heapify(self._paced)
            heapq.heapify(self._unpaced)
            if below_generation is None:
                self._served.pop(client, None)
                self._present.pop(client, None)
            return n - len(self._paced) - len(self._unpaced)

    @property
    def pending(self) -> int:
        with self._cv:
            return len(self._paced) + len(self._unpaced)

    def _count_paced(self, now: float) -> None:
        w = self._rate_window  # [window start, count in it, count in the window before]
        if now - w[0] >= 1.0:
            w[2] = w[1] if now - w[0] < 2.0 else 0
            w[0], w[1] = now, 0
        w[1] += 1

    # -- the cost model ------------------------------------------------------------

    def estimate_s(self, n: int = 1) -> float:
        """Expected seconds of one call of ``n`` items (0 before anything was measured)."""
        est = dict(self._run_est)  # (a copy: the lanes add sizes while sessions ask)
        if n in est:
            return est[n]
        if not est:
            return 0.0
        sizes = sorted(est)
        if len(sizes) == 1:
            return est[sizes[0]] * n / sizes[0]
        if sizes[0] <= n <= sizes[-1]:
            return float(np.interp(n, sizes, [est[k] for k in sizes]))
        lo, hi = (sizes[0], sizes[1]) if n < sizes[0] else (sizes[-2], sizes[-1])
        slope = max(0.0, (est[hi] - est[lo]) / (hi - lo))  # a + b·B through the nearest two sizes
        return max(0.0, est[lo] + slope * (n - lo))

    def rate_fps(self, n: int) -> float:
        """Frames per second at batch ``n`` with every lane busy: ``lanes · n / t(n)`` (inf before a measurement)."""
        t = self.estimate_s(n)
        return self.lanes * n / t if t > 0 else math.inf

    def bound_fps(self) -> float:
        """The cost model's throughput bound: ``max_B lanes · B / t(B)`` frames per second (0 before a measurement)."""
        rates = [self.lanes * b / t for b in range(1, self.batch_size + 1) if (t := self.estimate_s(b)) > 0]
        return max(rates, default=0.0)

    def demand_fps(self) -> float:
        """Paced frames submitted per second (a sliding one-second window)."""
        start, cur, prev = self._rate_window
        age = max(0.0, self.clock.now() - start)
        if age >= 2.0:  # nothing submitted for a second or more (the window only rolls on a submit)
            return 0.0
        if age >= 1.0:  # the window is complete: it is the one before, and the current one is empty
            prev, cur, age = cur, 0, age - 1.0
        return float(prev * (1.0 - age) + cur) if prev or age >= 0.25 else cur / 0.25

    def planned_batch(self, demand_fps: float | None = None) -> int:
        """The smallest batch whose throughput covers ``demand_fps`` (default: the paced demand) with 10 % headroom.

        When no batch covers it (overload), the smallest batch within 1 % of the
        bound: a larger one serves no more frames per second, it only waits longer.
        """
        demand = self.demand_fps() if demand_fps is None else demand_fps
        for b in range(1, self.batch_size + 1):
            if self.rate_fps(b) >= demand * 1.1:
                return b
        return self.capacity_batch(0.99)

    def capacity_batch(self, share: float = 0.9) -> int:
        """The smallest batch whose throughput reaches ``share`` of the bound."""
        bound = self.bound_fps()
        for b in range(1, self.batch_size + 1):
            if self.rate_fps(b) >= share * bound:
                return b
        return self.batch_size

    def start_budget_s(self, fps: float = 0.0) -> float:
        """What a new utterance's first frame needs: a batch already running, its own batch, the wait to fill it.

        Its own batch is the one the load present needs (:meth:`planned_batch`):
        that of the sessions attached (:meth:`attach`, speaking or not: one that
        starts speaking during this utterance must not make it late), or when
        none is, the paced demand of the last second plus ``fps`` (the new
        utterance's own frames). The batch already running is that one or the
        largest that ran in the last two seconds (a burst, offline work filling
        batches); none for a session alone whose frames each run alone and are
        done before its next one comes. With few sessions this is one or two
        small batches' cost, not two full batches'; it grows with the sessions
        present toward the batch at the bound, never beyond it.
        """
        size, when = self._recent_batch
        if self.clock.now() - when > 2.0:
            size = 1
        fps = max(0.0, fps)
        demand = self.present_fps() or self.demand_fps() + fps
        b = self.planned_batch(demand)
        own = self._done_by(b, 0.0) + self.max_wait_s
        if b == size == 1 and demand <= fps * 1.001 and not self._unpaced and own <= self.lanes / max(fps, 1e-9):
            return own  # a lone session whose frame is done before a lane is needed again never finds them all busy
        return self._done_by(max(b, size), 0.0) + own

    def warm(self) -> None:
        """Run the backend on zeros at the full batch, then at 1, measuring both (before any session waits).

        The first call at a batch size pays for allocations; the estimates the
        deadline rule uses should not.
        """
        from ..contract import FEATURE_SHAPES

        vis = next((t for t in self.backend.inputs if t.name == self.contract.visual.name), self.contract.visual)
        vshape = tuple(d if isinstance(d, int) else 320 for d in vis.shape[1:])
        fixed = self.contract.fixed_batch
        sizes = [fixed] if fixed is not None else [self.batch_size, self.batch_size, 1]
        for n in sizes:
            feeds = {self.contract.visual.name: np.zeros((n, *vshape), np.dtype(vis.dtype)),
                     self.contract.audio.name: np.zeros((n, *FEATURE_SHAPES[self.contract.feature_type]), np.float32)}
            t, cpu = self.clock.now(), time.process_time()
            self._run_backend(feeds)
            self._run_est[n] = self.clock.now() - t
            if n == sizes[-2 if len(sizes) > 1 else 0]:  # the (second) full batch: process CPU time per frame
                self.cpu_per_frame_s = (time.process_time() - cpu) / n
        st = self.backend.stats
        st.calls = st.items = 0
        st.run_s = 0.0
        st.call_s.clear()

    def close(self) -> None:
        """Stop the thread; items still pending get their failure (every item gets faces or a failure)."""
        with self._cv:
            self._closed = True
            left = [e[2] for e in self._paced] + [e[1] for e in self._unpaced]
            self._paced, self._unpaced = [], []
            self._cv.notify_all()
        _fail_items(left, BackendError("the shared inference was closed"))
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=10.0)

    @property
    def alive(self) -> bool:
        return not self._closed and (not self._threads or any(t.is_alive() for t in self._threads))

    # -- picking a batch -----------------------------------------------------------

    def select(self, now: float) -> tuple[list[WorkItem], list[WorkItem], float | None]:
        """(batch, skipped, wake): the batch to run now (may be empty), the items dropped, and when to look again.

        ``wake`` is the clock time a partial batch stops waiting for more (None: wait for a submit).
        Call with the lock held, or from a single-threaded driver.
        """
        paced, unpaced = self._paced, self._unpaced
        if not paced and not unpaced:
            return [], [], None
        full = self.batch_size
        if len(paced) + len(unpaced) < full:
            first = min([e[2].submitted for e in paced[:1]] + [e[1].submitted for e in unpaced[:1]])
            wake = first + self.max_wait_s
            if paced:  # never past the latest start of the earliest deadline
                wake = min(wake, paced[0][0] - (self._done_by(len(paced) + len(unpaced) + 1, now) - now))
            if now < wake:
                return [], [], wake
        skipped: list[WorkItem] = []
        cands: list[WorkItem] = []
        t1, t_full = self._done_by(1, now), self._done_by(full, now)
        roomy = 0  # candidates that a full batch would still finish in time
        while paced and roomy < 2 * full:  # enough that fit a full batch to choose among them fairly
            d, _, it = heapq.heappop(paced)
            if it.skippable and d < t1:
                skipped.append(it)  # not even alone can it be done in time
                continue
            cands.append(it)
            roomy += d >= t_full
        batch = self._choose(cands, now, skipped)
        # unpaced work: the slots paced frames leave, if the paced frames stay in time
        room = full - len(batch)
        paced_first = min((it.deadline for it in batch if it.deadline is not None), default=math.inf)
        starving = bool(unpaced) and now - unpaced[0][1].submitted >= self.starve_s
        while unpaced and room > 0:
            if self._done_by(len(batch) + 1, now) > paced_first and not starving:
                break
            batch.append(heapq.heappop(unpaced)[1])
            room -= 1
            starving = False
        if starving and batch:  # a full paced batch: the oldest unpaced item takes one slot (a paced frame waits)
            out = max((it for it in batch if it.deadline is not None and it.skippable),
                      key=lambda it: (it.deadline, it.seq), default=None)
            if out is not None:
                batch.remove(out)
                heapq.heappush(paced, (out.deadline, out.seq, out))
                batch.append(heapq.heappop(unpaced)[1])
        return batch, skipped, None

    def _choose(self, cands: list[WorkItem], now: float, skipped: list[WorkItem]) -> list[WorkItem]:
        """From deadline-ordered candidates: the batch size that finishes the most in time per second, filled fairly.

        While the backend keeps up with the demand at a batch that drops nothing
        (every candidate in it makes its deadline), that batch is taken instead.
        """
        if not cands:
            return []
        top = min(self.batch_size, len(cands))
        safe = 0
        for b in range(1, top + 1):  # the largest earliest-deadline batch in which every frame is in time
            limit = self._done_by(b, now)
            if all(it.deadline >= limit or not it.skippable for it in cands[:b]):
                safe = b
        best_b, best_rate = 1, -1.0
        for b in range(1, top + 1):
            limit = self._done_by(b, now)
            good = min(b, sum(1 for it in cands if it.deadline >= limit or not it.skippable))
            t = max(self.estimate_s(b), 1e-9)
            if good / t > best_rate * (1 + 1e-9):
                best_b, best_rate = b, good / t
        if safe and (safe == top or self.rate_fps(safe) >= 1.1 * self.demand_fps()):
            best_b = safe
        limit = self._done_by(best_b, now)
        must = [it for it in cands if not it.skippable]
        for it in must[best_b:]:  # (more first frames than a batch: the rest wait for the next)
            heapq.heappush(self._paced, (it.deadline, it.seq, it))
        must = must[:best_b]
        fits = [it for it in cands if it.skippable and it.deadline >= limit]
        late = [it for it in cands if it.skippable and it.deadline < limit]
        room = max(0, best_b - len(must))
        if len(fits) > room:  # more than fit: the least-served sessions first, then the earliest deadline
            fits.sort(key=lambda it: (self._served_recent(it.client, now), it.deadline, it.seq))
        chosen, rest = fits[:room], fits[room:]
        for it in rest:  # back to the heap: a later batch may still make them
            heapq.heappush(self._paced, (it.deadline, it.seq, it))
        skipped.extend(late)  # what this batch would finish too late cannot be done in time by any later one
        return must + chosen

    def _done_by(self, n: int, now: float) -> float:
        """When a call of ``n`` started now is expected back (the estimate plus 10 % and the margin)."""
        return now + 1.1 * self.estimate_s(n) + self.margin_s

    def _served_recent(self, client: Any, now: float) -> float:
        """Items served to ``client`` in about the last second (exponentially decayed)."""
        try:
            v = self._served.get(client)
        except TypeError:  # a client that cannot be weakly referenced is not tracked
            return 0.0
        if v is None:
            return 0.0
        return v[0] * math.exp(-(now - v[1]))

    def _mark_served(self, client: Any, n: int, now: float) -> None:
        try:
            v = self._served.get(client)
            self._served[client] = [(v[0] * math.exp(-(now - v[1])) if v else 0.0) + n, now]
        except TypeError:
            pass

    # -- the loop ----------------------------------------------------------------

    def _next(self) -> list[WorkItem] | None:
        """Wait for a batch; None when closed."""
        skipped: list[WorkItem] = []
        with self._cv:
            while True:
                if self._closed:
                    return None
                batch, skipped, wake = self.select(self.clock.now())
                if batch or skipped:
                    break
                wait = 0.1 if wake is None else max(0.0005, (wake - self.clock.now()) / self.clock.speed)
                self._cv.wait(min(0.1, wait))
        with self._stat_lock:
            self.stats.skipped += len(skipped)
        for it in skipped:
            _safe(it.client.on_skipped, it)
        return batch

    def _loop(self) -> None:
        while True:
            try:
                while self._step():
                    pass
                return
            except BaseException as exc:  # a bug here: replace this thread, never leave sessions waiting
                log.exception("the inference scheduler thread failed; replacing it")
                if not self._replace(exc):
                    return

    def _step(self) -> bool:
        """Pick and run one batch (in its own frame: no reference to its sessions outlives it)."""
        batch = self._next()
        if batch is None:
            return False
        me = threading.get_ident()
        self._in_hand[me] = batch  # (if the loop dies now, these items get their failure)
        self.run_batch(batch)
        self._in_hand.pop(me, None)
        return True

    def _replace(self, exc: BaseException) -> bool:
        """After the loop died: fail the batch in hand, count the restart, go on (False: give up)."""
        _fail_items(self._in_hand.pop(threading.get_ident(), []), exc)
        now = time.monotonic()
        with self._stat_lock:
            self._restart_times = [t for t in self._restart_times if now - t < 60.0] + [now]
            self.stats.restarts += 1
        if len(self._restart_times) > MAX_RESTARTS_PER_MINUTE or self._closed:
            with self._cv:
                self._closed = True
                left = [e[2] for e in self._paced] + [e[1] for e in self._unpaced]
                self._paced, self._unpaced = [], []
            _fail_items(left, BackendError(f"the shared inference failed repeatedly: {exc}"))
            return False
        return True

    def run_batch(self, batch: list[WorkItem]) -> None:
        """Build the inputs of each session's items, run the backend once, hand each session its faces.

        Failures end only the sessions they belong to (see the module docstring).
        """
        if not batch:
            return
        t0, c0 = time.perf_counter(), time.thread_time()
        groups: dict[int, tuple[Any, list[WorkItem], list[int], np.ndarray]] = {}
        for it in batch:
            key = id(it.client)
            if key not in groups:
                groups[key] = (it.client, [], [], np.empty(0))
            groups[key][1].append(it)
        ready: list[tuple[Any, list[WorkItem], list[int], np.ndarray]] = []
        for client, items, _, _ in groups.values():
            try:  # each session binds its frames to its own avatar walk and package
                av = [client.avatar_index(it) for it in items]
                ready.append((client, items, av, client.visual_inputs(av)))
            except BaseException as exc:  # this session's input failed: it ends, the others go on
                log.debug("building a session's visual input failed", exc_info=True)
                _safe(client.on_failure, exc)
        if not ready:
            return
        build_s, build_cpu = time.perf_counter() - t0, time.thread_time() - c0
        try:
            results = [(ready, self._call(ready))]
        except BaseException as exc:
            if len(ready) == 1:
                _safe(ready[0][0].on_failure, exc)
                return
            # a shared batch failed: retry once split by session before anyone fails
            log.debug("a shared batch failed; retrying it split by session", exc_info=True)
            with self._stat_lock:
                self.stats.split_retries += 1
            results = []
            for part in ready:
                try:
                    results.append(([part], self._call([part])))
                except BaseException as exc2:
                    _safe(part[0].on_failure, exc2)
        now = self.clock.now()
        for parts, (faces, good, run_s, run_cpu) in results:
            n = sum(len(p[1]) for p in parts)
            k = 0
            for client, items, av, _ in parts:
                rows = slice(k, k + len(items))
                k += len(items)
                if not good[rows].all():
                    with self._stat_lock:
                        self.stats.bad_rows += int((~good[rows]).sum())
                    rows_f = faces[rows][~good[rows]]
                    bad = int(rows_f.size - np.count_nonzero(np.isfinite(rows_f)))
                    _safe(client.on_failure, ModelError(
                        f"model {self.contract.path.name} returned {bad} NaN or infinite value(s) for this session's "
                        f"frame(s) {[it.index for it, g in zip(items, good[rows]) if not g]}; the weights are broken "
                        "or the export is wrong (try fp32 if this is an fp16 model)"))
                    continue
                self._mark_served(client, len(items), now)
                share = len(items) / n
                _safe(client.on_faces, items, av, faces[rows],
                      (build_s * share, run_s * share, build_cpu * share, run_cpu * share))

    def _call(self, parts: list[tuple[Any, list[WorkItem], list[int], np.ndarray]]) -> tuple[np.ndarray, np.ndarray, float, float]:
        """One backend call over ``parts``: (faces, good-row mask, seconds, CPU seconds); raises what the backend raises.

        The CPU seconds are this thread's and the backend pool's since the last call
        (its spinning between calls included; see :mod:`.cpu`).
        """
        from ..vision import normalize

        items = [it for p in parts for it in p[1]]
        visual = parts[0][3] if len(parts) == 1 else np.concatenate([p[3] for p in parts])
        feed_visual = visual if self._uint8 else normalize(visual)
        audio = np.stack([it.window for it in items]).astype(np.float32, copy=False)
        n = len(items)
        fixed = self.contract.fixed_batch
        if fixed is not None and n < fixed:  # a fixed-batch model: pad, then drop the padding
            feed_visual = np.concatenate([feed_visual, np.repeat(feed_visual[-1:], fixed - n, axis=0)])
            audio = np.concatenate([audio, np.repeat(audio[-1:], fixed - n, axis=0)])
        t1, cpu1 = time.perf_counter(), time.thread_time()
        c1 = self.clock.now()
        result = self._run_backend({self.contract.visual.name: feed_visual, self.contract.audio.name: audio})
        faces, good = check_output_rows(self.contract, result, len(feed_visual))
        run_s = time.perf_counter() - t1
        with self._stat_lock:
            run_cpu = time.thread_time() - cpu1 + self._pool_delta()
            self._measure(len(feed_visual), self.clock.now() - c1)  # in the sessions' clock (it may run scaled)
            st = self.stats
            st.calls += 1
            st.items += n
            st.run_s += run_s
            st.batch_sizes[n] = st.batch_sizes.get(n, 0) + 1
            if n >= self._recent_batch[0] or c1 - self._recent_batch[1] > 2.0:
                self._recent_batch = (n, c1)
            st.shared_calls += int(len(parts) > 1)
        return faces[:n], good[:n], run_s, run_cpu

    def _run_backend(self, feeds: dict[str, np.ndarray]) -> Any:
        """``backend.run``; the first call (the warm-up's, before any session runs) finds the backend's threads."""
        if self._pool is not None or not self._discovering.acquire(blocking=False):
            return self.backend.run(feeds)  # (another lane is finding the pool: this call is not counted in it)
        try:
            if self._pool is not None:
                return self.backend.run(feeds)
            from .cpu import NativeThreads

            result, pool = NativeThreads.discover(lambda: self._run_lanes(feeds))
            with self._stat_lock:
                self._pool, self._pool_cpu = pool, pool.cpu_s()
            return result
        finally:
            self._discovering.release()

    def _run_lanes(self, feeds: dict[str, np.ndarray]) -> Any:
        """One call in each lane at once (each lane may run on threads of its own); the first call's result."""
        if self.lanes == 1:
            return self.backend.run(feeds)
        results: list[Any] = [None] * self.lanes
        errors: list[BaseException] = []

        def call(i: int) -> None:
            # calls for about 50 ms per lane: a lane's thread is found by the CPU ticks it gains (10 ms each)
            end = time.perf_counter() + 0.05
            try:
                results[i] = self.backend.run(feeds)
                while time.perf_counter() < end:
                    self.backend.run(feeds)
            except BaseException as exc:  # (raised below, on the calling thread)
                errors.append(exc)

        calls = [threading.Thread(target=call, args=(i,), name=f"avatar-{self.name}-find") for i in range(self.lanes)]
        for t in calls:
            t.start()
        for t in calls:
            t.join()
        if errors:
            raise errors[0]
        return results[0]

    def _pool_delta(self) -> float:
        """CPU the backend's own threads used since the last call ended (any lane's)."""
        if self._pool is None:
            return 0.0
        now = self._pool.cpu_s()
        delta, self._pool_cpu = now - self._pool_cpu, now
        return delta

    def _measure(self, n: int, seconds: float) -> None:
        old = self._run_est.get(n)
        self._run_est[n] = seconds if old is None else 0.7 * old + 0.3 * seconds


def _fail_items(items: list[WorkItem], exc: BaseException) -> None:
    """Tell each client of ``items`` once that its frames cannot be made."""
    seen: set[int] = set()
    for it in items:
        if id(it.client) not in seen:
            seen.add(id(it.client))
            _safe(it.client.on_failure, exc)


def _safe(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception:  # a session's own failure must not stop the scheduler
        log.warning("a session callback failed", exc_info=True)
