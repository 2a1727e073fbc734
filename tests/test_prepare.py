"""`avatar prepare`: a raw video becomes an avatar package whose boxes follow the SyncTalk_2D crop rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from avatar import vision
from avatar.cli import cli
from avatar.errors import AvatarPackageError

SANDERS_FIRST = 440  # the slice encoded for the test: 440..522 (the offsets were fitted on 0..459)
HELD_OUT = range(460, 522)  # frames the trained sanders model never saw


def _mediapipe() -> None:
    from avatar.errors import MissingDependency
    from avatar.prepare.faces import require_mediapipe

    try:
        require_mediapipe()
    except MissingDependency as exc:
        pytest.skip(str(exc))


def _encode(path: Path, frames: list[np.ndarray], *, fps: int = 25, pcm: np.ndarray | None = None) -> Path:
    """An H.264 video of BGR ``frames`` with ``pcm`` (16 kHz mono) as AAC, when given."""
    import av

    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as c:
        v = c.add_stream("libx264", rate=fps)
        v.width, v.height, v.pix_fmt = w, h, "yuv420p"
        v.options = {"crf": "16", "preset": "ultrafast"}
        a = None
        if pcm is not None:
            a = c.add_stream("aac", rate=16000)
            a.layout = "mono"
        for img in frames:
            for p in v.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="bgr24")):
                c.mux(p)
        for p in v.encode():
            c.mux(p)
        if a is not None:
            af = av.AudioFrame.from_ndarray((np.clip(pcm, -1, 1) * 32767).astype(np.int16)[None], format="s16", layout="mono")
            af.sample_rate = 16000
            for p in [*a.encode(af), *a.encode(None)]:
                c.mux(p)
    return path


def _speech(seconds: float) -> np.ndarray:
    from avatar.demo import speechlike_audio

    return speechlike_audio(seconds, seed=3)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


@pytest.fixture(scope="module")
def sanders_prepared(sanders_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``avatar prepare`` (the CLI) on a video encoded from sanders frames 440..522 with speech."""
    import cv2

    _mediapipe()
    tmp = tmp_path_factory.mktemp("prepare-sanders")
    frames = [cv2.imread(str(sanders_dir / "full_body_img" / f"{i}.jpg")) for i in range(SANDERS_FIRST, 523)]
    video = _encode(tmp / "sanders.mp4", frames, pcm=_speech(len(frames) / 25))
    r = CliRunner().invoke(cli, ["prepare", str(video), "-o", str(tmp / "pkg"), "--allow-short",
                                 "--synctalk", str(tmp / "synctalk")])
    assert r.exit_code == 0, r.output
    return tmp / "pkg"


def test_prepared_boxes_match_the_datasets_own_landmarks(sanders_prepared: Path, sanders_dir: Path) -> None:
    boxes = np.load(sanders_prepared / "boxes.npy")
    assert len(boxes) == 523 - SANDERS_FIRST
    truth = {i: np.array(vision.crop_box_from_landmarks(vision.read_lms(sanders_dir / "landmarks" / f"{i}.lms")))
             for i in range(460, 523)}
    ious = [_iou(boxes[i - SANDERS_FIRST], truth[i]) for i in truth]  # judged on frames the fit never saw
    assert np.median(ious) >= 0.85 and min(ious) >= 0.7, (np.median(ious), min(ious))
    manifest = json.loads((sanders_prepared / "avatar.json").read_text())
    src = manifest["source"]
    assert src["importer"] == "prepare" and "mediapipe 0.10.21" in src["detector"] and src["smoothing"]["window"] > 1
    assert src["excluded_frames"] == [] and src["short"] is True
    assert manifest["fps"] == 25 and (sanders_prepared / "audio.wav").is_file()


def test_trained_sanders_model_scores_the_same_on_the_prepared_package(sanders_prepared: Path, sanders_dir: Path) -> None:
    """Face PSNR of the real trained model on held-out frames, prepared crops vs the dataset's own crops.

    The issue's target: within 0.5 dB. The prepared crops come from the H.264-decoded video (about
    0.15 dB of the gap), the imported ones from the source JPEGs. Before the mirror averaging of
    the face mesh (avatar/prepare/faces.py) the gap was 0.7-0.8 dB.
    """
    import cv2
    import onnxruntime as ort

    from avatar.package import AvatarPackage
    from avatar.windows import window

    model = sanders_dir / "model" / "unet_sanders_ave.onnx"
    if not model.is_file():
        pytest.skip("the trained sanders model is not in the shared data")
    rows = np.load(sanders_dir / "aud_ave.npy")
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])

    def psnr(faces: np.ndarray) -> float:
        outs = []
        for k in range(0, len(faces), 8):
            part = faces[k:k + 8]
            audio = np.stack([window(rows, i, padding="replicate").reshape(32, 16, 16) for i in HELD_OUT][k:k + 8])
            y = sess.run(["output"], {"input": vision.normalize(vision.visual_batch(part)), "audio": audio})[0]
            outs.append(vision.output_to_uint8(y))
        out = np.concatenate(outs).astype(np.float64)
        return float(10 * np.log10(255**2 / np.mean((out - faces.astype(np.float64)) ** 2)))

    imported = np.stack([
        vision.face_320(cv2.imread(str(sanders_dir / "full_body_img" / f"{i}.jpg")),
                        vision.crop_box_from_landmarks(vision.read_lms(sanders_dir / "landmarks" / f"{i}.lms")))
        for i in HELD_OUT
    ])  # the face cache `avatar import synctalk` writes (made from the source JPEGs)
    with AvatarPackage.open(sanders_prepared) as pkg:
        prepared = np.asarray(pkg.faces[[i - SANDERS_FIRST for i in HELD_OUT]])
    a, b = psnr(imported), psnr(prepared)
    assert abs(a - b) <= 0.5, (a, b)


def test_mirror_averaging_makes_the_mesh_points_mirror_symmetric(sanders_dir: Path) -> None:
    """With the mirrored pass a point found in a mirrored frame is the mirror of its mirror vertex's point.

    Without it the face mesh's error is not mirror-symmetric (its boxes sat 1.5 px too wide on sanders)."""
    import cv2

    from avatar.prepare.faces import MIRROR, FaceFinder

    _mediapipe()
    img = _sanders_frame(sanders_dir)
    w = img.shape[1]

    def asymmetry(mirror: bool) -> float:
        with FaceFinder(static=True, mirror=mirror) as f:
            (n, pts), (n_m, pts_m) = f.points(img), f.points(cv2.flip(img, 1))
        assert n == n_m == 1 and pts is not None and pts_m is not None
        return max(max(abs(pts_m[k][0] - (w - pts[MIRROR[k]][0])), abs(pts_m[k][1] - pts[MIRROR[k]][1])) for k in MIRROR)

    assert asymmetry(True) < 0.01
    assert asymmetry(False) > 0.5


def test_synctalk_layout_reproduces_the_boxes(sanders_prepared: Path) -> None:
    root = sanders_prepared.parent / "synctalk"
    boxes = np.load(sanders_prepared / "boxes.npy")
    n = len(boxes)
    assert len(list((root / "full_body_img").glob("*.jpg"))) == n and (root / "aud.wav").is_file()
    for i in (0, n // 2, n - 1):
        assert vision.crop_box_from_landmarks(vision.read_lms(root / "landmarks" / f"{i}.lms")) == tuple(boxes[i])


# --------------------------------------------------------------------------- bad inputs


def _gradient(n: int, w: int = 320, h: int = 240) -> list[np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 90)], -1).astype(np.uint8)
    return [base] * n


def _sanders_frame(sanders_dir: Path) -> np.ndarray:
    import cv2

    return cv2.imread(str(sanders_dir / "full_body_img" / "500.jpg"))


def test_no_face_is_refused_with_the_frames(tmp_path: Path) -> None:
    from avatar.prepare import prepare

    _mediapipe()
    video = _encode(tmp_path / "noface.mp4", _gradient(25), pcm=_speech(1.0))
    with pytest.raises(AvatarPackageError, match=r"no face found in \d+ frame\(s\): 0 \(0.00 s\)"):
        prepare(video, tmp_path / "pkg", allow_short=True)
    assert not (tmp_path / "pkg").exists()


def test_two_faces_are_refused(tmp_path: Path, sanders_dir: Path) -> None:
    import cv2

    from avatar.prepare import prepare

    _mediapipe()
    img = cv2.resize(_sanders_frame(sanders_dir)[:, 320:960], (640, 720))  # keeps the face large enough
    twice = np.concatenate([img, img], axis=1)
    video = _encode(tmp_path / "two.mp4", [twice] * 25, pcm=_speech(1.0))
    with pytest.raises(AvatarPackageError, match="more than one face"):
        prepare(video, tmp_path / "pkg", allow_short=True)


def test_small_face_is_refused(tmp_path: Path, sanders_dir: Path) -> None:
    import cv2

    from avatar.prepare import prepare

    _mediapipe()
    small = cv2.resize(_sanders_frame(sanders_dir), (480, 270))  # crop side about 65 px
    video = _encode(tmp_path / "small.mp4", [small] * 25, pcm=_speech(1.0))
    with pytest.raises(AvatarPackageError, match="face is too small"):
        prepare(video, tmp_path / "pkg", allow_short=True)


def test_short_video_is_refused_before_any_face_search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import avatar.prepare as prep

    def no_search(*a: object, **k: object) -> None:
        raise AssertionError("the face search ran before the length check")

    monkeypatch.setattr(prep, "FaceFinder", no_search)
    video = _encode(tmp_path / "ten.mp4", _gradient(250, 64, 48), pcm=_speech(10.0))
    r = CliRunner().invoke(cli, ["prepare", str(video), "-o", str(tmp_path / "pkg")])
    assert r.exit_code == 1
    assert "ten.mp4 is 10.0 s long; training needs at least 30 s" in r.output and "--allow-short" in r.output


def test_video_without_sound_is_refused(tmp_path: Path) -> None:
    from avatar.prepare import prepare

    video = _encode(tmp_path / "mute.mp4", _gradient(25))
    with pytest.raises(AvatarPackageError, match="has no sound track"):
        prepare(video, tmp_path / "pkg", allow_short=True)


def test_silent_sound_track_is_refused(tmp_path: Path) -> None:
    from avatar.prepare import prepare

    video = _encode(tmp_path / "silent.mp4", _gradient(25), pcm=np.zeros(16000, np.float32))
    with pytest.raises(AvatarPackageError, match="the sound track is silent"):
        prepare(video, tmp_path / "pkg", allow_short=True)


def test_unreadable_file_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    r = CliRunner().invoke(cli, ["prepare", str(bad), "-o", str(tmp_path / "pkg")])
    assert r.exit_code == 1
    assert r.output.startswith("error: cannot read broken.mp4 as a video") and r.output.count("\n") == 1


# --------------------------------------------------------------------------- timing and smoothing


def test_frame_rate_is_resampled_by_time(tmp_path: Path) -> None:
    """A 30 fps video prepared at 25 fps: output frame k shows the source frame on screen at k/25 s."""
    from avatar.prepare.video import frames_at

    frames = []
    for i in range(60):  # 2 s at 30 fps; frame i has a white bar at x = 10 i
        img = np.zeros((48, 640, 3), np.uint8)
        img[:, 10 * i + 2: 10 * i + 8] = 255
        frames.append(img)
    video = _encode(tmp_path / "v30.mp4", frames, fps=30)
    got = [(k, int(np.argmax(img[..., 1].mean(axis=0))) // 10) for k, img in frames_at(video, 25)]
    assert [k for k, _ in got] == list(range(50))
    assert [i for _, i in got] == [int(k * 30 / 25 + 1e-9) for k in range(50)]


def test_smoothing_removes_jitter_without_lag_and_lists_jumps() -> None:
    from avatar.prepare.faces import smooth_boxes

    rng = np.random.default_rng(0)
    n = 200
    still = np.array([[400 + rng.normal(0, 2), 300 + rng.normal(0, 2), 0, 0] for _ in range(n)])
    still[:, 2], still[:, 3] = still[:, 0] + 180, still[:, 1] + 180
    track = smooth_boxes(still)
    raw_jitter = np.std(np.diff(still[:, 0]))
    assert np.std(np.diff(track.boxes[:, 0])) < raw_jitter / 3  # a still head stays still
    moving = np.array([[100 + 4 * t, 300, 280 + 4 * t, 480] for t in range(n)], float)
    moving[120] += [60, 0, 60, 0]  # a detection error
    track = smooth_boxes(moving)
    assert track.jumps == [120]
    centre = (track.boxes[:, 0] + track.boxes[:, 2]) / 2
    assert np.abs(centre - (190 + 4 * np.arange(n))).max() <= 1.0  # follows a moving head without lag
    assert (track.boxes[:, 2] - track.boxes[:, 0] == track.boxes[:, 3] - track.boxes[:, 1]).all()


def test_missing_mediapipe_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from avatar.errors import AvatarError, MissingDependency
    from avatar.prepare.faces import require_mediapipe

    monkeypatch.setitem(sys.modules, "mediapipe", None)
    with pytest.raises(MissingDependency, match=r"\[prepare\]"):
        require_mediapipe()
    monkeypatch.setattr(sys, "version_info", (3, 13, 1, "final", 0))
    with pytest.raises(AvatarError, match=r"wheels for Python 3.9-3.12 only; this is Python 3.13"):
        require_mediapipe()
