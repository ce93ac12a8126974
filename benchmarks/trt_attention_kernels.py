"""Which attention kernels TensorRT(-RTX) picks for each graph form, without a GPU.

    python3 benchmarks/trt_attention_kernels.py [--out DIR] [--excerpts FILE]

For the built-in models of every architecture, fp16 and fp32, it exports the fused artifact
(opset 24, static cache) and the portable one (--opset 17, dynamic cache), then builds an sm89
engine with TensorRT-RTX from each graph file of the artifact (model.gpu.onnx, the TensorRT graph,
and model.onnx, the CPU form) with kvtrace's decode and prefill profiles, and reads the
builder's per-layer report (DETAILED profiling verbosity: the engine inspector's information,
which the builder logs at the end of a build; the inspector itself needs a deserialized engine,
i.e. a GPU). It prints, per profile, the fused multi-head-attention kernels found (one per
transformer layer = every attention is one kernel) and writes the report lines of the first
layer's attention to --excerpts (docs/tensorrt.md quotes them).

TensorRT-RTX's Myelin is the same optimizer family as TensorRT 10.x's, but not the same
release: on TensorRT 10.3 (JetPack 6) check with `trtexec ... --profilingVerbosity=detailed
--dumpLayerInfo` on the device (docs/tensorrt.md).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_report(art: Path, graph: Path):
    import tensorrt_rtx as trt

    from kvtrace.exporter import trt as build
    from kvtrace.manifest import load_manifest
    from kvtrace.runtime.trt_backend import TrtLogger

    m = load_manifest(art)
    logger = TrtLogger(trt)
    builder = trt.Builder(logger)
    network, _parser, _ = build.parse_network(trt, builder, logger, graph)
    layers = build.layer_counts(trt, network)
    if layers.get("ATTENTION") and (m.dtype == "float32" or graph.name == "model.onnx"):
        for attn in build._attention_layers(trt, network):  # fp32 attention: no dedicated prefill kernel
            attn.decomposable = True
    profiles, _ = build.plan_profiles(m.io)
    config = build.configure(trt, builder, "tensorrt_rtx", ccs=["sm89"])
    build.add_profiles(builder, config, network, profiles, graph)
    build.build_serialized(builder, network, config, logger, graph)
    return layers, build.attention_kernels(logger.layer_info, len(profiles)), logger.layer_info


def excerpt(layer_info: str, n: int = 12) -> list[str]:
    """The report's lines of layer 0's attention: name, type and kernel of each layer touching it."""
    out = []
    for line in layer_info.splitlines():
        if not line.startswith("Name: "):
            continue
        name = line[6:line.index(", LayerType:")]
        kind = re.search(r"LayerType: ([^,]+)", line).group(1)
        tactic = (re.search(r"TacticName: ([^,]*)", line) or [None, ""])[1]
        if "_mha" in name or "Sele" in name or "Max" in name or "Softmax" in line or "n_Attention" in line:
            out.append(f"Name: {name}, LayerType: {kind}, TacticName: {tactic}")
        if len(out) >= n:
            break
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="where the artifacts go (default: a temporary directory)")
    ap.add_argument("--excerpts", help="write the report excerpts here")
    ap.add_argument("--archs", nargs="+", default=["gpt_neox", "llama", "starcoder2", "xglm"])
    a = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    from kvtrace import configs
    from kvtrace.exporter.export import export_model
    from kvtrace.models.transformer import random_model

    out = Path(a.out or tempfile.mkdtemp(prefix="kvtrace-kernels-"))
    rows, texts = [], []
    for arch in a.archs:
        for dtype in ("float16", "float32"):
            for layout, opset in (("static", 24), ("dynamic", 17)):
                model = random_model(configs.BUILTIN[arch], configs.BUILTIN_SEED, getattr(torch, dtype))
                art = export_model(model, out / f"{arch}-{dtype}-{layout}-{opset}", dtype=dtype, layout=layout,
                                   opset=opset, max_seq=256, max_batch=8, validate=False, force=True,
                                   log=lambda m: None)
                for graph in ("model.gpu.onnx", "model.onnx"):
                    layers, kernels, info = build_report(art, art / graph)
                    row = {"arch": arch, "dtype": dtype, "opset": opset, "graph": graph,
                           "fused_layers": layers.get("ATTENTION", 0), "softmax_layers": layers.get("SOFTMAX", 0),
                           "decode": kernels[0], "prefill": kernels[1] if len(kernels) > 1 else None}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    texts.append(f"## {arch} {dtype} opset {opset} {graph}\n" + "\n".join(excerpt(info)))
    if a.excerpts:
        Path(a.excerpts).write_text("\n\n".join(texts) + "\n")
    print("\n| arch | dtype | opset | graph | decode | prefill |\n|---|---|---|---|---|---|")
    for r in rows:
        fmt = lambda k: ", ".join(f"{n} x{c}" for n, c in sorted(k.items())) if k else "none"  # noqa: E731
        print(f"| {r['arch']} | {r['dtype']} | {r['opset']} | {r['graph']} | {fmt(r['decode'])} | "
              f"{fmt(r['prefill']) if r['prefill'] is not None else '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
