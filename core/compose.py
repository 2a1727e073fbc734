"""The composition root: how a render and a live service build their parts (one copy, below both).

:func:`avatar.render.render` and :class:`avatar.engine.AvatarService` both get
their backend, feature source (with the package's padding and audio-encoder
defaults), sinks and model batch from here, so an offline render and a live
session of the same avatar are built the same way. Nothing here imports the
engine.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from .contract import ModelContract
from .errors import BackendUnavailable, ConfigError
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


def feature_options_for(package: Any, features: str, options: Mapping[str, Any] | None, feature_type: str) -> dict[str, Any]:
    """``options`` completed with the package's defaults: its recorded padding and (``ave``) its audio encoder."""
    opts = dict(options or {})
    if not opts.get("padding"):
        padding = package_padding(package, feature_type)
        if padding:
            opts["padding"] = padding
    if features == "ave" and not opts.get("encoder"):
        enc = getattr(package, "audio_encoder_path", None)
        if enc is None:
            raise ConfigError(
                "the ave feature source needs an audio-encoder model: pass --ave-encoder ENCODER.onnx "
                "(feature_options={'encoder': ...}; made by `avatar export audio-encoder` or "
                "`avatar make-test-model --kind audio-encoder`)"
            )
        opts["encoder"] = str(enc)
    return opts


def feature_source_for(
    package: Any, features: str | FeatureSource, options: Mapping[str, Any] | None, feature_type: str
) -> FeatureSource:
    """The feature source a render or a session of ``package`` uses (an instance passes through)."""
    if isinstance(features, FeatureSource):
        return features
    return make_feature_source(features, feature_options_for(package, features, options, feature_type))


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


def model_batch(contract: ModelContract, requested: int) -> int:
    """The batch the model runs at: a fixed-batch model's own (partial batches are padded), else ``requested``."""
    if requested < 1:
        raise ConfigError("batch size must be at least 1")
    fixed = contract.fixed_batch
    if fixed is not None and fixed != requested:
        log.info("the model %s has a fixed batch of %d: running at %d (not %d); partial batches are padded",
                 contract.path.name, fixed, fixed, requested)
        return fixed
    return requested


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
