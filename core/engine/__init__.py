"""The engine: audio + avatar → frames → sinks.

A session owns one stream's state (audio clock, feature stream, window
assembler, avatar walk, pacing, sinks); shared inference batches the ready
windows of every session on one backend. An offline render is a session whose
audio arrives at once and whose output is not paced.
"""

from .stages import STAGES, RenderInterrupted, RenderOptions, RenderReport, Renderer, StageTimes, _AudioClock

__all__ = ["STAGES", "RenderInterrupted", "RenderOptions", "RenderReport", "Renderer", "StageTimes", "_AudioClock"]
