"""The scheduling policy of main before issue 18 (``git show 50f912c:core/engine/scheduler.py``), for comparison only.

Its ``_pick`` and the session's deadline rule are ported here as plain
functions of the pending items and the time, so the capacity benchmark can run
them in discrete-event time beside the current scheduler. Nothing in the
package imports this module.

The old rule: a partial batch waits at most ``max_wait_s`` after the oldest item
and never past ``soonest deadline - t(n + 1) - 2 ms``; then all pending items
are *sorted* by deadline; an item that cannot be done even alone is dropped; the
batch is cut as soon as adding an item would miss the earliest deadline in it.
Deadlines were asked of the session at every pick: before an utterance started,
``first submit + t(batch_size) + (j + 1) / fps``; after, ``t0 + j / fps - fps / 4``.
"""

from __future__ import annotations

from typing import Any, Callable

Item = Any  # anything with .seq, .submitted, .skippable


def legacy_select(
    pending: list[Item],
    now: float,
    *,
    batch_size: int,
    max_wait_s: float,
    est: Callable[[int], float],
    deadline: Callable[[Item], float | None],
) -> tuple[list[Item], list[Item], float | None]:
    """(batch, dropped, wake) as main's ``InferenceScheduler._pick`` decided them; removes them from ``pending``."""
    if not pending:
        return [], [], None
    if len(pending) < batch_size:
        ds = [d for d in (deadline(it) for it in pending) if d is not None]
        oldest = min(it.submitted for it in pending)
        if not ds:
            left = max_wait_s - (now - oldest)
        else:
            left = min(max_wait_s - (now - oldest), min(ds) - est(len(pending) + 1) - 0.002 - now)
        if left > 0:
            return [], [], now + left
    order = sorted(pending, key=lambda it: (float("inf") if deadline(it) is None else deadline(it), it.seq))
    batch: list[Item] = []
    dropped: list[Item] = []
    first: float | None = None
    for it in order:
        if len(batch) >= batch_size:
            break
        d = deadline(it)
        if d is not None and it.skippable and d < now + est(1):
            dropped.append(it)
            continue
        if d is not None:
            first = d if first is None else min(first, d)
        if batch and first is not None and first < now + est(len(batch) + 1):
            break
        batch.append(it)
    taken = {id(it) for it in batch} | {id(it) for it in dropped}
    pending[:] = [it for it in pending if id(it) not in taken]
    return batch, dropped, None


def legacy_deadline(j: int, t0: float | None, first_submit: float, est_full: float, fps: float) -> float:
    """main's ``Session.deadline`` for frame ``j`` of an utterance."""
    frame_s = 1.0 / fps
    if t0 is not None:
        return t0 + j * frame_s - 0.25 * frame_s
    return first_submit + est_full + (j + 1) * frame_s
