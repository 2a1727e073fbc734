"""An optional perceptual loss: VGG19 features of the output against the target's.

The model family adds it to the L1 loss when VGG weights are at hand: the
features up to ``conv3_3`` of an ImageNet VGG19 (layer 14 of torchvision's
``vgg19().features``), compared by mean squared error. No weights ship with the
SDK and none are downloaded: the user passes a file, ``--vgg-weights FILE`` —
torchvision's ``vgg19`` state dict as ``torch.save`` wrote it (keys
``features.N.weight``/``bias``; its classifier is ignored), or the same keys
without the ``features.`` prefix. The network here is built with the same layer
indices, so such a file loads as it is.

Faces are BGR in [0, 1] inside training; VGG wants RGB normalised with the
ImageNet mean and deviation, so both are converted first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from avatar.errors import ConfigError

#: VGG19's convolution widths up to conv3_3 ("M": a 2x2 max pool), in torchvision's layer order
_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256)
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


def vgg19_to_conv3_3() -> nn.Sequential:
    """VGG19's feature layers 0-14 (conv1_1 ... conv3_3, before its ReLU), torchvision's indices."""
    layers: list[nn.Module] = []
    cin = 3
    for width in _LAYERS:
        if width == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, int(width), 3, 1, 1), nn.ReLU(inplace=False)]
            cin = int(width)
    layers = layers[:-1]  # conv3_3 is compared before its ReLU (index 14)
    return nn.Sequential(*layers)


def load_vgg_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The conv3_3 part of a VGG19 state dict in ``path``, keyed as :func:`vgg19_to_conv3_3` names them."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, truncated, or pickled objects it will not load
        raise ConfigError(f"cannot read VGG weights from {path}: {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ConfigError(f"{path} holds a {type(state).__name__}, not a VGG19 state dict")
    want = vgg19_to_conv3_3().state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, ref in want.items():
        value = state.get(f"features.{key}", state.get(key))
        if not isinstance(value, torch.Tensor):
            raise ConfigError(f"{path} is not VGG19 weights: it has no features.{key} (torchvision's vgg19 "
                              "state dict is expected)")
        if tuple(value.shape) != tuple(ref.shape):
            raise ConfigError(f"{path} is not VGG19 weights: features.{key} is {tuple(value.shape)}, "
                              f"VGG19 has {tuple(ref.shape)}")
        out[key] = value.float()
    return out


class PerceptualLoss(nn.Module):
    """MSE between the VGG19 conv3_3 features of two BGR [B,3,H,W] batches in [0, 1]; frozen weights."""

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.features = vgg19_to_conv3_3()
        self.features.load_state_dict(weights)
        self.features.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1))

    def _embed(self, bgr: torch.Tensor) -> torch.Tensor:
        rgb = bgr.flip(1)
        return self.features((rgb - self.mean) / self.std)

    def forward(self, output: torch.Tensor, target: torch.Tensor, autocast: dict[str, Any]) -> torch.Tensor:
        with torch.autocast(**autocast):
            got = self._embed(output)
            with torch.no_grad():
                want = self._embed(target)
        return F.mse_loss(got.float(), want.float())
