"""An offline render's memory does not grow with the audio: the file is decoded as the render goes, npy rows are
read a block at a time, and nothing is kept per frame. Checked by what is decoded and held, not by timing or RSS
(the figures are in benchmarks/memory_bounded.py)."""

from __future__ import annotations

import gc
import sys
import threading
import time
import types
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from avatar.audio import load_audio
from avatar.demo import speechlike_audio, write_wav
from avatar.render import render


def _wav_44k_stereo(path: Path, seconds: float) -> Path:
    """A 44.1 kHz stereo 16-bit WAV: the decode resamples and averages channels, as most user files need."""
    speech = speechlike_audio(seconds, seed=3)  # 16 kHz; stretched onto 44.1 kHz (pitch is of no concern here)
    left = np.interp(np.arange(int(44100 * seconds)) * (16000 / 44100), np.arange(len(speech)), speech)
    right = 0.5 * left + 0.05 * np.sin(2 * np.pi * 700 * np.arange(len(left)) / 44100)
    data = np.round(np.clip(np.stack([left, right], axis=1), -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(44100)
        w.writeframes(data.tobytes())
    return path


def _collect(kit: dict[str, Path], audio: Any, **kw: Any) -> tuple[list[np.ndarray], np.ndarray, Any]:
    images: list[np.ndarray] = []
    audio_out: list[np.ndarray] = []

    def keep(frame: Any) -> None:
        images.append(frame.image.copy())
        audio_out.append(np.asarray(frame.audio).copy())

    kw.setdefault("features_opts", {"encoder": str(kit["encoder"])})
    opts = kw.pop("features_opts")
    report = render(kit["avatar"], audio, sinks=[("callback", {"fn": keep})], model=kit["unet"],
                    features=kw.pop("features", "ave"), feature_options=opts, backend=kw.pop("backend", "cpu"), **kw)
    return images, np.concatenate(audio_out), report


# --------------------------------------------------------------------------- the same output as before


def test_a_file_streamed_renders_exactly_what_the_whole_signal_renders(small_render_kit: dict[str, Path],
                                                                        tmp_path: Path) -> None:
    """A file path is decoded chunk by chunk; the frames and audio equal a render of the whole decoded signal."""
    wav = _wav_44k_stereo(tmp_path / "speech44.wav", 3.3)
    streamed, streamed_audio, rep_s = _collect(small_render_kit, wav)
    whole, whole_audio, rep_w = _collect(small_render_kit, load_audio(wav))  # the previous path: all of it in memory
    assert rep_s.frames == rep_w.frames == len(streamed) == 83  # ceil(3.3 s * 25)
    assert len(streamed) == len(whole)
    for a, b in zip(streamed, whole):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(streamed_audio, whole_audio)
    np.testing.assert_array_equal(streamed_audio, load_audio(wav))  # every sample, once, in order
    assert rep_s.audio_s == pytest.approx(len(load_audio(wav)) / 16000)
    # the input changes the output (the comparison is not between two constant videos)
    other, _, _ = _collect(small_render_kit, small_render_kit["wav"], frame_limit=20)
    assert any(not np.array_equal(a, b) for a, b in zip(other, streamed[:20]))


def test_npy_rows_read_in_blocks_give_the_same_windows_and_frames(small_render_kit: dict[str, Path], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows read a few at a time give every window make_windows gives on all rows (padding at both ends included)."""
    import avatar_plugins.features.precomputed as pre
    from avatar.engine.stages import assemble_windows
    from avatar.plugins import get_plugin_manager
    from avatar.windows import WindowAssembler, make_windows

    rows = np.random.default_rng(5).standard_normal((61, 512)).astype(np.float32)
    np.save(tmp_path / "rows.npy", rows)
    for padding in ("replicate", "zero"):
        source = get_plugin_manager().feature_source("npy", path=str(tmp_path / "rows.npy"), padding=padding)
        want = make_windows(rows, source)
        for block in (1, 7, 8, 16, 1024):
            monkeypatch.setattr(pre, "BLOCK_ROWS", block)
            assembler = WindowAssembler(source)
            stream = source.open_stream()
            pairs = list(assemble_windows(stream, assembler, np.zeros(640, np.float32)))
            pairs += list(assemble_windows(stream, assembler, None))
            assert [j for j, _ in pairs] == list(range(61))
            np.testing.assert_array_equal(np.stack([w for _, w in pairs]), want)
    # a whole render: blocks of 7 rows (many block edges) against one block (all rows at once, the previous way)
    opts = {"path": str(tmp_path / "rows.npy")}
    monkeypatch.setattr(pre, "BLOCK_ROWS", 7)
    small, small_audio, _ = _collect(small_render_kit, small_render_kit["wav"], features="npy", features_opts=opts)
    monkeypatch.setattr(pre, "BLOCK_ROWS", 10**6)
    one, one_audio, _ = _collect(small_render_kit, small_render_kit["wav"], features="npy", features_opts=opts)
    assert len(small) == len(one) == 61
    for a, b in zip(small, one):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(small_audio, one_audio)


# --------------------------------------------------------------------------- a stand-in model (its cost is not what is counted)


def _constant_backend(model: Path) -> Any:
    """A Backend of ``model`` that returns a face of 0.5 for every row at once.

    The engine, its feature sources and its sinks are real; the model's cost
    only makes a long render slow on a 2-core machine, and is not what is counted.
    """
    from avatar.models.synthetic import constant_face_backend

    return constant_face_backend(model)


def test_a_file_is_decoded_as_the_render_goes(small_render_kit: dict[str, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """When frame k is written, the decoder has produced at most a few seconds beyond frame k's audio.

    The bound: the feeder holds 2 s ahead of the features (``hold_s``), the
    features read 0.64 s at a time and keep 32 frames (1.28 s) in flight, and an
    AVE window looks 0.45 s ahead: about 4.5 s. The previous path decoded the
    whole 20 s before the first frame.
    """
    import avatar.audio as audio_mod

    decoded = {"n": 0}
    real = audio_mod._decode

    def counting(path: Path, rate: int, *args: Any, **kw: Any) -> Any:
        decoded["n"] = 0  # samples this decode (the latest one) has produced
        for block in real(path, rate, *args, **kw):
            decoded["n"] += len(block)
            yield block

    monkeypatch.setattr(audio_mod, "_decode", counting)
    wav = tmp_path / "twenty.wav"
    write_wav(wav, speechlike_audio(20.0, seed=4))
    ahead: list[int] = []
    shares: list[np.ndarray] = []

    def probe(frame: Any) -> None:
        shares.append(np.asarray(frame.audio).copy())
        ahead.append(decoded["n"] - 640 * len(shares))  # decoded beyond this frame's share

    rep = render(small_render_kit["avatar"], wav, sinks=[("callback", {"fn": probe})], model=small_render_kit["unet"],
                 feature_options={"encoder": str(small_render_kit["encoder"])},
                 backend=_constant_backend(small_render_kit["unet"]))
    assert rep.frames == len(ahead) == 500
    np.testing.assert_array_equal(np.concatenate(shares), load_audio(wav))
    assert max(ahead) <= 8 * 16000, f"{max(ahead) / 16000:.1f} s of audio decoded ahead of the frame written"


# --------------------------------------------------------------------------- nothing kept per frame


def _held(roots: list[Any]) -> int:
    """Objects reachable from ``roots`` plus the items of the containers among them (module state left out)."""
    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, types.CodeType,
            threading.Lock().__class__, threading.RLock().__class__)
    modules = {id(vars(m)) for m in list(sys.modules.values()) if m is not None and hasattr(m, "__dict__")}
    seen: set[int] = set()
    stack = list(roots)
    n = 0
    while stack:
        o = stack.pop()
        if id(o) in seen or id(o) in modules or isinstance(o, skip):
            continue
        seen.add(id(o))
        n += 1
        if isinstance(o, types.FrameType):  # a thread's stack: its locals, not its callers' modules
            stack.extend(o.f_locals.values())
            continue
        if isinstance(o, (list, dict, set, tuple)) or type(o).__name__ in ("deque", "array"):
            n += len(o)
        stack.extend(gc.get_referents(o))
    return n


def _held_at(kit: dict[str, Path], tmp_path: Path, frames: int, monkeypatch: pytest.MonkeyPatch) -> int:
    """What an offline render holds ``50`` frames before its end, with npy rows and a file of ``frames`` frames."""
    import avatar.engine.offline as offline
    import avatar_plugins.features.precomputed as pre

    monkeypatch.setattr(pre, "BLOCK_ROWS", 64, raising=False)  # rows are read 64 at a time: many blocks in a render
    sessions: list[Any] = []

    class Recorded(offline.Session):  # type: ignore[misc,name-defined]
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            sessions.append(self)

    monkeypatch.setattr(offline, "Session", Recorded)
    np.save(tmp_path / f"rows{frames}.npy", np.random.default_rng(frames).standard_normal((frames, 512)).astype(np.float32))
    wav = tmp_path / f"a{frames}.wav"
    write_wav(wav, speechlike_audio(frames / 25, seed=2))
    held: list[int] = []
    count = {"k": 0}

    def probe(frame: Any) -> None:
        count["k"] += 1
        if count["k"] == frames - 50:
            time.sleep(0.5)  # the other stages fill the look-ahead and wait: a settled pipeline is counted
            gc.collect()
            session = sessions[-1]
            mine = {t.ident for t in threading.enumerate() if t.name.startswith("avatar-")}
            stacks = [f for tid, f in sys._current_frames().items() if tid in mine]
            roots: list[Any] = [session]
            for f in stacks:
                while f is not None:
                    roots.append(f)
                    f = f.f_back
            held.append(_held(roots))

    rep = render(kit["avatar"], wav, sinks=[("callback", {"fn": probe})], model=kit["unet"], features="npy",
                 feature_options={"path": str(tmp_path / f"rows{frames}.npy")}, backend=_constant_backend(kit["unet"]))
    assert rep.frames == frames and len(held) == 1
    return held[0]


def test_what_an_offline_render_holds_does_not_grow_with_its_length(small_render_kit: dict[str, Path], tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Counted items (objects and container entries) held by a render and its threads: 1,400 frames ≈ 200 frames.

    The previous engine kept a view of every npy row until the last window
    was made, and every pushed audio chunk (and when it came) while the
    features had not read it: thousands of items more in the longer render.
    """
    _held_at(small_render_kit, tmp_path, 120, monkeypatch)  # warm: first-use caches are not the render's
    short = _held_at(small_render_kit, tmp_path, 200, monkeypatch)
    long = _held_at(small_render_kit, tmp_path, 1400, monkeypatch)
    assert short > 100  # (it counts something)
    # (the look-ahead's 32 frames in flight, if a loaded machine has not settled them, are a few hundred items;
    # main held 3,300 more in the longer render)
    assert long - short < 1000, f"held {short} items at 200 frames, {long} at 1400"


def test_the_audio_clock_lets_go_of_the_audio_frames_took_even_if_the_features_never_read_it() -> None:
    """Precomputed rows make frames before their audio is read: the audio they took must not stay for a reader.

    The previous clock kept every chunk the feature stage had not read, so an
    npy render held all of its audio (and a timestamp per chunk) to the end.
    """
    from fractions import Fraction

    from avatar.engine import _AudioClock

    clock = _AudioClock(16000, Fraction(25))
    pcm = np.arange(16000 * 60, dtype=np.float32)  # a minute, fed as an offline feeder does (0.64 s chunks)
    shares, kept = [], []
    j = 0
    for i in range(0, len(pcm), 10240):
        clock.add(pcm[i : i + 10240])
        while clock.total >= clock.bounds(j)[1]:
            shares.append(clock.take(j, last=False))
            j += 1
        kept.append(len(clock._buf) + len(clock._when))
    np.testing.assert_array_equal(np.concatenate(shares), pcm)
    assert max(kept) <= 4, f"chunks kept: up to {max(kept) // 2} of {len(kept)}"
    # a reader that comes late reads on from what is still there (the chunk of the last share taken)
    piece, _ = clock.read(640)
    assert len(piece) == 640 and clock.bounds(j - 1)[0] - 10240 < piece[0] <= clock.bounds(j - 1)[0]
    # audio that has not been taken stays for the reader, whole and in order
    live = _AudioClock(16000, Fraction(25))
    for i in range(0, 32000, 999):
        live.add(pcm[i : min(i + 999, 32000)])
    got = [live.read(1000)[0] for _ in range(32)]
    np.testing.assert_array_equal(np.concatenate(got), pcm[:32000])
    assert live.unread == 0


def test_the_shown_rate_is_counted_in_fixed_memory() -> None:
    """Session.stats().fps: frames shown over the last interval, from 10 counters (not a timestamp per frame:
    an unpaced render shows thousands of frames a second)."""
    from avatar.engine.pacing import RateWindow

    w = RateWindow(1.0, buckets=10)
    for k in range(5000):  # 5,000 frames in half a second
        w.add(100.0 + k * 1e-4)
    assert len(w._counts) == 10
    assert w.rate(100.5) == 5000
    assert w.rate(101.45) == 0  # a second later they are out of the window
    for k in range(50):  # 25 fps for 2 s
        w.add(102.0 + k * 0.04)
    assert 22 <= w.rate(104.0 - 1e-9) <= 25


def test_the_idle_window_of_a_long_npy_file_is_one_window_not_all_of_them(tmp_path: Path) -> None:
    """A live session idling on the model takes the window in the middle of a second of silence; an npy source
    answers with every row of its file, and making every window of an hour's file would cost ~2.9 GB."""
    import tracemalloc

    from avatar.engine.output import _silent_window
    from avatar.windows import make_windows
    from avatar_plugins.features.precomputed import PrecomputedSource

    rows = np.random.default_rng(0).standard_normal((4000, 512)).astype(np.float32)  # 8 MB; all windows: 131 MB
    np.save(tmp_path / "rows.npy", rows)
    source = PrecomputedSource(path=str(tmp_path / "rows.npy"))
    tracemalloc.start()
    try:
        got = _silent_window(source)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40e6, f"{peak / 1e6:.0f} MB traced for one window"
    np.testing.assert_array_equal(got, make_windows(rows[1990:2010], source)[10])  # the middle row's window
