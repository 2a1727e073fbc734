"""The callback sink: user code receives every frame in order, errors surface as SinkError."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from avatar import ConfigError, SinkError, get_plugin_manager
from avatar.interfaces import Sink, StreamInfo, VideoFrame
from avatar_plugins.sinks.callback import CallbackSink

INFO = StreamInfo(32, 24, Fraction(25), 16000, frame_count=10)


def frames(n: int = 10) -> list[VideoFrame]:
    return [
        VideoFrame(i, Fraction(i, 25), np.full((24, 32, 3), i * 10, np.uint8),
                   np.full(640, i / 100, np.float32))
        for i in range(n)
    ]


def test_frames_arrive_in_order_with_index_pts_and_content() -> None:
    got: list[tuple[int, Fraction, int, float]] = []
    sink = CallbackSink(lambda f: got.append((f.index, f.pts, int(f.image[0, 0, 0]), float(f.audio[0]))))
    sink.open(INFO)
    for f in frames():
        sink.write(f)
    report = sink.close()
    assert [g[0] for g in got] == list(range(10))
    assert [g[1] for g in got] == [Fraction(i, 25) for i in range(10)]
    assert [g[2] for g in got] == [i * 10 for i in range(10)]
    assert [g[3] for g in got] == pytest.approx([i / 100 for i in range(10)])
    assert report.frames == 10


def test_with_face_is_per_instance() -> None:
    plain, faces = CallbackSink(print), CallbackSink(print, with_face=True)
    assert plain.wants_face is False and faces.wants_face is True
    assert Sink.wants_face is False and CallbackSink.wants_face is False


def test_face_and_box_are_passed_through() -> None:
    got = []
    sink = CallbackSink(got.append, with_face=True)
    sink.open(INFO)
    face = np.full((320, 320, 3), 7, np.uint8)
    sink.write(VideoFrame(0, Fraction(0), np.zeros((24, 32, 3), np.uint8), np.zeros(640, np.float32),
                          face=face, box=(1, 2, 3, 4)))
    assert got[0].face is face and got[0].box == (1, 2, 3, 4)


def test_user_exceptions_propagate_as_sink_error_with_cause() -> None:
    def boom(frame: VideoFrame) -> None:
        if frame.index == 3:
            raise ValueError("user code failed")

    sink = CallbackSink(boom)
    sink.open(INFO)
    with pytest.raises(SinkError, match="frame 3") as info:
        for f in frames():
            sink.write(f)
    assert isinstance(info.value.__cause__, ValueError)
    assert sink.close(aborted=True).frames == 3


def test_on_open_receives_stream_info() -> None:
    seen = []
    sink = CallbackSink(lambda f: None, on_open=seen.append)
    sink.open(INFO)
    assert seen == [INFO]


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="needs fn"):
        CallbackSink()
    with pytest.raises(ConfigError, match="needs fn"):
        CallbackSink(fn="not callable")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown option"):
        CallbackSink(print, colour="red")


def test_registered_as_plugin_with_options() -> None:
    got = []
    sink = get_plugin_manager().sink("callback", fn=got.append, with_face=True)
    assert isinstance(sink, CallbackSink) and sink.wants_face
    sink.open(INFO)
    sink.write(frames(1)[0])
    assert len(got) == 1
