"""The Python API of the main job: :func:`render`.

``avatar run`` is a thin layer over this function.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .contract import check_feature_match, read_contract
from .engine import RenderOptions, RenderReport, Renderer
from .errors import BackendUnavailable, ConfigError
from .interfaces import Backend, BackendOptions, FeatureSource, Sink
from .plugins import get_plugin_manager

log = logging.getLogger(__name__)

SinkSpec = Sink | str | tuple[str, Mapping[str, Any]]


def open_backend(name: str, model: str | Path, options: BackendOptions | None = None) -> tuple[Backend, str]:
    """Load ``model`` on backend ``name``; ``auto`` tries ``onnx-cuda`` then ``cpu``.

    Returns the backend and the name actually used.
    """
    pm = get_plugin_manager()
    options = options or BackendOptions()
    if name == "auto":
        for candidate in ("onnx-cuda", "cpu"):
            reg = pm.components["backend"].get(candidate)
            if reg is None or not reg.availability().usable:
                continue
            try:
                return reg.obj(model, options), candidate  # type: ignore[call-arg,return-value]
            except BackendUnavailable as exc:
                log.info("backend %s not usable (%s); trying the next", candidate, exc)
        raise BackendUnavailable("no usable backend: neither onnx-cuda nor cpu could load the model")
    return pm.backend_class(name)(model, options), name


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
    memory_budget_mb: int = 512,
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
        ``encoder`` option.
    :param backend: ``auto`` (onnx-cuda when usable, else cpu), ``cpu``,
        ``onnx-cuda``, ``tensorrt`` or a plugin's.
    :param memory_budget_mb: how much decoded avatar video may be held in
        memory; a longer avatar is decoded in keyframe chunks on demand.
    :param walk_start: the ping-pong walk position of output frame 0 (``1``
        is upstream SyncTalk_2D's start, for frame-by-frame comparison with it).
    :returns: the :class:`RenderReport` (frames, timings, sink reports).
    """
    from .package import AvatarPackage

    package = (
        avatar if not isinstance(avatar, (str, Path)) else AvatarPackage.open(avatar, memory_budget_mb=memory_budget_mb)
    )
    model_path = Path(model) if model is not None else getattr(package, "model_path", None)
    if model_path is None:
        raise ConfigError("no model given and the avatar package names none; pass --model MODEL.onnx")
    contract = read_contract(model_path)
    if frame_limit is not None and frame_limit < 1:
        raise ConfigError("frame_limit must be at least 1")
    if contract.fixed_batch is not None and batch_size != contract.fixed_batch:
        raise ConfigError(
            f"the model has a fixed batch of {contract.fixed_batch}; use --batch {contract.fixed_batch} "
            "or export it with a dynamic batch axis"
        )
    if isinstance(features, FeatureSource):
        source = features
    else:
        opts = dict(feature_options or {})
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
        # cheap checks before the backend loads the model (a TensorRT build takes minutes)
        check_feature_match(contract, source.name, tuple(source.window_shape))
        sink_objs = make_sinks(sinks)
        options = backend_options or BackendOptions(max_batch=max(batch_size, 1))
        be, used = open_backend(backend, model_path, options)
        renderer = Renderer(
            package,
            be,
            contract,
            source,
            sink_objs,
            RenderOptions(batch_size=batch_size, progress=progress, frame_limit=frame_limit, walk_start=walk_start),
            backend_name=used,
        )
    except BaseException:
        if be is not None:
            be.close()
        source.close()
        raise
    return renderer.run(audio)
