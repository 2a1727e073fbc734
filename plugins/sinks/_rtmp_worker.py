"""The RTMP sink's network process: encodes and muxes FLV to one RTMP connection.

Why a separate process: a write into a server that stopped reading blocks
inside FFmpeg's socket code, and no PyAV option interrupts it. The sink (the
parent) therefore keeps encoding and network I/O here, watches the
acknowledgements, and kills this process when it is stuck; a reconnect is a
fresh process with a fresh encoder, so the new stream starts with a keyframe.

Started as ``python -m avatar_plugins.sinks._rtmp_worker RFD WFD`` (fork+exec,
never a bare fork of a process that may hold ONNX Runtime or CUDA threads).
Messages on the two inherited pipes (``multiprocessing.connection`` framing):

parent → worker: a config dict, then ``("frame", index, pts, image|None, audio)``
any number of times, then ``("end",)``.
worker → parent: ``("ready",)`` once published, ``("ack", index)`` after each
frame was muxed, ``("closed", video_frames, audio_s)`` or ``("error", text)``.
Texts never contain the stream key: the worker scrubs them like the parent.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from fractions import Fraction
from multiprocessing.connection import Connection
from typing import Any


def _watch_parent(parent: int) -> None:
    """Exit when the parent dies, even while a network write is blocked."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os._exit(3)


def limit_send_buffer(nbytes: int) -> int:
    """Shrink the send buffer of this process's TCP sockets; returns how many were set.

    Stall detection works on acknowledgements: a mux call returns once its
    bytes are in the kernel's send buffer. Linux autotunes that buffer up to
    4 MB, i.e. tens of seconds of a 2 Mbit/s stream that a stopped server
    would "accept" before anything blocks. A fixed small buffer makes a stall
    block within a fraction of a second. FFmpeg's RTMP protocol does not pass
    ``send_buffer_size`` to its TCP connection, so it is set here, on the only
    TCP socket this dedicated process has.
    """
    import socket

    try:
        fds = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 256))
    done = 0
    for fd in fds:
        if fd < 3:
            continue
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            if sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, int(nbytes))
                done += 1
        except OSError:
            pass
        finally:
            sock.detach()  # the fd stays FFmpeg's
    return done


def run(rx: Connection, tx: Connection) -> int:
    cfg: dict[str, Any] = rx.recv()
    from avatar_plugins.sinks._redact import scrub

    url = cfg["url"]

    def fail(exc: BaseException, what: str) -> int:
        text = scrub(f"{what}: {exc.__class__.__name__}: {exc}", url)
        try:
            tx.send(("error", text))
        except OSError:
            pass
        return 1

    import av

    from avatar_plugins.sinks._encode import AVEncoder

    try:
        container = av.open(url, "w", format="flv", options=cfg.get("format_options") or {})
    except Exception as exc:
        return fail(exc, "cannot connect")
    try:
        enc = AVEncoder(
            container,
            width=cfg["width"],
            height=cfg["height"],
            fps=Fraction(cfg["fps"]),
            sample_rate=cfg["sample_rate"],
            audio_rate=cfg["audio_rate"],
            audio_bitrate=cfg["audio_bitrate"],
            audio_layout=cfg["audio_layout"],
            video_options=cfg["video_options"],
            bit_rate=cfg["bit_rate"],
            max_rate=cfg["max_rate"],
            buf_size=cfg["buf_size"],
            gop=cfg["gop"],
        )
        enc.video.codec_context.max_b_frames = 0
    except Exception as exc:
        return fail(exc, "cannot set up the encoders")
    try:
        # PyAV connects lazily, at the first packet; connect (handshake, publish,
        # FLV header) now so that "ready" means the server accepted the stream.
        container.start_encoding()
    except Exception as exc:
        return fail(exc, "cannot connect")
    if cfg.get("send_buffer"):
        limit_send_buffer(cfg["send_buffer"])
    tx.send(("ready",))
    first = True
    try:
        while True:
            try:
                msg = rx.recv()
            except EOFError:  # parent gone or gave up on us
                return 2
            if msg[0] == "end":
                break
            _, index, pts, image, audio = msg
            enc.encode_audio(audio, start=Fraction(pts) if first else None)
            first = False
            if image is not None:
                enc.encode_video(image, index)
            tx.send(("ack", index))
        enc.flush()
        container.close()
    except Exception as exc:
        return fail(exc, "stream failed")
    tx.send(("closed", enc.video_frames, enc.audio_seconds))
    return 0


def main(argv: list[str]) -> int:
    # Ctrl-C belongs to the parent: it decides how the stream ends.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    rfd, wfd = int(argv[1]), int(argv[2])
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    rx = Connection(rfd, writable=False)
    tx = Connection(wfd, readable=False)
    try:
        return run(rx, tx)
    finally:
        rx.close()
        tx.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
