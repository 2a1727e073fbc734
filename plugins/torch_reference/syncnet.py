"""An optional SyncNet: does this mouth go with this audio window?

Trained beside the generator on real frames with positive pairs (the frame's
own window) AND negative pairs (the window of a frame at least half a second
away) — the negatives are what upstream's SyncNet training lacks, and without
them the "sync" score learns nothing. The generator is then pushed to make
mouths the SyncNet accepts for the true audio.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from avatar.train.data import MOUTH_COLS, MOUTH_ROWS, TrainData


class SyncNet(nn.Module):
    """Mouth crop [B,3,150,180] and audio window → a sync logit."""

    def __init__(self, audio_channels: int) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Module:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.face = nn.Sequential(block(3, 16), block(16, 32), block(32, 64), block(64, 64),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 128))
        self.audio = nn.Sequential(block(audio_channels, 64), block(64, 64),
                                   nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 128))

    def forward(self, mouth: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        f = F.normalize(self.face(mouth), dim=1)
        a = F.normalize(self.audio(audio), dim=1)
        return 5.0 * (f * a).sum(dim=1)  # scaled cosine similarity as a logit


def _mouth(faces: torch.Tensor) -> torch.Tensor:
    return faces[:, :, MOUTH_ROWS, MOUTH_COLS]


class SyncTrainer:
    def __init__(self, torch_mod: Any, data: TrainData, device: Any, *, lr: float, rng: np.random.Generator) -> None:
        self.data, self.device, self.rng = data, device, rng
        self.net = SyncNet(data.windows.shape[1]).to(device)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        self.min_shift = max(2, int(round(0.5 * 25)))

    def state(self) -> dict[str, Any]:
        return {"net": self.net.state_dict(), "opt": self.opt.state_dict()}

    def load(self, s: dict[str, Any]) -> None:
        self.net.load_state_dict(s["net"])
        self.opt.load_state_dict(s["opt"])

    def _negatives(self, idx: np.ndarray) -> np.ndarray:
        n = len(self.data.windows)
        off = self.rng.integers(self.min_shift, max(self.min_shift + 1, n // 2), size=len(idx))
        sign = np.where(self.rng.random(len(idx)) < 0.5, -1, 1)
        return np.mod(idx + sign * off, n)

    def train_step(self, idx: np.ndarray) -> float:
        """One step on real mouths: half the pairs true, half shifted."""
        faces = torch.from_numpy(np.asarray(self.data.faces[idx])).to(self.device).permute(0, 3, 1, 2).float() / 255
        pos = torch.from_numpy(self.data.windows[idx]).to(self.device)
        neg = torch.from_numpy(self.data.windows[self._negatives(idx)]).to(self.device)
        self.net.train()
        logits = torch.cat([self.net(_mouth(faces), pos), self.net(_mouth(faces), neg)])
        labels = torch.cat([torch.ones(len(idx)), torch.zeros(len(idx))]).to(self.device)
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return float(loss.detach())

    def generator_loss(self, out: torch.Tensor, audio: torch.Tensor, autocast: dict[str, Any]) -> torch.Tensor:
        """How far the generated mouths are from being judged in sync (SyncNet frozen for this term)."""
        self.net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        try:
            logits = self.net(_mouth(out), audio)
        finally:
            for p in self.net.parameters():
                p.requires_grad_(True)
        return F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
