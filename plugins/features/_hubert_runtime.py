"""Loading and running HuBERT for the ``hubert`` feature source: PyTorch or ONNX Runtime.

Kept apart from the source so the clip/pairing logic reads on its own. Heavy
packages (torch, transformers, onnxruntime) are imported inside functions: the
ONNX path must work on a machine that never installed torch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from avatar.errors import BackendUnavailable, ConfigError, FeatureError, MissingDependency

log = logging.getLogger(__name__)

#: the conv feature encoder is one big Conv1D of kernel 400 and stride 320 samples
KERNEL = 400
STRIDE = 320
HIDDEN = 1024
#: metadata keys written into exported ONNX files (the normalisation travels with the model)
META_NORMALIZE = "avatar.hubert.do_normalize"
META_RATE = "avatar.hubert.sampling_rate"

HOW_TO_GET = (
    "HuBERT weights are never downloaded at run time. On a machine with internet run "
    "`huggingface-cli download facebook/hubert-large-ls960-ft --local-dir DIR` (or in Python "
    "`HubertModel.from_pretrained('facebook/hubert-large-ls960-ft').save_pretrained(DIR)` and "
    "`Wav2Vec2FeatureExtractor.from_pretrained('facebook/hubert-large-ls960-ft').save_pretrained(DIR)`), "
    "copy DIR here and pass model=DIR (`--hubert-model DIR`)"
)

Runner = Callable[[np.ndarray], np.ndarray]


def check_model_dir(model_dir: str | Path) -> Path:
    """The directory, checked to hold a transformers HuBERT (config + weights)."""
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise FeatureError(f"HuBERT model directory not found: {path}. {HOW_TO_GET}")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    weights = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
    if not any((path / w).is_file() for w in weights):
        missing.append("model.safetensors (or pytorch_model.bin)")
    if missing:
        raise FeatureError(f"HuBERT model directory {path} lacks {' and '.join(missing)}. {HOW_TO_GET}")
    return path


def read_do_normalize(model_dir: Path | None) -> bool:
    """Whether inputs are normalised to zero mean / unit variance before the model.

    Read from the directory's ``preprocessor_config.json`` (the Wav2Vec2 feature
    extractor saved beside the weights) when present; otherwise the documented
    setting of facebook/hubert-large-ls960-ft, which normalises.
    """
    if model_dir is None:
        return True
    cfg = model_dir / "preprocessor_config.json"
    if not cfg.is_file():
        log.info("no preprocessor_config.json in %s; using HuBERT-large's normalisation", model_dir)
        return True
    try:
        data = json.loads(cfg.read_text())
    except (OSError, ValueError) as exc:
        raise FeatureError(f"cannot read {cfg}: {exc}; re-save the feature extractor with save_pretrained") from exc
    rate = int(data.get("sampling_rate", 16000))
    if rate != 16000:
        raise FeatureError(f"{cfg} says sampling_rate {rate}; the HuBERT source needs a 16 kHz model")
    return bool(data.get("do_normalize", True))


def normalize(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance over the whole array, exactly as Wav2Vec2FeatureExtractor does (float32)."""
    x = np.asarray(x, dtype=np.float32)
    return (x - x.mean()) / np.sqrt(x.var() + 1e-7)


def parse_device(device: str) -> tuple[str, int]:
    """``"cpu"``, ``"cuda"`` or ``"cuda:N"`` → (kind, index)."""
    d = str(device).strip().lower()
    if d == "cpu":
        return "cpu", 0
    if d == "cuda" or d.startswith("cuda:"):
        idx = d.partition(":")[2]
        if idx and not idx.isdigit():
            raise ConfigError(f"hubert: device {device!r} is not valid; use cpu, cuda or cuda:N")
        return "cuda", int(idx or 0)
    raise ConfigError(f"hubert: device {device!r} is not valid; use cpu, cuda or cuda:N")


def import_torch_transformers() -> tuple[Any, Any]:
    try:
        import torch
        import transformers
    except ImportError as exc:
        raise MissingDependency("transformers", "hubert", feature="HuBERT features") from exc
    return torch, transformers


@contextlib.contextmanager
def _offline_env() -> Iterator[None]:
    """``HF_HUB_OFFLINE=1`` while the block runs; the previous value (or its absence) afterwards."""
    before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before


def load_torch_model(model_dir: Path) -> Any:
    """``HubertModel`` from a local directory, offline, in eval mode, checked 1024 wide."""
    torch, transformers = import_torch_transformers()
    # Nothing may be fetched from a hub: a directory path plus local_files_only never
    # touches the network. HF_HUB_OFFLINE also stops transformers' optional look-ups,
    # but only for this call: the process (and an application embedding us) keeps its own setting.
    try:
        with _offline_env():
            model = transformers.HubertModel.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise FeatureError(f"cannot load HuBERT from {model_dir}: {exc}. {HOW_TO_GET}") from exc
    hidden = int(model.config.hidden_size)
    if hidden != HIDDEN:
        raise FeatureError(
            f"the HuBERT in {model_dir} is {hidden} wide, but UNet-328's HuBERT branch takes 1024-wide rows "
            "(facebook/hubert-large-ls960-ft); use that model"
        )
    return model.eval()


class TorchRunner:
    """HuBERT through PyTorch: normalised samples ``[S]`` in, ``last_hidden_state`` ``[T, 1024]`` out."""

    def __init__(self, model_dir: Path, device: str = "cpu") -> None:
        kind, idx = parse_device(device)
        torch, _ = import_torch_transformers()
        if kind == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable(
                f"hubert: device {device!r} was asked for but PyTorch sees no CUDA GPU; use device='cpu'"
            )
        self._torch = torch
        self.device = torch.device("cpu" if kind == "cpu" else f"cuda:{idx}")
        self.model = load_torch_model(model_dir).to(self.device)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None].to(self.device)
            return self.model(t).last_hidden_state[0].float().cpu().numpy()

    def close(self) -> None:
        self.model = None


class OrtRunner:
    """An exported HuBERT through ONNX Runtime (no torch): same contract as :class:`TorchRunner`."""

    def __init__(self, path: Path, device: str = "cpu") -> None:
        kind, idx = parse_device(device)
        if not path.is_file():
            raise FeatureError(
                f"HuBERT ONNX file not found: {path}; make one with `avatar export-hubert DIR -o {path.name}`"
            )
        import onnxruntime as ort

        providers: list[Any] = ["CPUExecutionProvider"]
        if kind == "cuda":
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": idx}))
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise FeatureError(f"cannot load the HuBERT ONNX file {path}: {exc}") from exc
        if kind == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise BackendUnavailable(
                f"hubert: device {device!r} was asked for but ONNX Runtime could not use CUDA here; use device='cpu'"
            )
        ins, outs = self.session.get_inputs(), self.session.get_outputs()
        if len(ins) != 1 or len(ins[0].shape) != 2 or not outs or len(outs[0].shape) != 3:
            found = ", ".join(f"{i.name}{i.shape}" for i in ins) + " -> " + ", ".join(f"{o.name}{o.shape}" for o in outs)
            raise FeatureError(
                f"{path} is not an exported HuBERT: expected input_values[1,samples] -> "
                f"last_hidden_state[1,frames,1024], found {found}; export with `avatar export-hubert`"
            )
        width = outs[0].shape[2]
        if isinstance(width, int) and width != HIDDEN:
            raise FeatureError(f"{path} makes {width}-wide rows; UNet-328's HuBERT branch needs 1024 (hubert-large)")
        self._in, self._out = ins[0].name, outs[0].name
        meta = self.session.get_modelmeta().custom_metadata_map
        self.do_normalize: bool | None = None
        if META_NORMALIZE in meta:
            self.do_normalize = meta[META_NORMALIZE].strip().lower() in ("1", "true", "yes")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        feed = np.ascontiguousarray(x, dtype=np.float32)[None]
        return np.asarray(self.session.run([self._out], {self._in: feed})[0][0], dtype=np.float32)

    def close(self) -> None:
        self.session = None


def export_onnx(model_dir: str | Path, output: str | Path, *, opset: int = 17, check: bool = True) -> float | None:
    """Export a local HuBERT to ONNX (``input_values[1,samples]`` → ``last_hidden_state``).

    The feature extractor's ``do_normalize`` is stored in the file's metadata so
    the ONNX path normalises like the PyTorch one. With ``check``, one second and
    a half of seeded noise runs through both and the largest absolute difference
    is returned (a :class:`FeatureError` when it exceeds 1e-3).
    """
    path = check_model_dir(model_dir)
    torch, _ = import_torch_transformers()
    import onnx

    model = load_torch_model(path)
    out = Path(output).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.from_numpy(np.random.default_rng(0).standard_normal(24000).astype(np.float32))[None]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(
            model,
            (example,),
            str(out),
            input_names=["input_values"],
            output_names=["last_hidden_state"],
            dynamic_axes={"input_values": {1: "samples"}, "last_hidden_state": {1: "frames"}},
            opset_version=opset,
            dynamo=False,
        )
    proto = onnx.load(str(out))
    for key, value in ((META_NORMALIZE, str(read_do_normalize(path)).lower()), (META_RATE, "16000")):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(out))
    log.info("exported HuBERT from %s to %s (opset %d)", path, out, opset)
    if not check:
        return None
    probe = normalize(np.random.default_rng(1).standard_normal(24000).astype(np.float32))
    with torch.inference_mode():
        ref = model(torch.from_numpy(probe)[None]).last_hidden_state[0].numpy()
    got = OrtRunner(out)(probe)
    diff = float(np.abs(ref - got).max()) if ref.shape == got.shape else float("inf")
    if not diff <= 1e-3:
        raise FeatureError(
            f"the exported HuBERT {out} disagrees with PyTorch (max |diff| {diff:.3g}, shapes {ref.shape} vs "
            f"{got.shape}); try another --opset"
        )
    return diff
