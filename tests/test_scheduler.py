"""The inference scheduler on its own: a fake clock, a fake backend whose call costs ``a + b·B``, fake sessions.

Policy tests drive :meth:`InferenceScheduler.select` / :meth:`run_batch` in
discrete-event time (no thread, no sleeping, nothing timing-bound); failure
tests run the real scheduler thread with an instant backend.
"""

from __future__ import annotations

import gc
import threading
import weakref
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest
from avatar.contract import FEATURE_SHAPES, read_contract
from avatar.engine import Clock, InferenceScheduler, WorkItem
from avatar.interfaces import Backend


@pytest.fixture(scope="module")
def contract(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from avatar.models.synthetic import make_unet

    d = tmp_path_factory.mktemp("sched")
    return read_contract(make_unet(d / "unet.onnx", mode="ave", seed=1, tiny=True))


class SimTime:
    def __init__(self) -> None:
        self.t = 0.0

    def clock(self) -> Clock:
        return Clock(now=lambda: self.t, sleep=lambda s: None)


class FakeBackend(Backend):
    """Costs ``a + b·B`` seconds of simulated time per call; a window whose first value is NaN gives a NaN row,
    one whose first value is ``raise_on`` makes the call raise."""

    def __init__(self, contract: Any, time: SimTime | None = None, a: float = 0.0, b: float = 0.0,
                 raise_on: float | None = None) -> None:
        super().__init__(contract.path)
        self.contract, self.time, self.a, self.b, self.raise_on = contract, time, a, b, raise_on
        self.sizes: list[int] = []

    @property
    def inputs(self) -> Sequence[Any]:
        return [self.contract.visual, self.contract.audio]

    @property
    def outputs(self) -> Sequence[Any]:
        return [self.contract.output]

    def _run(self, feeds: Any) -> dict[str, np.ndarray]:
        audio = feeds[self.contract.audio.name]
        n = len(audio)
        self.sizes.append(n)
        if self.time is not None:
            self.time.t += self.a + self.b * n
        firsts = audio.reshape(n, -1)[:, 0]
        if self.raise_on is not None and np.any(firsts == self.raise_on):
            raise RuntimeError("device error")
        out = np.full((n, 3, 320, 320), 0.5, np.float32)
        out[np.isnan(firsts)] = np.nan
        return {self.contract.output.name: out}


class FakeSession:
    """A client: records what came back (thread-safe)."""

    def __init__(self, name: str, fail_index: bool = False) -> None:
        self.name = name
        self.faces: list[int] = []
        self.skipped: list[int] = []
        self.failures: list[BaseException] = []
        self.fail_index = fail_index
        self.cv = threading.Condition()

    def deadline(self, item: WorkItem) -> float | None:  # (the old scheduler asked the session)
        return getattr(item, "deadline", None)

    def avatar_index(self, item: WorkItem) -> int:
        if self.fail_index:
            raise RuntimeError("avatar frame missing")
        return item.index % 5

    def visual_inputs(self, indices: Sequence[int]) -> np.ndarray:
        return np.zeros((len(indices), 6, 320, 320), np.uint8)

    def on_faces(self, items: list[WorkItem], av: list[int], faces: np.ndarray, seconds: Any) -> None:
        with self.cv:
            self.faces.extend(it.index for it in items)
            self.cv.notify_all()

    def on_skipped(self, item: WorkItem) -> None:
        self.skipped.append(item.index)

    def on_failure(self, exc: BaseException) -> None:
        with self.cv:
            self.failures.append(exc)
            self.cv.notify_all()

    def wait(self, pred: Any, timeout: float = 20.0) -> bool:
        with self.cv:
            return self.cv.wait_for(pred, timeout)


def window(value: float = 0.0) -> np.ndarray:
    w = np.zeros(FEATURE_SHAPES["ave"], np.float32)
    w.reshape(-1)[0] = value
    return w


def item(client: Any, index: int, deadline: float | None = None, value: float = 0.0, skippable: bool = True) -> WorkItem:
    return WorkItem(client, index, window(value), 0, deadline=deadline, skippable=skippable)


def _advance(sched: Any, time: Any, next_arrival: float | None) -> bool:
    """One scheduler step on the fake clock: run a batch, or move the clock to the next arrival or wake-up
    (False: nothing is left to wait for)."""
    batch, skipped, wake = sched.select(time.t)
    for it in skipped:
        it.client.on_skipped(it)
    if batch:
        sched.run_batch(batch)
        return True
    nxt = [next_arrival] if next_arrival is not None else []
    if wake is not None:
        nxt.append(wake)
    if not nxt:
        return False
    time.t = max(time.t, min(nxt)) + 1e-9
    return True


def simulate(sched: InferenceScheduler, time: SimTime, sessions: list[FakeSession], seconds: float,
             budget_s: float, fps: float = 25.0, offsets: list[float] | None = None) -> None:
    """Each session submits a frame every 1/fps, due ``budget_s`` later; the backend runs whenever a batch is chosen."""
    offsets = offsets or [k / (fps * len(sessions)) for k in range(len(sessions))]
    arrivals = sorted((off + j / fps, k, j) for k, off in enumerate(offsets) for j in range(int(seconds * fps)))
    i = 0
    while i < len(arrivals) or sched.pending:
        while i < len(arrivals) and arrivals[i][0] <= time.t:
            t, k, j = arrivals[i]
            sched.submit(item(sessions[k], j, deadline=t + budget_s))
            i += 1
        if not _advance(sched, time, arrivals[i][0] if i < len(arrivals) else None):
            break


def sim_scheduler(contract: Any, a: float, b: float, batch: int = 8, **kw: Any) -> tuple[InferenceScheduler, SimTime]:
    time = SimTime()
    be = FakeBackend(contract, time, a, b)
    sched = InferenceScheduler(be, contract, batch_size=batch, clock=time.clock(), thread=False, **kw)
    for n in range(1, batch + 1):
        sched._measure(n, a + b * n)
    return sched, time


# --------------------------------------------------------------------------- policy (fake clock)


def test_earliest_deadline_first(contract: Any) -> None:
    sched, time = sim_scheduler(contract, 0.01, 0.001, batch=3, max_wait_s=0.0)
    s = FakeSession("s")
    for j, d in enumerate([0.9, 0.3, 0.7, 0.2, 0.5, 0.8]):
        sched.submit(item(s, j, deadline=d))
    order = []
    while sched.pending:
        batch, skipped, _ = sched.select(time.t)
        assert not skipped
        order.append(sorted(it.deadline for it in batch))
        sched.run_batch(batch)
    assert order == [[0.2, 0.3, 0.5], [0.7, 0.8, 0.9]]


def test_a_frame_that_cannot_be_done_in_time_is_skipped_before_inference(contract: Any) -> None:
    sched, time = sim_scheduler(contract, 0.04, 0.01, max_wait_s=0.0)
    s = FakeSession("s")
    time.t = 1.0
    sched.submit(item(s, 0, deadline=1.02))  # 50 ms is the least a call costs: no batch can make it
    sched.submit(item(s, 1, deadline=1.5))
    batch, skipped, _ = sched.select(time.t)
    assert [it.index for it in skipped] == [0] and [it.index for it in batch] == [1]


def test_batches_grow_under_load_before_frames_are_thinned(contract: Any) -> None:
    """40 ms + 10 ms/frame, 3 real-time sessions (75 frames/s): batch 1 serves 20/s, batch 8 about 67/s."""
    sched, time = sim_scheduler(contract, 0.04, 0.01)
    sessions = [FakeSession(str(k)) for k in range(3)]
    for s in sessions:
        sched.attach(s, 25.0)  # the sessions present: the start budget is sized for them
    simulate(sched, time, sessions, seconds=20.0, budget_s=sched.start_budget_s())
    shown = [len(s.faces) / 500 for s in sessions]
    assert sched.stats.mean_batch > 6
    assert sum(shown) / 3 > 0.8  # the bound is 67/75 = 0.89 of the frames
    assert all(len(s.faces) + len(s.skipped) == 500 for s in sessions)  # every frame: its face or its skip


def test_overload_is_shared_fairly(contract: Any) -> None:
    """Six sessions at different phases on a backend that holds about half of them: no share below 80 % of the mean."""
    sched, time = sim_scheduler(contract, 0.02, 0.01)
    sessions = [FakeSession(str(k)) for k in range(6)]
    for s in sessions:
        sched.attach(s, 25.0)
    simulate(sched, time, sessions, seconds=20.0, budget_s=sched.start_budget_s(),
             offsets=[0.0, 0.001, 0.002, 0.013, 0.029, 0.031])
    shares = [len(s.faces) for s in sessions]
    mean = sum(shares) / len(shares)
    assert 0.3 < mean / 500 < 0.9  # overloaded
    assert min(shares) >= 0.8 * mean, shares


def test_unpaced_work_uses_idle_capacity_and_never_makes_a_live_frame_late(contract: Any) -> None:
    sched, time = sim_scheduler(contract, 0.004, 0.002)
    live = [FakeSession("live")]
    offline = FakeSession("offline")
    for j in range(2000):
        sched.submit(item(offline, j))
    simulate(sched, time, live, seconds=10.0, budget_s=0.1)
    assert len(live[0].faces) == 250 and not live[0].skipped  # every live frame made it
    assert len(offline.faces) == 2000  # the offline render used what was left


def test_unpaced_work_is_not_starved_by_an_overload(contract: Any) -> None:
    sched, time = sim_scheduler(contract, 0.04, 0.01, starve_s=0.5)
    live = [FakeSession(str(k)) for k in range(4)]
    offline = FakeSession("offline")
    for j in range(20):
        sched.submit(item(offline, j))
    simulate(sched, time, live, seconds=10.0, budget_s=0.2)
    assert len(offline.faces) == 20


def test_the_pick_does_not_touch_everything_pending(contract: Any) -> None:
    """10 000 frames pending: a pick pops about one batch's worth of the heap, never sorts them all."""
    sched, time = sim_scheduler(contract, 0.001, 0.001, batch=8)
    s = FakeSession("s")
    for j in range(10_000):
        sched.submit(item(s, j, deadline=10.0 + j / 25))
    calls: list[int] = []
    sched._served_recent = lambda c, now: calls.append(1) or 0.0  # type: ignore[method-assign]
    batch, skipped, _ = sched.select(time.t)
    assert len(batch) == 8 and not skipped
    assert sched.pending == 10_000 - 8
    assert len(calls) <= 16  # only the popped candidates were looked at


# --------------------------------------------------------------------------- the start budget (fake clock)


class TimedSession(FakeSession):
    """Records when (simulated time) each frame's face came back."""

    def __init__(self, name: str, time: SimTime) -> None:
        super().__init__(name)
        self.time = time
        self.ready: dict[int, float] = {}

    def on_faces(self, items: list[WorkItem], av: list[int], faces: np.ndarray, seconds: Any) -> None:
        super().on_faces(items, av, faces, seconds)
        for it in items:
            self.ready[it.index] = self.time.t


def speak(sched: InferenceScheduler, time: SimTime, utterances: list[tuple[TimedSession, float, int]],
          fps: float = 25.0, budgets: list[float] | None = None) -> dict[TimedSession, list[tuple[int, float]]]:
    """Utterances ``(session, start, frames)`` in real time: frame j's window arrives at ``start + j/fps``.

    As a session plans one: at its first frame it asks for the start budget, and
    frame j is due ``budget + j/fps`` after that (frame 0 is never skipped). Each
    utterance's frames get indices of their own (``1000·u + j``). Returns each
    session's (index, due time) of every frame; ``budgets`` gets each utterance's budget.
    """
    arrivals = sorted((start + j / fps, u, j) for u, (_, start, n) in enumerate(utterances) for j in range(n))
    due: dict[TimedSession, list[tuple[int, float]]] = {s: [] for s, _, _ in utterances}
    t0: dict[int, float] = {}
    i = 0
    while i < len(arrivals) or sched.pending:
        while i < len(arrivals) and arrivals[i][0] <= time.t:
            t, u, j = arrivals[i]
            i += 1
            s = utterances[u][0]
            if j == 0:
                t0[u] = time.t + sched.start_budget_s(fps)
                if budgets is not None:
                    budgets.append(t0[u] - time.t)
            d = t0[u] + j / fps
            due[s].append((1000 * u + j, d))
            sched.submit(item(s, 1000 * u + j, deadline=d, skippable=j > 0))
        if not _advance(sched, time, arrivals[i][0] if i < len(arrivals) else None):
            break
    return due


def in_time(s: TimedSession, due: list[tuple[int, float]]) -> float:
    """The fraction of ``s``'s frames whose face came back by their due time."""
    return sum(1 for j, d in due if j in s.ready and s.ready[j] <= d) / len(due)


@pytest.mark.parametrize("a, b, batch, alone", [(0.04, 0.01, 8, False), (0.002, 0.0004, 32, True), (0.0, 0.0195, 8, True)],
                         ids=["40ms+10ms-per-frame", "gpu-like", "19.5ms-per-frame"])
def test_at_light_load_an_utterance_starts_after_about_one_batch_not_two_full_ones(
        contract: Any, a: float, b: float, batch: int, alone: bool) -> None:
    """One session present, five utterances with pauses: its start budget is less than one full batch plus a
    single frame (the budget sized for admission paid two full batches: 273 / 42 / 352 ms), and every frame is in
    time. A session alone whose frame is done before its next one comes never waits for a running batch: its
    budget is one single-frame call (and the batch wait), not two."""
    sched, time = sim_scheduler(contract, a, b, batch=batch)
    s = TimedSession("s", time)
    sched.attach(s, 25.0)
    budget = sched.start_budget_s(25.0)
    assert budget < (a + b * batch) + (a + b)
    if alone:
        assert budget < 1.5 * (a + b) + 0.01
    due = speak(sched, time, [(s, 0.5 + 3.0 * u, 50) for u in range(5)])
    assert in_time(s, due[s]) == 1.0 and not s.skipped
    assert sched.start_budget_s(25.0) == pytest.approx(budget)  # the same after its own speech (no stale demand)


def test_the_start_budget_grows_with_the_sessions_present(contract: Any) -> None:
    """40 ms + 10 ms/frame (batch 1 serves 20 frames/s, batch 8 about 67): each session present (25 frames/s) needs a
    larger batch, and a larger budget; at overload it is the batch at the bound; a closed session no longer counts."""
    sched, _ = sim_scheduler(contract, 0.04, 0.01)
    sessions = [FakeSession(str(k)) for k in range(3)]
    budgets = []
    for s in sessions:
        sched.attach(s, 25.0)
        budgets.append(sched.start_budget_s(25.0))
    assert budgets[0] < budgets[1] < budgets[2]
    full = 0.04 + 0.01 * 8
    assert budgets[0] < full + (0.04 + 0.01) < 2 * full <= budgets[2]  # 75 frames/s is beyond the bound: full batches
    assert sched.present_fps() == 75.0
    sched.cancel(sessions[2])
    sched.cancel(sessions[1])
    assert sched.present_fps() == 25.0 and sched.start_budget_s(25.0) == pytest.approx(budgets[0])


def test_a_session_that_starts_speaking_does_not_make_anothers_utterance_late(contract: Any) -> None:
    """Two sessions present on 40 ms + 10 ms/frame: A starts speaking, B 0.1 s later, and batches must grow from 2 to
    about 4. Both budgets were planned for the sessions present, so every frame is in time; planned for the load
    speaking when each started (A alone, then A just begun), both are too small (about 13 % of the frames late)."""
    def run(attach: bool) -> tuple[float, float]:
        sched, time = sim_scheduler(contract, 0.04, 0.01)
        a, b = TimedSession("a", time), TimedSession("b", time)
        if attach:
            sched.attach(a, 25.0)
            sched.attach(b, 25.0)
        due = speak(sched, time, [(a, 0.5, 100), (b, 0.6, 75)])
        return in_time(a, due[a]), in_time(b, due[b])

    assert min(run(attach=True)) == 1.0
    assert max(run(attach=False)) < 0.95  # (the contrast: what the sessions present add is what keeps them in time)


def test_a_lone_session_behind_at_batch_1_gets_its_consecutive_frames_batched(contract: Any) -> None:
    """One 25 fps session, 40 ms + 10 ms/frame: alone at batch 1 it makes 20 frames/s and would lose a fifth of
    its frames; enough of its consecutive frames share a call (two: 60 ms) that every frame is shown."""
    sched, time = sim_scheduler(contract, 0.04, 0.01)
    s = FakeSession("alone")
    sched.attach(s, 25.0)
    simulate(sched, time, [s], seconds=20.0, budget_s=sched.start_budget_s(25.0))
    assert sched.stats.mean_batch > 1.25 and max(sched.stats.batch_sizes) >= 2  # (batch 1 throughout: 20/s)
    assert len(s.faces) == 500 and not s.skipped


def test_a_backend_that_gains_nothing_from_batching_gets_no_wait_for_a_batch(contract: Any) -> None:
    """19.5 ms per frame at any batch (OpenVINO bf16 on 2 cores, a = 0) with two sessions present (98 % of the bound):
    no batch serves more than batch 1, so the budget is batch 1's, not the full batch's (which cost 416 ms p95)."""
    sched, time = sim_scheduler(contract, 0.0, 0.0195)
    s = [TimedSession(str(k), time) for k in range(2)]
    for x in s:
        sched.attach(x, 25.0)
    budgets: list[float] = []
    due = speak(sched, time, [(s[0], 0.5, 100), (s[1], 1.5, 100), (s[0], 5.0, 50)], budgets=budgets)
    assert max(budgets) < 0.0195 * 4  # about twice batch 1's cost (the full batch's: 0.35 s)
    assert min(in_time(x, due[x]) for x in s) >= 0.95


def test_the_measured_demand_forgets_a_pause(contract: Any) -> None:
    """25 frames in a second, then 3 s of silence: the demand is 0 (the window rolls only on a submit)."""
    sched, time = sim_scheduler(contract, 0.04, 0.01)
    s = FakeSession("s")
    for j in range(25):
        time.t = j / 25
        sched.submit(item(s, j, deadline=10.0))
    assert sched.demand_fps() > 20
    time.t = 4.0
    assert sched.demand_fps() == 0.0
    assert sched.start_budget_s(25.0) < 0.2  # one session's budget again, not an overload's


# --------------------------------------------------------------------------- failures (real thread)


def threaded(contract: Any, **kw: Any) -> InferenceScheduler:
    return InferenceScheduler(FakeBackend(contract, **kw), contract, batch_size=8, max_wait_s=0.05)


def test_a_bad_row_ends_only_its_session(contract: Any) -> None:
    sched = threaded(contract)
    good, bad = FakeSession("good"), FakeSession("bad")
    try:
        for j in range(4):
            sched.submit(item(good, j))
            sched.submit(item(bad, j, value=np.nan if j == 2 else 0.0))
        assert good.wait(lambda: len(good.faces) == 4)
        assert bad.wait(lambda: bad.failures)
        assert not good.failures and "NaN" in str(bad.failures[0])
        assert sched.stats.bad_rows == 1
    finally:
        sched.close()


def test_a_raising_backend_is_retried_split_by_session(contract: Any) -> None:
    sched = threaded(contract, raise_on=7.0)
    good, bad = FakeSession("good"), FakeSession("bad")
    try:
        for j in range(3):
            sched.submit(item(good, j))
            sched.submit(item(bad, j, value=7.0))
        assert good.wait(lambda: len(good.faces) == 3)
        assert bad.wait(lambda: bad.failures)
        assert not good.failures and "device error" in str(bad.failures[0])
        assert sched.stats.split_retries >= 1
    finally:
        sched.close()


def test_a_session_whose_avatar_input_fails_does_not_take_its_batch_mates_along(contract: Any) -> None:
    sched = threaded(contract)
    broken, after = FakeSession("broken", fail_index=True), FakeSession("after")
    try:
        sched.submit(item(broken, 0))
        sched.submit(item(after, 0))
        assert after.wait(lambda: after.faces or after.failures)
        assert broken.wait(lambda: broken.failures)
        assert after.faces == [0] and not after.failures
    finally:
        sched.close()


def test_a_dead_scheduler_thread_is_replaced_and_counted(contract: Any) -> None:
    sched = threaded(contract)
    s = FakeSession("s")
    real = sched.run_batch
    once = [True]

    def broken(batch: list[WorkItem]) -> None:
        if once:
            once.clear()
            raise RuntimeError("a bug in the loop")
        real(batch)

    sched.run_batch = broken  # type: ignore[method-assign]
    try:
        sched.submit(item(s, 0))
        assert s.wait(lambda: s.failures)  # the item in hand got its failure ...
        sched.submit(item(s, 1))
        assert s.wait(lambda: s.faces == [1])  # ... and a replacement thread serves what comes next
        assert sched.stats.restarts == 1 and sched.alive
    finally:
        sched.close()


def test_every_pending_item_gets_its_failure_when_the_scheduler_closes(contract: Any) -> None:
    sched, _ = sim_scheduler(contract, 0.01, 0.001)
    s = FakeSession("s")
    sched.submit(item(s, 0))
    sched.close()
    assert len(s.failures) == 1 and sched.pending == 0


def test_the_scheduler_keeps_no_reference_to_a_served_session(contract: Any) -> None:
    sched = threaded(contract)
    try:
        s = FakeSession("s")
        sched.submit(item(s, 0))
        faces = s.faces
        assert s.wait(lambda: faces == [0])
        threading.Event().wait(0.3)  # the scheduler thread is back waiting for the next batch
        ref = weakref.ref(s)
        del s
        gc.collect()
        assert ref() is None, [type(r).__name__ for r in gc.get_referrers(ref())]
    finally:
        sched.close()


def test_cancel_drops_a_sessions_items_and_its_references(contract: Any) -> None:
    sched, _ = sim_scheduler(contract, 0.01, 0.001)
    a, b = FakeSession("a"), FakeSession("b")
    for j in range(5):
        sched.submit(item(a, j, deadline=1.0 + j))
        sched.submit(WorkItem(b, j, window(), generation=j, deadline=1.0 + j))
    assert sched.cancel(b, below_generation=3) == 3
    assert sched.cancel(a) == 5
    assert sched.pending == 2
    ref = weakref.ref(a)
    del a
    gc.collect()
    assert ref() is None


def test_estimates_extrapolate_linearly(contract: Any) -> None:
    sched, _ = sim_scheduler(contract, 0.002, 0.0004, batch=4)
    sched._run_est = {1: 0.0024, 4: 0.0036}
    assert sched.estimate_s(8) == pytest.approx(0.002 + 0.0004 * 8)
    assert sched.bound_fps() == pytest.approx(4 / 0.0036)



# --------------------------------------------------------------------------- lanes (calls in flight at once)


class _TwoCalls(FakeBackend):
    @property
    def concurrency(self) -> int:  # a backend that runs two calls at once
        return 2


def test_lanes_multiply_the_throughput_the_policy_plans_with(contract: Any) -> None:
    one, _ = sim_scheduler(contract, 0.070, 0.010)
    two_be = _TwoCalls(contract, SimTime(), 0.070, 0.010)
    two = InferenceScheduler(two_be, contract, batch_size=8, thread=False)
    for n in range(1, 9):
        two._measure(n, 0.070 + 0.010 * n)
    assert (one.lanes, two.lanes) == (1, 2)
    assert two.bound_fps() == pytest.approx(2 * one.bound_fps())
    # 25 frames/s (+10 %): one call at a time needs batch 3 (3 / 0.1 s = 30 frames/s; batch 2 makes 22),
    # two calls in flight cover it at batch 2 (2 · 2 / 0.09 s = 44 frames/s)
    assert one.planned_batch(25.0) == 3 and two.planned_batch(25.0) == 2
    # a lone 25 fps session whose batch-1 call (80 ms) outlasts its frame interval finds a lane free with two
    assert two.start_budget_s(25.0) < one.start_budget_s(25.0)


class _CountingSession(FakeSession):
    """Distinct visual input per frame; keeps the faces that came back by frame index."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.got: dict[int, np.ndarray] = {}

    def avatar_index(self, item: WorkItem) -> int:
        return item.index

    def visual_inputs(self, indices: Sequence[int]) -> np.ndarray:
        return np.stack([np.random.default_rng(i).integers(0, 256, (6, 320, 320), dtype=np.uint8) for i in indices])

    def on_faces(self, items: list[WorkItem], av: list[int], faces: np.ndarray, seconds: Any) -> None:
        with self.cv:
            for it, f in zip(items, faces):
                self.got[it.index] = f.copy()
            self.cv.notify_all()


def test_a_backend_with_two_streams_runs_two_batches_at_once_and_each_frame_gets_its_own_face(
        tmp_path: Any) -> None:
    pytest.importorskip("openvino")
    from avatar.engine.threads import ThreadBudget
    from avatar.interfaces import BackendOptions
    from avatar.models.synthetic import make_unet
    from avatar.vision import normalize
    from avatar_plugins.backends.openvino import OpenVinoBackend

    unet = make_unet(tmp_path / "unet.onnx", mode="ave", seed=4, tiny=True)
    con = read_contract(unet)
    base = BackendOptions(max_batch=2, extra={"cache": "0"})
    lanes = OpenVinoBackend(unet, ThreadBudget(cores=2, backend=2, lanes=2).backend_options("openvino", base))
    alone = OpenVinoBackend(unet, ThreadBudget(cores=2, backend=2, lanes=1).backend_options("openvino", base))
    assert (lanes.concurrency, alone.concurrency) == (2, 1)
    assert lanes.compiled_property("NUM_STREAMS") == 2
    flight, peak, lock = [0], [0], threading.Lock()
    run = lanes.run

    def counted(feeds: Any) -> Any:  # instrumentation only: the real backend runs every call
        with lock:
            flight[0] += 1
            peak[0] = max(peak[0], flight[0])
        try:
            return run(feeds)
        finally:
            with lock:
                flight[0] -= 1

    lanes.run = counted  # type: ignore[method-assign]
    sched = InferenceScheduler(lanes, con, batch_size=1, max_wait_s=0.0)
    s = _CountingSession("s")
    try:
        assert sched.lanes == 2 and len(sched._threads) == 2
        sched.warm()
        if Path("/proc/self/task").is_dir():  # the CPU of both streams' threads is counted, not one stream's
            assert sched._pool is not None and sched._pool.threads >= 2
        n = 40
        for j in range(n):
            sched.submit(WorkItem(s, j, window(float(j) / n), 0))
        assert s.wait(lambda: len(s.got) == n or s.failures, timeout=120)
        assert not s.failures and peak[0] == 2 and sched.stats.calls == n
        for j in range(n):  # each frame's face is the one its own inputs give, run alone
            ref = alone.run({con.visual.name: normalize(s.visual_inputs([j])),
                             con.audio.name: window(float(j) / n)[None]})[con.output.name][0]
            np.testing.assert_allclose(s.got[j], ref, atol=1e-4)
    finally:
        sched.close()
        lanes.close()
        alone.close()
    assert not sched.alive
