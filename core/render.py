"""The Python API of the main job: :func:`render`.

``avatar run`` is a thin layer over this function.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from .compose import (
    SinkSpec,
    feature_source_for,
    make_feature_source,
    make_sinks,
    model_batch,
    open_backend,
    package_padding,
)
from .contract import check_feature_match, read_contract
from .framestore import DEFAULT_MEMORY_BUDGET_MB
from .engine import RenderOptions, RenderReport, Renderer
from .errors import ConfigError, Interrupted
from .interfaces import Backend, BackendOptions, FeatureSource

log = logging.getLogger(__name__)

__all__ = ["SinkSpec", "make_feature_source", "make_sinks", "open_backend", "package_padding", "render"]


class LentBackend(Backend):
    """A caller's loaded backend lent to one render: it runs it; closing it leaves it open."""

    def __init__(self, inner: Backend, model: str | Path) -> None:
        if Path(inner.model_path).resolve() != Path(model).resolve():
            raise ConfigError(f"the backend given runs {inner.model_path}, but the render needs {model}")
        super().__init__(inner.model_path, inner.options)
        self.inner = inner
        self.name = inner.name  # type: ignore[misc]

    @property
    def inputs(self) -> Sequence[Any]:
        return self.inner.inputs

    @property
    def outputs(self) -> Sequence[Any]:
        return self.inner.outputs

    def _run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.inner.run(feeds)




def render(
    avatar: str | Path | Any,
    audio: Any,
    *,
    sinks: SinkSpec | Sequence[SinkSpec],
    model: str | Path | None = None,
    features: str | FeatureSource = "ave",
    feature_options: Mapping[str, Any] | None = None,
    backend: str | Backend = "auto",
    backend_options: BackendOptions | None = None,
    batch_size: int = 8,
    progress: bool = False,
    frame_limit: int | None = None,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    output_rounding: str = "nearest",
    walk_start: int = 0,
    threads: Any = None,
) -> RenderReport:
    """Render a lip-synced video of ``avatar`` speaking ``audio``.

    :param avatar: an avatar package directory (see ``docs/avatar-package.md``)
        or an opened :class:`avatar.package.AvatarPackage`.
    :param audio: an audio file path (checked in one streaming pass, then
        decoded chunk by chunk as the render goes: memory does not grow with
        the file), a float32 16 kHz mono array, or an iterable of such chunks
        (live input).
    :param sinks: where frames go: a :class:`Sink`, a registered sink name, a
        ``(name, options)`` pair, or a list of those.
    :param model: the UNet-328 ONNX file; defaults to the package's model.
    :param features: feature source name (``ave``, ``npy``, ``hubert``, ``wenet``)
        or an instance. For ``ave`` the package's audio encoder is the default
        ``encoder`` option. The package's recorded window padding
        (``model.padding``) is the default ``padding`` option; an explicit
        ``feature_options["padding"]`` wins.
    :param backend: ``auto`` (the usable backend of highest ``priority``: onnx-cuda, else openvino with a gated reduced precision, else cpu), ``cpu``,
        ``onnx-cuda``, ``tensorrt`` or a plugin's; or a loaded :class:`Backend` of
        this model, lent to the render and left open (a batch worker renders
        many jobs on one loaded backend).
    :param memory_budget_mb: how much decoded avatar video may be held in
        memory; a longer avatar is decoded in keyframe chunks on demand.
    :param output_rounding: how the model's [0, 1] output becomes 8-bit pixels:
        ``nearest`` (default) or ``truncate`` (the specification's
        ``(x * 255).astype(uint8)``); see :func:`avatar.vision.output_to_uint8`.
    :param walk_start: the ping-pong walk position of output frame 0 (``1``
        is upstream SyncTalk_2D's start, for frame-by-frame comparison with it).
    :param threads: a thread budget for the model's backend, the audio encoder and
        OpenCV, as a live service's (:mod:`avatar.engine.threads`): ``"auto"``
        (planned for this machine and backend; ``avatar run`` uses it unless
        ``--threads`` is given), a :class:`~avatar.engine.threads.ThreadBudget`,
        or None (default: each library sizes its own pool). Options given
        explicitly (``BackendOptions.threads``, an encoder's ``threads``) win.
        OpenCV's pool is process-wide: a budget sets it for the process.
    :returns: the :class:`RenderReport` (frames, timings, sink reports).
    """
    from .package import AvatarPackage

    # a package opened here is closed here; one passed in stays the caller's
    owned = isinstance(avatar, (str, Path))
    package = AvatarPackage.open(avatar, memory_budget_mb=memory_budget_mb) if owned else avatar
    try:
        return _render(
            package, audio, sinks=sinks, model=model, features=features, feature_options=feature_options,
            backend=backend, backend_options=backend_options, batch_size=batch_size, threads=threads,
            options=RenderOptions(
                batch_size=batch_size, progress=progress, frame_limit=frame_limit, output_rounding=output_rounding,
                walk_start=walk_start,
            ),
        )  # fmt: skip
    finally:
        if owned:
            package.close()


def _render(
    package: Any,
    audio: Any,
    *,
    sinks: SinkSpec | Sequence[SinkSpec],
    model: str | Path | None,
    features: str | FeatureSource,
    feature_options: Mapping[str, Any] | None,
    backend: str | Backend,
    backend_options: BackendOptions | None,
    batch_size: int,
    options: RenderOptions,
    threads: Any = None,
) -> RenderReport:
    model_path = Path(model) if model is not None else getattr(package, "model_path", None)
    if model_path is None:
        raise ConfigError("no model given and the avatar package names none; pass --model MODEL.onnx")
    contract = read_contract(model_path)
    if options.frame_limit is not None and options.frame_limit < 1:
        raise ConfigError("frame_limit must be at least 1")
    from .vision import ROUNDINGS  # lazily: OpenCV

    if options.output_rounding not in ROUNDINGS:
        raise ConfigError(f"output_rounding must be one of {', '.join(ROUNDINGS)}, not {options.output_rounding!r}")
    batch_size = model_batch(contract, batch_size)  # a fixed-batch model runs at its batch, as in a live service
    options = replace(options, batch_size=batch_size)
    budget = None
    if threads is not None:
        from .engine.threads import resolve_budget

        budget = resolve_budget(threads, backend if isinstance(backend, str) else "")
        if isinstance(features, str):
            feature_options = budget.feature_options(features, feature_options)
        if isinstance(backend, str):
            backend_options = budget.backend_options(backend, backend_options or BackendOptions(max_batch=max(batch_size, 1)))
        budget.apply_process_wide()
    source = feature_source_for(package, features, feature_options, contract.feature_type)
    be: Backend | None = None
    try:
        # A signal while the audio decodes or the model loads is held and acted on after the
        # step: raised inside a C extension (PyAV's Cython, ONNX Runtime) it can be dropped.
        with _signals_held() as held:
            # cheap checks before the backend loads the model (a TensorRT build takes minutes)
            check_feature_match(contract, source.name, tuple(source.window_shape))
            audio = _open_audio(audio, source)
            held.check()
            sink_objs = make_sinks(sinks)
            bopts = backend_options or BackendOptions(max_batch=max(batch_size, 1))
            if isinstance(backend, Backend):
                be, used = LentBackend(backend, model_path), backend.name
            else:
                be, used = open_backend(backend, model_path, bopts)
            renderer = Renderer(package, be, contract, source, sink_objs, options, backend_name=used)
            held.check()
    except BaseException:
        if be is not None:
            be.close()
        source.close()
        raise
    report = renderer.run(audio)
    if budget is not None:
        report.threads = budget.to_dict()
    return report


class _Held:
    """Signals that arrived while held (SIGINT, SIGTERM), raised by :meth:`check`."""

    def __init__(self) -> None:
        self.signums: list[int] = []

    def __call__(self, signum: int, frame: object) -> None:
        self.signums.append(signum)

    def check(self) -> None:
        if self.signums:
            raise Interrupted(self.signums[0])


@contextlib.contextmanager
def _signals_held() -> Iterator[_Held]:
    """Hold SIGINT/SIGTERM (main thread only) for a block that may sit in C code; raise after it."""
    held = _Held()
    previous: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            handler = signal.getsignal(sig)
            if handler is signal.SIG_IGN:  # an inherited "ignore" (a background job) stays
                continue
            try:
                previous[sig] = signal.signal(sig, held)
            except (ValueError, OSError):  # pragma: no cover - embedded interpreters
                pass
    try:
        yield held
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    held.check()


def _open_audio(audio: Any, source: FeatureSource) -> Any:
    """A file checked now (a bad file fails before a model loads) and checked to cover one frame.

    For a source that streams exactly the file is scanned, not kept: the
    render decodes it again chunk by chunk (an :class:`~avatar.audio.AudioFile`),
    so memory does not grow with its length. A source that needs the whole
    signal at once (``exact_streaming`` False) gets it decoded. Arrays are
    checked as they are; live iterables pass through.
    """
    from .audio import check_one_frame, load_audio, scan_audio

    if isinstance(audio, (str, Path)):
        if getattr(source, "exact_streaming", True):
            audio = scan_audio(audio, sample_rate=source.sample_rate)
            check_one_frame(audio.samples, source.sample_rate, float(source.fps), audio.path.name)
            return audio
        name = Path(audio).name
        audio = load_audio(audio, sample_rate=source.sample_rate)
        check_one_frame(audio.reshape(-1), source.sample_rate, float(source.fps), name)
        return audio
    if isinstance(audio, np.ndarray):
        check_one_frame(audio.reshape(-1), source.sample_rate, float(source.fps), "the audio")
    return audio
