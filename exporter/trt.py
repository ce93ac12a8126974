"""`kvtrace build`: a TensorRT engine from an artifact's model.onnx. No torch.

Works with the full TensorRT (module `tensorrt`, >= 10.15) and with TensorRT-RTX (module
`tensorrt_rtx`), whichever is installed. TensorRT-RTX builds for named compute capabilities
without a GPU (`--compute-capability sm89`); the full TensorRT builds for the GPU it runs on.

What the parser accepts was measured with TensorRT-RTX 1.7 (docs/tensorrt.md):
- the ONNX `Attention` node becomes IAttention (layer types ATTENTION_INPUT + ATTENTION_OUTPUT),
  `RotaryEmbedding` becomes ROTARY_EMBEDDING, `TensorScatter` on a static cache input becomes
  KV_CACHE_UPDATE (output aliases the input: bind both to one buffer);
- `softmax_precision` on Attention is rejected by the parser: the attribute is removed here
  before parsing (TensorRT's attention kernels keep scores and softmax in fp32 anyway);
- fp32 attention has no dedicated kernel: the build fails unless the attention is marked
  decomposable, which is done here for fp32 networks (the layers stay fused in the network).

Profiles come from the manifest's I/O spec: "decode" (one token per row) first, then "prefill"
(1..max_seq tokens); batch 1..max_batch; a static cache's length is fixed.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

from kvtrace import files
from kvtrace.errors import KvtraceError
from kvtrace.manifest import load_manifest, write_manifest
from kvtrace.runtime.trt_backend import FLAVOURS, TrtLogger, gpu_compute_capability, import_tensorrt, normalize_cc

ENGINE_NAME = "model.engine"
# the largest prefill length the "opt" point of the prefill profile is tuned for by default
DEFAULT_OPT_SEQ = 128


# ------------------------------------------------------------------ profiles
def plan_profiles(io: dict, *, max_batch: int | None = None, max_seq: int | None = None,
                  opt_batch: int | None = None, opt_seq: int | None = None) -> tuple[list[dict], dict]:
    """Optimization profiles [{"name", "inputs": {name: {"min", "opt", "max"}}}] from the I/O spec.

    Symbolic dims: batch, seq (new tokens), past_seq / total_seq (dynamic cache), n_logits (positions
    whose logits are returned); integers are fixed.
    Returns (profiles, limits) with limits = {"max_batch", "max_seq"}.
    """
    layout, cache_len = io["layout"], int(io["max_seq"])
    mb = int(max_batch if max_batch is not None else io["max_batch"])
    ms = int(max_seq if max_seq is not None else cache_len)
    if mb < 1:
        raise KvtraceError(f"--max-batch {mb}: must be at least 1")
    if ms < 1:
        raise KvtraceError(f"--max-seq {ms}: must be at least 1")
    if ms > cache_len:
        what = "static cache length" if layout == "static" else "longest sequence"
        raise KvtraceError(f"--max-seq {ms} exceeds the artifact's {what} {cache_len} (export with a larger "
                           f"--max-seq to go further)")
    ob = int(opt_batch if opt_batch is not None else 1)
    os_ = int(opt_seq if opt_seq is not None else min(DEFAULT_OPT_SEQ, ms))
    if not 1 <= ob <= mb:
        raise KvtraceError(f"--opt-batch {ob}: must be between 1 and the max batch {mb}")
    if not 1 <= os_ <= ms:
        raise KvtraceError(f"--opt-seq {os_}: must be between 1 and the max seq {ms}")

    def ranges(kind: str) -> dict[str, tuple[int, int, int]]:
        seq = (1, 1, 1) if kind == "decode" else (1, os_, ms)
        # dynamic cache: P cached tokens before this call, P + T <= ms
        past = (0, min(os_, ms - 1), ms - 1) if kind == "decode" else (0, 0, ms - 1)
        total = (1, past[1] + seq[1], ms)
        # logits_index: a decode step asks for 1 row; a prefill for 1 (generation: each row's
        # last token, the common case, hence opt 1) up to all T (scoring/parity)
        n_logits = (1, 1, 1) if kind == "decode" else (1, 1, ms)
        return {"batch": (1, ob, mb), "seq": seq, "past_seq": past, "total_seq": total, "n_logits": n_logits}

    profiles = []
    for kind in ("decode", "prefill"):
        dims = ranges(kind)
        inputs = {}
        for t in io["inputs"]:
            lo, opt, hi = [], [], []
            for d in t["shape"]:
                if isinstance(d, int):
                    lo.append(d), opt.append(d), hi.append(d)
                elif d in dims:
                    a, b, c = dims[d]
                    lo.append(a), opt.append(b), hi.append(c)
                else:
                    raise KvtraceError(f"manifest io: input {t['name']!r} has dimension {d!r}; "
                                       f"`kvtrace build` knows {', '.join(dims)}")
            inputs[t["name"]] = {"min": lo, "opt": opt, "max": hi}
        profiles.append({"name": kind, "inputs": inputs})
    if ms == 1:  # both profiles would be the same
        profiles = profiles[:1]
    return profiles, {"max_batch": mb, "max_seq": ms}


# ------------------------------------------------------------------ parsing and inspection
def _onnx_bytes(onnx_file: Path) -> tuple[bytes, list[str]]:
    """model.onnx without its external weights, with what TensorRT rejects removed."""
    import onnx

    from kvtrace.exporter.gpu_form import drop_attention_attribute

    model = onnx.load(str(onnx_file), load_external_data=False)
    changed = drop_attention_attribute(model, "softmax_precision")
    return model.SerializeToString(), changed


def layer_counts(trt, network) -> dict[str, int]:
    """Layer type -> count; "ATTENTION" counts fused attentions (one ATTENTION_OUTPUT each)."""
    counts = Counter(network.get_layer(i).type.name for i in range(network.num_layers))
    out = dict(sorted(counts.items()))
    out["ATTENTION"] = counts.get("ATTENTION_OUTPUT", 0)
    return out


def weight_only_gemms(layers_text: str) -> dict[str, int]:
    """From the builder's engine layer list (logged at VERBOSE with DETAILED profiling verbosity):
    how the quantised matrices were built. "fused": kernels that run the GEMM on INT4/INT8 weights
    directly (a runtime fusion ending in "Fc" whose constants are INT4/INT8: weight-only GEMM);
    "dequantized": kernels that first expand INT4/INT8 constants to a float temporary (a
    CastMulCast kernel), after which a plain GEMM runs. Counted in the first profile only."""
    fused = dequantized = 0
    seen = set()
    for line in layers_text.splitlines():
        if not line.startswith("Name: "):
            continue
        name = line[6:line.find(",")]
        if "[profile" in name and "[profile 0]" not in name:
            continue
        consts = line.split("Constants:", 1)[1].split("Outputs:", 1)[0] if "Constants:" in line else ""
        if "Datatype: Int4" not in consts and "Datatype: Int8" not in consts:
            continue
        base = re.sub(r"_myl\d+_\d+$", "", name)  # __myl_ReplCastMulCastFc_myl4_2 -> __myl_ReplCastMulCastFc
        key = (base, line.split("Metadata:", 1)[-1])
        if key in seen:
            continue
        seen.add(key)
        if "Fc" in base:
            fused += 1
        elif "CastMulCast" in base:
            dequantized += 1
    return {"fused": fused, "dequantized": dequantized}


def _attention_layers(trt, network):
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.ATTENTION_OUTPUT:
            layer.__class__ = trt.IAttentionBoundaryLayer  # the typed view exposes .attention
            yield layer.attention


def parse_network(trt, builder, logger, onnx_file: Path):
    """Strongly typed network from `onnx_file` (external data read beside it)."""
    flag = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flag)
    parser = trt.OnnxParser(network, logger)
    data, stripped = _onnx_bytes(onnx_file)
    if not parser.parse(data, str(onnx_file)):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise KvtraceError(f"TensorRT cannot parse {onnx_file}: " + " | ".join(errs[:3]))
    return network, parser, stripped


# ------------------------------------------------------------------ build
def build_engine(artifact_dir, *, max_batch=None, max_seq=None, opt_batch=None, opt_seq=None,
                 compute_capabilities=None, timing_cache=None, workspace_gb=None, optimization_level=None,
                 flavour=None, log_level="ERROR") -> dict:
    """Build and write the engine, update the manifest; returns the manifest's "tensorrt" entry
    plus "layers" and "engine_path"."""
    d = Path(artifact_dir)
    manifest = load_manifest(d)
    data = dict(manifest.data)
    io = data["io"]
    trt, flv = import_tensorrt(flavour)
    profiles, limits = plan_profiles(io, max_batch=max_batch, max_seq=max_seq, opt_batch=opt_batch,
                                     opt_seq=opt_seq)
    ccs = [normalize_cc(c) for c in (compute_capabilities or [])]
    built_on = gpu_compute_capability()
    if ccs and flv == "tensorrt" and ccs != [built_on]:
        raise KvtraceError(f"--compute-capability {' '.join(ccs)} needs TensorRT-RTX (module tensorrt_rtx): the "
                           f"full TensorRT builds for the GPU it runs on ({built_on or 'none here'})")
    if not ccs and built_on is None:
        # TensorRT-RTX would still build, for a target nobody can name afterwards
        raise KvtraceError("this machine has no NVIDIA GPU: name the GPU(s) the engine is for with "
                           "--compute-capability (e.g. --compute-capability sm89 sm120; needs TensorRT-RTX)")
    if optimization_level is not None and not 0 <= optimization_level <= 5:
        raise KvtraceError(f"--optimization-level {optimization_level}: expected 0..5")

    quant = data.get("quant")
    if quant and quant.get("ragged"):
        name, k = next(iter(quant["ragged"].items()))
        raise KvtraceError(f"{d}: TensorRT cannot build this quantised artifact: {name} has K={k}, not a multiple of "
                           f"its --group-size {quant['group_size']} (TensorRT's DequantizeLinear needs whole blocks); "
                           f"re-export with a --group-size that divides {k}, or run it with onnxruntime")
    logger = TrtLogger(trt, log_level)
    builder = trt.Builder(logger)
    onnx_file = manifest.onnx_path
    network, _parser, stripped = parse_network(trt, builder, logger, onnx_file)
    layers = layer_counts(trt, network)

    decomposable = data["dtype"] == "float32"
    if decomposable:
        for attn in _attention_layers(trt, network):
            attn.decomposable = True  # no fp32 fused kernel: let the builder split it

    config = builder.create_builder_config()
    if quant:  # the engine's layer list (logged by the builder) tells which GEMMs are weight-only
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if ccs and flv == "tensorrt_rtx":
        config.num_compute_capabilities = len(ccs)
        for i, cc in enumerate(ccs):
            config.set_compute_capability(getattr(trt.ComputeCapability, cc.upper()), i)
    if workspace_gb is not None:
        if workspace_gb <= 0:
            raise KvtraceError(f"--workspace {workspace_gb}: must be > 0 (GB)")
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    if optimization_level is not None:
        config.builder_optimization_level = int(optimization_level)
    if timing_cache:
        blob = Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b""
        cache = config.create_timing_cache(blob)
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            raise KvtraceError(f"--timing-cache {timing_cache}: TensorRT cannot use this timing cache")

    names = {network.get_input(i).name for i in range(network.num_inputs)}
    for prof in profiles:
        p = builder.create_optimization_profile()
        unknown = set(prof["inputs"]) - names
        if unknown or names - set(prof["inputs"]):
            raise KvtraceError(f"{onnx_file}: graph inputs {sorted(names)} do not match the manifest's I/O spec "
                               f"{sorted(prof['inputs'])}")
        for name, r in prof["inputs"].items():
            p.set_shape(name, r["min"], r["opt"], r["max"])
        config.add_optimization_profile(p)

    t0 = time.perf_counter()
    try:
        blob = builder.build_serialized_network(network, config)
    except Exception as e:  # the Python binding raises on some internal errors
        logger.errors.append(str(e))
        blob = None
    seconds = time.perf_counter() - t0
    if blob is None:
        raise KvtraceError(f"TensorRT could not build an engine from {onnx_file}: "
                           + " | ".join(logger.errors[-3:]))

    engine_path = d / ENGINE_NAME
    files.atomic_write_bytes(engine_path, blob)
    if timing_cache:
        files.atomic_write_bytes(Path(timing_cache), config.get_timing_cache().serialize(), what="--timing-cache")

    section = {
        "flavour": flv,
        "version": trt.__version__,
        "engine": ENGINE_NAME,
        "engine_sha256": hashlib.sha256(memoryview(blob)).hexdigest(),
        "onnx_sha256": files.sha256_file(onnx_file),
        "compute_capabilities": ccs or ["current"],
        "built_on_cc": built_on,
        "profiles": profiles,
        "limits": limits,
        "attention_decomposable": decomposable,
        "stripped_attributes": {"softmax_precision": len(stripped)} if stripped else {},
        "optimization_level": optimization_level,
        "build_seconds": round(seconds, 3),
        "layers": layers,
    }
    if quant:
        section["quantized_gemms"] = weight_only_gemms(logger.layers_text)
    data["tensorrt"] = section
    write_manifest(d, data)
    return {**section, "engine_path": str(engine_path)}


def add_arguments(p) -> None:
    """The command's options (kvtrace/cli.py builds the parser)."""
    p.add_argument("artifact")
    p.add_argument("--max-batch", type=int)
    p.add_argument("--max-seq", type=int)
    p.add_argument("--opt-batch", type=int)
    p.add_argument("--opt-seq", type=int)
    p.add_argument("--compute-capability", nargs="+", default=None,
                   help="target GPU(s), e.g. sm89 (needed to build on a machine without a GPU)")
    p.add_argument("--timing-cache", help="timing cache file to read and update")
    p.add_argument("--workspace", type=float, help="builder workspace limit in GB")
    p.add_argument("--optimization-level", type=int, choices=range(6), metavar="0-5",
                   help="TensorRT builder optimization level (default: TensorRT's, 3); 0 builds fastest")
    p.add_argument("--flavour", choices=FLAVOURS,
                   help="TensorRT Python module to use (default: tensorrt if installed, else tensorrt_rtx)")
    p.add_argument("--verbose", action="store_true", help="print TensorRT's warnings")
    p.add_argument("--inspect", action="store_true", help="list the network's layer types and counts")
    p.add_argument("--json", action="store_true")


def main(args) -> int:
    opt_level = getattr(args, "optimization_level", None)
    res = build_engine(args.artifact, max_batch=args.max_batch, max_seq=args.max_seq, opt_batch=args.opt_batch,
                       opt_seq=args.opt_seq, compute_capabilities=args.compute_capability,
                       timing_cache=args.timing_cache, workspace_gb=args.workspace,
                       optimization_level=opt_level, flavour=getattr(args, "flavour", None),
                       log_level="WARNING" if getattr(args, "verbose", False) else "ERROR")
    layers = res["layers"]
    if not layers.get("ATTENTION") and layers.get("SOFTMAX"):
        print("kvtrace build: note: attention is not fused in this graph (an --opset 17 export?); "
              "export with the default opset for fused attention", file=sys.stderr)
    if args.json:
        print(json.dumps({"layers": layers, "engine": res["engine_path"], "build_seconds": res["build_seconds"],
                          "flavour": res["flavour"], "version": res["version"],
                          "compute_capabilities": res["compute_capabilities"],
                          **({"quantized_gemms": res["quantized_gemms"]} if "quantized_gemms" in res else {})}))
        return 0
    print(f"kvtrace: built {res['engine_path']} with {res['flavour']} {res['version']} for "
          f"{', '.join(res['compute_capabilities'])} in {res['build_seconds']:.1f} s "
          f"(batch <= {res['limits']['max_batch']}, <= {res['limits']['max_seq']} tokens per call)")
    if "quantized_gemms" in res:
        qg = res["quantized_gemms"]
        print(f"  quantised matrices: {qg['fused']} weight-only GEMM(s) on INT4/INT8 weights, {qg['dequantized']} "
              "dequantised to a float temporary per call")
    if args.inspect:
        width = max(len(k) for k in layers)
        for name, n in layers.items():
            print(f"  {name:<{width}}  {n}")
    return 0

