"""The ``wenet`` feature source: Kaldi fbank front end, chunking, encoder I/O checks, streaming.

The encoder is a tiny ONNX graph built here with the exact I/O signature of the
family's WeNet export (chunk[1,1,67,80], offset int64[1], att_cache[3,8,16,128],
cnn_cache[3,1,512,14] -> output[1,16,512], r_att_cache, r_cnn_cache); every one of
the 67 fbank frames and the offset reach its output. It runs through the real
``cpu`` backend from the real plugin manager.
"""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("kaldi_native_fbank")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from avatar import get_plugin_manager  # noqa: E402
from avatar.errors import ConfigError, FeatureError  # noqa: E402
from avatar.windows import make_windows  # noqa: E402
from avatar_plugins.features import wenet  # noqa: E402
from avatar_plugins.features.wenet import WenetSource  # noqa: E402

SR = 16000


def _encoder(path: Path, *, chunk_shape=(1, 1, 67, 80), names=("chunk", "offset", "att_cache", "cnn_cache"),
             out_shape=(1, 16, 512), seed: int = 0) -> Path:
    """output = tanh(P @ (chunk @ W) / 100 + 1e-3 * offset), P: [16, 67] mixes all frames."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((80, out_shape[2])) * 0.05).astype(np.float32)
    p = (rng.standard_normal((out_shape[1], 67)) * 0.2).astype(np.float32)
    c_name, o_name, a_name, k_name = names
    nodes = [
        helper.make_node("Reshape", [c_name, "shape3"], ["x3"]),
        helper.make_node("MatMul", ["x3", "W"], ["xw"]),
        helper.make_node("MatMul", ["P", "xw"], ["pxw"]),
        helper.make_node("Mul", ["pxw", "scale"], ["pxs"]),
        helper.make_node("Cast", [o_name], ["off_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["off_f", "off_scale"], ["off_s"]),
        helper.make_node("Add", ["pxs", "off_s"], ["pre"]),
        helper.make_node("Tanh", ["pre"], ["output"]),
        helper.make_node("Identity", [a_name], ["r_att_cache"]),
        helper.make_node("Identity", [k_name], ["r_cnn_cache"]),
    ]
    inits = [
        numpy_helper.from_array(np.array([1, 67, 80], np.int64), "shape3"),
        numpy_helper.from_array(w, "W"),
        numpy_helper.from_array(p, "P"),
        numpy_helper.from_array(np.array(0.01, np.float32), "scale"),
        numpy_helper.from_array(np.array(1e-3, np.float32), "off_scale"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_wenet_encoder",
        [
            helper.make_tensor_value_info(c_name, TensorProto.FLOAT, list(chunk_shape)),
            helper.make_tensor_value_info(o_name, TensorProto.INT64, [1]),
            helper.make_tensor_value_info(a_name, TensorProto.FLOAT, [3, 8, 16, 128]),
            helper.make_tensor_value_info(k_name, TensorProto.FLOAT, [3, 1, 512, 14]),
        ],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, list(out_shape)),
            helper.make_tensor_value_info("r_att_cache", TensorProto.FLOAT, [3, 8, 16, 128]),
            helper.make_tensor_value_info("r_cnn_cache", TensorProto.FLOAT, [3, 1, 512, 14]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def encoder_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _encoder(tmp_path_factory.mktemp("wenet") / "encoder.onnx")


@pytest.fixture(scope="module")
def source(encoder_path: Path) -> WenetSource:
    return WenetSource(model=encoder_path)


def _speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """A varying harmonic signal with noise (float32 in [-1, 1])."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    f0 = 120 + 40 * np.sin(2 * np.pi * 1.3 * t)
    x = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / SR) / k for k in range(1, 6))
    env = 0.5 + 0.5 * np.sin(2 * np.pi * 3.1 * t) ** 2
    return (0.2 * env * x + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


# ------------------------------------------------------------------ fbank front end


def _kaldi_fbank_reference(x: np.ndarray) -> np.ndarray:
    """Kaldi's fbank written out in numpy (povey window, pre-emphasis, DC removal, mel, log)."""
    n = 1 + (len(x) - 400) // 160
    frames = np.stack([x[i * 160 : i * 160 + 400] for i in range(n)]).astype(np.float64)
    frames -= frames.mean(axis=1, keepdims=True)
    frames[:, 1:] -= 0.97 * frames[:, :-1].copy()
    frames[:, 0] -= 0.97 * frames[:, 0]
    frames *= (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 399)) ** 0.85
    power = np.abs(np.fft.rfft(frames, 512)) ** 2
    mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)  # noqa: E731
    lo, hi = mel(20.0), mel(8000.0)
    delta = (hi - lo) / 81
    fft_mel = mel(np.arange(256) * SR / 512)
    banks = np.zeros((80, 256))
    for b in range(80):
        left, center, right = lo + b * delta, lo + (b + 1) * delta, lo + (b + 2) * delta
        up = (fft_mel > left) & (fft_mel <= center)
        down = (fft_mel > center) & (fft_mel < right)
        banks[b, up] = (fft_mel[up] - left) / (center - left)
        banks[b, down] = (right - fft_mel[down]) / (right - center)
    return np.log(np.maximum(power[:, :256] @ banks.T, np.finfo(np.float32).eps))


def test_fbank_matches_a_written_out_kaldi_fbank() -> None:
    x = wenet.int16_scale(_speechlike(0.7))
    got = wenet.fbank(x)
    want = _kaldi_fbank_reference(x)
    assert got.shape == want.shape == (1 + (len(x) - 400) // 160, 80)
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-4)


def test_fbank_frame_count_and_determinism() -> None:
    x = wenet.int16_scale(_speechlike(1.0))
    a, b = wenet.fbank(x), wenet.fbank(x)
    assert a.shape == (1 + (SR - 400) // 160, 80)  # 25 ms windows every 10 ms, snip_edges
    np.testing.assert_array_equal(a, b)  # dither 0: no randomness


def test_int16_scaling_is_applied() -> None:
    x = _speechlike(0.5)
    scaled = wenet.int16_scale(x)
    np.testing.assert_array_equal(scaled, np.trunc(x * np.float32(32767)))
    assert np.abs(scaled).max() > 1000
    # fbank of the scaled signal is the fbank of the raw one shifted by log(32767^2)
    diff = wenet.fbank(scaled) - wenet.fbank(x * np.float32(32767))
    assert np.abs(diff).max() < 0.05
    assert np.abs(wenet.fbank(scaled) - wenet.fbank(x)).mean() > 15  # not fed unscaled
    clipped = wenet.int16_scale(np.array([2.0, -2.0], np.float32))
    np.testing.assert_array_equal(clipped, [32767.0, -32768.0])


# ------------------------------------------------------------------ rows and windows


@pytest.mark.parametrize("seconds", [0.05, 0.5, 1.0, 1.37])
def test_row_count_rule(source: WenetSource, seconds: float) -> None:
    pcm = _speechlike(seconds)
    rows = source.rows(pcm)
    frames = 1 + (len(pcm) + wenet.PAD_BEFORE + wenet.PAD_AFTER - 400) // 160
    assert rows.shape == (1 + max(0, (frames - 63) // 5), 16, 512)
    assert rows.dtype == np.float32
    assert abs(len(rows) - (seconds * 20 + 1)) <= 1


def test_rows_equal_upstream_chunking(source: WenetSource, encoder_path: Path) -> None:
    """Rows are what upstream's loop makes: chunk k = fbank[5k:5k+67] of the padded signal, zero caches."""
    import onnxruntime as ort

    pcm = _speechlike(0.8, seed=3)
    padded = np.concatenate([np.zeros(5120, np.float32), wenet.int16_scale(pcm), np.zeros(5600, np.float32)])
    feats = wenet.fbank(padded)
    sess = ort.InferenceSession(str(encoder_path), providers=["CPUExecutionProvider"])
    want, start, end = [], 0, 0
    while end < len(feats):
        end = start + 67
        chunk = feats[start:end]
        chunk = np.concatenate([chunk, np.zeros((67 - len(chunk), 80), np.float32)])
        out = sess.run(None, {
            "chunk": chunk[None, None], "offset": np.array([100], np.int64),
            "att_cache": np.zeros((3, 8, 16, 128), np.float32), "cnn_cache": np.zeros((3, 1, 512, 14), np.float32),
        })[0][0]
        want.append(out)
        start += 5
    np.testing.assert_allclose(source.rows(pcm), np.stack(want), atol=1e-6)


def test_windows_shape_and_zero_padding(source: WenetSource) -> None:
    rows = source.rows(_speechlike(1.0))
    win = source.windows(_speechlike(1.0))
    assert win.shape == (len(rows), 256, 16, 32)
    # frame 0: 8 zero rows before it, then rows 0..7
    w0 = win[0].reshape(16, 16, 512)
    assert not w0[:8].any()
    np.testing.assert_array_equal(w0[8:], rows[:8])
    np.testing.assert_array_equal(win, make_windows(rows, source))


def test_different_audio_gives_different_rows(source: WenetSource) -> None:
    a = source.rows(_speechlike(1.0, seed=0))
    b = source.rows(_speechlike(1.0, seed=0)[::-1].copy())
    assert a.shape == b.shape
    assert np.abs(a - b).mean() > 1e-3
    silence = source.rows(np.zeros(SR, np.float32))
    assert np.abs(a - silence).mean() > 1e-3


def test_empty_audio_gives_no_rows(source: WenetSource) -> None:
    assert source.rows(np.zeros(0, np.float32)).shape == (0, 16, 512)


def test_metadata(source: WenetSource) -> None:
    assert source.fps == 20
    assert source.row_shape == (16, 512) and source.window_shape == (256, 16, 32)
    assert source.padding == "zero" and source.exact_streaming
    assert source.lookahead_s == pytest.approx(0.365 + 0.35)


# ------------------------------------------------------------------ streaming


@pytest.mark.parametrize("chunk", [160, 1000, 3333, 16000])
def test_chunked_streaming_equals_offline(source: WenetSource, chunk: int) -> None:
    pcm = _speechlike(1.6, seed=7)
    offline = source.rows(pcm)
    stream = source.open_stream()
    parts = [stream.push(pcm[i : i + chunk]) for i in range(0, len(pcm), chunk)]
    parts.append(stream.finish())
    np.testing.assert_array_equal(np.concatenate(parts), offline)
    # rows come out while audio is still arriving, not all at the end
    assert sum(len(p) for p in parts[:-1]) >= len(offline) - 15


def test_stream_rejects_push_after_finish(source: WenetSource) -> None:
    s = source.open_stream()
    s.push(_speechlike(0.2))
    s.finish()
    with pytest.raises(FeatureError):
        s.push(_speechlike(0.2))


# ------------------------------------------------------------------ encoder checks


def test_wrong_input_names_are_named(tmp_path: Path) -> None:
    bad = _encoder(tmp_path / "bad.onnx", names=("speech", "offset", "att_cache", "cnn_cache"))
    with pytest.raises(FeatureError) as err:
        WenetSource(model=bad)
    msg = str(err.value)
    assert "chunk[1,1,67,80]" in msg and "speech" in msg


def test_wrong_output_shape_is_named(tmp_path: Path) -> None:
    bad = _encoder(tmp_path / "bad.onnx", out_shape=(1, 8, 512))
    with pytest.raises(FeatureError, match=r"\[1,16,512\]"):
        WenetSource(model=bad)


def test_stock_wenet_chunk_layout_is_accepted(tmp_path: Path) -> None:
    """Stock WeNet exports take chunk[1,67,80]; same rows as the family's [1,1,67,80]."""
    four = WenetSource(model=_encoder(tmp_path / "a.onnx"))
    three = WenetSource(model=_encoder(tmp_path / "b.onnx", chunk_shape=(1, 67, 80)))
    pcm = _speechlike(0.6)
    np.testing.assert_array_equal(four.rows(pcm), three.rows(pcm))


def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(FeatureError, match="not found"):
        WenetSource(model=tmp_path / "nope.onnx")
    with pytest.raises(FeatureError, match="model=PATH"):
        WenetSource()


def test_options_have_effects(encoder_path: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown option"):
        WenetSource(model=encoder_path, modle="x")
    with pytest.raises(ConfigError, match="no backend named"):
        WenetSource(model=encoder_path, backend="no-such-backend")
    # the model option selects the encoder: another encoder, other rows
    pcm = _speechlike(0.5)
    a = WenetSource(model=encoder_path).rows(pcm)
    b = WenetSource(model=_encoder(tmp_path / "other.onnx", seed=5)).rows(pcm)
    assert np.abs(a - b).mean() > 1e-3
    rep = WenetSource(model=encoder_path, padding="replicate")
    assert rep.windows(pcm)[0].reshape(16, 16, 512)[0].any()


def test_backend_option_reaches_the_plugin_manager(encoder_path: Path) -> None:
    from avatar.errors import BackendUnavailable

    reg = get_plugin_manager().get("backend", "onnx-cuda")
    if reg.availability().usable:
        src = WenetSource(model=encoder_path, backend="onnx-cuda")
        assert "CUDAExecutionProvider" in src._encoder.backend.providers
    else:
        with pytest.raises(BackendUnavailable, match="onnx-cuda"):
            WenetSource(model=encoder_path, backend="onnx-cuda")


def test_encoder_runs_on_the_registered_backend(source: WenetSource) -> None:
    assert source._encoder.backend.name == "cpu"


def test_through_the_plugin_manager(encoder_path: Path) -> None:
    src = get_plugin_manager().feature_source("wenet", model=str(encoder_path))
    assert isinstance(src, WenetSource)
    assert src.rows(_speechlike(0.5)).shape[1:] == (16, 512)
    assert src._encoder.backend.stats.calls > 0  # the encoder really ran through the backend


def test_real_speech(talk_wav: Path, source: WenetSource) -> None:
    with wave.open(str(talk_wav)) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
    pcm = pcm[: 3 * SR]
    rows = source.rows(pcm)
    assert abs(len(rows) - 61) <= 1
    assert np.isfinite(rows).all()
