"""Pipecat: this SDK's avatar as a frame processor (extra ``[pipecat]``).

:class:`AvatarVideoService` sits between the TTS service and the output
transport, like Pipecat's hosted-avatar services::

    Pipeline([transport.input(), stt, user_agg, llm, tts,
              AvatarVideoService("avatars/anna", service=shared),
              transport.output(), assistant_agg])

* It takes the TTS audio (``TTSAudioRawFrame``; a ``TTSStoppedFrame`` ends a
  segment) and holds it back; it emits, at the avatar's fps, an
  ``OutputImageRawFrame`` per frame and, while speaking, the audio shown with
  that picture as ``TTSAudioRawFrame`` (``sync_with_audio`` on the images keeps
  the transport showing each picture with its audio).
* Speaking state: ``TTSStartedFrame`` / ``TTSStoppedFrame`` are re-emitted when
  the avatar really starts and stops speaking (so the transport's bot-speaking
  state follows the avatar, not the TTS), and the event handlers
  ``on_avatar_started_speaking(processor, latency_s)`` and
  ``on_avatar_stopped_speaking(processor, position_s, interrupted)`` fire.
* An ``InterruptionFrame`` is barge-in: the avatar is idle within 2 frames.

Every agent of a process should pass the same ``service`` (an
:class:`~avatar.engine.AvatarService`): their frames batch on one backend.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..engine import SessionClosed
from ..errors import MissingDependency
from .bridge import AgentAvatar, AvatarFrame, AvatarOptions, SegmentEnd, SegmentStarted

try:
    from pipecat.frames.frames import (
        CancelFrame,
        EndFrame,
        Frame,
        InterruptionFrame,
        OutputImageRawFrame,
        StartFrame,
        TTSAudioRawFrame,
        TTSStartedFrame,
        TTSStoppedFrame,
    )
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
except ImportError as exc:  # pragma: no cover - the extra is missing
    raise MissingDependency("pipecat-ai", "pipecat", feature="the Pipecat avatar") from exc

log = logging.getLogger(__name__)


class AvatarVideoService(FrameProcessor):
    """TTS audio in; the avatar's frames with their synchronized audio out (see the module docstring).

    Options: ``model``, ``backend`` (when no ``service`` is shared), ``features``
    and ``feature_options``, output ``size`` (width, height) and ``fps``,
    ``idle`` (``avatar`` or ``model``).
    """

    def __init__(self, avatar: str | Path | Any, *, model: str | Path | None = None, backend: str = "auto",
                 features: str = "ave", feature_options: Mapping[str, Any] | None = None,
                 size: tuple[int, int] | None = None, fps: float | None = None, idle: str = "avatar",
                 service: Any = None, sync_with_audio: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.options = AvatarOptions(avatar, model=model, features=features, feature_options=feature_options,
                                     size=size, fps=fps, idle=idle, pixel_format="rgb")
        self._service = service
        self._backend = backend
        self._sync = sync_with_audio
        self.avatar: AgentAvatar | None = None
        self._pump: asyncio.Task[None] | None = None
        self._register_event_handler("on_avatar_started_speaking")
        self._register_event_handler("on_avatar_stopped_speaking")

    @property
    def speaking(self) -> bool:
        """The avatar is showing speech now."""
        return self.avatar is not None and self.avatar.speaking

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self._start()
            await self.push_frame(frame, direction)
        elif isinstance(frame, TTSAudioRawFrame) and direction == FrameDirection.DOWNSTREAM:
            if self.avatar is not None:
                pcm = np.frombuffer(frame.audio, np.int16).reshape(-1, frame.num_channels)
                try:
                    self.avatar.push_audio(pcm, frame.sample_rate)
                except SessionClosed as exc:  # the avatar's session failed: one fatal error, not one per chunk
                    self.avatar = None
                    await self.push_error(error_msg=f"the avatar has stopped: {exc}", exception=exc, fatal=True)
        elif isinstance(frame, TTSStartedFrame):
            pass  # re-emitted when the avatar starts speaking
        elif isinstance(frame, TTSStoppedFrame):
            if self.avatar is not None:
                self.avatar.end_segment()  # re-emitted after the segment's last frame
        elif isinstance(frame, InterruptionFrame):
            if self.avatar is not None:
                self.avatar.interrupt()
            await self.push_frame(frame, direction)
        elif isinstance(frame, (EndFrame, CancelFrame)):
            await self._stop()
            await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

    async def _start(self) -> None:
        if self.avatar is not None:
            return
        self.avatar = AgentAvatar(self.options, service=self._service, backend=self._backend, name=self.name)
        await self.avatar.start()
        self._pump = self.create_task(self._frames(self.avatar), name=f"{self.name}::frames")

    async def _stop(self) -> None:
        avatar, pump = self.avatar, self._pump
        self.avatar, self._pump = None, None
        if avatar is not None:
            await avatar.aclose()
        if pump is not None:
            await self.cancel_task(pump)

    async def cleanup(self) -> None:
        await super().cleanup()
        await self._stop()

    async def _frames(self, avatar: AgentAvatar) -> None:
        async for item in avatar:
            if isinstance(item, AvatarFrame):
                h, w = item.image.shape[:2]
                image = OutputImageRawFrame(image=item.image.tobytes(), size=(w, h), format="RGB")
                image.sync_with_audio = self._sync
                await self.push_frame(image)
                if item.speaking:
                    await self.push_frame(TTSAudioRawFrame(audio=item.audio.tobytes(), sample_rate=item.sample_rate,
                                                           num_channels=1))
            elif isinstance(item, SegmentStarted):
                await self.push_frame(TTSStartedFrame())
                await self._call_event_handler("on_avatar_started_speaking", item.latency_s)
            elif isinstance(item, SegmentEnd):
                if not item.interrupted:
                    await self.push_frame(TTSStoppedFrame())
                await self._call_event_handler("on_avatar_stopped_speaking", item.position_s, item.interrupted)


__all__ = ["AvatarVideoService"]
