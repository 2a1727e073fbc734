"""A real ``avatar serve`` process on loopback for the server tests, and small HTTP helpers."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServeProcess:
    """``avatar serve --demo --tiny`` (or with ``args``) in its own process group; stderr kept in a file."""

    def __init__(self, workdir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkstemp(prefix="avatar-serve-", suffix=".log")[1])
        self._log = open(self.log_path, "wb")
        cmd = [sys.executable, "-m", "avatar", "-v", "serve", "--port", str(self.port), "--workdir", str(workdir), *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 180.0) -> "ServeProcess":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"avatar serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                status, _ = http("GET", self.url + "/health", timeout=2)
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"avatar serve did not answer /health within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()
        return int(self.proc.returncode)


def http(method: str, url: str, body: Any = None, token: str | None = None, timeout: float = 30,
         raw: bytes | None = None) -> tuple[int, Any]:
    """(status, parsed JSON or text) of one request; HTTP errors are returned, not raised."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, text = r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def tone(seconds: float, rate: int = 16000, freq: float = 220.0) -> np.ndarray:
    """A loud harmonic tone as PCM16 (crisp onsets for A/V checks)."""
    t = np.arange(int(seconds * rate)) / rate
    x = sum(np.sin(2 * np.pi * freq * k * t) / k for k in range(1, 6))
    return (0.4 * x / np.abs(x).max() * 32767).astype("<i2")


async def recvonly_offer() -> str:
    """A browser-like SDP offer (receive video and audio; host candidates only)."""
    from aiortc import RTCConfiguration, RTCPeerConnection

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    pc.addTransceiver("audio", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp

def flac_silence(minutes: float, rate: int = 8000) -> bytes:
    """``minutes`` of silence as a FLAC file (tiny on the wire, an hour of PCM once decoded)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="flac") as c:
        st = c.add_stream("flac", rate=rate, layout="mono")
        n = rate * 10
        for i in range(int(minutes * 6)):
            f = av.AudioFrame.from_ndarray(np.zeros((1, n), np.int16), format="s16", layout="mono")
            f.sample_rate, f.pts = rate, i * n
            for p in st.encode(f):
                c.mux(p)
        for p in st.encode(None):
            c.mux(p)
    return buf.getvalue()


def rss_mb(pid: int) -> float:
    """The resident set of process ``pid`` in MiB (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def peak_rss_mb(pid: int, fn: Any) -> tuple[float, float]:
    """(RSS before, peak RSS while ``fn()`` ran) of process ``pid`` in MiB (Linux).

    The kernel's peak (VmHWM) is reset first (``clear_refs``), so a transient
    allocation freed before ``fn`` returns still shows; where that reset is not
    allowed, the RSS sampled every few milliseconds while ``fn`` runs stands in.
    """
    import threading

    before = rss_mb(pid)
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    sampled = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            sampled.append(rss_mb(pid))

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    peak = max(sampled)
    if reset:
        hwm = next(int(x.split()[1]) for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmHWM:"))
        peak = max(peak, hwm / 1024)
    return before, peak
