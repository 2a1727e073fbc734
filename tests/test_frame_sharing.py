"""Decode an avatar once, for everyone: the frame store's kept frames, pinning, and N sessions of one avatar."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from avatar.framestore import FrameStore, _decode_all
from avatar.package import write_package
from avatar.schedule import pingpong

W, H, N, GOP = 192, 128, 40, 5


@pytest.fixture(scope="module")
def pkg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from avatar.demo import synthetic_frames
    from avatar.models.synthetic import make_audio_encoder, make_unet

    d = tmp_path_factory.mktemp("sharing")
    frames, boxes = synthetic_frames(N, width=W, height=H)
    unet = make_unet(d / "unet.onnx", mode="ave", seed=1, tiny=True)
    enc = make_audio_encoder(d / "enc.onnx", seed=1, tiny=True)
    return write_package(d / "avatar", iter(frames), boxes, fps=25, name="sharing", gop=GOP, preset="ultrafast",
                         model=unet, audio_encoder=enc)


def test_kept_frames_are_exactly_the_decoded_frames_at_half_the_memory(pkg: Path) -> None:
    store = FrameStore(pkg / "frames.mp4", memory_budget_mb=64)
    want = list(_decode_all(pkg / "frames.mp4"))
    for i in np.random.default_rng(0).permutation(N):
        got = store.frame(int(i))
        assert got.shape == (H, W, 3) and not got.flags.writeable
        np.testing.assert_array_equal(got, want[i])
    # kept as I420: 1.5 bytes a pixel, every frame once
    assert store.frame_bytes == W * H * 3 // 2
    assert store.cached_bytes == N * W * H * 3 // 2
    assert store.decoded_frames == N and store.frame_decodes.tolist() == [1] * N
    store.close()


def test_preload_decodes_what_the_store_keeps_once(pkg: Path) -> None:
    gop_mb = GOP * W * H * 1.5 / 2**20
    part = FrameStore(pkg / "frames.mp4", memory_budget_mb=4 * gop_mb + 0.001)
    assert part.preload() == part.pinned_capacity == 2
    assert part.decoded_frames == 2 * GOP and part.preload() == 0  # nothing more to keep
    list(part.frames(range(2 * GOP)))  # the pinned frames: no decode
    assert part.decoded_frames == 2 * GOP
    whole = FrameStore(pkg / "frames.mp4", memory_budget_mb=2)
    assert whole.preload() == whole.gop_count
    _walk(whole, [0, 21], ticks=2 * N)
    assert whole.frame_decodes.tolist() == [1] * N
    for s in (part, whole):
        s.close()


def _walk(store: FrameStore, starts: list[int], ticks: int) -> None:
    """Walkers ping-ponging from their own start positions, interleaved tick by tick (sessions of one avatar)."""
    for t in range(ticks):
        for s in starts:
            store.frame(pingpong(s + t, N))


def test_pinned_gops_serve_walkers_at_any_position_within_the_budget(pkg: Path) -> None:
    gop_mb = GOP * W * H * 1.5 / 2**20
    store = FrameStore(pkg / "frames.mp4", memory_budget_mb=4 * gop_mb + 0.001)  # 4 of 8 GOPs
    assert (store.capacity, store.pinned_capacity, store.fits_in_budget) == (4, 2, False)  # half pinned
    _walk(store, [0, 13, 27], ticks=4 * N)  # two whole ping-pong passes each
    pinned = sorted(store._pinned)
    assert len(pinned) == 2
    for g in pinned:  # a pinned GOP was decoded once, whoever walked through it, however often
        assert store.frame_decodes[g * GOP : (g + 1) * GOP].tolist() == [1] * GOP
    assert store.cached_bytes <= store.memory_budget  # bounded
    # a budget for all of it: every frame decoded once, for every walker
    whole = FrameStore(pkg / "frames.mp4", memory_budget_mb=2)
    assert whole.fits_in_budget and whole.pinned_capacity == whole.gop_count
    _walk(whole, [0, 13, 27], ticks=4 * N)
    assert whole.frame_decodes.tolist() == [1] * N
    for s in (store, whole):
        s.close()


@pytest.mark.parametrize("sessions,warmup,fits", [(1, False, True), (3, False, True), (3, True, True), (3, False, False)])
def test_n_live_sessions_of_one_avatar_decode_each_frame_once(pkg: Path, sessions: int, warmup: bool, fits: bool) -> None:
    """Idle sessions walk the avatar's own frames: N sessions cost the decodes of one."""
    from avatar.engine import AvatarService, Clock
    from avatar.interfaces import Sink, SinkReport, StreamInfo, VideoFrame

    class Count(Sink):
        name = "count"

        def __init__(self) -> None:
            self.n = 0
            self.avatar: set[int] = set()

        def open(self, info: StreamInfo) -> None:
            pass

        def write(self, frame: VideoFrame) -> None:
            self.n += 1
            self.avatar.add(frame.avatar_index)

        def close(self, aborted: bool = False) -> SinkReport:
            return SinkReport(frames=self.n)

    sinks = [Count() for _ in range(sessions)]
    # fits: the whole avatar; else one GOP less: the store pins all but its LRU share
    budget = (N - (0 if fits else GOP)) * W * H * 1.5 / 2**20 + 0.001
    with AvatarService(backend="cpu", clock=Clock.scaled(4.0), warmup=warmup, frame_memory_mb=budget) as svc:
        opened = [svc.open_session(pkg, sinks=[k], walk_start=7 * i) for i, k in enumerate(sinks)]
        store = opened[0].package.store
        assert all(s.package.store is store for s in opened)  # one store for the avatar
        deadline = time.monotonic() + 60
        while min(k.n for k in sinks) < 2 * N + 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        decodes = store.frame_decodes.copy()
        pinned_gops = list(store._pinned)
    assert all(k.n >= 2 * N for k in sinks) and all(len(k.avatar) == N for k in sinks)
    if fits:  # every session walked the whole avatar (more than one pass), each frame was decoded once in all
        assert decodes.tolist() == [1] * N
        return
    # the pinned frames were decoded once in all; the rest (the LRU's share) at most once per session and visit
    pinned = sorted(g * GOP + k for g in pinned_gops for k in range(GOP))
    assert len(pinned) >= 2 * GOP and decodes[pinned].tolist() == [1] * len(pinned)
    visits = 2 * (max(k.n for k in sinks) // (2 * N) + 1)  # a ping-pong pass visits a GOP twice
    assert decodes.max() <= sessions * visits


@pytest.mark.parametrize("codec", ["h264", "ffv1"])
def test_writable_frames_are_new_memory_and_composite_pastes_into_them(pkg: Path, tmp_path: Path, codec: str) -> None:
    """A writable frame equals the kept one and is the caller's own (I420 store: the conversion's new
    memory, no extra copy; BGR store: a copy); compositing pastes into it and leaves the store's frames alone."""
    from avatar.demo import synthetic_frames
    from avatar.engine.stages import StageTimes, composite_faces
    from avatar.package import AvatarPackage
    from avatar.vision import composite, output_to_uint8

    path = pkg
    if codec != "h264":
        frames, boxes = synthetic_frames(8, width=W, height=H)
        path = write_package(tmp_path / "ffv1", iter(frames), boxes, fps=25, name="ffv1", frames_codec=codec)
    with AvatarPackage.open(path) as p:
        before = [np.array(p.frame(i)) for i in range(4)]
        for i in range(4):
            w = p.frame(i, writable=True)
            assert w.flags.writeable and not p.frame(i).flags.writeable
            np.testing.assert_array_equal(w, before[i])
            w[:] = 7
            np.testing.assert_array_equal(p.frame(i), before[i])
        faces = np.random.default_rng(3).random((4, 3, 320, 320), dtype=np.float32)
        got = composite_faces(p, [0, 1, 2, 3], faces, StageTimes())
        for i, (image, _, box) in enumerate(got):
            want = composite(before[i], box, output_to_uint8(faces[i]), interpolation=p.crop_interpolation)
            np.testing.assert_array_equal(image, want)
            assert not np.array_equal(image, before[i])  # the face is in it
            np.testing.assert_array_equal(p.frame(i), before[i])
