"""LiveKit Agents: this SDK's avatar as the agent's avatar worker (extra ``[livekit]``).

Two pieces, shaped like the framework's own avatar plugins:

* :class:`AvatarVideoGenerator` — LiveKit's ``VideoGenerator`` over an
  :class:`~avatar.agents.AgentAvatar`: ``push_audio`` takes the agent's
  ``rtc.AudioFrame`` s and ``AudioSegmentEnd``, ``clear_buffer`` is the
  interrupt, and iterating it yields ``rtc.VideoFrame`` (every frame, at the
  avatar's fps), ``rtc.AudioFrame`` (the speech shown with that picture) and
  ``AudioSegmentEnd`` (after a segment's last frame). ``AvatarRunner`` drives
  it: it publishes the tracks through ``rtc.AVSynchronizer`` and answers the
  agent's ``DataStreamAudioOutput`` with playback started/finished.
* :class:`AvatarSession` — starts that for a room: joins it as the avatar
  participant (publishing on behalf of the agent), runs an ``AvatarRunner``
  in this process, and points the agent session's audio output at it.

    avatar = AvatarSession("avatars/anna", service=shared_service)
    await avatar.start(session, room=ctx.room)

The generator also emits ``playback_started`` and ``playback_finished``
(``PlaybackFinished``: the session's own position and whether it was
interrupted) for code that drives it without a runner.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Literal, Mapping

import numpy as np

from ..errors import ConfigError, MissingDependency
from .bridge import AgentAvatar, AvatarFrame, AvatarOptions, SegmentEnd, SegmentStarted

try:
    from livekit import api, rtc
    from livekit.agents import get_job_context
    from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF
    from livekit.agents.voice.avatar import AudioSegmentEnd, AvatarRunner, DataStreamAudioOutput, DataStreamAudioReceiver
    from livekit.agents.voice.avatar import AvatarOptions as RunnerOptions
    from livekit.agents.voice.avatar import AvatarSession as _LKAvatarSession
    from livekit.agents.voice.avatar import VideoGenerator
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise MissingDependency("livekit-agents", "livekit", feature="the LiveKit Agents avatar") from exc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PlaybackFinished:
    """A segment finished playing: seconds shown, and whether ``clear_buffer`` cut it."""

    position_s: float
    interrupted: bool


class AvatarVideoGenerator(VideoGenerator, rtc.EventEmitter[Literal["playback_started", "playback_finished"]]):
    """LiveKit's ``VideoGenerator`` over one avatar session (see the module docstring).

    ``service`` shares one :class:`~avatar.engine.AvatarService` (and so one
    batched backend) among every agent of the process; without it the
    generator opens its own with ``backend``.
    """

    def __init__(self, options: AvatarOptions, *, service: Any = None, backend: str = "auto",
                 name: str | None = None) -> None:
        VideoGenerator.__init__(self)
        rtc.EventEmitter.__init__(self)
        self.avatar = AgentAvatar(options, service=service, backend=backend, name=name)
        self._started_segment = False

    async def start(self) -> "AvatarVideoGenerator":
        """Open the session (loads models in a thread). Call before the runner starts."""
        await self.avatar.start()
        return self

    @property
    def runner_options(self) -> RunnerOptions:
        """What ``AvatarRunner`` needs to publish this generator's tracks."""
        w, h = self.avatar.size
        return RunnerOptions(video_width=w, video_height=h, video_fps=float(self.avatar.fps),
                             audio_sample_rate=self.avatar.sample_rate, audio_channels=1)

    async def push_audio(self, frame: rtc.AudioFrame | AudioSegmentEnd) -> None:
        if isinstance(frame, AudioSegmentEnd):
            self.avatar.end_segment()
            return
        pcm = np.frombuffer(frame.data, np.int16).reshape(-1, frame.num_channels)
        self.avatar.push_audio(pcm, frame.sample_rate)

    def clear_buffer(self) -> None:
        position = self.avatar.interrupt()
        if position is not None:
            self._started_segment = False
            self.emit("playback_finished", PlaybackFinished(position, True))

    def __aiter__(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        return self._frames()

    async def _frames(self) -> AsyncIterator[rtc.VideoFrame | rtc.AudioFrame | AudioSegmentEnd]:
        fmt = rtc.VideoBufferType.RGBA if self.avatar.options.pixel_format == "rgba" else rtc.VideoBufferType.RGB24
        async for item in self.avatar:
            if isinstance(item, AvatarFrame):
                h, w = item.image.shape[:2]
                yield rtc.VideoFrame(w, h, fmt, item.image.tobytes())
                if item.speaking:  # idle frames carry no audio: the runner counts every audio frame as playback
                    if not self._started_segment:
                        self._started_segment = True
                        self.emit("playback_started")
                    yield rtc.AudioFrame(item.audio.tobytes(), item.sample_rate, 1, len(item.audio))
            elif isinstance(item, SegmentEnd) and not item.interrupted:
                self._started_segment = False
                self.emit("playback_finished", PlaybackFinished(item.position_s, False))
                yield AudioSegmentEnd()
            elif isinstance(item, SegmentStarted):
                log.debug("avatar segment: %.3f s latency (%.3f s look-ahead)", item.latency_s, item.inherent_s)

    async def aclose(self) -> None:
        await self.avatar.aclose()


class AvatarSession(_LKAvatarSession):
    """This SDK's avatar in a LiveKit room, for an ``AgentSession`` (as the framework's avatar plugins do).

    :meth:`start` joins the room as ``avatar_identity`` (a token signed with the
    API key and secret, marked as publishing on behalf of the agent), runs the
    avatar worker (an ``AvatarRunner`` over :class:`AvatarVideoGenerator`) in
    this process, and sends the agent's speech to it through the framework's
    ``DataStreamAudioOutput``. Options: ``model``, ``backend``, ``features``
    (and ``feature_options``), output ``size`` and ``fps``; ``service`` shares
    one :class:`~avatar.engine.AvatarService` among the agents of a process.
    """

    def __init__(self, avatar: str | Path | Any, *, model: str | Path | None = None, backend: str = "auto",
                 features: str = "ave", feature_options: Mapping[str, Any] | None = None,
                 size: tuple[int, int] | None = None, fps: float | None = None, idle: str = "avatar",
                 service: Any = None, avatar_identity: str = "avatar-sdk-avatar", avatar_name: str = "avatar") -> None:
        super().__init__()
        self.options = AvatarOptions(avatar, model=model, features=features, feature_options=feature_options,
                                     size=size, fps=fps, idle=idle, pixel_format="rgba")
        self._service = service
        self._backend = backend
        self._identity = avatar_identity
        self._name = avatar_name
        self.generator: AvatarVideoGenerator | None = None
        self.runner: AvatarRunner | None = None
        self.avatar_room: rtc.Room | None = None

    @property
    def avatar_identity(self) -> str:
        return self._identity

    @property
    def provider(self) -> str:
        return "avatar-sdk"

    async def start(self, agent_session: Any, room: rtc.Room, *, livekit_url: str | None = None,
                    livekit_api_key: str | None = None, livekit_api_secret: str | None = None) -> None:
        """Join ``room`` as the avatar and make it the agent session's audio output.

        The URL, key and secret default to ``LIVEKIT_URL``, ``LIVEKIT_API_KEY``
        and ``LIVEKIT_API_SECRET`` (as everywhere in LiveKit Agents). Inside a
        job it may come before ``session.start`` connects the room.
        """
        url = livekit_url or os.environ.get("LIVEKIT_URL")
        key = livekit_api_key or os.environ.get("LIVEKIT_API_KEY")
        secret = livekit_api_secret or os.environ.get("LIVEKIT_API_SECRET")
        if not (url and key and secret):
            raise ConfigError("the avatar joins the room itself: set LIVEKIT_URL, LIVEKIT_API_KEY and "
                              "LIVEKIT_API_SECRET (or pass livekit_url=, livekit_api_key=, livekit_api_secret=)")
        agent_identity, room_name = _agent_in(room)
        await super().start(agent_session, room)
        token = (api.AccessToken(key, secret).with_kind("agent").with_identity(self._identity).with_name(self._name)
                 .with_grants(api.VideoGrants(room_join=True, room=room_name))
                 .with_attributes({ATTRIBUTE_PUBLISH_ON_BEHALF: agent_identity}).to_jwt())
        self.generator = gen = AvatarVideoGenerator(self.options, service=self._service, backend=self._backend,
                                                    name=f"{room.name}/{self._identity}")
        await gen.start()
        try:
            self.avatar_room = rtc.Room()
            await self.avatar_room.connect(url, token)
            receiver = DataStreamAudioReceiver(self.avatar_room, sender_identity=agent_identity)
            self.runner = AvatarRunner(self.avatar_room, audio_recv=receiver, video_gen=gen,
                                       options=gen.runner_options)
            await self.runner.start()
        except BaseException:
            await self._close_worker()
            raise
        # playback starts when the avatar shows the reply's first frame (AvatarRunner says so), after the
        # model's look-ahead: the agent's playback_started and its transcript timing follow the avatar
        agent_session.output.replace_audio_tail(DataStreamAudioOutput(
            room, destination_identity=self._identity, wait_remote_track=rtc.TrackKind.KIND_VIDEO,
            wait_playback_start=True))

    async def aclose(self) -> None:
        await self._close_worker()
        await super().aclose()

    async def _close_worker(self) -> None:
        runner, gen, room = self.runner, self.generator, self.avatar_room
        self.runner = self.generator = self.avatar_room = None
        if runner is not None:
            await runner.aclose()
        if gen is not None:
            await gen.aclose()
        if room is not None:
            await room.disconnect()


def _agent_in(room: rtc.Room) -> tuple[str, str]:
    """The agent's identity and the room's name: from the room once connected, else from the job's token.

    An entrypoint starts the avatar before ``session.start`` connects the room
    (as with the framework's avatar plugins); the job knows both already.
    """
    if room.isconnected():
        return room.local_participant.identity, room.name
    job = get_job_context(required=False)
    if job is None:
        raise ConfigError("the avatar needs the agent's identity: start it inside a job entrypoint, "
                          "or connect the room first")
    return job.local_participant_identity, job.job.room.name


__all__ = ["AvatarSession", "AvatarVideoGenerator", "PlaybackFinished"]
