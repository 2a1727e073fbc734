"""The training loop: batches, losses, held-out PSNR, checkpoints, Ctrl-C.

Model-family semantics: input = [a random other training frame's face, the
masked face], target = the frame's face, audio = the frame's window. Loss =
L1 with extra weight on the mouth box, plus (optionally) a SyncNet term.
bf16 autocast on CPU, CUDA when present. Every random draw comes from
generators whose state is in the checkpoint, so a resumed run repeats the
loss curve of an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from avatar.errors import ConfigError, Interrupted
from avatar.train.data import MOUTH_COLS, MOUTH_ROWS, TrainData, face_psnr

log = logging.getLogger(__name__)

CHECKPOINT = "last.pt"


@dataclass
class TrainConfig:
    """Everything that shapes the run (a resumed run must agree on all but ``steps`` / ``minutes``)."""

    steps: int = 20000
    batch: int = 8
    lr: float = 1e-3
    anneal: float = 0.3
    mouth_weight: float = 2.0
    syncnet_weight: float = 0.0
    perceptual_weight: float = 0.0
    vgg_weights: str | None = None
    tiny: bool = False
    seed: int = 0
    checkpoint_every: int = 500
    eval_every: int = 250
    eval_frames: int = 32
    minutes: float | None = None
    device: str = "auto"

    def fingerprint(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("steps", "minutes", "checkpoint_every", "eval_every", "device", "vgg_weights"):
            d.pop(k)
        return d


@dataclass
class Progress:
    step: int
    steps: int
    loss: float
    psnr: float | None
    seconds: float


@dataclass
class RunResult:
    model: Any
    steps: int
    losses: list[float] = field(default_factory=list)
    psnr: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    stopped: str = "steps"  # steps | time


def _device(torch: Any, name: str) -> Any:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is usable")
    return dev


def build_unet(mode: str, tiny: bool) -> Any:
    """The reference UNet-328 (:mod:`.networks`), full width or a quarter as wide (``tiny``)."""
    from .networks import CHANNELS, TINY_CHANNELS, UNet328

    return UNet328(mode, channels=TINY_CHANNELS if tiny else CHANNELS)


def _mask(torch: Any) -> Any:
    """Where the SDK's own masking (``vision.mask_face``) blacks the face out, as a [1,1,320,320] tensor."""
    from avatar import vision

    m = vision.mask_face(np.full((320, 320, 3), 255, np.uint8))[..., 0] == 0
    return torch.from_numpy(m)[None, None]


class Trainer:
    """One run: the network, its optimiser and the random state, saved and restored together."""

    def __init__(self, data: TrainData, config: TrainConfig, checkpoint_dir: Path) -> None:
        from .checkpoints import require_torch

        torch = require_torch("avatar train")
        self.torch, self.data, self.config = torch, data, config
        self.dir = Path(checkpoint_dir)
        self.device = _device(torch, config.device)
        torch.manual_seed(config.seed)
        self.model = build_unet(data.mode, config.tiny).to(self.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=config.lr)
        self.rng = np.random.default_rng(config.seed)
        self.step = 0
        self.losses: list[float] = []
        self.psnr: list[tuple[int, float]] = []
        self.mask = _mask(torch).to(self.device)
        w = torch.ones(1, 1, 320, 320)
        w[..., MOUTH_ROWS, MOUTH_COLS] += config.mouth_weight
        self.weight = (w / w.mean()).to(self.device)
        self.sync = None
        if config.syncnet_weight > 0:
            from .syncnet import SyncTrainer

            self.sync = SyncTrainer(torch, data, self.device, lr=config.lr, rng=self.rng)
        self.perceptual = None
        if config.perceptual_weight > 0:
            if not config.vgg_weights:
                raise ConfigError("a perceptual loss needs VGG19 weights: pass --vgg-weights FILE "
                                  "(torchvision's vgg19 state dict)")
            from .perceptual import PerceptualLoss, load_vgg_weights

            self.perceptual = PerceptualLoss(load_vgg_weights(config.vgg_weights)).to(self.device)
        cpu_bf16 = self.device.type == "cpu"
        self.autocast = dict(device_type=self.device.type, dtype=torch.bfloat16, enabled=cpu_bf16 or (
            self.device.type == "cuda" and torch.cuda.is_bf16_supported()))

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "opt": self.opt.state_dict(), "step": self.step,
            "rng": self.rng.bit_generator.state, "torch_rng": self.torch.get_rng_state(),
            "losses": self.losses, "psnr": self.psnr, "config": self.config.fingerprint(),
            "data": {"mode": self.data.mode, "features": self.data.features, "padding": self.data.padding,
                     "train": [int(self.data.train[0]), int(self.data.train[-1]), len(self.data.train)],
                     "held_out": [int(self.data.held_out[0]), int(self.data.held_out[-1])]},
            "sync": self.sync.state() if self.sync else None,
        }

    def save(self) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / CHECKPOINT
        tmp = path.with_name(path.name + ".partial")
        self.torch.save(self.state(), tmp)
        os.replace(tmp, path)
        return path

    def resume(self) -> None:
        path = self.dir / CHECKPOINT
        if not path.is_file():
            raise ConfigError(f"nothing to resume: {path} does not exist (train without --resume first)")
        try:
            s = self.torch.load(path, map_location=self.device, weights_only=False)
        except Exception as exc:  # a truncated or foreign file: one line, not a traceback
            raise ConfigError(f"cannot read the checkpoint {path}: {exc}") from None
        mine = self.state()
        diff = [k for k in mine["config"] if s["config"].get(k) != mine["config"][k]]
        diff += [f"data.{k}" for k in mine["data"] if s["data"].get(k) != mine["data"][k]]
        if diff:
            raise ConfigError(f"{path} was made with other settings ({', '.join(diff)}); "
                              "resume with the same ones or start a new run (another --checkpoint-dir)")
        self.model.load_state_dict(s["model"])
        self.opt.load_state_dict(s["opt"])
        self.step, self.losses, self.psnr = int(s["step"]), list(s["losses"]), [tuple(p) for p in s["psnr"]]
        self.rng.bit_generator.state = s["rng"]
        self.torch.set_rng_state(s["torch_rng"])
        if self.sync and s.get("sync"):
            self.sync.load(s["sync"])
        log.info("resumed %s at step %d", path, self.step)

    # ------------------------------------------------------------------ batches
    def _tensor(self, faces: np.ndarray) -> Any:
        t = self.torch.from_numpy(np.ascontiguousarray(faces)).to(self.device)
        return t.permute(0, 3, 1, 2).float().div_(255.0)

    def batch(self) -> tuple[Any, Any, Any, np.ndarray]:
        d = self.data
        idx = self.rng.choice(d.train, size=self.config.batch, replace=len(d.train) < self.config.batch)
        ref = self.rng.choice(d.train, size=len(idx))
        same = ref == idx  # "a random other frame"
        ref[same] = d.train[(np.searchsorted(d.train, ref[same]) + 1) % len(d.train)]
        target = self._tensor(d.faces[idx])
        reference = self._tensor(d.faces[ref])
        visual = self.torch.cat([reference, target.masked_fill(self.mask, 0.0)], dim=1)
        audio = self.torch.from_numpy(d.windows[idx]).to(self.device)
        return visual, audio, target, idx

    def set_lr(self, progress: float) -> float:
        """The learning rate at ``progress`` (0..1) through the run: ``lr`` held, then over the last ``anneal``
        of the run a cosine down to 5 % of it (the last steps settle instead of jumping around a minimum)."""
        import math

        cfg = self.config
        start = 1.0 - cfg.anneal
        t = 0.0 if cfg.anneal <= 0 or progress <= start else min(1.0, (progress - start) / cfg.anneal)
        lr = cfg.lr * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * t)))
        for group in self.opt.param_groups:
            group["lr"] = lr
        return lr

    def train_step(self) -> float:
        visual, audio, target, idx = self.batch()
        self.model.train()
        with self.torch.autocast(**self.autocast):
            out = self.model(visual, audio)
        out = out.float()
        loss = ((out - target).abs() * self.weight).mean()
        if self.perceptual is not None:
            loss = loss + self.config.perceptual_weight * self.perceptual(out, target, self.autocast)
        if self.sync is not None:
            self.sync.train_step(idx)
            loss = loss + self.config.syncnet_weight * self.sync.generator_loss(out, audio, self.autocast)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step += 1
        value = float(loss.detach())
        self.losses.append(value)
        return value

    def predict(self, indices: np.ndarray, shift: int = 0) -> np.ndarray:
        """uint8 faces for ``indices`` as inference makes them (reference = the frame itself)."""
        torch, d = self.torch, self.data
        self.model.eval()
        out = []
        with torch.no_grad():
            for k in range(0, len(indices), 8):
                ids = indices[k:k + 8]
                face = self._tensor(d.faces[ids])
                visual = torch.cat([face, face.masked_fill(self.mask, 0.0)], dim=1)
                audio = torch.from_numpy(d.windows[np.clip(ids + shift, 0, len(d.windows) - 1)]).to(self.device)
                with torch.autocast(**self.autocast):
                    y = self.model(visual, audio).float()
                out.append((y.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy())
        return np.concatenate(out)

    def evaluate(self) -> float:
        held = self.data.held_out
        pick = held[np.linspace(0, len(held) - 1, min(len(held), self.config.eval_frames)).astype(int)]
        value = face_psnr(self.predict(pick), np.asarray(self.data.faces[pick]))
        self.psnr.append((self.step, value))
        return value

    # ------------------------------------------------------------------ the run
    def run(self, on_progress: Callable[[Progress], None] | None = None) -> RunResult:
        """Train to ``config.steps`` (or the time budget); Ctrl-C/SIGTERM save a checkpoint and raise Interrupted."""
        cfg = self.config
        stop: list[int] = []

        def handler(signum: int, frame: Any) -> None:
            stop.append(signum)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        start = time.monotonic()
        stopped = "steps"
        try:
            while self.step < cfg.steps:
                progress = self.step / cfg.steps
                if cfg.minutes is not None:  # a time budget: whichever of steps and time runs out first
                    progress = max(progress, (time.monotonic() - start) / (cfg.minutes * 60))
                self.set_lr(progress)
                loss = self.train_step()
                psnr = None
                if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                    psnr = self.evaluate()
                if self.step % cfg.checkpoint_every == 0:
                    self.save()
                if on_progress:
                    on_progress(Progress(self.step, cfg.steps, loss, psnr, time.monotonic() - start))
                if stop:
                    break
                if cfg.minutes is not None and time.monotonic() - start >= cfg.minutes * 60:
                    stopped = "time"
                    break
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        if stop:
            path = self.save()
            log.warning("interrupted at step %d; checkpoint saved to %s (continue with --resume)", self.step, path)
            raise Interrupted(stop[0])
        if not self.psnr or self.psnr[-1][0] != self.step:
            self.evaluate()
        self.save()
        return RunResult(self.model, self.step, self.losses, self.psnr, time.monotonic() - start, stopped)


def train_avatar(
    avatar_dir: str | Path,
    output: str | Path,
    *,
    features: str = "ave",
    feature_options: dict[str, Any] | None = None,
    config: TrainConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    holdout: float = 0.05,
    holdout_start: int | None = None,
    frames: int | None = None,
    allow_short: bool = False,
    install: bool = True,
    on_progress: Callable[[Progress], None] | None = None,
) -> dict[str, Any]:
    """Train a UNet-328 for the avatar at ``avatar_dir``, export it to ``output`` and gate it.

    With ``install`` the model (and the AVE encoder it was trained with) is
    written into the package, so ``avatar run --avatar DIR`` uses it. Returns
    the training record (also written beside ``output`` as ``<output>.json``).
    """
    import json

    from avatar.package import AvatarPackage
    from avatar.train import gate, install_model, load_data

    from .export import export_unet

    config = config or TrainConfig()
    output = Path(output)
    if output.suffix.lower() != ".onnx":
        raise ConfigError(f"the output must be an .onnx file, not {output.name}")
    ckpt = Path(checkpoint_dir) if checkpoint_dir else output.with_suffix(".ckpt")
    with AvatarPackage.open(avatar_dir) as pkg:
        data = load_data(pkg, features=features, feature_options=feature_options, holdout=holdout,
                         holdout_start=holdout_start, frames=frames, allow_short=allow_short)
        trainer = Trainer(data, config, ckpt)
        if resume:
            trainer.resume()
        result = trainer.run(on_progress)
        output.parent.mkdir(parents=True, exist_ok=True)
        parity = export_unet(trainer.model.float().cpu().eval(), data.mode, output)
        if parity is not None and not parity.ok:
            raise ConfigError(f"the exported {output.name} does not reproduce PyTorch: {parity}")
        record: dict[str, Any] = {
            "avatar": str(Path(avatar_dir).resolve()), "model": output.name, "mode": data.mode,
            "architecture": "UNet-328 (tiny: a quarter of the width)" if config.tiny else "UNet-328",
            "features": features, "padding": data.padding,
            "train_frames": [int(data.train[0]), int(data.train[-1]), len(data.train)],
            "excluded_frames": data.excluded, "steps": result.steps, "stopped": result.stopped,
            "seconds": round(result.seconds, 1), "device": str(trainer.device),
            "final_loss": round(float(np.mean(result.losses[-20:])), 5) if result.losses else None,
            "held_out_psnr_curve": [[s, round(p, 3)] for s, p in result.psnr],
            "config": asdict(config),
            "gate": gate(output, data, pkg.fps),
        }
        output.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
        if install:
            encoder = (feature_options or {}).get("encoder") if features == "ave" else None
            install_model(pkg.path, output, feature_type=data.mode, padding=data.padding,
                          audio_encoder=encoder, record=record)
    return record
