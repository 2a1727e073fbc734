"""PyTorch reference networks: the UNet-328 and the AVE audio encoder.

Both are state-dict compatible with the public SyncTalk_2D code: every
parameter and buffer has the name and shape that ``unet_328.py`` (class
``Model``) and ``utils.py`` (class ``AudioEncoder``) give it, so a checkpoint a
SyncTalk_2D training run writes loads here with ``strict=True``. The attribute
names below (``conv``, ``double_conv``, ``maxpool_conv``, ``inconv``,
``fuse_conv``, ``audio_model``, ``conv_block`` ...) are therefore part of the
file format, not a style choice; renaming one breaks every real checkpoint.

This module *is* the torch part of the plugin, so it imports torch at the top;
nothing else imports it until a torch-only code path runs (``avatar export ...``
or a test), which keeps ``import avatar_plugins.torch_reference`` and the CLI
free of torch.
"""

from __future__ import annotations

from typing import Iterator

from avatar.errors import ConfigError, MissingDependency

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ModuleNotFoundError as exc:  # pragma: no cover - exercised only without torch
    raise MissingDependency("torch", "torch", feature="the PyTorch reference networks") from exc

__all__ = [
    "AUDIO_SHAPES",
    "MODES",
    "TINY_CHANNELS",
    "AudioEncoder",
    "UNet328",
    "calibrate_batchnorm",
    "example_inputs",
    "seeded_audio_encoder",
    "seeded_unet",
]

#: channel widths of the five resolution levels (input block .. bottleneck)
CHANNELS = (32, 64, 128, 256, 512)
#: the same network a quarter as wide (1/16 of the MACs): the demo's trained model
TINY_CHANNELS = (8, 16, 32, 64, 128)

#: per-frame audio window shape (without batch) of each audio mode
AUDIO_SHAPES: dict[str, tuple[int, int, int]] = {
    "ave": (32, 16, 16),
    "hubert": (32, 32, 32),
    "wenet": (256, 16, 32),
}
MODES = tuple(AUDIO_SHAPES)

VISUAL_SHAPE = (6, 320, 320)
MEL_SHAPE = (1, 80, 16)


# ------------------------------------------------------------------ UNet blocks


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise (maybe strided), 1x1 project.

    The eight layers live in one ``nn.Sequential`` named ``conv`` (indices 0-7:
    conv, bn, relu, dwconv, bn, relu, conv, bn) because that is how the
    checkpoints index them.
    """

    def __init__(self, cin: int, cout: int, stride: int, residual: bool, expand: int = 2) -> None:
        super().__init__()
        if residual and (stride != 1 or cin != cout):
            raise ValueError("a residual inverted block needs stride 1 and cin == cout")
        hidden = cin * expand
        self.use_res_connect = residual
        self.conv = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, cout, 1, 1, 0, bias=False),
            nn.BatchNorm2d(cout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.use_res_connect else y


class DoubleInvertedResidual(nn.Module):
    """A (maybe strided) channel-changing block followed by a residual one."""

    def __init__(self, cin: int, cout: int, stride: int = 2) -> None:
        super().__init__()
        self.double_conv = nn.Sequential(
            InvertedResidual(cin, cout, stride, residual=False),
            InvertedResidual(cout, cout, 1, residual=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.double_conv(x)


class InputBlock(nn.Module):
    """First block at full resolution (6 -> 32 channels)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.inconv = nn.Sequential(InvertedResidual(cin, cout, 1, residual=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inconv(x)


class DownBlock(nn.Module):
    """Halve the resolution with a strided double block.

    Upstream calls the container ``maxpool_conv`` although there is no pooling;
    the name stays for checkpoint compatibility.
    """

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.maxpool_conv = nn.Sequential(DoubleInvertedResidual(cin, cout, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool_conv(x)


class UpBlock(nn.Module):
    """Bilinear x2 (align_corners=True), pad to the skip's size, concat, double block."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv = DoubleInvertedResidual(cin, cout, stride=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        dy = int(skip.shape[2]) - int(x.shape[2])
        dx = int(skip.shape[3]) - int(x.shape[3])
        # At 320x320 every level doubles exactly and the pad is empty; skipping it
        # keeps a no-op Pad node out of the exported graph.
        if dy or dx:
            x = F.pad(x, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([x, skip], dim=1))


class OutputBlock(nn.Module):
    """1x1 convolution to BGR (the sigmoid is applied by the network)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class AudioBranch(nn.Module):
    """Audio window -> ``[B, 512, 10, 10]``, the bottleneck's size.

    The three upstream branches (``AudioConvAve``, ``AudioConvHubert``,
    ``AudioConvWenet``) share one layout and differ only in the input width and
    the stride of ``conv3``; AVE and HuBERT even have identical parameter shapes
    (only the stride differs), so a checkpoint cannot tell those two apart.
    """

    def __init__(self, mode: str, channels: tuple[int, ...] = CHANNELS) -> None:
        super().__init__()
        c = channels
        cin = AUDIO_SHAPES[mode][0]  # 32 or 256: c[0] or c[3] at the standard width
        if mode == "wenet":  # [B,256,16,32]: already 256 wide, halve the width only
            self.conv1 = InvertedResidual(cin, c[3], 1, residual=cin == c[3])
            self.conv2 = InvertedResidual(c[3], c[3], 1, residual=True)
            stride3: tuple[int, int] = (1, 2)
        else:  # ave [B,32,16,16] keeps 16x16; hubert [B,32,32,32] halves to 16x16
            self.conv1 = InvertedResidual(cin, c[1], 1, residual=False)
            self.conv2 = InvertedResidual(c[1], c[2], 1, residual=False)
            stride3 = (2, 2) if mode == "hubert" else (1, 1)
        cin3 = c[3] if mode == "wenet" else c[2]
        self.conv3 = nn.Conv2d(cin3, c[3], kernel_size=3, padding=1, stride=stride3)
        self.bn3 = nn.BatchNorm2d(c[3])
        self.conv4 = InvertedResidual(c[3], c[3], 1, residual=True)
        # 16x16 -> 10x10: kernel 3, stride 2, padding 3
        self.conv5 = nn.Conv2d(c[3], c[4], kernel_size=3, padding=3, stride=2)
        self.bn5 = nn.BatchNorm2d(c[4])
        self.relu = nn.ReLU()
        self.conv6 = InvertedResidual(c[4], c[4], 1, residual=True)
        self.conv7 = InvertedResidual(c[4], c[4], 1, residual=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.conv1(x))
        x = self.relu(self.bn3(self.conv3(x)))
        x = self.conv4(x)
        x = self.relu(self.bn5(self.conv5(x)))
        return self.conv7(self.conv6(x))


class UNet328(nn.Module):
    """The SyncTalk_2D UNet-328: ``([B,6,320,320], [B,*window]) -> [B,3,320,320]``.

    ``mode`` picks the audio branch: ``"ave"`` (window ``(32,16,16)``),
    ``"hubert"`` (``(32,32,32)``) or ``"wenet"`` (``(256,16,32)``). Visual input
    and output are BGR in [0, 1] (see docs/MODEL_FAMILY.md).
    """

    def __init__(self, mode: str = "ave", n_channels: int = 6, channels: tuple[int, ...] = CHANNELS) -> None:
        super().__init__()
        if mode not in AUDIO_SHAPES:
            raise ConfigError(f"unknown audio mode {mode!r}; use one of {', '.join(MODES)}")
        if len(channels) != 5 or any(int(w) < 2 or int(w) % 2 for w in channels):
            raise ConfigError(f"channels must be five even widths, got {channels!r}")
        self.mode = mode
        self.n_channels = n_channels
        self.channels = tuple(int(w) for w in channels)
        c = self.channels
        self.audio_model = AudioBranch(mode, c)
        self.fuse_conv = nn.Sequential(
            DoubleInvertedResidual(c[4] * 2, c[4], stride=1),
            DoubleInvertedResidual(c[4], c[3], stride=1),
        )
        self.inc = InputBlock(n_channels, c[0])
        self.down1 = DownBlock(c[0], c[0])
        self.down2 = DownBlock(c[0], c[1])
        self.down3 = DownBlock(c[1], c[2])
        self.down4 = DownBlock(c[2], c[3])
        self.down5 = DownBlock(c[3], c[4])
        # in-channels = upsampled path + skip: 256+256, 128+128, 64+64, 32+32, 32+32
        self.up1 = UpBlock(c[4], c[3] // 2)
        self.up2 = UpBlock(c[3], c[2] // 2)
        self.up3 = UpBlock(c[2], c[1] // 2)
        self.up4 = UpBlock(c[1], c[0])
        self.up5 = UpBlock(c[1], c[0] // 2)
        self.outc = OutputBlock(c[0] // 2, 3)

    @property
    def audio_shape(self) -> tuple[int, int, int]:
        """Per-frame audio window shape this network expects (without batch)."""
        return AUDIO_SHAPES[self.mode]

    def forward(self, visual: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        x1 = self.inc(visual)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        x6 = self.down5(x5)
        fused = self.fuse_conv(torch.cat([x6, self.audio_model(audio)], dim=1))
        x = self.up1(fused, x5)
        x = self.up2(x, x4)
        x = self.up3(x, x3)
        x = self.up4(x, x2)
        x = self.up5(x, x1)
        return torch.sigmoid(self.outc(x))


# ------------------------------------------------------------ AVE audio encoder


class ConvBN(nn.Module):
    """Wav2Lip's ``Conv2d``: conv (with bias) + BN, optional residual, then ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int | tuple[int, int], padding: int,
                 residual: bool = False) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding), nn.BatchNorm2d(cout))
        self.act = nn.ReLU()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_block(x)
        return self.act(y + x if self.residual else y)


def _encoder_layers() -> Iterator[ConvBN]:
    # (cin, cout, kernel, stride, padding, residual); the mel window shrinks
    # 80x16 -> 27x16 -> 9x6 -> 3x3 -> 1x1.
    spec = [
        (1, 32, 3, 1, 1, False), (32, 32, 3, 1, 1, True), (32, 32, 3, 1, 1, True),
        (32, 64, 3, (3, 1), 1, False), (64, 64, 3, 1, 1, True), (64, 64, 3, 1, 1, True),
        (64, 128, 3, 3, 1, False), (128, 128, 3, 1, 1, True), (128, 128, 3, 1, 1, True),
        (128, 256, 3, (3, 2), 1, False), (256, 256, 3, 1, 1, True),
        (256, 512, 3, 1, 0, False), (512, 512, 1, 1, 0, False),
    ]
    for cin, cout, k, s, p, r in spec:
        yield ConvBN(cin, cout, k, s, p, residual=r)


class AudioEncoder(nn.Module):
    """The AVE audio encoder: a mel window ``[B,1,80,16]`` -> ``[B,512]``.

    Parameters live under ``audio_encoder.<i>.conv_block.<j>``; the upstream
    checkpoint file stores them without the ``audio_encoder.`` prefix
    (:func:`~avatar_plugins.torch_reference.checkpoints.load_audio_encoder_checkpoint`
    accepts both).
    """

    def __init__(self) -> None:
        super().__init__()
        self.audio_encoder = nn.Sequential(*_encoder_layers())

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        return self.audio_encoder(mel).flatten(1)


# ------------------------------------------------------------ test-model helpers


def example_inputs(model: nn.Module, batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Seeded random inputs of the right shapes for ``model``.

    Visual input is uniform in [0, 1] like a normalised image; audio windows are
    standard normal (AVE features are roughly zero-mean, unit-scale); mel windows
    are uniform in the encoder's [-4, 4] range.
    """
    g = torch.Generator().manual_seed(seed)
    if isinstance(model, UNet328):
        visual = torch.rand((batch, *VISUAL_SHAPE), generator=g)
        audio = torch.randn((batch, *model.audio_shape), generator=g)
        return visual, audio
    if isinstance(model, AudioEncoder):
        return (torch.rand((batch, *MEL_SHAPE), generator=g) * 8.0 - 4.0,)
    raise TypeError(f"no example inputs for {type(model).__name__}")


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, seed: int, steps: int = 4, batch: int | None = None) -> nn.Module:
    """Set every BatchNorm's running statistics from random forward passes.

    A freshly initialised network keeps mean 0 / variance 1 running statistics,
    which are far from the real activation statistics; in eval mode the deep
    layers then saturate and the output barely depends on the inputs (the audio
    moved it by ~6e-8). Averaging the batch statistics of ``steps`` random
    batches (cumulative average: ``momentum=None``) makes every layer roughly
    unit-scale, so test models react to both inputs. Returns ``model`` in eval
    mode; BatchNorm momenta are restored.

    ``batch`` defaults to 1 for the UNet (its statistics pool over 100-102400
    positions per channel, and a frame costs ~0.3 s) and 16 for the audio
    encoder (its last layers are 1x1, where train-mode BatchNorm needs several
    samples).
    """
    if batch is None:
        batch = 16 if isinstance(model, AudioEncoder) else 1
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    try:
        for step in range(steps):
            model(*example_inputs(model, batch=batch, seed=seed * 1000 + step))
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        model.eval()
    return model


def _seeded(build: "type[nn.Module]", seed: int, steps: int, **kwargs: object) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG alone
        torch.manual_seed(seed)
        model = build(**kwargs)
    return calibrate_batchnorm(model, seed, steps=steps)


def seeded_unet(mode: str = "ave", seed: int = 0) -> UNet328:
    """A reproducible random UNet-328 whose output depends on both inputs.

    Calibrated on 2 random frames: each frame already pools 100-102400
    positions per channel, and a train-mode frame costs ~1 s of CPU.
    """
    return _seeded(UNet328, seed, 2, mode=mode)  # type: ignore[return-value]


def seeded_audio_encoder(seed: int = 0) -> AudioEncoder:
    """A reproducible random AVE audio encoder with calibrated BatchNorm."""
    return _seeded(AudioEncoder, seed, 4)  # type: ignore[return-value]
