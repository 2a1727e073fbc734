"""Importers (SyncTalk_2D dataset, specification layout) and ``avatar import``."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from avatar import vision
from avatar.cli import cli
from avatar.errors import AvatarPackageError
from avatar.importers import import_spec, import_synctalk, read_crop_rectangles
from avatar.package import AvatarPackage

W, H, N = 256, 192, 8
FAST = {"preset": "ultrafast"}


def frame(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    img = cv2.resize(rng.integers(0, 256, (H // 16, W // 16, 3), dtype=np.uint8), (W, H), interpolation=cv2.INTER_CUBIC)
    return cv2.GaussianBlur(img, (0, 0), 2)


def box_of(i: int) -> tuple[int, int, int, int]:
    return (60 + i, 40, 180 + i, 160)


def write_lms(path: Path, box: tuple[int, int, int, int], points: int = 110) -> None:
    lms = np.full((points, 2), 100.0)
    x1, y1, x2, _ = box
    if points == 110:
        lms[1, 0], lms[52, 1], lms[31, 0] = x1 + 0.4, y1 + 0.6, x2 + 0.2
    path.write_text("\n".join(f"{x:.3f} {y:.3f}" for x, y in lms) + "\n")


def make_synctalk(root: Path, n: int = N, first: int = 0, aud: bool = True) -> Path:
    (root / "full_body_img").mkdir(parents=True)
    (root / "landmarks").mkdir()
    for k in range(n):
        cv2.imwrite(str(root / "full_body_img" / f"{first + k}.jpg"), frame(k), [cv2.IMWRITE_JPEG_QUALITY, 95])
        write_lms(root / "landmarks" / f"{first + k}.lms", box_of(k))
    if aud:
        np.save(root / "aud_ave.npy", np.arange(n * 512, dtype=np.float32).reshape(n, 512))
    return root


def write_video(path: Path, images: list[np.ndarray], fps: int = 25) -> None:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps, options={"crf": "10", "preset": "ultrafast"})
        s.width, s.height, s.pix_fmt = images[0].shape[1], images[0].shape[0], "yuv420p"
        for img in images:
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="bgr24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def make_spec(root: Path, n: int = N, rois: bool = True, boxes: str = "npy", fps: int = 25) -> Path:
    root.mkdir(parents=True)
    write_video(root / "full_body_video.mp4", [frame(k) for k in range(n)], fps)
    b = np.array([box_of(k) for k in range(n)], np.int32)
    if boxes == "npy":
        np.save(root / "roi_bounds.npy", b)
    else:  # the spec author's tools: cache/crop_rectangles.json, frame-keyed, here 1-based
        (root / "cache").mkdir()
        data = {str(k + 1): {"rect": [int(v) for v in b[k]]} for k in range(n)}
        (root / "cache" / "crop_rectangles.json").write_text(json.dumps(data))
    if rois:  # deliberately not the crop rule (inverted), to see that it is used
        faces = [255 - vision.face_320(frame(k), box_of(k)) for k in range(n)]
        write_video(root / "rois_320_video.mp4", faces, fps)
        write_video(root / "model_inputs_video.mp4", [vision.mask_face(f) for f in faces], fps)
    np.save(root / "aud_ave.npy", np.zeros((n, 512), np.float32))
    return root


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# --------------------------------------------------------------------------- synctalk


@pytest.mark.parametrize("first", [0, 1])
def test_import_synctalk_synthetic(tmp_path: Path, first: int) -> None:
    src = make_synctalk(tmp_path / "ds", first=first)
    dst = import_synctalk(src, tmp_path / "pkg", **FAST)
    with AvatarPackage.open(dst) as pkg:
        assert (pkg.frame_count, pkg.width, pkg.height, pkg.fps, pkg.name) == (N, W, H, 25.0, "ds")
        assert pkg.boxes.tolist() == [list(box_of(k)) for k in range(N)]  # first file is frame 0
        assert pkg.manifest.source["first_index"] == first
        assert np.array_equal(pkg.audio_features, np.load(src / "aud_ave.npy"))
        img = cv2.imread(str(src / "full_body_img" / f"{first + 3}.jpg"))
        assert np.array_equal(pkg.faces[3], vision.face_320(img, box_of(3)))  # from the source, exactly
        assert psnr(pkg.frame(3), img) > 30  # saturated synthetic colours through 4:2:0 (real frames: > 40)


def test_import_synctalk_options(tmp_path: Path) -> None:
    src = make_synctalk(tmp_path / "ds", aud=False)
    dst = import_synctalk(src, tmp_path / "p", fps=20, name="bob", limit=3, crop_interpolation="linear", **FAST)
    with AvatarPackage.open(dst) as pkg:
        assert (pkg.frame_count, pkg.fps, pkg.name, pkg.crop_interpolation) == (3, 20.0, "bob", "linear")
        assert pkg.manifest.audio_features is None
        img = cv2.imread(str(src / "full_body_img" / "1.jpg"))
        assert np.array_equal(pkg.faces[1], vision.face_320(img, box_of(1), "linear"))
        assert psnr(pkg.faces[1], vision.face_320(pkg.frame(1), box_of(1), "linear")) > 30


def test_import_synctalk_gap_in_numbering(tmp_path: Path) -> None:
    src = make_synctalk(tmp_path / "ds")
    (src / "full_body_img" / "4.jpg").unlink()
    (src / "landmarks" / "4.lms").unlink()
    with pytest.raises(AvatarPackageError, match=r"missing from the numbering 0\.\.7: 4\.jpg"):
        import_synctalk(src, tmp_path / "p")


def test_import_synctalk_count_mismatch_names_files(tmp_path: Path) -> None:
    src = make_synctalk(tmp_path / "ds")
    (src / "landmarks" / "5.lms").unlink()
    write_lms(src / "landmarks" / "9.lms", box_of(0))
    with pytest.raises(AvatarPackageError) as e:
        import_synctalk(src, tmp_path / "p")
    msg = str(e.value)
    assert f"{N} frames but {N} landmark files" in msg and "landmarks/5.lms" in msg and "landmarks/9.lms" in msg
    assert not (tmp_path / "p").exists()


def test_import_synctalk_bad_lms(tmp_path: Path) -> None:
    src = make_synctalk(tmp_path / "ds")
    write_lms(src / "landmarks" / "2.lms", box_of(2), points=68)
    with pytest.raises(AvatarPackageError, match=r"2\.lms has 68 points"):
        import_synctalk(src, tmp_path / "p")


def test_import_synctalk_bad_numbering_and_missing_folders(tmp_path: Path) -> None:
    src = make_synctalk(tmp_path / "ds")
    (src / "full_body_img" / "0.jpg").rename(src / "full_body_img" / "frame_a.jpg")
    with pytest.raises(AvatarPackageError, match="frame_a.jpg"):
        import_synctalk(src, tmp_path / "p")
    src2 = make_synctalk(tmp_path / "ds2", first=1)
    for k in reversed(range(N)):
        (src2 / "full_body_img" / f"{k + 1}.jpg").rename(src2 / "full_body_img" / f"{k + 5}.jpg")
    with pytest.raises(AvatarPackageError, match="starts at 5"):
        import_synctalk(src2, tmp_path / "p")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AvatarPackageError, match="full_body_img is missing"):
        import_synctalk(tmp_path / "empty", tmp_path / "p")


def test_import_synctalk_box_outside_frame(tmp_path: Path) -> None:
    src = make_synctalk(tmp_path / "ds")
    write_lms(src / "landmarks" / "6.lms", (400, 300, 500, 400))
    with pytest.raises(AvatarPackageError, match="entirely outside.*frame 6"):
        import_synctalk(src, tmp_path / "p")


def test_import_sanders_subset(sanders_dir: Path, tmp_path: Path) -> None:
    dst = import_synctalk(sanders_dir, tmp_path / "s", limit=25, **FAST)
    with AvatarPackage.open(dst) as pkg:
        assert (pkg.frame_count, pkg.width, pkg.height) == (25, 1280, 720)
        for i in (0, 24):
            lms = vision.read_lms(sanders_dir / "landmarks" / f"{i}.lms")
            assert tuple(pkg.boxes[i]) == vision.crop_box_from_landmarks(lms)
        img = cv2.imread(str(sanders_dir / "full_body_img" / "24.jpg"))
        assert np.array_equal(pkg.faces[24], vision.face_320(img, tuple(pkg.boxes[24])))
        assert psnr(pkg.faces[24], vision.face_320(pkg.frame(24), tuple(pkg.boxes[24]))) > 40
        assert psnr(pkg.frame(24), img) > 40
        assert pkg.audio_features.shape == (522, 512)


@pytest.mark.slow
def test_import_sanders_full(sanders_dir: Path, tmp_path: Path) -> None:
    dst = import_synctalk(sanders_dir, tmp_path / "s", **FAST)
    with AvatarPackage.open(dst) as pkg:
        assert (pkg.frame_count, pkg.width, pkg.height, pkg.fps) == (523, 1280, 720, 25.0)
        side = pkg.boxes[:, 2] - pkg.boxes[:, 0]
        assert (side == pkg.boxes[:, 3] - pkg.boxes[:, 1]).all()
        assert (side.min(), side.max()) == (173, 189)
        assert pkg.faces.shape == (523, 320, 320, 3)
        img = cv2.imread(str(sanders_dir / "full_body_img" / "522.jpg"))
        assert psnr(pkg.frame(522), img) > 40


# --------------------------------------------------------------------------- spec layout


def test_import_spec_uses_the_roi_video(tmp_path: Path) -> None:
    src = make_spec(tmp_path / "spec")
    with AvatarPackage.open(import_spec(src, tmp_path / "a", **FAST)) as a, AvatarPackage.open(
        import_spec(src, tmp_path / "b", rois=False, **FAST)
    ) as b:
        assert a.frame_count == b.frame_count == N and a.fps == 25.0
        assert a.boxes.tolist() == [list(box_of(k)) for k in range(N)]
        computed = vision.face_320(frame(2), box_of(2))
        # the ROI video's (inverted) faces, decoded; rois=False: computed with the crop rule
        assert psnr(a.faces[2], 255 - computed) > 28 and psnr(a.faces[2], computed) < 15
        assert psnr(b.faces[2], computed) > 28 and psnr(b.faces[2], 255 - computed) < 15
        assert a.manifest.source["faces"] == "rois_320_video.mp4" and b.manifest.source["faces"] == "computed"
        assert a.audio_features.shape == (N, 512)


def test_import_spec_crop_rectangles_json_and_fps(tmp_path: Path) -> None:
    src = make_spec(tmp_path / "spec", rois=False, boxes="json", fps=20)
    with AvatarPackage.open(import_spec(src, tmp_path / "p", limit=5, **FAST)) as pkg:
        assert (pkg.frame_count, pkg.fps) == (5, 20.0)
        assert pkg.boxes.tolist() == [list(box_of(k)) for k in range(5)]
        assert psnr(pkg.faces[4], vision.face_320(frame(4), box_of(4))) > 28
    with AvatarPackage.open(import_spec(src, tmp_path / "q", fps=Fraction(25), limit=2, **FAST)) as pkg:
        assert pkg.fps == 25.0


def test_import_spec_count_mismatches(tmp_path: Path) -> None:
    src = make_spec(tmp_path / "spec")
    np.save(src / "roi_bounds.npy", np.array([box_of(k) for k in range(N - 1)]))
    with pytest.raises(AvatarPackageError, match=f"full_body_video.mp4 has {N} frames but roi_bounds.npy has {N - 1}"):
        import_spec(src, tmp_path / "p")
    np.save(src / "roi_bounds.npy", np.array([box_of(k) for k in range(N)]))
    write_video(src / "rois_320_video.mp4", [np.zeros((320, 320, 3), np.uint8)] * 3)
    with pytest.raises(AvatarPackageError, match=f"rois_320_video.mp4 has 3 frames but full_body_video.mp4 has {N}"):
        import_spec(src, tmp_path / "p")
    (src / "roi_bounds.npy").unlink()
    with pytest.raises(AvatarPackageError, match="neither roi_bounds.npy nor crop_rectangles.json"):
        import_spec(src, tmp_path / "p")
    with pytest.raises(AvatarPackageError, match="full_body_video.mp4 is missing"):
        import_spec(tmp_path, tmp_path / "p")


def test_read_crop_rectangles_forms(tmp_path: Path) -> None:
    f = tmp_path / "c.json"
    f.write_text(json.dumps([[1, 2, 11, 12], {"x1": 3, "y1": 4, "x2": 13, "y2": 14}]))
    assert read_crop_rectangles(f).tolist() == [[1, 2, 11, 12], [3, 4, 13, 14]]
    f.write_text(json.dumps({"0": {"rect": [1, 2, 11, 12]}, "2": {"rect": [1, 2, 11, 12]}}))
    with pytest.raises(AvatarPackageError, match="without gaps; missing 1"):
        read_crop_rectangles(f)
    f.write_text(json.dumps({"0": {"rect": [1, 2]}}))
    with pytest.raises(AvatarPackageError, match="not a rectangle"):
        read_crop_rectangles(f)


# --------------------------------------------------------------------------- CLI


def test_cli_import_synctalk_prints_a_summary(tmp_path: Path) -> None:
    src = make_synctalk(tmp_path / "ds")
    res = CliRunner().invoke(
        cli, ["import", "synctalk", str(src), "-o", str(tmp_path / "p"), "--limit", "4", "--preset", "ultrafast"]
    )
    assert res.exit_code == 0, res.output
    assert "frames:         4" in res.output and f"size:           {W}x{H}" in res.output
    assert "fps:            25" in res.output and "boxes:          120-120 px square" in res.output
    res = CliRunner().invoke(cli, ["import", "synctalk", str(src), "-o", str(tmp_path / "p")])
    assert res.exit_code == 1 and "already exists" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(
        cli, ["import", "synctalk", str(src), "-o", str(tmp_path / "p"), "--force", "--fps", "30", "--preset", "ultrafast"]
    )
    assert res.exit_code == 0 and "frames:         8" in res.output and "fps:            30" in res.output


def test_cli_import_spec(tmp_path: Path) -> None:
    src = make_spec(tmp_path / "spec")
    res = CliRunner().invoke(
        cli, ["import", "spec", str(src), "-o", str(tmp_path / "p"), "--no-rois", "--preset", "ultrafast"]
    )
    assert res.exit_code == 0, res.output
    assert f"frames:         {N}" in res.output and "boxes:          120-120 px square" in res.output
    with AvatarPackage.open(tmp_path / "p") as pkg:
        assert pkg.manifest.source["faces"] == "computed"


def test_cli_import_error_is_one_line(tmp_path: Path) -> None:
    src = make_synctalk(tmp_path / "ds")
    (src / "landmarks" / "3.lms").unlink()
    res = CliRunner().invoke(cli, ["import", "synctalk", str(src), "-o", str(tmp_path / "p")])
    assert res.exit_code == 1
    assert res.output.startswith("error: ") and "landmarks/3.lms" in res.output


def test_cli_interpolation_choices_match_vision() -> None:
    from avatar.cli import import_cmd

    assert import_cmd.INTERPOLATION_NAMES == tuple(sorted(vision.INTERPOLATIONS))
    assert import_cmd.DEFAULT_INTERPOLATION == vision.DEFAULT_INTERPOLATION


def test_cli_interpolation_option_has_an_effect(tmp_path: Path) -> None:
    src = make_synctalk(tmp_path / "ds", aud=False)
    for interp in ("cubic", "nearest"):
        res = CliRunner().invoke(cli, ["import", "synctalk", str(src), "-o", str(tmp_path / interp), "--limit", "2",
                                       "--interpolation", interp, "--preset", "ultrafast"])
        assert res.exit_code == 0, res.output
        assert f"crop resize:    {interp}" in res.output
    with AvatarPackage.open(tmp_path / "cubic") as a, AvatarPackage.open(tmp_path / "nearest") as b:
        assert not np.array_equal(a.faces[1], b.faces[1])


def tiny_unet_onnx(path: Path, audio_shape: list[int]) -> Path:
    """A graph with the UNet-328 contract (its output is the first 3 visual channels)."""
    import onnx
    from onnx import TensorProto, helper

    vis = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", 6, 320, 320])
    aud = helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["B", *audio_shape])
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", 3, 320, 320])
    inits = [helper.make_tensor(n, TensorProto.INT64, [1], [v]) for n, v in (("s", 0), ("e", 3), ("a", 1))]
    node = helper.make_node("Slice", ["input", "s", "e", "a"], ["output"])
    g = helper.make_graph([node], "m", [vis, aud], [out], initializer=inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_cli_import_packages_a_model(tmp_path: Path) -> None:
    src = make_synctalk(tmp_path / "ds", aud=False)
    model = tiny_unet_onnx(tmp_path / "unet_hubert.onnx", [32, 32, 32])
    enc = tmp_path / "enc.onnx"
    enc.write_bytes(b"x")
    res = CliRunner().invoke(cli, ["import", "synctalk", str(src), "-o", str(tmp_path / "p"), "--limit", "2",
                                   "--model", str(model), "--ave-encoder", str(enc), "--padding", "zero",
                                   "--preset", "ultrafast"])
    assert res.exit_code == 0, res.output
    assert "model:          unet_hubert.onnx (hubert)" in res.output
    with AvatarPackage.open(tmp_path / "p") as pkg:
        m = pkg.manifest
        assert (m.model, m.feature_type, m.padding, m.audio_encoder) == ("unet_hubert.onnx", "hubert", "zero", "enc.onnx")
        assert pkg.model_path.is_file() and pkg.audio_encoder_path.is_file()


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cli_force_never_deletes_the_source_or_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_synctalk(tmp_path / "ds", n=2, aud=False)
    (tmp_path / "notes.txt").write_text("keep me")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "photo.jpg").write_bytes(b"jpeg")
    before = snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    cases = [
        (".", "current directory"),
        ("ds", "import source"),
        ("ds/full_body_img", "import source"),
        ("ds/new-avatar", "import source"),
        ("other", "not an avatar package"),
        ("notes.txt", "not a directory"),
    ]
    for out, message in cases:
        res = CliRunner().invoke(cli, ["import", "synctalk", "ds", "-o", out, "--force", "--preset", "ultrafast"])
        assert res.exit_code == 1, (out, res.output)
        assert res.output.startswith("error: ") and message in res.output and "Traceback" not in res.output, out
    # the same without --force: a file is still an AvatarPackageError, not NotADirectoryError
    res = CliRunner().invoke(cli, ["import", "synctalk", "ds", "-o", "notes.txt"])
    assert res.exit_code == 1 and "not a directory" in res.output
    assert snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "notes.txt", "other"]


def test_import_spec_refuses_its_own_source(tmp_path: Path) -> None:
    src = make_spec(tmp_path / "spec", n=2, rois=False)
    before = snapshot(src)
    with pytest.raises(AvatarPackageError, match="import source"):
        import_spec(src, src, overwrite=True, **FAST)
    with pytest.raises(AvatarPackageError, match="import source"):
        import_spec(src, src / "cache", **FAST)
    assert snapshot(src) == before
