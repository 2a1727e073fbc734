"""The model sees exactly the specification's preprocessing of the source frames.

The reference here is written out independently of ``avatar.vision``, as the
specification and SyncTalk_2D's inference code do it: decode the frame
(``cv2.imread`` / ``cv2.VideoCapture``), crop the box, resize to 328x328 with
INTER_CUBIC, take ``[4:324, 4:324]``, mask with
``cv2.rectangle(img, (5, 5, 310, 305), 0, -1)``, BGR channels first, ``/ 255.0``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from avatar.cli import cli
from click.testing import CliRunner

FRAMES = 12  # imported avatar frames (the run walks them forward and back)


def spec_visual(img: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """The specification's float32 [6, 320, 320] visual input of one decoded frame."""
    x1, y1, x2, y2 = box
    crop = cv2.resize(img[y1:y2, x1:x2], (328, 328), interpolation=cv2.INTER_CUBIC)
    return spec_stack(crop[4:324, 4:324].copy())


def spec_stack(face: np.ndarray) -> np.ndarray:
    """The specification's [6, 320, 320] input from a 320 face: the face, then its masked copy."""
    masked = face.copy()
    cv2.rectangle(masked, (5, 5, 310, 305), (0, 0, 0), -1)
    roi_chw = np.transpose(face.astype(np.float32) / 255.0, (2, 0, 1))
    masked_chw = np.transpose(masked.astype(np.float32) / 255.0, (2, 0, 1))
    return np.concatenate([roi_chw, masked_chw], axis=0)


def spec_box(lms_file: Path) -> tuple[int, int, int, int]:
    lms = np.loadtxt(lms_file, dtype=np.float32).astype(np.int32)
    x1, y1, x2 = int(lms[1, 0]), int(lms[52, 1]), int(lms[31, 0])
    return x1, y1, x2, y1 + (x2 - x1)


class FeedLog:
    """Real ONNX Runtime sessions that note the visual input of every UNet run."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, visual_name: str) -> None:
        import onnxruntime

        self.visual: list[np.ndarray] = []
        log = self

        class Recording(onnxruntime.InferenceSession):  # type: ignore[misc]
            def run(self, output_names, input_feed, run_options=None):  # type: ignore[no-untyped-def]
                if visual_name in input_feed:
                    log.visual.extend(np.array(input_feed[visual_name]))
                return super().run(output_names, input_feed, run_options)

        monkeypatch.setattr(onnxruntime, "InferenceSession", Recording)


def as_float(x: np.ndarray) -> np.ndarray:
    # a uint8-input graph divides on the device; the same division here
    return np.divide(x, np.float32(255.0), dtype=np.float32) if x.dtype == np.uint8 else x


def test_import_and_run_feed_the_model_the_spec_preprocessing_of_the_source_jpegs(
    sanders_dir: Path, talk_wav: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = sanders_dir / "model" / "unet_sanders_ave.onnx"
    if not model.is_file():
        pytest.skip(f"real test model not present: {model}")
    pkg = tmp_path / "sanders"
    res = CliRunner().invoke(cli, ["import", "synctalk", str(sanders_dir), "-o", str(pkg), "--limit", str(FRAMES),
                                   "--preset", "ultrafast"])
    assert res.exit_code == 0, res.output
    expected = [
        spec_visual(cv2.imread(str(sanders_dir / "full_body_img" / f"{i}.jpg")),
                    spec_box(sanders_dir / "landmarks" / f"{i}.lms"))
        for i in range(FRAMES)
    ]
    feeds = FeedLog(monkeypatch, "input")
    out = tmp_path / "out.mp4"
    res = CliRunner().invoke(cli, ["run", "--avatar", str(pkg), "--audio", str(talk_wav), "--model", str(model),
                                   "--features", "npy", "--features-file", str(sanders_dir / "aud_ave.npy"),
                                   "--backend", "cpu", "--frames", "16", "--batch", "4", "-o", str(out),
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    assert len(feeds.visual) == 16
    seen = set()
    for got in feeds.visual:
        got = as_float(got)
        diffs = [float(np.abs(got - e).max()) for e in expected]
        best = int(np.argmin(diffs))
        assert diffs[best] == 0.0, f"the model input differs from the spec's by up to {min(diffs) * 255:.0f} levels"
        seen.add(best)
    assert seen == set(range(FRAMES))  # every imported frame was fed, each bit-exact


def read_video_like_the_spec(path: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    out = []
    while True:
        ok, img = cap.read()
        if not ok:
            return out
        out.append(img)


@pytest.mark.parametrize("rois", [True, False])
def test_spec_layout_import_gives_the_spec_input_of_the_decoded_videos(tmp_path: Path, rois: bool) -> None:
    from avatar.package import AvatarPackage
    from avatar.vision import normalize
    from test_importers import box_of, make_spec

    src = make_spec(tmp_path / "spec")
    args = ["import", "spec", str(src), "-o", str(tmp_path / "p"), "--preset", "ultrafast"]
    res = CliRunner().invoke(cli, args + ([] if rois else ["--no-rois"]))
    assert res.exit_code == 0, res.output
    if rois:  # the decoded ROI video is the face; the spec masks it
        expected = [spec_stack(f) for f in read_video_like_the_spec(src / "rois_320_video.mp4")]
    else:  # the crop rule on the decoded full-body video
        expected = [spec_visual(f, box_of(k)) for k, f in enumerate(read_video_like_the_spec(src / "full_body_video.mp4"))]
    with AvatarPackage.open(tmp_path / "p") as pkg:
        got = normalize(pkg.visual_inputs(range(pkg.frame_count)))
    assert len(expected) == len(got) > 0
    assert all(float(np.abs(g - e).max()) == 0.0 for g, e in zip(got, expected))
