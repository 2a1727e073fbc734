"""Fixtures shared by the whole suite.

Real data lives beside the repository in ``../shared/data`` (never copied in);
tests that need it skip when it is absent.
"""

from __future__ import annotations

import os
import signal
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("AVATAR_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real test data not present: {path}")
    return path


@pytest.fixture(scope="session", autouse=True)
def _ctrl_c_as_from_a_terminal() -> Any:
    """Run the tests with Python's own SIGINT handler even when the runner was started with SIGINT ignored
    (a background job of a non-interactive shell, ``nohup``): the signal tests send Ctrl-C to this process's
    children and check handlers against Python's default, and a child inherits an ignored SIGINT."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


@pytest.fixture(autouse=True)
def _signal_handlers_left_as_found(request: pytest.FixtureRequest) -> Any:
    """A test that leaves SIGINT/SIGTERM handlers changed (a library it drove, e.g. a framework's process
    start or a cluster's driver, may install its own) gets them put back, with a warning that names it:
    a later test, or a child process it starts, would otherwise inherit them (an ignored SIGINT)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in before.items():
        now = signal.getsignal(sig)
        if now is not handler and handler is not None:
            signal.signal(sig, handler)
            warnings.warn(f"{request.node.nodeid} left the {sig.name} handler changed ({now!r}); put back",
                          stacklevel=1)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _need(SHARED_DATA)


@pytest.fixture(scope="session")
def sanders_dir() -> Path:
    """The real 523-frame SyncTalk_2D dataset (full_body_img/, landmarks/, aud_ave.npy)."""
    return _need(SHARED_DATA / "sanders")


@pytest.fixture(scope="session")
def talk_wav() -> Path:
    """44.9 s of real speech, 16 kHz mono PCM16."""
    return _need(SHARED_DATA / "audio" / "talk_hb.wav")


@pytest.fixture(scope="session")
def silence_wav() -> Path:
    return _need(SHARED_DATA / "audio" / "silence_20s.wav")


class SessionLog:
    """Every ONNX Runtime session made while a test runs: (model file name, intra-op threads).

    The sessions stay real; the log only notes what they were given.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import onnxruntime

        real = onnxruntime.InferenceSession
        self.seen: list[tuple[str, int]] = []
        self.providers: list[Any] = []  # the providers argument of each session, as given
        log = self

        class Recording(real):  # type: ignore[misc,valid-type]
            def __init__(self, path, sess_options=None, *args, **kwargs):  # type: ignore[no-untyped-def]
                name = "<bytes>" if isinstance(path, (bytes, bytearray)) else Path(str(path)).name
                log.seen.append((name, sess_options.intra_op_num_threads if sess_options else 0))
                log.providers.append(kwargs.get("providers"))
                super().__init__(path, sess_options, *args, **kwargs)

        monkeypatch.setattr(onnxruntime, "InferenceSession", Recording)


@pytest.fixture
def ort_sessions(monkeypatch: pytest.MonkeyPatch) -> SessionLog:
    """A :class:`SessionLog` for this test."""
    return SessionLog(monkeypatch)



@pytest.fixture(scope="session")
def small_render_kit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """What a quick real render needs: an 8-frame 320x240 package, tiny seeded models, 6 s of speech-like WAV."""
    from avatar.demo import speechlike_audio, synthetic_frames, write_wav
    from avatar.models.synthetic import make_audio_encoder, make_unet
    from avatar.package import write_package

    d = tmp_path_factory.mktemp("render-kit")
    frames, boxes = synthetic_frames(8, width=320, height=240)
    kit = {
        "avatar": write_package(d / "pkg", iter(frames), boxes, fps=25, name="kit"),
        "unet": make_unet(d / "unet.onnx", mode="ave", seed=1, tiny=True),
        "encoder": make_audio_encoder(d / "enc.onnx", seed=1, tiny=True),
        "wav": d / "speech.wav",
    }
    write_wav(kit["wav"], speechlike_audio(6.0, seed=1))
    return kit


@pytest.fixture(scope="session")
def tiny_job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small render job made locally: a 160x128 avatar package, tiny seeded models, short and long speech."""
    from avatar.demo import speechlike_audio, synthetic_frames, write_wav
    from avatar.models.synthetic import make_audio_encoder, make_unet
    from avatar.package import write_package

    tmp = tmp_path_factory.mktemp("tiny-job")
    frames, boxes = synthetic_frames(6, width=160, height=128)
    pkg = write_package(tmp / "pkg", iter(frames), boxes, fps=25, name="t")
    write_wav(tmp / "short.wav", speechlike_audio(0.4))
    write_wav(tmp / "long.wav", speechlike_audio(3.0))
    return {
        "pkg": pkg,
        "short": tmp / "short.wav",
        "long": tmp / "long.wav",
        "unet": make_unet(tmp / "u.onnx", tiny=True),
        "enc": make_audio_encoder(tmp / "e.onnx", tiny=True),
    }
