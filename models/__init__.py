"""Reference PyTorch models and checkpoint loading.

config.py       ModelConfig (pure Python; the runtime imports it)
transformer.py  the one Transformer with explicit static / dynamic KV caches
hf.py           Hugging Face config.json -> ModelConfig, tensor name tables (pure Python)
checkpoint.py   load_checkpoint(): strict safetensors (or opt-in pickle) loading
llama2c.py      llama2.c legacy .bin -> Hugging Face Llama checkpoint directory

Nothing is imported here, so `import models.config` stays torch-free.
"""
