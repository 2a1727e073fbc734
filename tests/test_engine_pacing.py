"""The offline render as a session: walk start, real-time sinks, what sources and sinks declare, teardown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from avatar.engine import Clock, Renderer, RenderOptions
from avatar.interfaces import Sink, SinkReport, StreamInfo, VideoFrame
from avatar.schedule import pingpong


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from avatar.demo import synthetic_frames
    from avatar.models.synthetic import make_audio_encoder, make_unet
    from avatar.package import write_package

    d = tmp_path_factory.mktemp("pacing")
    frames, boxes = synthetic_frames(12, width=320, height=240)
    write_package(d / "pkg", iter(frames), boxes, fps=25, name="t")
    return {
        "pkg": d / "pkg",
        "unet": make_unet(d / "unet.onnx", mode="ave", seed=1, tiny=True),
        "enc": make_audio_encoder(d / "enc.onnx", seed=1, tiny=True),
    }


class Keep(Sink):
    """Keeps frames; ``realtime`` as the class declares."""

    name = "keep"

    def __init__(self, realtime: bool = False) -> None:
        super().__init__()
        self.realtime = realtime  # type: ignore[misc]
        self.frames: list[VideoFrame] = []

    def open(self, info: StreamInfo) -> None:
        self.info = info

    def write(self, frame: VideoFrame) -> None:
        self.frames.append(frame)

    def close(self, aborted: bool = False) -> SinkReport:
        return SinkReport(frames=len(self.frames))


def renderer(assets: dict[str, Path], sinks: list[Sink], source: Any = None, backend: Any = None, **opts: Any) -> Renderer:
    from avatar.contract import read_contract
    from avatar.package import AvatarPackage
    from avatar.plugins import get_plugin_manager

    pm = get_plugin_manager()
    source = source or pm.feature_source("ave", encoder=str(assets["enc"]))
    backend = backend or pm.backend_class("cpu")(assets["unet"])
    return Renderer(AvatarPackage.open(assets["pkg"]), backend, read_contract(assets["unet"]), source, sinks,
                    RenderOptions(**opts), backend_name="cpu")


def test_walk_start_one_is_upstreams_pingpong(assets: dict[str, Path]) -> None:
    from avatar.demo import speechlike_audio

    pcm = speechlike_audio(1.2, seed=1)
    for start in (0, 1):
        sink = Keep()
        renderer(assets, [sink], walk_start=start).run(pcm)
        assert [f.avatar_index for f in sink.frames] == [pingpong(i + start, 12) for i in range(30)]
    with pytest.raises(Exception, match="walk_start"):
        renderer(assets, [Keep()], walk_start=-1)


def test_a_realtime_sink_paces_the_render_and_frames_are_skipped_before_inference(assets: dict[str, Path]) -> None:
    """On a clock 200x faster than real time no machine keeps up: frames are skipped, audio never is."""
    from avatar.demo import speechlike_audio

    pcm = speechlike_audio(4.0, seed=2)
    paced, plain = Keep(realtime=True), Keep()
    report = renderer(assets, [paced], clock=Clock.scaled(200.0)).run(pcm)
    assert report.frames == len(paced.frames) == 100  # every frame went out ...
    assert np.array_equal(np.concatenate([f.audio for f in paced.frames]), pcm)  # ... with all the audio
    # frames were dropped (before inference, or — racing this extreme clock — after it), none of their audio
    assert report.skipped + report.late > 0 and report.stages.items["inference"] <= 100 - report.skipped
    assert report.stages.items["inference"] < 100
    # a held frame shows the last picture; the shown pictures follow the walk
    assert all(f.image is g.image or f.avatar_index == pingpong(f.index, 12) for g, f in zip(paced.frames, paced.frames[1:]))
    # the same render to a sink that is not real-time is not paced: nothing is skipped
    report = renderer(assets, [plain], clock=Clock.scaled(200.0)).run(pcm)
    assert report.skipped == 0 and report.stages.items["inference"] == 100


def test_a_source_that_is_not_exact_in_chunks_gets_the_whole_signal(assets: dict[str, Path]) -> None:
    from avatar.demo import speechlike_audio
    from avatar.plugins import get_plugin_manager

    ave = type(get_plugin_manager().feature_source("ave", encoder=str(assets["enc"])))
    pcm = speechlike_audio(2.0, seed=3)
    for exact in (True, False):
        pushes: list[int] = []

        class Recording(ave):  # type: ignore[misc,valid-type]
            exact_streaming = exact

            def open_stream(self) -> Any:
                stream = super().open_stream()
                push = stream.push

                def recording(chunk: np.ndarray) -> np.ndarray:
                    pushes.append(len(chunk))
                    return push(chunk)

                stream.push = recording
                return stream

        renderer(assets, [Keep()], source=Recording(encoder=str(assets["enc"]))).run(pcm)
        assert sum(pushes) == len(pcm)
        assert (len(pushes) == 1) == (not exact)


def test_source_is_closed_when_the_backend_fails_to_close(assets: dict[str, Path]) -> None:
    from avatar.demo import speechlike_audio
    from avatar.plugins import get_plugin_manager

    pm = get_plugin_manager()
    closed: list[str] = []

    class BadClose(pm.backend_class("cpu")):  # type: ignore[misc]
        def close(self) -> None:
            super().close()
            raise RuntimeError("device lost")

    class Source(type(pm.feature_source("ave", encoder=str(assets["enc"])))):  # type: ignore[misc]
        def close(self) -> None:
            closed.append("source")
            super().close()

    with pytest.raises(RuntimeError, match="device lost"):
        renderer(assets, [Keep()], source=Source(encoder=str(assets["enc"])), backend=BadClose(assets["unet"])).run(
            speechlike_audio(0.4)
        )
    assert closed == ["source"]


def test_a_frame_limit_ends_a_render_of_audio_longer_than_the_held_audio(assets: dict[str, Path]) -> None:
    """The feeder holds audio back while the features lag; a frame limit ends the features early."""
    import threading

    from avatar.demo import speechlike_audio

    sink = Keep()
    reports: list[Any] = []
    t = threading.Thread(target=lambda: reports.append(renderer(assets, [sink], frame_limit=5).run(speechlike_audio(6.0))),
                         daemon=True)
    t.start()
    t.join(120)
    assert not t.is_alive(), "the render did not end"
    assert reports[0].frames == len(sink.frames) == 5
