"""The LiveKit Agents adapter through the framework's own classes.

The generator is driven by LiveKit's ``AvatarRunner`` itself, fed by the
framework's ``QueueAudioOutput`` (the agent side's audio output and the
runner's audio receiver in one), with the real ``rtc.AudioFrame``,
``rtc.VideoFrame`` and ``rtc.AVSynchronizer``. The one thing a room without a
server cannot do, publishing the two tracks, is skipped (``_Runner``); the
end-to-end test at the bottom runs the whole thing against a LiveKit server
when ``LIVEKIT_URL`` (with ``LIVEKIT_API_KEY``/``LIVEKIT_API_SECRET``) is set.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("livekit.agents")

from livekit import rtc  # noqa: E402
from livekit.agents.voice.avatar import AudioSegmentEnd, AvatarRunner, QueueAudioOutput  # noqa: E402

from avatar.agents import AvatarOptions  # noqa: E402
from avatar.agents.livekit import AvatarVideoGenerator, PlaybackFinished  # noqa: E402
from avatar.engine import AvatarService  # noqa: E402

from agents_kit import idle_images, is_idle, lag_samples, speech  # noqa: E402

TTS_RATE = 24000


class _Runner(AvatarRunner):
    """LiveKit's runner; only track publishing (which needs a server) is left out."""

    async def _publish_track(self) -> None:
        self._video_publication = self._audio_publication = True  # type: ignore[assignment]


class _Recording(AvatarVideoGenerator):
    """Notes every item the runner takes from the generator, with the time it took it."""

    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self.seen: list[tuple[float, Any]] = []
        self.finished: list[PlaybackFinished] = []
        self.on("playback_finished", self.finished.append)

    def __aiter__(self):  # type: ignore[no-untyped-def]
        async def gen():  # type: ignore[no-untyped-def]
            async for item in super(_Recording, self).__aiter__():
                self.seen.append((time.monotonic(), item))
                yield item

        return gen()


@pytest.fixture(scope="module")
def service() -> Any:
    with AvatarService(backend="cpu") as svc:
        yield svc


def _options(kit: dict[str, Path], **kw: Any) -> AvatarOptions:
    # queue_s: a loaded test machine can leave the runner a second behind; these tests are not about dropping frames
    return AvatarOptions(kit["pkg"], model=kit["unet"], feature_options={"encoder": str(kit["enc"])},
                         pixel_format="rgba", queue_s=5.0, **kw)


async def _start(kit: dict[str, Path], service: Any, **kw: Any) -> tuple[_Recording, QueueAudioOutput, _Runner]:
    gen = _Recording(_options(kit, **kw), service=service)
    await gen.start()
    out = QueueAudioOutput(sample_rate=TTS_RATE)
    runner = _Runner(rtc.Room(), audio_recv=out, video_gen=gen, options=gen.runner_options)
    await runner.start()
    return gen, out, runner


async def _say(out: QueueAudioOutput, pcm: np.ndarray, *, realtime: bool = False) -> None:
    step = TTS_RATE // 50  # 20 ms frames, as a TTS plugin sends them
    for i in range(0, len(pcm), step):
        chunk = pcm[i:i + step]
        await out.capture_frame(rtc.AudioFrame(chunk.tobytes(), TTS_RATE, 1, len(chunk)))
        if realtime:
            await asyncio.sleep(0.02)


async def _finished(out: QueueAudioOutput, timeout: float = 60.0) -> Any:
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    out.once("playback_finished", lambda ev: fut.done() or fut.set_result(ev))
    return await asyncio.wait_for(fut, timeout)


def _videos(seen: list[tuple[float, Any]]) -> list[tuple[int, rtc.VideoFrame]]:
    return [(i, x) for i, (_, x) in enumerate(seen) if isinstance(x, rtc.VideoFrame)]


def test_segments_play_in_sync_at_the_configured_fps_and_size(tiny_job: dict[str, Path], service: Any) -> None:
    """A segment's frames: 30 fps on the audio clock, every picture followed by its 1/30 s of speech."""
    seconds = 1.2
    pcm = speech(seconds, TTS_RATE)

    async def run() -> tuple[_Recording, Any]:
        gen, out, runner = await _start(tiny_job, service, fps=30, size=(80, 64))
        try:
            await asyncio.sleep(0.3)  # idle first
            finished = asyncio.ensure_future(_finished(out))
            await _say(out, pcm)
            out.flush()  # the segment ends: AudioSegmentEnd to the generator
            ev = await finished
            await asyncio.sleep(0.3)  # idle after
        finally:
            await runner.aclose()
            await gen.aclose()
        return gen, ev

    gen, ev = asyncio.run(run())
    # the framework's playback-finished event, with the runner's position: the whole segment
    assert not ev.interrupted
    assert abs(ev.playback_position - seconds) <= 2 / 30
    assert gen.finished and gen.finished[-1] == PlaybackFinished(pytest.approx(ev.playback_position, abs=2 / 30), False)
    items = [x for _, x in gen.seen]
    videos = _videos(gen.seen)
    assert all((v.width, v.height, v.type) == (80, 64, rtc.VideoBufferType.RGBA) for _, v in videos)
    audio = [(i, a) for i, a in enumerate(items) if isinstance(a, rtc.AudioFrame)]
    # every speech audio frame directly follows its picture and lasts one frame at 30 fps on 16 kHz
    assert audio and all(isinstance(items[i - 1], rtc.VideoFrame) for i, _ in audio)
    assert {a.samples_per_channel for _, a in audio} <= {533, 534}
    assert all(a.sample_rate == 16000 and a.num_channels == 1 for _, a in audio)
    assert abs(sum(a.duration for _, a in audio) - seconds) <= 2 / 30
    # over the whole reply, picture and audio alternate: 30 pictures per second of speech, none without its audio
    span = items[audio[0][0] - 1:audio[-1][0] + 1]
    assert all(isinstance(x, rtc.VideoFrame) for x in span[0::2]) and all(isinstance(x, rtc.AudioFrame) for x in span[1::2])
    # the segment end follows the last speech frame; idle frames (no audio) before and after
    end = next(i for i, x in enumerate(items) if isinstance(x, AudioSegmentEnd))
    assert audio[-1][0] < end and all(not isinstance(x, rtc.AudioFrame) for x in items[end:])
    # the speech is what the agent said, not shifted against the pictures (resampling delay aside)
    got = np.concatenate([np.frombuffer(a.data, np.int16) for _, a in audio])
    lead = len(got) - len(np.trim_zeros(got, "f"))  # the first speaking frame may begin before the speech does
    assert lead < 534 and abs(lag_samples(speech(seconds, 16000), got[lead:])) <= 16  # 1 ms
    # speech pictures are the model's, idle ones the avatar's own frames
    idle = idle_images(tiny_job, (80, 64), "rgba")
    frames = [np.frombuffer(v.data, np.uint8).reshape(64, 80, 4) for _, v in videos]
    speaking = {i - 1 for i, _ in audio}
    assert all(is_idle(f, idle) for (i, _), f in zip(videos, frames) if i not in speaking)
    assert sum(not is_idle(f, idle) for (i, _), f in zip(videos, frames) if i in speaking) >= 0.9 * len(speaking)
    # the runner's synchronizer is set to the configured rate and size (its pacing needs no test here)
    assert gen.runner_options.video_fps == 30 and (gen.runner_options.video_width, gen.runner_options.video_height) == (80, 64)


def test_clear_buffer_mid_utterance_goes_idle_within_two_frames(tiny_job: dict[str, Path], service: Any) -> None:
    pcm = speech(3.0, TTS_RATE, seed=5)

    async def run() -> tuple[_Recording, Any, int]:
        gen, out, runner = await _start(tiny_job, service)
        try:
            finished = asyncio.ensure_future(_finished(out))
            await _say(out, pcm)
            out.flush()
            while not any(isinstance(x, rtc.AudioFrame) for _, x in gen.seen[-10:]) or \
                    sum(isinstance(x, rtc.AudioFrame) for _, x in gen.seen) < 15:
                await asyncio.sleep(0.01)
            cut = len(gen.seen)
            out.clear_buffer()  # barge-in: the framework's clear_buffer reaches the runner, then the generator
            ev = await finished
            await asyncio.sleep(0.6)
        finally:
            await runner.aclose()
            await gen.aclose()
        return gen, ev, cut

    gen, ev, cut = asyncio.run(run())
    assert ev.interrupted
    shown = sum(a.duration for _, a in gen.seen if isinstance(a, rtc.AudioFrame))
    assert 0.5 <= ev.playback_position <= 2.0 and ev.playback_position == pytest.approx(shown, abs=0.05)
    assert gen.finished[-1].interrupted and gen.finished[-1].position_s == pytest.approx(shown, abs=2 / 25)
    after = _videos(gen.seen[cut:])
    assert len(after) >= 10
    idle = idle_images(tiny_job, gen.avatar.size, "rgba")
    w, h = gen.avatar.size
    pictures = [np.frombuffer(v.data, np.uint8).reshape(h, w, 4) for _, v in after]
    assert all(is_idle(p, idle) for p in pictures[2:])  # idle within 2 frames, for the rest of the run
    later = [x for _, x in gen.seen[cut:]][after[2][0]:]
    assert not any(isinstance(x, (rtc.AudioFrame, AudioSegmentEnd)) for x in later)


def test_two_agents_on_one_service_batch_together(tiny_job: dict[str, Path]) -> None:
    pcm = speech(2.0, TTS_RATE, seed=7)

    async def run(svc: AvatarService) -> None:
        agents = [await _start(tiny_job, svc) for _ in range(2)]
        try:
            waits = [asyncio.ensure_future(_finished(out)) for _, out, _ in agents]
            await asyncio.gather(*(_say(out, pcm, realtime=True) for _, out, _ in agents))
            for _, out, _ in agents:
                out.flush()
            evs = await asyncio.gather(*waits)
            assert not any(ev.interrupted for ev in evs)
        finally:
            for gen, _, runner in agents:
                await runner.aclose()
                await gen.aclose()

    with AvatarService(backend="cpu", max_wait_s=0.02) as svc:
        asyncio.run(run(svc))
        (stats,) = svc.stats()["backends"].values()
    assert stats["shared_calls"] > 0 and stats["mean_batch"] > 1, stats


def test_avatar_session_without_server_settings_is_one_clear_error(tiny_job: dict[str, Path],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from livekit.agents import AgentSession

    from avatar.agents.livekit import AvatarSession
    from avatar.errors import ConfigError

    for k in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"):
        monkeypatch.delenv(k, raising=False)
    avatar = AvatarSession(tiny_job["pkg"], model=tiny_job["unet"], avatar_identity="anna")
    assert avatar.avatar_identity == "anna" and avatar.provider == "avatar-sdk"

    async def start() -> None:
        await avatar.start(AgentSession(), room=rtc.Room())

    with pytest.raises(ConfigError, match="LIVEKIT_URL"):
        asyncio.run(start())
    assert avatar.generator is None  # nothing was opened
    # outside a job, with the room not connected yet, nothing tells the agent's identity
    for k in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"):
        monkeypatch.setenv(k, "ws://127.0.0.1:9" if k == "LIVEKIT_URL" else "x")
    with pytest.raises(ConfigError, match="job entrypoint"):
        asyncio.run(start())
    assert avatar.generator is None


def test_avatar_session_joins_on_behalf_of_the_agent_before_the_room_is_connected(
        tiny_job: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """In a job entrypoint, before ``session.start`` connects the room (the documented order), as LiveKit runs it.

    A local HTTP server stands in for LiveKit's signalling endpoint: it keeps
    the token the avatar's own room presents and refuses it. The token is the
    avatar's: its identity, the job's room, publishing on behalf of the agent.
    """
    from aiohttp import web
    from livekit import api
    from livekit.agents import AgentSession
    from livekit.agents.job import (
        JobAcceptArguments,
        JobContext,
        JobExecutorType,
        JobProcess,
        RunningJobInfo,
        _JobContextVar,
    )
    from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF
    from livekit.protocol import agent, models

    from avatar.agents.livekit import AvatarSession

    key, secret = "devkey", "a-secret-of-at-least-32-characters!"
    presented: list[str] = []

    async def signalling(request: web.Request) -> web.Response:
        presented.append(request.headers.get("Authorization", "").removeprefix("Bearer "))
        return web.json_response({"error": "refused by the test"}, status=401)

    async def run(svc: AvatarService) -> AvatarSession:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", signalling)
        server = web.AppRunner(app)
        await server.setup()
        site = web.TCPSite(server, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        job_token = (api.AccessToken(key, secret).with_kind("agent").with_identity("agent-7")
                     .with_grants(api.VideoGrants(room_join=True, room="room-7")).to_jwt())
        info = RunningJobInfo(accept_arguments=JobAcceptArguments(name="", identity="agent-7", metadata=""),
                              job=agent.Job(id="job-7", room=models.Room(name="room-7")),
                              url=f"ws://127.0.0.1:{port}", token=job_token, worker_id="w", fake_job=True)
        ctx = JobContext(proc=JobProcess(executor_type=JobExecutorType.THREAD, user_arguments=None, http_proxy=None),
                         info=info, room=rtc.Room(), on_connect=lambda: None, on_shutdown=lambda _: None,
                         inference_executor=None)  # type: ignore[arg-type]
        _JobContextVar.set(ctx)
        avatar = AvatarSession(tiny_job["pkg"], model=tiny_job["unet"], service=svc,
                               feature_options={"encoder": str(tiny_job["enc"])}, avatar_identity="anna")
        try:
            with pytest.raises(rtc.ConnectError):
                await avatar.start(AgentSession(), room=ctx.room, livekit_url=f"ws://127.0.0.1:{port}",
                                   livekit_api_key=key, livekit_api_secret=secret)
        finally:
            await avatar.aclose()
            await server.cleanup()
        return avatar

    with AvatarService(backend="cpu") as svc:
        avatar = asyncio.run(run(svc))
        assert avatar.generator is None and svc.sessions == []  # the worker that could not join is closed
    assert presented
    claims = api.TokenVerifier(key, secret).verify(presented[0])
    assert (claims.identity, claims.kind, claims.video.room, claims.video.room_join) == ("anna", "agent", "room-7", True)
    assert claims.attributes == {ATTRIBUTE_PUBLISH_ON_BEHALF: "agent-7"}


@pytest.mark.skipif(not all(os.environ.get(k) for k in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET")),
                    reason="needs a LiveKit server: set LIVEKIT_URL, LIVEKIT_API_KEY and LIVEKIT_API_SECRET")
def test_end_to_end_in_a_livekit_room(tiny_job: dict[str, Path]) -> None:
    """The avatar joins a real room for an AgentSession; a viewer receives its video and the agent its playout."""
    from livekit import api
    from livekit.agents import AgentSession

    from avatar.agents.livekit import AvatarSession

    url, key, secret = (os.environ[k] for k in ("LIVEKIT_URL", "LIVEKIT_API_KEY", "LIVEKIT_API_SECRET"))
    room_name = f"avatar-sdk-test-{os.getpid()}"

    def token(identity: str) -> str:
        return api.AccessToken(key, secret).with_identity(identity).with_grants(
            api.VideoGrants(room_join=True, room=room_name)).to_jwt()

    async def run() -> tuple[int, Any, list[Any]]:
        agent_room, viewer = rtc.Room(), rtc.Room()
        await agent_room.connect(url, token("agent"))
        await viewer.connect(url, token("viewer"))
        session = AgentSession()
        avatar = AvatarSession(tiny_job["pkg"], model=tiny_job["unet"], backend="cpu",
                               feature_options={"encoder": str(tiny_job["enc"])})
        frames = 0
        started: list[Any] = []
        try:
            await avatar.start(session, room=agent_room)
            await avatar.wait_for_join(timeout=30)
            track = await _remote_video(viewer, avatar.avatar_identity)
            stream = rtc.VideoStream(track)
            output = session.output.audio
            output.on("playback_started", started.append)  # type: ignore[union-attr]  # the avatar's RPC
            await _say(output, speech(1.0, TTS_RATE))  # type: ignore[arg-type]
            output.flush()
            ev = await asyncio.wait_for(output.wait_for_playout(), 30)
            async for _ in stream:
                frames += 1
                if frames >= 25:
                    break
            await stream.aclose()
        finally:
            await avatar.aclose()
            await viewer.disconnect()
            await agent_room.disconnect()
        return frames, ev, started

    frames, ev, started = asyncio.run(run())
    assert len(started) == 1  # from the avatar worker, when it showed the reply's first frame
    assert frames >= 25 and not ev.interrupted and ev.playback_position == pytest.approx(1.0, abs=0.1)


async def _remote_video(room: rtc.Room, identity: str, timeout: float = 30.0) -> rtc.RemoteVideoTrack:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = room.remote_participants.get(identity)
        for pub in (p.track_publications.values() if p else []):
            if pub.kind == rtc.TrackKind.KIND_VIDEO and pub.track is not None:
                return pub.track  # type: ignore[return-value]
        await asyncio.sleep(0.1)
    raise TimeoutError(f"no video track from {identity}")
