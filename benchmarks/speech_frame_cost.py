"""CPU time of a speech frame outside the model and the output encoder, this checkout against a baseline commit.

The feature stage of a live session (``Session._features``) pushes PCM as it
arrives (20 ms chunks by default) into an ``ave`` row stream and a
:class:`~avatar.windows.WindowAssembler`. This measures its **thread CPU time**
(:func:`time.thread_time`: the calling thread only, so other load on the
machine changes the figures less than wall time would) per video frame, in
four parts:

* ``mel``: the streaming mel spectrogram (:class:`avatar.mel.MelStream`) alone;
* ``stage w/o encoder``: mel, encoder windows, the shared-encoder front
  (:class:`avatar.batching.CallBatcher`) and the model windows, with the
  encoder call replaced by zeros: the per-frame cost around the encoder;
* ``stage``: the same with the real encoder (ONNX Runtime, ``--threads``);
* ``visual input``: the model's visual input of one face (``vision.visual_batch``);
* ``output to face + composite (720p)``: the model output to a uint8 face and
  the face pasted into a 1280x720 frame converted from I420, as
  ``composite_faces`` does (before: into a copy of the read-only frame);
* ``encoder alone``: CPU ms per window at batch 1 and 4 (process CPU time);
  with ``--bf16`` also on OpenVINO bf16 (ungated: informational only).

The baseline is the code of ``core/mel.py``, ``core/windows.py`` and
``plugins/features/ave.py`` and ``core/vision.py`` at ``--baseline`` (read with ``git show``), loaded
beside this checkout's; both run in the same process, interleaved repeat by
repeat, and their outputs are compared (they must agree within 1e-5; they are
in fact identical).

    python benchmarks/speech_frame_cost.py --seconds 20 --repeats 7 --bf16 --out benchmarks/results/speech-frame-cost-cpu-2core
    python benchmarks/speech_frame_cost.py --seconds 2 --repeats 2 --tiny     # a smoke run

The encoder is the full-size AVE network with seeded weights (the real
weights are not public; the cost is the same); ``--tiny`` uses the small test
encoder. Timing figures need a quiet machine: the load average is recorded.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np

from avatar.bench.harness import cpu_model as cpu_name

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("AVATAR_SHARED_DATA", ROOT.parent / "shared" / "data"))
#: main before the feature-stage rework (issue 19): the default baseline
BASELINE = "2a868ea"
FPS_SAMPLES = 640  # 16 kHz samples per 25 fps frame




def load_baseline(ref: str, workdir: Path) -> dict[str, ModuleType]:
    """The feature-stage modules at commit ``ref``, importable beside the current ones."""

    def show(path: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:{path}"], capture_output=True, text=True,
                                  check=True).stdout
        except (OSError, subprocess.CalledProcessError) as exc:
            raise SystemExit(f"cannot read {path} at {ref} (a git checkout is needed for the baseline): {exc}") from None

    sources = {
        "_fc_base_mel": show("core/mel.py").replace("from .errors import", "from avatar.errors import"),
        "_fc_base_windows": show("core/windows.py").replace("from .interfaces import", "from avatar.interfaces import"),
        "_fc_base_ave": show("plugins/features/ave.py").replace("from avatar.mel import", "from _fc_base_mel import"),
        "_fc_base_vision": show("core/vision.py").replace("from .errors import", "from avatar.errors import"),
    }
    for name, text in sources.items():
        (workdir / f"{name}.py").write_text(text)
    sys.path.insert(0, str(workdir))
    mods = {name: importlib.import_module(name) for name in sources}
    return {"mel": mods["_fc_base_mel"], "windows": mods["_fc_base_windows"], "ave": mods["_fc_base_ave"],
            "vision": mods["_fc_base_vision"], "writable_frames": False}


def cv2_i420(bgr: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV_I420)


def current() -> dict[str, ModuleType]:
    import avatar.mel
    import avatar.vision
    import avatar.windows
    import avatar_plugins.features.ave

    return {"mel": avatar.mel, "windows": avatar.windows, "ave": avatar_plugins.features.ave, "vision": avatar.vision,
            "writable_frames": True}


def speech(seconds: float) -> np.ndarray:
    from avatar.audio import load_audio
    from avatar.demo import speechlike_audio

    real = DATA / "audio" / "talk_hb.wav"
    pcm = load_audio(real, 16000) if real.exists() else speechlike_audio(max(seconds, 1.0), seed=2)
    reps = int(np.ceil(seconds * 16000 / len(pcm)))
    return np.tile(pcm, reps)[: int(seconds * 16000)].astype(np.float32)


def run_mel(mods: dict[str, ModuleType], pcm: np.ndarray, chunk: int) -> np.ndarray:
    m = mods["mel"].MelStream()
    rows = [m.push(pcm[i : i + chunk]) for i in range(0, len(pcm), chunk)]
    return np.concatenate([*rows, m.finish()])


def run_stage(mods: dict[str, ModuleType], source: Any, pcm: np.ndarray, chunk: int) -> np.ndarray:
    """What ``Session._features`` does per chunk: rows now final, then the windows now final."""
    stream, asm = source.open_stream(), mods["windows"].WindowAssembler(source)
    out = []
    for i in range(0, len(pcm), chunk):
        rows = stream.push(pcm[i : i + chunk])
        if len(rows):
            out.extend(w for _, w in asm.push(rows))
    out.extend(w for _, w in asm.push(stream.finish()))
    out.extend(w for _, w in asm.finish())
    return np.stack(out)


def openvino_bf16(encoder: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    """CPU ms per window of the encoder alone on OpenVINO bf16 (process CPU: OpenVINO may run on its own thread)."""
    from avatar.interfaces import BackendOptions
    from avatar.plugins import get_plugin_manager

    try:
        cls = get_plugin_manager().backend_class("openvino")
        be = cls(encoder, BackendOptions(precision="bf16", precision_explicit=True, max_batch=4, threads=args.threads,
                                         extra={"allow_failed_gate": True}))
    except Exception as exc:  # not installed, or no bf16 on this CPU: the row is left out
        print(f"openvino bf16 not measured: {exc}", file=sys.stderr)
        return {}
    out: dict[str, list[float]] = {}
    rng = np.random.default_rng(0)
    for b in (1, 4):
        feeds = {be.inputs[0].name: rng.standard_normal((b, 1, 80, 16)).astype(np.float32)}
        n = max(1, 100 // b)
        for rep in range(args.warmup + args.repeats):
            t = time.process_time()
            for _ in range(n):
                be.run(feeds)
            if rep >= args.warmup:
                out.setdefault(f"{b} (openvino bf16, ungated)", []).append((time.process_time() - t) * 1000.0 / (n * b))
    be.close()
    return out


def run_frames(mods: dict[str, Any], frames: int, stored: np.ndarray, box: tuple[int, int, int, int],
               faces: np.ndarray, outputs: np.ndarray, part: str) -> np.ndarray:
    """Per-frame work after the features for ``frames`` speech frames: the model's visual input, or the
    model output to a face and the face pasted into a 720p frame converted from the store's I420."""
    import cv2

    v = mods["vision"]
    last = None
    for i in range(frames):
        k = i % len(faces)
        if part == "visual":
            last = v.visual_batch(faces[k : k + 1])
            continue
        face = v.output_to_uint8(outputs[k : k + 1])[0]
        frame = cv2.cvtColor(stored, cv2.COLOR_YUV2BGR_I420)  # FrameStore.frame: new memory either way
        if mods["writable_frames"]:  # composite_faces now: paste into it
            last = v.composite(frame, box, face, interpolation="area", inplace=True)
        else:  # before: the frame was read-only, composite() copied it
            frame.setflags(write=False)
            last = v.composite(frame, box, face, interpolation="area")
    return np.asarray(last)


def cpu_ms(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.thread_time()
    result = fn()
    return (time.thread_time() - t) * 1000.0, result


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", default=BASELINE, help=f"git commit of the old code (default {BASELINE})")
    p.add_argument("--seconds", type=float, default=20.0, help="speech per repeat")
    p.add_argument("--chunk", type=int, default=320, help="samples per push (320: 20 ms)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="encoder intra-op threads (the thread budget's 1)")
    p.add_argument("--encoder", help="AVE encoder ONNX (default: a seeded full-size one)")
    p.add_argument("--tiny", action="store_true", help="the small test encoder (a smoke run)")
    p.add_argument("--bf16", action="store_true",
                   help="also time the encoder alone on OpenVINO bf16 (ungated: its rows differ; informational)")
    p.add_argument("--out", help="write OUT.json and OUT.md")
    args = p.parse_args()

    from avatar.models.synthetic import make_audio_encoder

    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="feature-cost-") as tmp:
        workdir = Path(tmp)
        impls = {"baseline": load_baseline(args.baseline, workdir), "current": current()}
        encoder = Path(args.encoder) if args.encoder else make_audio_encoder(workdir / "ave.onnx", seed=0, tiny=args.tiny)
        pcm = speech(args.seconds)
        frames = -(-len(pcm) // FPS_SAMPLES)
        sources = {k: m["ave"].AveSource(encoder=encoder, threads=args.threads) for k, m in impls.items()}
        stubbed = {k: m["ave"].AveSource(encoder=encoder, threads=args.threads) for k, m in impls.items()}
        for s in stubbed.values():  # the encoder call only: the batcher and everything around it still run
            s.batcher._fn = lambda x: np.zeros((len(x), 512), np.float32)
        rng = np.random.default_rng(1)
        stored = cv2_i420(rng.integers(0, 256, (720, 1280, 3), np.uint8))
        box = (490, 120, 810, 440)
        faces = rng.integers(0, 256, (8, 320, 320, 3), np.uint8)
        outputs = rng.random((8, 3, 320, 320), dtype=np.float32)
        parts: dict[str, Callable[[str], Callable[[], Any]]] = {
            "visual input": lambda k: lambda: run_frames(impls[k], frames, stored, box, faces, outputs, "visual"),
            "output to face + composite (720p)":
                lambda k: lambda: run_frames(impls[k], frames, stored, box, faces, outputs, "composite"),
            "mel": lambda k: lambda: run_mel(impls[k], pcm, args.chunk),
            "stage w/o encoder": lambda k: lambda: run_stage(impls[k], stubbed[k], pcm, args.chunk),
            "stage": lambda k: lambda: run_stage(impls[k], sources[k], pcm, args.chunk),
        }
        samples: dict[str, dict[str, list[float]]] = {part: {k: [] for k in impls} for part in parts}
        diffs: dict[str, float] = {}
        for rep in range(args.warmup + args.repeats):
            outs: dict[str, dict[str, np.ndarray]] = {}
            for part, make in parts.items():
                order = list(impls) if rep % 2 == 0 else list(reversed(impls))  # alternate who goes first
                for k in order:
                    ms, out = cpu_ms(make(k))
                    outs.setdefault(part, {})[k] = out
                    if rep >= args.warmup:
                        samples[part][k].append(ms / frames)
            for part, o in outs.items():
                d = float(np.abs(o["baseline"] - o["current"]).max()) if o["baseline"].shape == o["current"].shape else float("inf")
                diffs[part] = max(diffs.get(part, 0.0), d)
        enc = sources["current"]
        rng = np.random.default_rng(0)
        encoder_ms: dict[str, list[float]] = {}
        for b in (1, 4):
            x = rng.standard_normal((b, 1, 80, 16)).astype(np.float32)
            n = max(1, 100 // b)
            for rep in range(args.warmup + args.repeats):
                t = time.process_time()  # the whole process: an encoder with --threads > 1 has a pool
                for _ in range(n):
                    enc.encode(x)
                if rep >= args.warmup:
                    encoder_ms.setdefault(f"{b} (onnxruntime fp32, as the source runs it)", []).append(
                        (time.process_time() - t) * 1000.0 / (n * b))
        for s in [*sources.values(), *stubbed.values()]:
            s.close()
        if args.bf16:
            encoder_ms.update(openvino_bf16(encoder, args))

    rows = []
    for part, by in samples.items():
        ratios = [c / b for b, c in zip(by["baseline"], by["current"])]
        rows.append({"part": part, "baseline_median": statistics.median(by["baseline"]), "baseline_p90": pct(by["baseline"], 90),
                     "current_median": statistics.median(by["current"]), "current_p90": pct(by["current"], 90),
                     "ratio_median": statistics.median(ratios), "max_abs_diff": diffs[part]})
    result = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "load_start": [round(x, 2) for x in load_start],
                    "load_end": [round(x, 2) for x in os.getloadavg()]},
        "baseline": args.baseline, "seconds": args.seconds, "chunk": args.chunk, "repeats": args.repeats,
        "warmup": args.warmup, "threads": args.threads, "encoder": "tiny" if args.tiny else (args.encoder or "seeded full-size AVE"),
        "frames_per_repeat": frames, "parts": rows,
        "encoder_ms_per_window": {str(b): {"median": statistics.median(v), "p90": pct(v, 90)} for b, v in encoder_ms.items()},
    }
    md = markdown(result)
    print(md)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
        Path(args.out + ".md").write_text(md)
    worst = max(r["max_abs_diff"] for r in rows)
    if worst > 1e-5:
        raise SystemExit(f"the current feature stage differs from the baseline by {worst:g} (more than 1e-5)")


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"# A speech frame outside the model and the output encoder — CPU per frame, {r['baseline']} against this checkout",
        "",
        f"{m['cpu']} ({m['cores']} cores). {r['seconds']:g} s of speech pushed in {r['chunk']}-sample chunks, "
        f"{r['frames_per_repeat']} frames per repeat, {r['warmup']} warm-up + {r['repeats']} repeats, interleaved; "
        f"encoder: {r['encoder']}, {r['threads']} thread(s). Thread CPU time (the calling thread). "
        f"Load average at start {m['load_start']}, at end {m['load_end']}."
        + (" **A loaded machine: CPU time moves less than wall time, but re-measure on a quiet one.**"
           if max(m["load_start"][0], m["load_end"][0]) > (m["cores"] or 1) else ""),
        "",
        "| part | baseline ms/frame (median, p90) | current ms/frame (median, p90) | current / baseline | max abs diff |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in r["parts"]:
        lines.append(f"| {row['part']} | {row['baseline_median']:.3f}, {row['baseline_p90']:.3f} | "
                     f"{row['current_median']:.3f}, {row['current_p90']:.3f} | {row['ratio_median']:.2f} | "
                     f"{row['max_abs_diff']:.1e} |")
    lines += ["", "| encoder alone, batch | CPU ms per window (median, p90) |", "|---|---:|"]
    for b, v in r["encoder_ms_per_window"].items():
        lines.append(f"| {b} | {v['median']:.3f}, {v['p90']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
