"""kvtrace.runtime: loads an artifact directory and runs it (numpy, onnxruntime, tokenizers; no
torch, nothing from kvtrace.models or kvtrace.exporter)."""
