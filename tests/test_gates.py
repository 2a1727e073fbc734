"""The precision gates cannot be bypassed without an explicit flag, through the command line.

Each case was a quiet bypass on main (50f912c): a record file with one record
this release does not know lost every record; ``passed`` came from the file;
``device=AUTO`` skipped every check; ``allow_failed_gate=false`` insisted;
``avatar gate`` exited 0 on a failed gate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("openvino")

from click.testing import CliRunner

from avatar.cli import cli
from avatar.models.synthetic import make_audio_encoder, make_unet
from avatar_plugins.backends import _gates, openvino as ovb

needs_bf16 = pytest.mark.skipif("BF16" not in ovb.device_capabilities("CPU"), reason="this CPU has no native bf16")


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from avatar.demo import speechlike_audio, synthetic_frames, write_wav
    from avatar.package import write_package

    d = tmp_path_factory.mktemp("gates")
    frames, boxes = synthetic_frames(8, width=320, height=240)
    write_package(d / "avatar", iter(frames), boxes, fps=25, name="test")
    write_wav(d / "a.wav", speechlike_audio(0.4))
    return {"avatar": d / "avatar", "wav": d / "a.wav", "encoder": make_audio_encoder(d / "enc.onnx", tiny=True),
            "unet": make_unet(d / "unet.onnx", tiny=True)}


@pytest.fixture
def unet(kit: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the model: its records are written beside it."""
    p = tmp_path / "m" / "unet.onnx"
    p.parent.mkdir()
    p.write_bytes(kit["unet"].read_bytes())
    return p


def _row(model: Path, precision: str = "bf16", device: str = "CPU", passed: bool = False, **extra: Any) -> dict[str, Any]:
    """A record as ``avatar gate`` writes it; the figures fail the gate (33.7 dB vs fp32, 0.47 dB lost)."""
    return {"model_sha256": _gates.model_sha256(model), "precision": precision, "device": device, "backend": "openvino",
            "psnr_vs_fp32": 33.7, "psnr_vs_real": 25.3, "fp32_vs_real": 25.77, "frames": [460, 521], "data": "test",
            "passed": passed, "measured": "2026-01-01T00:00:00+00:00", **extra}


def _write(model: Path, rows: list[Any]) -> None:
    model.with_name(model.name + ".gates.json").write_text(json.dumps({"schema": _gates.SCHEMA, "records": rows}))


def _run(kit: dict[str, Path], model: Path, tmp_path: Path, *opts: str) -> Any:
    args = ["run", "--avatar", str(kit["avatar"]), "--audio", str(kit["wav"]), "--model", str(model), "--ave-encoder",
            str(kit["encoder"]), "--backend", "openvino", "--precision", "bf16", "-o", str(tmp_path / "out.mp4"),
            "--no-progress"]
    for o in opts:
        args += ["--backend-opt", o]
    return CliRunner().invoke(cli, args)


@needs_bf16
def test_an_unknown_record_is_skipped_and_named_and_the_failed_one_is_kept(kit: dict[str, Path], unet: Path,
                                                                          tmp_path: Path, caplog: Any) -> None:
    newer = _row(unet, "fp16", field_from_a_newer_release={"x": 1})
    broken = {**_row(unet, "int8"), "psnr_vs_fp32": "high"}
    _write(unet, [newer, broken, "garbage", _row(unet, "bf16", extra_note="newer field")])
    r = _run(kit, unet, tmp_path)
    assert r.exit_code != 0 and "refusing bf16" in r.output and "failed its accuracy gate" in r.output, r.output
    assert "skipping gate record 1" in caplog.text and "int8 on CPU" in caplog.text and "psnr_vs_fp32" in caplog.text
    assert "skipping gate record 2" in caplog.text
    assert [r.precision for r in _gates.load_records(unet)] == ["fp16", "bf16"]


@needs_bf16
def test_passed_is_recomputed_from_the_figures(kit: dict[str, Path], unet: Path, tmp_path: Path) -> None:
    _write(unet, [_row(unet, "bf16", passed=True)])  # failing figures, "passed": true
    r = _run(kit, unet, tmp_path)
    assert r.exit_code != 0 and "refusing bf16" in r.output and "FAILED" in r.output, r.output
    good = {**_row(unet, "bf16", passed=False), "psnr_vs_fp32": 53.8, "psnr_vs_real": 25.8}  # passing figures
    _write(unet, [good])
    r = _run(kit, unet, tmp_path)
    assert r.exit_code == 0, r.output


@needs_bf16
def test_an_unmeasured_or_failed_precision_is_refused_on_auto_too(kit: dict[str, Path], unet: Path,
                                                                  tmp_path: Path) -> None:
    r = _run(kit, unet, tmp_path, "device=AUTO")
    assert r.exit_code != 0 and "refusing bf16" in r.output and "no accuracy gate record on CPU" in r.output, r.output
    _write(unet, [_row(unet, "bf16")])
    r = _run(kit, unet, tmp_path, "device=AUTO")
    assert r.exit_code != 0 and "refusing bf16" in r.output and "failed its accuracy gate" in r.output, r.output
    r = _run(kit, unet, tmp_path, "device=AUTO", "allow_failed_gate=yes")
    assert r.exit_code == 0, r.output


@needs_bf16
def test_allow_failed_gate_is_a_strict_boolean(kit: dict[str, Path], unet: Path, tmp_path: Path) -> None:
    _write(unet, [_row(unet, "bf16")])
    r = _run(kit, unet, tmp_path, "allow_failed_gate=false")
    assert r.exit_code != 0 and "refusing bf16" in r.output, r.output
    r = _run(kit, unet, tmp_path, "allow_failed_gate=perhaps")
    assert r.exit_code != 0 and "allow_failed_gate must be true or false" in r.output, r.output
    r = _run(kit, unet, tmp_path, "allow_failed_gate=1")
    assert r.exit_code == 0, r.output


@needs_bf16
def test_avatar_gate_exits_1_when_the_gate_fails(kit: dict[str, Path], unet: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The same measurement judged by a threshold it cannot meet, then by one it always meets."""
    from test_importers import make_synctalk

    data = make_synctalk(tmp_path / "st", n=10)
    args = ["gate", str(unet), "--avatar", str(data), "--precision", "bf16", "--frames", "0:3"]
    monkeypatch.setattr(_gates, "MIN_PSNR_VS_FP32", 1000.0)
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1 and "FAILED" in r.output and "the bf16 accuracy gate failed" in r.output, r.output
    assert not _gates.find_record(unet, "bf16", "CPU").passed  # type: ignore[union-attr]
    monkeypatch.setattr(_gates, "MIN_PSNR_VS_FP32", -1000.0)
    monkeypatch.setattr(_gates, "MAX_LOSS_DB", 1000.0)
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0 and "passed" in r.output, r.output


def test_avatar_quantize_exits_1_when_its_int8_gate_fails(kit: dict[str, Path], unet: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The quantized model is written and its record kept, but a failed gate fails the command (a CI step notices)."""
    pytest.importorskip("nncf")
    from test_importers import make_synctalk

    data = make_synctalk(tmp_path / "st", n=10)
    out = tmp_path / "q" / "tiny.int8.xml"
    args = ["quantize", str(unet), "--avatar", str(data), "-o", str(out), "--frames", "7:10", "--subset", "4"]
    monkeypatch.setattr(_gates, "MIN_PSNR_VS_FP32", 1000.0)
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 1 and "FAILED" in r.output and "the int8 accuracy gate failed" in r.output, r.output
    assert out.is_file() and not _gates.find_record(out, "int8", "CPU").passed  # type: ignore[union-attr]
    monkeypatch.setattr(_gates, "MIN_PSNR_VS_FP32", -1000.0)
    monkeypatch.setattr(_gates, "MAX_LOSS_DB", 1000.0)
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0 and "passed" in r.output, r.output
