"""The Pipecat adapter in a real pipeline, run in process.

``AvatarVideoService -> sink`` run by Pipecat's own ``PipelineWorker``
and ``WorkerRunner`` (``PipelineTask`` / ``PipelineRunner`` before 1.3): the
test queues TTS frames (the worker's own source pushes them) (``TTSStartedFrame``, 20 ms ``TTSAudioRawFrame`` s at
24 kHz, ``TTSStoppedFrame``) and an ``InterruptionFrame`` into the worker, the
sink keeps every frame that comes out.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("pipecat")

from pipecat.frames.frames import (  # noqa: E402
    EndFrame,
    Frame,
    InterruptionFrame,
    OutputImageRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineWorker  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402

from avatar.agents.pipecat import AvatarVideoService  # noqa: E402
from avatar.engine import AvatarService  # noqa: E402

from agents_kit import idle_images, is_idle, lag_samples, speech  # noqa: E402

TTS_RATE = 24000


class _Sink(FrameProcessor):
    """Keeps what reaches the end of the pipeline, with the time it came."""

    def __init__(self) -> None:
        super().__init__()
        self.got: list[tuple[float, Frame]] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            self.got.append((time.monotonic(), frame))
        await self.push_frame(frame, direction)


def _tts(pcm: np.ndarray) -> list[Frame]:
    step = TTS_RATE // 50
    chunks = [TTSAudioRawFrame(audio=pcm[i:i + step].tobytes(), sample_rate=TTS_RATE, num_channels=1)
              for i in range(0, len(pcm), step)]
    return [TTSStartedFrame(), *chunks, TTSStoppedFrame()]


def _images(got: list[tuple[float, Frame]]) -> list[int]:
    return [i for i, (_, f) in enumerate(got) if isinstance(f, OutputImageRawFrame)]


async def _wait(cond: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("the pipeline did not get there")
        await asyncio.sleep(0.01)


def _avatar(kit: dict[str, Path], service: AvatarService, **kw: Any) -> AvatarVideoService:
    return AvatarVideoService(kit["pkg"], model=kit["unet"], feature_options={"encoder": str(kit["enc"])},
                              service=service, **kw)


async def _conversation(avatar: AvatarVideoService, sink: _Sink, events: list[tuple[str, Any]]) -> int:
    """Idle, one whole reply, idle, a reply cut off after ~0.6 s; returns where the interruption went in."""
    worker = PipelineWorker(Pipeline([avatar, sink]), enable_rtvi=False, idle_timeout_secs=None)

    @avatar.event_handler("on_avatar_started_speaking")
    async def _started(proc: Any, latency_s: float) -> None:
        events.append(("started", latency_s))

    @avatar.event_handler("on_avatar_stopped_speaking")
    async def _stopped(proc: Any, position_s: float, interrupted: bool) -> None:
        events.append(("stopped", (position_s, interrupted)))

    async def drive() -> int:
        await _wait(lambda: len(_images(sink.got)) >= 5)  # idle before
        await worker.queue_frames(_tts(speech(1.2, TTS_RATE)))
        await _wait(lambda: any(e[0] == "stopped" for e in events))
        await asyncio.sleep(0.3)
        await worker.queue_frames(_tts(speech(3.0, TTS_RATE, seed=5)))
        await _wait(lambda: sum(isinstance(f, TTSAudioRawFrame) for _, f in sink.got) >= 30 + 15)
        cut = len(sink.got)
        await worker.queue_frame(InterruptionFrame())
        await _wait(lambda: len(_images(sink.got[cut:])) >= 15)
        await worker.queue_frame(EndFrame())
        return cut

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    cut, _ = await asyncio.gather(drive(), runner.run())
    return cut


@pytest.fixture(scope="module")
def run(tiny_job: dict[str, Path]) -> dict[str, Any]:
    events: list[tuple[str, Any]] = []
    sink = _Sink()
    with AvatarService(backend="cpu") as svc:
        avatar = _avatar(tiny_job, svc)
        cut = asyncio.run(_conversation(avatar, sink, events))
    return {"got": sink.got, "cut": cut, "events": events}


def test_images_at_the_avatars_fps_each_followed_by_its_audio(run: dict[str, Any]) -> None:
    got = [f for _, f in run["got"]]
    images = _images(run["got"])
    audio = [i for i, f in enumerate(got) if isinstance(f, TTSAudioRawFrame)]
    assert all(isinstance(got[i - 1], OutputImageRawFrame) for i in audio)  # a picture, then the audio shown with it
    assert {got[i].num_frames for i in audio} == {640} and {got[i].sample_rate for i in audio} == {16000}
    assert all(got[i].size == (160, 128) and got[i].format == "RGB" and got[i].sync_with_audio for i in images)
    # 25 pictures a second of speech: the first reply (1.2 s) is 30 pictures, each with 1/25 s of audio
    start, stop = (next(i for i, f in enumerate(got) if isinstance(f, t)) for t in (TTSStartedFrame, TTSStoppedFrame))
    assert sum(isinstance(f, OutputImageRawFrame) for f in got[start:stop]) == 30


def test_the_first_reply_plays_whole_and_in_sync(run: dict[str, Any], tiny_job: dict[str, Path]) -> None:
    got = [f for _, f in run["got"]]
    starts = [i for i, f in enumerate(got) if isinstance(f, TTSStartedFrame)]
    stops = [i for i, f in enumerate(got) if isinstance(f, TTSStoppedFrame)]
    assert len(starts) == 2 and len(stops) == 1  # the cut-off reply has no TTSStoppedFrame: the interruption ends it
    first = [f for f in got[starts[0]:stops[0]] if isinstance(f, TTSAudioRawFrame)]
    assert len(first) == 30  # 1.2 s at 25 fps
    sent, out = speech(1.2, 16000), np.concatenate([np.frombuffer(f.audio, np.int16) for f in first])
    assert abs(lag_samples(sent, out)) <= 16
    idle = idle_images(tiny_job, (160, 128), "rgb")
    pictures = {i: np.frombuffer(f.image, np.uint8).reshape(128, 160, 3)
                for i, f in enumerate(got) if isinstance(f, OutputImageRawFrame)}
    speaking = {i - 1 for i, f in enumerate(got) if isinstance(f, TTSAudioRawFrame)}
    assert all(is_idle(p, idle) for i, p in pictures.items() if i not in speaking)
    assert sum(not is_idle(pictures[i], idle) for i in speaking) >= 0.9 * len(speaking)
    assert run["events"][0][0] == "started" and run["events"][1] == ("stopped", (pytest.approx(1.2, abs=0.08), False))


def test_an_interruption_is_idle_within_two_frames(run: dict[str, Any], tiny_job: dict[str, Path]) -> None:
    got = [f for _, f in run["got"]]
    cut = run["cut"]
    at = next(i for i in range(cut, len(got)) if isinstance(got[i], InterruptionFrame))
    after = [i for i in range(at, len(got)) if isinstance(got[i], OutputImageRawFrame)]
    idle = idle_images(tiny_job, (160, 128), "rgb")
    assert all(is_idle(np.frombuffer(got[i].image, np.uint8).reshape(128, 160, 3), idle) for i in after[2:])
    assert not any(isinstance(f, (TTSAudioRawFrame, TTSStoppedFrame)) for f in got[after[2]:])
    kind, (position, interrupted) = run["events"][-1]
    second = sum(isinstance(f, TTSAudioRawFrame) for f in got[:at]) - 30
    assert kind == "stopped" and interrupted and 0.5 <= position < 3.0
    assert position == pytest.approx(second / 25, abs=2 / 25)


def test_two_pipelines_on_one_service_batch_together(tiny_job: dict[str, Path]) -> None:
    async def both(svc: AvatarService) -> None:
        sinks = [_Sink(), _Sink()]
        avatars = [_avatar(tiny_job, svc) for _ in sinks]
        workers = [PipelineWorker(Pipeline([a, s]), enable_rtvi=False, idle_timeout_secs=None)
                   for a, s in zip(avatars, sinks)]

        async def drive(worker: PipelineWorker, sink: _Sink) -> None:
            await _wait(lambda: len(_images(sink.got)) >= 3)
            await worker.queue_frames(_tts(speech(2.0, TTS_RATE, seed=7)))
            await _wait(lambda: any(isinstance(f, TTSStoppedFrame) for _, f in sink.got))
            await worker.queue_frame(EndFrame())

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(*workers)
        await asyncio.gather(*(drive(w, s) for w, s in zip(workers, sinks)), runner.run())

    with AvatarService(backend="cpu", max_wait_s=0.02) as svc:
        asyncio.run(both(svc))
        (stats,) = svc.stats()["backends"].values()
    assert stats["shared_calls"] > 0 and stats["mean_batch"] > 1, stats
