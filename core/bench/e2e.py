"""End-to-end benchmark parts: the avatar, the audio, a real render, the upstream-style baseline.

The end-to-end run is a real :func:`avatar.render.render` (avatar + speech →
``file`` sink, H.264 + AAC) and reports its wall time, per-stage busy time,
frames/s and real-time factor.

The baseline is what the upstream SyncTalk_2D inference script does, measured
on the same machine, avatar frames, audio and weights: features for the whole
clip first, then a synchronous loop that, for each frame in turn, reads the
avatar image and its landmarks from disk, crops and masks, runs the network on
one frame (PyTorch eager when available, else ONNX Runtime at batch 1), pastes
the face back and writes the frame with ``cv2.VideoWriter``. Nothing overlaps.
(Upstream then muxes the audio with an ``ffmpeg`` call; the baseline leaves
that out, which only flatters it.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AvatarPackageError, ConfigError

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
BASELINE_STEPS = ("decode", "preprocess", "inference", "composite", "encode")


# --------------------------------------------------------------------------- avatar


@dataclass(frozen=True)
class BenchAvatar:
    """The avatar a benchmark renders, and the SyncTalk_2D folder the baseline reads (if any)."""

    package: Path
    #: a SyncTalk_2D folder (``full_body_img/``, ``landmarks/``) of the same frames, or None
    synctalk: Path | None
    kind: str  # "sanders" | "synthetic" | "synctalk" | "package"
    frames: int
    width: int
    height: int

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "package": str(self.package),
            "synctalk_folder": str(self.synctalk) if self.synctalk else None,
            "frames": self.frames,
            "width": self.width,
            "height": self.height,
        }


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:12]


def write_synthetic_synctalk(dst: Path, frames: int, *, width: int = 1280, height: int = 720, seed: int = 0) -> Path:
    """A SyncTalk_2D-style folder of a drawn head: ``full_body_img/i.jpg`` and 110-point ``landmarks/i.lms``.

    Only landmark points 1, 31 and 52 (the ones the crop rule reads) are
    meaningful; the rest sit at the box centre.
    """
    import cv2

    from ..demo import synthetic_frames

    imgs, boxes = synthetic_frames(frames, width=width, height=height, seed=seed)
    (dst / "full_body_img").mkdir(parents=True, exist_ok=True)
    (dst / "landmarks").mkdir(parents=True, exist_ok=True)
    for i, (img, (x1, y1, x2, y2)) in enumerate(zip(imgs, boxes)):
        cv2.imwrite(str(dst / "full_body_img" / f"{i}.jpg"), img)
        pts = np.tile([(x1 + x2) / 2.0, (y1 + y2) / 2.0], (110, 1))
        pts[1] = (x1, (y1 + y2) / 2.0)
        pts[31] = (x2, (y1 + y2) / 2.0)
        pts[52] = ((x1 + x2) / 2.0, y1)
        (dst / "landmarks" / f"{i}.lms").write_text("\n".join(f"{x:.1f} {y:.1f}" for x, y in pts) + "\n")
    return dst


def default_sanders() -> Path | None:
    """The real SyncTalk_2D dataset beside the repository, if present (``AVATAR_SHARED_DATA`` overrides)."""
    import os

    base = os.environ.get("AVATAR_SHARED_DATA")
    root = Path(base) if base else Path(__file__).resolve().parents[3] / "shared" / "data"
    d = root / "sanders"
    return d if (d / "full_body_img").is_dir() and (d / "landmarks").is_dir() else None


def default_speech() -> Path | None:
    """The real speech clip beside the repository, if present."""
    s = default_sanders()
    if s is None:
        return None
    f = s.parent / "audio" / "talk_hb.wav"
    return f if f.is_file() else None


def prepare_avatar(avatar: str | Path | None, cache: Path, *, frames: int, seed: int = 0) -> BenchAvatar:
    """The benchmark avatar: a package as given, a SyncTalk_2D folder (imported), sanders, or synthetic.

    SyncTalk_2D folders are imported once (first ``frames`` frames) into
    ``cache`` and reused.
    """
    from ..importers import import_synctalk
    from ..package import AvatarPackage

    if frames < 2:
        raise ConfigError(f"--avatar-frames must be at least 2, got {frames}")
    kind = "synctalk"
    src: Path | None
    if avatar is not None:
        src = Path(avatar)
        if (src / "avatar.json").is_file():
            with AvatarPackage.open(src) as p:
                return BenchAvatar(src, None, "package", p.frame_count, p.width, p.height)
        if not (src / "full_body_img").is_dir():
            raise AvatarPackageError(
                f"{src} is neither an avatar package (avatar.json) nor a SyncTalk_2D folder (full_body_img/, landmarks/); "
                "pass one of those to --avatar"
            )
    else:
        src = default_sanders()
        kind = "sanders"
        if src is None:
            kind = "synthetic"
            src = cache / f"synthetic-{frames}-{seed}"
            if not (src / "landmarks" / f"{frames - 1}.lms").is_file():
                log.info("writing a synthetic SyncTalk_2D-style avatar to %s", src)
                write_synthetic_synctalk(src, frames, seed=seed)
    pkg = cache / f"avatar-{kind}-{_key(src.resolve(), frames)}"
    if not (pkg / "avatar.json").is_file():
        log.info("importing %s (%d frames) into %s", src, frames, pkg)
        import_synctalk(src, pkg, limit=frames, overwrite=True)
    with AvatarPackage.open(pkg) as p:
        p.faces  # builds the face cache now, outside any timed run
        return BenchAvatar(pkg, src, kind, p.frame_count, p.width, p.height)


def load_bench_audio(audio: str | Path | None, seconds: float, seed: int = 0) -> tuple[np.ndarray, str]:
    """``seconds`` of 16 kHz speech: the given file, the real clip beside the repo, or speech-like synthesis."""
    from ..audio import load_audio

    if seconds <= 0:
        raise ConfigError(f"--seconds must be positive, got {seconds}")
    path = Path(audio) if audio is not None else default_speech()
    if path is not None:
        pcm = load_audio(path)
        if len(pcm) < seconds * SAMPLE_RATE:
            reps = int(np.ceil(seconds * SAMPLE_RATE / len(pcm)))
            pcm = np.tile(pcm, reps)
        return pcm[: int(seconds * SAMPLE_RATE)], str(path)
    from ..demo import speechlike_audio

    return speechlike_audio(seconds, seed=seed), "synthetic speech-like audio (avatar.demo.speechlike_audio)"


# --------------------------------------------------------------------------- end-to-end


def run_render(
    avatar: BenchAvatar,
    pcm: np.ndarray,
    *,
    model: Path,
    encoder: Path,
    backend: str,
    batch_size: int,
    out_file: Path,
    threads: int | None = None,
    device_id: int = 0,
    feature_backend: str = "cpu",
) -> dict[str, Any]:
    """One real render to the ``file`` sink; the engine's report plus the output size."""
    from ..interfaces import BackendOptions
    from ..render import render

    report = render(
        avatar.package,
        pcm,
        sinks=[("file", {"path": str(out_file)})],
        model=model,
        features="ave",
        feature_options={"encoder": str(encoder), "backend": feature_backend, "device_id": device_id, "threads": threads},
        backend=backend,
        backend_options=BackendOptions(device_id=device_id, max_batch=batch_size, threads=threads),
        batch_size=batch_size,
    )
    d = report.to_dict()
    d.pop("sinks", None)
    d["output_bytes"] = out_file.stat().st_size if out_file.is_file() else 0
    return d


# --------------------------------------------------------------------------- baseline


class _TorchNet:
    """The PyTorch reference UNet-328 with the seeded test weights (eager, no_grad)."""

    def __init__(self, mode: str, seed: int, threads: int | None) -> None:

        import torch

        from ..models.synthetic import unet_state_dict

        # The reference network is the torch-reference plugin's; the benchmark
        # uses it only as the upstream-style baseline and falls back when absent.
        networks = _reference_networks()
        self.torch = torch
        if threads:
            torch.set_num_threads(int(threads))
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        net = networks.UNet328(mode=mode)
        net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in unet_state_dict(mode, seed).items()}, strict=True)
        self.net = net.eval().to(self.device)
        self.engine = f"pytorch {torch.__version__} eager ({self.device})"

    def __call__(self, visual: np.ndarray, audio: np.ndarray) -> np.ndarray:
        torch = self.torch
        with torch.no_grad():
            v = torch.from_numpy(visual).to(self.device)
            a = torch.from_numpy(audio).to(self.device)
            return self.net(v, a).cpu().numpy()


class _OrtNet:
    """ONNX Runtime at batch 1 (the baseline when PyTorch or the reference network is missing)."""

    def __init__(self, model: Path, threads: int | None) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        ins = self.session.get_inputs()
        self.vis = next(i.name for i in ins if list(i.shape[1:]) == [6, 320, 320])
        self.aud = next(i.name for i in ins if i.name != self.vis)
        self.engine = f"onnxruntime {ort.__version__} CPU, batch 1"

    def __call__(self, visual: np.ndarray, audio: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.vis: visual, self.aud: audio})[0]


def _reference_networks() -> Any:
    """The torch-reference plugin's ``networks`` module, found through its entry point.

    The core reaches plugins only through the plugin manager, never by module name.
    """
    import importlib

    from ..errors import PluginError
    from ..plugins import get_plugin_manager

    plugin = get_plugin_manager().pm.get_plugin("torch-reference")
    if plugin is None:
        raise PluginError("the torch-reference plugin is not loaded (see `avatar plugins`)")
    return importlib.import_module(f"{plugin.__name__}.networks")


def torch_baseline_available() -> str | None:
    """None when the PyTorch baseline can run here, else the reason it cannot."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (pip install 'avatar-sdk[torch]')"
    try:
        _reference_networks()
    except Exception as exc:  # a missing or broken plugin: fall back to ONNX Runtime
        return f"the torch reference network cannot be imported ({exc})"
    return None


def make_baseline_net(engine: str, *, model: Path, seeded: bool, mode: str, seed: int, threads: int | None) -> Any:
    """The network the baseline calls: ``torch`` (seeded weights only), ``onnxruntime``, or ``auto``."""
    if engine not in ("auto", "torch", "onnxruntime"):
        raise ConfigError(f"--baseline must be auto, torch, onnxruntime or none, not {engine!r}")
    if engine in ("auto", "torch"):
        why = torch_baseline_available()
        if why is None and not seeded:
            why = "the model is not the harness's seeded test model, whose weights PyTorch can load"
        if why is None:
            return _TorchNet(mode, seed, threads)
        if engine == "torch":
            raise ConfigError(f"the PyTorch baseline cannot run: {why}; use --baseline onnxruntime")
        log.info("baseline falls back to ONNX Runtime: %s", why)
    return _OrtNet(model, threads)


def _read_lms_box(path: Path) -> tuple[int, int, int, int]:
    pts = np.loadtxt(path, dtype=np.float32).astype(np.int32)
    x1, y1, x2 = int(pts[1, 0]), int(pts[52, 1]), int(pts[31, 0])
    return x1, y1, x2, y1 + (x2 - x1)


def run_baseline(
    avatar: BenchAvatar,
    pcm: np.ndarray,
    *,
    net: Any,
    encoder: Path,
    frames: int,
    out_file: Path,
    threads: int | None = None,
) -> dict[str, Any]:
    """The synchronous, one-frame-at-a-time loop of the upstream inference script."""
    import cv2

    from ..package import AvatarPackage
    from ..plugins import get_plugin_manager
    from ..schedule import schedule

    t0 = time.perf_counter()
    source = get_plugin_manager().feature_source("ave", encoder=str(encoder), threads=threads)
    try:
        windows = source.windows(pcm).astype(np.float32)
    finally:
        source.close()
    features_s = time.perf_counter() - t0
    n = min(int(frames), len(windows))
    if n < 1:
        raise ConfigError("the audio is too short for a single frame")
    order = schedule(n, avatar.frames)
    pkg = None if avatar.synctalk is not None else AvatarPackage.open(avatar.package)
    steps = dict.fromkeys(BASELINE_STEPS, 0.0)
    writer = cv2.VideoWriter(str(out_file), cv2.VideoWriter_fourcc(*"mp4v"), 25, (avatar.width, avatar.height))
    if not writer.isOpened():
        raise ConfigError(f"OpenCV cannot write {out_file} (no mp4v encoder in this OpenCV build)")
    start = time.perf_counter()
    try:
        for i in range(n):
            a = int(order[i])
            t = time.perf_counter()
            if pkg is None:
                img = cv2.imread(str(avatar.synctalk / "full_body_img" / f"{a}.jpg"))  # type: ignore[operator]
                x1, y1, x2, y2 = _read_lms_box(avatar.synctalk / "landmarks" / f"{a}.lms")  # type: ignore[operator]
            else:
                img = np.array(pkg.frame(a))
                x1, y1, x2, y2 = (int(v) for v in pkg.boxes[a])
            t1 = time.perf_counter()
            crop = cv2.resize(img[y1:y2, x1:x2], (328, 328), interpolation=cv2.INTER_CUBIC)
            face = crop[4:324, 4:324].copy()
            masked = face.copy()
            cv2.rectangle(masked, (5, 5, 310, 305), (0, 0, 0), -1)
            visual = np.concatenate([face.transpose(2, 0, 1), masked.transpose(2, 0, 1)])[None].astype(np.float32) / 255.0
            audio = windows[i][None]
            t2 = time.perf_counter()
            out = net(visual, audio)[0]
            t3 = time.perf_counter()
            crop[4:324, 4:324] = (out.transpose(1, 2, 0) * 255.0).astype(np.uint8)
            img[y1:y2, x1:x2] = cv2.resize(crop, (x2 - x1, y2 - y1), interpolation=cv2.INTER_CUBIC)
            t4 = time.perf_counter()
            writer.write(img)
            t5 = time.perf_counter()
            for k, dt in zip(BASELINE_STEPS, (t1 - t, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                steps[k] += dt
    finally:
        writer.release()
        if pkg is not None:
            pkg.close()
    wall = time.perf_counter() - start
    return {
        "engine": net.engine,
        "frames": n,
        "features_s": features_s,
        "loop_wall_s": wall,
        "wall_s": wall + features_s,
        "frames_per_s": n / (wall + features_s),
        "loop_frames_per_s": n / wall,
        "step_ms_per_frame": {k: 1000.0 * v / n for k, v in steps.items()},
        "reads": "SyncTalk_2D folder (JPEG + .lms per frame)" if pkg is None else "avatar package frames",
        "output_bytes": out_file.stat().st_size if out_file.is_file() else 0,
    }


def baseline_crosscheck(net: Any, check: dict[str, np.ndarray]) -> np.ndarray:
    """The baseline network's output on the cross-check inputs, one frame at a time."""
    vis = next(v for v in check.values() if v.ndim == 4 and v.shape[1] == 6)
    aud = next(v for v in check.values() if v is not vis)
    return np.concatenate([net(vis[i : i + 1].astype(np.float32), aud[i : i + 1]) for i in range(len(vis))])
