"""The 'ave' and 'npy' feature sources, through the real plugin manager and a real ONNX Runtime backend."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from avatar.errors import ConfigError, FeatureError
from avatar.mel import melspectrogram
from avatar.plugins import get_plugin_manager
from avatar.windows import WindowAssembler, make_windows
from avatar_plugins.features.ave import AveSource, frame_count, samples_for_row, upstream_frame_count
from avatar_plugins.features.precomputed import PrecomputedSource

ort = pytest.importorskip("onnxruntime")


def _speechish(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    f0 = 120 + 40 * np.sin(2 * np.pi * (0.5 + 0.1 * seed) * t)
    phase = 2 * np.pi * np.cumsum(f0) / 16000
    voiced = sum(np.sin(k * phase + seed) / k for k in range(1, 10))
    env = np.clip(np.sin(2 * np.pi * (3 + seed % 3) * t), 0, None)
    return (0.25 * env * voiced + 0.01 * rng.standard_normal(n)).astype(np.float32)


def _matmul_encoder(path: Path, *, out_dim: int = 512, in_shape: tuple = ("batch", 1, 80, 16), seed: int = 0) -> Path:
    """A small encoder: Flatten -> MatMul -> Tanh (fixed or dynamic batch, any output width)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    flat = int(np.prod([d for d in in_shape[1:]]))
    w = (np.random.default_rng(seed).standard_normal((flat, out_dim)) / np.sqrt(flat)).astype(np.float32)
    nodes = [
        helper.make_node("Flatten", ["mel"], ["f"], axis=1),
        helper.make_node("MatMul", ["f", "w"], ["m"]),
        helper.make_node("Tanh", ["m"], ["feature"]),
    ]
    graph = helper.make_graph(
        nodes,
        "enc",
        [helper.make_tensor_value_info("mel", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info("feature", TensorProto.FLOAT, [in_shape[0], out_dim])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from avatar.models.synthetic import make_audio_encoder

    d = tmp_path_factory.mktemp("enc")
    return {
        "enc0": make_audio_encoder(d / "enc0.onnx", seed=0, tiny=True),
        "enc1": make_audio_encoder(d / "enc1.onnx", seed=1, tiny=True),
        "fixed1": _matmul_encoder(d / "fixed1.onnx", in_shape=(1, 1, 80, 16)),
        "dyn": _matmul_encoder(d / "dyn.onnx"),
        "w256": _matmul_encoder(d / "w256.onnx", out_dim=256),
        "unet_like": _matmul_encoder(d / "unet_like.onnx", in_shape=("batch", 32, 16, 16)),
    }


@pytest.fixture(scope="module")
def pm():  # type: ignore[no-untyped-def]
    manager = get_plugin_manager()
    if "cpu" not in manager.names("backend"):
        pytest.skip("the 'cpu' backend plugin is not available")
    return manager


@pytest.fixture(scope="module")
def ave(pm, models):  # type: ignore[no-untyped-def]
    src = pm.feature_source("ave", encoder=models["enc0"])
    yield src
    src.close()


def _stream_rows(src, pcm: np.ndarray, sizes) -> np.ndarray:  # type: ignore[no-untyped-def]
    s = src.open_stream()
    parts, i, k = [], 0, 0
    while i < len(pcm):
        step = sizes if isinstance(sizes, int) else sizes[k % len(sizes)]
        parts.append(s.push(pcm[i : i + step]))
        i, k = i + step, k + 1
    parts.append(s.finish())
    return np.concatenate(parts)


def _upstream_rows(pcm: np.ndarray, encoder: Path) -> np.ndarray:
    """SyncTalk_2D's AudDataset + inference framing, written independently of the plugin."""
    mel = melspectrogram(pcm)  # [T, 80], checked against librosa in test_mel.py
    n = int((mel.shape[0] - 16) / 80.0 * float(25)) + 2
    wins = []
    for f in range(n):
        start = int(80.0 * (f / float(25)))
        end = start + 16
        if end > mel.shape[0]:
            end = mel.shape[0]
            start = end - 16
        wins.append(mel[start:end].T[None])
    sess = ort.InferenceSession(str(encoder), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: np.stack(wins).astype(np.float32)})[0]
    return np.concatenate([out[:1], out, out[-1:]])


# ----------------------------------------------------------------- registration and options


def test_registered_through_entry_points(pm) -> None:  # type: ignore[no-untyped-def]
    reg = pm.get("feature_source", "ave")
    assert reg.obj is AveSource and reg.availability().usable
    assert pm.get("feature_source", "npy").obj is PrecomputedSource
    assert AveSource.fps == 25 and AveSource.row_shape == (512,) and AveSource.window_shape == (32, 16, 16)


def test_defaults(ave) -> None:  # type: ignore[no-untyped-def]
    assert ave.padding == "replicate" and ave.stft_pad == "constant" and ave.backend_name == "cpu"


def test_encoder_required(pm) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="make-test-model"):
        pm.feature_source("ave")
    with pytest.raises(FeatureError, match="not found.*make-test-model"):
        pm.feature_source("ave", encoder="/nonexistent/enc.onnx")


def test_bad_options(pm, models) -> None:  # type: ignore[no-untyped-def]
    enc = models["enc0"]
    with pytest.raises(ConfigError, match="unknown option"):
        pm.feature_source("ave", encoder=enc, windowz=3)
    with pytest.raises(ConfigError, match="batch"):
        pm.feature_source("ave", encoder=enc, batch=0)
    with pytest.raises(ConfigError, match="stft_pad"):
        pm.feature_source("ave", encoder=enc, stft_pad="edge")
    with pytest.raises(ConfigError, match="padding"):
        pm.feature_source("ave", encoder=enc, padding="mirror")
    with pytest.raises(ConfigError, match="no backend named"):
        pm.feature_source("ave", encoder=enc, backend="no-such-backend")
    with pytest.raises(ConfigError, match="threads must be at least 1"):
        pm.feature_source("ave", encoder=enc, threads=0)


def test_threads_option_reaches_the_encoder_session(pm, models) -> None:  # type: ignore[no-untyped-def]
    pcm = _speechish(16000, seed=2)
    one = pm.feature_source("ave", encoder=models["enc0"], threads=1)
    default = pm.feature_source("ave", encoder=models["enc0"])
    assert one.backend._session.get_session_options().intra_op_num_threads == 1
    assert default.backend._session.get_session_options().intra_op_num_threads == 0  # ORT's own choice
    np.testing.assert_allclose(one.rows(pcm), default.rows(pcm), atol=1e-5)  # threads never change the result


def test_wrong_models_are_explained(pm, models) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FeatureError, match=r"\[B,1,80,16\]"):
        pm.feature_source("ave", encoder=models["unet_like"])
    src = pm.feature_source("ave", encoder=models["w256"])
    with pytest.raises(FeatureError, match="256 values"):
        src.rows(_speechish(8000))


def test_fixed_batch_encoder(pm, models) -> None:  # type: ignore[no-untyped-def]
    pcm = _speechish(16000, seed=2)
    fixed = pm.feature_source("ave", encoder=models["fixed1"]).rows(pcm)
    dyn = pm.feature_source("ave", encoder=models["dyn"]).rows(pcm)
    assert np.abs(fixed - dyn).max() <= 1e-5


# ----------------------------------------------------------------- frame count and alignment


@pytest.mark.parametrize("n", [1, 639, 640, 641, 2999, 3000, 3001, 16000, 16001, 40000 + 123])
def test_row_count_is_ceil_of_duration(ave, n: int) -> None:  # type: ignore[no-untyped-def]
    rows = ave.rows(_speechish(n, seed=n % 7))
    assert rows.shape == (math.ceil(n * 25 / 16000), 512) == (frame_count(n), 512)
    assert rows.dtype == np.float32 and np.isfinite(rows).all()


def test_no_audio_no_rows(ave) -> None:  # type: ignore[no-untyped-def]
    assert ave.rows(np.zeros(0, np.float32)).shape == (0, 512)


def test_count_against_upstream() -> None:
    """Ours = upstream's int((T_mel-16)/80*25)+2 windows + 2 duplicates, plus 1 or 2 rows."""
    extra = {frame_count(n) - upstream_frame_count(n) for n in range(3000, 400_000, 7)}
    assert extra == {1, 2}


@pytest.mark.parametrize("n", [3000, 16000 + 150, 48000 + 333, 52480])
def test_rows_match_upstream_framing(ave, models, n: int) -> None:  # type: ignore[no-untyped-def]
    pcm = _speechish(n, seed=3)
    ours = ave.rows(pcm)
    ref = _upstream_rows(pcm, models["enc0"])
    assert len(ours) >= len(ref)
    assert np.abs(ours[: len(ref)] - ref).max() <= 1e-5
    # the rows beyond upstream's count repeat its last (shifted-back) window
    assert np.abs(ours[len(ref) :] - ref[-1]).max(initial=0) <= 1e-5
    np.testing.assert_array_equal(ours[0], ours[1])


def test_very_short_audio_is_padded_with_silence(ave) -> None:  # type: ignore[no-untyped-def]
    pcm = _speechish(1000, seed=4)
    rows = ave.rows(pcm)
    assert len(rows) == 2
    mel = np.concatenate([melspectrogram(pcm), np.full((16 - 6, 80), -4.0, np.float32)])
    np.testing.assert_allclose(rows[0], ave.encode(mel.T[None, None])[0], atol=1e-6)


# ----------------------------------------------------------------- the inputs matter


def test_audio_changes_rows(ave) -> None:  # type: ignore[no-untyped-def]
    a = ave.rows(_speechish(32000, seed=5))
    b = ave.rows(_speechish(32000, seed=6))
    s = ave.rows(np.zeros(32000, np.float32))
    assert np.abs(a - b).mean() > 1e-2
    assert np.abs(a - s).mean() > 1e-2
    assert np.abs(a[10] - a[20]).mean() > 1e-3  # rows follow the audio in time


def test_encoder_changes_rows(pm, ave, models) -> None:  # type: ignore[no-untyped-def]
    pcm = _speechish(24000, seed=7)
    other = pm.feature_source("ave", encoder=models["enc1"]).rows(pcm)
    assert np.abs(ave.rows(pcm) - other).mean() > 1e-2


def test_stft_pad_option_changes_edge_rows_only(pm, ave, models) -> None:  # type: ignore[no-untyped-def]
    pcm = _speechish(32000, seed=8)
    a = ave.rows(pcm)
    b = pm.feature_source("ave", encoder=models["enc0"], stft_pad="reflect").rows(pcm)
    assert np.abs(a[:2] - b[:2]).max() > 1e-4  # the first window holds the padded mel row 0
    assert np.abs(a[-2:] - b[-2:]).max() > 1e-4
    np.testing.assert_array_equal(a[5:-8], b[5:-8])


def test_batch_option_bounds_encoder_calls(pm, models) -> None:  # type: ignore[no-untyped-def]
    pcm = _speechish(48000, seed=9)
    small = pm.feature_source("ave", encoder=models["enc0"], batch=5)
    big = pm.feature_source("ave", encoder=models["enc0"], batch=256)
    np.testing.assert_allclose(small.rows(pcm), big.rows(pcm), atol=1e-5)
    assert big.backend.stats.calls == 2  # one for the windows final in push, one at finish
    assert small.backend.stats.calls >= math.ceil(small.backend.stats.items / 5) > 2
    assert big.backend.stats.items == small.backend.stats.items


def test_one_encoder_call_per_push(pm, models) -> None:  # type: ignore[no-untyped-def]
    src = pm.feature_source("ave", encoder=models["enc0"], batch=64)
    s = src.open_stream()
    s.push(_speechish(16000, seed=10))  # 20 rows at once
    calls = src.backend.stats.calls
    rows = s.push(_speechish(16000, seed=11))
    assert len(rows) == 25 and src.backend.stats.calls == calls + 1


def test_min_rows_halves_the_encoder_calls_of_a_real_time_stream_and_changes_no_row(pm, models) -> None:  # type: ignore[no-untyped-def]
    pcm = _speechish(16000 * 4 + 123, seed=14)
    one = pm.feature_source("ave", encoder=models["enc0"])
    two = pm.feature_source("ave", encoder=models["enc0"], min_rows=2)
    try:
        a, b = _stream_rows(one, pcm, 320), _stream_rows(two, pcm, 320)  # 20 ms chunks, as a live client pushes
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-5  # the same rows, every one of them
        assert two.backend.stats.items == one.backend.stats.items
        assert two.backend.stats.calls <= one.backend.stats.calls // 2 + 1
        s = two.open_stream()  # a push that leaves one row ready keeps it; the next one brings both
        outs = [len(s.push(pcm[i : i + 320])) for i in range(0, 16000, 320)]
        assert set(outs) <= {0, 2} and 2 in outs
        assert len(s.finish()) + sum(outs) == len(one.rows(pcm[:16000]))  # the end flushes what was held
    finally:
        one.close()
        two.close()
    with pytest.raises(ConfigError, match="min_rows"):
        pm.feature_source("ave", encoder=models["enc0"], min_rows=0)
    with pytest.raises(ConfigError, match="min_rows"):
        pm.feature_source("ave", encoder=models["enc0"], batch=4, min_rows=5)


# ----------------------------------------------------------------- streaming


@pytest.mark.parametrize("sizes", [160, 320, 10240, [1, 999, 57, 4000, 640, 3]], ids=["10ms", "20ms", "640ms", "odd"])
def test_stream_equals_offline(ave, sizes) -> None:  # type: ignore[no-untyped-def]
    pcm = _speechish(16000 * 3 + 77, seed=12)
    off = ave.rows(pcm)
    on = _stream_rows(ave, pcm, sizes)
    assert on.shape == off.shape
    assert np.abs(on - off).max() <= 1e-5


def test_stream_random_chunks(ave) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(13)
    for n in [500, 2999, 3001, 9000, 20011]:
        pcm = _speechish(n, seed=n % 5)
        sizes = [int(x) for x in rng.integers(1, 3000, 40)]
        assert np.abs(_stream_rows(ave, pcm, sizes) - ave.rows(pcm)).max() <= 1e-5, n


def test_stream_push_after_finish(ave) -> None:  # type: ignore[no-untyped-def]
    s = ave.open_stream()
    s.push(_speechish(4000))
    s.finish()
    assert len(s.finish()) == 0
    with pytest.raises(FeatureError):
        s.push(_speechish(10))


def test_lookahead_is_exact(ave) -> None:  # type: ignore[no-untyped-def]
    pcm = _speechish(16000 * 4, seed=14)
    offline = ave.windows(pcm)
    worst = max(ave.samples_for_frame(i) - 640 * i for i in range(50))
    assert ave.lookahead_s * 16000 == worst == 7240
    for i in [0, 1, 3, 4, 17, 40]:
        need = ave.samples_for_frame(i)
        assert need <= math.ceil((i / 25 + ave.lookahead_s) * 16000)
        stream, asm = ave.open_stream(), WindowAssembler(ave)
        before = dict(asm.push(stream.push(pcm[: need - 1])))
        assert i not in before
        after = dict(asm.push(stream.push(pcm[need - 1 : need])))
        assert i in after
        np.testing.assert_allclose(after[i], offline[i], atol=1e-5)


def test_row_needs_its_samples_only(ave) -> None:  # type: ignore[no-untyped-def]
    """Rows released after n samples do not change with audio that follows."""
    head = _speechish(12800, seed=15)
    s1, s2 = ave.open_stream(), ave.open_stream()
    r1 = s1.push(np.concatenate([head, _speechish(8000, seed=16)]))
    r2 = s2.push(np.concatenate([head, _speechish(8000, seed=17)]))
    k = sum(1 for r in range(100) if samples_for_row(r) <= len(head))
    np.testing.assert_array_equal(r1[:k], r2[:k])
    assert not np.array_equal(r1[k:], r2[k:])


# ----------------------------------------------------------------- windows and padding


def test_padding_modes_at_edges_and_middle(pm, ave, models) -> None:  # type: ignore[no-untyped-def]
    pcm = _speechish(16000 * 2, seed=18)
    rows = ave.rows(pcm)
    zero_src = pm.feature_source("ave", encoder=models["enc0"], padding="zero")
    rep, zer = ave.windows(pcm), zero_src.windows(pcm)
    n = len(rows)
    assert rep.shape == zer.shape == (n, 32, 16, 16)
    np.testing.assert_array_equal(rep[8 : n - 7], zer[8 : n - 7])
    first_rep, first_zer = rep[0].reshape(16, 512), zer[0].reshape(16, 512)
    np.testing.assert_array_equal(first_rep[:8], np.tile(rows[0], (8, 1)))  # the specification
    np.testing.assert_array_equal(first_zer[:8], 0)  # upstream
    np.testing.assert_array_equal(first_rep[8:], rows[:8])
    last_rep, last_zer = rep[-1].reshape(16, 512), zer[-1].reshape(16, 512)
    np.testing.assert_array_equal(last_rep[9:], np.tile(rows[-1], (7, 1)))
    np.testing.assert_array_equal(last_zer[9:], 0)
    # the model input is 16 rows of 512 reshaped to (32, 16, 16), C order
    np.testing.assert_array_equal(rep[20].reshape(-1), rows[12:28].reshape(-1))


@pytest.mark.parametrize("padding", ["replicate", "zero"])
def test_streaming_windows_equal_offline(pm, models, padding: str) -> None:  # type: ignore[no-untyped-def]
    src = pm.feature_source("ave", encoder=models["enc0"], padding=padding)
    pcm = _speechish(16000 * 2 + 500, seed=19)
    offline = src.windows(pcm)
    stream, asm = src.open_stream(), WindowAssembler(src)
    got: dict[int, np.ndarray] = {}
    for i in range(0, len(pcm), 320):
        got.update(asm.push(stream.push(pcm[i : i + 320])))
    got.update(asm.push(stream.finish()))
    got.update(asm.finish())
    assert sorted(got) == list(range(len(offline)))
    assert np.abs(np.stack([got[i] for i in range(len(offline))]) - offline).max() <= 1e-5


def test_a_long_live_stream_stays_bounded_and_equals_one_push(pm, models) -> None:  # type: ignore[no-untyped-def]
    """A minute pushed in 20 ms chunks, as a live session does: what each stage holds stays within one
    window all along, and the rows and windows are those of the whole signal pushed at once."""
    src = pm.feature_source("ave", encoder=models["enc0"])
    pcm = _speechish(16000 * 60 + 123, seed=21)
    stream, asm = src.open_stream(), WindowAssembler(src)
    rows, windows = [], {}
    held = {"samples": 0, "mel rows": 0, "rows": 0}
    for i in range(0, len(pcm), 320):
        r = stream.push(pcm[i : i + 320])
        rows.append(r)
        windows.update(asm.push(r))
        held["samples"] = max(held["samples"], stream.pending_samples)
        held["mel rows"] = max(held["mel rows"], stream.kept_mel_rows)
        held["rows"] = max(held["rows"], asm.kept_rows)
    tail = stream.finish()
    rows.append(tail)
    windows.update(asm.push(tail))
    windows.update(asm.finish())
    # under one STFT frame of samples; one encoder window of mel rows (16) and the 2 of one push; one model window of rows
    assert 0 < held["samples"] < 800 and 0 < held["mel rows"] <= 16 + 2 and 0 < held["rows"] <= src.window_rows
    once = src.rows(pcm)
    got = np.concatenate(rows)
    assert got.shape == once.shape == (frame_count(len(pcm)), 512)
    assert np.abs(got - once).max() <= 1e-5
    offline = make_windows(once, src)
    assert sorted(windows) == list(range(len(offline)))
    assert np.abs(np.stack([windows[i] for i in range(len(offline))]) - offline).max() <= 1e-5
    src.close()


# ----------------------------------------------------------------- real speech end to end


def test_real_speech(pm, models, talk_wav: Path) -> None:  # type: ignore[no-untyped-def]
    from avatar.audio import load_audio

    pcm = load_audio(talk_wav)
    src = pm.feature_source("ave", encoder=str(models["enc0"]))
    rows = src.rows(pcm)
    assert len(rows) == math.ceil(len(pcm) * 25 / 16000) == 1123
    on = _stream_rows(src, pcm, 320)
    assert np.abs(on - rows).max() <= 1e-5
    ref = _upstream_rows(pcm, models["enc0"])
    assert np.abs(rows[: len(ref)] - ref).max() <= 1e-5
    # speech varies over time far more than the encoder's response to silence
    silent = src.rows(np.zeros(16000, np.float32))
    assert rows.std(axis=0).mean() > 10 * silent.std(axis=0).mean()
    assert make_windows(rows, src).shape == (1123, 32, 16, 16)


# ----------------------------------------------------------------- precomputed rows ('npy')


def test_npy_real_file(pm, sanders_dir: Path) -> None:  # type: ignore[no-untyped-def]
    path = sanders_dir / "aud_ave.npy"
    src = pm.feature_source("npy", path=path)
    want = np.load(path)
    rows = src.rows(_speechish(8000))
    assert rows.shape == (522, 512) and rows.dtype == np.float32
    np.testing.assert_array_equal(rows, want)
    w = src.windows(np.zeros(10, np.float32))
    assert w.shape == (522, 32, 16, 16)
    np.testing.assert_array_equal(w[0].reshape(16, 512)[:8], np.tile(want[0], (8, 1)))


def test_npy_stream_semantics(pm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    arr = np.random.default_rng(0).standard_normal((40, 512)).astype(np.float32)
    np.save(tmp_path / "f.npy", arr)
    src = pm.feature_source("npy", path=str(tmp_path / "f.npy"))
    s = src.open_stream()
    np.testing.assert_array_equal(s.push(_speechish(160)), arr)  # all rows on the first push
    assert len(s.push(_speechish(160))) == 0 and len(s.finish()) == 0
    s2 = src.open_stream()
    np.testing.assert_array_equal(s2.finish(), arr)  # or at finish when nothing was pushed
    # the audio does not matter, the file does
    np.testing.assert_array_equal(src.rows(_speechish(16000, 1)), src.rows(np.zeros(5, np.float32)))
    np.save(tmp_path / "g.npy", arr * 2)
    assert not np.array_equal(pm.feature_source("npy", path=tmp_path / "g.npy").rows(np.zeros(1)), arr)


def test_npy_padding_option(pm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    arr = np.random.default_rng(1).standard_normal((30, 512)).astype(np.float32)
    np.save(tmp_path / "f.npy", arr)
    rep = pm.feature_source("npy", path=tmp_path / "f.npy").windows(np.zeros(1))
    zer = pm.feature_source("npy", path=tmp_path / "f.npy", padding="zero").windows(np.zeros(1))
    np.testing.assert_array_equal(rep[8:23], zer[8:23])
    assert np.abs(rep[0] - zer[0]).max() > 0 and np.abs(rep[-1] - zer[-1]).max() > 0


@pytest.mark.parametrize(
    ("arr", "match"),
    [
        (np.zeros((10, 256), np.float32), r"\[10,256\].*\[N,512\]"),
        (np.zeros(512, np.float32), r"\[512\].*\[N,512\]"),
        (np.zeros((3, 10, 512), np.float32), r"\[3,10,512\]"),
        (np.zeros((10, 512), np.int32), "int32"),
        (np.zeros((0, 512), np.float32), "no rows"),
        (np.full((4, 512), np.nan, np.float32), "NaN"),
        (np.array([{"a": 1}], dtype=object), "readable"),
    ],
)
def test_npy_validation(pm, tmp_path: Path, arr: np.ndarray, match: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "bad.npy"
    np.save(path, arr, allow_pickle=True)
    with pytest.raises(FeatureError, match=match):
        pm.feature_source("npy", path=path)


def test_npy_other_errors(pm, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="path="):
        pm.feature_source("npy")
    with pytest.raises(FeatureError, match="not found"):
        pm.feature_source("npy", path=tmp_path / "missing.npy")
    np.savez(tmp_path / "a.npz", x=np.zeros((2, 512)))
    with pytest.raises(FeatureError, match="npz"):
        pm.feature_source("npy", path=tmp_path / "a.npz")
    (tmp_path / "t.npy").write_text("hello")
    with pytest.raises(FeatureError, match="readable"):
        pm.feature_source("npy", path=tmp_path / "t.npy")
    with pytest.raises(ConfigError, match="unknown option"):
        np.save(tmp_path / "ok.npy", np.zeros((2, 512), np.float32))
        pm.feature_source("npy", path=tmp_path / "ok.npy", fps=30)
    f16 = tmp_path / "h.npy"
    np.save(f16, np.ones((3, 512), np.float16))
    assert pm.feature_source("npy", path=f16).rows(np.zeros(1)).dtype == np.float32


@pytest.mark.gpu
def test_onnx_cuda_backend_matches_cpu(pm, ave, models) -> None:  # type: ignore[no-untyped-def]
    if "onnx-cuda" not in pm.names("backend") or not pm.get("backend", "onnx-cuda").availability().usable:
        pytest.skip("no usable GPU for the onnx-cuda backend")
    pcm = _speechish(16000 * 3, seed=20)
    gpu = pm.feature_source("ave", encoder=models["enc0"], backend="onnx-cuda")
    try:
        np.testing.assert_allclose(gpu.rows(pcm), ave.rows(pcm), atol=5e-3)
        np.testing.assert_allclose(_stream_rows(gpu, pcm, 320), gpu.rows(pcm), atol=1e-3)  # batch sizes differ on GPU
    finally:
        gpu.close()
