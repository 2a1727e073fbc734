"""The ``rtmp`` sink: a live FLV stream over RTMP, paced on the audio clock.

Design (see docs/sinks.md for the user view):

* **One clock.** Frame ``f`` leaves at ``start + f.pts`` (``start`` fixed by
  the first frame). An early frame makes :meth:`RtmpSink.write` wait, which is
  the engine's backpressure. A late frame is handled by ``on_lag``: ``drop``
  sends only its audio when it is more than ``max_lag_s`` late (audio is never
  dropped, so sound stays continuous); ``stall`` sends it anyway and lets the
  clock slip by the lag (counted in ``stalled_s``).
* **Network in a separate process** (:mod:`._rtmp_worker`). A write into a
  server that stopped reading blocks inside FFmpeg and cannot be interrupted;
  the sink watches acknowledgements and kills a worker that did not confirm a
  frame for ``stall_timeout_s``. Connecting is bounded by ``connect_timeout_s``.
* **Reconnects.** When the connection fails mid-stream, frames keep being paced
  on the same clock but are counted as not delivered (``gap_s``); a new worker
  is started after an exponential backoff, up to ``reconnect`` attempts in a
  row. Its stream starts with a keyframe and its timestamps continue on the
  audio clock. Exhausted attempts raise :class:`StreamError` from ``write``.
* **Secrets.** Only :func:`redact_url` forms of the URL appear in messages and
  logs; foreign error texts pass through :func:`scrub`.

Every thread and process this sink starts ends in :meth:`RtmpSink.close`,
which is bounded in time (also with ``aborted=True`` after Ctrl-C).
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from fractions import Fraction
from multiprocessing.connection import Connection
from typing import Any

from avatar.errors import ConfigError, SinkError, StreamError
from avatar.hookspecs import hookimpl
from avatar.interfaces import Sink, SinkReport, StreamInfo, VideoFrame

from ._options import PRESETS, parse_bitrate
from ._pacing import Backoff, LagStats, Pacer
from ._redact import redact_url, scrub, url_from_file

__all__ = ["RtmpSink", "RtmpStats", "redact_url", "scrub"]

log = logging.getLogger(__name__)

ON_LAG = ("drop", "stall")


@dataclass
class RtmpStats:
    """Live counters of an RTMP sink (``sink.stats`` returns a snapshot)."""

    state: str = "new"  # new | connecting | live | reconnecting | failed | closed
    frames_in: int = 0
    frames_sent: int = 0
    frames_acked: int = 0
    video_acked: int = 0
    dropped: int = 0
    gap_frames: int = 0
    gap_s: float = 0.0
    stalled_s: float = 0.0
    reconnects: int = 0
    stalls_detected: int = 0
    reconnect_attempts: int = 0
    last_lag_s: float = 0.0
    drift_s: float = 0.0


class _Worker:
    """One network process plus the thread that feeds it (see :mod:`._rtmp_worker`)."""

    def __init__(self, config: dict[str, Any], queue_frames: int) -> None:
        p2c_r, p2c_w = os.pipe()
        c2p_r, c2p_w = os.pipe()
        self.stderr = tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "avatar_plugins.sinks._rtmp_worker", str(p2c_r), str(c2p_w)],
                pass_fds=(p2c_r, c2p_w),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self.stderr,
                start_new_session=True,  # Ctrl-C goes to the parent, which closes cleanly
            )
        finally:
            # our copies of the child's ends must go, or a dead child never reads as EOF
            os.close(p2c_r)
            os.close(c2p_w)
        self.tx = Connection(p2c_w, readable=False)
        self.rx = Connection(c2p_r, writable=False)
        self.started = time.monotonic()
        self.ready = False
        self.closed_msg: tuple[Any, ...] | None = None
        self.error: str | None = None
        self.broken = False
        #: index → (wall time handed over, carried video), for frames not yet acknowledged
        self.pending: collections.OrderedDict[int, tuple[float, bool]] = collections.OrderedDict()
        self.q: queue.Queue[Any] = queue.Queue(maxsize=max(2, queue_frames))
        self.q.put(config)
        self.thread = threading.Thread(target=self._feed, name="rtmp-feed", daemon=True)
        self.thread.start()

    def _feed(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            try:
                self.tx.send(item)
            except (OSError, ValueError):  # worker died or was killed
                self.broken = True
                return

    def poll(self) -> list[tuple[Any, ...]]:
        """Messages the worker sent so far (never blocks)."""
        out = []
        try:
            while self.rx.poll(0):
                out.append(self.rx.recv())
        except (EOFError, OSError):
            self.broken = True
        return out

    def alive(self) -> bool:
        return self.proc.poll() is None

    def drained(self) -> bool:
        """Nothing more to read: the pipe is at EOF or empty."""
        if self.broken:
            return True
        try:
            return not self.rx.poll(0)
        except (EOFError, OSError):
            return True

    def stderr_tail(self, url: str, n: int = 400) -> str:
        try:
            self.stderr.seek(0)
            text = self.stderr.read().decode(errors="replace").strip()
        except (OSError, ValueError):
            return ""
        return scrub(text[-n:], url)

    def stop(self, timeout: float) -> None:
        """End the process (kill after ``timeout``) and the feeder thread; bounded."""
        deadline = time.monotonic() + max(0.0, timeout)
        try:
            self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            try:
                self.proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:  # pragma: no cover - a kill that does not take
                log.warning("the RTMP worker process %d did not exit after SIGKILL", self.proc.pid)
        # unblock the feeder: the child's end is closed now, so a blocked send fails
        try:
            self.q.put_nowait(None)
        except queue.Full:
            pass
        self.thread.join(timeout=2.0)
        for end in (self.tx, self.rx):
            try:
                end.close()
            except OSError:
                pass
        self.stderr.close()

    def kill(self) -> None:
        self.stop(0.0)


class RtmpSink(Sink):
    """Live H.264 + AAC over RTMP(S), paced in real time, resilient to outages and stalls."""

    name = "rtmp"
    description = "live RTMP/RTMPS stream (FLV, H.264 zerolatency + AAC), paced, reconnecting"
    realtime = True

    def __init__(
        self,
        url: str | None = None,
        *,
        url_file: str | None = None,
        bitrate: int | str = "2M",
        keyint_s: float = 2.0,
        preset: str = "veryfast",
        on_lag: str = "drop",
        max_lag_s: float = 0.5,
        connect_retries: int = 0,
        connect_timeout_s: float = 5.0,
        reconnect: int = 5,
        reconnect_backoff_s: float = 0.5,
        stall_timeout_s: float = 5.0,
        audio_rate: int = 44100,
        audio_bitrate: int | str = "128k",
        audio_layout: str = "stereo",
        **options: Any,
    ) -> None:
        super().__init__(url=url, url_file=url_file, bitrate=bitrate, keyint_s=keyint_s, preset=preset, on_lag=on_lag,
                         max_lag_s=max_lag_s, connect_retries=connect_retries,
                         connect_timeout_s=connect_timeout_s, reconnect=reconnect,
                         reconnect_backoff_s=reconnect_backoff_s, stall_timeout_s=stall_timeout_s,
                         audio_rate=audio_rate, audio_bitrate=audio_bitrate, audio_layout=audio_layout)
        if options:
            raise ConfigError(
                f"unknown option(s) for the rtmp sink: {', '.join(sorted(options))}; see docs/sinks.md"
            )
        if url and url_file:
            raise ConfigError("give the rtmp sink its URL once: url or url_file, not both")
        if url_file:
            url = url_from_file(url_file)
        if not url:
            raise ConfigError("the rtmp sink needs url=rtmp://host/app/streamkey (or url_file=FILE holding it)")
        scheme = str(url).split("://", 1)[0].lower() if "://" in str(url) else ""
        if scheme not in ("rtmp", "rtmps"):
            raise ConfigError(f"url must start with rtmp:// or rtmps://, got {redact_url(str(url))}")
        self.url = str(url)
        self.safe_url = redact_url(self.url)
        self.bitrate = parse_bitrate(bitrate, "bitrate")
        self.audio_bitrate = parse_bitrate(audio_bitrate, "audio_bitrate")
        self.keyint_s = _positive(keyint_s, "keyint_s")
        if preset not in PRESETS:
            raise ConfigError(f"preset must be one of {', '.join(PRESETS)}, not {preset!r}")
        self.preset = preset
        if on_lag not in ON_LAG:
            raise ConfigError(f"on_lag must be 'drop' or 'stall', not {on_lag!r}")
        self.on_lag = on_lag
        self.max_lag_s = _positive(max_lag_s, "max_lag_s", zero=True)
        self.connect_retries = _count(connect_retries, "connect_retries")
        self.connect_timeout_s = _positive(connect_timeout_s, "connect_timeout_s")
        self.reconnect = _count(reconnect, "reconnect")
        self.reconnect_backoff_s = _positive(reconnect_backoff_s, "reconnect_backoff_s", zero=True)
        self.stall_timeout_s = _positive(stall_timeout_s, "stall_timeout_s")
        if _count(audio_rate, "audio_rate") not in (22050, 44100, 48000):
            raise ConfigError(f"audio_rate must be 44100 (the FLV norm), 48000 or 22050, not {audio_rate!r}")
        self.audio_rate = int(audio_rate)
        if audio_layout not in ("mono", "stereo"):
            raise ConfigError(f"audio_layout must be 'mono' or 'stereo', not {audio_layout!r}")
        self.audio_layout = audio_layout

        self._info: StreamInfo | None = None
        self._config: dict[str, Any] = {}
        self._worker: _Worker | None = None
        self._backoff = Backoff(base_s=self.reconnect_backoff_s or 0.0, max_attempts=self.reconnect)
        self._next_attempt: float | None = None
        self._failure: StreamError | None = None
        self._pacer = Pacer()
        self._lags = LagStats()
        self._stats = RtmpStats()
        self._frame_s = 0.04
        self._queue_frames = 12
        self._audio_s_in = 0.0
        self._closed = False
        self._opened = False

    # ------------------------------------------------------------------ public

    @property
    def stats(self) -> RtmpStats:
        """A snapshot of the live counters (safe to read from another thread)."""
        return RtmpStats(**asdict(self._stats))

    def open(self, info: StreamInfo) -> None:
        if info.audio_channels != 1:
            raise SinkError(f"the rtmp sink takes mono audio shares, got {info.audio_channels} channels")
        self._info = info
        fps = Fraction(info.fps)
        self._frame_s = float(1 / fps)
        self._queue_frames = max(2, int(round(float(fps) / 2)))  # half a second of frames
        gop = max(1, int(round(self.keyint_s * float(fps))))
        self._config = {
            "url": self.url,
            "width": info.width,
            "height": info.height,
            "fps": str(fps),
            "sample_rate": info.sample_rate,
            "audio_rate": self.audio_rate,
            "audio_bitrate": self.audio_bitrate,
            "audio_layout": self.audio_layout,
            # a fixed keyframe interval (no scene-cut keyframes): players and
            # segmenting servers can join or cut at a predictable cadence
            "video_options": {"preset": self.preset, "tune": "zerolatency", "bf": "0",
                              "keyint_min": str(gop), "x264-params": "scenecut=0"},
            "bit_rate": self.bitrate,
            "max_rate": self.bitrate,
            "buf_size": self.bitrate,  # a one-second VBV keeps the live bitrate flat
            "gop": gop,
            "format_options": {"flvflags": "no_duration_filesize"},
            # half a second of video in the kernel: enough for RTTs up to ~0.5 s,
            # small enough that a server that stops reading blocks us quickly
            "send_buffer": max(64 * 1024, self.bitrate // 16),
        }
        self._stats.state = "connecting"
        tries = self.connect_retries + 1
        backoff = Backoff(base_s=self.reconnect_backoff_s or 0.0, max_attempts=self.connect_retries)
        last = ""
        for attempt in range(tries):
            worker = _Worker(self._config, self._queue_frames)
            error = self._await_ready(worker)
            if error is None:
                self._worker = worker
                self._stats.state = "live"
                self._opened = True
                log.info("streaming to %s (%dx%d @ %s fps, %d kbit/s, keyframe every %d frames)",
                         self.safe_url, info.width, info.height, fps, self.bitrate // 1000, gop)
                return
            last = error
            if attempt + 1 < tries:
                delay = backoff.next_delay()
                log.warning("cannot connect to %s (%s); retry %d/%d in %.1f s", self.safe_url, error,
                            attempt + 1, self.connect_retries, delay)
                time.sleep(delay)
        self._stats.state = "failed"
        network = last.startswith(("cannot connect", "no answer"))
        hint = (". Check that the RTMP server is running and reachable and that the application name "
                "and stream key are right" + ("" if self.connect_retries else
                                              " (connect_retries=N retries with backoff)")) if network else ""
        raise StreamError(f"cannot publish to {self.safe_url}: {last}{hint}")

    def write(self, frame: VideoFrame) -> None:
        if self._info is None or not self._opened:
            raise SinkError("write() before open(): call open(StreamInfo) first")
        if self._failure is not None:
            raise self._failure
        st = self._stats
        st.frames_in += 1
        self._audio_s_in += len(frame.audio) / self._info.sample_rate
        self._pacer.anchor(frame.pts)
        self._service()
        lag = self._pacer.lag(frame.pts)
        send_video = True
        slipped = 0.0
        if lag > self.max_lag_s:
            if self.on_lag == "stall":
                slipped = lag
                self._pacer.slip(lag)
                st.stalled_s += lag
            else:
                send_video = False
        elif lag < 0:
            self._wait_until(self._pacer.due(frame.pts))
        now = time.monotonic()
        lag = self._pacer.lag(frame.pts, now) + slipped  # how late it was before any slip
        self._lags.add(lag)
        st.last_lag_s = lag
        st.drift_s = self._pacer.drift(frame.pts, now)
        if self._failure is not None:
            raise self._failure
        worker = self._worker
        if worker is None or not worker.ready:
            self._lost(1)
            return
        item = ("frame", frame.index, str(Fraction(frame.pts)), frame.image if send_video else None,
                frame.audio)
        while True:
            try:
                worker.q.put_nowait(item)
                worker.pending[frame.index] = (time.monotonic(), send_video)
                st.frames_sent += 1
                st.dropped += int(not send_video)
                return
            except queue.Full:
                # the worker is behind; wait, watching for a stall (bounded by stall_timeout_s)
                time.sleep(0.005)
                self._service()
                if self._failure is not None:
                    raise self._failure
                if self._worker is not worker:  # it failed meanwhile: this frame is lost
                    self._lost(1)
                    return

    def close(self, aborted: bool = False) -> SinkReport:
        if not self._closed:
            self._closed = True
            worker, self._worker = self._worker, None
            if worker is not None:
                try:
                    self._finish(worker, timeout=2.0 if aborted else max(2.0, self.stall_timeout_s))
                except Exception as exc:  # close never raises: make sure the worker is gone
                    log.warning("closing the stream to %s: %s", self.safe_url, scrub(str(exc), self.url))
                    worker.kill()
            self._stats.state = "closed" if self._failure is None else "failed"
        st = self._stats
        details: dict[str, Any] = {
            "url": self.safe_url,
            "aborted": aborted,
            "frames_in": st.frames_in,
            "frames_sent": st.frames_sent,
            "gap_frames": st.gap_frames,
            "stalls_detected": st.stalls_detected,
            "reconnect_attempts": st.reconnect_attempts,
            "audio_s_in": self._audio_s_in,
            "end_drift_s": st.drift_s,
            "on_lag": self.on_lag,
        }
        details.update(self._lags.summary())
        if self._failure is not None:
            details["error"] = str(self._failure)
        return SinkReport(frames=st.video_acked, dropped=st.dropped, stalled_s=st.stalled_s,
                          reconnects=st.reconnects, gap_s=st.gap_s, details=details)

    # ------------------------------------------------------------------ internals

    def _await_ready(self, worker: _Worker) -> str | None:
        """Wait (bounded by connect_timeout_s) until the worker published; None or an error."""
        deadline = worker.started + self.connect_timeout_s + 2.0  # + interpreter start-up
        while time.monotonic() < deadline:
            for msg in worker.poll():
                if msg[0] == "ready":
                    worker.ready = True
                    return None
                if msg[0] == "error":
                    worker.stop(1.0)
                    return msg[1]
            if not worker.alive() and worker.drained():
                code = worker.proc.returncode
                tail = worker.stderr_tail(self.url)
                worker.stop(0.5)
                return f"the RTMP worker exited with code {code}" + (f": {tail}" if tail else "")
            time.sleep(0.01)
        worker.kill()
        return f"no answer within {self.connect_timeout_s:g} s (connect_timeout_s)"

    def _wait_until(self, deadline: float) -> None:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            time.sleep(min(0.01, remaining))
            self._service()

    def _lost(self, frames: int) -> None:
        self._stats.gap_frames += frames
        self._stats.gap_s += frames * self._frame_s

    def _service(self) -> None:
        """Read acknowledgements, detect failures and stalls, drive reconnects. Never blocks long."""
        now = time.monotonic()
        worker = self._worker
        st = self._stats
        if worker is not None:
            for msg in worker.poll():
                kind = msg[0]
                if kind == "ack":
                    self._ack(worker, msg[1])
                elif kind == "ready":
                    worker.ready = True
                    st.reconnects += 1
                    st.state = "live"
                    self._backoff.reset()
                    log.info("reconnected to %s (reconnect %d)", self.safe_url, st.reconnects)
                elif kind == "error":
                    worker.error = msg[1]
            if worker.error is not None or (not worker.alive() and worker.drained()):
                reason = worker.error or f"the RTMP worker exited with code {worker.proc.returncode}"
                self._drop_worker(worker, reason)
            elif worker.ready and worker.pending and now - next(iter(worker.pending.values()))[0] > self.stall_timeout_s:
                st.stalls_detected += 1
                self._drop_worker(worker, f"the server stopped reading: no frame was confirmed for "
                                          f"{self.stall_timeout_s:g} s (stall_timeout_s)")
            elif not worker.ready and now - worker.started > self.connect_timeout_s + 2.0:
                self._drop_worker(worker, f"no answer within {self.connect_timeout_s:g} s (connect_timeout_s)")
        if self._worker is None and self._failure is None and self._next_attempt is not None \
                and now >= self._next_attempt:
            self._next_attempt = None
            st.reconnect_attempts += 1
            log.info("reconnecting to %s (attempt %d/%d)", self.safe_url, self._backoff.attempt,
                     self.reconnect)
            self._worker = _Worker(self._config, self._queue_frames)

    def _ack(self, worker: _Worker, index: int) -> None:
        """The worker muxed every frame up to ``index``."""
        st = self._stats
        while worker.pending:
            first = next(iter(worker.pending))
            if first > index:
                break
            _, had_video = worker.pending.popitem(last=False)[1]
            st.frames_acked += 1
            st.video_acked += int(had_video)

    def _drop_worker(self, worker: _Worker, reason: str) -> None:
        """A connection failed or stalled: kill it, count what was lost, schedule a reconnect."""
        st = self._stats
        was_live = worker.ready
        lost = len(worker.pending)
        worker.pending.clear()
        worker.kill()
        self._worker = None
        self._lost(lost)
        if self._backoff.exhausted():
            st.state = "failed"
            hint = ("raise reconnect=N to keep trying" if self.reconnect == 0
                    else f"gave up after {self.reconnect} reconnect attempts")
            self._failure = StreamError(f"the stream to {self.safe_url} failed: {scrub(reason, self.url)} ({hint})")
            log.error("%s", self._failure)
            return
        delay = self._backoff.next_delay()
        st.state = "reconnecting"
        self._next_attempt = time.monotonic() + delay
        log.warning("%s to %s: %s; reconnecting in %.1f s (attempt %d/%d)",
                    "connection lost" if was_live else "reconnect failed", self.safe_url,
                    scrub(reason, self.url), delay, self._backoff.attempt, self.reconnect)

    def _finish(self, worker: _Worker, timeout: float) -> None:
        """Ask the worker to flush and close the stream; kill it if that takes too long."""
        deadline = time.monotonic() + timeout
        if worker.ready and worker.alive():
            while time.monotonic() < deadline:
                try:
                    worker.q.put_nowait(("end",))
                    break
                except queue.Full:
                    time.sleep(0.01)
                    worker.poll()
            while time.monotonic() < deadline and worker.alive():
                for msg in worker.poll():
                    if msg[0] == "ack":
                        self._ack(worker, msg[1])
                    elif msg[0] == "closed":
                        worker.closed_msg = msg
                    elif msg[0] == "error":
                        log.warning("closing the stream to %s: %s", self.safe_url, msg[1])
                time.sleep(0.01)
            for msg in worker.poll():
                if msg[0] == "ack":
                    self._ack(worker, msg[1])
        if worker.pending:
            self._lost(len(worker.pending))
            worker.pending.clear()
        worker.stop(max(0.0, deadline - time.monotonic()))


def _positive(value: Any, what: str, zero: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number of seconds, not {value!r}") from None
    if v < 0 or (v == 0 and not zero):
        raise ConfigError(f"{what} must be {'≥ 0' if zero else '> 0'}, not {value!r}")
    return v


def _count(value: Any, what: str) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a whole number ≥ 0, not {value!r}") from None
    if v < 0:
        raise ConfigError(f"{what} must be ≥ 0, not {value!r}")
    return v


@hookimpl
def register_sinks(register):  # type: ignore[no-untyped-def]
    register(RtmpSink)
