"""HuBERT feature source: ``facebook/hubert-large-ls960-ft`` last hidden state, two rows per 25 fps frame.

Extraction follows the public code of the family (ER-NeRF / SyncTalk ``data_utils/hubert.py``,
which SyncTalk_2D's HuBERT mode reuses):

* the whole signal is normalised to zero mean / unit variance (the Wav2Vec2
  feature extractor, ``do_normalize``);
* long audio runs in clips of ``clip_s`` seconds (20 s upstream = 1000 HuBERT
  frames): clip ``i`` covers samples ``[i*C, i*C + C + 80)`` so that it yields
  exactly ``C / 320`` frames (the conv front end is one kernel-400 / stride-320
  convolution), the remainder after the last whole clip runs as one more clip
  when it has at least 400 samples;
* the result is cut or zero-padded to ``T = (samples - 80) // 320`` frames (50 Hz);
* frames are paired per video frame: rows ``[N, 2, 1024]`` with ``N = ceil(T / 2)``,
  an odd ``T`` padded with one zero frame (upstream drops the odd frame instead;
  padding keeps ``N = 25 * seconds`` for whole seconds of audio).

Streaming is **not exact**: the normalisation statistics of the offline path come
from the whole file, and the transformer sees a whole clip. The stream encodes
each clip once its audio (plus 80 samples) has arrived, normalised with the
statistics of all audio received so far, so a frame can wait up to ``clip_s``
seconds (see :attr:`HubertSource.lookahead_s`); for live use choose a small
``clip_s`` (e.g. 2), which shortens the transformer's context.
"""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from avatar.errors import ConfigError, FeatureError
from avatar.hookspecs import hookimpl
from avatar.interfaces import Availability, FeatureSource, RowStream

from . import _hubert_runtime as rt

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
ROW_SHAPE = (2, rt.HIDDEN)
_EXTRA = rt.KERNEL - rt.STRIDE  # 80 samples each clip reaches past its nominal end


def expected_frames(samples: int) -> int:
    """HuBERT frames (50 Hz) upstream keeps for ``samples`` of audio."""
    return max(0, (samples - _EXTRA) // rt.STRIDE)


def expected_rows(samples: int) -> int:
    """Feature rows (25 fps video frames) for ``samples`` of audio: ``ceil(T / 2)``."""
    return (expected_frames(samples) + 1) // 2


def clip_samples(clip_s: float) -> int:
    """Clip length in samples: ``clip_s`` rounded to whole HuBERT frames (320 samples)."""
    try:
        frames = int(round(float(clip_s) * SAMPLE_RATE / rt.STRIDE))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"hubert: clip_s must be a number of seconds, not {clip_s!r}") from exc
    if frames < 5:
        raise ConfigError(f"hubert: clip_s={clip_s} is too short; use at least 0.1 s (upstream uses 20)")
    return frames * rt.STRIDE


class _Clips:
    """Cuts a sample stream into upstream's clips, encodes them, pairs frames into rows.

    ``norm`` maps a raw clip to the model's input (the normalisation); offline
    passes an already-normalised signal with the identity.
    """

    def __init__(self, run: rt.Runner, clip: int, norm: Callable[[np.ndarray], np.ndarray]) -> None:
        self.run, self.clip, self.norm = run, clip, norm
        # samples from the current clip's start on, kept as pieces so that many small
        # pushes do not copy a 20 s buffer each time
        self._pieces: list[np.ndarray] = []
        self._held = 0
        self._samples = 0
        self._frames_done = 0  # HuBERT frames produced by whole clips
        self._odd: np.ndarray | None = None  # a frame waiting for its pair

    def _encode(self, seg: np.ndarray) -> np.ndarray:
        if len(seg) < rt.KERNEL:
            return np.zeros((0, rt.HIDDEN), np.float32)
        out = np.asarray(self.run(self.norm(seg)), dtype=np.float32)
        if out.ndim != 2 or out.shape[1] != rt.HIDDEN:
            raise FeatureError(f"HuBERT returned frames of shape {out.shape}; expected [frames, 1024]")
        return out

    def _pair(self, frames: np.ndarray, final: bool) -> np.ndarray:
        if self._odd is not None:
            frames = np.concatenate([self._odd[None], frames])
            self._odd = None
        if len(frames) % 2:
            if final:
                frames = np.concatenate([frames, np.zeros((1, rt.HIDDEN), np.float32)])
            else:
                self._odd, frames = frames[-1], frames[:-1]
        return frames.reshape(-1, *ROW_SHAPE)

    def _buffer(self) -> np.ndarray:
        if len(self._pieces) != 1:
            self._pieces = [np.concatenate(self._pieces) if self._pieces else np.zeros(0, np.float32)]
        return self._pieces[0]

    def push(self, pcm: np.ndarray) -> np.ndarray:
        pcm = np.array(pcm, dtype=np.float32).reshape(-1)  # a copy: callers may reuse their buffer
        self._samples += pcm.size
        self._pieces.append(pcm)
        self._held += pcm.size
        parts = []
        while self._held >= self.clip + _EXTRA:
            buf = self._buffer()
            frames = self._encode(buf[: self.clip + _EXTRA])
            # A whole clip makes exactly clip/320 frames; never more than the file keeps.
            frames = _fit(frames, self.clip // rt.STRIDE)
            self._frames_done += len(frames)
            parts.append(frames)
            self._pieces = [buf[self.clip :]]
            self._held -= self.clip
        if not parts:
            return np.zeros((0, *ROW_SHAPE), np.float32)
        return self._pair(np.concatenate(parts), final=False)

    def finish(self) -> np.ndarray:
        need = expected_frames(self._samples) - self._frames_done
        tail = _fit(self._encode(self._buffer()), max(0, need))
        self._pieces, self._held = [], 0
        rows = self._pair(tail, final=True)
        return rows if len(rows) else np.zeros((0, *ROW_SHAPE), np.float32)


def _fit(frames: np.ndarray, n: int) -> np.ndarray:
    """Cut to ``n`` frames or pad with zero frames (upstream's final length fix)."""
    if len(frames) >= n:
        return frames[:n]
    return np.concatenate([frames, np.zeros((n - len(frames), rt.HIDDEN), np.float32)])


class HubertStream(RowStream):
    """Clip-wise HuBERT with running normalisation statistics (approximate; see module doc)."""

    def __init__(self, run: rt.Runner, clip: int, do_normalize: bool) -> None:
        self._sum = 0.0
        self._sq = 0.0
        self._n = 0
        self._do_normalize = do_normalize
        self._clips = _Clips(run, clip, self._norm)
        self._finished = False

    def _norm(self, seg: np.ndarray) -> np.ndarray:
        if not self._do_normalize or self._n == 0:
            return seg
        mean = self._sum / self._n
        var = max(self._sq / self._n - mean * mean, 0.0)
        return ((seg - mean) / np.sqrt(var + 1e-7)).astype(np.float32)

    def push(self, pcm: np.ndarray) -> np.ndarray:
        if self._finished:
            raise FeatureError("push() after finish(); open a new stream for new audio")
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if pcm.size:
            x = pcm.astype(np.float64)
            self._sum += float(x.sum())
            self._sq += float(np.dot(x, x))
            self._n += pcm.size
        return self._clips.push(pcm)

    def finish(self) -> np.ndarray:
        if self._finished:
            return np.zeros((0, *ROW_SHAPE), np.float32)
        self._finished = True
        return self._clips.finish()


class HubertSource(FeatureSource):
    """HuBERT-large last hidden state: two 1024-wide 50 Hz frames per 25 fps video frame."""

    name = "hubert"
    description = "HuBERT large (hubert-large-ls960-ft, local weights) last hidden state; [2,1024] rows at 25 fps"
    fps: ClassVar[Fraction] = Fraction(25)
    row_shape: ClassVar[tuple[int, ...]] = ROW_SHAPE
    window_shape: ClassVar[tuple[int, ...]] = (32, 32, 32)
    default_padding: ClassVar[str] = "zero"
    exact_streaming: ClassVar[bool] = False

    def __init__(
        self,
        *,
        model: str | Path | None = None,
        onnx: str | Path | None = None,
        device: str = "cpu",
        clip_s: float = 20.0,
        padding: str | None = None,
        **options: Any,
    ) -> None:
        super().__init__(padding=padding)
        if options:
            raise ConfigError(
                f"hubert: unknown option(s) {', '.join(sorted(options))}; it takes model=DIR, onnx=PATH, "
                "device, clip_s, padding"
            )
        self.clip = clip_samples(clip_s)
        self.clip_s = self.clip / SAMPLE_RATE
        self.device = device
        rt.parse_device(device)
        if model is None and onnx is None:
            raise FeatureError(f"the hubert feature source needs model=DIR (or onnx=PATH). {rt.HOW_TO_GET}")
        model_dir = rt.check_model_dir(model) if model is not None else None
        self.do_normalize = rt.read_do_normalize(model_dir)
        self._runner: rt.TorchRunner | rt.OrtRunner
        if onnx is not None:
            runner = rt.OrtRunner(Path(onnx).expanduser(), device)
            if model_dir is None and runner.do_normalize is not None:
                self.do_normalize = runner.do_normalize
            self._runner = runner
        elif model_dir is not None:
            self._runner = rt.TorchRunner(model_dir, device)
        self.model_dir = model_dir
        self.onnx_path = Path(onnx).expanduser() if onnx is not None else None

    @classmethod
    def availability(cls) -> Availability:
        import importlib.util

        for pkg in ("transformers", "torch"):
            if importlib.util.find_spec(pkg) is None:
                return Availability.missing(pkg, "hubert")
        return Availability.ok()

    @property
    def lookahead_s(self) -> float:
        """Worst-case audio after a frame's time that its window needs.

        The transformer sees a whole clip, so a frame waits for the end of its clip
        (+80 samples); a window reaching 7 frames into the next clip waits for that one.
        """
        after = self.window_rows - self.window_before - 1
        return round(self.clip_s + after / float(self.fps) + _EXTRA / SAMPLE_RATE, 6)

    def rows(self, pcm: np.ndarray) -> np.ndarray:
        """Offline rows with the whole-file normalisation (upstream's exact recipe)."""
        x = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if self.do_normalize and x.size:
            x = rt.normalize(x)
        clips = _Clips(self._runner, self.clip, lambda seg: seg)
        parts = [clips.push(x), clips.finish()]
        return np.concatenate(parts).astype(np.float32, copy=False)

    def expected_frames(self, samples: int | None) -> int | None:
        """Video frames (rows) for ``samples`` of audio: ``ceil(T / 2)``, not the 25 fps rounding."""
        return None if samples is None else expected_rows(samples)

    def open_stream(self) -> HubertStream:
        return HubertStream(self._runner, self.clip, self.do_normalize)

    def close(self) -> None:
        self._runner.close()


def export_hubert(model_dir: str | Path, output: str | Path, *, opset: int = 17, check: bool = True) -> float | None:
    """Export a local HuBERT directory to ONNX for ``onnx=PATH`` (see :func:`_hubert_runtime.export_onnx`)."""
    return rt.export_onnx(model_dir, output, opset=opset, check=check)


@hookimpl
def register_feature_sources(register: Any) -> None:
    register(HubertSource)


@hookimpl
def register_commands(cli: Any) -> None:
    import click

    @cli.command("export-hubert")
    @click.argument("model_dir", type=click.Path(file_okay=False))
    @click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="ONNX file to write")
    @click.option("--opset", default=17, show_default=True, help="ONNX opset")
    @click.option("--no-check", is_flag=True, help="skip the PyTorch vs ONNX Runtime comparison")
    def export_hubert_cmd(model_dir: str, output: str, opset: int, no_check: bool) -> None:
        """Export a local HuBERT (hubert-large-ls960-ft) to ONNX, for `hubert` with onnx=PATH (no torch at run time)."""
        diff = export_hubert(model_dir, output, opset=opset, check=not no_check)
        tail = "" if diff is None else f"; max |PyTorch - ONNX Runtime| = {diff:.2e}"
        click.echo(f"wrote {output}{tail}")
