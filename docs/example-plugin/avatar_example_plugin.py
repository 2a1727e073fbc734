"""An example third-party plugin for avatar-sdk.

It registers one sink, ``frame-stats``, which writes one JSON line per frame
(index, pts, mean colour of the frame and of the mouth box, audio RMS) — handy
for checking a render without encoding video.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

import numpy as np

from avatar import ConfigError, Sink, SinkReport, StreamInfo, VideoFrame, hookimpl


class FrameStatsSink(Sink):
    name = "frame-stats"
    description = "JSON lines of per-frame statistics (example plugin)"
    wants_face = True  # ask the engine for the face box

    def __init__(self, path: str | None = None, **options: Any) -> None:
        super().__init__(**options)
        if not path:
            raise ConfigError("the frame-stats sink needs a path option (e.g. --sink-opt path=stats.jsonl)")
        self.path = Path(path)
        self._fh: IO[str] | None = None
        self._frames = 0

    def open(self, info: StreamInfo) -> None:
        self._fh = self.path.open("w")
        self._fh.write(json.dumps({"width": info.width, "height": info.height, "fps": float(info.fps)}) + "\n")

    def write(self, frame: VideoFrame) -> None:
        x1, y1, x2, y2 = frame.box or (0, 0, frame.image.shape[1], frame.image.shape[0])
        mouth = frame.image[max(y1, 0) : max(y2, 0), max(x1, 0) : max(x2, 0)]
        rec = {
            "index": frame.index,
            "pts": float(frame.pts),
            "mean": float(frame.image.mean()),
            "box_mean": float(mouth.mean()) if mouth.size else None,
            "audio_rms": float(np.sqrt(np.mean(frame.audio.astype(np.float64) ** 2))) if len(frame.audio) else 0.0,
        }
        assert self._fh is not None
        self._fh.write(json.dumps(rec) + "\n")
        self._frames += 1

    def close(self, aborted: bool = False) -> SinkReport:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        return SinkReport(frames=self._frames)


@hookimpl
def register_sinks(register):  # type: ignore[no-untyped-def]
    register(FrameStatsSink)
