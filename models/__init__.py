"""kvtrace.models: the reference PyTorch model and checkpoint loading (needs the `export` extra).

transformer.py  the one Transformer with explicit static / dynamic KV caches
ops.py          its fused points as torch custom ops (attention, rotary, static cache write),
                which the traced export (exporter/trace_export.py) maps to ONNX's fused ops
hf.py           Hugging Face config.json -> ModelConfig, tensor name tables (pure Python)
checkpoint.py   open_checkpoint(): config, shards, headers and the strict checks (torch-free);
                load_checkpoint(): strict safetensors (or opt-in pickle) loading into the model
stream.py       CheckpointWeights: canonical tensors one at a time from memory-mapped shards
                (the streamed export; numpy, no torch)
llama2c.py      llama2.c legacy .bin -> Hugging Face Llama checkpoint directory
ModelConfig itself is kvtrace.config (torch-free: the runtime reads it from manifests).
"""
