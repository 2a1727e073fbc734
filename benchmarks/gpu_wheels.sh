#!/usr/bin/env bash
# Prepare what the GPU test machine lacks (see ../shared/docs/GPU.md): wheels for
# CPython 3.12 of onnxruntime-gpu (CUDA 13 build, 255 MB: split into 50 MB parts
# because a device call carries at most 64 MiB) and PyAV, plus the pycuda sdist.
# Output goes to .wheels/ (ignored by git). Usage: bash benchmarks/gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=.wheels
mkdir -p "$out"
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 -d "$out" onnxruntime-gpu==1.31.1 av
pip download -q --no-deps --no-binary=:all: -d "$out" pycuda
ort=$(ls "$out"/onnxruntime_gpu-*.whl)
rm -f "$out"/ort.part.*
split -b 50M "$ort" "$out/ort.part."
ls -la "$out"
cat <<MSG
Next, on the device, back to back while it stays warm:
  for each part XX: carry [".wheels/ort.part.XX"], command: mkdir -p /tmp/w && cp .wheels/ort.part.XX /tmp/w/
  then, carrying the PyAV wheel:
    cat /tmp/w/ort.part.* > /tmp/w/$(basename "$ort") && pip uninstall -y onnxruntime &&
    pip install /tmp/w/$(basename "$ort") .wheels/av-*.whl && pip install --no-deps -e . &&
    python -m pytest -m gpu -q && python benchmarks/gpu_backends.py &&
    avatar bench --backends cpu,onnx-cuda --batch-sizes 1,4,16,64
MSG
