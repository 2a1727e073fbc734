"""The live service with real packages and models: what a session inherits from its
package and model, and what a session that fails to start leaves behind."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from avatar.engine import AvatarService, Clock
from avatar.interfaces import Sink, SinkReport, StreamInfo, VideoFrame


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import onnx

    from avatar.demo import synthetic_frames
    from avatar.models.synthetic import make_audio_encoder, make_unet
    from avatar.package import write_package

    d = tmp_path_factory.mktemp("live-service")
    unet = make_unet(d / "unet.onnx", mode="ave", seed=1, tiny=True)
    m = onnx.load(str(unet))
    for v in [*m.graph.input, *m.graph.output]:  # upstream SyncTalk_2D exports have a fixed batch of 1
        v.type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(m, str(d / "fixed1.onnx"))
    frames, boxes = synthetic_frames(6, width=320, height=240)
    out = {"unet": unet, "fixed1": d / "fixed1.onnx", "enc": make_audio_encoder(d / "enc.onnx", seed=1, tiny=True)}
    for padding in ("zero", "replicate"):
        out[padding] = write_package(d / padding, iter(frames), boxes, fps=25, name=padding, model=unet, padding=padding)
    return out


def _service() -> AvatarService:
    return AvatarService(backend="cpu", clock=Clock.scaled(0.25))


class _Frames(Sink):
    name = "frames"

    def __init__(self) -> None:
        self.frames: list[VideoFrame] = []

    def open(self, info: StreamInfo) -> None:
        pass

    def write(self, frame: VideoFrame) -> None:
        self.frames.append(frame)

    def close(self, aborted: bool = False) -> SinkReport:
        return SinkReport(frames=len(self.frames))


@pytest.mark.parametrize("padding", ["zero", "replicate"])
def test_a_session_takes_the_packages_recorded_padding(assets: dict[str, Path], padding: str) -> None:
    with _service() as svc:
        s = svc.open_session(assets[padding], sinks=[_Frames()], feature_options={"encoder": str(assets["enc"])})
        assert s.source.padding == padding
        # an explicit option still wins over the package
        other = "replicate" if padding == "zero" else "zero"
        t = svc.open_session(assets[padding], sinks=[_Frames()],
                             feature_options={"encoder": str(assets["enc"]), "padding": other})  # fmt: skip
        assert t.source.padding == other


def test_a_fixed_batch_model_serves_live_sessions(assets: dict[str, Path]) -> None:
    from avatar.demo import speechlike_audio

    sink = _Frames()
    with _service() as svc:
        s = svc.open_session(assets["zero"], sinks=[sink], model=assets["fixed1"],
                             feature_options={"encoder": str(assets["enc"])})  # fmt: skip
        s.push_audio(speechlike_audio(0.6, seed=3), 16000)
        s.flush()
        deadline = time.monotonic() + 60
        while s.alive and s.speech_frames < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s.alive, s.error
        assert s.speech_frames >= 10
        s.close()
    assert any(f.face is not None or f.audio.any() for f in sink.frames)


class _Refuses(Sink):
    name = "refuses"

    def open(self, info: StreamInfo) -> None:
        raise OSError("this output cannot be opened")

    def write(self, frame: VideoFrame) -> None:  # pragma: no cover - never opened
        raise AssertionError

    def close(self, aborted: bool = False) -> SinkReport:  # pragma: no cover - never opened
        return SinkReport()


def test_a_session_that_cannot_open_a_sink_closes_the_ones_it_opened(assets: dict[str, Path], tmp_path: Path) -> None:
    import av

    out = tmp_path / "x.mp4"
    with _service() as svc:
        with pytest.raises(Exception, match="cannot be opened"):
            svc.open_session(assets["zero"], sinks=[("file", {"path": str(out)}), _Refuses()],
                             feature_options={"encoder": str(assets["enc"])})  # fmt: skip
        assert not svc.sessions
        # the file sink's lock and partial file are gone: the next writer to that path is not refused
        sink = _Frames()
        s = svc.open_session(assets["zero"], sinks=[("file", {"path": str(out)}), sink],
                             feature_options={"encoder": str(assets["enc"])})  # fmt: skip
        deadline = time.monotonic() + 60
        while len(sink.frames) < 5 and s.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        s.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.mp4"]
    with av.open(str(out)) as c:
        assert sum(1 for _ in c.decode(video=0)) >= 5


def test_the_shared_scheduler_plans_for_the_sessions_open(assets: dict[str, Path]) -> None:
    """A live session counts for the start budget from its open to its close, speaking or not."""
    with _service() as svc:
        opts = {"encoder": str(assets["enc"])}
        s = svc.open_session(assets["zero"], sinks=[_Frames()], feature_options=opts)
        t = svc.open_session(assets["zero"], sinks=[_Frames()], feature_options=opts)
        sched = s.scheduler
        assert t.scheduler is sched and sched.present_fps() == 50.0
        two = sched.start_budget_s(25.0)
        t.close()
        assert sched.present_fps() == 25.0
        assert sched.start_budget_s(25.0) <= two
        s.close()
        assert sched.present_fps() == 0.0
