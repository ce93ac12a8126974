#!/usr/bin/env python3
"""Quantize an f32 GGUF with llama.cpp's own quantizer (llama_cpp.llama_model_quantize), i.e. the
same code path as `llama-quantize IN OUT TYPE` with default options (not --pure: llama.cpp picks
its usual per-tensor types, e.g. output.weight -> q6_K for q4_0).

Run with /work/peers/venv-llamacpp/bin/python:
  llamacpp_quantize.py IN.gguf OUT.gguf q8_0|q4_0|q4_k_m|... [--threads 2] [--pure]
"""
import argparse
import sys

import llama_cpp


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inp")
    ap.add_argument("out")
    ap.add_argument("type", help="llama_ftype name without LLAMA_FTYPE_MOSTLY_ (q8_0, q4_0, q4_k_m, ...)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pure", action="store_true")
    a = ap.parse_args()
    name = "LLAMA_FTYPE_MOSTLY_" + a.type.upper()
    if not hasattr(llama_cpp, name):
        sys.exit(f"unknown type {a.type} ({name} not in llama_cpp)")
    llama_cpp.llama_backend_init()
    p = llama_cpp.llama_model_quantize_default_params()
    p.nthread = a.threads
    p.ftype = getattr(llama_cpp, name)
    p.pure = a.pure
    rc = llama_cpp.llama_model_quantize(a.inp.encode(), a.out.encode(), p)
    if rc != 0:
        sys.exit(f"llama_model_quantize failed: {rc}")
    print(f"quantized {a.inp} -> {a.out} ({a.type})")


if __name__ == "__main__":
    main()
