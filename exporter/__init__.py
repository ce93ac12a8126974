"""kvtrace.exporter: ONNX export, validation, TensorRT engine build, reference adapters
(needs the `export` extra: torch, onnx, safetensors)."""
