"""Latency of the avatar inside voice agents: LiveKit Agents and Pipecat adapters.

    python benchmarks/agents_latency.py                       # tiny model, 8 utterances per framework
    python benchmarks/agents_latency.py --model full --utterances 5

Each framework's adapter runs on one AvatarService (CPU backend unless
--backend): LiveKit's own ``AvatarRunner`` driving ``AvatarVideoGenerator``
from its ``QueueAudioOutput`` (track publishing left out: no server), and a
Pipecat ``PipelineWorker`` with ``AvatarVideoService``. Every utterance is
pushed as a streaming TTS would, 20 ms chunks at 24 kHz in real time, then
ended; per utterance it records

* end to end: first TTS chunk pushed -> first speech picture + audio taken by
  the framework (the runner's read for LiveKit, the next processor for Pipecat);
* look-ahead: what the model and the feature source must wait for (8 future
  frames + the source's own look-ahead; unavoidable);
* session added: the session's own share (the push that completed the first
  frame's audio window -> that frame at its sink: features, batch wait, model,
  compositing, output tick);
* adapter hand-off: that sink write -> the framework taking the frame.

Results (JSON + Markdown) go to benchmarks/results/agents-latency-<machine>.*
On a shared machine the figures are pessimistic; say so when quoting them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TTS_RATE = 24000


def make_kit(work: Path, model: str) -> dict[str, Path]:
    from avatar.demo import synthetic_frames
    from avatar.models.synthetic import make_audio_encoder, make_unet
    from avatar.package import write_package

    frames, boxes = synthetic_frames(8, width=640, height=360)
    tiny = model == "tiny"
    return {"pkg": write_package(work / "pkg", iter(frames), boxes, fps=25, name="bench"),
            "unet": make_unet(work / "unet.onnx", mode="ave", seed=1, tiny=tiny),
            "enc": make_audio_encoder(work / "enc.onnx", seed=1, tiny=tiny)}


def tts(seconds: float, seed: int) -> np.ndarray:
    import soxr

    from avatar.demo import speechlike_audio

    a = soxr.resample(speechlike_audio(seconds, seed=seed), 16000, TTS_RATE)
    return np.clip(a * 32767, -32768, 32767).astype(np.int16)


async def push_realtime(pcm: np.ndarray, send: Any) -> float:
    """Send 20 ms chunks on the real-time clock; returns when the first one went."""
    step = TTS_RATE // 50
    t0 = time.monotonic()
    for n, i in enumerate(range(0, len(pcm), step)):
        await send(pcm[i:i + step])
        await asyncio.sleep(max(0.0, t0 + (n + 1) * 0.02 - time.monotonic()))
    return t0


async def bench_livekit(kit: dict[str, Path], svc: Any, n: int, seconds: float) -> list[dict[str, float]]:
    from livekit import rtc
    from livekit.agents.voice.avatar import AvatarRunner, QueueAudioOutput

    from avatar.agents import AvatarOptions
    from avatar.agents.livekit import AvatarVideoGenerator

    class Runner(AvatarRunner):
        async def _publish_track(self) -> None:  # needs a server; everything else is LiveKit's own
            self._video_publication = self._audio_publication = True  # type: ignore[assignment]

    rows: list[dict[str, float]] = []
    pending: dict[str, Any] = {}

    class Timed(AvatarVideoGenerator):
        """Notes when the runner takes the first speech audio of an utterance."""

        def __aiter__(self):  # type: ignore[no-untyped-def]
            async def gen():  # type: ignore[no-untyped-def]
                async for item in super(Timed, self).__aiter__():
                    if isinstance(item, rtc.AudioFrame) and "started" in pending and "got" not in pending:
                        pending["got"] = time.monotonic()
                    yield item
            return gen()

    gen = Timed(AvatarOptions(kit["pkg"], model=kit["unet"], feature_options={"encoder": str(kit["enc"])},
                              pixel_format="rgba"), service=svc)
    await gen.start()
    gen.avatar.session.subscribe(lambda ev: _note(ev, pending))
    out = QueueAudioOutput(sample_rate=TTS_RATE)
    runner = Runner(rtc.Room(), audio_recv=out, video_gen=gen, options=gen.runner_options)
    await runner.start()
    try:
        await asyncio.sleep(1.0)
        for u in range(n):
            pending.clear()
            done = asyncio.get_running_loop().create_future()
            out.once("playback_finished", lambda ev, f=done: f.done() or f.set_result(ev))
            t0 = await push_realtime(tts(seconds, u), lambda c: out.capture_frame(
                rtc.AudioFrame(c.tobytes(), TTS_RATE, 1, len(c))))
            out.flush()
            await asyncio.wait_for(done, 60)
            rows.append(_row(t0, pending))
            await asyncio.sleep(0.5)
    finally:
        await runner.aclose()
        await gen.aclose()
    return rows


async def bench_pipecat(kit: dict[str, Path], svc: Any, n: int, seconds: float) -> list[dict[str, float]]:
    from pipecat.frames.frames import EndFrame, TTSAudioRawFrame, TTSStartedFrame, TTSStoppedFrame
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineWorker
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
    from pipecat.workers.runner import WorkerRunner

    from avatar.agents.pipecat import AvatarVideoService

    pending: dict[str, Any] = {}

    class Sink(FrameProcessor):
        async def process_frame(self, frame: Any, direction: FrameDirection) -> None:
            await super().process_frame(frame, direction)
            if isinstance(frame, TTSAudioRawFrame) and "started" in pending and "got" not in pending:
                pending["got"] = time.monotonic()
            if isinstance(frame, TTSStoppedFrame):
                pending["done"] = True
            await self.push_frame(frame, direction)

    avatar = AvatarVideoService(kit["pkg"], model=kit["unet"], feature_options={"encoder": str(kit["enc"])}, service=svc)

    worker = PipelineWorker(Pipeline([avatar, Sink()]), enable_rtvi=False, idle_timeout_secs=None)
    rows: list[dict[str, float]] = []

    async def drive() -> None:
        while avatar.avatar is None or avatar.avatar.session is None:
            await asyncio.sleep(0.01)
        avatar.avatar.session.subscribe(lambda ev: _note(ev, pending))
        await asyncio.sleep(1.0)
        for u in range(n):
            pending.clear()
            await worker.queue_frame(TTSStartedFrame())
            t0 = await push_realtime(tts(seconds, u), lambda c: worker.queue_frame(
                TTSAudioRawFrame(audio=c.tobytes(), sample_rate=TTS_RATE, num_channels=1)))
            await worker.queue_frame(TTSStoppedFrame())
            while "done" not in pending:
                await asyncio.sleep(0.01)
            rows.append(_row(t0, pending))
            await asyncio.sleep(0.5)
        await worker.queue_frame(EndFrame())

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await asyncio.gather(drive(), runner.run())
    return rows


def _note(ev: Any, pending: dict[str, Any]) -> None:
    """The session's own figures for the utterance (on its output thread, just before the first frame)."""
    if ev.kind == "speech_started":
        pending["started"] = ev


def _row(t0: float, pending: dict[str, Any]) -> dict[str, float]:
    st = pending["started"]
    return {"end_to_end_s": pending["got"] - t0, "lookahead_s": float(st.inherent_s),
            "session_added_s": float(st.added_s or 0.0), "handoff_s": pending["got"] - float(st.time)}


def summarize(rows: list[dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {"utterances": len(rows)}
    for k in rows[0]:
        v = sorted(r[k] for r in rows)
        out[k] = {"p50": statistics.median(v), "p95": v[min(len(v) - 1, int(round(0.95 * (len(v) - 1))))]}
    added = sorted(r["session_added_s"] + r["handoff_s"] for r in rows)
    out["added_s"] = {"p50": statistics.median(added), "p95": added[min(len(added) - 1, int(round(0.95 * (len(added) - 1))))]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("tiny", "full"), default="tiny")
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--utterances", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=1.5, help="length of each utterance")
    ap.add_argument("--frameworks", default="livekit,pipecat")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--name", help="results file stem (default: agents-latency-<machine>)")
    args = ap.parse_args()

    from avatar.bench.harness import default_name, environment
    from avatar.engine import AvatarService

    env = environment()
    load0 = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="avatar-agents-bench-"))
    kit = make_kit(work, args.model)
    results: dict[str, Any] = {}
    with AvatarService(backend=args.backend) as svc:
        for fw in args.frameworks.split(","):
            bench = {"livekit": bench_livekit, "pipecat": bench_pipecat}[fw]
            rows = asyncio.run(bench(kit, svc, args.utterances, args.seconds))
            results[fw] = {"rows": rows, "summary": summarize(rows)}
    load1 = os.getloadavg()[0]
    report = {"environment": env, "model": args.model, "backend": args.backend, "seconds": args.seconds,
              "load_average_1min": [load0, load1], "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name or f"agents-latency-{default_name(env)}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    md = _markdown(report)
    (out / f"{stem}.md").write_text(md)
    print(md)
    print(f"wrote {out / stem}.json and .md")


def _markdown(r: dict[str, Any]) -> str:
    env = r["environment"]
    ms = lambda d: f"{1000 * d['p50']:.0f} / {1000 * d['p95']:.0f} ms"  # noqa: E731
    lines = [
        "# Avatar inside voice agents: latency",
        "",
        f"- machine: {env.get('cpu_model')}, {env.get('cpu_cores')} usable cores, backend {r['backend']}, "
        f"{r['model']} UNet-328 (seeded), 640x360 avatar",
        f"- load average (1 min): {r['load_average_1min'][0]:.2f} at start, {r['load_average_1min'][1]:.2f} at the end",
        f"- {r['seconds']} s utterances pushed as 20 ms chunks at 24 kHz in real time; p50 / p95 over the utterances",
        "- added = session added + adapter hand-off: what comes on top of the look-ahead",
        "",
        "| framework | utterances | end to end | look-ahead | session added | adapter hand-off | added |",
        "|---|---|---|---|---|---|---|",
    ]
    for fw, res in r["results"].items():
        s = res["summary"]
        lines.append(f"| {fw} | {s['utterances']} | {ms(s['end_to_end_s'])} | {ms(s['lookahead_s'])} | "
                     f"{ms(s['session_added_s'])} | {ms(s['handoff_s'])} | {ms(s['added_s'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
