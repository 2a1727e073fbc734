"""The adapter core without a framework: options, re-timing, the bounded stream, early frames."""

from __future__ import annotations

import asyncio
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from avatar.agents import AgentAvatar, AvatarFrame, AvatarOptions, SegmentEnd
from avatar.agents.bridge import _BridgeSink, _Retimer
from avatar.engine import AvatarService
from avatar.errors import ConfigError
from avatar.interfaces import VideoFrame

from agents_kit import idle_images, is_idle


def _options(kit: dict[str, Path], **kw: Any) -> AvatarOptions:
    return AvatarOptions(kit["pkg"], model=kit["unet"], feature_options={"encoder": str(kit["enc"])}, **kw)


@pytest.mark.parametrize("bad", [{"size": (81, 64)}, {"size": (0, 64)}, {"fps": 0}, {"fps": 500}, {"idle": "none"},
                                 {"pixel_format": "yuv"}, {"queue_s": 0}])
def test_bad_options_are_one_clear_error(tiny_job: dict[str, Path], bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        _options(tiny_job, **bad)


@pytest.mark.parametrize("fps_out", [Fraction(25), Fraction(30), Fraction(24), Fraction(30000, 1001)])
def test_retiming_keeps_every_sample_and_shows_the_picture_of_each_frames_first_sample(fps_out: Fraction) -> None:
    """25 fps source frames (640 samples each, numbered audio) re-cut at another rate lose and shift nothing."""
    rt = _Retimer(16000, fps_out)
    out: list[Any] = []
    for j in range(100):
        audio = np.arange(j * 640, (j + 1) * 640, dtype=np.int64).astype(np.int16)
        out += rt.add_frame(np.full((2, 2, 3), j, np.uint8), audio, j >= 50)
        if j == 74:
            out += rt.add_event(SegmentEnd(1.0, False))
    frames = [f for f in out if isinstance(f, AvatarFrame)]
    got = np.concatenate([f.audio for f in frames])
    assert np.array_equal(got, np.arange(len(got), dtype=np.int64).astype(np.int16))  # continuous, in order
    assert len(got) > 64000 - 16000 / float(fps_out) - 1
    for f in frames:
        first, end = int(round(f.index * 16000 / fps_out)), int(round((f.index + 1) * 16000 / fps_out))
        # the picture holding its first sample; speaking if any of its samples are speech (source frames 50..)
        assert f.image[0, 0, 0] == first // 640 and f.speaking == ((end - 1) // 640 >= 50)
        assert f.pts == pytest.approx(f.index / float(fps_out))
    end = next(i for i, x in enumerate(out) if isinstance(x, SegmentEnd))
    before = [f for f in out[:end] if isinstance(f, AvatarFrame)]
    assert int(round(len(before) * 16000 / fps_out)) >= 75 * 640 > int(round((len(before) - 1) * 16000 / fps_out))


def test_a_frame_before_the_session_is_known_is_dropped(tiny_job: dict[str, Path]) -> None:
    """The session's output may start before open_session returns: that frame must not end it."""
    avatar = AgentAvatar(_options(tiny_job))
    frame = VideoFrame(index=0, pts=Fraction(0), image=np.zeros((128, 160, 3), np.uint8), audio=np.zeros(640, np.float32))
    _BridgeSink(avatar).write(frame)  # before start(): no size yet
    assert not avatar._items


def test_idle_model_renders_idle_frames_through_the_model(tiny_job: dict[str, Path]) -> None:
    async def frames(svc: AvatarService, idle: str) -> list[AvatarFrame]:
        async with AgentAvatar(_options(tiny_job, idle=idle), service=svc) as avatar:
            got: list[AvatarFrame] = []
            async for item in avatar:
                if isinstance(item, AvatarFrame):
                    got.append(item)
                if len(got) >= 40:
                    return got
        return got

    ref = idle_images(tiny_job, (160, 128), "rgb")
    with AvatarService(backend="cpu") as svc:
        own = asyncio.run(frames(svc, "avatar"))
        model = asyncio.run(frames(svc, "model"))
    assert all(is_idle(f.image, ref) and not f.audio.any() and not f.speaking for f in own)
    assert sum(not is_idle(f.image, ref) for f in model) >= 5  # the model's mouth (once its frames are ready)


def test_a_consumer_that_stops_reading_loses_the_oldest_frames_not_the_session(tiny_job: dict[str, Path]) -> None:
    async def run(svc: AvatarService) -> tuple[int, int, list[int], bool]:
        async with AgentAvatar(_options(tiny_job, queue_s=0.2), service=svc) as avatar:
            await asyncio.sleep(1.2)  # nobody reads: about 30 frames arrive, 5 fit
            held = len(avatar._items)
            indices: list[int] = []
            async for item in avatar:
                if isinstance(item, AvatarFrame):
                    indices.append(item.index)
                if len(indices) >= 10:
                    break
            return held, avatar.dropped, indices, avatar.session.alive

    with AvatarService(backend="cpu") as svc:
        held, dropped, indices, alive = asyncio.run(run(svc))
    assert held <= 5 and dropped >= 10 and alive
    assert indices[0] >= 10 and indices == sorted(indices)  # the newest were kept, in order


def test_a_segment_shorter_than_a_frame_still_plays_and_ends(tiny_job: dict[str, Path]) -> None:
    """A TTS reply of a few milliseconds (one short chunk) must still end, or the agent would wait for it forever."""
    async def run(svc: AvatarService) -> list[Any]:
        async with AgentAvatar(_options(tiny_job), service=svc) as avatar:
            avatar.push_audio(np.full(240, 3000, np.int16), 24000)  # 10 ms at 24 kHz
            avatar.end_segment()
            seen: list[Any] = []
            async for item in avatar:
                seen.append(item)
                if isinstance(item, SegmentEnd):
                    return seen
        return seen

    with AvatarService(backend="cpu") as svc:
        seen = asyncio.run(asyncio.wait_for(run(svc), 60))
    assert seen[-1] == SegmentEnd(pytest.approx(0.04), False)
    assert sum(isinstance(f, AvatarFrame) and f.speaking for f in seen) == 1


def test_a_start_cancelled_while_opening_leaves_no_session(tiny_job: dict[str, Path]) -> None:
    """A pipeline cancelled while the avatar loads: the session the loading thread opens is closed, not leaked."""
    import time

    async def run(svc: AvatarService) -> None:
        avatar = AgentAvatar(_options(tiny_job), service=svc)
        task = asyncio.ensure_future(avatar.start())
        await asyncio.sleep(0)  # the opening thread has started
        task.cancel()
        await avatar.aclose()
        with pytest.raises(asyncio.CancelledError):
            await task

    with AvatarService(backend="cpu") as svc:
        asyncio.run(run(svc))  # returns once the opening thread is done (asyncio.run waits for it)
        deadline = time.monotonic() + 30
        while svc.sessions and time.monotonic() < deadline:
            time.sleep(0.05)
        assert svc.sessions == []


def test_a_consumer_behind_catches_up_on_idle_frames_never_on_speech(tiny_job: dict[str, Path]) -> None:
    async def run(svc: AvatarService) -> tuple[list[AvatarFrame], AgentAvatar]:
        async with AgentAvatar(_options(tiny_job, queue_s=4.0), service=svc) as avatar:
            await asyncio.sleep(0.6)  # idle frames pile up unread
            avatar.push_audio(np.full(16000, 3000, np.int16), 16000)  # 1 s
            avatar.end_segment()
            got: list[AvatarFrame] = []
            # the whole reply arrives unread, then idle again (waited for, not slept: a loaded machine renders late)
            while not any(isinstance(i, SegmentEnd) for _, i in list(avatar._items)[:-3]):
                await asyncio.sleep(0.02)
            async for item in avatar:
                if isinstance(item, SegmentEnd):
                    break
                if isinstance(item, AvatarFrame):
                    got.append(item)
            return got, avatar

    with AvatarService(backend="cpu") as svc:
        got, avatar = asyncio.run(run(svc))
    assert avatar.dropped == 0 and avatar.caught_up >= 10
    assert sum(f.speaking for f in got) == 25  # every speech frame, none skipped to catch up
    assert sum(not f.speaking for f in got) <= 5  # the idle backlog before it was skipped


def test_the_position_is_what_the_consumer_took_not_what_the_session_rendered(tiny_job: dict[str, Path]) -> None:
    """A consumer behind the session has not played the frames it holds: an interrupt ends the segment where it is."""
    async def run(svc: AvatarService) -> tuple[float | None, list[Any], AgentAvatar]:
        async with AgentAvatar(_options(tiny_job, queue_s=4.0), service=svc) as avatar:
            avatar.push_audio(np.full(48000, 3000, np.int16), 16000)  # 3 s
            avatar.end_segment()
            while sum(isinstance(i, AvatarFrame) and i.speaking for _, i in avatar._items) < 40:  # 1.6 s unread
                await asyncio.sleep(0.02)
            taken = 0
            async for item in avatar:
                taken += isinstance(item, AvatarFrame) and item.speaking
                if taken == 10:  # 0.4 s played
                    break
            shown = avatar.interrupt()
            rest: list[Any] = []
            async for item in avatar:
                rest.append(item)
                if isinstance(item, SegmentEnd):
                    return shown, rest, avatar
        return shown, rest, avatar

    with AvatarService(backend="cpu") as svc:
        shown, rest, avatar = asyncio.run(asyncio.wait_for(run(svc), 60))
    assert avatar.dropped == 0
    assert shown == pytest.approx(0.4) and rest[-1] == SegmentEnd(pytest.approx(0.4), True)
    assert not any(isinstance(f, AvatarFrame) and (f.speaking or f.audio.any()) for f in rest)  # the backlog muted
