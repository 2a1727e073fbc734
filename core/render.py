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

from .contract import check_feature_match, read_contract
from .framestore import DEFAULT_MEMORY_BUDGET_MB
from .engine import RenderOptions, RenderReport, Renderer
from .errors import BackendUnavailable, ConfigError, Interrupted
from .interfaces import Backend, BackendOptions, FeatureSource, Sink
from .plugins import get_plugin_manager

log = logging.getLogger(__name__)

SinkSpec = Sink | str | tuple[str, Mapping[str, Any]]


def open_backend(name: str, model: str | Path, options: BackendOptions | None = None) -> tuple[Backend, str]:
    """Load ``model`` on backend ``name``; ``auto`` tries backends by declared priority.

    ``auto`` takes the usable backend with the highest ``priority`` class attribute
    that loads the model (onnx-cuda 100, cpu 10; None: never chosen by auto) and
    logs which one and why. Returns the backend and the name actually used.
    """
    pm = get_plugin_manager()
    options = options or BackendOptions()
    if name != "auto":
        return pm.backend_class(name)(model, options), name
    skipped: list[str] = []
    for reg in pm.auto_backends():
        prio = reg.obj.priority  # type: ignore[attr-defined]
        avail = reg.availability()
        if not avail.usable:
            skipped.append(f"{reg.name} (priority {prio}): {avail.reason}")
            continue
        try:
            # a backend may make its own choice of options under auto, or decline (openvino: no passing gate)
            opener, opts = getattr(reg.obj, "open_auto", None), options
            if opener is None:
                opener = reg.obj
                if options.precision == "auto":  # a backend without a choice of its own runs auto as fp32
                    opts = replace(options, precision="fp32")
            backend = opener(model, opts)
        except BackendUnavailable as exc:
            skipped.append(f"{reg.name} (priority {prio}): {exc}")
            continue
        why = f"; skipped {'; '.join(skipped)}" if skipped else ""
        log.info("backend auto: chose %s, the usable backend of highest priority (%s)%s", reg.name, prio, why)
        return backend, reg.name  # type: ignore[return-value]
    tried = "; ".join(skipped) or "no backend declares a priority"
    raise BackendUnavailable(f"no usable backend for --backend auto ({tried}); name one with --backend")


def make_feature_source(name: str, options: Mapping[str, Any] | None = None) -> FeatureSource:
    """Instantiate a registered feature source with its options."""
    return get_plugin_manager().feature_source(name, **dict(options or {}))


def make_sinks(specs: SinkSpec | Sequence[SinkSpec]) -> list[Sink]:
    """Sink instances from instances, names, or ``(name, options)`` pairs."""
    if isinstance(specs, (Sink, str, tuple)):
        specs = [specs]  # type: ignore[list-item]
    pm = get_plugin_manager()
    out: list[Sink] = []
    for spec in specs:  # type: ignore[union-attr]
        if isinstance(spec, Sink):
            out.append(spec)
        elif isinstance(spec, str):
            out.append(pm.sink(spec))
        elif isinstance(spec, tuple) and len(spec) == 2:
            out.append(pm.sink(spec[0], **dict(spec[1])))
        else:
            raise ConfigError(f"a sink must be a Sink, a name, or (name, options); got {spec!r}")
    if not out:
        raise ConfigError("at least one sink is needed")
    return out


def render(
    avatar: str | Path | Any,
    audio: Any,
    *,
    sinks: SinkSpec | Sequence[SinkSpec],
    model: str | Path | None = None,
    features: str | FeatureSource = "ave",
    feature_options: Mapping[str, Any] | None = None,
    backend: str = "auto",
    backend_options: BackendOptions | None = None,
    batch_size: int = 8,
    progress: bool = False,
    frame_limit: int | None = None,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    output_rounding: str = "nearest",
    walk_start: int = 0,
) -> RenderReport:
    """Render a lip-synced video of ``avatar`` speaking ``audio``.

    :param avatar: an avatar package directory (see ``docs/avatar-package.md``)
        or an opened :class:`avatar.package.AvatarPackage`.
    :param audio: an audio file path, a float32 16 kHz mono array, or an
        iterable of such chunks (live input).
    :param sinks: where frames go: a :class:`Sink`, a registered sink name, a
        ``(name, options)`` pair, or a list of those.
    :param model: the UNet-328 ONNX file; defaults to the package's model.
    :param features: feature source name (``ave``, ``npy``, ``hubert``, ``wenet``)
        or an instance. For ``ave`` the package's audio encoder is the default
        ``encoder`` option. The package's recorded window padding
        (``model.padding``) is the default ``padding`` option; an explicit
        ``feature_options["padding"]`` wins.
    :param backend: ``auto`` (the usable backend of highest ``priority``: onnx-cuda, else openvino with a gated reduced precision, else cpu), ``cpu``,
        ``onnx-cuda``, ``tensorrt`` or a plugin's.
    :param memory_budget_mb: how much decoded avatar video may be held in
        memory; a longer avatar is decoded in keyframe chunks on demand.
    :param output_rounding: how the model's [0, 1] output becomes 8-bit pixels:
        ``nearest`` (default) or ``truncate`` (the specification's
        ``(x * 255).astype(uint8)``); see :func:`avatar.vision.output_to_uint8`.
    :param walk_start: the ping-pong walk position of output frame 0 (``1``
        is upstream SyncTalk_2D's start, for frame-by-frame comparison with it).
    :returns: the :class:`RenderReport` (frames, timings, sink reports).
    """
    from .package import AvatarPackage

    # a package opened here is closed here; one passed in stays the caller's
    owned = isinstance(avatar, (str, Path))
    package = AvatarPackage.open(avatar, memory_budget_mb=memory_budget_mb) if owned else avatar
    try:
        return _render(
            package, audio, sinks=sinks, model=model, features=features, feature_options=feature_options,
            backend=backend, backend_options=backend_options, batch_size=batch_size,
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
    backend: str,
    backend_options: BackendOptions | None,
    batch_size: int,
    options: RenderOptions,
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
    if contract.fixed_batch is not None and batch_size != contract.fixed_batch:
        raise ConfigError(
            f"the model has a fixed batch of {contract.fixed_batch}; use --batch {contract.fixed_batch} "
            "or export it with a dynamic batch axis"
        )
    if isinstance(features, FeatureSource):
        source = features
    else:
        opts = dict(feature_options or {})
        if not opts.get("padding"):
            padding = package_padding(package, contract.feature_type)
            if padding:
                opts["padding"] = padding
        if features == "ave" and not opts.get("encoder"):
            enc = getattr(package, "audio_encoder_path", None)
            if enc is None:
                raise ConfigError(
                    "the ave feature source needs an audio-encoder model: pass --ave-encoder ENCODER.onnx "
                    "(made by `avatar export audio-encoder` or `avatar make-test-model --kind audio-encoder`)"
                )
            opts["encoder"] = str(enc)
        source = make_feature_source(features, opts)
    be: Backend | None = None
    try:
        # A signal while the audio decodes or the model loads is held and acted on after the
        # step: raised inside a C extension (PyAV's Cython, ONNX Runtime) it can be dropped.
        with _signals_held() as held:
            # cheap checks before the backend loads the model (a TensorRT build takes minutes)
            check_feature_match(contract, source.name, tuple(source.window_shape))
            audio = _whole_audio(audio, source)
            held.check()
            sink_objs = make_sinks(sinks)
            bopts = backend_options or BackendOptions(max_batch=max(batch_size, 1))
            be, used = open_backend(backend, model_path, bopts)
            renderer = Renderer(package, be, contract, source, sink_objs, options, backend_name=used)
            held.check()
    except BaseException:
        if be is not None:
            be.close()
        source.close()
        raise
    return renderer.run(audio)


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


def _whole_audio(audio: Any, source: FeatureSource) -> Any:
    """A file decoded now (a bad file fails before a model loads), checked to cover one frame.

    Arrays are checked as they are; live iterables pass through.
    """
    from .audio import check_one_frame, load_audio

    name = "the audio"
    if isinstance(audio, (str, Path)):
        name = Path(audio).name
        audio = load_audio(audio, sample_rate=source.sample_rate)
    if isinstance(audio, np.ndarray):
        check_one_frame(audio.reshape(-1), source.sample_rate, float(source.fps), name)
    return audio


def package_padding(package: Any, feature_type: str) -> str | None:
    """The audio window padding the package records for its model, if it applies to ``feature_type``.

    A model is trained with one edge padding; using the other changes the first
    and last frames of every render. The record describes the package's model,
    so it is not applied to a model of another feature type.
    """
    manifest = getattr(package, "manifest", None)
    padding = getattr(manifest, "padding", None)
    recorded_type = getattr(manifest, "feature_type", None)
    if padding and recorded_type and recorded_type != feature_type:
        log.info("the package's padding %r is for its %s model, not this %s model; not used",
                 padding, recorded_type, feature_type)  # fmt: skip
        return None
    return padding
