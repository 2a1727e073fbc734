"""Seeded, untrained UNet-328 and AVE audio-encoder models, built without PyTorch.

Tests, the out-of-the-box demo and the benchmarks need models with the real
architecture and I/O contract on machines that have neither PyTorch nor the
(unpublished) trained weights. This module writes them with ``onnx.helper``
from numpy weights:

* the weights follow PyTorch's default initialisation, under exactly the
  parameter and buffer names of SyncTalk_2D's ``unet_328.py`` (``Model(6, mode)``)
  and of its AVE ``AudioEncoder``, so a state dict made here loads with
  ``load_state_dict(strict=True)`` into the PyTorch networks;
* BatchNorm running statistics are *calibrated*: they are set to the batch
  statistics of a few seeded, image-like inputs (one ONNX Runtime run of a
  train-mode graph). Left at PyTorch's (0, 1) the activations drift so far that
  the output hardly depends on the audio (6e-8); calibrated, a different audio
  window moves the output by about 1e-2;
* ``tiny=True`` variants keep the contract (names, shapes, dtype, dynamic batch)
  at a few percent of the cost, for fast tests.

The models are untrained: their output is structured noise, never a face.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConfigError, ModelError
from .onnx_builder import GraphBuilder, make_model

if TYPE_CHECKING:
    from ..interfaces import Backend

MODES = ("ave", "hubert", "wenet")
#: per-frame audio window of each mode (the model's audio input without batch)
AUDIO_SHAPES: dict[str, tuple[int, int, int]] = {"ave": (32, 16, 16), "hubert": (32, 32, 32), "wenet": (256, 16, 32)}
VISUAL_SHAPE = (6, 320, 320)
MEL_SHAPE = (1, 80, 16)
DEFAULT_NAMES = ("input", "audio", "output")
ENCODER_NAMES = ("mel", "feature")
#: smallest mean absolute output change that counts as "the input matters"
MIN_SENSITIVITY = 1e-3

_CH = (32, 64, 128, 256, 512)
_CALIB_BATCH = 4
# The order in which SyncTalk_2D's Model registers its children, i.e. the order
# of its state_dict keys.
_UNET_ORDER = ("audio_model", "fuse_conv", "inc", "down1", "down2", "down3", "down4", "down5",
               "up1", "up2", "up3", "up4", "up5", "outc")  # fmt: skip


# --------------------------------------------------------------------------
# Network descriptions (forward order); see onnx_builder for the three modes.
# --------------------------------------------------------------------------
def _inverted_residual(g: GraphBuilder, x: str, p: str, cin: int, cout: int, *, stride: int = 1, res: bool = False) -> str:
    """MobileNetV2 block with expand ratio 2: 1x1 expand, 3x3 depthwise, 1x1 project."""
    h = cin * 2
    y = g.relu(g.conv_bn(x, f"{p}.conv.0", f"{p}.conv.1", cin, h, 1))
    y = g.relu(g.conv_bn(y, f"{p}.conv.3", f"{p}.conv.4", h, h, 3, stride=stride, pad=1, groups=h))
    # Residual branches start at half gain: a random 60-layer net with full-gain
    # branches amplifies float32 rounding ~1000x (ONNX vs PyTorch differed by
    # 1.6e-4); damped, they agree to ~3e-5 and the audio still moves the output.
    y = g.conv_bn(y, f"{p}.conv.6", f"{p}.conv.7", h, cout, 1, gamma_scale=0.5 if res else 1.0)
    return g.add(x, y) if res else y


def _double_conv(g: GraphBuilder, x: str, p: str, cin: int, cout: int, stride: int) -> str:
    x = _inverted_residual(g, x, f"{p}.double_conv.0", cin, cout, stride=stride)
    return _inverted_residual(g, x, f"{p}.double_conv.1", cout, cout, res=True)


def _audio_branch(g: GraphBuilder, a: str, mode: str) -> str:
    """``audio_model``: the per-mode audio stack that ends at [B, 512, 10, 10]."""
    p = "audio_model"
    if mode == "wenet":
        a = _inverted_residual(g, a, f"{p}.conv1", _CH[3], _CH[3], res=True)
        a = _inverted_residual(g, a, f"{p}.conv2", _CH[3], _CH[3], res=True)
        stride3: tuple[int, int] = (1, 2)
    else:
        a = _inverted_residual(g, a, f"{p}.conv1", _CH[0], _CH[1])
        a = _inverted_residual(g, a, f"{p}.conv2", _CH[1], _CH[2])
        stride3 = (2, 2) if mode == "hubert" else (1, 1)
    cin3 = _CH[3] if mode == "wenet" else _CH[2]
    a = g.relu(g.conv_bn(a, f"{p}.conv3", f"{p}.bn3", cin3, _CH[3], 3, stride=stride3, pad=1, bias=True))
    a = _inverted_residual(g, a, f"{p}.conv4", _CH[3], _CH[3], res=True)
    a = g.relu(g.conv_bn(a, f"{p}.conv5", f"{p}.bn5", _CH[3], _CH[4], 3, stride=2, pad=3, bias=True))
    a = _inverted_residual(g, a, f"{p}.conv6", _CH[4], _CH[4], res=True)
    return _inverted_residual(g, a, f"{p}.conv7", _CH[4], _CH[4], res=True)


def _unet(g: GraphBuilder, x: str, a: str, mode: str) -> str:
    """SyncTalk_2D ``Model(6, mode)``: visual [B,6,320,320] + audio window -> [B,3,320,320]."""
    c = _CH
    x1 = _inverted_residual(g, x, "inc.inconv.0", 6, c[0])
    x2 = _double_conv(g, x1, "down1.maxpool_conv.0", c[0], c[0], 2)
    x3 = _double_conv(g, x2, "down2.maxpool_conv.0", c[0], c[1], 2)
    x4 = _double_conv(g, x3, "down3.maxpool_conv.0", c[1], c[2], 2)
    x5 = _double_conv(g, x4, "down4.maxpool_conv.0", c[2], c[3], 2)
    x6 = _double_conv(g, x5, "down5.maxpool_conv.0", c[3], c[4], 2)
    x6 = g.concat([x6, _audio_branch(g, a, mode)])
    x6 = _double_conv(g, x6, "fuse_conv.0", c[4] * 2, c[4], 1)
    x6 = _double_conv(g, x6, "fuse_conv.1", c[4], c[3], 1)
    # Up blocks: bilinear x2 (align_corners), pad (a no-op at 320x320, so
    # omitted), concat [upsampled, skip], DoubleConvDW.
    y = x6
    for i, (skip, cin, cout) in enumerate(
        [(x5, c[4], c[3] // 2), (x4, c[3], c[2] // 2), (x3, c[2], c[1] // 2), (x2, c[1], c[0]), (x1, c[1], c[0] // 2)], 1
    ):
        y = _double_conv(g, g.concat([g.upsample(y), skip]), f"up{i}.conv", cin, cout, 1)
    return g.sigmoid(g.conv(y, "outc.conv", c[0] // 2, 3, 1))


def _tiny_unet(g: GraphBuilder, x: str, a: str, mode: str) -> str:
    """A cheap stand-in with the same contract: 80x80 encoder, audio added at 40x40."""
    v = g.avg_pool(x, 4)  # [B,6,80,80]
    e1 = g.relu(g.conv_bn(v, "enc1.conv", "enc1.bn", 6, 16, 3, pad=1))
    e2 = g.relu(g.conv_bn(e1, "enc2.conv", "enc2.bn", 16, 32, 3, stride=2, pad=1))  # 40x40
    ca, ha, wa = AUDIO_SHAPES[mode]
    au = g.avg_pool(a, (ha // 4, wa // 4))  # [B,C,4,4]
    au = g.relu(g.conv_bn(au, "audio.conv", "audio.bn", ca, 32, 1))
    au = g.upsample(au, 10.0)  # 4x4 -> 40x40
    m = g.relu(g.conv_bn(g.add(e2, au), "mid.conv", "mid.bn", 32, 32, 3, pad=1))
    d = g.concat([g.upsample(m), e1])  # 80x80
    d = g.relu(g.conv_bn(d, "dec.conv", "dec.bn", 48, 16, 3, pad=1))
    d = g.concat([g.upsample(d, 4.0), x])  # 320x320, the visual input rides along at full size
    return g.sigmoid(g.conv(d, "outc.conv", 16 + 6, 3, 1))


_ENCODER_LAYERS = [  # (cin, cout, kernel, stride, pad, residual), Wav2Lip-style
    (1, 32, 3, 1, 1, False), (32, 32, 3, 1, 1, True), (32, 32, 3, 1, 1, True),
    (32, 64, 3, (3, 1), 1, False), (64, 64, 3, 1, 1, True), (64, 64, 3, 1, 1, True),
    (64, 128, 3, 3, 1, False), (128, 128, 3, 1, 1, True), (128, 128, 3, 1, 1, True),
    (128, 256, 3, (3, 2), 1, False), (256, 256, 3, 1, 1, True),
    (256, 512, 3, 1, 0, False), (512, 512, 1, 1, 0, False),
]  # fmt: skip
_TINY_ENCODER_LAYERS = [
    (1, 16, 3, (3, 1), 1, False), (16, 32, 3, 3, 1, False), (32, 64, 3, (3, 2), 1, False), (64, 512, 3, 1, 0, False),
]  # fmt: skip


def _encoder(g: GraphBuilder, m: str, layers: list[tuple]) -> str:
    """``AudioEncoder``: conv+BN(+residual)+ReLU blocks, [B,1,80,16] -> [B,512]."""
    for i, (cin, cout, k, s, p, res) in enumerate(layers):
        pre = f"audio_encoder.{i}.conv_block"
        y = g.conv_bn(m, f"{pre}.0", f"{pre}.1", cin, cout, k, stride=s, pad=p, bias=True)
        m = g.relu(g.add(y, m) if res else y)
    return g.flatten(m)


# --------------------------------------------------------------------------
# Seeded inputs shaped like the real ones (used for calibration and checks)
# --------------------------------------------------------------------------
def _smooth(rng: np.random.Generator, shape: tuple[int, ...], grid: int = 6) -> np.ndarray:
    """Random low-frequency images in [0, 1] (faces are smooth; white noise is not)."""
    *lead, h, w = shape
    coarse = rng.uniform(0.0, 1.0, size=(*lead, grid, grid))
    ry, rx = _interp(grid, h), _interp(grid, w)
    img = np.einsum("hi,...ij,wj->...hw", ry, coarse, rx)
    return np.clip(img + rng.normal(0.0, 0.04, size=img.shape), 0.0, 1.0)


def _interp(n_in: int, n_out: int) -> np.ndarray:
    pos = np.linspace(0, n_in - 1, n_out)
    lo = np.minimum(np.floor(pos).astype(int), n_in - 2)
    frac = pos - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] = 1 - frac
    m[np.arange(n_out), lo + 1] = frac
    return m


def sample_visual(batch: int, *, seed: int = 0) -> np.ndarray:
    """Seeded visual input ``[batch, 6, 320, 320]`` float32 in [0, 1], like the real one.

    Channels 3-5 are the masked copy of channels 0-2 (the SyncTalk_2D mask
    blacks out x in [5, 315], y in [5, 310]), as the pipeline would feed it.
    """
    rng = np.random.default_rng([seed, 101])
    ref = _smooth(rng, (batch, 3, 320, 320))
    masked = ref.copy()
    masked[:, :, 5:311, 5:316] = 0.0
    return np.concatenate([ref, masked], axis=1).astype(np.float32)


def sample_audio(mode: str, batch: int, *, seed: int = 0) -> np.ndarray:
    """Seeded audio windows for ``mode`` with the value range of real features.

    AVE features are ReLU outputs (about half zeros, mean ~0.4); HuBERT and
    WeNet hidden states are roughly zero-mean.
    """
    shape = (batch, *AUDIO_SHAPES[_check_mode(mode)])
    rng = np.random.default_rng([seed, 202])
    x = rng.standard_normal(shape)
    if mode == "ave":
        x = np.maximum(x, 0.0) * 0.8
    elif mode == "hubert":
        x = x * 0.5
    return x.astype(np.float32)


def sample_mel(batch: int, *, seed: int = 0) -> np.ndarray:
    """Seeded mel windows ``[batch, 1, 80, 16]`` in the AVE mel range [-4, 4]."""
    rng = np.random.default_rng([seed, 303])
    mel = _smooth(rng, (batch, 1, 80, 16), grid=4) * 6.0 - 4.0 + rng.normal(0, 0.3, (batch, 1, 80, 16))
    return np.clip(mel, -4.0, 4.0).astype(np.float32)


# --------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------
def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"unknown mode '{mode}'; choose one of {', '.join(MODES)}")
    return mode


def _calibrate(g: GraphBuilder, out: str, feeds: dict[str, np.ndarray], input_shapes: dict[str, tuple[int, ...]]) -> None:
    """Run the train-mode graph once and store every BatchNorm's batch statistics."""
    import onnxruntime as ort
    from onnx import TensorProto

    outputs = [(f"stat{i}_{k}", src) for i, (_, m, v) in enumerate(g.stats) for k, src in (("m", m), ("v", v))]
    model = make_model(
        g,
        [(n, TensorProto.FLOAT, [None, *s]) for n, s in input_shapes.items()],
        [("out", out, [None] * 4), *[(n, src, [1, None, 1, 1]) for n, src in outputs]],
        opset=17,
    )
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    values = sess.run([n for n, _ in outputs], feeds)
    for i, (prefix, _, _) in enumerate(g.stats):
        g.sd[f"{prefix}.running_mean"] = values[2 * i].reshape(-1).astype(np.float32)
        g.sd[f"{prefix}.running_var"] = values[2 * i + 1].reshape(-1).astype(np.float32)
        g.sd[f"{prefix}.num_batches_tracked"] = np.array(1, dtype=np.int64)


def _unet_state_dict(mode: str, seed: int, tiny: bool) -> dict[str, np.ndarray]:
    _check_mode(mode)
    sd: dict[str, np.ndarray] = {}
    g = GraphBuilder(sd, rng=np.random.default_rng([seed, 1 if tiny else 0, MODES.index(mode)]), calibrate=True)
    out = (_tiny_unet if tiny else _unet)(g, "visual", "audio", mode)
    feeds = {"visual": sample_visual(_CALIB_BATCH, seed=seed), "audio": sample_audio(mode, _CALIB_BATCH, seed=seed)}
    _calibrate(g, out, feeds, {"visual": VISUAL_SHAPE, "audio": AUDIO_SHAPES[mode]})
    if tiny:
        return sd
    rank = {name: i for i, name in enumerate(_UNET_ORDER)}
    return dict(sorted(sd.items(), key=lambda kv: rank[kv[0].split(".", 1)[0]]))


def unet_state_dict(mode: str = "ave", seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded, BN-calibrated weights of SyncTalk_2D's UNet-328 for ``mode``.

    Keys, shapes and dtypes are those of ``Model(6, mode).state_dict()``
    (including ``num_batches_tracked`` as int64 scalars), so the result loads
    strictly into the PyTorch network.
    """
    return _unet_state_dict(mode, seed, tiny=False)


def audio_encoder_state_dict(seed: int = 0, *, tiny: bool = False) -> dict[str, np.ndarray]:
    """Seeded, BN-calibrated weights of the AVE ``AudioEncoder`` (``audio_encoder.*`` keys).

    Upstream checkpoints store the same keys without the ``audio_encoder.``
    prefix; the module itself uses it.
    """
    sd: dict[str, np.ndarray] = {}
    g = GraphBuilder(sd, rng=np.random.default_rng([seed, 7, 1 if tiny else 0]), calibrate=True)
    out = _encoder(g, "mel", _TINY_ENCODER_LAYERS if tiny else _ENCODER_LAYERS)
    _calibrate(g, out, {"mel": sample_mel(16, seed=seed)}, {"mel": MEL_SHAPE})
    return sd


def parameter_count(sd: dict[str, np.ndarray]) -> int:
    """Learnable parameters in a state dict (BatchNorm running statistics excluded)."""
    buffers = (".running_mean", ".running_var", ".num_batches_tracked")
    return int(sum(np.asarray(v).size for k, v in sd.items() if not k.endswith(buffers)))


# --------------------------------------------------------------------------
# ONNX files
# --------------------------------------------------------------------------
def _check_names(names: tuple[str, ...] | list[str], n: int, what: str) -> tuple[str, ...]:
    names = tuple(names)
    if len(names) != n or any(not s for s in names) or len(set(names)) != n:
        raise ConfigError(f"{what} needs {n} distinct, non-empty tensor names, got {list(names)}")
    return names


def _write(model: object, path: str | Path) -> Path:
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))  # type: ignore[arg-type]
    return path


def _build_unet(
    sd: dict[str, np.ndarray], mode: str, path: str | Path, *, names: tuple[str, ...], opset: int,
    uint8_visual: bool, tiny: bool, metadata: dict[str, str] | None,
) -> Path:  # fmt: skip
    from onnx import TensorProto

    _check_mode(mode)
    vis, aud, out = _check_names(names, 3, "a UNet model")
    if opset < 11:
        raise ConfigError(f"opset {opset} is too old: bilinear align_corners Resize needs opset 11 or newer")
    g = GraphBuilder(dict(sd))
    x = vis
    if uint8_visual:
        # Normalising in the graph lets callers ship uint8 frames (4x less
        # traffic to the device) and still feed a float network. Div, not Mul
        # by 1/255: it rounds exactly like the host-side `x / 255.0`, whereas
        # the one-ulp difference of Mul grows to ~1e-4 through the deep net.
        x = g.node("Cast", [vis], "visual_f32", to=TensorProto.FLOAT)
        x = g.node("Div", [x, g.const(np.array(255.0, np.float32), "c255")], "visual_01")
    y = (_tiny_unet if tiny else _unet)(g, x, aud, mode)
    extra = g.unused()
    if extra:
        raise ModelError(
            f"the state dict has {len(extra)} entries the {'tiny ' if tiny else ''}UNet-328 ({mode}) does not use, "
            f"e.g. {extra[:3]}; it was made for another mode or network"
        )
    model = make_model(
        g,
        [(vis, TensorProto.UINT8 if uint8_visual else TensorProto.FLOAT, ["batch", *VISUAL_SHAPE]),
         (aud, TensorProto.FLOAT, ["batch", *AUDIO_SHAPES[mode]])],
        [(out, y, ["batch", 3, 320, 320])],
        opset=opset,
        doc=f"UNet-328 ({mode}){' tiny' if tiny else ''}, untrained synthetic weights from avatar-sdk",
        metadata={"avatar.kind": "unet", "avatar.mode": mode, "avatar.tiny": str(tiny).lower(), **(metadata or {})},
    )  # fmt: skip
    return _write(model, path)


def build_unet_onnx(
    state_dict: dict[str, np.ndarray],
    mode: str,
    path: str | Path,
    *,
    names: tuple[str, str, str] = DEFAULT_NAMES,
    opset: int = 17,
    uint8_visual: bool = False,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write the UNet-328 graph for ``state_dict`` (BatchNorm folded) to ``path``.

    Works for any state dict with the upstream naming, seeded or trained. Inputs
    ``names[0]`` (visual ``[batch,6,320,320]``, float32 or uint8 with
    ``uint8_visual``) and ``names[1]`` (audio window); output ``names[2]``
    ``[batch,3,320,320]``; the batch axis is dynamic.
    """
    return _build_unet(state_dict, mode, path, names=tuple(names), opset=opset, uint8_visual=uint8_visual,
                       tiny=False, metadata=metadata)  # fmt: skip


def make_unet(
    path: str | Path,
    *,
    mode: str = "ave",
    seed: int = 0,
    names: tuple[str, str, str] = DEFAULT_NAMES,
    uint8_visual: bool = False,
    tiny: bool = False,
    opset: int = 17,
) -> Path:
    """Seed, calibrate and write a UNet-328 test model; ``tiny`` is ~60x cheaper, same contract."""
    sd = _unet_state_dict(mode, seed, tiny)
    meta = {"avatar.seed": str(seed)}
    return _build_unet(sd, mode, path, names=tuple(names), opset=opset, uint8_visual=uint8_visual, tiny=tiny,
                       metadata=meta)  # fmt: skip


def build_audio_encoder_onnx(
    state_dict: dict[str, np.ndarray],
    path: str | Path,
    *,
    names: tuple[str, str] = ENCODER_NAMES,
    opset: int = 17,
    tiny: bool = False,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write the AVE audio encoder ``[batch,1,80,16] -> [batch,512]`` (input ``mel``, output ``feature``)."""
    from onnx import TensorProto

    mel, feat = _check_names(names, 2, "an audio encoder")
    g = GraphBuilder(dict(state_dict))
    y = _encoder(g, mel, _TINY_ENCODER_LAYERS if tiny else _ENCODER_LAYERS)
    extra = g.unused()
    if extra:
        raise ModelError(f"the state dict has entries the audio encoder does not use, e.g. {extra[:3]}")
    model = make_model(
        g,
        [(mel, TensorProto.FLOAT, ["batch", *MEL_SHAPE])],
        [(feat, y, ["batch", 512])],
        opset=opset,
        doc=f"AVE audio encoder{' tiny' if tiny else ''}, untrained synthetic weights from avatar-sdk",
        metadata={"avatar.kind": "audio-encoder", "avatar.tiny": str(tiny).lower(), **(metadata or {})},
    )
    return _write(model, path)


def make_audio_encoder(path: str | Path, *, seed: int = 0, tiny: bool = False, names: tuple[str, str] = ENCODER_NAMES) -> Path:
    """Seed, calibrate and write an AVE audio-encoder test model."""
    sd = audio_encoder_state_dict(seed, tiny=tiny)
    return build_audio_encoder_onnx(sd, path, names=names, tiny=tiny, metadata={"avatar.seed": str(seed)})


# --------------------------------------------------------------------------
# Sensitivity: does each input move the output?
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Sensitivity:
    """Mean absolute output change when one input is replaced by another sample."""

    audio: float
    visual: float | None  # None for an audio encoder (single input)
    output_min: float
    output_max: float
    output_std: float

    @property
    def ok(self) -> bool:
        moved = self.audio > MIN_SENSITIVITY and (self.visual is None or self.visual > MIN_SENSITIVITY)
        return moved and self.output_std > MIN_SENSITIVITY


def check_sensitivity(path: str | Path, *, seed: int = 12345) -> Sensitivity:
    """Run a model file on seeded inputs and measure how much each input matters.

    UNet models are recognised by their contract (names are looked up, not
    assumed); any other single-input model is treated as an audio encoder.
    """
    import onnxruntime as ort

    from ..contract import contract_from_io, read_io

    inputs, outputs, _ = read_io(path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(sess.run([outputs[0].name], feeds)[0])

    if len(inputs) == 1:
        name = inputs[0].name
        base = run({name: sample_mel(2, seed=seed)})
        other = run({name: sample_mel(2, seed=seed + 1)})
        return Sensitivity(float(np.abs(base - other).mean()), None, float(base.min()), float(base.max()), float(base.std()))
    c = contract_from_io(inputs, outputs, path=path)
    v0, v1 = sample_visual(2, seed=seed), sample_visual(2, seed=seed + 1)
    if c.visual_uint8:
        v0, v1 = (np.round(v * 255).astype(np.uint8) for v in (v0, v1))
    a0, a1 = sample_audio(c.feature_type, 2, seed=seed), sample_audio(c.feature_type, 2, seed=seed + 1)
    base = run({c.visual.name: v0, c.audio.name: a0})
    d_audio = np.abs(run({c.visual.name: v0, c.audio.name: a1}) - base).mean()
    d_visual = np.abs(run({c.visual.name: v1, c.audio.name: a0}) - base).mean()
    return Sensitivity(float(d_audio), float(d_visual), float(base.min()), float(base.max()), float(base.std()))


def constant_face_backend(model: str | Path, value: float = 0.5) -> Backend:
    """A stand-in backend with ``model``'s inputs and outputs that returns a face of ``value`` for every row at once.

    For measuring what is around the model (memory, streaming, the engine): the
    engine, feature sources and sinks stay real; only the model's cost, which
    would make a long render slow on a small CPU, is left out.
    """
    from ..contract import read_contract
    from ..interfaces import Backend

    contract = read_contract(model)

    class ConstantFace(Backend):
        name = "constant"

        @property
        def inputs(self) -> list:
            return [contract.visual, contract.audio]

        @property
        def outputs(self) -> list:
            return [contract.output]

        def _run(self, feeds: dict) -> dict[str, np.ndarray]:
            n = len(next(iter(feeds.values())))
            return {contract.output.name: np.full((n, 3, 320, 320), value, np.float32)}

    return ConstantFace(model)

