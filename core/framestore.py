"""Frame video I/O for avatar packages: bounded-memory random access and writing.

:class:`FrameStore` gives random access to the frames of ``frames.mp4`` within a
memory budget; :class:`FrameWriter` writes it. A package stores H.264 yuv420p
(BT.601 limited range, fixed short GOP) or lossless FFV1; the store decodes
other videos too, but yuv420p ones are converted as BT.601.
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from .errors import AvatarPackageError

#: a 720p avatar of 740 frames (I420, 1.32 MiB a frame) fits: each frame is decoded once
DEFAULT_MEMORY_BUDGET_MB = 1024


def _to_bgr(frame: Any) -> np.ndarray:
    # OpenCV's I420 conversion is ~3x cheaper than swscale's; it assumes BT.601
    # limited range, which is how write_package encodes (and tags) frames.mp4.
    if frame.format.name == "yuv420p":
        import cv2

        return cv2.cvtColor(frame.to_ndarray(), cv2.COLOR_YUV2BGR_I420)
    return frame.to_ndarray(format="bgr24")


def _decode_all(path: Path) -> Iterator[np.ndarray]:
    """Every frame of a video in display order, BGR."""
    import av

    try:
        with av.open(str(path)) as c:
            st = c.streams.video[0]
            st.thread_type = "AUTO"
            for fr in c.decode(st):
                yield _to_bgr(fr)
    except av.FFmpegError as exc:
        raise AvatarPackageError(f"cannot decode {path}: {exc}") from None


class FrameStore:
    """Random access to the frames of ``frames.mp4`` within a memory budget.

    Frames are decoded one GOP (keyframe to keyframe) at a time and kept
    **as the decoder gives them**: an H.264 yuv420p GOP stays planar I420
    (1.5 bytes a pixel, half of BGR) and each :meth:`frame` converts to BGR
    (about 0.3 ms at 720p, against about 7 ms to decode it again); other
    pixel formats are kept as BGR. Sessions of one avatar share one store
    (the service opens a package once), so a kept frame is decoded once for
    all of them.

    The cache holds at most ``memory_budget_mb``. When the whole video fits,
    nothing is ever evicted: every frame is decoded once for the life of the
    store. When it does not, the first GOPs decoded are **pinned** (kept for
    good, half the budget) and the rest pass through an LRU of the other half
    (at least two GOPs, so a ping-pong turn never decodes twice). Pinning, not LRU, is what serves a
    looping walk (LRU keeps nothing of a loop longer than the cache) and any
    number of sessions at different walk positions: the pinned share of the
    avatar is never decoded again, whoever walks through it.

    Returned frames are **read-only**: copy before modifying
    (:func:`avatar.vision.composite` returns a copy by default). Safe to call
    from several threads (one lock around decoding).
    """

    def __init__(self, path: str | Path, *, memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise AvatarPackageError(f"frame video {self.path} is missing; re-import the avatar")
        self.memory_budget = int(memory_budget_mb * 1024 * 1024)
        self._lock = threading.Lock()
        self._container: Any = None
        self._index_built = False
        self._pinned: dict[int, np.ndarray] = {}
        self._gops: OrderedDict[int, np.ndarray] = OrderedDict()  # the LRU of unpinned GOPs
        self._i420 = False  # kept as I420 (a yuv420p video), else BGR
        #: number of GOP decodes so far (for tests and benchmarks)
        self.decoded_gops = 0
        #: number of frames decoded so far (a frame of a GOP decoded twice counts twice)
        self.decoded_frames = 0

    # index: every packet's pts in display order, and where GOPs start
    def _build_index(self) -> None:
        import av

        try:
            with av.open(str(self.path)) as c:
                st = c.streams.video[0]
                pts, keys = [], []
                for p in c.demux(st):
                    if p.pts is None:
                        continue
                    pts.append(p.pts)
                    if p.is_keyframe:
                        keys.append(p.pts)
                cc = st.codec_context
                self.width, self.height = cc.width, cc.height
                planar = getattr(cc, "pix_fmt", None) == "yuv420p" and not (self.width % 2 or self.height % 2)
        except (av.FFmpegError, IndexError) as exc:
            raise AvatarPackageError(f"cannot read {self.path}: {exc}; re-import the avatar") from None
        pts.sort()
        self._pts = pts
        self._pts_index = {p: i for i, p in enumerate(pts)}
        starts = sorted({self._pts_index[k] for k in keys} | ({0} if pts else set()))
        self._gop_starts = starts
        #: bytes one kept frame costs (I420 for yuv420p video, BGR otherwise)
        self._i420 = planar
        self.frame_bytes = self.width * self.height * 3 // (2 if planar else 1)
        longest = max((b - a for a, b in zip(starts, starts[1:] + [len(pts)])), default=1)
        self._capacity = max(2, self.memory_budget // max(1, longest * self.frame_bytes))
        if len(pts) * self.frame_bytes <= self.memory_budget:
            self._pin_limit = len(starts)
        else:
            # half for the walkers passing through the rest: each needs its current GOP kept
            # while the others decode theirs (an LRU smaller than the walkers thrashes)
            self._pin_limit = max(0, self._capacity - max(2, self._capacity // 2))
        self.frame_decodes = np.zeros(len(pts), np.int32)
        self._index_built = True

    def _ensure_index(self) -> None:
        if not self._index_built:
            self._build_index()

    def __len__(self) -> int:
        self._ensure_index()
        return len(self._pts)

    @property
    def capacity(self) -> int:
        """How many decoded GOPs the cache holds (at least 2), pinned and passing together."""
        self._ensure_index()
        return self._capacity

    @property
    def pinned_capacity(self) -> int:
        """How many of them are kept for good (all of them when the video fits)."""
        self._ensure_index()
        return self._pin_limit

    @property
    def gop_count(self) -> int:
        self._ensure_index()
        return len(self._gop_starts)

    @property
    def fits_in_budget(self) -> bool:
        """Whether the whole decoded video fits the memory budget (decode once, keep)."""
        self._ensure_index()
        return len(self._pts) * self.frame_bytes <= self.memory_budget

    @property
    def cached_bytes(self) -> int:
        """Bytes of decoded frames held now (what the store costs in memory)."""
        with self._lock:
            return sum(a.nbytes for a in self._pinned.values()) + sum(a.nbytes for a in self._gops.values())

    def frame(self, i: int, *, writable: bool = False) -> np.ndarray:
        """Frame ``i`` as BGR uint8 ``[H, W, 3]``: read-only, or with ``writable`` a new array the caller owns.

        An I420 store converts every call into new memory, so ``writable``
        costs nothing there (a caller that would copy the frame to paste into
        it saves that copy); a store of BGR frames copies the kept frame.
        """
        self._ensure_index()
        n = len(self._pts)
        if not 0 <= i < n:
            raise IndexError(f"frame {i} out of range for an avatar of {n} frames")
        g = bisect.bisect_right(self._gop_starts, i) - 1
        with self._lock:
            gop = self._pinned.get(g)
            if gop is None:
                gop = self._gops.get(g)
                if gop is None:
                    gop = self._decode_gop(g)
                    if len(self._pinned) < self._pin_limit:
                        self._pinned[g] = gop
                    else:
                        self._gops[g] = gop
                        while len(self._gops) > self._capacity - len(self._pinned):
                            self._gops.popitem(last=False)
                else:
                    self._gops.move_to_end(g)
        kept = gop[i - self._gop_starts[g]]
        if not self._i420:
            return kept.copy() if writable else kept
        import cv2

        out = cv2.cvtColor(kept, cv2.COLOR_YUV2BGR_I420)
        if not writable:
            out.setflags(write=False)
        return out

    def frames(self, indices: Iterable[int]) -> Iterator[np.ndarray]:
        """Frames for ``indices`` in order (each read-only)."""
        for i in indices:
            yield self.frame(int(i))

    def preload(self) -> int:
        """Decode every GOP the store will keep for good (all of them when the video fits); returns how many.

        A live service calls it at start, beside the model's warm-up, so the first
        pass of every session's walk costs no decode either.
        """
        self._ensure_index()
        done = 0
        for g in range(len(self._gop_starts)):
            with self._lock:
                if g in self._pinned:
                    continue
                if len(self._pinned) >= self._pin_limit:
                    break
                self._pinned[g] = self._gops.pop(g, None)
                if self._pinned[g] is None:
                    self._pinned[g] = self._decode_gop(g)
                done += 1
        return done

    def _decode_gop(self, g: int) -> np.ndarray:
        import av

        start = self._gop_starts[g]
        end = self._gop_starts[g + 1] if g + 1 < len(self._gop_starts) else len(self._pts)
        if self._container is None:
            self._container = av.open(str(self.path))
            self._container.streams.video[0].thread_type = "AUTO"
        c = self._container
        st = c.streams.video[0]
        out: np.ndarray | None = None
        got = np.zeros(end - start, bool)
        try:
            c.seek(self._pts[start], stream=st, backward=True, any_frame=False)
            for fr in c.decode(st):
                idx = self._pts_index.get(fr.pts, -1)
                if idx >= end:
                    break
                if idx >= start:
                    if self._i420 and fr.format.name != "yuv420p":  # never for a package's own video
                        raise AvatarPackageError(f"{self.path}: frame {idx} is {fr.format.name}, the stream yuv420p")
                    pixels = fr.to_ndarray() if self._i420 else _to_bgr(fr)
                    if out is None:
                        out = np.empty((end - start, *pixels.shape), np.uint8)
                    out[idx - start] = pixels
                    got[idx - start] = True
                    if got.all():
                        break
        except av.FFmpegError as exc:
            raise AvatarPackageError(f"cannot decode {self.path} near frame {start}: {exc}") from None
        if out is None or not got.all():
            missing = start + int(np.flatnonzero(~got)[0])
            raise AvatarPackageError(f"{self.path}: frame {missing} could not be decoded; re-import the avatar")
        out.setflags(write=False)
        self.decoded_gops += 1
        self.decoded_frames += end - start
        self.frame_decodes[start:end] += 1
        return out

    def close(self) -> None:
        with self._lock:
            if self._container is not None:
                self._container.close()
                self._container = None
            self._gops.clear()
            self._pinned.clear()


#: frame codecs a package can store its background frames in: (file name, lossless)
FRAME_CODECS: dict[str, tuple[str, bool]] = {"h264": ("frames.mp4", False), "ffv1": ("frames.mkv", True)}


class FrameWriter:
    """BGR frames → the package's frame video.

    ``h264``: yuv420p (BT.601 limited, tagged) with a fixed GOP, small but
    lossy. ``ffv1``: FFV1 (intra-only, every frame a keyframe) on ``bgr0``
    pixels in Matroska, lossless: decoding gives back the exact BGR frames, at
    about 9x the size of H.264 at CRF 14 on real frames (sanders, 1280x720:
    181 vs 21 KiB per frame). A failed write (a full disk) is one
    :class:`AvatarPackageError` line.
    """

    def __init__(
        self, path: Path, width: int, height: int, fps: Fraction, *, codec: str = "h264", crf: int, preset: str, gop: int
    ) -> None:
        import av

        if codec not in FRAME_CODECS:
            raise AvatarPackageError(f"unknown frame codec {codec!r}; use one of {', '.join(FRAME_CODECS)}")
        self.codec = codec
        self.path = path
        if codec == "h264" and (width % 2 or height % 2):
            raise AvatarPackageError(
                f"frames are {width}x{height}; H.264 yuv420p needs even sizes — crop or pad the source by one pixel, "
                "or store the frames losslessly (--frames-codec ffv1)"
            )
        try:
            self._c = av.open(str(path), "w")
        except (OSError, av.FFmpegError) as exc:
            raise AvatarPackageError(self._message(exc)) from None
        if codec == "h264":
            params = f"keyint={gop}:min-keyint={gop}:scenecut=0:colormatrix=smpte170m:colorprim=smpte170m:transfer=smpte170m"
            self._s = self._c.add_stream(
                "libx264", rate=fps, options={"crf": str(crf), "preset": preset, "x264-params": params}
            )
            self._s.pix_fmt = "yuv420p"
            self._s.codec_context.gop_size = gop
        else:
            self._s = self._c.add_stream("ffv1", rate=fps, options={"level": "3", "slices": "4", "g": "1"})
            self._s.pix_fmt = "bgr0"
        self._s.width, self._s.height = width, height
        self._n = 0

    def _message(self, exc: Exception) -> str:
        from .partials import no_space_message

        if isinstance(exc, OSError):
            return no_space_message(self.path, exc)
        return f"cannot write {self.path}: {exc}"

    def write(self, bgr: np.ndarray) -> None:
        import av
        import cv2

        if self.codec == "h264":
            vf = av.VideoFrame.from_ndarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV_I420), format="yuv420p")
        else:
            vf = av.VideoFrame.from_ndarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA), format="bgra")
            vf = vf.reformat(format="bgr0")
        vf.pts = self._n
        self._n += 1
        try:
            for p in self._s.encode(vf):
                self._c.mux(p)
        except (OSError, av.FFmpegError) as exc:
            raise AvatarPackageError(self._message(exc)) from None

    def close(self) -> None:
        import av

        try:
            for p in self._s.encode():
                self._c.mux(p)
            self._c.close()
        except (OSError, av.FFmpegError) as exc:
            raise AvatarPackageError(self._message(exc)) from None

    def abort(self) -> None:
        """Close the file without flushing (the caller discards it)."""
        try:
            self._c.close()
        except Exception:  # already broken: nothing more to release
            pass


#: the name of the writer before it could store FFV1
H264Writer = FrameWriter
