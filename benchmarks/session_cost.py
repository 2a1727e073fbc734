"""What a session costs: CPU ms per delivered frame by stage, and live against model-only, in one run.

Per round (rounds interleave every configuration, so a change in the
machine's load hits all of them alike), for each thread budget (``off``: every
library sizes its own pool; ``on``: :class:`avatar.engine.threads.ThreadBudget`):

(a) **N sessions of one avatar** (``--sessions 1,2,4``) in one
    :class:`~avatar.engine.AvatarService`, each writing H.264 through the file
    sink: ``--seconds`` idle, then ``--seconds`` of real speech pushed in 20 ms
    chunks in real time. CPU ms per delivered frame by stage (thread CPU time,
    the backend pool's included; see :mod:`avatar.engine.cpu`) for idle and
    speech frames, the process's whole CPU per frame, speech frames rendered
    per session (their spread is the fairness figure), and the backend's own
    time per frame live.
(b) **model-only**: the same backend and options, batch 1, alone: frames/s.
    Live speech frames/s of one session against ``min(fps, model-only fps)``
    (a backend faster than real time cannot show more than the stream's fps).

The targets (issue 19): idle ≤ 1 ms CPU per session-frame without the encoder;
speech ≤ 5 ms without the model call and the encoder; live ≥ 85 % of
model-only; two sessions' speech frames within 20 % of each other.

    flock /tmp/avatar-bench.lock python benchmarks/session_cost.py \\
        --model ../shared/data/sanders/model/unet_sanders_ave.onnx --backend openvino --precision bf16 \\
        --sessions 1,2,4 --seconds 10 --rounds 3 --out benchmarks/results/session-cost-cpu-2core
    python benchmarks/session_cost.py --tiny --sessions 1,2 --seconds 2 --rounds 1     # a smoke run

Timing figures need a quiet machine: the script records the load average at
the start and the end of the run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from avatar.bench.harness import machine_summary, write_result

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("AVATAR_SHARED_DATA", ROOT.parent / "shared" / "data"))  # the test data beside the checkout
STAGES = ("decode", "features", "visual", "inference", "composite", "encode")




def speech_pcm(seconds: float, workdir: Path) -> np.ndarray:
    from avatar.audio import load_audio
    from avatar.demo import speechlike_audio

    real = DATA / "audio" / "talk_hb.wav"
    pcm = load_audio(real, 16000) if real.exists() else speechlike_audio(max(seconds, 1.0), seed=2)
    reps = int(np.ceil(seconds * 16000 / len(pcm)))
    return np.tile(pcm, reps)[: int(seconds * 16000)].astype(np.float32)


def assets(args: argparse.Namespace, workdir: Path) -> dict[str, Path]:
    """The avatar package, the UNet and the AVE encoder: given, the real ones, or tiny seeded ones (--tiny)."""
    from avatar.models.synthetic import make_audio_encoder, make_unet

    out: dict[str, Path] = {}
    if args.tiny:
        from avatar.demo import synthetic_frames
        from avatar.package import write_package

        frames, boxes = synthetic_frames(50, width=320, height=240)
        out["avatar"] = write_package(workdir / "tiny", iter(frames), boxes, fps=25, name="tiny", preset="ultrafast")
        out["model"] = make_unet(workdir / "unet.onnx", mode="ave", seed=1, tiny=True)
        out["encoder"] = make_audio_encoder(workdir / "enc.onnx", seed=1, tiny=True)
        return out
    if args.avatar:
        out["avatar"] = Path(args.avatar)
    else:
        from avatar.importers import import_synctalk

        out["avatar"] = import_synctalk(DATA / "sanders", workdir / "sanders")
    out["model"] = Path(args.model or DATA / "sanders" / "model" / "unet_sanders_ave.onnx")
    # the real AVE encoder's weights are not public: the same network, seeded (the same cost)
    out["encoder"] = Path(args.encoder) if args.encoder else make_audio_encoder(workdir / "ave.onnx", seed=0)
    return out


# --------------------------------------------------------------------------- (b) model-only


def model_only_fps(args: argparse.Namespace, a: dict[str, Path], budget: Any) -> float:
    """Frames/s of the backend alone at batch 1: as many calls in flight as it runs at once (its
    ``concurrency``; one per lane), timed over a few seconds after a warm-up.

    With lanes, the same budget with one lane is measured too and the faster of the two is the figure
    (the live ratio is held against the backend's best batch-1 throughput, not the lanes' own).
    """
    from dataclasses import replace

    from avatar.bench.model import throughput_in_flight
    from avatar.interfaces import BackendOptions
    from avatar.models.synthetic import sample_audio, sample_visual
    from avatar.render import open_backend

    variants = [budget] if budget is None or budget.lanes == 1 else [budget, replace(budget, lanes=1)]
    best = 0.0
    for b in variants:
        bopts = BackendOptions(precision=args.precision, max_batch=args.batch, precision_explicit=True)
        if b is not None:
            bopts = b.backend_options(args.backend, bopts)
        backend, _ = open_backend(args.backend, a["model"], bopts)
        try:
            vis = next(t for t in backend.inputs if len(t.shape) == 4 and t.shape[1] == 6)
            feeds = {vis.name: sample_visual(1).astype(vis.dtype), "audio": sample_audio("ave", 1)}
            for _ in range(3):
                backend.run(feeds)
            best = max(best, throughput_in_flight(backend, feeds, max(2.0, args.seconds / 2), min_calls=5))
        finally:
            backend.close()
    return best


def offline_fps(args: argparse.Namespace, a: dict[str, Path], pcm: np.ndarray, workdir: Path) -> dict[str, float]:
    """The same speech rendered offline (``avatar run``'s path: its thread budget, batch ``--batch``,
    H.264 file): frames/s end to end and the real-time factor."""
    from avatar.interfaces import BackendOptions
    from avatar.render import render

    report = render(a["avatar"], pcm, sinks=[("file", {"path": str(workdir / "offline.mp4")})], model=a["model"],
                    features="ave", feature_options={"encoder": str(a["encoder"])}, backend=args.backend,
                    backend_options=BackendOptions(precision=args.precision, max_batch=args.batch,
                                                   precision_explicit=True),
                    batch_size=args.batch, threads="auto")  # (avatar run's default: the thread budget)
    d = report.to_dict()
    return {"fps": float(d["frames_per_s"]), "realtime_factor": float(d["realtime_factor"])}


# --------------------------------------------------------------------------- (a) N live sessions


def _push_realtime(session: Any, pcm: np.ndarray, stop: threading.Event) -> None:
    chunk = 320  # 20 ms
    t0 = time.monotonic()
    for k, i in enumerate(range(0, len(pcm), chunk)):
        if stop.is_set():
            return
        delay = t0 + k * 0.02 - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        session.push_audio(pcm[i : i + chunk], 16000)
    session.flush()


def run_sessions(args: argparse.Namespace, a: dict[str, Path], n: int, budget: Any, workdir: Path,
                 pcm: np.ndarray) -> dict[str, Any]:
    from avatar.engine import AvatarService, ServiceOptions
    from avatar.engine.cpu import StageCpu
    from avatar.interfaces import BackendOptions

    opts = ServiceOptions(backend=args.backend, batch_size=args.batch, threads=budget,
                          backend_options=BackendOptions(precision=args.precision, max_batch=args.batch,
                                                         precision_explicit=True))
    with AvatarService(opts) as svc:
        sessions = [svc.open_session(a["avatar"], model=a["model"], feature_options={"encoder": str(a["encoder"])},
                                     sinks=[("file", {"path": str(workdir / f"s{i}.mp4")})], walk_start=37 * i)
                    for i in range(n)]
        t0, c0 = time.monotonic(), time.process_time()
        time.sleep(args.seconds)  # idle
        stop = threading.Event()
        feeders = [threading.Thread(target=_push_realtime, args=(s, pcm, stop)) for s in sessions]
        for f in feeders:
            f.start()
        for f in feeders:
            f.join()
        time.sleep(1.5)  # the tail of the speech reaches the outputs
        wall, cpu_all = time.monotonic() - t0, time.process_time() - c0
        total = StageCpu()
        frames = speech = 0
        per_session = []
        for s in sessions:
            total.merge(s.times.cpu)
            frames += s.frames
            speech += s.speech_frames
            per_session.append(s.speech_frames)
        enc = sessions[0].source.batcher.stats.to_dict() if hasattr(sessions[0].source, "batcher") else {}
        stats = svc.stats()["backends"]
        run_s = sum(v["run_s"] for v in stats.values())
        items = sum(v["items"] for v in stats.values())
        lanes = max((v.get("lanes", 1) for v in stats.values()), default=1)
    per = total.per_frame_ms({"speech": speech, "idle": frames - speech})
    speech_s = len(pcm) / 16000
    return {
        "sessions": n, "frames": frames, "speech_frames": speech, "wall_s": wall,
        "cpu_ms_per_frame": per,
        "process_cpu_ms_per_frame": 1000 * cpu_all / max(1, frames),
        "speech_frames_per_session": per_session,
        "speech_fps_per_session": [k / speech_s for k in per_session],
        # wall ms per frame of the backend's calls, calls in flight together counted once (lanes)
        "backend_ms_per_frame_live": 1000 * run_s / items / lanes if items else None,
        "lanes": lanes,
        "share_ratio": min(per_session) / max(per_session) if max(per_session) else 0.0,
        # the shared audio encoder: calls, requests (sessions' pushes), mean windows per call
        "encoder": {k: enc.get(k) for k in ("calls", "requests", "shared_calls", "mean_batch")},
    }


# --------------------------------------------------------------------------- report


def targets(row: dict[str, Any]) -> dict[str, float]:
    per = row["cpu_ms_per_frame"]
    idle = per.get("idle", {})
    sp = per.get("speech", {})
    return {
        "idle_ms_no_encode": sum(v for k, v in idle.items() if k not in ("encode", "total")),
        "speech_ms_no_model_no_encode": sum(v for k, v in sp.items() if k not in ("inference", "encode", "total")),
    }


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"# Session cost — {result['backend']} {result['precision']}, {m['cpu']} ({m['cores']} cores)",
        "",
        f"Model `{result['model']}`, avatar `{result['avatar']}` ({result['avatar_size']}), {result['rounds']} "
        f"round(s) of {result['seconds']} s idle + {result['seconds']} s speech per configuration, interleaved. "
        f"Load average at start {m['load_start']}, at end {m['load_end']}"
        + (" — **a loaded machine: the figures must be re-measured on a quiet one.**" if max(m['load_start'][0], m['load_end'][0]) > 1.5 else "."),
        "",
        "## CPU ms per delivered frame by stage (medians over rounds, all sessions together)",
        "",
        "| budget | sessions | kind | " + " | ".join(STAGES)
        + " | total | without model & encoder | process CPU ms/frame | encoder requests/call |",
        "|---|---:|---|" + "---:|" * (len(STAGES) + 4),
    ]
    for r in result["summary"]["sessions"]:
        for kind in ("idle", "speech"):
            row = r["cpu_ms_per_frame"].get(kind)
            if not row:
                continue
            rest = r["idle_ms_no_encode"] if kind == "idle" else r["speech_ms_no_model_no_encode"]
            lines.append(f"| {r['budget']} | {r['sessions']} | {kind} | "
                         + " | ".join(f"{row.get(s, 0):.2f}" for s in STAGES)
                         + f" | {row['total']:.2f} | {rest:.2f} | {r['process_cpu_ms_per_frame']:.2f}"
                         + f" | {r['encoder_requests_per_call']:.2f} |")
    lines += ["", "## Live against model-only (one session) and fairness (two sessions)", "",
              "| budget | model-only fps (batch 1) | live speech fps | live / min(fps, model-only) | backend ms/frame live vs alone | 2-session share (min/max) |",
              "|---|---:|---:|---:|---:|---:|"]
    for b in result["summary"]["live"]:
        lines.append(f"| {b['budget']} | {b['model_only_fps']:.1f} | {b['live_speech_fps']:.1f} | {b['live_ratio']:.2f} | "
                     f"{b['backend_ms_live']:.1f} vs {1000 / b['model_only_fps']:.1f} | "
                     + (f"{b['share_2']:.2f}" if b.get("share_2") is not None else "–") + " |")
    off = result["summary"].get("offline")
    if off:
        lines += ["", "## Live against offline (the same speech, backend and precision, this run)", "",
                  "| | frames/s | real-time factor |", "|---|---:|---:|",
                  f"| offline render (`avatar run`, batch {result['batch']}, H.264 file) | {off['fps']:.1f} | "
                  f"{off['realtime_factor']:.2f}x |"]
        for b in result["summary"]["live"]:
            lines.append(f"| one live session, budget {b['budget']} (speech frames shown per second) | "
                         f"{b['live_speech_fps']:.1f} | {b['live_speech_per_s']:.2f}x |")
    return "\n".join(lines) + "\n"


def summarize(raw: list[dict[str, Any]], fps: float) -> dict[str, Any]:
    rows = []
    keys = sorted({(r["budget"], r["sessions"]) for r in raw if r["kind"] == "sessions"})
    for budget, n in keys:
        rs = [r for r in raw if r["kind"] == "sessions" and r["budget"] == budget and r["sessions"] == n]
        per: dict[str, dict[str, float]] = {}
        for kind in ("idle", "speech"):
            have = [r["cpu_ms_per_frame"][kind] for r in rs if kind in r["cpu_ms_per_frame"]]
            if have:
                per[kind] = {k: statistics.median(h[k] for h in have) for k in have[0]}
        row = {"budget": budget, "sessions": n, "cpu_ms_per_frame": per,
               "process_cpu_ms_per_frame": statistics.median(r["process_cpu_ms_per_frame"] for r in rs),
               "speech_fps_per_session": statistics.median(statistics.mean(r["speech_fps_per_session"]) for r in rs),
               "share_ratio": statistics.median(r["share_ratio"] for r in rs),
               "backend_ms_per_frame_live": statistics.median(r["backend_ms_per_frame_live"] or 0 for r in rs),
               "encoder_requests_per_call": statistics.median(
                   (r["encoder"]["requests"] or 0) / max(1, r["encoder"]["calls"] or 0) for r in rs)}
        row.update(targets(row))
        rows.append(row)
    live = []
    for budget in sorted({r["budget"] for r in raw if "budget" in r}):
        mo = statistics.median(r["fps"] for r in raw if r["kind"] == "model_only" and r["budget"] == budget)
        one = next((x for x in rows if x["budget"] == budget and x["sessions"] == 1), None)
        two = next((x for x in rows if x["budget"] == budget and x["sessions"] == 2), None)
        if one is None:
            continue
        live.append({"budget": budget, "model_only_fps": mo, "live_speech_fps": one["speech_fps_per_session"],
                     "live_speech_per_s": one["speech_fps_per_session"] / fps,
                     "live_ratio": one["speech_fps_per_session"] / min(fps, mo),
                     "backend_ms_live": one["backend_ms_per_frame_live"],
                     "share_2": two["share_ratio"] if two else None})
    off = [r for r in raw if r["kind"] == "offline"]
    offline = ({"fps": statistics.median(r["fps"] for r in off),
                "realtime_factor": statistics.median(r["realtime_factor"] for r in off)} if off else None)
    return {"sessions": rows, "live": live, "offline": offline}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny seeded models and a small synthetic avatar (a smoke run)")
    p.add_argument("--avatar", help="avatar package (default: ../shared/data/sanders, imported)")
    p.add_argument("--model", help="UNet-328 ONNX (default: the trained sanders model)")
    p.add_argument("--encoder", help="AVE encoder ONNX (default: a seeded full-size one)")
    p.add_argument("--backend", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--sessions", default="1,2,4")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--budget", choices=("both", "on", "off"), default="both")
    p.add_argument("--no-offline", dest="offline", action="store_false",
                   help="skip the offline render of the same speech (live against offline)")
    p.add_argument("--out", help="write OUT.json and OUT.md")
    args = p.parse_args()

    import cv2

    from avatar.engine.threads import ThreadBudget

    default_cv2 = cv2.getNumThreads()
    load_start = os.getloadavg()
    counts = [int(x) for x in args.sessions.split(",")]
    budgets = {"off": None, "on": ThreadBudget.plan(gpu=args.backend in ("onnx-cuda", "tensorrt"))}
    if args.budget != "both":
        budgets = {args.budget: budgets[args.budget]}
    raw: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="session-cost-") as tmp:
        workdir = Path(tmp)
        a = assets(args, workdir)
        pcm = speech_pcm(args.seconds, workdir)
        from avatar.package import AvatarPackage

        with AvatarPackage.open(a["avatar"]) as pkg:
            size, fps = f"{pkg.width}x{pkg.height}, {pkg.frame_count} frames", float(pkg.fps)
        for rnd in range(args.rounds):
            for name, budget in budgets.items():
                if budget is None:
                    cv2.setNumThreads(default_cv2)
                if name == next(iter(budgets)) and args.offline:  # once per round (the render sizes its own threads)
                    raw.append({"kind": "offline", "round": rnd, **offline_fps(args, a, pcm, workdir)})
                    print(f"round {rnd} offline: {raw[-1]}", flush=True)
                raw.append({"kind": "model_only", "round": rnd, "budget": name,
                            "fps": model_only_fps(args, a, budget)})
                for n in counts:
                    r = run_sessions(args, a, n, budget, workdir, pcm)
                    raw.append({"kind": "sessions", "round": rnd, "budget": name, **r})
                    print(f"round {rnd} budget {name} sessions {n}: speech fps/session "
                          f"{[round(x, 1) for x in r['speech_fps_per_session']]}, cpu {r['cpu_ms_per_frame']}", flush=True)
    result = {
        "machine": machine_summary(load_start),
        "backend": args.backend, "precision": args.precision, "batch": args.batch, "model": Path(a["model"]).name,
        "avatar": Path(a["avatar"]).name, "avatar_size": size, "seconds": args.seconds, "rounds": args.rounds,
        "raw": raw, "summary": summarize(raw, fps),
    }
    md = markdown(result)
    print(md)
    write_result(args.out, result, md)


if __name__ == "__main__":
    main()
