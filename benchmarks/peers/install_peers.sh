#!/usr/bin/env bash
# Install the CPU peers of benchmarks/cpu_peers.py, each in its own virtualenv under PEERS_ROOT
# (default $KVTRACE_PEERS_ROOT or /work/peers), with the versions the README's table was measured with.
#   llama.cpp          llama-cpp-python 0.3.36, built from source (-march=native, a few minutes); its sdist
#                      carries vendor/llama.cpp/convert_hf_to_gguf.py and gguf-py (the GGUF conversion)
#   onnxruntime-genai  0.18.0 and its model builder (needs onnx_ir, torch, transformers)
#   CTranslate2        4.8.5 and its transformers converter (needs torch, transformers)
# CPU torch first everywhere: a bare `pip install torch` pulls a multi-GB CUDA build.
set -euo pipefail
ROOT="${1:-${KVTRACE_PEERS_ROOT:-/work/peers}}"
PY="${PYTHON:-python3}"
mkdir -p "$ROOT/src" "$ROOT/logs"

venv() {  # venv NAME PACKAGES...
    local d="$ROOT/venv-$1"; shift
    [ -x "$d/bin/python" ] || "$PY" -m venv "$d"
    "$d/bin/python" -m pip install -q -U pip
    "$d/bin/python" -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    "$d/bin/python" -m pip install -q "$@"
}

# llama.cpp: keep the sdist's sources (the converter lives there), build the wheel from them
venv llamacpp numpy gguf transformers==5.24.0 sentencepiece
if [ ! -d "$ROOT/src/llama_cpp_python-0.3.36" ]; then
    "$ROOT/venv-llamacpp/bin/python" -m pip download -q --no-deps --no-binary :all: llama-cpp-python==0.3.36 \
        -d "$ROOT/src"
    tar -xzf "$ROOT/src/llama_cpp_python-0.3.36.tar.gz" -C "$ROOT/src"
fi
"$ROOT/venv-llamacpp/bin/python" -m pip install -v "$ROOT/src/llama_cpp_python-0.3.36" > "$ROOT/logs/llamacpp-install.log" 2>&1
"$ROOT/venv-llamacpp/bin/python" -m pip install -q -e "$ROOT/src/llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py"

venv ortgenai onnxruntime-genai==0.18.0 onnxruntime==1.32.0 onnx onnx_ir transformers==5.24.0
venv ct2 ctranslate2==4.8.5 transformers==5.24.0
echo "peers installed under $ROOT"
