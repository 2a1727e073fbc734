"""Peak memory does not grow with the audio: a long offline render, and a long reply pushed at once into a live session.

    python benchmarks/memory_bounded.py                       # 1 h offline vs 10 s; 10 min live push vs 10 s
    python benchmarks/memory_bounded.py --offline-s 600       # a shorter long render
    python benchmarks/memory_bounded.py --inputs /tmp/mb      # keep the prepared inputs, reuse them next time

Each case runs in a fresh process and reports its peak RSS (``ru_maxrss``).
What is measured is the engine's memory, so the model is a cheap stand-in (a
backend that returns a constant face instantly) and the sinks drop the frames;
the avatar is 1280x720. The offline render takes a 16 kHz WAV file (as
``avatar run --audio`` does) and precomputed (npy) features for the whole audio,
both written beforehand by a separate process; the live session uses the tiny
seeded AVE encoder and is paced on the real clock for ``--live-run-s`` seconds
after the push.

The offline render decodes the file chunk by chunk and reads the npy rows a
block at a time, and everything else — windows, faces, composited frames — is
bounded by the look-ahead, so its figure should not depend on the audio's
length. The live session holds the pushed PCM until it is shown (64 KB/s).
Memory, not timing: machine load matters little.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from avatar.bench.harness import cpu_model

HERE = Path(__file__).resolve().parent


def _assets(d: Path) -> dict[str, Path]:
    from avatar.demo import synthetic_frames
    from avatar.models.synthetic import make_audio_encoder, make_unet
    from avatar.package import write_package

    out = {"unet": make_unet(d / "unet.onnx", mode="ave", seed=1, tiny=True),
           "enc": make_audio_encoder(d / "enc.onnx", seed=1, tiny=True)}
    if not (d / "pkg").exists():
        frames, boxes = synthetic_frames(50, width=1280, height=720, seed=0)
        write_package(d / "pkg", iter(frames), boxes, fps=25, name="hd")
    out["pkg"] = d / "pkg"
    return out


def _fake_backend(contract: Any) -> Any:
    """A face of 0.5 for every row, at once: the model's cost is not what this measures."""
    from avatar.models.synthetic import constant_face_backend

    return constant_face_backend(contract.path)


class _Drop:
    """A sink that counts frames and keeps none."""

    def __new__(cls) -> Any:
        from avatar.interfaces import Sink, SinkReport

        class Drop(Sink):
            name = "drop"

            def __init__(self) -> None:
                self.n = 0

            def open(self, info: Any) -> None:
                pass

            def write(self, frame: Any) -> None:
                self.n += 1

            def close(self, aborted: bool = False) -> Any:
                return SinkReport(frames=self.n)

        return Drop()


def run_offline(d: Path, seconds: float) -> dict[str, Any]:
    from avatar.contract import read_contract
    from avatar.engine import Renderer, RenderOptions
    from avatar.package import AvatarPackage
    from avatar.plugins import get_plugin_manager

    a = _assets(d)
    pm = get_plugin_manager()
    # both written by a separate process (making them is not the render's memory); the audio is a file, as
    # `avatar run --audio` gives it: the render decodes it chunk by chunk and reads the npy rows block by block
    wav, npy = d / f"audio-{int(seconds)}.wav", d / f"rows-{int(seconds)}.npy"
    contract = read_contract(a["unet"])
    source = pm.feature_source("npy", path=str(npy))
    sink = _Drop()
    t = time.perf_counter()
    report = Renderer(AvatarPackage.open(a["pkg"]), _fake_backend(contract), contract, source, [sink],
                      RenderOptions(batch_size=8), backend_name="constant").run(wav)
    return {"case": "offline", "audio_s": seconds, "frames": report.frames, "wall_s": time.perf_counter() - t}


def _noise(seconds: float) -> Any:
    import numpy as np

    return (0.1 * np.random.default_rng(0).standard_normal(int(seconds * 16000))).astype(np.float32)


def _noise_chunks(seconds: float, chunk_s: float = 60.0) -> Any:
    """The same noise, a minute at a time."""
    import numpy as np

    rng = np.random.default_rng(0)
    n, step = int(seconds * 16000), int(chunk_s * 16000)
    for i in range(0, n, step):
        yield (0.1 * rng.standard_normal(min(step, n - i))).astype(np.float32)


def prepare_inputs(d: Path, seconds: float) -> dict[str, Any]:
    """The offline case's audio file (16-bit WAV) and its npy rows (precomputed features, as a user would have them)."""
    import wave

    import numpy as np
    from avatar.plugins import get_plugin_manager

    a = _assets(d)
    ave = get_plugin_manager().feature_source("ave", encoder=str(a["enc"]))
    stream, rows = ave.open_stream(), []
    with wave.open(str(d / f"audio-{int(seconds)}.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        for chunk in _noise_chunks(seconds):
            w.writeframes(np.clip(np.round(chunk * 32767), -32768, 32767).astype("<i2").tobytes())
            rows.append(stream.push(chunk))
    rows.append(stream.finish())
    out = np.concatenate(rows).astype(np.float32)
    np.save(d / f"rows-{int(seconds)}.npy", out)
    return {"case": "prepare", "audio_s": seconds, "rows": int(len(out))}


def run_live(d: Path, seconds: float, run_s: float) -> dict[str, Any]:
    from avatar import compose
    from avatar.contract import read_contract
    from avatar.engine import AvatarService

    a = _assets(d)
    contract = read_contract(a["unet"])
    import avatar.engine.service as service_mod

    service_mod.open_backend = lambda name, model, options=None: (_fake_backend(contract), "constant")
    _ = compose  # (the service builds everything else through the composition root)
    pcm = _noise(seconds)
    with AvatarService(backend="cpu") as svc:
        s = svc.open_session(a["pkg"], sinks=[_Drop()], model=a["unet"], feature_options={"encoder": str(a["enc"])})
        s.push_audio(pcm, 16000)  # the whole reply at once
        s.flush()
        time.sleep(run_s)
        st = s.stats()
        s.close()
    return {"case": "live", "audio_s": seconds, "frames": st.frames, "speech_frames": st.speech_frames,
            "in_flight": st.in_flight, "lookahead_frames": st.lookahead_frames}




def _child(args: argparse.Namespace) -> None:
    d = Path(args.dir)
    if args.case == "prepare":
        r = prepare_inputs(d, args.seconds)
    elif args.case == "offline":
        r = run_offline(d, args.seconds)
    else:
        r = run_live(d, args.seconds, args.live_run_s)
    r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(r), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--offline-s", type=float, default=3600.0, help="the long offline render's audio seconds")
    ap.add_argument("--live-s", type=float, default=600.0, help="the long reply pushed into a live session")
    ap.add_argument("--short-s", type=float, default=10.0, help="the short run both are compared with")
    ap.add_argument("--live-run-s", type=float, default=15.0, help="seconds the live session runs after the push")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "memory-bounded")
    ap.add_argument("--inputs", type=Path, help="keep the prepared inputs (avatar, models, WAV, npy rows) in this "
                    "folder and reuse those already there (default: a temporary folder)")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        _child(args)
        return
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        d = str(args.inputs or tmp)
        Path(d).mkdir(parents=True, exist_ok=True)
        for case, secs in (("prepare", args.short_s), ("prepare", args.offline_s), ("offline", args.short_s),
                           ("offline", args.offline_s), ("live", args.short_s), ("live", args.live_s)):
            made = all((Path(d) / f"{k}-{int(secs)}.{x}").is_file() for k, x in (("audio", "wav"), ("rows", "npy")))
            if case == "prepare" and made:
                continue
            cmd = [sys.executable, __file__, "--case", case, "--seconds", str(secs), "--dir", d,
                   "--live-run-s", str(args.live_run_s)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            r = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
            print(r, flush=True)
            if case != "prepare":
                results.append(r)
    import platform

    doc = {"benchmark": "memory_bounded", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "machine": f"{cpu_model()}, {os.cpu_count()} CPUs, "
                      f"{platform.system()} {platform.release()}",
           "avatar": "1280x720, 50 frames", "backend": "constant (no model cost)", "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    lines = ["# Peak RSS against audio length", "",
             "Produced by `python benchmarks/memory_bounded.py`; each row is a fresh process; 1280x720 avatar; "
             "a constant stand-in backend (memory, not model cost, is measured); frames are dropped by the sink. "
             "The offline render reads a WAV file chunk by chunk and its npy rows a block at a time; the live PCM "
             "held (64 KB/s) is part of its figures: the rest is bounded by the look-ahead.", "",
             f"Machine: {doc['machine']}; run {doc['created']}.", "",
             "| case | audio s | frames | peak RSS MiB | wall s |", "|---|---:|---:|---:|---:|"]
    for r in results:
        wall = f"{r['wall_s']:.0f}" if "wall_s" in r else ""
        lines.append(f"| {r['case']} | {r['audio_s']:g} | {r['frames']} | {r['peak_rss_mb']:.0f} | {wall} |")
    by = {(r["case"], r["audio_s"]): r["peak_rss_mb"] for r in results}
    lines += ["", f"Offline: {by[('offline', args.offline_s)] - by[('offline', args.short_s)]:+.0f} MiB for "
              f"{args.offline_s:g} s against {args.short_s:g} s. Live: "
              f"{by[('live', args.live_s)] - by[('live', args.short_s)]:+.0f} MiB for {args.live_s:g} s pushed at once "
              f"against {args.short_s:g} s (target: within 300 MB)."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
