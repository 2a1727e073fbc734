"""Server pieces that need no live session: bind safety, tokens, ICE servers, admission, the meter."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from avatar.cli import cli
from avatar.errors import ConfigError
from avatar.interfaces import StreamInfo, VideoFrame
from avatar.serve.admission import Admission, Capacity, Refused, measured_capacity
from avatar.serve.config import TOKEN_ENV, is_loopback, parse_ice_server, resolve_token
from click.testing import CliRunner

TOKEN = "t" * 24


def test_loopback_needs_no_token_but_any_other_bind_does(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert resolve_token("127.0.0.1", None) is None
    assert resolve_token("::1", None) is None and is_loopback("localhost")
    for host in ("0.0.0.0", "192.168.1.5", "", "example.org"):
        with pytest.raises(ConfigError, match="--token"):
            resolve_token(host, None)
    assert resolve_token("0.0.0.0", TOKEN) == TOKEN
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert resolve_token("0.0.0.0", None) == TOKEN
    with pytest.raises(ConfigError, match="16 characters"):
        resolve_token("127.0.0.1", "short")


def test_the_cli_refuses_an_open_bind_before_loading_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("aiohttp")
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    r = CliRunner().invoke(cli, ["serve", "--demo", "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "bearer token" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["serve"])
    assert r.exit_code == 2 and "--avatar PATH" in r.output


def test_ice_servers() -> None:
    assert parse_ice_server("stun:stun.example.org:3478") == {"urls": "stun:stun.example.org:3478"}
    assert parse_ice_server("turn:bob:pw:x@turn.example.org:3478") == {
        "urls": "turn:turn.example.org:3478", "username": "bob", "credential": "pw:x"}
    with pytest.raises(ConfigError, match="stun:HOST"):
        parse_ice_server("http://nope")


def test_capacity_from_throughput_and_refusal_with_the_reason() -> None:
    assert measured_capacity(400.0, 25.0).sessions == 12  # 400 * 0.75 / 25
    assert measured_capacity(10.0, 25.0).sessions == 1  # slower than real time: one session, skipping frames
    adm = Admission(measured_capacity(100.0, 25.0))
    for _ in range(3):
        adm.admit()
    with pytest.raises(Refused, match="measured backend throughput 100 frames/s holds 3"):
        adm.admit()
    adm.release()
    adm.admit()
    with pytest.raises(Refused, match="--max-sessions is 1"):
        a = Admission(Capacity(1, "configured"))
        a.admit()
        a.admit()


def test_meter_sink_measures_delivery_and_feeds_the_metrics() -> None:
    pytest.importorskip("prometheus_client")
    from avatar.serve.metrics import MeterSink, ServerMetrics

    m = ServerMetrics()
    meter = MeterSink(m)
    meter.open(StreamInfo(width=8, height=8, fps=Fraction(25)))
    for i in range(5):
        meter.write(VideoFrame(index=i, pts=Fraction(i, 25), image=np.zeros((8, 8, 3), np.uint8),
                               audio=np.zeros(640, np.float32)))
    assert meter.frames == 5 and meter.last_index == 4
    text = m.render()[0].decode()
    assert "avatar_frames_delivered_total 5.0" in text
    assert "avatar_frame_lag_seconds_count 5.0" in text


def test_avatar_option_names_and_checks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from avatar.cli.serve_cmd import _spec

    (tmp_path / "anna").mkdir()
    assert _spec(str(tmp_path / "anna"), None, "ave", None).name == "anna"
    spec = _spec(f"bob={tmp_path / 'anna'}", str(tmp_path / "m.onnx"), "hubert", "enc.onnx")
    assert (spec.name, spec.path, spec.features, spec.feature_options) == ("bob", tmp_path / "anna", "hubert", {"encoder": "enc.onnx"})
    with pytest.raises(ConfigError, match="not an avatar package folder"):
        _spec(str(tmp_path / "nope"), None, "ave", None)
