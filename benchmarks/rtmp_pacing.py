"""Pacing of the rtmp sink on a long live run against a local nginx-rtmp.

Pushes synthetic frames (a moving pattern, pre-rendered so the generator costs
nothing) and a tone through the real ``rtmp`` sink for ``--seconds`` and
measures, per frame, the lag ``wall - (start + pts)`` at the moment the frame
is handed to the network process, and the drift of the last frame (its wall
time vs its pts on the unslipped clock; no drift means within 100 ms).
nginx is started by the test helper (tests/rtmp_server.py) on a free loopback
port. Results go to benchmarks/results/rtmp_pacing_<host>.{json,md}.

    python benchmarks/rtmp_pacing.py --seconds 60 --size 1280x720
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import socket
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from rtmp_server import NginxRtmp, nginx_rtmp_available  # noqa: E402

from avatar.bench.harness import cpu_model  # noqa: E402
from avatar.interfaces import StreamInfo, VideoFrame  # noqa: E402
from avatar_plugins.sinks.rtmp import RtmpSink  # noqa: E402




def host_tag() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", socket.gethostname())[:40] or "host"


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def frames(width: int, height: int, count: int) -> list[np.ndarray]:
    out = []
    for i in range(count):
        img = np.full((height, width, 3), 30, np.uint8)
        x = (i * width // count) % (width - width // 10)
        img[:, x : x + width // 10] = (0, 170, 230)
        y = (i * 7) % (height - height // 12)
        img[y : y + height // 12, :] = (210, 90, 20)
        out.append(img)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--fps", type=int, default=25)
    ap.add_argument("--bitrate", default="2M")
    ap.add_argument("--preset", default="veryfast")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ok, reason = nginx_rtmp_available()
    if not ok:
        print(f"skipped: {reason}", file=sys.stderr)
        return 2
    width, height = (int(v) for v in args.size.lower().split("x"))
    fps, sr = args.fps, 16000
    n = int(round(args.seconds * fps))
    images = frames(width, height, 2 * fps)
    per = sr // fps
    load_before = _load()
    with NginxRtmp() as server:
        sink = RtmpSink(url=server.url("bench"), bitrate=args.bitrate, preset=args.preset)
        sink.open(StreamInfo(width, height, Fraction(fps), sr, title="rtmp_pacing"))
        lags = []
        t0 = time.monotonic()
        for i in range(n):
            pcm = (0.2 * np.sin(2 * np.pi * 440 * (np.arange(per) + i * per) / sr)).astype(np.float32)
            sink.write(VideoFrame(i, Fraction(i, fps), images[i % len(images)], pcm))
            lags.append(sink.stats.last_lag_s)
        wall = time.monotonic() - t0
        stats = sink.stats
        report = sink.close()
        server.wait_recordings_closed()
        rec = server.recordings("bench")
        recorded_bytes = sum(p.stat().st_size for p in rec)
    lag = np.array(lags)
    result = {
        "benchmark": "rtmp_pacing",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"host": socket.gethostname(), "cpu": cpu_model(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "platform": platform.platform(),
                    # other work on the machine changes the figures: record how busy it was
                    "load_avg_before": load_before, "load_avg_after": _load()},
        "config": {"seconds": args.seconds, "frames": n, "size": f"{width}x{height}", "fps": fps,
                   "bitrate": args.bitrate, "preset": args.preset, "server": "nginx-rtmp on 127.0.0.1"},
        "wall_s": wall,
        "media_s": n / fps,
        "lag_ms": {"p50": float(np.percentile(lag, 50) * 1e3), "p95": float(np.percentile(lag, 95) * 1e3),
                   "max": float(lag.max() * 1e3), "mean": float(lag.mean() * 1e3)},
        "last_frame_drift_ms": stats.drift_s * 1e3,
        "no_drift": abs(stats.drift_s) <= 0.100,
        "frames_delivered": report.frames,
        "dropped": report.dropped,
        "stalled_s": report.stalled_s,
        "reconnects": report.reconnects,
        "gap_s": report.gap_s,
        "recorded_mbit_s": recorded_bytes * 8 / 1e6 / (n / fps),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"rtmp_pacing_{host_tag()}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    m, c = result["machine"], result["config"]
    md = f"""# RTMP pacing ({c['seconds']:g} s live run)

Machine: {m['cpu']}, {m['cores']} cores ({m['host']}), Python {m['python']};
load average (1/5/15 min) before {m['load_avg_before']}, after {m['load_avg_after']}.
Run: {c['size']} @ {c['fps']} fps, H.264 {c['preset']} {c['bitrate']}bit/s + AAC, {c['server']},
{result['date']}. Command: `python benchmarks/rtmp_pacing.py --seconds {c['seconds']:g} --size {c['size']}`.

| measure | value |
| --- | --- |
| media pushed | {result['media_s']:.2f} s ({n} frames) |
| wall time | {result['wall_s']:.2f} s |
| lag p50 | {result['lag_ms']['p50']:.2f} ms |
| lag p95 | {result['lag_ms']['p95']:.2f} ms |
| lag max | {result['lag_ms']['max']:.2f} ms |
| last frame: wall vs pts (drift) | {result['last_frame_drift_ms']:.2f} ms ({'no drift' if result['no_drift'] else 'DRIFT > 100 ms'}) |
| frames delivered / dropped | {result['frames_delivered']} / {result['dropped']} |
| stalled / gap / reconnects | {result['stalled_s']:.2f} s / {result['gap_s']:.2f} s / {result['reconnects']} |
| recorded bitrate | {result['recorded_mbit_s']:.2f} Mbit/s |

Lag is `wall - (start + pts)` when a frame is handed to the sink's network process
(the generator here is faster than real time, so this is the pacing error).
"""
    stem.with_suffix(".md").write_text(md)
    print(md)
    return 0 if result["no_drift"] else 1


if __name__ == "__main__":
    sys.exit(main())
