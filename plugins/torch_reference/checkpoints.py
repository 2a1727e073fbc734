"""Load SyncTalk_2D checkpoints into the reference networks, with clear errors.

A SyncTalk_2D training run writes ``checkpoint/<name>/<epoch>.pth``: a plain
``state_dict`` of ``unet_328.Model``. Other tools wrap it (``{"state_dict": ...}``,
``{"model": ...}``) or save it from ``nn.DataParallel`` (``module.`` prefix). The
AVE encoder's public checkpoint (``audio_visual_encoder.pth``) stores its keys
without the ``audio_encoder.`` prefix that the module uses. All of these load.

Files are read with ``weights_only=True``: a checkpoint is data, and unpickling
arbitrary objects from a downloaded file would run arbitrary code.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

from avatar.errors import ConfigError, MissingDependency, ModelError

log = logging.getLogger(__name__)

#: keys under which training scripts commonly nest the real state dict
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "params", "weights", "generator", "ema")

#: the first weight of the UNet's audio branch; its input width tells the mode
AUDIO_PROBE_KEY = "audio_model.conv1.conv.0.weight"
ENCODER_PREFIX = "audio_encoder."


def require_torch(feature: str = "PyTorch checkpoint export") -> Any:
    """Import torch, or raise the one-line install hint."""
    try:
        import torch
    except ModuleNotFoundError as exc:
        raise MissingDependency("torch", "torch", feature=feature) from exc
    return torch


def read_state_dict(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint file and return the flat tensor state dict inside it."""
    torch = require_torch()
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip/torch raise many unrelated types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ModelError(
            f"cannot read {path} as a PyTorch state dict ({first}); it must be a file written by "
            "torch.save(model.state_dict(), ...) - re-save a pickled whole model that way"
        ) from exc
    return unwrap_state_dict(obj, source=str(path))


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, Any]:
    """Find the tensor dict in ``obj`` (plain, wrapped under a common key, or DataParallel)."""
    torch = require_torch()
    for _ in range(3):  # wrappers nest at most a couple of levels in practice
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise ModelError(f"{source} holds no state dict (found {type(obj).__name__})")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelError(
            f"{source} holds no tensors at the top level or under {', '.join(WRAPPER_KEYS)}; "
            f"its keys are {', '.join(map(str, list(obj)[:5]))}"
        )
    if all(k.startswith("module.") for k in tensors):  # saved from nn.DataParallel
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def detect_unet_mode(state: Mapping[str, Any]) -> str | None:
    """``"wenet"``, ``"ave/hubert"`` (indistinguishable by shapes), or None if not a UNet-328."""
    w = state.get(AUDIO_PROBE_KEY)
    if w is None or getattr(w, "ndim", 0) != 4:
        return None
    return {256: "wenet", 32: "ave/hubert"}.get(int(w.shape[1]))


def _is_encoder(state: Mapping[str, Any]) -> bool:
    return any(k.startswith(ENCODER_PREFIX) or k.startswith("0.conv_block.") for k in state)


def _key_report(missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if keys:
            more = f" (+{len(keys) - 4} more)" if len(keys) > 4 else ""
            parts.append(f"{label}: {', '.join(keys[:4])}{more}")
    return "; ".join(parts)


def _load_strict(model: Any, state: Mapping[str, Any], what: str, hint: str) -> None:
    own = model.state_dict()
    # num_batches_tracked only drives the training-time momentum; some tools drop it
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        raise ModelError(f"the checkpoint does not fit {what}: {_key_report(missing, unexpected, shapes)}{hint}")
    model.load_state_dict(state, strict=False)


def load_unet_checkpoint(path: str | Path, mode: str = "ave") -> Any:
    """Load a SyncTalk_2D UNet-328 checkpoint into :class:`UNet328` (eval mode, CPU).

    ``mode`` must match the checkpoint's audio branch: a WeNet checkpoint has a
    256-wide first audio layer, AVE and HuBERT a 32-wide one (those two differ
    only in a stride, so no file can tell them apart: pick by the features the
    model was trained on).
    """
    from .networks import MODES

    if mode not in MODES:
        raise ConfigError(f"unknown audio mode {mode!r}; use one of {', '.join(MODES)}")
    state = read_state_dict(path)
    return unet_from_state_dict(state, mode, source=str(path))


def unet_from_state_dict(state: Mapping[str, Any], mode: str = "ave", source: str = "checkpoint") -> Any:
    """Build a :class:`UNet328` of ``mode`` from an in-memory state dict (tensors or arrays)."""
    from .networks import UNet328

    state = _as_tensors(state)
    found = detect_unet_mode(state)
    if found is None:
        kind = "an AVE audio-encoder checkpoint; export it with `avatar export audio-encoder`" if _is_encoder(state) \
            else f"not a UNet-328 checkpoint (no {AUDIO_PROBE_KEY})"
        raise ModelError(f"{source} is {kind}")
    if mode not in found.split("/"):
        raise ModelError(
            f"{source} is a {found} checkpoint ({AUDIO_PROBE_KEY} takes "
            f"{int(state[AUDIO_PROBE_KEY].shape[1])} channels) but mode {mode!r} was asked for; "
            f"use --mode {found.split('/')[0]}" + (" or --mode hubert" if found == "ave/hubert" else "")
        )
    model = UNet328(mode)
    hint = f" (the audio branch looks like {found})"
    _load_strict(model, state, f"UNet328(mode={mode!r})", hint)
    return model.eval()


def load_audio_encoder_checkpoint(path: str | Path) -> Any:
    """Load an AVE audio-encoder checkpoint (keys with or without ``audio_encoder.``)."""
    state = read_state_dict(path)
    return audio_encoder_from_state_dict(state, source=str(path))


def audio_encoder_from_state_dict(state: Mapping[str, Any], source: str = "checkpoint") -> Any:
    """Build an :class:`AudioEncoder` from an in-memory state dict (tensors or arrays)."""
    from .networks import AudioEncoder

    state = _as_tensors(state)
    if detect_unet_mode(state) is not None:
        raise ModelError(f"{source} is a UNet-328 checkpoint; export it with `avatar export unet`")
    if not any(k.startswith(ENCODER_PREFIX) for k in state):
        state = {ENCODER_PREFIX + k: v for k, v in state.items()}
    model = AudioEncoder()
    _load_strict(model, state, "the AVE AudioEncoder", "")
    return model.eval()


def _as_tensors(state: Mapping[str, Any]) -> dict[str, Any]:
    """Accept numpy arrays too (e.g. the torch-free synthetic builder's state dicts)."""
    torch = require_torch()
    return {k: v if isinstance(v, torch.Tensor) else torch.as_tensor(v) for k, v in state.items()}
