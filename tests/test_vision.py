"""Crop rule, preprocessing, mask and compositing (pure numpy/OpenCV)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from avatar import vision
from avatar.errors import AvatarPackageError, ConfigError


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def natural_frame(h: int = 360, w: int = 480, seed: int = 0) -> np.ndarray:
    """A smooth, textured image (blurred noise) — resizes behave as on photos."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC)
    return cv2.GaussianBlur(img, (0, 0), 2.0)


def lms_with(x1: float, y1: float, x2: float) -> np.ndarray:
    lms = np.zeros((110, 2), np.float32)
    lms[1, 0], lms[52, 1], lms[31, 0] = x1, y1, x2
    return lms


# --------------------------------------------------------------------------- landmarks


def test_crop_box_rule_on_hand_made_landmarks() -> None:
    assert vision.crop_box_from_landmarks(lms_with(100, 50, 280)) == (100, 50, 280, 230)
    # floats are truncated like upstream's int32 cast
    assert vision.crop_box_from_landmarks(lms_with(100.9, 50.7, 280.2)) == (100, 50, 280, 230)
    # each of the three points moves the box
    assert vision.crop_box_from_landmarks(lms_with(90, 50, 280)) == (90, 50, 280, 240)
    assert vision.crop_box_from_landmarks(lms_with(100, 60, 280)) == (100, 60, 280, 240)


def test_crop_box_rejects_inverted_points() -> None:
    with pytest.raises(AvatarPackageError, match="empty crop box"):
        vision.crop_box_from_landmarks(lms_with(200, 50, 100))


def test_read_lms(tmp_path: Path) -> None:
    pts = np.random.default_rng(1).uniform(0, 500, (110, 2)).astype(np.float32)
    f = tmp_path / "0.lms"
    f.write_text("\n".join(f"{x} {y}" for x, y in pts) + "\n")
    np.testing.assert_allclose(vision.read_lms(f), pts, rtol=1e-6)


def test_read_lms_wrong_count_names_file_and_count(tmp_path: Path) -> None:
    f = tmp_path / "7.lms"
    f.write_text("\n".join("1 2" for _ in range(68)))
    with pytest.raises(AvatarPackageError, match=r"7\.lms has 68 points"):
        vision.read_lms(f)
    f.write_text("\n".join("1 x" for _ in range(110)))
    with pytest.raises(AvatarPackageError, match="non-numeric"):
        vision.read_lms(f)


def test_read_lms_on_real_data(sanders_dir: Path) -> None:
    lms = vision.read_lms(sanders_dir / "landmarks" / "0.lms")
    x1, y1, x2, y2 = vision.crop_box_from_landmarks(lms)
    assert x2 - x1 == y2 - y1 and 173 <= x2 - x1 <= 189


# --------------------------------------------------------------------------- crops


def test_crop_shapes_and_face_is_the_centre_of_the_328_crop() -> None:
    frame = natural_frame()
    box = (100, 80, 280, 260)
    c = vision.crop_328(frame, box)
    f = vision.face_320(frame, box)
    assert c.shape == (328, 328, 3) and c.dtype == np.uint8
    assert f.shape == (320, 320, 3) and f.flags.c_contiguous
    assert np.array_equal(f, c[4:324, 4:324])


def test_crop_input_changes_output() -> None:
    frame = natural_frame()
    box = (100, 80, 280, 260)
    assert not np.array_equal(vision.face_320(frame, box), vision.face_320(natural_frame(seed=1), box))
    assert not np.array_equal(vision.face_320(frame, box), vision.face_320(frame, (101, 80, 281, 260)))


def test_crop_interpolation_has_an_effect() -> None:
    frame = natural_frame()
    box = (100, 80, 280, 260)
    cubic = vision.face_320(frame, box, "cubic")
    linear = vision.face_320(frame, box, "linear")
    assert not np.array_equal(cubic, linear)
    assert np.array_equal(cubic, vision.face_320(frame, box, cv2.INTER_CUBIC))
    with pytest.raises(ConfigError, match="unknown interpolation"):
        vision.face_320(frame, box, "bicubic")


def test_out_of_frame_parts_replicate_the_edge() -> None:
    frame = natural_frame(100, 120)
    box = (-20, -20, 60, 60)  # 20 px out on the left and top
    region = vision._region(frame, box)
    assert region.shape == (80, 80, 3)
    assert np.array_equal(region[20:, 20:], frame[0:60, 0:60])
    assert np.array_equal(region[25, :20], np.repeat(frame[5, :1], 20, axis=0))
    assert np.array_equal(region[:20, 30], np.repeat(frame[:1, 10], 20, axis=0))


@pytest.mark.parametrize(
    "box",
    [(-50, -30, 150, 170), (400, 250, 560, 410), (-10, 300, 90, 400), (470, -5, 560, 85), (600, 600, 700, 700)],
)
def test_edge_boxes_do_not_crash_and_stay_in_bounds(box: tuple[int, int, int, int]) -> None:
    frame = natural_frame()  # 480x360
    face = vision.face_320(frame, box)
    assert face.shape == (320, 320, 3)
    new_face = np.full_like(face, 255)
    out = vision.composite(frame, box, new_face)
    assert out.shape == frame.shape
    inside = vision.clip_box(box, 480, 360)
    mask = np.zeros(frame.shape[:2], bool)
    if inside is not None:
        x1, y1, x2, y2 = inside
        mask[y1:y2, x1:x2] = True
        assert not np.array_equal(out[mask], frame[mask])  # the in-frame part was pasted
    assert np.array_equal(out[~mask], frame[~mask])


# --------------------------------------------------------------------------- mask and inputs


def test_mask_exact_pixels() -> None:
    face = np.full((320, 320, 3), 200, np.uint8)
    masked = vision.mask_face(face)
    assert (face == 200).all()  # input untouched
    zero = np.zeros((320, 320), bool)
    zero[5:310, 5:315] = True  # cv2.rectangle((5,5,310,305)): x 5..314, y 5..309 inclusive
    assert (masked[zero] == 0).all()
    assert (masked[~zero] == 200).all()
    assert masked[4, 100].tolist() == [200] * 3 and masked[310, 100].tolist() == [200] * 3
    assert masked[100, 4].tolist() == [200] * 3 and masked[100, 315].tolist() == [200] * 3


def test_mask_input_changes_output_in_the_frame() -> None:
    a, b = np.full((320, 320, 3), 10, np.uint8), np.full((320, 320, 3), 90, np.uint8)
    assert not np.array_equal(vision.mask_face(a), vision.mask_face(b))


def test_visual_input_layout_is_face_then_masked_face_bgr() -> None:
    face = natural_frame(320, 320)
    v = vision.visual_input(face)
    assert v.shape == (6, 320, 320) and v.dtype == np.uint8
    assert np.array_equal(v[:3], face.transpose(2, 0, 1))
    assert np.array_equal(v[3:], vision.mask_face(face).transpose(2, 0, 1))
    assert np.array_equal(v[0], face[:, :, 0])  # channel 0 is blue: no RGB swap
    assert not np.array_equal(v, vision.visual_input(natural_frame(320, 320, seed=3)))


def test_visual_batch_equals_stacked_singles() -> None:
    faces = np.stack([natural_frame(320, 320, seed=s) for s in range(3)])
    batch = vision.visual_batch(faces)
    assert batch.shape == (3, 6, 320, 320)
    for k in range(3):
        assert np.array_equal(batch[k], vision.visual_input(faces[k]))
    norm = vision.normalize(batch)
    assert norm.dtype == np.float32 and norm.max() <= 1.0
    np.testing.assert_allclose(norm, batch.astype(np.float32) / 255.0, atol=1e-7)
    with pytest.raises(ConfigError):
        vision.visual_batch(np.zeros((2, 328, 328, 3), np.uint8))


def test_output_to_uint8_rounds_clips_and_transposes() -> None:
    out = np.zeros((3, 320, 320), np.float32)
    out[0] = 0.5  # 127.5 -> 128 (rounded, upstream would truncate to 127)
    out[1] = 1.7  # clipped to 255
    out[2] = -0.2  # clipped to 0
    img = vision.output_to_uint8(out)
    assert img.shape == (320, 320, 3) and img.dtype == np.uint8
    assert img[0, 0].tolist() == [128, 255, 0]
    assert vision.output_to_uint8(np.full((3, 320, 320), 0.1, np.float32))[0, 0, 0] == 26  # 25.5 -> 26
    batch = np.stack([out, out * 0.5])
    b = vision.output_to_uint8(batch)
    assert b.shape == (2, 320, 320, 3) and np.array_equal(b[0], img)
    assert b[1, 0, 0, 0] == 64  # input changes output
    u8 = (np.arange(3 * 320 * 320) % 256).astype(np.uint8).reshape(3, 320, 320)
    assert np.array_equal(vision.output_to_uint8(u8), u8.transpose(1, 2, 0))



def test_channel_moves_are_the_bytes_of_a_transpose_for_any_layout() -> None:
    """output_to_uint8 and visual_batch interleave/split channels with OpenCV: every byte equals numpy's
    transpose, for batches, single images, strided inputs and empty batches, in new contiguous memory."""
    rng = np.random.default_rng(7)
    floats = rng.random((3, 3, 320, 320), dtype=np.float32) * 1.2 - 0.1
    for x in (floats, floats[1], floats[::2], floats[:0]):
        axes = (1, 2, 0) if x.ndim == 3 else (0, 2, 3, 1)
        for rounding, add in (("nearest", 0.5), ("truncate", 0.0)):
            want = np.clip(x * np.float32(255.0) + np.float32(add), 0, 255).astype(np.uint8).transpose(axes)
            got = vision.output_to_uint8(x, rounding=rounding)
            assert got.shape == want.shape and got.flags.c_contiguous and np.array_equal(got, want)
    u8 = rng.integers(0, 256, (2, 3, 320, 320), dtype=np.uint8)
    strided = np.asfortranarray(u8)
    got = vision.output_to_uint8(strided)
    assert np.array_equal(got, u8.transpose(0, 2, 3, 1)) and not np.shares_memory(got, strided)
    faces = rng.integers(0, 256, (3, 320, 320, 3), dtype=np.uint8)
    for f in (faces, np.asfortranarray(faces), faces[::2]):
        v = vision.visual_batch(f)
        assert np.array_equal(v[:, :3], f.transpose(0, 3, 1, 2))
        assert np.array_equal(v[:, 3:], np.stack([vision.mask_face(one) for one in f]).transpose(0, 3, 1, 2))
    assert vision.visual_batch(faces[:0]).shape == (0, 6, 320, 320)


# --------------------------------------------------------------------------- compositing


def test_composite_touches_only_the_box_and_copies() -> None:
    frame = natural_frame()
    before = frame.copy()
    box = (150, 100, 330, 280)
    out = vision.composite(frame, box, np.zeros((320, 320, 3), np.uint8))
    assert np.array_equal(frame, before)  # input untouched
    assert out is not frame
    mask = np.zeros(frame.shape[:2], bool)
    mask[100:280, 150:330] = True
    assert np.array_equal(out[~mask], frame[~mask])
    assert out[190, 240].tolist() == [0, 0, 0]  # the face landed in the box


def test_composite_of_the_unchanged_face_reproduces_the_box() -> None:
    frame = natural_frame()
    box = (150, 100, 330, 280)
    out = vision.composite(frame, box, vision.face_320(frame, box))
    assert psnr(out[100:280, 150:330], frame[100:280, 150:330]) > 35


def test_composite_round_trip_on_real_frame(sanders_dir: Path) -> None:
    frame = cv2.imread(str(sanders_dir / "full_body_img" / "100.jpg"))
    box = vision.crop_box_from_landmarks(vision.read_lms(sanders_dir / "landmarks" / "100.lms"))
    out = vision.composite(frame, box, vision.face_320(frame, box))
    x1, y1, x2, y2 = box
    assert psnr(out[y1:y2, x1:x2], frame[y1:y2, x1:x2]) > 35


def test_composite_face_changes_output_and_options_have_effect() -> None:
    frame = natural_frame()
    box = (150, 100, 330, 280)
    a = vision.composite(frame, box, np.zeros((320, 320, 3), np.uint8))
    b = vision.composite(frame, box, np.full((320, 320, 3), 255, np.uint8))
    assert not np.array_equal(a, b)
    face = natural_frame(320, 320, seed=5)
    cubic = vision.composite(frame, box, face)
    linear = vision.composite(frame, box, face, paste_interpolation="linear")
    assert not np.array_equal(cubic, linear)
    # the 4-px ring comes from the crop, so the crop interpolation matters too
    assert not np.array_equal(cubic, vision.composite(frame, box, face, interpolation="linear"))
    # a precomputed crop gives the same result
    crop = vision.crop_328(frame, box)
    assert np.array_equal(cubic, vision.composite(frame, box, face, crop=crop))
    assert np.array_equal(crop, vision.crop_328(frame, box))  # crop not modified


def test_composite_inplace_writes_into_the_frame() -> None:
    frame = natural_frame()
    box = (150, 100, 330, 280)
    expected = vision.composite(frame, box, np.zeros((320, 320, 3), np.uint8))
    out = vision.composite(frame, box, np.zeros((320, 320, 3), np.uint8), inplace=True)
    assert out is frame and np.array_equal(frame, expected)
