"""Model builders that need only numpy, onnx and ONNX Runtime (no PyTorch)."""
