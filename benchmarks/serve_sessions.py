"""N live sessions through ``avatar serve`` (HTTP + WebSocket) vs the same N in process, in one run.

For each N (1, 2, 4, 8, ...) both modes run the same workload: every session
pushes real speech in 20 ms PCM16 chunks in real time for ``--seconds``, then
flushes. Outputs are the server's meter only (no encoder), so the ratio shows
what the HTTP/WebSocket layer costs, not what an encoder costs.

* **in process**: :class:`avatar.serve.live.LiveService` (the engine's
  ``AvatarService``) in this process, one pushing thread per session;
* **server**: a real ``avatar serve`` subprocess on loopback; sessions opened
  with ``POST /v1/sessions``, audio over ``WS /v1/sessions/{id}/audio``, figures
  from ``GET /v1/sessions/{id}`` and the socket's events.

Per N and mode: delivered fps per session (mean, min), frames skipped, lag of
each frame behind its due time (p50/p95/p99, the engine's pacer), push to first
speech frame (p50/p95; for the server also as the client sees the
``speech_started`` event), CPU use; and server / in-process ratios.

    flock /tmp/avatar-bench.lock python benchmarks/serve_sessions.py --tiny --sessions 1,2,4,8 \\
        --seconds 30 --out benchmarks/results/serve_cpu_2core
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test suite's server-process helper


def speech(seconds: float, workdir: Path) -> np.ndarray:
    """Real speech (../shared/data/audio/talk_hb.wav) if present, else the demo's; PCM16 at 16 kHz, looped."""
    from avatar.audio import load_audio

    real = ROOT.parent / "shared" / "data" / "audio" / "talk_hb.wav"
    pcm = load_audio(real if real.exists() else workdir / "speech.wav", 16000)
    reps = int(np.ceil(seconds * 16000 / len(pcm)))
    return (np.clip(np.tile(pcm, reps)[: int(seconds * 16000)], -1, 1) * 32767).astype("<i2")


RATIOS = ("fps_mean", "speech_fps_mean", "lag_p95_s", "latency_p50_s", "cpu_percent")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


#: after the flush, how long the tail of the speech is given to reach the outputs
TAIL_S = 1.5


def summarize(per_session: list[dict[str, Any]], wall: float, speech_s: float, cpu: float) -> dict[str, Any]:
    fps = [s["frames"] / wall for s in per_session]
    lat = [x for s in per_session for x in s["latency_s"]]
    speech_fps = [s["speech_frames"] / speech_s for s in per_session]
    out = {
        "fps_mean": statistics.mean(fps), "fps_min": min(fps),
        # frames rendered by the model and shown, per second of speech: what skipping lowers
        "speech_fps_mean": statistics.mean(speech_fps), "speech_fps_min": min(speech_fps),
        "skipped": sum(s["skipped"] for s in per_session),
        "lag_p50_s": max(s["lag_p50_s"] for s in per_session),
        "lag_p95_s": max(s["lag_p95_s"] for s in per_session),
        "lag_p99_s": max(s["lag_p99_s"] for s in per_session),
        "latency_p50_s": pct(lat, 50), "latency_p95_s": pct(lat, 95),
        "cpu_percent": cpu,
    }
    out["realtime"] = out["speech_fps_min"] >= 24.0 and out["lag_p95_s"] < 0.2
    client = [x for s in per_session for x in s.get("client_latency_s", [])]
    if client:
        out["client_latency_p50_s"], out["client_latency_p95_s"] = pct(client, 50), pct(client, 95)
    return out


# --------------------------------------------------------------------------- in process


def run_in_process(service: Any, n: int, pcm: np.ndarray) -> dict[str, Any]:
    import psutil
    from avatar.serve.metrics import MeterSink

    meters = [MeterSink() for _ in range(n)]
    sessions = [service.open_session("demo", [m]) for m in meters]
    proc = psutil.Process()
    proc.cpu_percent()
    start = [m.frames for m in meters]
    t0 = time.monotonic()

    def push(s: Any) -> None:
        step = 320
        for k, i in enumerate(range(0, len(pcm), step)):
            s.push(pcm[i : i + step], 16000)
            delay = t0 + (k + 1) * 0.02 - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        s.flush()

    threads = [threading.Thread(target=push, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    time.sleep(TAIL_S)
    wall = time.monotonic() - t0
    cpu = proc.cpu_percent()
    per = []
    for s, m, f0 in zip(sessions, meters, start):
        st = s.stats()
        per.append({**st, "frames": m.frames - f0})
    for s in sessions:
        s.close()
    return summarize(per, wall, len(pcm) / 16000, cpu)


# --------------------------------------------------------------------------- server


async def _server_session(url: str, pcm: np.ndarray, t0: float, ready: asyncio.Event) -> dict[str, Any]:
    """One session through the API; every request is async so no session's socket waits on another's."""
    import aiohttp

    async with aiohttp.ClientSession() as c:
        async with c.post(url + "/v1/sessions", json={"avatar": "demo", "outputs": []}) as r:
            s = await r.json()
            if r.status != 201:
                raise RuntimeError(f"POST /v1/sessions: {r.status} {s}")
        auth = {"Authorization": f"Bearer {s['token']}"}

        async def status() -> dict[str, Any]:
            async with c.get(f"{url}/v1/sessions/{s['id']}", headers=auth) as r:
                return await r.json()

        ws_url = url.replace("http", "ws") + f"/v1/sessions/{s['id']}/audio?token={s['token']}"
        client_latency: list[float] = []
        async with c.ws_connect(ws_url) as ws:
            await ws.send_json({"type": "format", "sample_rate": 16000})
            first = (await status())["frames"]
            await ready.wait()
            pushed_at = time.monotonic()

            async def events() -> None:
                async for msg in ws:
                    if msg.type == aiohttp.WSMsgType.TEXT and json.loads(msg.data)["type"] == "speech_started":
                        client_latency.append(time.monotonic() - pushed_at)

            reader = asyncio.ensure_future(events())
            step = 320
            for k, i in enumerate(range(0, len(pcm), step)):
                await ws.send_bytes(pcm[i : i + step].tobytes())
                delay = t0 + 0.5 + (k + 1) * 0.02 - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await ws.send_json({"type": "flush"})
            await asyncio.sleep(TAIL_S)
            st = await status()
            reader.cancel()
        async with c.delete(f"{url}/v1/sessions/{s['id']}", headers=auth):
            pass
    return {**st, "frames": st["frames"] - first, "client_latency_s": client_latency}


def run_server(url: str, pid: int, n: int, pcm: np.ndarray) -> dict[str, Any]:
    import psutil

    proc = psutil.Process(pid)
    proc.cpu_percent()

    async def main() -> list[dict[str, Any]]:
        ready = asyncio.Event()
        t0 = time.monotonic()
        tasks = [asyncio.ensure_future(_server_session(url, pcm, t0, ready)) for _ in range(n)]
        await asyncio.sleep(0.5)
        ready.set()
        return await asyncio.gather(*tasks)

    t = time.monotonic()
    per = asyncio.run(main())
    wall = time.monotonic() - t - 0.5
    return summarize(per, wall, len(pcm) / 16000, proc.cpu_percent())


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", default="1,2,4,8")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--tiny", action="store_true", help="the tiny test model (else the full UNet-328)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workdir", default=".avatar-bench-serve")
    ap.add_argument("--out", required=True, help="results path without extension (.json and .md are written)")
    args = ap.parse_args()
    from avatar.bench.harness import cpu_model
    from avatar.demo import build_demo
    from avatar.serve.config import AvatarSpec
    from avatar.serve.live import LiveService
    from serve_process import ServeProcess

    work = Path(args.workdir)
    paths = build_demo(work, tiny=args.tiny)
    pcm = speech(args.seconds, work)
    counts = [int(x) for x in args.sessions.split(",")]
    load_before = os.getloadavg()
    service = LiveService([AvatarSpec("demo", paths["avatar"], paths["model"], "ave", {"encoder": str(paths["encoder"])})],
                          backend=args.backend, batch=args.batch)
    service.start()
    server = ServeProcess(work, "--demo", *(["--tiny"] if args.tiny else []), "--backend", args.backend,
                          "--batch", str(args.batch), "--max-sessions", str(max(counts)),
                          "--client-timeout-s", "30").wait_ready()
    rows = []
    try:
        for n in counts:
            inproc = run_in_process(service, n, pcm)
            served = run_server(server.url, server.proc.pid, n, pcm)
            ratio = {k: (served[k] / inproc[k] if inproc[k] else None) for k in RATIOS}
            rows.append({"sessions": n, "in_process": inproc, "server": served, "server_over_in_process": ratio})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        server.stop()
        service.close()
    result = {
        "benchmark": "serve_sessions", "model": "tiny" if args.tiny else "unet-328", "backend": service.backend_name,
        "batch": args.batch, "seconds_per_n": args.seconds, "cpu": cpu_model(), "cpus": os.cpu_count(),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "python": platform.python_version(),
        "measured_capacity": service.throughput_fps, "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict[str, Any]) -> str:
    lines = [
        f"# avatar serve: N sessions through HTTP/WebSocket vs in process ({r['model']} model, {r['backend']})",
        "",
        f"CPU: {r['cpu']} ({r['cpus']} cores); load average before {r['loadavg_before'][0]:.1f}, after "
        f"{r['loadavg_after'][0]:.1f} (a shared machine: other jobs ran too). Batch {r['batch']}, "
        f"{r['seconds_per_n']:.0f} s of speech per session and N, pushed in 20 ms chunks in real time; "
        f"backend throughput measured at start {r['measured_capacity']:.0f} frames/s.",
        "",
        "| N | mode | delivered fps/session (mean, min) | speech fps/session (mean, min) | skipped | lag p50/p95/p99 ms "
        "| latency p50/p95 ms | client latency p50 ms | CPU % | real time |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        for mode in ("in_process", "server"):
            m = row[mode]
            client = f"{1000 * m['client_latency_p50_s']:.0f}" if "client_latency_p50_s" in m else "-"
            lines.append(
                f"| {row['sessions']} | {mode.replace('_', ' ')} | {m['fps_mean']:.1f}, {m['fps_min']:.1f} | "
                f"{m['speech_fps_mean']:.1f}, {m['speech_fps_min']:.1f} | {m['skipped']} | "
                f"{1000 * m['lag_p50_s']:.0f}/{1000 * m['lag_p95_s']:.0f}/{1000 * m['lag_p99_s']:.0f} | "
                f"{1000 * m['latency_p50_s']:.0f}/{1000 * m['latency_p95_s']:.0f} | {client} | {m['cpu_percent']:.0f} | "
                f"{'yes' if m['realtime'] else 'no'} |")
    lines += ["", "Server / in process, same N, same run:", "",
              "| N | delivered fps | speech fps | lag p95 | latency p50 | CPU |", "|---|---|---|---|---|---|"]
    for row in r["rows"]:
        q = row["server_over_in_process"]
        lines.append("| {} | {} |".format(row["sessions"], " | ".join(
            "-" if q[k] is None else f"{q[k]:.2f}" for k in RATIOS)))
    lines += ["", "Delivered fps counts every frame reaching the outputs (idle, speech, held); speech fps "
              "counts frames the model rendered and that were shown, per second of speech (skipping lowers it). "
              "Real time: speech fps >= 24 for every session and lag p95 < 200 ms. Lag is the engine pacer's "
              "(each frame behind its due time); latency is push of an utterance to its first frame at the "
              "outputs, and the client latency adds the WebSocket event. CPU % of the server is its process "
              "only; in process it is this benchmark's process (pushing threads included).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
