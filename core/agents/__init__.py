"""The avatar inside voice agents: LiveKit Agents and Pipecat adapters over one live session.

* :mod:`.bridge` — :class:`AgentAvatar`, the framework-free core: TTS audio in per
  segment, interrupt, a paced stream of frames with their audio and segment events;
* :mod:`.livekit` — LiveKit Agents' ``VideoGenerator`` and an ``AvatarSession`` that
  joins the room as the agent's avatar (extra ``[livekit]``);
* :mod:`.pipecat` — a Pipecat frame processor (extra ``[pipecat]``).

The framework modules import their framework when they are imported; this
package and :mod:`.bridge` need neither.
"""

from .bridge import AgentAvatar, AvatarFrame, AvatarOptions, SegmentEnd, SegmentStarted

__all__ = ["AgentAvatar", "AvatarFrame", "AvatarOptions", "SegmentEnd", "SegmentStarted"]
