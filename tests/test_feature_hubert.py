"""The ``hubert`` feature source with a tiny, randomly initialised HuBERT saved like the real one.

The model keeps what matters to the source (1024-wide hidden states, the standard
conv front end of stride 320, layer-norm feature extraction as in hubert-large)
and shrinks the rest (1 transformer layer, narrow convs), so loading, the clip
logic, ONNX export and the plugin manager all run for real in seconds.
"""

from __future__ import annotations

import json
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

from avatar import get_plugin_manager  # noqa: E402
from avatar.errors import BackendUnavailable, ConfigError, FeatureError  # noqa: E402
from avatar.windows import make_windows  # noqa: E402
from avatar_plugins.features import _hubert_runtime as rt  # noqa: E402
from avatar_plugins.features.hubert import HubertSource, expected_rows, export_hubert  # noqa: E402

SR = 16000


def _save_tiny(path: Path, *, hidden: int = 1024, normalize: bool = True, seed: int = 0) -> Path:
    cfg = transformers.HubertConfig(
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        conv_dim=(32,) * 7,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
    )
    torch.manual_seed(seed)
    transformers.HubertModel(cfg).eval().save_pretrained(path)
    transformers.Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SR, padding_value=0.0, do_normalize=normalize, return_attention_mask=True
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny(tmp_path_factory.mktemp("hubert") / "tiny-hubert")


@pytest.fixture(scope="session")
def source(model_dir: Path) -> HubertSource:
    return HubertSource(model=model_dir)


@pytest.fixture(scope="session")
def onnx_path(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hubert-onnx") / "hubert.onnx"
    diff = export_hubert(model_dir, out)
    assert diff is not None and diff < 1e-3
    return out


def _speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * SR))) / SR
    f0 = 110 + 50 * np.sin(2 * np.pi * 0.9 * t + seed)
    x = sum(np.sin(2 * np.pi * k * np.cumsum(f0) / SR) / k for k in range(1, 6))
    env = 0.3 + 0.7 * np.sin(2 * np.pi * 2.7 * t + seed) ** 2
    return (0.3 * env * x + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def _upstream(model_dir: Path, pcm: np.ndarray, clip: int) -> np.ndarray:
    """The family's extraction loop written out (global normalisation, clips of clip+80 samples)."""
    fe = transformers.Wav2Vec2FeatureExtractor.from_pretrained(model_dir)
    model = transformers.HubertModel.from_pretrained(model_dir).eval()
    x = torch.from_numpy(fe(pcm, sampling_rate=SR, return_tensors="np").input_values)
    n_iter = x.shape[1] // clip
    parts = []
    with torch.no_grad():
        for i in range(n_iter):
            parts.append(model(x[:, clip * i : clip * i + clip - 320 + 400]).last_hidden_state[0])
        tail = x[:, clip * n_iter :]
        if tail.shape[1] >= 400:
            parts.append(model(tail).last_hidden_state[0])
    frames = torch.cat(parts).numpy()
    want = (x.shape[1] - 80) // 320
    frames = np.concatenate([frames, np.zeros((max(0, want - len(frames)), 1024), np.float32)])[:want]
    if len(frames) % 2:
        frames = np.concatenate([frames, np.zeros((1, 1024), np.float32)])
    return frames.reshape(-1, 2, 1024)


# ------------------------------------------------------------------ rows and windows


@pytest.mark.parametrize("seconds", [0.1, 0.5, 1.0, 1.23])
def test_rows_shape_and_count(source: HubertSource, seconds: float) -> None:
    pcm = _speechlike(seconds)
    rows = source.rows(pcm)
    frames = (len(pcm) - 80) // 320
    assert rows.shape == (expected_rows(len(pcm)), 2, 1024) == ((frames + 1) // 2, 2, 1024)
    assert rows.dtype == np.float32 and np.isfinite(rows).all()
    if frames % 2:  # an odd frame count is padded with one zero frame
        assert not rows[-1, 1].any()


def test_whole_seconds_give_25_rows_per_second(source: HubertSource) -> None:
    assert source.rows(_speechlike(2.0)).shape[0] == 50


def test_rows_equal_the_upstream_loop_on_one_clip(source: HubertSource, model_dir: Path) -> None:
    pcm = _speechlike(1.1, seed=2)
    np.testing.assert_allclose(source.rows(pcm), _upstream(model_dir, pcm, 320 * 1000), atol=2e-4)


@pytest.mark.parametrize("seconds", [1.3, 0.9 + 30 / SR])  # the second leaves fewer than 80 samples after a clip
def test_clip_logic_equals_upstream(model_dir: Path, seconds: float) -> None:
    src = HubertSource(model=model_dir, clip_s=0.3)
    assert src.clip == 4800
    pcm = _speechlike(seconds, seed=1)
    np.testing.assert_allclose(src.rows(pcm), _upstream(model_dir, pcm, 4800), atol=2e-4)


def test_clip_s_has_an_effect(source: HubertSource, model_dir: Path) -> None:
    pcm = _speechlike(1.3, seed=1)
    short = HubertSource(model=model_dir, clip_s=0.3).rows(pcm)
    whole = source.rows(pcm)
    assert short.shape == whole.shape
    assert np.abs(short - whole).mean() > 1e-3


def test_windows(source: HubertSource) -> None:
    pcm = _speechlike(1.0)
    rows = source.rows(pcm)
    win = source.windows(pcm)
    assert win.shape == (len(rows), 32, 32, 32)
    w0 = win[0].reshape(16, 2, 1024)
    assert not w0[:8].any()  # zero padding before the first row
    np.testing.assert_array_equal(w0[8:], rows[:8])
    np.testing.assert_array_equal(win, make_windows(rows, source))


def test_different_audio_gives_different_rows(source: HubertSource) -> None:
    a = source.rows(_speechlike(1.0, seed=0))
    b = source.rows(_speechlike(1.0, seed=5))
    assert a.shape == b.shape
    assert np.abs(a - b).mean() > 1e-3


def test_normalisation_matches_the_feature_extractor(model_dir: Path) -> None:
    fe = transformers.Wav2Vec2FeatureExtractor.from_pretrained(model_dir)
    x = _speechlike(0.7) * 0.1 + 0.01
    np.testing.assert_array_equal(rt.normalize(x), fe(x, sampling_rate=SR, return_tensors="np").input_values[0])


def test_do_normalize_from_the_directory_has_an_effect(model_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "no-norm"
    shutil.copytree(model_dir, other)
    cfg = json.loads((other / "preprocessor_config.json").read_text())
    cfg["do_normalize"] = False
    (other / "preprocessor_config.json").write_text(json.dumps(cfg))
    pcm = _speechlike(0.8) * 0.05
    a = HubertSource(model=model_dir).rows(pcm)
    b = HubertSource(model=other).rows(pcm)
    assert not HubertSource(model=other).do_normalize
    assert np.abs(a - b).mean() > 1e-3
    # without a preprocessor config the documented normalisation (on) applies
    (other / "preprocessor_config.json").unlink()
    np.testing.assert_allclose(HubertSource(model=other).rows(pcm), a, atol=1e-5)


def test_model_and_padding_options_have_effects(source: HubertSource, model_dir: Path, tmp_path: Path) -> None:
    pcm = _speechlike(0.8)
    other = HubertSource(model=_save_tiny(tmp_path / "other", seed=3))
    assert np.abs(other.rows(pcm) - source.rows(pcm)).mean() > 1e-3
    rep = HubertSource(model=model_dir, padding="replicate")
    w0 = rep.windows(pcm)[0].reshape(16, 2, 1024)
    np.testing.assert_array_equal(w0[0], source.rows(pcm)[0])  # the first row repeated, not zeros


def test_metadata(source: HubertSource, model_dir: Path) -> None:
    assert source.fps == 25 and source.row_shape == (2, 1024) and source.window_shape == (32, 32, 32)
    assert source.padding == "zero" and not source.exact_streaming
    assert source.lookahead_s == pytest.approx(20.0 + 7 / 25 + 80 / SR)
    assert HubertSource(model=model_dir, clip_s=2).lookahead_s == pytest.approx(2.0 + 7 / 25 + 80 / SR)


# ------------------------------------------------------------------ streaming


def test_stream_all_at_once_matches_offline(source: HubertSource) -> None:
    pcm = _speechlike(1.0, seed=4)
    s = source.open_stream()
    rows = np.concatenate([s.push(pcm), s.finish()])
    np.testing.assert_allclose(rows, source.rows(pcm), atol=1e-4)


def test_chunked_stream_emits_clips_as_they_complete(model_dir: Path) -> None:
    src = HubertSource(model=model_dir, clip_s=0.3)
    pcm = _speechlike(1.3, seed=6)
    s = src.open_stream()
    parts = [s.push(pcm[i : i + 1000]) for i in range(0, len(pcm), 1000)]
    parts.append(s.finish())
    rows = np.concatenate(parts)
    offline = src.rows(pcm)
    assert rows.shape == offline.shape
    assert sum(len(p) for p in parts[:-1]) >= 28  # 4 whole clips of 7.5 rows came out early
    # Only the normalisation statistics differ (running vs whole-file): close, not equal.
    assert np.abs(rows - offline).mean() < 0.25 * np.abs(offline).mean()


def test_stream_rejects_push_after_finish(source: HubertSource) -> None:
    s = source.open_stream()
    s.push(_speechlike(0.2))
    s.finish()
    with pytest.raises(FeatureError):
        s.push(_speechlike(0.2))


def test_empty_audio(source: HubertSource) -> None:
    assert source.rows(np.zeros(0, np.float32)).shape == (0, 2, 1024)


# ------------------------------------------------------------------ errors and options


def test_missing_directory_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(FeatureError, match="huggingface-cli download facebook/hubert-large-ls960-ft"):
        HubertSource(model=tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FeatureError, match="config.json"):
        HubertSource(model=tmp_path / "empty")
    with pytest.raises(FeatureError, match="model=DIR"):
        HubertSource()


def test_wrong_width_is_refused(tmp_path: Path) -> None:
    narrow = _save_tiny(tmp_path / "narrow", hidden=64)
    with pytest.raises(FeatureError, match="1024"):
        HubertSource(model=narrow)


def test_bad_options(model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="unknown option"):
        HubertSource(model=model_dir, clips=3)
    with pytest.raises(ConfigError, match="device"):
        HubertSource(model=model_dir, device="tpu")
    with pytest.raises(ConfigError, match="clip_s"):
        HubertSource(model=model_dir, clip_s=0.01)


def test_cuda_device_without_gpu_is_an_error(model_dir: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(BackendUnavailable, match="cpu"):
        HubertSource(model=model_dir, device="cuda")


@pytest.mark.gpu
def test_cuda_matches_cpu(model_dir: Path, source: HubertSource) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU usable")
    pcm = _speechlike(1.0)
    np.testing.assert_allclose(HubertSource(model=model_dir, device="cuda").rows(pcm), source.rows(pcm), atol=2e-3)


# ------------------------------------------------------------------ ONNX path


def test_onnx_export_parity(onnx_path: Path, source: HubertSource) -> None:
    ort_src = HubertSource(onnx=onnx_path)
    assert isinstance(ort_src._runner, rt.OrtRunner) and ort_src.do_normalize  # normalisation came with the file
    pcm = _speechlike(1.3, seed=3)
    np.testing.assert_allclose(ort_src.rows(pcm), source.rows(pcm), atol=1e-3)


def test_onnx_path_is_not_a_hubert(tmp_path: Path) -> None:
    with pytest.raises(FeatureError, match="export-hubert"):
        HubertSource(onnx=tmp_path / "missing.onnx")


def test_export_command(model_dir: Path, tmp_path: Path) -> None:
    from avatar.cli import cli

    out = tmp_path / "h.onnx"
    result = CliRunner().invoke(cli, ["export-hubert", str(model_dir), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "max |PyTorch - ONNX Runtime|" in result.output
    bad = CliRunner().invoke(cli, ["export-hubert", str(tmp_path / "absent"), "-o", str(out)])
    assert bad.exit_code != 0 and "huggingface-cli download" in bad.output


# ------------------------------------------------------------------ plugin manager, real audio


def test_through_the_plugin_manager(model_dir: Path) -> None:
    src = get_plugin_manager().feature_source("hubert", model=str(model_dir), clip_s=0.5)
    assert isinstance(src, HubertSource)
    assert src.rows(_speechlike(0.6)).shape == (15, 2, 1024)


def test_real_speech(talk_wav: Path, source: HubertSource) -> None:
    with wave.open(str(talk_wav)) as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
    rows = source.rows(pcm[: 3 * SR])
    assert rows.shape == (75, 2, 1024) and np.isfinite(rows).all()


@pytest.mark.parametrize("before", [None, "0"])
def test_loading_leaves_hf_hub_offline_as_it_was(model_dir: Path, monkeypatch: pytest.MonkeyPatch, before: str | None) -> None:
    """The load is offline, but the process (an application embedding us) keeps its own setting."""
    import os

    if before is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", before)
    seen: list[str | None] = []
    real = transformers.HubertModel.from_pretrained

    def noting(*args, **kwargs):  # type: ignore[no-untyped-def]  # the real load, with the variable noted
        seen.append(os.environ.get("HF_HUB_OFFLINE"))
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.HubertModel, "from_pretrained", noting)
    rt.load_torch_model(model_dir)
    assert seen == ["1"]
    assert os.environ.get("HF_HUB_OFFLINE") == before
