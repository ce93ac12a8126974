"""kvtrace: decoder-only LMs (gpt_neox, llama, starcoder2, xglm) -> ONNX / TensorRT artifacts with an
explicit KV cache, a torch-free runtime, and logit-parity checks.

One import package. This top level is the small, torch-free part both sides share:
    errors.py    KvtraceError / ParityFailure (the CLI's exit statuses)
    config.py    ModelConfig: the four architectures as data
    numerics.py  rope / sinusoidal tables and the attention mask rule (one implementation)
    io_spec.py   the I/O contract: graph tensor names, dtypes, axes, cache layouts
    manifest.py  the artifact manifest (kvtrace.json): schema, checks, atomic writes
    files.py     atomic files and directories, digests, memory figures
    cli.py       the `kvtrace` command: dispatches to each command's own module
Subpackages (each a top-level folder of the repository):
    kvtrace.runtime   artifact loading, backends, generation, serving (numpy, onnxruntime, tokenizers)
    kvtrace.models    reference PyTorch model, checkpoint loading          (needs kvtrace[export])
    kvtrace.exporter  ONNX export, validation, TensorRT build, references  (needs kvtrace[export])
    kvtrace.configs   built-in configs, export defaults, tolerances (pure data)
Dependencies point one way: exporter -> models -> kvtrace <- runtime.
"""
__version__ = "0.2.0"
