"""Training support that needs no PyTorch: the data a run reads and the gate it must pass.

The loop itself (PyTorch) lives with the reference networks in
the PyTorch reference plugin (plugins/torch_reference/training.py); ``avatar train`` is that plugin's command.
"""

from .data import MIN_TRAIN_S, MOUTH_COLS, MOUTH_ROWS, TrainData, face_psnr, load_data
from .gate import gate, install_model

__all__ = ["MIN_TRAIN_S", "MOUTH_COLS", "MOUTH_ROWS", "TrainData", "face_psnr", "gate", "install_model", "load_data"]
