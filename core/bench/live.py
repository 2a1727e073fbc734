"""Live-sessions benchmark: N concurrent sessions fed real speech in real time.

Each session pushes 20 ms chunks of speech on a real-time schedule
(utterances of ``utterance_s`` then ``pause_s`` of nothing, flushed at the
end of each), to a callback sink. Per N and per mode — cross-session batching
(one shared backend) and one backend per session, in the same run — it
records delivered frame rates, skipped and late frames, the lag of each
output frame behind its due time, the push-to-first-speech-frame latency
beyond the inherent look-ahead, the mean batch, backend calls per second and
CPU use. A session is *sustained* when it shows at least ``sustain_fraction``
of its speech frames rendered and its p95 lag is under 200 ms.

``python benchmarks/live_sessions.py`` runs it and writes JSON + Markdown.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA = "avatar-live-bench/1"


@dataclass
class LiveConfig:
    models: tuple[str, ...] = ("tiny", "full")
    sessions: dict[str, tuple[int, ...]] = field(default_factory=lambda: {"tiny": (1, 2, 4, 8, 16), "full": (1, 2, 4)})
    seconds: float = 30.0
    utterance_s: float = 4.0
    pause_s: float = 1.0
    chunk_s: float = 0.02
    batch_size: int = 8
    max_wait_s: float = 0.002
    sustain_fraction: float = 0.95
    max_p95_lag_s: float = 0.2
    speech: str | None = None  # a speech file; synthetic speech-like audio when None
    seed: int = 1


def _speech(cfg: LiveConfig, seconds: float) -> np.ndarray:
    from ..demo import speechlike_audio

    if cfg.speech:
        from ..audio import load_audio

        pcm = load_audio(cfg.speech)
        reps = int(np.ceil(seconds * 16000 / len(pcm)))
        return np.tile(pcm, reps)[: int(seconds * 16000)]
    return speechlike_audio(seconds, seed=cfg.seed)


def _assets(workdir: Path) -> dict[str, Path]:
    from ..demo import synthetic_frames
    from ..models.synthetic import make_audio_encoder, make_unet
    from ..package import write_package

    workdir.mkdir(parents=True, exist_ok=True)
    out = {
        "tiny": make_unet(workdir / "unet_tiny.onnx", mode="ave", seed=1, tiny=True),
        "full": make_unet(workdir / "unet_full.onnx", mode="ave", seed=1),
        "enc": make_audio_encoder(workdir / "enc.onnx", seed=1, tiny=False),
    }
    for name, seed in (("a", 0), ("b", 3)):
        if not (workdir / name / "avatar.json").exists():
            frames, boxes = synthetic_frames(50, width=640, height=480, seed=seed)
            write_package(workdir / name, iter(frames), boxes, fps=25, name=name)
        out[name] = workdir / name
    return out


class _Probe:
    """A callback sink function and event subscriber for one session."""

    def __init__(self) -> None:
        self.ticks = 0
        self.speech_ticks = 0
        self.rendered = 0
        self.added_latency: list[float] = []
        self.lock = threading.Lock()

    def frame(self, f: Any) -> None:
        with self.lock:
            self.ticks += 1
            if f.audio.any():
                self.speech_ticks += 1
                if f.face is not None:
                    self.rendered += 1

    def event(self, ev: Any) -> None:
        if ev.kind == "speech_started" and ev.added_s is not None:
            self.added_latency.append(ev.added_s)


def _pusher(session: Any, pcm: np.ndarray, cfg: LiveConfig, stop: threading.Event, t0: float) -> None:
    """Real-time pushes: utterances of speech, each flushed, with pauses between."""
    step = int(cfg.chunk_s * 16000)
    utt = int(cfg.utterance_s * 16000)
    pos = 0
    due = t0
    while not stop.is_set() and session.alive:
        for i in range(0, utt, step):
            if stop.is_set() or not session.alive:
                return
            due += cfg.chunk_s
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            chunk = pcm[(pos + i) % len(pcm):][:step]
            session.push_audio(chunk, 16000)
        pos += utt
        session.flush()
        due += cfg.pause_s
        wait = due - time.monotonic()
        if wait > 0:
            stop.wait(wait)


def run_point(assets: dict[str, Path], model: str, n: int, batching: bool, cfg: LiveConfig, pcm: np.ndarray) -> dict[str, Any]:
    """N sessions for cfg.seconds; the figures of this point."""
    import psutil

    from ..engine import AvatarService

    proc = psutil.Process()
    with AvatarService(backend="cpu", batch_size=cfg.batch_size, max_wait_s=cfg.max_wait_s, batching=batching) as svc:
        sessions, probes = [], []
        for i in range(n):
            p = _Probe()
            sink = ("callback", {"fn": p.frame, "with_face": True})  # through the registry, like any user
            s = svc.open_session(assets["ab"[i % 2]], sinks=[sink], model=assets[model],
                                 feature_options={"encoder": str(assets["enc"])})
            s.subscribe(p.event)
            sessions.append(s)
            probes.append(p)
        stop = threading.Event()
        proc.cpu_percent(None)
        t0 = time.monotonic()
        threads = [threading.Thread(target=_pusher, args=(s, np.roll(pcm, 16000 * 3 * i), cfg, stop, t0), daemon=True)
                   for i, s in enumerate(sessions)]
        for t in threads:
            t.start()
        time.sleep(cfg.seconds)
        stop.set()
        wall = time.monotonic() - t0
        cpu = proc.cpu_percent(None)
        backends = svc.stats()["backends"]
        per = []
        for s, p in zip(sessions, probes):
            st = s.stats()
            per.append({
                "ticks_per_s": p.ticks / wall,
                "speech_fps": 25.0 * p.rendered / p.speech_ticks if p.speech_ticks else 0.0,
                "rendered_fraction": p.rendered / p.speech_ticks if p.speech_ticks else 0.0,
                "skipped": st.skipped, "late": st.late, "underruns": st.underruns,
                "lag_p50_s": st.lag_p50_s, "lag_p95_s": st.lag_p95_s, "lag_p99_s": st.lag_p99_s,
                "added_latency_s": p.added_latency, "failed": s.error is not None,
            })
        for t in threads:
            t.join(timeout=5)
    calls = sum(b["calls"] for b in backends.values())
    items = sum(b["items"] for b in backends.values())
    lat = [x for q in per for x in q["added_latency_s"]]
    sustained = all(q["rendered_fraction"] >= cfg.sustain_fraction and q["lag_p95_s"] < cfg.max_p95_lag_s
                    and not q["failed"] for q in per)
    return {
        "model": model, "sessions": n, "batching": batching, "wall_s": wall,
        "sustained": sustained,
        "speech_fps_mean": float(np.mean([q["speech_fps"] for q in per])),
        "speech_fps_min": float(np.min([q["speech_fps"] for q in per])),
        "ticks_per_s_mean": float(np.mean([q["ticks_per_s"] for q in per])),
        "skipped": int(sum(q["skipped"] for q in per)), "late": int(sum(q["late"] for q in per)),
        "lag_p50_s": float(np.max([q["lag_p50_s"] for q in per])),
        "lag_p95_s": float(np.max([q["lag_p95_s"] for q in per])),
        "lag_p99_s": float(np.max([q["lag_p99_s"] for q in per])),
        "added_latency_p50_s": float(np.percentile(lat, 50)) if lat else None,
        "added_latency_p95_s": float(np.percentile(lat, 95)) if lat else None,
        "latency_samples": len(lat),
        "mean_batch": items / calls if calls else 0.0,
        "backend_calls_per_s": calls / wall,
        "cpu_percent": cpu,
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
        "sessions_detail": per,
    }


def run_live_bench(cfg: LiveConfig, workdir: Path, progress: Any = print) -> dict[str, Any]:
    from .harness import environment

    env = environment()
    assets = _assets(workdir)
    pcm = _speech(cfg, 60.0)
    points = []
    for model in cfg.models:
        for n in cfg.sessions[model]:
            for batching in (True, False):
                progress(f"{model} N={n} {'batched' if batching else 'one backend per session'} ...")
                pt = run_point(assets, model, n, batching, cfg, pcm)
                progress(f"  sustained={pt['sustained']} speech fps={pt['speech_fps_mean']:.1f} "
                         f"p95 lag={pt['lag_p95_s'] * 1000:.0f} ms mean batch={pt['mean_batch']:.2f} "
                         f"added latency p50={_ms(pt['added_latency_p50_s'])}")
                points.append(pt)
    summary = {}
    for model in cfg.models:
        best = {b: max([p["sessions"] for p in points if p["model"] == model and p["batching"] == b and p["sustained"]],
                       default=0) for b in (True, False)}
        summary[model] = {"sustained_batched": best[True], "sustained_separate": best[False],
                          "ratio": (best[True] / best[False]) if best[False] else None}
    env["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    return {"schema": SCHEMA, "config": asdict(cfg), "environment": env, "points": points, "summary": summary}


def _ms(v: float | None) -> str:
    return "—" if v is None else f"{v * 1000:.0f} ms"


def write_live_reports(result: dict[str, Any], out_dir: Path, name: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / f"{name}.json"
    js.write_text(json.dumps(result, indent=2, default=str))
    md = out_dir / f"{name}.md"
    md.write_text(markdown(result))
    return {"json": js, "md": md}


def markdown(result: dict[str, Any]) -> str:
    env, cfg = result["environment"], result["config"]
    lines = [
        "# Live sessions benchmark",
        "",
        f"- machine: {env['cpu_model']}, {env['cpu_cores']} usable cores, {env.get('memory_gb')} GB, "
        f"{'GPU: ' + env['gpus'][0]['name'] if env.get('gpus') else 'no GPU'} (backend cpu)",
        f"- load average (1 min): {env.get('load_avg_1m_at_start')} at start, {env.get('load_avg_1m_at_end')} at the end "
        "— the machine was shared with other work; absolute figures are pessimistic, the ratios were measured in the same run",
        f"- {cfg['seconds']:g} s per point; each session pushes speech in {cfg['chunk_s'] * 1000:g} ms chunks in real time "
        f"({cfg['utterance_s']:g} s utterances, flushed, {cfg['pause_s']:g} s pauses); batch up to {cfg['batch_size']}, "
        f"max wait {cfg['max_wait_s'] * 1000:g} ms",
        f"- sustained: every session shows ≥ {cfg['sustain_fraction']:.0%} of its speech frames rendered (≥ "
        f"{25 * cfg['sustain_fraction']:.1f} fps) with p95 lag < {cfg['max_p95_lag_s'] * 1000:g} ms",
        "- added latency: what the session adds beyond the inherent look-ahead — from the push of the chunk that "
        "completed the first frame's audio window (8 future frames + the feature source's own look-ahead) to that frame "
        "at the callback sink; lag: how late each output frame reached the sink after its due time",
        "- speech fps: 25 × the share of speech frames rendered (the rest were skipped before inference, or came back "
        "too late, and showed the previous picture with their own audio)",
        "",
        "| model | sessions | mode | sustained | speech fps (mean / min) | skipped | late | lag p50 / p95 / p99 | "
        "added latency p50 / p95 | mean batch | calls/s | CPU % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result["points"]:
        lines.append(
            f"| {p['model']} | {p['sessions']} | {'batched' if p['batching'] else 'per session'} | "
            f"{'yes' if p['sustained'] else 'no'} | {p['speech_fps_mean']:.1f} / {p['speech_fps_min']:.1f} | {p['skipped']} | "
            f"{p['late']} | {p['lag_p50_s'] * 1000:.0f} / {p['lag_p95_s'] * 1000:.0f} / {p['lag_p99_s'] * 1000:.0f} ms | "
            f"{_ms(p['added_latency_p50_s'])} / {_ms(p['added_latency_p95_s'])} | {p['mean_batch']:.2f} | "
            f"{p['backend_calls_per_s']:.1f} | {p['cpu_percent']:.0f} |"
        )
    lines += ["", "| model | sessions sustained, batched | one backend per session | ratio |", "|---|---|---|---|"]
    for model, s in result["summary"].items():
        ratio = "—" if s["ratio"] is None else f"{s['ratio']:.1f}x"
        lines.append(f"| {model} | {s['sustained_batched']} | {s['sustained_separate']} | {ratio} |")
    return "\n".join(lines) + "\n"
