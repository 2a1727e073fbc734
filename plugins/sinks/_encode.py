"""H.264 + AAC encoding into a PyAV container, shared by the file and RTMP sinks.

One clock: video frame ``i`` has pts ``i`` in a ``1/fps`` time base, and audio
samples carry pts in samples at the input rate, derived from the frame's pts on
the audio clock. Both streams therefore start where the first frame's pts is
and cannot drift. PyAV's audio encoder resamples (``av.AudioResampler``
underneath) to the codec's rate, layout and sample format and re-chunks to the
AAC frame size itself, so PCM shares of any length can be fed.

BGR → YUV420 uses OpenCV's ``COLOR_BGR2YUV_I420`` (about 2.8x cheaper than
PyAV's own conversion on the CI CPU). YUV 4:2:0 needs even dimensions: an odd
width or height is padded by replicating the last column/row, so the encoded
video is one pixel larger in that direction (the file reports the padded size).
"""

from __future__ import annotations

import logging
from fractions import Fraction
from typing import Any, Iterable

import numpy as np

from avatar.errors import SinkError

log = logging.getLogger(__name__)


def even_size(width: int, height: int) -> tuple[int, int]:
    """The encoded size: each odd dimension padded up by one pixel."""
    return width + (width & 1), height + (height & 1)


def bgr_to_i420(
    image: np.ndarray, width: int, height: int, *, expected: tuple[int, int] | None = None
) -> np.ndarray:
    """BGR uint8 HxWx3 → planar I420 ``[height*3/2, width]`` for an even (width, height).

    ``width``/``height`` are the encoded (even) size. ``expected`` is the
    stream's own size as requested at open (possibly odd): the image must have
    exactly that size, and is padded to the encoded size by replicating its
    last column/row. Without ``expected``, any image that pads to the encoded
    size (at most one pixel smaller in each direction) is accepted.
    """
    import cv2

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise SinkError(
            f"frames must be BGR uint8 HxWx3, got {image.dtype} {image.shape}; convert with "
            "cv2.cvtColor / np.clip(...).astype(np.uint8) before writing"
        )
    h, w = image.shape[:2]
    want_w, want_h = expected if expected is not None else (width, height)
    fits = (w, h) == (want_w, want_h) if expected is not None else (0 <= width - w <= 1 and 0 <= height - h <= 1)
    if not fits:
        raise SinkError(
            f"frame size {w}x{h} does not match the stream size {want_w}x{want_h} "
            "given to open(); every frame of a stream must have the same size"
        )
    if (w, h) != (width, height):
        image = cv2.copyMakeBorder(image, 0, height - h, 0, width - w, cv2.BORDER_REPLICATE)
    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_BGR2YUV_I420)


class AVEncoder:
    """Adds an H.264 and an AAC stream to an open output container and muxes into it.

    The caller owns the container (``av.open(..., "w")``) and closes it after
    :meth:`flush`. ``video_options`` go to libx264 (``preset``, ``crf``,
    ``tune``, ``bf``, ``g`` ...); ``bit_rate``/``max_rate``/``buf_size`` set a
    bitrate target instead of CRF.
    """

    def __init__(
        self,
        container: Any,
        *,
        width: int,
        height: int,
        fps: Fraction,
        sample_rate: int,
        audio_rate: int = 48000,
        audio_bitrate: int = 128_000,
        audio_layout: str = "mono",
        video_options: dict[str, str] | None = None,
        bit_rate: int | None = None,
        max_rate: int | None = None,
        buf_size: int | None = None,
        gop: int | None = None,
        pix_fmt: str = "yuv420p",
    ) -> None:
        import av

        self.container = container
        self.fps = Fraction(fps)
        self.in_width, self.in_height = int(width), int(height)
        self.width, self.height = even_size(self.in_width, self.in_height)
        self.sample_rate = int(sample_rate)
        vopts = dict(video_options or {})
        # maxrate/bufsize are generic codec options PyAV has no attribute for
        if max_rate:
            vopts["maxrate"] = str(int(max_rate))
        if buf_size:
            vopts["bufsize"] = str(int(buf_size))
        self.video = container.add_stream("libx264", rate=self.fps, options=vopts)
        self.video.width, self.video.height = self.width, self.height
        self.video.pix_fmt = pix_fmt
        self.video.time_base = Fraction(1) / self.fps
        cc = self.video.codec_context
        cc.time_base = Fraction(1) / self.fps
        if bit_rate:
            cc.bit_rate = int(bit_rate)
        if gop:
            cc.gop_size = int(gop)
        self.audio = container.add_stream("aac", rate=int(audio_rate))
        self.audio.layout = audio_layout
        self.audio.bit_rate = int(audio_bitrate)
        self._av = av
        self._next_sample: int | None = None  # next audio pts, in input samples
        self.video_frames = 0
        self.audio_samples = 0

    # ------------------------------------------------------------------ encode

    def _mux(self, packets: Iterable[Any]) -> None:
        for p in packets:
            self.container.mux(p)

    def encode_video(self, image: np.ndarray, pts: int) -> None:
        """Encode one BGR frame at ``pts`` (frame index in the 1/fps time base)."""
        yuv = bgr_to_i420(image, self.width, self.height, expected=(self.in_width, self.in_height))
        frame = self._av.VideoFrame.from_ndarray(yuv, format="yuv420p")
        frame.pts = int(pts)
        frame.time_base = self.video.codec_context.time_base
        self._mux(self.video.encode(frame))
        self.video_frames += 1

    def encode_audio(self, pcm: np.ndarray, start: Fraction | None = None) -> None:
        """Encode float32 mono PCM at the input rate.

        ``start`` (seconds on the audio clock) places the first share; later
        shares follow sample-contiguously unless a new ``start`` jumps (after a
        reconnect, the new stream continues at the clock's position).
        """
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if start is not None and self._next_sample is None:
            self._next_sample = int(round(Fraction(start) * self.sample_rate))
        if self._next_sample is None:
            self._next_sample = 0
        if pcm.size == 0:
            return
        frame = self._av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[None, :]), format="flt", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = self._next_sample
        frame.time_base = Fraction(1, self.sample_rate)
        self._next_sample += pcm.size
        self.audio_samples += pcm.size
        self._mux(self.audio.encode(frame))

    def flush(self) -> None:
        """Drain both encoders (delayed packets, the last partial AAC frame)."""
        errors = []
        for stream in (self.video, self.audio):
            try:
                self._mux(stream.encode(None))
            except Exception as exc:  # keep flushing the other stream
                errors.append(exc)
        if errors:
            raise errors[0]

    @property
    def audio_seconds(self) -> float:
        return self.audio_samples / self.sample_rate if self.sample_rate else 0.0
