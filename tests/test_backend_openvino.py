"""The OpenVINO backend: real OpenVINO on the project's seeded models; gates on the trained model.

Every option is checked for its effect on the compiled model OpenVINO reports
(or on the outputs). Accuracy is never judged on a random-weight network: the
gate *measurements* run only on the trained sanders model (skipped when
``../shared/data`` is absent); the tests on seeded models check the gate
*mechanics* with records written the way ``avatar gate`` writes them.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")

from avatar import BackendOptions, get_plugin_manager
from avatar.errors import BackendError, BackendUnavailable, ConfigError
from avatar.models.synthetic import make_audio_encoder, make_unet, sample_audio, sample_visual
from avatar_plugins.backends import _gates, openvino as ovb
from avatar_plugins.backends._common import file_sha256, random_feeds
from avatar_plugins.backends.openvino import OpenVinoBackend
from avatar_plugins.backends.ort import CpuBackend

@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVATAR_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ov_models")
    return {"unet": make_unet(d / "tiny.onnx", tiny=True, seed=0), "encoder": make_audio_encoder(d / "enc.onnx", tiny=True)}


@pytest.fixture
def unet(models: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy: gate records are written beside it."""
    p = tmp_path / "m" / "tiny.onnx"
    p.parent.mkdir()
    p.write_bytes(models["unet"].read_bytes())
    return p


def _feeds(batch: int = 2) -> dict[str, np.ndarray]:
    return {"input": sample_visual(batch), "audio": sample_audio("ave", batch)}


def _open(model: Path, precision: str = "fp32", **extra: object) -> OpenVinoBackend:
    threads = extra.pop("threads", None)
    return OpenVinoBackend(model, BackendOptions(precision=precision, threads=threads, extra=extra))  # type: ignore[arg-type]


def _record(model: Path, precision: str, passed: bool) -> _gates.GateRecord:
    """A record as `avatar gate` writes it (figures made up: these tests check the mechanics only)."""
    vs32, loss = (53.8, -0.03) if passed else (33.7, 0.47)
    rec = _gates.GateRecord(
        model_sha256=_gates.model_sha256(model), precision=precision, device="CPU", backend="openvino",
        psnr_vs_fp32=vs32, psnr_vs_real=25.77 - loss, fp32_vs_real=25.77, frames=[460, 521], data="test",
        passed=_gates.judge(vs32, loss), measured="2026-01-01T00:00:00+00:00",
    )  # fmt: skip
    _gates.save_record(model, rec)
    return rec


def _has_bf16() -> bool:
    return "BF16" in ovb.device_capabilities("CPU")


# --------------------------------------------------------------------------- registration, availability


def test_registered_with_priority_above_cpu():
    reg = get_plugin_manager().get("backend", "openvino")
    assert reg.obj is OpenVinoBackend and reg.plugin == "openvino"
    assert reg.availability().usable and "CPU" in reg.availability().reason
    assert OpenVinoBackend.priority > 10  # cpu's


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    ovb._status.cache_clear()
    try:
        a = OpenVinoBackend.availability()
        assert not a.usable and a.install == "pip install 'avatar-sdk[openvino]'"
        with pytest.raises(BackendUnavailable, match=r"avatar-sdk\[openvino\]"):
            OpenVinoBackend("x.onnx")
    finally:
        ovb._status.cache_clear()


def test_device_not_present_says_so(unet: Path):
    missing = next(d for d in ("NPU", "GPU") if d not in ovb.available_devices())
    with pytest.raises(BackendUnavailable, match=f"device {missing} is not present here"):
        _open(unet, device=missing)
    with pytest.raises(ConfigError, match="device must be one of"):
        _open(unet, device="TPU")


def test_unknown_option_is_an_error(unet: Path):
    with pytest.raises(ConfigError, match="unknown option"):
        _open(unet, stream=2)


# --------------------------------------------------------------------------- outputs


def test_fp32_matches_cpu(models: dict[str, Path]):
    feeds = _feeds(3)
    with CpuBackend(models["unet"]) as cpu, _open(models["unet"]) as ov:
        want, got = cpu.run(feeds)["output"], ov.run(feeds)["output"]
        assert ov.providers == ["OpenVINO CPU fp32"]
        assert [str(t) for t in ov.inputs] == [str(t) for t in cpu.inputs]
    assert got.shape == want.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-5)
    with CpuBackend(models["encoder"]) as cpu, _open(models["encoder"]) as ov:
        feed = random_feeds(cpu.inputs, 2, seed=1)
        np.testing.assert_allclose(ov.run(feed)[ov.outputs[0].name], cpu.run(feed)[cpu.outputs[0].name], atol=1e-4)


def test_feeds_are_checked(models: dict[str, Path]):
    with _open(models["unet"]) as ov:
        with pytest.raises(BackendError, match="must be float32"):
            ov.run({"input": np.zeros((1, 6, 320, 320), np.uint8), "audio": sample_audio("ave", 1)})
        out = ov.run(_feeds(1))["output"]
        out[:] = 7  # callers own what run returns
        assert ov.run(_feeds(1))["output"].max() <= 1.0
    with pytest.raises(BackendError, match="closed"):
        ov.run(_feeds(1))


# --------------------------------------------------------------------------- options


@pytest.mark.skipif(not _has_bf16(), reason="this CPU has no native bf16")
def test_bf16_runs_in_bf16(unet: Path):
    feeds = _feeds()
    with _open(unet) as f32, _open(unet, "bf16", allow_failed_gate=True) as bf:  # unmeasured: insisted
        assert bf.compiled_property("INFERENCE_PRECISION_HINT").get_type_name() == "bf16"
        assert f32.compiled_property("INFERENCE_PRECISION_HINT").get_type_name() == "f32"
        a, b = f32.run(feeds)["output"], bf.run(feeds)["output"]
    assert not np.array_equal(a, b)  # bf16 arithmetic really happened (accuracy is judged on the trained model)


def test_fp16_on_a_cpu_without_it_is_refused(unet: Path):
    if "FP16" in ovb.device_capabilities("CPU"):
        pytest.skip("this CPU runs fp16")
    with pytest.raises(ConfigError, match="no native fp16"):
        _open(unet, "fp16")


def test_int8_needs_a_quantized_model(unet: Path):
    with pytest.raises(ConfigError, match="avatar quantize"):
        _open(unet, "int8")
    with pytest.raises(ConfigError, match="precision must be one of"):
        _open(unet, "int4")


def test_threads_streams_and_hint_reach_the_compiled_model(unet: Path):
    with _open(unet, threads=1, performance_hint="LATENCY") as a:
        assert a.compiled_property("INFERENCE_NUM_THREADS") == 1
        assert a.compiled_property("PERFORMANCE_HINT") == "LATENCY"
    with _open(unet, streams=2, threads=2, performance_hint="THROUGHPUT") as b:
        assert b.compiled_property("NUM_STREAMS") == 2
        assert b.compiled_property("PERFORMANCE_HINT") == "THROUGHPUT"
        np.testing.assert_allclose(b.run(_feeds())["output"], a_out := CpuBackend(unet).run(_feeds())["output"], atol=2e-5)
        assert a_out.shape == (2, 3, 320, 320)
    with pytest.raises(ConfigError, match="performance_hint"):
        _open(unet, performance_hint="FAST")
    with pytest.raises(ConfigError, match="streams"):
        _open(unet, streams=0)


def test_compiled_models_are_cached(unet: Path, tmp_path: Path):
    d = tmp_path / "ovcache"
    with _open(unet, cache_dir=str(d)) as first:
        assert not first.loaded_from_cache
    assert any(d.iterdir())
    with _open(unet, cache_dir=str(d)) as second:
        assert second.loaded_from_cache
        np.testing.assert_allclose(second.run(_feeds())["output"], CpuBackend(unet).run(_feeds())["output"], atol=2e-5)
    off = tmp_path / "off"
    with _open(unet, cache_dir=str(off), cache=False) as third:
        assert not third.loaded_from_cache
    assert not off.exists()


def test_auto_device_runs_on_the_cpu(unet: Path):
    with _open(unet, device="AUTO") as be:
        assert be.providers == ["OpenVINO CPU fp32"]
        assert be.run(_feeds(1))["output"].shape == (1, 3, 320, 320)


# --------------------------------------------------------------------------- gates (mechanics)


@pytest.mark.skipif(not _has_bf16(), reason="this CPU has no native bf16")
def test_unmeasured_precision_is_refused_with_the_command_unless_insisted(unet: Path, caplog: pytest.LogCaptureFixture):
    with pytest.raises(BackendError, match="no accuracy gate record on CPU") as e:
        _open(unet, "bf16")
    assert f"avatar gate {unet} --avatar AVATAR_PKG --backend openvino --precision bf16" in str(e.value)
    with caplog.at_level(logging.WARNING, "avatar_plugins.backends.openvino"), _open(unet, "bf16", allow_failed_gate="1") as be:
        assert be.gate is None and be.precision == "bf16"
    assert "has no accuracy gate record" in caplog.text


@pytest.mark.skipif(not _has_bf16(), reason="this CPU has no native bf16")
def test_failed_gate_refuses_unless_insisted(unet: Path, caplog: pytest.LogCaptureFixture):
    _record(unet, "bf16", passed=False)
    with pytest.raises(BackendError, match="refusing bf16.*failed its accuracy gate.*FAILED.*allow_failed_gate"):
        _open(unet, "bf16")
    with caplog.at_level(logging.WARNING), _open(unet, "bf16", allow_failed_gate=True) as be:
        assert be.gate is not None and not be.gate.passed and be.precision == "bf16"
    assert "although it failed its accuracy gate" in caplog.text
    _record(unet, "bf16", passed=True)  # a new measurement replaces the old one
    with _open(unet, "bf16") as be:
        assert be.gate is not None and be.gate.passed


def test_a_changed_model_has_no_record(unet: Path):
    _record(unet, "bf16", passed=False)
    assert _gates.find_record(unet, "bf16", "CPU") is not None
    unet.write_bytes(make_unet(unet.with_name("other.onnx"), tiny=True, seed=1).read_bytes())
    assert _gates.find_record(unet, "bf16", "CPU") is None


def test_records_go_to_the_cache_when_the_model_folder_is_read_only(unet: Path):
    beside, cached = _gates.record_files(unet)
    os.chmod(unet.parent, 0o555)  # marked read-only: not written into, even by root
    try:
        _record(unet, "bf16", passed=True)
    finally:
        os.chmod(unet.parent, 0o755)
    assert cached.is_file() and not beside.exists()
    assert _gates.find_record(unet, "bf16", "CPU").passed  # type: ignore[union-attr]
    beside.mkdir()  # a write that fails beside the model also falls back to the cache
    _record(unet, "fp16", passed=True)
    assert _gates.find_record(unet, "fp16", "CPU") is not None


def test_auto_precision_picks_a_passing_bf16_and_says_why(unet: Path, caplog: pytest.LogCaptureFixture):
    with _open(unet, "auto") as be:
        assert be.precision == "fp32" and "no gate record" in be.choice or "no native bf16" in be.choice
    if not _has_bf16():
        return
    _record(unet, "bf16", passed=False)
    with _open(unet, "auto") as be:
        assert be.precision == "fp32" and "bf16 failed its gate" in be.choice
    _record(unet, "bf16", passed=True)
    with caplog.at_level(logging.INFO, "avatar_plugins.backends.openvino"), _open(unet, "auto") as be:
        assert be.precision == "bf16" and "passed the bf16 gate" in be.choice
    assert "passed the bf16 gate" in caplog.text


def test_backend_auto_uses_openvino_only_with_a_passing_gate(unet: Path):
    from avatar.render import open_backend

    be, used = open_backend("auto", unet, BackendOptions(max_batch=2))
    be.close()
    assert used == "cpu"  # openvino fp32 is no faster: auto declines it
    if "FP16" not in ovb.device_capabilities("CPU"):
        be, used = open_backend("auto", unet, BackendOptions(max_batch=2, precision="fp16"))
        be.close()
        assert used == "cpu"  # fp16 the CPU cannot run in OpenVINO: auto moves on to ONNX Runtime
    if not _has_bf16():
        return
    _record(unet, "bf16", passed=True)
    be, used = open_backend("auto", unet, BackendOptions(max_batch=2))
    with be:
        assert used == "openvino" and be.precision == "bf16"  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- int8 (mechanics on a seeded model)


@pytest.fixture(scope="module")
def quantized(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("nncf")
    from avatar_plugins.backends._ov_quantize import Recipe, quantize

    d = tmp_path_factory.mktemp("q")
    idx = list(range(8))
    data = _gates.FrameData(idx, (sample_visual(8)[:, :3].transpose(0, 2, 3, 1) * 255).astype(np.uint8),
                            sample_audio("ave", 8), "seeded")  # fmt: skip
    out = d / "tiny.int8.xml"
    quantize(models["unet"], out, data, ("input", "audio"), Recipe(subset_size=8))
    return out


def test_quantized_model_runs_int8_and_names_its_source(quantized: Path, models: dict[str, Path]):
    from avatar.contract import read_contract
    from avatar_plugins.backends._ov_quantize import quantized_from

    assert quantized_from(quantized) == models["unet"].resolve()
    assert read_contract(quantized).feature_type == "ave"
    with _open(quantized, "int8", allow_failed_gate=True) as be:  # unmeasured: insisted
        assert be.quantized and be.precision == "int8"
        assert be.run(_feeds())["output"].shape == (2, 3, 320, 320)
    with pytest.raises(ConfigError, match="quantized"):
        _open(quantized, "fp32")


def test_sensitive_layers_are_found_from_the_graph(models: dict[str, Path]):
    import onnx

    from avatar_plugins.backends._ov_quantize import sensitive_nodes

    m = onnx.load(str(models["unet"]))
    groups = sensitive_nodes(ovb._core().read_model(str(models["unet"])), "input", "audio")
    convs = [n.name + "/WithoutBiases" for n in m.graph.node if n.op_type == "Conv"]
    assert groups["last_conv"] == [convs[-1]]
    assert groups["first_conv"] == [convs[0]]
    assert groups["audio"] and not set(groups["audio"]) & set(groups["first_conv"] + groups["last_conv"])
    # full resolution: the convolutions whose output is 320x320 (shape inference on the ONNX graph agrees)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in onnx.shape_inference.infer_shapes(m).graph.value_info}  # fmt: skip
    want = [n.name + "/WithoutBiases" for n in m.graph.node if n.op_type == "Conv" and shapes.get(n.output[0], [])[2:] == [320, 320]]
    assert [n for n in groups["full_res"] if n in convs] == want and convs[-1] in want


# --------------------------------------------------------------------------- the trained model


@pytest.fixture(scope="module")
def trained(sanders_dir: Path) -> Path:
    """The UNet-328 trained on the sanders dataset (skips, like ``sanders_dir``, when the shared data is absent)."""
    model = sanders_dir / "model" / "unet_sanders_ave.onnx"
    if not model.is_file():
        pytest.skip(f"the trained model is not present: {model}")
    return model


@pytest.mark.slow
@pytest.mark.skipif(not _has_bf16(), reason="this CPU has no native bf16")
def test_bf16_passes_the_gate_on_the_trained_model(trained: Path, sanders_dir: Path):
    from avatar_plugins.backends._ov_commands import measure_gate

    record, where = measure_gate(trained, sanders_dir, precision="bf16", frames="460:522")
    assert record.passed, record.summary()
    assert record.psnr_vs_fp32 >= 40 and record.loss_db <= 0.1
    assert 25.5 < record.fp32_vs_real < 26.0  # the README's 25.77 dB: the measure is the documented one
    assert where.is_file() and _gates.find_record(trained, "bf16", "CPU").passed  # type: ignore[union-attr]


def test_quantize_and_gate_commands_write_a_model_and_records(models: dict[str, Path], tmp_path: Path):
    """The CLI end to end on a synthetic SyncTalk_2D folder (mechanics only: no verdict on a seeded model)."""
    pytest.importorskip("nncf")
    from click.testing import CliRunner

    from avatar.cli import cli
    from test_importers import make_synctalk

    data = make_synctalk(tmp_path / "st", n=10)
    out = tmp_path / "q" / "tiny.int8.xml"
    r = CliRunner().invoke(cli, ["quantize", str(models["unet"]), "--avatar", str(data), "-o", str(out),
                                 "--frames", "7:10", "--subset", "4"])  # fmt: skip
    # a seeded model is no judge of precision: the gate's verdict decides the exit status (1: failed)
    assert r.exit_code == (0 if _gates.find_record(out, "int8", "CPU").passed else 1), r.output  # type: ignore[union-attr]
    assert "4 calibration frames" in r.output and "held out: 7-9" in r.output
    rec = _gates.find_record(out, "int8", "CPU")
    assert rec is not None and rec.frames == [7, 9] and rec.reference_sha256 == file_sha256(models["unet"])
    assert rec.model_sha256 == _gates.model_sha256(out) != file_sha256(out)  # the IR's weights are in the hash
    assert ovb.is_quantized(ovb._core().read_model(str(out))) and out.with_suffix(".bin").is_file()
    r = CliRunner().invoke(cli, ["gate", str(out), "--avatar", str(data), "--precision", "int8", "--frames", "0:3"])
    passed = _gates.find_record(out, "int8", "CPU").passed  # type: ignore[union-attr]
    assert r.exit_code == (0 if passed else 1) and "recorded in" in r.output, r.output
    assert _gates.find_record(out, "int8", "CPU").frames == [0, 2]  # type: ignore[union-attr]
    r = CliRunner().invoke(cli, ["gate", str(out), "--avatar", str(data), "--precision", "int8", "--frames", "9:99"])
    assert r.exit_code != 0 and "outside 0:10" in r.output


# --------------------------------------------------------------------------- renders


@pytest.fixture(scope="module")
def demo_avatar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from avatar.demo import synthetic_frames
    from avatar.package import write_package

    d = tmp_path_factory.mktemp("ov-avatar") / "avatar"
    frames, boxes = synthetic_frames(8, width=320, height=240)
    write_package(d, iter(frames), boxes, fps=25, name="test")
    return d


def test_render_on_openvino_matches_cpu(models: dict[str, Path], demo_avatar: Path):
    from avatar.demo import speechlike_audio
    from avatar.render import render
    from avatar_plugins.sinks.callback import CallbackSink

    faces: dict[str, list[np.ndarray]] = {}
    for backend in ("cpu", "openvino"):
        got: list = []
        report = render(demo_avatar, speechlike_audio(0.4), sinks=[CallbackSink(got.append, with_face=True)],
                        model=models["unet"], feature_options={"encoder": str(models["encoder"])}, backend=backend,
                        batch_size=4)  # fmt: skip
        assert report.to_dict()["backend"] == backend
        faces[backend] = [f.face for f in got]
    assert len(faces["cpu"]) == len(faces["openvino"]) == 10
    for a, b in zip(faces["cpu"], faces["openvino"]):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_cli_run_with_precision_and_backend_options(models: dict[str, Path], demo_avatar: Path, tmp_path: Path):
    from click.testing import CliRunner

    from avatar.cli import cli
    from avatar.demo import speechlike_audio, write_wav

    wav = tmp_path / "a.wav"
    write_wav(wav, speechlike_audio(0.4))
    out, rep = tmp_path / "out.mp4", tmp_path / "report.json"
    args = ["run", "--avatar", str(demo_avatar), "--audio", str(wav), "--model", str(models["unet"]), "--ave-encoder",
            str(models["encoder"]), "--backend", "openvino", "-o", str(out), "--no-progress", "--report", str(rep)]  # fmt: skip
    r = CliRunner().invoke(cli, [*args, "--precision", "fp32", "--backend-opt", "streams=1", "--backend-opt", "device=CPU"])
    assert r.exit_code == 0, r.output
    assert out.stat().st_size > 1000 and '"backend": "openvino"' in rep.read_text()
    r = CliRunner().invoke(cli, [*args, "--backend-opt", "streams"])
    assert r.exit_code != 0 and "--backend-opt expects KEY=VALUE" in r.output
    r = CliRunner().invoke(cli, [*args, "--backend-opt", "colour=blue"])
    assert r.exit_code != 0 and "unknown option(s) colour" in r.output
    r = CliRunner().invoke(cli, [*args, "--precision", "int8"])
    assert r.exit_code != 0 and "avatar quantize" in r.output


@pytest.mark.slow
def test_int8_by_avatar_quantize_passes_the_gate_on_the_trained_model(trained: Path, sanders_dir: Path, tmp_path: Path):
    """The default recipe, calibrated on frames 0-459 of the trained model's own dataset, passes on 460-521."""
    pytest.importorskip("nncf")
    from click.testing import CliRunner

    from avatar.cli import cli

    out = tmp_path / "sanders.int8.xml"
    r = CliRunner().invoke(cli, ["quantize", str(trained), "--avatar", str(sanders_dir), "-o", str(out), "--frames", "460:522"])
    assert r.exit_code == 0, r.output
    rec = _gates.find_record(out, "int8", "CPU")
    assert rec is not None and rec.passed, rec and rec.summary()
    assert rec.reference_sha256 == file_sha256(trained)
    with _open(out, "auto") as be:  # auto takes the passing int8
        assert be.precision == "int8" and "gate passed" in be.choice


def test_backend_auto_keeps_an_explicit_precision(unet: Path):
    """`--precision fp32` under `--backend auto` is fp32 even where a gated bf16 exists;
    `--precision auto` falls back to ONNX Runtime fp32 when openvino declines."""
    from avatar.render import open_backend

    # no gate record: openvino declines auto, and cpu runs `auto` as fp32 instead of refusing it
    be, used = open_backend("auto", unet, BackendOptions(max_batch=2, precision="auto", precision_explicit=True))
    with be:
        assert used == "cpu"
    if not _has_bf16():
        return
    _record(unet, "bf16", passed=True)
    be, used = open_backend("auto", unet, BackendOptions(max_batch=2, precision="fp32", precision_explicit=True))
    with be:
        assert used == "cpu"  # asked for fp32: not silently bf16 on openvino
    be, used = open_backend("auto", unet, BackendOptions(max_batch=2, precision="auto", precision_explicit=True))
    with be:
        assert used == "openvino" and be.precision == "bf16"  # type: ignore[attr-defined]
