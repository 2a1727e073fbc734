"""The avatar package format: writing, opening, validating, frame store, caches."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from avatar import vision
from avatar.errors import AvatarPackageError
from avatar.package import FACES, AvatarPackage, FrameStore, write_package

W, H, N, GOP = 256, 192, 30, 5
BOX = (60, 30, 200, 170)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def make_frames(n: int = N, seed: int = 0) -> list[np.ndarray]:
    """Smooth frames, each with a bright block at a position unique to the frame."""
    rng = np.random.default_rng(seed)
    base = cv2.GaussianBlur(cv2.resize(rng.integers(0, 256, (H // 8, W // 8, 3), dtype=np.uint8), (W, H)), (0, 0), 2)
    frames = []
    for i in range(n):
        f = base.copy()
        x = 8 + 7 * i
        f[8:40, x % (W - 40) : x % (W - 40) + 24] = (255, 255, 255)
        cv2.circle(f, (130, 100 + i % 30), 20, (40, 40, 200), -1)
        frames.append(cv2.GaussianBlur(f, (0, 0), 1.5))  # camera-like edges (chroma is subsampled)
    return frames


def make_boxes(n: int = N) -> np.ndarray:
    return np.array([BOX] * n, np.int32) + np.array([[i % 3, 0, i % 3, 0] for i in range(n)], np.int32)


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return make_frames()


@pytest.fixture(scope="module")
def pkg_dir(tmp_path_factory: pytest.TempPathFactory, frames: list[np.ndarray]) -> Path:
    dst = tmp_path_factory.mktemp("pkg") / "avatar"
    write_package(dst, iter(frames), make_boxes(), 25, "synthetic", gop=GOP, preset="ultrafast")
    return dst


def copy_pkg(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_layout_and_manifest(pkg_dir: Path) -> None:
    assert {p.name for p in pkg_dir.iterdir()} >= {"avatar.json", "frames.mp4", "boxes.npy", "cache"}
    m = json.loads((pkg_dir / "avatar.json").read_text())
    assert m["format"] == "avatar-package" and m["version"] == 1
    assert (m["name"], m["fps"], m["frame_count"], m["width"], m["height"]) == ("synthetic", 25, N, W, H)
    assert m["crop"]["interpolation"] == "cubic"
    assert m["video"]["gop"] == GOP and m["video"]["pix_fmt"] == "yuv420p"
    assert not list(pkg_dir.parent.glob(".avatar.partial-*"))


def test_open_attributes(pkg_dir: Path) -> None:
    with AvatarPackage.open(pkg_dir) as pkg:
        assert (pkg.frame_count, pkg.width, pkg.height, pkg.fps, pkg.name) == (N, W, H, 25.0, "synthetic")
        assert pkg.boxes.dtype == np.int32 and np.array_equal(pkg.boxes, make_boxes())
        assert pkg.manifest.crop_interpolation == "cubic"
        assert pkg.model_path is None and pkg.audio_features is None


def test_frames_decode_to_the_source_frames(pkg_dir: Path, frames: list[np.ndarray]) -> None:
    with AvatarPackage.open(pkg_dir) as pkg:
        assert pkg.store.gop_count == N // GOP
        for i in (0, 4, 5, 17, N - 1, 3):  # random order, across GOPs
            f = pkg.frame(i)
            assert f.shape == (H, W, 3) and f.dtype == np.uint8
            assert psnr(f, frames[i]) > 30  # saturated synthetic colours: 4:2:0 chroma bounds this (real: > 40)
            # each frame is its own (not a neighbour): best match is the source frame i
            assert int(np.argmax([psnr(f, s) for s in frames])) == i
        assert not pkg.frame(3).flags.writeable  # read-only view into the cache
        got = list(pkg.frames([7, 2, 9]))
        assert all(np.array_equal(g, pkg.frame(i)) for g, i in zip(got, [7, 2, 9]))
        with pytest.raises(IndexError):
            pkg.frame(N)


def test_frame_store_decodes_each_gop_once_for_pingpong(pkg_dir: Path) -> None:
    frame_mb = W * H * 3 / 2 / 2**20  # kept as the decoder gives it: I420, 1.5 bytes a pixel
    # budget for 2 GOPs only (none pinned, an LRU of two): forward then backward sequential access
    store = FrameStore(pkg_dir / "frames.mp4", memory_budget_mb=2 * GOP * frame_mb + 0.01)
    assert store.capacity == 2 and store.pinned_capacity == 0 and not store.fits_in_budget
    gops = N // GOP
    list(store.frames(range(N)))
    assert store.decoded_gops == gops
    list(store.frames(range(N - 2, -1, -1)))  # the last two GOPs are still cached
    assert store.decoded_gops == gops + gops - 2
    assert len(store._gops) == 2  # bounded
    store.close()


def test_frame_store_keeps_everything_when_it_fits(pkg_dir: Path) -> None:
    store = FrameStore(pkg_dir / "frames.mp4", memory_budget_mb=64)
    assert store.fits_in_budget
    list(store.frames(range(N)))
    list(store.frames(range(N - 1, -1, -1)))
    list(store.frames(np.random.default_rng(0).permutation(N)))
    assert store.decoded_gops == N // GOP  # decoded once, kept
    store.close()


def test_memory_budget_option_has_an_effect(pkg_dir: Path) -> None:
    small = AvatarPackage.open(pkg_dir, memory_budget_mb=0.5)
    big = AvatarPackage.open(pkg_dir, memory_budget_mb=512)
    for p in (small, big):
        list(p.frames(range(N)))
        list(p.frames(range(N)))
    assert big.store.decoded_gops == N // GOP < small.store.decoded_gops
    small.close()
    big.close()


def test_faces_cache_is_memmapped_and_made_from_the_source_frames(pkg_dir: Path, frames: list[np.ndarray]) -> None:
    with AvatarPackage.open(pkg_dir) as pkg:
        faces = pkg.faces
        assert isinstance(faces, np.memmap) and faces.shape == (N, 320, 320, 3)
        assert json.loads((pkg_dir / "cache/faces320.json").read_text())["made_from"] == "source"
        for i in (0, 13):  # the frames given, not their H.264 re-encode
            assert np.array_equal(faces[i], vision.face_320(frames[i], tuple(pkg.boxes[i])))
            assert psnr(faces[i], vision.face_320(pkg.frame(i), tuple(pkg.boxes[i]))) > 30
        v = pkg.visual_inputs([3, 0, 3])
        assert v.shape == (3, 6, 320, 320) and v.dtype == np.uint8
        assert np.array_equal(v, vision.visual_batch(faces[[3, 0, 3]]))
        assert not np.array_equal(v[0], v[1])  # the index changes the input


def test_faces_built_lazily_from_the_package(tmp_path: Path, frames: list[np.ndarray]) -> None:
    dst = write_package(tmp_path / "a", iter(frames), make_boxes(), 25, "lazy", faces=False, gop=GOP, preset="ultrafast")
    assert not (dst / FACES).exists()
    with AvatarPackage.open(dst) as pkg:
        faces = np.array(pkg.faces)
        assert (dst / FACES).is_file()
        assert np.array_equal(faces[10], vision.face_320(pkg.frame(10), tuple(pkg.boxes[10])))
    # H.264 storage: the source-made cache (at write time) differs from one rebuilt from the stored frames
    eager = write_package(tmp_path / "b", iter(frames), make_boxes(), 25, "e", gop=GOP, preset="ultrafast")
    with AvatarPackage.open(eager) as pkg:
        assert not np.array_equal(pkg.faces, faces)


def test_lossless_frames_option_stores_the_exact_frames(tmp_path: Path, frames: list[np.ndarray]) -> None:
    dst = write_package(tmp_path / "x", iter(frames[:6]), make_boxes(6), 25, "x", frames_codec="ffv1")
    m = json.loads((dst / "avatar.json").read_text())["video"]
    assert (m["file"], m["codec"], m["lossless"]) == ("frames.mkv", "ffv1", True)
    assert not (dst / "frames.mp4").exists()
    with AvatarPackage.open(dst) as pkg:
        assert pkg.frames_lossless
        assert all(np.array_equal(pkg.frame(i), frames[i]) for i in (5, 0, 3))
        source_made = np.array(pkg.faces)
        pkg.build_faces()  # from the stored frames: identical, as they are lossless
        assert np.array_equal(np.load(dst / FACES), source_made)
    h264 = write_package(tmp_path / "h", iter(frames[:6]), make_boxes(6), 25, "h", preset="ultrafast")
    with AvatarPackage.open(h264) as pkg:
        assert not pkg.frames_lossless and json.loads((h264 / "avatar.json").read_text())["video"]["codec"] == "h264"
        assert not np.array_equal(pkg.frame(3), frames[3])


def test_crop_interpolation_option_has_an_effect(tmp_path: Path, frames: list[np.ndarray]) -> None:
    a = write_package(tmp_path / "c", iter(frames[:5]), make_boxes(5), 25, "c", gop=GOP, preset="ultrafast")
    b = write_package(tmp_path / "l", iter(frames[:5]), make_boxes(5), 25, "l", gop=GOP, preset="ultrafast",
                      crop_interpolation="linear")
    with AvatarPackage.open(a) as pa, AvatarPackage.open(b) as pb:
        assert pb.crop_interpolation == "linear"
        assert not np.array_equal(pa.faces[2], pb.faces[2])
        face = np.zeros((320, 320, 3), np.uint8)
        assert not np.array_equal(pa.composite(2, face), pb.composite(2, face))


def test_editing_the_manifest_interpolation_rebuilds_a_stale_cache(tmp_path: Path, frames: list[np.ndarray]) -> None:
    dst = write_package(tmp_path / "s", iter(frames[:5]), make_boxes(5), 25, "s", gop=GOP, preset="ultrafast")
    with AvatarPackage.open(dst) as pkg:
        cubic = np.array(pkg.faces[1])
    m = json.loads((dst / "avatar.json").read_text())
    m["crop"]["interpolation"] = "nearest"
    (dst / "avatar.json").write_text(json.dumps(m))
    with AvatarPackage.open(dst) as pkg:
        nearest = np.array(pkg.faces[1])
        assert json.loads((dst / "cache/faces320.json").read_text())["interpolation"] == "nearest"
    assert not np.array_equal(cubic, nearest)


def test_package_composite(pkg_dir: Path) -> None:
    with AvatarPackage.open(pkg_dir) as pkg:
        out = pkg.composite(4, np.zeros((320, 320, 3), np.uint8))
        assert out.flags.writeable and out.shape == (H, W, 3)
        x1, y1, x2, y2 = pkg.boxes[4]
        assert out[(y1 + y2) // 2, (x1 + x2) // 2].max() < 10
        assert np.array_equal(out[:, : x1], pkg.frame(4)[:, : x1])


def test_model_and_audio_features_are_copied_and_checked(tmp_path: Path, frames: list[np.ndarray]) -> None:
    import onnx
    from onnx import TensorProto, helper

    def model(audio_shape: list[int], path: Path) -> Path:
        vis = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["B", 6, 320, 320])
        aud = helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["B", *audio_shape])
        out = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", 3, 320, 320])
        starts = helper.make_tensor("s", TensorProto.INT64, [1], [0])
        ends = helper.make_tensor("e", TensorProto.INT64, [1], [3])
        axes = helper.make_tensor("a", TensorProto.INT64, [1], [1])
        node = helper.make_node("Slice", ["input", "s", "e", "a"], ["output"])
        g = helper.make_graph([node], "m", [vis, aud], [out], initializer=[starts, ends, axes])
        onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
        return path

    aud = tmp_path / "feat.npy"
    np.save(aud, np.zeros((6, 512), np.float32))
    enc = tmp_path / "enc.onnx"
    enc.write_bytes(b"encoder bytes")
    ok = write_package(tmp_path / "ok", iter(frames[:5]), make_boxes(5), 25, "m", gop=GOP, preset="ultrafast",
                       model=model([32, 16, 16], tmp_path / "unet.onnx"), feature_type="ave", padding="replicate",
                       audio_features=aud, audio_encoder=enc)
    with AvatarPackage.open(ok) as pkg:
        assert pkg.audio_encoder_path == ok / "enc.onnx" and pkg.audio_encoder_path.read_bytes() == b"encoder bytes"
        assert pkg.manifest.audio_encoder == "enc.onnx"
        assert pkg.model_path == ok / "unet.onnx" and pkg.model_path.is_file()
        m = pkg.manifest
        assert (m.model, m.feature_type, m.padding, m.audio_features) == ("unet.onnx", "ave", "replicate", "aud_ave.npy")
        assert json.loads((ok / "avatar.json").read_text())["model"] == {
            "file": "unet.onnx", "feature_type": "ave", "padding": "replicate", "audio_encoder": "enc.onnx"}
        assert pkg.audio_features.shape == (6, 512)
    with pytest.raises(AvatarPackageError, match="takes 'hubert' audio windows"):
        write_package(tmp_path / "bad", iter(frames[:5]), make_boxes(5), 25, "m", gop=GOP, preset="ultrafast",
                      model=model([32, 32, 32], tmp_path / "hub.onnx"), feature_type="ave")


# --------------------------------------------------------------------------- validation


def test_validate_counts_disagree(pkg_dir: Path, tmp_path: Path) -> None:
    p = copy_pkg(pkg_dir, tmp_path / "p")
    np.save(p / "boxes.npy", make_boxes(N - 2))
    with pytest.raises(AvatarPackageError, match=f"has {N - 2} boxes but the manifest says {N} frames"):
        AvatarPackage.open(p)


def test_validate_frame_count_and_faces_cache(pkg_dir: Path, tmp_path: Path) -> None:
    p = copy_pkg(pkg_dir, tmp_path / "p")
    m = json.loads((p / "avatar.json").read_text())
    m["frame_count"] = N + 1
    (p / "avatar.json").write_text(json.dumps(m))
    np.save(p / "boxes.npy", make_boxes(N + 1))
    with pytest.raises(AvatarPackageError) as e:
        AvatarPackage.open(p)
    assert f"frames.mp4 has {N} frames but the manifest says {N + 1}" in str(e.value)
    assert "delete it to rebuild it" in str(e.value)  # faces cache has N rows


@pytest.mark.parametrize(
    "box, message",
    [
        ((300, 10, 340, 50), "entirely outside"),
        ((10, 10, 60, 80), "not square"),
        ((10, 10, 18, 18), "smaller than 16 px"),
    ],
)
def test_validate_bad_boxes(pkg_dir: Path, tmp_path: Path, box: tuple[int, ...], message: str) -> None:
    p = copy_pkg(pkg_dir, tmp_path / "p")
    b = make_boxes()
    b[7] = box
    np.save(p / "boxes.npy", b)
    with pytest.raises(AvatarPackageError, match=rf"{message}.*frame 7"):
        AvatarPackage.open(p)
    AvatarPackage.open(p, validate=False).close()  # opening without validation still works


def test_validate_missing_files_and_unknown_version(pkg_dir: Path, tmp_path: Path) -> None:
    p = copy_pkg(pkg_dir, tmp_path / "p")
    (p / "frames.mp4").unlink()
    with pytest.raises(AvatarPackageError, match="frames.mp4 is missing"):
        AvatarPackage.open(p)
    q = copy_pkg(pkg_dir, tmp_path / "q")
    (q / "boxes.npy").unlink()
    with pytest.raises(AvatarPackageError, match="boxes.npy is missing"):
        AvatarPackage.open(q)
    r = copy_pkg(pkg_dir, tmp_path / "r")
    m = json.loads((r / "avatar.json").read_text())
    m["version"] = 99
    (r / "avatar.json").write_text(json.dumps(m))
    with pytest.raises(AvatarPackageError, match="format version 99"):
        AvatarPackage.open(r)
    m["version"], m["model"] = 1, {"file": "gone.onnx", "feature_type": "ave"}
    (r / "avatar.json").write_text(json.dumps(m))
    with pytest.raises(AvatarPackageError, match="gone.onnx"):
        AvatarPackage.open(r)
    with pytest.raises(AvatarPackageError, match="avatar.json is missing"):
        AvatarPackage.open(tmp_path)


def test_write_errors_leave_nothing_behind(tmp_path: Path, frames: list[np.ndarray]) -> None:
    with pytest.raises(AvatarPackageError, match="5 frames but 6 boxes"):
        write_package(tmp_path / "x", iter(frames[:5]), make_boxes(6), 25, "x", preset="ultrafast")
    with pytest.raises(AvatarPackageError, match="more frames than boxes"):
        write_package(tmp_path / "x", iter(frames[:5]), make_boxes(4), 25, "x", preset="ultrafast")
    with pytest.raises(AvatarPackageError, match="even sizes"):
        write_package(tmp_path / "x", iter([f[:-1] for f in frames[:3]]), make_boxes(3), 25, "x", preset="ultrafast")
    assert list(tmp_path.iterdir()) == []
    write_package(tmp_path / "x", iter(frames[:3]), make_boxes(3), 25, "x", preset="ultrafast")
    with pytest.raises(AvatarPackageError, match="already exists"):
        write_package(tmp_path / "x", iter(frames[:3]), make_boxes(3), 25, "x", preset="ultrafast")
    write_package(tmp_path / "x", iter(frames[:4]), make_boxes(4), 30, "y", preset="ultrafast", overwrite=True)
    with AvatarPackage.open(tmp_path / "x") as pkg:
        assert (pkg.frame_count, pkg.fps, pkg.name) == (4, 30.0, "y")


def test_encoding_options_have_an_effect(tmp_path: Path, frames: list[np.ndarray]) -> None:
    hi = write_package(tmp_path / "hi", iter(frames[:10]), make_boxes(10), 25, "h", crf=4, gop=10, preset="ultrafast")
    lo = write_package(tmp_path / "lo", iter(frames[:10]), make_boxes(10), 25, "l", crf=40, gop=2, preset="ultrafast")
    assert (hi / "frames.mp4").stat().st_size > (lo / "frames.mp4").stat().st_size
    with AvatarPackage.open(hi) as a, AvatarPackage.open(lo) as b:
        assert psnr(a.frame(5), frames[5]) > psnr(b.frame(5), frames[5])
        assert (a.store.gop_count, b.store.gop_count) == (1, 5)


def test_real_frames_round_trip(sanders_dir: Path, tmp_path: Path) -> None:
    imgs = [cv2.imread(str(sanders_dir / "full_body_img" / f"{i}.jpg")) for i in range(12)]
    boxes = np.array(
        [vision.crop_box_from_landmarks(vision.read_lms(sanders_dir / "landmarks" / f"{i}.lms")) for i in range(12)]
    )
    dst = write_package(tmp_path / "s", iter(imgs), boxes, 25, "sanders", preset="ultrafast")
    with AvatarPackage.open(dst) as pkg:
        assert (pkg.width, pkg.height) == (1280, 720)
        assert psnr(pkg.frame(11), imgs[11]) > 40


# --------------------------------------------------------------------------- destination safety


def small(n: int = 3) -> tuple[list[np.ndarray], np.ndarray]:
    return make_frames(n), make_boxes(n)


def write_small(dst: Path, **kw: object) -> Path:
    f, b = small()
    return write_package(dst, iter(f), b, 25, "small", gop=GOP, preset="ultrafast", **kw)  # type: ignore[arg-type]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_overwrite_never_replaces_the_current_directory_or_its_parents(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the current directory is even an avatar package: still refused (the shell would sit in a deleted dir)
    work = write_small(tmp_path / "work")
    (work / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    monkeypatch.chdir(work)
    for dst in (Path("."), Path(work), Path(".."), tmp_path):  # only temporary paths, never real ones
        with pytest.raises(AvatarPackageError, match="current directory or one of its parents"):
            write_small(dst, overwrite=True)
    assert snapshot(tmp_path) == before
    assert not list(tmp_path.glob(".*partial*")) and not list(tmp_path.parent.glob(".*partial*"))


def test_overwrite_replaces_only_an_avatar_package(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "sub" / "precious.jpg").write_bytes(b"\xff\xd8 not a package")
    (data / "avatar.json").write_text('{"format": "something-else"}')
    before = snapshot(data)
    with pytest.raises(AvatarPackageError, match="not an avatar package.*only replaces an existing avatar package"):
        write_small(data, overwrite=True)
    assert snapshot(data) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no partial directory left
    # an empty directory is filled, an avatar package is replaced, nothing is left beside it
    (tmp_path / "empty").mkdir()
    write_small(tmp_path / "empty")
    pkg = write_small(tmp_path / "pkg")
    (pkg / "stale.txt").write_text("old")
    f, b = make_frames(4), make_boxes(4)
    write_package(pkg, iter(f), b, 30, "new", gop=GOP, preset="ultrafast", overwrite=True)
    with AvatarPackage.open(pkg) as p:
        assert (p.frame_count, p.name) == (4, "new")
    assert not (pkg / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "empty", "pkg"]


def test_a_regular_file_as_destination_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "out.txt"
    f.write_text("keep")
    for overwrite in (False, True):
        with pytest.raises(AvatarPackageError, match="not a directory"):
            write_small(f, overwrite=overwrite)
    with pytest.raises(AvatarPackageError, match="cannot create"):
        write_small(f / "pkg")
    assert f.read_text() == "keep" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_the_import_source_is_never_the_destination(tmp_path: Path) -> None:
    src = tmp_path / "ds"
    (src / "full_body_img").mkdir(parents=True)
    (src / "full_body_img" / "0.jpg").write_bytes(b"jpeg")
    (src / "avatar.json").write_text('{"format": "avatar-package"}')  # even if it looks like a package
    before = snapshot(src)
    for dst in (src, src / "full_body_img", src / "new", tmp_path):
        with pytest.raises(AvatarPackageError, match="import source"):
            write_small(dst, overwrite=True, source_dir=src)
    assert snapshot(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]
    write_small(tmp_path / "elsewhere", source_dir=src)  # a sibling is fine


# --------------------------------------------------------------------------- face cache: staleness and concurrency


def test_editing_boxes_rebuilds_the_face_cache(pkg_dir: Path, tmp_path: Path) -> None:
    p = copy_pkg(pkg_dir, tmp_path / "p")
    with AvatarPackage.open(p) as pkg:
        old = np.array(pkg.faces[0])
    boxes = np.load(p / "boxes.npy")
    boxes[0] += np.array([10, 6, 10, 6], np.int32)  # moved, still square and inside the frame
    np.save(p / "boxes.npy", boxes)
    with AvatarPackage.open(p) as pkg:
        expected = vision.face_320(pkg.frame(0), tuple(int(v) for v in boxes[0]))
        assert np.array_equal(pkg.faces[0], expected)
    assert not np.array_equal(old, expected)


def test_replacing_frames_rebuilds_the_face_cache_and_touching_does_not(pkg_dir: Path, tmp_path: Path) -> None:
    p = copy_pkg(pkg_dir, tmp_path / "p")
    other = write_package(tmp_path / "o", iter(make_frames(seed=7)), make_boxes(), 25, "o", faces=False, gop=GOP,
                          preset="ultrafast")
    # same content, new time stamp (cp without -p, git checkout): the cache is kept
    st = (p / "frames.mp4").stat()
    os.utime(p / "frames.mp4", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    ino = (p / FACES).stat().st_ino
    with AvatarPackage.open(p) as pkg:
        pkg.faces
    assert (p / FACES).stat().st_ino == ino
    # ... and the new time is remembered (the next opening does not hash the video again)
    meta = json.loads((p / "cache/faces320.json").read_text())
    assert meta["frames"]["mtime_ns"] == st.st_mtime_ns + 10**9
    # other frames, same count and size: rebuilt from them
    import shutil

    shutil.copyfile(other / "frames.mp4", p / "frames.mp4")
    with AvatarPackage.open(p) as pkg:
        assert np.array_equal(pkg.faces[5], vision.face_320(pkg.frame(5), tuple(pkg.boxes[5])))
    assert (p / FACES).stat().st_ino != ino


def test_a_cache_from_an_older_version_without_identity_is_rebuilt(pkg_dir: Path, tmp_path: Path) -> None:
    p = copy_pkg(pkg_dir, tmp_path / "p")
    meta = json.loads((p / "cache/faces320.json").read_text())
    old = {k: meta[k] for k in ("interpolation", "frame_count", "made_from")}
    (p / "cache/faces320.json").write_text(json.dumps(old))
    with AvatarPackage.open(p) as pkg:
        pkg.faces
    assert "boxes_sha256" in json.loads((p / "cache/faces320.json").read_text())


CONCURRENT = """
import hashlib, sys, time
from pathlib import Path
import numpy as np
from avatar.package import AvatarPackage

pkg_path, go = Path(sys.argv[1]), Path(sys.argv[2])
while not go.exists():  # start together, after the imports
    time.sleep(0.001)
with AvatarPackage.open(pkg_path) as pkg:
    faces = np.asarray(pkg.faces)
    print(hashlib.sha256(faces.tobytes()).hexdigest(), flush=True)
"""


def test_concurrent_first_use_builds_the_face_cache_safely(pkg_dir: Path, tmp_path: Path) -> None:
    import subprocess
    import sys
    import time

    script = tmp_path / "open_faces.py"
    script.write_text(CONCURRENT)
    import hashlib
    import shutil

    ref = copy_pkg(pkg_dir, tmp_path / "ref")
    shutil.rmtree(ref / "cache")
    with AvatarPackage.open(ref) as pkg:  # what a rebuild from the stored frames gives
        expected = hashlib.sha256(np.asarray(pkg.faces).tobytes()).hexdigest()
    for round_ in range(3):
        p = copy_pkg(pkg_dir, tmp_path / f"p{round_}")
        import shutil

        shutil.rmtree(p / "cache")
        go = tmp_path / f"go{round_}"
        procs = [subprocess.Popen([sys.executable, str(script), str(p), str(go)], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        time.sleep(0.05)
        go.touch()
        outs = [proc.communicate(timeout=120) for proc in procs]
        for proc, (out, err) in zip(procs, outs):
            assert proc.returncode == 0, err
            assert out.strip() == expected
        assert sorted(f.name for f in (p / "cache").iterdir()) == ["faces320.json", "faces320.npy"]


def test_a_failed_face_build_leaves_no_temporary_file(pkg_dir: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from avatar import package

    p = copy_pkg(pkg_dir, tmp_path / "p")
    shutil.rmtree(p / "cache")

    def broken(*a: object, **k: object) -> np.ndarray:
        raise AvatarPackageError("boom")

    monkeypatch.setattr(package.vision, "face_320", broken)
    with AvatarPackage.open(p) as pkg, pytest.raises(AvatarPackageError, match="boom"):
        pkg.faces
    assert list((p / "cache").iterdir()) == []
